// mp/src/shared_memory.cpp - SharedMemory and its tracker (see mp/shared_memory.hpp).
#include "mp/shared_memory.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <utility>

#include "mp/detail/fd.hpp"
#include "mp/detail/fork_gate.hpp"
#include "mp/detail/pidfd.hpp"
#include "mp/error.hpp"

namespace mp {
namespace detail {
namespace {

constexpr std::size_t kNameMax = NAME_MAX;  // 255: what /dev/shm accepts for a file name

// ---- The tracker process --------------------------------------------------------------------
//
// Everything below up to Tracker runs in the tracker, a process forked from a program that
// may have had other threads: it uses system calls only (no malloc, no stdio, no locks).

void say_raw(const char* text) noexcept {
  // Best effort: stderr is the one channel the tracker keeps.
  std::size_t n = std::strlen(text);
  while (n > 0) {
    ssize_t w = ::write(STDERR_FILENO, text, n);
    if (w <= 0) {
      if (w == -1 && errno == EINTR) continue;
      return;
    }
    text += w;
    n -= static_cast<std::size_t>(w);
  }
}

// The registered names: a table of fixed-size entries in memory of its own (mmap).
class NameTable {
 public:
  using Entry = char[kNameMax + 1];

  void add(const char* name) noexcept {
    if (find(name) >= 0) return;
    if (count_ == cap_ && !grow()) {
      say_raw("mp shm tracker: out of memory, a name will not be cleaned up\n");
      return;
    }
    std::strncpy(entries_[count_], name, kNameMax);
    entries_[count_][kNameMax] = '\0';
    ++count_;
  }
  void remove(const char* name) noexcept {
    long i = find(name);
    if (i < 0) return;
    --count_;
    if (static_cast<std::size_t>(i) != count_)
      std::memcpy(entries_[i], entries_[count_], sizeof(Entry));
  }
  void unlink_all() noexcept {
    for (std::size_t i = 0; i < count_; ++i) {
      if (::shm_unlink(entries_[i]) == -1 && errno != ENOENT) {
        say_raw("mp shm tracker: cannot unlink ");
        say_raw(entries_[i]);
        say_raw("\n");
      }
    }
    count_ = 0;
  }

 private:
  long find(const char* name) const noexcept {
    for (std::size_t i = 0; i < count_; ++i) {
      if (std::strcmp(entries_[i], name) == 0) return static_cast<long>(i);
    }
    return -1;
  }
  bool grow() noexcept {
    std::size_t cap = cap_ == 0 ? 64 : cap_ * 2;
    void* p = ::mmap(nullptr, cap * sizeof(Entry), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    auto* fresh = static_cast<Entry*>(p);
    if (entries_) {
      std::memcpy(fresh, entries_, count_ * sizeof(Entry));
      ::munmap(entries_, cap_ * sizeof(Entry));
    }
    entries_ = fresh;
    cap_ = cap;
    return true;
  }

  Entry* entries_ = nullptr;
  std::size_t count_ = 0;
  std::size_t cap_ = 0;
};

// Applies the complete lines "R<name>\n" / "U<name>\n" in buf[0, len) and moves a trailing
// partial line to the front. Returns the new length.
std::size_t apply_lines(NameTable& table, char* buf, std::size_t len) noexcept {
  std::size_t start = 0;
  for (std::size_t i = 0; i < len; ++i) {
    if (buf[i] != '\n') continue;
    buf[i] = '\0';
    const char* line = buf + start;
    if (line[0] == 'R' && line[1] == '/') table.add(line + 1);
    if (line[0] == 'U' && line[1] == '/') table.remove(line + 1);
    start = i + 1;
  }
  std::size_t rest = len - start;
  if (rest > 0 && start > 0) std::memmove(buf, buf + start, rest);
  return rest;
}

// Unmaps every shared mapping inherited from the creator (memfd regions, other segments):
// the tracker must not keep their memory alive. Reads /proc/self/maps with plain reads.
void unmap_shared_mappings() noexcept {
  int fd = ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd == -1) return;
  // Collect first, unmap after: unmapping while reading would change the file under us.
  static std::uintptr_t ranges[2 * 4096];
  std::size_t n = 0;
  static char buf[1 << 16];
  std::size_t len = 0;
  bool eof = false;
  while (!eof || len > 0) {
    if (!eof && len < sizeof buf) {
      ssize_t r = ::read(fd, buf + len, sizeof buf - len);
      if (r == -1 && errno == EINTR) continue;
      if (r <= 0) {
        eof = true;
      } else {
        len += static_cast<std::size_t>(r);
      }
    }
    char* nl = static_cast<char*>(std::memchr(buf, '\n', len));
    if (!nl) {
      if (eof || len == sizeof buf) break;  // no complete line can come
      continue;
    }
    // "start-end perms ...": perms is "rw-s" for a shared mapping.
    char* p = buf;
    std::uintptr_t start = std::strtoull(p, &p, 16);
    std::uintptr_t end = (*p == '-') ? std::strtoull(p + 1, &p, 16) : 0;
    if (*p == ' ' && p + 4 < nl && p[4] == 's' && end > start && n + 2 <= std::size(ranges)) {
      ranges[n++] = start;
      ranges[n++] = end;
    }
    std::size_t used = static_cast<std::size_t>(nl - buf) + 1;
    std::memmove(buf, nl + 1, len - used);
    len -= used;
  }
  ::close(fd);
  for (std::size_t i = 0; i < n; i += 2) {
    ::munmap(reinterpret_cast<void*>(ranges[i]), ranges[i + 1] - ranges[i]);
  }
}

// Moves fd to a number >= 10, closing the original.
int move_high(int fd) noexcept {
  int h = ::fcntl(fd, F_DUPFD_CLOEXEC, 10);
  if (h != -1) ::close(fd);
  return h;
}

// Closes every descriptor >= 3 except a and b (a < b).
void close_all_but(int a, int b) noexcept {
  ::close_range(3, static_cast<unsigned>(a) - 1, 0);
  if (b > a + 1) ::close_range(static_cast<unsigned>(a) + 1, static_cast<unsigned>(b) - 1, 0);
  ::close_range(static_cast<unsigned>(b) + 1, ~0U, 0);
}

[[noreturn]] void run_tracker(int sock, int creator_pidfd) noexcept {
  ::setsid();  // out of the creator's session and process group
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGUSR1, SIGUSR2}) {
    ::sigaction(sig, &ign, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  sock = move_high(sock);
  creator_pidfd = move_high(creator_pidfd);
  if (sock == -1 || creator_pidfd == -1) ::_exit(1);
  int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull != -1) {
    ::dup2(devnull, STDIN_FILENO);
    ::dup2(devnull, STDOUT_FILENO);
  }
  if (sock < creator_pidfd) {
    close_all_but(sock, creator_pidfd);
  } else {
    close_all_but(creator_pidfd, sock);
  }
  unmap_shared_mappings();
  ::prctl(PR_SET_NAME, "mp-shm-tracker");  // what ps shows; cosmetic

  // The handshake: the creator waits for our pid, so it knows we are set up.
  pid_t me = ::getpid();
  if (::send(sock, &me, sizeof me, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof me)) ::_exit(1);

  NameTable table;
  static char buf[8192];
  std::size_t len = 0;
  pollfd fds[2] = {{sock, POLLIN, 0}, {creator_pidfd, POLLIN, 0}};
  for (;;) {
    int r = ::poll(fds, 2, -1);
    if (r == -1) {
      if (errno == EINTR) continue;
      break;  // cannot watch any more: clean up now rather than never
    }
    bool creator_gone = (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0;
    if (creator_gone) {
      // Take what the creator sent before it died, without waiting for more.
      ::fcntl(sock, F_SETFL, O_NONBLOCK);
    }
    if (fds[0].revents != 0 || creator_gone) {
      bool eof = false;
      for (;;) {
        if (len == sizeof buf) len = 0;  // a line longer than any name: drop it
        ssize_t n = ::read(sock, buf + len, sizeof buf - len);
        if (n > 0) {
          len = apply_lines(table, buf, len + static_cast<std::size_t>(n));
          if (!creator_gone) break;
          continue;
        }
        if (n == -1 && errno == EINTR) continue;
        eof = n == 0 || errno != EAGAIN;
        break;
      }
      if (eof || creator_gone) break;
    }
  }
  table.unlink_all();
  ::_exit(0);
}

// ---- The creator's side ---------------------------------------------------------------------

class Tracker {
 public:
  static Tracker& instance() {
    static Tracker* t = [] {
      auto* tr = new Tracker;  // never destroyed: used until the very end of the process
      ::pthread_atfork(
          nullptr, nullptr, +[] { instance().forget_in_child(); });
      return tr;
    }();
    return *t;
  }

  // Tells the tracker (starting it if needed) that this process owns `name`.
  void register_name(const std::string& name) {
    std::lock_guard lock(mutex_);
    names_.insert(name);
    try {
      if (sock_ >= 0 && send_locked('R', name)) return;
      // None yet in this process, or it went away: start one and give it every live name.
      start_locked();
      for (const auto& n : names_) {
        if (!send_locked('R', n)) {
          throw std::runtime_error("cannot register shared memory with the tracker: it exited");
        }
      }
    } catch (...) {
      names_.erase(name);
      throw;
    }
  }

  void unregister_name(const std::string& name) noexcept {
    std::lock_guard lock(mutex_);
    names_.erase(name);
    if (sock_ >= 0) send_locked('U', name);  // a missing tracker has nothing to forget
  }

  pid_t pid() noexcept {
    std::lock_guard lock(mutex_);
    return tracker_pid_;
  }

 private:
  // In a fork child: the parent's tracker watches the parent, not us. Forget it without
  // touching the mutex or freeing anything (another thread may have held them at fork).
  void forget_in_child() noexcept {
    new (&mutex_) std::mutex();
    new (&names_) std::set<std::string>();
    if (sock_ >= 0) ::close(sock_);
    sock_ = -1;
    tracker_pid_ = 0;
  }

  bool send_locked(char op, const std::string& name) noexcept {
    char msg[kNameMax + 3];
    std::size_t len = name.size() + 2;
    msg[0] = op;
    std::memcpy(msg + 1, name.data(), name.size());
    msg[len - 1] = '\n';
    std::size_t off = 0;
    while (off < len) {
      ssize_t n = ::send(sock_, msg + off, len - off, MSG_NOSIGNAL);
      if (n == -1) {
        if (errno == EINTR) continue;
        return false;  // EPIPE, ECONNRESET: the tracker is gone
      }
      off += static_cast<std::size_t>(n);
    }
    return true;
  }

  void start_locked() {
    if (sock_ >= 0) ::close(sock_);
    sock_ = -1;
    tracker_pid_ = 0;
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
      throw_errno("create a socket pair for the shared memory tracker");
    }
    UniqueFd mine(sv[0]), theirs(sv[1]);
    UniqueFd self_pidfd(pidfd_open(::getpid()));
    if (!self_pidfd) throw_errno("open a pidfd of this process for the shared memory tracker");

    pid_t mid = -1;
    {
      ForkGuard gate;  // mp's background threads at a safe point (mp/detail/fork_gate.hpp)
      mid = ::fork();
    }
    if (mid == -1) throw_errno("fork the shared memory tracker");
    if (mid == 0) {
      // The intermediate: fork the tracker and leave at once, so that the tracker is
      // reparented and never is a child of the creator.
      pid_t t = ::fork();
      if (t == 0) run_tracker(theirs.get(), self_pidfd.get());
      ::_exit(t == -1 ? 1 : 0);
    }
    theirs.reset();
    self_pidfd.reset();
    int status = 0;
    if (retry_eintr([&] { return ::waitpid(mid, &status, 0); }) == -1) {
      throw_errno(fmt::format("wait for the shared memory tracker's parent {}", mid));
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      throw std::runtime_error("cannot start the shared memory tracker: fork failed");
    }
    pid_t tracker = 0;
    std::size_t got = 0;
    while (got < sizeof tracker) {
      ssize_t n =
          ::recv(mine.get(), reinterpret_cast<char*>(&tracker) + got, sizeof tracker - got, 0);
      if (n == -1 && errno == EINTR) continue;
      if (n <= 0) {
        if (n == 0) throw std::runtime_error("cannot start the shared memory tracker: it exited");
        throw_errno("read the shared memory tracker's handshake");
      }
      got += static_cast<std::size_t>(n);
    }
    sock_ = mine.release();
    tracker_pid_ = tracker;
  }

  std::mutex mutex_;
  int sock_ = -1;
  pid_t tracker_pid_ = 0;
  std::set<std::string> names_;
};

// The MP_SHM_TAG environment variable, checked: letters, digits, '_' and '.', at most 64.
std::string shm_tag() {
  const char* tag = std::getenv("MP_SHM_TAG");
  if (!tag || !*tag) return {};
  std::string_view t(tag);
  bool ok = t.size() <= 64 && std::all_of(t.begin(), t.end(), [](char c) {
              return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                     c == '_' || c == '.';
            });
  if (!ok) {
    throw std::invalid_argument(fmt::format(
        "cannot name shared memory with MP_SHM_TAG='{}': use at most 64 letters, digits, '_' "
        "or '.'",
        t));
  }
  return std::string(t) + "-";
}

// A unique generated name: "/mp-[<tag>-]<pid>-<16 hex digits>".
std::string generate_name() {
  std::uint64_t r = 0;
  if (::getrandom(&r, sizeof r, GRND_NONBLOCK) != static_cast<ssize_t>(sizeof r)) {
    static std::atomic<std::uint64_t> counter{0};
    r = static_cast<std::uint64_t>(::getpid()) * 0x9e3779b97f4a7c15ULL +
        static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) +
        counter.fetch_add(1);
  }
  return fmt::format("/mp-{}{}-{:016x}", shm_tag(), ::getpid(), r);
}

// "/x" for "x"; names keep their slash otherwise.
std::string with_slash(std::string_view name) {
  if (!name.empty() && name.front() == '/') return std::string(name);
  // Built by appending: GCC 12's -Wrestrict misfires on "/" + std::string (bug 105329).
  std::string out;
  out.reserve(name.size() + 1);
  out += '/';
  out += name;
  return out;
}

void check_name(const std::string& name, std::string_view verb) {
  std::string why = invalid_shm_name_reason(name);
  if (!why.empty()) {
    throw std::invalid_argument(fmt::format("cannot {} shared memory '{}': {}", verb, name, why));
  }
}

std::byte* map_segment(int fd, std::size_t size, const std::string& name) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw_errno(fmt::format("map shared memory '{}' ({} bytes)", name, size));
  return static_cast<std::byte*>(p);
}

}  // namespace

std::string invalid_shm_name_reason(std::string_view name) {
  if (name.size() < 2 || name.front() != '/') return "a name is '/' followed by a file name";
  if (name.size() - 1 > kNameMax) return fmt::format("longer than {} characters", kNameMax);
  if (name.find('/', 1) != std::string_view::npos) return "a name cannot contain another '/'";
  if (name == "/." || name == "/..") return "'.' and '..' are not names";
  if (name.find('\0') != std::string_view::npos || name.find('\n') != std::string_view::npos) {
    return "a name cannot contain NUL or newline characters";
  }
  return {};
}

pid_t shm_tracker_pid() noexcept { return Tracker::instance().pid(); }

}  // namespace detail

// ---- SharedMemory ---------------------------------------------------------------------------

SharedMemory SharedMemory::create(std::size_t size, std::string_view name, bool track) {
  if (size == 0) {
    throw std::invalid_argument("cannot create shared memory: the size must be at least 1 byte");
  }
  if (size > static_cast<std::size_t>(std::numeric_limits<off_t>::max())) {
    throw std::invalid_argument(
        fmt::format("cannot create shared memory of {} bytes: too large", size));
  }
  bool generated = name.empty();
  std::string full;
  if (!generated) {
    full = detail::with_slash(name);
    if (full.rfind("/mp-", 0) != 0) {
      throw std::invalid_argument(fmt::format(
          "cannot create shared memory '{}': names made by mp must start with /mp- (so that "
          "leaks can be found in /dev/shm)",
          name));
    }
    detail::check_name(full, "create");
  }

  for (int attempt = 0;; ++attempt) {
    if (generated) full = detail::generate_name();
    // Register before the name exists, so that no moment exists where the name is there
    // and a SIGKILL would leave it behind.
    if (track) detail::Tracker::instance().register_name(full);
    detail::UniqueFd fd(::shm_open(full.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600));
    if (!fd) {
      int err = errno;
      if (track) detail::Tracker::instance().unregister_name(full);
      if (err == EEXIST && generated && attempt < 16) continue;
      throw system_error(err, fmt::format("create shared memory '{}'", full));
    }
    SharedMemory shm;
    shm.name_ = full;
    shm.creator_ = track ? ::getpid() : 0;
    auto undo = [&](int err, std::string action) {
      ::shm_unlink(full.c_str());
      if (track) detail::Tracker::instance().unregister_name(full);
      shm.creator_ = 0;
      return system_error(err, action);
    };
    if (detail::retry_eintr([&] { return ::ftruncate(fd.get(), static_cast<off_t>(size)); }) ==
        -1) {
      throw undo(errno, fmt::format("size shared memory '{}' to {} bytes", full, size));
    }
    try {
      shm.data_ = detail::map_segment(fd.get(), size, full);
    } catch (const std::system_error& e) {
      throw undo(e.code().value(), fmt::format("map shared memory '{}' ({} bytes)", full, size));
    }
    shm.size_ = size;
    return shm;
  }
}

SharedMemory SharedMemory::attach(std::string_view name) {
  std::string full = detail::with_slash(name);
  detail::check_name(full, "attach");
  detail::UniqueFd fd(::shm_open(full.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd) throw_errno(fmt::format("attach shared memory '{}'", full));
  struct stat st {};
  if (::fstat(fd.get(), &st) == -1) throw_errno(fmt::format("inspect shared memory '{}'", full));
  if (st.st_size <= 0) {
    throw std::invalid_argument(fmt::format("cannot attach shared memory '{}': it is empty", full));
  }
  SharedMemory shm;
  shm.name_ = full;
  shm.size_ = static_cast<std::size_t>(st.st_size);
  shm.data_ = detail::map_segment(fd.get(), shm.size_, full);
  return shm;
}

SharedMemory::SharedMemory(SharedMemory&& o) noexcept
    : name_(std::move(o.name_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      creator_(std::exchange(o.creator_, 0)) {}

SharedMemory& SharedMemory::operator=(SharedMemory&& o) noexcept {
  if (this != &o) {
    SharedMemory old(std::move(*this));  // released (unlinked if owned) at the end of scope
    name_ = std::move(o.name_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    creator_ = std::exchange(o.creator_, 0);
  }
  return *this;
}

SharedMemory::~SharedMemory() {
  try {
    if (owns_name()) unlink();
    close();
  } catch (const std::exception& e) {
    detail::report_noexcept(e.what());
  }
}

bool SharedMemory::owns_name() const noexcept { return creator_ != 0 && creator_ == ::getpid(); }

void SharedMemory::close() {
  if (!data_) return;
  if (::munmap(data_, size_) == -1) throw_errno(fmt::format("unmap shared memory '{}'", name_));
  data_ = nullptr;
  size_ = 0;
}

void SharedMemory::unlink() {
  if (name_.empty()) throw ProcessError("cannot unlink shared memory: this object has no name");
  if (::shm_unlink(name_.c_str()) == -1 && errno != ENOENT) {
    throw_errno(fmt::format("unlink shared memory '{}'", name_));
  }
  if (owns_name()) detail::Tracker::instance().unregister_name(name_);
  creator_ = 0;
}

}  // namespace mp
