// tests/test_condition.cpp - mp::Condition: the lock rules, timeouts, wait_for, notify(n)
// and notify_all across processes, an RLock released at every level, a holder's death.
#include <signal.h>

#include <atomic>
#include <catch2/catch.hpp>
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

struct Stage {
  int value;    // guarded by the condition's lock
  int entered;  // guarded by the condition's lock
  std::atomic<int> woken;
  std::atomic<int> holding;
};

// Waits (under the lock) until value reaches `target`.
int wait_for_value(mp::Condition cond, Shared<Stage> s, int target) {
  std::unique_lock guard{cond};
  ++s->entered;
  bool ok = cond.wait_for([&] { return s->value >= target; }, 60s);
  ++s->woken;
  return ok ? 0 : 1;
}

// One plain wait() per child: used to count how many a notify wakes.
int wait_once(mp::Condition cond, Shared<Stage> s) {
  std::unique_lock guard{cond};
  ++s->entered;
  bool notified = cond.wait(60s);
  ++s->woken;
  return notified ? 0 : 1;
}

int hold_until_killed(mp::Condition cond, Shared<Stage> s) {
  cond.acquire();
  s->holding = 1;
  return synctest::sleep_until_killed();
}

// Takes the condition's lock while the parent waits, proving wait() let go of every level.
int take_lock_and_notify(mp::Condition cond, Shared<Stage> s) {
  if (!cond.acquire(60s)) return 1;
  s->value = 1;
  cond.notify_all();
  cond.release();
  return 0;
}

}  // namespace

TEST_CASE("condition: wait and notify need the lock", "[condition]") {
  mp::Condition cond;
  CHECK_THROWS_AS(cond.wait(), mp::ProcessError);
  CHECK_THROWS_AS(cond.wait(1ms), mp::ProcessError);
  CHECK_THROWS_AS(cond.notify(), mp::ProcessError);
  CHECK_THROWS_AS(cond.notify_all(), mp::ProcessError);
  std::unique_lock guard{cond};
  CHECK_NOTHROW(cond.notify());  // nobody waits: nothing happens
  CHECK_NOTHROW(cond.notify_all());
  CHECK_FALSE(cond.wait(20ms));  // timed out, and holds the lock again
  CHECK(cond.try_acquire());     // the default lock is an RLock: a second level
  cond.release();
  int calls = 0;
  CHECK(cond.wait_for([&] { return ++calls == 1; }, 0s));  // true at once: no wait
  CHECK_FALSE(cond.wait_for([] { return false; }, 30ms));
  guard.unlock();
  CHECK_THROWS_AS(cond.wait_for([] { return false; }, 10ms), mp::ProcessError);
}

TEST_CASE("condition: with a plain Lock", "[condition]") {
  mp::Lock lock;
  mp::Condition cond{lock};
  std::unique_lock guard{cond};
  CHECK(lock.held_by_me());
  CHECK_FALSE(cond.wait(10ms));
  CHECK(lock.held_by_me());
  guard.unlock();
  CHECK_FALSE(lock.locked());
}

TEST_CASE("condition: notify_all wakes every waiting process, wait_for sees the value",
          "[condition]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Condition cond;
  Shared<Stage> s;
  std::vector<mp::Process> waiters;
  for (int i = 0; i < 3; ++i) waiters.emplace_back(ctx, wait_for_value, cond, s, 2);
  for (auto& w : waiters) w.start();
  REQUIRE(synctest::eventually([&] {
    std::lock_guard g{cond};
    return s->entered == 3;
  }));
  {
    std::lock_guard g{cond};
    s->value = 1;  // not enough yet: the waiters check and sleep again
    cond.notify_all();
  }
  {
    std::lock_guard g{cond};
    s->value = 2;
    cond.notify_all();
  }
  for (auto& w : waiters) {
    REQUIRE(w.join(90s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(s->woken == 3);
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(waiters)).empty());
}

TEST_CASE("condition: notify(1) wakes one waiter, notify(2) two more", "[condition]") {
  auto ctx = synctest::any_context();
  mp::Condition cond{mp::Lock{}};
  Shared<Stage> s;
  std::vector<mp::Process> waiters;
  for (int i = 0; i < 4; ++i) waiters.emplace_back(ctx, wait_once, cond, s);
  for (auto& w : waiters) w.start();
  // `entered` is counted under the lock just before wait(), which registers before it lets
  // the lock go: once the parent sees 4, all four are counted as waiting.
  REQUIRE(synctest::eventually([&] {
    std::lock_guard g{cond};
    return s->entered == 4;
  }));
  {
    std::lock_guard g{cond};
    cond.notify(1);
  }
  REQUIRE(synctest::eventually([&] { return s->woken.load() >= 1; }));
  std::this_thread::sleep_for(250ms);  // gives a wrong extra wake-up time to show
  CHECK(s->woken == 1);
  {
    std::lock_guard g{cond};
    cond.notify(2);
  }
  REQUIRE(synctest::eventually([&] { return s->woken.load() >= 3; }));
  std::this_thread::sleep_for(250ms);
  CHECK(s->woken == 3);
  {
    std::lock_guard g{cond};
    cond.notify_all();
  }
  for (auto& w : waiters) {
    REQUIRE(w.join(90s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(s->woken == 4);
}

TEST_CASE("condition: wait releases every level of an RLock and restores them", "[condition]") {
  auto ctx = synctest::any_context();
  mp::RLock rlock;
  mp::Condition cond{rlock};
  Shared<Stage> s;
  rlock.acquire();
  rlock.acquire();
  mp::Process other{ctx, take_lock_and_notify, cond, s};
  other.start();
  bool seen = cond.wait_for([&] { return s->value == 1; }, 60s);
  CHECK(seen);
  CHECK(rlock.depth() == 2);
  rlock.release();
  rlock.release();
  REQUIRE(other.join(60s));
  CHECK(other.exitcode() == 0);
}

TEST_CASE("condition: a waiter takes the lock back from a holder that died", "[condition]") {
  auto ctx = synctest::any_context();
  mp::Condition cond{mp::Lock{}};
  Shared<Stage> s;
  std::unique_lock guard{cond};
  mp::Process holder{ctx, hold_until_killed, cond, s};
  holder.start();
  // Kill the child once it holds the lock we let go of in wait().
  std::thread killer([&] {
    if (synctest::eventually([&] { return s->holding.load() == 1; })) holder.kill();
  });
  // Short waits until the child has had its turn: the last one times out while the child
  // holds the lock, and ends only once the killed child's lock is recovered, with the news.
  // The child can take the lock only inside a wait, so the wait that saw it is the one
  // that took the lock back from the dead child.
  int waits = 0, notified = 0, died = 0;
  while (s->holding.load() == 0 && waits < 3000) {
    try {
      if (cond.wait(20ms)) ++notified;
    } catch (const mp::OwnerDiedError&) {
      ++died;
    }
    ++waits;
  }
  killer.join();
  CHECK(notified == 0);
  CHECK(died == 1);
  CHECK(cond.owner_died());
  CHECK(guard.owns_lock());
  REQUIRE(holder.join(60s));
  CHECK(holder.exitcode() == -SIGKILL);
  guard.unlock();
}

// Takes the lock, leaves the shared value half updated, notifies, and dies holding it.
int update_half_and_die(mp::Condition cond, Shared<Stage> s) {
  if (!cond.acquire(60s)) return 1;
  s->entered = 1;  // the first half of the update; `value` would be the second
  cond.notify_all();
  ::raise(SIGKILL);
  return 2;
}

TEST_CASE("condition: wait_for reports a holder's death instead of testing half-updated data",
          "[condition]") {
  const bool recursive = GENERATE(false, true);
  INFO("over " << (recursive ? "an RLock" : "a Lock"));
  auto ctx = synctest::any_context();
  mp::Condition cond = recursive ? mp::Condition{mp::RLock{}} : mp::Condition{mp::Lock{}};
  Shared<Stage> s;
  std::unique_lock guard{cond};
  mp::Process dying{ctx, update_half_and_die, cond, s};
  dying.start();
  // wait_for lets go of the lock; the child takes it, half updates, notifies and dies. The
  // predicate is false on the half update: without the report, wait_for would wait again.
  CHECK_THROWS_AS(cond.wait_for([&] { return s->value == 1; }, 60s), mp::OwnerDiedError);
  CHECK(guard.owns_lock());
  CHECK(cond.owner_died());
  CHECK(s->entered == 1);  // what the program must repair
  REQUIRE(dying.join(60s));
  CHECK(dying.exitcode() == -SIGKILL);
  // Repaired, the condition works on: a wait that times out reports no death.
  s->entered = 0;
  CHECK_FALSE(cond.wait(10ms));
  CHECK_FALSE(cond.owner_died());
}

TEST_CASE("condition: a later waiter cannot take a wake-up meant for an earlier one",
          "[condition]") {
  auto ctx = synctest::any_context();
  mp::Condition cond;
  Shared<Stage> s;
  mp::Process early{ctx, wait_once, cond, s};
  early.start();
  REQUIRE(synctest::eventually([&] {
    std::lock_guard g{cond};
    return s->entered == 1;
  }));
  std::unique_lock guard{cond};
  cond.notify(1);                // meant for `early`, which waited before the call...
  CHECK_FALSE(cond.wait(50ms));  // ...so this later waiter times out instead of taking it
  guard.unlock();
  REQUIRE(early.join(60s));
  CHECK(early.exitcode() == 0);  // notified, not timed out
  CHECK(s->woken == 1);
}

namespace {
constexpr int kRing = 4;
struct Ring {
  int slot[kRing];
  int head, count, produced_done;
  long long sum;
  int taken;
};
int produce(mp::Condition cond, Shared<Ring> r, int n) {
  for (int i = 1; i <= n; ++i) {
    std::unique_lock g{cond};
    if (!cond.wait_for([&] { return r->count < kRing; }, 60s)) return 1;
    r->slot[(r->head + r->count) % kRing] = i;
    ++r->count;
    cond.notify_all();
  }
  std::lock_guard g{cond};
  r->produced_done = 1;
  cond.notify_all();
  return 0;
}
int consume(mp::Condition cond, Shared<Ring> r) {
  for (;;) {
    std::unique_lock g{cond};
    if (!cond.wait_for([&] { return r->count > 0 || r->produced_done; }, 60s)) return 1;
    if (r->count == 0) return 0;
    r->sum += r->slot[r->head];
    ++r->taken;
    r->head = (r->head + 1) % kRing;
    --r->count;
    cond.notify_all();
  }
}
}  // namespace

TEST_CASE("condition: a bounded buffer between two processes moves every item once",
          "[condition]") {
  auto ctx = synctest::any_context();
  mp::Condition cond;
  Shared<Ring> r;
  constexpr int kItems = 3000;
  mp::Process producer{ctx, produce, cond, r, kItems};
  mp::Process consumer{ctx, consume, cond, r};
  producer.start();
  consumer.start();
  REQUIRE(producer.join(120s));
  REQUIRE(consumer.join(120s));
  CHECK(producer.exitcode() == 0);
  CHECK(consumer.exitcode() == 0);
  CHECK(r->taken == kItems);
  CHECK(r->sum == 1LL * kItems * (kItems + 1) / 2);
}
