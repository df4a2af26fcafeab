// mp/src/listener.cpp - Listener, Client and the HMAC handshake (see mp/listener.hpp).
#include "mp/listener.hpp"

#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "mp/error.hpp"

namespace mp {
namespace detail {
namespace {

constexpr std::string_view kChallenge = "#CHALLENGE#";
constexpr std::string_view kWelcome = "#WELCOME#";
constexpr std::string_view kFailure = "#FAILURE#";
constexpr std::size_t kChallengeBytes = 40;
constexpr std::uint32_t kMaxHandshakeMessage = 256;

using Clock = std::chrono::steady_clock;

// Waits until fd is readable or the deadline passes.
void wait_readable(int fd, Clock::time_point deadline, std::string_view what) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      throw TimeoutError(fmt::format("cannot {}: the peer did not answer within {} s", what,
                                     kHandshakeTimeout.count()));
    }
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r > 0) return;
    if (r == -1 && errno != EINTR) throw_errno(what);
  }
}

void read_exact(int fd, char* p, std::size_t n, Clock::time_point deadline, std::string_view what) {
  std::size_t got = 0;
  while (got < n) {
    wait_readable(fd, deadline, what);
    ssize_t r = ::recv(fd, p + got, n - got, 0);
    if (r == -1) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == ECONNRESET)
        r = 0;
      else
        throw_errno(what);
    }
    if (r == 0) throw EOFError(fmt::format("cannot {}: the peer closed the connection", what));
    got += static_cast<std::size_t>(r);
  }
}

// Handshake messages: a 4-byte length, then the bytes.
void send_message(int fd, std::string_view body, std::string_view what) {
  std::string frame(4, '\0');
  auto len = static_cast<std::uint32_t>(body.size());
  std::memcpy(frame.data(), &len, 4);
  frame.append(body);
  send_all(fd, frame.data(), frame.size(), what);
}

std::string recv_message(int fd, Clock::time_point deadline, std::string_view what) {
  std::uint32_t len = 0;
  read_exact(fd, reinterpret_cast<char*>(&len), 4, deadline, what);
  if (len > kMaxHandshakeMessage) {
    throw AuthenticationError(
        fmt::format("cannot {}: the peer sent {} bytes where a handshake message has at most {} "
                    "(not an mp peer?)",
                    what, len, kMaxHandshakeMessage));
  }
  std::string body(len, '\0');
  read_exact(fd, body.data(), len, deadline, what);
  return body;
}

bool same_digest(std::string_view a, std::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

void set_nodelay(int fd) {
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == -1) {
    throw_errno("set TCP_NODELAY on a socket");
  }
}

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) {
    throw std::invalid_argument(fmt::format(
        "cannot use Unix socket path '{}': longer than {} bytes", path, sizeof sa.sun_path - 1));
  }
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  return sa;
}

struct AddrInfo {
  addrinfo* list = nullptr;
  ~AddrInfo() {
    if (list) ::freeaddrinfo(list);
  }
};

void resolve(const SocketAddress& a, bool passive, AddrInfo& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  int rc = ::getaddrinfo(a.host.c_str(), a.port.c_str(), &hints, &out.list);
  if (rc != 0) {
    throw std::invalid_argument(
        fmt::format("cannot resolve address 'tcp:{}:{}': {}", a.host, a.port, ::gai_strerror(rc)));
  }
}

std::string tcp_name(const sockaddr* sa) {
  char host[NI_MAXHOST], port[NI_MAXSERV];
  socklen_t len = sa->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  int rc =
      ::getnameinfo(sa, len, host, sizeof host, port, sizeof port, NI_NUMERICHOST | NI_NUMERICSERV);
  if (rc != 0) throw std::runtime_error(fmt::format("cannot name a socket: {}", gai_strerror(rc)));
  if (sa->sa_family == AF_INET6) return fmt::format("tcp:[{}]:{}", host, port);
  return fmt::format("tcp:{}:{}", host, port);
}

std::string temp_base() {
  const char* t = std::getenv("TMPDIR");
  // Long TMPDIRs would not fit a socket path (108 bytes).
  if (t && *t == '/' && std::strlen(t) < 60) return t;
  return "/tmp";
}

}  // namespace

SocketAddress parse_address(std::string_view address) {
  SocketAddress a;
  if (address.starts_with("tcp:")) {
    std::string_view rest = address.substr(4);
    std::size_t colon;
    if (rest.starts_with("[")) {
      std::size_t close = rest.find(']');
      if (close == std::string_view::npos || close + 1 >= rest.size() || rest[close + 1] != ':') {
        throw std::invalid_argument(
            fmt::format("cannot use address '{}': expected tcp:[v6-address]:port", address));
      }
      a.host = std::string(rest.substr(1, close - 1));
      colon = close + 1;
    } else {
      colon = rest.rfind(':');
      if (colon == std::string_view::npos) {
        throw std::invalid_argument(
            fmt::format("cannot use address '{}': expected tcp:host:port", address));
      }
      a.host = std::string(rest.substr(0, colon));
    }
    a.port = std::string(rest.substr(colon + 1));
    if (a.host.empty() || a.port.empty() ||
        a.port.find_first_not_of("0123456789") != std::string::npos || a.port.size() > 5 ||
        std::stoul(a.port) > 65535) {
      throw std::invalid_argument(fmt::format(
          "cannot use address '{}': expected tcp:host:port with a port 0-65535", address));
    }
    a.tcp = true;
    return a;
  }
  std::string_view path = address.starts_with("unix:") ? address.substr(5) : address;
  if (path.empty() || path.find('\0') != std::string_view::npos) {
    throw std::invalid_argument(fmt::format(
        "cannot use address '{}': expected unix:/path, /path or tcp:host:port", address));
  }
  a.path = std::string(path);
  return a;
}

void send_all(int fd, const void* data, std::size_t n, std::string_view what) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w == -1) {
      if (errno == EINTR) continue;
      throw_errno(what);
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

UniqueFd listen_on(std::string_view address, int backlog, std::string& bound,
                   std::string& socket_path, std::string& private_dir) {
  if (address.empty()) {
    std::string templ = temp_base() + "/mp-XXXXXX";
    if (!::mkdtemp(templ.data())) throw_errno(fmt::format("create a private directory {}", templ));
    private_dir = templ;  // mkdtemp makes it 0700
    address = {};
    std::string path = private_dir + "/listener";
    try {
      return listen_on("unix:" + path, backlog, bound, socket_path, private_dir);
    } catch (...) {
      ::rmdir(private_dir.c_str());
      private_dir.clear();
      throw;
    }
  }
  SocketAddress a = parse_address(address);
  if (!a.tcp) {
    sockaddr_un sa = unix_address(a.path);
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throw_errno("create a Unix socket");
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) == -1) {
      throw_errno(fmt::format("bind a Unix socket to {}", a.path));
    }
    if (::listen(fd.get(), backlog) == -1) {
      int err = errno;
      ::unlink(a.path.c_str());
      throw system_error(err, fmt::format("listen on {}", a.path));
    }
    socket_path = a.path;
    bound = "unix:" + a.path;
    return fd;
  }
  AddrInfo ai;
  resolve(a, true, ai);
  int last_err = 0;
  for (addrinfo* p = ai.list; p; p = p->ai_next) {
    UniqueFd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (!fd) {
      last_err = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), p->ai_addr, p->ai_addrlen) == -1 || ::listen(fd.get(), backlog) == -1) {
      last_err = errno;
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len) == -1) {
      throw_errno("read the address of a listening socket");
    }
    bound = tcp_name(reinterpret_cast<sockaddr*>(&ss));
    return fd;
  }
  throw system_error(last_err, fmt::format("listen on {}", address));
}

UniqueFd connect_to(std::string_view address) {
  SocketAddress a = parse_address(address);
  if (!a.tcp) {
    sockaddr_un sa = unix_address(a.path);
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throw_errno("create a Unix socket");
    if (retry_eintr([&] {
          return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa);
        }) == -1) {
      throw_errno(fmt::format("connect to {} (is the server running?)", address));
    }
    return fd;
  }
  AddrInfo ai;
  resolve(a, false, ai);
  int last_err = ECONNREFUSED;
  for (addrinfo* p = ai.list; p; p = p->ai_next) {
    UniqueFd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (!fd) {
      last_err = errno;
      continue;
    }
    // connect() interrupted by a signal goes on in the background; EINTR is not retried.
    if (::connect(fd.get(), p->ai_addr, p->ai_addrlen) == -1) {
      last_err = errno;
      continue;
    }
    set_nodelay(fd.get());
    return fd;
  }
  throw system_error(last_err, fmt::format("connect to {} (is the server running?)", address));
}

std::string hmac_sha256(std::string_view key, std::string_view message) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  // An empty key is valid for HMAC; OpenSSL wants a non-null pointer.
  static const unsigned char empty = 0;
  const void* k = key.empty() ? &empty : static_cast<const void*>(key.data());
  if (!::HMAC(EVP_sha256(), k, static_cast<int>(key.size()),
              reinterpret_cast<const unsigned char*>(message.data()), message.size(), out, &len)) {
    throw std::runtime_error("cannot compute an HMAC-SHA256 digest (OpenSSL failed)");
  }
  return std::string(reinterpret_cast<char*>(out), len);
}

std::string random_bytes(std::size_t n) {
  std::string out(n, '\0');
  if (::RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    throw std::runtime_error("cannot draw random bytes (OpenSSL RAND_bytes failed)");
  }
  return out;
}

void deliver_challenge(int fd, std::string_view authkey, Clock::time_point deadline) {
  std::string nonce = random_bytes(kChallengeBytes);
  send_message(fd, std::string(kChallenge) + nonce, "send an authentication challenge");
  std::string answer = recv_message(fd, deadline, "receive the answer to a challenge");
  if (same_digest(answer, hmac_sha256(authkey, nonce))) {
    send_message(fd, kWelcome, "send the result of a challenge");
    return;
  }
  try {
    send_message(fd, kFailure, "send the result of a challenge");
  } catch (const std::exception&) {  // the peer may be gone already: the verdict stands
  }
  throw AuthenticationError("authentication failed: the digest received was wrong (wrong authkey)");
}

void answer_challenge(int fd, std::string_view authkey, Clock::time_point deadline) {
  std::string challenge = recv_message(fd, deadline, "receive an authentication challenge");
  if (!challenge.starts_with(kChallenge)) {
    throw AuthenticationError(
        "authentication failed: the peer sent no challenge (not an mp peer?)");
  }
  std::string_view nonce = std::string_view(challenge).substr(kChallenge.size());
  send_message(fd, hmac_sha256(authkey, nonce), "answer an authentication challenge");
  // An end of file here is not a verdict: deliver_challenge always sends one, even on a
  // wrong key, so a peer that hangs up instead has gone away (EOFError, as Python's).
  std::string verdict = recv_message(fd, deadline, "receive the result of a challenge");
  if (verdict != kWelcome) {
    throw AuthenticationError(
        "authentication failed: the digest we sent was rejected (wrong authkey)");
  }
}

void authenticate_as_server(int fd, std::string_view authkey) {
  auto deadline = Clock::now() + kHandshakeTimeout;
  deliver_challenge(fd, authkey, deadline);
  answer_challenge(fd, authkey, deadline);
}

void authenticate_as_client(int fd, std::string_view authkey) {
  auto deadline = Clock::now() + kHandshakeTimeout;
  answer_challenge(fd, authkey, deadline);
  deliver_challenge(fd, authkey, deadline);
}

}  // namespace detail

// ---- Listener ------------------------------------------------------------------------------

Listener::Listener(std::string_view address, std::string authkey, int backlog)
    : authkey_(std::move(authkey)), owner_(::getpid()) {
  fd_ = detail::listen_on(address, backlog, address_, socket_path_, private_dir_);
}

Listener::Listener(Listener&& o) noexcept
    : fd_(std::move(o.fd_)),
      address_(std::move(o.address_)),
      authkey_(std::move(o.authkey_)),
      socket_path_(std::exchange(o.socket_path_, {})),
      private_dir_(std::exchange(o.private_dir_, {})),
      owner_(o.owner_) {}

Listener& Listener::operator=(Listener&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = std::move(o.fd_);
    address_ = std::move(o.address_);
    authkey_ = std::move(o.authkey_);
    socket_path_ = std::exchange(o.socket_path_, {});
    private_dir_ = std::exchange(o.private_dir_, {});
    owner_ = o.owner_;
  }
  return *this;
}

Listener::~Listener() { close(); }

void Listener::close() noexcept {
  fd_.reset();
  if (owner_ != ::getpid()) return;  // a fork child's copy: the files are the parent's
  if (!socket_path_.empty() && ::unlink(socket_path_.c_str()) == -1 && errno != ENOENT) {
    detail::report_noexcept(fmt::format("cannot remove socket {}", socket_path_));
  }
  socket_path_.clear();
  if (!private_dir_.empty() && ::rmdir(private_dir_.c_str()) == -1 && errno != ENOENT) {
    detail::report_noexcept(fmt::format("cannot remove directory {}", private_dir_));
  }
  private_dir_.clear();
}

Connection Listener::accept() {
  if (!fd_) throw ProcessError("cannot accept on a closed Listener");
  int fd =
      detail::retry_eintr([&] { return ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC); });
  if (fd == -1) throw_errno(fmt::format("accept a connection on {}", address_));
  detail::UniqueFd peer(fd);
  if (!socket_path_.empty() || address_.starts_with("unix:")) {
    // nothing to set for Unix sockets
  } else {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  if (!authkey_.empty()) detail::authenticate_as_server(fd, authkey_);
  return Connection::from_fd(peer.release(), true, true);
}

Connection Client(std::string_view address, std::string_view authkey) {
  detail::UniqueFd fd = detail::connect_to(address);
  if (!authkey.empty()) detail::authenticate_as_client(fd.get(), authkey);
  return Connection::from_fd(fd.release(), true, true);
}

}  // namespace mp
