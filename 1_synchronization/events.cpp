// events.cpp - An mp::Event is a flag processes wait on: set() starts them all.
//
// A controller coordinates workers with two events, as in a factory: the workers get ready
// and wait for `start`; one set() releases every one of them at once. They work until
// `stop` is set, checking it between units of work. Last, wait() with a timeout: it
// returns false when nobody sets the event in time, so a process can give up and go on.
//
// Usage: events [--workers N] [--json]
//   $ build/1_synchronization/events --workers 4
//
// Watch for: nobody passes the start line before set(); every worker reports in after
// it; each stops within a unit of work of `stop`; the timed wait returning false.
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <thread>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

// Children print a line at once: into a pipe, stdout would keep it until the child exits.
template <class... Args>
void tell(bool story, fmt::format_string<Args...> f, Args&&... args) {
  if (!story) return;
  fmt::print(f, std::forward<Args>(args)...);
  std::fflush(stdout);
}

struct Tally {
  int ready;    // workers waiting at the start line
  int started;  // workers past it
  int units;    // units of work done, all workers together
};

void worker(int id, mp::Event start, mp::Event stop, mp::Value<Tally> tally, bool story) {
  {
    std::lock_guard g{tally.get_lock()};
    ++tally.get_obj().ready;
  }
  start.wait();  // sleeps until the controller's set()
  {
    std::lock_guard g{tally.get_lock()};
    ++tally.get_obj().started;
  }
  tell(story, "  worker {} started\n", id);
  int mine = 0;
  while (!stop.is_set()) {  // a cheap check between units of work
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ++mine;
  }
  std::lock_guard g{tally.get_lock()};
  tally.get_obj().units += mine;
  tell(story, "  worker {} stopped after {} units\n", id, mine);
}

// Waits for an event nobody will set: 0 when the timed wait gave up.
int impatient(mp::Event never) { return never.wait(std::chrono::milliseconds(100)) ? 1 : 0; }

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "An mp::Event is a flag processes wait on: set() starts them all."};
  int& workers = L.add_workers(4, 64);
  L.parse(argc, argv);

  return L.run([&] {
    mp::Event start, stop;
    mp::Value<Tally> tally;

    // Step 1: the workers line up and wait for `start`.
    L.step("the start line");
    std::vector<mp::Process> procs;
    for (int i = 0; i < workers; ++i) {
      procs.emplace_back(worker, i, start, stop, tally, !L.json());
    }
    for (auto& p : procs) p.start();
    while (tally.value().ready < workers) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // they are all waiting now
    int started_before_set = tally.value().started;
    L.say("{} workers ready, {} past the start line before set()", workers, started_before_set);

    // Step 2: one set() releases them all.
    L.step("start.set()");
    start.set();
    while (tally.value().started < workers) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(30));  // let them work a little

    // Step 3: stop.set(); each notices between two units of work.
    L.step("stop.set()");
    stop.set();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    Tally t = tally.value();
    L.say("all {} stopped; {} units of work done", workers, t.units);

    // Step 4: a wait that gives up, and clear().
    L.step("wait(100ms) on an event nobody sets");
    mp::Event never;
    mp::Process child{impatient, never};
    child.start();
    child.join();
    bool timed_out = child.exitcode() == 0;
    L.say("the child's wait returned false after the timeout: {}", timed_out);
    start.clear();
    L.say("start.clear(): is_set() is now {}", start.is_set());

    L.fact("workers", workers);
    L.fact("started_before_set", started_before_set);
    L.fact("started_after_set", t.started);
    L.fact("units_done", t.units);
    L.fact("timed_wait_gave_up", timed_out);
    L.fact("is_set_after_clear", start.is_set());
    return all_ok && started_before_set == 0 && t.started == workers && timed_out &&
           !start.is_set() && stop.is_set();
  });
}
