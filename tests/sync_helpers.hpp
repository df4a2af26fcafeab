// tests/sync_helpers.hpp - what the sync tests share: plain data in shared memory that every
// start method can pass to a child, polling with a hang guard, and the start methods.
#pragma once

#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <mp/context.hpp>
#include <mp/detail/region.hpp>
#include <mp/process.hpp>
#include <mp/serialize.hpp>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "shm.hpp"

namespace synctest {

using namespace std::chrono_literals;

// A T (plain data, atomics welcome) in memory shared with the children, passed as a Process
// argument like the sync objects themselves.
template <class T>
class Shared {
  static_assert(std::is_trivially_destructible_v<T>);

 public:
  Shared()
      : region_(std::make_shared<mp::detail::Region>(
            mp::detail::Region::create(sizeof(T), "test-data"))) {
    new (region_->data()) T{};
  }
  T* operator->() const noexcept { return region_->as<T>(); }
  T& operator*() const noexcept { return *region_->as<T>(); }

  template <class Archive>
  void save(Archive& ar) const {
    std::uint32_t i = mp::detail::export_fd(region_->fd());
    ar(i);
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t i = 0;
    ar(i);
    region_ =
        std::make_shared<mp::detail::Region>(mp::detail::Region::attach(mp::detail::import_fd(i)));
  }

 private:
  std::shared_ptr<mp::detail::Region> region_;
};

// Polls `done` until it holds or the hang guard expires; returns whether it held.
template <class Pred>
bool eventually(Pred done, std::chrono::seconds guard = 60s) {
  auto end = std::chrono::steady_clock::now() + guard;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// Sleeps in a child until it is killed; returns 99 after the hang guard, so that a test
// that forgot to kill it fails instead of hanging.
inline int sleep_until_killed() {
  std::this_thread::sleep_for(120s);
  return 99;
}

// What `shm` reports as new in /dev/shm that this process or the given children could have
// made: every /mp-* name carries its creator's pid ("mp-<pid>-...", "mp-test-<pid>-...").
// Other test programs running at the same time create and remove their own names too, and
// those must not fail this test. (The sync objects themselves never make a name: they are
// memfds. This checks that nothing the test touched did.)
inline std::vector<std::string> leaked_by_us(const testing::ShmGuard& shm,
                                             std::vector<pid_t> pids = {}) {
  pids.push_back(::getpid());
  std::vector<std::string> ours;
  for (const auto& name : shm.leaked()) {
    for (pid_t p : pids) {
      std::string tag = std::to_string(p) + "-";
      if (name.starts_with("mp-" + tag) || name.starts_with("mp-test-" + tag)) {
        ours.push_back(name);
        break;
      }
    }
  }
  return ours;
}

inline void add_pids(std::vector<pid_t>&) {}
template <class... Rest>
void add_pids(std::vector<pid_t>& out, const mp::Process& p, const Rest&... rest);
template <class... Rest>
void add_pids(std::vector<pid_t>& out, const std::vector<mp::Process>& ps, const Rest&... rest) {
  for (const auto& p : ps) out.push_back(p.pid());
  add_pids(out, rest...);
}
template <class... Rest>
void add_pids(std::vector<pid_t>& out, const mp::Process& p, const Rest&... rest) {
  out.push_back(p.pid());
  add_pids(out, rest...);
}

// The pids of processes and vectors of processes, for leaked_by_us().
template <class... Ps>
std::vector<pid_t> pids_of(const Ps&... ps) {
  std::vector<pid_t> out;
  add_pids(out, ps...);
  return out;
}

// The start method of this run of the test case: every one the build supports.
inline mp::Context any_context() {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  UNSCOPED_INFO("start method " << method);
  return mp::get_context(method);
}

}  // namespace synctest
