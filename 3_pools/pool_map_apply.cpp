// pool_map_apply.cpp - A process pool: map, apply, apply_async, remote errors, a worker that dies.
//
// mp::Pool keeps N worker processes and hands them tasks. map() cuts a list into chunks and
// returns the results in input order; apply() runs one call and waits for it;
// apply_async() returns an AsyncResult to collect later. An exception thrown by a task
// reaches the caller as mp::RemoteError. A worker killed in the middle of a task fails that
// task with mp::WorkerLostError, a new worker takes its place, and the pool goes on - where
// Python's Pool waits for ever (bpo-22393).
//
// Usage: pool_map_apply [--workers N] [--items N] [--json]
//   $ build/3_pools/pool_map_apply --workers 4 --items 12
//
// Watch for: several worker pids share the map's items, yet the results come back in input
// order; the exception's type and message cross the process boundary; after the crash the
// pool has a new pid and map() works again.
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <mp/pool.hpp>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

// Plain CPU work: the number of primes below n, by trial division.
int count_primes(int n) {
  int count = 0;
  for (int k = 2; k < n; ++k) {
    bool prime = true;
    for (int d = 2; d * d <= k && prime; ++d) prime = k % d != 0;
    count += prime;
  }
  return count;
}

// The same work, and which worker did it.
std::pair<int, pid_t> primes_and_pid(int n) { return {count_primes(n), ::getpid()}; }

int checked_sqrt(int x) {
  if (x < 0) throw std::domain_error(fmt::format("no real square root of {}", x));
  return static_cast<int>(std::sqrt(x));
}

// Task 3 kills its own worker: a crash in the middle of a task.
int fragile(int i) {
  if (i == 3) ::raise(SIGKILL);
  return i * i;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "A process pool: map, apply, apply_async, remote errors, a worker that dies."};
  int& workers = L.add_workers(4, 64);
  int& items = L.add_items(12, 1, 10'000);
  L.parse(argc, argv);

  return L.run([&] {
    // The workers start now and wait for tasks; the pool's destructor would stop them.
    mp::Pool pool{workers};
    auto first_pids = pool.worker_pids();
    L.say("a pool of {} workers, pids {}", workers, first_pids);

    // Step 1: map() - one function over a list; results in input order.
    L.step("map: count primes below each limit");
    std::vector<int> limits;
    for (int i = 0; i < items; ++i) limits.push_back(20'000 + 5'000 * i);
    auto t0 = std::chrono::steady_clock::now();
    auto results = pool.map(primes_and_pid, limits);
    double secs = lesson::seconds_since(t0);
    bool map_matches = results.size() == limits.size();
    std::set<pid_t> pids_used;
    for (std::size_t i = 0; i < results.size(); ++i) {
      auto [primes, pid] = results[i];
      map_matches = map_matches && primes == count_primes(limits[i]);  // the serial answer
      pids_used.insert(pid);
      L.say("  primes below {:>7}: {:>6}   (worker {})", limits[i], primes, pid);
    }
    L.say("{} items in {:.3f} s on {} different workers; equal to the serial answers: {}", items,
          secs, pids_used.size(), map_matches);

    // Step 2: apply() blocks for one call; apply_async() lets several run at once.
    L.step("apply and apply_async");
    int below_10k = pool.apply(count_primes, 10'000);
    L.say("apply(count_primes, 10000) = {}", below_10k);
    std::vector<mp::AsyncResult<int>> pending;
    for (int i = 1; i <= 2 * workers; ++i)
      pending.push_back(pool.apply_async(count_primes, 1000 * i));
    L.say("submitted {} calls; ready right away: {}", pending.size(), pending.front().ready());
    bool async_match = true;
    std::vector<int> got;
    for (int i = 1; i <= 2 * workers; ++i) {
      got.push_back(pending[i - 1].get());
      async_match = async_match && got.back() == count_primes(1000 * i);
    }
    L.say("their results, in submission order: {}", got);

    // Step 3: an exception in a worker arrives here as mp::RemoteError.
    L.step("an exception raised in a task");
    std::string error_type, error_message;
    bool error_from_worker = false;
    try {
      pool.apply(checked_sqrt, -4);
    } catch (const mp::RemoteError& e) {
      error_type = e.type_name();
      error_message = e.message();
      error_from_worker = e.pid() != ::getpid();
      L.say("caught mp::RemoteError: {}", e.what());
    }

    // Step 4: a worker dies in the middle of task 3. map() raises instead of hanging.
    L.step("a worker is killed in the middle of a task");
    std::vector<int> numbers;
    for (int i = 0; i < std::max(items, 4); ++i) numbers.push_back(i);
    std::string lost_what, lost_signal;
    try {
      pool.map(fragile, numbers, 1);
    } catch (const mp::WorkerLostError& e) {
      lost_what = e.what();
      lost_signal = mp::signal_name(e.signal());
      L.say("caught mp::WorkerLostError: {}", lost_what);
    }
    auto after = pool.map(fragile, std::vector<int>{0, 1, 2, 4, 5});
    auto now_pids = pool.worker_pids();
    std::set<pid_t> before(first_pids.begin(), first_pids.end());
    bool replaced =
        std::any_of(now_pids.begin(), now_pids.end(), [&](pid_t p) { return !before.count(p); });
    L.say("workers now {} (a new one replaced the dead); map again: {}", now_pids, after);
    pool.close();
    pool.join();

    bool lost_named = lost_what.find("task 3 of map") != std::string::npos;
    bool after_ok = after == std::vector<int>{0, 1, 4, 16, 25};
    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("map_matches_serial", map_matches);
    L.fact("pids_used", pids_used.size());
    L.fact("apply_result", below_10k);
    L.fact("async_results_match", async_match);
    L.fact("remote_error_type", error_type);
    L.fact("remote_error_message", error_message);
    L.fact("remote_error_from_worker", error_from_worker);
    L.fact("lost_task_named", lost_named);
    L.fact("lost_signal", lost_signal);
    L.fact("worker_replaced", replaced);
    L.fact("map_after_crash_ok", after_ok);
    L.fact("workers_started", pool.workers_started());
    return map_matches && async_match && below_10k == 1229 && error_type == "std::domain_error" &&
           error_from_worker && lost_named && lost_signal == "SIGKILL" && replaced && after_ok;
  });
}
