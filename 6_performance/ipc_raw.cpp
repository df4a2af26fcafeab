// ipc_raw.cpp - see ipc_raw.hpp.
#include "ipc_raw.hpp"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mp/detail/futex.hpp>
#include <mp/error.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace raw {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Anonymous shared memory, unmapped at scope exit.
class SharedMap {
 public:
  explicit SharedMap(std::size_t size) : size_(size) {
    p_ = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p_ == MAP_FAILED) mp::throw_errno("map anonymous shared memory");
  }
  ~SharedMap() { ::munmap(p_, size_); }
  SharedMap(const SharedMap&) = delete;
  SharedMap& operator=(const SharedMap&) = delete;
  void* get() const { return p_; }

 private:
  void* p_;
  std::size_t size_;
};

// Waits for a forked child; throws unless it exited with 0.
void reap(pid_t pid, const char* what) {
  int status = 0;
  if (mp::detail::retry_eintr([&] { return ::waitpid(pid, &status, 0); }) == -1) {
    mp::throw_errno(std::string("wait for the ") + what);
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error(std::string("the ") + what + " failed");
  }
}

constexpr std::size_t kSlots = (4u << 20) / sizeof(Small);

struct Ring {
  alignas(64) std::atomic<std::uint64_t> head{0};  // next slot to read
  alignas(64) std::atomic<std::uint64_t> tail{0};  // next slot to write
  alignas(64) Small slots[kSlots];
};

}  // namespace

double spsc_small(long n) {
  SharedMap map(sizeof(Ring));
  auto* ring = new (map.get()) Ring();
  pid_t pid = ::fork();
  if (pid == -1) mp::throw_errno("fork the raw producer");
  if (pid == 0) {
    Small m{};
    for (long i = 0; i < n; ++i) {
      std::uint64_t t = ring->tail.load(std::memory_order_relaxed);
      while (t - ring->head.load(std::memory_order_acquire) == kSlots) mp::detail::cpu_relax();
      m.seq = static_cast<std::uint64_t>(i);
      ring->slots[t % kSlots] = m;
      ring->tail.store(t + 1, std::memory_order_release);
    }
    ::_exit(0);
  }
  Clock::time_point t0;
  bool in_order = true;
  for (long i = 0; i < n; ++i) {
    std::uint64_t h = ring->head.load(std::memory_order_relaxed);
    while (ring->tail.load(std::memory_order_acquire) == h) mp::detail::cpu_relax();
    Small m = ring->slots[h % kSlots];
    ring->head.store(h + 1, std::memory_order_release);
    in_order = in_order && m.seq == static_cast<std::uint64_t>(i);
    if (i == 0) t0 = Clock::now();  // the clock starts at the first message
  }
  double s = since(t0);
  reap(pid, "raw producer");
  if (!in_order) throw std::runtime_error("the raw ring delivered messages out of order");
  return static_cast<double>(n - 1) / s;
}

double memcpy_bandwidth(long n) {
  constexpr std::size_t kBlock = 1u << 20, kArea = 4u << 20;
  std::vector<char> src(kBlock, 'x');
  std::vector<char> dst(kArea);
  auto copy = [&](long i) {
    src[0] = static_cast<char>(i);
    char* to = dst.data() + (static_cast<std::size_t>(i) * kBlock) % kArea;
    std::memcpy(to, src.data(), kBlock);
    asm volatile("" : : "r"(to) : "memory");  // the copy must happen
  };
  for (long i = 0; i < 4; ++i) copy(i);  // warm-up: every page of dst touched
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) copy(i);
  return static_cast<double>(n) * kBlock / since(t0) / 1e6;
}

double anon_fill(std::size_t bytes) {
  auto t0 = Clock::now();
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) mp::throw_errno("map anonymous memory");
  std::memset(p, 1, bytes);
  asm volatile("" : : "r"(p) : "memory");
  double s = since(t0);
  ::munmap(p, bytes);
  return static_cast<double>(bytes) / s / 1e6;
}

}  // namespace raw
