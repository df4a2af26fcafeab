// mp/pool.hpp - a pool of worker processes with Python's multiprocessing.Pool interface.
//
//   int square(int x) { return x * x; }
//
//   mp::Pool pool{4};                                   // 4 workers (default: cpu_count())
//   std::vector<int> r = pool.map(square, items);       // blocks; results in input order
//   int one = pool.apply(square, 7);                    // one call, blocking
//   auto ar = pool.apply_async(square, 7);              // mp::AsyncResult<int>
//   ar.get();  ar.get(2s);  ar.wait(1s);  ar.ready();   // get(timeout) throws TimeoutError
//   for (int v : pool.imap(square, items)) ...          // results in order, as they arrive
//   for (int v : pool.imap_unordered(square, items)) ...// results as they finish
//   pool.starmap(power, std::vector<std::tuple<int, int>>{{2, 10}, {3, 3}});
//   pool.close();  pool.join();                         // or let the destructor terminate
//
// Tasks are plain functions or lambdas without captures, with arguments and results that
// mp can serialize (mp/serialize.hpp): they run in other processes, started with fork,
// spawn or forkserver, so they travel as data - a code address relative to the program
// plus the argument bytes - the same way mp::Process targets do. Arguments that own a
// descriptor (a Queue, a Lock) cannot be task arguments; pass them to the initializer.
//
// Errors. An exception thrown by a task reaches get(), map() or the imap iterator as
// mp::RemoteError (its type name, message and the worker's pid); the pool goes on.
//
// Crash safety (where Python's Pool hangs for ever, bpo-22393). A worker that dies while
// it runs a task - SIGKILL, a segfault, _exit() - fails exactly that task (that chunk) with
// mp::WorkerLostError (pid, signal or exit status, and which tasks), the pool starts a new
// worker, and every other task completes: tasks the dead worker had been given but had not
// started are handed to other workers. Nothing is lost silently and nothing runs twice.
// map() raises WorkerLostError instead of hanging; imap yields it at that task's position.
//
// How it works. The pool owns one service thread in this process that dispatches tasks,
// collects results, replaces workers and watches them die (pidfds). Each worker has an
// inbox and an outbox: byte rings in shared memory (a memfd: nothing in /dev/shm). The
// service thread assigns each chunk to one worker; the worker writes the id of the chunk
// it is about to run into its own shared slot before it runs it, so when it dies the pool
// knows exactly which chunk was running (failed) and which were still waiting (handed on).
// Both sides spin briefly, then sleep (futex for workers, poll() for the service thread);
// a busy pool makes no system call per task. Callbacks run on a second pool thread, so a
// slow callback never stalls the results of other tasks.
//
// Lifetime. close() refuses new work and lets the workers finish what was submitted;
// terminate() stops them now (SIGTERM, then SIGKILL) and fails every unfinished result
// with mp::CancelledError; join() waits for either. The destructor calls terminate(), as
// Python's `with Pool() as pool:` does - get your results before the pool goes away.
// Workers die with the thread that started them (PR_SET_PDEATHSIG, see mp/process.hpp):
// the first ones with the thread that constructed the pool, replacements with the pool's
// own thread. Construct a pool in a thread that outlives it (main, typically); if that
// thread ends first, its workers die, their tasks fail with WorkerLostError and the pool
// replaces them. With maxtasksperchild = N a worker exits after N tasks (chunks) and is
// replaced; it is never given more than it will run, so no task is stranded.
//
// Callbacks (callback, error_callback) are called exactly once per result, in this
// process, on the pool's callback thread, before the result becomes ready(); they must not
// wait for other results of the same pool or join it. An error callback runs while the
// error is being handled: std::current_exception() there is the error itself, to rethrow
// elsewhere with its type (an event loop resuming the coroutine that awaits the result).
#pragma once

#include <fmt/format.h>
#include <sys/types.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "mp/context.hpp"
#include "mp/detail/portable.hpp"
#include "mp/error.hpp"
#include "mp/process.hpp"
#include "mp/serialize.hpp"

namespace mp {

// A result that will never come: the pool was terminated (or destroyed) before the task
// finished (Python's Pool leaves such results waiting for ever).
class CancelledError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A function each worker runs once when it starts, with its arguments (Python's
// initializer and initargs). Arguments may own descriptors (a Queue, a Lock, a Value): they
// are handed to every worker, including replacements, and kept open by the pool.
//   mp::Pool pool{4, {set_up, config}};
class Initializer {
 public:
  Initializer() noexcept = default;
  Initializer(std::nullptr_t) noexcept {}  // NOLINT: no initializer

  template <class F, class... Args>
  requires std::invocable < std::decay_t<F>
  &, std::decay_t<Args>&... >
         Initializer(F&& f, Args&&... args) {  // NOLINT: implicit, for {f, args...}
    using Fn = std::decay_t<F>;
    static_assert(detail::is_portable_v<Fn, std::decay_t<Args>...>,
                  "a pool initializer runs in every worker, which may be a fresh copy of the "
                  "program: it must be a plain function or a lambda without captures, with "
                  "serializable arguments");
    auto stored = std::make_shared<std::pair<Fn, std::tuple<std::decay_t<Args>...>>>(
        Fn(std::forward<F>(f)), std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...));
    target_ = std::make_shared<const detail::PortableTarget>(
        detail::make_portable(stored->first, stored->second));
    keep_ = std::move(stored);  // descriptors in the arguments stay open while the pool needs them
  }

  explicit operator bool() const noexcept { return target_ != nullptr; }
  const detail::PortableTarget* target() const noexcept { return target_.get(); }

 private:
  std::shared_ptr<const detail::PortableTarget> target_;
  std::shared_ptr<const void> keep_;
};

namespace detail {

class PoolEngine;

// Runs one task inside a worker: decodes the arguments, calls the target, appends the
// serialized result to `out`. Instantiated per task type, found again by code address.
using TaskTrampoline = void (*)(const void* target, std::string_view args, std::string& out);

template <class F>
F callable_at(const void* target) {
  if constexpr (std::is_pointer_v<F>) {
    return reinterpret_cast<F>(const_cast<void*>(target));
  } else {
    return F{};
  }
}

template <class F, class R, class... Args>
void task_trampoline(const void* target, std::string_view bytes, std::string& out) {
  auto args = loads<Args...>(bytes);
  F f = callable_at<F>(target);
  if constexpr (std::is_void_v<R>) {
    std::apply(f, args);
  } else {
    const R& r = std::apply(f, args);  // a temporary lives as long as the reference
    write_value(out, r);
  }
}

template <class F, class... Args>
using task_result_t = std::decay_t<std::invoke_result_t<std::decay_t<F>&, std::decay_t<Args>&...>>;

// Checks, at compile time, everything a task must satisfy to run in any worker.
template <class F, class R, class... Args>
constexpr void check_task() {
  static_assert(PortableCallable<F>,
                "a pool task runs in another process, possibly a fresh copy of the program: it "
                "must be a plain function or a lambda without captures");
  static_assert((Sendable<Args> && ...),
                "every argument of a pool task must be serializable (trivially copyable or "
                "supported by cereal) and not a pointer or std::ref");
  static_assert(std::is_void_v<R> || Sendable<R>,
                "the result of a pool task must be serializable (trivially copyable or "
                "supported by cereal) and not a pointer");
}

// A job is one submission: an apply (one task) or a map (many items, cut into chunks).
// The submitting thread builds it; the pool's service thread dispatches its chunks and
// delivers results into it; user threads wait on it.
class JobBase {
 public:
  virtual ~JobBase() = default;
  JobBase() = default;
  JobBase(const JobBase&) = delete;
  JobBase& operator=(const JobBase&) = delete;

  // ---- set before submission, constant afterwards
  std::uint32_t fn = 0;                  // the pool's function id
  std::string args;                      // items, each [u32 size][bytes]
  std::vector<std::size_t> item_offset;  // byte offset of each item, plus the end
  std::size_t items = 0;
  std::size_t chunksize = 1;
  const char* kind = "apply";  // what describe() calls it

  std::size_t chunks() const noexcept {
    return items == 0 ? 0 : (items + chunksize - 1) / chunksize;
  }
  std::size_t chunk_first(std::size_t c) const noexcept { return c * chunksize; }
  std::size_t chunk_count(std::size_t c) const noexcept {
    return std::min(chunksize, items - c * chunksize);
  }
  // "task 7 of map", "tasks 10..19 of imap", "the apply task"
  std::string describe(std::size_t first, std::size_t count) const;

  // ---- service thread only
  std::size_t next_chunk = 0;   // chunks handed out so far (not counting re-dispatches)
  std::size_t chunks_left = 0;  // chunks not yet answered (result or error)

  // Decodes a result frame's items into the job (values and RemoteErrors), under the lock,
  // then wakes waiters. `pid` is the worker's.
  void deliver(std::size_t first, std::size_t count, std::string_view payload, pid_t pid);
  // Fails items [first, first + count) with `error`.
  void fail(std::size_t first, std::size_t count, const std::exception_ptr& error);
  // Whether complete() must run on the callback thread.
  virtual bool has_callbacks() const noexcept { return false; }
  // Every item is answered: run the callbacks (if any), then become ready.
  virtual void complete() = 0;

  // ---- waiting
  bool is_ready() {
    std::lock_guard lock(mutex_);
    return ready_;
  }
  void wait_ready() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return ready_; });
  }
  bool wait_ready(Seconds timeout) {
    std::unique_lock lock(mutex_);
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                        std::min(timeout, Seconds(1e9)));
    return cv_.wait_until(lock, deadline, [&] { return ready_; });
  }

 protected:
  // Called under mutex_, by deliver() and fail().
  virtual void set_value(std::size_t index, std::string_view bytes) = 0;
  virtual void set_error(std::size_t index, std::exception_ptr error) = 0;
  void mark_ready() {
    {
      std::lock_guard lock(mutex_);
      ready_ = true;
    }
    cv_.notify_all();
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  bool ready_ = false;
};

// Appends one item, [u32 size][the values' bytes], to a job's argument bytes.
template <class... Ts>
void append_item(JobBase& job, const Ts&... values) {
  std::size_t at = job.args.size();
  job.item_offset.push_back(at);
  job.args.append(sizeof(std::uint32_t), '\0');
  dump_into(job.args, values...);
  std::size_t size = job.args.size() - at - sizeof(std::uint32_t);
  if (size > UINT32_MAX) {
    throw std::length_error("cannot submit a pool task: its arguments exceed 4 GiB");
  }
  auto s32 = static_cast<std::uint32_t>(size);
  std::memcpy(job.args.data() + at, &s32, sizeof s32);
  ++job.items;
}

// Room for the items of a sized range, so that the argument bytes are not regrown.
template <class V, class Items>
void reserve_items(JobBase& job, const Items& items) {
  if constexpr (std::ranges::sized_range<Items>) {
    auto n = static_cast<std::size_t>(std::ranges::size(items));
    job.item_offset.reserve(n + 1);
    if constexpr (std::is_trivially_copyable_v<V>)
      job.args.reserve(n * (sizeof(std::uint32_t) + sizeof(V)));
  }
}

// A job with one final value of type T (T = R for apply, std::vector<R> for map).
template <class T>
struct ResultCallback {
  using type = std::function<void(const T&)>;
};
template <>
struct ResultCallback<void> {
  using type = std::function<void()>;
};

template <class T>
class ResultJob : public JobBase {
 public:
  using Stored = std::conditional_t<std::is_void_v<T>, std::monostate, T>;
  // (a trait, not conditional_t: std::function<void(const void&)> must not be formed)
  using Callback = typename ResultCallback<T>::type;
  using ErrorCallback = std::function<void(const std::exception&)>;

  Callback callback;
  ErrorCallback error_callback;

  bool has_callbacks() const noexcept override { return callback || error_callback; }

  void complete() override {
    finalize();
    if (error_) {
      if (error_callback)
        run_callback([&] {
          try {
            std::rethrow_exception(error_);
          } catch (const std::exception& e) {
            error_callback(e);
          }
        });
    } else if (callback) {
      if constexpr (std::is_void_v<T>) {
        run_callback([&] { callback(); });
      } else {
        run_callback([&] { callback(*value_); });
      }
    }
    mark_ready();
  }

  // After ready: the value (copied) or the error (rethrown).
  T get_copy() {
    if (error_) std::rethrow_exception(error_);
    if constexpr (!std::is_void_v<T>) return *value_;
  }
  T take() {
    if (error_) std::rethrow_exception(error_);
    if constexpr (!std::is_void_v<T>) return std::move(*value_);
  }
  T take_after_wait() {
    wait_ready();
    return take();
  }
  bool succeeded() const noexcept { return !error_; }

 protected:
  // Turns what deliver()/fail() stored into value_ or error_. Called once, before callbacks.
  virtual void finalize() {}

  template <class Fn>
  static void run_callback(Fn&& fn) noexcept {
    try {
      fn();
    } catch (const std::exception& e) {
      report_noexcept(std::string("a pool callback threw: ") + e.what());
    } catch (...) {
      report_noexcept("a pool callback threw an exception that is not a std::exception");
    }
  }

  std::optional<Stored> value_;
  std::exception_ptr error_;
};

// apply / apply_async: one item.
template <class R>
class ApplyJob final : public ResultJob<R> {
 protected:
  void set_value(std::size_t, std::string_view bytes) override {
    if constexpr (std::is_void_v<R>) {
      if (!bytes.empty()) throw SerializationError("cannot deserialize: unexpected result bytes");
      this->value_.emplace();
    } else {
      this->value_.emplace(load<R>(bytes));
    }
  }
  void set_error(std::size_t, std::exception_ptr error) override {
    this->error_ = std::move(error);
  }
};

// map / map_async / starmap: many items, one vector. The error reported is the one of the
// lowest failing item; the result is ready when every item has been answered.
template <class R>
class MapJob final : public ResultJob<std::vector<R>> {
 public:
  void prepare() { parts_.resize(this->items); }

 protected:
  void set_value(std::size_t i, std::string_view bytes) override {
    parts_[i].emplace(load<R>(bytes));
  }
  void set_error(std::size_t i, std::exception_ptr error) override {
    if (!first_error_ || i < error_index_) {
      first_error_ = std::move(error);
      error_index_ = i;
    }
  }
  void finalize() override {
    if (first_error_) {
      this->error_ = first_error_;
      parts_.clear();
      return;
    }
    std::vector<R> out;
    out.reserve(parts_.size());
    for (auto& p : parts_) out.push_back(std::move(*p));
    parts_.clear();
    this->value_.emplace(std::move(out));
  }

 private:
  std::vector<std::optional<R>> parts_;
  std::exception_ptr first_error_;
  std::size_t error_index_ = 0;
};

// imap / imap_unordered: items handed out one by one as they arrive.
template <class R>
class IMapJob final : public JobBase {
 public:
  explicit IMapJob(bool ordered) : ordered_(ordered) {}
  void prepare() { slots_.resize(items); }

  void complete() override { mark_ready(); }

  // The next result; nullopt when every item has been handed out; throws the item's error.
  // With a deadline, throws TimeoutError when nothing arrives in time.
  std::optional<R> next(std::optional<std::chrono::steady_clock::time_point> deadline) {
    std::unique_lock lock(mutex_);
    if (taken_ == items) return std::nullopt;
    auto available = [&] { return ordered_ ? slots_[taken_].index() != 0 : !arrivals_.empty(); };
    if (deadline) {
      if (!cv_.wait_until(lock, *deadline, available)) {
        throw TimeoutError(fmt::format("cannot get result {} of {}: timed out", taken_, kind));
      }
    } else {
      cv_.wait(lock, available);
    }
    std::size_t i = ordered_ ? taken_ : arrivals_.front();
    if (!ordered_) arrivals_.pop_front();
    ++taken_;
    auto slot = std::exchange(slots_[i], {});
    if (slot.index() == 2) std::rethrow_exception(std::get<2>(slot));
    return std::move(std::get<1>(slot));
  }

 protected:
  void set_value(std::size_t i, std::string_view bytes) override {
    slots_[i].template emplace<1>(load<R>(bytes));
    if (!ordered_) arrivals_.push_back(i);
  }
  void set_error(std::size_t i, std::exception_ptr error) override {
    slots_[i].template emplace<2>(std::move(error));
    if (!ordered_) arrivals_.push_back(i);
  }

 private:
  bool ordered_;
  std::vector<std::variant<std::monostate, R, std::exception_ptr>> slots_;
  std::deque<std::size_t> arrivals_;
  std::size_t taken_ = 0;
};

// The engine's entry points used by the templates below (pool.cpp).
std::uint32_t pool_function_id(PoolEngine& engine, const void* trampoline, const void* target);
void pool_submit(PoolEngine& engine, std::shared_ptr<JobBase> job);
int pool_processes(const PoolEngine& engine);

// Python's default chunksize for map: len / (4 * processes), rounded up.
inline std::size_t default_chunksize(std::size_t items, int processes) {
  std::size_t per = 4 * static_cast<std::size_t>(processes);
  std::size_t chunk = items / per;
  if (items % per != 0) ++chunk;
  return chunk == 0 ? 1 : chunk;
}

template <class V>
struct tuple_args;
template <template <class...> class Tuple, class... Ts>
struct tuple_args<Tuple<Ts...>> {
  template <class F>
  using result = task_result_t<F, Ts...>;
  template <class F, class R>
  static constexpr TaskTrampoline trampoline = &task_trampoline<F, R, std::decay_t<Ts>...>;
  template <class F, class R>
  static constexpr void check() {
    check_task<F, R, std::decay_t<Ts>...>();
  }
};
template <class T, std::size_t N>
struct tuple_args<std::array<T, N>> {
  template <std::size_t>
  using same = T;
  template <std::size_t... I>
  static auto types(std::index_sequence<I...>) -> std::tuple<same<I>...>;
  using as_tuple = decltype(types(std::make_index_sequence<N>{}));
  template <class F>
  using result = typename tuple_args<as_tuple>::template result<F>;
  template <class F, class R>
  static constexpr TaskTrampoline trampoline = tuple_args<as_tuple>::template trampoline<F, R>;
  template <class F, class R>
  static constexpr void check() {
    tuple_args<as_tuple>::template check<F, R>();
  }
};

}  // namespace detail

// The result of apply_async / map_async / starmap_async (Python's AsyncResult).
// Copies share the same result.
template <class T>
class AsyncResult {
 public:
  using Callback = typename detail::ResultJob<T>::Callback;
  using ErrorCallback = typename detail::ResultJob<T>::ErrorCallback;

  AsyncResult() = default;
  explicit AsyncResult(std::shared_ptr<detail::ResultJob<T>> job) : job_(std::move(job)) {}

  // Waits for the result and returns it (a copy: get() may be called again), or throws the
  // task's error: RemoteError, WorkerLostError, CancelledError.
  T get() const {
    check();
    job_->wait_ready();
    return job_->get_copy();
  }
  // The same, throwing mp::TimeoutError when the result is not ready within `timeout`.
  T get(Seconds timeout) const {
    check();
    if (!job_->wait_ready(timeout)) {
      throw TimeoutError(fmt::format("cannot get the result of {}: not ready after {}s",
                                     job_->describe(0, job_->items), timeout.count()));
    }
    return job_->get_copy();
  }
  // Waits for the result; the timed form returns whether it is ready.
  void wait() const {
    check();
    job_->wait_ready();
  }
  bool wait(Seconds timeout) const {
    check();
    return job_->wait_ready(timeout);
  }
  bool ready() const {
    check();
    return job_->is_ready();
  }
  // Whether the task completed without an error. Throws ProcessError when not ready yet
  // (Python raises ValueError).
  bool successful() const {
    if (!ready()) throw ProcessError("cannot tell whether a result is successful: it is not ready");
    return job_->succeeded();
  }
  explicit operator bool() const noexcept { return job_ != nullptr; }

 private:
  void check() const {
    if (!job_) throw ProcessError("cannot use an empty AsyncResult");
  }
  std::shared_ptr<detail::ResultJob<T>> job_;
  friend class Pool;
};

// The lazy iterator imap and imap_unordered return (Python's IMapIterator).
//   auto it = pool.imap(f, items);
//   while (auto r = it.next()) use(*r);        // or: for (auto& r : pool.imap(f, items))
// next() blocks for the next result; it throws that item's error (RemoteError,
// WorkerLostError...) and the following call goes on with the next item.
template <class R>
class IMapIterator {
 public:
  explicit IMapIterator(std::shared_ptr<detail::IMapJob<R>> job) : job_(std::move(job)) {}

  // The next result, or std::nullopt when all have been returned.
  std::optional<R> next() { return job_->next(std::nullopt); }
  // The same; throws mp::TimeoutError when the next result does not arrive in time.
  std::optional<R> next(Seconds timeout) {
    return job_->next(std::chrono::steady_clock::now() +
                      std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                          std::min(timeout, Seconds(1e9))));
  }
  // How many results this iterator yields in all.
  std::size_t size() const noexcept { return job_->items; }

  class iterator {
   public:
    using value_type = R;
    using difference_type = std::ptrdiff_t;
    iterator() = default;
    explicit iterator(IMapIterator* owner) : owner_(owner) { current_ = owner_->next(); }
    R& operator*() { return *current_; }
    R* operator->() { return &*current_; }
    iterator& operator++() {
      current_.reset();
      current_ = owner_->next();
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& it, std::default_sentinel_t) noexcept {
      return !it.current_;
    }

   private:
    IMapIterator* owner_ = nullptr;
    std::optional<R> current_;
  };
  iterator begin() { return iterator(this); }
  std::default_sentinel_t end() const noexcept { return {}; }

 private:
  std::shared_ptr<detail::IMapJob<R>> job_;
};

class Pool {
 public:
  // `processes` workers (0: cpu_count()), each running `initializer` once when it starts,
  // each replaced after `maxtasksperchild` tasks (0: never), created with the default
  // start method or `context`. Throws std::invalid_argument for a negative count,
  // system_error or ProcessError when the workers cannot be started.
  explicit Pool(int processes = 0, Initializer initializer = {}, int maxtasksperchild = 0);
  Pool(int processes, Initializer initializer, int maxtasksperchild, const Context& context);
  Pool(Pool&&) noexcept;
  Pool& operator=(Pool&&) noexcept;
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  // Terminates the pool (as Python's context manager does) and joins it.
  ~Pool();

  // ---- one call
  template <class F, class... Args>
  requires std::invocable < std::decay_t<F>
  &, std::decay_t<Args>&... > detail::task_result_t<F, Args...> apply(F&& f, Args&&... args) {
    return apply_async(std::forward<F>(f), std::forward<Args>(args)...).job_->take_after_wait();
  }

  template <class F, class... Args>
  requires std::invocable < std::decay_t<F>
  &, std::decay_t<Args>&... >
         AsyncResult<detail::task_result_t<F, Args...>> apply_async(F&& f, Args&&... args) {
    using R = detail::task_result_t<F, Args...>;
    return apply_async_impl<R, std::decay_t<F>, std::decay_t<Args>...>(
        std::decay_t<F>(std::forward<F>(f)), {}, {}, std::forward<Args>(args)...);
  }

  // With callbacks, Python style: pool.apply_async(f, std::tuple{1, 2}, on_result, on_error).
  template <class F, class... Args>
  requires std::invocable < std::decay_t<F>
  &, Args&... > AsyncResult<detail::task_result_t<F, Args...>> apply_async(
                    F&& f, std::tuple<Args...> args,
                    typename AsyncResult<detail::task_result_t<F, Args...>>::Callback callback,
                    typename AsyncResult<detail::task_result_t<F, Args...>>::ErrorCallback
                        error_callback = {}) {
    using R = detail::task_result_t<F, Args...>;
    return std::apply(
        [&](auto&&... a) {
          return apply_async_impl<R, std::decay_t<F>, std::decay_t<Args>...>(
              std::decay_t<F>(f), std::move(callback), std::move(error_callback), std::move(a)...);
        },
        std::move(args));
  }

  // ---- many calls: f(item) for each item
  template <class F, std::ranges::input_range Items>
  auto map(F&& f, Items&& items, std::size_t chunksize = 0) {
    return map_async(std::forward<F>(f), std::forward<Items>(items), chunksize)
        .job_->take_after_wait();
  }

  template <class F, std::ranges::input_range Items,
            class R = detail::task_result_t<F, std::ranges::range_value_t<Items>>>
  AsyncResult<std::vector<R>> map_async(
      F&& f, Items&& items, std::size_t chunksize = 0,
      typename AsyncResult<std::vector<R>>::Callback callback = {},
      typename AsyncResult<std::vector<R>>::ErrorCallback error_callback = {}) {
    using V = std::decay_t<std::ranges::range_value_t<Items>>;
    using Fn = std::decay_t<F>;
    detail::check_task<Fn, R, V>();
    static_assert(!std::is_void_v<R>, "map needs a function that returns a value");
    auto job = std::make_shared<detail::MapJob<R>>();
    job->kind = "map";
    detail::reserve_items<V>(*job, items);
    for (const auto& item : items) detail::append_item(*job, static_cast<const V&>(item));
    job->prepare();
    job->callback = std::move(callback);
    job->error_callback = std::move(error_callback);
    submit(*job, f, &detail::task_trampoline<Fn, R, V>,
           chunksize ? chunksize : auto_chunks(job->items));
    detail::pool_submit(engine(), job);
    return AsyncResult<std::vector<R>>(std::move(job));
  }

  // Results in input order, each as soon as it (and those before it) arrived. Python's
  // default chunksize here is 1.
  template <class F, std::ranges::input_range Items,
            class R = detail::task_result_t<F, std::ranges::range_value_t<Items>>>
  IMapIterator<R> imap(F&& f, Items&& items, std::size_t chunksize = 1) {
    return imap_impl<R>(std::forward<F>(f), std::forward<Items>(items), chunksize, true);
  }
  // Results in the order they finish.
  template <class F, std::ranges::input_range Items,
            class R = detail::task_result_t<F, std::ranges::range_value_t<Items>>>
  IMapIterator<R> imap_unordered(F&& f, Items&& items, std::size_t chunksize = 1) {
    return imap_impl<R>(std::forward<F>(f), std::forward<Items>(items), chunksize, false);
  }

  // ---- many calls: f(a, b, ...) for each tuple (std::tuple, std::pair or std::array)
  template <class F, std::ranges::input_range Items>
  auto starmap(F&& f, Items&& items, std::size_t chunksize = 0) {
    return starmap_async(std::forward<F>(f), std::forward<Items>(items), chunksize)
        .job_->take_after_wait();
  }

  template <class F, std::ranges::input_range Items,
            class R = typename detail::tuple_args<
                std::decay_t<std::ranges::range_value_t<Items>>>::template result<F>>
  AsyncResult<std::vector<R>> starmap_async(
      F&& f, Items&& items, std::size_t chunksize = 0,
      typename AsyncResult<std::vector<R>>::Callback callback = {},
      typename AsyncResult<std::vector<R>>::ErrorCallback error_callback = {}) {
    using V = std::decay_t<std::ranges::range_value_t<Items>>;
    using Fn = std::decay_t<F>;
    using Args = detail::tuple_args<V>;
    Args::template check<Fn, R>();
    static_assert(!std::is_void_v<R>, "starmap needs a function that returns a value");
    auto job = std::make_shared<detail::MapJob<R>>();
    job->kind = "starmap";
    detail::reserve_items<V>(*job, items);
    for (const auto& item : items) {
      std::apply([&](const auto&... a) { detail::append_item(*job, a...); }, item);
    }
    job->prepare();
    job->callback = std::move(callback);
    job->error_callback = std::move(error_callback);
    submit(*job, f, Args::template trampoline<Fn, R>,
           chunksize ? chunksize : auto_chunks(job->items));
    detail::pool_submit(engine(), job);
    return AsyncResult<std::vector<R>>(std::move(job));
  }

  // ---- lifetime
  // No more tasks: the workers exit once everything submitted is done.
  void close();
  // Stops the workers now (SIGTERM, then SIGKILL after a short grace) and fails every
  // unfinished result with CancelledError. Returns when the workers are reaped. Never hangs.
  void terminate();
  // Waits for the pool to end after close() or terminate(); ProcessError otherwise.
  void join();

  // The number of workers the pool keeps.
  int processes() const;
  // The workers' pids right now (they change as workers are replaced).
  std::vector<pid_t> worker_pids() const;
  // Workers started so far, including replacements.
  std::size_t workers_started() const;

 private:
  template <class R, class Fn, class... Args, class... Given>
  AsyncResult<R> apply_async_impl(Fn f, typename AsyncResult<R>::Callback callback,
                                  typename AsyncResult<R>::ErrorCallback error_callback,
                                  Given&&... args) {
    detail::check_task<Fn, R, Args...>();
    auto job = std::make_shared<detail::ApplyJob<R>>();
    job->kind = "apply";
    detail::append_item(*job, static_cast<const Args&>(args)...);
    job->callback = std::move(callback);
    job->error_callback = std::move(error_callback);
    submit(*job, f, &detail::task_trampoline<Fn, R, Args...>, 1);
    detail::pool_submit(engine(), job);
    return AsyncResult<R>(std::move(job));
  }

  template <class R, class F, class Items>
  IMapIterator<R> imap_impl(F&& f, Items&& items, std::size_t chunksize, bool ordered) {
    using V = std::decay_t<std::ranges::range_value_t<Items>>;
    using Fn = std::decay_t<F>;
    detail::check_task<Fn, R, V>();
    static_assert(!std::is_void_v<R>, "imap needs a function that returns a value");
    auto job = std::make_shared<detail::IMapJob<R>>(ordered);
    job->kind = ordered ? "imap" : "imap_unordered";
    detail::reserve_items<V>(*job, items);
    for (const auto& item : items) detail::append_item(*job, static_cast<const V&>(item));
    job->prepare();
    submit(*job, f, &detail::task_trampoline<Fn, R, V>, chunksize ? chunksize : 1);
    detail::pool_submit(engine(), job);
    return IMapIterator<R>(std::move(job));
  }

  // Finishes a job's description: the function's id and the chunk size.
  template <class F>
  void submit(detail::JobBase& job, const F& f, detail::TaskTrampoline trampoline,
              std::size_t chunksize) {
    const void* target = nullptr;
    std::decay_t<F> fn = f;  // a function reference becomes a pointer
    (void)fn;
    if constexpr (std::is_pointer_v<std::decay_t<F>>) target = reinterpret_cast<const void*>(fn);
    job.fn = detail::pool_function_id(engine(), reinterpret_cast<const void*>(trampoline), target);
    job.chunksize = chunksize;
    job.item_offset.push_back(job.args.size());
  }

  std::size_t auto_chunks(std::size_t items) const {
    return detail::default_chunksize(items, processes());
  }
  detail::PoolEngine& engine() const;

  std::unique_ptr<detail::PoolEngine> engine_;
};

}  // namespace mp
