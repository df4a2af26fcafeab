// tests/test_barrier.cpp - mp::Barrier: rounds and arrival indices, the action, timeouts,
// abort, reset, an action that throws, and a party that dies while it waits.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <mp/process.hpp>
#include <mp/sync.hpp>
#include <stdexcept>
#include <thread>
#include <vector>

#include "shm.hpp"
#include "sync_helpers.hpp"

using namespace std::chrono_literals;
using synctest::Shared;

namespace {

constexpr int kRounds = 5;
constexpr int kParties = 4;

struct Log {
  std::atomic<int> index[kRounds][kParties];  // who got which index, per round
  std::atomic<int> actions;
  std::atomic<int> actions_when_all_arrived;
  std::atomic<int> arrived[kRounds];
  std::atomic<int> outcome;  // children report here too
};

// The action is a plain function, so it can be found again in a spawn child; it reaches
// the shared log through this process's copy of the pointer, set by every party.
Log* g_log = nullptr;
void count_action() {
  int round = g_log->actions.load();
  if (g_log->arrived[round].load() == kParties) ++g_log->actions_when_all_arrived;
  ++g_log->actions;
}

int party(mp::Barrier barrier, Shared<Log> log, int me) {
  g_log = &*log;
  for (int r = 0; r < kRounds; ++r) {
    ++log->arrived[r];
    int i = barrier.wait(60s);
    if (i < 0 || i >= kParties) return 2;
    log->index[r][i] = me + 1;
  }
  return 0;
}

// 0 when wait() throws BrokenBarrierError.
int expect_broken(mp::Barrier barrier, double seconds) {
  try {
    barrier.wait(mp::Seconds(seconds));
  } catch (const mp::BrokenBarrierError&) {
    return 0;
  }
  return 1;
}

int wait_until_killed(mp::Barrier barrier) {
  try {
    barrier.wait(120s);
  } catch (const mp::BrokenBarrierError&) {
    return 3;
  }
  return 4;
}

int wait_once(mp::Barrier barrier) {
  try {
    return barrier.wait(60s) >= 0 ? 0 : 1;
  } catch (const mp::BrokenBarrierError&) {
    return 2;
  }
}

void throwing_action() { throw std::runtime_error("the action failed"); }

}  // namespace

TEST_CASE("barrier: a single party passes at once and runs the action", "[barrier]") {
  int runs = 0;
  mp::Barrier one{1, [&] { ++runs; }};
  CHECK(one.parties() == 1);
  CHECK(one.wait() == 0);
  CHECK(one.wait() == 0);
  CHECK(runs == 2);
  CHECK_FALSE(one.broken());
  CHECK_THROWS_AS(mp::Barrier(0), std::invalid_argument);
  CHECK_THROWS_AS(mp::Barrier(-2), std::invalid_argument);
}

TEST_CASE("barrier: threads of one process, indices and a default timeout", "[barrier]") {
  mp::Barrier b{3};
  std::vector<int> got(3, -1);
  std::vector<std::thread> ts;
  for (int t = 0; t < 2; ++t) ts.emplace_back([&, t] { got[t] = b.wait(60s); });
  got[2] = b.wait(60s);
  for (auto& t : ts) t.join();
  std::sort(got.begin(), got.end());
  CHECK(got == std::vector<int>{0, 1, 2});
  CHECK(b.n_waiting() == 0);

  mp::Barrier with_default{2, mp::Seconds(0.03)};
  CHECK_THROWS_AS(with_default.wait(), mp::BrokenBarrierError);
  CHECK(with_default.broken());
  CHECK(with_default.n_waiting() == 0);
}

TEST_CASE("barrier: rounds across processes, every index once, the action once a round",
          "[barrier]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  Shared<Log> log;
  g_log = &*log;
  mp::Barrier barrier{kParties, count_action};
  std::vector<mp::Process> parties;
  for (int p = 1; p < kParties; ++p) parties.emplace_back(ctx, party, barrier, log, p);
  for (auto& p : parties) p.start();
  CHECK(party(barrier, log, 0) == 0);
  for (auto& p : parties) {
    REQUIRE(p.join(90s));
    CHECK(p.exitcode() == 0);
  }
  for (int r = 0; r < kRounds; ++r) {
    std::vector<int> who;
    for (int i = 0; i < kParties; ++i) who.push_back(log->index[r][i].load());
    std::sort(who.begin(), who.end());
    CHECK(who == std::vector<int>{1, 2, 3, 4});
  }
  CHECK(log->actions == kRounds);
  CHECK(log->actions_when_all_arrived == kRounds);
  CHECK_FALSE(barrier.broken());
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(parties)).empty());
}

TEST_CASE("barrier: a wait that times out breaks it for everyone until reset", "[barrier]") {
  auto ctx = synctest::any_context();
  mp::Barrier barrier{3};
  mp::Process impatient{ctx, expect_broken, barrier, 0.05};
  impatient.start();
  REQUIRE(impatient.join(60s));
  CHECK(impatient.exitcode() == 0);
  CHECK(barrier.broken());
  CHECK_THROWS_AS(barrier.wait(60s), mp::BrokenBarrierError);
  barrier.reset();
  CHECK_FALSE(barrier.broken());
  // Usable again: a full round.
  mp::Process a{ctx, wait_once, barrier};
  mp::Process b{ctx, wait_once, barrier};
  a.start();
  b.start();
  CHECK(barrier.wait(60s) >= 0);
  REQUIRE(a.join(60s));
  REQUIRE(b.join(60s));
  CHECK(a.exitcode() == 0);
  CHECK(b.exitcode() == 0);
}

TEST_CASE("barrier: abort and reset wake the waiting parties with BrokenBarrierError",
          "[barrier]") {
  auto ctx = synctest::any_context();
  mp::Barrier barrier{3};
  {
    mp::Process w{ctx, expect_broken, barrier, 60.0};
    w.start();
    REQUIRE(synctest::eventually([&] { return barrier.n_waiting() == 1; }));
    barrier.abort();
    REQUIRE(w.join(60s));
    CHECK(w.exitcode() == 0);
    CHECK(barrier.broken());
    CHECK_THROWS_AS(barrier.wait(), mp::BrokenBarrierError);
  }
  barrier.reset();
  CHECK_FALSE(barrier.broken());
  {
    mp::Process w1{ctx, expect_broken, barrier, 60.0};
    mp::Process w2{ctx, expect_broken, barrier, 60.0};
    w1.start();
    w2.start();
    REQUIRE(synctest::eventually([&] { return barrier.n_waiting() == 2; }));
    barrier.reset();
    REQUIRE(w1.join(60s));
    REQUIRE(w2.join(60s));
    CHECK(w1.exitcode() == 0);
    CHECK(w2.exitcode() == 0);
    CHECK_FALSE(barrier.broken());
    CHECK(barrier.n_waiting() == 0);
  }
}

TEST_CASE("barrier: an action that throws breaks the round, its party gets the exception",
          "[barrier]") {
  auto ctx = synctest::any_context();
  mp::Barrier barrier{2, throwing_action};
  mp::Process other{ctx, expect_broken, barrier, 60.0};
  other.start();
  REQUIRE(synctest::eventually([&] { return barrier.n_waiting() == 1; }));
  CHECK_THROWS_AS(barrier.wait(60s), std::runtime_error);  // we arrive last: we run it
  REQUIRE(other.join(60s));
  CHECK(other.exitcode() == 0);
  CHECK(barrier.broken());
}

TEST_CASE("barrier: a party that dies while it waits breaks the barrier", "[barrier]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Barrier barrier{3};
  mp::Process survivor{ctx, expect_broken, barrier, 120.0};
  mp::Process victim{ctx, wait_until_killed, barrier};
  survivor.start();
  victim.start();
  REQUIRE(synctest::eventually([&] { return barrier.n_waiting() == 2; }));
  victim.kill();
  REQUIRE(victim.join(60s));
  CHECK(victim.exitcode() == -SIGKILL);
  REQUIRE(survivor.join(90s));  // it would wait 120 s if the death went unnoticed
  CHECK(survivor.exitcode() == 0);
  CHECK(barrier.broken());
  CHECK_THROWS_AS(barrier.wait(60s), mp::BrokenBarrierError);
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(survivor, victim)).empty());
}

TEST_CASE("barrier: the last party to arrive does not complete a round with a dead party",
          "[barrier]") {
  // The victim arrives and is killed before anyone else arrives: no waiter is left to notice
  // its death, so the last arriver must check.
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Barrier barrier{2};
  mp::Process victim{ctx, wait_until_killed, barrier};
  victim.start();
  REQUIRE(synctest::eventually([&] { return barrier.n_waiting() == 1; }));
  victim.kill();
  REQUIRE(victim.join(60s));
  CHECK(victim.exitcode() == -SIGKILL);
  CHECK_THROWS_WITH(barrier.wait(60s), Catch::Contains("a party died"));
  CHECK(barrier.broken());
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(victim)).empty());
}

TEST_CASE("barrier: an action that captures state cannot go to a fresh image", "[barrier]") {
  int runs = 0;
  mp::Barrier barrier{1, [&runs] { ++runs; }};
  mp::detail::FdExport exported;
  CHECK_THROWS_AS(mp::dumps(barrier), std::logic_error);
  mp::Barrier plain{1, count_action};
  CHECK_NOTHROW(mp::dumps(plain));
}
