// worker_pool_pattern.cpp - A task manager on a JoinableQueue and workers, done right, beside Pool.
//
// A common home-made "process manager" (seed 004's ProcessManager) has workers that take
// (id, task) pairs from one queue and put (id, result) pairs into another. Done naively it
// has four bugs: its workers call a Pool that only exists in the parent, its get_result()
// takes other tasks' results off the queue and puts them back (a busy loop that costs
// O(n^2) queue operations and can starve), it calls task_done() on a plain Queue, and its
// daemon workers are killed at exit with work still queued. The TaskManager here is the
// same idea done right: results are routed by id into a ledger (never re-queued), a worker
// writes the id of the task it runs into shared memory first, so a crash fails exactly that
// task (mp::WorkerLostError) and a new worker takes its place, exceptions come back as
// mp::RemoteError, and stop() either drains the queue or cancels what has not started,
// answering every task either way. Last, the same tasks through mp::Pool::apply_async.
//
// Usage: worker_pool_pattern [--workers N] [--items N] [--json]
//   $ build/4_patterns/worker_pool_pattern --workers 3 --items 24
//
// Watch for: the re-queueing get_result's operation count grows with the square of the
// number of results; results fetched in reverse order are all there, most of them routed
// while waiting for another; after the crash the worker pids change and work goes on;
// stop(cancel) answers every task, done or cancelled; the Pool gives the same results.
#include <cxxabi.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mp/shared_memory.hpp>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "lesson.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// ---- the tasks: data, not code -----------------------------------------------------------

// What a task asks for. (The seed sent Python functions through the queue; a C++ process
// receives data, and the manager is built for one function.)
struct Job {
  enum Kind : std::int32_t { primes, fail, crash };
  Kind kind = primes;
  std::int32_t n = 0;
};

// The number of primes below n, by trial division: plain CPU work.
std::int64_t count_primes(std::int32_t n) {
  std::int64_t count = 0;
  for (std::int32_t k = 2; k < n; ++k) {
    bool prime = true;
    for (std::int32_t d = 2; d * d <= k && prime; ++d) prime = k % d != 0;
    count += prime;
  }
  return count;
}

std::int64_t run_job(Job job) {
  if (job.kind == Job::fail) throw std::domain_error(fmt::format("job {} refuses to run", job.n));
  if (job.kind == Job::crash) ::raise(SIGKILL);  // the worker dies in the middle of a task
  return count_primes(job.n);
}

// ---- TaskManager ---------------------------------------------------------------------------

// The type name of the exception being handled (inside a catch block).
std::string current_exception_type() {
  const std::type_info* t = abi::__cxa_current_exception_type();
  if (!t) return "unknown exception";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(
      abi::__cxa_demangle(t->name(), nullptr, nullptr, &status), std::free);
  return status == 0 && name ? name.get() : t->name();
}

template <class F>
struct Signature;
template <class R, class A>
struct Signature<R (*)(A)> {
  using Result = R;
  using Arg = std::decay_t<A>;
};

// What goes to the workers: a task, or (end) "no more". Plain bytes: the queue copies it
// as it is.
template <class Arg>
struct Task {
  std::uint64_t id = 0;
  bool end = false;
  Arg arg{};
};

// What comes back: the task's value or the exception it threw, and who ran it.
template <class R>
struct Outcome {
  std::uint64_t id = 0;
  pid_t pid = 0;
  bool ok = false;
  R value{};
  std::string error_type, error_message;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(id, pid, ok, value, error_type, error_message);
  }
};

// A worker: takes tasks until "no more". running[slot] holds 1 + the id of the task it is
// running (0: none), written *before* it runs the task, so that the manager knows which task
// a crash took with it.
template <auto Fn>
void worker_main(mp::JoinableQueue<Task<typename Signature<decltype(Fn)>::Arg>> tasks,
                 mp::Queue<Outcome<typename Signature<decltype(Fn)>::Result>> results,
                 mp::RawArray<std::uint64_t> running, int slot) {
  std::atomic_ref<std::uint64_t> mine(running[std::size_t(slot)]);
  for (;;) {
    auto task = tasks.get();
    if (task.end) {
      tasks.task_done();
      return;
    }
    mine.store(task.id + 1);
    Outcome<typename Signature<decltype(Fn)>::Result> out;
    out.id = task.id;
    out.pid = ::getpid();
    try {
      out.value = Fn(task.arg);
      out.ok = true;
    } catch (const std::exception& e) {
      out.error_type = current_exception_type();
      out.error_message = e.what();
    } catch (...) {
      out.error_type = current_exception_type();
    }
    results.put(out);
    mine.store(0);
    tasks.task_done();
  }
}

// Runs Fn(arg) for submitted tasks on `workers` processes.
//   TaskManager<run_job> m{4};
//   auto h = m.submit(7, Job{Job::primes, 50'000});
//   std::int64_t v = h.get(10s);        // or m.result(7, 10s)
//   m.stop(TaskManager<run_job>::Stop::drain);
// result() throws mp::TimeoutError when the answer is not there in time, mp::RemoteError
// for an exception in the task, mp::WorkerLostError when its worker died running it and
// mp::CancelledError when stop(cancel) took it off the queue. Use it from one thread.
template <auto Fn>
class TaskManager {
 public:
  using Arg = typename Signature<decltype(Fn)>::Arg;
  using R = typename Signature<decltype(Fn)>::Result;
  enum class Stop { drain, cancel };

  // A task's handle: valid while its manager lives.
  class Handle {
   public:
    std::uint64_t id() const noexcept { return id_; }
    R get(mp::Seconds timeout = mp::Seconds(1e9)) const { return m_->result(id_, timeout); }
    bool ready() const { return m_->ready(id_); }

   private:
    friend class TaskManager;
    Handle(TaskManager* m, std::uint64_t id) : m_(m), id_(id) {}
    TaskManager* m_;
    std::uint64_t id_;
  };

  explicit TaskManager(int workers) : running_(std::size_t(workers)), finished_(workers, false) {
    for (int i = 0; i < workers; ++i) {
      workers_.emplace_back();
      start_worker(i);
    }
  }
  // Nothing is dropped silently: what has not started is cancelled, what runs finishes.
  ~TaskManager() {
    try {
      stop(Stop::cancel);
    } catch (const std::exception& e) {
      fmt::print(stderr, "TaskManager: cannot stop: {}\n", e.what());
    }
  }
  TaskManager(const TaskManager&) = delete;
  TaskManager& operator=(const TaskManager&) = delete;

  // Queues Fn(arg) under `id`, which must be new. Throws std::invalid_argument for an id in
  // use, mp::ProcessError after stop().
  Handle submit(std::uint64_t id, const Arg& arg) {
    if (stopping_) throw mp::ProcessError(fmt::format("cannot submit task {}: stopped", id));
    if (id == UINT64_MAX || !ledger_.emplace(id, Entry{}).second) {
      throw std::invalid_argument(fmt::format("cannot submit task {}: the id is in use", id));
    }
    ++pending_;
    tasks_.put(Task<Arg>{id, false, arg});
    return Handle(this, id);
  }

  // The answer of task `id`, waiting at most `timeout` for it. While it waits, it files the
  // answers of other tasks in the ledger and replaces workers that died.
  R result(std::uint64_t id, mp::Seconds timeout = mp::Seconds(1e9)) {
    Entry& e = entry(id);
    auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                       std::min(timeout, mp::Seconds(1e9)));
    while (e.pending) {
      auto left = deadline - Clock::now();
      if (left <= Clock::duration::zero()) {
        throw mp::TimeoutError(fmt::format("cannot get the result of task {}: not ready after {}s",
                                           id, timeout.count()));
      }
      collect(std::min<mp::Seconds>(left, kSlice), id);
    }
    if (e.error) std::rethrow_exception(e.error);
    return e.value;
  }
  bool ready(std::uint64_t id) {
    collect(mp::Seconds(0), 0);
    return !entry(id).pending;
  }

  // Ends the workers. drain: every queued task runs first. cancel: tasks not yet started are
  // taken off the queue and fail with mp::CancelledError; running ones finish. Either way
  // every task has its answer when stop() returns. Never waits for a task nobody holds.
  void stop(Stop how) {
    if (stopped_) return;
    stopping_ = true;
    if (how == Stop::cancel) {
      while (auto t = tasks_.try_get()) {
        answer(t->id, std::make_exception_ptr(mp::CancelledError(
                          fmt::format("task {} was cancelled by stop()", t->id))));
        ++cancelled_;
        tasks_.task_done();
      }
    }
    wait_for_all();
    sentinels_sent_ = true;  // from here on, a worker that dies is not replaced
    for (std::size_t i = 0; i < workers_.size(); ++i) tasks_.put(Task<Arg>{0, true, Arg{}});
    for (auto& w : workers_) w.join();
    stopped_ = true;
  }

  // Figures for the story.
  std::size_t routed() const noexcept {
    return routed_;
  }  // answers filed while waiting for another
  std::size_t crashes() const noexcept { return crashes_; }
  std::size_t cancelled() const noexcept { return cancelled_; }
  std::size_t workers_started() const noexcept { return started_; }
  std::uint64_t unfinished_tasks() const noexcept { return tasks_.unfinished_tasks(); }
  std::vector<pid_t> worker_pids() const {
    std::vector<pid_t> pids;
    for (const auto& w : workers_) pids.push_back(w.pid());
    return pids;
  }

 private:
  static constexpr mp::Seconds kSlice{0.02};  // how often a waiting caller checks the workers

  struct Entry {
    bool pending = true;
    R value{};
    std::exception_ptr error;
  };

  Entry& entry(std::uint64_t id) {
    auto it = ledger_.find(id);
    if (it == ledger_.end()) {
      throw std::invalid_argument(
          fmt::format("cannot get the result of task {}: no such task", id));
    }
    return it->second;
  }

  void start_worker(int i) {
    workers_[std::size_t(i)] = mp::Process{worker_main<Fn>, tasks_, results_, running_, i};
    workers_[std::size_t(i)].start();
    finished_[std::size_t(i)] = false;
    ++started_;
  }

  // Files an answer under its id. An answer for a task already answered (one declared lost)
  // is dropped: every task gets exactly one answer.
  void answer(std::uint64_t id, std::exception_ptr error, R value = R{}) {
    auto it = ledger_.find(id);
    if (it == ledger_.end() || !it->second.pending) return;
    it->second.pending = false;
    it->second.value = std::move(value);
    it->second.error = std::move(error);
    --pending_;
  }
  void file(const Outcome<R>& out, std::uint64_t awaited) {
    if (out.id != awaited) ++routed_;
    if (out.ok) {
      answer(out.id, nullptr, out.value);
    } else {
      answer(out.id,
             std::make_exception_ptr(mp::RemoteError(out.error_type, out.error_message, out.pid)));
    }
  }

  // Waits up to `slice` for answers and files all that came, then looks at the workers.
  void collect(mp::Seconds slice, std::uint64_t awaited) {
    if (auto out = results_.try_get(slice)) {
      file(*out, awaited);
      while (auto more = results_.try_get()) file(*more, awaited);
    }
    check_workers();
  }

  // A worker that ended without being told to has crashed: fail the task it announced,
  // start another in its place.
  void check_workers() {
    for (std::size_t i = 0; i < workers_.size(); ++i) {
      mp::Process& w = workers_[i];
      if (finished_[i] || w.is_alive()) continue;
      finished_[i] = true;
      int code = *w.exitcode();
      if (sentinels_sent_ && code == 0) continue;  // it took its "no more" and returned
      // Results it put just before it died are in the queue: file them first.
      while (auto more = results_.try_get()) file(*more, 0);
      std::uint64_t held = std::atomic_ref<std::uint64_t>(running_[i]).exchange(0);
      ++crashes_;
      last_crash_ = {w.pid(), code < 0 ? -code : 0, code < 0 ? 0 : code};
      if (held != 0) {
        answer(held - 1, std::make_exception_ptr(
                             mp::WorkerLostError(w.pid(), last_crash_.signal, last_crash_.status,
                                                 fmt::format("task {}", held - 1))));
        tasks_.task_done();  // the dead worker never will: keep the queue's count right
      } else {
        // It died between tasks - or in the instant after taking one and before announcing
        // it. Only the second loses a task; wait_for_all() notices if it happened.
        maybe_lost_ = true;
      }
      if (!sentinels_sent_) start_worker(int(i));
    }
  }

  // Until every task is answered. A task taken by a worker that died before announcing it
  // has no holder: when nothing is queued, nobody announces anything and no answer comes for
  // a few slices in a row, the pending tasks are failed instead of waited for.
  void wait_for_all() {
    int quiet = 0;
    while (pending_ > 0) {
      std::size_t before = pending_;
      collect(kSlice, 0);
      bool idle = std::all_of(running_.begin(), running_.end(), [](std::uint64_t& v) {
        return std::atomic_ref<std::uint64_t>(v).load() == 0;
      });
      if (maybe_lost_ && pending_ == before && tasks_.empty() && idle) {
        if (++quiet < 5) continue;
        for (auto& [id, e] : ledger_) {
          if (!e.pending) continue;
          answer(id, std::make_exception_ptr(mp::WorkerLostError(
                         last_crash_.pid, last_crash_.signal, last_crash_.status,
                         fmt::format("task {} (taken, not yet announced)", id))));
        }
      } else {
        quiet = 0;
      }
    }
  }

  struct Crash {
    pid_t pid = 0;
    int signal = 0, status = 0;
  };

  mp::JoinableQueue<Task<Arg>> tasks_;
  mp::Queue<Outcome<R>> results_;
  mp::RawArray<std::uint64_t> running_;  // per worker slot: 1 + the id it runs, or 0
  std::vector<mp::Process> workers_;
  std::vector<bool> finished_;
  std::unordered_map<std::uint64_t, Entry> ledger_;
  std::size_t pending_ = 0, routed_ = 0, crashes_ = 0, cancelled_ = 0, started_ = 0;
  Crash last_crash_;
  bool maybe_lost_ = false, stopping_ = false, sentinels_sent_ = false, stopped_ = false;
};

// ---- the seed's get_result, measured -------------------------------------------------------

// Takes results off the queue until it finds `id`, putting the others back: seed 004's way.
// Counts the queue operations.
std::int64_t requeueing_get_result(mp::Queue<std::pair<std::uint64_t, std::int64_t>>& results,
                                   std::uint64_t id, std::uint64_t& gets, std::uint64_t& puts) {
  for (;;) {
    auto [got, value] = results.get();
    ++gets;
    if (got == id) return value;
    results.put({got, value});
    ++puts;
  }
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "A task manager on a JoinableQueue and workers, done right, beside Pool."};
  int& workers = L.add_workers(3, 64);
  int& items = L.add_items(24, 1, 2'000);
  L.parse(argc, argv);
  using Manager = TaskManager<run_job>;

  return L.run([&] {
    const auto n = static_cast<std::uint64_t>(items);
    auto limit = [](std::uint64_t i) { return std::int32_t(20'000 + 2'000 * (i % 16)); };

    // Step 1: the seed's get_result. The results are in the queue in the order 1..n and the
    // caller wants them n..1: each lookup re-queues everything in front of its result.
    L.step("the seed's get_result: take, compare, put back");
    std::uint64_t gets = 0, puts = 0;
    {
      mp::Queue<std::pair<std::uint64_t, std::int64_t>> results;
      for (std::uint64_t i = 1; i <= n; ++i) results.put({i, std::int64_t(i)});
      for (std::uint64_t i = n; i >= 1; --i) requeueing_get_result(results, i, gets, puts);
    }
    L.say("{} results fetched in reverse: {} gets and {} puts (routing by id: {} gets)", n, gets,
          puts, n);

    // Step 2: the TaskManager. Submit, then fetch in reverse order: the answers that come
    // first are filed by id, never put back.
    L.step(
        fmt::format("TaskManager: {} workers, {} tasks, results fetched in reverse", workers, n));
    Manager m{workers};
    auto first_pids = m.worker_pids();
    std::vector<Manager::Handle> handles;
    for (std::uint64_t i = 1; i <= n; ++i)
      handles.push_back(m.submit(i, Job{Job::primes, limit(i)}));
    bool results_match = true;
    for (std::uint64_t i = n; i >= 1; --i) {
      results_match = results_match && handles[i - 1].get() == count_primes(limit(i));
    }
    const std::size_t routed = m.routed();
    L.say("all {} equal to the serial answers: {}; {} were filed while waiting for another", n,
          results_match, routed);

    // Step 3: an exception in a task comes back as mp::RemoteError; the worker lives on.
    L.step("a task that throws");
    std::string error_type, error_what;
    try {
      m.submit(1000, Job{Job::fail, 7}).get();
    } catch (const mp::RemoteError& e) {
      error_type = e.type_name();
      error_what = e.what();
      L.say("task 1000: caught mp::RemoteError: {}", e.what());
    }
    bool same_workers = m.worker_pids() == first_pids;
    L.say("the workers are the same processes: {}", same_workers);

    // Step 4: a task kills its worker. The manager fails exactly that task and starts a
    // new worker; the next tasks run as before.
    L.step("a task that kills its worker");
    std::string lost_what, lost_signal;
    auto doomed = m.submit(2000, Job{Job::crash, 0});
    try {
      doomed.get();
    } catch (const mp::WorkerLostError& e) {
      lost_what = e.what();
      lost_signal = mp::signal_name(e.signal());
      L.say("task 2000: caught mp::WorkerLostError: {}", e.what());
    }
    bool after_crash_ok = m.submit(2001, Job{Job::primes, 10'000}).get() == 1229;
    L.say("workers now {} (were {}); the next task works: {}", m.worker_pids(), first_pids,
          after_crash_ok);

    // Step 5: stop(drain) - a last batch is queued, and stop() runs all of it first.
    L.step("stop(drain): every queued task runs");
    std::vector<Manager::Handle> last;
    for (std::uint64_t i = 1; i <= n; ++i) {
      last.push_back(m.submit(3000 + i, Job{Job::primes, limit(i)}));
    }
    m.stop(Manager::Stop::drain);
    std::size_t drained = 0;
    for (std::uint64_t i = 1; i <= n; ++i) {
      drained += last[i - 1].ready() && last[i - 1].get() == count_primes(limit(i));
    }
    L.say("{} of {} queued tasks done before stop() returned; unfinished per the queue: {}",
          drained, n, m.unfinished_tasks());

    // Step 6: stop(cancel) - what has not started is cancelled; what runs finishes.
    L.step("stop(cancel): tasks not started are cancelled");
    std::size_t done = 0, cancelled = 0, other = 0;
    {
      Manager c{workers};
      std::vector<Manager::Handle> batch;
      for (std::uint64_t i = 1; i <= 4 * std::uint64_t(workers); ++i) {
        batch.push_back(c.submit(i, Job{Job::primes, 60'000}));
      }
      batch.front().get();  // the workers are busy now: some tasks run, the rest wait
      c.stop(Manager::Stop::cancel);
      for (auto& h : batch) {
        try {
          done += h.get(mp::Seconds(0)) == count_primes(60'000);
        } catch (const mp::CancelledError&) {
          ++cancelled;
        } catch (const std::exception&) {
          ++other;
        }
      }
      L.say("{} tasks: {} done, {} cancelled - each has its answer", batch.size(), done, cancelled);
    }

    // Step 7: the same tasks through the TaskManager and through mp::Pool::apply_async.
    L.step("the same tasks through mp::Pool::apply_async");
    std::vector<std::int64_t> by_manager, by_pool;
    double manager_s = 0, pool_s = 0;
    {
      Manager t{workers};
      auto t0 = Clock::now();
      std::vector<Manager::Handle> hs;
      for (std::uint64_t i = 1; i <= n; ++i) hs.push_back(t.submit(i, Job{Job::primes, limit(i)}));
      for (auto& h : hs) by_manager.push_back(h.get());
      manager_s = lesson::seconds_since(t0);
      t.stop(Manager::Stop::drain);
    }
    {
      mp::Pool pool{workers};
      auto t0 = Clock::now();
      std::vector<mp::AsyncResult<std::int64_t>> rs;
      for (std::uint64_t i = 1; i <= n; ++i)
        rs.push_back(pool.apply_async(run_job, Job{Job::primes, limit(i)}));
      for (auto& r : rs) by_pool.push_back(r.get());
      pool_s = lesson::seconds_since(t0);
      pool.close();
      pool.join();
    }
    bool same_results = by_manager == by_pool;
    L.say("same results: {}; TaskManager {:.3f} s, Pool {:.3f} s (ratio {:.2f})", same_results,
          manager_s, pool_s, pool_s > 0 ? manager_s / pool_s : 0.0);

    bool requeue_cost = gets == n * (n + 1) / 2 && puts == n * (n - 1) / 2;
    bool lost_named = lost_what.find("task 2000") != std::string::npos;
    bool all_answered = done + cancelled == 4 * std::size_t(workers) && other == 0 && done >= 1;
    bool none_left = mp::active_children().empty();
    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("requeue_gets", gets);
    L.fact("requeue_puts", puts);
    L.fact("requeue_cost_quadratic", requeue_cost);
    L.fact("results_match_serial", results_match);
    L.fact("routed_by_id", routed);
    L.fact("remote_error_type", error_type);
    L.fact("remote_error_what", error_what);
    L.fact("same_workers_after_exception", same_workers);
    L.fact("lost_task_named", lost_named);
    L.fact("lost_signal", lost_signal);
    L.fact("crashes", m.crashes());
    L.fact("workers_started", m.workers_started());
    L.fact("after_crash_ok", after_crash_ok);
    L.fact("drained", drained);
    L.fact("unfinished_after_drain", m.unfinished_tasks());
    L.fact("cancel_batch", 4 * workers);
    L.fact("cancel_done", done);  // chance: how many had started
    L.fact("cancel_cancelled", cancelled);
    L.fact("all_answered", all_answered);
    L.fact("same_results_as_pool", same_results);
    L.fact("manager_seconds", manager_s);
    L.fact("pool_seconds", pool_s);
    L.fact("children_left", mp::active_children().size());
    return requeue_cost && results_match && error_type == "std::domain_error" && same_workers &&
           lost_named && lost_signal == "SIGKILL" && after_crash_ok && drained == n &&
           m.unfinished_tasks() == 0 && all_answered && same_results && none_left;
  });
}
