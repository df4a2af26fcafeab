// mp/src/error.cpp - the error model: message wording and signal names.
#include "mp/error.hpp"

#include <fmt/format.h>

#include <csignal>
#include <cstdio>
#include <cstring>

namespace mp {

RemoteError::RemoteError(std::string type_name, std::string message, pid_t pid)
    : std::runtime_error(fmt::format("{} raised in process {}: {}", type_name, pid, message)),
      type_name_(std::move(type_name)),
      message_(std::move(message)),
      pid_(pid) {}

WorkerLostError::WorkerLostError(pid_t pid, int signal, int exit_status,
                                 std::string_view what_was_lost)
    : std::runtime_error(
          signal != 0
              ? fmt::format("worker {} was killed by {} while running {}", pid,
                            signal_name(signal), what_was_lost)
              : fmt::format("worker {} exited with status {} while running {}", pid,
                            exit_status, what_was_lost)),
      pid_(pid),
      signal_(signal),
      exit_status_(exit_status) {}

std::system_error system_error(int err, std::string_view action) {
  return std::system_error(err, std::generic_category(), fmt::format("cannot {}", action));
}

void throw_errno(std::string_view action) { throw system_error(errno, action); }

std::string signal_name(int sig) {
  if (const char* abbrev = sigabbrev_np(sig)) return fmt::format("SIG{}", abbrev);
  return fmt::format("signal {}", sig);
}

std::string describe_exitcode(int exitcode) {
  if (exitcode >= 0) return fmt::format("exited with status {}", exitcode);
  return fmt::format("killed by {}", signal_name(-exitcode));
}

namespace detail {

void report_noexcept(std::string_view what) noexcept {
  // fmt may allocate; a failure to report must not escape a destructor either.
  try {
    fmt::print(stderr, "mp: {}\n", what);
  } catch (...) {
    std::fputs("mp: an error occurred in a destructor\n", stderr);
  }
}

}  // namespace detail
}  // namespace mp
