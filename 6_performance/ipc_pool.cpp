// ipc_pool.cpp - the pool workloads of ipc_benchmark (see ipc_pool.hpp).
#include "ipc_pool.hpp"

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mp/pool.hpp>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kWorkers = 2;

int identity(int x) { return x; }

std::vector<int> first_n(long n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

double us_per_task(Clock::time_point t0, long n) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
         static_cast<double>(n);
}

double pool_map(long n, std::size_t chunksize) {
  mp::Pool pool{kWorkers};
  auto items = first_n(n);
  pool.map(identity, first_n(1000), 1);  // the workers are up and have run a task
  auto t0 = Clock::now();
  auto got = pool.map(identity, items, chunksize);
  double us = us_per_task(t0, n);
  if (got != items) throw std::runtime_error("pool map returned wrong results");
  return us;
}

}  // namespace

namespace with_pool {

double map_chunk1(long n) { return pool_map(n, 1); }

double map_auto(long n) { return pool_map(n, 0); }

double apply_async(long n) {
  mp::Pool pool{kWorkers};
  pool.map(identity, first_n(1000), 1);
  std::vector<mp::AsyncResult<int>> results;
  results.reserve(static_cast<std::size_t>(n));
  auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) results.push_back(pool.apply_async(identity, i));
  for (int i = 0; i < n; ++i) {
    if (results[static_cast<std::size_t>(i)].get() != i) {
      throw std::runtime_error("apply_async returned a wrong result");
    }
  }
  return us_per_task(t0, n);
}

}  // namespace with_pool

namespace raw_pool {
namespace {

void write_all(int fd, const void* data, std::size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w == -1) {
      if (errno == EINTR) continue;
      throw std::runtime_error(fmt::format("cannot write to a worker's pipe: errno {}", errno));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

// False on end of file before the first byte.
bool read_all(int fd, void* data, std::size_t n) {
  auto* p = static_cast<char*>(data);
  std::size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, p + got, n - got);
    if (r == -1) {
      if (errno == EINTR) continue;
      throw std::runtime_error(fmt::format("cannot read from a pipe: errno {}", errno));
    }
    if (r == 0) {
      if (got == 0) return false;
      throw std::runtime_error("cannot read from a pipe: it closed mid-message");
    }
    got += static_cast<std::size_t>(r);
  }
  return true;
}

// One task per message: a 4-byte int in, a 4-byte int out.
void task_loop(int in, int out) {
  int x = 0;
  while (read_all(in, &x, sizeof x)) {
    x = identity(x);
    write_all(out, &x, sizeof x);
  }
}

// A chunk per message: [u32 count][count ints] in, [count ints] out.
void chunk_loop(int in, int out) {
  std::vector<int> buf;
  std::uint32_t count = 0;
  while (read_all(in, &count, sizeof count)) {
    buf.resize(count);
    if (!read_all(in, buf.data(), count * sizeof(int))) return;
    for (int& x : buf) x = identity(x);
    write_all(out, buf.data(), count * sizeof(int));
  }
}

// Two forked workers, each with a pipe in and a pipe out. Closing the pipes ends them.
class Workers {
 public:
  explicit Workers(void (*loop)(int, int)) {
    for (int k = 0; k < kWorkers; ++k) {
      int down[2], up[2];
      if (::pipe(down) == -1 || ::pipe(up) == -1) throw std::runtime_error("cannot create pipes");
      pid_t pid = ::fork();
      if (pid == -1) throw std::runtime_error("cannot fork a worker");
      if (pid == 0) {
        for (const auto& w : w_) {
          ::close(w.to);
          ::close(w.from);
        }
        ::close(down[1]);
        ::close(up[0]);
        try {
          loop(down[0], up[1]);
        } catch (...) {
          ::_exit(1);
        }
        ::_exit(0);
      }
      ::close(down[0]);
      ::close(up[1]);
      w_.push_back({pid, down[1], up[0]});
    }
  }
  ~Workers() {
    for (auto& w : w_) {
      ::close(w.to);
      ::close(w.from);
      int status = 0;
      while (::waitpid(w.pid, &status, 0) == -1 && errno == EINTR) {
      }
    }
  }
  Workers(const Workers&) = delete;
  Workers& operator=(const Workers&) = delete;

  int to(int k) const { return w_[static_cast<std::size_t>(k)].to; }
  int from(int k) const { return w_[static_cast<std::size_t>(k)].from; }

 private:
  struct W {
    pid_t pid;
    int to, from;
  };
  std::vector<W> w_;
};

constexpr std::size_t kWindow = 64;  // tasks in flight per worker

}  // namespace

double pipe_tasks(long n) {
  Workers workers(task_loop);
  std::deque<int> pending[kWorkers];
  auto collect = [&](int k) {
    int r = 0;
    if (!read_all(workers.from(k), &r, sizeof r) || r != pending[k].front()) {
      throw std::runtime_error("a raw pipe worker returned a wrong result");
    }
    pending[k].pop_front();
  };
  auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    int k = i % kWorkers;
    if (pending[k].size() >= kWindow) collect(k);
    write_all(workers.to(k), &i, sizeof i);
    pending[k].push_back(i);
  }
  for (int k = 0; k < kWorkers; ++k) {
    while (!pending[k].empty()) collect(k);
  }
  return us_per_task(t0, n);
}

double pipe_chunks(long n) {
  Workers workers(chunk_loop);
  auto chunk =
      static_cast<long>(mp::detail::default_chunksize(static_cast<std::size_t>(n), kWorkers));
  std::deque<std::pair<int, int>> pending[kWorkers];  // (first, count) per chunk in flight
  std::vector<int> buf;
  auto collect = [&](int k) {
    auto [first, count] = pending[k].front();
    buf.resize(static_cast<std::size_t>(count));
    if (!read_all(workers.from(k), buf.data(), buf.size() * sizeof(int))) {
      throw std::runtime_error("a raw pipe worker ended early");
    }
    for (int j = 0; j < count; ++j) {
      if (buf[static_cast<std::size_t>(j)] != first + j) throw std::runtime_error("wrong result");
    }
    pending[k].pop_front();
  };
  std::vector<int> out;
  auto t0 = Clock::now();
  int c = 0;
  for (long first = 0; first < n; first += chunk, ++c) {
    int k = c % kWorkers;
    // One chunk in flight per worker: a worker blocked writing a big result into a full
    // pipe must not meet a parent blocked writing it the next chunk.
    if (!pending[k].empty()) collect(k);
    auto count = static_cast<std::uint32_t>(std::min(chunk, n - first));
    out.resize(1 + count);
    std::memcpy(out.data(), &count, sizeof count);
    std::iota(out.begin() + 1, out.end(), static_cast<int>(first));
    write_all(workers.to(k), out.data(), out.size() * sizeof(int));
    pending[k].emplace_back(static_cast<int>(first), static_cast<int>(count));
  }
  for (int k = 0; k < kWorkers; ++k) {
    while (!pending[k].empty()) collect(k);
  }
  return us_per_task(t0, n);
}

}  // namespace raw_pool
