// profiling_mp_programs.cpp - Where a pool's time goes: per-worker insights, slowest tasks, perf.
//
// A pool runs tasks of uneven cost: most compute for a millisecond or three, a few for ten
// or twenty, and some wait (sleep) instead of computing. Each task returns its pid and the
// times it started and ended, read from CLOCK_MONOTONIC, which is one clock for every
// process of the machine, so the parent can put all the workers' timelines side by side.
// A pool initializer notes when each worker is ready. From these the lesson builds, per
// worker, what mpire calls "worker insights": start-up time, tasks done, time working and
// time waiting for work, wall time, and the CPU time user and system that the kernel
// counted (mp::process_stats); then the slowest tasks with their arguments.
//
// Then how to profile the children themselves with Linux perf: whether it is installed,
// what /proc/sys/kernel/perf_event_paranoid allows, whether a trial `perf stat` works and
// whether the machine has hardware counters; when it works, `perf stat` over a short run
// of this program (its pool's workers included), and the `perf record` command line for a
// profile of every process.
//
// Usage: profiling_mp_programs [--workers N] [--tasks N] [--seed S] [--start-method M]
//                              [--top K] [--no-perf] [--quick] [--json]
//   $ build/6_performance/profiling_mp_programs --workers 4 --tasks 200
//
// Watch for: a worker's working time and its CPU time differ: a task that waits is working
// but uses no CPU, and a worker that spins briefly for the next task uses CPU without
// working. The wait at the end of a map (workers idle while the last heavy task finishes)
// is the load imbalance that the slowest-tasks list explains. perf follows children by
// default (inherit), so one `perf stat` or `perf record` of the parent covers the pool.
#include <fmt/format.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <mp/context.hpp>
#include <mp/error.hpp>
#include <mp/monitor.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench_tools.hpp"
#include "lesson.hpp"

namespace {

// Nanoseconds on CLOCK_MONOTONIC: the same clock in every process of the machine, so a
// child's readings and the parent's can be subtracted.
std::int64_t now_ns() {
  timespec ts{};
  if (::clock_gettime(CLOCK_MONOTONIC, &ts) == -1) mp::throw_errno("read CLOCK_MONOTONIC");
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

double ms(std::int64_t ns) { return static_cast<double>(ns) / 1e6; }

// Nanoseconds of CPU time of the calling thread, exact (not in clock ticks).
std::int64_t thread_cpu_ns() {
  timespec ts{};
  if (::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == -1)
    mp::throw_errno("read the thread's CPU time");
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// ---- in the workers ----------------------------------------------------------------------

// What the initializer tells the parent: this worker is ready, at this time.
struct Ready {
  pid_t pid = 0;
  std::int64_t at_ns = 0;
};

void note_ready(mp::Queue<Ready> ready) { ready.put(Ready{::getpid(), now_ns()}); }

enum Kind : int { kCompute = 0, kWait = 1 };

// What each task returns: which task, which worker, when, and the CPU time it used.
struct TaskRecord {
  int index = 0;
  pid_t pid = 0;
  std::int64_t start_ns = 0;
  std::int64_t end_ns = 0;
  std::int64_t cpu_ns = 0;
  std::uint64_t value = 0;
};

// One task: compute for about `cost_ms` (steps_per_ms calibrated in the parent) or sleep
// for `cost_ms`, between two readings of the shared clock.
TaskRecord run_task(int index, int kind, int cost_ms, long steps_per_ms) {
  TaskRecord r;
  r.index = index;
  r.pid = ::getpid();
  const std::int64_t cpu0 = thread_cpu_ns();
  r.start_ns = now_ns();
  if (kind == kCompute) {
    r.value = bench::hash_chain(static_cast<std::uint64_t>(index), steps_per_ms * cost_ms);
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(cost_ms));
    r.value = static_cast<std::uint64_t>(index);
  }
  r.end_ns = now_ns();
  r.cpu_ns = thread_cpu_ns() - cpu0;
  return r;
}

// ---- in the parent -----------------------------------------------------------------------

struct Task {
  int index = 0;
  int kind = kCompute;
  int cost_ms = 1;
};

// Uneven costs, from the seed: one task in five waits 2-8 ms; of the others, four in five
// compute 1-3 ms and one in five 8-20 ms.
std::vector<Task> make_tasks(int n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<Task> out;
  for (int i = 0; i < n; ++i) {
    Task t;
    t.index = i;
    if (uniform(1, 5) == 1) {
      t.kind = kWait;
      t.cost_ms = uniform(2, 8);
    } else {
      t.cost_ms = uniform(1, 5) == 1 ? uniform(8, 20) : uniform(1, 3);
    }
    out.push_back(t);
  }
  return out;
}

// Hash-chain steps per millisecond here: the best of five probes.
long calibrate() {
  return std::max(1000L, static_cast<long>(bench::hash_chain_rate(250'000, 5) / 1000.0));
}

struct Worker {
  pid_t pid = 0;
  std::int64_t ready_ns = 0;  // when its initializer ran
  std::vector<TaskRecord> tasks;
  double working_ms = 0, computing_ms = 0, sleeping_ms = 0;
  double task_cpu_ms = 0;    // CPU time inside its tasks (exact)
  double wall_ms = 0;        // from ready to the end of the map
  double startup_ms = 0;     // from the pool's construction to ready
  double first_task_ms = 0;  // from ready to its first task (dispatch), 0 without tasks
  double idle_tail_ms = 0;   // from its last task to the end of the map
  mp::CpuTimes cpu;
  mp::ContextSwitches ctx;
  pid_t ppid = 0;
  bool ordered = true;  // its tasks one after another, within [ready, end of the map]
};

// ---- perf --------------------------------------------------------------------------------

// One counter of a `perf stat -x ,` line: value, unit, event name.
struct Counter {
  std::string event;
  std::optional<double> value;  // nothing: <not supported> or <not counted>
  std::string unit;
  std::string raw;
};

std::vector<Counter> parse_perf_csv(const std::string& text) {
  std::vector<Counter> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string cell; std::getline(ls, cell, ',');) f.push_back(cell);
    if (f.size() < 3) continue;
    Counter c;
    c.raw = f[0];
    c.unit = f[1];
    c.event = f[2];
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(f[0].c_str(), &end);
    if (errno == 0 && end != f[0].c_str() && *end == '\0') c.value = v;
    out.push_back(c);
  }
  return out;
}

const Counter* find_counter(const std::vector<Counter>& cs, const std::string& prefix) {
  for (const Counter& c : cs) {
    if (c.event.rfind(prefix, 0) == 0) return &c;
  }
  return nullptr;
}

std::string paranoid_meaning(int level) {
  if (level <= -1) return "no restriction";
  if (level == 0) return "users may not read raw tracepoints";
  if (level == 1) return "users may profile their own processes, user and kernel code";
  if (level == 2) return "users may profile their own processes, user-space code only";
  return "users may not use perf at all (a distribution patch)";
}

// This program's own path, for perf to run it again.
std::string self_path() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n == -1) mp::throw_errno("read the path of this program");
  return std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Where a pool's time goes: per-worker insights, slowest tasks, perf."};
  int& workers = L.add_workers(2, 64);
  std::uint64_t& seed = L.add_seed(1);
  int tasks_n = 60, top = 5;
  std::string method;
  bool no_perf = false, quick = false;
  auto* tasks_opt = L.cli()
                        .add_option("--tasks", tasks_n, "tasks to run on the pool")
                        ->check(CLI::Range(1, 100'000))
                        ->capture_default_str();
  L.cli()
      .add_option("--start-method", method, "how the workers start (default: mp's default)")
      ->check(CLI::IsMember({"fork", "spawn", "forkserver"}));
  L.cli()
      .add_option("--top", top, "slowest tasks to list")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  L.cli().add_flag("--no-perf", no_perf, "skip the perf part");
  L.cli().add_flag("--quick", quick, "24 tasks: a smoke test");
  L.parse(argc, argv);
  if (quick && tasks_opt->count() == 0) tasks_n = 24;

  return L.run([&] {
    // Step 1: the tasks, and the CPU-bound step calibrated here.
    const long steps_per_ms = calibrate();
    const std::vector<Task> tasks = make_tasks(tasks_n, seed);
    int computing = 0;
    double planned_ms = 0;
    for (const Task& t : tasks) {
      computing += t.kind == kCompute;
      planned_ms += t.cost_ms;
    }
    const mp::Context ctx = mp::get_context(method);
    L.say(
        "{} tasks (seed {}): {} compute (a hash chain, {} steps per ms here), {} sleep;\n"
        "{:.0f} ms of work planned in all. A pool of {} workers ({}), chunksize 1, {} cores "
        "online.",
        tasks_n, seed, computing, steps_per_ms, tasks_n - computing, planned_ms, workers,
        ctx.start_method(), mp::cpu_count());

    // Step 2: start the pool. Each worker's initializer reports when it is ready; the
    // clock is the same in every process, so ready minus t0 is its start-up time.
    L.step("the pool runs the tasks");
    mp::Queue<Ready> ready_q;
    const std::int64_t t0 = now_ns();
    mp::Pool pool{workers, {note_ready, ready_q}, 0, ctx};
    const std::int64_t constructed = now_ns();
    std::map<pid_t, Worker> by_pid;
    for (int i = 0; i < workers; ++i) {
      Ready r;
      try {
        r = ready_q.get(mp::Seconds(30));
      } catch (const mp::Empty&) {
        throw std::runtime_error("cannot start the pool: a worker did not report ready in 30 s");
      }
      Worker w;
      w.pid = r.pid;
      w.ready_ns = r.at_ns;
      w.startup_ms = ms(r.at_ns - t0);
      by_pid[r.pid] = w;
    }

    // Step 3: the map, timed, with this process's own CPU time around it (the pool's
    // service thread runs here).
    std::vector<std::tuple<int, int, int, long>> args;
    for (const Task& t : tasks) args.emplace_back(t.index, t.kind, t.cost_ms, steps_per_ms);
    const mp::CpuTimes parent_before = mp::process_stats(::getpid()).cpu_times;
    const std::int64_t m0 = now_ns();
    std::vector<TaskRecord> records = pool.starmap(run_task, args, 1);
    const std::int64_t m1 = now_ns();
    const mp::CpuTimes parent_after = mp::process_stats(::getpid()).cpu_times;

    // Step 4: each worker read once by mp::monitor while it is still there (idle), and
    // its tasks put on its timeline.
    const std::vector<pid_t> pool_pids = pool.worker_pids();
    const std::set<pid_t> pool_set(pool_pids.begin(), pool_pids.end());
    // A worker is a child of this process; with forkserver, a child of the server, which
    // is a child of this process.
    std::vector<pid_t> kids_v = mp::children(::getpid(), /*recursive=*/true);
    const std::set<pid_t> kids(kids_v.begin(), kids_v.end());
    const bool via_server = ctx.start_method() == "forkserver";
    std::set<pid_t> worker_parents;
    bool all_from_pool = true;
    std::set<pid_t> unknown;
    for (const TaskRecord& r : records) {
      auto it = by_pid.find(r.pid);
      if (it == by_pid.end() || pool_set.count(r.pid) == 0 || kids.count(r.pid) == 0) {
        all_from_pool = false;
        unknown.insert(r.pid);
        continue;
      }
      it->second.tasks.push_back(r);
    }
    bool all_ordered = true, work_within_wall = true, parents_right = true;
    for (auto& [pid, w] : by_pid) {
      std::sort(w.tasks.begin(), w.tasks.end(),
                [](const TaskRecord& a, const TaskRecord& b) { return a.start_ns < b.start_ns; });
      std::int64_t last_end = w.ready_ns;
      for (const TaskRecord& r : w.tasks) {
        double d = ms(r.end_ns - r.start_ns);
        w.working_ms += d;
        w.task_cpu_ms += ms(r.cpu_ns);
        (tasks[static_cast<std::size_t>(r.index)].kind == kCompute ? w.computing_ms
                                                                   : w.sleeping_ms) += d;
        w.ordered = w.ordered && r.start_ns >= last_end && r.end_ns >= r.start_ns;
        last_end = r.end_ns;
      }
      w.ordered = w.ordered && last_end <= m1;
      w.wall_ms = ms(m1 - w.ready_ns);
      if (!w.tasks.empty()) {
        w.first_task_ms = ms(w.tasks.front().start_ns - w.ready_ns);
        w.idle_tail_ms = ms(m1 - w.tasks.back().end_ns);
      }
      mp::ProcessStats s = mp::process_stats(pid);
      w.cpu = s.cpu_times;
      w.ctx = s.ctx_switches;
      w.ppid = s.ppid;
      worker_parents.insert(s.ppid);
      parents_right = parents_right && (via_server ? s.ppid != ::getpid() && kids.count(s.ppid) == 1
                                                   : s.ppid == ::getpid());
      all_ordered = all_ordered && w.ordered;
      work_within_wall = work_within_wall && w.working_ms <= w.wall_ms;
    }

    // Every task exactly once.
    std::vector<int> seen(static_cast<std::size_t>(tasks_n), 0);
    for (const TaskRecord& r : records) {
      if (r.index >= 0 && r.index < tasks_n) ++seen[static_cast<std::size_t>(r.index)];
    }
    bool each_once = records.size() == tasks.size() &&
                     std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; });
    std::size_t counted = 0;
    for (const auto& [pid, w] : by_pid) counted += w.tasks.size();

    // The table.
    const double map_ms = ms(m1 - m0);
    L.say("pool constructed in {:.1f} ms; map of {} tasks took {:.1f} ms.", ms(constructed - t0),
          tasks_n, map_ms);
    L.say("");
    L.say("{:>7} {:>8} {:>8} {:>5} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>6} {:>6} {:>7} {:>8}",
          "pid", "start-up", "1st task", "tasks", "working", "(sleep)", "task cpu", "waiting",
          "idle end", "wall", "user", "system", "outside", "ctx v/i");
    double total_working = 0;
    const long clk_tck = ::sysconf(_SC_CLK_TCK);
    if (clk_tck <= 0) mp::throw_errno("read the clock tick (sysconf _SC_CLK_TCK)");
    for (const auto& [pid, w] : by_pid) {
      double cpu_ms = 1000 * (w.cpu.user + w.cpu.system);
      total_working += w.working_ms;
      L.say(
          "{:>7} {:>8.1f} {:>8.2f} {:>5} {:>8.1f} {:>8.1f} {:>8.1f} {:>7.1f} {:>8.1f} {:>7.1f} "
          "{:>6.0f} {:>6.0f} {:>7.0f} {:>8}",
          pid, w.startup_ms, w.first_task_ms, w.tasks.size(), w.working_ms, w.sleeping_ms,
          w.task_cpu_ms, w.wall_ms - w.working_ms, w.idle_tail_ms, w.wall_ms, 1000 * w.cpu.user,
          1000 * w.cpu.system, std::round(cpu_ms - w.task_cpu_ms) + 0.0,
          fmt::format("{}/{}", w.ctx.voluntary, w.ctx.involuntary));
    }
    L.say(
        "(ms. start-up: pool construction to the worker's initializer; 1st task: initializer to\n"
        "its first task; working: inside tasks, of which (sleep) in tasks that sleep; task cpu:\n"
        "CPU time inside tasks (CLOCK_THREAD_CPUTIME_ID, exact); waiting: wall - working; idle\n"
        "end: after its last task until the map returned; wall: initializer to the end of the\n"
        "map; user/system: CPU time mp::process_stats reads for the worker's whole life, counted\n"
        "by the kernel in ticks of {:.0f} ms; outside: user + system - task cpu, the CPU time\n"
        "spent outside tasks (start-up, looking for work, results), to within a tick or two;\n"
        "ctx v/i: voluntary/involuntary context switches.)",
        1000.0 / static_cast<double>(clk_tck));
    const double parent_cpu_ms = 1000 * ((parent_after.user + parent_after.system) -
                                         (parent_before.user + parent_before.system));
    const double busy = total_working / (workers * map_ms);
    double compute_wall = 0, compute_cpu = 0;
    for (const TaskRecord& r : records) {
      if (tasks[static_cast<std::size_t>(r.index)].kind != kCompute) continue;
      compute_wall += ms(r.end_ns - r.start_ns);
      compute_cpu += ms(r.cpu_ns);
    }
    L.say(
        "Computing tasks: {:.1f} ms on the clock, {:.1f} ms on a CPU ({:.0f}%): for the rest\n"
        "they were runnable but not running, the cores busy with other processes.",
        compute_wall, compute_cpu, compute_wall > 0 ? 100 * compute_cpu / compute_wall : 0.0);
    L.say(
        "Workers were busy {:.0f}% of {} x the map's time; this process (the pool's threads)\n"
        "used {:.0f} ms of CPU during the map.",
        100 * busy, workers, parent_cpu_ms);

    // Step 5: the slowest tasks, with their arguments: where to look first.
    L.step("the slowest tasks");
    std::vector<TaskRecord> slow = records;
    std::sort(slow.begin(), slow.end(), [](const TaskRecord& a, const TaskRecord& b) {
      return a.end_ns - a.start_ns > b.end_ns - b.start_ns;
    });
    slow.resize(std::min<std::size_t>(slow.size(), static_cast<std::size_t>(top)));
    L.say("{:>5} {:>9} {:>22} {:>7} {:>9} {:>9}", "task", "ms", "args (kind, cost_ms)", "pid",
          "start", "end");
    nlohmann::json jslow = nlohmann::json::array();
    for (const TaskRecord& r : slow) {
      const Task& t = tasks[static_cast<std::size_t>(r.index)];
      std::string kind = t.kind == kCompute ? "compute" : "sleep";
      L.say("{:>5} {:>9.2f} {:>22} {:>7} {:>+9.1f} {:>+9.1f}", r.index, ms(r.end_ns - r.start_ns),
            fmt::format("({}, {})", kind, t.cost_ms), r.pid, ms(r.start_ns - m0),
            ms(r.end_ns - m0));
      jslow.push_back({{"index", r.index},
                       {"ms", ms(r.end_ns - r.start_ns)},
                       {"kind", kind},
                       {"cost_ms", t.cost_ms},
                       {"pid", r.pid},
                       {"start_ms", ms(r.start_ns - m0)},
                       {"end_ms", ms(r.end_ns - m0)}});
    }
    L.say("(start and end: ms since the map began.)");

    L.say("");
    L.say("sum of tasks per worker = tasks submitted: {} = {}: {}", counted, tasks_n,
          counted == static_cast<std::size_t>(tasks_n));
    L.say("every task ran exactly once: {}", each_once);
    L.say("every task's pid was one of the pool's workers, {}: {}{}",
          via_server ? fmt::format("children of the fork server ({}), a child of this process",
                                   fmt::join(worker_parents, ", "))
                     : "children of this process",
          all_from_pool && parents_right,
          unknown.empty() ? "" : fmt::format(" (unknown pids: {})", fmt::join(unknown, ", ")));
    L.say("each worker's tasks one after another, inside its wall time: {}", all_ordered);
    L.say("working <= wall for every worker: {}", work_within_wall);

    nlohmann::json jw = nlohmann::json::array();
    for (const auto& [pid, w] : by_pid) {
      jw.push_back({{"pid", pid},
                    {"ppid", w.ppid},
                    {"startup_ms", w.startup_ms},
                    {"first_task_ms", w.first_task_ms},
                    {"tasks", w.tasks.size()},
                    {"working_ms", w.working_ms},
                    {"computing_ms", w.computing_ms},
                    {"sleeping_ms", w.sleeping_ms},
                    {"task_cpu_ms", w.task_cpu_ms},
                    {"waiting_ms", w.wall_ms - w.working_ms},
                    {"idle_tail_ms", w.idle_tail_ms},
                    {"wall_ms", w.wall_ms},
                    {"cpu_user_s", w.cpu.user},
                    {"cpu_system_s", w.cpu.system},
                    {"ctx_voluntary", w.ctx.voluntary},
                    {"ctx_involuntary", w.ctx.involuntary},
                    {"ordered", w.ordered}});
    }
    L.fact("workers", workers);
    L.fact("start_method", std::string(ctx.start_method()));
    L.fact("tasks_submitted", tasks_n);
    L.fact("tasks_counted", counted);
    L.fact("records", records.size());
    L.fact("each_task_once", each_once);
    L.fact("worker_pids", pool_pids);
    L.fact("workers_started", pool.workers_started());
    L.fact("per_worker", jw);
    L.fact("all_from_pool", all_from_pool);
    L.fact("parents_right", parents_right);
    L.fact("worker_parents", worker_parents);
    L.fact("tasks_ordered", all_ordered);
    L.fact("working_within_wall", work_within_wall);
    L.fact("map_ms", map_ms);
    L.fact("clock_tick_ms", 1000.0 / static_cast<double>(clk_tck));
    L.fact("busy_fraction", busy);
    L.fact("compute_wall_ms", compute_wall);
    L.fact("compute_cpu_ms", compute_cpu);
    L.fact("parent_cpu_ms", parent_cpu_ms);
    L.fact("slowest", jslow);
    L.fact("top", top);

    pool.close();
    pool.join();
    // Every worker is reaped. The fork server, when there is one, stays for the children
    // this program may start later (until it exits), as Python's does.
    std::size_t left = 0;
    for (pid_t p : mp::children(::getpid(), /*recursive=*/true)) {
      if (!(via_server && worker_parents.count(p) == 1)) ++left;
    }
    const bool none_left = left == 0;
    L.fact("children_left", left);

    bool ok = counted == static_cast<std::size_t>(tasks_n) && each_once && all_from_pool &&
              parents_right && all_ordered && work_within_wall && none_left;
    if (no_perf) {
      L.fact("perf", nlohmann::json{{"skipped", true}});
      return ok;
    }

    // Step 6: profiling the children with perf, if this machine lets us.
    L.step("profiling the children with perf");
    nlohmann::json jp = {{"skipped", false}};
    std::optional<std::string> perf = lesson::find_program("perf");
    jp["found"] = perf.has_value();
    jp["path"] = perf ? nlohmann::json(*perf) : nlohmann::json();
    std::optional<int> paranoid;
    {
      std::ifstream f("/proc/sys/kernel/perf_event_paranoid");
      int v = 0;
      if (f >> v) paranoid = v;
    }
    jp["paranoid"] = paranoid ? nlohmann::json(*paranoid) : nlohmann::json();
    const bool root = ::geteuid() == 0;
    jp["root"] = root;
    L.say("perf: {}",
          perf ? *perf : "not on PATH (Debian: linux-perf; Ubuntu: linux-tools-$(uname -r))");
    if (paranoid) {
      L.say("kernel.perf_event_paranoid = {}: {}{}", *paranoid, paranoid_meaning(*paranoid),
            root ? " (this process runs as root, which the setting does not restrict)" : "");
    } else {
      L.say("/proc/sys/kernel/perf_event_paranoid cannot be read: this kernel has no perf events");
    }
    bool usable = false, hw = false;
    std::string reason;
    const std::string record_cmd = fmt::format(
        "{} record -F 999 -g --inherit -o /tmp/mp-profile.data -- {} --tasks 500 --no-perf",
        perf ? *perf : "perf", self_path());
    if (perf) {
      // A trial: a software counter (task-clock) of `true`. Refused when paranoid forbids it.
      bench::Ran trial = bench::run_program({*perf, "stat", "-x", ",", "-e", "task-clock", "true"},
                                            std::chrono::seconds(20));
      std::vector<Counter> tc = parse_perf_csv(trial.output);
      const Counter* c = find_counter(tc, "task-clock");
      usable = trial.exit_code == 0 && c != nullptr && c->value.has_value();
      if (!usable) {
        std::string last = trial.output.substr(0, trial.output.find('\n'));
        reason = fmt::format("the trial `perf stat -e task-clock true` failed (exit {}): {}",
                             trial.exit_code, last);
      }
      L.say("trial `perf stat -e task-clock true`: {}",
            usable ? "works" : fmt::format("failed (exit {})", trial.exit_code));
      if (usable) {
        bench::Ran hw_trial =
            bench::run_program({*perf, "stat", "-x", ",", "-e", "cycles,instructions", "true"},
                               std::chrono::seconds(20));
        const Counter* cy = find_counter(parse_perf_csv(hw_trial.output), "cycles");
        hw = hw_trial.exit_code == 0 && cy != nullptr && cy->value.has_value();
        L.say("hardware counters (cycles, instructions): {}",
              hw ? "available"
                 : fmt::format("not available ({}): a virtual machine often has no PMU; "
                               "software events and sampling on the timer still work",
                               cy ? cy->raw : "not listed"));
      }
    } else {
      reason = "perf is not installed";
    }
    jp["usable"] = usable;
    jp["hardware_counters"] = hw;
    jp["reason"] = reason;
    jp["record_command"] = record_cmd;

    if (usable) {
      // perf stat over a short run of this program: the counters add up every process
      // of the run (perf stat inherits into children by default), pool workers included.
      char path[] = "/tmp/mp-perf-stat-XXXXXX";
      int fd = ::mkstemp(path);
      if (fd == -1) mp::throw_errno("create a file for perf's output");
      ::close(fd);
      const int child_tasks = 16;
      std::string events = "task-clock,context-switches,cpu-migrations,page-faults";
      if (hw) events += ",cycles,instructions";
      std::vector<std::string> cmd = {*perf,       "stat",
                                      "-x",        ",",
                                      "-o",        path,
                                      "-e",        events,
                                      "--",        self_path(),
                                      "--tasks",   std::to_string(child_tasks),
                                      "--workers", std::to_string(workers),
                                      "--no-perf", "--json"};
      std::int64_t p0 = now_ns();
      bench::Ran run = bench::run_program(cmd, std::chrono::seconds(60));
      double perf_wall_ms = ms(now_ns() - p0);
      std::string stat_text;
      {
        std::ifstream f(path);
        std::stringstream ss;
        ss << f.rdbuf();
        stat_text = ss.str();
      }
      if (::unlink(path) == -1) mp::throw_errno(fmt::format("remove {}", path));
      std::vector<Counter> counters = parse_perf_csv(stat_text);
      nlohmann::json child;
      try {
        child = nlohmann::json::parse(run.output);
      } catch (const nlohmann::json::exception&) {
        child = nullptr;
      }
      const bool child_ok = run.exit_code == 0 && child.is_object() && child["ok"] == true;
      L.say("");
      L.say("$ {}", fmt::join(cmd, " "));
      L.say("exit {} after {:.0f} ms; the child run's own check: {}", run.exit_code, perf_wall_ms,
            child_ok ? "ok" : "FAILED");
      nlohmann::json jc = nlohmann::json::object();
      for (const Counter& c : counters) {
        L.say("  {:>16} {:>14} {}", c.event, c.raw, c.unit);
        jc[c.event] = c.value ? nlohmann::json(*c.value) : nlohmann::json();
      }
      double workers_cpu_ms = 0;
      if (child.is_object()) {
        for (const auto& w : child["per_worker"]) {
          workers_cpu_ms +=
              1000 * (w["cpu_user_s"].get<double>() + w["cpu_system_s"].get<double>());
        }
      }
      const Counter* tc = find_counter(counters, "task-clock");
      if (tc && tc->value && child.is_object()) {
        L.say(
            "task-clock counts every process of the run: {:.1f} ms, of which mp::monitor\n"
            "saw {:.0f} ms in its {} workers (the rest: the parent, its threads, start-up).",
            *tc->value, workers_cpu_ms, workers);
      }
      jp["stat_command"] = cmd;
      jp["stat_exit"] = run.exit_code;
      jp["stat_child_ok"] = child_ok;
      jp["stat_child_tasks"] = child.is_object() ? child["tasks_counted"] : nlohmann::json();
      jp["stat_child_workers_cpu_ms"] = workers_cpu_ms;
      jp["stat_counters"] = jc;
      jp["stat_wall_ms"] = perf_wall_ms;
      ok = ok && child_ok && tc != nullptr && tc->value.has_value();
      L.say("");
      L.say(
          "A profile of every process, with call stacks sampled 999 times a second:\n"
          "  $ {}\n"
          "  $ perf report -i /tmp/mp-profile.data --sort comm,pid,symbol\n"
          "(-g walks frame pointers: build with -fno-omit-frame-pointer, or use\n"
          "--call-graph dwarf. --inherit is perf record's default, spelled out here.)",
          record_cmd);
    } else {
      L.say("");
      L.say(
          "perf cannot be used here: {}.\n"
          "The figures above, from mp::monitor, are what this run can tell. Where perf works,\n"
          "profile every process of a run with\n"
          "  $ {}",
          reason, record_cmd);
    }
    L.fact("perf", jp);
    return ok;
  });
}
