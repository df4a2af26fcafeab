// queues_basic.cpp - Producer and consumer processes joined by mp::Queue and mp::JoinableQueue.
//
// A Queue carries messages between any number of processes, first in, first out. Producers
// put, consumers get; a bounded queue (maxsize) makes fast producers wait for slow
// consumers. The lesson ends consumers two ways (a sentinel per consumer, then close()),
// shows that a child may put and exit at once, has workers report each task done to a
// JoinableQueue so the parent can join() it, and times out a get() on an empty queue.
//
// Usage: queues_basic [--workers N] [--items N] [--json]
//   $ build/2_communication/queues_basic --workers 3 --items 6
//
// Watch for: items from one producer reach the consumers in the order it put them, though
// producers interleave; nothing is lost or seen twice; the parent joins a child that put
// 10000 items *before* reading any (Python's Queue can deadlock there: its feeder thread
// still holds the data); join() returns only after the last task_done().
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <optional>
#include <string>
#include <vector>

#include "lesson.hpp"

namespace {
using Item = std::optional<std::string>;  // std::nullopt is the sentinel: "no more"

// A producer puts `items` labelled items. A full queue (maxsize) makes it wait.
void producer(mp::Queue<Item> q, int id, int items, bool verbose) {
  for (int i = 0; i < items; ++i) {
    q.put(fmt::format("p{}-{}", id, i));
    if (verbose) {
      fmt::print("  producer {} put p{}-{}\n", id, id, i);
      std::fflush(stdout);
    }
  }
}

// A consumer takes items until a sentinel (or, with close(), until ShutDown), checks that
// each producer's items come in order, and reports how many it took (-1: out of order).
void consumer(mp::Queue<Item> q, mp::Queue<int> counts, int id, bool verbose) {
  std::map<int, int> next;  // producer -> the index expected next at least
  int taken = 0;
  bool in_order = true;
  try {
    while (Item item = q.get()) {
      int p = 0, i = 0;
      std::sscanf(item->c_str(), "p%d-%d", &p, &i);
      in_order = in_order && i >= next[p];
      next[p] = i + 1;
      ++taken;
      if (verbose) {
        fmt::print("  consumer {} got {}\n", id, *item);
        std::fflush(stdout);
      }
    }
  } catch (const mp::ShutDown&) {  // the queue was closed and is empty
  }
  counts.put(in_order ? taken : -1);
}

void put_and_leave(mp::Queue<int> q, int n) {
  for (int i = 0; i < n; ++i) q.put(i);
}  // returns at once: every item is already in shared memory

void worker(mp::JoinableQueue<int> tasks, mp::Queue<long> results) {
  try {
    for (;;) {
      int t = tasks.get();
      results.put(static_cast<long>(t) * t);
      tasks.task_done();  // after the result is out: join() then means "all results are in"
    }
  } catch (const mp::ShutDown&) {
  }
}

// Starts the producers and consumers, ends the consumers with sentinels or close(), and
// returns the consumers' counts.
std::vector<int> run_round(const lesson::Lesson& L, int consumers, int items, bool sentinels) {
  mp::Queue<Item> q(4);  // bounded: at most 4 items waiting
  mp::Queue<int> counts;
  std::vector<mp::Process> producers, takers;
  for (int p = 0; p < 2; ++p) producers.emplace_back(producer, q, p, items, !L.json());
  for (int c = 0; c < consumers; ++c) takers.emplace_back(consumer, q, counts, c, !L.json());
  for (auto& p : producers) p.start();
  for (auto& c : takers) c.start();
  for (auto& p : producers) p.join();
  if (sentinels) {
    for (int c = 0; c < consumers; ++c) q.put(std::nullopt);  // one "no more" per consumer
  } else {
    q.close();  // every consumer drains the queue, then get() throws mp::ShutDown
  }
  std::vector<int> got;
  for (int c = 0; c < consumers; ++c) got.push_back(counts.get());
  for (auto& c : takers) c.join();
  return got;
}

int total(const std::vector<int>& v) {
  int sum = 0;
  for (int x : v) sum = x < 0 || sum < 0 ? -1 : sum + x;
  return sum;
}
}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Producer and consumer processes joined by mp::Queue and mp::JoinableQueue."};
  int& workers = L.add_workers(2, 32);
  int& items = L.add_items(5, 1, 100'000);
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: two producers, `workers` consumers, a bounded queue, sentinels to finish.
    L.step(fmt::format("2 producers x {} items, {} consumers, ended by sentinels", items, workers));
    auto with_sentinels = run_round(L, workers, items, true);
    L.say("items per consumer: {} (all in each producer's order: {})",
          fmt::join(with_sentinels, ", "), total(with_sentinels) >= 0);

    // Step 2: the same, ended by close(): no sentinel values to agree on.
    L.step("the same, ended by close()");
    auto with_close = run_round(L, workers, items, false);
    L.say("items per consumer: {}", fmt::join(with_close, ", "));

    // Step 3: a child puts 10000 items and exits; the parent joins it before reading.
    L.step("a child that puts and exits at once");
    mp::Queue<int> left;
    mp::Process quick{put_and_leave, left, 10000};
    quick.start();
    quick.join();
    std::size_t waiting = left.qsize();
    long sum = 0;
    while (auto v = left.try_get()) sum += *v;
    L.say("child exited with {}; {} items were waiting, sum {}", *quick.exitcode(), waiting, sum);

    // Step 4: a JoinableQueue: join() returns when every task is task_done().
    L.step("JoinableQueue: task_done() and join()");
    mp::JoinableQueue<int> tasks;
    mp::Queue<long> results;
    std::vector<mp::Process> pool;
    for (int w = 0; w < workers; ++w) pool.emplace_back(worker, tasks, results);
    for (auto& w : pool) w.start();
    // The results wait in `results` until join() returns: keep them well inside its 4 MiB.
    const long n = std::min(items * 4, 1000);
    for (int t = 1; t <= n; ++t) tasks.put(t);
    tasks.join();  // blocks until the workers have called task_done() for every task
    std::size_t results_ready = results.qsize();
    L.say("join() returned: {} results ready, {} tasks unfinished", results_ready,
          tasks.unfinished_tasks());
    long squares = 0;
    while (auto r = results.try_get()) squares += *r;
    tasks.close();
    for (auto& w : pool) w.join();

    // Step 5: get(timeout) on an empty queue throws mp::Empty (Python: queue.Empty).
    L.step("a timed get on an empty queue");
    bool timed_out = false;
    try {
      results.get(mp::Seconds(0.05));
    } catch (const mp::Empty& e) {
      timed_out = true;
      L.say("after 50 ms: caught mp::Empty ({})", e.what());
    }

    int expected = 2 * items;
    L.fact("items_per_round", expected);
    L.fact("sentinel_round_got", total(with_sentinels));
    L.fact("close_round_got", total(with_close));
    L.fact("order_kept_per_producer", total(with_sentinels) >= 0 && total(with_close) >= 0);
    L.fact("exited_child_items_waiting", waiting);
    L.fact("exited_child_sum", sum);
    L.fact("results_ready_at_join", results_ready);
    L.fact("tasks", n);
    L.fact("sum_of_squares", squares);
    L.fact("unfinished_after_join", tasks.unfinished_tasks());
    L.fact("empty_after_timeout", timed_out);
    return total(with_sentinels) == expected && total(with_close) == expected && waiting == 10000 &&
           sum == 10000L * 9999 / 2 && results_ready == static_cast<std::size_t>(n) &&
           squares == n * (n + 1) * (2 * n + 1) / 6 && timed_out;
  });
}
