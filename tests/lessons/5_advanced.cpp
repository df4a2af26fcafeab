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
