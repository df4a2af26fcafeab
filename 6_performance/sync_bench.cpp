// sync_bench.cpp - what mp's locks cost: uncontended acquire/release, and hand-offs between
// two processes.
//
// Not a lesson: a measuring tool for the sync module (build/6_performance/sync_bench).
// Each figure is measured in the same run as a floor to compare with (std::mutex, a raw
// pthread robust mutex, a pipe round trip), so the ratios mean something on a noisy machine.
//
// Usage: sync_bench [--iterations N] [--handoffs N] [--json]
//   $ build-release/6_performance/sync_bench
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mp/process.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

template <class F>
double ns_per_op(long n, F&& body) {
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) body();
  auto t1 = Clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(n);
}

// Best of a few runs: the least disturbed one.
template <class F>
double best_ns(long n, F&& body) {
  double best = 1e300;
  for (int r = 0; r < 5; ++r) best = std::min(best, ns_per_op(n, body));
  return best;
}

// A raw process-shared robust mutex in an anonymous shared mapping: the floor for Lock.
pthread_mutex_t* raw_robust_mutex() {
  void* p = ::mmap(nullptr, sizeof(pthread_mutex_t), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) mp::throw_errno("map memory for a raw mutex");
  auto* m = static_cast<pthread_mutex_t*>(p);
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(m, &a);
  pthread_mutexattr_destroy(&a);
  return m;
}

// Ping-pong partner: answers each of `n` pings.
int pong_semaphores(mp::Semaphore ping, mp::Semaphore pong, long n) {
  for (long i = 0; i < n; ++i) {
    ping.acquire();
    pong.release();
  }
  return 0;
}

int pong_pipe(int in, int out, long n) {
  char c = 0;
  for (long i = 0; i < n; ++i) {
    if (::read(in, &c, 1) != 1) return 1;
    if (::write(out, &c, 1) != 1) return 1;
  }
  return 0;
}

// Both processes add under the same lock.
struct Counter {
  std::int64_t value;
};
int add_many(mp::Lock lock, Counter* c, long n) {
  for (long i = 0; i < n; ++i) {
    std::lock_guard g{lock};
    ++c->value;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "What mp's locks cost: uncontended acquire/release, and hand-offs between two "
      "processes."};
  long iterations = 5'000'000;
  long handoffs = 50'000;
  bool json = false;
  app.add_option("--iterations", iterations, "uncontended operations per measurement")
      ->check(CLI::Range(1000L, 1'000'000'000L));
  app.add_option("--handoffs", handoffs, "round trips between the two processes")
      ->check(CLI::Range(100L, 100'000'000L));
  app.add_flag("--json", json, "one JSON object instead of the table");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  nlohmann::json out;
  auto ctx = mp::get_context("fork");

  // Uncontended: one process, nobody else touching the object.
  std::mutex std_mutex;
  out["std_mutex_ns"] = best_ns(iterations, [&] {
    std_mutex.lock();
    std_mutex.unlock();
  });
  pthread_mutex_t* raw = raw_robust_mutex();
  out["raw_robust_mutex_ns"] = best_ns(iterations, [&] {
    pthread_mutex_lock(raw);
    pthread_mutex_unlock(raw);
  });
  mp::Lock lock;
  out["lock_ns"] = best_ns(iterations, [&] {
    lock.acquire();
    lock.release();
  });
  out["lock_guard_ns"] = best_ns(iterations, [&] { std::lock_guard g{lock}; });
  mp::RLock rlock;
  out["rlock_ns"] = best_ns(iterations, [&] {
    rlock.acquire();
    rlock.release();
  });
  mp::Semaphore sem(1);
  out["semaphore_ns"] = best_ns(iterations, [&] {
    sem.acquire();
    sem.release();
  });
  mp::Event ev;
  ev.set();
  out["event_wait_set_ns"] = best_ns(iterations, [&] { ev.wait(); });

  // Contended hand-off: two processes take turns, through two semaphores, and through a
  // pipe pair for comparison (the kernel's own hand-off).
  {
    mp::Semaphore ping(0), pong(0);
    mp::Process partner{ctx, pong_semaphores, ping, pong, handoffs};
    partner.start();
    auto t0 = Clock::now();
    for (long i = 0; i < handoffs; ++i) {
      ping.release();
      pong.acquire();
    }
    auto t1 = Clock::now();
    partner.join();
    out["semaphore_round_trip_ns"] =
        std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(handoffs);
  }
  {
    int a[2], b[2];
    if (::pipe(a) == -1 || ::pipe(b) == -1) mp::throw_errno("create pipes");
    mp::Process partner{ctx, pong_pipe, a[0], b[1], handoffs};
    partner.start();
    char c = 'x';
    auto t0 = Clock::now();
    for (long i = 0; i < handoffs; ++i) {
      if (::write(a[1], &c, 1) != 1 || ::read(b[0], &c, 1) != 1) mp::throw_errno("ping");
    }
    auto t1 = Clock::now();
    partner.join();
    for (int fd : {a[0], a[1], b[0], b[1]}) ::close(fd);
    out["pipe_round_trip_ns"] =
        std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(handoffs);
  }
  // Two processes hammering one lock: ns per locked increment, all included.
  {
    void* p =
        ::mmap(nullptr, sizeof(Counter), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) mp::throw_errno("map a counter");
    auto* c = static_cast<Counter*>(p);
    long each = handoffs * 20;
    mp::Process other{ctx, add_many, lock, c, each};
    auto t0 = Clock::now();
    other.start();
    add_many(lock, c, each);
    other.join();
    auto t1 = Clock::now();
    out["contended_increment_ns"] =
        std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(2 * each);
    out["contended_count_exact"] = c->value == 2 * each;
    ::munmap(p, sizeof(Counter));
  }

  if (json) {
    fmt::print("{}\n", out.dump());
    return 0;
  }
  auto row = [&](const char* what, const char* key, const char* floor_key = nullptr) {
    double v = out[key].get<double>();
    if (floor_key) {
      fmt::print("  {:<44} {:>9.1f} ns   ({:.2f}x {})\n", what, v, v / out[floor_key].get<double>(),
                 floor_key);
    } else {
      fmt::print("  {:<44} {:>9.1f} ns\n", what, v);
    }
  };
  fmt::print("uncontended, one process ({} operations, best of 5):\n", iterations);
  row("std::mutex lock+unlock (process-private)", "std_mutex_ns");
  row("raw robust pshared pthread mutex", "raw_robust_mutex_ns");
  row("mp::Lock acquire+release", "lock_ns", "raw_robust_mutex_ns");
  row("mp::Lock via std::lock_guard", "lock_guard_ns", "raw_robust_mutex_ns");
  row("mp::RLock acquire+release", "rlock_ns", "raw_robust_mutex_ns");
  row("mp::Semaphore acquire+release", "semaphore_ns", "std_mutex_ns");
  row("mp::Event wait() when set", "event_wait_set_ns");
  fmt::print("two processes ({} round trips):\n", handoffs);
  row("mp::Semaphore ping-pong round trip", "semaphore_round_trip_ns", "pipe_round_trip_ns");
  row("pipe ping-pong round trip (the kernel)", "pipe_round_trip_ns");
  row("mp::Lock contended increment (2 processes)", "contended_increment_ns");
  fmt::print("  contended count exact: {}\n", out["contended_count_exact"].get<bool>());
  return 0;
}
