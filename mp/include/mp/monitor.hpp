// mp/monitor.hpp - what psutil.Process tells Python about a process, for any pid.
//
//   mp::ProcessStats s = mp::process_stats(pid);   // one consistent reading
//   s.state;             // 'R', 'S', 'D', 'T', 'Z', ... as ps shows it
//   s.memory.rss;        // bytes; .pss and .uss too (from /proc/<pid>/smaps_rollup)
//   mp::cpu_percent(pid, 100ms);                   // psutil's cpu_percent(interval)
//   mp::children(pid, /*recursive=*/true);         // psutil's children(recursive=True)
//
// A pid that does not exist (or ended while it was read) throws mp::NoSuchProcess; a
// process this user may not inspect throws mp::AccessDenied, as psutil does. A zombie
// still exists: it reads as state 'Z'.
//
// Differences from psutil: one struct per reading instead of one method per figure
// (psutil.Process.oneshot() made the default); sizes in bytes, times in seconds; no
// caching of the process identity, so a reused pid reads as the new process.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mp/process.hpp"  // mp::Seconds

namespace mp {

// The pid does not exist, or the process ended while it was being read.
class NoSuchProcess : public std::runtime_error {
 public:
  explicit NoSuchProcess(pid_t pid);
  pid_t pid() const noexcept { return pid_; }

 private:
  pid_t pid_;
};

// The process exists but this user may not read what was asked (another user's process).
class AccessDenied : public std::runtime_error {
 public:
  AccessDenied(pid_t pid, const std::string& what);
  pid_t pid() const noexcept { return pid_; }

 private:
  pid_t pid_;
};

struct CpuTimes {
  double user = 0;    // seconds
  double system = 0;  // seconds
};

struct MemoryInfo {
  std::uint64_t rss = 0;  // resident set size, bytes (what ps calls RSS)
  std::uint64_t pss = 0;  // proportional set size: shared pages divided among sharers
  std::uint64_t uss = 0;  // unique set size: pages no other process maps (freed at exit)
};

struct ContextSwitches {
  std::uint64_t voluntary = 0;    // the process blocked (waited for I/O, a lock, sleep)
  std::uint64_t involuntary = 0;  // the scheduler preempted it
};

struct ProcessStats {
  pid_t pid = 0;
  pid_t ppid = 0;
  char state = '?';  // the kernel's letter: R S D T t Z X I
  std::string name;  // the kernel's short name (comm, 15 characters at most)
  std::vector<std::string> cmdline;  // empty for a kernel thread or a zombie
  int threads = 0;
  int open_fds = 0;
  CpuTimes cpu_times;
  MemoryInfo memory;
  ContextSwitches ctx_switches;
  double create_time = 0;  // seconds since the Unix epoch

  // psutil's status names: "running", "sleeping", "disk-sleep", "stopped", "zombie"...
  std::string status() const;
};

// One reading of `pid`.
ProcessStats process_stats(pid_t pid);

// CPU use of `pid` over `interval` (blocks that long), in percent of one CPU: a process
// with two busy threads reads about 200. psutil's cpu_percent(interval).
double cpu_percent(pid_t pid, Seconds interval);

// The processes whose parent is `pid`; with `recursive`, their descendants too (parents
// before their children). Throws NoSuchProcess when `pid` itself does not exist.
std::vector<pid_t> children(pid_t pid, bool recursive = false);

// Whether a process with this pid exists (zombies included).
bool pid_exists(pid_t pid);

}  // namespace mp
