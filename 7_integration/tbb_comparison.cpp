// tbb_comparison.cpp - The same word count with oneTBB threads, with mp::Pool processes and
// serially: time, memory, a crash.
//
// Dask runs a task graph on threads or on processes; in C++ the thread side is oneTBB. One
// job - count the words of a text - four ways: serially; with tbb::parallel_reduce (threads
// that share the text and merge their partial counts in memory); with mp::Pool.map over
// pieces of the text (each piece is copied to a worker and each partial count copied back);
// and with mp::Pool over a text in shared memory (only offsets go out, counts come back).
// All four must agree exactly. Then one piece crashes its worker: under TBB the whole
// process dies with it, under mp::Pool that piece fails and the rest of the count survives.
//
// Usage: tbb_comparison [--workers N] [--input PATH] [--repeat N] [--json]
//   $ build/7_integration/tbb_comparison --workers 4 --repeat 20
//
// Watch for: TBB is the fastest parallel run and needs the least memory (nothing is copied);
// the pool pays for copying pieces and counts between processes, less when the text is
// shared; the crash takes down the TBB run but only one piece of the pool's.
#include <fmt/ranges.h>
#include <signal.h>
#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/parallel_reduce.h>
#include <unistd.h>

#include <chrono>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "lesson.hpp"
#include "proc_status.hpp"
#include "wordcount.hpp"

namespace {

using wordcount::Counts;
using Pieces = std::vector<std::pair<std::size_t, std::size_t>>;

// The text, `repeat` times: a bigger job from the same words.
std::string load_text(const std::string& input, int repeat) {
  wordcount::Text t = wordcount::read_input(input);
  std::string text;
  text.reserve(t.bytes.size() * static_cast<std::size_t>(repeat));
  for (int i = 0; i < repeat; ++i) text += t.bytes;
  return text;
}

// Threads: each task counts a range of pieces into its own map; parallel_reduce merges
// the maps pairwise. Every thread reads the one text in place.
Counts count_with_tbb(std::string_view text, const Pieces& pieces, int crash_piece = -1) {
  return tbb::parallel_reduce(
      tbb::blocked_range<std::size_t>(0, pieces.size()), Counts{},
      [&](const tbb::blocked_range<std::size_t>& r, Counts acc) {
        for (std::size_t i = r.begin(); i != r.end(); ++i) {
          if (static_cast<int>(i) == crash_piece) ::raise(SIGKILL);  // one bad piece
          wordcount::count_into(text.substr(pieces[i].first, pieces[i].second - pieces[i].first),
                                acc);
        }
        return acc;
      },
      [](Counts a, const Counts& b) {
        wordcount::merge_into(b, a);
        return a;
      });
}

// Processes, the text copied: a task gets its piece as a string, returns its counts.
Counts count_piece(const std::string& piece) { return wordcount::count(piece); }

// Processes, the text shared: each worker maps it once (the pool's initializer), tasks get
// offsets only.
std::optional<mp::RawArray<char>> g_shared_text;
void attach_text(mp::RawArray<char> text) { g_shared_text = std::move(text); }
Counts count_shared(std::size_t begin, std::size_t end) {
  return wordcount::count(std::string_view(g_shared_text->data() + begin, end - begin));
}

// A piece that kills its worker, for the crash.
Counts count_or_die(std::pair<std::string, bool> piece) {
  if (piece.second) ::raise(SIGKILL);
  return wordcount::count(piece.first);
}

// The crash under TBB, in a child of its own so that this lesson survives it: a fresh
// program (spawn) that reads the text and runs the TBB count with one bad piece.
int tbb_run_that_crashes(std::string input, int repeat, int workers, int crash_piece) {
  std::string text = load_text(input, repeat);
  tbb::global_control threads(tbb::global_control::max_allowed_parallelism,
                              static_cast<std::size_t>(workers));
  Pieces pieces = wordcount::split(text, static_cast<std::size_t>(workers) * 4);
  Counts c = count_with_tbb(text, pieces, crash_piece);
  return c.empty() ? 1 : 0;
}

// One way's figures.
struct Run {
  explicit Run(std::string n) : name(std::move(n)) {}
  std::string name;
  double seconds = 0;
  double parent_mib = 0;              // the peak growth of this process's memory
  std::optional<double> workers_mib;  // the workers' PSS at the end (pool runs)
  bool equal = false;
};

// The growth of this process's peak memory while `job` runs, in MiB.
template <class Job>
double peak_growth_mib(Job&& job) {
  pid_t me = ::getpid();
  double before = static_cast<double>(proc_status::field(me, "VmRSS")) / 1024.0;
  proc_status::reset_peak_rss(me);
  job();
  return proc_status::peak_rss_mib(me) - before;
}

double workers_pss_mib(const mp::Pool& pool) {
  double sum = 0;
  for (pid_t pid : pool.worker_pids()) sum += proc_status::pss_mib(pid);
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "The same word count with oneTBB threads, with mp::Pool processes and "
                   "serially: time, memory, a crash."};
  int& workers = L.add_workers(2, 256);
  std::string input = wordcount::kDefaultInput;
  int repeat = 8;
  L.cli()
      .add_option("--input", input, "a file, or a folder read recursively")
      ->capture_default_str();
  L.cli()
      .add_option("--repeat", repeat, "count the text this many times over (a bigger job)")
      ->check(CLI::Range(1, 10'000))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    std::string text = load_text(input, repeat);
    auto n_pieces = static_cast<std::size_t>(workers) * 4;
    Pieces pieces = wordcount::split(text, n_pieces);
    L.say("{} bytes ({} x {}), {} pieces, {} threads or processes", text.size(), repeat, input,
          pieces.size(), workers);
    std::vector<Run> runs;

    // Step 1: the reference, one thread.
    L.step("serially");
    Counts serial;
    Run s{"serial"};
    auto t0 = std::chrono::steady_clock::now();
    s.parent_mib = peak_growth_mib([&] { serial = wordcount::count(text); });
    s.seconds = lesson::seconds_since(t0);
    s.equal = true;
    L.say("{:.3f} s: {} words, {} distinct", s.seconds, wordcount::total(serial), serial.size());
    runs.push_back(s);

    // Step 2: threads. They share the text; their partial maps merge in memory.
    L.step("oneTBB: parallel_reduce on threads");
    tbb::global_control threads(tbb::global_control::max_allowed_parallelism,
                                static_cast<std::size_t>(workers));
    Run t{"tbb threads"};
    Counts by_tbb;
    t0 = std::chrono::steady_clock::now();
    t.parent_mib = peak_growth_mib([&] { by_tbb = count_with_tbb(text, pieces); });
    t.seconds = lesson::seconds_since(t0);
    t.equal = by_tbb == serial;
    L.say("{:.3f} s; equal to the serial count: {}", t.seconds, t.equal);
    runs.push_back(t);

    // Step 3: processes, each piece copied to a worker and each count copied back.
    L.step("mp::Pool: pieces sent to the workers");
    auto p0 = std::chrono::steady_clock::now();
    std::optional<mp::Pool> pool{std::in_place, workers};
    double pool_start = lesson::seconds_since(p0);
    std::vector<std::string> piece_texts;
    for (auto [b, e] : pieces) piece_texts.emplace_back(text.substr(b, e - b));
    Run c{"mp::Pool, pieces copied"};
    Counts by_pool;
    t0 = std::chrono::steady_clock::now();
    c.parent_mib = peak_growth_mib([&] {
      for (const Counts& part : pool->map(count_piece, piece_texts, 1))
        wordcount::merge_into(part, by_pool);
    });
    c.seconds = lesson::seconds_since(t0);
    c.workers_mib = workers_pss_mib(*pool);
    c.equal = by_pool == serial;
    pool.reset();
    L.say("{:.3f} s (and {:.3f} s to start the pool); equal to the serial count: {}", c.seconds,
          pool_start, c.equal);
    runs.push_back(c);

    // Step 4: processes over one text in shared memory: only offsets travel out.
    L.step("mp::Pool: the text in shared memory, offsets sent");
    mp::RawArray<char> shared{std::span<const char>(text.data(), text.size())};
    pool.emplace(workers, mp::Initializer{attach_text, shared});
    Run m{"mp::Pool, text shared"};
    Counts by_shared;
    t0 = std::chrono::steady_clock::now();
    m.parent_mib = peak_growth_mib([&] {
      for (const Counts& part : pool->starmap(count_shared, pieces, 1))
        wordcount::merge_into(part, by_shared);
    });
    m.seconds = lesson::seconds_since(t0);
    m.workers_mib = workers_pss_mib(*pool);
    m.equal = by_shared == serial;
    L.say("{:.3f} s; equal to the serial count: {}", m.seconds, m.equal);
    runs.push_back(m);

    // The table.
    L.step("side by side");
    L.say("  {:<26} {:>9} {:>8} {:>13} {:>13}  {}", "", "seconds", "speedup", "this process",
          "workers (PSS)", "equal");
    nlohmann::json table = nlohmann::json::array();
    for (const Run& r : runs) {
      L.say("  {:<26} {:>9.3f} {:>7.2f}x {:>9.1f} MiB {:>13}  {}", r.name, r.seconds,
            s.seconds / r.seconds, r.parent_mib,
            r.workers_mib ? fmt::format("{:.1f} MiB", *r.workers_mib) : "-", r.equal);
      nlohmann::json row = {{"name", r.name},
                            {"seconds", r.seconds},
                            {"speedup", s.seconds / r.seconds},
                            {"parent_peak_growth_mib", r.parent_mib},
                            {"equal", r.equal}};
      if (r.workers_mib) row["workers_pss_mib"] = *r.workers_mib;
      table.push_back(row);
    }

    // Step 5: one piece kills the process that counts it.
    std::size_t bad = pieces.size() / 2;
    L.step(fmt::format("piece {} of {} crashes the process that counts it", bad, pieces.size()));
    std::vector<std::pair<std::string, bool>> marked;
    for (std::size_t i = 0; i < pieces.size(); ++i) marked.emplace_back(piece_texts[i], i == bad);
    Counts survived;
    std::size_t counted = 0, lost = 0;
    std::string lost_what;
    auto it = pool->imap(count_or_die, marked);
    for (;;) {
      try {
        auto part = it.next();
        if (!part) break;
        wordcount::merge_into(*part, survived);
        ++counted;
      } catch (const mp::WorkerLostError& e) {
        ++lost;
        lost_what = e.what();
      }
    }
    // What survived plus the lost piece counted again must be the whole count.
    Counts patched = survived;
    wordcount::count_into(piece_texts[bad], patched);
    bool pool_kept_the_rest = lost == 1 && counted == pieces.size() - 1 && patched == serial;
    L.say(
        "mp::Pool: {} pieces counted, {} lost ({}); with the lost piece counted again, the "
        "whole: {}",
        counted, lost, lost_what, patched == serial);
    mp::Process tbb_child{mp::get_context("spawn"), tbb_run_that_crashes, input, repeat, workers,
                          static_cast<int>(bad)};
    tbb_child.start();
    tbb_child.join();
    int tbb_exit = *tbb_child.exitcode();
    L.say("oneTBB (in a child of its own): the process {}; every thread's partial count is gone",
          mp::describe_exitcode(tbb_exit));
    pool->close();
    pool->join();

    bool all_equal = t.equal && c.equal && m.equal;
    L.fact("workers", workers);
    L.fact("bytes", text.size());
    L.fact("repeat", repeat);
    L.fact("pieces", pieces.size());
    L.fact("total_words", wordcount::total(serial));
    L.fact("distinct_words", serial.size());
    L.fact("runs", table);
    L.fact("all_equal_serial", all_equal);
    L.fact("pool_start_seconds", pool_start);
    L.fact("crash_pool_pieces_counted", counted);
    L.fact("crash_pool_pieces_lost", lost);
    L.fact("crash_pool_rest_intact", pool_kept_the_rest);
    L.fact("crash_tbb_exitcode", tbb_exit);
    return all_equal && pool_kept_the_rest && tbb_exit == -SIGKILL;
  });
}
