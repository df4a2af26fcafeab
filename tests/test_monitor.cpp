// tests/test_monitor.cpp - mp::process_stats and friends, checked against ps and /proc.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mp/monitor.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mp/sync.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

// A child that allocates and touches `mib` MiB, runs `extra_threads` more threads, then
// stops at a known point: `ready` set, every thread blocked until `go` is set.
int paused_child(mp::Event ready, mp::Event go, int extra_threads, int mib) {
  std::size_t bytes = static_cast<std::size_t>(mib) << 20;
  auto block = std::make_unique<char[]>(bytes);
  std::memset(block.get(), 1, bytes);
  std::vector<std::thread> threads;
  for (int i = 0; i < extra_threads; ++i) threads.emplace_back([&] { go.wait(); });
  ready.set();
  go.wait();
  for (auto& t : threads) t.join();
  return block[bytes - 1] == 1 ? 0 : 3;
}

void sleeper(mp::Event go) { go.wait(); }

// A child that starts a grandchild, reports its pid and waits.
int parent_of_one(mp::Queue<int> pids, mp::Event go) {
  mp::Process g{mp::get_context("fork"), sleeper, go};
  g.start();
  pids.put(g.pid());
  go.wait();
  g.join();
  return *g.exitcode();
}

struct PsRow {
  long rss_kib = 0;
  int nlwp = 0;
  std::string stat;
};

PsRow ps(pid_t pid) {
  std::string cmd = "ps -o rss=,nlwp=,stat= -p " + std::to_string(pid);
  std::unique_ptr<FILE, int (*)(FILE*)> p(::popen(cmd.c_str(), "r"), ::pclose);
  REQUIRE(p);
  std::array<char, 256> line{};
  REQUIRE(std::fgets(line.data(), line.size(), p.get()) != nullptr);
  std::istringstream in(line.data());
  PsRow row;
  in >> row.rss_kib >> row.nlwp >> row.stat;
  return row;
}

}  // namespace

TEST_CASE("monitor: RSS, threads and state agree with ps for a paused child", "[monitor]") {
  mp::Event ready, go;
  mp::Process child{paused_child, ready, go, 3, 32};
  child.start();
  REQUIRE(ready.wait(60s));
  // Every thread of the child is now blocked in go.wait(): its memory does not change.
  // ready is set just before the main thread blocks, so wait until the kernel says so.
  mp::ProcessStats s = mp::process_stats(child.pid());
  for (int i = 0; i < 6000 && s.state != 'S'; ++i) {
    std::this_thread::sleep_for(1ms);
    s = mp::process_stats(child.pid());
  }
  PsRow row = ps(child.pid());

  CHECK(s.pid == child.pid());
  CHECK(s.ppid == ::getpid());
  CHECK(s.threads >= 4);  // its 4, plus any a sanitizer runtime adds (TSan does)
  CHECK(row.nlwp == s.threads);
  CHECK(s.state == 'S');
  CHECK(s.status() == "sleeping");
  REQUIRE_FALSE(row.stat.empty());
  CHECK(row.stat[0] == s.state);
  // The same pages, read twice: equal but for a few pages the reads themselves may fault.
  long ours_kib = static_cast<long>(s.memory.rss / 1024);
  CHECK(std::labs(ours_kib - row.rss_kib) <= 256);
  CHECK(s.memory.rss >= 32u << 20);  // the touched block is resident
  // USS <= PSS <= RSS, and the 32 MiB written after the fork are the child's alone.
  CHECK(s.memory.uss <= s.memory.pss);
  CHECK(s.memory.pss <= s.memory.rss);
  CHECK(s.memory.uss >= 32u << 20);
  CHECK(s.open_fds > 0);
  CHECK_FALSE(s.cmdline.empty());
  CHECK(s.ctx_switches.voluntary > 0);  // it blocked at least once to get here
  CHECK(s.cpu_times.user >= 0);
  CHECK(s.cpu_times.system >= 0);
  auto now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch());
  CHECK(s.create_time <= now.count() + 1);
  CHECK(s.create_time > now.count() - 3600);
  // A child blocked on an Event uses no CPU; a busy loop would read near 100.
  CHECK(mp::cpu_percent(child.pid(), 100ms) < 50);

  go.set();
  child.join();
  CHECK(child.exitcode() == 0);
}

TEST_CASE("monitor: the calling process reads as itself", "[monitor]") {
  mp::ProcessStats s = mp::process_stats(::getpid());
  CHECK(s.ppid == ::getppid());
  CHECK(s.state == 'R');  // it is running this very code
  CHECK(s.memory.rss > 0);
  REQUIRE_FALSE(s.cmdline.empty());
}

TEST_CASE("monitor: a vanished pid throws NoSuchProcess", "[monitor]") {
  mp::Event go;
  mp::Process child{sleeper, go};
  child.start();
  pid_t pid = child.pid();
  CHECK(mp::pid_exists(pid));
  go.set();
  child.join();  // reaped: the pid is free now
  CHECK_FALSE(mp::pid_exists(pid));
  CHECK_THROWS_AS(mp::process_stats(pid), mp::NoSuchProcess);
  CHECK_THROWS_AS(mp::cpu_percent(pid, 1ms), mp::NoSuchProcess);
  CHECK_THROWS_AS(mp::children(pid), mp::NoSuchProcess);
  try {
    mp::process_stats(pid);
  } catch (const mp::NoSuchProcess& e) {
    CHECK(e.pid() == pid);
    CHECK_THAT(e.what(), Catch::Contains(std::to_string(pid)));
  }
  CHECK_THROWS_AS(mp::process_stats(-1), mp::NoSuchProcess);
}

TEST_CASE("monitor: a zombie still exists and reads as state Z", "[monitor]") {
  pid_t pid = ::fork();
  REQUIRE(pid != -1);
  if (pid == 0) ::_exit(0);
  // Not reaped yet: wait until it has exited without reaping it (WNOWAIT).
  siginfo_t info{};
  REQUIRE(::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) == 0);
  mp::ProcessStats s = mp::process_stats(pid);
  CHECK(s.state == 'Z');
  CHECK(s.status() == "zombie");
  CHECK(s.cmdline.empty());
  CHECK(s.open_fds == 0);
  REQUIRE(::waitpid(pid, nullptr, 0) == pid);
}

TEST_CASE("monitor: children finds a child and a grandchild", "[monitor]") {
  mp::Queue<int> pids;
  mp::Event go;
  mp::Process child{mp::get_context("fork"), parent_of_one, pids, go};
  child.start();
  pid_t grandchild = pids.get(60s);

  auto direct = mp::children(child.pid());
  CHECK(std::find(direct.begin(), direct.end(), grandchild) != direct.end());
  auto mine = mp::children(::getpid());
  CHECK(std::find(mine.begin(), mine.end(), child.pid()) != mine.end());
  CHECK(std::find(mine.begin(), mine.end(), grandchild) == mine.end());  // not a direct child
  auto all = mp::children(::getpid(), true);
  auto at_child = std::find(all.begin(), all.end(), child.pid());
  auto at_grandchild = std::find(all.begin(), all.end(), grandchild);
  REQUIRE(at_child != all.end());
  REQUIRE(at_grandchild != all.end());
  CHECK(at_child < at_grandchild);  // parents come first
  CHECK(mp::process_stats(grandchild).ppid == child.pid());

  go.set();
  child.join();
  CHECK(child.exitcode() == 0);
}
