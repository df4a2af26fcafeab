// tests/test_lock.cpp - mp::Lock: mutual exclusion between processes, timeouts, ownership
// errors, the standard guards, and recovery when the holder is killed.
//
// Cross-process cases run under every start method the build supports.
#include <atomic>
#include <catch2/catch.hpp>
#include <csignal>
#include <cstdint>
#include <mp/detail/futex.hpp>
#include <mp/process.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "shm.hpp"
#include "sync_helpers.hpp"

using namespace std::chrono_literals;
using synctest::Shared;

namespace {

struct Counter {
  std::int64_t value;  // plain, not atomic: only the lock makes the increments safe
  std::atomic<int> holding;
  std::atomic<int> go;
};

// Read, pause, write back: without the lock, two processes would lose updates here.
int add_under_lock(mp::Lock lock, Shared<Counter> c, int n) {
  for (int i = 0; i < n; ++i) {
    std::lock_guard guard{lock};
    std::int64_t v = c->value;
    for (int k = 0; k < 20; ++k) mp::detail::cpu_relax();
    c->value = v + 1;
  }
  return 0;
}

// Takes the lock, says so, and keeps it until `go` (or until killed).
int hold_until_go(mp::Lock lock, Shared<Counter> c) {
  lock.acquire();
  c->holding = 1;
  if (!synctest::eventually([&] { return c->go.load() != 0; })) return 98;
  lock.release();
  return 0;
}

int hold_until_killed(mp::Lock lock, Shared<Counter> c) {
  lock.acquire();
  c->holding = 1;
  return synctest::sleep_until_killed();
}

// A waiter: 0 when it got the lock and was told the holder died.
int acquire_expecting_owner_died(mp::Lock lock) {
  if (!lock.acquire(60s)) return 2;
  int status = lock.owner_died() ? 0 : 3;
  lock.release();
  return status;
}

int try_release(mp::Lock lock) {
  try {
    lock.release();
  } catch (const mp::ProcessError&) {
    return 0;
  }
  return 1;
}

// The bank of the random-kill test: two accounts whose sum is constant, moved one unit at a
// time under the lock, with the transfer half done in between.
struct Bank {
  std::int64_t a;
  std::int64_t b;
  std::atomic<int> in_progress;
  std::atomic<int> stop;
  std::atomic<std::int64_t> transfers;
  std::atomic<int> recoveries_seen;
  std::atomic<int> half_done_repaired;
};
constexpr std::int64_t kTotal = 1'000'000;

// After a recovery, the invariant is restored from the account that is written first.
void repair(Bank& bank) {
  if (bank.in_progress.load() != 0) ++bank.half_done_repaired;
  bank.b = kTotal - bank.a;
  bank.in_progress = 0;
}

int transfer_forever(mp::Lock lock, Shared<Bank> bank) {
  while (bank->stop.load() == 0) {
    std::lock_guard guard{lock};
    if (lock.owner_died()) {
      ++bank->recoveries_seen;
      repair(*bank);
    }
    bank->in_progress = 1;
    bank->a -= 1;
    for (int k = 0; k < 200; ++k) mp::detail::cpu_relax();  // a window to die in
    bank->b += 1;
    bank->in_progress = 0;
    ++bank->transfers;
  }
  return 0;
}

}  // namespace

TEST_CASE("lock: acquire, release and the standard guards in one process", "[lock]") {
  mp::Lock lock;
  CHECK_FALSE(lock.locked());
  CHECK(lock.acquire());
  CHECK(lock.locked());
  CHECK(lock.held_by_me());
  CHECK_FALSE(lock.owner_died());
  // The holder cannot take it again: that would wait forever.
  CHECK_FALSE(lock.try_acquire());
  CHECK_FALSE(lock.acquire(10ms));
  CHECK_THROWS_AS(lock.acquire(), mp::ProcessError);
  lock.release();
  CHECK_FALSE(lock.locked());
  CHECK_THROWS_AS(lock.release(), mp::ProcessError);

  {
    std::lock_guard guard{lock};
    CHECK(lock.held_by_me());
  }
  CHECK_FALSE(lock.locked());
  {
    std::unique_lock guard{lock, std::defer_lock};
    CHECK(guard.try_lock_for(1s));
    CHECK(lock.held_by_me());
  }
  mp::Lock other;
  {
    std::scoped_lock both{lock, other};
    CHECK(lock.held_by_me());
    CHECK(other.held_by_me());
  }
  CHECK_FALSE(lock.locked());
  CHECK_FALSE(other.locked());
  CHECK(lock.recoveries() == 0);
}

TEST_CASE("lock: copies are the same lock, another thread is not the holder", "[lock]") {
  mp::Lock lock;
  mp::Lock copy = lock;
  CHECK(copy == lock);
  CHECK_FALSE(mp::Lock{} == lock);
  copy.acquire();
  CHECK(lock.locked());
  CHECK(lock.held_by_me());
  bool other_thread_got_it = true;
  bool other_thread_release_refused = false;
  std::thread t([&] {
    other_thread_got_it = lock.try_acquire();
    try {
      lock.release();
    } catch (const mp::ProcessError&) {
      other_thread_release_refused = true;
    }
  });
  t.join();
  CHECK_FALSE(other_thread_got_it);
  CHECK(other_thread_release_refused);
  lock.release();
  CHECK_FALSE(copy.locked());
}

TEST_CASE("lock: a handle passed through the descriptor channel is the same lock", "[lock]") {
  mp::Lock lock;
  std::string bytes;
  std::vector<int> fds;
  {
    mp::detail::FdExport exported;
    bytes = mp::dumps(lock);
    fds = exported.exported();
  }
  REQUIRE(fds.size() == 1);
  mp::detail::FdImport imported(fds);
  auto received = mp::load<mp::Lock>(bytes);
  lock.acquire();
  CHECK(received.locked());
  CHECK(received.held_by_me());  // another mapping of the same memory
  CHECK_FALSE(received.try_acquire());
  received.release();
  CHECK_FALSE(lock.locked());

  // A descriptor of another kind of object is refused.
  mp::RLock rlock;
  std::string rbytes;
  std::vector<int> rfds;
  {
    mp::detail::FdExport exported;
    rbytes = mp::dumps(rlock);
    rfds = exported.exported();
  }
  mp::detail::FdImport wrong(rfds);
  CHECK_THROWS_AS(mp::load<mp::Lock>(rbytes), mp::SerializationError);
}

TEST_CASE("lock: mutual exclusion between processes gives an exact count", "[lock]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Lock lock;
  Shared<Counter> counter;
  constexpr int kWorkers = 4;
  constexpr int kEach = 20'000;
  std::vector<mp::Process> workers;
  for (int i = 0; i < kWorkers; ++i)
    workers.emplace_back(ctx, add_under_lock, lock, counter, kEach);
  for (auto& w : workers) w.start();
  for (auto& w : workers) {
    REQUIRE(w.join(120s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(counter->value == std::int64_t{kWorkers} * kEach);
  CHECK_FALSE(lock.locked());
  CHECK(lock.recoveries() == 0);
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(workers)).empty());
}

TEST_CASE("lock: a timed acquire gives up while another process holds it", "[lock]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Lock lock;
  Shared<Counter> c;
  mp::Process holder{ctx, hold_until_go, lock, c};
  holder.start();
  REQUIRE(synctest::eventually([&] { return c->holding.load() == 1; }));
  CHECK(lock.locked());
  CHECK_FALSE(lock.held_by_me());
  CHECK_FALSE(lock.try_acquire());
  CHECK_FALSE(lock.acquire(false));
  CHECK_FALSE(lock.acquire(50ms));
  CHECK_FALSE(lock.acquire(-1s));  // negative: one try
  CHECK_FALSE(lock.try_lock_for(20ms));
  CHECK_FALSE(lock.try_lock_until(std::chrono::steady_clock::now() + 20ms));
  // It is not ours to release.
  CHECK_THROWS_AS(lock.release(), mp::ProcessError);
  c->go = 1;
  CHECK(lock.acquire(60s));  // a hang guard, not a speed check
  CHECK_FALSE(lock.owner_died());
  lock.release();
  REQUIRE(holder.join(60s));
  CHECK(holder.exitcode() == 0);
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(holder)).empty());
}

TEST_CASE("lock: a process that does not hold it cannot release it", "[lock]") {
  auto ctx = synctest::any_context();
  mp::Lock lock;
  lock.acquire();
  mp::Process p{ctx, try_release, lock};
  p.start();
  REQUIRE(p.join(60s));
  CHECK(p.exitcode() == 0);
  CHECK(lock.held_by_me());
  lock.release();
}

TEST_CASE("lock: a waiter gets the lock when the holder is killed, and is told", "[lock]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Lock lock;
  Shared<Counter> c;
  mp::Process holder{ctx, hold_until_killed, lock, c};
  holder.start();
  REQUIRE(synctest::eventually([&] { return c->holding.load() == 1; }));
  mp::Process waiter{ctx, acquire_expecting_owner_died, lock};
  waiter.start();
  std::this_thread::sleep_for(20ms);  // usually parks the waiter first; either order is valid
  holder.kill();
  REQUIRE(holder.join(60s));
  CHECK(holder.exitcode() == -SIGKILL);
  REQUIRE(waiter.join(90s));
  CHECK(waiter.exitcode() == 0);
  CHECK(lock.recoveries() == 1);
  // The lock keeps working, and the next holder is not told again.
  CHECK(lock.acquire(60s));
  CHECK_FALSE(lock.owner_died());
  lock.release();
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(holder, waiter)).empty());
}

TEST_CASE("lock: a later acquirer recovers the lock of a holder that died", "[lock]") {
  auto ctx = synctest::any_context();
  mp::Lock lock;
  Shared<Counter> c;
  mp::Process holder{ctx, hold_until_killed, lock, c};
  holder.start();
  REQUIRE(synctest::eventually([&] { return c->holding.load() == 1; }));
  holder.kill();
  REQUIRE(holder.join(60s));
  // Held by a dead owner until someone recovers it (the kernel cleared its thread id),
  // as Python's lock stays taken when its holder dies.
  CHECK(lock.locked());
  CHECK_FALSE(lock.held_by_me());
  CHECK(lock.try_acquire());
  CHECK(lock.owner_died());
  CHECK(lock.held_by_me());
  lock.release();
  CHECK_FALSE(lock.locked());
  {
    std::lock_guard guard{lock};
    CHECK_FALSE(lock.owner_died());
  }
  CHECK(lock.recoveries() == 1);
}

TEST_CASE("lock: a holder SIGKILLed at a random point: no hang, data repaired", "[lock]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  std::mt19937 rng(std::random_device{}());
  std::vector<pid_t> all_pids;
  for (int round = 0; round < 4; ++round) {
    mp::Lock lock;
    Shared<Bank> bank;
    bank->a = kTotal;
    std::vector<mp::Process> workers;
    for (int i = 0; i < 3; ++i) workers.emplace_back(ctx, transfer_forever, lock, bank);
    for (auto& w : workers) w.start();
    for (auto& w : workers) all_pids.push_back(w.pid());
    REQUIRE(synctest::eventually([&] { return bank->transfers.load() > 100; }));
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20'000));
    workers[0].kill();
    REQUIRE(workers[0].join(60s));
    // The survivors go on (they would hang here if the dead holder's lock stayed locked).
    auto after_kill = bank->transfers.load();
    REQUIRE(synctest::eventually([&] { return bank->transfers.load() > after_kill + 100; }));
    bank->stop = 1;
    for (std::size_t i = 1; i < workers.size(); ++i) {
      REQUIRE(workers[i].join(60s));
      CHECK(workers[i].exitcode() == 0);
    }
    REQUIRE(lock.acquire(60s));
    if (lock.owner_died()) {
      ++bank->recoveries_seen;
      repair(*bank);
    }
    INFO("round " << round << ", recoveries " << lock.recoveries());
    // Every recovery was reported to the one who got the lock; at most the victim died.
    CHECK(static_cast<std::uint64_t>(bank->recoveries_seen.load()) == lock.recoveries());
    CHECK(lock.recoveries() <= 1);
    // A half-done transfer can only be left by a holder that died.
    if (bank->half_done_repaired.load() > 0) CHECK(lock.recoveries() == 1);
    CHECK(bank->in_progress.load() == 0);
    CHECK(bank->a + bank->b == kTotal);
    lock.release();
  }
  CHECK(synctest::leaked_by_us(shm, all_pids).empty());
}
