// mp/src/spawn.cpp - the spawn and forkserver start methods, and the child's entry point.
//
// spawn: the parent posix_spawns /proc/self/exe with "--mp-spawn-child=<fd>", where fd is
// one end of a socketpair. Before main() runs (see __wrap_main below), the new image reads
// the request from that socket: the target as module-relative addresses, its arguments as
// bytes, descriptors as SCM_RIGHTS. It answers 'K' once it is ready to run the target, or
// 'E' and a message, then runs the target and exits. The parent waits for that answer, so
// a child that cannot start is a clear error in start().
//
// forkserver: the first forkserver start spawns the server the same way with
// "--mp-forkserver=<fd>". The fresh image is single-threaded; it runs the preload hooks,
// then forks one child per request. Each request carries a status socket on which the
// server sends the child's pid (with a pidfd, race-free) and, once it has reaped the child,
// its exit code.
#include <dlfcn.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <link.h>
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "mp/context.hpp"
#include "mp/detail/child.hpp"
#include "mp/detail/fd.hpp"
#include "mp/detail/pidfd.hpp"
#include "mp/detail/portable.hpp"
#include "mp/process.hpp"

extern char** environ;

namespace mp {

template <class Archive>
void serialize(Archive& ar, ProcessInfo& p) {
  ar(p.pid, p.name, p.daemon);
}

namespace detail {
namespace {

constexpr std::string_view kSpawnFlag = "--mp-spawn-child=";
constexpr std::string_view kServerFlag = "--mp-forkserver=";
constexpr std::size_t kMaxFds = 250;  // below SCM_MAX_FD (253)

// ---- code addresses ---------------------------------------------------------------------

struct ModuleSearch {
  std::uintptr_t address = 0;  // locate: the address to find
  const std::string* name = nullptr;  // resolve: the module to find
  int index = 0;
  bool found = false;
  std::string module;
  std::uintptr_t base = 0;
};

int find_module(dl_phdr_info* info, std::size_t, void* data) {
  auto* s = static_cast<ModuleSearch*>(data);
  // The first module listed is always the main program; name it "".
  std::string name = s->index++ == 0 ? std::string() : std::string(info->dlpi_name);
  if (s->name) {
    if (name != *s->name) return 0;
    s->found = true;
    s->base = info->dlpi_addr;
    return 1;
  }
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (s->address >= lo && s->address < lo + ph.p_memsz) {
      s->found = true;
      s->module = name;
      s->base = info->dlpi_addr;
      return 1;
    }
  }
  return 0;
}

}  // namespace

CodeAddress locate_code(const void* address) {
  ModuleSearch s;
  s.address = reinterpret_cast<std::uintptr_t>(address);
  ::dl_iterate_phdr(find_module, &s);
  if (!s.found) {
    throw std::runtime_error(fmt::format("cannot locate code at {}: in no loaded module", address));
  }
  return CodeAddress{s.module, s.address - s.base};
}

const void* resolve_code(const CodeAddress& where) {
  ModuleSearch s;
  s.name = &where.module;
  ::dl_iterate_phdr(find_module, &s);
  if (!s.found) {
    throw std::runtime_error(fmt::format("cannot find the target's module '{}' in the child",
                                         where.module.empty() ? "<main program>" : where.module));
  }
  return reinterpret_cast<const void*>(s.base + where.offset);
}

namespace {

// ---- messages over a Unix stream socket: [u64 length + descriptors] [body] --------------

void write_all(int fd, const char* p, std::size_t n, std::string_view what) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w == -1) {
      if (errno == EINTR) continue;
      throw_errno(fmt::format("send {}", what));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

// Reads exactly n bytes; false on EOF before the first byte, an error on EOF after it.
bool read_all(int fd, char* p, std::size_t n, std::string_view what) {
  std::size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, p + got, n - got);
    if (r == -1) {
      if (errno == EINTR) continue;
      throw_errno(fmt::format("read {}", what));
    }
    if (r == 0) {
      if (got == 0) return false;
      throw std::runtime_error(fmt::format("cannot read {}: the peer closed mid-message", what));
    }
    got += static_cast<std::size_t>(r);
  }
  return true;
}

void send_message(int sock, std::string_view body, std::span<const int> fds, std::string_view what) {
  if (fds.size() > kMaxFds) {
    throw std::invalid_argument(
        fmt::format("cannot send {}: {} descriptors, at most {}", what, fds.size(), kMaxFds));
  }
  std::uint64_t len = body.size();
  iovec iov{&len, sizeof len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * kMaxFds));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t w = retry_eintr([&] { return ::sendmsg(sock, &msg, MSG_NOSIGNAL); });
  if (w == -1) throw_errno(fmt::format("send {}", what));
  if (static_cast<std::size_t>(w) < sizeof len) {
    write_all(sock, reinterpret_cast<const char*>(&len) + w, sizeof len - static_cast<std::size_t>(w), what);
  }
  write_all(sock, body.data(), body.size(), what);
}

// Receives one message; false on EOF before it starts. Received descriptors are
// close-on-exec and owned by the caller.
bool recv_message(int sock, std::string& body, std::vector<UniqueFd>& fds, std::string_view what) {
  std::uint64_t len = 0;
  iovec iov{&len, sizeof len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * kMaxFds));
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t r = retry_eintr([&] { return ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); });
  if (r == -1) throw_errno(fmt::format("receive {}", what));
  if (r == 0) return false;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    throw std::runtime_error(fmt::format("cannot receive {}: too many descriptors", what));
  }
  if (static_cast<std::size_t>(r) < sizeof len &&
      !read_all(sock, reinterpret_cast<char*>(&len) + r, sizeof len - static_cast<std::size_t>(r), what)) {
    throw std::runtime_error(fmt::format("cannot receive {}: the peer closed mid-message", what));
  }
  if (len > (std::uint64_t{1} << 34)) {
    throw std::runtime_error(fmt::format("cannot receive {}: {} bytes is not a sane size", what, len));
  }
  body.resize(static_cast<std::size_t>(len));
  if (len > 0 && !read_all(sock, body.data(), body.size(), what)) {
    throw std::runtime_error(fmt::format("cannot receive {}: the peer closed mid-message", what));
  }
  return true;
}

// ---- the request a new child runs ------------------------------------------------------

struct StartRequest {
  CodeAddress trampoline;
  CodeAddress target;
  bool has_target = false;
  std::string args;
  std::string identity;
  std::string name;
  bool daemon = false;
  bool detached = false;
  ProcessInfo parent;
  std::string default_method;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(trampoline, target, has_target, args, identity, name, daemon, detached, parent,
       default_method);
  }
};

StartRequest make_request(const LaunchSpec& spec, PortableTarget& pt) {
  StartRequest r;
  r.trampoline = std::move(pt.trampoline);
  r.target = std::move(pt.target);
  r.has_target = pt.has_target;
  r.args = std::move(pt.args);
  r.identity = spec.identity;
  r.name = spec.name;
  r.daemon = spec.daemon;
  r.detached = spec.detached;
  r.parent = this_process_info();
  r.default_method = get_start_method();
  return r;
}

PortableTarget portable_or_throw(const LaunchSpec& spec, std::string_view method) {
  if (!spec.portable) {
    throw ProcessError(fmt::format("cannot start process '{}' with the {} start method: {}",
                                   spec.name, method, spec.not_portable_why));
  }
  return spec.portable();
}

// Set by the library constructor when this image was started as a spawn child or a
// forkserver and the entry point has not taken over yet (see forgot_entry_point()).
bool g_entry_pending = false;

void refuse_if_entry_pending() {
  if (g_entry_pending) {
    throw ProcessError(
        "cannot start a process: this program was started by mp's spawn or forkserver "
        "method but did not run mp's child entry point before main(); link it with the "
        "mp CMake target (which adds -Wl,--wrap=main) or call mp::freeze_support(argc, argv) "
        "first in main()");
  }
}

// Builds the LaunchSpec a request describes. The trampoline resolves the target and the
// argument bytes inside the child.
LaunchSpec spec_from_request(StartRequest& req) {
  auto tramp = reinterpret_cast<Trampoline>(const_cast<void*>(resolve_code(req.trampoline)));
  const void* target = req.has_target ? resolve_code(req.target) : nullptr;
  LaunchSpec spec;
  spec.identity = req.identity;
  spec.name = req.name;
  spec.daemon = req.daemon;
  spec.detached = req.detached;
  spec.body = [tramp, target, args = std::move(req.args)] { return tramp(target, args); };
  return spec;
}

std::vector<int> raw_fds(const std::vector<UniqueFd>& fds) {
  std::vector<int> out;
  for (const auto& f : fds) out.push_back(f.get());
  return out;
}

// posix_spawn of this program's image with `flag<fd>`, fd being the child's socket end.
pid_t spawn_image(std::string_view flag, int child_sock, std::string_view what) {
  posix_spawn_file_actions_t fa;
  if (int rc = posix_spawn_file_actions_init(&fa); rc != 0) {
    throw system_error(rc, fmt::format("prepare to spawn {}", what));
  }
  // dup2 onto itself clears close-on-exec for this one descriptor (glibc >= 2.29).
  posix_spawn_file_actions_adddup2(&fa, child_sock, child_sock);
  std::string arg = fmt::format("{}{}", flag, child_sock);
  std::string argv0 = program_invocation_name;
  char* argv[] = {argv0.data(), arg.data(), nullptr};
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw system_error(rc, fmt::format("spawn {} from /proc/self/exe", what));
  return pid;
}

// Reads the child's answer: 'K' (ready) or 'E' + message. False on EOF.
bool read_answer(int sock, std::string& error, std::string_view what) {
  char c = 0;
  if (!read_all(sock, &c, 1, what)) return false;
  if (c == 'K') return true;
  std::string body;
  std::vector<UniqueFd> none;
  if (c == 'E' && recv_message(sock, body, none, what)) {
    error = body;
  } else {
    error = "it sent a malformed answer";
  }
  return false;
}

void answer_error(int sock, std::string_view message) noexcept {
  try {
    write_all(sock, "E", 1, "an error answer");
    send_message(sock, message, {}, "an error answer");
  } catch (...) {
  }
}

pid_t reap_quietly(pid_t pid, int* exitcode) noexcept {
  int status = 0;
  pid_t r;
  do r = ::waitpid(pid, &status, 0);
  while (r == -1 && errno == EINTR);
  if (r == pid && exitcode) {
    *exitcode = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  }
  return r;
}

// ---- spawn ------------------------------------------------------------------------------

class SpawnMethod final : public StartMethod {
 public:
  std::string_view name() const noexcept override { return "spawn"; }

  Launched launch(const LaunchSpec& spec) override {
    refuse_if_entry_pending();
    PortableTarget pt = portable_or_throw(spec, "spawn");
    StartRequest req = make_request(spec, pt);
    std::string body = dumps(req);

    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
      throw_errno(fmt::format("create the start channel of process '{}'", spec.name));
    }
    UniqueFd mine(sv[0]), theirs(sv[1]);
    std::string what = fmt::format("process '{}'", spec.name);
    std::fflush(nullptr);
    pid_t pid = spawn_image(kSpawnFlag, theirs.get(), what);
    theirs.reset();
    UniqueFd pidfd(pidfd_open(pid));
    if (!pidfd) {
      int err = errno;
      ::kill(pid, SIGKILL);
      reap_quietly(pid, nullptr);
      throw system_error(err, fmt::format("open a pidfd for process {} ('{}')", pid, spec.name));
    }
    std::string error;
    bool ready = false;
    try {
      send_message(mine.get(), body, pt.fds, fmt::format("the start request of {}", what));
      ready = read_answer(mine.get(), error, fmt::format("the answer of {}", what));
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!ready) {
      ::kill(pid, SIGKILL);
      int code = 0;
      reap_quietly(pid, &code);
      if (error.empty()) {
        error = fmt::format(
            "it {} before running its target; if the program is not linked with the mp CMake "
            "target (which adds -Wl,--wrap=main), main() must call mp::freeze_support(argc, "
            "argv) first",
            describe_exitcode(code));
      }
      throw ProcessError(fmt::format("cannot start process '{}' with the spawn start method "
                                     "(child pid {}): {}",
                                     spec.name, pid, error));
    }
    return Launched{pid, pidfd.release(), -1};
  }
};

[[noreturn]] void run_spawned_child(int sock) {
  std::string body;
  std::vector<UniqueFd> fds;
  try {
    if (!recv_message(sock, body, fds, "the start request")) std::_Exit(1);
    auto req = load<StartRequest>(body);
    FdImport imported(raw_fds(fds));
    LaunchSpec spec = spec_from_request(req);
    if (!req.default_method.empty()) set_start_method(req.default_method, true);
    enter_child(spec, req.parent, req.parent.pid);
    // Arguments are decoded inside the trampoline, where FdImport must still be active:
    // keep it for the whole run by running the target from here.
    write_all(sock, "K", 1, "the ready answer");
    ::close(sock);
    run_child_and_exit(spec);
  } catch (const std::exception& e) {
    answer_error(sock, e.what());
    std::_Exit(1);
  }
}

// ---- forkserver -------------------------------------------------------------------------

struct ForkserverClient {
  std::mutex mutex;
  UniqueFd sock;
  pid_t pid = 0;
  std::vector<CodeAddress> preload;
};

ForkserverClient& forkserver_client() {
  static auto* c = new ForkserverClient;  // never destroyed: used at exit
  return *c;
}

struct ServerHello {
  ProcessInfo parent;
  std::vector<CodeAddress> preload;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(parent, preload);
  }
};

void start_server_locked(ForkserverClient& c) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
    throw_errno("create the forkserver's channel");
  }
  UniqueFd mine(sv[0]), theirs(sv[1]);
  std::fflush(nullptr);
  pid_t pid = spawn_image(kServerFlag, theirs.get(), "the forkserver");
  theirs.reset();
  std::string error;
  bool ready = false;
  try {
    send_message(mine.get(), dumps(ServerHello{this_process_info(), c.preload}), {},
                 "the forkserver's set-up");
    ready = read_answer(mine.get(), error, "the forkserver's answer");
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!ready) {
    ::kill(pid, SIGKILL);
    int code = 0;
    reap_quietly(pid, &code);
    if (error.empty()) error = fmt::format("it {} during set-up", describe_exitcode(code));
    throw ProcessError(fmt::format("cannot start the forkserver (pid {}): {}", pid, error));
  }
  c.sock = std::move(mine);
  c.pid = pid;
}

class ForkserverMethod final : public StartMethod {
 public:
  std::string_view name() const noexcept override { return "forkserver"; }

  Launched launch(const LaunchSpec& spec) override {
    refuse_if_entry_pending();
    PortableTarget pt = portable_or_throw(spec, "forkserver");
    StartRequest req = make_request(spec, pt);
    std::string body = dumps(req);

    int st[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, st) == -1) {
      throw_errno(fmt::format("create the status channel of process '{}'", spec.name));
    }
    UniqueFd status(st[0]), server_end(st[1]);
    std::vector<int> fds = pt.fds;
    fds.push_back(server_end.get());  // the last descriptor is the status channel

    ForkserverClient& c = forkserver_client();
    {
      std::lock_guard lock(c.mutex);
      ForkserverMethod::forget_dead_server_locked(c);
      if (!c.sock) start_server_locked(c);
      try {
        send_message(c.sock.get(), body, fds, fmt::format("the start request of '{}'", spec.name));
      } catch (const std::system_error&) {
        // The server died (EPIPE): start a new one once, then give up.
        stop_server_locked(c);
        start_server_locked(c);
        send_message(c.sock.get(), body, fds, fmt::format("the start request of '{}'", spec.name));
      }
    }
    server_end.reset();

    // The server answers on the status channel: 'P' + pid with the pidfd, or 'E' + message.
    std::string what = fmt::format("the pid of process '{}' from the forkserver", spec.name);
    char c0 = 0;
    if (!read_all(status.get(), &c0, 1, what)) {
      throw ProcessError(fmt::format("cannot start process '{}' with the forkserver start "
                                     "method: the server closed the channel",
                                     spec.name));
    }
    std::string answer;
    std::vector<UniqueFd> got;
    if (!recv_message(status.get(), answer, got, what)) {
      throw ProcessError(fmt::format("cannot start process '{}': the forkserver closed the "
                                     "channel mid-answer",
                                     spec.name));
    }
    if (c0 != 'P' || got.size() != 1 || answer.size() != sizeof(pid_t)) {
      throw ProcessError(fmt::format("cannot start process '{}' with the forkserver start "
                                     "method: {}",
                                     spec.name, c0 == 'E' ? answer : "malformed answer"));
    }
    pid_t pid = 0;
    std::memcpy(&pid, answer.data(), sizeof pid);
    return Launched{pid, got[0].release(), status.release()};
  }

  static void stop_server_locked(ForkserverClient& c) noexcept {
    if (!c.sock) return;
    c.sock.reset();  // EOF tells the server to leave
    if (c.pid > 0) reap_quietly(c.pid, nullptr);
    c.pid = 0;
  }

  // Whether the server is gone: it never writes on its channel after its ready answer, so
  // the channel polls readable (end of file) or hung up only once the server has died.
  static bool server_gone_locked(const ForkserverClient& c) noexcept {
    if (!c.sock) return false;
    pollfd p{c.sock.get(), POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
  }

  // Reaps a server that died (no zombie is left behind) and forgets it, so that the next
  // start() brings up a new one.
  static void forget_dead_server_locked(ForkserverClient& c) noexcept {
    if (server_gone_locked(c)) stop_server_locked(c);  // its descriptors are closed: it is exiting
  }
};

// The server's loop. Single-threaded; forks one child per request.
[[noreturn]] void run_forkserver(int sock) {
  struct Child {
    pid_t pid;
    UniqueFd pidfd;
    UniqueFd status;
  };
  std::vector<Child> children;
  ServerHello hello;
  try {
    std::string body;
    std::vector<UniqueFd> none;
    if (!recv_message(sock, body, none, "the forkserver's set-up")) std::_Exit(0);
    hello = load<ServerHello>(body);
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) == -1) std::_Exit(1);
    if (::getppid() != hello.parent.pid) ::kill(::getpid(), SIGKILL);
    ::prctl(PR_SET_NAME, "mp-forkserver");
    for (const auto& p : hello.preload) {
      reinterpret_cast<void (*)()>(const_cast<void*>(resolve_code(p)))();
    }
    write_all(sock, "K", 1, "the forkserver's ready answer");
  } catch (const std::exception& e) {
    answer_error(sock, e.what());
    std::_Exit(1);
  }

  for (;;) {
    std::vector<pollfd> pfds{{sock, POLLIN, 0}};
    for (const auto& ch : children) pfds.push_back({ch.pidfd.get(), POLLIN, 0});
    if (::poll(pfds.data(), pfds.size(), -1) == -1) {
      if (errno == EINTR) continue;
      std::_Exit(1);
    }
    // Children that ended: reap them and send their exit codes.
    for (std::size_t i = pfds.size(); i-- > 1;) {
      if (!(pfds[i].revents & POLLIN)) continue;
      Child& ch = children[i - 1];
      siginfo_t info{};
      if (retry_eintr([&] { return ::waitid(kPidfdIdtype, ch.pidfd.get(), &info, WEXITED); }) == 0) {
        std::int32_t code = info.si_code == CLD_EXITED ? info.si_status : -info.si_status;
        try {
          write_all(ch.status.get(), reinterpret_cast<const char*>(&code), sizeof code,
                    "an exit code");
        } catch (...) {  // the requester is gone: nobody to tell
        }
      }
      children.erase(children.begin() + static_cast<std::ptrdiff_t>(i - 1));
    }
    if (!(pfds[0].revents & (POLLIN | POLLHUP))) continue;

    std::string body;
    std::vector<UniqueFd> fds;
    bool got = false;
    try {
      got = recv_message(sock, body, fds, "a start request");
    } catch (...) {
      std::_Exit(1);
    }
    if (!got) std::_Exit(0);  // the requester closed: it exited, or wants us gone
    if (fds.empty()) continue;  // malformed: no status channel
    UniqueFd status = std::move(fds.back());
    fds.pop_back();
    StartRequest req;
    LaunchSpec spec;
    try {
      req = load<StartRequest>(body);
      spec = spec_from_request(req);
    } catch (const std::exception& e) {
      try {
        write_all(status.get(), "E", 1, "an error answer");
        send_message(status.get(), e.what(), {}, "an error answer");
      } catch (...) {
      }
      continue;
    }
    pid_t server = ::getpid();
    pid_t pid = ::fork();
    if (pid == 0) {
      // The child keeps nothing of the server's: not its channel, not other children's.
      ::close(sock);
      for (auto& ch : children) {
        ::close(ch.pidfd.release());
        ::close(ch.status.release());
      }
      ::close(status.release());
      FdImport imported(raw_fds(fds));
      if (!req.default_method.empty()) set_start_method(req.default_method, true);
      enter_child(spec, req.parent, server);
      run_child_and_exit(spec);
    }
    fds.clear();  // the child has its copies
    try {
      if (pid == -1) throw_errno(fmt::format("fork process '{}'", spec.name));
      UniqueFd pidfd(pidfd_open(pid));
      if (!pidfd) throw_errno(fmt::format("open a pidfd for process {}", pid));
      write_all(status.get(), "P", 1, "a pid answer");
      int pfd = pidfd.get();
      send_message(status.get(), std::string_view(reinterpret_cast<const char*>(&pid), sizeof pid),
                   std::span<const int>(&pfd, 1), "a pid answer");
      children.push_back(Child{pid, std::move(pidfd), std::move(status)});
    } catch (const std::exception& e) {
      try {
        write_all(status.get(), "E", 1, "an error answer");
        send_message(status.get(), e.what(), {}, "an error answer");
      } catch (...) {
      }
    }
  }
}

// Whether argv holds `flag<fd>`; sets fd.
bool find_flag(int argc, char** argv, std::string_view flag, int& fd) {
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a.substr(0, flag.size()) == flag) {
      fd = std::atoi(argv[i] + flag.size());
      return fd >= 0;
    }
  }
  return false;
}

// Runs before main() (and before freeze_support): notes that this image is a child whose
// entry point has not run yet, so that it refuses to start processes if main() runs
// instead (never a fork bomb). glibc passes argc and argv to constructors.
__attribute__((constructor)) void note_child_image(int argc, char** argv, char**) {
  int fd = -1;
  if (argv && (find_flag(argc, argv, kSpawnFlag, fd) || find_flag(argc, argv, kServerFlag, fd))) {
    g_entry_pending = true;
  }
}

}  // namespace

// ---- glue used by process.cpp -----------------------------------------------------------

int read_exit_status(int status_fd, pid_t pid) {
  std::int32_t code = 0;
  if (!read_all(status_fd, reinterpret_cast<char*>(&code), sizeof code,
                fmt::format("the exit code of process {}", pid))) {
    // The server died, and the child with it (parent-death signal). Reap the server now,
    // rather than leave it a zombie until the next forkserver start or this program's end.
    ForkserverClient& c = forkserver_client();
    std::lock_guard lock(c.mutex);
    ForkserverMethod::forget_dead_server_locked(c);
    return -SIGKILL;
  }
  return code;
}

void forget_forkserver() noexcept {
  ForkserverClient& c = forkserver_client();
  new (&c.mutex) std::mutex();  // another thread may have held it at fork time
  c.sock.reset();
  c.pid = 0;  // not our child: never reap it
}

void stop_forkserver() noexcept {
  ForkserverClient& c = forkserver_client();
  std::lock_guard lock(c.mutex);
  ForkserverMethod::stop_server_locked(c);
}

pid_t forkserver_pid() {
  ForkserverClient& c = forkserver_client();
  std::lock_guard lock(c.mutex);
  return c.pid;
}

StartMethod& spawn_method() {
  static SpawnMethod m;
  return m;
}

StartMethod& forkserver_method() {
  static ForkserverMethod m;
  return m;
}

}  // namespace detail

void freeze_support(int argc, char** argv) {
  int fd = -1;
  if (detail::find_flag(argc, argv, detail::kSpawnFlag, fd)) {
    detail::g_entry_pending = false;
    detail::run_spawned_child(fd);
  }
  if (detail::find_flag(argc, argv, detail::kServerFlag, fd)) {
    detail::g_entry_pending = false;
    detail::run_forkserver(fd);
  }
}

void set_forkserver_preload(const std::vector<void (*)()>& functions) {
  std::vector<detail::CodeAddress> where;
  for (auto f : functions) where.push_back(detail::locate_code(reinterpret_cast<const void*>(f)));
  auto& c = detail::forkserver_client();
  std::lock_guard lock(c.mutex);
  c.preload = std::move(where);
}

}  // namespace mp
