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
  UniqueFd fd;          // the descriptor read from (a socket or pipe), or written to if write-only
  UniqueFd wfd;         // the descriptor written to when it is another one (a duplex Pipe's pipe)
  bool socket = false;  // the descriptor written to is a socket: send with MSG_NOSIGNAL
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
  int out() const noexcept { return wfd ? wfd.get() : fd.get(); }
  void drop() noexcept {
    fd.reset();
    wfd.reset();
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

// ---- SIGPIPE ------------------------------------------------------------------------------
// Writing to a pipe whose reader is gone raises SIGPIPE, which by default kills the writer.
// Sockets avoid it with MSG_NOSIGNAL; pipes have no such flag, and blocking the signal
// around every write would cost two more system calls per message. So, once, if SIGPIPE
// still has its default action, mp installs a handler: a SIGPIPE raised by a Connection's
// own write (flagged per thread) is swallowed and the write fails with EPIPE, which becomes
// a clear error; any other SIGPIPE restores the default action and is raised again, so the
// process ends exactly as it would have. A SIG_IGN or a handler of the program's own is
// left alone (both already keep the writer alive). exec() resets handlers to the default.
thread_local volatile sig_atomic_t t_in_connection_write = 0;

void on_sigpipe(int sig) {
  if (t_in_connection_write) return;
  ::signal(sig, SIG_DFL);
  ::raise(sig);  // pending until this handler returns, then the default action
}

void install_sigpipe_handler_once() {
  static bool done = [] {
    struct sigaction cur {};
    if (::sigaction(SIGPIPE, nullptr, &cur) == -1) throw_errno("read the action of SIGPIPE");
    if (!(cur.sa_flags & SA_SIGINFO) && cur.sa_handler == SIG_DFL) {
      struct sigaction sa {};
      sa.sa_handler = on_sigpipe;
      sa.sa_flags = SA_RESTART;
      sigemptyset(&sa.sa_mask);
      if (::sigaction(SIGPIPE, &sa, nullptr) == -1) throw_errno("install a SIGPIPE handler");
    }
    return true;
  }();
  (void)done;
}

struct InWrite {
  InWrite() noexcept { t_in_connection_write = 1; }
  ~InWrite() { t_in_connection_write = 0; }
  InWrite(const InWrite&) = delete;
  InWrite& operator=(const InWrite&) = delete;
};

// Writes all of iov[0, count) (header and payload of one frame). Partial writes (a signal
// in the middle of a large message) continue where they stopped.
void write_frame(ConnState& s, iovec* iov, int count, std::size_t total) {
  InWrite flag;
  int out = s.out();
  std::size_t done = 0;
  while (done < total) {
    ssize_t n;
    if (s.socket) {
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<std::size_t>(count);
      n = ::sendmsg(out, &msg, MSG_NOSIGNAL);
    } else {
      n = count == 1 ? ::write(out, iov[0].iov_base, iov[0].iov_len) : ::writev(out, iov, count);
    }
    if (n == -1) {
      int err = errno;
      if (err == EINTR) continue;
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
  return from_fds(fd, -1, readable, writable);
}

Connection Connection::from_fds(int fd, int wfd, bool readable, bool writable) {
  detail::UniqueFd owned(fd), owned_w(wfd);
  int out = wfd >= 0 ? wfd : fd;
  struct stat st {};
  if (::fstat(out, &st) == -1) throw_errno(fmt::format("inspect connection descriptor {}", out));
  Connection c;
  c.state_ = std::make_shared<detail::ConnState>();
  c.state_->fd = std::move(owned);
  c.state_->wfd = std::move(owned_w);
  c.state_->socket = S_ISSOCK(st.st_mode);
  c.state_->readable = readable;
  c.state_->writable = writable;
  if (writable && !c.state_->socket) detail::install_sigpipe_handler_once();
  return c;
}

std::pair<int, int> Connection::descriptors() const {
  const detail::ConnState& s = open_state(state_, "serialize");
  return {s.fd.get(), s.wfd ? s.wfd.get() : -1};
}

Connection Connection::adopt_imported(int fd, int wfd, bool r, bool w, std::uint64_t max,
                                      std::string ahead) {
  // The received descriptors belong to the code that received them; this end takes copies.
  detail::UniqueFd own(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!own) throw_errno(fmt::format("duplicate received connection descriptor {}", fd));
  detail::UniqueFd own_w;
  if (wfd >= 0) {
    own_w.reset(::fcntl(wfd, F_DUPFD_CLOEXEC, 0));
    if (!own_w) throw_errno(fmt::format("duplicate received connection descriptor {}", wfd));
  }
  int w_raw = own_w ? own_w.get() : -1;
  Connection c = from_fds(own.get(), w_raw, r, w);
  own.release();
  own_w.release();
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
  int ab[2];
  if (::pipe2(ab, O_CLOEXEC) == -1) throw_errno("create a Pipe (pipe2)");
  detail::UniqueFd ab_r(ab[0]), ab_w(ab[1]);
  if (!duplex) {
    Connection reader = Connection::from_fd(ab_r.release(), true, false);
    Connection writer = Connection::from_fd(ab_w.release(), false, true);
    pair_up(reader.state_, writer.state_);
    return {std::move(reader), std::move(writer)};
  }
  // Duplex: a pipe each way. (A socket pair would do with one descriptor per end, but on
  // Linux its round trip costs about twice a pipe's.)
  int ba[2];
  if (::pipe2(ba, O_CLOEXEC) == -1) throw_errno("create a Pipe (pipe2)");
  detail::UniqueFd ba_r(ba[0]), ba_w(ba[1]);
  Connection first = Connection::from_fds(ba_r.get(), ab_w.get(), true, true);
  ba_r.release();
  ab_w.release();
  Connection second = Connection::from_fds(ab_r.get(), ba_w.get(), true, true);
  ab_r.release();
  ba_w.release();
  pair_up(first.state_, second.state_);
  return {std::move(first), std::move(second)};
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
