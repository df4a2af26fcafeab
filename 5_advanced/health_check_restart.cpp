// health_check_restart.cpp - mp::Supervisor restarts crashed, hung and leaking workers, gives up on a crash loop.
//
// A health checker that only asks "is the pid alive?" misses two of the three ways a worker
// goes bad: a worker stuck in a loop or a deadlock is alive, and so is one whose memory
// grows without end. mp::Supervisor watches all three, as Erlang/OTP's supervisors and
// systemd's watchdog do:
//   - liveness: it waits on each child's pidfd, so a crash is seen the moment it happens;
//   - a heartbeat: the child must call beat() more often than heartbeat_timeout;
//   - a predicate over the child's readings (mp::process_stats): here, RSS above a limit.
// An unhealthy child is sent SIGTERM, given its grace period, then SIGKILL, and restarted
// per its policy. Restarts are bounded: more than max_restarts within max_seconds and the
// supervisor gives up, stops every child in reverse order and says why - a crash loop is
// not something to retry forever.
//
// Part 1 runs three workers, each bad on its first run(s) only: "flaky" crashes (SIGSEGV)
// twice, "hanger" stops beating once, "leaker" leaks past the limit once. Each is restarted
// and then finishes its work. Part 2 runs a worker that crashes every time.
//
// Usage: health_check_restart [--timeout-ms N] [--rss-limit-mib N] [--max-restarts N] [--json]
//   $ build/5_advanced/health_check_restart
//
// Watch for: each worker restarted exactly as often as it went bad, by the check that
// caught it (exited -11, heartbeat, rss); the crash loop given up after max-restarts
// restarts; no child left at the end.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <map>
#include <mp/monitor.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/supervisor.hpp>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using namespace std::chrono_literals;

// A worker's real job: ten rounds of work, beating after each, then a clean exit.
void work(const mp::Heartbeat& hb) {
  for (int i = 0; i < 10; ++i) {
    hb.beat();
    std::this_thread::sleep_for(20ms);
  }
}

// Crashes outright on its first two runs (a segfault, not an exception), then works.
void flaky(mp::Heartbeat hb, mp::RawValue<int> runs) {
  if (++runs.value() <= 2) std::raise(SIGSEGV);
  work(hb);
}

// On its first run it beats once, then hangs (a deadlock, an endless loop): alive, useless.
void hanger(mp::Heartbeat hb, mp::RawValue<int> runs) {
  hb.beat();
  if (++runs.value() == 1) {
    for (;;) std::this_thread::sleep_for(1s);
  }
  work(hb);
}

// On its first run it grows to `mib` MiB and stays there (a leak), still beating.
void leaker(mp::Heartbeat hb, mp::RawValue<int> runs, int mib) {
  if (++runs.value() == 1) {
    std::vector<char> leak(static_cast<std::size_t>(mib) << 20, 1);  // touched: resident
    for (;;) {
      hb.beat();
      leak[0] = static_cast<char>(leak[0] + 1);
      std::this_thread::sleep_for(20ms);
    }
  }
  work(hb);
}

// Crashes on every run.
void crash_loop() { std::raise(SIGSEGV); }

struct EventLog {
  std::mutex m;
  std::vector<mp::SupervisorEvent> events;
  void operator()(const mp::SupervisorEvent& e) {
    std::lock_guard g{m};
    events.push_back(e);
  }
  int count(mp::SupervisorEvent::Kind kind, const std::string& child) {
    std::lock_guard g{m};
    int n = 0;
    for (const auto& e : events) n += e.kind == kind && e.child == child;
    return n;
  }
};

std::string describe(const mp::SupervisorEvent& e) {
  std::string what = fmt::format("{:>9} {:<10}", mp::to_string(e.kind), e.child);
  if (e.kind == mp::SupervisorEvent::Kind::started) what += fmt::format(" pid {}", e.pid);
  if (!e.reason.empty()) {
    what += ": " + e.reason;
  } else if (e.kind == mp::SupervisorEvent::Kind::exited ||
             e.kind == mp::SupervisorEvent::Kind::stopped) {
    what += " " + mp::describe_exitcode(e.exitcode);
  }
  return what;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "mp::Supervisor restarts crashed, hung and leaking workers, gives up on a "
                   "crash loop."};
  int timeout_ms = 1000;
  int rss_limit_mib = 32;
  int max_restarts = 3;
  L.cli()
      .add_option("--timeout-ms", timeout_ms, "heartbeat timeout")->check(CLI::Range(100, 60'000));
  L.cli()
      .add_option("--rss-limit-mib", rss_limit_mib, "RSS above which a worker is unhealthy")
      ->check(CLI::Range(8, 1024));
  L.cli()
      .add_option("--max-restarts", max_restarts, "restart intensity: restarts within 60 s")
      ->check(CLI::Range(0, 20));
  L.parse(argc, argv);

  return L.run([&] {
    const mp::Seconds heartbeat_timeout = std::chrono::milliseconds(timeout_ms);
    const auto limit = static_cast<std::uint64_t>(rss_limit_mib) << 20;

    // Step 1: three workers under one_for_one, each with the check that will catch it.
    L.step("three workers, each bad on its first run");
    EventLog log1;
    mp::RawValue<int> flaky_runs{0}, hanger_runs{0}, leaker_runs{0};
    mp::Supervisor sup{{.strategy = mp::Strategy::one_for_one,
                        .max_restarts = 10,
                        .max_seconds = std::chrono::seconds(60),
                        .check_interval = std::chrono::milliseconds(20),
                        .on_event = std::ref(log1)}};
    sup.add({.name = "flaky",
             .make = [=](const mp::Heartbeat& hb) { return mp::Process{flaky, hb, flaky_runs}; },
             .restart = mp::Restart::transient});
    sup.add({.name = "hanger",
             .make = [=](const mp::Heartbeat& hb) { return mp::Process{hanger, hb, hanger_runs}; },
             .restart = mp::Restart::transient,
             .shutdown_grace = std::chrono::seconds(1),
             .heartbeat_timeout = heartbeat_timeout});
    sup.add({.name = "leaker",
             .make = [=](const mp::Heartbeat& hb) {
               return mp::Process{leaker, hb, leaker_runs, 2 * rss_limit_mib};
             },
             .restart = mp::Restart::transient,
             .shutdown_grace = std::chrono::seconds(1),
             .unhealthy = [=](const mp::ProcessStats& s) { return s.memory.rss > limit; }});
    sup.start();
    sup.wait();
    for (const auto& e : log1.events) L.say("  {}", describe(e));

    // Step 2: what each check caught, and how often each was restarted.
    L.step("restarts per worker");
    std::map<std::string, int> restarts;
    for (const char* n : {"flaky", "hanger", "leaker"}) {
      restarts[n] = sup.restarts(n);
      L.say("  {:<7} restarted {} time(s), ran {} time(s)", n, restarts[n],
            n == std::string{"flaky"}    ? flaky_runs.value()
            : n == std::string{"hanger"} ? hanger_runs.value()
                                         : leaker_runs.value());
    }
    bool finished = sup.state() == mp::Supervisor::State::finished;
    L.say("supervisor state: {} (every worker ended its work with exit code 0)",
          finished ? "finished" : "NOT finished");
    int hanger_unhealthy = log1.count(mp::SupervisorEvent::Kind::unhealthy, "hanger");
    int leaker_unhealthy = log1.count(mp::SupervisorEvent::Kind::unhealthy, "leaker");

    // Step 3: a crash loop exceeds the intensity; the supervisor gives up and says why.
    L.step(fmt::format("a worker that crashes every time (at most {} restarts in 60 s)",
                       max_restarts));
    EventLog log2;
    mp::Supervisor loop{{.max_restarts = max_restarts,
                         .max_seconds = std::chrono::seconds(60),
                         .on_event = std::ref(log2)}};
    loop.add({.name = "crash_loop",
              .make = [](const mp::Heartbeat&) { return mp::Process{crash_loop}; }});
    loop.start();
    loop.wait();
    bool gave_up = loop.state() == mp::Supervisor::State::gave_up;
    L.say("  {} restarts, then: {}", loop.restarts("crash_loop"),
          gave_up ? "gave up - " + loop.reason() : "did NOT give up");

    // Step 4: nothing is left running.
    sup.stop();
    loop.stop();
    auto left = mp::children(::getpid());
    L.say("children of this process left: {}", left.size());

    L.fact("restarts", restarts);
    L.fact("runs", std::map<std::string, int>{{"flaky", flaky_runs.value()},
                                              {"hanger", hanger_runs.value()},
                                              {"leaker", leaker_runs.value()}});
    L.fact("hanger_unhealthy", hanger_unhealthy);
    L.fact("leaker_unhealthy", leaker_unhealthy);
    L.fact("finished", finished);
    L.fact("crash_loop_restarts", loop.restarts("crash_loop"));
    L.fact("max_restarts", max_restarts);
    L.fact("gave_up", gave_up);
    L.fact("gave_up_reason", loop.reason());
    L.fact("children_left", left.size());
    return finished && restarts["flaky"] == 2 && restarts["hanger"] == 1 &&
           restarts["leaker"] == 1 && hanger_unhealthy == 1 && leaker_unhealthy == 1 &&
           gave_up && loop.restarts("crash_loop") == max_restarts && left.empty();
  });
}
