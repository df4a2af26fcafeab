// event_loop_bridge.cpp - One Asio event loop waits on child processes, their pipes, a timer and
// SIGINT at once.
//
// asyncio's loop.add_reader() and child watcher, in C++: a single thread runs an Asio
// io_context that watches every child's pidfd (mp::Process::sentinel(), readable once the
// child has ended), every child's end of an mp::Pipe (readable when a message is there), a
// heartbeat timer and a signal set for SIGINT. Nothing polls and no thread waits per child:
// the kernel wakes the loop (epoll) for whichever comes first. The children do CPU-bound
// work and send progress; the loop stays free to do other things, which the heartbeat
// shows by keeping its period.
//
// Usage: event_loop_bridge [--workers N] [--items N] [--period MS] [--interrupt-after S]
//                          [--json]
//   $ build/7_integration/event_loop_bridge --workers 3 --items 400000
//
// Watch for: progress lines of all the workers interleave with the heartbeat's count; the
// parent has one thread the whole time; a worker killed in the middle is reported at once
// (its pidfd and its pipe's end of file), not waited for; SIGINT (Ctrl-C, here sent by a
// child) arrives as an event in the loop, which then stops the workers cleanly.
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <chrono>
#include <csignal>
#include <memory>
#include <mp/connection.hpp>
#include <mp/process.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"
#include "proc_status.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// Plain CPU work: the primes in [lo, hi), by trial division.
long count_primes(long lo, long hi) {
  long count = 0;
  for (long k = std::max(lo, 2L); k < hi; ++k) {
    bool prime = true;
    for (long d = 2; d * d <= k && prime; ++d) prime = k % d != 0;
    count += prime;
  }
  return count;
}

// What a worker sends after each slice of its work: trivially copyable, one write each.
struct Progress {
  int worker;
  int slice;   // slices done so far
  int slices;  // in all (0: it works until stopped)
  long primes;
};

// The children ignore SIGINT: Ctrl-C reaches the whole process group, and here the parent
// alone decides what it means (it stops them with SIGTERM).
void ignore_sigint() { std::signal(SIGINT, SIG_IGN); }

// A worker: counts the primes of its range in slices and reports after each one. With
// die_after > 0 it kills itself after that many slices, as the OOM killer would.
int prime_worker(mp::Connection out, int worker, long lo, long hi, int slices, int die_after) {
  ignore_sigint();
  long primes = 0;
  for (int s = 0; s < slices; ++s) {
    primes += count_primes(lo + (hi - lo) * s / slices, lo + (hi - lo) * (s + 1) / slices);
    out.send(Progress{worker, s + 1, slices, primes});
    if (s + 1 == die_after) ::raise(SIGKILL);
  }
  return 0;
}

// A worker with no end: it counts on until it is stopped.
int endless_worker(mp::Connection out, int worker, long items) {
  ignore_sigint();
  long primes = 0;
  for (int s = 1;; ++s) {
    primes += count_primes(items * s, items * (s + 1));
    out.send(Progress{worker, s, 0, primes});
  }
}

// Plays the user who presses Ctrl-C: SIGINT to the parent after a while.
int press_ctrl_c(mp::Connection, double after_seconds) {
  std::this_thread::sleep_for(std::chrono::duration<double>(after_seconds));
  if (::kill(mp::parent_process()->pid, SIGINT) == -1) mp::throw_errno("send SIGINT to the parent");
  return 0;
}

// An Asio watch over a descriptor owned by someone else (an mp::Process or mp::Connection).
// Asio closes what it owns, so the watch gives the descriptor back instead.
struct Watch {
  asio::posix::stream_descriptor d;
  Watch(asio::io_context& io, int fd) : d(io, fd) {}
  ~Watch() { d.release(); }
  Watch(const Watch&) = delete;
  Watch& operator=(const Watch&) = delete;
};

// One child as the loop sees it.
struct Child {
  std::string label;
  mp::Process process;
  mp::Connection conn;  // the parent's end of its pipe
  std::optional<Watch> pipe, exit;
  bool stop_on_sigint = true;  // a worker, which SIGINT stops
  int messages = 0;
  long primes = 0;
  bool eof = false;
  std::optional<int> exitcode;
  bool done() const { return eof && exitcode; }
};

// The loop: children, the heartbeat and SIGINT, all on the thread that calls run().
class Loop {
 public:
  Loop(asio::io_context& io, const lesson::Lesson& L, std::chrono::milliseconds period)
      : io_(io), L_(L), period_(period), heartbeat_(io), sigint_(io, SIGINT) {}

  // Starts a child that talks through `end` (the child's end of a pipe whose other end is
  // `mine`) and watches it.
  template <class F, class... Args>
  Child& start(std::string label, mp::Connection mine, mp::Connection end, F f, Args... args) {
    auto c = std::make_unique<Child>();
    c->label = std::move(label);
    c->process = mp::Process{f, end, args...};
    c->process.set_name(c->label);
    c->process.start();
    end.close();  // the child has its copy; ours would hide the end of file from us
    c->conn = std::move(mine);
    c->pipe.emplace(io_, c->conn.fileno());
    c->exit.emplace(io_, c->process.sentinel());
    watch_messages(*c);
    watch_exit(*c);
    children_.push_back(std::move(c));
    return *children_.back();
  }

  // Runs until every child has ended and its pipe is drained.
  void run() {
    t0_ = Clock::now();
    next_tick_ = t0_ + period_;
    last_tick_ = t0_;
    tick();
    wait_sigint();
    io_.restart();
    io_.run();
    elapsed_ = seconds();
  }

  std::vector<std::unique_ptr<Child>>& children() { return children_; }
  bool interrupted() const { return interrupted_; }
  double seconds() const { return lesson::seconds_since(t0_); }
  double elapsed() const { return elapsed_; }  // how long the last run() took
  int ticks() const { return ticks_; }
  double mean_tick_ms() const { return ticks_ ? sum_interval_ms_ / ticks_ : 0; }
  double max_late_ms() const { return max_late_ms_; }
  int threads_seen() const { return threads_seen_; }
  std::optional<double> sigint_at;  // seconds into run() when SIGINT arrived

 private:
  // Messages: when the pipe is readable, take every message there (mp may have read more
  // than one ahead), then wait again. End of file: the child's end is closed for good.
  void watch_messages(Child& c) {
    c.pipe->d.async_wait(asio::posix::stream_descriptor::wait_read, [this, &c](std::error_code ec) {
      if (ec) return;  // cancelled
      try {
        while (c.conn.poll()) on_message(c, c.conn.recv<Progress>());
      } catch (const mp::EOFError&) {
        c.eof = true;
        L_.say("  [{:6.3f} s] {}: end of file on its pipe", seconds(), c.label);
        check_done();
        return;
      }
      watch_messages(c);
    });
  }

  void on_message(Child& c, const Progress& p) {
    ++c.messages;
    c.primes = p.primes;
    threads_seen_ = std::max(threads_seen_, static_cast<int>(proc_status::threads()));
    if (p.slices > 0) {
      L_.say("  [{:6.3f} s] {}: slice {}/{}, {} primes so far   (heartbeats so far: {})", seconds(),
             c.label, p.slice, p.slices, p.primes, ticks_);
    } else if (p.slice % 5 == 1) {
      L_.say("  [{:6.3f} s] {}: slice {}, still counting   (heartbeats so far: {})", seconds(),
             c.label, p.slice, ticks_);
    }
  }

  // The end of a child: its pidfd becomes readable once, when it has ended.
  void watch_exit(Child& c) {
    c.exit->d.async_wait(asio::posix::stream_descriptor::wait_read, [this, &c](std::error_code ec) {
      if (ec) return;
      c.process.join();  // it has ended: this reaps it at once
      c.exitcode = c.process.exitcode();
      L_.say("  [{:6.3f} s] {} (pid {}) ended: {}", seconds(), c.label, c.process.pid(),
             mp::describe_exitcode(*c.exitcode));
      check_done();
    });
  }

  // The heartbeat: every period, on absolute deadlines, so that a late tick does not delay
  // the following ones. How late each tick fires is how busy (or starved) the loop is.
  void tick() {
    heartbeat_.expires_at(next_tick_);
    heartbeat_.async_wait([this](std::error_code ec) {
      if (ec || finished_) return;
      auto now = Clock::now();
      ++ticks_;
      sum_interval_ms_ += std::chrono::duration<double, std::milli>(now - last_tick_).count();
      max_late_ms_ = std::max(max_late_ms_,
                              std::chrono::duration<double, std::milli>(now - next_tick_).count());
      last_tick_ = now;
      next_tick_ += period_;
      tick();
    });
  }

  // SIGINT, delivered as an event: stop every worker still running (SIGTERM).
  void wait_sigint() {
    sigint_.async_wait([this](std::error_code ec, int) {
      if (ec || finished_) return;
      interrupted_ = true;
      sigint_at = seconds();
      L_.say("  [{:6.3f} s] SIGINT: stopping the workers still running", seconds());
      for (auto& c : children_) {
        if (!c->exitcode && c->stop_on_sigint) c->process.terminate();
      }
      wait_sigint();
    });
  }

  // Every child ended and drained: nothing left to wait for, so the loop may end.
  void check_done() {
    if (!std::all_of(children_.begin(), children_.end(), [](auto& c) { return c->done(); })) return;
    finished_ = true;  // a tick or a signal already queued must not start another wait
    heartbeat_.cancel();
    sigint_.cancel();
  }

  asio::io_context& io_;
  const lesson::Lesson& L_;
  std::chrono::milliseconds period_;
  asio::steady_timer heartbeat_;
  asio::signal_set sigint_;
  std::vector<std::unique_ptr<Child>> children_;
  Clock::time_point t0_, next_tick_, last_tick_;
  int ticks_ = 0;
  double sum_interval_ms_ = 0, max_late_ms_ = 0;
  int threads_seen_ = 0;
  double elapsed_ = 0;
  bool interrupted_ = false;
  bool finished_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "One Asio event loop waits on child processes, their pipes, a timer and "
                   "SIGINT at once."};
  int& workers = L.add_workers(2, 16);
  int& items = L.add_items(1'000'000, 1'000, 100'000'000);
  int period_ms = 20;
  double interrupt_after = 0.3;
  L.cli()
      .add_option("--period", period_ms, "the heartbeat's period in milliseconds")
      ->check(CLI::Range(1, 10'000))
      ->capture_default_str();
  L.cli()
      .add_option("--interrupt-after", interrupt_after,
                  "seconds before the simulated Ctrl-C of the last step")
      ->check(CLI::Range(0.0, 60.0))
      ->capture_default_str();
  L.parse(argc, argv);
  constexpr int kSlices = 10;
  std::chrono::milliseconds period{period_ms};

  return L.run([&] {
    asio::io_context io;  // one loop, run by this thread only

    // Step 1: CPU-bound workers report progress through their pipes; the loop also keeps a
    // heartbeat, and sees each worker end through its pidfd.
    L.step(fmt::format("{} workers count primes; the loop watches them and beats every {} ms",
                       workers, period_ms));
    Loop one{io, L, period};
    for (int w = 0; w < workers; ++w) {
      auto [mine, end] = mp::Pipe();
      one.start(fmt::format("worker-{}", w), mine, end, prime_worker, w, long{items} * w,
                long{items} * (w + 1), kSlices, 0);
    }
    one.run();
    if (one.interrupted()) throw std::runtime_error("interrupted by SIGINT");
    bool results_match = true;
    bool all_exited_0 = true;
    int messages = 0;
    for (int w = 0; w < workers; ++w) {
      Child& c = *one.children()[static_cast<std::size_t>(w)];
      results_match =
          results_match && c.primes == count_primes(long{items} * w, long{items} * (w + 1));
      all_exited_0 = all_exited_0 && c.exitcode == 0;
      messages += c.messages;
    }
    L.say("done in {:.3f} s: {} progress messages; results equal the serial count: {}",
          one.elapsed(), messages, results_match);
    L.say("heartbeat: {} ticks, mean period {:.2f} ms (asked {} ms), latest tick {:.2f} ms late",
          one.ticks(), one.mean_tick_ms(), period_ms, one.max_late_ms());
    L.say("threads in this process while it waited on {} children: {}", workers,
          one.threads_seen());

    // Step 2: a worker dies in the middle of its work. Its pidfd and its pipe's end of file
    // tell the loop at once; the others finish as before.
    int team = std::max(workers, 2);
    L.step(fmt::format("{} workers again; worker-0 is killed after 2 of its {} slices", team,
                       kSlices));
    Loop two{io, L, period};
    for (int w = 0; w < team; ++w) {
      auto [mine, end] = mp::Pipe();
      two.start(fmt::format("worker-{}", w), mine, end, prime_worker, w, long{items} * w,
                long{items} * (w + 1), kSlices, w == 0 ? 2 : 0);
    }
    two.run();
    if (two.interrupted()) throw std::runtime_error("interrupted by SIGINT");
    Child& victim = *two.children().front();
    bool others_match = true;
    for (int w = 1; w < team; ++w) {
      Child& c = *two.children()[static_cast<std::size_t>(w)];
      others_match = others_match && c.exitcode == 0 &&
                     c.primes == count_primes(long{items} * w, long{items} * (w + 1));
    }
    L.say("worker-0 ended {} after {} messages; the others finished and match: {}",
          mp::describe_exitcode(*victim.exitcode), victim.messages, others_match);

    // Step 3: workers with no end, and a child that presses Ctrl-C. SIGINT is one more event
    // for the loop, which stops the workers and then sees each of them end.
    L.step(fmt::format("endless workers; a child sends SIGINT to this process after {} s",
                       interrupt_after));
    Loop three{io, L, period};
    for (int w = 0; w < workers; ++w) {
      auto [mine, end] = mp::Pipe();
      three.start(fmt::format("endless-{}", w), mine, end, endless_worker, w, long{items});
    }
    auto [user_mine, user_end] = mp::Pipe();
    three.start("ctrl-c", user_mine, user_end, press_ctrl_c, interrupt_after).stop_on_sigint =
        false;  // it ends by itself
    three.run();
    std::vector<int> stopped;
    for (int w = 0; w < workers; ++w)
      stopped.push_back(*three.children()[static_cast<std::size_t>(w)]->exitcode);
    int user_exit = *three.children().back()->exitcode;
    double after_sigint = three.sigint_at ? three.elapsed() - *three.sigint_at : -1;
    L.say("SIGINT handled: {}; the workers ended with {}; the loop ended {:.3f} s after it",
          three.interrupted(), stopped, after_sigint);

    bool all_stopped =
        std::all_of(stopped.begin(), stopped.end(), [](int code) { return code == -SIGTERM; });
    std::size_t left = mp::active_children().size();
    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("period_ms", period_ms);
    L.fact("results_match_serial", results_match);
    L.fact("all_exited_0", all_exited_0);
    L.fact("progress_messages", messages);
    L.fact("parent_threads", one.threads_seen());
    L.fact("heartbeat_ticks", one.ticks());
    L.fact("heartbeat_mean_ms", one.mean_tick_ms());
    L.fact("heartbeat_max_late_ms", one.max_late_ms());
    L.fact("work_seconds", one.elapsed());
    L.fact("killed_exitcode", *victim.exitcode);
    L.fact("killed_messages", victim.messages);
    L.fact("killed_eof_seen", victim.eof);
    L.fact("others_match_serial", others_match);
    L.fact("sigint_handled", three.interrupted());
    L.fact("stopped_exitcodes", stopped);
    L.fact("ctrl_c_child_exitcode", user_exit);
    L.fact("seconds_after_sigint", after_sigint);
    L.fact("active_children_after", left);
    return results_match && all_exited_0 && messages == workers * kSlices &&
           one.threads_seen() == 1 && *victim.exitcode == -SIGKILL && victim.messages == 2 &&
           victim.eof && others_match && three.interrupted() && all_stopped && user_exit == 0 &&
           left == 0;
  });
}
