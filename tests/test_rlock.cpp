// tests/test_rlock.cpp - mp::RLock: recursion, ownership errors, mutual exclusion between
// processes, timeouts, and recovery when the holder dies at any depth.
#include <atomic>
#include <catch2/catch.hpp>
#include <csignal>
#include <cstdint>
#include <mp/process.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <thread>
#include <vector>

#include "shm.hpp"
#include "sync_helpers.hpp"

using namespace std::chrono_literals;
using synctest::Shared;

namespace {

struct Data {
  std::int64_t value;
  std::atomic<int> holding;
  std::atomic<int> go;
};

// Each increment takes the lock twice, as a function calling a helper that locks again.
void bump(mp::RLock& lock, Data& d) {
  std::lock_guard inner{lock};
  d.value = d.value + 1;
}
int add_nested(mp::RLock lock, Shared<Data> d, int n) {
  for (int i = 0; i < n; ++i) {
    std::lock_guard outer{lock};
    if (lock.depth() != 1) return 2;
    bump(lock, *d);
  }
  return 0;
}

int hold_deep_until_killed(mp::RLock lock, Shared<Data> d) {
  lock.acquire();
  lock.acquire();
  lock.acquire();
  d->holding = lock.depth();
  return synctest::sleep_until_killed();
}

int hold_until_go(mp::RLock lock, Shared<Data> d) {
  lock.acquire();
  lock.acquire();
  d->holding = 1;
  if (!synctest::eventually([&] { return d->go.load() != 0; })) return 98;
  lock.release();
  lock.release();
  return 0;
}

int try_release(mp::RLock lock) {
  try {
    lock.release();
  } catch (const mp::ProcessError&) {
    return lock.depth() == 0 ? 0 : 2;
  }
  return 1;
}

}  // namespace

TEST_CASE("rlock: the holder may acquire again, it is free after as many releases", "[rlock]") {
  mp::RLock lock;
  CHECK(lock.depth() == 0);
  CHECK(lock.acquire());
  CHECK(lock.acquire());
  CHECK(lock.try_acquire());
  CHECK(lock.acquire(10ms));
  CHECK(lock.depth() == 4);
  CHECK(lock.locked());
  lock.release();
  lock.release();
  lock.release();
  CHECK(lock.locked());
  CHECK(lock.depth() == 1);
  lock.release();
  CHECK_FALSE(lock.locked());
  CHECK(lock.depth() == 0);
  CHECK_THROWS_AS(lock.release(), mp::ProcessError);
  {
    std::lock_guard a{lock};
    std::unique_lock b{lock};
    CHECK(lock.depth() == 2);
  }
  CHECK_FALSE(lock.locked());
  CHECK_FALSE(lock.owner_died());
}

TEST_CASE("rlock: another thread neither gets it nor releases it", "[rlock]") {
  mp::RLock lock;
  lock.acquire();
  bool got = true;
  bool refused = false;
  int depth_seen = -1;
  std::thread t([&] {
    got = lock.try_acquire() || lock.acquire(20ms);
    depth_seen = lock.depth();
    try {
      lock.release();
    } catch (const mp::ProcessError&) {
      refused = true;
    }
  });
  t.join();
  CHECK_FALSE(got);
  CHECK(depth_seen == 0);
  CHECK(refused);
  CHECK(lock.depth() == 1);
  lock.release();
}

TEST_CASE("rlock: a handle received through the descriptor channel, kinds are checked", "[rlock]") {
  mp::RLock lock;
  std::string bytes;
  std::vector<int> fds;
  {
    mp::detail::FdExport exported;
    bytes = mp::dumps(lock);
    fds = exported.exported();
  }
  mp::detail::FdImport imported(fds);
  auto received = mp::load<mp::RLock>(bytes);
  CHECK(received.acquire());
  CHECK(lock.depth() == 1);
  CHECK(lock.acquire());
  CHECK(received.depth() == 2);
  lock.release();
  received.release();
  CHECK_FALSE(lock.locked());
  CHECK_THROWS_AS(mp::load<mp::Lock>(bytes), mp::SerializationError);
}

TEST_CASE("rlock: nested locking in several processes gives an exact count", "[rlock]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::RLock lock;
  Shared<Data> d;
  constexpr int kWorkers = 3;
  constexpr int kEach = 10'000;
  std::vector<mp::Process> workers;
  for (int i = 0; i < kWorkers; ++i) workers.emplace_back(ctx, add_nested, lock, d, kEach);
  for (auto& w : workers) w.start();
  for (auto& w : workers) {
    REQUIRE(w.join(120s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(d->value == kWorkers * kEach);
  CHECK_FALSE(lock.locked());
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(workers)).empty());
}

TEST_CASE("rlock: timeouts and release by a process that does not hold it", "[rlock]") {
  auto ctx = synctest::any_context();
  mp::RLock lock;
  Shared<Data> d;
  mp::Process holder{ctx, hold_until_go, lock, d};
  holder.start();
  REQUIRE(synctest::eventually([&] { return d->holding.load() == 1; }));
  CHECK_FALSE(lock.try_acquire());
  CHECK_FALSE(lock.acquire(30ms));
  CHECK_THROWS_AS(lock.release(), mp::ProcessError);
  mp::Process stranger{ctx, try_release, lock};
  stranger.start();
  REQUIRE(stranger.join(60s));
  CHECK(stranger.exitcode() == 0);
  d->go = 1;
  CHECK(lock.acquire(60s));
  CHECK(lock.depth() == 1);
  lock.release();
  REQUIRE(holder.join(60s));
  CHECK(holder.exitcode() == 0);
}

TEST_CASE("rlock: a holder killed three levels deep: the next one gets it at depth 1", "[rlock]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::RLock lock;
  Shared<Data> d;
  mp::Process holder{ctx, hold_deep_until_killed, lock, d};
  holder.start();
  REQUIRE(synctest::eventually([&] { return d->holding.load() == 3; }));
  holder.kill();
  REQUIRE(holder.join(60s));
  CHECK(holder.exitcode() == -SIGKILL);
  // Held by a dead owner until someone recovers it (the kernel cleared its thread id).
  CHECK(lock.locked());
  CHECK_FALSE(lock.held_by_me());
  REQUIRE(lock.acquire(60s));
  CHECK(lock.owner_died());
  CHECK(lock.depth() == 1);
  CHECK(lock.recoveries() == 1);
  lock.release();
  CHECK_FALSE(lock.locked());
  CHECK(lock.acquire());
  CHECK_FALSE(lock.owner_died());
  lock.release();
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(holder)).empty());
}
