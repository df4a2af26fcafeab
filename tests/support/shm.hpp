// tests/support/shm.hpp - shared-memory hygiene for tests.
//
//   testing::ShmGuard guard;              // remembers what /dev/shm held
//   auto name = guard.unique_name();      // "/mp-test-<pid>-<n>", never used before
//   ...
//   CHECK(guard.leaked().empty());        // nothing new named /mp-* is left
//
// The destructor removes anything the test leaked, so one failing test does not make the
// next ones fail too.
#pragma once

#include <set>
#include <string>
#include <vector>

namespace testing {

class ShmGuard {
 public:
  ShmGuard();
  ~ShmGuard();
  ShmGuard(const ShmGuard&) = delete;
  ShmGuard& operator=(const ShmGuard&) = delete;

  std::string unique_name();
  // Entries "mp-*" in /dev/shm that were not there when the guard was made.
  std::vector<std::string> leaked() const;

 private:
  std::set<std::string> before_;
  int counter_ = 0;
};

// Every "mp-*" entry in /dev/shm.
std::set<std::string> mp_shm_entries();

}  // namespace testing
