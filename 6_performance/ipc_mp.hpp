// ipc_mp.hpp - the workloads of ipc_benchmark done through mp. Each takes its size (messages,
// rounds, MiB), returns the figure in the workload's unit, and throws when the work went
// wrong (a message lost, damaged or out of order).
#pragma once

namespace with_mp {

double queue_small(long n);       // msgs/s: 64-byte messages, producer process -> this one
double queue_1mib(long n);        // MB/s: 1 MiB messages through a Queue
double pipe_small(long n);        // msgs/s: 64-byte messages through Pipe(false)
double pipe_1mib(long n);         // MB/s: 1 MiB messages through Pipe(false)
double pipe_rtt(long n);          // us per 1-byte round trip over two Pipe(false)
double value_locked_inc(long n);  // ns per increment, 2 processes x n under get_lock()
double shm_fill(long mib);        // MB/s: create a SharedMemory of `mib` MiB and write it

}  // namespace with_mp
