// process_contexts.cpp - Compare the start methods fork, spawn and forkserver: cost and the fork-with-threads hazard.
//
// fork copies the running process, spawn starts a fresh run of the program, forkserver forks
// children from a single-threaded server started once. The lesson times start+join of an
// empty target under each, then shows why fork is dangerous in a threaded program: a helper
// thread holds a mutex at the moment of fork, so in the child the mutex is locked by a thread
// that does not exist there, and lock() never returns. The parent detects the stuck child
// with join(timeout) and kills it; under spawn and forkserver the same code just works.
//
// Usage: process_contexts [--runs N] [--json]
//   $ build/0_basics/process_contexts --runs 20
//
// Watch for: fork is the cheapest start; spawn pays for exec and program start-up;
// forkserver pays one spawn, then forks from a clean server. Only fork deadlocks.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mp/process.hpp>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

using namespace std::chrono_literals;

namespace {

void empty_target() {}

// A mutex of the program's own, as any library might have (a logger, an allocator...).
std::mutex g_log_mutex;

// The child takes the mutex. In a fresh image (spawn, forkserver) it is free; in a fork
// child it is held by a thread that was not copied, so this never returns.
int take_the_lock() {
  std::lock_guard lock(g_log_mutex);
  return 0;
}

struct Timing {
  double min_us, median_us;
};

// Starts and joins `runs` children running an empty target; µs per child.
Timing time_method(const std::string& method, int runs) {
  auto ctx = mp::get_context(method);
  std::vector<double> us;
  for (int i = 0; i < runs; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    mp::Process p{ctx, empty_target};
    p.start();
    p.join();
    us.push_back(lesson::seconds_since(t0) * 1e6);
    if (p.exitcode() != 0) throw std::runtime_error(method + " child failed");
  }
  std::sort(us.begin(), us.end());
  return {us.front(), us[us.size() / 2]};
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Compare the start methods fork, spawn and forkserver: cost and the "
                   "fork-with-threads hazard."};
  int runs = 20;
  L.cli().add_option("--runs", runs, "children started per method")
      ->check(CLI::Range(1, 10'000))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    const std::vector<std::string> methods = mp::get_all_start_methods();

    // Step 1: the cost of start + join. The first forkserver start also starts the server:
    // warm each method up once so the table shows the steady cost.
    L.step("start + join of an empty target, per child");
    L.say("{:<12} {:>10} {:>10}", "method", "min µs", "median µs");
    nlohmann::json costs;
    for (const auto& m : methods) {
      time_method(m, 1);
      Timing t = time_method(m, runs);
      L.say("{:<12} {:>10.0f} {:>10.0f}", m, t.min_us, t.median_us);
      costs[m] = {{"min_us", t.min_us}, {"median_us", t.median_us}, {"runs", runs}};
    }
    L.fact("start_join_us", costs);

    // Step 2: a helper thread takes the mutex and holds it until told to let go. While it
    // holds it, the main thread starts one child per method.
    L.step("fork with a thread holding a mutex");
    std::mutex m;
    std::condition_variable cv;
    bool held = false, release = false;
    std::thread holder([&] {
      std::lock_guard log_lock(g_log_mutex);
      std::unique_lock lk(m);
      held = true;
      cv.notify_all();
      cv.wait(lk, [&] { return release; });
    });
    {
      std::unique_lock lk(m);
      cv.wait(lk, [&] { return held; });
    }
    std::vector<mp::Process> children;
    for (const auto& method : methods) children.emplace_back(mp::get_context(method), take_the_lock);
    for (auto& c : children) c.start();
    {  // the parent's copy of the mutex is released now; the fork child's copy never will be
      std::lock_guard lk(m);
      release = true;
    }
    cv.notify_all();
    holder.join();

    // Step 3: wait for each child. A child that can finish does so at once; the fork child
    // cannot finish at all, so a short wait is enough to call it deadlocked.
    nlohmann::json stuck;
    for (std::size_t i = 0; i < methods.size(); ++i) {
      auto wait = methods[i] == "fork" ? 1s : 60s;
      bool ended = children[i].join(wait);
      if (!ended) {
        children[i].kill();
        children[i].join();
      }
      stuck[methods[i]] = !ended;
      L.say("  {:<11} child: {}", methods[i],
            ended ? fmt::format("took the lock and {}", mp::describe_exitcode(*children[i].exitcode()))
                  : "still waiting for the lock after 1 s: deadlocked, killed");
    }
    bool fork_stuck = stuck["fork"] == true;
    bool others_fine = stuck["spawn"] == false && stuck["forkserver"] == false &&
                       children[1].exitcode() == 0 && children[2].exitcode() == 0;
    L.say("\nfork copied a mutex held by a thread that does not exist in the child: {}",
          fork_stuck ? "deadlock detected" : "no deadlock (unexpected)");
    L.fact("deadlocked", stuck);
    L.fact("fork_with_threads_deadlock_detected", fork_stuck);
    return fork_stuck && others_fine;
  });
}
