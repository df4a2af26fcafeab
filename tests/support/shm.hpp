// tests/support/shm.hpp - shared-memory hygiene for tests.
//
//   testing::ShmGuard guard;              // names made from here on carry this guard's tag
//   auto name = guard.unique_name();      // "/mp-test-<pid>-<n>", never used before
//   ...
//   CHECK(guard.leaked().empty());        // nothing of ours named /mp-* is left
//
// Tests run in parallel (ctest -j), so a guard must only ever see its own names. It sets
// MP_SHM_TAG, which mp puts into every name it generates (/mp-<tag>-...) and which child
// processes and lesson binaries inherit; leaked() and the clean-up look at names with
// that tag and at unique_name()'s, never at other tests' live segments. The destructor
// removes what the test leaked, so one failing test does not make the next ones fail too.
#pragma once

#include <optional>
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
  // Entries of this guard ("mp-<tag>-*", "mp-test-<pid>-*") now in /dev/shm.
  std::vector<std::string> leaked() const;

 private:
  bool ours(const std::string& entry) const;
  std::string tag_;
  std::optional<std::string> previous_tag_;
  int counter_ = 0;
};

// Every "mp-*" entry in /dev/shm.
std::set<std::string> mp_shm_entries();

}  // namespace testing
