// tests/lessons/5_advanced.cpp - the claims of chapter 5, read from each lesson's --json.
#include <catch2/catch.hpp>

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
