// 7_integration/pool_awaitable.hpp - mp::Pool tasks awaited by C++20 coroutines on an Asio
// event loop (asio::awaitable), one at a time or as they complete, with timeouts.
//
//   asio::awaitable<void> story(mp::Pool& pool) {
//     int n = co_await pool_await::apply(pool, count_primes, 100'000);      // one task
//     int m = co_await pool_await::apply_for(pool, 2s, count_primes, 10);  // or mp::TimeoutError
//     pool_await::TaskGroup<int> group{pool, co_await asio::this_coro::executor};
//     for (int x : inputs) group.start(count_primes, x);
//     while (group.unfinished() > 0) {
//       auto done = co_await group.next(5s);     // the next to finish, or mp::TimeoutError
//       try {
//         use(done.index, done.get());           // the value, or the task's error rethrown
//       } catch (const mp::RemoteError& e) { ... }
//     }
//   }
//   asio::io_context io;                         // declared first: the loop outlives the pool
//   mp::Pool pool{4};
//   asio::co_spawn(io, story(pool), asio::detached);
//   io.run();
//
// How it works. start() is apply_async() with a callback and an error callback. Both run
// on the pool's callback thread and only post the outcome to the loop's executor; the
// coroutine waiting in next() resumes on the loop's thread. A pending task holds no thread
// and no loop resource beyond a queued handler: a thousand pending tasks cost what one does.
// The error callback runs while the task's error is being handled, so
// std::current_exception() there is the error itself, with its type (mp::RemoteError,
// mp::WorkerLostError, mp::CancelledError), rethrown in the coroutine by get().
//
// Rules. The loop must be run by one thread (the event-loop model of asyncio). The
// io_context must outlive the pool: a pool that is destroyed fails what is unfinished with
// mp::CancelledError and posts that to the loop. A timeout ends the wait, not the task: the
// worker goes on with it, and its result, when it comes, is dropped (as with
// asyncio.wait_for over run_in_executor; a running pool task cannot be cancelled).
#pragma once

#include <fmt/format.h>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mp/error.hpp>
#include <mp/pool.hpp>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

namespace pool_await {

// One finished task: which one (the order of start(), from 0) and how it ended.
template <class R>
struct Finished {
  std::size_t index = 0;
  std::optional<R> value;
  std::exception_ptr error;

  // The value, or the task's error rethrown (mp::RemoteError, mp::WorkerLostError...).
  R get() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};

// Tasks of one result type, started on a pool and awaited in the order they finish
// (asyncio.as_completed, concurrent.futures.as_completed).
template <class R>
class TaskGroup {
  static_assert(!std::is_void_v<R>, "a TaskGroup's tasks must return a value");

 public:
  TaskGroup(mp::Pool& pool, asio::any_io_executor loop)
      : pool_(&pool), state_(std::make_shared<State>(std::move(loop))) {}

  // Submits f(args...) to the pool and returns its index. Does not wait.
  template <class F, class... Args>
  std::size_t start(F f, Args... args) {
    std::size_t index = started_++;
    // On the pool's callback thread: hand the outcome to the loop, nothing more.
    auto post = [state = state_](Finished<R> done) {
      asio::post(state->loop,
                 [state, done = std::move(done)]() mutable { state->arrive(std::move(done)); });
    };
    pool_->apply_async(
        f, std::tuple<Args...>{std::move(args)...},
        [post, index](const R& value) {
          post(Finished<R>{index, value, nullptr});
        },
        [post, index](const std::exception&) {
          post(Finished<R>{index, std::nullopt, std::current_exception()});
        });
    return index;
  }

  // Tasks started and not yet returned by next().
  std::size_t unfinished() const noexcept { return started_ - taken_; }

  // Waits for the next task to finish, at most `timeout` (mp::TimeoutError then; the tasks
  // go on and a later next() can still return them). Throws std::logic_error when no task
  // is unfinished.
  asio::awaitable<Finished<R>> next(std::optional<mp::Seconds> timeout = std::nullopt) {
    if (unfinished() == 0) throw std::logic_error("cannot await the next task: none is left");
    std::shared_ptr<State> state = state_;
    Finished<R> done;
    if (!state->finished.empty()) {
      done = std::move(state->finished.front());
      state->finished.pop_front();
    } else {
      // Named, not a temporary inside the co_await: GCC 12 destroys a lambda passed to
      // async_initiate in a co_await expression twice (chriskohlhoff/asio#1007), which
      // released `state` twice and freed it under the tasks still running.
      auto park = [state, timeout](auto handler) { state->wait(std::move(handler), timeout); };
      auto arrival = asio::async_initiate<const asio::use_awaitable_t<>&,
                                          void(std::exception_ptr, Finished<R>)>(
          std::move(park), asio::use_awaitable);
      done = co_await std::move(arrival);
    }
    ++taken_;
    co_return done;
  }

 private:
  // Shared with the callbacks of the tasks still running; used on the loop's thread only.
  struct State : std::enable_shared_from_this<State> {
    explicit State(asio::any_io_executor ex) : loop(std::move(ex)), timer(loop) {}

    // Parks the waiting coroutine's handler, with a timer when there is a timeout.
    template <class Handler>
    void wait(Handler handler, std::optional<mp::Seconds> timeout) {
      auto h = std::make_shared<Handler>(std::move(handler));
      waiter = [h](std::exception_ptr e, Finished<R> f) { std::move (*h)(e, std::move(f)); };
      std::uint64_t mine = ++generation;
      if (!timeout) return;
      timer.expires_after(std::chrono::duration_cast<asio::steady_timer::duration>(*timeout));
      // weak: the timer lives in the state, and must not keep it alive.
      timer.async_wait(
          [weak = this->weak_from_this(), mine, t = timeout->count()](std::error_code ec) {
            auto self = weak.lock();
            // Cancelled, or a task arrived first and this wait is over.
            if (ec || !self || self->generation != mine || !self->waiter) return;
            std::exchange(self->waiter, nullptr)(
                std::make_exception_ptr(mp::TimeoutError(
                    fmt::format("cannot await the next task: none finished within {} s", t))),
                Finished<R>{});
          });
    }

    // A task's outcome, posted by its callback: to the waiting coroutine, or to the queue.
    void arrive(Finished<R> done) {
      if (!waiter) {
        finished.push_back(std::move(done));
        return;
      }
      ++generation;  // a timer that has fired but not yet run must not complete this wait
      timer.cancel();
      std::exchange(waiter, nullptr)(nullptr, std::move(done));
    }

    asio::any_io_executor loop;
    asio::steady_timer timer;
    std::deque<Finished<R>> finished;  // arrived, not yet returned by next()
    std::function<void(std::exception_ptr, Finished<R>)> waiter;
    std::uint64_t generation = 0;  // one per wait, so a stale timer is recognised
  };

  mp::Pool* pool_;
  std::shared_ptr<State> state_;
  std::size_t started_ = 0;
  std::size_t taken_ = 0;
};

template <class F, class... Args>
using result_t = std::decay_t<std::invoke_result_t<F&, Args&...>>;

// One task, awaited: co_await apply(pool, f, args...) is f(args...) run by a worker.
template <class F, class... Args>
asio::awaitable<result_t<F, Args...>> apply(mp::Pool& pool, F f, Args... args) {
  TaskGroup<result_t<F, Args...>> one{pool, co_await asio::this_coro::executor};
  one.start(std::move(f), std::move(args)...);
  auto done = co_await one.next();
  co_return done.get();
}

// The same, throwing mp::TimeoutError when the result takes longer than `timeout`.
template <class F, class... Args>
asio::awaitable<result_t<F, Args...>> apply_for(mp::Pool& pool, mp::Seconds timeout, F f,
                                                Args... args) {
  TaskGroup<result_t<F, Args...>> one{pool, co_await asio::this_coro::executor};
  one.start(std::move(f), std::move(args)...);
  auto done = co_await one.next(timeout);
  co_return done.get();
}

}  // namespace pool_await
