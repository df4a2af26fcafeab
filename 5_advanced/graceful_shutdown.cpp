// graceful_shutdown.cpp - Ctrl-C or SIGTERM while a pool works: stop taking work, let tasks in flight finish within a grace period, terminate the rest.
//
// What a service should do on SIGINT (Ctrl-C) or SIGTERM (`kill`, systemd, Kubernetes):
// take no new work, give the tasks already running a grace period to finish, terminate
// whatever is still running when it ends, and leave nothing behind - no worker, no zombie,
// no /dev/shm entry. Two things stand in the way.
//
// 1. The signal itself. A handler may only do async-signal-safe things (no locks, no
//    malloc, no printing), and a flag it sets is useless while the main thread sleeps in
//    a wait that never looks at it - which is how Python's Pool hung (bpo-8296): Ctrl-C
//    during pool.map() in Python 2 and early 3 did nothing, because the main thread sat in
//    a lock wait without a timeout that a signal could not interrupt. This program has no
//    handler: SIGINT and SIGTERM are blocked in every thread (blocked in main() before any
//    thread exists; threads inherit the mask), and one thread takes them with sigtimedwait
//    - an ordinary function call, after which anything is allowed. It posts the signal to
//    the mailbox the main thread waits on together with the tasks' results.
// 2. The workers. Ctrl-C at a terminal sends SIGINT to the whole foreground process group:
//    the parent and every worker. In Python 2 each worker raised KeyboardInterrupt in the
//    middle of a task, the pool lost the task, and the parent waited for it for ever (the
//    other half of bpo-8296). mp's pool workers do nothing about SIGINT (mp/src/pool.cpp
//    installs no handler and changes no mask): they inherit the parent's mask and
//    dispositions, so with the defaults a Ctrl-C kills every worker - mp fails their tasks
//    with WorkerLostError and starts new ones - and the parent too. Here the workers start
//    with the parent's blocked mask (fork and exec keep it), so a SIGINT that arrives early
//    waits; the pool initializer then sets SIGINT to SIG_IGN (a pending one is discarded)
//    and unblocks SIGTERM, so that pool.terminate() (SIGTERM, then SIGKILL) still works at
//    once. Only the parent decides.
//
// The run: --items tasks fed to the pool one per free worker, so that "in flight" means
// running; every tenth task hangs (a stuck call). After --after seconds the lesson sends
// itself the signal - for SIGINT to the parent and to every worker, as a terminal does;
// for SIGTERM to the parent only, as `kill PID` does - or, with --after 0, waits for you
// to press Ctrl-C or run `kill -TERM <pid>`. A second signal during the grace cuts it short.
//
// Usage: graceful_shutdown [--workers N] [--items N] [--grace S] [--after S]
//                          [--signal INT|TERM] [--start-method M] [--json]
//   $ build/5_advanced/graceful_shutdown
//   $ build/5_advanced/graceful_shutdown --after 0 --items 1000     (then press Ctrl-C)
//
// Watch for: no worker was replaced (the SIGINT did not kill them); the tasks in flight at
// the signal either finished within the grace or were cancelled - every hung one
// cancelled; the tasks never started are counted, not lost; every worker pid is gone and
// no /dev/shm/mp-* entry of ours is left.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mp/context.hpp>
#include <mp/error.hpp>
#include <mp/monitor.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// ---- the workers' side

// One line per worker started, written by its initializer.
struct WorkerLine {
  std::int32_t pid;
  std::int32_t sigint_was_blocked;  // the mask it inherited covered SIGINT
  std::int32_t sigint_ignored;      // after the initializer
  std::int32_t sigterm_unblocked;   // after the initializer
};

// Task states, one per task: 0 not started, 1 running, 2 finished.
struct Shared {
  mp::RawArray<WorkerLine> workers;
  mp::RawValue<std::int32_t> next_worker;
  mp::RawArray<std::int32_t> tasks;
};
Shared* g_shared = nullptr;  // set by the initializer, in each worker

std::atomic_ref<std::int32_t> cell(std::int32_t& x) { return std::atomic_ref<std::int32_t>(x); }

void quiet_worker(mp::RawArray<WorkerLine> workers, mp::RawValue<std::int32_t> next,
                  mp::RawArray<std::int32_t> tasks) {
  g_shared = new Shared{workers, next, tasks};  // lives as long as the worker
  auto slot = static_cast<std::size_t>(cell(next.value()).fetch_add(1));
  if (slot >= workers.size()) throw std::length_error("cannot record the worker: no line left");
  WorkerLine& line = workers[slot];
  sigset_t now;
  if (::pthread_sigmask(SIG_SETMASK, nullptr, &now) != 0)
    throw std::runtime_error("cannot read the signal mask");
  line.sigint_was_blocked = sigismember(&now, SIGINT) == 1;
  // SIGINT: ignored (a pending one is discarded). SIGTERM: back to its default action.
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  if (::sigaction(SIGINT, &ign, nullptr) == -1) mp::throw_errno("ignore SIGINT");
  sigset_t both;
  sigemptyset(&both);
  sigaddset(&both, SIGINT);
  sigaddset(&both, SIGTERM);
  if (::pthread_sigmask(SIG_UNBLOCK, &both, nullptr) != 0)
    throw std::runtime_error("cannot unblock SIGINT and SIGTERM");
  struct sigaction seen {};
  // Read back what the worker now has, rather than trusting what was asked for.
  if (::sigaction(SIGINT, nullptr, &seen) == -1) mp::throw_errno("read the action of SIGINT");
  if (::pthread_sigmask(SIG_SETMASK, nullptr, &now) != 0)
    throw std::runtime_error("cannot read the signal mask");
  line.sigint_ignored = seen.sa_handler == SIG_IGN;
  line.sigterm_unblocked = sigismember(&now, SIGTERM) == 0;
  cell(line.pid).store(::getpid());
}

bool hangs(int i) { return i % 10 == 9; }

// A task: 20 to 80 ms of work, or - every tenth one - a call that never returns in time.
int task(int i) {
  std::int32_t& state = g_shared->tasks[static_cast<std::size_t>(i)];
  cell(state).store(1);
  std::this_thread::sleep_for(hangs(i) ? std::chrono::milliseconds(60'000)
                                       : std::chrono::milliseconds(20 * (1 + i % 4)));
  cell(state).store(2);
  return i;
}

// ---- the parent's side

// What the main thread waits for: results (from the pool's callback thread) and signals
// (from the signal thread). One mutex, one condition variable.
struct Mailbox {
  std::mutex m;
  std::condition_variable cv;
  std::deque<int> done;    // task ids whose result arrived
  std::deque<int> failed;  // task ids that failed (cancelled, lost...)
  std::vector<int> signals;
  std::vector<pid_t> senders;

  void post_result(int id, bool ok) {
    {
      std::lock_guard g{m};
      (ok ? done : failed).push_back(id);
    }
    cv.notify_all();
  }
  void post_signal(int sig, pid_t from) {
    {
      std::lock_guard g{m};
      signals.push_back(sig);
      senders.push_back(from);
    }
    cv.notify_all();
  }
};

sigset_t shutdown_signals() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGINT);
  sigaddset(&s, SIGTERM);
  return s;
}

// The signal thread: takes SIGINT and SIGTERM as ordinary events.
void take_signals(std::stop_token stop, Mailbox& box) {
  sigset_t set = shutdown_signals();
  timespec slice{0, 50'000'000};  // look at the stop token every 50 ms
  while (!stop.stop_requested()) {
    siginfo_t info{};
    int sig = ::sigtimedwait(&set, &info, &slice);
    if (sig > 0) box.post_signal(sig, info.si_pid);
    // -1 with EAGAIN (the slice ended) or EINTR: look again
  }
}

bool gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

// /dev/shm entries named by mp for one of `pids` ("mp-[tag-]<pid>-<hex>").
std::vector<std::string> shm_entries_of(const std::set<pid_t>& pids) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    std::string name = e.path().filename().string();
    if (name.rfind("mp-", 0) != 0) continue;
    for (pid_t p : pids) {
      if (name.find(fmt::format("-{}-", p)) != std::string::npos) out.push_back(name);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // First of all, before any thread exists: SIGINT and SIGTERM blocked. Every thread and
  // every worker inherits this mask; the signal thread takes them with sigtimedwait.
  sigset_t blocked = shutdown_signals();
  if (int err = ::pthread_sigmask(SIG_BLOCK, &blocked, nullptr); err != 0) {
    fmt::print(stderr, "error: cannot block SIGINT and SIGTERM: {}\n", std::strerror(err));
    return 1;
  }

  lesson::Lesson L{MP_LESSON_ID,
                   "Ctrl-C or SIGTERM while a pool works: stop taking work, let tasks in flight "
                   "finish within a grace period, terminate the rest."};
  int& workers = L.add_workers(3, 32);
  int& items = L.add_items(40, 1, 100'000);
  double grace = 0.5;
  double after = 0.3;
  std::string signame = "INT";
  std::string method;
  L.cli()
      .add_option("--grace", grace, "seconds the tasks in flight get to finish")
      ->check(CLI::Range(0.0, 30.0))
      ->capture_default_str();
  L.cli()
      .add_option("--after", after,
                  "seconds until the lesson signals itself (0: wait for Ctrl-C or kill)")
      ->check(CLI::Range(0.0, 60.0))
      ->capture_default_str();
  L.cli()
      .add_option("--signal", signame, "what the lesson sends itself: INT (as Ctrl-C) or TERM")
      ->check(CLI::IsMember({"INT", "TERM"}))
      ->capture_default_str();
  L.cli()
      .add_option("--start-method", method, "fork, spawn or forkserver (default: mp's default)")
      ->check(CLI::IsMember({"fork", "spawn", "forkserver"}));
  L.parse(argc, argv);

  return L.run([&] {
    const pid_t me = ::getpid();
    const mp::Context ctx = mp::get_context(method);
    const int self_signal = signame == "INT" ? SIGINT : SIGTERM;
    Mailbox box;
    std::jthread signal_thread{take_signals, std::ref(box)};

    // Step 1: the pool, its workers quiet about SIGINT.
    mp::RawArray<WorkerLine> lines(static_cast<std::size_t>(4 * workers + 8));
    mp::RawValue<std::int32_t> next_line{0};
    mp::RawArray<std::int32_t> states(static_cast<std::size_t>(items));
    mp::Pool pool{workers, {quiet_worker, lines, next_line, states}, 0, ctx};
    L.say("parent {}: {} workers ({}), {} tasks, grace {} s; every tenth task hangs", me, workers,
          ctx.start_method(), items, grace);
    if (after > 0) {
      L.say("in {} s the lesson sends itself SIG{}{}", after, signame,
            self_signal == SIGINT ? " (and each worker, as a terminal's Ctrl-C does)" : "");
    } else {
      L.say("press Ctrl-C, or run: kill -TERM {}", me);
    }

    // Step 2: feed the pool one task per free worker until a signal comes.
    L.step("working");
    std::map<int, mp::AsyncResult<int>> results;
    std::set<int> in_flight;
    int submitted = 0, completed = 0, failed = 0;
    auto submit = [&](int i) {
      results.emplace(i,
                      pool.apply_async(
                          task, std::tuple{i}, [&box, i](const int&) { box.post_result(i, true); },
                          [&box, i](const std::exception&) { box.post_result(i, false); }));
      in_flight.insert(i);
    };
    // Takes what the mailbox holds; returns the number of signals received so far.
    auto drain = [&](std::unique_lock<std::mutex>&) {
      for (int id : box.done) in_flight.erase(id), ++completed;
      for (int id : box.failed) in_flight.erase(id), ++failed;
      box.done.clear();
      box.failed.clear();
      return box.signals.size();
    };
    const auto t_start = Clock::now();
    const auto send_at =
        t_start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(after));
    bool sent = false;
    std::vector<pid_t> signalled;
    std::optional<Clock::time_point> t_signal;
    for (;;) {
      while (submitted < items && static_cast<int>(in_flight.size()) < workers) submit(submitted++);
      std::unique_lock lk{box.m};
      if (after > 0 && !sent) {
        box.cv.wait_until(lk, send_at, [&] {
          return !box.done.empty() || !box.failed.empty() || !box.signals.empty();
        });
      } else {
        box.cv.wait(
            lk, [&] { return !box.done.empty() || !box.failed.empty() || !box.signals.empty(); });
      }
      if (drain(lk) > 0) {
        t_signal = Clock::now();
        break;
      }
      if (submitted == items && in_flight.empty()) break;  // all done: no signal needed
      if (after > 0 && !sent && Clock::now() >= send_at) {
        lk.unlock();
        // The signal goes to the parent; SIGINT to the workers too, as from a terminal.
        std::vector<pid_t> targets{me};
        if (self_signal == SIGINT) {
          for (pid_t w : pool.worker_pids()) targets.push_back(w);
        }
        for (pid_t t : targets) {
          if (::kill(t, self_signal) == -1)
            mp::throw_errno(fmt::format("send SIG{} to process {}", signame, t));
        }
        signalled = targets;
        sent = true;
      }
    }

    // Step 3: the shutdown. No new work; the grace period for the tasks in flight.
    std::set<int> at_signal = in_flight;
    int completed_before = completed;
    int not_submitted = items - submitted;
    int got_signal = 0;
    pid_t sender = 0;
    int finished_in_grace = 0, cancelled = 0, other_errors = 0;
    bool second_signal = false;
    double grace_used = 0;
    if (t_signal) {
      {
        std::lock_guard g{box.m};
        got_signal = box.signals.front();
        sender = box.senders.front();
      }
      L.say("SIG{} from pid {} after {:.3f} s: {} tasks done, {} in flight {}, {} not started",
            got_signal == SIGINT ? "INT" : "TERM", sender,
            std::chrono::duration<double>(*t_signal - t_start).count(), completed_before,
            at_signal.size(), at_signal, not_submitted);
      L.step(fmt::format("shutting down: no new tasks, {} s of grace", grace));
      auto deadline = *t_signal + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(grace));
      {
        std::unique_lock lk{box.m};
        for (;;) {
          std::size_t sigs = drain(lk);
          if (sigs > 1) {  // a second Ctrl-C: no more patience
            second_signal = true;
            break;
          }
          if (in_flight.empty()) break;
          if (box.cv.wait_until(lk, deadline) == std::cv_status::timeout) {
            drain(lk);
            break;
          }
        }
      }
      grace_used = std::chrono::duration<double>(Clock::now() - *t_signal).count();
      finished_in_grace = completed - completed_before;
      L.say("{} of the {} finished within the grace ({:.3f} s used){}", finished_in_grace,
            at_signal.size(), grace_used, second_signal ? "; a second signal cut it short" : "");
    }
    std::set<int> left = in_flight;
    std::vector<pid_t> pids_seen = pool.worker_pids();  // the pool's own list, before the end
    std::size_t started = pool.workers_started();
    auto t_end = Clock::now();
    if (!left.empty()) {
      pool.terminate();  // SIGTERM, then SIGKILL; unfinished results fail with CancelledError
    } else {
      pool.close();
      pool.join();
    }
    double end_secs = lesson::seconds_since(t_end);
    for (int id : left) {
      try {
        results.at(id).get(10s);
      } catch (const mp::CancelledError&) {
        ++cancelled;
      } catch (const std::exception&) {
        ++other_errors;
      }
    }
    int hung_in_flight = 0, hung_cancelled = 0;
    for (int id : at_signal) hung_in_flight += hangs(id);
    for (int id : left) hung_cancelled += hangs(id);
    if (!left.empty()) {
      L.say("terminated the pool: {} tasks cancelled {} ({:.3f} s)", cancelled, left, end_secs);
    } else {
      L.say("nothing left to cancel: closed and joined the pool ({:.3f} s)", end_secs);
    }
    signal_thread.request_stop();
    signal_thread.join();

    // Step 4: what is left.
    L.step("what is left");
    // Initializer lines: a worker writes its pid last, so a line with a pid is complete.
    int sigint_ignored = 0, sigint_was_blocked = 0, sigterm_unblocked = 0, initialized = 0;
    for (std::int32_t i = 0; i < next_line.value(); ++i) {
      const WorkerLine& w = lines[static_cast<std::size_t>(i)];
      if (w.pid == 0) continue;
      ++initialized;
      if (std::find(pids_seen.begin(), pids_seen.end(), w.pid) == pids_seen.end())
        pids_seen.push_back(w.pid);
      sigint_ignored += w.sigint_ignored;
      sigint_was_blocked += w.sigint_was_blocked;
      sigterm_unblocked += w.sigterm_unblocked;
    }
    int pids_left = 0;
    for (pid_t p : pids_seen) pids_left += !gone(p);
    std::set<pid_t> ours{pids_seen.begin(), pids_seen.end()};
    ours.insert(me);
    auto shm_left = shm_entries_of(ours);
    // Children of ours still there (running or zombie), except mp's fork server, which
    // serves the whole program and is stopped by mp at exit.
    int children_left = 0, fork_servers = 0;
    for (pid_t c : mp::children(me)) {
      std::ifstream comm(fmt::format("/proc/{}/comm", c));
      std::string name;
      std::getline(comm, name);
      (name == "mp-forkserver" ? fork_servers : children_left) += 1;
    }
    bool no_children = children_left == 0;
    L.say(
        "workers started {} (none replaced: {}); SIGINT blocked at their start {}, ignored {}, "
        "SIGTERM unblocked {}",
        started, started == static_cast<std::size_t>(workers), sigint_was_blocked, sigint_ignored,
        sigterm_unblocked);
    L.say(
        "worker pids {}: still existing {}; other children left {}{}; /dev/shm/mp-* entries "
        "of ours {}",
        pids_seen, pids_left, children_left,
        fork_servers ? " (and mp's fork server, until exit)" : "", shm_left.size());
    int accounted =
        completed_before + finished_in_grace + failed + cancelled + other_errors + not_submitted;
    L.say(
        "accounted for: {} done before + {} in the grace + {} cancelled + {} not started = {} of "
        "{}",
        completed_before, finished_in_grace, cancelled, not_submitted, accounted, items);

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("grace", grace);
    L.fact("start_method", std::string(ctx.start_method()));
    L.fact("signal", got_signal == 0 ? "none" : got_signal == SIGINT ? "SIGINT" : "SIGTERM");
    L.fact("signal_from_self", sender == me);
    L.fact("signalled_processes", signalled.size());
    L.fact("completed_before_signal", completed_before);
    L.fact("in_flight_at_signal", at_signal.size());
    L.fact("hung_in_flight_at_signal", hung_in_flight);
    L.fact("finished_in_grace", finished_in_grace);  // timing: reported
    L.fact("grace_seconds_used", grace_used);
    L.fact("second_signal", second_signal);
    L.fact("cancelled", cancelled);
    L.fact("hung_cancelled", hung_cancelled);
    L.fact("other_errors", other_errors + failed);  // a task that failed otherwise: none
    L.fact("not_submitted", not_submitted);
    L.fact("accounted", accounted);
    L.fact("workers_started", started);
    L.fact("workers_initialized", initialized);
    L.fact("workers_sigint_blocked_at_start", sigint_was_blocked);
    L.fact("workers_sigint_ignored", sigint_ignored);
    L.fact("workers_sigterm_unblocked", sigterm_unblocked);
    L.fact("worker_pids_left", pids_left);
    L.fact("children_left", children_left);
    L.fact("shm_entries_left", shm_left.size());

    const auto w = static_cast<std::size_t>(workers);
    bool workers_ok = started == w && pids_seen.size() == w && sigint_ignored == initialized &&
                      sigint_was_blocked == initialized && sigterm_unblocked == initialized;
    bool books_ok = accounted == items && other_errors == 0 && failed == 0 &&
                    finished_in_grace + cancelled == static_cast<int>(at_signal.size()) &&
                    hung_cancelled == hung_in_flight;
    bool clean = pids_left == 0 && no_children && shm_left.empty();
    return workers_ok && books_ok && clean;
  });
}
