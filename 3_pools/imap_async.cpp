// imap_async.cpp - Results as they come: imap, imap_unordered with a progress bar, callbacks.
//
// imap() hands out results lazily in input order, each as soon as it and those before it
// are done; imap_unordered() hands them out in the order they finish, which is what a
// progress bar wants. apply_async() with a callback and an error_callback pushes each
// outcome to you instead: on a pool thread of this process, exactly once per task.
//
// Usage: imap_async [--workers N] [--items N] [--seed S] [--json]
//   $ build/3_pools/imap_async --workers 4 --items 40
//
// Watch for: the bar fills as tasks finish (plain progress lines when stdout is not a
// terminal); imap_unordered's order differs from the input order when tasks take different
// times, imap's never does; the first result arrives long before the last; the callbacks
// run in the parent's pid, on a thread that is not main()'s.
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mp/pool.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

// A task that waits like I/O would: `ms` milliseconds. Returns its id.
int simulate(std::pair<int, int> task) {
  std::this_thread::sleep_for(std::chrono::milliseconds(task.second));
  return task.first;
}

// Every fifth task fails, to exercise the error callback.
int picky(int id) {
  if (id % 5 == 4) throw std::runtime_error(fmt::format("task {} refuses", id));
  return id * 10;
}

// A bar on a terminal, a line per tenth otherwise; nothing with --json.
class Progress {
 public:
  Progress(const lesson::Lesson& L, int total)
      : json_(L.json()), tty_(::isatty(STDOUT_FILENO) == 1), total_(total) {}
  void update(int done) {
    if (json_) return;
    if (tty_) {
      int fill = done * 30 / total_;
      fmt::print("\r  [{}{}] {:3}% ({}/{})", std::string(fill, '#'), std::string(30 - fill, '.'),
                 done * 100 / total_, done, total_);
      if (done == total_) fmt::print("\n");
      std::fflush(stdout);
    } else if (done == total_ || done * 10 / total_ != (done - 1) * 10 / total_) {
      fmt::print("  progress: {}/{} ({}%)\n", done, total_, done * 100 / total_);
    }
  }

 private:
  bool json_, tty_;
  int total_;
};

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Results as they come: imap, imap_unordered with a progress bar, callbacks."};
  int& workers = L.add_workers(4, 64);
  int& items = L.add_items(40, 1, 10'000);
  std::uint64_t& seed = L.add_seed(1);
  L.parse(argc, argv);

  return L.run([&] {
    mp::Pool pool{workers};
    std::mt19937_64 rng(seed);
    std::vector<std::pair<int, int>> tasks;  // (id, milliseconds)
    for (int i = 0; i < items; ++i) tasks.emplace_back(i, 5 + static_cast<int>(rng() % 40));

    // Step 1: imap_unordered - each result as soon as its task is done.
    L.step(fmt::format("imap_unordered: {} tasks of 5-45 ms on {} workers", items, workers));
    Progress bar(L, items);
    std::vector<int> arrival;
    auto t0 = std::chrono::steady_clock::now();
    double first_ms = 0;
    for (int id : pool.imap_unordered(simulate, tasks)) {
      if (arrival.empty()) first_ms = lesson::seconds_since(t0) * 1000;
      arrival.push_back(id);
      bar.update(static_cast<int>(arrival.size()));
    }
    double all_ms = lesson::seconds_since(t0) * 1000;
    std::vector<int> sorted = arrival;
    std::sort(sorted.begin(), sorted.end());
    bool all_arrived = sorted.size() == static_cast<std::size_t>(items) &&
                       std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end() &&
                       sorted.front() == 0 && sorted.back() == items - 1;
    bool unordered_in_input_order = std::is_sorted(arrival.begin(), arrival.end());
    L.say("first result after {:.1f} ms, all {} after {:.1f} ms", first_ms, items, all_ms);
    L.say("arrival order (first 12): {}{}",
          std::vector<int>(arrival.begin(), arrival.begin() + std::min(items, 12)),
          items > 12 ? " ..." : "");

    // Step 2: imap - the same tasks, results in input order whatever finishes first.
    L.step("imap: the same tasks, in input order");
    std::vector<int> ordered;
    for (int id : pool.imap(simulate, tasks)) ordered.push_back(id);
    bool ordered_ok = std::is_sorted(ordered.begin(), ordered.end()) &&
                      ordered.size() == static_cast<std::size_t>(items);
    L.say("imap yielded {} results in input order: {}", ordered.size(), ordered_ok);

    // Step 3: apply_async with callbacks (003's AdvancedProcessManager): nobody waits on
    // the results one by one; the pool calls back as each task ends.
    L.step("apply_async with callback and error_callback");
    std::atomic<int> successes{0}, failures{0}, wrong_place{0};
    std::thread::id main_thread = std::this_thread::get_id();
    pid_t me = ::getpid();
    std::vector<mp::AsyncResult<int>> results;
    for (int i = 0; i < items; ++i) {
      results.push_back(pool.apply_async(
          picky, std::tuple{i},
          [&](const int&) {
            successes++;
            if (::getpid() != me || std::this_thread::get_id() == main_thread) wrong_place++;
          },
          [&](const std::exception& e) {
            if (failures++ == 0) L.say("  error_callback: {}", e.what());
          }));
    }
    for (auto& r : results) r.wait();  // ready() implies its callback has run
    int expected_failures = items / 5;
    L.say("callbacks: {} results, {} errors (expected {}), all in pid {} off the main thread: {}",
          successes.load(), failures.load(), expected_failures, me, wrong_place.load() == 0);
    pool.close();
    pool.join();

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("unordered_all_arrived", all_arrived);
    L.fact("unordered_in_input_order", unordered_in_input_order);  // reported, not claimed
    L.fact("ordered_in_input_order", ordered_ok);
    L.fact("first_result_ms", first_ms);
    L.fact("all_results_ms", all_ms);
    L.fact("callbacks", successes.load());
    L.fact("error_callbacks", failures.load());
    L.fact("expected_failures", expected_failures);
    L.fact("callbacks_in_parent_off_main_thread", wrong_place.load() == 0);
    return all_arrived && ordered_ok && successes.load() == items - expected_failures &&
           failures.load() == expected_failures && wrong_place.load() == 0;
  });
}
