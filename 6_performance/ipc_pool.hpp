// ipc_pool.hpp - the pool workloads of ipc_benchmark: through mp::Pool, and the floor by hand.
//
// Every workload runs n tasks of an identity function on 2 worker processes and returns
// microseconds per task, from the first task submitted to the last result checked (worker
// start-up excluded). Each throws when a result is wrong or missing.
#pragma once

namespace with_pool {

double map_chunk1(long n);   // Pool(2).map(identity, 0..n, chunksize = 1)
double map_auto(long n);     // Pool(2).map(identity, 0..n), Python's default chunksize
double apply_async(long n);  // n x Pool(2).apply_async(identity, i), then get() each

}  // namespace with_pool

namespace raw_pool {

// The same tasks by hand: two forked workers, a pipe each way per worker, tasks handed out
// in turn. pipe_tasks sends each task as its own 4-byte message (one write and one read
// per task on each side, up to 64 in flight per worker); pipe_chunks sends chunks of
// Python's default chunksize as one message each, one chunk in flight per worker.
double pipe_tasks(long n);
double pipe_chunks(long n);

}  // namespace raw_pool
