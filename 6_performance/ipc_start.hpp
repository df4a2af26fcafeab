// ipc_start.hpp - the start_* workloads of ipc_benchmark: start + join of a process that runs
// an empty target, through each mp start method and by hand (the floors). Each returns
// microseconds per process and throws when a child did not exit with 0.
#pragma once

#include <string_view>

namespace with_start {

// n x (mp::Process{mp::get_context(method), empty}.start(); join()).
double start_join(const char* method, long n);

}  // namespace with_start

namespace raw_start {

// The argument that makes the benchmark's own binary exit at once: the floor of a spawn
// re-executes the binary as mp's spawn does, and main() returns 0 when it sees this.
constexpr std::string_view kExitAtOnce = "--raw-start-child-exits-at-once";

double fork_wait(long n);    // fork(), the child _exit(0)s, waitpid()
double spawn_self(long n);   // posix_spawn(/proc/self/exe kExitAtOnce), waitpid()
double fork_server(long n);  // a hand-written fork server: a byte asks, it forks, reaps, answers

}  // namespace raw_start
