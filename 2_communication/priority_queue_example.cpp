// priority_queue_example.cpp - Submitted jobs served most urgent first by mp::PriorityQueue.
//
// A PriorityQueue hands out the message that comes first in its order, wherever and
// whenever it was put: with the default std::less, the smallest, as Python's
// queue.PriorityQueue does (the opposite of std::priority_queue). Jobs are (priority, name)
// pairs, as Python programs use tuples; messages that compare equal come out in the order
// they were put. std::greater turns it into "largest first".
//
// Usage: priority_queue_example [--workers N] [--items N] [--seed S] [--json]
//   $ build/2_communication/priority_queue_example --workers 3 --items 4
//
// Watch for: the submitters run at the same time, so their jobs arrive interleaved, yet
// the dispatcher serves priority 0 before 1 before 2...; among equal priorities each
// submitter's jobs keep their order; with std::greater the biggest number comes first.
#include <fmt/format.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {
using Job = std::pair<int, std::string>;  // (priority, name): 0 is the most urgent

// Compares priorities only, so that equal priorities keep their put order (comparing the
// names too would sort them by name instead).
struct MoreUrgent {
  bool operator()(const Job& a, const Job& b) const { return a.first < b.first; }
};
using JobQueue = mp::PriorityQueue<Job, MoreUrgent>;

// A submitter process puts `items` jobs of random priority, numbered in put order.
void submitter(JobQueue jobs, int id, int items, std::uint64_t seed) {
  std::mt19937_64 rng(seed + static_cast<std::uint64_t>(id));
  for (int i = 0; i < items; ++i) {
    jobs.put({static_cast<int>(rng() % 3), fmt::format("s{}-job{}", id, i)});
  }
}

// The dispatcher process serves jobs, most urgent first, and reports the order it served
// them in. It ends when the queue is closed and empty.
void dispatcher(JobQueue jobs, mp::Queue<std::vector<Job>> served) {
  std::vector<Job> order;
  try {
    for (;;) order.push_back(jobs.get());
  } catch (const mp::ShutDown&) {
  }
  served.put(order);
}

// Within one priority, each submitter's job numbers must increase.
bool ties_in_put_order(const std::vector<Job>& order) {
  std::map<std::pair<int, int>, int> last;  // (priority, submitter) -> last job number
  for (const auto& [priority, name] : order) {
    int s = 0, j = 0;
    std::sscanf(name.c_str(), "s%d-job%d", &s, &j);
    auto [it, fresh] = last.try_emplace({priority, s}, j);
    if (!fresh && it->second >= j) return false;
    it->second = j;
  }
  return true;
}
}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID, "Submitted jobs served most urgent first by mp::PriorityQueue."};
  // At most 16 x 1000 jobs: each takes a 128-byte block of the queue's 4 MiB store, and
  // the submitters must not fill it, since the dispatcher starts only after they finish.
  int& workers = L.add_workers(3, 16);
  int& items = L.add_items(4, 1, 1000);
  std::uint64_t& seed = L.add_seed(1);
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: the submitters fill the queue at the same time; then the dispatcher drains it.
    L.step(fmt::format("{} submitters x {} jobs, priorities 0 (urgent) to 2", workers, items));
    JobQueue jobs;
    std::vector<mp::Process> submitters;
    for (int s = 0; s < workers; ++s) submitters.emplace_back(submitter, jobs, s, items, seed);
    for (auto& s : submitters) s.start();
    for (auto& s : submitters) s.join();
    L.say("{} jobs waiting", jobs.qsize());

    mp::Queue<std::vector<Job>> served;
    mp::Process d{dispatcher, jobs, served};
    d.start();
    jobs.close();  // no more jobs: the dispatcher stops once the queue is empty
    std::vector<Job> order = served.get();
    d.join();
    for (const auto& [priority, name] : order) L.say("  served {} (priority {})", name, priority);

    bool sorted = true;
    for (std::size_t i = 1; i < order.size(); ++i)
      sorted = sorted && order[i - 1].first <= order[i].first;
    bool ties = ties_in_put_order(order);
    L.say("served by priority: {}; equal priorities in put order: {}", sorted, ties);

    // Step 2: the same class with std::greater: the largest first.
    L.step("std::greater: the largest first");
    mp::PriorityQueue<int, std::greater<int>> scores;
    for (int v : {40, 95, 12, 77}) scores.put(v);
    std::vector<int> by_score;
    while (auto v = scores.try_get()) by_score.push_back(*v);
    L.say("put 40 95 12 77, got {} {} {} {}", by_score[0], by_score[1], by_score[2], by_score[3]);

    L.fact("jobs", order.size());
    L.fact("served_by_priority", sorted);
    L.fact("ties_in_put_order", ties);
    L.fact("first_priority", order.empty() ? -1 : order.front().first);
    L.fact("largest_first_with_greater", by_score == std::vector<int>{95, 77, 40, 12});
    return order.size() == static_cast<std::size_t>(workers * items) && sorted && ties &&
           by_score == std::vector<int>{95, 77, 40, 12};
  });
}
