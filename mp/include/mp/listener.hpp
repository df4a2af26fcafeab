// mp/listener.hpp - Listener and Client: connections between processes that are not
// parent and child, over a Unix socket or TCP, with an optional authentication key.
//
//   mp::Listener server{"tcp:127.0.0.1:0", "secret"};    // port 0: the system picks one
//   std::string where = server.address();                // "tcp:127.0.0.1:40123"
//   ...in another process:
//   mp::Connection c = mp::Client(where, "secret");       // throws AuthenticationError
//   c.send(std::string("hello"));                         //   on a wrong key
//   ...in the server:
//   mp::Connection peer = server.accept();
//   auto text = peer.recv<std::string>();
//
// Addresses are strings:
//   ""                 (Listener only) a new socket in a private directory (mkdtemp, mode
//                      0700: only this user can reach it), removed when the Listener closes
//   "unix:/some/path"  a Unix socket at that path ("/some/path" alone means the same)
//   "tcp:host:port"    TCP; host is a name or a numeric address ("tcp:[::1]:0" for IPv6)
//
// Authentication (Python's deliver_challenge / answer_challenge, both ways): the server
// sends 40 random bytes, the client answers with their HMAC-SHA256 under the key, the
// server says WELCOME or FAILURE; then the same with the roles swapped, so that neither side
// talks to a peer that does not hold the key. Digests are compared in constant time. The key
// never travels. A client with a wrong key gets AuthenticationError; the Listener's accept()
// throws AuthenticationError too (as Python's), and the Listener goes on accepting. An empty
// key means no authentication (use it only on a private Unix socket). The handshake has a
// time limit (10 s), so a peer that connects and says nothing cannot block anyone forever.
//
// A connection is an ordinary mp::Connection (mp/connection.hpp): send/recv, poll, EOF.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "mp/connection.hpp"
#include "mp/detail/fd.hpp"

namespace mp {

class Listener {
 public:
  // Binds and listens. Throws std::invalid_argument for a malformed address, system_error
  // when the socket cannot be created or bound (EADDRINUSE...).
  explicit Listener(std::string_view address = {}, std::string authkey = {}, int backlog = 64);
  Listener(Listener&& other) noexcept;
  Listener& operator=(Listener&& other) noexcept;
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  ~Listener();

  // Waits for a client and authenticates it. Throws AuthenticationError when it fails the
  // challenge (its connection is closed), ProcessError when the Listener is closed.
  Connection accept();

  // The address clients pass to Client(): the real port for "tcp:host:0", the socket path
  // for a private one.
  const std::string& address() const noexcept { return address_; }
  // The listening socket, for poll/select.
  int fileno() const noexcept { return fd_.get(); }
  // Stops listening and removes the socket file (and the private directory) it created.
  void close() noexcept;

 private:
  detail::UniqueFd fd_;
  std::string address_;
  std::string authkey_;
  std::string socket_path_;  // the file to unlink at close ("" for TCP)
  std::string private_dir_;  // the directory to remove at close ("" unless we made it)
  pid_t owner_ = 0;          // only the creating process removes the files
};

// Connects to a Listener (or a Manager) at `address` and authenticates with `authkey`
// (empty: none). Throws AuthenticationError on a wrong key, system_error when nothing
// listens there (ECONNREFUSED, ENOENT), std::invalid_argument for a malformed address.
Connection Client(std::string_view address, std::string_view authkey = {});

namespace detail {

// How long a handshake may take before the peer is given up.
inline constexpr std::chrono::seconds kHandshakeTimeout{10};

// A parsed address.
struct SocketAddress {
  bool tcp = false;
  std::string path;  // unix
  std::string host;  // tcp
  std::string port;  // tcp
};
SocketAddress parse_address(std::string_view address);

// A listening socket at `address` ("" makes a private directory, returned in
// private_dir). `bound` receives the address clients should use.
UniqueFd listen_on(std::string_view address, int backlog, std::string& bound,
                   std::string& socket_path, std::string& private_dir);

// A connected stream socket (close-on-exec, TCP_NODELAY for TCP). Throws system_error
// naming the address when nothing listens there.
UniqueFd connect_to(std::string_view address);

// The two halves of the handshake and the two orders they run in. `deadline` bounds the
// whole exchange. Throw AuthenticationError on a wrong digest (a completed exchange whose
// answer or verdict says so), EOFError when the peer hangs up at any point, system_error
// on a reset, TimeoutError when it is too slow. They read exactly what the handshake sends, so the
// socket is at a message boundary afterwards.
void deliver_challenge(int fd, std::string_view authkey,
                       std::chrono::steady_clock::time_point deadline);
void answer_challenge(int fd, std::string_view authkey,
                      std::chrono::steady_clock::time_point deadline);
void authenticate_as_server(int fd, std::string_view authkey);
void authenticate_as_client(int fd, std::string_view authkey);

// HMAC-SHA256 of message under key (32 bytes), and n bytes from OpenSSL's RAND_bytes.
std::string hmac_sha256(std::string_view key, std::string_view message);
std::string random_bytes(std::size_t n);

// Writes all bytes to a socket (MSG_NOSIGNAL, EINTR retried).
void send_all(int fd, const void* data, std::size_t n, std::string_view what);

}  // namespace detail
}  // namespace mp
