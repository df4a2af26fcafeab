// bench_tools.hpp - what the chapter's benchmarks share: running another program (python3,
// gnuplot) with a time limit, the Python side of a workload, a gnuplot chart, and the
// spread of repeated runs.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace bench {

// How a program run ended: its exit status (or -signal), and what it printed on stdout and
// stderr, interleaved.
struct Ran {
  int exit_code = 0;
  std::string output;
};

// Runs argv (argv[0] a path) in a process group of its own, its stdin /dev/null. A program
// still running after `limit` is killed with its whole group (Python's own children with
// it) and that is an error. Throws std::runtime_error when it cannot start or times out.
Ran run_program(const std::vector<std::string>& argv, std::chrono::seconds limit);

// The Python interpreter: $MP_PYTHON when set (a path or a name on $PATH), otherwise python3
// on $PATH. Nothing when there is none.
std::optional<std::string> find_python();

// The folder of the Python scripts (6_performance/python in the source tree).
std::string python_dir();

// Runs `<python> -B <python_dir>/<script> <args...> --n <n>` and returns the figure of the
// JSON line it prints ({"workload", "value", "unit"}). Throws std::runtime_error (with the
// script's last line of output) when it fails, prints no figure, or reports another unit.
double run_python_workload(const std::string& python, const std::string& script,
                           const std::vector<std::string>& args, long n, const std::string& unit,
                           std::chrono::seconds limit = std::chrono::seconds(300));

// Draws DIR/<name>.png with gnuplot: writes `data` to DIR/<name>.dat and a script
// DIR/<name>.gp that sets the PNG terminal (width x height), the output file and the
// gnuplot variable `datafile` (the .dat's path), then runs `commands`, which plot from
// datafile. Returns the PNG's path; throws std::runtime_error when a file cannot be
// written or gnuplot fails (with its output).
std::filesystem::path gnuplot_png(const std::string& gnuplot, const std::filesystem::path& dir,
                                  const std::string& name, const std::string& data,
                                  const std::string& commands, int width, int height);

// A figure for a table: 12345678 -> "12.3 M", 45678 -> "45.7 k", 1234 -> "1234", 0.0291.
std::string human(double v);

// CPU-bound work that cannot be skipped: `steps` steps of a hash chain (splitmix64) from
// `seed`. Each step needs the one before, so the compiler can neither drop nor vectorise them.
std::uint64_t hash_chain(std::uint64_t seed, long steps);

// Hash-chain steps per second on this machine now: the fastest of `tries` runs of `probe`
// steps (the fastest is the one least disturbed by other programs).
double hash_chain_rate(long probe, int tries);

// The spread of repeated measurements of one figure.
struct Spread {
  double median = 0, min = 0, max = 0;
};
Spread spread_of(std::vector<double> runs);  // runs must not be empty

// Whether a figure in `unit` is a time per operation (us, ns, ms: lower is better) rather
// than a rate (msgs/s, MB/s: higher is better).
bool is_time(const std::string& unit);

// How many times the cost of `a` is the cost of `b`, for two figures in the same unit:
// a/b for times, b/a for rates. 2.0 means `a` takes twice as long as `b` for the same work.
double cost_ratio(double a, double b, const std::string& unit);

}  // namespace bench
