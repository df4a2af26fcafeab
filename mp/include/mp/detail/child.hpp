// mp/detail/child.hpp - what every start method does on the child's side.
#pragma once

#include <sys/types.h>

#include <string>

#include "mp/process.hpp"

namespace mp::detail {

// Sets up a new child: current_process()/parent_process(), an empty child registry, the
// parent-death signal tied to `reaper` (the actual parent: the requester under fork and
// spawn, the server under forkserver; skipped when detached) and the process name. Call
// first in the child.
void enter_child(const LaunchSpec& spec, const ProcessInfo& parent, pid_t reaper) noexcept;

// This process as current_process() describes it.
ProcessInfo this_process_info();

// Reads the int32 exit code a forkserver sends on a child's status channel. EOF (the server
// died before the child was reaped) reads as -SIGKILL: the child died with its server.
int read_exit_status(int status_fd, pid_t pid);

// Drops (in a new child) the connection to the parent's forkserver.
void forget_forkserver() noexcept;

// The forkserver's pid (0 when this process has none running).
pid_t forkserver_pid();

// Stops the forkserver of this process, if it started one, and reaps it.
void stop_forkserver() noexcept;

// Runs spec.body, reports an escaping exception on stderr (status 1), flushes stdio and
// _exits with the status, skipping the parent's atexit handlers and static destructors.
[[noreturn]] void run_child_and_exit(const LaunchSpec& spec) noexcept;

// The identity of the next child: "N", or "1:N" inside child 1 (names are "Process-<id>").
std::string next_child_identity();

// Terminates daemon children and joins the others. Registered with atexit.
void cleanup_children_at_exit() noexcept;

// The start methods.
StartMethod& fork_method();
StartMethod& spawn_method();
StartMethod& forkserver_method();

}  // namespace mp::detail
