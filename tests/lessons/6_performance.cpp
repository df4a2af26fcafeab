// tests/lessons/6_performance.cpp - the claims of chapter 6, read from each lesson's --json.
//
// The benchmark's figures are never compared with a threshold (the machine is shared):
// what is asserted is that every figure is there, consistent with its min and max, and
// that each ratio is the one its definition gives.
#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "run.hpp"

namespace {

const std::vector<std::string> kAllWorkloads = {
    "start_fork",  "start_spawn",      "start_forkserver", "pool_map_chunk1", "pool_map_auto",
    "apply_async", "queue_small",      "queue_1mib",       "pipe_small",      "pipe_1mib",
    "pipe_rtt",    "value_locked_inc", "manager_dict_set", "shm_fill"};

bool is_time(const std::string& unit) { return unit == "us" || unit == "ns" || unit == "ms"; }

// The cost of a over the cost of b: a/b for times, b/a for rates.
double cost_ratio(double a, double b, const std::string& unit) {
  return is_time(unit) ? a / b : b / a;
}

// A figure's median lies within its min and max, all positive.
void check_spread(const nlohmann::json& s) {
  double median = s["median"], min = s["min"], max = s["max"];
  CHECK(min > 0);
  CHECK(min <= median);
  CHECK(median <= max);
}

}  // namespace

TEST_CASE("6_performance/ipc_benchmark: every workload has its mp figure, raw floor and ratio",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/ipc_benchmark", {"--quick"});
  CHECK(r["quick"] == true);
  CHECK(r["repeat"] == 3);
  CHECK(r["python"].is_null());
  const auto& w = r["workloads"];
  CHECK(w.size() == kAllWorkloads.size());
  for (const auto& id : kAllWorkloads) {
    INFO(id);
    REQUIRE(w.contains(id));
    const auto& row = w[id];
    std::string unit = row["unit"];
    check_spread(row["mp"]);
    check_spread(row["raw"]);
    CHECK(row["mp_over_raw"].get<double>() ==
          Approx(cost_ratio(row["mp"]["median"], row["raw"]["median"], unit)));
    CHECK(row["python"].is_null());
    CHECK(row["python_over_mp"].is_null());
  }
  for (const char* id : {"start_fork", "start_spawn", "start_forkserver", "pool_map_chunk1",
                         "apply_async", "pipe_rtt", "manager_dict_set"}) {
    CHECK(w[id]["unit"] == "us");
  }
  CHECK(w["queue_small"]["unit"] == "msgs/s");
  CHECK(w["queue_1mib"]["unit"] == "MB/s");
  CHECK(w["value_locked_inc"]["unit"] == "ns");
  CHECK(w["shm_fill"]["unit"] == "MB/s");

  // The three furthest from their floor, furthest first.
  const auto& far = r["furthest_from_raw"];
  REQUIRE(far.size() == 3);
  double worst = 1e300;
  for (const auto& id : far) {
    double ratio = w[id.get<std::string>()]["mp_over_raw"];
    CHECK(ratio <= worst);
    worst = ratio;
  }
  for (const auto& id : kAllWorkloads) {
    if (std::find(far.begin(), far.end(), id) == far.end()) {
      CHECK(w[id]["mp_over_raw"].get<double>() <= worst);
    }
  }
}

TEST_CASE("6_performance/ipc_benchmark: --filter runs only the matching workloads",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/ipc_benchmark",
                                    {"--quick", "--repeat", "2", "--filter", "^queue_small$"});
  CHECK(r["repeat"] == 2);
  CHECK(r["workloads"].size() == 1);
  CHECK(r["workloads"].contains("queue_small"));
}

TEST_CASE("6_performance/ipc_benchmark: --compare-python adds Python's figure and the speedup",
          "[lessons][6_performance]") {
  // python3 is installed by scripts/install-deps; the scripts are in 6_performance/python.
  auto r = testing::run_lesson_json(
      "6_performance/ipc_benchmark",
      {"--quick", "--compare-python", "--filter", "^(start_fork|pipe_rtt|queue_small)$"});
  REQUIRE(r["python"].is_string());
  const auto& w = r["workloads"];
  REQUIRE(w.size() == 3);
  for (const auto& [id, row] : w.items()) {
    INFO(id);
    CHECK_FALSE(row.contains("python_error"));
    REQUIRE(row["python"].is_object());
    check_spread(row["python"]);
    CHECK(row["python_n"].get<long>() > 0);
    CHECK(row["python_over_mp"].get<double>() ==
          Approx(cost_ratio(row["python"]["median"], row["mp"]["median"], row["unit"])));
  }
}

TEST_CASE("6_performance/ipc_benchmark: without python3 it says so and still succeeds",
          "[lessons][6_performance]") {
  auto r = testing::run({"/usr/bin/env", "MP_PYTHON=/nonexistent/python3",
                         testing::lesson_binary("6_performance/ipc_benchmark"), "--quick",
                         "--compare-python", "--filter", "^pipe_rtt$"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("python3 was not found") != std::string::npos);
}

TEST_CASE("6_performance/ipc_benchmark: a failing Python script fails the run, with its reason",
          "[lessons][6_performance]") {
  // /bin/false stands in for an interpreter that fails: the run must not report a figure.
  auto r = testing::run({"/usr/bin/env", "MP_PYTHON=/bin/false",
                         testing::lesson_binary("6_performance/ipc_benchmark"), "--quick",
                         "--compare-python", "--filter", "^pipe_rtt$", "--json"});
  REQUIRE(r.exit_code == 1);
  auto j = nlohmann::json::parse(r.out);
  CHECK(j["ok"] == false);
  const auto& row = j["workloads"]["pipe_rtt"];
  CHECK(row["python"].is_null());
  CHECK(row["python_error"].get<std::string>().find("pipe_rtt.py failed") != std::string::npos);
}

TEST_CASE("6_performance/ipc_benchmark: --out writes the CSV and the chart",
          "[lessons][6_performance]") {
  auto dir = testing::scratch_dir("mp-bench-out");
  std::filesystem::remove_all(dir);  // what a failed run of this test may have left
  auto r = testing::run_lesson_json(
      "6_performance/ipc_benchmark",
      {"--quick", "--filter", "^(pipe_small|shm_fill)$", "--out", dir.string()});
  REQUIRE(r["csv"] == (dir / "ipc_benchmark.csv").string());
  std::ifstream csv(dir / "ipc_benchmark.csv");
  std::vector<std::string> lines;
  for (std::string line; std::getline(csv, line);) lines.push_back(line);
  REQUIRE(lines.size() == 3);
  CHECK(lines[0].rfind("workload,unit,mp_median,mp_min,mp_max,raw_median", 0) == 0);
  CHECK(lines[1].rfind("pipe_small,msgs/s,", 0) == 0);
  CHECK(lines[2].rfind("shm_fill,MB/s,", 0) == 0);
  // gnuplot-nox is installed by scripts/install-deps.
  CHECK(r["chart"] == (dir / "ipc_benchmark.png").string());
  CHECK(testing::is_png(dir / "ipc_benchmark.png"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("6_performance/ipc_benchmark: bad options are usage errors", "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/ipc_benchmark");
  for (std::vector<std::string> args : {std::vector<std::string>{"--repeat", "0"},
                                        {"--filter", "no_such_workload"},
                                        {"--filter", "(["}}) {
    args.insert(args.begin(), bin);
    auto r = testing::run(args);
    INFO(args[1] << " " << args[2] << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}

TEST_CASE("6_performance/python_comparison: each job both ways, with mp's speedup",
          "[lessons][6_performance]") {
  // python3 is installed by scripts/install-deps.
  auto r = testing::run_lesson_json("6_performance/python_comparison", {"--quick"});
  REQUIRE(r["python_found"] == true);
  const auto& jobs = r["jobs"];
  REQUIRE(jobs.size() == 4);
  for (const char* id : {"queue_small", "apply_async", "value_locked_inc", "manager_dict_set"}) {
    INFO(id);
    REQUIRE(jobs.contains(id));
    const auto& j = jobs[id];
    double mine = j["mp"], theirs = j["python"];
    CHECK(mine > 0);
    CHECK(theirs > 0);
    CHECK(j["speedup"].get<double>() == Approx(cost_ratio(theirs, mine, j["unit"])));
  }
}

TEST_CASE("6_performance/python_comparison: without python3 it says so and still succeeds",
          "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/python_comparison");
  auto r = testing::run({"/usr/bin/env", "MP_PYTHON=/nonexistent/python3", bin, "--quick"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("python3 was not found") != std::string::npos);
  auto j =
      testing::run({"/usr/bin/env", "MP_PYTHON=/nonexistent/python3", bin, "--quick", "--json"});
  REQUIRE(j.exit_code == 0);
  auto report = nlohmann::json::parse(j.out);
  CHECK(report["ok"] == true);
  CHECK(report["python_found"] == false);
  for (const auto& [id, job] : report["jobs"].items()) {
    INFO(id);
    CHECK(job["mp"].get<double>() > 0);
    CHECK(job["python"].is_null());
    CHECK(job["speedup"].is_null());
  }
}

TEST_CASE("6_performance/cpu_vs_io_bound: every row equals serial, waits overlap past the cores",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/cpu_vs_io_bound", {"--quick"});
  int cores = r["cores"];
  REQUIRE(cores >= 1);
  std::vector<int> expected{1, 2, 4, 2 * cores};
  std::sort(expected.begin(), expected.end());
  expected.erase(std::unique(expected.begin(), expected.end()), expected.end());
  CHECK(r["workers"].get<std::vector<int>>() == expected);
  CHECK(r["tasks"].get<int>() == 2 * std::max(4, 2 * cores));
  CHECK(r["results_equal_serial"] == true);

  // Each kind: one serial row, then a pool and a threads row per worker count, with the
  // speed-up and efficiency their definitions give.
  const auto& rows = r["rows"];
  REQUIRE(rows.size() == 2 * (1 + 2 * expected.size()));
  double sxy = 0, sxx = 0, io_best = 0;
  for (const char* kind : {"cpu", "io"}) {
    double serial = 0;
    std::size_t seen = 0;
    for (const auto& row : rows) {
      if (row["kind"] != kind) continue;
      INFO(row.dump());
      CHECK(row["equal_serial"] == true);
      double s = row["seconds"];
      CHECK(s > 0);
      if (row["how"] == "serial") {
        serial = s;
        continue;
      }
      REQUIRE(serial > 0);  // the serial row comes first
      ++seen;
      int n = row["workers"];
      double speedup = row["speedup"];
      CHECK(speedup == Approx(serial / s));
      CHECK(row["efficiency"].get<double>() == Approx(speedup / n));
      int p = std::min(n, cores);
      if (std::string(kind) == "cpu" && p > 1) {
        CHECK(row["serial_fraction"].get<double>() ==
              Approx((1 / speedup - 1.0 / p) / (1 - 1.0 / p)));
        if (row["how"] == "pool") {
          sxy += (1 - 1.0 / p) * (1 / speedup - 1.0 / p);
          sxx += (1 - 1.0 / p) * (1 - 1.0 / p);
        }
      } else {
        CHECK(row["serial_fraction"].is_null());
      }
      if (std::string(kind) == "io" && row["how"] == "pool") io_best = std::max(io_best, speedup);
    }
    CHECK(seen == 2 * expected.size());
  }
  if (cores > 1) {
    CHECK(r["amdahl_serial_fraction"].get<double>() == Approx(sxy / sxx));
  } else {
    CHECK(r["amdahl_serial_fraction"].is_null());
  }
  // A wait holds no core: with 2 x cores workers the waits overlap past the core count.
  CHECK(r["io_best_speedup"].get<double>() == Approx(io_best));
  CHECK(io_best > cores);
  CHECK(r["io_speedup_exceeds_cores"] == true);
}

TEST_CASE("6_performance/cpu_vs_io_bound: --out writes the chart", "[lessons][6_performance]") {
  auto dir = testing::scratch_dir("mp-cpu-io-out");
  std::filesystem::remove_all(dir);
  auto r = testing::run_lesson_json("6_performance/cpu_vs_io_bound",
                                    {"--quick", "--rounds", "1", "--out", dir.string()});
  // gnuplot-nox is installed by scripts/install-deps.
  CHECK(r["chart"] == (dir / "cpu_vs_io_bound.png").string());
  CHECK(testing::is_png(dir / "cpu_vs_io_bound.png"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("6_performance/cpu_vs_io_bound: bad options are usage errors",
          "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/cpu_vs_io_bound");
  for (std::vector<std::string> args : {std::vector<std::string>{"--rounds", "0"},
                                        {"--cpu-ms", "0"},
                                        {"--wait-ms", "x"}}) {
    args.insert(args.begin(), bin);
    auto r = testing::run(args);
    INFO(args[1] << " " << args[2] << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}
