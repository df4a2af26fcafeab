// tests/lessons/5_advanced.cpp - the claims of chapter 5, read from each lesson's --json.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "run.hpp"
#include "shm.hpp"

namespace {

// Runs a lesson with --json as the reaper of whatever it leaves behind, and checks that it
// left no process (running or zombie) and no shared-memory segment.
nlohmann::json run_clean(const std::string& id, std::vector<std::string> args = {}) {
  testing::ShmGuard shm;
  testing::adopt_orphans();
  auto r = testing::run_lesson_json(id, std::move(args));
  CHECK(testing::no_children());
  CHECK(shm.leaked().empty());
  return r;
}

}  // namespace

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

TEST_CASE("5_advanced/daemon_process: the daemon flag, a joined child, PDEATHSIG, a Unix daemon",
          "[lessons][5_advanced]") {
  auto dir = testing::scratch_dir("daemon_process");
  std::filesystem::create_directories(dir);
  auto pidfile = dir / "d.pid";
  auto r = run_clean("5_advanced/daemon_process", {"--pidfile", pidfile.string(), "--work-ms", "50"});
  // mp's daemon=true: terminated (SIGTERM) when its parent exits, before it finished.
  const auto& d = r["daemon_flag"];
  CHECK(d["middle_exitcode"] == 0);
  CHECK(d["child_got_sigterm"] == true);
  CHECK(d["child_finished"] == false);
  CHECK(d["child_gone"] == true);  // ESRCH: not even a zombie
  // A child that is not a daemon: the parent's exit waited for it to finish.
  const auto& p = r["plain_child"];
  CHECK(p["middle_exitcode"] == 0);
  CHECK(p["child_got_sigterm"] == false);
  CHECK(p["child_finished"] == true);
  CHECK(p["child_gone"] == true);
  CHECK(p["middle_seconds"].get<double>() > 0);
  // A parent killed by SIGKILL runs no exit code; the parent-death signal kills the child.
  CHECK(r["parent_sigkilled"]["middle_exitcode"] == -9);
  CHECK(r["parent_sigkilled"]["child_killed_by_sigkill"] == true);
  // The Unix daemon: outlives its starter, reparented, in the vanished leader's session.
  const auto& u = r["unix_daemon"];
  CHECK(u["starter_exitcode"] == 0);
  CHECK(u["starter_gone"] == true);
  CHECK(u["leader_gone"] == true);
  CHECK(u["leader_sid_is_own_pid"] == true);  // setsid() made the leader a session leader
  CHECK(u["alive_after_starter"] == true);
  CHECK(u["pidfile_pid_is_daemon"] == true);
  CHECK(u["ppid_is_starter"] == false);
  CHECK(u["ppid_is_lesson"] == true);  // the lesson is a child subreaper
  CHECK(u["sid_is_leader"] == true);
  CHECK(u["sid_is_own_pid"] == false);  // not a session leader: can never get a terminal
  CHECK(u["pgrp_is_leader"] == true);
  CHECK(u["sid_differs_from_lesson"] == true);
  CHECK(u["tty_nr"] == 0);
  CHECK(u["cwd"] == "/");
  CHECK(u["umask"] == "0000");
  CHECK(u["fds_on_dev_null"] == 3);
  CHECK(u["fd_count"] == 4);  // 0, 1, 2 and the pidfile
  CHECK(u["second_copy_refused"] == true);
  CHECK(u["stopped_status"] == "exited with status 0");
  CHECK(u["pidfile_removed_by_daemon"] == true);
  // Nothing left: every process created is gone, no child, no pidfile.
  CHECK(r["processes_created"] == 12);
  CHECK(r["processes_left"] == 0);
  CHECK(r["no_children_left"] == true);
  CHECK(r["pidfile_left"] == false);
  CHECK_FALSE(std::filesystem::exists(pidfile));
  std::filesystem::remove_all(dir);
}

TEST_CASE("5_advanced/daemon_process: a pidfile locked by someone else stops the start",
          "[lessons][5_advanced]") {
  auto dir = testing::scratch_dir("daemon_process_locked");
  std::filesystem::create_directories(dir);
  auto pidfile = dir / "d.pid";
  int fd = ::open(pidfile.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  REQUIRE(fd != -1);
  REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);  // "another instance" holds it
  testing::adopt_orphans();
  auto r = testing::run({testing::lesson_binary("5_advanced/daemon_process"), "--pidfile",
                         pidfile.string(), "--work-ms", "10"});
  ::close(fd);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.err, Catch::Contains("cannot start the daemon") && Catch::Contains("status 3"));
  CHECK(testing::no_children());  // the refused copy was reaped too
  CHECK(std::filesystem::exists(pidfile));  // not ours to remove: the holder's file
  std::filesystem::remove_all(dir);
}

TEST_CASE("5_advanced/daemon_process: a bad flag is a usage error", "[lessons][5_advanced]") {
  const auto bin = testing::lesson_binary("5_advanced/daemon_process");
  CHECK(testing::run({bin, "--work-ms", "5"}).exit_code == 2);
  CHECK(testing::run({bin, "--work-ms", "soon"}).exit_code == 2);
}

TEST_CASE("5_advanced/custom_context: two contexts at once, one Queue and Lock for all, the rules",
          "[lessons][5_advanced]") {
  for (const char* def : {"spawn", "fork", "forkserver"}) {
    INFO("--default-method " << def);
    auto r = run_clean("5_advanced/custom_context",
                       {"--default-method", def, "--workers", "2", "--items", "4"});
    CHECK(r["all_start_methods"] == nlohmann::json{"fork", "spawn", "forkserver"});
    CHECK(r["initial_default"] == "fork");
    // set_start_method: the same method again is allowed, another one throws, force wins.
    const auto& rules = r["rules"];
    CHECK(rules["set spawn (first call)"] == "ok");
    CHECK(rules["set spawn again (same method)"] == "ok");
    CHECK_THAT(rules["set fork (a different method)"].get<std::string>(),
               Catch::StartsWith("mp::ProcessError: cannot set the start method"));
    CHECK(rules["set fork, force=true"] == "ok");
    CHECK_THAT(rules["get_context(\"vfork\")"].get<std::string>(),
               Catch::StartsWith("std::invalid_argument"));
    CHECK(r["default_after_refusal"] == "spawn");
    CHECK(r["default_after_force"] == "fork");
    CHECK(r["default_method"] == def);
    CHECK(r["plain_process_method"] == def);
    CHECK(r["contexts_compare_by_method"] == true);
    // The fork pool's workers see what the parent set after start-up; the spawn pool's not.
    const auto& f = r["fork_pool"];
    const auto& s = r["spawn_pool"];
    CHECK(f["workers"] == 2);
    CHECK(s["workers"] == 2);
    CHECK(f["sees_configured_by_parent"] == true);
    CHECK(s["sees_initial_value"] == true);
    CHECK(f["ppid_is_parent"] == true);
    CHECK(s["ppid_is_parent"] == true);
    CHECK(f["default_methods"] == nlohmann::json{def});  // children inherit the default
    CHECK(s["default_methods"] == nlohmann::json{def});
    CHECK_THAT(f["name"].get<std::string>(), Catch::StartsWith("ForkPoolWorker-"));
    CHECK_THAT(s["name"].get<std::string>(), Catch::StartsWith("SpawnPoolWorker-"));
    // One Process per context, one Queue and one Lock for the three.
    const auto& p = r["processes"];
    CHECK(p["fork"]["sees_configured_by_parent"] == true);
    CHECK(p["spawn"]["sees_configured_by_parent"] == false);
    CHECK(p["forkserver"]["sees_configured_by_parent"] == false);
    CHECK(p["fork"]["ppid_is_parent"] == true);
    CHECK(p["spawn"]["ppid_is_parent"] == true);
    CHECK(p["forkserver"]["ppid_is_parent"] == false);  // the fork server is its parent
    for (const char* m : {"fork", "spawn", "forkserver"}) {
      CHECK(p[m]["exitcode"] == 0);
      CHECK(p[m]["default_method"] == def);
    }
    CHECK(r["counted_under_the_lock"] == 3);
    CHECK(r["children_left"] == 0);
  }
}

TEST_CASE("5_advanced/custom_context: a bad flag is a usage error", "[lessons][5_advanced]") {
  const auto bin = testing::lesson_binary("5_advanced/custom_context");
  CHECK(testing::run({bin, "--default-method", "vfork"}).exit_code == 2);
  CHECK(testing::run({bin, "--items", "0"}).exit_code == 2);
}

namespace {

// What holds after any shutdown: every task accounted for, no worker replaced or left.
void check_shutdown(const nlohmann::json& r, int workers, int items) {
  CHECK(r["accounted"] == items);
  CHECK(r["other_errors"] == 0);
  CHECK(r["finished_in_grace"].get<int>() + r["cancelled"].get<int>() ==
        r["in_flight_at_signal"].get<int>());
  CHECK(r["hung_cancelled"] == r["hung_in_flight_at_signal"]);  // a hung task never finishes
  CHECK(r["workers_started"] == workers);  // no worker died of the signal
  CHECK(r["workers_initialized"] == workers);  // each ran a task, so its initializer too
  CHECK(r["workers_sigint_blocked_at_start"] == workers);
  CHECK(r["workers_sigint_ignored"] == workers);
  CHECK(r["workers_sigterm_unblocked"] == workers);
  CHECK(r["worker_pids_left"] == 0);
  CHECK(r["children_left"] == 0);
  CHECK(r["shm_entries_left"] == 0);
}

}  // namespace

TEST_CASE("5_advanced/graceful_shutdown: SIGINT as from a terminal, to the parent and workers",
          "[lessons][5_advanced]") {
  auto r = run_clean("5_advanced/graceful_shutdown");
  CHECK(r["signal"] == "SIGINT");
  CHECK(r["signal_from_self"] == true);
  CHECK(r["signalled_processes"] == 4);  // the parent and its 3 workers
  CHECK(r["second_signal"] == false);
  check_shutdown(r, 3, 40);
}

TEST_CASE("5_advanced/graceful_shutdown: SIGTERM, other start methods, no grace, no signal",
          "[lessons][5_advanced]") {
  SECTION("SIGTERM to the parent only") {
    auto r = run_clean("5_advanced/graceful_shutdown", {"--signal", "TERM", "--workers", "2"});
    CHECK(r["signal"] == "SIGTERM");
    CHECK(r["signalled_processes"] == 1);
    check_shutdown(r, 2, 40);
  }
  SECTION("spawn workers inherit the blocked mask through exec") {
    auto r = run_clean("5_advanced/graceful_shutdown", {"--start-method", "spawn"});
    CHECK(r["start_method"] == "spawn");
    CHECK(r["signal"] == "SIGINT");
    check_shutdown(r, 3, 40);
  }
  SECTION("forkserver") {
    auto r = run_clean("5_advanced/graceful_shutdown", {"--start-method", "forkserver"});
    CHECK(r["signal"] == "SIGINT");
    check_shutdown(r, 3, 40);
  }
  SECTION("a grace of 0: what is in flight is cancelled at once") {
    auto r = run_clean("5_advanced/graceful_shutdown", {"--grace", "0"});
    check_shutdown(r, 3, 40);
  }
  SECTION("the work ends before the signal is due: a normal close") {
    auto r = run_clean("5_advanced/graceful_shutdown", {"--items", "5", "--after", "30"});
    CHECK(r["signal"] == "none");
    CHECK(r["cancelled"] == 0);
    CHECK(r["not_submitted"] == 0);
    CHECK(r["completed_before_signal"] == 5);
    check_shutdown(r, 3, 5);
  }
}

TEST_CASE("5_advanced/graceful_shutdown: bad flags are usage errors", "[lessons][5_advanced]") {
  const auto bin = testing::lesson_binary("5_advanced/graceful_shutdown");
  CHECK(testing::run({bin, "--signal", "KILL"}).exit_code == 2);
  CHECK(testing::run({bin, "--grace", "-1"}).exit_code == 2);
  CHECK(testing::run({bin, "--start-method", "vfork"}).exit_code == 2);
}
