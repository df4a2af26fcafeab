// join_terminate.cpp - Exit codes, join with a timeout, terminate and kill, and zombies.
//
// exitcode() tells how a child ended: its exit status (0 after a normal return, the target's
// int result, 1 when the target threw) or minus the signal that killed it. A child that runs
// too long is stopped with terminate() (SIGTERM, which a program may ignore) or kill()
// (SIGKILL, which it cannot). A child that has ended stays a zombie until join() collects it.
//
// Usage: join_terminate [--timeout SECONDS] [--json]
//   $ build/0_basics/join_terminate --timeout 0.2
//
// Watch for: join(timeout) returning false while the child still runs; the child that
// ignores SIGTERM surviving terminate() but not kill(); state Z in /proc/<pid>/stat before
// join() and no trace of the child after it.
#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <mp/detail/fd.hpp>
#include <mp/process.hpp>
#include <optional>
#include <stdexcept>
#include <thread>

#include "lesson.hpp"

namespace {

// Targets. The sleeping ones are stopped long before they wake up.
void return_normally() {}
int return_answer() { return 42; }
void throw_error() { throw std::runtime_error("the target gave up"); }
void abort_like_a_failed_assert() {
  rlimit no_core{0, 0};
  ::setrlimit(RLIMIT_CORE, &no_core);  // no core file for a crash we asked for
  std::abort();
}
void sleep_long() { std::this_thread::sleep_for(std::chrono::seconds(30)); }
void ignore_sigterm_then_sleep(int ready_fd) {
  std::signal(SIGTERM, SIG_IGN);
  char byte = 1;  // tell the parent: SIGTERM is ignored from now on
  if (::write(ready_fd, &byte, 1) != 1) mp::throw_errno("write to the parent's pipe");
  sleep_long();
}

// The state letter (R running, S sleeping, Z zombie...) and start time of a process, read
// from /proc/<pid>/stat; std::nullopt when the kernel has no such process any more.
struct ProcStat {
  char state = '?';
  unsigned long long start_time = 0;
};
std::optional<ProcStat> read_proc_stat(pid_t pid) {
  std::string path = fmt::format("/proc/{}/stat", pid);
  mp::detail::UniqueFd fd{mp::detail::retry_eintr([&] { return ::open(path.c_str(), O_RDONLY); })};
  if (!fd && (errno == ENOENT || errno == ESRCH)) return std::nullopt;
  if (!fd) mp::throw_errno("open " + path);
  char buf[1024];
  ssize_t n = mp::detail::retry_eintr([&] { return ::read(fd.get(), buf, sizeof buf - 1); });
  if (n == -1 && errno == ESRCH) return std::nullopt;  // reaped between open and read
  if (n == -1) mp::throw_errno("read " + path);
  std::string line(buf, static_cast<std::size_t>(n));
  // Field 2, the name, is in parentheses and may contain spaces: parse after the last ')'.
  ProcStat s;
  std::size_t pos = line.rfind(')');
  if (pos == std::string::npos || std::sscanf(line.c_str() + pos + 1,
                                              " %c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s "
                                              "%*s %*s %*s %*s %*s %*s %*s %llu",
                                              &s.state, &s.start_time) != 2) {
    throw std::runtime_error("cannot parse " + path + ": unexpected format");
  }
  return s;
}

int run_to_end(mp::Process p) {
  p.start();
  p.join();
  return *p.exitcode();
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Exit codes, join with a timeout, terminate and kill, and zombies."};
  double timeout = 0.2;
  L.cli()
      .add_option("--timeout", timeout, "seconds join(timeout) waits for a child that runs on")
      ->check(CLI::Range(0.01, 10.0))
      ->capture_default_str();
  L.parse(argc, argv);
  // Every child here is forked, so this process is its parent and must reap it.
  const mp::Context fork = mp::get_context("fork");

  return L.run([&] {
    // Step 1: the exit code says how the target ended.
    L.step("exit codes");
    int normal = run_to_end(mp::Process{fork, return_normally});
    int answer = run_to_end(mp::Process{fork, return_answer});
    L.say("a target that throws: mp reports the exception on stderr and exits with 1");
    int thrown = run_to_end(mp::Process{fork, throw_error});
    int aborted = run_to_end(mp::Process{fork, abort_like_a_failed_assert});
    L.say("exit codes: normal return -> {}, return 42 -> {}, throw -> {}, abort() -> {} ({})",
          normal, answer, thrown, aborted, mp::describe_exitcode(aborted));

    // Step 2: join(timeout) gives up on a child that runs on; terminate() sends SIGTERM.
    L.step(fmt::format("join({}s) on a child that sleeps 30 s, then terminate()", timeout));
    mp::Process slow{fork, sleep_long};
    bool alive_before_start = slow.is_alive();
    slow.start();
    bool alive_after_start = slow.is_alive();
    auto t0 = std::chrono::steady_clock::now();
    bool ended_in_time = slow.join(mp::Seconds{timeout});
    L.say("join returned {} after {:.3f} s; is_alive() {} (before start: {})", ended_in_time,
          lesson::seconds_since(t0), slow.is_alive(), alive_before_start);
    slow.terminate();
    slow.join();
    bool alive_after_join = slow.is_alive();
    int terminated = *slow.exitcode();
    L.say("after terminate() and join(): exitcode {} ({}), is_alive() {}", terminated,
          mp::describe_exitcode(terminated), alive_after_join);

    // Step 3: kill() sends SIGKILL, which no process can catch, block or ignore.
    L.step("kill()");
    mp::Process doomed{fork, sleep_long};
    doomed.start();
    doomed.kill();
    doomed.join();
    int killed = *doomed.exitcode();
    L.say("exitcode {} ({})", killed, mp::describe_exitcode(killed));

    // Step 4: a child that ignores SIGTERM. A pipe tells us when it has set that up, so
    // terminate() cannot arrive before the child ignores it.
    L.step("a child that ignores SIGTERM");
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) == -1) mp::throw_errno("create a pipe");
    mp::detail::UniqueFd ready_r{fds[0]}, ready_w{fds[1]};
    mp::Process stubborn{fork, ignore_sigterm_then_sleep, ready_w.get()};
    stubborn.start();
    ready_w.reset();  // only the child holds the write end now: EOF if it dies first
    char byte = 0;
    ssize_t got = mp::detail::retry_eintr([&] { return ::read(ready_r.get(), &byte, 1); });
    if (got == -1) mp::throw_errno("read from the child's pipe");
    if (got == 0) throw std::runtime_error("cannot watch the stubborn child: it ended early");
    stubborn.terminate();
    bool stubborn_ended = stubborn.join(mp::Seconds{timeout});
    bool stubborn_alive = stubborn.is_alive();
    L.say("after terminate(): join({}s) returned {}, is_alive() {}", timeout, stubborn_ended,
          stubborn_alive);
    stubborn.kill();
    stubborn.join();
    int stubborn_code = *stubborn.exitcode();
    L.say("after kill(): exitcode {} ({})", stubborn_code, mp::describe_exitcode(stubborn_code));

    // Step 5: zombies. Wait on the sentinel, which tells us the child ended without
    // collecting it (is_alive() and exitcode() would collect it, as in Python).
    L.step("a zombie, and join() reaping it");
    mp::Process quick{fork, return_normally};
    quick.start();
    pid_t pid = quick.pid();
    pollfd pfd{quick.sentinel(), POLLIN, 0};
    if (mp::detail::retry_eintr([&] { return ::poll(&pfd, 1, -1); }) == -1) {
      mp::throw_errno("poll the sentinel");
    }
    std::optional<ProcStat> before = read_proc_stat(pid);
    char state_before = before ? before->state : '-';
    L.say("child {} has ended; /proc/{}/stat shows state {} (Z: a zombie)", pid, pid, state_before);
    quick.join();
    siginfo_t info{};
    bool echild =
        ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) == -1 && errno == ECHILD;
    std::optional<ProcStat> after = read_proc_stat(pid);
    // A different start time would mean the pid was reused by a new process.
    bool proc_gone = !after || (before && after->start_time != before->start_time);
    L.say("after join(): /proc/{} {}; waitid says {}", pid, proc_gone ? "is gone" : "still there",
          echild ? "ECHILD (not our child any more)" : "it is still our child");

    L.fact("exitcode_normal", normal);
    L.fact("exitcode_int_result", answer);
    L.fact("exitcode_throw", thrown);
    L.fact("exitcode_abort", aborted);
    L.fact("is_alive_before_start", alive_before_start);
    L.fact("is_alive_after_start", alive_after_start);
    L.fact("join_timeout_returned", ended_in_time);
    L.fact("exitcode_terminate", terminated);
    L.fact("is_alive_after_join", alive_after_join);
    L.fact("exitcode_kill", killed);
    L.fact("sigterm_ignored_alive_after_terminate", stubborn_alive && !stubborn_ended);
    L.fact("exitcode_sigterm_ignored_then_kill", stubborn_code);
    L.fact("zombie_state_seen", std::string(1, state_before));
    L.fact("reaped_after_join", echild);
    L.fact("proc_entry_gone_after_join", proc_gone);
    return normal == 0 && answer == 42 && thrown == 1 && aborted == -SIGABRT &&
           !alive_before_start && alive_after_start && !ended_in_time && terminated == -SIGTERM &&
           !alive_after_join && killed == -SIGKILL && stubborn_alive && !stubborn_ended &&
           stubborn_code == -SIGKILL && state_before == 'Z' && echild && proc_gone;
  });
}
