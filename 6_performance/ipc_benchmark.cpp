// ipc_benchmark.cpp - How fast mp moves data between processes, beside the same work done by hand.
//
// Each workload runs twice in the same run: through mp (Queue, SharedMemory...) and by hand
// with raw system calls, atomics and memcpy (ipc_raw.cpp), the floor mp cannot beat. The
// table shows both figures and their ratio; on a shared, noisy machine the ratio within
// one run means more than either absolute figure. Each figure is the best of --repeat runs.
//
// Usage: ipc_benchmark [--quick] [--filter REGEX] [--repeat N] [--json]
//   $ build-release/6_performance/ipc_benchmark
//   $ build-release/6_performance/ipc_benchmark --filter 'queue_.*' --json
//
// Watch for: queue_small in millions of messages per second, a fair fraction of the
// hand-written ring that has none of the queue's guarantees (many producers and consumers,
// crash safety, sleeping instead of spinning); queue_1mib near memcpy's bandwidth, since
// each side copies every byte once. Build with the release preset for real figures.
#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <nlohmann/json.hpp>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ipc_raw.hpp"
#include "lesson.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Params {
  bool quick = false;
  long scale(long full, long quick_n) const { return quick ? quick_n : full; }
};

// A workload: its id, unit, what it does, and how to run it through mp and by hand. Each
// run returns one figure in `unit` and throws when the work went wrong (a lost message).
struct Workload {
  const char* id;
  const char* unit;
  const char* what;
  std::function<double(const Params&)> run_mp;
  std::function<double(const Params&)> run_raw;
};

// ---- mp side ---------------------------------------------------------------------------

void put_small(mp::Queue<raw::Small> q, long n) {
  raw::Small m{};
  for (long i = 0; i < n; ++i) {
    m.seq = static_cast<std::uint64_t>(i);
    q.put(m);
  }
}

double queue_small(const Params& p) {
  long n = p.scale(2'000'000, 50'000);
  mp::Queue<raw::Small> q;
  mp::Process producer{put_small, q, n};
  producer.start();
  Clock::time_point t0;
  bool in_order = true;
  for (long i = 0; i < n; ++i) {
    in_order = in_order && q.get().seq == static_cast<std::uint64_t>(i);
    if (i == 0) t0 = Clock::now();  // the clock starts at the first message
  }
  double s = lesson::seconds_since(t0);
  producer.join();
  if (!in_order || producer.exitcode() != 0) throw std::runtime_error("queue_small went wrong");
  return static_cast<double>(n - 1) / s;
}

constexpr std::size_t kMiB = 1u << 20;

void put_big(mp::Queue<std::vector<char>> q, long n) {
  std::vector<char> block(kMiB, 'x');
  for (long i = 0; i < n; ++i) {
    block.front() = block.back() = static_cast<char>(i);
    q.put(block);
  }
}

double queue_1mib(const Params& p) {
  long n = p.scale(2000, 40);
  mp::Queue<std::vector<char>> q;  // the default 4 MiB ring: three messages in flight
  mp::Process producer{put_big, q, n};
  producer.start();
  Clock::time_point t0;
  bool whole = true;
  for (long i = 0; i < n; ++i) {
    std::vector<char> v = q.get();
    whole = whole && v.size() == kMiB && v.front() == static_cast<char>(i) &&
            v.back() == static_cast<char>(i);
    if (i == 0) t0 = Clock::now();
  }
  double s = lesson::seconds_since(t0);
  producer.join();
  if (!whole || producer.exitcode() != 0) throw std::runtime_error("queue_1mib went wrong");
  return static_cast<double>(n - 1) * kMiB / s / 1e6;
}

// Every workload, in table order. To add one: a row here, its mp and raw functions above.
std::vector<Workload> all_workloads() {
  return {
      {"queue_small", "msgs/s", "64-byte messages, 1 producer -> 1 consumer process", queue_small,
       [](const Params& p) { return raw::spsc_small(p.scale(2'000'000, 50'000)); }},
      {"queue_1mib", "MB/s", "1 MiB messages, 1 producer -> 1 consumer; raw: memcpy", queue_1mib,
       [](const Params& p) { return raw::memcpy_bandwidth(p.scale(2000, 40)); }},
  };
}

// 12345678 -> "12.3 M".
std::string human(double v) {
  if (v >= 1e9) return fmt::format("{:.3g} G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.3g} M", v / 1e6);
  if (v >= 1e4) return fmt::format("{:.3g} k", v / 1e3);
  return fmt::format("{:.3g}", v);
}

// Runs mp and raw alternately, `repeat` times each, so that both meet the same load; the
// best figure of each counts (for "lower is better" units, the lowest).
std::pair<double, double> best_of(int repeat, const Workload& w, const Params& p) {
  bool lower = w.unit[0] == 'u' || w.unit[0] == 'n';  // us/..., ns/...
  auto better = [&](double a, double b) { return lower ? std::min(a, b) : std::max(a, b); };
  double mine = w.run_mp(p), floor = w.run_raw(p);
  for (int i = 1; i < repeat; ++i) {
    mine = better(mine, w.run_mp(p));
    floor = better(floor, w.run_raw(p));
  }
  return {mine, floor};
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "How fast mp moves data between processes, beside the same work done by hand."};
  Params params;
  std::string filter = ".*";
  int repeat = 3;
  L.cli().add_flag("--quick", params.quick, "small sizes, one run each: a smoke test");
  L.cli()
      .add_option("--filter", filter, "only workloads whose id matches this regex")
      ->check([](const std::string& f) -> std::string {
        try {
          std::regex re(f);
          for (const auto& w : all_workloads()) {
            if (std::regex_search(w.id, re)) return "";
          }
          return "no workload matches '" + f + "'";
        } catch (const std::regex_error& e) {
          return "not a regex: " + f;
        }
      });
  L.cli()
      .add_option("--repeat", repeat, "runs per figure; the best counts")
      ->check(CLI::Range(1, 20));
  L.parse(argc, argv);
  if (params.quick) repeat = 1;

  return L.run([&] {
    std::regex re(filter);
    nlohmann::json results = nlohmann::json::object();
    L.say("{:<13} {:>10} {:>10}  {:<7} {:>6}   {}", "workload", "mp", "raw", "unit", "mp/raw",
          "what");
    for (const auto& w : all_workloads()) {
      if (!std::regex_search(w.id, re)) continue;
      auto [mine, floor] = best_of(repeat, w, params);
      double ratio = mine / floor;
      L.say("{:<13} {:>10} {:>10}  {:<7} {:>6.2f}   {}", w.id, human(mine), human(floor), w.unit,
            ratio, w.what);
      results[w.id] = {
          {"value", mine}, {"unit", w.unit}, {"raw_value", floor}, {"ratio_to_raw", ratio}};
    }
    L.fact("quick", params.quick);
    L.fact("repeat", repeat);
    L.fact("workloads", results);
    return !results.empty();
  });
}
