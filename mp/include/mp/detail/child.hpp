// mp/detail/child.hpp - what every start method does on the child's side.
#pragma once

#include <sys/types.h>

#include <string>

#include "mp/process.hpp"

namespace mp::detail {

// Sets up a new child: current_process()/parent_process(), an empty child registry, the
// parent-death signal (unless detached) and the process name. Call first in the child.
void enter_child(const LaunchSpec& spec, pid_t parent_pid) noexcept;

// Runs spec.body, reports an escaping exception on stderr (status 1), flushes stdio and
// _exits with the status, skipping the parent's atexit handlers and static destructors.
[[noreturn]] void run_child_and_exit(const LaunchSpec& spec) noexcept;

// The default name of the next child: "Process-N", or "Process-1:N" inside a child.
std::string next_child_name();

// Terminates daemon children and joins the others. Registered with atexit.
void cleanup_children_at_exit() noexcept;

// The fork start method.
StartMethod& fork_method();

}  // namespace mp::detail
