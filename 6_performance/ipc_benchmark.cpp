// ipc_benchmark.cpp - What mp costs per process, message and lock, beside raw syscalls and Python.
//
// Each workload of the chapter README's table runs through mp, then by hand with bare system calls,
// atomics and memcpy (the raw floor: the job written plainly, without mp's guarantees),
// and with --compare-python through Python's multiprocessing (the scripts in
// 6_performance/python), the three taking turns so that they meet the same load. After one warm-up
// round, each runs --repeat times: the table gives the median (± half the range between min and
// max) and two cost ratios. On a shared, noisy machine the ratios within one run mean more than any
// absolute figure.
//
// Usage: ipc_benchmark [--quick] [--filter REGEX] [--repeat N] [--compare-python] [--out DIR]
//   $ build-release/6_performance/ipc_benchmark --compare-python --out build/bench
//   $ build-release/6_performance/ipc_benchmark --filter 'queue_.*' --json
//
// Watch for: mp/raw near 1 for bulk data (each side copies every byte once) and python/mp
// in the tens to hundreds for small messages and tasks, where Python pickles, wakes a
// feeder thread and sleeps in the kernel for every item. Build with the release preset.
#include <fmt/chrono.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mp/process.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_tools.hpp"
#include "ipc_manager.hpp"
#include "ipc_mp.hpp"
#include "ipc_pool.hpp"
#include "ipc_raw.hpp"
#include "ipc_start.hpp"
#include "lesson.hpp"

namespace {

// A size for a full run and for a --quick one (also the size of the warm-up round).
struct Size {
  long full, quick;
};

// A workload: its id, unit, what it does, how to run it through mp and by hand (each takes
// its size and returns one figure in `unit`, throwing when the work went wrong), and its
// Python script with arguments and sizes (Python needs smaller sizes for the same time).
struct Workload {
  const char* id;
  const char* unit;
  const char* what;
  Size n;
  std::function<double(long)> run_mp;
  std::function<double(long)> run_raw;
  const char* py_script;
  std::vector<std::string> py_args;
  Size py_n;
};

// Every workload, in table order. To add one: a row here, its functions beside the others
// (ipc_mp.cpp, ipc_raw.cpp...) and a script in python/.
std::vector<Workload> all_workloads() {
  auto start = [](const char* m) { return [m](long n) { return with_start::start_join(m, n); }; };
  auto shm_raw = [](long mib) { return raw::shm_fill(static_cast<std::size_t>(mib) << 20); };
  // clang-format off
  return {
    {"start_fork", "us", "start + join of a process with an empty target, fork; raw: fork + waitpid",
     {400, 20}, start("fork"), raw_start::fork_wait, "start_method.py", {"fork"}, {100, 10}},
    {"start_spawn", "us", "the same, spawn; raw: posix_spawn of the same binary + waitpid",
     {100, 5}, start("spawn"), raw_start::spawn_self, "start_method.py", {"spawn"}, {10, 2}},
    {"start_forkserver", "us", "the same, forkserver; raw: a hand-written fork server",
     {400, 20}, start("forkserver"), raw_start::fork_server, "start_method.py", {"forkserver"}, {40, 5}},
    {"pool_map_chunk1", "us", "Pool(2).map(identity, 0..N, chunksize=1), per task; raw: a message per task over pipes",
     {200'000, 2'000}, with_pool::map_chunk1, raw_pool::pipe_tasks, "pool_map.py", {"chunk1"}, {10'000, 500}},
    {"pool_map_auto", "us", "the same map, Python's default chunksize; raw: the same chunks over pipes",
     {2'000'000, 20'000}, with_pool::map_auto, raw_pool::pipe_chunks, "pool_map.py", {"auto"}, {1'000'000, 20'000}},
    {"apply_async", "us", "N x Pool(2).apply_async(identity, i), then get() each; raw: as pool_map_chunk1",
     {100'000, 2'000}, with_pool::apply_async, raw_pool::pipe_tasks, "apply_async.py", {}, {5'000, 300}},
    {"queue_small", "msgs/s", "64-byte messages, 1 producer -> 1 consumer process; raw: SPSC ring",
     {2'000'000, 50'000}, with_mp::queue_small, raw::spsc_small, "queue_small.py", {}, {100'000, 5'000}},
    {"queue_1mib", "MB/s", "1 MiB messages, 1 producer -> 1 consumer process; raw: memcpy",
     {2000, 40}, with_mp::queue_1mib, raw::memcpy_bandwidth, "queue_1mib.py", {}, {400, 20}},
    {"pipe_small", "msgs/s", "64-byte messages over Pipe(false); raw: pipe(2)",
     {500'000, 20'000}, with_mp::pipe_small, raw::pipe_small, "pipe_small.py", {}, {100'000, 5'000}},
    {"pipe_1mib", "MB/s", "1 MiB messages over Pipe(false); raw: pipe(2)",
     {1000, 40}, with_mp::pipe_1mib, raw::pipe_bulk, "pipe_1mib.py", {}, {400, 20}},
    {"pipe_rtt", "us", "1-byte round trip over two Pipe(false); raw: two pipe(2)",
     {10'000, 500}, with_mp::pipe_rtt, raw::pipe_rtt, "pipe_rtt.py", {}, {5'000, 200}},
    {"value_locked_inc", "ns", "2 processes x N increments of a Value<int64_t> under get_lock(); raw: a robust pthread mutex",
     {1'000'000, 20'000}, with_mp::value_locked_inc, raw::locked_inc, "value_locked_inc.py", {}, {200'000, 5'000}},
    {"manager_dict_set", "us", "N x d.set(i % 64, i) through a Manager dict proxy; raw: a socket round trip to a hand-written server",
     {100'000, 2'000}, with_manager::dict_set, raw_manager::socket_dict_set, "manager_dict_set.py", {}, {10'000, 300}},
    {"shm_fill", "MB/s", "create a 256 MiB SharedMemory and write it; raw: shared anonymous mmap",
     {256, 16}, with_mp::shm_fill, shm_raw, "shm_fill.py", {}, {256, 16}},
  };
  // clang-format on
}

// A median with its spread: "12.3 M ±4%" (half the range between min and max).
std::string with_spread(const bench::Spread& s) {
  double half = (s.max - s.min) / 2 / s.median * 100;
  return fmt::format("{} ±{:.0f}%", bench::human(s.median), half);
}

nlohmann::json to_json(const bench::Spread& s) {
  return {{"median", s.median}, {"min", s.min}, {"max", s.max}};
}

// One workload's result.
struct Row {
  const Workload* w;
  bench::Spread mp, raw;
  std::optional<bench::Spread> py;
  std::string py_error;  // why there is no Python figure, when it was asked for
  double mp_over_raw = 0;
  std::optional<double> py_over_mp;
};

// Runs one workload: a warm-up round at the quick size (not counted), then `repeat`
// rounds of mp, raw and Python (when `python` is given) in turn.
Row measure(const Workload& w, long n, long py_n, int repeat,
            const std::optional<std::string>& python) {
  Row row{&w, {}, {}, {}, {}, 0, {}};
  std::vector<double> mine, floor, py;
  bool py_on = python.has_value();
  auto try_py = [&](long size, bool keep) {
    if (!py_on) return;
    try {
      double v = bench::run_python_workload(*python, w.py_script, w.py_args, size, w.unit);
      if (keep) py.push_back(v);
    } catch (const std::exception& e) {
      row.py_error = e.what();
      py_on = false;  // one failure is enough: no more Python runs for this workload
    }
  };
  w.run_mp(w.n.quick);
  w.run_raw(w.n.quick);
  try_py(w.py_n.quick, false);
  for (int i = 0; i < repeat; ++i) {
    mine.push_back(w.run_mp(n));
    floor.push_back(w.run_raw(n));
    try_py(py_n, true);
  }
  row.mp = bench::spread_of(mine);
  row.raw = bench::spread_of(floor);
  row.mp_over_raw = bench::cost_ratio(row.mp.median, row.raw.median, w.unit);
  if (row.py_error.empty() && !py.empty()) {
    row.py = bench::spread_of(py);
    row.py_over_mp = bench::cost_ratio(row.py->median, row.mp.median, w.unit);
  }
  return row;
}

std::string or_empty(const std::optional<double>& v) { return v ? fmt::format("{:.6g}", *v) : ""; }

// DIR/ipc_benchmark.csv: one line per workload, every figure.
std::filesystem::path write_csv(const std::filesystem::path& dir, const std::vector<Row>& rows) {
  auto path = dir / "ipc_benchmark.csv";
  std::ofstream out(path);
  out << "workload,unit,mp_median,mp_min,mp_max,raw_median,raw_min,raw_max,"
         "python_median,python_min,python_max,mp_over_raw,python_over_mp\n";
  for (const auto& r : rows) {
    auto p = [&](double bench::Spread::*f) {
      return r.py ? std::optional<double>((*r.py).*f) : std::nullopt;
    };
    out << fmt::format("{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{},{},{},{:.4g},{}\n",
                       r.w->id, r.w->unit, r.mp.median, r.mp.min, r.mp.max, r.raw.median, r.raw.min,
                       r.raw.max, or_empty(p(&bench::Spread::median)),
                       or_empty(p(&bench::Spread::min)), or_empty(p(&bench::Spread::max)),
                       r.mp_over_raw, or_empty(r.py_over_mp));
  }
  out.close();
  if (!out) throw std::runtime_error(fmt::format("cannot write {}", path.string()));
  return path;
}

// DIR/ipc_benchmark.png, drawn by gnuplot from DIR/ipc_benchmark.dat: the python/mp
// speedup per workload on a log scale above, mp/raw below.
std::filesystem::path draw_chart(const std::filesystem::path& dir, const std::vector<Row>& rows,
                                 const std::string& gnuplot, const std::string& title) {
  std::string data = "# workload mp_over_raw python_over_mp (NaN: not measured)\n";
  for (const auto& r : rows) {
    data += fmt::format("{} {:.4g} {}\n", r.w->id, r.mp_over_raw,
                        r.py_over_mp ? fmt::format("{:.4g}", *r.py_over_mp) : "NaN");
  }
  // Two panels when there are Python figures, else the mp/raw one alone.
  bool with_python =
      std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.py_over_mp; });
  auto panel = [&](int column, const char* name, const char* colour, const char* heading) {
    return fmt::format(
        "set title \"{heading}\"\n"
        "plot datafile using {c}:xtic(1) title '{name}' lc rgb '{colour}', "
        "'' using 0:{c}:(sprintf('%.3g', ${c})) with labels offset 0,0.7 notitle, "
        "1 with lines dt 2 lc rgb 'black' notitle\n",
        fmt::arg("heading", heading), fmt::arg("c", column), fmt::arg("name", name),
        fmt::arg("colour", colour));
  };
  std::string commands = fmt::format(
      "set style data histograms\n"
      "set style histogram clustered gap 1\n"
      "set style fill solid 0.8 border -1\n"
      "set boxwidth 0.8\n"
      "set logscale y\n"
      "set grid ytics\n"
      "set key top left\n"
      "set xtics rotate by -35 scale 0 font ',9'\n"
      "set bmargin 6\n"
      "set multiplot layout {panels},1 title '{title}'\n",
      fmt::arg("panels", with_python ? 2 : 1), fmt::arg("title", title));
  if (with_python) {
    commands += panel(3, "python/mp", "#2b6ca3",
                      "Python's cost / mp's: how many times faster mp is (log scale)");
  }
  commands += panel(2, "mp/raw", "#c8642d",
                    "mp's cost / the raw floor's: 1 = as fast as bare system calls (log scale)");
  commands += "unset multiplot\n";
  return bench::gnuplot_png(gnuplot, dir, "ipc_benchmark", data, commands, 1000,
                            with_python ? 900 : 480);
}

}  // namespace

int main(int argc, char** argv) {
  // The raw floor of start_spawn re-executes this binary, which then exits at once.
  if (argc == 2 && argv[1] == raw_start::kExitAtOnce) return 0;

  lesson::Lesson L{MP_LESSON_ID,
                   "What mp costs per process, message and lock, beside raw syscalls and "
                   "Python."};
  bool quick = false, compare_python = false;
  std::string filter = ".*", out_dir;
  int repeat = 5;
  L.cli().add_flag("--quick", quick, "small sizes, 3 runs each: a smoke test, not a measurement");
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
  auto* repeat_opt =
      L.cli()
          .add_option("--repeat", repeat, "measured runs per figure (after a warm-up)")
          ->check(CLI::Range(1, 50))
          ->capture_default_str();
  L.cli().add_flag("--compare-python", compare_python,
                   "also run each workload in Python's multiprocessing (python3, or $MP_PYTHON)");
  L.cli().add_option("--out", out_dir, "write ipc_benchmark.csv and a gnuplot chart here");
  L.parse(argc, argv);
  if (quick && repeat_opt->count() == 0) repeat = 3;

  return L.run([&] {
    // Step 1: what will run, and whether Python is there to compare with.
    std::optional<std::string> python;
    if (compare_python) {
      python = bench::find_python();
      if (!python) {
        L.say("python3 was not found (on $PATH, or $MP_PYTHON): the python column stays empty.");
      }
    }
    L.say(
        "{} cores. Each figure is the median of {} run(s) after a warm-up, ± half the range "
        "from min to max;\nmp, raw{} take turns{}.\n",
        mp::cpu_count(), repeat, python ? " and python" : "",
        quick ? " (--quick: small sizes, a smoke test rather than a measurement)" : "");

    // Step 2: every chosen workload, one row each as it finishes.
    std::regex re(filter);
    L.say("{:<17} {:>13} {:>13} {:>13}  {:<6} {:>7} {:>9}", "workload", "mp", "raw", "python",
          "unit", "mp/raw", "python/mp");
    const std::vector<Workload> workloads = all_workloads();  // the rows point into it
    std::vector<Row> rows;
    nlohmann::json results = nlohmann::json::object();
    bool python_failed = false;
    for (const auto& w : workloads) {
      if (!std::regex_search(w.id, re)) continue;
      long n = quick ? w.n.quick : w.n.full, py_n = quick ? w.py_n.quick : w.py_n.full;
      Row r = measure(w, n, py_n, repeat, python);
      L.say("{:<17} {:>13} {:>13} {:>13}  {:<6} {:>7.2f} {:>9}", w.id, with_spread(r.mp),
            with_spread(r.raw), r.py ? with_spread(*r.py) : (r.py_error.empty() ? "-" : "failed"),
            w.unit, r.mp_over_raw, r.py_over_mp ? fmt::format("{:.1f}", *r.py_over_mp) : "-");
      nlohmann::json j = {
          {"unit", w.unit},      {"what", w.what},        {"n", n},
          {"mp", to_json(r.mp)}, {"raw", to_json(r.raw)}, {"mp_over_raw", r.mp_over_raw}};
      j["python"] = r.py ? to_json(*r.py) : nlohmann::json(nullptr);
      j["python_over_mp"] = r.py_over_mp ? nlohmann::json(*r.py_over_mp) : nlohmann::json(nullptr);
      if (python) j["python_n"] = py_n;
      if (!r.py_error.empty()) {
        j["python_error"] = r.py_error;
        python_failed = true;
      }
      results[w.id] = j;
      rows.push_back(std::move(r));
    }

    // Step 3: how to read it, and where mp is furthest from the floor.
    L.say(
        "\nmp/raw: how many times the raw floor's cost mp pays for the same work (time per "
        "message, per task...);\n        1.00 is as fast as bare system calls, more is "
        "slower, less means mp beat a naive floor.\npython/mp: how many times mp's cost "
        "Python's multiprocessing pays: how many times faster mp is.");
    for (const auto& r : rows) {
      if (!r.py_error.empty()) L.say("python side of {} failed: {}", r.w->id, r.py_error);
    }
    std::vector<const Row*> by_gap;
    for (const auto& r : rows) by_gap.push_back(&r);
    std::sort(by_gap.begin(), by_gap.end(),
              [](const Row* a, const Row* b) { return a->mp_over_raw > b->mp_over_raw; });
    nlohmann::json furthest = nlohmann::json::array();
    for (std::size_t i = 0; i < std::min<std::size_t>(3, by_gap.size()); ++i) {
      furthest.push_back(by_gap[i]->w->id);
    }
    if (!by_gap.empty()) {
      L.say("Furthest from the floor in this run: {}.", fmt::join(furthest, ", "));
    }
    L.say("\nThe workloads:");
    for (const auto& r : rows) L.say("  {:<17} {}", r.w->id, r.w->what);

    // Step 4: with --out, the CSV and the chart.
    std::string csv, png;
    if (!out_dir.empty()) {
      std::filesystem::path dir{out_dir};
      std::error_code ec;
      std::filesystem::create_directories(dir, ec);
      if (ec) throw std::runtime_error(fmt::format("cannot create {}: {}", out_dir, ec.message()));
      csv = write_csv(dir, rows).string();
      L.say("\nwrote {}", csv);
      if (auto gnuplot = lesson::find_program("gnuplot")) {
        std::string title = fmt::format("mp-playground ipc_benchmark, {:%Y-%m-%d}, {} cores{}",
                                        fmt::localtime(std::time(nullptr)), mp::cpu_count(),
                                        quick ? " (--quick)" : "");
        png = draw_chart(dir, rows, *gnuplot, title).string();
        L.say("wrote {}", png);
      } else {
        L.say("gnuplot is not installed (Debian: gnuplot-nox): no chart, the CSV has it all.");
      }
    }

    L.fact("quick", quick);
    L.fact("repeat", repeat);
    L.fact("cores", mp::cpu_count());
    L.fact("python", python ? nlohmann::json(*python) : nlohmann::json(nullptr));
    L.fact("furthest_from_raw", furthest);
    L.fact("workloads", results);
    L.fact("csv", csv);
    L.fact("chart", png);
    return !results.empty() && !python_failed;
  });
}
