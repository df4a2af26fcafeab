// async_multiprocessing_pattern.cpp - C++20 coroutines await mp::Pool tasks: as they complete, with
// timeouts and errors.
//
// asyncio's `await loop.run_in_executor(pool, f, x)` in C++: a coroutine on an Asio event
// loop co_awaits tasks that run in the pool's worker processes (pool_awaitable.hpp). It can
// start many and take them in the order they finish, give up waiting after a timeout, and
// catch a task's exception - mp::RemoteError, or mp::WorkerLostError when the worker died -
// with an ordinary try/catch around the co_await. While tasks run, the loop's one thread is
// free: a heartbeat coroutine keeps beating beside them.
//
// Usage: async_multiprocessing_pattern [--workers N] [--items N] [--period MS] [--json]
//   $ build/7_integration/async_multiprocessing_pattern --workers 4 --items 16
//
// Watch for: the results come back out of submission order, each equal to the serial
// answer; the process has the same number of threads with one task pending and with all
// of them; every coroutine resumes on the loop's thread; the errors arrive as the types
// you catch; a timeout ends the wait, not the task.
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/redirect_error.hpp>
#include <asio/steady_timer.hpp>
#include <chrono>
#include <mp/pool.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"
#include "pool_awaitable.hpp"
#include "proc_status.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Tasks: plain functions, run in the workers.
int count_primes(int n) {
  int count = 0;
  for (int k = 2; k < n; ++k) {
    bool prime = true;
    for (int d = 2; d * d <= k && prime; ++d) prime = k % d != 0;
    count += prime;
  }
  return count;
}

int checked_count(int n) {
  if (n < 0) throw std::domain_error(fmt::format("cannot count primes below {}", n));
  return count_primes(n);
}

int die_in_the_middle(int) {
  ::raise(SIGKILL);  // as the OOM killer would
  return 0;
}

int never_returns(int) {
  for (;;) ::pause();  // until the pool stops it
}

// A coroutine beside the others: it counts its beats and how late each came.
struct Heartbeat {
  asio::steady_timer timer;
  std::chrono::milliseconds period;
  int ticks = 0;
  double max_late_ms = 0;
  bool stopped = false;

  asio::awaitable<void> run() {
    auto next = Clock::now() + period;
    while (!stopped) {
      timer.expires_at(next);
      std::error_code ec;
      co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if (ec || stopped) break;
      ++ticks;
      max_late_ms = std::max(
          max_late_ms, std::chrono::duration<double, std::milli>(Clock::now() - next).count());
      next += period;
    }
  }
  void stop() {
    stopped = true;
    timer.cancel();
  }
};

// The facts, filled in by the story.
struct Facts {
  int one_result = 0;
  std::vector<int> limits, results;  // step 2's tasks and what they returned
  std::vector<std::size_t> completion_order;
  long threads_idle = 0, threads_one_pending = 0, threads_all_pending = 0;
  bool resumed_on_loop_thread = true;
  std::string remote_type, remote_message;
  std::string lost_signal;
  bool timeout_caught = false;
  double timeout_waited_s = 0;
  bool loop_free_meanwhile = false;
  double gather_seconds = 0;
};

// The story, as one coroutine on the loop.
asio::awaitable<void> story(const lesson::Lesson& L, mp::Pool& pool, int items, Heartbeat& beat,
                            Facts& f) {
  auto loop = co_await asio::this_coro::executor;
  const auto loop_thread = std::this_thread::get_id();
  auto on_loop = [&] { f.resumed_on_loop_thread &= std::this_thread::get_id() == loop_thread; };

  // Step 1: one task, awaited. The coroutine is suspended until a worker has answered.
  L.step("co_await one task");
  f.threads_idle = proc_status::threads();
  {
    pool_await::TaskGroup<int> one{pool, loop};
    one.start(count_primes, 100'000);
    f.threads_one_pending = proc_status::threads();
    f.one_result = (co_await one.next()).get();
  }
  on_loop();
  L.say("count_primes(100000) = {}, computed by a worker, awaited here", f.one_result);

  // Step 2: many tasks, taken as they complete. The first are the biggest, so the small
  // ones behind them finish first.
  L.step(fmt::format("{} tasks at once, awaited as they complete", items));
  std::vector<int>& limits = f.limits;
  for (int i = 0; i < items; ++i) limits.push_back(30'000 + 20'000 * (items - i));
  pool_await::TaskGroup<int> group{pool, loop};
  auto t0 = Clock::now();
  int beats_before = beat.ticks;
  for (int n : limits) group.start(count_primes, n);
  f.threads_all_pending = proc_status::threads();
  std::vector<int>& results = f.results;
  results.resize(limits.size());
  while (group.unfinished() > 0) {
    auto done = co_await group.next(60s);  // a generous bound: a stuck pool would end here
    on_loop();
    results[done.index] = done.get();
    f.completion_order.push_back(done.index);
    L.say("  [{:6.3f} s] task {:>2} (primes below {:>6}): {:>6}   (heartbeats so far: {})",
          lesson::seconds_since(t0), done.index, limits[done.index], results[done.index],
          beat.ticks);
  }
  f.gather_seconds = lesson::seconds_since(t0);
  f.loop_free_meanwhile = beat.ticks > beats_before;
  L.say("all in {:.3f} s; completion order {}", f.gather_seconds, f.completion_order);
  L.say("threads of this process: {} idle, {} with one task pending, {} with {} pending",
        f.threads_idle, f.threads_one_pending, f.threads_all_pending, items);

  // Step 3: a task's exception reaches the coroutine that awaits it, with its type.
  L.step("errors: an exception in a task, a worker that dies");
  try {
    co_await pool_await::apply(pool, checked_count, -4);
  } catch (const mp::RemoteError& e) {
    on_loop();
    f.remote_type = e.type_name();
    f.remote_message = e.message();
    L.say("caught mp::RemoteError: {}", e.what());
  }
  try {
    co_await pool_await::apply(pool, die_in_the_middle, 0);
  } catch (const mp::WorkerLostError& e) {
    on_loop();
    f.lost_signal = mp::signal_name(e.signal());
    L.say("caught mp::WorkerLostError: {}", e.what());
  }

  // Step 4: a timeout. The wait ends; the task does not (the pool stops it at the end).
  L.step("a task that never returns, awaited for at most 0.2 s");
  auto t1 = Clock::now();
  try {
    co_await pool_await::apply_for(pool, 0.2s, never_returns, 0);
  } catch (const mp::TimeoutError& e) {
    on_loop();
    f.timeout_caught = true;
    f.timeout_waited_s = lesson::seconds_since(t1);
    L.say("caught mp::TimeoutError after {:.3f} s: {}", f.timeout_waited_s, e.what());
  }
  beat.stop();
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "C++20 coroutines await mp::Pool tasks: as they complete, with timeouts and "
                   "errors."};
  int& workers = L.add_workers(2, 64);
  int& items = L.add_items(12, 1, 1000);
  int period_ms = 10;
  L.cli()
      .add_option("--period", period_ms, "the heartbeat's period in milliseconds")
      ->check(CLI::Range(1, 10'000))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    // The loop first: it must outlive the pool, whose callbacks post to it.
    asio::io_context io;
    mp::Pool pool{workers};
    L.say("a pool of {} workers; one event loop on this thread", workers);

    Heartbeat beat{asio::steady_timer{io}, std::chrono::milliseconds{period_ms}};
    Facts f;
    std::exception_ptr failure;
    asio::co_spawn(io, beat.run(), asio::detached);
    asio::co_spawn(io, story(L, pool, items, beat, f), [&](std::exception_ptr e) {
      failure = e;
      beat.stop();
    });
    io.run();  // returns when both coroutines are done
    if (failure) std::rethrow_exception(failure);
    pool.terminate();  // the task that never returns ends here (SIGTERM)

    // The serial answers, computed here rather than in a coroutine: CPU work on the loop's
    // thread would stop every coroutine (and the heartbeat) while it ran.
    bool results_match = f.results.size() == f.limits.size();
    for (std::size_t i = 0; i < f.limits.size() && results_match; ++i)
      results_match = f.results[i] == count_primes(f.limits[i]);
    L.say("step 2's results equal the serial answers: {}", results_match);

    L.say("\nheartbeat: {} ticks of {} ms while the tasks ran, the latest {:.2f} ms late",
          beat.ticks, period_ms, beat.max_late_ms);
    bool threads_flat =
        f.threads_one_pending == f.threads_idle && f.threads_all_pending == f.threads_idle;
    bool out_of_order = !std::is_sorted(f.completion_order.begin(), f.completion_order.end());
    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("one_result", f.one_result);
    L.fact("results_match_serial", results_match);
    L.fact("completion_order", f.completion_order);
    L.fact("completed_out_of_order", out_of_order);
    L.fact("gather_seconds", f.gather_seconds);
    L.fact("threads_idle", f.threads_idle);
    L.fact("threads_one_pending", f.threads_one_pending);
    L.fact("threads_all_pending", f.threads_all_pending);
    L.fact("no_thread_per_pending_task", threads_flat);
    L.fact("resumed_on_loop_thread", f.resumed_on_loop_thread);
    L.fact("remote_error_type", f.remote_type);
    L.fact("remote_error_message", f.remote_message);
    L.fact("worker_lost_signal", f.lost_signal);
    L.fact("timeout_caught", f.timeout_caught);
    L.fact("timeout_waited_s", f.timeout_waited_s);
    L.fact("heartbeat_ticks", beat.ticks);
    L.fact("heartbeat_max_late_ms", beat.max_late_ms);
    L.fact("heartbeat_during_gather", f.loop_free_meanwhile);
    return f.one_result == 9592 && results_match &&
           f.completion_order.size() == static_cast<std::size_t>(items) && threads_flat &&
           f.resumed_on_loop_thread && f.remote_type == "std::domain_error" &&
           f.lost_signal == "SIGKILL" && f.timeout_caught;
  });
}
