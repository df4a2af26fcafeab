// ipc_start.cpp - see ipc_start.hpp.
#include "ipc_start.hpp"

#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <mp/context.hpp>
#include <mp/detail/fd.hpp>
#include <mp/error.hpp>
#include <mp/process.hpp>
#include <stdexcept>
#include <string>
#include <system_error>

extern char** environ;

namespace with_start {
namespace {

void empty_target() {}

}  // namespace

double start_join(const char* method, long n) {
  mp::Context ctx = mp::get_context(method);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
    mp::Process p{ctx, empty_target};
    p.start();
    p.join();
    if (p.exitcode() != 0) {
      throw std::runtime_error(std::string("start_") + method + ": a child did not exit with 0");
    }
  }
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
         static_cast<double>(n);
}

}  // namespace with_start

namespace raw_start {
namespace {

using Clock = std::chrono::steady_clock;

double us_per(Clock::time_point t0, long n) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
         static_cast<double>(n);
}

// Waits for pid; throws unless it exited with 0.
void reap_ok(pid_t pid, const char* what) {
  int status = 0;
  if (mp::detail::retry_eintr([&] { return ::waitpid(pid, &status, 0); }) == -1) {
    mp::throw_errno(std::string("wait for ") + what);
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error(std::string(what) + " did not exit with 0");
  }
}

}  // namespace

double fork_wait(long n) {
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) {
    pid_t pid = ::fork();
    if (pid == -1) mp::throw_errno("fork a child");
    if (pid == 0) ::_exit(0);
    reap_ok(pid, "a forked child");
  }
  return us_per(t0, n);
}

double spawn_self(long n) {
  std::string self = "/proc/self/exe", flag{kExitAtOnce};
  char* argv[] = {self.data(), flag.data(), nullptr};
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) {
    pid_t pid = 0;
    if (int e = ::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv, environ)) {
      throw std::system_error(e, std::generic_category(), "cannot posix_spawn " + self);
    }
    reap_ok(pid, "a spawned child");
  }
  return us_per(t0, n);
}

double fork_server(long n) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == -1) {
    mp::throw_errno("create a socket pair for the fork server");
  }
  mp::detail::UniqueFd mine{sv[0]}, theirs{sv[1]};
  pid_t server = ::fork();
  if (server == -1) mp::throw_errno("fork the fork server");
  if (server == 0) {
    // The server: for each request byte, fork a child that exits at once, reap it, and
    // answer with its exit status. End of file: done.
    mine.reset();
    char req = 0;
    while (::read(theirs.get(), &req, 1) == 1) {
      pid_t c = ::fork();
      if (c == -1) ::_exit(1);
      if (c == 0) ::_exit(0);
      int status = 0;
      if (::waitpid(c, &status, 0) != c) ::_exit(1);
      char code = WIFEXITED(status) ? static_cast<char>(WEXITSTATUS(status)) : 1;
      if (::write(theirs.get(), &code, 1) != 1) ::_exit(1);
    }
    ::_exit(0);
  }
  theirs.reset();
  auto t0 = Clock::now();
  try {
    for (long i = 0; i < n; ++i) {
      char req = 1, code = 0;
      if (mp::detail::retry_eintr([&] { return ::write(mine.get(), &req, 1); }) != 1) {
        mp::throw_errno("send a request to the fork server");
      }
      ssize_t r = mp::detail::retry_eintr([&] { return ::read(mine.get(), &code, 1); });
      if (r == -1) mp::throw_errno("read the fork server's answer");
      if (r == 0 || code != 0) throw std::runtime_error("the fork server's child failed");
    }
  } catch (...) {
    mine.reset();  // end of file: the server exits
    ::waitpid(server, nullptr, 0);
    throw;
  }
  double us = us_per(t0, n);
  mine.reset();
  reap_ok(server, "the fork server");
  return us;
}

}  // namespace raw_start
