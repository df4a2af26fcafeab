// ipc_raw.cpp - see ipc_raw.hpp.
#include "ipc_raw.hpp"

#include <fcntl.h>
#include <pthread.h>
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

// A pipe's two ends, closed at scope exit (each process closes the end it does not use).
struct RawPipe {
  int fd[2] = {-1, -1};
  RawPipe() {
    if (::pipe2(fd, O_CLOEXEC) == -1) mp::throw_errno("create a pipe");
  }
  ~RawPipe() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
  void close_end(int i) {
    ::close(fd[i]);
    fd[i] = -1;
  }
};

void write_all(int fd, const void* data, std::size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = mp::detail::retry_eintr([&] { return ::write(fd, p, n); });
    if (w == -1) mp::throw_errno("write to a pipe");
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

// Reads exactly n bytes; false at end of file.
bool read_all(int fd, void* data, std::size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = mp::detail::retry_eintr([&] { return ::read(fd, p, n); });
    if (r == -1) mp::throw_errno("read from a pipe");
    if (r == 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

// Forks a child that runs body() and exits (1 if it threw).
template <class Body>
pid_t fork_child(const char* what, Body body) {
  pid_t pid = ::fork();
  if (pid == -1) mp::throw_errno(std::string("fork the ") + what);
  if (pid == 0) {
    int status = 0;
    try {
      body();
    } catch (...) {
      status = 1;
    }
    ::_exit(status);
  }
  return pid;
}

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

double shm_fill(std::size_t bytes) {
  auto t0 = Clock::now();
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) mp::throw_errno("map anonymous shared memory");
  std::memset(p, 1, bytes);
  asm volatile("" : : "r"(p) : "memory");
  double s = since(t0);
  ::munmap(p, bytes);
  return static_cast<double>(bytes) / s / 1e6;
}

double pipe_small(long n) {
  RawPipe p;
  pid_t pid = fork_child("raw pipe writer", [&] {
    p.close_end(0);
    Small m{};
    for (long i = 0; i < n; ++i) {
      m.seq = static_cast<std::uint64_t>(i);
      write_all(p.fd[1], &m, sizeof m);
    }
  });
  p.close_end(1);
  Clock::time_point t0;
  bool in_order = true;
  Small m{};
  for (long i = 0; i < n; ++i) {
    in_order =
        read_all(p.fd[0], &m, sizeof m) && in_order && m.seq == static_cast<std::uint64_t>(i);
    if (i == 0) t0 = Clock::now();
  }
  double s = since(t0);
  reap(pid, "raw pipe writer");
  if (!in_order) throw std::runtime_error("the raw pipe lost or reordered messages");
  return static_cast<double>(n - 1) / s;
}

double pipe_bulk(long n) {
  constexpr std::size_t kBlock = 1u << 20;
  RawPipe p;
  pid_t pid = fork_child("raw pipe writer", [&] {
    p.close_end(0);
    std::vector<char> block(kBlock, 'x');
    for (long i = 0; i < n; ++i) {
      block.front() = block.back() = static_cast<char>(i);
      write_all(p.fd[1], block.data(), kBlock);
    }
  });
  p.close_end(1);
  std::vector<char> in(kBlock);
  Clock::time_point t0;
  bool whole = true;
  for (long i = 0; i < n; ++i) {
    whole = read_all(p.fd[0], in.data(), kBlock) && whole && in.front() == static_cast<char>(i) &&
            in.back() == static_cast<char>(i);
    if (i == 0) t0 = Clock::now();
  }
  double s = since(t0);
  reap(pid, "raw pipe writer");
  if (!whole) throw std::runtime_error("the raw pipe damaged a block");
  return static_cast<double>(n - 1) * kBlock / s / 1e6;
}

double pipe_rtt(long n) {
  RawPipe there, back;
  pid_t pid = fork_child("raw echo process", [&] {
    there.close_end(1);
    back.close_end(0);
    char c = 0;
    while (read_all(there.fd[0], &c, 1)) write_all(back.fd[1], &c, 1);
  });
  there.close_end(0);
  back.close_end(1);
  char c = 'x';
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) {
    write_all(there.fd[1], &c, 1);
    if (!read_all(back.fd[0], &c, 1)) throw std::runtime_error("the raw echo process ended early");
  }
  double s = since(t0);
  there.close_end(1);  // EOF: the echo process ends
  reap(pid, "raw echo process");
  return s / static_cast<double>(n) * 1e6;
}

double locked_inc(long n) {
  struct Shared {
    pthread_mutex_t m;
    std::int64_t counter;
  };
  SharedMap map(sizeof(Shared));
  auto* sh = new (map.get()) Shared();
  pthread_mutexattr_t a;
  ::pthread_mutexattr_init(&a);
  ::pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  ::pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  int rc = ::pthread_mutex_init(&sh->m, &a);
  ::pthread_mutexattr_destroy(&a);
  if (rc != 0) throw mp::system_error(rc, "initialize a robust mutex");
  auto work = [&] {
    for (long i = 0; i < n; ++i) {
      if (::pthread_mutex_lock(&sh->m) != 0) throw std::runtime_error("lock failed");
      ++sh->counter;
      ::pthread_mutex_unlock(&sh->m);
    }
  };
  auto t0 = Clock::now();
  pid_t a1 = fork_child("raw incrementer", work);
  pid_t a2 = fork_child("raw incrementer", work);
  reap(a1, "raw incrementer");
  reap(a2, "raw incrementer");
  double s = since(t0);
  ::pthread_mutex_destroy(&sh->m);
  if (sh->counter != 2 * n) throw std::runtime_error("the raw mutex lost increments");
  return s / static_cast<double>(2 * n) * 1e9;
}

}  // namespace raw
