// ipc_mp.cpp - see ipc_mp.hpp. The producer side of each workload runs in a child process
// started with mp::Process; the measuring side is this process.
#include "ipc_mp.hpp"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <mp/connection.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mp/shared_memory.hpp>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "ipc_raw.hpp"

namespace with_mp {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
constexpr std::size_t kMiB = 1u << 20;

void put_small(mp::Queue<raw::Small> q, long n) {
  raw::Small m{};
  for (long i = 0; i < n; ++i) {
    m.seq = static_cast<std::uint64_t>(i);
    q.put(m);
  }
}

void put_big(mp::Queue<std::vector<char>> q, long n) {
  std::vector<char> block(kMiB, 'x');
  for (long i = 0; i < n; ++i) {
    block.front() = block.back() = static_cast<char>(i);
    q.put(block);
  }
}

void send_small(mp::Connection out, long n) {
  raw::Small m{};
  for (long i = 0; i < n; ++i) {
    m.seq = static_cast<std::uint64_t>(i);
    out.send(m);
  }
}

void send_big(mp::Connection out, long n) {
  std::string block(kMiB, 'x');
  for (long i = 0; i < n; ++i) {
    block.front() = block.back() = static_cast<char>(i);
    out.send_bytes(block);
  }
}

void echo(mp::Connection in, mp::Connection out) {
  try {
    for (;;) out.send_bytes(in.recv_bytes());
  } catch (const mp::EOFError&) {  // the parent closed its end: done
  }
}

void increment(mp::Value<std::int64_t> v, long n) {
  for (long i = 0; i < n; ++i) {
    std::lock_guard g{v.get_lock()};
    ++v.get_obj();
  }
}

}  // namespace

double queue_small(long n) {
  mp::Queue<raw::Small> q;
  mp::Process producer{put_small, q, n};
  producer.start();
  Clock::time_point t0;
  bool in_order = true;
  for (long i = 0; i < n; ++i) {
    in_order = in_order && q.get().seq == static_cast<std::uint64_t>(i);
    if (i == 0) t0 = Clock::now();  // the clock starts at the first message
  }
  double s = since(t0);
  producer.join();
  if (!in_order || producer.exitcode() != 0) throw std::runtime_error("queue_small went wrong");
  return static_cast<double>(n - 1) / s;
}

double queue_1mib(long n) {
  mp::Queue<std::vector<char>> q;  // the default 4 MiB ring: three messages in flight
  mp::Process producer{put_big, q, n};
  producer.start();
  Clock::time_point t0;
  bool whole = true;
  for (long i = 0; i < n; ++i) {
    std::vector<char> v = q.get();
    whole = whole && v.size() == kMiB && v.front() == static_cast<char>(i) &&
            v.back() == static_cast<char>(i);
    if (i == 0) t0 = Clock::now();
  }
  double s = since(t0);
  producer.join();
  if (!whole || producer.exitcode() != 0) throw std::runtime_error("queue_1mib went wrong");
  return static_cast<double>(n - 1) * kMiB / s / 1e6;
}

double pipe_small(long n) {
  auto [in, out] = mp::Pipe(false);  // one way: a receiving end, then a sending end
  mp::Process writer{send_small, out, n};
  writer.start();
  out.close();  // our copy of the sending end
  Clock::time_point t0;
  bool in_order = true;
  for (long i = 0; i < n; ++i) {
    in_order = in_order && in.recv<raw::Small>().seq == static_cast<std::uint64_t>(i);
    if (i == 0) t0 = Clock::now();
  }
  double s = since(t0);
  writer.join();
  if (!in_order || writer.exitcode() != 0) throw std::runtime_error("pipe_small went wrong");
  return static_cast<double>(n - 1) / s;
}

double pipe_1mib(long n) {
  auto [in, out] = mp::Pipe(false);
  mp::Process writer{send_big, out, n};
  writer.start();
  out.close();
  Clock::time_point t0;
  bool whole = true;
  for (long i = 0; i < n; ++i) {
    std::string b = in.recv_bytes();
    whole = whole && b.size() == kMiB && b.front() == static_cast<char>(i) &&
            b.back() == static_cast<char>(i);
    if (i == 0) t0 = Clock::now();
  }
  double s = since(t0);
  writer.join();
  if (!whole || writer.exitcode() != 0) throw std::runtime_error("pipe_1mib went wrong");
  return static_cast<double>(n - 1) * kMiB / s / 1e6;
}

double pipe_rtt(long n) {
  auto [there_in, there_out] = mp::Pipe(false);
  auto [back_in, back_out] = mp::Pipe(false);
  mp::Process echoer{echo, there_in, back_out};
  echoer.start();
  there_in.close();
  back_out.close();
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) {
    there_out.send_bytes(std::string_view("x"));
    if (back_in.recv_bytes() != "x") throw std::runtime_error("pipe_rtt got a wrong byte");
  }
  double s = since(t0);
  there_out.close();  // EOF: the echo process ends
  echoer.join();
  return s / static_cast<double>(n) * 1e6;
}

double value_locked_inc(long n) {
  mp::Value<std::int64_t> v;
  mp::Process a{increment, v, n}, b{increment, v, n};
  auto t0 = Clock::now();
  a.start();
  b.start();
  a.join();
  b.join();
  double s = since(t0);
  if (v.value() != 2 * n) throw std::runtime_error("value_locked_inc lost increments");
  return s / static_cast<double>(2 * n) * 1e9;
}

double shm_fill(long n) {
  std::size_t bytes = static_cast<std::size_t>(n) << 20;
  auto t0 = Clock::now();
  auto shm = mp::SharedMemory::create(bytes);
  std::memset(shm.data(), 1, bytes);
  double s = since(t0);
  return static_cast<double>(bytes) / s / 1e6;
}

}  // namespace with_mp
