// tests/lessons/6_performance.cpp - the claims of chapter 6, read from each lesson's --json.
//
// The benchmark's figures are never compared with a threshold (the machine is shared):
// what is asserted is that every figure is there, consistent with its min and max, and
// that each ratio is the one its definition gives.
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mp/monitor.hpp>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

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

// A program this test starts and must end: killed and reaped by the destructor.
class Child {
 public:
  explicit Child(std::vector<std::string> argv) {
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    int rc = ::posix_spawn(&pid_, args[0], nullptr, nullptr, args.data(), environ);
    REQUIRE(rc == 0);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() { end(); }
  pid_t pid() const { return pid_; }
  // Kills the child and its own children (the shell's sleeps), children first, and reaps it.
  void end() {
    if (pid_ <= 0) return;
    try {
      for (pid_t p : mp::children(pid_, true)) ::kill(p, SIGKILL);
    } catch (const mp::NoSuchProcess&) {
    }
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) == -1 && errno == EINTR) {
    }
    pid_ = 0;
  }

 private:
  pid_t pid_ = 0;
};

// What ps says of a pid: RSS in KiB and the number of threads.
std::pair<long, int> ps_rss_threads(pid_t pid) {
  auto r = testing::run({"/usr/bin/env", "ps", "-o", "rss=,nlwp=", "-p", std::to_string(pid)});
  REQUIRE(r.exit_code == 0);
  std::istringstream in(r.out);
  long rss = -1;
  int threads = -1;
  in >> rss >> threads;
  REQUIRE(rss >= 0);
  return {rss, threads};
}

const nlohmann::json* find_process(const nlohmann::json& sample, pid_t pid) {
  for (const auto& p : sample["processes"]) {
    if (p["pid"] == pid) return &p;
  }
  return nullptr;
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

TEST_CASE("6_performance/process_monitor: --pid of a process reads what ps reads",
          "[lessons][6_performance]") {
  Child sleeper({"/bin/sleep", "30"});
  auto r = testing::run_lesson_json("6_performance/process_monitor",
                                    {"--pid", std::to_string(sleeper.pid()), "--interval", "0.1"});
  auto [ps_rss, ps_threads] = ps_rss_threads(sleeper.pid());
  CHECK(r["demo"] == false);
  CHECK(r["root"] == sleeper.pid());
  CHECK(r["count"] == 1);  // --json: one sample
  REQUIRE(r["samples"].size() == 1);
  const auto& s = r["samples"][0];
  CHECK(s["root_gone"] == false);
  CHECK(s["gone"].empty());
  REQUIRE(s["processes"].size() == 1);  // sleep has no children
  const auto& p = s["processes"][0];
  CHECK(p["pid"] == sleeper.pid());
  CHECK(p["ppid"] == ::getpid());
  CHECK(p["name"] == "sleep");
  CHECK(p["state"] == "S");
  CHECK(p["depth"] == 0);
  // An idle sleep: its RSS can move by a page or two between the two readings, not more.
  long rss_kib = p["rss"].get<long>() / 1024;
  INFO("monitor " << rss_kib << " KiB, ps " << ps_rss << " KiB");
  CHECK(std::labs(rss_kib - ps_rss) <= 64);
  CHECK(p["threads"] == ps_threads);
  // PSS and USS are parts of RSS; an idle process has used next to no CPU.
  CHECK(p["pss"].get<long>() <= p["rss"].get<long>());
  CHECK(p["uss"].get<long>() <= p["pss"].get<long>());
  CHECK(p["fds"].get<int>() >= 3);  // at least stdin, stdout and stderr
  CHECK(p["cpu_percent"].get<double>() >= 0);
}

TEST_CASE("6_performance/process_monitor: --pid of a tree lists every descendant under its parent",
          "[lessons][6_performance]") {
  Child shell({"/bin/sh", "-c", "sleep 30 & sleep 30 & wait"});
  // The shell starts its two sleeps soon after it starts: wait for them (a hang guard, not
  // a speed check).
  std::vector<pid_t> kids;
  for (int i = 0; i < 1000 && kids.size() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    kids = mp::children(shell.pid());
  }
  REQUIRE(kids.size() == 2);
  auto r = testing::run_lesson_json(
      "6_performance/process_monitor",
      {"--pid", std::to_string(shell.pid()), "--interval", "0.1", "--count", "2"});
  REQUIRE(r["samples"].size() == 2);
  for (const auto& s : r["samples"]) {
    INFO(s.dump());
    REQUIRE(s["processes"].size() == 3);
    CHECK(s["processes"][0]["pid"] == shell.pid());
    CHECK(s["processes"][0]["depth"] == 0);
    for (pid_t k : kids) {
      const nlohmann::json* p = find_process(s, k);
      REQUIRE(p != nullptr);
      CHECK((*p)["ppid"] == shell.pid());
      CHECK((*p)["depth"] == 1);
      CHECK((*p)["name"] == "sleep");
    }
  }
  for (pid_t k : kids) {
    auto [ps_rss, ps_threads] = ps_rss_threads(k);
    const nlohmann::json* p = find_process(r["samples"][1], k);
    REQUIRE(p != nullptr);
    CHECK(std::labs((*p)["rss"].get<long>() / 1024 - ps_rss) <= 64);
    CHECK((*p)["threads"] == ps_threads);
  }
}

TEST_CASE("6_performance/process_monitor: --pid of a process that does not exist is one line, exit 1",
          "[lessons][6_performance]") {
  pid_t dead = 0;
  {
    Child gone({"/bin/true"});
    dead = gone.pid();
  }  // reaped: the pid is free
  REQUIRE_FALSE(mp::pid_exists(dead));
  auto bin = testing::lesson_binary("6_performance/process_monitor");
  auto r = testing::run({bin, "--pid", std::to_string(dead)});
  CHECK(r.exit_code == 1);
  CHECK(r.out.empty());
  CHECK(testing::count_lines(r.err) == 1);
  CHECK_THAT(r.err, Catch::Contains("cannot watch pid " + std::to_string(dead)));
  CHECK_THAT(r.err, Catch::Contains("no such process"));
}

TEST_CASE("6_performance/process_monitor: the demo tree's processes, a zombie, then gone",
          "[lessons][6_performance]") {
  testing::adopt_orphans();
  auto r = testing::run_lesson_json("6_performance/process_monitor",
                                    {"--quick", "--count", "4"});
  CHECK(r["demo"] == true);
  CHECK(r["count"] == 4);
  const auto& samples = r["samples"];
  REQUIRE(samples.size() == 4);
  const auto& pids = r["demo_pids"];
  for (const char* n : {"cpu", "sleeper", "allocator", "threads", "parent", "grandchild", "exiting"}) {
    INFO(n);
    REQUIRE(pids.contains(n));
  }
  pid_t root = r["root"];
  // Sample 1: every child under the monitor, the grandchild under 'parent', one level down.
  const auto& first = samples[0];
  CHECK(first["processes"][0]["pid"] == root);
  for (const auto& [n, pid] : pids.items()) {
    INFO(n);
    const nlohmann::json* p = find_process(first, pid.get<pid_t>());
    REQUIRE(p != nullptr);
    CHECK((*p)["ppid"] == (n == "grandchild" ? pids["parent"] : nlohmann::json(root)));
    CHECK((*p)["depth"] == (n == "grandchild" ? 2 : 1));
  }
  CHECK(r["parents_right"] == true);
  // Facts of every sample: 4 threads, a sleeping sleeper, RSS covering what was written.
  const auto& touched = r["allocator_touched_bytes"];
  REQUIRE(touched.size() == 4);
  for (std::size_t i = 0; i < samples.size(); ++i) {
    INFO("sample " << i + 1);
    const auto* t = find_process(samples[i], pids["threads"].get<pid_t>());
    REQUIRE(t != nullptr);
    CHECK((*t)["threads"] == 4);
    const auto* sl = find_process(samples[i], pids["sleeper"].get<pid_t>());
    REQUIRE(sl != nullptr);
    CHECK((*sl)["state"] == "S");
    const auto* a = find_process(samples[i], pids["allocator"].get<pid_t>());
    REQUIRE(a != nullptr);
    CHECK((*a)["rss"].get<std::uint64_t>() >= touched[i].get<std::uint64_t>());
    CHECK(touched[i].get<std::uint64_t>() >= (i > 0 ? touched[i - 1].get<std::uint64_t>() : 1));
    // Nothing is listed as gone except 'exiting', in sample 3.
    if (i != 2) CHECK(samples[i]["gone"].empty());
  }
  // 'exiting': running, then a zombie (ended, not reaped), then gone (reaped), then absent.
  pid_t ex = pids["exiting"];
  const auto* e1 = find_process(samples[0], ex);
  REQUIRE(e1 != nullptr);
  CHECK((*e1)["state"] != "Z");
  const auto* e2 = find_process(samples[1], ex);
  REQUIRE(e2 != nullptr);
  CHECK((*e2)["state"] == "Z");
  CHECK((*e2)["rss"] == 0);
  CHECK(find_process(samples[2], ex) == nullptr);
  REQUIRE(samples[2]["gone"].size() == 1);
  CHECK(samples[2]["gone"][0]["pid"] == ex);
  CHECK(samples[2]["gone"][0]["name"] == "exiting");  // mp names the child after its Process
  CHECK(find_process(samples[3], ex) == nullptr);
  CHECK(r["exiting_state_in_2"] == "Z");
  CHECK(r["exiting_gone_in_3"] == true);
  CHECK(r["children_exit_0"] == true);
  CHECK(r["children_left"] == 0);
  CHECK(testing::no_children());
}

TEST_CASE("6_performance/process_monitor: bad options are usage errors", "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/process_monitor");
  for (std::vector<std::string> args : {std::vector<std::string>{"--pid", "0"},
                                        {"--interval", "0"},
                                        {"--count", "-1"},
                                        {"--pid", "x"}}) {
    args.insert(args.begin(), bin);
    auto r = testing::run(args);
    INFO(args[1] << " " << args[2] << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}

TEST_CASE("6_performance/memory_overhead_benchmark: copy-on-write moves pages from shared to own",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/memory_overhead_benchmark", {"--quick"});
  const std::uint64_t mib = 1024 * 1024;
  CHECK(r["mib"] == 16);
  const std::uint64_t bytes = r["buffer_bytes"];
  CHECK(bytes == 16 * mib);
  const std::uint64_t page = r["page_size"];
  REQUIRE(page > 0);
  const auto& cow = r["cow"];
  REQUIRE(cow.size() == 4);
  const std::vector<int> percents{0, 10, 50, 100};
  for (std::size_t i = 0; i < cow.size(); ++i) {
    INFO(cow[i].dump());
    CHECK(cow[i]["percent"] == percents[i]);
    std::uint64_t n = cow[i]["pages_written"];
    CHECK(n == bytes / page * static_cast<std::uint64_t>(percents[i]) / 100);
    CHECK(cow[i]["bytes_written"].get<std::uint64_t>() == n * page);
  }
  // USS: never smaller after more writes, larger by at least 90% of the bytes written
  // (each written page is now the child's own copy).
  auto uss = [&](std::size_t i) { return cow[i]["child"]["uss"].get<double>(); };
  auto pss = [&](std::size_t i) { return cow[i]["child"]["pss"].get<double>(); };
  for (std::size_t i = 1; i < cow.size(); ++i) {
    INFO(cow[i].dump());
    CHECK(uss(i) >= uss(i - 1));
    CHECK(uss(i) - uss(0) >= 0.9 * cow[i]["bytes_written"].get<double>());
  }
  // Untouched, the buffer is shared by two: the child's PSS counts half of it, its RSS all.
  const auto& zero = cow[0]["child"];
  double gap = zero["rss"].get<double>() - zero["pss"].get<double>();
  CHECK(gap >= 0.45 * static_cast<double>(bytes));
  CHECK(r["untouched_rss_minus_pss"].get<double>() == Approx(gap).margin(1));
  // Written whole, each page went from counted half to counted whole in the child's PSS.
  CHECK(pss(3) - pss(0) >= 0.4 * static_cast<double>(bytes));
  CHECK(r["uss_monotonic"] == true);
  CHECK(r["uss_growth_covers_written"] == true);
  CHECK(r["untouched_pss_halved"] == true);
}

TEST_CASE("6_performance/memory_overhead_benchmark: every start method, pool and thread reading",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/memory_overhead_benchmark",
                                    {"--quick", "--mib", "4", "--workers", "3"});
  CHECK(r["mib"] == 4);
  CHECK(r["buffer_bytes"] == 4 * 1024 * 1024);
  auto ordered = [](const nlohmann::json& m) {
    double rss = m["rss"], pss = m["pss"], uss = m["uss"];
    CHECK(uss > 0);
    CHECK(uss <= pss + 8192);
    CHECK(pss <= rss + 8192);
  };
  for (const char* m : {"fork", "spawn", "forkserver"}) {
    INFO(m);
    REQUIRE(r["idle_child"].contains(m));
    ordered(r["idle_child"][m]);
    CHECK(r["idle_child"][m]["exitcode"] == 0);
    REQUIRE(r["pool"].contains(m));
    const auto& p = r["pool"][m];
    ordered(p);
    CHECK(p["workers"] == 3);
    CHECK(p["map_right"] == true);
    CHECK(p["uss_per_worker"].get<std::uint64_t>() == p["uss"].get<std::uint64_t>() / 3);
  }
  ordered(r["parent"]);
  const auto& t = r["threads"];
  CHECK(t["count"] == 3);
  CHECK(t["threads_after"].get<int>() == t["threads_before"].get<int>() + 3);
  CHECK(t["rss_growth"].get<double>() ==
        Approx(t["rss_after"].get<double>() - t["rss_before"].get<double>()));
  CHECK(r["threads_counted"] == true);
  CHECK(r["readings_ordered"] == true);
  CHECK(r["children_ok"] == true);
}

TEST_CASE("6_performance/memory_overhead_benchmark: bad options are usage errors",
          "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/memory_overhead_benchmark");
  for (std::vector<std::string> args : {std::vector<std::string>{"--mib", "0"},
                                        {"--mib", "x"},
                                        {"--workers", "0"}}) {
    args.insert(args.begin(), bin);
    auto r = testing::run(args);
    INFO(args[1] << " " << args[2] << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}

TEST_CASE("6_performance/profiling_mp_programs: every task once, on a pool worker, inside its wall time",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/profiling_mp_programs",
                                    {"--quick", "--workers", "3", "--top", "4"});
  CHECK(r["workers"] == 3);
  CHECK(r["tasks_submitted"] == 24);
  CHECK(r["records"] == 24);
  CHECK(r["each_task_once"] == true);
  CHECK(r["workers_started"] == 3);
  CHECK(r["worker_pids"].size() == 3);
  CHECK(r["all_from_pool"] == true);
  CHECK(r["parents_right"] == true);
  CHECK(r["tasks_ordered"] == true);
  CHECK(r["working_within_wall"] == true);
  CHECK(r["children_left"] == 0);

  // Per worker: the tasks add up to those submitted, each worker a pool child, and the
  // figures consistent with their definitions.
  const auto& per = r["per_worker"];
  REQUIRE(per.size() == 3);
  std::vector<pid_t> pool = r["worker_pids"].get<std::vector<pid_t>>();
  int sum = 0;
  double working = 0;
  for (const auto& w : per) {
    INFO(w.dump());
    sum += w["tasks"].get<int>();
    CHECK(std::find(pool.begin(), pool.end(), w["pid"].get<pid_t>()) != pool.end());
    CHECK(w["ordered"] == true);
    CHECK(w["startup_ms"].get<double>() >= 0);
    double work = w["working_ms"], wall = w["wall_ms"];
    CHECK(work <= wall);
    CHECK(w["waiting_ms"].get<double>() == Approx(wall - work));
    CHECK(w["computing_ms"].get<double>() + w["sleeping_ms"].get<double>() == Approx(work));
    CHECK(w["cpu_user_s"].get<double>() >= 0);
    CHECK(w["cpu_system_s"].get<double>() >= 0);
    working += work;
  }
  CHECK(sum == 24);
  CHECK(r["busy_fraction"].get<double>() == Approx(working / (3 * r["map_ms"].get<double>())));

  // The slowest tasks, slowest first, each with its arguments and a worker's pid.
  const auto& slow = r["slowest"];
  REQUIRE(slow.size() == 4);
  double prev = 1e300;
  for (const auto& t : slow) {
    INFO(t.dump());
    double d = t["ms"];
    CHECK(d <= prev);
    prev = d;
    CHECK((t["kind"] == "compute" || t["kind"] == "sleep"));
    CHECK(t["cost_ms"].get<int>() >= 1);
    CHECK(t["end_ms"].get<double>() - t["start_ms"].get<double>() == Approx(d).margin(1e-6));
    CHECK(std::find(pool.begin(), pool.end(), t["pid"].get<pid_t>()) != pool.end());
  }

  // perf: whatever this machine allows, said, and when it works, a run measured through it.
  const auto& p = r["perf"];
  CHECK(p["skipped"] == false);
  CHECK(p["record_command"].get<std::string>().find("record -F 999 -g --inherit") !=
        std::string::npos);
  if (p["usable"] == true) {
    CHECK(p["found"] == true);
    CHECK(p["stat_exit"] == 0);
    CHECK(p["stat_child_ok"] == true);
    CHECK(p["stat_child_tasks"] == 16);
    CHECK(p["stat_counters"]["task-clock"].get<double>() > 0);
  } else {
    CHECK(!p["reason"].get<std::string>().empty());
  }
}

TEST_CASE("6_performance/profiling_mp_programs: without perf it says so and still succeeds",
          "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/profiling_mp_programs");
  auto r = testing::run({"/usr/bin/env", "PATH=/nonexistent", bin, "--quick", "--json"});
  REQUIRE(r.exit_code == 0);
  auto j = nlohmann::json::parse(r.out);
  CHECK(j["ok"] == true);
  CHECK(j["tasks_counted"] == 24);
  CHECK(j["perf"]["found"] == false);
  CHECK(j["perf"]["usable"] == false);
  CHECK(j["perf"]["reason"] == "perf is not installed");

  auto skipped = testing::run_lesson_json("6_performance/profiling_mp_programs",
                                          {"--tasks", "5", "--workers", "1", "--no-perf"});
  CHECK(skipped["perf"]["skipped"] == true);
  CHECK(skipped["tasks_counted"] == 5);
  CHECK(skipped["per_worker"].size() == 1);
  CHECK(skipped["per_worker"][0]["tasks"] == 5);
}

TEST_CASE("6_performance/profiling_mp_programs: a perf that refuses is said, and the run succeeds",
          "[lessons][6_performance]") {
  // A perf on PATH that refuses as perf does when perf_event_paranoid forbids it.
  auto dir = testing::scratch_dir("mp-fake-perf");
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(dir / "perf");
    f << "#!/bin/sh\n"
         "echo 'Error: Access to performance monitoring and observability operations is "
         "limited.' >&2\n"
         "exit 255\n";
  }
  std::filesystem::permissions(dir / "perf", std::filesystem::perms::owner_all);
  auto bin = testing::lesson_binary("6_performance/profiling_mp_programs");
  auto r = testing::run(
      {"/usr/bin/env", "PATH=" + dir.string() + ":/usr/bin:/bin", bin, "--quick", "--json"});
  std::filesystem::remove_all(dir);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto j = nlohmann::json::parse(r.out);
  CHECK(j["ok"] == true);
  CHECK(j["tasks_counted"] == 24);
  CHECK(j["perf"]["found"] == true);
  CHECK(j["perf"]["path"] == (dir / "perf").string());
  CHECK(j["perf"]["usable"] == false);
  CHECK_THAT(j["perf"]["reason"].get<std::string>(),
             Catch::Contains("exit 255") && Catch::Contains("Access to performance monitoring"));
  CHECK_FALSE(j["perf"].contains("stat_counters"));
}

TEST_CASE("6_performance/profiling_mp_programs: spawn and forkserver workers, counted the same way",
          "[lessons][6_performance]") {
  for (const char* m : {"spawn", "forkserver"}) {
    INFO(m);
    auto r = testing::run_lesson_json("6_performance/profiling_mp_programs",
                                      {"--tasks", "10", "--start-method", m, "--no-perf"});
    CHECK(r["start_method"] == m);
    CHECK(r["tasks_counted"] == 10);
    CHECK(r["each_task_once"] == true);
    CHECK(r["all_from_pool"] == true);
    CHECK(r["parents_right"] == true);
    CHECK(r["children_left"] == 0);
    // forkserver: the workers' parent is the server, one process; spawn: this process.
    const auto& parents = r["worker_parents"];
    REQUIRE(parents.size() == 1);
    for (const auto& w : r["per_worker"]) CHECK(w["ppid"] == parents[0]);
  }
}

TEST_CASE("6_performance/profiling_mp_programs: bad options are usage errors",
          "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/profiling_mp_programs");
  for (std::vector<std::string> args : {std::vector<std::string>{"--tasks", "0"},
                                        {"--workers", "0"},
                                        {"--start-method", "vfork"},
                                        {"--top", "x"}}) {
    args.insert(args.begin(), bin);
    auto r = testing::run(args);
    INFO(args[1] << " " << args[2] << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}

namespace {

// The CPUs this test may run on (its affinity), as the lesson reads its own.
std::vector<int> test_cpus() {
  cpu_set_t s;
  CPU_ZERO(&s);
  REQUIRE(::sched_getaffinity(0, sizeof s, &s) == 0);
  std::vector<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &s)) out.push_back(c);
  }
  return out;
}

// Whether `cpus` lie on two cores or more of the topology the lesson reported.
bool on_two_cores(const nlohmann::json& topology, const std::vector<int>& cpus) {
  std::set<std::size_t> cores;
  const auto& core_pus = topology["core_pus"];
  for (int c : cpus) {
    for (std::size_t i = 0; i < core_pus.size(); ++i) {
      for (const auto& p : core_pus[i]) {
        if (p == c) cores.insert(i);
      }
    }
  }
  return cores.size() >= 2 || (core_pus.empty() && cpus.size() >= 2);
}

// The checks every run of affinity_and_numa must pass, whatever the machine.
void check_affinity_report(const nlohmann::json& r, const std::vector<std::string>& kinds,
                           const std::vector<int>& allowed) {
  CHECK(r["allowed_cpus"].get<std::vector<int>>() == allowed);
  const auto& topo = r["topology"];
  CHECK(topo["packages"].get<int>() >= 1);
  CHECK(topo["numa_nodes"].get<int>() >= 1);
  CHECK(topo["cores"].get<int>() >= 1);
  CHECK(topo["pus"].get<int>() >= static_cast<int>(allowed.size()));
  CHECK(topo["nodes"].size() == topo["numa_nodes"].get<std::size_t>());

  // Pinning took effect: read back in the child, and sched_getcpu() inside the set.
  const int first = allowed.at(0);
  CHECK(r["pin_checks_ok"] == true);
  CHECK(r["pin_one_cpu"]["cpu"] == first);
  CHECK(r["pin_one_cpu"]["read_back"] == std::vector<int>{first});
  CHECK(r["pin_one_cpu"]["ran_on"] == first);
  const auto core = r["pin_core_hwloc"]["requested"].get<std::vector<int>>();
  CHECK(r["pin_core_hwloc"]["read_back"].get<std::vector<int>>() == core);
  CHECK(std::find(core.begin(), core.end(), r["pin_core_hwloc"]["ran_on"].get<int>()) != core.end());

  CHECK(r["pins_read_back_ok"] == true);
  CHECK(r["round_trips_ok"] == true);
  CHECK(r["single_cpu_seen"] == true);
  CHECK(r["children_exit_0"] == true);
  CHECK(r["children_left"] == 0);

  // The cases: different cores exactly when the allowed CPUs span two cores.
  const bool cross = on_two_cores(topo, allowed);
  bool cross_skipped = false;
  for (const auto& s : r["skipped"]) cross_skipped = cross_skipped || s["case"] == "different_cores";
  CHECK(cross_skipped == !cross);
  CHECK(r["ratio_base"] == (cross ? "different_cores" : "unpinned"));
  const int rounds = r["rounds"];
  const auto& cases = r["cases"];
  REQUIRE(cases.size() == kinds.size());
  std::size_t per_kind = 0;
  for (const auto& kind : kinds) {
    INFO(kind);
    REQUIRE(cases.contains(kind));
    const auto& k = cases[kind];
    CHECK(k.contains("same_pu"));
    CHECK(k.contains("unpinned"));
    CHECK(k.contains("different_cores") == cross);
    per_kind = k.size();
    double base = k[r["ratio_base"].get<std::string>()]["median"];
    for (const auto& [id, c] : k.items()) {
      INFO(id);
      CHECK(c["rates"].size() == static_cast<std::size_t>(rounds));
      double med = c["median"], lo = c["min"], hi = c["max"];
      CHECK(lo > 0);
      CHECK(lo <= med);
      CHECK(med <= hi);
      CHECK(c["ratio_to_base"].get<double>() == Approx(med / base));
      CHECK(c["us_per_round_trip"].get<double>() == Approx(1e6 / med));
    }
    CHECK(k["same_pu"]["requested_a"] == std::vector<int>{first});
    CHECK(k["same_pu"]["requested_b"] == std::vector<int>{first});
    for (const auto& cpu : k["same_pu"]["cpu_at_end_a"]) CHECK(cpu == first);
    for (const auto& cpu : k["same_pu"]["cpu_at_end_b"]) CHECK(cpu == first);
    CHECK(k["unpinned"]["requested_a"].get<std::vector<int>>() == allowed);
  }
  CHECK(r["runs"] == static_cast<long>(kinds.size() * per_kind) * rounds);
}

}  // namespace

TEST_CASE("6_performance/affinity_and_numa: pinning read back, every round trip answered, each case",
          "[lessons][6_performance]") {
  auto r = testing::run_lesson_json("6_performance/affinity_and_numa", {"--quick"});
  CHECK(r["via"] == "both");
  CHECK(r["round_trips"] == 3000);
  CHECK(r["rounds"] == 3);
  check_affinity_report(r, {"pipe", "queue"}, test_cpus());
  // Where the pages went is reported for each node hwloc can answer for.
  if (r["can_locate_pages"] == true) {
    CHECK(r["placement"].size() >= 1);
    for (const auto& p : r["placement"]) CHECK(p["first_touch_nodes"].size() >= 1);
  }
}

TEST_CASE("6_performance/affinity_and_numa: with one CPU allowed the cross-core case is skipped",
          "[lessons][6_performance]") {
  if (!std::filesystem::exists("/usr/bin/taskset")) {
    WARN("no /usr/bin/taskset (util-linux): cannot narrow the lesson's affinity");
    return;
  }
  const int cpu = test_cpus().back();
  auto bin = testing::lesson_binary("6_performance/affinity_and_numa");
  auto run = testing::run({"/usr/bin/taskset", "-c", std::to_string(cpu), bin, "--quick",
                           "--via", "pipe", "--rounds", "2", "--json"});
  INFO(run.err);
  REQUIRE(run.exit_code == 0);
  auto r = nlohmann::json::parse(run.out);
  CHECK(r["ok"] == true);
  CHECK(r["via"] == "pipe");
  check_affinity_report(r, {"pipe"}, {cpu});
  bool said = false;
  for (const auto& s : r["skipped"]) {
    if (s["case"] == "different_cores") {
      said = s["why"].get<std::string>().find("may use only CPU(s) " + std::to_string(cpu)) !=
             std::string::npos;
    }
  }
  CHECK(said);
}

TEST_CASE("6_performance/affinity_and_numa: bad options are usage errors",
          "[lessons][6_performance]") {
  auto bin = testing::lesson_binary("6_performance/affinity_and_numa");
  for (std::vector<std::string> args : {std::vector<std::string>{"--round-trips", "0"},
                                        {"--rounds", "0"},
                                        {"--via", "shm"}}) {
    args.insert(args.begin(), bin);
    auto r = testing::run(args);
    INFO(args[1] << " " << args[2] << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}
