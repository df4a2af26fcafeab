// tests/test_process.cpp - mp::Process: exit codes, signals, timeouts, lifetime rules.
//
// Every case runs under each start method the build supports.
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <mp/detail/fork_gate.hpp>
#include <mp/detail/pidfd.hpp>
#include <mp/process.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

mp::Context any_context() {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  return mp::get_context(method);
}

// Targets are plain functions, so that every start method can run them.
void do_nothing() {}
int return_status(int s) { return s; }
void throw_runtime_error() { throw std::runtime_error("boom"); }
// The default action first: sanitizers install their own SIGSEGV handler, which would
// turn the signal into an exit status.
void raise_signal(int sig) {
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
int check_args(std::string s, std::vector<int> v, double d) {
  return s == "hello" && v == std::vector<int>{1, 2, 3} && d == 2.5 ? 7 : 1;
}
// parent_process() is the process that started the child. Under fork and spawn that is
// also the kernel's parent (getppid); a forkserver child's kernel parent is the server.
int check_identity(pid_t parent, std::string expected_name, bool kernel_parent_too) {
  auto p = mp::parent_process();
  if (!p || p->pid != parent) return 2;
  if (kernel_parent_too && ::getppid() != parent) return 5;
  if (mp::current_process().name != expected_name) return 3;
  if (mp::current_process().pid != ::getpid()) return 4;
  return 0;
}

// True when `pid` is gone for good: not our child any more, and reaped by whoever was its
// parent (a zombie still answers kill(pid, 0); forkserver children are the server's).
bool reaped(pid_t pid) {
  siginfo_t info{};
  bool not_ours =
      ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) == -1 && errno == ECHILD;
  return not_ours && ::kill(pid, 0) == -1 && errno == ESRCH;
}

// Waits (up to a generous hang guard) for a process that is not our child to be gone.
bool gone_within(int pidfd, std::chrono::seconds guard) {
  pollfd p{pidfd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(guard.count() * 1000)) == 1;
}

}  // namespace

TEST_CASE("process: a target that returns normally exits with 0", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, do_nothing};
  CHECK(p.pid() == 0);
  CHECK_FALSE(p.exitcode());
  p.start();
  CHECK(p.pid() > 0);
  CHECK(p.sentinel() >= 0);
  p.join();
  CHECK(p.exitcode() == 0);
  CHECK_FALSE(p.is_alive());
  CHECK(reaped(p.pid()));
}

TEST_CASE("process: an int result is the exit code", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, return_status, 42};
  p.start();
  p.join();
  CHECK(p.exitcode() == 42);
}

TEST_CASE("process: arguments are copied into the child", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, check_args, std::string("hello"), std::vector<int>{1, 2, 3}, 2.5};
  p.start();
  p.join();
  CHECK(p.exitcode() == 7);
}

TEST_CASE("process: a throwing target exits with 1", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, throw_runtime_error};
  p.start();
  p.join();
  CHECK(p.exitcode() == 1);
}

TEST_CASE("process: a signal gives a negative exit code", "[process]") {
  auto ctx = any_context();
  int sig = GENERATE(SIGKILL, SIGSEGV, SIGUSR1);
  mp::Process p{ctx, raise_signal, sig};
  p.start();
  p.join();
  CHECK(p.exitcode() == -sig);
}

TEST_CASE("process: join with a timeout returns false while the child runs", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, sleep_ms, 60'000};
  p.start();
  CHECK_FALSE(p.join(10ms));
  CHECK(p.is_alive());
  CHECK_FALSE(p.exitcode());
  SECTION("terminate ends it with -SIGTERM") {
    p.terminate();
    CHECK(p.join(60s));
    CHECK(p.exitcode() == -SIGTERM);
  }
  SECTION("kill ends it with -SIGKILL") {
    p.kill();
    CHECK(p.join(60s));
    CHECK(p.exitcode() == -SIGKILL);
  }
  CHECK(reaped(p.pid()));
}

TEST_CASE("process: terminate and kill after the end are harmless", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, do_nothing};
  p.start();
  p.join();
  CHECK_NOTHROW(p.terminate());
  CHECK_NOTHROW(p.kill());
  CHECK(p.exitcode() == 0);
}

TEST_CASE("process: the sentinel becomes readable when the child ends", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, sleep_ms, 50};
  p.start();
  CHECK(gone_within(p.sentinel(), 60s));
  p.join();
  CHECK(p.exitcode() == 0);
}

TEST_CASE("process: misuse is a ProcessError", "[process]") {
  auto ctx = any_context();
  mp::Process p{ctx, do_nothing};
  CHECK_THROWS_AS(p.join(), mp::ProcessError);
  p.start();
  CHECK_THROWS_AS(p.start(), mp::ProcessError);
  CHECK_THROWS_AS(p.set_name("late"), mp::ProcessError);
  CHECK_THROWS_AS(p.set_daemon(true), mp::ProcessError);
  p.join();
  CHECK_THROWS_AS(mp::Process{}.start(), mp::ProcessError);
}

TEST_CASE("process: start refuses when SIGCHLD is ignored", "[process]") {
  // The kernel would reap the child itself and join() could never learn its exit code.
  auto ctx = any_context();
  struct sigaction old {};
  REQUIRE(::sigaction(SIGCHLD, nullptr, &old) == 0);
  struct sigaction sa {};
  SECTION("SIG_IGN") { sa.sa_handler = SIG_IGN; }
  SECTION("SA_NOCLDWAIT") {
    sa.sa_handler = SIG_DFL;
    sa.sa_flags = SA_NOCLDWAIT;
  }
  REQUIRE(::sigaction(SIGCHLD, &sa, nullptr) == 0);
  mp::Process p{ctx, do_nothing};
  std::string what;
  try {
    p.start();
  } catch (const mp::ProcessError& e) {
    what = e.what();
  }
  REQUIRE(::sigaction(SIGCHLD, &old, nullptr) == 0);
  CHECK_THAT(what, Catch::Contains("SIGCHLD is ignored"));
  CHECK(p.pid() == 0);
}

TEST_CASE("process: names, current_process and parent_process", "[process]") {
  auto ctx = any_context();
  CHECK(mp::current_process().name == "MainProcess");
  CHECK(mp::current_process().pid == ::getpid());
  CHECK_FALSE(mp::parent_process());
  mp::Process p{ctx, check_identity, ::getpid(), std::string("worker-a"),
                ctx.start_method() != "forkserver"};
  CHECK_THAT(p.name(), Catch::StartsWith("Process-"));
  p.set_name("worker-a");
  p.start();
  p.join();
  CHECK(p.exitcode() == 0);
}

TEST_CASE("process: active_children lists running children only", "[process]") {
  auto ctx = any_context();
  mp::Process a{ctx, sleep_ms, 60'000};
  mp::Process b{ctx, do_nothing};
  a.start();
  b.start();
  b.join();
  auto kids = mp::active_children();
  REQUIRE(kids.size() == 1);
  CHECK(kids[0].pid == a.pid());
  a.kill();
  a.join();
  CHECK(mp::active_children().empty());
  CHECK(mp::cpu_count() >= 1);
}

TEST_CASE("process: join in one thread while another lists active_children", "[process]") {
  // Both reap: join() the child it waits for, active_children() every child that ended.
  // Exactly one of them may collect the status; the other must see the exit code, not
  // fail with ECHILD.
  auto ctx = any_context();
  std::atomic<bool> done{false};
  std::atomic<int> errors{0};
  std::string lister_error;  // Catch2 is not thread-safe: the lister records, the test reports
  std::thread lister([&] {
    while (!done.load()) {
      try {
        (void)mp::active_children();
      } catch (const std::exception& e) {
        if (errors.fetch_add(1) == 0) lister_error = e.what();
      }
    }
  });
  int joined = 0;
  for (int i = 0; i < 100; ++i) {
    mp::Process p{ctx, return_status, i % 7};
    p.start();
    try {
      p.join();
      if (p.exitcode() == i % 7) ++joined;
    } catch (const std::exception& e) {
      UNSCOPED_INFO("join: " << e.what());
      errors.fetch_add(1);
    }
  }
  done = true;
  lister.join();
  INFO("active_children: " << lister_error);
  CHECK(errors.load() == 0);
  CHECK(joined == 100);
}

namespace {
volatile sig_atomic_t g_interrupts = 0;
void on_signal(int) { g_interrupts = g_interrupts + 1; }
}  // namespace

TEST_CASE("process: join survives signals (EINTR is retried)", "[process]") {
  auto ctx = any_context();
  struct sigaction sa {};
  sa.sa_handler = on_signal;  // without SA_RESTART
  REQUIRE(::sigaction(SIGALRM, &sa, nullptr) == 0);
  itimerval it{};
  it.it_interval.tv_usec = 5'000;
  it.it_value.tv_usec = 5'000;
  REQUIRE(::setitimer(ITIMER_REAL, &it, nullptr) == 0);
  mp::Process p{ctx, sleep_ms, 200};
  p.start();
  SECTION("join()") { p.join(); }
  SECTION("join(timeout)") { CHECK(p.join(60s)); }
  it = {};
  ::setitimer(ITIMER_REAL, &it, nullptr);
  ::signal(SIGALRM, SIG_DFL);
  CHECK(p.exitcode() == 0);
}

TEST_CASE("process: destroying a Process never leaves a zombie", "[process]") {
  auto ctx = any_context();
  pid_t pid = 0;
  SECTION("a non-daemon child is joined") {
    {
      mp::Process p{ctx, return_status, 5};
      p.start();
      pid = p.pid();
    }
    CHECK(reaped(pid));
  }
  SECTION("a daemon child is terminated") {
    {
      mp::Process p{ctx, sleep_ms, 60'000};
      p.set_daemon(true);
      p.start();
      pid = p.pid();
    }
    CHECK(reaped(pid));
  }
  SECTION("a child destroyed during an exception is terminated") {
    try {
      mp::Process p{ctx, sleep_ms, 60'000};
      p.start();
      pid = p.pid();
      throw std::runtime_error("unwind");
    } catch (const std::runtime_error&) {
    }
    CHECK(reaped(pid));
  }
}

namespace {
// A descriptor passed to a child: spawn and forkserver children get their own copy of it
// through mp's descriptor channel (a plain int would name nothing there).
struct Fd {
  int fd = -1;
  template <class Archive>
  void save(Archive& ar) const {
    ar(mp::detail::export_fd(fd));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    ar(index);
    fd = mp::detail::import_fd(index);
  }
};

bool readable_within(int fd, std::chrono::seconds guard) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(guard.count() * 1000)) == 1;
}

// A middle process: starts a grandchild that sleeps, reports its pid on `report`, then
// waits for one byte on `go` before it returns (unless the test kills it first).
int middle(Fd report, Fd go, bool daemon) {
  mp::Process grandchild{sleep_ms, 60'000};
  grandchild.set_daemon(daemon);
  grandchild.start();
  pid_t pid = grandchild.pid();
  if (::write(report.fd, &pid, sizeof pid) != sizeof pid) return 10;
  char c;
  if (::read(go.fd, &c, 1) != 1) return 11;
  return 0;
}

struct Pipe {
  int fd[2] = {-1, -1};
  Pipe() { REQUIRE(::pipe(fd) == 0); }
  ~Pipe() {
    ::close(fd[0]);
    ::close(fd[1]);
  }
};
}  // namespace

TEST_CASE("process: children do not outlive their parent", "[process]") {
  auto ctx = any_context();
  // Orphans come to this test process instead of init, so that it can reap them.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  Pipe report, go;
  bool daemon = GENERATE(true, false);
  INFO("grandchild daemon: " << daemon);
  mp::Process mid{ctx, middle, Fd{report.fd[1]}, Fd{go.fd[0]}, daemon};
  mid.start();
  pid_t grandchild = 0;
  REQUIRE(readable_within(report.fd[0], 60s));
  REQUIRE(::read(report.fd[0], &grandchild, sizeof grandchild) == sizeof grandchild);
  int gfd = mp::detail::pidfd_open(grandchild);
  REQUIRE(gfd >= 0);

  if (daemon) {
    SECTION("a daemon grandchild is terminated when its parent returns") {
      REQUIRE(::write(go.fd[1], "g", 1) == 1);
      CHECK(mid.join(60s));
      CHECK(mid.exitcode() == 0);
      CHECK(gone_within(gfd, 60s));
    }
  }
  SECTION("any grandchild dies when its parent is SIGKILLed") {
    mid.kill();
    CHECK(mid.join(60s));
    CHECK(mid.exitcode() == -SIGKILL);
    CHECK(gone_within(gfd, 60s));
    siginfo_t info{};
    CHECK(::waitid(P_PID, static_cast<id_t>(grandchild), &info, WEXITED) == 0);
    CHECK(info.si_status == SIGKILL);
  }
  ::close(gfd);
}

TEST_CASE("process: a detached child may outlive its Process object", "[process]") {
  auto ctx = any_context();
  pid_t pid = 0;
  {
    mp::Process p{ctx, sleep_ms, 60'000};
    p.set_detached(true);
    p.start();
    pid = p.pid();
  }
  int fd = mp::detail::pidfd_open(pid);
  REQUIRE(fd >= 0);
  CHECK_FALSE(gone_within(fd, 0s));  // destroying the object did not end it
  REQUIRE(mp::detail::pidfd_send_signal(fd, SIGKILL) == 0);
  CHECK(gone_within(fd, 60s));
  ::close(fd);
  // mp still tracks it, and reaps it once it knows it has ended (a forkserver child's end
  // is known when the server reports it, a moment after the pidfd says so).
  auto guard = std::chrono::steady_clock::now() + 60s;
  while (!mp::active_children().empty() && std::chrono::steady_clock::now() < guard) {
    std::this_thread::sleep_for(1ms);
  }
  CHECK(mp::active_children().empty());
  CHECK(reaped(pid));
}

// The fork gate (mp/detail/fork_gate.hpp): a fork must not run while one of mp's background
// threads is inside a busy span (it may hold an allocator lock the child would inherit).
TEST_CASE("process: a fork waits until mp's busy threads reach a safe point", "[process]") {
  SECTION("a fork waits for an open span to close") {
    std::atomic<int> step{0};
    std::atomic<bool> opened{false};
    std::thread busy([&] {
      mp::detail::BusySpan span;
      opened = true;
      std::this_thread::sleep_for(50ms);  // long enough for the fork below to try
      step = 1;                           // the last thing done inside the span
    });
    while (!opened) std::this_thread::yield();
    int seen = -1;
    {
      mp::detail::ForkGuard gate;
      seen = step.load();  // must be 1: the span closed before the gate was given
    }
    busy.join();
    CHECK(seen == 1);
  }
  SECTION("a busy thread that checkpoints lets forks through, and the child starts processes") {
    std::atomic<bool> stop{false};
    std::atomic<long> steps{0};
    auto worker = mp::detail::start_busy_thread([&](mp::detail::BusySpan& span) {
      while (!stop) {
        span.checkpoint();
        std::vector<int> v(64);  // allocates inside the span, as the pool's service thread does
        steps += static_cast<long>(v.size() / 64);
      }
    });
    for (int i = 0; i < 20; ++i) {
      // Each child starts a grandchild of its own: the gate was reset in the fork child.
      mp::Process p{mp::get_context("fork"), [] {
        mp::Process q{mp::get_context("fork"), [] {}};
        q.start();
        q.join();
        return *q.exitcode();
      }};
      p.start();
      p.join();
      REQUIRE(p.exitcode() == 0);
    }
    stop = true;
    worker.join();
    CHECK(steps > 0);
  }
  SECTION("a thread inside a span may fork: its span is left for the fork") {
    mp::detail::BusySpan span;
    mp::Process p{mp::get_context("fork"), [] {}};
    p.start();  // would wait for its own span for ever if it were not left
    p.join();
    CHECK(p.exitcode() == 0);
    span.checkpoint();
  }
  SECTION("a fork under a guard the thread holds already does not wait for itself") {
    mp::detail::ForkGuard outer;
    mp::Process p{mp::get_context("fork"), [] {}};
    p.start();  // takes a nested guard
    p.join();
    CHECK(p.exitcode() == 0);
  }
}
