// mp/src/connection.cpp - Pipe, Connection and wait (see mp/connection.hpp).
#include "mp/connection.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <ctime>

#include "mp/detail/fd.hpp"
#include "mp/detail/futex.hpp"
#include "mp/error.hpp"

namespace mp {
namespace detail {

// The read-ahead buffer: a small message and the header of the next one arrive in one
// read(). Payloads of half of it or more are read straight into their destination.
constexpr std::size_t kReadBuffer = 64 * 1024;
// Messages up to this size are copied behind their header and written with one write();
// larger ones go out with writev/sendmsg of header and payload (also one call).
constexpr std::size_t kInlineSend = 1024;
constexpr std::size_t kHeader = sizeof(std::uint64_t);

struct ConnState {
  UniqueFd fd;
  bool socket = false;
  bool readable = false;
  bool writable = false;
  std::size_t max_message = kDefaultMaxMessageSize;
  std::unique_ptr<char[]> rbuf;
  std::size_t rbeg = 0, rend = 0;
  // The other end made by the same Pipe() call, and who made it (see "inherited ends").
  std::weak_ptr<ConnState> sibling;
  pid_t creator = 0;
  unsigned generation = 0;

  std::size_t buffered() const noexcept { return rend - rbeg; }
  void drop() noexcept {
    fd.reset();
    rbuf.reset();
    rbeg = rend = 0;
  }
};

namespace {

// ---- Inherited ends -------------------------------------------------------------------------
// A fork child inherits both ends of every pair its parent made. The first time a process
// other than the pair's creator uses one end, it closes its copy of the other end: it talks
// through one end, and holding the other would keep EOF from ever reaching it (or its
// peer). The check runs once per end and fork, keyed by a counter that fork increments.
std::atomic<unsigned> g_fork_generation{1};

void count_forks_once() {
  static bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, [] { g_fork_generation.fetch_add(1); });
    return true;
  }();
  (void)registered;
}

void close_inherited_sibling(ConnState& s) noexcept {
  unsigned gen = g_fork_generation.load(std::memory_order_relaxed);
  if (s.generation == gen) return;
  s.generation = gen;
  if (s.creator == ::getpid()) return;
  if (auto sib = s.sibling.lock()) sib->drop();
  s.sibling.reset();
}

// Blocks SIGPIPE in this thread around a write to a pipe, so that a reader that has gone
// gives EPIPE instead of killing the process, and swallows the SIGPIPE the write raised.
// Sockets don't need it: they use MSG_NOSIGNAL.
class SigpipeGuard {
 public:
  SigpipeGuard() noexcept {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
    changed_ = !sigismember(&old_, SIGPIPE);
  }
  ~SigpipeGuard() {
    if (!changed_) return;  // it was blocked before us: whatever is pending stays pending
    if (got_epipe_) {
      timespec zero{0, 0};
      while (::sigtimedwait(&pipe_, nullptr, &zero) == -1 && errno == EINTR) {
      }
    }
    ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  void saw_epipe() noexcept { got_epipe_ = true; }
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;

 private:
  sigset_t pipe_{}, old_{};
  bool changed_ = false;
  bool got_epipe_ = false;
};

// Writes all of iov[0, count) (header and payload of one frame). Partial writes (a signal
// in the middle of a large message) continue where they stopped.
void write_frame(ConnState& s, iovec* iov, int count, std::size_t total) {
  std::optional<SigpipeGuard> guard;
  if (!s.socket) guard.emplace();
  std::size_t done = 0;
  while (done < total) {
    ssize_t n;
    if (s.socket) {
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<std::size_t>(count);
      n = ::sendmsg(s.fd.get(), &msg, MSG_NOSIGNAL);
    } else {
      n = count == 1 ? ::write(s.fd.get(), iov[0].iov_base, iov[0].iov_len)
                     : ::writev(s.fd.get(), iov, count);
    }
    if (n == -1) {
      int err = errno;
      if (err == EINTR) continue;
      if (err == EPIPE && guard) guard->saw_epipe();
      if (err == EPIPE || err == ECONNRESET) {
        throw system_error(err, fmt::format("send a message of {} bytes on connection fd {}: "
                                            "the other end is closed",
                                            total - kHeader, s.fd.get()));
      }
      throw system_error(err, fmt::format("send a message of {} bytes on connection fd {}",
                                          total - kHeader, s.fd.get()));
    }
    done += static_cast<std::size_t>(n);
    // Skip what was written.
    auto left = static_cast<std::size_t>(n);
    while (count > 0 && left >= iov[0].iov_len) {
      left -= iov[0].iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov[0].iov_base = static_cast<char*>(iov[0].iov_base) + left;
      iov[0].iov_len -= left;
    }
  }
}

[[noreturn]] void throw_eof(const ConnState& s, std::size_t got, std::size_t expected) {
  if (got == 0) {
    throw EOFError(
        fmt::format("cannot receive from connection fd {}: the other end was closed (end of file)",
                    s.fd.get()));
  }
  throw EOFError(fmt::format(
      "cannot receive from connection fd {}: the other end was closed in the middle of a "
      "message (got {} of {} bytes)",
      s.fd.get(), got, expected));
}

// One read() into dst; 0 on end of file (ECONNRESET counts as one: the peer died with
// data we sent unread).
std::size_t read_some(ConnState& s, void* dst, std::size_t n) {
  for (;;) {
    ssize_t r = ::read(s.fd.get(), dst, n);
    if (r >= 0) return static_cast<std::size_t>(r);
    if (errno == EINTR) continue;
    if (errno == ECONNRESET) return 0;
    throw_errno(fmt::format("receive from connection fd {}", s.fd.get()));
  }
}

// Makes at least `need` (<= kReadBuffer) bytes available in the read-ahead buffer.
// `got_before`/`expected` describe the message being read, for the EOF message.
void fill(ConnState& s, std::size_t need, std::size_t got_before, std::size_t expected) {
  if (!s.rbuf) s.rbuf = std::make_unique<char[]>(kReadBuffer);
  if (s.rbeg == s.rend) s.rbeg = s.rend = 0;
  if (kReadBuffer - s.rbeg < need) {
    std::memmove(s.rbuf.get(), s.rbuf.get() + s.rbeg, s.buffered());
    s.rend -= s.rbeg;
    s.rbeg = 0;
  }
  while (s.buffered() < need) {
    std::size_t n = read_some(s, s.rbuf.get() + s.rend, kReadBuffer - s.rend);
    if (n == 0) throw_eof(s, got_before + s.buffered(), expected);
    s.rend += n;
  }
}

std::uint64_t read_header(ConnState& s) {
  fill(s, kHeader, 0, kHeader);
  std::uint64_t len = 0;
  std::memcpy(&len, s.rbuf.get() + s.rbeg, kHeader);
  s.rbeg += kHeader;
  if (len > s.max_message) {
    int fd = s.fd.get();
    std::size_t limit = s.max_message;
    s.drop();
    throw MessageTooLarge(
        fmt::format("cannot receive a message of {} bytes on connection fd {}: over its limit "
                    "of {} bytes (set_max_message_size); the connection is closed",
                    len, fd, limit),
        len, limit);
  }
  return len;
}

void read_payload(ConnState& s, char* dst, std::size_t n) {
  std::size_t off = std::min(n, s.buffered());
  std::memcpy(dst, s.rbuf.get() + s.rbeg, off);
  s.rbeg += off;
  while (off < n) {
    std::size_t left = n - off;
    if (left < kReadBuffer / 2) {
      fill(s, left, off + kHeader, n + kHeader);
      std::memcpy(dst + off, s.rbuf.get() + s.rbeg, left);
      s.rbeg += left;
      off = n;
    } else {
      std::size_t r = read_some(s, dst + off, left);
      if (r == 0) throw_eof(s, off + kHeader, n + kHeader);
      off += r;
    }
  }
}

std::string read_message(ConnState& s, std::uint64_t len) {
  std::string out(static_cast<std::size_t>(len), '\0');
  read_payload(s, out.data(), out.size());
  return out;
}

// Waits for POLLIN (or hang-up) on fds until the deadline; EINTR restarts with the time
// left. Returns the number of ready entries.
int poll_until(std::vector<pollfd>& fds,
               std::optional<std::chrono::steady_clock::time_point> deadline) {
  for (;;) {
    timespec ts{};
    timespec* tsp = nullptr;
    if (deadline) {
      auto left = *deadline - std::chrono::steady_clock::now();
      if (left < std::chrono::steady_clock::duration::zero()) left = {};
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
      ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
      tsp = &ts;
    }
    int r = ::ppoll(fds.data(), fds.size(), tsp, nullptr);
    if (r >= 0) return r;
    if (errno != EINTR) throw_errno("wait for connections to be ready (ppoll)");
  }
}

std::optional<std::chrono::steady_clock::time_point> deadline_of(std::optional<Seconds> t) {
  if (!t) return std::nullopt;
  Seconds d = std::max(*t, Seconds{0});
  // Beyond about a century, treat it as forever (and avoid overflowing the clock).
  if (d > Seconds{3e9}) return std::nullopt;
  return deadline_after(d);
}

}  // namespace

std::vector<std::size_t> wait_ready(std::span<const WaitItem> items,
                                    std::optional<Seconds> timeout) {
  std::vector<std::size_t> ready;
  std::vector<pollfd> fds(items.size());
  bool any_buffered = false;
  for (std::size_t i = 0; i < items.size(); ++i) {
    int fd = items[i].fd;
    if (items[i].conn) {
      fd = items[i].conn->fileno();
      if (items[i].conn->has_buffered()) any_buffered = true;
    }
    if (fd < 0) {
      throw std::invalid_argument(fmt::format("cannot wait for descriptor {}: not valid", fd));
    }
    fds[i] = pollfd{fd, POLLIN, 0};
  }
  // Bytes read ahead are ready now: just look at the others without waiting.
  auto deadline =
      any_buffered ? std::optional(std::chrono::steady_clock::now()) : deadline_of(timeout);
  poll_until(fds, deadline);
  for (std::size_t i = 0; i < items.size(); ++i) {
    bool buffered = items[i].conn && items[i].conn->has_buffered();
    if (buffered || fds[i].revents != 0) ready.push_back(i);
  }
  return ready;
}

}  // namespace detail

// ---- Connection ---------------------------------------------------------------------------

namespace {
detail::ConnState& open_state(const std::shared_ptr<detail::ConnState>& s, std::string_view verb) {
  if (!s || !s->fd) throw system_error(EBADF, fmt::format("{} a closed connection", verb));
  detail::close_inherited_sibling(*s);
  return *s;
}

}  // namespace

Connection::Connection() noexcept = default;

Connection Connection::from_fd(int fd, bool readable, bool writable) {
  detail::UniqueFd owned(fd);
  struct stat st {};
  if (::fstat(fd, &st) == -1) throw_errno(fmt::format("inspect connection descriptor {}", fd));
  Connection c;
  c.state_ = std::make_shared<detail::ConnState>();
  c.state_->fd = std::move(owned);
  c.state_->socket = S_ISSOCK(st.st_mode);
  c.state_->readable = readable;
  c.state_->writable = writable;
  return c;
}

Connection Connection::adopt_imported(int fd, bool r, bool w, std::uint64_t max,
                                      std::string ahead) {
  // The received descriptor belongs to the code that received it; this end takes a copy.
  int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own == -1) throw_errno(fmt::format("duplicate received connection descriptor {}", fd));
  Connection c = from_fd(own, r, w);
  c.state_->max_message = static_cast<std::size_t>(max);
  if (!ahead.empty()) {
    if (ahead.size() > detail::kReadBuffer) {
      throw SerializationError("cannot deserialize a connection: too many read-ahead bytes");
    }
    c.state_->rbuf = std::make_unique<char[]>(detail::kReadBuffer);
    std::memcpy(c.state_->rbuf.get(), ahead.data(), ahead.size());
    c.state_->rend = ahead.size();
  }
  return c;
}

void Connection::send_frame(const void* data, std::size_t size) {
  detail::ConnState& s = open_state(state_, "send on");
  if (!s.writable) {
    throw ProcessError(
        fmt::format("cannot send on connection fd {}: this end only receives (Pipe(false) gives "
                    "a receiving end first, then a sending end)",
                    s.fd.get()));
  }
  if (size > s.max_message) {
    throw MessageTooLarge(
        fmt::format("cannot send a message of {} bytes on connection fd {}: over its limit of "
                    "{} bytes (set_max_message_size); nothing was sent",
                    size, s.fd.get(), s.max_message),
        size, s.max_message);
  }
  std::uint64_t header = size;
  std::size_t total = size + detail::kHeader;
  if (size <= detail::kInlineSend) {
    char frame[detail::kHeader + detail::kInlineSend];
    std::memcpy(frame, &header, detail::kHeader);
    if (size > 0) std::memcpy(frame + detail::kHeader, data, size);
    iovec iov{frame, total};
    detail::write_frame(s, &iov, 1, total);
  } else {
    iovec iov[2] = {{&header, detail::kHeader}, {const_cast<void*>(data), size}};
    detail::write_frame(s, iov, 2, total);
  }
}

namespace {
detail::ConnState& reading_state(const std::shared_ptr<detail::ConnState>& st) {
  detail::ConnState& s = open_state(st, "receive from");
  if (!s.readable) {
    throw ProcessError(
        fmt::format("cannot receive from connection fd {}: this end only sends (Pipe(false) gives "
                    "a receiving end first, then a sending end)",
                    s.fd.get()));
  }
  return s;
}
}  // namespace

std::string Connection::recv_bytes() {
  detail::ConnState& s = reading_state(state_);
  return detail::read_message(s, detail::read_header(s));
}

void Connection::recv_exact(void* dst, std::size_t size, std::string_view what) {
  detail::ConnState& s = reading_state(state_);
  std::uint64_t len = detail::read_header(s);
  if (len != size) {
    detail::read_message(s, len);  // consume it: the next message stays readable
    throw SerializationError(
        fmt::format("cannot receive {} of {} bytes on connection fd {}: the message has {} "
                    "bytes (was another type sent?)",
                    what, size, s.fd.get(), len));
  }
  detail::read_payload(s, static_cast<char*>(dst), size);
}

std::size_t Connection::recv_bytes_into(std::span<std::byte> buf) {
  detail::ConnState& s = reading_state(state_);
  std::uint64_t len = detail::read_header(s);
  if (len > buf.size()) {
    std::string msg = detail::read_message(s, len);
    throw BufferTooShort(
        fmt::format("cannot receive a message of {} bytes into a buffer of {}", len, buf.size()),
        std::move(msg));
  }
  detail::read_payload(s, reinterpret_cast<char*>(buf.data()), static_cast<std::size_t>(len));
  return static_cast<std::size_t>(len);
}

bool Connection::poll(std::optional<Seconds> timeout) {
  detail::ConnState& s = reading_state(state_);
  if (s.buffered() > 0) return true;
  std::vector<pollfd> fds{pollfd{s.fd.get(), POLLIN, 0}};
  return detail::poll_until(fds, detail::deadline_of(timeout)) > 0;
}

void Connection::close() noexcept {
  if (state_) state_->drop();
}

bool Connection::closed() const noexcept { return !state_ || !state_->fd; }
bool Connection::readable() const noexcept { return state_ && state_->readable; }
bool Connection::writable() const noexcept { return state_ && state_->writable; }

int Connection::fileno() const { return open_state(state_, "use").fd.get(); }

std::size_t Connection::max_message_size() const noexcept {
  return state_ ? state_->max_message : kDefaultMaxMessageSize;
}

void Connection::set_max_message_size(std::size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("cannot set a maximum message size of 0 bytes");
  open_state(state_, "configure").max_message = bytes;
}

bool Connection::has_buffered() const noexcept { return state_ && state_->buffered() > 0; }

std::string Connection::buffered() const {
  if (!has_buffered()) return {};
  return std::string(state_->rbuf.get() + state_->rbeg, state_->buffered());
}

namespace {
// Makes two ends siblings: one pair, made by this process.
void pair_up(const std::shared_ptr<detail::ConnState>& a,
             const std::shared_ptr<detail::ConnState>& b) {
  detail::count_forks_once();
  a->generation = b->generation = detail::g_fork_generation.load();
  a->creator = b->creator = ::getpid();
  a->sibling = b;
  b->sibling = a;
}
}  // namespace

std::pair<Connection, Connection> Pipe(bool duplex) {
  if (duplex) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
      throw_errno("create a duplex Pipe (socketpair)");
    }
    detail::UniqueFd b(sv[1]);
    Connection first = Connection::from_fd(sv[0], true, true);
    Connection second = Connection::from_fd(b.release(), true, true);
    pair_up(first.state_, second.state_);
    return {std::move(first), std::move(second)};
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) == -1) throw_errno("create a one-way Pipe (pipe2)");
  detail::UniqueFd w(fds[1]);
  Connection reader = Connection::from_fd(fds[0], true, false);
  Connection writer = Connection::from_fd(w.release(), false, true);
  pair_up(reader.state_, writer.state_);
  return {std::move(reader), std::move(writer)};
}

std::vector<Connection> wait(const std::vector<Connection>& connections,
                             std::optional<Seconds> timeout) {
  std::vector<detail::WaitItem> items;
  items.reserve(connections.size());
  for (const auto& c : connections) items.push_back({-1, &c});
  std::vector<Connection> ready;
  for (std::size_t i : detail::wait_ready(items, timeout)) ready.push_back(connections[i]);
  return ready;
}

std::vector<Waitable> wait(const std::vector<Waitable>& objects, std::optional<Seconds> timeout) {
  std::vector<detail::WaitItem> items;
  items.reserve(objects.size());
  for (const auto& o : objects) {
    items.push_back(o.connection() ? detail::WaitItem{-1, o.connection()}
                                   : detail::WaitItem{o.fileno(), nullptr});
  }
  std::vector<Waitable> ready;
  for (std::size_t i : detail::wait_ready(items, timeout)) ready.push_back(objects[i]);
  return ready;
}

}  // namespace mp
