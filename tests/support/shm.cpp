// tests/support/shm.cpp - see shm.hpp.
#include "shm.hpp"

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <filesystem>

namespace testing {

std::set<std::string> mp_shm_entries() {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind("mp-", 0) == 0) names.insert(n);
  }
  return names;
}

ShmGuard::ShmGuard() : before_(mp_shm_entries()) {}

ShmGuard::~ShmGuard() {
  for (const auto& n : leaked()) ::shm_unlink(("/" + n).c_str());
}

std::string ShmGuard::unique_name() {
  return fmt::format("/mp-test-{}-{}", ::getpid(), ++counter_);
}

std::vector<std::string> ShmGuard::leaked() const {
  std::vector<std::string> out;
  for (const auto& n : mp_shm_entries()) {
    if (!before_.count(n)) out.push_back(n);
  }
  return out;
}

}  // namespace testing
