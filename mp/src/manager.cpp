// mp/src/manager.cpp - the manager's server, its wire format, and the client side of the
// proxies (see mp/manager.hpp).
//
// Local connections (Unix socket) pass requests through a shared block, one per connection:
//   client: writes the request, state = REQ_SHM, sends 'W' only if the server sleeps
//   server: spins on state, then sleeps in poll() on the socket (a 'W' or EOF wakes it),
//           handles the request, writes the answer, state = RESP_SHM, 'W' if the client sleeps
//   client: spins on state, then sleeps in poll() the same way, reads the answer
// Sleeping is announced with a flag and the state re-checked after it (seq_cst on both
// sides), so a wake-up is never lost. Messages larger than the block travel on the socket
// as frames (state REQ_SOCK / RESP_SOCK). The socket also carries EOF: a side that sleeps
// learns at once that the other process is gone. TCP connections use frames only.
#include "mp/manager.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <limits>
#include <list>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "mp/detail/fd.hpp"
#include "mp/detail/futex.hpp"
#include "mp/detail/pidfd.hpp"
#include "mp/detail/region.hpp"
#include "mp/listener.hpp"

namespace mp {
namespace detail {

using Clock = std::chrono::steady_clock;

// ---- wire helpers ------------------------------------------------------------------------------

void put_u8(std::string& out, std::uint8_t v) { out.push_back(static_cast<char>(v)); }
void put_u32(std::string& out, std::uint32_t v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_u64(std::string& out, std::uint64_t v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_bytes(std::string& out, std::string_view bytes) {
  if (bytes.size() > kMaxManagerMessage) {
    throw std::length_error(fmt::format("cannot send {} bytes to a manager: over its limit of {}",
                                        bytes.size(), kMaxManagerMessage));
  }
  put_u32(out, static_cast<std::uint32_t>(bytes.size()));
  out.append(bytes);
}
void put_code(std::string& out, const CodeAddress& where) {
  put_bytes(out, where.module);
  put_u64(out, where.offset);
}

CodeAddress locate_function(const void* address) {
  thread_local const void* last = nullptr;
  thread_local CodeAddress where;
  if (address != last) {
    where = locate_code(address);
    last = address;
  }
  return where;
}

std::string_view WireReader::take(std::size_t n) {
  if (n > bytes_.size() - pos_) {
    throw ProtocolError(fmt::format("malformed manager message: {} bytes needed at offset {} of {}",
                                    n, pos_, bytes_.size()));
  }
  std::string_view s = bytes_.substr(pos_, n);
  pos_ += n;
  return s;
}
std::uint8_t WireReader::u8() { return static_cast<std::uint8_t>(take(1)[0]); }
std::uint32_t WireReader::u32() {
  std::uint32_t v;
  std::memcpy(&v, take(4).data(), 4);
  return v;
}
std::uint64_t WireReader::u64() {
  std::uint64_t v;
  std::memcpy(&v, take(8).data(), 8);
  return v;
}
std::string_view WireReader::bytes() { return take(u32()); }
void WireReader::finish() const {
  if (!done()) {
    throw ProtocolError(
        fmt::format("malformed manager message: {} bytes left over", bytes_.size() - pos_));
  }
}

void FrameReader::compact() {
  if (pos_ > 0 && (pos_ == buf_.size() || pos_ > 65536)) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
}

void FrameReader::feed(std::string_view bytes) {
  compact();
  buf_.append(bytes);
}

bool FrameReader::next(std::string& payload) {
  while (pos_ < buf_.size()) {
    char c = buf_[pos_];
    if (c == 'W') {
      ++pos_;
      continue;
    }
    if (c != 'F') {
      throw ProtocolError(fmt::format("malformed manager stream: record type 0x{:02x}",
                                      static_cast<unsigned char>(c)));
    }
    if (buf_.size() - pos_ < 5) break;
    std::uint32_t len;
    std::memcpy(&len, buf_.data() + pos_ + 1, 4);
    if (len > max_) {
      throw ProtocolError(
          fmt::format("manager frame of {} bytes is over the limit of {} bytes", len, max_));
    }
    if (buf_.size() - pos_ - 5 < len) break;
    payload.assign(buf_, pos_ + 5, len);
    pos_ += 5 + std::size_t{len};
    compact();
    return true;
  }
  compact();
  return false;
}

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                           std::free);
  return status == 0 && d ? std::string(d.get()) : std::string(mangled);
}

std::int64_t timeout_ns(std::optional<Seconds> timeout) {
  if (!timeout) return -1;
  if (timeout->count() <= 0) return 0;
  double ns = timeout->count() * 1e9;
  if (ns > 9e18) return -1;
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(ns));
}

// ---- the update-function registry ------------------------------------------------------------

namespace {
struct TrampolineRegistry {
  std::mutex m;
  std::unordered_map<const void*, std::string> known;
};
TrampolineRegistry& trampolines() {
  static auto* r = new TrampolineRegistry;  // never destroyed: static initializers use it
  return *r;
}
}  // namespace

bool register_update_trampoline(UpdateTrampoline t, const char* signature) noexcept {
  try {
    auto& r = trampolines();
    std::lock_guard lock(r.m);
    r.known.emplace(reinterpret_cast<const void*>(t), signature);
  } catch (...) {
  }
  return true;
}

namespace {
UpdateTrampoline find_trampoline(const void* address, std::string_view signature) {
  auto& r = trampolines();
  std::lock_guard lock(r.m);
  auto it = r.known.find(address);
  if (it == r.known.end() || it->second != signature) return nullptr;
  return reinterpret_cast<UpdateTrampoline>(const_cast<void*>(address));
}

// ---- the shared block of a local connection ---------------------------------------------------

enum ChannelState : std::uint32_t { kIdle = 0, kReqShm, kReqSock, kRespShm, kRespSock };
constexpr std::uint32_t kChannelMagic = 0x4d504d43;  // "MPMC"
constexpr std::size_t kChannelSize = 64 * 1024;

struct ChannelHeader {
  std::uint32_t magic;
  std::uint32_t capacity;
  std::atomic<std::uint32_t> state;
  std::atomic<std::uint32_t> server_parked;
  std::atomic<std::uint32_t> client_parked;
  std::atomic<std::uint32_t> length;
};
constexpr std::size_t kChannelData = 64;  // the payload starts on its own cache line
static_assert(sizeof(ChannelHeader) <= kChannelData);

char* channel_data(ChannelHeader* h) { return reinterpret_cast<char*>(h) + kChannelData; }

// ---- socket helpers ---------------------------------------------------------------------------

constexpr std::size_t kReadChunk = 64 * 1024;

// Reads what is there (or waits for something when block) into the reader. Descriptors
// received with it are appended to fds when given, closed otherwise. False on EOF.
bool read_more(int fd, FrameReader& reader, std::string& scratch, bool block,
               std::vector<UniqueFd>* fds) {
  scratch.resize(kReadChunk);
  iovec iov{scratch.data(), scratch.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t r;
  for (;;) {
    r = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | (block ? 0 : MSG_DONTWAIT));
    if (r >= 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
    if (errno == ECONNRESET) return false;
    throw_errno("receive from a manager connection");
  }
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < n; ++i) {
      int got;
      std::memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
      UniqueFd owned(got);
      if (fds) fds->push_back(std::move(owned));
    }
  }
  if (r == 0) return false;
  reader.feed(std::string_view(scratch.data(), static_cast<std::size_t>(r)));
  return true;
}

// Sends one frame ('F' + length + payload), with an optional descriptor.
void send_frame(int fd, std::string_view payload, int pass_fd = -1) {
  char head[5] = {'F'};
  auto len = static_cast<std::uint32_t>(payload.size());
  std::memcpy(head + 1, &len, 4);
  iovec iov[2] = {{head, 5}, {const_cast<char*>(payload.data()), payload.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (pass_fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  std::size_t total = 5 + payload.size();
  ssize_t w = retry_eintr([&] { return ::sendmsg(fd, &msg, MSG_NOSIGNAL); });
  if (w == -1) throw_errno("send to a manager connection");
  auto done = static_cast<std::size_t>(w);
  if (done < total) {
    // The rest of a large frame: header first, then what is left of the payload.
    if (done < 5) {
      send_all(fd, head + done, 5 - done, "send to a manager connection");
      done = 5;
    }
    send_all(fd, payload.data() + (done - 5), total - done, "send to a manager connection");
  }
}

void send_wake(int fd) noexcept {
  char w = 'W';
  // A failure means the peer is gone; the next read finds the EOF.
  (void)::send(fd, &w, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
}

// How long a waiting side polls the shared block before it sleeps, in polls (each a CPU
// pause: 1 to ~65 ns depending on the CPU). Adaptive per connection: a wait that ends
// while polling raises the budget, one that has to sleep halves it. On an idle machine the
// answer comes within a microsecond or two and both sides poll; on a busy one polling
// would steal the CPU the other side needs, and the budget falls so that both sleep at once.
//
// Halving alone has a trap: once both sides' budgets are small, each always finds the
// other asleep (a sleeping peer takes tens of microseconds to wake), so neither wait ever
// ends while polling and the budgets never grow again, even when the machine is idle and
// polling would make every call sub-microsecond (measured: 0.26 us against 52 us a call,
// bimodal from run to run). So one wait in kProbeEvery polls for kProbeTime, longer than
// a sleeping peer's wake-up on an idle virtual machine (13-25 us here): on an idle machine
// that catches the other side awake and the budgets recover; on a busy one it costs at
// most kProbeTime per kProbeEvery waits (about 3 us a wait). Bounded in time, not polls,
// so that it means the same on every CPU.
constexpr int kMinSpin = 4;
constexpr int kMaxSpin = 1024;
constexpr unsigned kProbeEvery = 16;
constexpr auto kProbeTime = std::chrono::microseconds(50);

struct SpinBudget {
  int polls = kMaxSpin;
  unsigned waits = 0;
};

// Waits until the channel is in state a or b: polls, then sleeps on the socket. Returns the
// state, or kIdle when the socket reached EOF (the other process is gone).
std::uint32_t await_state(ChannelHeader& ch, std::atomic<std::uint32_t>& parked, std::uint32_t a,
                          std::uint32_t b, int fd, FrameReader& reader, std::string& scratch,
                          SpinBudget& budget) {
  const bool probe = ++budget.waits % kProbeEvery == 0;
  const auto probe_end = probe ? std::chrono::steady_clock::now() + kProbeTime
                               : std::chrono::steady_clock::time_point{};
  for (int i = 0; probe || i < budget.polls; ++i) {
    std::uint32_t s = ch.state.load(std::memory_order_acquire);
    if (s == a || s == b) {
      // Enough for this wait twice over, and never less than twice the old budget.
      budget.polls = std::min(kMaxSpin, std::max(budget.polls * 2, 2 * (i + 1)));
      return s;
    }
    cpu_relax();
    if (probe && (i & 63) == 63 && std::chrono::steady_clock::now() >= probe_end) break;
  }
  budget.polls = std::max(kMinSpin, budget.polls / 2);
  for (;;) {
    parked.store(1, std::memory_order_seq_cst);
    std::uint32_t s = ch.state.load(std::memory_order_seq_cst);
    if (s == a || s == b) {
      parked.store(0, std::memory_order_relaxed);
      return s;
    }
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, -1);
    parked.store(0, std::memory_order_relaxed);
    if (r == -1) {
      if (errno == EINTR) continue;
      throw_errno("wait on a manager connection");
    }
    if (!read_more(fd, reader, scratch, false, nullptr)) {
      s = ch.state.load(std::memory_order_acquire);
      return (s == a || s == b) ? s : kIdle;
    }
    s = ch.state.load(std::memory_order_acquire);
    if (s == a || s == b) return s;
  }
}

// ---- server objects ---------------------------------------------------------------------------

struct PeerGone {};  // thrown out of a wait when the client has gone

struct Object {
  explicit Object(ObjectKind k, std::string sig) : kind(k), signature(std::move(sig)) {}
  virtual ~Object() = default;
  ObjectKind kind;
  std::string signature;
  std::mutex m;
  std::condition_variable cv;
};

struct DictObject final : Object {
  using Object::Object;
  std::list<std::pair<std::string, std::string>> entries;  // insertion order
  std::unordered_map<std::string_view, std::list<std::pair<std::string, std::string>>::iterator>
      index;  // keys point into entries

  std::string* find(std::string_view key) {
    auto it = index.find(key);
    return it == index.end() ? nullptr : &it->second->second;
  }
  void set(std::string_view key, std::string_view value) {
    if (auto* v = find(key)) {
      v->assign(value);
      return;
    }
    entries.emplace_back(std::string(key), std::string(value));
    auto last = std::prev(entries.end());
    index.emplace(std::string_view(last->first), last);
  }
  bool erase(std::string_view key, std::string* out = nullptr) {
    auto it = index.find(key);
    if (it == index.end()) return false;
    auto node = it->second;
    index.erase(it);
    if (out) *out = std::move(node->second);
    entries.erase(node);
    return true;
  }
};

struct ListObject final : Object {
  using Object::Object;
  std::vector<std::string> items;
};

struct NamespaceObject final : Object {
  using Object::Object;
  std::map<std::string, std::pair<std::string, std::string>, std::less<>> fields;  // type, bytes
};

struct LockObject final : Object {
  using Object::Object;
  bool locked = false;
  std::uint64_t holder = 0;  // the connection that acquired it
};

struct EventObject final : Object {
  using Object::Object;
  bool flag = false;
};

struct QueueObject final : Object {
  using Object::Object;
  std::deque<std::string> items;
  std::uint64_t maxsize = 0;
};

// A waiting call: wakes at every change and every 100 ms to check that its client lives.
template <class Pred>
bool wait_until_ready(Object& o, std::unique_lock<std::mutex>& lk, const Peer& peer,
                      std::int64_t ns, Pred ready) {
  if (ready()) return true;
  if (ns == 0 || !peer.alive) return false;
  std::optional<Clock::time_point> deadline;
  if (ns > 0) deadline = Clock::now() + std::chrono::nanoseconds(ns);
  for (;;) {
    auto slice = Clock::now() + std::chrono::milliseconds(100);
    if (deadline && *deadline < slice) slice = *deadline;
    o.cv.wait_until(lk, slice);
    if (ready()) return true;
    if (deadline && Clock::now() >= *deadline) return false;
    if (!peer.alive(peer)) throw PeerGone{};
  }
}

}  // namespace

class ServerState {
 public:
  explicit ServerState(bool allow_code) : allow_code_(allow_code) {}

  std::uint64_t create(ObjectKind kind, std::string_view signature, std::string_view name,
                       std::uint64_t parameter) {
    std::unique_lock lock(m_);
    if (!name.empty()) {
      auto it = names_.find(name);
      if (it != names_.end()) {
        Object& o = *objects_.at(it->second);
        if (o.kind != kind || o.signature != signature) {
          throw std::invalid_argument(fmt::format(
              "manager object '{}' exists with other types: it was made as {} and is asked for "
              "as {}",
              name, describe(o.kind, o.signature), describe(kind, signature)));
        }
        return it->second;
      }
    }
    std::shared_ptr<Object> o;
    std::string sig(signature);
    switch (kind) {
      case ObjectKind::dict:
        o = std::make_shared<DictObject>(kind, sig);
        break;
      case ObjectKind::list:
        o = std::make_shared<ListObject>(kind, sig);
        break;
      case ObjectKind::namespace_:
        o = std::make_shared<NamespaceObject>(kind, sig);
        break;
      case ObjectKind::lock:
        o = std::make_shared<LockObject>(kind, sig);
        break;
      case ObjectKind::event:
        o = std::make_shared<EventObject>(kind, sig);
        break;
      case ObjectKind::queue: {
        auto q = std::make_shared<QueueObject>(kind, sig);
        q->maxsize = parameter;
        o = q;
        break;
      }
      default:
        throw ProtocolError(
            fmt::format("malformed manager request: object kind {}", static_cast<int>(kind)));
    }
    std::uint64_t id = next_id_++;
    objects_.emplace(id, std::move(o));
    if (!name.empty()) names_.emplace(std::string(name), id);
    return id;
  }

  template <class T>
  std::shared_ptr<T> get(std::uint64_t id, ObjectKind kind) {
    std::shared_lock lock(m_);
    auto it = objects_.find(id);
    if (it == objects_.end() || it->second->kind != kind) {
      throw std::invalid_argument(
          fmt::format("the manager has no {} with id {}", kind_name(kind), id));
    }
    return std::static_pointer_cast<T>(it->second);
  }

  void note_lock(std::uint64_t peer, std::uint64_t id, const std::shared_ptr<LockObject>& l) {
    std::lock_guard lock(held_m_);
    held_[peer][id] = l;
  }
  void forget(std::uint64_t peer) {
    std::map<std::uint64_t, std::weak_ptr<LockObject>> held;
    {
      std::lock_guard lock(held_m_);
      auto it = held_.find(peer);
      if (it == held_.end()) return;
      held = std::move(it->second);
      held_.erase(it);
    }
    for (auto& [id, weak] : held) {
      if (auto l = weak.lock()) {
        std::lock_guard lk(l->m);
        if (l->locked && l->holder == peer) {
          l->locked = false;
          l->holder = 0;
          l->cv.notify_all();
        }
      }
    }
  }

  bool allow_code() const noexcept { return allow_code_; }

  static const char* kind_name(ObjectKind k) {
    switch (k) {
      case ObjectKind::dict:
        return "dict";
      case ObjectKind::list:
        return "list";
      case ObjectKind::namespace_:
        return "Namespace";
      case ObjectKind::lock:
        return "Lock";
      case ObjectKind::event:
        return "Event";
      case ObjectKind::queue:
        return "Queue";
    }
    return "object";
  }

 private:
  static std::string describe(ObjectKind kind, std::string_view signature) {
    std::string types;
    std::size_t start = 0;
    while (start < signature.size()) {
      std::size_t end = signature.find(';', start);
      if (end == std::string_view::npos) end = signature.size();
      if (!types.empty()) types += ", ";
      types += demangle(std::string(signature.substr(start, end - start)).c_str());
      start = end + 1;
    }
    return types.empty() ? kind_name(kind) : fmt::format("{}<{}>", kind_name(kind), types);
  }

  bool allow_code_;
  std::shared_mutex m_;
  std::unordered_map<std::uint64_t, std::shared_ptr<Object>> objects_;
  std::map<std::string, std::uint64_t, std::less<>> names_;
  std::uint64_t next_id_ = 1;
  std::mutex held_m_;
  std::map<std::uint64_t, std::map<std::uint64_t, std::weak_ptr<LockObject>>> held_;
};

std::shared_ptr<ServerState> make_server_state(bool allow_code) {
  return std::make_shared<ServerState>(allow_code);
}

void forget_peer(ServerState& state, const Peer& peer) { state.forget(peer.id); }

namespace {

void answer_ok(std::string& a) {
  a.clear();
  put_u8(a, static_cast<std::uint8_t>(Status::ok));
}

void answer_error(std::string& a, ErrorKind kind, std::string_view type, std::string_view what) {
  a.clear();
  put_u8(a, static_cast<std::uint8_t>(Status::error));
  put_u8(a, static_cast<std::uint8_t>(kind));
  put_bytes(a, type);
  put_bytes(a, what.substr(0, 4096));
  put_u64(a, static_cast<std::uint64_t>(::getpid()));
}

// Python's index rules: negative counts from the end. Throws out_of_range.
std::size_t list_index(std::int64_t i, std::size_t size, std::string_view what) {
  std::int64_t n = static_cast<std::int64_t>(size);
  std::int64_t j = i < 0 ? i + n : i;
  if (j < 0 || j >= n) {
    throw std::out_of_range(fmt::format(
        "cannot {}: index {} is out of range for a list of {} (IndexError)", what, i, n));
  }
  return static_cast<std::size_t>(j);
}

void handle_dict(ServerState& st, Op op, std::uint64_t id, WireReader& r, std::string& a) {
  auto d = st.get<DictObject>(id, ObjectKind::dict);
  switch (op) {
    case Op::dict_get: {
      std::string_view key = r.bytes();
      r.finish();
      std::lock_guard lk(d->m);
      answer_ok(a);
      if (auto* v = d->find(key)) {
        put_u8(a, 1);
        put_bytes(a, *v);
      } else {
        put_u8(a, 0);
      }
      return;
    }
    case Op::dict_set: {
      std::string_view key = r.bytes();
      std::string_view value = r.bytes();
      r.finish();
      std::lock_guard lk(d->m);
      d->set(key, value);
      answer_ok(a);
      return;
    }
    case Op::dict_erase:
    case Op::dict_contains: {
      std::string_view key = r.bytes();
      r.finish();
      std::lock_guard lk(d->m);
      bool there = op == Op::dict_erase ? d->erase(key) : d->find(key) != nullptr;
      answer_ok(a);
      put_u8(a, there ? 1 : 0);
      return;
    }
    case Op::dict_size: {
      r.finish();
      std::lock_guard lk(d->m);
      answer_ok(a);
      put_u64(a, d->entries.size());
      return;
    }
    case Op::dict_items: {
      r.finish();
      std::lock_guard lk(d->m);
      answer_ok(a);
      put_u64(a, d->entries.size());
      for (const auto& [k, v] : d->entries) {
        put_bytes(a, k);
        put_bytes(a, v);
      }
      return;
    }
    case Op::dict_update: {
      std::uint64_t n = r.u64();
      std::vector<std::pair<std::string_view, std::string_view>> pairs;
      for (std::uint64_t i = 0; i < n; ++i) {
        std::string_view k = r.bytes();
        pairs.emplace_back(k, r.bytes());
      }
      r.finish();
      std::lock_guard lk(d->m);
      for (auto& [k, v] : pairs) d->set(k, v);
      answer_ok(a);
      return;
    }
    case Op::dict_pop: {
      std::string_view key = r.bytes();
      r.finish();
      std::string value;
      std::lock_guard lk(d->m);
      bool there = d->erase(key, &value);
      answer_ok(a);
      put_u8(a, there ? 1 : 0);
      if (there) put_bytes(a, value);
      return;
    }
    case Op::dict_setdefault: {
      std::string_view key = r.bytes();
      std::string_view def = r.bytes();
      r.finish();
      std::lock_guard lk(d->m);
      if (!d->find(key)) d->set(key, def);
      answer_ok(a);
      put_bytes(a, *d->find(key));
      return;
    }
    case Op::dict_update_with: {
      std::string_view key = r.bytes();
      std::string_view def = r.bytes();
      CodeAddress tramp{std::string(r.bytes()), r.u64()};
      std::string_view signature = r.bytes();
      bool has_target = r.u8() != 0;
      CodeAddress target;
      if (has_target) target = CodeAddress{std::string(r.bytes()), r.u64()};
      r.finish();
      if (!st.allow_code()) {
        throw std::invalid_argument("this manager server runs no update functions");
      }
      UpdateTrampoline run = find_trampoline(resolve_code(tramp), signature);
      if (!run) {
        throw std::invalid_argument(
            "cannot run the update function: it is not one this program's update_with "
            "instantiated (the client must run the same program as the server)");
      }
      const void* fn = has_target ? resolve_code(target) : nullptr;
      std::string result;
      std::lock_guard lk(d->m);
      std::string* cur = d->find(key);
      run(fn, cur ? std::string_view(*cur) : def, result);
      d->set(key, result);
      answer_ok(a);
      put_bytes(a, result);
      return;
    }
    case Op::dict_clear: {
      r.finish();
      std::lock_guard lk(d->m);
      d->index.clear();
      d->entries.clear();
      answer_ok(a);
      return;
    }
    default:
      break;
  }
  throw ProtocolError("malformed manager request: unknown dict operation");
}

void handle_list(ServerState& st, Op op, std::uint64_t id, WireReader& r, std::string& a) {
  auto l = st.get<ListObject>(id, ObjectKind::list);
  auto& v = l->items;
  switch (op) {
    case Op::list_append: {
      std::string_view item = r.bytes();
      r.finish();
      std::lock_guard lk(l->m);
      v.emplace_back(item);
      answer_ok(a);
      return;
    }
    case Op::list_extend: {
      std::uint64_t n = r.u64();
      std::vector<std::string_view> items;
      for (std::uint64_t i = 0; i < n; ++i) items.push_back(r.bytes());
      r.finish();
      std::lock_guard lk(l->m);
      v.insert(v.end(), items.begin(), items.end());
      answer_ok(a);
      return;
    }
    case Op::list_insert: {
      std::int64_t i = r.i64();
      std::string_view item = r.bytes();
      r.finish();
      std::lock_guard lk(l->m);
      auto n = static_cast<std::int64_t>(v.size());
      std::int64_t j = std::clamp<std::int64_t>(i < 0 ? i + n : i, 0, n);  // Python clamps
      v.emplace(v.begin() + j, item);
      answer_ok(a);
      return;
    }
    case Op::list_get: {
      std::int64_t i = r.i64();
      r.finish();
      std::lock_guard lk(l->m);
      std::size_t j = list_index(i, v.size(), "read a list element");
      answer_ok(a);
      put_bytes(a, v[j]);
      return;
    }
    case Op::list_set: {
      std::int64_t i = r.i64();
      std::string_view item = r.bytes();
      r.finish();
      std::lock_guard lk(l->m);
      v[list_index(i, v.size(), "set a list element")].assign(item);
      answer_ok(a);
      return;
    }
    case Op::list_pop: {
      std::int64_t i = r.i64();
      r.finish();
      std::lock_guard lk(l->m);
      auto n = static_cast<std::int64_t>(v.size());
      std::int64_t j = i < 0 ? i + n : i;
      answer_ok(a);
      if (j < 0 || j >= n) {
        put_u8(a, 0);
        return;
      }
      put_u8(a, 1);
      put_bytes(a, v[static_cast<std::size_t>(j)]);
      v.erase(v.begin() + j);
      return;
    }
    case Op::list_size: {
      r.finish();
      std::lock_guard lk(l->m);
      answer_ok(a);
      put_u64(a, v.size());
      return;
    }
    case Op::list_snapshot: {
      r.finish();
      std::lock_guard lk(l->m);
      answer_ok(a);
      put_u64(a, v.size());
      for (const auto& item : v) put_bytes(a, item);
      return;
    }
    case Op::list_clear: {
      r.finish();
      std::lock_guard lk(l->m);
      v.clear();
      answer_ok(a);
      return;
    }
    default:
      break;
  }
  throw ProtocolError("malformed manager request: unknown list operation");
}

void handle_namespace(ServerState& st, Op op, std::uint64_t id, WireReader& r, std::string& a) {
  auto ns = st.get<NamespaceObject>(id, ObjectKind::namespace_);
  auto& f = ns->fields;
  switch (op) {
    case Op::ns_set: {
      std::string_view name = r.bytes();
      std::string_view type = r.bytes();
      std::string_view value = r.bytes();
      r.finish();
      std::lock_guard lk(ns->m);
      f.insert_or_assign(std::string(name), std::pair{std::string(type), std::string(value)});
      answer_ok(a);
      return;
    }
    case Op::ns_get: {
      std::string_view name = r.bytes();
      std::string_view type = r.bytes();
      r.finish();
      std::lock_guard lk(ns->m);
      auto it = f.find(name);
      answer_ok(a);
      if (it == f.end()) {
        put_u8(a, 0);
        return;
      }
      if (it->second.first != type) {
        throw std::invalid_argument(
            fmt::format("cannot read namespace field '{}' as {}: it holds a {}", name,
                        demangle(std::string(type).c_str()), demangle(it->second.first.c_str())));
      }
      put_u8(a, 1);
      put_bytes(a, it->second.second);
      return;
    }
    case Op::ns_contains:
    case Op::ns_erase: {
      std::string_view name = r.bytes();
      r.finish();
      std::lock_guard lk(ns->m);
      auto it = f.find(name);
      bool there = it != f.end();
      if (there && op == Op::ns_erase) f.erase(it);
      answer_ok(a);
      put_u8(a, there ? 1 : 0);
      return;
    }
    case Op::ns_names: {
      r.finish();
      std::lock_guard lk(ns->m);
      answer_ok(a);
      put_u64(a, f.size());
      for (const auto& kv : f) put_bytes(a, kv.first);
      return;
    }
    default:
      break;
  }
  throw ProtocolError("malformed manager request: unknown Namespace operation");
}

void handle_sync(ServerState& st, const Peer& peer, Op op, std::uint64_t id, WireReader& r,
                 std::string& a) {
  if (op >= Op::lock_acquire && op <= Op::lock_locked) {
    auto l = st.get<LockObject>(id, ObjectKind::lock);
    std::int64_t ns = op == Op::lock_acquire ? r.i64() : 0;
    r.finish();
    std::unique_lock lk(l->m);
    if (op == Op::lock_acquire) {
      bool got = wait_until_ready(*l, lk, peer, ns, [&] { return !l->locked; });
      if (got) {
        l->locked = true;
        l->holder = peer.id;
        st.note_lock(peer.id, id, l);
      }
      answer_ok(a);
      put_u8(a, got ? 1 : 0);
    } else if (op == Op::lock_release) {
      if (!l->locked) throw ProcessError("cannot release a manager Lock that is not locked");
      l->locked = false;
      l->holder = 0;
      l->cv.notify_all();
      answer_ok(a);
    } else if (op == Op::lock_locked) {
      answer_ok(a);
      put_u8(a, l->locked ? 1 : 0);
    } else {
      throw ProtocolError("malformed manager request: unknown Lock operation");
    }
    return;
  }
  if (op >= Op::event_set && op <= Op::event_wait) {
    auto e = st.get<EventObject>(id, ObjectKind::event);
    std::int64_t ns = op == Op::event_wait ? r.i64() : 0;
    r.finish();
    std::unique_lock lk(e->m);
    answer_ok(a);
    switch (op) {
      case Op::event_set:
        e->flag = true;
        e->cv.notify_all();
        return;
      case Op::event_clear:
        e->flag = false;
        return;
      case Op::event_is_set:
        put_u8(a, e->flag ? 1 : 0);
        return;
      default: {
        bool set = wait_until_ready(*e, lk, peer, ns, [&] { return e->flag; });
        put_u8(a, set ? 1 : 0);
        return;
      }
    }
  }
  if (op >= Op::queue_put && op <= Op::queue_full) {
    auto q = st.get<QueueObject>(id, ObjectKind::queue);
    auto room = [&] { return q->maxsize == 0 || q->items.size() < q->maxsize; };
    switch (op) {
      case Op::queue_put: {
        std::int64_t ns = r.i64();
        std::string_view item = r.bytes();
        r.finish();
        std::unique_lock lk(q->m);
        bool ok = wait_until_ready(*q, lk, peer, ns, room);
        if (ok) {
          q->items.emplace_back(item);
          q->cv.notify_all();
        }
        answer_ok(a);
        put_u8(a, ok ? 1 : 0);
        return;
      }
      case Op::queue_get: {
        std::int64_t ns = r.i64();
        r.finish();
        std::unique_lock lk(q->m);
        bool ok = wait_until_ready(*q, lk, peer, ns, [&] { return !q->items.empty(); });
        answer_ok(a);
        put_u8(a, ok ? 1 : 0);
        if (ok) {
          put_bytes(a, q->items.front());
          q->items.pop_front();
          q->cv.notify_all();
        }
        return;
      }
      case Op::queue_size:
      case Op::queue_full: {
        r.finish();
        std::lock_guard lk(q->m);
        answer_ok(a);
        if (op == Op::queue_size) {
          put_u64(a, q->items.size());
        } else {
          put_u8(a, room() ? 0 : 1);
        }
        return;
      }
      default:
        break;
    }
  }
  throw ProtocolError(fmt::format("malformed manager request: operation {}", static_cast<int>(op)));
}

std::string current_exception_type() {
  const std::type_info* t = abi::__cxa_current_exception_type();
  return t ? demangle(t->name()) : std::string("unknown exception");
}

}  // namespace

bool handle_request(ServerState& st, const Peer& peer, std::string_view request, std::string& a) {
  WireReader r(request);
  auto op = static_cast<Op>(r.u8());
  std::uint64_t id = r.u64();
  try {
    switch (op) {
      case Op::ping:
        r.finish();
        answer_ok(a);
        put_u64(a, static_cast<std::uint64_t>(::getpid()));
        return true;
      case Op::shutdown:
        r.finish();
        answer_ok(a);
        return false;
      case Op::create: {
        auto kind = static_cast<ObjectKind>(r.u8());
        std::string_view sig = r.bytes();
        std::string_view name = r.bytes();
        std::uint64_t param = r.u64();
        r.finish();
        std::uint64_t made = st.create(kind, sig, name, param);
        answer_ok(a);
        put_u64(a, made);
        return true;
      }
      default:
        break;
    }
    auto code = static_cast<std::uint8_t>(op);
    if (code >= 16 && code < 32) {
      handle_dict(st, op, id, r, a);
    } else if (code >= 32 && code < 48) {
      handle_list(st, op, id, r, a);
    } else if (code >= 48 && code < 64) {
      handle_namespace(st, op, id, r, a);
    } else if (code >= 64 && code < 112) {
      handle_sync(st, peer, op, id, r, a);
    } else {
      throw ProtocolError(fmt::format("malformed manager request: operation {}", code));
    }
    if (a.size() > std::numeric_limits<std::uint32_t>::max() - 16) {
      throw std::length_error(
          fmt::format("cannot answer with {} bytes: a frame holds at most 4 GiB", a.size()));
    }
  } catch (const ProtocolError&) {
    throw;
  } catch (const PeerGone&) {
    throw;
  } catch (const std::out_of_range& e) {
    answer_error(a, ErrorKind::out_of_range, current_exception_type(), e.what());
  } catch (const std::invalid_argument& e) {
    answer_error(a, ErrorKind::invalid_argument, current_exception_type(), e.what());
  } catch (const ProcessError& e) {
    answer_error(a, ErrorKind::process_error, current_exception_type(), e.what());
  } catch (const std::exception& e) {
    answer_error(a, ErrorKind::remote, current_exception_type(), e.what());
  } catch (...) {
    answer_error(a, ErrorKind::remote, current_exception_type(), "an exception of unknown type");
  }
  return true;
}

// ---- the server process -----------------------------------------------------------------------

namespace {

struct ServerContext {
  std::shared_ptr<ServerState> state;
  std::string authkey;
  int stop_fd = -1;  // an eventfd: written to ask the main loop to end
  std::atomic<std::uint64_t> next_peer{1};
  std::atomic<int> connections{0};
};

constexpr int kMaxConnections = 4096;

bool peer_alive(const Peer& peer) {
  pollfd p{peer.fd, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return true;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) == 0;
}

// One connection's life: authenticate, then answer requests until EOF or a bad request.
void serve_connection(ServerContext* ctx, UniqueFd fd) {
  Peer peer{ctx->next_peer.fetch_add(1), &peer_alive, fd.get()};
  try {
    authenticate_as_server(fd.get(), ctx->authkey);
  } catch (const std::exception&) {
    return;  // a wrong key or a peer that went away: nothing to do but close
  }
  FrameReader reader;
  std::string scratch, request, answer;
  std::vector<UniqueFd> fds;
  Region region;
  ChannelHeader* ch = nullptr;
  SpinBudget spin;
  bool keep_going = true;
  try {
    while (keep_going) {
      if (!ch) {
        while (!reader.next(request)) {
          if (!read_more(fd.get(), reader, scratch, true, &fds)) goto done;
        }
      } else {
        std::uint32_t s =
            await_state(*ch, ch->server_parked, kReqShm, kReqSock, fd.get(), reader, scratch, spin);
        if (s == kIdle) break;  // EOF
        if (s == kReqShm) {
          std::uint32_t len = ch->length.load(std::memory_order_relaxed);
          if (len > ch->capacity) throw ProtocolError("malformed manager request: bad length");
          request.assign(channel_data(ch), len);
        } else {
          while (!reader.next(request)) {
            if (!read_more(fd.get(), reader, scratch, true, nullptr)) goto done;
          }
        }
      }
      if (!request.empty() && static_cast<Op>(request[0]) == Op::channel) {
        // Switch this connection to a shared block (once, Unix sockets only).
        if (ch || fds.size() != 1 || request.size() != 9) {
          throw ProtocolError("malformed manager request: bad channel set-up");
        }
        region = Region::attach(fds[0].get());
        fds.clear();
        auto* h = region.as<ChannelHeader>();
        if (region.size() < kChannelData || h->magic != kChannelMagic ||
            h->capacity != region.size() - kChannelData) {
          throw ProtocolError("malformed manager request: not a channel block");
        }
        answer_ok(answer);
        send_frame(fd.get(), answer);
        ch = h;
        continue;
      }
      fds.clear();  // descriptors are accepted only with the channel request
      keep_going = handle_request(*ctx->state, peer, request, answer);
      if (!ch) {
        send_frame(fd.get(), answer);
      } else if (answer.size() <= ch->capacity) {
        std::memcpy(channel_data(ch), answer.data(), answer.size());
        ch->length.store(static_cast<std::uint32_t>(answer.size()), std::memory_order_relaxed);
        ch->state.store(kRespShm, std::memory_order_seq_cst);
        if (ch->client_parked.load(std::memory_order_seq_cst)) send_wake(fd.get());
      } else {
        ch->state.store(kRespSock, std::memory_order_seq_cst);
        send_frame(fd.get(), answer);
      }
    }
  } catch (const PeerGone&) {
  } catch (const std::exception&) {
    // A malformed or oversized request, or a failed send: this connection ends, the
    // server goes on.
  }
done:
  forget_peer(*ctx->state, peer);
  if (!keep_going) {
    std::uint64_t one = 1;
    (void)!::write(ctx->stop_fd, &one, sizeof one);
  }
}

int g_stop_fd = -1;  // the server's stop event, for its SIGTERM handler

void remove_files(const std::string& socket_path, const std::string& private_dir) noexcept {
  if (!socket_path.empty()) ::unlink(socket_path.c_str());
  if (!private_dir.empty()) ::rmdir(private_dir.c_str());
}

}  // namespace

int run_manager_server(ServerConfig cfg) {
  ::signal(SIGINT, SIG_IGN);  // Ctrl-C is for the owner, which shuts us down (as Python's)
  ::signal(SIGPIPE, SIG_IGN);
  if (cfg.forked) {
    // A fork copy holds every descriptor of the owner: its pipes and sockets would stay
    // open as long as we run. Keep only the listening socket.
    int keep = cfg.listen_fd;
    if (keep > 3) ::close_range(3, static_cast<unsigned>(keep - 1), 0);
    ::close_range(static_cast<unsigned>(keep + 1), ~0U, 0);
  }
  UniqueFd owner(pidfd_open(cfg.owner));
  if (!owner) {
    remove_files(cfg.socket_path, cfg.private_dir);
    return 1;  // the owner is gone already
  }
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC));
  if (!stop) throw_errno("create the manager's stop event");
  // SIGTERM (Process::terminate, or a signal to the whole process group) ends the server as
  // a shutdown request does: the socket is removed first.
  g_stop_fd = stop.get();
  struct sigaction sa {};
  sa.sa_handler = [](int) {
    std::uint64_t one = 1;
    int saved = errno;
    (void)!::write(g_stop_fd, &one, sizeof one);
    errno = saved;
  };
  ::sigaction(SIGTERM, &sa, nullptr);
  auto* ctx = new ServerContext;  // shared with detached threads: never freed
  ctx->state = make_server_state(true);
  ctx->authkey = cfg.authkey;
  ctx->stop_fd = stop.get();

  for (;;) {
    pollfd p[3] = {{cfg.listen_fd, POLLIN, 0}, {owner.get(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
    if (::poll(p, 3, -1) == -1) {
      if (errno == EINTR) continue;
      throw_errno("wait for manager clients");
    }
    if (p[1].revents || p[2].revents) break;  // the owner died, or asked us to stop
    if (!(p[0].revents & POLLIN)) continue;
    int fd = ::accept4(cfg.listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd == -1) {
      // Out of descriptors: the client waits in the backlog; don't spin on it meanwhile.
      if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      continue;  // otherwise the client gave up, or a transient error
    }
    UniqueFd conn(fd);
    if (ctx->connections.load() >= kMaxConnections) continue;
    ctx->connections.fetch_add(1);
    try {
      std::thread([ctx, c = std::move(conn)]() mutable {
        serve_connection(ctx, std::move(c));
        ctx->connections.fetch_sub(1);
      }).detach();
    } catch (const std::system_error&) {
      ctx->connections.fetch_sub(1);  // no thread to be had: drop this client
    }
  }
  remove_files(cfg.socket_path, cfg.private_dir);
  return 0;
}

// ---- the client side --------------------------------------------------------------------------

class ClientConn {
 public:
  ClientConn(const Endpoint& ep) : address_(ep.address) {
    try {
      fd_ = connect_to(ep.address);
    } catch (const std::system_error& e) {
      int err = e.code().value();
      if (err == ECONNREFUSED || err == ENOENT) {
        throw ManagerGoneError(fmt::format(
            "cannot reach the manager server at {}: it is not running (it was shut down or "
            "died)",
            ep.address));
      }
      throw;
    }
    // The handshake and the channel set-up: an end of file or a reset here means the server
    // went away (it was killed while we connected); only a completed exchange that says the
    // key is wrong is an AuthenticationError.
    try {
      handshake(ep);
    } catch (const EOFError&) {
      throw ManagerGoneError(fmt::format(
          "cannot reach the manager server at {}: it closed the connection during the "
          "handshake (it was shut down or died)",
          ep.address));
    } catch (const std::system_error& e) {
      int err = e.code().value();
      if (err != EPIPE && err != ECONNRESET) throw;
      throw ManagerGoneError(fmt::format(
          "cannot reach the manager server at {}: the connection was reset during the "
          "handshake (it was shut down or died)",
          ep.address));
    }
  }

  // Authenticates, then (locally) hands the server the shared channel.
  void handshake(const Endpoint& ep) {
    authenticate_as_client(fd_.get(), ep.authkey);
    if (!ep.address.starts_with("tcp:")) {
      region_ = Region::create(kChannelSize, "mp-manager-channel");
      ch_ = region_.as<ChannelHeader>();
      ch_->magic = kChannelMagic;
      ch_->capacity = static_cast<std::uint32_t>(kChannelSize - kChannelData);
      out_.clear();
      put_u8(out_, static_cast<std::uint8_t>(Op::channel));
      put_u64(out_, 0);
      send_frame(fd_.get(), out_, region_.fd());
      read_frame();
      WireReader r(in_);
      if (r.u8() != static_cast<std::uint8_t>(Status::ok)) {
        throw ProtocolError("the manager server refused the shared channel");
      }
    }
  }

  std::string& begin(Op op, std::uint64_t id) {
    out_.clear();
    put_u8(out_, static_cast<std::uint8_t>(op));
    put_u64(out_, id);
    return out_;
  }
  std::string& out() noexcept { return out_; }

  // Sends out_, receives into in_. Marks the connection broken on any failure.
  void roundtrip() {
    if (out_.size() > kMaxManagerMessage) {
      throw std::length_error(fmt::format(
          "cannot send a request of {} bytes to the manager: over its limit of {} bytes",
          out_.size(), kMaxManagerMessage));
    }
    broken_ = true;
    if (!ch_) {
      send_frame_or_gone(out_);
      read_frame();
    } else {
      if (out_.size() <= ch_->capacity) {
        std::memcpy(channel_data(ch_), out_.data(), out_.size());
        ch_->length.store(static_cast<std::uint32_t>(out_.size()), std::memory_order_relaxed);
        ch_->state.store(kReqShm, std::memory_order_seq_cst);
        if (ch_->server_parked.load(std::memory_order_seq_cst)) send_wake(fd_.get());
      } else {
        ch_->state.store(kReqSock, std::memory_order_seq_cst);
        send_frame_or_gone(out_);
      }
      std::uint32_t s = await_state(*ch_, ch_->client_parked, kRespShm, kRespSock, fd_.get(),
                                    reader_, scratch_, spin_);
      if (s == kIdle) gone();
      if (s == kRespShm) {
        std::uint32_t len = ch_->length.load(std::memory_order_relaxed);
        if (len > ch_->capacity) throw ProtocolError("malformed manager answer: bad length");
        in_.assign(channel_data(ch_), len);
      } else {
        read_frame();
      }
      ch_->state.store(kIdle, std::memory_order_relaxed);
    }
    broken_ = false;
  }
  const std::string& in() const noexcept { return in_; }
  bool broken() const noexcept { return broken_; }

 private:
  [[noreturn]] void gone() {
    throw ManagerGoneError(fmt::format(
        "cannot call the manager server at {}: it is gone (it was shut down or died)", address_));
  }
  void send_frame_or_gone(std::string_view payload) {
    try {
      send_frame(fd_.get(), payload);
    } catch (const std::system_error& e) {
      if (e.code().value() == EPIPE || e.code().value() == ECONNRESET) gone();
      throw;
    }
  }
  void read_frame() {
    while (!reader_.next(in_)) {
      if (!read_more(fd_.get(), reader_, scratch_, true, nullptr)) gone();
    }
  }

  std::string address_;
  UniqueFd fd_;
  Region region_;
  ChannelHeader* ch_ = nullptr;
  FrameReader reader_{std::numeric_limits<std::uint32_t>::max()};  // answers: any frame
  std::string out_, in_, scratch_;
  SpinBudget spin_;
  bool broken_ = false;
};

// This process's connections to one server.
class ClientPool {
 public:
  explicit ClientPool(Endpoint ep) : ep_(std::move(ep)) {}
  std::unique_ptr<ClientConn> take() {
    {
      std::lock_guard lock(m_);
      if (!free_.empty()) {
        auto c = std::move(free_.back());
        free_.pop_back();
        return c;
      }
    }
    return std::make_unique<ClientConn>(ep_);
  }
  void give(std::unique_ptr<ClientConn> c) {
    std::lock_guard lock(m_);
    free_.push_back(std::move(c));
  }
  void clear() {
    std::vector<std::unique_ptr<ClientConn>> old;
    std::lock_guard lock(m_);
    old.swap(free_);
  }
  // After fork: the mutex may have been held by a thread that does not exist here.
  void reset_in_child() noexcept {
    new (&m_) std::mutex();
    free_.clear();  // the child's copies of the parent's connections: close them
  }

 private:
  Endpoint ep_;
  std::mutex m_;
  std::vector<std::unique_ptr<ClientConn>> free_;
};

namespace {

struct PoolRegistry {
  std::mutex m;
  std::map<std::string, std::shared_ptr<ClientPool>> pools;
};
std::atomic<std::uint64_t> g_pool_epoch{1};

PoolRegistry& pool_registry() {
  static PoolRegistry* r = [] {
    auto* reg = new PoolRegistry;  // never destroyed: proxies may be used at exit
    ::pthread_atfork(nullptr, nullptr, [] {
      PoolRegistry& p = pool_registry();
      new (&p.m) std::mutex();
      for (auto& [key, pool] : p.pools) pool->reset_in_child();
      p.pools.clear();
      g_pool_epoch.fetch_add(1);
    });
    return reg;
  }();
  return *r;
}

std::string pool_key(const Endpoint& ep) { return ep.address + '\n' + ep.authkey; }

std::shared_ptr<ClientPool> pool_for(const Endpoint& ep) {
  struct Cache {
    std::uint64_t epoch = 0;
    std::string address, authkey;
    std::shared_ptr<ClientPool> pool;
  };
  thread_local Cache cache;
  std::uint64_t epoch = g_pool_epoch.load(std::memory_order_acquire);
  if (cache.pool && cache.epoch == epoch && cache.address == ep.address &&
      cache.authkey == ep.authkey) {
    return cache.pool;
  }
  PoolRegistry& reg = pool_registry();
  std::shared_ptr<ClientPool> pool;
  {
    std::lock_guard lock(reg.m);
    auto& slot = reg.pools[pool_key(ep)];
    if (!slot) slot = std::make_shared<ClientPool>(ep);
    pool = slot;
  }
  cache = Cache{epoch, ep.address, ep.authkey, pool};
  return pool;
}

void drop_pool(const Endpoint& ep) {
  PoolRegistry& reg = pool_registry();
  std::shared_ptr<ClientPool> pool;
  {
    std::lock_guard lock(reg.m);
    auto it = reg.pools.find(pool_key(ep));
    if (it == reg.pools.end()) return;
    pool = std::move(it->second);
    reg.pools.erase(it);
  }
  g_pool_epoch.fetch_add(1);
  pool->clear();
}

[[noreturn]] void throw_answer(WireReader& r) {
  auto kind = static_cast<ErrorKind>(r.u8());
  std::string type(r.bytes());
  std::string what(r.bytes());
  switch (kind) {
    case ErrorKind::out_of_range:
      throw std::out_of_range(what);
    case ErrorKind::invalid_argument:
      throw std::invalid_argument(what);
    case ErrorKind::process_error:
      throw ProcessError(what);
    case ErrorKind::remote: {
      auto pid = static_cast<pid_t>(r.u64());
      throw RemoteError(type, what, pid);
    }
    default:
      throw ProtocolError("malformed manager answer: unknown error kind");
  }
}

}  // namespace

const Endpoint& ProxyCore::endpoint() const {
  if (!ep_) throw ProcessError("cannot use an empty manager proxy: get one from a Manager");
  return *ep_;
}

Call::Call(const ProxyCore& core, Op op) { take(core.endpoint(), op, core.id()); }
Call::Call(const Endpoint& ep, Op op, std::uint64_t id) { take(ep, op, id); }

void Call::take(const Endpoint& ep, Op op, std::uint64_t id) {
  auto pool = pool_for(ep);
  conn_ = pool->take();
  pool_ = std::move(pool);
  conn_->begin(op, id);
}

Call::~Call() {
  if (conn_ && !conn_->broken()) pool_->give(std::move(conn_));
}

std::string& Call::out() noexcept { return conn_->out(); }

WireReader Call::send() {
  conn_->roundtrip();
  WireReader r(conn_->in());
  if (static_cast<Status>(r.u8()) != Status::ok) throw_answer(r);
  return r;
}

std::uint64_t create_object(const std::shared_ptr<const Endpoint>& ep, ObjectKind kind,
                            const std::string& signature, std::string_view name,
                            std::uint64_t parameter) {
  Call c(*ep, Op::create, 0);
  put_u8(c.out(), static_cast<std::uint8_t>(kind));
  put_bytes(c.out(), signature);
  put_bytes(c.out(), name);
  put_u64(c.out(), parameter);
  return c.send().u64();
}

}  // namespace detail

// ---- non-template proxy methods -----------------------------------------------------------------

bool NamespaceProxy::contains(std::string_view name) const {
  detail::Call c(core_, detail::Op::ns_contains);
  detail::put_bytes(c.out(), name);
  return c.send().u8() != 0;
}
bool NamespaceProxy::erase(std::string_view name) {
  detail::Call c(core_, detail::Op::ns_erase);
  detail::put_bytes(c.out(), name);
  return c.send().u8() != 0;
}
std::vector<std::string> NamespaceProxy::names() const {
  detail::Call c(core_, detail::Op::ns_names);
  auto r = c.send();
  std::vector<std::string> out(static_cast<std::size_t>(r.u64()));
  for (auto& n : out) n = std::string(r.bytes());
  return out;
}

bool LockProxy::acquire_ns(std::int64_t ns) {
  detail::Call c(core_, detail::Op::lock_acquire);
  detail::put_i64(c.out(), ns);
  return c.send().u8() != 0;
}
void LockProxy::release() {
  detail::Call c(core_, detail::Op::lock_release);
  c.send();
}
bool LockProxy::locked() const {
  detail::Call c(core_, detail::Op::lock_locked);
  return c.send().u8() != 0;
}

void EventProxy::set() {
  detail::Call c(core_, detail::Op::event_set);
  c.send();
}
void EventProxy::clear() {
  detail::Call c(core_, detail::Op::event_clear);
  c.send();
}
bool EventProxy::is_set() const {
  detail::Call c(core_, detail::Op::event_is_set);
  return c.send().u8() != 0;
}
bool EventProxy::wait_ns(std::int64_t ns) {
  detail::Call c(core_, detail::Op::event_wait);
  detail::put_i64(c.out(), ns);
  return c.send().u8() != 0;
}

// ---- ManagerClient, connect, Manager
// --------------------------------------------------------------

detail::ProxyCore ManagerClient::make(detail::ObjectKind kind, const std::string& signature,
                                      std::string_view name, std::uint64_t parameter) const {
  if (!ep_) throw ProcessError("cannot make a manager object: this ManagerClient is empty");
  return detail::ProxyCore(ep_, detail::create_object(ep_, kind, signature, name, parameter));
}

const std::string& ManagerClient::address() const {
  if (!ep_) throw ProcessError("this ManagerClient is empty");
  return ep_->address;
}
const std::string& ManagerClient::authkey() const {
  if (!ep_) throw ProcessError("this ManagerClient is empty");
  return ep_->authkey;
}
pid_t ManagerClient::server_pid() const {
  if (!ep_) throw ProcessError("this ManagerClient is empty");
  detail::Call c(*ep_, detail::Op::ping, 0);
  return static_cast<pid_t>(c.send().u64());
}

ManagerClient connect(std::string_view address, std::string_view authkey) {
  struct Opener : ManagerClient {
    explicit Opener(std::shared_ptr<const detail::Endpoint> ep) : ManagerClient(std::move(ep)) {}
  };
  Opener o(std::make_shared<const detail::Endpoint>(
      detail::Endpoint{std::string(address), std::string(authkey)}));
  o.server_pid();  // connects and authenticates now: a wrong key fails here
  return o;
}

Manager::Manager() { start({}, {}, get_context()); }
Manager::Manager(const Context& context) { start({}, {}, context); }
Manager::Manager(std::string_view address, std::string authkey, std::optional<Context> context) {
  start(address, std::move(authkey), context ? *context : get_context());
}

void Manager::start(std::string_view address, std::string authkey, const Context& context) {
  owner_ = ::getpid();
  if (authkey.empty()) authkey = detail::random_bytes(32);
  std::string bound;
  detail::UniqueFd listen_fd = detail::listen_on(address, 128, bound, socket_path_, private_dir_);
  if (address.empty()) {
    // Name the socket after what it is.
    std::string path = private_dir_ + "/manager";
    if (::rename(socket_path_.c_str(), path.c_str()) == 0) {
      socket_path_ = path;
      bound = "unix:" + path;
    }
  }
  detail::ServerConfig cfg;
  cfg.listen_fd = listen_fd.get();
  cfg.authkey = authkey;
  cfg.socket_path = socket_path_;
  cfg.private_dir = private_dir_;
  cfg.owner = owner_;
  cfg.forked = context.start_method() == "fork";
  try {
    server_ = Process(context, &detail::run_manager_server, cfg);
    server_.set_name("mp-manager");
    server_.set_detached(true);  // it watches its owner instead (see run_manager_server)
    server_.start();
  } catch (...) {
    detail::remove_files(socket_path_, private_dir_);
    throw;
  }
  pid_ = server_.pid();
  listen_fd.reset();  // the server has its copy; ours would keep a dead server reachable
  ep_ = std::make_shared<const detail::Endpoint>(detail::Endpoint{bound, authkey});
  try {
    server_pid();  // it answers: it is serving
  } catch (...) {
    server_.kill();
    server_.join();
    detail::remove_files(socket_path_, private_dir_);
    detail::drop_pool(*ep_);
    throw;
  }
}

Manager::Manager(Manager&& o) noexcept
    : ManagerClient(std::move(o.ep_)),
      server_(std::move(o.server_)),
      pid_(std::exchange(o.pid_, 0)),
      owner_(std::exchange(o.owner_, 0)),
      socket_path_(std::move(o.socket_path_)),
      private_dir_(std::move(o.private_dir_)) {}

Manager& Manager::operator=(Manager&& o) noexcept {
  if (this != &o) {
    try {
      shutdown();
    } catch (const std::exception& e) {
      detail::report_noexcept(e.what());
    }
    ep_ = std::move(o.ep_);
    server_ = std::move(o.server_);
    pid_ = std::exchange(o.pid_, 0);
    owner_ = std::exchange(o.owner_, 0);
    socket_path_ = std::move(o.socket_path_);
    private_dir_ = std::move(o.private_dir_);
  }
  return *this;
}

Manager::~Manager() {
  try {
    shutdown();
  } catch (const std::exception& e) {
    detail::report_noexcept(fmt::format("cannot shut the manager down: {}", e.what()));
  }
}

bool Manager::is_alive() { return pid_ != 0 && owner_ == ::getpid() && server_.is_alive(); }

void Manager::shutdown() {
  if (!ep_ || owner_ != ::getpid() || pid_ == 0) return;
  pid_ = 0;
  try {
    detail::Call c(*ep_, detail::Op::shutdown, 0);
    c.send();
  } catch (const std::exception&) {
    // It is gone already (killed?): join collects it.
  }
  detail::drop_pool(*ep_);
  if (!server_.join(Seconds{5})) {
    server_.kill();
    server_.join();
  }
  detail::remove_files(socket_path_, private_dir_);
}

}  // namespace mp
