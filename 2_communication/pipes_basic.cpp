// pipes_basic.cpp - Talk to child processes through mp::Pipe: send, recv, poll, EOF, wait.
//
// A Pipe is two connected ends. The parent keeps one and hands the other to a child; what
// one end sends, the other receives, in order. First a conversation (duplex: both ends
// talk), then several workers reporting through one-way pipes while the parent waits on all
// of them at once with mp::wait, one of them dying mid-way; then the limits: an oversized
// message and a peer that is gone are clear errors.
//
// Usage: pipes_basic [--workers N] [--items N] [--json]
//   $ build/2_communication/pipes_basic --workers 3 --items 5
//
// Watch for: poll(timeout) lets the parent do something else while the child works
// ("waiting..."); EOF arrives when the child has exited, after every message it sent; a
// killed worker also ends in EOF, not a hang; the surviving workers' sums are exact.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <mp/connection.hpp>
#include <mp/process.hpp>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {
using namespace std::chrono_literals;

struct Progress {  // trivially copyable: it travels byte for byte
  int step;
  int percent;
};

// The child side of the conversation.
void chatty_child(mp::Connection conn, int steps) {
  conn.send(fmt::format("hello, I am child {}", ::getpid()));
  auto order = conn.recv<std::string>();  // wait for the go-ahead
  for (int s = 1; s <= steps; ++s) {
    std::this_thread::sleep_for(15ms);  // "work"
    conn.send(Progress{s, s * 100 / steps});
  }
  int notes = 0;  // read what the parent said until it says goodbye
  while (conn.recv<std::string>() != "bye") ++notes;
  conn.send(Progress{-1, notes});
}  // returning ends the process and closes its end: the parent will see EOF

// A worker sums its range in `chunks` parts and sends each part as it goes.
void summer(mp::Connection out, long from, long to, int chunks) {
  long step = (to - from + chunks - 1) / chunks;
  for (long a = from; a < to; a += step) {
    long sum = 0;
    for (long i = a; i < std::min(to, a + step); ++i) sum += i;
    out.send(sum);
  }
}

// Sends one part, then dies the hard way before it can send more.
void crasher(mp::Connection out) {
  out.send(1000L);
  ::raise(SIGKILL);
}
}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Talk to child processes through mp::Pipe: send, recv, poll, EOF, wait."};
  int& workers = L.add_workers(3, 64);
  int& steps = L.add_items(5, 2, 1000);
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: a conversation over a duplex pipe.
    L.step("a conversation (duplex Pipe)");
    auto [parent_end, child_end] = mp::Pipe();
    mp::Process child{chatty_child, child_end, steps};
    child.start();
    child_end.close();  // the child has its copy; ours would keep EOF from arriving
    L.say("parent got: '{}'", parent_end.recv<std::string>());
    parent_end.send(std::string("start your work"));
    int reports = 0, waits = 0, notes_sent = 0, child_read = -1;
    for (;;) {
      if (!parent_end.poll(5ms)) {  // nothing yet: free to do something else
        ++waits;
        continue;
      }
      auto p = parent_end.recv<Progress>();
      if (p.step < 0) {
        child_read = p.percent;
        break;
      }
      ++reports;
      L.say("parent got progress: step {} ({}%)", p.step, p.percent);
      if (p.step == steps / 2) {
        parent_end.send(std::string("halfway, keep going"));
        ++notes_sent;
      }
      if (p.percent == 100) parent_end.send(std::string("bye"));
    }
    L.say("parent waited {} times in poll(5 ms); the child read {} note(s)", waits, child_read);
    bool eof = false;
    try {
      parent_end.recv<std::string>();
    } catch (const mp::EOFError& e) {
      eof = true;
      L.say("next recv: mp::EOFError ({})", e.what());
    }
    child.join();

    // Step 2: workers report through one-way pipes; mp::wait serves whichever is ready.
    L.step(fmt::format("{} workers and a crasher, served by mp::wait", workers));
    const long n = 1'000'000;
    std::vector<mp::Process> procs;
    std::vector<mp::Connection> open;
    for (int w = 0; w <= workers; ++w) {
      auto [r, s] = mp::Pipe(false);  // r receives, s sends
      if (w < workers) {
        procs.emplace_back(summer, s, n * w / workers, n * (w + 1) / workers, 4);
      } else {
        procs.emplace_back(crasher, s);
      }
      procs.back().start();
      s.close();
      open.push_back(r);
    }
    mp::Connection crasher_end = open.back();
    long total = 0, messages = 0;
    bool crasher_eof = false;
    while (!open.empty()) {
      for (mp::Connection& c : mp::wait(open)) {  // blocks until at least one is ready
        try {
          long part = c.recv<long>();
          ++messages;
          if (!(c == crasher_end)) total += part;
        } catch (const mp::EOFError&) {  // that worker has ended: stop watching it
          crasher_eof = crasher_eof || c == crasher_end;
          std::erase(open, c);
        }
      }
    }
    for (auto& p : procs) p.join();
    int crasher_code = *procs.back().exitcode();
    long expected = n * (n - 1) / 2;
    L.say("{} messages; sum {} (expected {}); the crasher {} and its pipe gave EOF: {}", messages,
          total, expected, mp::describe_exitcode(crasher_code), crasher_eof);

    // Step 3: the limits are clear errors, not corruption or a dead process.
    L.step("limits");
    auto [r, s] = mp::Pipe();
    s.set_max_message_size(1024);
    bool refused = false;
    try {
      s.send(std::string(4096, 'x'));
    } catch (const mp::MessageTooLarge& e) {
      refused = true;
      L.say("oversized: {}", e.what());
    }
    bool nothing_arrived = !r.poll();
    r.close();
    bool broken_pipe_error = false;
    try {
      s.send(std::string("anyone there?"));
    } catch (const std::system_error& e) {
      broken_pipe_error = e.code().value() == EPIPE;
      L.say("peer gone: {}", e.what());
    }

    L.fact("steps", steps);
    L.fact("progress_reports", reports);
    L.fact("notes_sent", notes_sent);
    L.fact("notes_read_by_child", child_read);
    L.fact("eof_after_child_exit", eof);
    L.fact("workers", workers);
    L.fact("worker_sum", total);
    L.fact("expected_sum", expected);
    L.fact("crasher_exitcode", crasher_code);
    L.fact("crasher_eof", crasher_eof);
    L.fact("oversized_refused", refused);
    L.fact("oversized_nothing_written", nothing_arrived);
    L.fact("send_to_closed_is_epipe", broken_pipe_error);
    return reports == steps && child_read == notes_sent && eof && total == expected &&
           crasher_code == -SIGKILL && crasher_eof && refused && nothing_arrived &&
           broken_pipe_error;
  });
}
