// error_handling_retry.cpp - Errors from pool workers: RemoteError vs WorkerLostError, error_callback, retry with backoff and jitter.
//
// A task can fail in two ways that look alike from far away and are not: it throws (the
// worker lives on, and the exception reaches the parent as mp::RemoteError with its type
// name, its message and the worker's pid), or it crashes its worker outright (a segfault,
// abort, the OOM killer: mp::WorkerLostError with the pid and the signal, and the pool
// starts a new worker). A retry policy has to tell them apart, and to tell a transient
// error (try again later) from a permanent one (the input is bad: trying again only wastes
// time). The lesson drives every task through apply_async with a callback and an
// error_callback; the callbacks run on the pool's callback thread and only post what
// happened to the main thread, which decides: done, retry after an exponential backoff with
// jitter, or give up - after --max-tries tries, or at once for a permanent error - keeping
// every failure of every task.
//
// The failures follow a fixed schedule, so every count is exact: task i fails its first
// i % 4 tries; when 5 divides i those failures are crashes (SIGSEGV), otherwise a
// demo::TransientError is thrown; a task with i % 6 == 5 throws std::invalid_argument
// (permanent) every time.
//
// The workers say what each try is about to do through mp/logging.hpp: the pool's
// initializer (mp::log_to_queue) sends every worker's records into one mp::LogQueue, and an
// mp::QueueListener thread in the parent writes them, one whole line each with the
// worker's name and pid, to a file (--log-file) and to a check that counts them. A worker
// that logs "crashing" and dies a moment later still has its line delivered: the record was
// in shared memory before log() returned.
//
// Usage: error_handling_retry [--workers N] [--tasks N] [--max-tries N] [--base-delay-ms N]
//                             [--seed N] [--log-file PATH] [--json]
//   $ build/5_advanced/error_handling_retry --tasks 12 --max-tries 3 --log-file retry.log
//
// Watch for: the counts equal the schedule's; each crash cost a worker (workers started =
// workers + crashes); permanent errors are never retried; every retry waited at least its
// backoff; a task that gave up still has each of its failures, with type, message and pid;
// one worker log line per try, each whole, with a worker's pid - the crashed tries' too.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <map>
#include <mp/error.hpp>
#include <mp/logging.hpp>
#include <mp/pool.hpp>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "lesson.hpp"

namespace demo {
// A failure worth retrying (a timeout, a reset connection, a busy resource).
class TransientError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
}  // namespace demo

namespace {

using Clock = std::chrono::steady_clock;

// ---- the schedule, shared by the task (what to do) and the parent (what to expect)

enum class Planned { ok, transient, crash, permanent };

// What try k (0-based) of task i does.
Planned planned(int i, int k) {
  if (i % 6 == 5) return Planned::permanent;                // bad input: fails every time
  if (k >= i % 4) return Planned::ok;                       // fails its first i % 4 tries
  return i % 5 == 0 ? Planned::crash : Planned::transient;  // ...crashing when 5 divides i
}

// The task: does what the schedule says for try k of task i, and logs it first. The line
// goes through the queue the pool's initializer (mp::log_to_queue) installed.
long task(int i, int k) {
  const mp::Logger log{"task"};
  switch (planned(i, k)) {
    case Planned::ok:
      log.info("task {} try {}: ok", i, k + 1);
      return long{i} * i;
    case Planned::transient:
      log.warning("task {} try {}: throwing demo::TransientError", i, k + 1);
      throw demo::TransientError(fmt::format("task {} try {}: the service was busy", i, k + 1));
    case Planned::crash:
      log.critical("task {} try {}: crashing (SIGSEGV)", i, k + 1);
      ::raise(SIGSEGV);  // the worker dies here, as with a real segfault
      return -1;
    case Planned::permanent:
      log.error("task {} try {}: throwing std::invalid_argument", i, k + 1);
      throw std::invalid_argument(fmt::format("task {}: the input is malformed", i));
  }
  return -1;
}

// What the parent checks in every worker log line, on the listener's thread.
struct LogCheck {
  std::mutex mutex;
  pid_t parent = 0;
  int lines = 0;
  int bad = 0;  // not one whole line, or not from a worker, or pid not in the line
  int crash_lines = 0;
  std::map<int, int> lines_of_task;  // task -> lines (one per try)
  std::vector<std::string> sample;   // the lines of one task, for the story

  void take(const mp::LogRecord& r, std::string_view line, int sample_task) {
    // One line: ends with its only '\n', and names the worker's process and pid.
    const std::string tag =
        fmt::format("[{}/{}:{}] task: ", mp::level_name(r.level), r.process, r.pid);
    bool whole = !line.empty() && line.find('\n') == line.size() - 1 &&
                 line.find(tag) != std::string_view::npos;
    bool from_worker =
        r.pid > 0 && r.pid != parent && r.process.find("PoolWorker-") != std::string::npos;
    int i = -1, k = -1;
    bool parsed = std::sscanf(r.message.c_str(), "task %d try %d", &i, &k) == 2;
    std::lock_guard lock(mutex);
    ++lines;
    if (!whole || !from_worker || !parsed) ++bad;
    if (!parsed) return;
    ++lines_of_task[i];
    if (r.message.find("crashing") != std::string::npos) ++crash_lines;
    if (i == sample_task) sample.emplace_back(line.substr(0, line.size() - 1));
  }
};

// ---- the parent's side

enum class Kind { thrown_transient, thrown_permanent, crashed };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::thrown_transient:
      return "threw (transient)";
    case Kind::thrown_permanent:
      return "threw (permanent)";
    case Kind::crashed:
      return "crashed";
  }
  return "?";
}

// One failed try, as the parent learned it.
struct Failure {
  int attempt = 0;  // 1-based
  Kind kind = Kind::thrown_transient;
  std::string type;     // RemoteError::type_name(), or the signal's name for a crash
  std::string message;  // what the worker's exception said, or WorkerLostError's what()
  pid_t pid = 0;        // the worker that failed
};

struct TaskState {
  int tries = 0;
  bool succeeded = false;
  bool gave_up = false;
  long value = 0;
  std::vector<Failure> failures;  // every one, in order
};

// What a callback posts to the main thread.
struct Event {
  int task = 0;
  bool ok = false;
  long value = 0;
  Failure failure;
};

// A mailbox from the callback thread to the main thread.
class Mailbox {
 public:
  void post(Event e) {
    {
      std::lock_guard lock(mutex_);
      events_.push_back(std::move(e));
    }
    cv_.notify_one();
  }
  // Waits for events until `until`; returns what arrived (maybe nothing).
  std::deque<Event> take(Clock::time_point until) {
    std::unique_lock lock(mutex_);
    cv_.wait_until(lock, until, [&] { return !events_.empty(); });
    std::deque<Event> got;
    got.swap(events_);
    return got;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

// Turns the error an error_callback receives into a Failure. Runs on the callback thread.
Failure classify(const std::exception& e, int attempt) {
  Failure f;
  f.attempt = attempt;
  if (const auto* remote = dynamic_cast<const mp::RemoteError*>(&e)) {
    f.kind = remote->type_name() == "demo::TransientError" ? Kind::thrown_transient
                                                           : Kind::thrown_permanent;
    f.type = remote->type_name();
    f.message = remote->message();
    f.pid = remote->pid();
  } else if (const auto* lost = dynamic_cast<const mp::WorkerLostError*>(&e)) {
    f.kind = Kind::crashed;
    f.type = lost->signal() ? mp::signal_name(lost->signal())
                            : fmt::format("exit status {}", lost->exit_status());
    f.message = lost->what();
    f.pid = lost->pid();
  } else {
    f.kind = Kind::thrown_permanent;  // CancelledError, a serialization error: not retried
    f.type = "other";
    f.message = e.what();
  }
  return f;
}

struct Counts {
  int successes = 0, gave_up = 0, gave_up_permanent = 0, tries = 0, retries = 0;
  int transient = 0, permanent = 0, crashes = 0;
};

// The counts the schedule predicts.
Counts expected_counts(int tasks, int max_tries) {
  Counts c;
  for (int i = 0; i < tasks; ++i) {
    for (int k = 0;; ++k) {
      ++c.tries;
      Planned p = planned(i, k);
      if (p == Planned::ok) {
        ++c.successes;
        break;
      }
      if (p == Planned::crash) ++c.crashes;
      if (p == Planned::transient) ++c.transient;
      if (p == Planned::permanent) {
        ++c.permanent;
        ++c.gave_up;
        ++c.gave_up_permanent;
        break;
      }
      if (k + 1 >= max_tries) {
        ++c.gave_up;
        break;
      }
    }
  }
  c.retries = c.tries - tasks;
  return c;
}

nlohmann::json to_json(const Counts& c) {
  return {{"successes", c.successes},
          {"gave_up", c.gave_up},
          {"gave_up_permanent", c.gave_up_permanent},
          {"tries", c.tries},
          {"retries", c.retries},
          {"thrown_transient", c.transient},
          {"thrown_permanent", c.permanent},
          {"crashes", c.crashes}};
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Errors from pool workers: RemoteError vs WorkerLostError, error_callback, "
                   "retry with backoff and jitter."};
  int& workers = L.add_workers(3, 32);
  int tasks = 12, max_tries = 3, base_delay_ms = 10;
  L.cli()
      .add_option("--tasks", tasks, "number of tasks")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  L.cli()
      .add_option("--max-tries", max_tries, "tries per task before giving up")
      ->check(CLI::Range(1, 10))
      ->capture_default_str();
  L.cli()
      .add_option("--base-delay-ms", base_delay_ms, "backoff before the first retry")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  std::uint64_t& seed = L.add_seed(1);
  std::string log_file;
  L.cli().add_option("--log-file", log_file, "also append the workers' log lines to this file");
  L.parse(argc, argv);

  return L.run([&] {
    const pid_t self = ::getpid();

    // Step 0: one log queue for every worker, and one listener thread here that writes
    // each record as one line: to --log-file, and to a check that counts them.
    mp::LogQueue log_queue;
    LogCheck check;
    check.parent = self;
    const int sample_task = 10;  // the task whose lines the story shows (it crashes twice)
    std::vector<mp::LogSink> sinks{
        mp::LogSink{[&check, sample_task](const mp::LogRecord& r, std::string_view line) {
          check.take(r, line, sample_task);
        }}};
    if (!log_file.empty()) sinks.push_back(mp::file_sink(log_file));
    mp::QueueListener listener{log_queue, std::move(sinks)};
    listener.start();
    // Each worker, replacements included, sends its records at info and above to the queue.
    mp::Pool pool{workers, {mp::log_to_queue, log_queue, mp::Level::info}};

    // Step 1: one failure of each kind, with apply(): what reaches the parent.
    L.step("an exception and a crash in a worker");
    std::string remote_type, remote_message;
    bool remote_pid_is_worker = false;
    try {
      pool.apply(task, 1, 0);  // task 1 throws on its first try
    } catch (const mp::RemoteError& e) {
      remote_type = e.type_name();
      remote_message = e.message();
      remote_pid_is_worker = e.pid() != self && e.pid() > 0;
      L.say("mp::RemoteError: type {}, message \"{}\", from worker {}", e.type_name(), e.message(),
            e.pid());
    }
    std::string lost_signal;
    try {
      pool.apply(task, 10, 0);  // task 10 crashes on its first try
    } catch (const mp::WorkerLostError& e) {
      lost_signal = mp::signal_name(e.signal());
      L.say("mp::WorkerLostError: worker {} ended by {}: {}", e.pid(), lost_signal, e.what());
    }

    // Step 2: every task through apply_async with callbacks; the main thread retries.
    L.step(fmt::format("{} tasks, at most {} tries each, backoff {} ms doubling, with jitter",
                       tasks, max_tries, base_delay_ms));
    Mailbox mailbox;
    std::vector<TaskState> state(static_cast<std::size_t>(tasks));
    std::vector<mp::AsyncResult<long>> results;
    auto submit = [&](int i) {
      int attempt = ++state[static_cast<std::size_t>(i)].tries;  // 1-based
      results.push_back(pool.apply_async(
          task, std::tuple{i, attempt - 1},
          [&mailbox, i](const long& v) {
            mailbox.post(Event{i, true, v, {}});
          },
          [&mailbox, i, attempt](const std::exception& e) {
            mailbox.post(Event{i, false, 0, classify(e, attempt)});
          }));
    };

    // Equal jitter: wait between half and all of base * 2^(retry - 1), so that tasks that
    // failed together do not all come back at the same moment.
    std::mt19937_64 rng{seed};
    auto backoff = [&](int retry) {
      double full = base_delay_ms * std::pow(2.0, retry - 1);
      return std::chrono::duration<double, std::milli>(
          std::uniform_real_distribution<double>(full / 2, full)(rng));
    };
    struct Due {
      Clock::time_point at;
      int task;
    };
    std::vector<Due> due;  // retries waiting for their time
    double min_slack_ms = 1e9, total_backoff_ms = 0;

    auto t0 = Clock::now();
    for (int i = 0; i < tasks; ++i) submit(i);
    int open = tasks;
    while (open > 0) {
      auto next = due.empty() ? Clock::now() + std::chrono::seconds(60)
                              : std::min_element(due.begin(), due.end(), [](auto& a, auto& b) {
                                  return a.at < b.at;
                                })->at;
      for (Event& e : mailbox.take(next)) {
        TaskState& s = state[static_cast<std::size_t>(e.task)];
        if (e.ok) {
          s.succeeded = true;
          s.value = e.value;
          --open;
          continue;
        }
        Kind kind = e.failure.kind;
        s.failures.push_back(std::move(e.failure));
        if (kind == Kind::thrown_permanent || s.tries >= max_tries) {
          s.gave_up = true;  // its failures stay in s.failures
          --open;
          continue;
        }
        auto wait = backoff(s.tries);
        total_backoff_ms += wait.count();
        due.push_back(
            Due{Clock::now() + std::chrono::duration_cast<Clock::duration>(wait), e.task});
      }
      // Resubmit what is due, never earlier.
      auto now = Clock::now();
      for (auto it = due.begin(); it != due.end();) {
        if (it->at <= now) {
          min_slack_ms = std::min(min_slack_ms,
                                  std::chrono::duration<double, std::milli>(now - it->at).count());
          submit(it->task);
          it = due.erase(it);
        } else {
          ++it;
        }
      }
    }
    double secs = lesson::seconds_since(t0);
    pool.close();
    pool.join();
    const std::size_t started_after = pool.workers_started();
    listener.stop();  // every line the workers logged has been written when it returns

    // Step 3: the ledger of every task.
    Counts got;
    int failures_kept = 0;
    bool values_right = true, pids_are_workers = true;
    for (int i = 0; i < tasks; ++i) {
      const TaskState& s = state[static_cast<std::size_t>(i)];
      got.tries += s.tries;
      got.successes += s.succeeded;
      got.gave_up += s.gave_up;
      failures_kept += static_cast<int>(s.failures.size());
      if (s.succeeded && s.value != long{i} * i) values_right = false;
      std::vector<std::string> marks;
      for (const Failure& f : s.failures) {
        if (f.kind == Kind::crashed) ++got.crashes;
        if (f.kind == Kind::thrown_transient) ++got.transient;
        if (f.kind == Kind::thrown_permanent) ++got.permanent;
        if (f.pid == self || f.pid <= 0) pids_are_workers = false;
        marks.push_back(f.kind == Kind::crashed            ? "C"
                        : f.kind == Kind::thrown_transient ? "T"
                                                           : "P");
      }
      if (s.gave_up && !s.failures.empty() && s.failures.back().kind == Kind::thrown_permanent)
        ++got.gave_up_permanent;
      L.say("  task {:>3}: {} tr{}  failures [{}]  {}", i, s.tries, s.tries == 1 ? "y " : "ies",
            fmt::join(marks, " "),
            s.succeeded ? fmt::format("-> {}", s.value) : std::string("GAVE UP"));
    }
    got.retries = got.tries - tasks;
    L.say("(T threw a demo::TransientError, P threw std::invalid_argument, C crashed its worker)");

    L.step("the tasks that gave up, with every failure kept");
    for (int i = 0; i < tasks; ++i) {
      const TaskState& s = state[static_cast<std::size_t>(i)];
      if (!s.gave_up) continue;
      L.say("  task {}:", i);
      for (const Failure& f : s.failures)
        L.say("    try {}: {} - {}: {} (worker {})", f.attempt, kind_name(f.kind), f.type,
              f.message, f.pid);
    }

    Counts want = expected_counts(tasks, max_tries);
    L.step("counts");
    L.say("successes {}, gave up {} ({} permanent), tries {}, retries {}", got.successes,
          got.gave_up, got.gave_up_permanent, got.tries, got.retries);
    L.say("failures {}: thrown transient {}, thrown permanent {}, crashes {}", failures_kept,
          got.transient, got.permanent, got.crashes);
    L.say("as the schedule predicts: {}", to_json(got) == to_json(want));
    // Each crash costs a worker: the first ones, one for step 1's crash, one per crash here.
    const std::size_t started_expected =
        static_cast<std::size_t>(workers) + 1 + static_cast<std::size_t>(got.crashes);
    L.say("workers started: {} = {} + 1 (the crash in step 1) + {} (one per crash here)",
          started_after, workers, got.crashes);
    // Step 4: the workers' log. One line per try: the 2 tries of step 1 and every try here.
    L.step("the workers' log, gathered by one listener");
    std::lock_guard log_lock(check.mutex);
    bool lines_match_tries = true;
    for (int i = 0; i < tasks; ++i) {
      int lines_want = state[static_cast<std::size_t>(i)].tries + (i == 1 || i == 10 ? 1 : 0);
      auto it = check.lines_of_task.find(i);
      if ((it == check.lines_of_task.end() ? 0 : it->second) != lines_want)
        lines_match_tries = false;
    }
    const int lines_expected = got.tries + 2;
    L.say("{} lines from the workers (expected {}: one per try), {} not whole or not from a worker",
          check.lines, lines_expected, check.bad);
    L.say(
        "{} of them announce a crash (step 1's and one per crash here): each arrived although "
        "its worker died right after logging it",
        check.crash_lines);
    L.say("the lines of task {}:", sample_task);
    for (const std::string& text : check.sample) L.say("  {}", text);
    if (!log_file.empty()) L.say("every line is also in {}", log_file);

    L.say(
        "time {:.3f} s; the backoffs add up to {:.0f} ms (they overlap); a retry went out at least "
        "{:.3f} ms after "
        "its due time",
        secs, total_backoff_ms, min_slack_ms < 1e9 ? min_slack_ms : 0.0);

    L.fact("workers", workers);
    L.fact("tasks", tasks);
    L.fact("max_tries", max_tries);
    L.fact("remote_error_type", remote_type);
    L.fact("remote_error_message", remote_message);
    L.fact("remote_error_pid_is_worker", remote_pid_is_worker);
    L.fact("lost_signal", lost_signal);
    L.fact("counts", to_json(got));
    L.fact("expected", to_json(want));
    L.fact("failures_kept", failures_kept);
    L.fact("values_right", values_right);
    L.fact("failure_pids_are_workers", pids_are_workers);
    L.fact("workers_started", started_after);
    L.fact("workers_started_expected", started_expected);
    L.fact("retry_min_slack_ms", min_slack_ms < 1e9 ? min_slack_ms : 0.0);  // reported
    L.fact("seconds", secs);
    L.fact("backoff_ms", total_backoff_ms);
    L.fact("worker_log_lines", check.lines);
    L.fact("worker_log_lines_expected", lines_expected);
    L.fact("worker_log_lines_match_tries", lines_match_tries);
    L.fact("worker_lines_whole_with_pid", check.bad == 0 && check.lines > 0);
    L.fact("worker_log_crash_lines", check.crash_lines);
    L.fact("log_listener_failures", listener.failures());

    bool step1 =
        remote_type == "demo::TransientError" && remote_pid_is_worker && lost_signal == "SIGSEGV";
    bool counts_ok = to_json(got) == to_json(want) &&
                     failures_kept == got.transient + got.permanent + got.crashes &&
                     failures_kept == got.tries - got.successes;
    bool workers_ok = started_after == started_expected;
    bool log_ok = check.bad == 0 && check.lines == lines_expected && lines_match_tries &&
                  check.crash_lines == got.crashes + 1 && listener.failures() == 0;
    return step1 && counts_ok && workers_ok && values_right && pids_are_workers && log_ok;
  });
}
