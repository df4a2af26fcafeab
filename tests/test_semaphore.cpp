// tests/test_semaphore.cpp - mp::Semaphore and mp::BoundedSemaphore: counting, timeouts,
// the bound, and at most K processes inside at once.
#include <atomic>
#include <catch2/catch.hpp>
#include <mp/process.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "shm.hpp"
#include "sync_helpers.hpp"

using namespace std::chrono_literals;
using synctest::Shared;

namespace {

struct Room {
  std::atomic<int> inside;
  std::atomic<int> max_inside;
  std::atomic<int> visits;
  std::atomic<int> waiting;
};

// Enters the room `times` times through the semaphore, recording how many are inside.
int visit(mp::Semaphore sem, Shared<Room> room, int times) {
  for (int i = 0; i < times; ++i) {
    std::lock_guard guard{sem};
    int now = ++room->inside;
    int seen = room->max_inside.load();
    while (now > seen && !room->max_inside.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(200us);
    ++room->visits;
    --room->inside;
  }
  return 0;
}

// 0 when acquire(timeout) gave what `expected` says.
int timed_acquire(mp::Semaphore sem, Shared<Room> room, double seconds, bool expected) {
  ++room->waiting;
  bool got = sem.acquire(mp::Seconds(seconds));
  return got == expected ? 0 : 1;
}

}  // namespace

TEST_CASE("semaphore: counts units, timeouts, Python's unbounded release", "[semaphore]") {
  mp::Semaphore sem(2);
  CHECK(sem.get_value() == 2);
  CHECK(sem.acquire());
  CHECK(sem.try_acquire());
  CHECK(sem.get_value() == 0);
  CHECK_FALSE(sem.try_acquire());
  CHECK_FALSE(sem.acquire(false));
  CHECK_FALSE(sem.acquire(20ms));
  CHECK_FALSE(sem.try_lock_for(5ms));
  sem.release();
  CHECK(sem.get_value() == 1);
  {
    std::lock_guard guard{sem};
    CHECK(sem.get_value() == 0);
  }
  sem.release();
  // A plain Semaphore may go above its initial value, as in Python.
  sem.release();
  CHECK(sem.get_value() == 3);
  CHECK_THROWS_AS(mp::Semaphore(-1), std::invalid_argument);
  mp::Semaphore zero(0);
  CHECK_FALSE(zero.try_acquire());
}

TEST_CASE("semaphore: BoundedSemaphore refuses a release above its initial value", "[semaphore]") {
  mp::BoundedSemaphore sem(2);
  CHECK_THROWS_AS(sem.release(), mp::ProcessError);
  CHECK(sem.get_value() == 2);
  sem.acquire();
  sem.release();
  CHECK_THROWS_AS(sem.release(), mp::ProcessError);
  CHECK(sem.get_value() == 2);
  CHECK_THROWS_AS(mp::BoundedSemaphore(-3), std::invalid_argument);

  // The kind travels with the descriptor.
  std::string bytes;
  std::vector<int> fds;
  {
    mp::detail::FdExport exported;
    bytes = mp::dumps(sem);
    fds = exported.exported();
  }
  mp::detail::FdImport imported(fds);
  auto received = mp::load<mp::BoundedSemaphore>(bytes);
  CHECK(received == sem);
  received.acquire();
  CHECK(sem.get_value() == 1);
  received.release();
  CHECK_THROWS_AS(received.release(), mp::ProcessError);
  CHECK_THROWS_AS(mp::load<mp::Semaphore>(bytes), mp::SerializationError);
}

TEST_CASE("semaphore: at most K processes are ever inside", "[semaphore]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  constexpr int kUnits = 2;
  constexpr int kWorkers = 5;
  constexpr int kTimes = 40;
  mp::BoundedSemaphore sem(kUnits);
  Shared<Room> room;
  std::vector<mp::Process> workers;
  for (int i = 0; i < kWorkers; ++i) workers.emplace_back(ctx, visit, sem, room, kTimes);
  for (auto& w : workers) w.start();
  for (auto& w : workers) {
    REQUIRE(w.join(120s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(room->visits == kWorkers * kTimes);
  CHECK(room->max_inside.load() >= 1);
  CHECK(room->max_inside.load() <= kUnits);
  CHECK(room->inside == 0);
  CHECK(sem.get_value() == kUnits);
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(workers)).empty());
}

TEST_CASE("semaphore: a waiting child is woken by a release, another times out", "[semaphore]") {
  auto ctx = synctest::any_context();
  mp::Semaphore sem(0);
  Shared<Room> room;
  mp::Process times_out{ctx, timed_acquire, sem, room, 0.05, false};
  times_out.start();
  REQUIRE(times_out.join(60s));
  CHECK(times_out.exitcode() == 0);

  std::vector<mp::Process> waiters;
  for (int i = 0; i < 3; ++i) waiters.emplace_back(ctx, timed_acquire, sem, room, 60.0, true);
  for (auto& w : waiters) w.start();
  REQUIRE(synctest::eventually([&] { return room->waiting.load() == 4; }));
  for (int i = 0; i < 3; ++i) sem.release();
  for (auto& w : waiters) {
    REQUIRE(w.join(90s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(sem.get_value() == 0);
}
