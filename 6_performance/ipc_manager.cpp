// ipc_manager.cpp - see ipc_manager.hpp.
#include "ipc_manager.hpp"

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mp/error.hpp>
#include <mp/manager.hpp>
#include <stdexcept>

namespace {

using Clock = std::chrono::steady_clock;
double us_per(Clock::time_point t0, long n) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
         static_cast<double>(n);
}

// Reads or writes exactly n bytes; false on EOF.
bool full_io(bool writing, int fd, void* p, std::size_t n) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = writing ? ::write(fd, c, n) : ::read(fd, c, n);
    if (r == -1 && errno == EINTR) continue;
    if (r == -1) mp::throw_errno(writing ? "write to the raw server" : "read from the raw server");
    if (r == 0) return false;
    c += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

struct Request {
  std::int32_t key;
  std::int64_t value;
} __attribute__((packed));

}  // namespace

namespace with_manager {

double dict_set(long n) {
  mp::Manager manager;
  auto d = manager.dict<int, long>();
  d.set(0, 0);  // the connection is made here, not in the timed loop
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) d.set(static_cast<int>(i % 64), i);
  double us = us_per(t0, n);
  if (d.size() != static_cast<std::size_t>(std::min<long>(n, 64)) ||
      d.get(static_cast<int>((n - 1) % 64)) != n - 1) {
    throw std::runtime_error("manager_dict_set went wrong: the dict does not hold the last sets");
  }
  return us;
}

}  // namespace with_manager

namespace raw_manager {

double socket_dict_set(long n) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
    mp::throw_errno("create the raw server's socket pair");
  }
  pid_t pid = ::fork();
  if (pid == -1) mp::throw_errno("fork the raw dict server");
  if (pid == 0) {
    ::close(sv[0]);
    std::map<std::int32_t, std::int64_t> dict;
    Request r{};
    char ack = 'k';
    while (full_io(false, sv[1], &r, sizeof r)) {
      dict[r.key] = r.value;
      full_io(true, sv[1], &ack, 1);
    }
    ::_exit(dict.size() == static_cast<std::size_t>(std::min<long>(n, 64)) ? 0 : 1);
  }
  ::close(sv[1]);
  Request r{};
  char ack = 0;
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) {
    r.key = static_cast<std::int32_t>(i % 64);
    r.value = i;
    full_io(true, sv[0], &r, sizeof r);
    if (!full_io(false, sv[0], &ack, 1)) throw std::runtime_error("the raw dict server died");
  }
  double us = us_per(t0, n);
  ::close(sv[0]);
  int status = 0;
  if (mp::detail::retry_eintr([&] { return ::waitpid(pid, &status, 0); }) == -1) {
    mp::throw_errno("wait for the raw dict server");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("the raw dict server went wrong");
  }
  return us;
}

}  // namespace raw_manager
