// tests/test_supervisor.cpp - mp::Supervisor: strategies, intensity, heartbeats, shutdown.
#include <catch2/catch.hpp>
#include <chrono>
#include <mp/monitor.hpp>
#include <mp/queue.hpp>
#include <sys/wait.h>
#include <mp/shared_memory.hpp>
#include <mp/supervisor.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

int crash() { return 1; }
void wait_for(mp::Event go) { go.wait(); }
void never_beats(mp::Event go) { go.wait(); }
// Fails on its first run, succeeds after.
int fail_once(mp::RawValue<int> runs) { return ++runs.value() == 1 ? 1 : 0; }
// Touches 64 MiB, then waits: a leak that a memory predicate must catch.
void hog(mp::Event go) {
  std::vector<char> block(64u << 20, 1);
  go.wait();
  block[0] = 0;  // keep the block alive until the end
}

struct Log {
  std::mutex m;
  std::vector<mp::SupervisorEvent> events;
  std::vector<std::string> of(mp::SupervisorEvent::Kind k) {
    std::lock_guard g{m};
    std::vector<std::string> out;
    for (auto& e : events) if (e.kind == k) out.push_back(e.child);
    return out;
  }
};

mp::Context fork_ctx() { return mp::get_context("fork"); }

// A process running a supervisor of two children; it reports their pids, then waits to be
// killed.
void supervising(mp::Queue<int> pids, mp::Event never) {
  mp::Supervisor sup;
  for (const char* n : {"x", "y"}) {
    sup.add({.name = n, .make = [never](const mp::Heartbeat&) {
               return mp::Process{mp::get_context("fork"), wait_for, never};
             }});
  }
  sup.start();
  pids.put(*sup.pid("x"));
  pids.put(*sup.pid("y"));
  never.wait();
}

bool eventually(auto pred) {
  for (int i = 0; i < 60000; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

}  // namespace

TEST_CASE("supervisor: a child that crashes too often makes it give up", "[supervisor]") {
  Log log;
  mp::Event go;
  mp::Supervisor sup{{.max_restarts = 2, .max_seconds = 60s,
                      .on_event = [&](const mp::SupervisorEvent& e) {
                        std::lock_guard g{log.m};
                        log.events.push_back(e);
                      }}};
  sup.add({.name = "steady", .make = [go](const mp::Heartbeat&) { return mp::Process{fork_ctx(), wait_for, go}; }});
  sup.add({.name = "crasher", .make = [](const mp::Heartbeat&) { return mp::Process{fork_ctx(), crash}; }});
  sup.start();
  sup.wait();
  CHECK(sup.state() == mp::Supervisor::State::gave_up);
  CHECK(sup.restarts("crasher") == 2);
  CHECK(sup.restarts("steady") == 0);  // one_for_one: the sibling is left alone
  CHECK_THAT(sup.reason(), Catch::Contains("crasher"));
  CHECK(log.of(mp::SupervisorEvent::Kind::gave_up).size() == 1);
  CHECK(log.of(mp::SupervisorEvent::Kind::stopped) == std::vector<std::string>{"steady"});
  CHECK_FALSE(sup.pid("steady").has_value());
}

TEST_CASE("supervisor: one_for_all and rest_for_one restart the siblings", "[supervisor]") {
  auto strategy = GENERATE(mp::Strategy::one_for_all, mp::Strategy::rest_for_one);
  mp::Event go;
  mp::RawValue<int> runs{0};
  mp::Supervisor sup{{.strategy = strategy, .max_restarts = 5, .max_seconds = 60s}};
  sup.add({.name = "first", .make = [go](const mp::Heartbeat&) { return mp::Process{fork_ctx(), wait_for, go}; },
           .restart = mp::Restart::transient});
  sup.add({.name = "flaky", .make = [runs](const mp::Heartbeat&) { return mp::Process{fork_ctx(), fail_once, runs}; },
           .restart = mp::Restart::transient});
  sup.add({.name = "last", .make = [go](const mp::Heartbeat&) { return mp::Process{fork_ctx(), wait_for, go}; },
           .restart = mp::Restart::transient});
  sup.start();
  REQUIRE(eventually([&] { return sup.restarts("last") == 1 && sup.pid("last"); }));
  CHECK(sup.restarts("flaky") == 1);
  CHECK(sup.restarts("first") == (strategy == mp::Strategy::one_for_all ? 1 : 0));
  go.set();  // everyone ends normally: transient children are not restarted
  sup.wait();
  CHECK(sup.state() == mp::Supervisor::State::finished);
  CHECK(runs.value() == 2);
}

TEST_CASE("supervisor: a missing heartbeat gets the child restarted", "[supervisor]") {
  Log log;
  mp::Event go;
  mp::Supervisor sup{{.max_restarts = 1, .max_seconds = 60s,
                      .on_event = [&](const mp::SupervisorEvent& e) {
                        std::lock_guard g{log.m};
                        log.events.push_back(e);
                      }}};
  sup.add({.name = "hung", .make = [go](const mp::Heartbeat&) { return mp::Process{fork_ctx(), never_beats, go}; },
           .shutdown_grace = 1s, .heartbeat_timeout = mp::Seconds(0.1)});
  sup.start();
  sup.wait();
  CHECK(sup.state() == mp::Supervisor::State::gave_up);
  CHECK(sup.restarts("hung") == 1);
  CHECK(log.of(mp::SupervisorEvent::Kind::unhealthy).size() == 2);
}

TEST_CASE("supervisor: stop() stops the children in reverse order, none left", "[supervisor]") {
  Log log;
  mp::Event go;
  std::vector<pid_t> pids;
  {
    mp::Supervisor sup{{.on_event = [&](const mp::SupervisorEvent& e) {
      std::lock_guard g{log.m};
      log.events.push_back(e);
    }}};
    for (const char* n : {"a", "b", "c"}) {
      sup.add({.name = n, .make = [go](const mp::Heartbeat&) { return mp::Process{fork_ctx(), wait_for, go}; }});
    }
    sup.start();
    for (const char* n : {"a", "b", "c"}) pids.push_back(*sup.pid(n));
    CHECK(mp::children(::getpid()).size() >= 3);
    sup.stop();
    CHECK(sup.state() == mp::Supervisor::State::stopped);
  }
  CHECK(log.of(mp::SupervisorEvent::Kind::started) == std::vector<std::string>{"a", "b", "c"});
  CHECK(log.of(mp::SupervisorEvent::Kind::stopped) == std::vector<std::string>{"c", "b", "a"});
  for (pid_t p : pids) CHECK_FALSE(mp::pid_exists(p));
}

TEST_CASE("supervisor: SIGKILL to the supervisor's process takes its children", "[supervisor]") {
  mp::Queue<int> pids;
  mp::Event never;
  mp::Process host{fork_ctx(), supervising, pids, never};
  host.start();
  pid_t x = pids.get(60s), y = pids.get(60s);
  CHECK(mp::process_stats(x).ppid == host.pid());
  host.kill();
  host.join();
  CHECK(host.exitcode() == -9);
  // Gone, or (if this process is their subreaper) a zombie of ours to reap.
  for (pid_t p : {x, y}) {
    CHECK(eventually([&] {
      if (!mp::pid_exists(p)) return true;
      if (mp::process_stats(p).state != 'Z') return false;
      if (mp::process_stats(p).ppid == ::getpid()) ::waitpid(p, nullptr, 0);
      return true;
    }));
  }
}

TEST_CASE("supervisor: an unhealthy predicate over the child's readings restarts it",
          "[supervisor]") {
  Log log;
  mp::Event go;  // never set: only the predicate ends the hog
  mp::Supervisor sup{{.max_restarts = 2, .max_seconds = 60s,
                      .check_interval = 10ms,
                      .on_event = [&](const mp::SupervisorEvent& e) {
                        std::lock_guard g{log.m};
                        log.events.push_back(e);
                      }}};
  sup.add({.name = "hog",
           .make = [go](const mp::Heartbeat&) { return mp::Process{fork_ctx(), hog, go}; },
           .shutdown_grace = 1s,
           .unhealthy = [](const mp::ProcessStats& s) { return s.memory.rss > (32u << 20); }});
  sup.start();
  sup.wait();
  // Every run leaks past the limit: found unhealthy 3 times, restarted twice, then given up.
  CHECK(sup.state() == mp::Supervisor::State::gave_up);
  CHECK(sup.restarts("hog") == 2);
  CHECK(log.of(mp::SupervisorEvent::Kind::unhealthy).size() == 3);
  CHECK(log.of(mp::SupervisorEvent::Kind::started).size() == 3);
}

TEST_CASE("supervisor: backoff delays each restart at least as asked, doubling",
          "[supervisor]") {
  // A lower bound, not a speed threshold: the supervisor must not restart sooner.
  std::mutex m;
  std::vector<std::chrono::steady_clock::time_point> starts, exits;
  mp::Supervisor sup{{.max_restarts = 2, .max_seconds = 60s, .backoff = 50ms,
                      .on_event = [&](const mp::SupervisorEvent& e) {
                        std::lock_guard g{m};
                        auto now = std::chrono::steady_clock::now();
                        if (e.kind == mp::SupervisorEvent::Kind::started) starts.push_back(now);
                        if (e.kind == mp::SupervisorEvent::Kind::exited) exits.push_back(now);
                      }}};
  sup.add({.name = "crasher", .make = [](const mp::Heartbeat&) { return mp::Process{fork_ctx(), crash}; }});
  sup.start();
  sup.wait();
  CHECK(sup.state() == mp::Supervisor::State::gave_up);
  std::lock_guard g{m};
  REQUIRE(starts.size() == 3);
  REQUIRE(exits.size() >= 2);
  CHECK(starts[1] - exits[0] >= 50ms);   // the first restart waits the backoff
  CHECK(starts[2] - exits[1] >= 100ms);  // the second, twice as long
}
