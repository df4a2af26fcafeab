// mp/detail/futures_state.hpp - the shared state behind mp::Future (see mp/futures.hpp).
#pragma once

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace mp::detail {

using FutureClock = std::chrono::steady_clock;

// What every future shares whatever its result type: the state, the waiters, the callbacks.
class FutureStateBase {
 public:
  enum class Phase { pending, cancelled, finished };

  virtual ~FutureStateBase() = default;

  // Called on the pool's callback thread when the task's result (or error) arrived.
  // `store` writes the value or error under the lock; ignored once cancelled.
  template <class Store>
  void finish(Store&& store) {
    std::vector<std::function<void()>> run;
    {
      std::lock_guard lock(mutex_);
      if (phase_ != Phase::pending) return;  // cancelled: the result is discarded
      store();
      phase_ = Phase::finished;
      run.swap(callbacks_);
    }
    cv_.notify_all();
    for (auto& fn : run) call_quietly(fn);
  }

  bool cancel() {
    std::vector<std::function<void()>> run;
    {
      std::lock_guard lock(mutex_);
      if (phase_ == Phase::finished) return false;
      if (phase_ == Phase::cancelled) return true;
      phase_ = Phase::cancelled;
      run.swap(callbacks_);
    }
    cv_.notify_all();
    for (auto& fn : run) call_quietly(fn);
    return true;
  }

  Phase phase() const {
    std::lock_guard lock(mutex_);
    return phase_;
  }
  bool done() const { return phase() != Phase::pending; }

  // Waits until done or the deadline; returns whether done.
  bool wait_until(std::optional<FutureClock::time_point> deadline) const {
    std::unique_lock lock(mutex_);
    auto is_done = [&] { return phase_ != Phase::pending; };
    if (!deadline) {
      cv_.wait(lock, is_done);
      return true;
    }
    return cv_.wait_until(lock, *deadline, is_done);
  }

  // Runs `fn` when done, or now (in this thread) when already done.
  void add_done_callback(std::function<void()> fn) {
    {
      std::lock_guard lock(mutex_);
      if (phase_ == Phase::pending) {
        callbacks_.push_back(std::move(fn));
        return;
      }
    }
    call_quietly(fn);
  }

  std::exception_ptr error() const {
    std::lock_guard lock(mutex_);
    return error_;
  }

 protected:
  // Python logs and ignores an exception thrown by a done callback; so does mp (to stderr
  // would need a logger: it is ignored).
  static void call_quietly(std::function<void()>& fn) noexcept {
    try {
      fn();
    } catch (...) {
    }
  }

  mutable std::mutex mutex_;
  mutable std::condition_variable cv_;
  Phase phase_ = Phase::pending;
  std::exception_ptr error_;
  std::vector<std::function<void()>> callbacks_;
};

template <class R>
class FutureState final : public FutureStateBase {
 public:
  using Stored = std::conditional_t<std::is_void_v<R>, std::monostate, R>;

  void set_value(Stored v) {
    finish([&] { value_.emplace(std::move(v)); });
  }
  void set_error(std::exception_ptr e) {
    finish([&] { error_ = std::move(e); });
  }
  // After done and not cancelled: a copy of the value, or the error rethrown.
  R get() const {
    std::lock_guard lock(mutex_);
    if (error_) std::rethrow_exception(error_);
    if constexpr (!std::is_void_v<R>) return *value_;
  }

 private:
  std::optional<Stored> value_;
};

}  // namespace mp::detail
