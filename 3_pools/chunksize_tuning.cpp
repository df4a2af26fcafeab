// chunksize_tuning.cpp - How map()'s chunksize trades per-task overhead against load balance.
//
// map() sends items to the workers in chunks. One item per chunk pays the trip to a worker
// and back for every item; bigger chunks spread that cost over many items, but a few big
// chunks can leave workers idle at the end when items take uneven time. The lesson times
// map() of tiny tasks over a range of chunksizes, including Python's default
// (len / (4 * workers), rounded up), then uneven tasks with one chunk per worker against
// the default.
//
// Usage: chunksize_tuning [--workers N] [--items N] [--out DIR] [--json]
//   $ build/3_pools/chunksize_tuning --items 20000 --out /tmp/chunks
//
// Watch for: the cost per task falls steeply from chunksize 1, then flattens out; with
// uneven tasks, one chunk per worker is slower than the default. With --out DIR the
// figures go to DIR/chunksize_tuning.dat and, when gnuplot is installed, a chart to
// DIR/chunksize_tuning.png (gnuplot-nox on Debian).
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mp/pool.hpp>
#include <numeric>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

// A tiny task: a few arithmetic steps, so that the cost of getting it to a worker shows.
std::uint32_t mix(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x45d9f3bU;
  return x ^ (x >> 16);
}

// An uneven task: the items of the last quarter wait 2 ms each (as I/O would: that does
// not depend on how busy the CPUs are), the others return at once.
int uneven(std::pair<int, int> item) {
  auto [i, n] = item;
  if (4 * i >= 3 * n) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  return i;
}

// Draws the data file with gnuplot into `png`.
void draw_chart(const std::filesystem::path& data, const std::filesystem::path& png, int workers) {
  FILE* gp = ::popen("gnuplot", "w");
  if (!gp) throw std::runtime_error("cannot start gnuplot");
  fmt::print(gp,
             "set terminal png size 800,500\nset output '{}'\nset logscale x 2\nset logscale y\n"
             "set grid\nset xlabel 'chunksize'\nset ylabel 'microseconds per task'\n"
             "set title 'mp::Pool map() of tiny tasks, {} workers'\n"
             "plot '{}' using 1:2 with linespoints lw 2 title 'per-task cost'\n",
             png.string(), workers, data.string());
  int status = ::pclose(gp);
  if (status != 0)
    throw std::runtime_error(fmt::format("cannot draw {}: gnuplot failed", png.string()));
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "How map()'s chunksize trades per-task overhead against load balance."};
  int& workers = L.add_workers(2, 64);
  int& items = L.add_items(20'000, 100, 10'000'000);
  std::string out_dir;
  L.cli().add_option("--out", out_dir, "write the table (and a gnuplot chart) into this directory");
  L.parse(argc, argv);

  return L.run([&] {
    mp::Pool pool{workers};
    std::vector<std::uint32_t> input(static_cast<std::size_t>(items));
    std::iota(input.begin(), input.end(), 0u);
    std::vector<std::uint32_t> serial;
    for (auto x : input) serial.push_back(mix(x));
    std::size_t python_default = mp::detail::default_chunksize(input.size(), workers);

    // Step 1: the same map() with chunksizes 1, 2, 4, ... and Python's default.
    L.step(fmt::format("map() of {} tiny tasks on {} workers", items, workers));
    std::vector<std::size_t> sizes;
    for (std::size_t c = 1; c <= input.size() / workers; c *= 2) sizes.push_back(c);
    sizes.push_back(python_default);
    std::sort(sizes.begin(), sizes.end());
    sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
    L.say("{:>10} {:>10} {:>12} {:>9}", "chunksize", "ms", "us per task", "vs 1");
    nlohmann::json rows = nlohmann::json::array();
    bool all_match = true;
    double first_us = 0;
    for (std::size_t c : sizes) {
      pool.map(mix, std::vector<std::uint32_t>(64, 1u), 1);  // warm: workers awake
      auto t0 = std::chrono::steady_clock::now();
      auto got = pool.map(mix, input, c);
      double ms = lesson::seconds_since(t0) * 1000;
      all_match = all_match && got == serial;
      double us = ms * 1000 / items;
      if (c == 1) first_us = us;
      L.say("{:>10} {:>10.2f} {:>12.3f} {:>8.1f}x{}", c, ms, us, first_us / us,
            c == python_default ? "   <- Python's default" : "");
      rows.push_back({{"chunksize", c}, {"ms", ms}, {"us_per_task", us}});
    }

    // Step 2: uneven tasks - big chunks hand the slow end of the list to one worker.
    int n_uneven = std::min(items, 160);
    std::vector<std::pair<int, int>> heavy;
    std::vector<int> heavy_ids;
    for (int i = 0; i < n_uneven; ++i) {
      heavy.emplace_back(i, n_uneven);
      heavy_ids.push_back(i);
    }
    std::size_t one_per_worker = (heavy.size() + workers - 1) / workers;
    std::size_t uneven_default = mp::detail::default_chunksize(heavy.size(), workers);
    L.step(
        fmt::format("{} uneven tasks: the last quarter wait 2 ms each, the rest none", n_uneven));
    nlohmann::json balance = nlohmann::json::object();
    for (std::size_t c : {one_per_worker, uneven_default, std::size_t{1}}) {
      auto t0 = std::chrono::steady_clock::now();
      bool ok = pool.map(uneven, heavy, c) == heavy_ids;
      double ms = lesson::seconds_since(t0) * 1000;
      all_match = all_match && ok;
      L.say("  chunksize {:>4}: {:8.1f} ms{}", c, ms,
            c == one_per_worker   ? "  (one chunk per worker)"
            : c == uneven_default ? "  (default)"
                                  : "");
      balance[std::to_string(c)] = ms;
    }
    pool.close();
    pool.join();

    // Step 3: the figures to a file, and a chart if gnuplot is there.
    std::string data_file, chart;
    bool gnuplot = lesson::find_program("gnuplot").has_value();
    if (!out_dir.empty()) {
      std::filesystem::path dir(out_dir);
      std::filesystem::create_directories(dir);
      auto data = dir / "chunksize_tuning.dat";
      std::ofstream f(data);
      f << "# chunksize  us_per_task  ms  (" << items << " tasks, " << workers << " workers)\n";
      for (const auto& r : rows) {
        f << r["chunksize"].get<std::size_t>() << ' ' << r["us_per_task"].get<double>() << ' '
          << r["ms"].get<double>() << '\n';
      }
      f.close();
      if (!f) throw std::runtime_error(fmt::format("cannot write {}", data.string()));
      data_file = data.string();
      L.say("\nwrote {}", data_file);
      if (gnuplot) {
        draw_chart(data, dir / "chunksize_tuning.png", workers);
        chart = (dir / "chunksize_tuning.png").string();
        L.say("wrote {}", chart);
      } else {
        L.say("gnuplot is not installed: no chart (apt install gnuplot-nox); the data is in {}",
              data_file);
      }
    }

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("python_default_chunksize", python_default);
    L.fact("rows", rows);
    L.fact("uneven_ms_by_chunksize", balance);
    L.fact("results_match", all_match);
    L.fact("gnuplot_found", gnuplot);
    L.fact("data_file", data_file);
    L.fact("chart", chart);
    return all_match;
  });
}
