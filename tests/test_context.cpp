// tests/test_context.cpp - start methods: contexts, what spawn and forkserver can send,
// how they fail, and how the forkserver lives and dies.
#include <catch2/catch.hpp>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <csignal>
#include <map>
#include <mp/detail/child.hpp>
#include <mp/detail/pidfd.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <string>
#include <thread>
#include <vector>

#include "run.hpp"

using namespace std::chrono_literals;

namespace {

struct Point {
  std::string label;
  std::vector<double> xs;
  std::map<std::string, int> tags;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(label, xs, tags);
  }
};

struct Plain {  // trivially copyable: the memcpy path
  int a;
  double b;
  char c[8];
};

int check_values(std::string s, std::vector<std::string> words, Point p, Plain q,
                 std::vector<std::vector<int>> nested) {
  int bad = 0;
  bad += s != std::string(100'000, 'x');
  bad += words != std::vector<std::string>{"alpha", "", "gamma"};
  bad += p.label != "p" || p.xs != std::vector<double>{1.5, -2.25} || p.tags.at("k") != 7;
  bad += q.a != -5 || q.b != 0.125 || std::string(q.c) != "plain";
  bad += nested != std::vector<std::vector<int>>{{1}, {}, {2, 3}};
  return bad == 0 ? 0 : 10 + bad;
}

int crash() {
  std::signal(SIGSEGV, SIG_DFL);  // not a sanitizer's handler: die of the signal
  std::raise(SIGSEGV);
  return 0;
}
int add(int a, int b) { return a + b; }

// The children of this process in state Z (zombies), from /proc/<pid>/stat.
int zombie_children() {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    std::ifstream in(entry.path() / "stat");
    std::string line;
    if (!std::getline(in, line)) continue;
    auto close = line.rfind(')');  // the name may hold spaces and parentheses
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 1));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    n += ppid == ::getpid() && state == 'Z';
  }
  return n;
}

// Counts for ever in shared memory; says so once it has started.
void count_forever(mp::RawValue<std::uint64_t> n, mp::Event started) {
  ++n.value();
  started.set();
  for (;;) ++n.value();
}
pid_t server_pid_after_start(std::string method) {
  mp::Process p{mp::get_context(method), add, 1, 2};
  p.start();
  p.join();
  return mp::detail::forkserver_pid();
}

}  // namespace

TEST_CASE("context: the three start methods, by name", "[context]") {
  CHECK(mp::get_all_start_methods() == std::vector<std::string>{"fork", "spawn", "forkserver"});
  for (const auto& m : mp::get_all_start_methods()) CHECK(mp::get_context(m).start_method() == m);
  CHECK_THROWS_AS(mp::get_context("vfork"), std::invalid_argument);
  CHECK(mp::get_start_method() == "fork");
  mp::set_start_method("spawn");
  CHECK(mp::get_start_method() == "spawn");
  CHECK_THROWS_AS(mp::set_start_method("forkserver"), mp::ProcessError);
  mp::set_start_method("fork", true);
  CHECK(mp::get_start_method() == "fork");
}

TEST_CASE("context: arguments round-trip into spawn and forkserver children", "[context]") {
  auto method = GENERATE(as<std::string>{}, "spawn", "forkserver");
  INFO(method);
  Point p{"p", {1.5, -2.25}, {{"k", 7}}};
  Plain q{-5, 0.125, "plain"};
  mp::Process child{mp::get_context(method), check_values, std::string(100'000, 'x'),
                    std::vector<std::string>{"alpha", "", "gamma"}, p, q,
                    std::vector<std::vector<int>>{{1}, {}, {2, 3}}};
  child.start();
  child.join();
  CHECK(child.exitcode() == 0);
}

TEST_CASE("context: a captureless lambda is a portable target", "[context]") {
  auto method = GENERATE(as<std::string>{}, "fork", "spawn", "forkserver");
  INFO(method);
  mp::Process p{mp::get_context(method), [](int a, int b) { return a * b; }, 6, 7};
  p.start();
  p.join();
  CHECK(p.exitcode() == 42);
}

TEST_CASE("context: a capturing closure works under fork only", "[context]") {
  int base = 40;
  auto closure = [base](int x) { return base + x; };
  mp::Process forked{mp::get_context("fork"), closure, 2};
  forked.start();
  forked.join();
  CHECK(forked.exitcode() == 42);

  auto method = GENERATE(as<std::string>{}, "spawn", "forkserver");
  mp::Process p{mp::get_context(method), closure, 2};
  try {
    p.start();
    FAIL("start() accepted a capturing closure under " << method);
  } catch (const mp::ProcessError& e) {
    CHECK_THAT(e.what(), Catch::Contains(method) && Catch::Contains("captures"));
  }
  CHECK(p.pid() == 0);
}

TEST_CASE("context: a pointer or std::ref argument cannot go to a spawn child", "[context]") {
  int value = 1;
  mp::Process p{mp::get_context("spawn"), [](int* v) { return *v; }, &value};
  CHECK_THROWS_WITH(p.start(), Catch::Contains("cannot be serialized"));
}

TEST_CASE("context: a program that skips the spawn entry point gets a clear error, no fork bomb",
          "[context]") {
  auto r = testing::run({MP_TEST_PROGRAMS_DIR "/unguarded"}, 60s);
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 3);
  CHECK_THAT(r.out, Catch::Contains("parent error") && Catch::Contains("freeze_support"));
  // The child image ran main() and was refused: its output is in the same stdout.
  CHECK_THAT(r.out, Catch::Contains("child refused"));
  CHECK_THAT(r.out, !Catch::Contains("started:"));
}

TEST_CASE("context: the forkserver survives a child that crashes", "[context]") {
  mp::Process bad{mp::get_context("forkserver"), crash};
  bad.start();
  pid_t server = mp::detail::forkserver_pid();
  REQUIRE(server > 0);
  bad.join();
  CHECK(bad.exitcode() == -SIGSEGV);
  mp::Process good{mp::get_context("forkserver"), add, 40, 2};
  good.start();
  good.join();
  CHECK(good.exitcode() == 42);
  CHECK(mp::detail::forkserver_pid() == server);
}

TEST_CASE("context: no forkserver is left after its parent ends", "[context]") {
  // Orphans (the server of a SIGKILLed parent) come to this process, which reaps them.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  int report[2];
  REQUIRE(::pipe(report) == 0);
  bool kill_parent = GENERATE(false, true);
  INFO("parent SIGKILLed: " << kill_parent);
  // The middle process (forked) starts a forkserver child, reports the server's pid, and
  // either returns normally or waits to be killed.
  mp::Process middle{mp::get_context("fork"), [&] {
                       pid_t server = server_pid_after_start("forkserver");
                       if (::write(report[1], &server, sizeof server) != sizeof server) return 1;
                       if (kill_parent) ::pause();
                       return 0;
                     }};
  middle.start();
  pollfd p{report[0], POLLIN, 0};
  REQUIRE(::poll(&p, 1, 60'000) == 1);
  pid_t server = 0;
  REQUIRE(::read(report[0], &server, sizeof server) == sizeof server);
  REQUIRE(server > 0);
  int sfd = mp::detail::pidfd_open(server);
  if (kill_parent) {
    REQUIRE(sfd >= 0);  // still running while its parent waits
    middle.kill();
  }
  CHECK(middle.join(60s));
  if (sfd >= 0) {
    pollfd s{sfd, POLLIN, 0};
    CHECK(::poll(&s, 1, 60'000) == 1);  // the server ended
    ::close(sfd);
  }
  if (kill_parent) {
    siginfo_t info{};
    CHECK(::waitid(P_PID, static_cast<id_t>(server), &info, WEXITED) == 0);  // reap the orphan
  }
  CHECK((::kill(server, 0) == -1 && errno == ESRCH));
  ::close(report[0]);
  ::close(report[1]);
}

TEST_CASE("context: the forkserver runs its preload functions once, before any child",
          "[context]") {
  // The preload runs in the server; children forked from it inherit what it did. Here it
  // sets an environment variable the children can read.
  static auto preload = +[] { ::setenv("MP_TEST_PRELOADED", "yes", 1); };
  static auto child = +[] {
    const char* v = std::getenv("MP_TEST_PRELOADED");
    return v && std::string(v) == "yes" ? 0 : 9;
  };
  mp::detail::stop_forkserver();  // the preload applies to a server started from now on
  mp::set_forkserver_preload({preload});
  mp::Process p{mp::get_context("forkserver"), child};
  p.start();
  p.join();
  CHECK(p.exitcode() == 0);
  CHECK(std::getenv("MP_TEST_PRELOADED") == nullptr);  // not in the parent
  mp::set_forkserver_preload({});
  mp::detail::stop_forkserver();
}

namespace {
struct Handle {  // trivially copyable, but says how to serialize itself
  int fd;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(fd);
  }
};
}  // namespace

TEST_CASE("serialize: numbers and plain structs are copied as bytes; handles go through cereal",
          "[context][serialize]") {  STATIC_REQUIRE(mp::TriviallySerializable<int>);
  STATIC_REQUIRE(mp::TriviallySerializable<double>);
  STATIC_REQUIRE(mp::TriviallySerializable<Plain>);
  STATIC_REQUIRE(mp::TriviallySerializable<std::array<int, 4>>);
  STATIC_REQUIRE_FALSE(mp::TriviallySerializable<Handle>);
  STATIC_REQUIRE_FALSE(mp::TriviallySerializable<std::string>);
  CHECK(mp::dumps(42).size() == sizeof(int));  // no length prefix: the memcpy path
  CHECK(mp::dumps(Plain{1, 2.0, "x"}).size() == sizeof(Plain));
  auto [i, s, q] =
      mp::loads<int, std::string, Plain>(mp::dumps(7, std::string("seven"), Plain{7, 7.5, "p"}));
  CHECK(i == 7);
  CHECK(s == "seven");
  CHECK(q.b == 7.5);
  CHECK_THROWS_AS(mp::loads<int>(std::string(3, 'x')), mp::SerializationError);
  CHECK_THROWS_AS(mp::loads<int>(std::string(5, 'x')), mp::SerializationError);
}

TEST_CASE("context: a forkserver child has ended when join() returns after the server was "
          "SIGKILLed", "[context]") {
  // The server's descriptors close before its children receive their parent-death signal:
  // join() must wait for the child itself (its pidfd), not for the channel's end of file.
  // A counter that still moves after join() returned would mean the child ran on.
  for (int trial = 0; trial < 30; ++trial) {
    INFO("trial " << trial);
    mp::RawValue<std::uint64_t> n{0};
    mp::Event started;
    mp::Process p{mp::get_context("forkserver"), count_forever, n, started};
    p.start();
    REQUIRE(started.wait(60s));
    pid_t server = mp::detail::forkserver_pid();
    REQUIRE(server > 0);
    REQUIRE(::kill(server, SIGKILL) == 0);
    p.join();
    CHECK(p.exitcode() == -SIGKILL);
    std::uint64_t after_join = n.value();
    std::this_thread::sleep_for(5ms);
    CHECK(n.value() == after_join);  // dead means dead: nothing counts any more
    // join() noticed the server's death: the server has been reaped, not left a zombie.
    CHECK(zombie_children() == 0);
  }
  // The next forkserver start brings up a new server transparently.
  mp::Process good{mp::get_context("forkserver"), add, 40, 2};
  good.start();
  good.join();
  CHECK(good.exitcode() == 42);
}
