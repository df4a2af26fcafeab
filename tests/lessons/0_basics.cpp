// tests/lessons/0_basics.cpp - the claims of chapter 0, read from each lesson's --json.
#include <catch2/catch.hpp>

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
