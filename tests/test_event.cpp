// tests/test_event.cpp - mp::Event: set, clear, wait with and without a timeout, across
// processes.
#include <atomic>
#include <catch2/catch.hpp>
#include <mp/process.hpp>
#include <mp/sync.hpp>
#include <vector>

#include "shm.hpp"
#include "sync_helpers.hpp"

using namespace std::chrono_literals;
using synctest::Shared;

namespace {

struct Board {
  std::atomic<int> waiting;
  std::atomic<int> woken;
};

int wait_for_event(mp::Event ev, Shared<Board> b) {
  ++b->waiting;
  if (!ev.wait(60s)) return 1;  // a hang guard
  ++b->woken;
  return ev.is_set() ? 0 : 2;
}

int wait_expecting_timeout(mp::Event ev) { return ev.wait(30ms) ? 1 : 0; }

int set_event(mp::Event ev) {
  ev.set();
  return 0;
}

}  // namespace

TEST_CASE("event: set, clear and wait in one process", "[event]") {
  mp::Event ev;
  CHECK_FALSE(ev.is_set());
  CHECK_FALSE(ev.wait(10ms));
  CHECK_FALSE(ev.wait(-1s));
  ev.set();
  CHECK(ev.is_set());
  CHECK(ev.wait());
  CHECK(ev.wait(0s));
  ev.set();  // setting twice is harmless
  ev.clear();
  CHECK_FALSE(ev.is_set());
  CHECK_FALSE(ev.wait(10ms));
  mp::Event copy = ev;
  copy.set();
  CHECK(ev.is_set());
}

TEST_CASE("event: one set() wakes every waiting child", "[event]") {
  testing::ShmGuard shm;
  auto ctx = synctest::any_context();
  mp::Event ev;
  Shared<Board> b;
  std::vector<mp::Process> waiters;
  for (int i = 0; i < 4; ++i) waiters.emplace_back(ctx, wait_for_event, ev, b);
  for (auto& w : waiters) w.start();
  REQUIRE(synctest::eventually([&] { return b->waiting.load() == 4; }));
  ev.set();
  for (auto& w : waiters) {
    REQUIRE(w.join(90s));
    CHECK(w.exitcode() == 0);
  }
  CHECK(b->woken == 4);
  CHECK(synctest::leaked_by_us(shm, synctest::pids_of(waiters)).empty());
}

TEST_CASE("event: a child sets it for the parent, a child's wait times out", "[event]") {
  auto ctx = synctest::any_context();
  mp::Event ev;
  mp::Process quiet{ctx, wait_expecting_timeout, ev};
  quiet.start();
  REQUIRE(quiet.join(60s));
  CHECK(quiet.exitcode() == 0);

  mp::Process setter{ctx, set_event, ev};
  setter.start();
  CHECK(ev.wait(60s));
  REQUIRE(setter.join(60s));
  CHECK(setter.exitcode() == 0);
  ev.clear();
  CHECK_FALSE(ev.is_set());
}
