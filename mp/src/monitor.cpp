// mp/src/monitor.cpp - process readings through libproc2 (procps-ng's library, what ps and
// top use), and /proc directly for what libproc2 does not give.
#include "mp/monitor.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libproc2/misc.h>
#include <libproc2/pids.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <fmt/format.h>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mp/detail/fd.hpp"
#include "mp/error.hpp"

namespace mp {

NoSuchProcess::NoSuchProcess(pid_t pid)
    : std::runtime_error(fmt::format("no such process: pid {} does not exist", pid)), pid_(pid) {}

AccessDenied::AccessDenied(pid_t pid, const std::string& what)
    : std::runtime_error(fmt::format("cannot read {} of pid {}: permission denied", what, pid)),
      pid_(pid) {}

namespace {

std::string proc_path(pid_t pid, const char* file) { return fmt::format("/proc/{}/{}", pid, file); }

// Maps a failed /proc access to the error psutil would raise.
[[noreturn]] void throw_proc_error(int err, pid_t pid, const char* what) {
  if (err == ENOENT || err == ESRCH) throw NoSuchProcess(pid);
  if (err == EACCES || err == EPERM) throw AccessDenied(pid, what);
  throw system_error(err, fmt::format("read {} of pid {}", what, pid));
}

// The whole of a small /proc file.
std::string read_proc_file(pid_t pid, const char* file) {
  std::string path = proc_path(pid, file);
  int fd = detail::retry_eintr([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); });
  if (fd == -1) throw_proc_error(errno, pid, file);
  detail::UniqueFd guard(fd);
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = detail::retry_eintr([&] { return ::read(fd, buf, sizeof buf); });
    if (n == -1) throw_proc_error(errno, pid, file);
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

// A libproc2 context asking for `items`, released on scope exit.
class Pids {
 public:
  Pids(enum pids_item* items, int count) {
    int rc = procps_pids_new(&info_, items, count);
    if (rc < 0) throw system_error(-rc, "create a libproc2 context");
  }
  ~Pids() { procps_pids_unref(&info_); }
  Pids(const Pids&) = delete;
  Pids& operator=(const Pids&) = delete;

  // The one stack for `pid`, or nullptr when libproc2 found no such process.
  pids_stack* select(pid_t pid) {
    unsigned want = static_cast<unsigned>(pid);
    errno = 0;
    pids_fetch* f = procps_pids_select(info_, &want, 1, PIDS_SELECT_PID);
    if (f == nullptr) throw system_error(errno != 0 ? errno : EIO, fmt::format("read pid {}", pid));
    return f->counts->total > 0 ? f->stacks[0] : nullptr;
  }
  pids_fetch* reap() {
    errno = 0;
    pids_fetch* f = procps_pids_reap(info_, PIDS_FETCH_TASKS_ONLY);
    if (f == nullptr) throw system_error(errno != 0 ? errno : EIO, "list the processes");
    return f;
  }

 private:
  pids_info* info_ = nullptr;
};

// libproc2 drops a process it could not read whole (another user's smaps_rollup, say) the
// same way as one that is gone: tell the two apart.
[[noreturn]] void throw_not_selected(pid_t pid) {
  struct stat st{};
  if (::stat(fmt::format("/proc/{}", pid).c_str(), &st) == 0) throw AccessDenied(pid, "/proc");
  throw NoSuchProcess(pid);
}

double hertz() {
  static const double hz = [] {
    long h = procps_hertz_get();
    return h > 0 ? static_cast<double>(h) : 100.0;
  }();
  return hz;
}

// Wall-clock time of the boot: the kernel's start times count from it.
double boot_time() {
  timespec real{}, boot{};
  if (::clock_gettime(CLOCK_REALTIME, &real) == -1) throw_errno("read the real-time clock");
  if (::clock_gettime(CLOCK_BOOTTIME, &boot) == -1) throw_errno("read the boot-time clock");
  return static_cast<double>(real.tv_sec - boot.tv_sec) +
         static_cast<double>(real.tv_nsec - boot.tv_nsec) / 1e9;
}

std::uint64_t status_field(const std::string& status, const char* key) {
  auto at = status.find(key);
  if (at == std::string::npos) return 0;
  return std::strtoull(status.c_str() + at + std::char_traits<char>::length(key), nullptr, 10);
}

unsigned long long cpu_ticks(pid_t pid) {
  enum pids_item items[] = {PIDS_TICS_ALL};
  Pids pids(items, 1);
  pids_stack* s = pids.select(pid);
  if (s == nullptr) throw_not_selected(pid);
  return PIDS_VAL(0, ull_int, s, nullptr);
}

}  // namespace

std::string ProcessStats::status() const {
  switch (state) {
    case 'R': return "running";
    case 'S': return "sleeping";
    case 'D': return "disk-sleep";
    case 'T': return "stopped";
    case 't': return "tracing-stop";
    case 'Z': return "zombie";
    case 'X': return "dead";
    case 'I': return "idle";
    case 'P': return "parked";
    default: return "unknown";
  }
}

ProcessStats process_stats(pid_t pid) {
  if (pid <= 0) throw NoSuchProcess(pid);
  enum Item { state, ppid, comm, nlwp, utime, stime, rss, pss, prv, began, count };
  enum pids_item items[count] = {PIDS_STATE,     PIDS_ID_PPID,     PIDS_CMD,
                                 PIDS_NLWP,      PIDS_TICS_USER,   PIDS_TICS_SYSTEM,
                                 PIDS_VM_RSS,    PIDS_SMAP_PSS,    PIDS_SMAP_PRV_TOTAL,
                                 PIDS_TICS_BEGAN};
  Pids pids(items, count);
  pids_stack* s = pids.select(pid);
  if (s == nullptr) throw_not_selected(pid);

  ProcessStats out;
  out.pid = pid;
  out.state = PIDS_VAL(state, s_ch, s, nullptr);
  out.ppid = PIDS_VAL(ppid, s_int, s, nullptr);
  out.name = PIDS_VAL(comm, str, s, nullptr);
  out.threads = PIDS_VAL(nlwp, s_int, s, nullptr);
  out.cpu_times.user = static_cast<double>(PIDS_VAL(utime, ull_int, s, nullptr)) / hertz();
  out.cpu_times.system = static_cast<double>(PIDS_VAL(stime, ull_int, s, nullptr)) / hertz();
  // libproc2 reports these in KiB.
  out.memory.rss = std::uint64_t{PIDS_VAL(rss, ul_int, s, nullptr)} * 1024;
  out.memory.pss = std::uint64_t{PIDS_VAL(pss, ul_int, s, nullptr)} * 1024;
  out.memory.uss = std::uint64_t{PIDS_VAL(prv, ul_int, s, nullptr)} * 1024;
  out.create_time =
      boot_time() + static_cast<double>(PIDS_VAL(began, ull_int, s, nullptr)) / hertz();

  // From /proc directly:
  // - context switches: libproc2 has no item for status's voluntary_ctxt_switches and
  //   nonvoluntary_ctxt_switches;
  std::string status = read_proc_file(pid, "status");
  out.ctx_switches.voluntary = status_field(status, "\nvoluntary_ctxt_switches:");
  out.ctx_switches.involuntary = status_field(status, "\nnonvoluntary_ctxt_switches:");

  // - the command line: libproc2's PIDS_CMDLINE_V puts the bracketed name in place of an
  //   empty one (a kernel thread, a zombie), where psutil gives an empty list;
  std::string raw = read_proc_file(pid, "cmdline");
  for (std::size_t start = 0; start < raw.size();) {
    std::size_t end = raw.find('\0', start);
    if (end == std::string::npos) end = raw.size();
    out.cmdline.emplace_back(raw, start, end - start);
    start = end + 1;
  }

  // - open descriptors: libproc2 does not count /proc/<pid>/fd. A zombie has none (and
  //   its fd directory may refuse to open).
  if (out.state != 'Z') {
    std::string path = proc_path(pid, "fd");
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) throw_proc_error(errno, pid, "fd");
    std::unique_ptr<DIR, int (*)(DIR*)> guard(dir, ::closedir);
    while (dirent* e = ::readdir(dir)) {
      if (e->d_name[0] != '.') ++out.open_fds;
    }
  }
  return out;
}

double cpu_percent(pid_t pid, Seconds interval) {
  auto t0 = std::chrono::steady_clock::now();
  unsigned long long before = cpu_ticks(pid);
  std::this_thread::sleep_for(interval);
  unsigned long long after = cpu_ticks(pid);
  double wall = Seconds(std::chrono::steady_clock::now() - t0).count();
  if (wall <= 0) return 0;
  return static_cast<double>(after - before) / hertz() / wall * 100.0;
}

std::vector<pid_t> children(pid_t pid, bool recursive) {
  if (!pid_exists(pid)) throw NoSuchProcess(pid);
  enum pids_item items[] = {PIDS_ID_PID, PIDS_ID_PPID};
  Pids pids(items, 2);
  pids_fetch* f = pids.reap();
  std::multimap<pid_t, pid_t> by_parent;
  for (int i = 0; i < f->counts->total; ++i) {
    by_parent.emplace(PIDS_VAL(1, s_int, f->stacks[i], nullptr),
                      PIDS_VAL(0, s_int, f->stacks[i], nullptr));
  }
  std::vector<pid_t> out;
  auto add_children_of = [&](pid_t parent) {
    auto [lo, hi] = by_parent.equal_range(parent);
    for (auto it = lo; it != hi; ++it) out.push_back(it->second);
  };
  add_children_of(pid);
  if (recursive) {
    // Breadth first: every parent comes before its children.
    for (std::size_t i = 0; i < out.size(); ++i) add_children_of(out[i]);
  }
  return out;
}

bool pid_exists(pid_t pid) {
  if (pid <= 0) return false;
  return ::kill(pid, 0) == 0 || errno == EPERM;
}

}  // namespace mp
