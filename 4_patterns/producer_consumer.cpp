// producer_consumer.cpp - A bounded queue between processes: backpressure, exactly once, a kill.
//
// Producers put numbered items into one queue bounded to --maxsize items; consumers take
// them, work on each for a moment and record it. A full queue makes the producers wait
// (backpressure): the lesson counts how often and for how long, and samples the queue's
// depth. The end is one sentinel per consumer, put by the parent once every producer is
// done. Every item is then recorded exactly once: a count and a checksum per producer, and
// a mark per item, prove it. The same run without a bound shows the backlog a bound
// prevents. Last, one consumer is SIGKILLed in the middle of the run and a new one takes
// its place: the queue loses nothing inside get(), but the item the dead consumer had
// already taken dies with it. The lesson counts what was lost instead of pretending
// nothing was.
//
// Usage: producer_consumer [--producers N] [--consumers N] [--items N] [--maxsize N]
//                          [--work-us N] [--seed N] [--json]
//   $ build/4_patterns/producer_consumer --producers 2 --consumers 3 --items 20000
//
// Watch for: with the bound, the depth never passes maxsize and the producers spend most
// of their time blocked (the consumers are the slow side); without it, the depth grows to
// thousands. After the kill, the tally is short by the item the victim held (or by none,
// if it died between items), and never has an item twice.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mp/shared_memory.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// One message. producer == kEnd marks the sentinel that ends one consumer.
struct Item {
  std::uint32_t producer = 0;
  std::uint32_t seq = 0;
  std::uint64_t value = 0;  // derived from (producer, seq): the consumer checks it whole
};
constexpr std::uint32_t kEnd = UINT32_MAX;

// The value an item must carry (splitmix64 of its identity): summed per producer, it is a
// checksum that a lost or a repeated item would change.
std::uint64_t value_of(std::uint32_t producer, std::uint32_t seq) {
  std::uint64_t z = (std::uint64_t{producer} << 32 | seq) + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// What a producer measured about backpressure.
struct PutStats {
  std::uint64_t blocked = 0;     // puts that found the queue full
  std::uint64_t blocked_ns = 0;  // time spent waiting in those puts
  std::uint64_t longest_ns = 0;
};

// The record of a run, in shared memory: every consumer writes its own row, so a killed
// consumer's row still says what it recorded before it died.
struct Tally {
  Tally() = default;  // for cereal, which then loads the handles
  Tally(int producers, int consumer_rows, int items)
      : counts(std::size_t(consumer_rows) * producers),
        sums(std::size_t(consumer_rows) * producers),
        seen(std::size_t(producers) * items),
        in_hand(std::size_t(consumer_rows)),
        put_stats(std::size_t(producers)),
        recorded(0) {}

  mp::RawArray<std::uint64_t> counts;   // [consumer][producer]: items recorded
  mp::RawArray<std::uint64_t> sums;     // [consumer][producer]: sum of their values
  mp::RawArray<std::uint8_t> seen;      // [producer][seq]: how often the item was recorded
  mp::RawArray<std::uint64_t> in_hand;  // [consumer]: 1 + the key of the item it is on, or 0
  mp::RawArray<PutStats> put_stats;     // [producer]
  mp::RawValue<std::uint64_t> recorded;
  mp::RawValue<std::uint64_t> corrupt;  // items whose value did not match their identity

  template <class Archive>
  void serialize(Archive& ar) {  // so that spawn children can receive it too
    ar(counts, sums, seen, in_hand, put_stats, recorded, corrupt);
  }
};

template <class T>
std::atomic_ref<T> shared(T& cell) {
  return std::atomic_ref<T>(cell);
}

// A moment of work on one item: a busy loop, as real processing would be.
void work_on(int work_us) {
  auto until = Clock::now() + std::chrono::microseconds(work_us);
  while (Clock::now() < until) {
  }
}

// Puts `items` items; a put that finds the queue full is timed.
void producer(mp::Queue<Item> q, Tally t, std::uint32_t id, std::uint32_t items) {
  PutStats s;
  for (std::uint32_t seq = 0; seq < items; ++seq) {
    Item item{id, seq, value_of(id, seq)};
    if (q.try_put(item)) continue;
    auto t0 = Clock::now();
    q.put(item);  // blocks until a consumer makes room
    auto ns = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
    ++s.blocked;
    s.blocked_ns += ns;
    s.longest_ns = std::max(s.longest_ns, ns);
  }
  t.put_stats[id] = s;
}

// Takes items until its sentinel. Between get() and the record, the item exists only in
// this process: in_hand says which one it is.
void consumer(mp::Queue<Item> q, Tally t, int row, int producers, int items, int work_us) {
  for (;;) {
    Item item = q.get();
    if (item.producer == kEnd) return;
    std::uint64_t key = std::uint64_t{item.producer} * items + item.seq;
    shared(t.in_hand[row]).store(key + 1);
    work_on(work_us);
    if (item.producer >= std::uint32_t(producers) || item.seq >= std::uint32_t(items) ||
        item.value != value_of(item.producer, item.seq)) {
      shared(t.corrupt.value()).fetch_add(1);
    } else {
      shared(t.seen[key]).fetch_add(1);  // the record itself: one store
      std::size_t cell = std::size_t(row) * producers + item.producer;
      shared(t.counts[cell]).fetch_add(1, std::memory_order_relaxed);
      shared(t.sums[cell]).fetch_add(item.value, std::memory_order_relaxed);
    }
    shared(t.recorded.value()).fetch_add(1);  // progress, for the parent's kill switch
    shared(t.in_hand[row]).store(0);
  }
}

struct Options {
  int producers, consumers, items, maxsize, work_us;
};

// What a run observed.
struct Run {
  double seconds = 0;
  // backpressure
  std::uint64_t puts = 0, blocked = 0;
  double blocked_s = 0, longest_block_ms = 0;
  std::size_t depth_max = 0;
  double depth_mean = 0, full_fraction = 0;
  // delivery
  bool counts_match = true, checksums_match = true;
  std::uint64_t recorded = 0, lost = 0, duplicated = 0, corrupt = 0;
  std::vector<std::string> lost_items;
  std::vector<std::uint64_t> per_consumer;
  // the kill
  bool killed = false;
  std::uint64_t killed_after = 0;
  std::string victim_held;  // the item in the victim's hands when it died ("" if none)
  int victim_exitcode = 0;
  bool all_exited_cleanly = true;
};

std::string item_name(std::uint64_t key, int items) {
  return fmt::format("p{}-{}", key / std::uint64_t(items), key % std::uint64_t(items));
}

// Runs one round: starts consumers and producers, samples the depth while producers run,
// kills a consumer when asked (after `kill_at` items) and starts a replacement, then ends
// the consumers with one sentinel each and audits the tally.
Run run_round(const Options& o, std::size_t maxsize, std::optional<std::uint64_t> kill_at) {
  const int rows = o.consumers + (kill_at ? 1 : 0);  // a replacement gets a row of its own
  mp::Queue<Item> q(maxsize);
  Tally t(o.producers, rows, o.items);
  Run r;
  auto start = Clock::now();

  // Step A: the consumers first, so that they are waiting when the first item comes.
  std::vector<mp::Process> consumers, producers;
  for (int c = 0; c < o.consumers; ++c) {
    consumers.emplace_back(consumer, q, t, c, o.producers, o.items, o.work_us);
    consumers.back().start();
  }
  for (int p = 0; p < o.producers; ++p) {
    producers.emplace_back(producer, q, t, std::uint32_t(p), std::uint32_t(o.items));
    producers.back().start();
  }

  // Step B: while the producers run, sample the depth every 200 us (and kill, if asked).
  std::uint64_t samples = 0, depth_sum = 0, full = 0;
  auto producers_running = [&] {
    return std::any_of(producers.begin(), producers.end(),
                       [](mp::Process& p) { return p.is_alive(); });
  };
  // With a kill pending, keep looking until it is done (a tiny run may outpace it).
  while (producers_running() || (kill_at && !r.killed)) {
    std::size_t d = q.qsize();
    ++samples;
    depth_sum += d;
    full += maxsize != 0 && d >= maxsize;
    r.depth_max = std::max(r.depth_max, d);
    if (kill_at && !r.killed && shared(t.recorded.value()).load() >= *kill_at) {
      // The victim is most likely in the middle of an item: work dominates its time.
      mp::Process& victim = consumers[0];
      victim.kill();
      victim.join();
      r.killed = true;
      r.killed_after = shared(t.recorded.value()).load();
      r.victim_exitcode = *victim.exitcode();
      std::uint64_t held = shared(t.in_hand[0]).load();
      if (held != 0) r.victim_held = item_name(held - 1, o.items);
      // Restart it: a new consumer with a row of its own takes the victim's place.
      consumers.emplace_back(consumer, q, t, rows - 1, o.producers, o.items, o.work_us);
      consumers.back().start();
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  for (auto& p : producers) p.join();

  // Step C: the clean end. Every producer is done, so after the items that are still queued
  // each live consumer finds one sentinel, and returns.
  int live = o.consumers;
  for (int c = 0; c < live; ++c) q.put(Item{kEnd, 0, 0});
  for (auto& c : consumers) c.join();
  r.seconds = lesson::seconds_since(start);
  for (std::size_t i = 0; i < consumers.size(); ++i) {
    bool victim = r.killed && i == 0;
    if (!victim && consumers[i].exitcode() != 0) r.all_exited_cleanly = false;
  }
  for (auto& p : producers) r.all_exited_cleanly = r.all_exited_cleanly && p.exitcode() == 0;

  // Step D: the audit. Per producer: how many of its items were recorded, and their sum.
  for (int p = 0; p < o.producers; ++p) {
    std::uint64_t count = 0, sum = 0, want = 0;
    for (int c = 0; c < rows; ++c) {
      count += t.counts[std::size_t(c) * o.producers + p];
      sum += t.sums[std::size_t(c) * o.producers + p];
    }
    for (int s = 0; s < o.items; ++s) want += value_of(std::uint32_t(p), std::uint32_t(s));
    r.counts_match = r.counts_match && count == std::uint64_t(o.items);
    r.checksums_match = r.checksums_match && sum == want;
    const PutStats& ps = t.put_stats[std::size_t(p)];
    r.blocked += ps.blocked;
    r.blocked_s += double(ps.blocked_ns) * 1e-9;
    r.longest_block_ms = std::max(r.longest_block_ms, double(ps.longest_ns) * 1e-6);
  }
  // Per item: recorded exactly once? (The marks are exact even when a consumer died in the
  // middle of recording: its counts above may then be short, its mark is there or not.)
  r.recorded = 0;
  for (std::size_t k = 0; k < t.seen.size(); ++k) {
    r.recorded += t.seen[k];
    if (t.seen[k] == 0) {
      ++r.lost;
      if (r.lost_items.size() < 10) r.lost_items.push_back(item_name(k, o.items));
    }
    if (t.seen[k] > 1) r.duplicated += t.seen[k] - 1u;
  }
  for (int c = 0; c < rows; ++c) {
    std::uint64_t n = 0;
    for (int p = 0; p < o.producers; ++p) n += t.counts[std::size_t(c) * o.producers + p];
    r.per_consumer.push_back(n);
  }
  r.puts = std::uint64_t(o.producers) * o.items;
  r.corrupt = t.corrupt.value();
  r.depth_mean = samples ? double(depth_sum) / double(samples) : 0.0;
  r.full_fraction = samples ? double(full) / double(samples) : 0.0;
  return r;
}

bool exactly_once(const Run& r) {
  return r.counts_match && r.checksums_match && r.lost == 0 && r.duplicated == 0 &&
         r.corrupt == 0 && r.recorded == r.puts;
}

void report_backpressure(const lesson::Lesson& L, const Run& r, std::size_t maxsize) {
  L.say(
      "{} items in {:.3f} s; {} of {} puts found the queue full ({:.0f}%), blocked {:.3f} s "
      "in all, the longest {:.2f} ms",
      r.puts, r.seconds, r.blocked, r.puts, 100.0 * double(r.blocked) / double(r.puts), r.blocked_s,
      r.longest_block_ms);
  if (maxsize != 0) {
    L.say(
        "queue depth while producing: mean {:.1f}, max {} (maxsize {}), full in {:.0f}% of "
        "samples",
        r.depth_mean, r.depth_max, maxsize, 100.0 * r.full_fraction);
  } else {
    L.say("queue depth while producing: mean {:.1f}, max {} (no bound)", r.depth_mean, r.depth_max);
  }
}

nlohmann::json backpressure_facts(const Run& r) {
  return {{"seconds", r.seconds},
          {"puts", r.puts},
          {"blocked_puts", r.blocked},
          {"blocked_seconds", r.blocked_s},
          {"longest_block_ms", r.longest_block_ms},
          {"depth_max", r.depth_max},
          {"depth_mean", r.depth_mean},
          {"full_fraction", r.full_fraction}};
}

nlohmann::json delivery_facts(const Run& r) {
  return {{"recorded", r.recorded},
          {"counts_match", r.counts_match},
          {"checksums_match", r.checksums_match},
          {"lost", r.lost},
          {"duplicated", r.duplicated},
          {"corrupt", r.corrupt},
          {"exactly_once", exactly_once(r)},
          {"per_consumer", r.per_consumer},
          {"all_exited_cleanly", r.all_exited_cleanly}};
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "A bounded queue between processes: backpressure, exactly once, a kill."};
  Options o{2, 3, 10'000, 16, 20};
  auto& cli = L.cli();
  cli.add_option("--producers", o.producers, "number of producer processes")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cli.add_option("--consumers", o.consumers, "number of consumer processes")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  int& items = L.add_items(o.items, 1, 1'000'000);  // per producer
  cli.add_option("--maxsize", o.maxsize, "the queue's bound, in items")
      ->check(CLI::Range(1, 100'000))
      ->capture_default_str();
  cli.add_option("--work-us", o.work_us, "microseconds of work per item in a consumer")
      ->check(CLI::Range(0, 10'000))
      ->capture_default_str();
  std::uint64_t& seed = L.add_seed(1);
  L.parse(argc, argv);
  o.items = items;

  return L.run([&] {
    const std::size_t maxsize = std::size_t(o.maxsize);

    // Step 1: the bounded queue. Consumers are the slow side, so the queue fills and the
    // producers wait: the bound turns a fast producer into a patient one.
    L.step(fmt::format("{} producers x {} items, {} consumers ({} us per item), maxsize {}",
                       o.producers, o.items, o.consumers, o.work_us, maxsize));
    Run bounded = run_round(o, maxsize, std::nullopt);
    report_backpressure(L, bounded, maxsize);
    L.say("ended by {} sentinels; items per consumer: {}", o.consumers,
          fmt::join(bounded.per_consumer, ", "));
    L.say(
        "every item recorded exactly once: {} (counts per producer {}, checksums {}, "
        "lost {}, twice {})",
        exactly_once(bounded), bounded.counts_match ? "match" : "DIFFER",
        bounded.checksums_match ? "match" : "DIFFER", bounded.lost, bounded.duplicated);

    // Step 2: the same without a bound. Nobody waits, and the backlog grows instead: in a
    // long run, memory is what the producers fill.
    L.step("the same without maxsize");
    Run unbounded = run_round(o, 0, std::nullopt);
    report_backpressure(L, unbounded, 0);
    L.say("every item recorded exactly once: {}", exactly_once(unbounded));

    // Step 3: one consumer is SIGKILLed somewhere in the middle, and a new one replaces it.
    std::mt19937_64 rng(seed);
    const std::uint64_t total = std::uint64_t(o.producers) * o.items;
    const std::uint64_t kill_at = std::max<std::uint64_t>(
        1, std::uniform_int_distribution<std::uint64_t>(total * 3 / 10, total * 7 / 10)(rng));
    L.step(fmt::format("consumer 0 is killed after about {} items, and replaced", kill_at));
    Run killed = run_round(o, maxsize, kill_at);
    bool held_was_lost = !killed.victim_held.empty() && killed.lost == 1 &&
                         killed.lost_items.front() == killed.victim_held;
    L.say("the victim was {} after {} items were recorded",
          mp::describe_exitcode(killed.victim_exitcode), killed.killed_after);
    if (held_was_lost) {
      L.say("it was working on {}: that item is lost", killed.victim_held);
    } else if (killed.lost == 1 && killed.victim_held.empty()) {
      L.say("it had just taken {} from the queue, inside get() or right after: that item is lost",
            killed.lost_items.front());
    } else if (killed.lost == 0) {
      L.say("it died between two items: nothing is lost");
    }
    L.say("recorded {} of {}: lost {}, recorded twice {}", killed.recorded, killed.puts,
          killed.lost, killed.duplicated);
    L.say(
        "the queue lost nothing: a death before get() takes an item leaves it to the next "
        "consumer; once taken, it is the consumer's and dies with it. Getting it back takes "
        "at-least-once delivery: a queue that redelivers what was taken and never "
        "acknowledged.");

    // The claims: exactly once without a kill; with one, nothing twice and at most the one
    // item the victim held lost; everybody ended.
    bool bound_held =
        bounded.depth_max <= maxsize && (!killed.killed || killed.depth_max <= maxsize);
    bool kill_accounted = killed.killed && killed.victim_exitcode == -9 && killed.duplicated == 0 &&
                          killed.corrupt == 0 && killed.lost <= 1 &&
                          killed.recorded + killed.lost == killed.puts;
    bool none_left = mp::active_children().empty();
    L.say("\nexactly once without a kill: {}; the bound held: {}; the kill accounted for: {}",
          exactly_once(bounded) && exactly_once(unbounded), bound_held, kill_accounted);

    L.fact("producers", o.producers);
    L.fact("consumers", o.consumers);
    L.fact("items_per_producer", o.items);
    L.fact("maxsize", maxsize);
    L.fact("work_us", o.work_us);
    L.fact("bounded", backpressure_facts(bounded));
    L.facts()["bounded"].update(delivery_facts(bounded));
    L.fact("unbounded", backpressure_facts(unbounded));
    L.facts()["unbounded"].update(delivery_facts(unbounded));
    L.fact("killed", delivery_facts(killed));
    L.facts()["killed"].update(nlohmann::json{{"killed", killed.killed},
                                              {"kill_at", kill_at},
                                              {"killed_after", killed.killed_after},
                                              {"victim_exitcode", killed.victim_exitcode},
                                              {"victim_held", killed.victim_held},
                                              {"victim_held_was_lost", held_was_lost},
                                              {"lost_items", killed.lost_items},
                                              {"puts", killed.puts}});
    L.fact("bound_held", bound_held);
    L.fact("kill_accounted", kill_accounted);
    L.fact("children_left", mp::active_children().size());
    return exactly_once(bounded) && exactly_once(unbounded) && bounded.all_exited_cleanly &&
           unbounded.all_exited_cleanly && killed.all_exited_cleanly && bound_held &&
           kill_accounted && none_left;
  });
}
