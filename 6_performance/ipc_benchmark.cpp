// ipc_benchmark.cpp - How fast mp moves data between processes, beside the same work done by hand.
//
// Each workload runs twice in the same run: through mp (Queue, Pipe, Value, SharedMemory:
// ipc_mp.cpp) and by hand with raw system calls, atomics and memcpy (ipc_raw.cpp), the
// floor mp cannot beat. The
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

#include <functional>
#include <nlohmann/json.hpp>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ipc_manager.hpp"
#include "ipc_mp.hpp"
#include "ipc_pool.hpp"
#include "ipc_raw.hpp"
#include "lesson.hpp"

namespace {

// A workload: its id, unit, what it does, its size (messages, rounds, MiB...) in a full and
// a --quick run, and how to run it through mp and by hand. Each run returns one figure in
// `unit` and throws when the work went wrong (a lost or damaged message).
struct Workload {
  const char* id;
  const char* unit;
  const char* what;
  struct {
    long full, quick;
  } n;
  std::function<double(long)> run_mp;
  std::function<double(long)> run_raw;
};

// Every workload, in table order. To add one: a row here, its functions in ipc_mp.cpp and
// ipc_raw.cpp.
std::vector<Workload> all_workloads() {
  auto shm_raw = [](long mib) { return raw::shm_fill(static_cast<std::size_t>(mib) << 20); };
  // clang-format off
  return {
    {"pool_map_chunk1", "us", "Pool(2).map(identity, 0..N, chunksize=1), per task; raw: a message per task over pipes",
     {200'000, 2'000}, with_pool::map_chunk1, raw_pool::pipe_tasks},
    {"pool_map_auto", "us", "the same map, Python's default chunksize; raw: the same chunks over pipes",
     {2'000'000, 20'000}, with_pool::map_auto, raw_pool::pipe_chunks},
    {"apply_async", "us", "N x Pool(2).apply_async(identity, i), then get() each; raw: as pool_map_chunk1",
     {100'000, 2'000}, with_pool::apply_async, raw_pool::pipe_tasks},
    {"queue_small", "msgs/s", "64-byte messages, 1 producer -> 1 consumer process; raw: SPSC ring",
     {2'000'000, 50'000}, with_mp::queue_small, raw::spsc_small},
    {"queue_1mib", "MB/s", "1 MiB messages, 1 producer -> 1 consumer process; raw: memcpy",
     {2000, 40}, with_mp::queue_1mib, raw::memcpy_bandwidth},
    {"pipe_small", "msgs/s", "64-byte messages over Pipe(false); raw: pipe(2)",
     {500'000, 20'000}, with_mp::pipe_small, raw::pipe_small},
    {"pipe_1mib", "MB/s", "1 MiB messages over Pipe(false); raw: pipe(2)",
     {1000, 40}, with_mp::pipe_1mib, raw::pipe_bulk},
    {"pipe_rtt", "us", "1-byte round trip over two Pipe(false); raw: two pipe(2)",
     {10'000, 500}, with_mp::pipe_rtt, raw::pipe_rtt},
    {"value_locked_inc", "ns", "2 processes x N increments of a Value<int64_t> under get_lock()",
     {1'000'000, 20'000}, with_mp::value_locked_inc, raw::locked_inc},
    {"manager_dict_set", "us", "N x d.set(i % 64, i) through a Manager dict proxy; raw: a socket round trip to a hand-written server",
     {100'000, 2'000}, with_manager::dict_set, raw_manager::socket_dict_set},
    {"shm_fill", "MB/s", "create a 256 MiB SharedMemory and write it; raw: shared anonymous mmap",
     {256, 16}, with_mp::shm_fill, shm_raw},
  };
  // clang-format on
}

// 12345678 -> "12.3 M".
std::string human(double v) {
  if (v >= 1e9) return fmt::format("{:.3g} G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.3g} M", v / 1e6);
  if (v >= 1e4) return fmt::format("{:.3g} k", v / 1e3);
  if (v >= 100) return fmt::format("{:.0f}", v);
  return fmt::format("{:.3g}", v);
}

// Runs mp and raw alternately, `repeat` times each, so that both meet the same load; the
// best figure of each counts (for times per operation, us and ns, the lowest).
std::pair<double, double> best_of(int repeat, const Workload& w, long n) {
  bool lower = w.unit[0] == 'u' || w.unit[0] == 'n';
  auto better = [&](double a, double b) { return lower ? std::min(a, b) : std::max(a, b); };
  double mine = w.run_mp(n), floor = w.run_raw(n);
  for (int i = 1; i < repeat; ++i) {
    mine = better(mine, w.run_mp(n));
    floor = better(floor, w.run_raw(n));
  }
  return {mine, floor};
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "How fast mp moves data between processes, beside the same work done by hand."};
  bool quick = false;
  std::string filter = ".*";
  int repeat = 3;
  L.cli().add_flag("--quick", quick, "small sizes, one run each: a smoke test");
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
  if (quick) repeat = 1;

  return L.run([&] {
    std::regex re(filter);
    nlohmann::json results = nlohmann::json::object();
    L.say("Each figure is the best of {} run(s), mp and raw taking turns{}.\n", repeat,
          quick ? " (--quick: small sizes, a smoke test rather than a measurement)" : "");
    L.say("{:<17} {:>9} {:>9}  {:<6} {:>6}   {}", "workload", "mp", "raw", "unit", "mp/raw",
          "what");
    for (const auto& w : all_workloads()) {
      if (!std::regex_search(w.id, re)) continue;
      auto [mine, floor] = best_of(repeat, w, quick ? w.n.quick : w.n.full);
      double ratio = mine / floor;
      L.say("{:<17} {:>9} {:>9}  {:<6} {:>6.2f}   {}", w.id, human(mine), human(floor), w.unit,
            ratio, w.what);
      results[w.id] = {
          {"value", mine}, {"unit", w.unit}, {"raw_value", floor}, {"ratio_to_raw", ratio}};
    }
    L.say(
        "\nmp/raw: for rates (msgs/s, MB/s) 1.00 is as fast as the raw floor and less is "
        "slower;\nfor times (us, ns per operation) 1.00 is as fast and more is slower.");
    L.fact("quick", quick);
    L.fact("repeat", repeat);
    L.fact("workloads", results);
    return !results.empty();
  });
}
