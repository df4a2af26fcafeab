// ipc_raw.hpp - the floors of ipc_benchmark: the same work done by hand, with system calls,
// atomics and memcpy only, no mp. What mp costs is its figure beside these.
#pragma once

#include <cstddef>
#include <cstdint>

namespace raw {

// The small message of the *_small workloads: a sequence number and padding, 64 bytes.
struct Small {
  std::uint64_t seq;
  char pad[56];
};
static_assert(sizeof(Small) == 64);

// `n` 64-byte messages from a forked producer to this process over a hand-written
// single-producer single-consumer ring (4 MiB of slots in anonymous shared memory,
// spinning, no locks, no sleeping). Messages per second, first to last message.
double spsc_small(long n);

// memcpy of `n` 1 MiB blocks from one buffer into successive slots of a 4 MiB area (the
// size of a default mp::Queue ring), after a warm-up lap. MB/s (10^6 bytes).
double memcpy_bandwidth(long n);

// mmap(MAP_SHARED | MAP_ANONYMOUS) `bytes` and memset them (page faults included). MB/s.
double shm_fill(std::size_t bytes);

// `n` 64-byte messages from a forked writer through pipe(2), one write() and one read() per
// message. Messages per second.
double pipe_small(long n);

// `n` 1 MiB messages through pipe(2), written and read in full. MB/s.
double pipe_bulk(long n);

// `n` round trips of 1 byte over two pipes with a forked echo process. Microseconds each.
double pipe_rtt(long n);

// Two forked processes each add 1 to a shared int64 `n` times, under a robust
// process-shared pthread mutex. Nanoseconds per increment (wall time / 2n).
double locked_inc(long n);

}  // namespace raw
