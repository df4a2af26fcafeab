// mp/detail/pidfd.hpp - pidfd system calls.
//
// glibc 2.36 (Debian 12) declares pidfd_open() in <sys/pidfd.h> without extern "C", so
// C++ cannot link against it; these call the kernel directly (Linux >= 5.3).
#pragma once

#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

namespace mp::detail {

inline int pidfd_open(pid_t pid) noexcept {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

inline int pidfd_send_signal(int pidfd, int sig) noexcept {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

// P_PIDFD (Linux 5.4) lives in <linux/wait.h>, which clashes with <sys/wait.h>.
inline constexpr auto kPidfdIdtype = static_cast<idtype_t>(3);

}  // namespace mp::detail
