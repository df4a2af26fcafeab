// cpu_vs_io_bound.cpp - CPU-bound vs I/O-bound work on pools and threads: speed-up, efficiency,
// Amdahl.
//
// The same tasks run serially, then on mp::Pool's of 1, 2, 4 and 2 x cores processes, then
// on as many threads for contrast. A CPU-bound task computes (a hash chain, calibrated here
// to take about --cpu-ms); an I/O-bound task blocks in read() on a timerfd for --wait-ms, a
// real wait in the kernel that uses no CPU. Each row gives the speed-up (serial time / this
// time) and the efficiency (speed-up / workers); Amdahl's law, S(p) = 1 / (f + (1-f)/p),
// is fitted to the CPU-bound pool rows, with p capped at the core count, to give the
// serial fraction f those rows imply.
//
// Usage: cpu_vs_io_bound [--quick] [--cpu-ms MS] [--wait-ms MS] [--rounds N] [--out DIR] [--json]
//   $ build-release/6_performance/cpu_vs_io_bound --out build/bench
//
// Watch for: CPU-bound speed-up stops at the core count (more workers only share the same
// cores), and on a machine other programs use it stops below; I/O-bound speed-up keeps
// growing with workers, past the core count, because a waiting process needs no core.
// Threads and processes do the same here: C++ has no interpreter lock to make threads
// useless for CPU work, so processes pay only their start-up and the copies of messages.
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <mp/error.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench_tools.hpp"
#include "lesson.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// The CPU-bound task: `iterations` steps of a hash chain (bench_tools.hpp).
std::uint64_t cpu_task(std::uint64_t seed, long iterations) {
  return bench::hash_chain(seed, iterations);
}

// The I/O-bound task: one blocking read() of a timerfd that fires after `wait_us`, the
// way a process waits for a disk, a socket or a pipe. The answer depends on the task only.
std::uint64_t io_task(std::uint64_t index, long wait_us) {
  int fd = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
  if (fd == -1) mp::throw_errno("create a timerfd");
  itimerspec when{};
  when.it_value.tv_sec = wait_us / 1'000'000;
  when.it_value.tv_nsec = (wait_us % 1'000'000) * 1000;
  if (::timerfd_settime(fd, 0, &when, nullptr) == -1) {
    int e = errno;
    ::close(fd);
    errno = e;
    mp::throw_errno("arm a timerfd");
  }
  std::uint64_t expirations = 0;
  ssize_t n;
  do {
    n = ::read(fd, &expirations, sizeof expirations);
  } while (n == -1 && errno == EINTR);
  int e = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(sizeof expirations)) {
    errno = n == -1 ? e : EIO;
    mp::throw_errno("read a timerfd");
  }
  return index * 1000 + expirations;  // expirations is 1: the timer fired once
}

using Task = std::uint64_t (*)(std::uint64_t, long);
using Args = std::vector<std::tuple<std::uint64_t, long>>;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The tasks one after another in this process.
std::vector<std::uint64_t> run_serial(Task f, const Args& args) {
  std::vector<std::uint64_t> out;
  for (const auto& [a, b] : args) out.push_back(f(a, b));
  return out;
}

// The tasks on `n` threads of this process, each taking the next task when it is free.
std::vector<std::uint64_t> run_threads(Task f, const Args& args, int n) {
  std::vector<std::uint64_t> out(args.size());
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&] {
      for (std::size_t i; (i = next.fetch_add(1)) < args.size();) {
        out[i] = f(std::get<0>(args[i]), std::get<1>(args[i]));
      }
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

struct Row {
  std::string kind;  // "cpu" or "io"
  std::string how;   // "serial", "pool" or "threads"
  int workers = 1;
  double seconds = 0;
  double speedup = 1;
  double efficiency = 1;
  std::optional<double> serial_fraction;  // CPU rows: the Amdahl f this row implies
  bool equal_serial = true;
};

// Amdahl's serial fraction f that best fits (least squares on 1/S) the rows of p > 1
// effective workers: 1/S - 1/p = f (1 - 1/p). Nothing when there is no such row.
std::optional<double> amdahl_fit(const std::vector<Row>& rows, int cores) {
  double sxy = 0, sxx = 0;
  for (const Row& r : rows) {
    int p = std::min(r.workers, cores);
    if (r.kind != "cpu" || r.how != "pool" || p < 2) continue;
    double x = 1 - 1.0 / p, y = 1 / r.speedup - 1.0 / p;
    sxy += x * y;
    sxx += x * x;
  }
  if (sxx == 0) return std::nullopt;
  return sxy / sxx;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "CPU-bound vs I/O-bound work on pools and threads: speed-up, efficiency, "
                   "Amdahl."};
  bool quick = false;
  int cpu_ms = 100, wait_ms = 100, rounds = 2;
  std::string out_dir;
  L.cli().add_flag("--quick", quick, "15 ms CPU tasks and 20 ms waits: a smoke test");
  auto* cpu_opt = L.cli()
                      .add_option("--cpu-ms", cpu_ms, "about how long one CPU-bound task computes")
                      ->check(CLI::Range(1, 10'000))
                      ->capture_default_str();
  auto* wait_opt = L.cli()
                       .add_option("--wait-ms", wait_ms, "how long one I/O-bound task waits")
                       ->check(CLI::Range(1, 10'000))
                       ->capture_default_str();
  L.cli()
      .add_option("--rounds", rounds,
                  "tasks per worker of the largest pool (tasks = N x 2 x cores)")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  L.cli().add_option("--out", out_dir, "write cpu_vs_io_bound.png, a gnuplot chart, here");
  L.parse(argc, argv);
  if (quick && cpu_opt->count() == 0) cpu_ms = 15;
  if (quick && wait_opt->count() == 0) wait_ms = 20;

  return L.run([&] {
    // Step 1: the machine, and the workers to try: 1, 2, 4 and 2 x cores.
    const int cores = mp::cpu_count();
    std::set<int> counts{1, 2, 4, 2 * cores};
    const int most = 2 * cores > 4 ? 2 * cores : 4;
    const int tasks = rounds * most;
    double load[3] = {0, 0, 0};
    bool have_load = ::getloadavg(load, 3) == 3;
    L.say("{} cores online{}. Workers tried: {}.", cores,
          have_load ? fmt::format(", load average {:.2f} over the last minute", load[0]) : "",
          fmt::join(counts, ", "));
    L.say(
        "Other programs on this machine take their share of the cores: the CPU-bound figures\n"
        "are what this run measured, not what the machine can do at best.");

    // Step 2: calibrate the CPU-bound task to about --cpu-ms here (best of 3).
    L.step("the tasks");
    const double rate = bench::hash_chain_rate(2'000'000, 3);
    const long iterations = std::max(1000L, static_cast<long>(rate * (cpu_ms / 1000.0)));
    Args cpu_args, io_args;
    for (int i = 0; i < tasks; ++i) {
      cpu_args.emplace_back(static_cast<std::uint64_t>(i), iterations);
      io_args.emplace_back(static_cast<std::uint64_t>(i), wait_ms * 1000L);
    }
    L.say(
        "{} tasks of each kind ({} per worker of the largest pool).\n"
        "  CPU-bound: {} steps of a hash chain, about {} ms each here;\n"
        "  I/O-bound: a blocking read() of a timerfd that fires after {} ms (no CPU used).",
        tasks, rounds, iterations, cpu_ms, wait_ms);

    // Step 3: every kind, serially, then on pools and threads of each size. A pool is
    // started before the clock starts: the rows time the work, start-up is given apart.
    L.step("serial, pools and threads");
    L.say("{:<4} {:<8} {:>7} {:>10} {:>9} {:>11} {:>15}", "kind", "how", "workers", "seconds",
          "speed-up", "efficiency", "serial fraction");
    std::vector<Row> rows;
    nlohmann::json starts = nlohmann::json::object();
    bool all_equal = true;
    auto print = [&](const Row& r) {
      L.say("{:<4} {:<8} {:>7} {:>10.3f} {:>9.2f} {:>10.0f}% {:>15}{}", r.kind, r.how, r.workers,
            r.seconds, r.speedup, 100 * r.efficiency,
            r.serial_fraction ? fmt::format("{:.3f}", *r.serial_fraction) : "-",
            r.equal_serial ? "" : "  RESULTS DIFFER FROM SERIAL");
    };
    for (const char* kind : {"cpu", "io"}) {
      Task f = std::string(kind) == "cpu" ? cpu_task : io_task;
      const Args& args = std::string(kind) == "cpu" ? cpu_args : io_args;
      auto t0 = Clock::now();
      std::vector<std::uint64_t> serial = run_serial(f, args);
      Row base;
      base.kind = kind;
      base.how = "serial";
      base.seconds = seconds(Clock::now() - t0);
      rows.push_back(base);
      print(base);
      for (const char* how : {"pool", "threads"}) {
        for (int n : counts) {
          std::vector<std::uint64_t> got;
          Row r;
          r.kind = kind;
          r.how = how;
          r.workers = n;
          if (std::string(how) == "pool") {
            auto s0 = Clock::now();
            mp::Pool pool{n};
            starts[std::to_string(n)] = seconds(Clock::now() - s0);
            auto w0 = Clock::now();
            got = pool.starmap(f, args, 1);
            r.seconds = seconds(Clock::now() - w0);
            pool.close();
            pool.join();
          } else {
            auto w0 = Clock::now();
            got = run_threads(f, args, n);
            r.seconds = seconds(Clock::now() - w0);
          }
          r.speedup = base.seconds / r.seconds;
          r.efficiency = r.speedup / n;
          int p = std::min(n, cores);
          if (p > 1 && r.kind == "cpu")
            r.serial_fraction = (1 / r.speedup - 1.0 / p) / (1 - 1.0 / p);
          r.equal_serial = got == serial;
          all_equal = all_equal && r.equal_serial;
          rows.push_back(r);
          print(r);
        }
      }
    }

    // Step 4: what the rows say.
    L.step("how to read it");
    std::optional<double> f = amdahl_fit(rows, cores);
    double io_best = 0, cpu_best = 0;
    for (const Row& r : rows) {
      if (r.how == "pool" && r.kind == "io") io_best = std::max(io_best, r.speedup);
      if (r.how == "pool" && r.kind == "cpu") cpu_best = std::max(cpu_best, r.speedup);
    }
    L.say(
        "speed-up = serial seconds / these seconds; efficiency = speed-up / workers (100%: each\n"
        "worker as useful as the serial run). The serial fraction of a row is the f that\n"
        "Amdahl's S = 1/(f + (1-f)/p) gives for its speed-up with p = min(workers, cores)\n"
        "(the Karp-Flatt metric): the share of the work that behaved as if it could not be\n"
        "split, overhead and other programs' use of the cores included. It is given for the\n"
        "CPU-bound rows only: a wait is not work that cores share.");
    if (f) {
      std::string bound =
          *f >= 1   ? "more processes gained nothing in this run: other programs had the cores"
          : *f <= 0 ? "the rows scaled perfectly, so the fit sets no bound"
                    : fmt::format(
                          "no number of processes could make this run more than {:.1f} "
                          "times faster than serial",
                          1 / *f);
      L.say("Amdahl fitted to the CPU-bound pool rows: serial fraction f = {:.3f};\n{}.", *f,
            bound);
    } else {
      L.say("One core: no row with more than one effective worker, so no Amdahl fit.");
    }
    L.say(
        "CPU-bound: best pool speed-up {:.2f} with {} cores. I/O-bound: best pool speed-up "
        "{:.2f},\n{} the core count ({}): a worker that waits holds no core, so {} waits overlap.",
        cpu_best, cores, io_best, io_best > cores ? "above" : "NOT above", cores, most);
    std::vector<std::string> start_text;
    for (const auto& [n, s] : starts.items()) {
      start_text.push_back(fmt::format("{} in {:.1f} ms", n, 1000 * s.get<double>()));
    }
    L.say("Pools started (not counted in the rows): {}.", fmt::join(start_text, ", "));

    // Step 5: with --out, the chart.
    std::string png;
    if (!out_dir.empty()) {
      std::filesystem::path dir{out_dir};
      std::error_code ec;
      std::filesystem::create_directories(dir, ec);
      if (ec) throw std::runtime_error(fmt::format("cannot create {}: {}", out_dir, ec.message()));
      if (auto gnuplot = lesson::find_program("gnuplot")) {
        std::string data = "# workers cpu_pool cpu_threads io_pool io_threads\n";
        for (int n : counts) {
          auto speed = [&](const char* kind, const char* how) {
            for (const Row& r : rows) {
              if (r.kind == kind && r.how == how && r.workers == n) return r.speedup;
            }
            return 0.0;
          };
          data += fmt::format("{} {:.4g} {:.4g} {:.4g} {:.4g}\n", n, speed("cpu", "pool"),
                              speed("cpu", "threads"), speed("io", "pool"), speed("io", "threads"));
        }
        std::string commands = fmt::format(
            "set title 'cpu_vs_io_bound, {:%Y-%m-%d}, {} cores: speed-up over serial'\n"
            "set xlabel 'workers'\nset ylabel 'speed-up'\n"
            "set logscale x 2\nset grid\nset key top left\n"
            "set xrange [0.8:{}]\nset yrange [0:*]\n"
            "plot datafile using 1:4 with linespoints lw 2 title 'I/O-bound, pool', "
            "'' using 1:5 with linespoints dt 2 title 'I/O-bound, threads', "
            "'' using 1:2 with linespoints lw 2 title 'CPU-bound, pool', "
            "'' using 1:3 with linespoints dt 2 title 'CPU-bound, threads', "
            "x with lines lc rgb 'gray' title 'ideal', "
            "{} with lines dt 3 lc rgb 'black' title 'speed-up = cores'\n",
            fmt::localtime(std::time(nullptr)), cores, most * 1.25, cores);
        png =
            bench::gnuplot_png(*gnuplot, dir, "cpu_vs_io_bound", data, commands, 900, 600).string();
        L.say("wrote {}", png);
      } else {
        L.say("gnuplot is not installed (Debian: gnuplot-nox): no chart.");
      }
    }

    nlohmann::json jrows = nlohmann::json::array();
    for (const Row& r : rows) {
      jrows.push_back({{"kind", r.kind},
                       {"how", r.how},
                       {"workers", r.workers},
                       {"seconds", r.seconds},
                       {"speedup", r.speedup},
                       {"efficiency", r.efficiency},
                       {"serial_fraction", r.serial_fraction ? nlohmann::json(*r.serial_fraction)
                                                             : nlohmann::json(nullptr)},
                       {"equal_serial", r.equal_serial}});
    }
    L.fact("cores", cores);
    L.fact("workers", counts);
    L.fact("tasks", tasks);
    L.fact("cpu_ms", cpu_ms);
    L.fact("wait_ms", wait_ms);
    L.fact("iterations", iterations);
    L.fact("rows", jrows);
    L.fact("pool_start_seconds", starts);
    L.fact("amdahl_serial_fraction", f ? nlohmann::json(*f) : nlohmann::json(nullptr));
    L.fact("results_equal_serial", all_equal);
    L.fact("io_best_speedup", io_best);
    L.fact("io_speedup_exceeds_cores", io_best > cores);
    L.fact("chart", png);
    return all_equal && io_best > cores;
  });
}
