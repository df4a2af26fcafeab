// python_comparison.cpp - Four jobs done with mp and with Python's multiprocessing, and where the
// gap comes from.
//
// For readers who know Python's multiprocessing. Each job runs here through mp, then through
// the matching script in 6_performance/python (python3 -B <script> --n N), and the lesson
// says why the two differ: Python pickles every object, hands queue items to a feeder
// thread, moves every byte through a pipe or a socket, and sleeps in the kernel whenever it
// waits; mp copies plain bytes into shared memory and spins briefly before it sleeps.
//
// Usage: python_comparison [--quick] [--json]
//   $ build-release/6_performance/python_comparison
//   $ MP_PYTHON=/usr/bin/python3.11 build-release/6_performance/python_comparison --quick
//
// Watch for: the gap is widest where Python does the most work per item (queue_small,
// apply_async); manager_dict_set depends on the load, because mp's speed there comes from
// never sleeping. Without python3 the lesson says so and shows mp's side alone.
// ipc_benchmark has the full table.
#include <fmt/format.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "bench_tools.hpp"
#include "ipc_manager.hpp"
#include "ipc_mp.hpp"
#include "ipc_pool.hpp"
#include "lesson.hpp"

namespace {

// A job: how to run it with mp and in Python, its sizes, and why the two differ.
struct Job {
  const char* id;
  const char* unit;
  const char* what;
  std::function<double(long)> run_mp;
  const char* script;
  long mp_n, py_n, quick_mp_n, quick_py_n;
  const char* why;
};

const std::vector<Job> kJobs = {
    {"queue_small", "msgs/s", "64-byte messages, one producer process to one consumer",
     with_mp::queue_small, "queue_small.py", 1'000'000, 100'000, 20'000, 5'000,
     "Python pickles each message and appends it to a buffer; a feeder thread writes it into\n"
     "  a pipe; the consumer, holding a lock, reads its length, then its bytes, and unpickles\n"
     "  them: a thread hand-off and three system calls per item, and a sleeping wake-up\n"
     "  whenever the consumer has caught up. mp::Queue copies the bytes into a ring in shared\n"
     "  memory, with no feeder thread (a child can exit right after put());\n"
     "  nobody enters the kernel unless the ring is empty or full."},
    {"apply_async", "us", "apply_async(identity, i) on a 2-process pool, then get() each",
     with_pool::apply_async, "apply_async.py", 50'000, 5'000, 1'000, 300,
     "Python pickles the task and its result, and three threads of the parent (task handler,\n"
     "  result handler, your own) pass it along through queues and pipes. mp::Pool writes the\n"
     "  task into the worker's shared-memory ring, and the result comes back the same way."},
    {"value_locked_inc", "ns", "two processes add 1 to a shared int64 under its lock, N times",
     with_mp::value_locked_inc, "value_locked_inc.py", 1'000'000, 200'000, 20'000, 5'000,
     "Python's Value lock is a POSIX semaphore, and each increment goes through ctypes and the\n"
     "  interpreter; a waiter sleeps in the kernel at once. mp's lock is a robust\n"
     "  process-shared pthread mutex, taken in user space by one atomic instruction when it\n"
     "  is free; a waiter spins a little before it parks on a futex, and a hand-off between\n"
     "  two busy processes rarely sleeps at all."},
    {"manager_dict_set", "us", "d[i % 64] = i through a Manager's dict proxy, N times",
     with_manager::dict_set, "manager_dict_set.py", 50'000, 10'000, 1'000, 300,
     "Python sends each call over a Unix socket to the server, where a thread per client\n"
     "  unpickles it, and sleeps until the answer comes back: two kernel wake-ups per call,\n"
     "  tens of microseconds each on an idle virtual machine. mp's local calls go through a\n"
     "  block of shared memory that both sides poll briefly before they sleep: while calls\n"
     "  keep coming nobody sleeps, and the socket only carries a one-byte wake-up when one\n"
     "  side did. On a busy machine polling gives up sooner and the gap narrows."},
};

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Four jobs done with mp and with Python's multiprocessing, and where the gap "
                   "comes from."};
  bool quick = false;
  L.cli().add_flag("--quick", quick, "small sizes: a smoke test, not a measurement");
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: find Python. Without it the lesson still shows mp's side.
    std::optional<std::string> python = bench::find_python();
    if (python) {
      L.say("Python: {} (scripts in {})", *python, bench::python_dir());
    } else {
      L.say(
          "python3 was not found (on $PATH, or $MP_PYTHON): only mp's figures are shown.\n"
          "Install python3 to see the comparison; the reasons below hold either way.");
    }

    // Step 2: each job through mp, then through Python, after one small warm-up run each.
    L.step("the same jobs, both ways");
    L.say("{:<17} {:>14} {:>14}  {:<6} {:>12}", "job", "mp", "python", "unit", "mp is faster");
    nlohmann::json jobs = nlohmann::json::object();
    bool all_ran = true;
    std::vector<std::string> errors;
    for (const Job& job : kJobs) {
      long mp_n = quick ? job.quick_mp_n : job.mp_n, py_n = quick ? job.quick_py_n : job.py_n;
      job.run_mp(job.quick_mp_n);
      double mine = job.run_mp(mp_n);
      std::optional<double> theirs;
      if (python) {
        try {
          bench::run_python_workload(*python, job.script, {}, job.quick_py_n, job.unit);
          theirs = bench::run_python_workload(*python, job.script, {}, py_n, job.unit);
        } catch (const std::exception& e) {
          errors.push_back(e.what());
          all_ran = false;
        }
      }
      std::optional<double> speedup;
      if (theirs) speedup = bench::cost_ratio(*theirs, mine, job.unit);
      L.say("{:<17} {:>14} {:>14}  {:<6} {:>12}", job.id, bench::human(mine),
            theirs ? bench::human(*theirs) : "-", job.unit,
            speedup ? fmt::format("{:.1f}x", *speedup) : "-");
      jobs[job.id] = {{"unit", job.unit},
                      {"mp", mine},
                      {"python", theirs ? nlohmann::json(*theirs) : nlohmann::json(nullptr)},
                      {"speedup", speedup ? nlohmann::json(*speedup) : nlohmann::json(nullptr)}};
    }
    for (const auto& e : errors) L.say("the Python side failed: {}", e);

    // Step 3: where each gap comes from.
    L.step("where the gap comes from");
    for (const Job& job : kJobs) L.say("{} ({}):\n  {}\n", job.id, job.what, job.why);
    L.say(
        "Build with the release preset for real figures; for every workload beside its raw\n"
        "floor, run ./playground bench (6_performance/ipc_benchmark --compare-python).");

    L.fact("quick", quick);
    L.fact("python_found", python.has_value());
    L.fact("jobs", jobs);
    return all_ran;
  });
}
