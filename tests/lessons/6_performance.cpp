// tests/lessons/6_performance.cpp - the claims of chapter 6, read from each lesson's --json.
#include <catch2/catch.hpp>

#include "run.hpp"

TEST_CASE("6_performance/ipc_benchmark: every workload has its mp figure, raw floor and ratio",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/ipc_benchmark", {"--quick"});
  CHECK(r["quick"] == true);
  const auto& w = r["workloads"];
  for (const char* id : {"queue_small", "queue_1mib", "pipe_small", "pipe_1mib", "pipe_rtt",
                         "value_locked_inc", "shm_fill"}) {
    INFO(id);
    REQUIRE(w.contains(id));
    double value = w[id]["value"], raw = w[id]["raw_value"], ratio = w[id]["ratio_to_raw"];
    CHECK(value > 0);
    CHECK(raw > 0);
    CHECK(ratio == Approx(value / raw));
  }
  CHECK(w["queue_small"]["unit"] == "msgs/s");
  CHECK(w["queue_1mib"]["unit"] == "MB/s");
  CHECK(w["pipe_rtt"]["unit"] == "us");
  CHECK(w["value_locked_inc"]["unit"] == "ns");
  CHECK(w["shm_fill"]["unit"] == "MB/s");
}

TEST_CASE("6_performance/ipc_benchmark: --filter runs only the matching workloads",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/ipc_benchmark",
                                    {"--quick", "--filter", "^queue_small$"});
  CHECK(r["workloads"].size() == 1);
  CHECK(r["workloads"].contains("queue_small"));
}

TEST_CASE("6_performance/ipc_benchmark: manager_dict_set beside a raw socket round trip",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/ipc_benchmark",
                                    {"--quick", "--filter", "^manager_dict_set$"});
  const auto& w = r["workloads"];
  REQUIRE(w.size() == 1);
  REQUIRE(w.contains("manager_dict_set"));
  const auto& m = w["manager_dict_set"];
  CHECK(m["unit"] == "us");
  double value = m["value"], raw = m["raw_value"], ratio = m["ratio_to_raw"];
  CHECK(value > 0);
  CHECK(raw > 0);
  CHECK(ratio == Approx(value / raw));
}
