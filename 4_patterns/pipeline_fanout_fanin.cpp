// pipeline_fanout_fanin.cpp - Stages of processes: fan-out to K, fan-in to one, end markers, order.
//
// Stage 1 reads the lines of a text, stage 2 (K processes, the fan-out) counts the words of
// each line, stage 3 (one process, the fan-in) folds the results into one output. Bounded
// queues join the stages, so a fast stage waits for a slow one instead of piling up work.
// End of stream is passed down: the reader puts one end marker per transform worker, each
// worker passes one on when it gets its own, and the aggregator ends after it has counted
// K of them - so every stage ends by itself, however many processes it has. K workers
// finish items out of order; with --ordered the aggregator puts them back in sequence
// (a reorder buffer) and the output equals the serial pipeline's, result for result. The
// lesson measures each stage's CPU per item, samples the depth of each queue, and names the
// slowest stage: the one the items wait for.
//
// Usage: pipeline_fanout_fanin [--workers K] [--items N] [--ordered] [--input PATH]
//                              [--slow read|transform|aggregate] [--cost-us N]
//                              [--maxsize N] [--json]
//   $ build/4_patterns/pipeline_fanout_fanin --workers 3 --ordered
//
// Watch for: with one transform worker the output is in order by itself; with K it is not,
// unless --ordered; the queue in front of the slow stage is full most of the time and the
// one behind it nearly empty; K transform workers raise the throughput until the cores run
// out; --slow read makes more workers useless.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mp/shared_memory.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "lesson.hpp"
#include "wordcount.hpp"

namespace {

using Clock = std::chrono::steady_clock;

enum Stage : int { kRead, kTransform, kAggregate };
constexpr const char* kStageNames[] = {"read", "transform", "aggregate"};

// A line on its way from stage 1 to stage 2, or an end marker.
struct Line {
  std::uint64_t seq = 0;
  bool end = false;
  std::string text;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(seq, end, text);
  }
};

// What stage 2 makes of a line, or an end marker (which then carries how many lines the
// worker transformed).
struct Result {
  std::uint64_t seq = 0;
  bool end = false;
  std::uint64_t words = 0;
  std::uint64_t hash = 0;  // of the line's words and their counts
};

// The output of stage 3.
struct Output {
  std::uint64_t items = 0, words = 0;
  std::uint64_t digest = 14695981039346656037ull;  // depends on the order of the results
  std::uint64_t multiset = 0;                      // does not
  std::uint64_t out_of_order = 0;  // results that arrived before one with a lower number
  std::uint64_t max_buffered = 0;  // the reorder buffer's high-water mark
  std::uint64_t end_markers = 0, marker_items = 0;  // markers counted; lines they reported
};

// What each stage process measured; one row per process.
struct StageStats {
  std::uint64_t items = 0;
  std::uint64_t cpu_ns = 0;                 // CPU spent on the items (not waiting)
  std::uint64_t first_ns = 0, last_ns = 0;  // steady clock: the first and last item
};

// The work a stage does per item beyond its own: --cost-us of CPU, in one stage.
struct Cost {
  int stage = kTransform;
  int us = 0;
};

std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::uint64_t thread_cpu_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::uint64_t(ts.tv_sec) * 1'000'000'000u + std::uint64_t(ts.tv_nsec);
}

std::uint64_t now_ns() {
  return std::uint64_t(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
          .count());
}

// Burns `us` microseconds of CPU: the stand-in for an expensive step (a parse, a filter).
void burn(const Cost& cost, Stage stage) {
  if (cost.stage != stage || cost.us == 0) return;
  std::uint64_t until = thread_cpu_ns() + std::uint64_t(cost.us) * 1000u;
  while (thread_cpu_ns() < until) {
  }
}

// The lines of the text, at most `limit` of them (a file's last line may lack its '\n').
std::vector<std::string_view> lines_of(std::string_view text, std::uint64_t limit) {
  std::vector<std::string_view> lines;
  std::size_t at = 0;
  while (at < text.size() && lines.size() < limit) {
    std::size_t nl = std::min(text.find('\n', at), text.size());
    lines.push_back(text.substr(at, nl - at));
    at = nl + 1;
  }
  return lines;
}

// Stage 2's work, the same in the pipeline and in the serial run.
Result transform(std::uint64_t seq, std::string_view line) {
  wordcount::Counts counts = wordcount::count(line);
  Result r{seq, false, 0, 0};
  for (const auto& [word, n] : counts) {
    std::uint64_t h = 14695981039346656037ull;
    for (char c : word) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    r.hash += mix(h + n);  // a sum: the same whatever order the map has
    r.words += n;
  }
  return r;
}

// Stage 3's work: one result into the output, in the order given.
void fold(Output& out, const Result& r) {
  for (std::uint64_t v : {r.seq, r.words, r.hash}) out.digest = (out.digest ^ v) * 1099511628211ull;
  out.multiset += mix(r.seq ^ mix(r.words ^ mix(r.hash)));
  out.words += r.words;
  ++out.items;
}

// Measures one item's work into a stage's row.
template <class F>
void measured(StageStats& s, F&& work) {
  std::uint64_t c0 = thread_cpu_ns();
  work();
  s.cpu_ns += thread_cpu_ns() - c0;
  std::uint64_t t = now_ns();
  if (s.items++ == 0) s.first_ns = t;
  s.last_ns = t;
}

// Shared results: a stats row per process, and the aggregator's output.
struct Board {
  Board() = default;  // for cereal
  explicit Board(int rows) : stats(std::size_t(rows)) {}
  mp::RawArray<StageStats> stats;
  mp::RawValue<Output> output;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(stats, output);
  }
};

// ---- the stages ----------------------------------------------------------------------------

// Stage 1: reads the input, puts its lines in order, then one end marker per worker.
void read_stage(mp::Queue<Line> out, Board b, std::string path, std::uint64_t limit, int workers,
                Cost cost) {
  wordcount::Text text = wordcount::read_input(path);
  StageStats s;
  for (std::string_view line : lines_of(text.bytes, limit)) {
    Line item;
    measured(s, [&] {
      item.seq = s.items;
      item.text.assign(line);
      burn(cost, kRead);
    });
    out.put(item);
  }
  for (int k = 0; k < workers; ++k) out.put(Line{0, true, {}});
  b.stats[0] = s;
}

// Stage 2, one of K: transforms lines until its end marker, then passes one on.
void transform_stage(mp::Queue<Line> in, mp::Queue<Result> out, Board b, int row, Cost cost) {
  StageStats s;
  for (;;) {
    Line item = in.get();
    if (item.end) break;
    Result r;
    measured(s, [&] {
      r = transform(item.seq, item.text);
      burn(cost, kTransform);
    });
    out.put(r);
  }
  out.put(Result{0, true, s.items, 0});  // "I am done, after this many"
  b.stats[std::size_t(row)] = s;
}

// Stage 3: folds results until it has counted one end marker per worker. Ordered, it holds
// early results back until every lower number has been folded.
void aggregate_stage(mp::Queue<Result> in, Board b, int row, int workers, bool ordered, Cost cost) {
  StageStats s;
  Output out;
  std::map<std::uint64_t, Result> waiting;  // the reorder buffer
  std::uint64_t next = 0, highest_seen = 0;
  bool any = false;
  while (out.end_markers < std::uint64_t(workers)) {
    Result r = in.get();
    if (r.end) {
      ++out.end_markers;
      out.marker_items += r.words;
      continue;
    }
    measured(s, [&] {
      if (any && r.seq < highest_seen) ++out.out_of_order;
      highest_seen = std::max(highest_seen, r.seq);
      any = true;
      if (!ordered) {
        fold(out, r);
      } else {
        waiting.emplace(r.seq, r);
        out.max_buffered = std::max<std::uint64_t>(out.max_buffered, waiting.size());
        for (auto it = waiting.begin(); it != waiting.end() && it->first == next;
             it = waiting.erase(it), ++next) {
          fold(out, it->second);
        }
      }
      burn(cost, kAggregate);
    });
  }
  for (auto& [seq, r] : waiting) fold(out, r);  // none are left when nothing was lost
  b.stats[std::size_t(row)] = s;
  b.output.set(out);
}

// ---- one run -------------------------------------------------------------------------------

struct Depth {
  double mean = 0, full = 0;  // mean depth; fraction of samples at maxsize
  std::size_t max = 0;
};

struct StageReport {
  int processes = 0;
  std::uint64_t items = 0;
  double cpu_us_per_item = 0;  // CPU per item, in one process
  double capacity = 0;         // items/s the stage could do if never kept waiting
  double throughput = 0;       // items/s it did, first item to last
};

struct RunReport {
  Output out;
  double seconds = 0;
  Depth depth[2];  // in front of transform, in front of aggregate
  StageReport stage[3];
  int slowest = kRead;
  int waits_before = kRead;  // the stage in front of whose queue items wait most
  bool clean_exit = true;
};

RunReport run_pipeline(const std::string& path, std::uint64_t limit, int workers, bool ordered,
                       std::size_t maxsize, Cost cost) {
  mp::Queue<Line> lines(maxsize);
  mp::Queue<Result> results(maxsize);
  Board b(workers + 2);
  RunReport rep;
  auto start = Clock::now();

  // Start the stages from the end, so that each one's consumer is already there.
  mp::Process aggregator{aggregate_stage, results, b, workers + 1, workers, ordered, cost};
  aggregator.start();
  std::vector<mp::Process> transformers;
  for (int k = 0; k < workers; ++k) {
    transformers.emplace_back(transform_stage, lines, results, b, k + 1, cost);
    transformers.back().start();
  }
  mp::Process reader{read_stage, lines, b, path, limit, workers, cost};
  reader.start();

  // Sample the queues' depths until the last stage is done. A stage that fails would leave
  // the ones after it waiting for markers that never come: stop at once instead (leaving
  // this function by an exception terminates the other stages).
  auto failed = [](mp::Process& p) { return !p.is_alive() && p.exitcode() != 0; };
  std::uint64_t samples = 0, sum[2] = {0, 0}, full[2] = {0, 0};
  while (aggregator.is_alive()) {
    if (failed(reader) || std::any_of(transformers.begin(), transformers.end(), failed)) {
      throw std::runtime_error("cannot run the pipeline: a stage failed (see its error above)");
    }
    std::size_t d[2] = {lines.qsize(), results.qsize()};
    ++samples;
    for (int q = 0; q < 2; ++q) {
      sum[q] += d[q];
      full[q] += d[q] >= maxsize;
      rep.depth[q].max = std::max(rep.depth[q].max, d[q]);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  aggregator.join();
  reader.join();
  for (auto& t : transformers) t.join();
  rep.seconds = lesson::seconds_since(start);
  rep.clean_exit = aggregator.exitcode() == 0 && reader.exitcode() == 0;
  for (auto& t : transformers) rep.clean_exit = rep.clean_exit && t.exitcode() == 0;
  for (int q = 0; q < 2; ++q) {
    rep.depth[q].mean = samples ? double(sum[q]) / double(samples) : 0;
    rep.depth[q].full = samples ? double(full[q]) / double(samples) : 0;
  }
  rep.out = b.output.value();

  // Per stage: the rows of its processes.
  int first_row[3] = {0, 1, workers + 1}, rows[3] = {1, workers, 1};
  for (int st = 0; st < 3; ++st) {
    StageReport& r = rep.stage[st];
    std::uint64_t cpu = 0, first = UINT64_MAX, last = 0;
    r.processes = rows[st];
    for (int i = first_row[st]; i < first_row[st] + rows[st]; ++i) {
      const StageStats& s = b.stats[std::size_t(i)];
      r.items += s.items;
      cpu += s.cpu_ns;
      if (s.items) first = std::min(first, s.first_ns), last = std::max(last, s.last_ns);
    }
    r.cpu_us_per_item = r.items ? double(cpu) / 1e3 / double(r.items) : 0;
    r.capacity = cpu ? double(r.items) * rows[st] / (double(cpu) * 1e-9) : 0;
    r.throughput = last > first ? double(r.items) / (double(last - first) * 1e-9) : 0;
  }
  for (int st = 1; st < 3; ++st) {
    if (rep.stage[st].capacity < rep.stage[rep.slowest].capacity) rep.slowest = st;
  }
  // Items wait in the queue in front of the slow stage; when both queues are nearly empty,
  // the others are waiting for the reader.
  if (std::max(rep.depth[0].mean, rep.depth[1].mean) < 1.0) {
    rep.waits_before = kRead;
  } else {
    rep.waits_before = rep.depth[1].mean > rep.depth[0].mean ? kAggregate : kTransform;
  }
  return rep;
}

nlohmann::json facts_of(const RunReport& r) {
  nlohmann::json stages = nlohmann::json::object();
  for (int st = 0; st < 3; ++st) {
    const StageReport& s = r.stage[st];
    stages[kStageNames[st]] = {{"processes", s.processes},
                               {"items", s.items},
                               {"cpu_us_per_item", s.cpu_us_per_item},
                               {"capacity_per_s", s.capacity},
                               {"throughput_per_s", s.throughput}};
  }
  return {{"seconds", r.seconds},
          {"items", r.out.items},
          {"words", r.out.words},
          {"out_of_order", r.out.out_of_order},
          {"max_buffered", r.out.max_buffered},
          {"end_markers", r.out.end_markers},
          {"marker_items", r.out.marker_items},
          {"stages", stages},
          {"depth_before_transform",
           {{"mean", r.depth[0].mean}, {"max", r.depth[0].max}, {"full", r.depth[0].full}}},
          {"depth_before_aggregate",
           {{"mean", r.depth[1].mean}, {"max", r.depth[1].max}, {"full", r.depth[1].full}}},
          {"slowest_stage", kStageNames[r.slowest]},
          {"items_wait_before", kStageNames[r.waits_before]},
          {"clean_exit", r.clean_exit}};
}

void tell(const lesson::Lesson& L, const RunReport& r, std::size_t maxsize) {
  for (int st = 0; st < 3; ++st) {
    const StageReport& s = r.stage[st];
    L.say("  {:<9} x{:<2} {:>6} items  {:>8.1f} us CPU each  could do {:>9.0f}/s  did {:>9.0f}/s",
          kStageNames[st], s.processes, s.items, s.cpu_us_per_item, s.capacity, s.throughput);
  }
  L.say("  queue -> transform: mean depth {:.1f} of {}, full {:.0f}% of the time", r.depth[0].mean,
        maxsize, 100 * r.depth[0].full);
  L.say("  queue -> aggregate: mean depth {:.1f} of {}, full {:.0f}% of the time", r.depth[1].mean,
        maxsize, 100 * r.depth[1].full);
  L.say("  {} lines in {:.3f} s ({:.0f}/s); the slowest stage: {}; {} end markers counted",
        r.out.items, r.seconds, double(r.out.items) / r.seconds, kStageNames[r.slowest],
        r.out.end_markers);
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Stages of processes: fan-out to K, fan-in to one, end markers, order."};
  int& workers = L.add_workers(3, 64);
  int& items = L.add_items(3'000, 1, 10'000'000);
  bool ordered = false;
  std::string input = wordcount::kDefaultInput;
  std::string slow = "transform";
  int cost_us = 100, maxsize = 32;
  auto& cli = L.cli();
  cli.add_flag("--ordered", ordered, "restore the input order at the fan-in");
  cli.add_option("--input", input, "a text file, or a folder read recursively")
      ->check(CLI::ExistingPath)
      ->capture_default_str();
  cli.add_option("--slow", slow, "the stage that does --cost-us of extra work per item")
      ->check(CLI::IsMember({"read", "transform", "aggregate"}))
      ->capture_default_str();
  cli.add_option("--cost-us", cost_us, "microseconds of CPU the slow stage adds per item")
      ->check(CLI::Range(0, 100'000))
      ->capture_default_str();
  cli.add_option("--maxsize", maxsize, "the bound of each queue between stages")
      ->check(CLI::Range(1, 100'000))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    Cost cost{int(std::find(std::begin(kStageNames), std::end(kStageNames), slow) -
                  std::begin(kStageNames)),
              cost_us};
    const auto limit = std::uint64_t(items);
    const auto bound = std::size_t(maxsize);

    // Step 1: the serial pipeline, in this process: the output to match.
    L.step("the serial pipeline");
    wordcount::Text text = wordcount::read_input(input);
    Output serial;
    auto t0 = Clock::now();
    std::uint64_t seq = 0;
    for (std::string_view line : lines_of(text.bytes, limit)) {
      Result r = transform(seq++, line);
      burn(cost, Stage(cost.stage));  // the slow stage's extra work, once per item
      fold(serial, r);
    }
    double serial_s = lesson::seconds_since(t0);
    L.say("{} lines of {} ({} files), {} words, in {:.3f} s; output digest {:016x}", serial.items,
          input, text.files, serial.words, serial_s, serial.digest);

    // Step 2: one transform worker. FIFO queues and one process per stage keep the order.
    L.step("read -> transform x1 -> aggregate");
    RunReport one = run_pipeline(input, limit, 1, false, bound, cost);
    tell(L, one, bound);
    bool one_in_order = one.out.digest == serial.digest;
    L.say("  output equal to the serial one: {} (one worker cannot reorder)", one_in_order);

    // Step 3: fan out to K workers; fan in to one aggregator.
    L.step(fmt::format("read -> transform x{} -> aggregate{}", workers,
                       ordered ? ", reordered at the fan-in" : ""));
    RunReport many = run_pipeline(input, limit, workers, ordered, bound, cost);
    tell(L, many, bound);
    bool same_items = many.out.items == serial.items && many.out.multiset == serial.multiset &&
                      many.out.words == serial.words;
    bool same_output = many.out.digest == serial.digest;
    L.say("  the same results as serial: {}; in the same order: {} ({} arrived out of order{})",
          same_items, same_output, many.out.out_of_order,
          ordered ? fmt::format(", at most {} waited in the reorder buffer", many.out.max_buffered)
                  : std::string());
    L.say("  fan-out speed-up over one worker: {:.2f}x; over serial: {:.2f}x",
          one.seconds / many.seconds, serial_s / many.seconds);

    bool markers_ok = one.out.end_markers == 1 && many.out.end_markers == std::uint64_t(workers) &&
                      many.out.marker_items == serial.items;
    bool everyone_ended = one.clean_exit && many.clean_exit && mp::active_children().empty();
    L.say("\nevery stage ended on its end markers: {}; the output is the serial one{}: {}",
          markers_ok && everyone_ended, ordered ? "" : " (as a set)",
          ordered ? same_output : same_items);

    L.fact("workers", workers);
    L.fact("ordered", ordered);
    L.fact("input", input);
    L.fact("slow", slow);
    L.fact("cost_us", cost_us);
    L.fact("maxsize", maxsize);
    L.fact("serial",
           nlohmann::json{{"items", serial.items}, {"words", serial.words}, {"seconds", serial_s}});
    L.fact("one_worker", facts_of(one));
    L.fact("fanout", facts_of(many));
    L.fact("one_worker_output_equals_serial", one_in_order);
    L.fact("same_items_as_serial", same_items);
    L.fact("output_equals_serial", same_output);
    L.fact("end_markers_ok", markers_ok);
    L.fact("everyone_ended", everyone_ended);
    L.fact("speedup_over_one_worker", one.seconds / many.seconds);
    L.fact("children_left", mp::active_children().size());
    return one_in_order && same_items && (!ordered || same_output) && markers_ok && everyone_ended;
  });
}
