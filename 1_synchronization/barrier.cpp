// barrier.cpp - An mp::Barrier makes processes meet after each phase: timeouts and abort break it.
//
// Workers compute in phases, and no one may start phase p+1 before everyone has finished
// phase p: each calls wait() at the end of a phase, and the last to arrive runs the
// barrier's action (here: announce the phase) before all go on together. A barrier can
// also break - a wait that times out, abort(), or a party that dies while waiting - and
// then every waiter gets BrokenBarrierError instead of waiting forever; reset() mends it.
//
// Usage: barrier [--workers N] [--items PHASES] [--json]
//   $ build/1_synchronization/barrier --workers 4 --items 3
//
// Watch for: all "finished phase p" lines before any "phase p+1"; the action once per
// phase; the three ways to break the barrier, each ending in BrokenBarrierError.
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

constexpr int kMaxPhases = 64;

struct Progress {
  int finished[kMaxPhases];  // workers done with each phase
  int early;                 // workers that found a phase unfinished after the barrier
  int actions;               // times the action ran
};

void phased_worker(int id, mp::Barrier barrier, mp::Value<Progress> progress, int phases,
                   bool story) {
  for (int p = 0; p < phases; ++p) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1 + (id * 7 + p * 3) % 10));  // work
    {
      std::lock_guard g{progress.get_lock()};
      ++progress.get_obj().finished[p];
    }
    tell(story, "  worker {} finished phase {}\n", id, p);
    barrier.wait();  // everyone's phase p is done when this returns
    std::lock_guard g{progress.get_lock()};
    if (progress.get_obj().finished[p] != barrier.parties()) ++progress.get_obj().early;
  }
}

// 0 when the barrier broke under this party (BrokenBarrierError).
int wait_expecting_break(mp::Barrier barrier, double timeout_seconds) {
  try {
    barrier.wait(mp::Seconds(timeout_seconds));
  } catch (const mp::BrokenBarrierError&) {
    return 0;
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "An mp::Barrier makes processes meet after each phase: timeouts and abort "
                   "break it."};
  int& workers = L.add_workers(4, 64);
  int& phases = L.add_items(3, 1, kMaxPhases);
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: phases. The action captures a handle, which is fine with fork (under spawn an
    // action must be a plain function).
    L.step(fmt::format("{} workers, {} phases", workers, phases));
    mp::Value<Progress> progress;
    bool story = !L.json();
    mp::Barrier barrier{workers, [progress, story] {
                          std::lock_guard g{progress.get_lock()};
                          int p = progress.get_obj().actions++;
                          tell(story, "  -- phase {} complete (the action) --\n", p);
                        }};
    std::vector<mp::Process> procs;
    for (int i = 0; i < workers; ++i) {
      procs.emplace_back(phased_worker, i, barrier, progress, phases, story);
    }
    for (auto& p : procs) p.start();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    Progress pr = progress.value();
    L.say("actions run: {}; workers that saw an unfinished phase: {}", pr.actions, pr.early);

    // Step 2: a wait with a timeout, and nobody else coming.
    L.step("a wait that times out");
    mp::Barrier pair{2};
    mp::Process lonely{wait_expecting_break, pair, 0.1};
    lonely.start();
    lonely.join();
    bool timeout_broke = lonely.exitcode() == 0 && pair.broken();
    L.say("the child got BrokenBarrierError: {}; broken(): {}", lonely.exitcode() == 0,
          pair.broken());
    pair.reset();
    bool reset_mends = !pair.broken();
    L.say("after reset(): broken() is {}", pair.broken());

    // Step 3: abort() while a party waits.
    L.step("abort()");
    mp::Barrier trio{3};
    mp::Process waiting{wait_expecting_break, trio, 60.0};
    waiting.start();
    while (trio.n_waiting() < 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    trio.abort();
    waiting.join();
    bool abort_broke = waiting.exitcode() == 0;
    L.say("the waiting child got BrokenBarrierError: {}", abort_broke);

    // Step 4: a party killed while it waits breaks the barrier for the others.
    L.step("a party dies while it waits");
    mp::Barrier group{3};
    mp::Process survivor{wait_expecting_break, group, 60.0};
    mp::Process victim{wait_expecting_break, group, 60.0};
    survivor.start();
    victim.start();
    while (group.n_waiting() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    victim.kill();
    victim.join();
    survivor.join();
    bool death_broke = survivor.exitcode() == 0 && group.broken();
    L.say("victim ended by {}; the survivor got BrokenBarrierError: {}",
          mp::describe_exitcode(*victim.exitcode()), survivor.exitcode() == 0);

    L.fact("workers", workers);
    L.fact("phases", phases);
    L.fact("actions_run", pr.actions);
    L.fact("left_a_phase_early", pr.early);
    L.fact("timeout_broke", timeout_broke);
    L.fact("reset_mends", reset_mends);
    L.fact("abort_broke", abort_broke);
    L.fact("party_death_broke", death_broke);
    return all_ok && pr.actions == phases && pr.early == 0 && timeout_broke && reset_mends &&
           abort_broke && death_broke;
  });
}
