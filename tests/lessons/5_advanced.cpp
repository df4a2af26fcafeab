// tests/lessons/5_advanced.cpp - the claims of chapter 5, read from each lesson's --json.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "run.hpp"

TEST_CASE("5_advanced/process_inheritance: what fork, spawn and forkserver children inherit",
          "[lessons][5_advanced]") {
  auto r = testing::run_lesson_json("5_advanced/process_inheritance");
  const auto& t = r["inherited"];
  // fork copies the whole process.
  for (const auto& [item, inherited] : t["fork"].items()) {
    INFO("fork: " << item);
    CHECK(inherited == true);
  }
  // exec keeps descriptors without O_CLOEXEC, the environment, cwd, limits, ignored signals
  // and the mask; it drops O_CLOEXEC descriptors, caught handlers and the memory image.
  CHECK(t["spawn"] == nlohmann::json{{"fd_without_cloexec", true}, {"fd_with_cloexec", false},
                                      {"environment", true},        {"cwd", true},
                                      {"rlimit_nofile", true},      {"signal_handler", false},
                                      {"signal_ignored", true},     {"signal_mask", true},
                                      {"memory", false}});
  // The forkserver was started before the parent changed anything.
  for (const auto& [item, inherited] : t["forkserver"].items()) {
    INFO("forkserver: " << item);
    CHECK(inherited == false);
  }
  CHECK(t["fork"].size() == 9);
  CHECK(t["forkserver"].size() == 9);
}

TEST_CASE("5_advanced/robust_lock: the holder is killed, the lock is recovered, data repaired",
          "[lessons][5_advanced]") {
  auto r = testing::run_lesson_json("5_advanced/robust_lock", {"--workers", "3", "--items", "150"});
  CHECK(r["victim_exitcode"] == -9);  // SIGKILL
  CHECK(r["owner_died"] == true);
  CHECK(r["recoveries"] == 1);
  CHECK(r["transfers"] == 450);
  CHECK(r["final_balance"] == r["expected_balance"]);
  CHECK(r["final_balance"] == 1000);
  CHECK(r["balance_exact"] == true);
  CHECK(r["lock_free_at_end"] == true);
}

TEST_CASE("5_advanced/health_check_restart: each bad worker restarted by the check that caught it",
          "[lessons][5_advanced]") {
  auto r = testing::run_lesson_json("5_advanced/health_check_restart");
  // flaky segfaults twice, hanger stops beating once, leaker outgrows the RSS limit once.
  CHECK(r["restarts"] == nlohmann::json{{"flaky", 2}, {"hanger", 1}, {"leaker", 1}});
  CHECK(r["runs"] == nlohmann::json{{"flaky", 3}, {"hanger", 2}, {"leaker", 2}});
  CHECK(r["hanger_unhealthy"] == 1);  // by its heartbeat
  CHECK(r["leaker_unhealthy"] == 1);  // by the predicate over its readings
  CHECK(r["finished"] == true);       // then every worker did its work and exited 0
  // The crash loop: exactly max_restarts restarts, then the give-up, with the reason.
  CHECK(r["crash_loop_restarts"] == r["max_restarts"]);
  CHECK(r["gave_up"] == true);
  CHECK(r["gave_up_reason"].get<std::string>().find("crash_loop") != std::string::npos);
  CHECK(r["children_left"] == 0);
}

TEST_CASE("5_advanced/health_check_restart: a bad flag is a usage error", "[lessons][5_advanced]") {
  auto r = testing::run({testing::lesson_binary("5_advanced/health_check_restart"), "--timeout-ms", "5"});
  CHECK(r.exit_code == 2);
}

TEST_CASE("5_advanced/initializer_finalizer: initializers, finalizers and atexit per way of ending",
          "[lessons][5_advanced]") {
  for (const char* method : {"fork", "spawn"}) {
    INFO("start method " << method);
    auto r =
        testing::run_lesson_json("5_advanced/initializer_finalizer",
                                 {"--workers", "3", "--items", "60", "--start-method", method});
    // close() + join(): one initializer and one finalize task per worker, every tally kept.
    const auto& c = r["close"];
    CHECK(c["workers_started"] == 3);
    CHECK(c["initializers"] == 3);
    CHECK(c["finalized_by_task"] == 3);
    CHECK(c["finalize_task_workers"] == 3);  // three distinct pids: none took two
    CHECK(c["tasks_published"] == 60);
    // A worker ends with std::_Exit: the atexit handler its initializer registered never runs.
    CHECK(c["atexit_ran"] == 0);
    // terminate(): every long task cancelled; the SIGTERM finalizer is best effort.
    const auto& t = r["terminate"];
    CHECK(t["workers_started"] == 3);
    CHECK(t["initializers"] == 3);
    CHECK(t["cancelled"] == 3);
    CHECK(t["finalized_by_sigterm"].get<int>() <= 3);
    CHECK(t["atexit_ran"] == 0);
    // SIGKILL: the replacement ran its initializer; the victim finalized nothing.
    const auto& k = r["sigkill"];
    CHECK(k["workers_started"] == 4);
    CHECK(k["initializers"] == 4);
    CHECK(k["finalized_by_task"] == 3);
    CHECK(k["victim_finalized"] == false);
    CHECK(k["tasks_published"].get<int>() + k["tasks_lost"].get<int>() == 120);
    CHECK(k["atexit_ran"] == 0);
  }
}

TEST_CASE("5_advanced/initializer_finalizer: a bad flag is a usage error",
          "[lessons][5_advanced]") {
  auto r = testing::run(
      {testing::lesson_binary("5_advanced/initializer_finalizer"), "--start-method", "vfork"});
  CHECK(r.exit_code == 2);
  r = testing::run({testing::lesson_binary("5_advanced/initializer_finalizer"), "--workers", "0"});
  CHECK(r.exit_code == 2);
}

TEST_CASE("5_advanced/error_handling_retry: throws and crashes told apart, retried, counted",
          "[lessons][5_advanced]") {
  auto r = testing::run_lesson_json("5_advanced/error_handling_retry",
                                    {"--tasks", "12", "--max-tries", "3", "--workers", "3"});
  // What crosses the process boundary: the exception's type and message, the worker's pid.
  CHECK(r["remote_error_type"] == "demo::TransientError");
  CHECK(r["remote_error_message"] == "task 1 try 1: the service was busy");
  CHECK(r["remote_error_pid_is_worker"] == true);
  CHECK(r["lost_signal"] == "SIGSEGV");
  // The schedule for tasks 0..11 with 3 tries: 8 succeed; 3 and 7 run out of tries; 5 and 11
  // fail permanently and are not retried; task 10 crashes twice and then succeeds.
  const auto& c = r["counts"];
  CHECK(c["successes"] == 8);
  CHECK(c["gave_up"] == 4);
  CHECK(c["gave_up_permanent"] == 2);
  CHECK(c["tries"] == 24);
  CHECK(c["retries"] == 12);
  CHECK(c["thrown_transient"] == 12);
  CHECK(c["thrown_permanent"] == 2);
  CHECK(c["crashes"] == 2);
  CHECK(r["failures_kept"] == 16);
  CHECK(r["values_right"] == true);
  CHECK(r["failure_pids_are_workers"] == true);
  // Every crash cost a worker: 3 first workers + 1 for step 1's crash + 2.
  CHECK(r["workers_started"] == 6);
  CHECK(r["workers_started"] == r["workers_started_expected"]);
  // The workers' log: one whole line per try (24 here, 2 in step 1), each with a worker's
  // name and pid, the 3 lines logged just before a crash included.
  CHECK(r["worker_log_lines"] == 26);
  CHECK(r["worker_log_lines_expected"] == 26);
  CHECK(r["worker_log_lines_match_tries"] == true);
  CHECK(r["worker_lines_whole_with_pid"] == true);
  CHECK(r["worker_log_crash_lines"] == 3);
  CHECK(r["log_listener_failures"] == 0);
}

TEST_CASE("5_advanced/error_handling_retry: --log-file gets every worker line, whole",
          "[lessons][5_advanced]") {
  const auto dir = testing::scratch_dir("error_handling_retry");
  std::filesystem::create_directories(dir);
  const auto log = dir / "retry.log";
  auto r =
      testing::run_lesson_json("5_advanced/error_handling_retry",
                               {"--tasks", "20", "--workers", "2", "--log-file", log.string()});
  std::ifstream in(log);
  std::string line;
  int lines = 0, whole = 0;
  std::set<std::string> levels;
  while (std::getline(in, line)) {
    ++lines;
    // "2026-12-03 12:01:53.831 [CRITICAL/ForkPoolWorker-1:27257] task: task 10 try 1: ..."
    auto open = line.find(" ["), colon = line.find(':', line.find("PoolWorker-")),
         close = line.find("] task: task ");
    if (open == 23 && colon != std::string::npos && close != std::string::npos && colon < close &&
        line.find_first_not_of("0123456789", colon + 1) == close && close > colon + 1) {
      ++whole;
      levels.insert(line.substr(open + 2, line.find('/') - open - 2));
    }
  }
  std::filesystem::remove_all(dir);
  CHECK(lines == r["worker_log_lines"].get<int>());
  CHECK(lines == r["counts"]["tries"].get<int>() + 2);
  CHECK(whole == lines);
  CHECK(levels == std::set<std::string>{"INFO", "WARNING", "ERROR", "CRITICAL"});
}

TEST_CASE("5_advanced/error_handling_retry: other flags, counts still as the schedule predicts",
          "[lessons][5_advanced]") {
  auto r = testing::run_lesson_json("5_advanced/error_handling_retry",
                                    {"--tasks", "40", "--max-tries", "2", "--workers", "2",
                                     "--base-delay-ms", "1", "--seed", "7"});
  CHECK(r["counts"] == r["expected"]);
  CHECK(r["counts"]["tries"].get<int>() ==
        r["counts"]["successes"].get<int>() + r["failures_kept"].get<int>());
  CHECK(r["workers_started"] == r["workers_started_expected"]);
}

TEST_CASE("5_advanced/error_handling_retry: bad flags are usage errors", "[lessons][5_advanced]") {
  const auto bin = testing::lesson_binary("5_advanced/error_handling_retry");
  CHECK(testing::run({bin, "--max-tries", "0"}).exit_code == 2);
  CHECK(testing::run({bin, "--max-tries", "11"}).exit_code == 2);
  CHECK(testing::run({bin, "--tasks", "0"}).exit_code == 2);
  CHECK(testing::run({bin, "--base-delay-ms", "abc"}).exit_code == 2);
}
