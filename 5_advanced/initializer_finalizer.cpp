// initializer_finalizer.cpp - Per-worker set-up and tear-down in mp::Pool: what runs on close, on terminate, on SIGKILL.
//
// Python's Pool takes an initializer (run once in each worker as it starts) but has no
// finalizer. A worker often needs one: to flush what it kept in memory, to close a
// connection, to say goodbye. The obvious answer - std::atexit from the initializer - does
// not work in mp: a worker ends with std::_Exit (see mp/src/process.cpp,
// run_child_and_exit), which skips atexit handlers and static destructors, since they
// belong to the parent's copy of the program. What works instead, case by case:
//   - close() + join(): before close(), run one finalize task per worker. The tasks wait at
//     an mp::Barrier of `workers` parties, so a worker holding one cannot take another: each
//     worker gets exactly one. Guaranteed: every worker finalizes, exactly once.
//   - terminate(): mp sends each worker SIGTERM, then SIGKILL after a short grace. A SIGTERM
//     handler installed by the initializer can finalize (async-signal-safe work only) and
//     _exit. Best effort: it runs if the worker is scheduled within the grace.
//   - SIGKILL of a worker: nothing runs in it, ever. Only what it already wrote outside
//     itself survives. The pool starts a replacement, whose initializer runs too.
// Each worker keeps a tally of its tasks in its own memory; the finalizer publishes it to a
// ledger in shared memory, which the parent reads after the pool is gone.
//
// Usage: initializer_finalizer [--workers N] [--items N] [--start-method M] [--json]
//   $ build/5_advanced/initializer_finalizer --workers 3
//
// Watch for: atexit handlers ran 0 times in every part; initializers == workers started
// (one more in the SIGKILL part: the replacement); the killed worker finalized nothing and
// its tally is lost.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mp/context.hpp>
#include <mp/error.hpp>
#include <mp/pool.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using namespace std::chrono_literals;

// One line of the ledger per worker started: what its initializer, finalizer and atexit
// handler did. Written by the worker, read by the parent after the pool ends.
enum Part : std::int32_t { kClose = 1, kTerminate = 2, kSigkill = 3 };
enum FinalizedBy : std::int32_t { kNotFinalized = 0, kByTask = 1, kBySigterm = 2 };

struct Entry {
  std::int32_t pid;
  std::int32_t part;
  std::int32_t finalized_by;  // FinalizedBy
  std::int32_t atexit_ran;
  std::int32_t tasks;  // the worker's tally, as its finalizer published it
  std::int32_t busy;   // a long task is running (part 2)
};

template <class T>
std::atomic_ref<T> cell(T& x) {
  return std::atomic_ref<T>(x);
}

// ---- the worker's side: state that lives only in the worker's memory

struct WorkerState {
  mp::RawArray<Entry> ledger;
  mp::Barrier finalize_barrier;
  std::size_t slot;
};
WorkerState* g_state = nullptr;        // set by the initializer; the worker never frees it
std::atomic<std::int32_t> g_tasks{0};  // tasks this worker ran: lost unless published

Entry& my_entry() { return g_state->ledger[g_state->slot]; }

// The finalizer: publishes the tally, once. Only lock-free atomics: it may run in a signal
// handler.
void finalize(FinalizedBy how) noexcept {
  Entry& e = my_entry();
  std::int32_t none = kNotFinalized;
  if (cell(e.finalized_by).compare_exchange_strong(none, how)) {
    cell(e.tasks).store(g_tasks.load());
  }
}

void on_atexit() { cell(my_entry().atexit_ran).fetch_add(1); }

void on_sigterm(int) {
  finalize(kBySigterm);
  ::_exit(0);  // async-signal-safe, unlike exit()
}

// The initializer: takes a ledger line, keeps its handles for the worker's lifetime,
// registers an atexit handler (to show that it never runs) and a SIGTERM handler.
void set_up(mp::RawArray<Entry> ledger, mp::RawValue<std::int32_t> next, mp::Barrier barrier,
            std::int32_t part) {
  auto slot = static_cast<std::size_t>(cell(next.value()).fetch_add(1));
  if (slot >= ledger.size())
    throw std::length_error("cannot record the worker: the ledger is full");
  g_state = new WorkerState{ledger, barrier, slot};
  Entry& e = my_entry();
  e.pid = ::getpid();
  e.part = part;
  if (std::atexit(on_atexit) != 0) throw std::runtime_error("cannot register the atexit handler");
  struct sigaction sa {};
  sa.sa_handler = on_sigterm;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(SIGTERM, &sa, nullptr) == -1) mp::throw_errno("install the SIGTERM handler");
}

// A task: a little work, counted in the worker's own memory.
int work(int i) {
  g_tasks.fetch_add(1);
  return i * i;
}

// The finalize task: one per worker. The barrier keeps each holder busy until every worker
// holds one, so no worker can take two (and its timeout turns a surprise into an error).
pid_t finalize_task(int) {
  finalize(kByTask);
  g_state->finalize_barrier.wait();
  return ::getpid();
}

// A long task, for terminate() to interrupt.
int long_task(int) {
  g_tasks.fetch_add(1);
  cell(my_entry().busy).store(1);
  std::this_thread::sleep_for(60s);
  return 0;
}

// ---- the parent's side

struct Tally {
  int initializers = 0;
  int finalized_by_task = 0;
  int finalized_by_sigterm = 0;
  int atexit_ran = 0;
  int tasks_published = 0;
};

Tally tally(const mp::RawArray<Entry>& ledger, std::int32_t used, Part part) {
  Tally t;
  for (std::int32_t i = 0; i < used; ++i) {
    const Entry& e = ledger[static_cast<std::size_t>(i)];
    if (e.part != part) continue;
    ++t.initializers;
    t.finalized_by_task += e.finalized_by == kByTask;
    t.finalized_by_sigterm += e.finalized_by == kBySigterm;
    t.atexit_ran += e.atexit_ran;
    t.tasks_published += e.tasks;
  }
  return t;
}

// Waits until pred() holds; throws after 30 s (a hang guard, not a timing claim).
template <class Pred>
void wait_for(Pred pred, const char* what) {
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error(fmt::format("cannot wait any longer for {}", what));
    std::this_thread::sleep_for(2ms);
  }
}

int count_part(const mp::RawArray<Entry>& ledger, const mp::RawValue<std::int32_t>& next, Part part,
               bool busy_only) {
  int n = 0;
  std::int32_t used = cell(next.value()).load();
  for (std::int32_t i = 0; i < used && i < static_cast<std::int32_t>(ledger.size()); ++i) {
    Entry& e = ledger[static_cast<std::size_t>(i)];
    if (cell(e.part).load() == part && (!busy_only || cell(e.busy).load() == 1)) ++n;
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Per-worker set-up and tear-down in mp::Pool: what runs on close, on "
                   "terminate, on SIGKILL."};
  int& workers = L.add_workers(3, 32);
  int& items = L.add_items(200, 1, 100'000);
  std::string method;
  L.cli()
      .add_option("--start-method", method, "fork, spawn or forkserver (default: mp's default)")
      ->check(CLI::IsMember({"fork", "spawn", "forkserver"}));
  L.parse(argc, argv);

  return L.run([&] {
    const mp::Context ctx = mp::get_context(method);
    // The ledger: room for every worker of the three parts, and the next free line.
    mp::RawArray<Entry> ledger(static_cast<std::size_t>(3 * workers + 8));
    mp::RawValue<std::int32_t> next{0};
    std::vector<int> inputs;
    for (int i = 0; i < items; ++i) inputs.push_back(i);
    L.say("start method {}; {} workers per pool; {} tasks per pool", ctx.start_method(), workers,
          items);

    // Part 1: the normal end. The finalize tasks, one per worker, then close() and join().
    L.step("part 1: close() + join(), finalize tasks first");
    std::size_t started1 = 0;
    std::set<pid_t> finalize_pids;
    {
      mp::Barrier barrier{workers, mp::Seconds(30)};
      mp::Pool pool{workers, {set_up, ledger, next, barrier, std::int32_t{kClose}}, 0, ctx};
      pool.map(work, inputs);
      auto pids = pool.map(finalize_task, std::vector<int>(static_cast<std::size_t>(workers)), 1);
      finalize_pids.insert(pids.begin(), pids.end());
      pool.close();
      pool.join();
      started1 = pool.workers_started();
    }
    Tally t1 = tally(ledger, next.value(), kClose);
    L.say("workers started {}, initializers {}, finalized by the task {} (in {} distinct workers)",
          started1, t1.initializers, t1.finalized_by_task, finalize_pids.size());
    L.say("tallies published {} of {} tasks; atexit handlers run: {}", t1.tasks_published, items,
          t1.atexit_ran);

    // Part 2: terminate() while every worker is in the middle of a long task.
    L.step("part 2: terminate() during long tasks, finalize from the SIGTERM handler");
    std::size_t started2 = 0;
    int cancelled = 0;
    double terminate_secs = 0;
    {
      mp::Barrier barrier{workers, mp::Seconds(30)};
      mp::Pool pool{workers, {set_up, ledger, next, barrier, std::int32_t{kTerminate}}, 0, ctx};
      pool.map(work, inputs);
      std::vector<mp::AsyncResult<int>> pending;
      for (int w = 0; w < workers; ++w) pending.push_back(pool.apply_async(long_task, w));
      wait_for([&] { return count_part(ledger, next, kTerminate, true) == workers; },
               "every worker to start its long task");
      auto t0 = std::chrono::steady_clock::now();
      pool.terminate();
      terminate_secs = lesson::seconds_since(t0);
      for (auto& r : pending) {
        try {
          r.get();
        } catch (const mp::CancelledError&) {
          ++cancelled;
        }
      }
      started2 = pool.workers_started();
    }
    Tally t2 = tally(ledger, next.value(), kTerminate);
    L.say("workers started {}, initializers {}, finalized by SIGTERM {} (not guaranteed)", started2,
          t2.initializers, t2.finalized_by_sigterm);
    L.say("long tasks cancelled {} of {}; terminate() took {:.3f} s; atexit handlers run: {}",
          cancelled, workers, terminate_secs, t2.atexit_ran);

    // Part 3: one worker is killed with SIGKILL; the pool replaces it; then the normal end.
    L.step("part 3: SIGKILL one worker, then close() + join()");
    std::size_t started3 = 0;
    pid_t victim = 0;
    {
      mp::Barrier barrier{workers, mp::Seconds(30)};
      mp::Pool pool{workers, {set_up, ledger, next, barrier, std::int32_t{kSigkill}}, 0, ctx};
      pool.map(work, inputs);
      wait_for([&] { return count_part(ledger, next, kSigkill, false) == workers; },
               "every initializer");
      victim = pool.worker_pids().front();
      if (::kill(victim, SIGKILL) == -1) mp::throw_errno(fmt::format("send SIGKILL to {}", victim));
      wait_for(
          [&] {
            auto now = pool.worker_pids();
            return pool.workers_started() == static_cast<std::size_t>(workers) + 1 &&
                   std::find(now.begin(), now.end(), victim) == now.end();
          },
          "the replacement worker");
      pool.map(work, inputs);
      pool.map(finalize_task, std::vector<int>(static_cast<std::size_t>(workers)), 1);
      pool.close();
      pool.join();
      started3 = pool.workers_started();
    }
    Tally t3 = tally(ledger, next.value(), kSigkill);
    bool victim_finalized = false;
    for (std::int32_t i = 0; i < next.value(); ++i) {
      const Entry& e = ledger[static_cast<std::size_t>(i)];
      if (e.part == kSigkill && e.pid == victim) victim_finalized = e.finalized_by != kNotFinalized;
    }
    int tasks_lost = 2 * items - t3.tasks_published;
    L.say("killed worker {}: finalized {}", victim, victim_finalized);
    L.say("workers started {}, initializers {}, finalized by the task {}", started3,
          t3.initializers, t3.finalized_by_task);
    L.say(
        "tallies published {} of {} tasks: {} lost with the killed worker (it ran them before "
        "it died); atexit handlers run: {}",
        t3.tasks_published, 2 * items, tasks_lost, t3.atexit_ran);

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("start_method", std::string(ctx.start_method()));
    L.fact("close", nlohmann::json{{"workers_started", started1},
                                   {"initializers", t1.initializers},
                                   {"finalized_by_task", t1.finalized_by_task},
                                   {"finalize_task_workers", finalize_pids.size()},
                                   {"tasks_published", t1.tasks_published},
                                   {"atexit_ran", t1.atexit_ran}});
    L.fact("terminate",
           nlohmann::json{{"workers_started", started2},
                          {"initializers", t2.initializers},
                          {"finalized_by_sigterm", t2.finalized_by_sigterm},  // reported
                          {"cancelled", cancelled},
                          {"seconds", terminate_secs},
                          {"atexit_ran", t2.atexit_ran}});
    L.fact("sigkill",
           nlohmann::json{{"workers_started", started3},
                          {"initializers", t3.initializers},
                          {"finalized_by_task", t3.finalized_by_task},
                          {"victim_finalized", victim_finalized},
                          {"tasks_published", t3.tasks_published},
                          {"tasks_lost", tasks_lost},  // whatever the victim had run: reported
                          {"atexit_ran", t3.atexit_ran}});

    const auto w = static_cast<std::size_t>(workers);
    bool close_ok = started1 == w && t1.initializers == workers &&
                    t1.finalized_by_task == workers && finalize_pids.size() == w &&
                    t1.tasks_published == items && t1.atexit_ran == 0;
    bool terminate_ok = started2 == w && t2.initializers == workers && cancelled == workers &&
                        t2.finalized_by_sigterm <= workers && t2.atexit_ran == 0;
    bool sigkill_ok = started3 == w + 1 && t3.initializers == workers + 1 &&
                      t3.finalized_by_task == workers && !victim_finalized &&
                      t3.tasks_published <= 2 * items && t3.atexit_ran == 0;
    return close_ok && terminate_ok && sigkill_ok;
  });
}
