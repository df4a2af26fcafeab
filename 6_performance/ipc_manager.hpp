// ipc_manager.hpp - the manager_dict_set workload of ipc_benchmark: through an mp::Manager
// dict proxy, and by hand (the floor).
#pragma once

namespace with_manager {

// `n` x d.set(i % 64, i) through a DictProxy<int, long> of a local Manager (its server
// started beforehand, the proxy's connection made by one call first). Microseconds per set.
double dict_set(long n);

}  // namespace with_manager

namespace raw_manager {

// The same `n` sets sent to a hand-written server: a forked process with a std::map that
// answers each 12-byte request (key, value) with one byte over a Unix socket pair, blocking
// read() and write() on both sides: one socket round trip per set. Microseconds per set.
double socket_dict_set(long n);

}  // namespace raw_manager
