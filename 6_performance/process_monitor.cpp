// process_monitor.cpp - Watch a process tree: state, CPU %, RSS, PSS, threads and descriptors of each process.
//
// A small top for one tree. Every --interval it reads each process of the tree once with
// mp::process_stats (the tree from mp::children(root, recursive)) and prints one row per
// process: pid, parent, state, CPU % over the last interval (from the difference of two
// readings of the CPU times), RSS, PSS, USS, threads and open descriptors. On a terminal
// the table is redrawn in place; with --once, or when stdout is not a terminal, each
// sample is printed as a plain table after the last; --json prints the samples as data.
//
// Without --pid it watches a tree it starts itself (the demo): children that compute, sleep,
// allocate, run threads, start a child of their own, and one that exits on cue, so that a
// zombie and a process gone between two samples can be seen.
//
// Usage: process_monitor [--pid PID] [--interval S] [--count N] [--once] [--quick] [--json]
//   $ build/6_performance/process_monitor                   # the demo tree, redrawn in place
//   $ build/6_performance/process_monitor --pid $$ --once   # your shell and what it runs
//
// Watch for: RSS counts every page a process maps, shared or not; PSS divides each shared
// page among its sharers, so the PSS of a tree adds up and its RSS does not; USS is what
// the kernel would free if the process ended. A child that has exited but is not yet
// reaped is a zombie ('Z', no memory, no threads); once reaped it is gone, and a monitor
// must expect that between any two readings.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mp/connection.hpp>
#include <mp/monitor.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using Clock = std::chrono::system_clock;  // wall clock: create_time is wall-clock time

double now_seconds() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

// ---- the demo tree's children ----------------------------------------------------------

// Computes until told to stop: a process that wants a core all the time.
int burn_cpu(mp::Event stop) {
  std::uint64_t x = 1;
  while (!stop.is_set()) {
    for (int i = 0; i < 1'000'000; ++i) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  }
  return x == 0 ? 3 : 0;  // uses x, so the loop is not optimised away
}

// Blocks until told to stop: asleep in the kernel, no CPU.
int sleep_until(mp::Event stop) {
  stop.wait();
  return 0;
}

// Touches one more MiB every `pace_ms`, up to `cap_mib`, and records in `touched` how
// many bytes it has written, after writing them: the monitor reads the record before it
// reads the process, so RSS must be at least that much.
int allocate(mp::Event stop, mp::RawValue<std::uint64_t> touched, int cap_mib, int pace_ms) {
  constexpr std::size_t kMiB = 1 << 20;
  std::vector<std::vector<char>> blocks;
  for (int i = 0; i < cap_mib && !stop.is_set(); ++i) {
    blocks.emplace_back(kMiB, static_cast<char>(i + 1));  // filled: every page written
    std::atomic_ref<std::uint64_t>(touched.value()).store((i + 1) * kMiB);
    stop.wait(std::chrono::milliseconds(pace_ms));
  }
  stop.wait();
  return blocks.size() > 0 ? 0 : 3;
}

// Three threads besides the main one, and four more open descriptors (/dev/null).
int run_threads(mp::Event stop, mp::Event ready) {
  std::vector<int> fds;
  for (int i = 0; i < 4; ++i) {
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd == -1) return 4;
    fds.push_back(fd);
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) threads.emplace_back([stop]() mutable { stop.wait(); });
  ready.set();
  for (auto& t : threads) t.join();
  for (int fd : fds) ::close(fd);
  return 0;
}

// A child with a child of its own: the tree is two levels deep. Returns the grandchild's
// exit code.
int start_grandchild(mp::Event stop, mp::Event ready, mp::RawValue<pid_t> grandchild) {
  mp::Process g{sleep_until, stop};
  g.set_name("grandchild");
  g.start();
  grandchild.set(g.pid());
  ready.set();
  g.join();
  return *g.exitcode();
}

// Exits when told to: its exit, and then its reaping, happen between two samples.
int exit_on_cue(mp::Event leave) {
  leave.wait();
  return 0;
}

// ---- readings ---------------------------------------------------------------------------

struct Row {
  pid_t pid = 0;
  int depth = 0;
  std::optional<mp::ProcessStats> stats;  // nothing: access denied
  std::optional<double> cpu_percent;      // nothing: no earlier reading to compare with
};

struct Gone {
  pid_t pid = 0;
  std::string name;
};

struct Sample {
  int index = 0;
  double at = 0;  // wall-clock seconds
  bool root_gone = false;
  std::vector<Row> rows;  // the tree, depth first, each parent before its children
  std::vector<Gone> gone;
};

// What the previous sample knew of a process, to compute CPU % and notice it is gone.
struct Seen {
  double create_time = 0;
  double cpu_seconds = 0;
  double at = 0;
  std::string name;
};

double cpu_seconds(const mp::ProcessStats& s) { return s.cpu_times.user + s.cpu_times.system; }

// Whether two readings of a pid are the same process: the same start time. The kernel
// counts it in clock ticks since boot; converting to wall-clock time moves it by a few
// microseconds from one reading to the next, so allow far less than a tick of difference
// for two processes.
bool same_process(double create_a, double create_b) {
  return create_a - create_b < 0.002 && create_b - create_a < 0.002;
}

// One reading of every process of the tree under `root`, compared with `seen` (which it
// then updates). A process that ends while it is read is treated as gone, never an error.
Sample read_tree(pid_t root, int index, std::map<pid_t, Seen>& seen) {
  Sample out;
  out.index = index;
  std::vector<pid_t> pids{root};
  try {
    for (pid_t p : mp::children(root, /*recursive=*/true)) pids.push_back(p);
  } catch (const mp::NoSuchProcess&) {
    out.root_gone = true;
    pids.clear();
  }
  out.at = now_seconds();

  std::map<pid_t, mp::ProcessStats> read;
  std::set<pid_t> denied;
  for (pid_t p : pids) {
    try {
      read.emplace(p, mp::process_stats(p));
    } catch (const mp::NoSuchProcess&) {
      if (p == root) out.root_gone = true;  // ended between the listing and the reading
    } catch (const mp::AccessDenied&) {
      denied.insert(p);
    }
  }

  // Depth first from the root, by the parents the readings give.
  std::multimap<pid_t, pid_t> kids;
  for (const auto& [p, s] : read) {
    if (p != root) kids.emplace(s.ppid, p);
  }
  for (pid_t p : denied) kids.emplace(0, p);  // parent unknown: listed at the end
  std::function<void(pid_t, int)> visit = [&](pid_t p, int depth) {
    Row r;
    r.pid = p;
    r.depth = depth;
    if (auto it = read.find(p); it != read.end()) {
      const mp::ProcessStats& s = it->second;
      r.stats = s;
      auto before = seen.find(p);
      if (before != seen.end() && same_process(before->second.create_time, s.create_time)) {
        double wall = out.at - before->second.at;
        if (wall > 0) r.cpu_percent = 100 * (cpu_seconds(s) - before->second.cpu_seconds) / wall;
      } else if (double life = out.at - s.create_time; life > 0) {
        r.cpu_percent = 100 * cpu_seconds(s) / life;  // new since the last sample: its life
      }
    }
    out.rows.push_back(std::move(r));
    auto [lo, hi] = kids.equal_range(p);
    for (auto it = lo; it != hi; ++it) visit(it->second, depth + 1);
  };
  if (read.count(root) != 0) visit(root, 0);
  // Processes whose parent ended between the listing and the readings: under no row.
  std::set<pid_t> listed;
  for (const Row& r : out.rows) listed.insert(r.pid);
  for (const auto& [p, s] : read) {
    if (listed.count(p) == 0) visit(p, 1), listed.insert(p);
  }
  for (pid_t p : denied) {
    if (listed.count(p) == 0) visit(p, 1);
  }

  // Gone: seen last time, not read now (or read now with another start time: a new
  // process that got the same pid).
  std::map<pid_t, Seen> next;
  for (const auto& [p, s] : read) next[p] = Seen{s.create_time, cpu_seconds(s), out.at, s.name};
  for (const auto& [p, before] : seen) {
    auto it = read.find(p);
    if (it == read.end() || !same_process(it->second.create_time, before.create_time)) {
      out.gone.push_back({p, before.name});
    }
  }
  seen = std::move(next);
  return out;
}

std::string size_text(std::uint64_t bytes) {
  double kib = static_cast<double>(bytes) / 1024;
  if (kib < 10 * 1024) return fmt::format("{:.0f} KiB", kib);
  return fmt::format("{:.1f} MiB", kib / 1024);
}

std::string table(const Sample& s, double started) {
  std::string out = fmt::format("sample {} at +{:.1f} s\n", s.index, s.at - started);
  out += fmt::format("{:>7} {:>7} {:1} {:>6} {:>10} {:>10} {:>10} {:>4} {:>4}  {}\n", "PID",
                     "PPID", "S", "CPU%", "RSS", "PSS", "USS", "THR", "FDS", "NAME");
  for (const Row& r : s.rows) {
    std::string indent(static_cast<std::size_t>(2 * r.depth), ' ');
    if (!r.stats) {
      out += fmt::format("{:>7} {:>7} {:1} {:>6} {:>10} {:>10} {:>10} {:>4} {:>4}  {}{}\n", r.pid,
                         "?", "?", "-", "-", "-", "-", "-", "-", indent, "(access denied)");
      continue;
    }
    const mp::ProcessStats& p = *r.stats;
    out += fmt::format("{:>7} {:>7} {:1} {:>6} {:>10} {:>10} {:>10} {:>4} {:>4}  {}{}\n", p.pid,
                       p.ppid, p.state,
                       r.cpu_percent ? fmt::format("{:.1f}", *r.cpu_percent) : "-",
                       size_text(p.memory.rss), size_text(p.memory.pss),
                       size_text(p.memory.uss), p.threads, p.open_fds, indent, p.name);
  }
  for (const Gone& g : s.gone) {
    out += fmt::format("{:>7} {:>7} {:1} {:>6} {:>10} {:>10} {:>10} {:>4} {:>4}  {} (gone)\n",
                       g.pid, "-", "-", "-", "-", "-", "-", "-", "-", g.name);
  }
  if (s.root_gone) out += "the watched process has ended\n";
  return out;
}

nlohmann::json to_json(const Sample& s, double started) {
  nlohmann::json rows = nlohmann::json::array();
  for (const Row& r : s.rows) {
    nlohmann::json j = {{"pid", r.pid}, {"depth", r.depth}, {"access_denied", !r.stats}};
    if (r.stats) {
      const mp::ProcessStats& p = *r.stats;
      j.update({{"ppid", p.ppid},
                {"name", p.name},
                {"state", std::string(1, p.state)},
                {"status", p.status()},
                {"rss", p.memory.rss},
                {"pss", p.memory.pss},
                {"uss", p.memory.uss},
                {"threads", p.threads},
                {"fds", p.open_fds}});
      j["cpu_percent"] = r.cpu_percent ? nlohmann::json(*r.cpu_percent) : nlohmann::json();
    }
    rows.push_back(std::move(j));
  }
  nlohmann::json gone = nlohmann::json::array();
  for (const Gone& g : s.gone) gone.push_back({{"pid", g.pid}, {"name", g.name}});
  return {{"index", s.index},
          {"seconds", s.at - started},
          {"root_gone", s.root_gone},
          {"processes", rows},
          {"gone", gone}};
}

const Row* find_row(const Sample& s, pid_t pid) {
  for (const Row& r : s.rows) {
    if (r.pid == pid && r.stats) return &r;
  }
  return nullptr;
}

bool listed_gone(const Sample& s, pid_t pid) {
  for (const Gone& g : s.gone) {
    if (g.pid == pid) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Watch a process tree: state, CPU %, RSS, PSS, threads and descriptors of "
                   "each process."};
  int pid_arg = 0;
  double interval = 1.0;
  int count = 0;
  bool once = false, quick = false;
  L.cli()
      .add_option("--pid", pid_arg, "watch this process and its descendants (default: a demo tree)")
      ->check(CLI::Range(1, 1 << 30));
  auto* interval_opt = L.cli()
                           .add_option("--interval", interval, "seconds between two samples")
                           ->check(CLI::Range(0.05, 3600.0))
                           ->capture_default_str();
  auto* count_opt =
      L.cli()
          .add_option("--count", count,
                      "samples to take (0: until the watched process ends; the demo takes 6, "
                      "--json and --once 1)")
          ->check(CLI::Range(0, 1'000'000));
  L.cli().add_flag("--once", once, "one sample as a plain table");
  L.cli().add_flag("--quick", quick, "the demo with 0.2 s samples: a smoke test");
  L.parse(argc, argv);
  const bool demo = pid_arg == 0;
  if (quick && interval_opt->count() == 0) interval = 0.2;
  if (count_opt->count() == 0) count = once || L.json() ? 1 : demo ? 6 : 0;
  if (once) count = 1;
  if (demo && L.json() && count_opt->count() == 0) count = 4;  // the demo's story needs 3+
  const bool redraw = !once && !L.json() && ::isatty(STDOUT_FILENO) == 1;

  return L.run([&] {
    pid_t root = demo ? ::getpid() : static_cast<pid_t>(pid_arg);
    if (!demo) {
      // Step 1 (--pid): the process must exist; a wrong pid is one line and exit 1.
      try {
        mp::process_stats(root);
      } catch (const mp::NoSuchProcess&) {
        throw std::runtime_error(fmt::format("cannot watch pid {}: no such process", root));
      }
    }

    // Step 1 (demo): start the tree and wait until every child is in place.
    mp::Event stop, leave, threads_ready, grandchild_ready;
    mp::RawValue<std::uint64_t> touched{0};
    mp::RawValue<pid_t> grandchild_pid{0};
    std::vector<mp::Process> kids;
    std::map<std::string, pid_t> demo_pids;
    mp::Process* exiting = nullptr;
    if (demo) {
      kids.emplace_back(burn_cpu, stop);
      kids.back().set_name("cpu");
      kids.emplace_back(sleep_until, stop);
      kids.back().set_name("sleeper");
      kids.emplace_back(allocate, stop, touched, 64, std::max(10, static_cast<int>(interval * 250)));
      kids.back().set_name("allocator");
      kids.emplace_back(run_threads, stop, threads_ready);
      kids.back().set_name("threads");
      kids.emplace_back(start_grandchild, stop, grandchild_ready, grandchild_pid);
      kids.back().set_name("parent");
      kids.emplace_back(exit_on_cue, leave);
      kids.back().set_name("exiting");
      for (auto& k : kids) {
        k.start();
        demo_pids[k.name()] = k.pid();
      }
      exiting = &kids.back();
      if (!threads_ready.wait(std::chrono::seconds(30)) ||
          !grandchild_ready.wait(std::chrono::seconds(30))) {
        throw std::runtime_error("cannot start the demo tree: a child did not get ready");
      }
      demo_pids["grandchild"] = grandchild_pid.value();
      L.say("Demo tree under this process ({}): {}.", root,
            [&] {
              std::vector<std::string> parts;
              for (const auto& [n, p] : demo_pids) parts.push_back(fmt::format("{} {}", n, p));
              return fmt::format("{}", fmt::join(parts, ", "));
            }());
      L.say(
          "After sample 1, 'exiting' is told to exit: sample 2 should show it as a zombie\n"
          "(ended, not yet reaped); it is then reaped, and sample 3 lists it as gone.\n");
    }

    // Step 2: the samples. A first reading is the baseline for CPU %; each sample is read
    // one interval after the one before.
    std::map<pid_t, Seen> seen;
    const double started = now_seconds();
    read_tree(root, 0, seen);
    std::vector<Sample> samples;
    std::vector<std::uint64_t> touched_before;  // the allocator's record before each sample
    for (int i = 1; count == 0 || i <= count; ++i) {
      std::this_thread::sleep_for(mp::Seconds(interval));
      touched_before.push_back(std::atomic_ref<std::uint64_t>(touched.value()).load());
      Sample s = read_tree(root, i, seen);
      if (redraw) {
        fmt::print("\x1b[H\x1b[2J{}", table(s, started));
        std::fflush(stdout);
      } else {
        L.say("{}", table(s, started));
      }
      bool root_gone = s.root_gone;
      samples.push_back(std::move(s));
      if (root_gone) break;
      if (demo && i == 1) {
        // 'exiting' leaves; its pidfd becomes readable when it has ended. Nothing reaps
        // it until join().
        leave.set();
        if (mp::wait({exiting->sentinel()}, mp::Seconds(30)).empty()) {
          throw std::runtime_error("cannot see the 'exiting' child end within 30 s");
        }
      } else if (demo && i == 2) {
        exiting->join();
      }
    }

    nlohmann::json js = nlohmann::json::array();
    for (const Sample& s : samples) js.push_back(to_json(s, started));
    L.fact("root", root);
    L.fact("demo", demo);
    L.fact("interval", interval);
    L.fact("count", count);
    L.fact("samples", js);
    L.fact("root_gone", !samples.empty() && samples.back().root_gone);
    if (!demo) return true;

    // Step 3 (demo): what the samples must show, then the tree is stopped and reaped.
    L.step("what the samples show");
    stop.set();
    leave.set();
    for (auto& k : kids) k.join();
    bool all_exit_0 = true;
    for (auto& k : kids) all_exit_0 = all_exit_0 && k.exitcode() == 0;

    const Sample& first = samples.front();
    bool parents_right = true;
    for (const auto& [name, p] : demo_pids) {
      const Row* r = find_row(first, p);
      pid_t want = name == "grandchild" ? demo_pids["parent"] : root;
      parents_right = parents_right && r != nullptr && r->stats->ppid == want;
    }
    bool threads_right = true, sleeper_sleeps = true, rss_covers = true;
    int threads_seen = 0;
    std::uint64_t alloc_first = 0, alloc_last = 0;
    for (std::size_t i = 0; i < samples.size(); ++i) {
      const Sample& s = samples[i];
      if (const Row* r = find_row(s, demo_pids["threads"])) {
        threads_seen = r->stats->threads;
        threads_right = threads_right && r->stats->threads == 4;
      } else {
        threads_right = false;
      }
      const Row* sl = find_row(s, demo_pids["sleeper"]);
      sleeper_sleeps = sleeper_sleeps && sl != nullptr && sl->stats->state == 'S';
      const Row* a = find_row(s, demo_pids["allocator"]);
      rss_covers = rss_covers && a != nullptr && a->stats->memory.rss >= touched_before[i];
      if (a != nullptr) (i == 0 ? alloc_first : alloc_last) = a->stats->memory.rss;
    }
    pid_t ex = demo_pids["exiting"];
    bool exiting_alive_1 = find_row(first, ex) != nullptr && find_row(first, ex)->stats->state != 'Z';
    std::optional<char> zombie_state;
    if (samples.size() >= 2) {
      if (const Row* r = find_row(samples[1], ex)) zombie_state = r->stats->state;
    }
    bool gone_3 = samples.size() >= 3 && find_row(samples[2], ex) == nullptr &&
                  listed_gone(samples[2], ex);
    bool absent_after = true;
    for (std::size_t i = 3; i < samples.size(); ++i) {
      absent_after = absent_after && find_row(samples[i], ex) == nullptr &&
                     !listed_gone(samples[i], ex);
    }
    const Row* cpu_row = find_row(samples.back(), demo_pids["cpu"]);
    const Row* sleeper_row = find_row(samples.back(), demo_pids["sleeper"]);

    L.say("every demo child listed under its parent in sample 1: {}", parents_right);
    L.say("'threads' had 4 threads (main + 3) in every sample: {} (last: {})", threads_right,
          threads_seen);
    L.say("'sleeper' was asleep ('S') in every sample: {}", sleeper_sleeps);
    L.say("'allocator' RSS at least the bytes it had written, every sample: {} ({} -> {})",
          rss_covers, size_text(alloc_first), size_text(alloc_last));
    L.say("'exiting': running in sample 1: {}; state in sample 2: {}; gone in sample 3: {}",
          exiting_alive_1, zombie_state ? std::string(1, *zombie_state) : "not listed", gone_3);
    if (cpu_row && sleeper_row && cpu_row->cpu_percent && sleeper_row->cpu_percent) {
      L.say("last sample CPU %: 'cpu' {:.0f}, 'sleeper' {:.0f} (what the machine gave them)",
            *cpu_row->cpu_percent, *sleeper_row->cpu_percent);
    }
    bool none_left = mp::children(root, true).empty();
    L.say("every demo child exited 0 and was reaped: {}", all_exit_0 && none_left);

    nlohmann::json jp = nlohmann::json::object();
    for (const auto& [n, p] : demo_pids) jp[n] = p;
    L.fact("demo_pids", jp);
    L.fact("parents_right", parents_right);
    L.fact("threads_right", threads_right);
    L.fact("sleeper_sleeps", sleeper_sleeps);
    L.fact("allocator_rss_covers_touched", rss_covers);
    L.fact("allocator_touched_bytes", touched_before);
    L.fact("exiting_alive_in_1", exiting_alive_1);
    L.fact("exiting_state_in_2",
           zombie_state ? nlohmann::json(std::string(1, *zombie_state)) : nlohmann::json());
    L.fact("exiting_gone_in_3", gone_3);
    L.fact("exiting_absent_after_3", absent_after);
    L.fact("children_exit_0", all_exit_0);
    L.fact("children_left", mp::children(root, true).size());
    bool story = samples.size() < 3 ||
                 (exiting_alive_1 && zombie_state == 'Z' && gone_3 && absent_after);
    return parents_right && threads_right && sleeper_sleeps && rss_covers && story &&
           all_exit_0 && none_left;
  });
}
