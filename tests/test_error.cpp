// tests/test_error.cpp - the error module: wording, types, EINTR retry.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <mp/error.hpp>

TEST_CASE("error: system_error says what could not be done, with errno", "[error]") {
  errno = 0;
  int fd = ::open("/nonexistent/mp-test", O_RDONLY);
  REQUIRE(fd == -1);
  try {
    mp::throw_errno("open /nonexistent/mp-test");
    FAIL("throw_errno returned");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == ENOENT);
    CHECK_THAT(e.what(), Catch::StartsWith("cannot open /nonexistent/mp-test: "));
    CHECK_THAT(e.what(), Catch::Contains("No such file"));
  }
}

TEST_CASE("error: signal names and exit code descriptions", "[error]") {
  CHECK(mp::signal_name(SIGKILL) == "SIGKILL");
  CHECK(mp::signal_name(SIGSEGV) == "SIGSEGV");
  CHECK(mp::describe_exitcode(0) == "exited with status 0");
  CHECK(mp::describe_exitcode(-SIGTERM) == "killed by SIGTERM");
}

TEST_CASE("error: typed errors carry their facts", "[error]") {
  SECTION("RemoteError") {
    mp::RemoteError e("std::out_of_range", "index 7", 1234);
    CHECK(e.type_name() == "std::out_of_range");
    CHECK(e.message() == "index 7");
    CHECK(e.pid() == 1234);
    CHECK_THAT(e.what(), Catch::Contains("std::out_of_range") && Catch::Contains("1234") &&
                             Catch::Contains("index 7"));
  }
  SECTION("WorkerLostError by signal") {
    mp::WorkerLostError e(99, SIGKILL, 0, "task 5");
    CHECK(e.pid() == 99);
    CHECK(e.signal() == SIGKILL);
    CHECK_THAT(e.what(), Catch::Contains("SIGKILL") && Catch::Contains("task 5"));
  }
  SECTION("WorkerLostError by exit status") {
    mp::WorkerLostError e(99, 0, 3, "task 6");
    CHECK(e.exit_status() == 3);
    CHECK_THAT(e.what(), Catch::Contains("status 3"));
  }
  SECTION("the Python-named errors are distinct types") {
    CHECK_THROWS_AS(throw mp::TimeoutError("t"), mp::TimeoutError);
    CHECK_THROWS_AS(throw mp::BrokenBarrierError("b"), mp::BrokenBarrierError);
    CHECK_THROWS_AS(throw mp::AuthenticationError("a"), mp::AuthenticationError);
  }
}

namespace {
volatile sig_atomic_t g_alarms = 0;
void on_alarm(int) { g_alarms = g_alarms + 1; }
}  // namespace

TEST_CASE("error: retry_eintr retries a call interrupted by a signal", "[error]") {
  struct sigaction sa {};
  sa.sa_handler = on_alarm;  // no SA_RESTART: read() fails with EINTR
  REQUIRE(::sigaction(SIGALRM, &sa, nullptr) == 0);
  int p[2];
  REQUIRE(::pipe(p) == 0);
  // The alarm interrupts read(); a writer child fills the pipe afterwards.
  itimerval it{};
  it.it_value.tv_usec = 50'000;
  REQUIRE(::setitimer(ITIMER_REAL, &it, nullptr) == 0);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::usleep(300'000);
    (void)!::write(p[1], "x", 1);
    ::_exit(0);
  }
  char c = 0;
  ssize_t n = mp::detail::retry_eintr([&] { return ::read(p[0], &c, 1); });
  CHECK(n == 1);
  CHECK(c == 'x');
  CHECK(g_alarms >= 1);
  ::waitpid(child, nullptr, 0);
  ::close(p[0]);
  ::close(p[1]);
  ::signal(SIGALRM, SIG_DFL);
}
