// tests/support/shm.cpp - see shm.hpp.
#include "shm.hpp"

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
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

ShmGuard::ShmGuard() {
  static std::atomic<int> guards{0};
  tag_ = fmt::format("g{}.{}", ::getpid(), ++guards);
  if (const char* old = std::getenv("MP_SHM_TAG")) previous_tag_ = old;
  ::setenv("MP_SHM_TAG", tag_.c_str(), 1);
}

ShmGuard::~ShmGuard() {
  for (const auto& n : leaked()) ::shm_unlink(("/" + n).c_str());
  if (previous_tag_) {
    ::setenv("MP_SHM_TAG", previous_tag_->c_str(), 1);
  } else {
    ::unsetenv("MP_SHM_TAG");
  }
}

std::string ShmGuard::unique_name() {
  return fmt::format("/mp-test-{}-{}", ::getpid(), ++counter_);
}

bool ShmGuard::ours(const std::string& entry) const {
  return entry.rfind("mp-" + tag_ + "-", 0) == 0 ||
         entry.rfind(fmt::format("mp-test-{}-", ::getpid()), 0) == 0;
}

std::vector<std::string> ShmGuard::leaked() const {
  std::vector<std::string> out;
  for (const auto& n : mp_shm_entries()) {
    if (ours(n)) out.push_back(n);
  }
  return out;
}

}  // namespace testing
