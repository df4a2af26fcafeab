// tests/lessons/all_lessons.cpp - the rules every lesson follows (see README.md).
#include <catch2/catch.hpp>

#include "catalogue.hpp"
#include "run.hpp"
#include "shm.hpp"

using playground::catalogue;

TEST_CASE("lessons: every lesson runs with its tour arguments and --json reports ok", "[lessons]") {
  REQUIRE_FALSE(catalogue().empty());
  for (const auto& e : catalogue()) {
    DYNAMIC_SECTION(e.id) {
      testing::ShmGuard shm;
      testing::run_lesson_json(e, e.args);  // as the tour runs it: through its runner, if any
      CHECK(shm.leaked().empty());
    }
  }
}

TEST_CASE("lessons: a lesson with a runner also runs without it", "[lessons]") {
  // An MPI lesson started as a plain program is one rank that does all the work.
  for (const auto& e : catalogue()) {
    if (e.runner.empty()) continue;
    DYNAMIC_SECTION(e.id) {
      testing::ShmGuard shm;
      testing::run_lesson_json(e.id, e.args);
      CHECK(shm.leaked().empty());
    }
  }
}

TEST_CASE("lessons: an unknown flag exits 2 with one line on stderr", "[lessons]") {
  for (const auto& e : catalogue()) {
    DYNAMIC_SECTION(e.id) {
      auto r = testing::run({testing::lesson_binary(e.id), "--bogus"});
      CHECK(r.exit_code == 2);
      CHECK(r.out.empty());
      CHECK(testing::count_lines(r.err) == 1);
      CHECK_THAT(r.err, Catch::Contains("--bogus"));
    }
  }
}

TEST_CASE("lessons: a bad value exits 2 with one line on stderr", "[lessons]") {
  for (const auto& e : catalogue()) {
    DYNAMIC_SECTION(e.id) {
      // Every lesson that takes --workers rejects 0 and non-numbers.
      auto help = testing::run({testing::lesson_binary(e.id), "--help"});
      if (help.out.find("--workers") == std::string::npos) continue;
      for (const char* bad : {"0", "many", "-3"}) {
        auto r = testing::run({testing::lesson_binary(e.id), "--workers", bad});
        INFO("--workers " << bad);
        CHECK(r.exit_code == 2);
        CHECK(testing::count_lines(r.err) == 1);
      }
    }
  }
}

TEST_CASE("lessons: --help exits 0 and starts with the summary of the header comment",
          "[lessons]") {
  for (const auto& e : catalogue()) {
    DYNAMIC_SECTION(e.id) {
      auto r = testing::run({testing::lesson_binary(e.id), "--help"});
      CHECK(r.exit_code == 0);
      CHECK_THAT(r.out, Catch::StartsWith(e.summary));
      CHECK_THAT(r.out, Catch::Contains("--json"));
    }
  }
}

TEST_CASE("launcher: tour runs the lessons its filter matches and ends with the table",
          "[lessons][launcher]") {
  std::string launcher = MP_BUILD_DIR "/launcher/playground";
  SECTION("a filter that matches one lesson") {
    auto r = testing::run({launcher, "tour", "--filter", "0_basics/creating_process"});
    INFO(r.out << r.err);
    CHECK(r.exit_code == 0);
    CHECK_THAT(r.out, Catch::Contains("1/1 ok"));
  }
  SECTION("a lesson past its time limit is stopped, and the table says so") {
    // A limit of 0 s: the launcher's first look comes before any lesson can have finished.
    auto r = testing::run({"/usr/bin/env", "PLAYGROUND_LESSON_TIMEOUT=0", launcher, "tour",
                           "--filter", "0_basics/process_contexts"});
    INFO(r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.out, Catch::Contains("NO (timed out after 0 s)"));
  }
  SECTION("a bad time limit is a usage error") {
    auto r = testing::run({"/usr/bin/env", "PLAYGROUND_LESSON_TIMEOUT=soon", launcher, "tour"});
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
  SECTION("a filter that matches nothing is a usage error") {
    auto r = testing::run({launcher, "tour", "--filter", "no/such_lesson"});
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
    CHECK_THAT(r.err, Catch::Contains("no lesson matches"));
  }
}
