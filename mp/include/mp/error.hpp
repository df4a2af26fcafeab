// mp/error.hpp - the error model of the mp library.
//
// System calls that fail throw std::system_error carrying errno, with a message of the form
// "cannot <verb> <object>: <strerror>". Failures of a distinct kind have their own types,
// as in Python's multiprocessing. Calls where failure is an expected outcome (try_lock, a
// timed get) return bool or std::optional instead of throwing.
#pragma once

#include <sys/types.h>

#include <cerrno>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace mp {

// A timed operation ran out of time (Python: multiprocessing.TimeoutError).
class TimeoutError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A Barrier was aborted, reset, timed out, or lost a party (threading.BrokenBarrierError).
class BrokenBarrierError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A Condition's wait() took its lock back from a holder that died holding it. The caller
// holds the lock again (as after any wait), and the data the lock guards may be half
// updated: repair it (or give up on it) before waiting again. Python's locks are not
// robust, so Python has no counterpart: its waiter would hang or read the half update.
class OwnerDiedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An exception was raised in another process; this carries what it said.
class RemoteError : public std::runtime_error {
 public:
  RemoteError(std::string type_name, std::string message, pid_t pid);
  const std::string& type_name() const noexcept { return type_name_; }
  const std::string& message() const noexcept { return message_; }
  pid_t pid() const noexcept { return pid_; }

 private:
  std::string type_name_;
  std::string message_;
  pid_t pid_;
};

// A worker process died while it held a task (SIGKILL, a segfault, _exit).
class WorkerLostError : public std::runtime_error {
 public:
  // signal is 0 when the worker exited with a status instead; exit_status is then set.
  WorkerLostError(pid_t pid, int signal, int exit_status, std::string_view what_was_lost);
  pid_t pid() const noexcept { return pid_; }
  int signal() const noexcept { return signal_; }
  int exit_status() const noexcept { return exit_status_; }

 private:
  pid_t pid_;
  int signal_;
  int exit_status_;
};

// The peer failed the HMAC challenge (wrong authkey).
class AuthenticationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A misuse of an mp object that is not a system failure: starting a Process twice,
// releasing a lock one does not own, over-releasing a BoundedSemaphore...
class ProcessError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// The system_error for errno value `err`: what() is "cannot <action>: <strerror(err)>".
std::system_error system_error(int err, std::string_view action);

// Throws system_error(errno, action). Call it right after the failing system call.
[[noreturn]] void throw_errno(std::string_view action);

// "SIGKILL", "SIGSEGV", ... or "signal 42".
std::string signal_name(int sig);

// A readable description of a wait status as mp reports it: exitcode >= 0 is an exit
// status, < 0 is the negated signal number (Python's convention).
std::string describe_exitcode(int exitcode);

namespace detail {

// Runs a system call until it does not fail with EINTR. Never use it for close(2): on
// Linux the descriptor is gone even when close reports EINTR.
template <class Call>
auto retry_eintr(Call call) {
  for (;;) {
    auto r = call();
    if (r != -1 || errno != EINTR) return r;
  }
}

// Reports an error from a noexcept context (a destructor) on stderr instead of throwing.
void report_noexcept(std::string_view what) noexcept;

}  // namespace detail
}  // namespace mp
