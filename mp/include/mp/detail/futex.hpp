// mp/detail/futex.hpp - futex wait/wake on 32-bit words in memory shared between processes.
//
// Blocking primitives spin briefly on the word, then park here. The futexes are not
// FUTEX_PRIVATE: the word lives in a mapping shared by several processes.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <optional>

#include "mp/error.hpp"

namespace mp::detail {

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));

// Sleeps while *word == expected, until woken, or until the absolute CLOCK_MONOTONIC
// deadline passes (std::nullopt: no deadline). Returns false on timeout, true otherwise
// (woken, value changed, or interrupted: callers re-check their condition in a loop).
inline bool futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       std::optional<std::chrono::steady_clock::time_point> deadline = {}) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (deadline) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline->time_since_epoch());
    ts.tv_sec = static_cast<time_t>(ns.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns.count() % 1'000'000'000);
    tsp = &ts;
  }
  // FUTEX_WAIT_BITSET takes an absolute timeout on CLOCK_MONOTONIC (steady_clock on Linux).
  long r = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_BITSET,
                     expected, tsp, nullptr, FUTEX_BITSET_MATCH_ANY);
  if (r == 0) return true;
  switch (errno) {
    case EAGAIN:  // the word had changed already
    case EINTR:
      return true;
    case ETIMEDOUT:
      return false;
    default:
      throw_errno("wait on a futex");
  }
}

// Wakes up to `count` waiters (INT32_MAX: all). Returns how many were woken.
inline int futex_wake(std::atomic<std::uint32_t>& word, int count = INT32_MAX) {
  long r = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, count, nullptr,
                     nullptr, 0);
  if (r == -1) throw_errno("wake futex waiters");
  return static_cast<int>(r);
}

// A CPU hint for spin loops.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A cap on the polls of a spin loop. The loops are bounded in time (sync.cpp: an adaptive
// 0.25-5 us; queue.cpp: 10 us), because a pause instruction takes from 1 to ~50 ns
// depending on the CPU: 2000 pauses are 50-130 us on the AMD EPYC this was measured on,
// longer than the 20-80 us wake-up that spinning is meant to save.
inline constexpr int kSpinCount = 2000;

// Converts a relative timeout to an absolute steady_clock deadline (nullopt stays nullopt).
template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(std::chrono::duration<Rep, Period> d) {
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(d);
}

}  // namespace mp::detail
