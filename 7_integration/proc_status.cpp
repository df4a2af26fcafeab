// 7_integration/proc_status.cpp - see proc_status.hpp.
#include "proc_status.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <mp/error.hpp>
#include <stdexcept>
#include <string>

namespace proc_status {

namespace {
// A "Name: <number> ..." line of a /proc file.
long read_field(const std::string& path, std::string_view name) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(fmt::format("cannot read {}: cannot open it", path));
  std::string key = fmt::format("{}:", name);
  for (std::string line; std::getline(f, line);) {
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size()));
  }
  throw std::runtime_error(fmt::format("cannot read {} from {}: no such field", name, path));
}
}  // namespace

long field(pid_t pid, std::string_view name) {
  return read_field(fmt::format("/proc/{}/status", pid), name);
}

long threads() { return field(::getpid(), "Threads"); }

void reset_peak_rss(pid_t pid) {
  std::string path = fmt::format("/proc/{}/clear_refs", pid);
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd == -1) mp::throw_errno(fmt::format("open {} to reset the peak RSS", path));
  // 5: reset the peak RSS (see proc(5)).
  ssize_t n = mp::detail::retry_eintr([&] { return ::write(fd, "5", 1); });
  int err = errno;
  ::close(fd);
  if (n != 1) throw mp::system_error(err, fmt::format("reset the peak RSS through {}", path));
}

double peak_rss_mib(pid_t pid) { return static_cast<double>(field(pid, "VmHWM")) / 1024.0; }

double pss_mib(pid_t pid) {
  return static_cast<double>(read_field(fmt::format("/proc/{}/smaps_rollup", pid), "Pss")) / 1024.0;
}

}  // namespace proc_status
