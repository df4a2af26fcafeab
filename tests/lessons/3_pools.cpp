// tests/lessons/3_pools.cpp - the claims of chapter 3, read from each lesson's --json.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "run.hpp"

using testing::is_png;
using testing::scratch_dir;

TEST_CASE(
    "3_pools/pool_map_apply: map equals the serial answers, a task's exception and a "
    "dead worker are reported, the pool recovers",
    "[lessons][3_pools]") {
  auto r = testing::run_lesson_json("3_pools/pool_map_apply", {"--workers", "3", "--items", "6"});
  CHECK(r["workers"] == 3);
  CHECK(r["items"] == 6);
  CHECK(r["map_matches_serial"] == true);
  CHECK(r["apply_result"] == 1229);  // primes below 10000
  CHECK(r["async_results_match"] == true);
  CHECK(r["remote_error_type"] == "std::domain_error");
  CHECK(r["remote_error_message"] == "no real square root of -4");
  CHECK(r["remote_error_from_worker"] == true);
  CHECK(r["lost_task_named"] == true);
  CHECK(r["lost_signal"] == "SIGKILL");
  CHECK(r["worker_replaced"] == true);
  CHECK(r["map_after_crash_ok"] == true);
  CHECK(r["workers_started"] >= 4);  // 3, and one replacement
}

TEST_CASE(
    "3_pools/imap_async: every result arrives, imap keeps input order, each callback "
    "runs once in the parent",
    "[lessons][3_pools]") {
  auto r = testing::run_lesson_json("3_pools/imap_async",
                                    {"--workers", "3", "--items", "25", "--seed", "4"});
  CHECK(r["items"] == 25);
  CHECK(r["unordered_all_arrived"] == true);
  CHECK(r["ordered_in_input_order"] == true);
  CHECK(r["expected_failures"] == 5);
  CHECK(r["error_callbacks"] == 5);
  CHECK(r["callbacks"] == 20);
  CHECK(r["callbacks_in_parent_off_main_thread"] == true);
  CHECK(r["first_result_ms"].get<double>() <= r["all_results_ms"].get<double>());
}

TEST_CASE("3_pools/imap_async: plain progress lines when stdout is not a terminal",
          "[lessons][3_pools]") {
  auto r = testing::run(
      {testing::lesson_binary("3_pools/imap_async"), "--workers", "2", "--items", "20"});
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("progress: 20/20 (100%)") != std::string::npos);
  CHECK(r.out.find("progress: 2/20 (10%)") != std::string::npos);
  CHECK(r.out.find('\r') == std::string::npos);
}

TEST_CASE(
    "3_pools/chunksize_tuning: results match for every chunksize, Python's default, "
    "the data file and the chart",
    "[lessons][3_pools]") {
  auto dir = scratch_dir("mp-lesson-chunks");
  auto r = testing::run_lesson_json("3_pools/chunksize_tuning",
                                    {"--workers", "2", "--items", "1000", "--out", dir.string()});
  CHECK(r["results_match"] == true);
  CHECK(r["python_default_chunksize"] == 125);  // 1000 / (4 * 2)
  // Rows: chunksizes 1, 2, 4 ... up to items / workers, and the default.
  std::vector<std::size_t> sizes;
  for (const auto& row : r["rows"]) {
    sizes.push_back(row["chunksize"]);
    CHECK(row["us_per_task"].get<double>() > 0);
  }
  CHECK(sizes == std::vector<std::size_t>{1, 2, 4, 8, 16, 32, 64, 125, 128, 256});
  CHECK(r["uneven_ms_by_chunksize"].size() == 3);
  CHECK(std::filesystem::exists(r["data_file"].get<std::string>()));
  std::ifstream data(r["data_file"].get<std::string>());
  int lines = 0;
  for (std::string line; std::getline(data, line);) lines += !line.empty() && line[0] != '#';
  CHECK(lines == 10);
  if (r["gnuplot_found"] == true) {
    CHECK(is_png(r["chart"].get<std::string>()));
  } else {
    CHECK(r["chart"] == "");
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("3_pools/chunksize_tuning: without gnuplot it says so, writes the data and succeeds",
          "[lessons][3_pools]") {
  auto dir = scratch_dir("mp-lesson-chunks-nognuplot");
  auto r = testing::run({"/usr/bin/env", "PATH=/nonexistent",
                         testing::lesson_binary("3_pools/chunksize_tuning"), "--workers", "2",
                         "--items", "200", "--out", dir.string()});
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("gnuplot is not installed") != std::string::npos);
  CHECK(std::filesystem::exists(dir / "chunksize_tuning.dat"));
  CHECK_FALSE(std::filesystem::exists(dir / "chunksize_tuning.png"));
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "3_pools/starmap_async: zipped tuples, strings both ways, one callback, one error "
    "callback",
    "[lessons][3_pools]") {
  auto r = testing::run_lesson_json("3_pools/starmap_async", {"--workers", "2", "--items", "30"});
  CHECK(r["items"] == 30);
  CHECK(r["powers_match"] == true);
  CHECK(r["weighted_sums"] == nlohmann::json::array({3.0, 20.0}));
  CHECK(r["ciphers_match_serial"] == true);
  CHECK(r["cipher_roundtrip"] == true);
  CHECK(r["callback_calls"] == 1);
  CHECK(r["callback_results"] == 30);
  CHECK(r["error_callback_calls"] == 1);
  CHECK(r["error_type"] == "std::domain_error");
  CHECK(r["get_raised_same_error"] == true);
}
