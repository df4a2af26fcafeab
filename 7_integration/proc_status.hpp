// 7_integration/proc_status.hpp - what the kernel says about a process in /proc/<pid>/status:
// its threads and its memory, for the figures chapter 7's lessons report.
#pragma once

#include <sys/types.h>

#include <string_view>

namespace proc_status {

// A numeric field of /proc/<pid>/status ("Threads", "VmRSS", "VmHWM"; memory in KiB).
// Throws std::runtime_error when the process or the field is not there.
long field(pid_t pid, std::string_view name);

// The threads of this process.
long threads();

// Resets the peak resident set size (VmHWM) of `pid` to its current size, so that the next
// reading is the peak of what ran in between (Linux 4.0 and later).
void reset_peak_rss(pid_t pid);

// Peak resident set size of `pid` since it started or since reset_peak_rss(), in MiB.
double peak_rss_mib(pid_t pid);

// The proportional set size of `pid` now, in MiB (/proc/<pid>/smaps_rollup): its private
// pages, plus each shared page divided by the number of processes that map it. Summed over
// a parent and its fork children it counts their shared pages once.
double pss_mib(pid_t pid);

}  // namespace proc_status
