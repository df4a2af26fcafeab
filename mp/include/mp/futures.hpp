// mp/futures.hpp - Python's concurrent.futures on mp::Pool's engine.
//
//   int square(int x) { return x * x; }
//
//   mp::ProcessPoolExecutor ex{{.max_workers = 4}};     // options aggregate; 0 = cpu_count()
//   mp::Future<int> f = ex.submit(square, 7);           // apply_async underneath
//   f.result();  f.result(2s);  f.exception();          // exception(): nullptr on success
//   f.done();  f.cancelled();  f.cancel();  f.add_done_callback([](mp::Future<int>&) {...});
//   std::vector<int> r = ex.map(square, items);         // in input order (eager vector)
//   for (auto& g : mp::as_completed(futures, 10s)) ...  // completion order (eager vector)
//   auto [done, not_done] = mp::wait(futures, 5s, mp::FIRST_COMPLETED);
//   ex.shutdown(/*wait=*/true, /*cancel_futures=*/false);  // or let the destructor do it
//   ex.terminate_workers();  ex.kill_workers();         // Python 3.14
//
// ExecutorOptions maps onto mp::Pool's constructor: max_workers -> processes,
// mp_context -> context (empty: the default start method), initializer -> initializer,
// max_tasks_per_child -> maxtasksperchild. Tasks obey mp::Pool's rules (mp/pool.hpp):
// plain functions or capture-less lambdas, serializable arguments and results.
//
// Differences from Python, on purpose or from the engine:
// - A worker that dies in a task fails only that task's future with mp::WorkerLostError;
//   the pool starts a new worker and the executor goes on. Python breaks the whole
//   executor (BrokenProcessPool) and fails every pending future.
// - A task's exception reaches result() rethrown and exception() as mp::RemoteError (type
//   name, message and pid of the worker), as with mp::Pool.
// - Every submit() goes to the pool at once, and the engine does not report when a worker
//   picks a task up. So running() is always false: a future is pending until it is done.
//   cancel() succeeds on any future that is not done yet (Python's pending futures): the
//   future is cancelled at once (result() throws mp::CancelledError, callbacks run), but
//   the work itself still runs in a worker and its result is discarded. It fails (false)
//   once the future is done.
// - The engine may give a task to a worker that is still busy with an earlier one (it
//   keeps each worker's inbox ahead), so a task that blocks can hold up tasks submitted
//   after it on the same worker. Do not make a task wait for one submitted later.
// - shutdown(cancel_futures=true) cancels, in that sense, every future not done yet.
// - map() is eager: it submits every item, then waits for all and returns a vector (the
//   timeout counts from the call, as in Python). as_completed() is eager too: it returns
//   every future in completion order once all are done, or throws mp::TimeoutError.
// - terminate_workers() is mp::Pool::terminate() (SIGTERM, then SIGKILL after a grace);
//   kill_workers() sends SIGKILL to the current workers first. Both fail every unfinished
//   future with mp::CancelledError.
// - Callbacks (add_done_callback) run on the pool's callback thread, or at once in the
//   calling thread if the future is already done; their exceptions are ignored.
#pragma once

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <utility>
#include <vector>

#include "mp/context.hpp"
#include "mp/detail/futures_state.hpp"
#include "mp/error.hpp"
#include "mp/pool.hpp"
#include "mp/sync.hpp"  // detail::deadline_from: the one timeout-to-deadline rule

namespace mp {

template <class R>
class Future {
 public:
  Future() = default;
  explicit Future(std::shared_ptr<detail::FutureState<R>> s) : state_(std::move(s)) {}

  // Waits and returns the value, or rethrows the task's error (RemoteError,
  // WorkerLostError), or throws CancelledError when cancelled. With a timeout, throws
  // TimeoutError when not done in time.
  R result(std::optional<Seconds> timeout = std::nullopt) const {
    wait_done(timeout, "result");
    if (cancelled()) throw CancelledError("cannot get the result of a future: it was cancelled");
    return state().get();
  }
  // Waits and returns the task's error, nullptr on success; CancelledError / TimeoutError
  // as result().
  std::exception_ptr exception(std::optional<Seconds> timeout = std::nullopt) const {
    wait_done(timeout, "exception");
    if (cancelled()) {
      throw CancelledError("cannot get the exception of a future: it was cancelled");
    }
    return state().error();
  }
  bool done() const { return state().done(); }
  // Always false: see the header comment.
  bool running() const {
    (void)state();
    return false;
  }
  bool cancelled() const {
    return state().phase() == detail::FutureStateBase::Phase::cancelled;
  }
  // True when cancelled (now or before); false once done with a result or an error.
  bool cancel() { return state().cancel(); }
  // fn(future) when the future is done or cancelled; at once when it already is.
  void add_done_callback(std::function<void(Future&)> fn) {
    state().add_done_callback([self = *this, fn = std::move(fn)]() mutable { fn(self); });
  }

  detail::FutureStateBase& base() const { return state(); }
  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  detail::FutureState<R>& state() const {
    if (!state_) throw ProcessError("cannot use an empty Future");
    return *state_;
  }
  void wait_done(std::optional<Seconds> timeout, const char* what) const {
    if (!state().wait_until(detail::deadline_from(timeout))) {
      throw TimeoutError(fmt::format("cannot get the {} of a future: not done after {}s", what,
                                     timeout->count()));
    }
  }
  std::shared_ptr<detail::FutureState<R>> state_;
};

struct ExecutorOptions {
  std::size_t max_workers = 0;  // 0: cpu_count()
  std::optional<Context> mp_context{};  // empty: the default start method
  Initializer initializer{};
  std::size_t max_tasks_per_child = 0;  // 0: never replaced
};

class ProcessPoolExecutor {
 public:
  explicit ProcessPoolExecutor(ExecutorOptions options = {})
      : pool_(make_pool(options)) {}
  ProcessPoolExecutor(const ProcessPoolExecutor&) = delete;
  ProcessPoolExecutor& operator=(const ProcessPoolExecutor&) = delete;
  // shutdown(wait=true), as Python's `with` block.
  ~ProcessPoolExecutor() {
    try {
      shutdown(true);
    } catch (...) {
    }
  }

  // Schedules f(args...); throws std::runtime_error after shutdown (Python's RuntimeError).
  template <class F, class... Args>
  requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
  Future<detail::task_result_t<F, Args...>> submit(F&& f, Args&&... args) {
    using R = detail::task_result_t<F, Args...>;
    std::lock_guard lock(mutex_);
    if (shut_) throw std::runtime_error("cannot submit a task: the executor is shut down");
    auto state = std::make_shared<detail::FutureState<R>>();
    typename AsyncResult<R>::Callback on_value;
    if constexpr (std::is_void_v<R>) {
      on_value = [state] { state->set_value({}); };
    } else {
      on_value = [state](const R& v) { state->set_value(v); };
    }
    auto on_error = [state](const std::exception&) { state->set_error(std::current_exception()); };
    pool_->apply_async(std::forward<F>(f), std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...),
                       std::move(on_value), std::move(on_error));
    forget_done();
    states_.push_back(state);
    return Future<R>(std::move(state));
  }

  // f(item) for each item, results in input order; the first failing item's error is
  // rethrown; TimeoutError when the results are not all there `timeout` after the call.
  template <class F, std::ranges::input_range Items>
  auto map(F&& f, Items&& items, std::optional<Seconds> timeout = std::nullopt) {
    auto deadline = detail::deadline_from(timeout);
    using V = std::ranges::range_value_t<Items>;
    using R = detail::task_result_t<F, V>;
    std::vector<Future<R>> futures;
    for (auto&& item : items) futures.push_back(submit(f, static_cast<const V&>(item)));
    std::vector<R> out;
    out.reserve(futures.size());
    for (auto& fut : futures) {
      if (!fut.base().wait_until(deadline)) {
        for (auto& g : futures) g.cancel();
        throw TimeoutError("cannot map: the results are not all there in time");
      }
      out.push_back(fut.result());
    }
    return out;
  }

  // No more submissions. cancel_futures: cancel every future not done yet. wait: return
  // when every worker has ended (all submitted work ran).
  void shutdown(bool wait = true, bool cancel_futures = false) {
    std::vector<std::shared_ptr<detail::FutureStateBase>> states;
    {
      std::lock_guard lock(mutex_);
      if (cancel_futures) states = states_;
      if (!shut_) {
        shut_ = true;
        pool_->close();
      }
    }
    for (auto& s : states) s->cancel();
    if (wait && !joined_.exchange(true)) pool_->join();
  }

  // Stops the workers now (SIGTERM, then SIGKILL); unfinished futures fail with
  // CancelledError.
  void terminate_workers() {
    {
      std::lock_guard lock(mutex_);
      shut_ = true;
    }
    pool_->terminate();
    joined_ = true;
  }
  // The same with SIGKILL at once.
  void kill_workers() {
    for (pid_t pid : pool_->worker_pids()) ::kill(pid, SIGKILL);
    terminate_workers();
  }

  // The pool underneath (its worker_pids(), processes()).
  const Pool& pool() const noexcept { return *pool_; }

 private:
  static std::unique_ptr<Pool> make_pool(const ExecutorOptions& o) {
    int n = static_cast<int>(o.max_workers);
    int per = static_cast<int>(o.max_tasks_per_child);
    if (o.mp_context) return std::make_unique<Pool>(n, o.initializer, per, *o.mp_context);
    return std::make_unique<Pool>(n, o.initializer, per);
  }
  void forget_done() {
    std::erase_if(states_, [](const auto& s) { return s->done(); });
  }

  std::unique_ptr<Pool> pool_;
  std::mutex mutex_;
  bool shut_ = false;
  std::atomic<bool> joined_{false};
  std::vector<std::shared_ptr<detail::FutureStateBase>> states_;
};

// ---- waiting for many futures
enum ReturnWhen { FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED };

template <class R>
struct WaitResult {
  std::vector<Future<R>> done;
  std::vector<Future<R>> not_done;
};

namespace detail {
// Counts completions of a set of futures (their callbacks notify it).
struct CompletionWaiter {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::size_t> order;  // indices, in completion order
};

// A waiter that every future reports its completion to, by index (at once if done already).
template <class Futures>
std::shared_ptr<CompletionWaiter> watch_completions(const Futures& futures) {
  auto w = std::make_shared<CompletionWaiter>();
  for (std::size_t i = 0; i < futures.size(); ++i) {
    futures[i].base().add_done_callback([w, i] {
      {
        std::lock_guard lock(w->mutex);
        w->order.push_back(i);
      }
      w->cv.notify_all();
    });
  }
  return w;
}
}  // namespace detail

// Every future, in the order they complete (cancelled ones count as complete). Throws
// TimeoutError when they are not all done within `timeout`.
template <class R>
std::vector<Future<R>> as_completed(std::vector<Future<R>> futures,
                                    std::optional<Seconds> timeout = std::nullopt) {
  auto deadline = detail::deadline_from(timeout);
  auto w = detail::watch_completions(futures);
  std::unique_lock lock(w->mutex);
  auto all = [&] { return w->order.size() == futures.size(); };
  if (!deadline) {
    w->cv.wait(lock, all);
  } else if (!w->cv.wait_until(lock, *deadline, all)) {
    throw TimeoutError(fmt::format("cannot complete as_completed: {} of {} futures unfinished",
                                   futures.size() - w->order.size(), futures.size()));
  }
  std::vector<Future<R>> out;
  out.reserve(futures.size());
  for (std::size_t i : w->order) out.push_back(futures[i]);
  return out;
}

// Waits until `return_when` holds or the timeout passes; {done, not_done}, each in the
// order given. FIRST_EXCEPTION: until a future fails (or all are done).
template <class R>
WaitResult<R> wait(const std::vector<Future<R>>& futures,
                   std::optional<Seconds> timeout = std::nullopt,
                   ReturnWhen return_when = ALL_COMPLETED) {
  auto deadline = detail::deadline_from(timeout);
  auto w = detail::watch_completions(futures);
  auto failed = [&](std::size_t i) {
    const auto& b = futures[i].base();
    return b.phase() == detail::FutureStateBase::Phase::finished && b.error() != nullptr;
  };
  auto satisfied = [&] {
    if (w->order.size() == futures.size()) return true;
    if (return_when == FIRST_COMPLETED) return !w->order.empty();
    if (return_when == FIRST_EXCEPTION) {
      for (std::size_t i : w->order) {
        if (failed(i)) return true;
      }
    }
    return false;
  };
  {
    std::unique_lock lock(w->mutex);
    if (!deadline) {
      w->cv.wait(lock, satisfied);
    } else {
      w->cv.wait_until(lock, *deadline, satisfied);
    }
  }
  WaitResult<R> r;
  for (const auto& f : futures) (f.done() ? r.done : r.not_done).push_back(f);
  return r;
}

}  // namespace mp
