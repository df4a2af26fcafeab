// daemon_process.cpp - Python's daemon flag against a real Unix daemon (double fork, setsid, pidfile), and what each leaves behind.
//
// Two things share the word "daemon" and mean nearly opposite things:
//   - mp::Process::set_daemon(true), Python's daemon=True: "this child is a helper of its
//     parent; when the parent exits, terminate it". It never outlives its parent. A child
//     that is not a daemon is joined instead: the parent's exit waits for it (Python's
//     _exit_function; mp does the same at the end of main and at the end of a child's
//     target, see run_child_and_exit in mp/src/process.cpp). mp adds a third rule Python
//     does not have: every child gets PR_SET_PDEATHSIG(SIGKILL), so even a parent killed
//     with SIGKILL (no exit code runs) takes its children along instead of orphaning them.
//   - a Unix daemon (daemon(7), Stevens' APUE ch. 13): a process meant to outlive whoever
//     started it. fork, setsid() (a new session: no controlling terminal), fork again (the
//     daemon is not a session leader, so opening a terminal can never make it its
//     controlling one), the middle process exits (the daemon is reparented), umask(0),
//     chdir("/") (it holds no mount busy), every descriptor closed and 0, 1, 2 on
//     /dev/null, the signals reset, and a pidfile taken with an exclusive lock (flock), so
//     that a second copy refuses to start and `kill $(cat pidfile)` finds it.
// An orphan goes to the nearest "child subreaper" above it, or to pid 1. This lesson makes
// itself a subreaper (PR_SET_CHILD_SUBREAPER), as a service manager does, so that the
// orphans it creates are adopted - and reaped - by it: nothing is left as a zombie, whatever
// pid 1 does about orphans.
//
// Part 1 starts a middle process that starts a daemon=true child and returns; part 2 the
// same with a non-daemon child; part 3 SIGKILLs a middle process; part 4 starts a real
// daemon, checks it from the outside (/proc), starts a second copy that must refuse, then
// stops the daemon through its pidfile and waits until it is gone.
//
// Usage: daemon_process [--pidfile PATH] [--work-ms N] [--json]
//   $ build/5_advanced/daemon_process
//
// Watch for: the daemon=true grandchild is gone (kill(pid, 0) fails with ESRCH: not even a
// zombie) as soon as the middle process has exited; the non-daemon one had finished its
// work before the middle process could exit; the real daemon's ppid is not its starter's,
// its sid is the pid of the vanished session leader (not its own pid: it is not a session
// leader), its tty is 0; the second copy exits 3; no child of the lesson is left at the end.
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mp/error.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

// ---- parts 1 to 3: mp's daemon flag

// What the middle process and its child report, in shared memory.
struct Family {
  std::int32_t grandchild_pid;
  std::int32_t grandchild_ready;     // the child's SIGTERM handler is installed
  std::int32_t grandchild_sigterm;   // the child received SIGTERM
  std::int32_t grandchild_finished;  // the child finished its work and returned
};

std::atomic_ref<std::int32_t> cell(std::int32_t& x) { return std::atomic_ref<std::int32_t>(x); }

Family* g_family = nullptr;  // in the grandchild: for its SIGTERM handler

void on_sigterm(int) {
  cell(g_family->grandchild_sigterm).store(1);  // lock-free: async-signal-safe
  ::signal(SIGTERM, SIG_DFL);                   // then end as SIGTERM ends a process
  ::raise(SIGTERM);
}

// The grandchild: works `work_ms` (in slices), records that it finished, returns.
void grandchild(mp::RawValue<Family> fam, int work_ms) {
  g_family = &fam.value();
  struct sigaction sa {};
  sa.sa_handler = on_sigterm;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(SIGTERM, &sa, nullptr) == -1) mp::throw_errno("install the SIGTERM handler");
  cell(fam.value().grandchild_ready).store(1);
  auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(work_ms);
  while (std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(5ms);
  cell(fam.value().grandchild_finished).store(1);
}

// Waits until pred() holds; throws after 10 s (a hang guard, not a timing claim).
template <class Pred>
void wait_for(Pred pred, const char* what) {
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error(fmt::format("cannot wait any longer for {}", what));
    std::this_thread::sleep_for(1ms);
  }
}

// The middle process: starts the grandchild and returns at once, or (hang) never returns.
// The Process lives in a static that is never destroyed (a child ends with std::_Exit), so
// what happens to the grandchild is decided by mp's exit rule alone: daemons terminated,
// the others joined.
int middle(mp::RawValue<Family> fam, bool daemon, int work_ms, bool hang) {
  static std::optional<mp::Process> child;
  child.emplace(grandchild, fam, work_ms);
  child->set_name(daemon ? "daemon-child" : "plain-child");
  child->set_daemon(daemon);
  child->start();
  cell(fam.value().grandchild_pid).store(child->pid());
  wait_for([&] { return cell(fam.value().grandchild_ready).load() == 1; }, "the grandchild");
  if (hang) {
    for (;;) std::this_thread::sleep_for(1s);
  }
  return 0;  // the exit rule runs now
}

// A pid that no longer exists at all: kill(pid, 0) succeeds on a zombie, so ESRCH also
// means "no zombie".
bool gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

struct MiddleRun {
  pid_t middle = 0;
  pid_t grandchild = 0;
  int middle_exitcode = 0;
  double middle_seconds = 0;
  bool sigterm = false;
  bool finished = false;  // read the moment the middle process was joined
  bool gone = false;
};

MiddleRun run_middle(bool daemon, int work_ms) {
  mp::RawValue<Family> fam{Family{}};
  mp::Process m{middle, fam, daemon, work_ms, false};
  m.set_name("middle");
  auto t0 = std::chrono::steady_clock::now();
  m.start();
  m.join();
  MiddleRun r;
  r.middle_seconds = lesson::seconds_since(t0);
  r.finished = cell(fam.value().grandchild_finished).load() == 1;
  r.sigterm = cell(fam.value().grandchild_sigterm).load() == 1;
  r.middle = m.pid();
  r.middle_exitcode = *m.exitcode();
  r.grandchild = fam.value().grandchild_pid;
  r.gone = gone(r.grandchild);
  return r;
}

// ---- part 4: a Unix daemon

// What the session leader (the first fork) reports before it exits.
struct Handoff {
  std::int32_t leader_pid;
  std::int32_t leader_sid;  // getsid(0) right after setsid()
  std::int32_t daemon_pid;
};

// Status bytes the daemon sends its starter once it is ready, or why it is not.
enum : unsigned char { kReady = 0, kAlreadyRunning = 3, kSetupFailed = 4 };
constexpr int kLifetimeSeconds = 30;  // a safety: a daemon nobody stops ends by itself

// The daemon proper. Runs in the grandchild of the starter; never returns. Only plain
// system calls here: it is a fork copy, and everything it reports travels in the status
// byte or lives in its pidfile.
[[noreturn]] void daemon_main(const char* pidfile, int notify) {
  auto fail = [&](unsigned char code) {
    (void)!::write(notify, &code, 1);
    ::_exit(code);
  };
  // Signals: default actions, an empty mask, then SIGTERM blocked for sigtimedwait below
  // (blocked before the pidfile exists, so a SIGTERM sent as soon as it is read waits).
  for (int s = 1; s < NSIG; ++s) ::signal(s, SIG_DFL);  // SIGKILL/SIGSTOP fail: harmless
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  if (::sigprocmask(SIG_SETMASK, &term, nullptr) == -1) fail(kSetupFailed);
  ::umask(0);  // the modes given to open() and mkdir() are the modes the files get
  if (::chdir("/") == -1) fail(kSetupFailed);
  // Every descriptor but the notify pipe closed; 0, 1 and 2 on /dev/null.
  if (notify > 0 && ::close_range(0, static_cast<unsigned>(notify) - 1, 0) == -1)
    fail(kSetupFailed);
  if (::close_range(static_cast<unsigned>(notify) + 1, ~0U, 0) == -1) fail(kSetupFailed);
  int null = ::open("/dev/null", O_RDWR);
  if (null != 0) fail(kSetupFailed);
  if (::dup2(0, 1) == -1 || ::dup2(0, 2) == -1) fail(kSetupFailed);
  // The pidfile: open without truncating, lock, and only then write. A second copy finds
  // the lock taken and leaves the file as it is.
  int fd = ::open(pidfile, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd == -1) fail(kSetupFailed);
  if (::flock(fd, LOCK_EX | LOCK_NB) == -1)
    fail(errno == EWOULDBLOCK ? kAlreadyRunning : kSetupFailed);
  char text[32];
  int n = std::snprintf(text, sizeof text, "%d\n", static_cast<int>(::getpid()));
  if (::ftruncate(fd, 0) == -1 || ::pwrite(fd, text, static_cast<std::size_t>(n), 0) != n)
    fail(kSetupFailed);
  unsigned char ok = kReady;
  if (::write(notify, &ok, 1) != 1) ::_exit(kSetupFailed);
  ::close(notify);  // the starter reads to end of file: it knows this descriptor is gone
  // Serve: here, wait for SIGTERM. Then remove the pidfile (while still holding the lock,
  // so no new copy can take a file that is about to vanish) and leave.
  timespec lifetime{kLifetimeSeconds, 0};
  siginfo_t info;
  int sig = ::sigtimedwait(&term, &info, &lifetime);
  // Nobody can hear a daemon's complaint (stderr is /dev/null): the exit status says it.
  // 0 stopped by SIGTERM and cleaned up, 5 its lifetime ran out, 6 the pidfile stayed.
  bool removed = ::unlink(pidfile) == 0;
  ::close(fd);
  ::_exit(!removed ? 6 : sig == SIGTERM ? 0 : 5);
}

// Waits for a child of this process (one mp did not start) and returns its wait status.
int wait_child(pid_t pid) {
  // waitpid(0) or waitpid(-1) would take any child: never let a missing pid get that far.
  if (pid <= 0) throw std::logic_error(fmt::format("cannot wait for process {}", pid));
  int status = 0;
  if (mp::detail::retry_eintr([&] { return ::waitpid(pid, &status, 0); }) == -1)
    mp::throw_errno(fmt::format("wait for process {}", pid));
  return status;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("killed by {}", mp::signal_name(WTERMSIG(status)));
  return fmt::format("wait status {:#x}", status);
}

// The starter: an ordinary child of the lesson (an mp::Process) that turns into nothing:
// it forks the session leader, which forks the daemon and exits. Returns the daemon's
// status byte: 0 ready, 3 already running, 4 set-up failed.
int starter(std::string pidfile, mp::RawValue<Handoff> h) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) == -1) mp::throw_errno("create the readiness pipe");
  pid_t leader = ::fork();
  if (leader == -1) mp::throw_errno("fork the session leader");
  if (leader == 0) {
    ::close(p[0]);
    if (::setsid() == -1) ::_exit(kSetupFailed);  // new session and process group, no tty
    h.value().leader_pid = ::getpid();
    h.value().leader_sid = ::getsid(0);
    pid_t d = ::fork();
    if (d == -1) ::_exit(kSetupFailed);
    if (d == 0) daemon_main(pidfile.c_str(), p[1]);
    h.value().daemon_pid = d;
    ::_exit(0);  // the leader leaves: the daemon is an orphan in a session without a leader
  }
  ::close(p[1]);
  int status = wait_child(leader);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    ::close(p[0]);
    return kSetupFailed;
  }
  unsigned char byte = kSetupFailed;
  bool got = false;
  for (;;) {  // the status byte, then end of file (the daemon closed its end)
    unsigned char b;
    ssize_t r = ::read(p[0], &b, 1);
    if (r == -1 && errno == EINTR) continue;
    if (r == -1) mp::throw_errno("read the readiness pipe");
    if (r == 0) break;
    if (!got) byte = b, got = true;
  }
  ::close(p[0]);
  return byte;
}

// ---- looking at a process from the outside, as ps does

struct Stat {
  char state = '?';
  pid_t ppid = 0, pgrp = 0, sid = 0;
  int tty_nr = -1;  // 0: no controlling terminal
};

Stat read_stat(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!std::getline(in, line))
    throw std::runtime_error(fmt::format("cannot read /proc/{}/stat", pid));
  // "pid (comm) state ppid pgrp session tty_nr ...": comm may hold spaces and ')'.
  auto close = line.rfind(')');
  if (close == std::string::npos)
    throw std::runtime_error(fmt::format("cannot parse /proc/{}/stat", pid));
  std::istringstream rest(line.substr(close + 1));
  Stat s;
  rest >> s.state >> s.ppid >> s.pgrp >> s.sid >> s.tty_nr;
  if (!rest) throw std::runtime_error(fmt::format("cannot parse /proc/{}/stat", pid));
  return s;
}

std::string read_link(const std::string& path) {
  std::error_code ec;
  auto target = fs::read_symlink(path, ec);
  if (ec) throw std::runtime_error(fmt::format("cannot read the link {}: {}", path, ec.message()));
  return target.string();
}

std::string umask_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Umask:", 0) == 0) {
      auto v = line.substr(6);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    }
  }
  throw std::runtime_error(fmt::format("cannot read the umask of process {}", pid));
}

std::map<int, std::string> fds_of(pid_t pid) {
  std::map<int, std::string> fds;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(fmt::format("/proc/{}/fd", pid), ec)) {
    fds[std::stoi(e.path().filename().string())] = read_link(e.path().string());
  }
  if (ec) throw std::runtime_error(fmt::format("cannot list /proc/{}/fd: {}", pid, ec.message()));
  return fds;
}

std::optional<pid_t> read_pidfile(const fs::path& path) {
  std::ifstream in(path);
  long pid = 0;
  if (!(in >> pid) || pid <= 0) return std::nullopt;
  return static_cast<pid_t>(pid);
}

// A daemon this process adopted and has not reaped yet: SIGKILLed and reaped if the lesson
// fails half way, so that even a failed run leaves nothing behind.
struct AdoptedGuard {
  pid_t pid = 0;
  ~AdoptedGuard() {
    if (pid > 0 && ::kill(pid, SIGKILL) == 0) ::waitpid(pid, nullptr, 0);
  }
};

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Python's daemon flag against a real Unix daemon (double fork, setsid, "
                   "pidfile), and what each leaves behind."};
  std::string pidfile_arg;
  int work_ms = 150;
  L.cli().add_option("--pidfile", pidfile_arg,
                     "the real daemon's pidfile (default: a file in the temporary directory)");
  L.cli()
      .add_option("--work-ms", work_ms, "how long the non-daemon grandchild works")
      ->check(CLI::Range(10, 5000))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    const pid_t me = ::getpid();
    // Orphans of our descendants come to us, not to pid 1: we can reap them.
    if (::prctl(PR_SET_CHILD_SUBREAPER, 1) == -1) mp::throw_errno("become a child subreaper");
    L.say("lesson: pid {}, session {}; a child subreaper from now on", me, ::getsid(0));
    std::vector<pid_t> everyone;  // every process the lesson caused, checked at the end

    // Part 1: a daemon=true child, started by a middle process that then returns.
    L.step("part 1: mp daemon=true - terminated when its parent exits");
    MiddleRun d = run_middle(true, 10'000);  // it would work 10 s: it is not allowed to
    everyone.insert(everyone.end(), {d.middle, d.grandchild});
    L.say("middle {} started daemon child {} and returned; it exited with {} after {:.3f} s",
          d.middle, d.grandchild, d.middle_exitcode, d.middle_seconds);
    L.say("the daemon child: got SIGTERM {}, finished its work {}, gone (ESRCH, no zombie) {}",
          d.sigterm, d.finished, d.gone);

    // Part 2: the same with a child that is not a daemon: the parent's exit joins it.
    L.step("part 2: mp daemon=false - joined by its parent at exit");
    MiddleRun p = run_middle(false, work_ms);
    everyone.insert(everyone.end(), {p.middle, p.grandchild});
    L.say("middle {} started child {} ({} ms of work) and returned; it exited after {:.3f} s",
          p.middle, p.grandchild, work_ms, p.middle_seconds);
    L.say(
        "the child had finished its work when the middle process ended: {}; got SIGTERM {}; "
        "gone {}",
        p.finished, p.sigterm, p.gone);

    // Part 3: the middle process is SIGKILLed: no exit code runs in it. In Python the child
    // would be orphaned; mp's parent-death signal kills it. We adopted it, so we reap it.
    L.step("part 3: the parent SIGKILLed - PR_SET_PDEATHSIG takes the child along");
    mp::RawValue<Family> fam{Family{}};
    mp::Process m{middle, fam, false, 10'000, true};
    m.set_name("middle");
    m.start();
    // Both: the grandchild may be ready before the middle process has stored its pid.
    wait_for(
        [&] {
          return cell(fam.value().grandchild_ready).load() == 1 &&
                 cell(fam.value().grandchild_pid).load() != 0;
        },
        "the grandchild and its pid");
    pid_t orphan = cell(fam.value().grandchild_pid).load();
    m.kill();
    m.join();
    int orphan_status = wait_child(orphan);  // ours now: the kernel reparented it to us
    bool orphan_killed = WIFSIGNALED(orphan_status) && WTERMSIG(orphan_status) == SIGKILL;
    everyone.insert(everyone.end(), {m.pid(), orphan});
    L.say("middle {} ended: {}; its child {} was adopted by us and {}", m.pid(),
          mp::describe_exitcode(*m.exitcode()), orphan, describe_status(orphan_status));

    // Part 4: a real daemon. The starter forks a session leader, which forks the daemon.
    L.step("part 4: a Unix daemon - double fork, setsid, pidfile");
    fs::path pidfile = pidfile_arg.empty()
                           ? fs::temp_directory_path() / fmt::format("mp-daemon_process-{}.pid", me)
                           : fs::absolute(pidfile_arg);  // the daemon will chdir("/")
    AdoptedGuard guard;
    mp::RawValue<Handoff> h{Handoff{}};
    mp::Process s{starter, pidfile.string(), h};
    s.set_name("starter");
    s.start();
    s.join();
    pid_t starter_pid = s.pid();
    pid_t leader = h.value().leader_pid;
    pid_t dpid = h.value().daemon_pid;
    guard.pid = dpid;
    everyone.insert(everyone.end(), {starter_pid, leader, dpid});
    if (*s.exitcode() != kReady)
      throw std::runtime_error(fmt::format("cannot start the daemon: the starter reported {}",
                                           mp::describe_exitcode(*s.exitcode())));
    auto from_file = read_pidfile(pidfile);
    Stat st = read_stat(dpid);
    std::string cwd = read_link(fmt::format("/proc/{}/cwd", dpid));
    std::string umask = umask_of(dpid);
    auto fds = fds_of(dpid);
    int on_null = 0;
    for (const auto& [fd, target] : fds) on_null += fd <= 2 && target == "/dev/null";
    bool starter_gone = gone(starter_pid);
    bool leader_gone = gone(leader);
    bool alive = ::kill(dpid, 0) == 0;
    L.say("starter {} exited 0 (the daemon said it was ready) and is gone: {}", starter_pid,
          starter_gone);
    L.say("session leader {}: its sid right after setsid() was {} (its own pid); gone: {}", leader,
          h.value().leader_sid, leader_gone);
    L.say("daemon {} (pidfile {} says {}): alive {}", dpid, pidfile.string(),
          from_file ? std::to_string(*from_file) : "nothing", alive);
    L.say("  ppid {} ({}), pgrp {}, sid {} ({}), tty_nr {} ({})", st.ppid,
          st.ppid == me ? "us, the subreaper; not the starter" : "not us", st.pgrp, st.sid,
          st.sid == leader ? "the vanished leader's pid, not its own" : "?", st.tty_nr,
          st.tty_nr == 0 ? "no controlling terminal" : "a terminal!");
    L.say("  cwd {}, umask {}, descriptors:", cwd, umask);
    for (const auto& [fd, target] : fds) L.say("    {} -> {}", fd, target);

    // A second copy with the same pidfile must refuse: the lock is taken.
    mp::RawValue<Handoff> h2{Handoff{}};
    mp::Process s2{starter, pidfile.string(), h2};
    s2.set_name("starter-2");
    s2.start();
    s2.join();
    int second_status = wait_child(h2.value().daemon_pid);  // adopted by us, like the first
    everyone.insert(everyone.end(), {s2.pid(), h2.value().leader_pid, h2.value().daemon_pid});
    bool second_refused = *s2.exitcode() == kAlreadyRunning && WIFEXITED(second_status) &&
                          WEXITSTATUS(second_status) == kAlreadyRunning;
    auto still = read_pidfile(pidfile);
    L.say(
        "a second copy: its starter reported {}, the copy {} - refused: {}; the pidfile still "
        "says {}",
        mp::describe_exitcode(*s2.exitcode()), describe_status(second_status), second_refused,
        still ? std::to_string(*still) : "nothing");

    // Stop it the way an init script does: the pid from the pidfile, SIGTERM, wait until it
    // is gone. A pidfd names this very process, even if the pid were reused meanwhile.
    L.step("stop the daemon through its pidfile");
    if (!still) throw std::runtime_error("cannot stop the daemon: its pidfile holds no pid");
    // (glibc 2.36's <sys/pidfd.h> lacks extern "C" for C++: the system calls directly)
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, *still, 0));
    if (pidfd == -1) mp::throw_errno(fmt::format("open a pidfd for process {}", *still));
    if (::syscall(SYS_pidfd_send_signal, pidfd, SIGTERM, nullptr, 0) == -1) {
      int err = errno;
      ::close(pidfd);
      throw mp::system_error(err, fmt::format("send SIGTERM to process {}", *still));
    }
    auto t0 = std::chrono::steady_clock::now();
    pollfd pfd{pidfd, POLLIN, 0};
    int ready = mp::detail::retry_eintr([&] { return ::poll(&pfd, 1, 10'000); });
    ::close(pidfd);
    if (ready == -1) mp::throw_errno("wait on the daemon's pidfd");
    if (ready == 0) throw std::runtime_error("cannot stop the daemon: still alive after 10 s");
    int daemon_status = wait_child(*still);  // its parent is us: we reap it
    guard.pid = 0;
    double stop_secs = lesson::seconds_since(t0);
    bool removed_by_daemon = !fs::exists(pidfile);
    if (!removed_by_daemon) fs::remove(pidfile);  // a daemon that died without cleaning up
    L.say("daemon {} {} {:.3f} s after SIGTERM; the pidfile was removed by {}", *still,
          describe_status(daemon_status), stop_secs, removed_by_daemon ? "the daemon" : "us");

    // Nothing is left: every process is gone, and we have no child at all, not a zombie.
    L.step("what is left");
    std::vector<pid_t> left;
    for (pid_t pid : everyone) {
      if (pid <= 0) throw std::logic_error("a pid of 0 or less would name a process group");
      if (!gone(pid)) left.push_back(pid);
    }
    int left_running = static_cast<int>(left.size());
    siginfo_t info{};
    bool no_children =
        ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == -1 && errno == ECHILD;
    bool pidfile_left = fs::exists(pidfile);
    L.say("{} processes created, {} still exist; children of the lesson left: {}; pidfile left: {}",
          everyone.size(), left_running, no_children ? "none" : "some", pidfile_left);

    L.fact("daemon_flag", nlohmann::json{{"middle_exitcode", d.middle_exitcode},
                                         {"child_got_sigterm", d.sigterm},
                                         {"child_finished", d.finished},
                                         {"child_gone", d.gone},
                                         {"middle_seconds", d.middle_seconds}});
    L.fact("plain_child", nlohmann::json{{"middle_exitcode", p.middle_exitcode},
                                         {"child_got_sigterm", p.sigterm},
                                         {"child_finished", p.finished},
                                         {"child_gone", p.gone},
                                         {"work_ms", work_ms},
                                         {"middle_seconds", p.middle_seconds}});
    L.fact("parent_sigkilled", nlohmann::json{{"middle_exitcode", *m.exitcode()},
                                              {"child_killed_by_sigkill", orphan_killed}});
    L.fact("unix_daemon", nlohmann::json{{"starter_exitcode", *s.exitcode()},
                                         {"starter_gone", starter_gone},
                                         {"leader_gone", leader_gone},
                                         {"leader_sid_is_own_pid", h.value().leader_sid == leader},
                                         {"alive_after_starter", alive},
                                         {"pidfile_pid_is_daemon", from_file && *from_file == dpid},
                                         {"ppid_is_starter", st.ppid == starter_pid},
                                         {"ppid_is_lesson", st.ppid == me},
                                         {"sid_is_leader", st.sid == leader},
                                         {"sid_is_own_pid", st.sid == dpid},
                                         {"pgrp_is_leader", st.pgrp == leader},
                                         {"sid_differs_from_lesson", st.sid != ::getsid(0)},
                                         {"tty_nr", st.tty_nr},
                                         {"cwd", cwd},
                                         {"umask", umask},
                                         {"fds_on_dev_null", on_null},
                                         {"fd_count", fds.size()},
                                         {"second_copy_refused", second_refused},
                                         {"stopped_status", describe_status(daemon_status)},
                                         {"pidfile_removed_by_daemon", removed_by_daemon},
                                         {"stop_seconds", stop_secs}});
    L.fact("processes_created", everyone.size());
    L.fact("processes_left", left_running);
    L.fact("pids_left", left);
    L.fact("no_children_left", no_children);
    L.fact("pidfile_left", pidfile_left);

    bool part1 = d.middle_exitcode == 0 && d.sigterm && !d.finished && d.gone;
    bool part2 = p.middle_exitcode == 0 && !p.sigterm && p.finished && p.gone;
    bool part3 = *m.exitcode() == -SIGKILL && orphan_killed;
    bool part4 = *s.exitcode() == 0 && starter_gone && leader_gone &&
                 h.value().leader_sid == leader && alive && from_file == dpid &&
                 st.ppid != starter_pid && st.ppid == me && st.sid == leader && st.sid != dpid &&
                 st.tty_nr == 0 && cwd == "/" && umask == "0000" && on_null == 3 &&
                 fds.size() == 4 && second_refused && WIFEXITED(daemon_status) &&
                 WEXITSTATUS(daemon_status) == 0;
    return part1 && part2 && part3 && part4 && left_running == 0 && no_children && !pidfile_left;
  });
}
