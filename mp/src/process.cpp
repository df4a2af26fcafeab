// mp/src/process.cpp - Process, the fork start method, and the child registry.
#include "mp/process.hpp"

#include <cxxabi.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <typeinfo>

#include "mp/detail/child.hpp"
#include "mp/detail/fd.hpp"
#include "mp/detail/fork_gate.hpp"
#include "mp/detail/pidfd.hpp"

namespace mp {
namespace detail {

void reset_default_method_lock() noexcept;  // below, with the default start method

// How long a terminated child gets to exit before it is killed, when mp cleans up.
constexpr int kTerminateGraceMs = 1000;

struct ChildState {
  std::string name;
  bool daemon = false;
  bool detached = false;
  pid_t pid = 0;
  UniqueFd pidfd;      // signals; waitid() when it is our own child
  UniqueFd status_fd;  // forkserver children: the server sends the exit code here

  // The child's own pidfd, for every start method: it becomes readable when the child has
  // ended, and only then. (A forkserver child's status channel also reaches end of file
  // when the server dies, while the child may still be running until its parent-death
  // signal lands: that is no proof of its death.)
  int sentinel() const noexcept { return pidfd.get(); }

  // The exit code once the child has been reaped (by any thread).
  std::optional<int> known_exitcode() const {
    std::lock_guard lock(mutex_);
    return exitcode_;
  }

  // Reaps the child if it has ended. With block, waits until it has. Returns whether it
  // has ended (its exit code is then known).
  //
  // Several threads may call this at once for the same child (join() in one, the prune of
  // active_children() or start() in another): only one may collect the status, or the
  // other's waitid() fails with ECHILD. So the collection happens under mutex_, never
  // blocking; a blocking caller waits on the sentinel outside the lock, in slices, and
  // looks again, so a waiter never holds up a prune (which runs under the registry lock).
  bool reap(bool block) {
    for (;;) {
      {
        std::lock_guard lock(mutex_);
        if (exitcode_ || collect_locked()) return true;
      }
      if (!block) return false;
      // Readable once the child has ended. The slice matters only when another thread
      // consumed a forkserver child's status meanwhile and the status fd did not reach end
      // of file (a copy of the server's end leaked into some other process): then we find
      // the exit code on the next look instead of waiting for good.
      if (status_fd && wait_readable(0)) {
        poll_one(status_fd.get(), kReapSliceMs);  // ended: wait for the server's report
      } else {
        wait_readable(kReapSliceMs);
      }
    }
  }

  // Whether fd is readable within timeout_ms (0: now). EINTR counts as not yet.
  bool poll_one(int fd, int timeout_ms) const {
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, timeout_ms);
    if (r == -1 && errno != EINTR) throw_errno(fmt::format("poll the status of process {}", pid));
    return r > 0;
  }

  // Waits up to timeout_ms (negative: forever) for the child to end, without reaping.
  bool wait_readable(int timeout_ms) const {
    pollfd p{sentinel(), POLLIN, 0};
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      int r = ::poll(&p, 1, timeout_ms);
      if (r > 0) return true;
      if (r == 0) return false;
      if (errno != EINTR) throw_errno(fmt::format("poll the sentinel of process {}", pid));
      if (timeout_ms >= 0) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        timeout_ms = static_cast<int>(std::max<long long>(0, left.count()));
      }
    }
  }

  void send(int sig) {
    if (known_exitcode()) return;  // reaped: the pid may be reused, but the pidfd is safe
    if (pidfd_send_signal(pidfd.get(), sig) == -1 && errno != ESRCH) {
      throw_errno(fmt::format("send {} to process {} ({})", signal_name(sig), pid, name));
    }
  }

  // SIGTERM, a grace period, SIGKILL; then reap. For cleanup paths.
  void stop() {
    send(SIGTERM);
    if (!wait_readable(kTerminateGraceMs)) send(SIGKILL);
    reap(true);
  }

 private:
  static constexpr int kReapSliceMs = 100;

  // Collects the exit status if the child has ended, without waiting. Caller holds mutex_.
  bool collect_locked() {
    if (status_fd) {
      if (!wait_readable(0)) return false;  // the pidfd: the child itself has not ended
      // It has ended; the server sends the code once it has reaped it (or the channel
      // reaches end of file if the server died). Never block here, under mutex_.
      if (!poll_one(status_fd.get(), 0)) return false;
      exitcode_ = read_exit_status(status_fd.get(), pid);
      return true;
    }
    siginfo_t info{};
    if (retry_eintr(
            [&] { return ::waitid(kPidfdIdtype, pidfd.get(), &info, WEXITED | WNOHANG); }) == -1) {
      throw_errno(fmt::format("wait for process {} ({})", pid, name));
    }
    if (info.si_pid == 0) return false;  // still running
    exitcode_ = info.si_code == CLD_EXITED ? info.si_status : -info.si_status;
    return true;
  }

  mutable std::mutex mutex_;
  std::optional<int> exitcode_;
};

namespace {

// Everything mp knows about this process. Reset in each child.
struct Registry {
  std::mutex mutex;
  std::vector<std::shared_ptr<ChildState>> children;  // started, not yet reaped
  pid_t owner = ::getpid();
  ProcessInfo self{::getpid(), "MainProcess", false};
  std::optional<ProcessInfo> parent;
  std::string identity;  // "" in the main process, "1", "1:2"... in children
  int counter = 0;       // children started so far, for default names
};

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry;  // never destroyed: used by the atexit handler
    std::atexit(+[] { cleanup_children_at_exit(); });
    return reg;
  }();
  return *r;
}

// Drops the entries of children that have ended (reaping them). Caller holds the mutex.
void prune_locked(Registry& reg) {
  std::erase_if(reg.children, [](const std::shared_ptr<ChildState>& c) {
    try {
      return c->reap(false);
    } catch (const std::exception& e) {
      report_noexcept(e.what());
      return true;
    }
  });
}

std::string exception_type_name() {
  const std::type_info* t = abi::__cxa_current_exception_type();
  if (!t) return "unknown exception";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(
      abi::__cxa_demangle(t->name(), nullptr, nullptr, &status), std::free);
  return status == 0 && demangled ? demangled.get() : t->name();
}

}  // namespace

void cleanup_children_at_exit() noexcept {
  Registry& reg = registry();
  if (reg.owner != ::getpid()) return;
  std::vector<std::shared_ptr<ChildState>> children;
  {
    std::lock_guard lock(reg.mutex);
    children.swap(reg.children);
  }
  for (auto& c : children) {
    try {
      if (c->detached) {
        c->reap(false);  // collect it if it has ended; a running one goes on alone
      } else if (c->daemon) {
        c->stop();
      } else {
        c->reap(true);
      }
    } catch (const std::exception& e) {
      report_noexcept(e.what());
    }
  }
  stop_forkserver();
}

std::string next_child_identity() {
  Registry& reg = registry();
  std::lock_guard lock(reg.mutex);
  int n = ++reg.counter;
  return reg.identity.empty() ? std::to_string(n) : fmt::format("{}:{}", reg.identity, n);
}

ProcessInfo this_process_info() {
  // No lock: `self` is written only by enter_child(), before the new process has other
  // threads; and start() calls this while it holds the registry lock.
  return registry().self;
}

void enter_child(const LaunchSpec& spec, const ProcessInfo& parent, pid_t reaper) noexcept {
  // The registry describes the parent's children; this process starts with none. The
  // mutex is not touched: another thread of the parent may have held it at fork time.
  Registry& reg = registry();
  // The parent's children are not ours: close our copies of their descriptors (the forking
  // thread holds the registry lock, so the vector is consistent), then forget the entries
  // without destroying them.
  for (auto& c : reg.children) {
    ::close(c->pidfd.release());
    if (c->status_fd) ::close(c->status_fd.release());
  }
  new (&reg.children) std::vector<std::shared_ptr<ChildState>>();
  new (&reg.mutex) std::mutex();
  reset_default_method_lock();
  reg.parent = parent;
  reg.identity = spec.identity;
  reg.counter = 0;
  reg.owner = ::getpid();
  reg.self = ProcessInfo{::getpid(), spec.name, spec.daemon};
  forget_forkserver();  // the parent's server connection is not this process's

  if (!spec.detached) {
    // Die with the process that reaps us. If it died before this line, getppid() changed.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) == -1) std::_Exit(1);
    // The parent died before the signal was armed: end as the signal would have ended us.
    if (::getppid() != reaper) ::kill(::getpid(), SIGKILL);
  }
  // The kernel's name for this process (ps, top, /proc/PID/comm); at most 15 characters.
  std::string comm = spec.name.substr(0, 15);
  ::prctl(PR_SET_NAME, comm.c_str());  // cosmetic: failure is harmless
}

[[noreturn]] void run_child_and_exit(const LaunchSpec& spec) noexcept {
  int status = 0;
  try {
    status = spec.body();
  } catch (const std::exception& e) {
    status = 1;
    try {  // stderr may be closed: reporting must not throw out of this noexcept function
      fmt::print(stderr, "Process {} (pid {}) ended with an exception: {}: {}\n", spec.name,
                 ::getpid(), exception_type_name(), e.what());
    } catch (...) {
    }
  } catch (...) {
    status = 1;
    try {
      fmt::print(stderr, "Process {} (pid {}) ended with an exception of type {}\n", spec.name,
                 ::getpid(), exception_type_name());
    } catch (...) {
    }
  }
  // Children this child started and left running are handled as at a normal exit
  // (daemons terminated, the others joined). Then flush what the target printed and leave
  // without running the parent's atexit handlers and static destructors, which belong to
  // the parent's copy of the program.
  cleanup_children_at_exit();
  std::fflush(nullptr);
  std::_Exit(status & 0xff);
}

// The fork start method: the child is a copy of the parent and runs the body directly.
class ForkMethod final : public StartMethod {
 public:
  std::string_view name() const noexcept override { return "fork"; }
  bool forks_this_process() const noexcept override { return true; }

  Launched launch(const LaunchSpec& spec) override {
    // Unflushed output would otherwise be printed twice, once by each process.
    std::fflush(nullptr);
    ProcessInfo parent = this_process_info();
    pid_t pid = ::fork();
    if (pid == -1) throw_errno(fmt::format("fork process '{}'", spec.name));
    if (pid == 0) {
      // Process::start holds the registry lock across this fork, and this process's only
      // thread is the copy of the thread that holds it: release it by unlocking, which
      // ThreadSanitizer sees (a re-construction in enter_child would leave TSan believing
      // the lock is still held, and report the next lock as a double lock).
      registry().mutex.unlock();
      fork_gate_after_fork_in_child();
      enter_child(spec, parent, parent.pid);
      run_child_and_exit(spec);
    }
    int fd = pidfd_open(pid);
    if (fd == -1) {
      int err = errno;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      throw system_error(err, fmt::format("open a pidfd for process {} ('{}')", pid, spec.name));
    }
    return Launched{pid, fd};
  }
};

StartMethod& fork_method() {
  static ForkMethod m;
  return m;
}

}  // namespace detail

// ---- Context ----------------------------------------------------------------------------

namespace {
std::mutex g_default_mutex;
detail::StartMethod* g_default_method = nullptr;
}  // namespace

namespace detail {
// In a new child: another thread of the parent may have held the lock at fork time.
void reset_default_method_lock() noexcept { new (&g_default_mutex) std::mutex(); }
}  // namespace detail

Context get_context(std::string_view method) {
  if (method.empty()) {
    std::lock_guard lock(g_default_mutex);
    return Context(g_default_method ? g_default_method : &detail::fork_method());
  }
  if (method == "fork") return Context(&detail::fork_method());
  if (method == "spawn") return Context(&detail::spawn_method());
  if (method == "forkserver") return Context(&detail::forkserver_method());
  throw std::invalid_argument(
      fmt::format("cannot get context '{}': unknown start method (known: {})", method,
                  fmt::join(get_all_start_methods(), ", ")));
}

void set_start_method(std::string_view method, bool force) {
  Context ctx = get_context(method);
  std::lock_guard lock(g_default_mutex);
  if (g_default_method && !force && g_default_method != &ctx.method()) {
    throw ProcessError(fmt::format("cannot set the start method to '{}': it is already '{}'",
                                   method, g_default_method->name()));
  }
  g_default_method = &ctx.method();
}

std::string get_start_method() { return std::string(get_context().start_method()); }

std::vector<std::string> get_all_start_methods() { return {"fork", "spawn", "forkserver"}; }

// ---- Process ----------------------------------------------------------------------------

Process::Process() noexcept : context_(get_context("fork")) {}

Process::Process(const Context& context, detail::LaunchSpec spec)
    : context_(context), spec_(std::move(spec)) {
  spec_.identity = detail::next_child_identity();
  spec_.name = "Process-" + spec_.identity;
}

Process::Process(Process&& other) noexcept
    : context_(other.context_), spec_(std::move(other.spec_)), state_(std::move(other.state_)) {}

Process& Process::operator=(Process&& other) noexcept {
  if (this != &other) {
    release();
    context_ = other.context_;
    spec_ = std::move(other.spec_);
    state_ = std::move(other.state_);
  }
  return *this;
}

Process::~Process() { release(); }

void Process::release() noexcept {
  if (!state_ || state_->detached) {
    state_.reset();
    return;
  }
  try {
    if (!state_->known_exitcode()) {
      if (state_->daemon || std::uncaught_exceptions() > 0) {
        state_->stop();
      } else {
        state_->reap(true);
      }
    }
  } catch (const std::exception& e) {
    detail::report_noexcept(e.what());
  }
  state_.reset();
}

const std::string& Process::name() const noexcept { return spec_.name; }
bool Process::daemon() const noexcept { return spec_.daemon; }
bool Process::detached() const noexcept { return spec_.detached; }

void Process::set_name(std::string name) {
  if (state_) throw ProcessError("cannot rename a process after start()");
  spec_.name = std::move(name);
}

void Process::set_daemon(bool daemon) {
  if (state_) throw ProcessError("cannot change daemon after start()");
  spec_.daemon = daemon;
}

void Process::set_detached(bool detached) {
  if (state_) throw ProcessError("cannot change detached after start()");
  spec_.detached = detached;
}

void Process::start() {
  if (state_) throw ProcessError(fmt::format("cannot start process '{}' twice", spec_.name));
  if (!spec_.body) throw ProcessError("cannot start an empty Process");
  // With SIGCHLD ignored (or SA_NOCLDWAIT) the kernel reaps children itself, and join()
  // could never learn an exit code: it would fail with ECHILD. Say so now, not later.
  struct sigaction chld {};
  if (::sigaction(SIGCHLD, nullptr, &chld) == -1) throw_errno("read the action of SIGCHLD");
  if (chld.sa_handler == SIG_IGN || (chld.sa_flags & SA_NOCLDWAIT) != 0) {
    throw ProcessError(fmt::format(
        "cannot start process '{}': SIGCHLD is ignored (SIG_IGN or SA_NOCLDWAIT), so its exit "
        "status would be lost; restore the default action first",
        spec_.name));
  }
  auto state = std::make_shared<detail::ChildState>();
  state->name = spec_.name;
  state->daemon = spec_.daemon;
  state->detached = spec_.detached;

  // A fork waits until mp's background threads (pool service threads) are at a safe point,
  // not holding the allocator's locks (mp/detail/fork_gate.hpp); the gate comes before the
  // registry lock, which those threads may take.
  std::optional<detail::ForkGuard> gate;
  if (context_.method().forks_this_process()) gate.emplace();
  detail::Registry& reg = detail::registry();
  // Holding the registry lock across the launch keeps other threads from changing it
  // while a fork copies it.
  std::lock_guard lock(reg.mutex);
  detail::prune_locked(reg);  // reap children that ended since the last start, as Python does
  reg.children.reserve(reg.children.size() + 1);  // push_back below must not throw
  detail::Launched child = context_.method().launch(spec_);
  state->pid = child.pid;
  state->pidfd.reset(child.pidfd);
  state->status_fd.reset(child.status_fd);
  reg.children.push_back(state);
  state_ = std::move(state);
}

void Process::join() {
  if (!state_) throw ProcessError(fmt::format("cannot join process '{}': not started", spec_.name));
  state_->reap(true);
}

bool Process::join(Seconds timeout) {
  if (!state_) throw ProcessError(fmt::format("cannot join process '{}': not started", spec_.name));
  if (std::isnan(timeout.count())) {
    throw std::invalid_argument(
        fmt::format("cannot join process '{}': the timeout is NaN", spec_.name));
  }
  if (state_->known_exitcode()) return true;
  // Clamp as a double first: a huge timeout (Seconds::max()) would overflow milliseconds.
  double ms = std::clamp(std::ceil(timeout.count() * 1000.0), 0.0, double{INT32_MAX});
  if (ms >= INT32_MAX) {  // ~24 days or more: wait for good
    state_->reap(true);
    return true;
  }
  // On a timeout, look once more: another thread may have collected the status meanwhile
  // (a forkserver child's status fd need not stay readable after that).
  if (!state_->wait_readable(static_cast<int>(ms))) return state_->reap(false);
  return state_->reap(true);
}

bool Process::is_alive() { return state_ && !state_->reap(false); }

void Process::terminate() {
  if (state_) state_->send(SIGTERM);
}

void Process::kill() {
  if (state_) state_->send(SIGKILL);
}

std::optional<int> Process::exitcode() {
  if (!state_) return std::nullopt;
  state_->reap(false);
  return state_->known_exitcode();
}

pid_t Process::pid() const noexcept { return state_ ? state_->pid : 0; }
int Process::sentinel() const noexcept { return state_ ? state_->sentinel() : -1; }

// ---- free functions ---------------------------------------------------------------------

ProcessInfo current_process() { return detail::this_process_info(); }

std::optional<ProcessInfo> parent_process() {
  auto& reg = detail::registry();
  std::lock_guard lock(reg.mutex);
  return reg.parent;
}

std::vector<ProcessInfo> active_children() {
  auto& reg = detail::registry();
  std::lock_guard lock(reg.mutex);
  detail::prune_locked(reg);
  std::vector<ProcessInfo> out;
  for (auto& c : reg.children) out.push_back({c->pid, c->name, c->daemon});
  return out;
}

int cpu_count() {
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  if (n == -1) throw_errno("read the number of online CPUs");
  return static_cast<int>(n);
}

}  // namespace mp
