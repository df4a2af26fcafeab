// mp/connection.hpp - Pipe() and Connection: messages between two processes, and
// mp::wait() for whichever of several connections or processes is ready first.
//
//   auto [parent_end, child_end] = mp::Pipe();      // duplex: both ends send and receive
//   mp::Process p{child_main, child_end};           // the child gets its own copy
//   p.start();
//   child_end.close();                              // so that EOF can reach parent_end
//   parent_end.send(std::string("hello"));
//   auto reply = parent_end.recv<std::vector<int>>();
//
// Messages: send<T>(v) serializes v with mp::dumps (memcpy for trivially copyable types,
// cereal otherwise) and recv<T>() turns the bytes back: the receiver must ask for the type
// the sender sent. send_bytes/recv_bytes move raw bytes. Each message travels as one frame,
// an 8-byte length then the payload, written with one system call (write, or writev for
// large payloads) and, for small messages, read with one read() into a read-ahead buffer:
// a 1-byte round trip costs about what a raw pipe's does. A duplex Pipe is a pipe each
// way (on Linux a socket pair's round trip costs about twice a pipe's); a one-way Pipe is
// one pipe.
//
// Limits: a message larger than max_message_size() (default 256 MiB, settable per end) is
// refused by send before a single byte is written (MessageTooLarge), so the stream stays
// intact. A receiver that reads a header announcing more than its own maximum throws
// MessageTooLarge too and closes its end: the stream cannot be resynchronised.
//
// End of file: when the other end is closed in every process that held it (closed
// explicitly, or its last holder exited or was killed), recv() throws mp::EOFError once the
// messages already sent have been read, and poll() reports the end as ready (as Python's).
// Sending to an end whose peer is gone throws std::system_error (EPIPE).
//
// SIGPIPE: a write to a pipe whose reader is gone raises SIGPIPE, which by default kills.
// The first Pipe() of a process whose SIGPIPE action is still the default installs a handler
// that swallows the SIGPIPE raised by a Connection's own write (the send then throws EPIPE)
// and, for any other SIGPIPE, restores the default action and raises it again: the program
// dies exactly as before where it wrote to a broken pipe itself. SIG_IGN or a handler of the
// program's own are left alone; exec() resets handlers, so exec'd programs are unaffected.
//
// Ownership (a choice, documented here): a Connection is a handle. Copies made in one
// process share its descriptors: close() closes them for every copy, and they are closed
// when the last copy goes. This is what lets a Connection be an argument of mp::Process
// (which copies its arguments, as Python pickles them): the child gets the descriptors, and
// the parent closes its own copy of the child's end with close(), as in Python, so that EOF
// can reach it. A fork child inherits both ends of every Pipe its parent made; the first
// time a process other than the one that called Pipe() uses one end, that process's copy
// of the other end is closed (a process talks through one end; holding the other would hide
// EOF from both sides). So a process should not use both ends of a Pipe it did not create.
// For spawn and forkserver children a Connection serializes its descriptors through the
// FdChannel (mp/serialize.hpp), with any bytes it had read ahead.
//
// One end is meant to be used by one thread of one process at a time (as in Python): two
// readers of one end would split its messages between them.
#pragma once

#include <cereal/types/string.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mp/process.hpp"
#include "mp/serialize.hpp"

namespace mp {

// The other end was closed and every message sent before was read (Python's EOFError).
class EOFError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A message over the maximum size of the sending or the receiving end.
class MessageTooLarge : public std::length_error {
 public:
  MessageTooLarge(std::string what, std::uint64_t size, std::uint64_t limit)
      : std::length_error(std::move(what)), size_(size), limit_(limit) {}
  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t limit() const noexcept { return limit_; }

 private:
  std::uint64_t size_, limit_;
};

// recv_bytes_into() got a message longer than the buffer; the message is here instead
// (Python's multiprocessing.BufferTooShort).
class BufferTooShort : public std::runtime_error {
 public:
  BufferTooShort(std::string what, std::string message)
      : std::runtime_error(std::move(what)), message_(std::move(message)) {}
  const std::string& message() const noexcept { return message_; }

 private:
  std::string message_;
};

inline constexpr std::size_t kDefaultMaxMessageSize = std::size_t{256} << 20;

class Connection;
namespace detail {
struct ConnState;
// One entry of a wait: a Connection, or a bare descriptor (conn == nullptr).
struct WaitItem {
  int fd = -1;
  const Connection* conn = nullptr;
};
// The indices of the ready items (see mp::wait).
std::vector<std::size_t> wait_ready(std::span<const WaitItem> items,
                                    std::optional<Seconds> timeout);
}  // namespace detail

class Connection {
 public:
  // A closed Connection.
  Connection() noexcept;

  // Takes ownership of `fd` (a socket, or one end of a pipe). Pipe() is the usual way.
  static Connection from_fd(int fd, bool readable, bool writable);

  // Sends one value as one message. Throws MessageTooLarge (nothing written), system_error
  // (EPIPE when the peer is gone), ProcessError on a closed or receive-only end.
  template <class T>
  void send(const T& value) {
    if constexpr (TriviallySerializable<T>) {
      send_frame(&value, sizeof(T));
    } else {
      std::string bytes = dumps(value);
      send_frame(bytes.data(), bytes.size());
    }
  }

  // Receives one message sent by send<T>. Blocks until it arrives. Throws EOFError when the
  // peer has closed, SerializationError when the message is not a T.
  template <class T>
  T recv() {
    if constexpr (TriviallySerializable<T>) {
      alignas(T) unsigned char storage[sizeof(T)];
      recv_exact(storage, sizeof(T), "a trivially copyable value");
      return *std::launder(reinterpret_cast<T*>(storage));
    } else {
      std::string bytes = recv_bytes();
      return mp::load<T>(bytes);
    }
  }

  void send_bytes(std::span<const std::byte> data) { send_frame(data.data(), data.size()); }
  void send_bytes(std::string_view data) { send_frame(data.data(), data.size()); }
  // One message, as bytes.
  std::string recv_bytes();
  // Receives one message into `buf` and returns its size. A longer message is consumed and
  // thrown back as BufferTooShort.
  std::size_t recv_bytes_into(std::span<std::byte> buf);

  // Whether a message (or EOF) is ready to be received: waits up to `timeout`, forever with
  // std::nullopt, not at all by default.
  bool poll(std::optional<Seconds> timeout = Seconds{0});

  // Closes this end, for every copy in this process. Idempotent.
  void close() noexcept;
  bool closed() const noexcept;
  bool readable() const noexcept;
  bool writable() const noexcept;
  // The descriptor to poll for reading (for a send-only end, the one written to). Throws
  // std::system_error (EBADF) when closed.
  int fileno() const;

  std::size_t max_message_size() const noexcept;
  void set_max_message_size(std::size_t bytes);

  // Copies of one Connection compare equal.
  friend bool operator==(const Connection& a, const Connection& b) noexcept {
    return a.state_ == b.state_;
  }

  // cereal: passes the descriptor to spawn and forkserver children (see mp/serialize.hpp).
  // Bytes this end had already read ahead travel along.
  template <class Archive>
  void save(Archive& ar) const {
    auto [rfd, wfd] = descriptors();
    std::uint32_t r_index = detail::export_fd(rfd);
    bool two = wfd >= 0;
    std::uint32_t w_index = two ? detail::export_fd(wfd) : 0;
    ar(r_index, two, w_index, readable(), writable(),
       static_cast<std::uint64_t>(max_message_size()), buffered());
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t r_index = 0, w_index = 0;
    bool two = false, r = false, w = false;
    std::uint64_t max = 0;
    std::string ahead;
    ar(r_index, two, w_index, r, w, max, ahead);
    *this = adopt_imported(detail::import_fd(r_index), two ? detail::import_fd(w_index) : -1, r, w,
                           max, std::move(ahead));
  }

 private:
  friend std::pair<Connection, Connection> Pipe(bool duplex);
  friend std::vector<std::size_t> detail::wait_ready(std::span<const detail::WaitItem>,
                                                     std::optional<Seconds>);
  void send_frame(const void* data, std::size_t size);
  void recv_exact(void* dst, std::size_t size, std::string_view what);
  bool has_buffered() const noexcept;
  std::string buffered() const;
  // Two descriptors: read from fd, write to wfd (-1: fd does both).
  static Connection from_fds(int fd, int wfd, bool readable, bool writable);
  std::pair<int, int> descriptors() const;
  static Connection adopt_imported(int fd, int wfd, bool r, bool w, std::uint64_t max,
                                   std::string ahead);

  std::shared_ptr<detail::ConnState> state_;
};

// A connected pair. duplex: two ends that both send and receive (a pipe each way);
// otherwise the first end only receives and the second only sends (one pipe), as in Python.
std::pair<Connection, Connection> Pipe(bool duplex = true);

// Something mp::wait() can wait for: a Connection (ready when a message or EOF is there) or
// a descriptor such as Process::sentinel() (ready when readable: the process ended).
class Waitable {
 public:
  Waitable(Connection c) : conn_(std::move(c)), is_conn_(true) {}  // NOLINT: implicit
  Waitable(int fd) : fd_(fd) {}                                    // NOLINT: implicit
  const Connection* connection() const noexcept { return is_conn_ ? &conn_ : nullptr; }
  int fileno() const { return is_conn_ ? conn_.fileno() : fd_; }
  friend bool operator==(const Waitable& a, const Waitable& b) noexcept {
    return a.is_conn_ == b.is_conn_ && (a.is_conn_ ? a.conn_ == b.conn_ : a.fd_ == b.fd_);
  }

 private:
  Connection conn_;
  int fd_ = -1;
  bool is_conn_ = false;
};

// Waits until at least one of `objects` is ready, or the timeout passes (forever with
// std::nullopt), and returns the ready ones in their order (empty on timeout). Python's
// multiprocessing.connection.wait().
std::vector<Connection> wait(const std::vector<Connection>& connections,
                             std::optional<Seconds> timeout = std::nullopt);
std::vector<Waitable> wait(const std::vector<Waitable>& objects,
                           std::optional<Seconds> timeout = std::nullopt);
// Braced lists: mp::wait({a, b}, 1s) gives Connections, mp::wait({a, p.sentinel()}) Waitables.
inline std::vector<Connection> wait(std::initializer_list<Connection> connections,
                                    std::optional<Seconds> timeout = std::nullopt) {
  return wait(std::vector<Connection>(connections), timeout);
}
inline std::vector<Waitable> wait(std::initializer_list<Waitable> objects,
                                  std::optional<Seconds> timeout = std::nullopt) {
  return wait(std::vector<Waitable>(objects), timeout);
}

}  // namespace mp
