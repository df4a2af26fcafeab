// tests/lessons/0_basics.cpp - the claims of chapter 0, read from each lesson's --json.
#include <catch2/catch.hpp>
#include <csignal>
#include <string>
#include <vector>

#include "run.hpp"

TEST_CASE("0_basics/creating_process: children get distinct pids and their exit codes",
          "[lessons][0_basics]") {
  auto r = testing::run_lesson_json("0_basics/creating_process", {"--workers", "4"});
  CHECK(r["workers"] == 4);
  CHECK(r["distinct_pids"] == true);
  CHECK(r["exitcodes"] == nlohmann::json::array({1, 2, 3, 4}));
  CHECK(r["first_child_exitcode"] == 0);
  CHECK(r["callable_object_exitcode"] == 0);
  CHECK(r["active_children_after_join"] == 0);
}

TEST_CASE("0_basics/join_terminate: exit codes, timeouts, terminate, kill and zombies",
          "[lessons][0_basics]") {
  auto r = testing::run_lesson_json("0_basics/join_terminate", {"--timeout", "0.05"});
  // How each target ended.
  CHECK(r["exitcode_normal"] == 0);
  CHECK(r["exitcode_int_result"] == 42);
  CHECK(r["exitcode_throw"] == 1);
  CHECK(r["exitcode_abort"] == -SIGABRT);
  // A sleeping child: join(timeout) gives up, terminate() ends it.
  CHECK(r["is_alive_before_start"] == false);
  CHECK(r["is_alive_after_start"] == true);
  CHECK(r["join_timeout_returned"] == false);
  CHECK(r["exitcode_terminate"] == -SIGTERM);
  CHECK(r["is_alive_after_join"] == false);
  CHECK(r["exitcode_kill"] == -SIGKILL);
  // A child that ignores SIGTERM needs kill().
  CHECK(r["sigterm_ignored_alive_after_terminate"] == true);
  CHECK(r["exitcode_sigterm_ignored_then_kill"] == -SIGKILL);
  // An ended child is a zombie until join() reaps it.
  CHECK(r["zombie_state_seen"] == "Z");
  CHECK(r["reaped_after_join"] == true);
  CHECK(r["proc_entry_gone_after_join"] == true);
}

TEST_CASE("0_basics/join_terminate: the story names the exception the child's target threw",
          "[lessons][0_basics]") {
  auto r = testing::run({testing::lesson_binary("0_basics/join_terminate"), "--timeout", "0.05"});
  INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
  CHECK(r.exit_code == 0);
  CHECK_THAT(r.out, Catch::Contains("0_basics/join_terminate: ok"));
  CHECK_THAT(r.err,
             Catch::Contains("ended with an exception: std::runtime_error: the target gave up"));
}

TEST_CASE("0_basics/join_terminate and process_vs_thread: bad values exit 2 with one line",
          "[lessons][0_basics]") {
  const std::vector<std::vector<std::string>> bad = {
      {"0_basics/join_terminate", "--timeout", "0"},
      {"0_basics/join_terminate", "--timeout", "soon"},
      {"0_basics/process_vs_thread", "--items", "1"},
      {"0_basics/process_vs_thread", "--starts", "0"},
      {"0_basics/process_vs_thread", "--workers", "65"},
  };
  for (const auto& args : bad) {
    std::vector<std::string> argv{testing::lesson_binary(args[0])};
    argv.insert(argv.end(), args.begin() + 1, args.end());
    auto r = testing::run(argv);
    INFO(args[0] << " " << args[1] << " " << args[2] << "\nstderr: " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    CHECK(testing::count_lines(r.err) == 1);
  }
}

TEST_CASE("0_basics/process_vs_thread: every variant counts right, isolation, crash containment",
          "[lessons][0_basics]") {
  auto r = testing::run_lesson_json("0_basics/process_vs_thread",
                                    {"--workers", "3", "--items", "50000", "--starts", "5"});
  // There are 5133 primes below 50000; every split over threads and processes found them.
  CHECK(r["primes"] == 5133);
  CHECK(r["all_variants_correct"] == true);
  REQUIRE(r["scaling"].size() == 3);
  for (int w = 1; w <= 3; ++w) CHECK(r["scaling"][w - 1]["workers"] == w);
  // Timings are reported, never judged: only that they were measured.
  CHECK(r["thread_start_us"].get<double>() > 0);
  CHECK(r["process_start_us"].get<double>() > 0);
  // A forked child writes its own copy of a global; a thread writes the parent's.
  CHECK(r["child_saw_own_write"] == true);
  CHECK(r["global_after_child"] == 0);
  CHECK(r["global_after_thread"] == 42);
  // The child's segmentation fault ended only the child.
  CHECK(r["crash_exitcode"] == -SIGSEGV);
}

TEST_CASE("0_basics/process_contexts: every method starts children; only fork deadlocks",
          "[lessons][0_basics]") {
  auto r = testing::run_lesson_json("0_basics/process_contexts", {"--runs", "3"});
  for (const char* m : {"fork", "spawn", "forkserver"}) {
    INFO(m);
    CHECK(r["start_join_us"][m]["runs"] == 3);
    CHECK(r["start_join_us"][m]["min_us"].get<double>() > 0);
    CHECK(r["start_join_us"][m]["median_us"].get<double>() >=
          r["start_join_us"][m]["min_us"].get<double>());
  }
  CHECK(r["fork_with_threads_deadlock_detected"] == true);
  CHECK(r["deadlocked"] == nlohmann::json{{"fork", true}, {"spawn", false}, {"forkserver", false}});
}
