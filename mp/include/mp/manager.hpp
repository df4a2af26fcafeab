// mp/manager.hpp - Manager: a server process that holds shared objects, reached through
// proxies (Python's multiprocessing.Manager).
//
//   mp::Manager manager;                                  // starts the server process
//   auto scores = manager.dict<std::string, int>();       // a dict that lives in the server
//   auto log = manager.list<std::string>();
//   mp::Process p{worker, scores, log};                   // proxies are copyable handles
//   p.start();
//   scores.set("alice", 1);                               // one atomic call each
//   scores.update_with("alice", add_one, 0);              // atomic read-modify-write
//   p.join();
//   for (auto& [name, n] : scores.items()) ...            // a snapshot, in insertion order
//
// Objects. dict<K,V>() (insertion-ordered), list<T>(), Namespace() (typed fields by name),
// Lock(), Event(), Queue<T>(maxsize). Each call on a proxy is one request to the server and
// is atomic: no other request on the same object runs in the middle of it. A sequence of
// calls is not: `d.set(k, *d.get(k) + 1)` from two processes loses updates, exactly as
// `d[k] += 1` does in Python. update_with(key, fn, default) is the atomic alternative: fn
// runs inside the server, under the object's lock. fn must be a plain function or a lambda
// without captures (it travels as a code address, like a spawn target), so the server must
// run the same program: true for Manager's own server and its children.
//
// Names. Every factory takes an optional name: dict<K,V>("scores") returns the dict called
// "scores", creating it the first time; this is how a remote client (mp::connect) finds the
// objects. The types are checked: asking for "scores" as dict<int, int> when it was made as
// dict<std::string, int> throws std::invalid_argument. Objects live until the server stops.
//
// Passing proxies on. A proxy is a copyable handle (address, authkey, object id). It can be
// an argument of mp::Process under every start method, and can travel inside any message
// (a Queue, a Pipe): it serializes as those three and reconnects where it is used. Each
// process keeps its own connections to the server (one per thread in use at a time), made
// on first use and reused; after fork the child makes its own.
//
// Transport. By default the server listens on a Unix socket in a private directory
// (mkdtemp, mode 0700), removed when the Manager shuts down. Local connections then move
// requests and answers through a block of shared memory that both sides poll briefly before
// they sleep, so a call costs a few microseconds instead of a socket round trip (Python's
// Manager dict set: about 77 us on these machines). Manager("tcp:127.0.0.1:0", key) listens
// on TCP instead, and mp::connect(address, key) reaches it from another program or machine.
// Every connection is authenticated with an HMAC-SHA256 challenge both ways (mp/listener.hpp);
// a wrong key gives mp::AuthenticationError, and the server goes on serving the others.
//
// Faults. A client that dies in the middle of a call harms no one else (a manager Lock it
// held is released). A call to a server that is gone fails at once with std::runtime_error
// (ManagerGoneError), never a hang. A malformed or oversized request closes
// that connection only. The server dies with the process that owns the Manager (whichever
// thread started it), and the Manager's destructor stops it and removes its socket.
//
// Security note: like Python's manager, a client that holds the authkey is trusted. Code
// addresses sent by update_with are checked against the update functions this program
// instantiated; plain function pointers are called as given.
#pragma once

#include <cxxabi.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "mp/context.hpp"
#include "mp/detail/portable.hpp"
#include "mp/error.hpp"
#include "mp/process.hpp"
#include "mp/queue.hpp"
#include "mp/serialize.hpp"

namespace mp {

class Manager;
class ManagerClient;

namespace detail {

// ---- the wire format -----------------------------------------------------------------------
//
// On the socket, a stream of records: 'W' (one byte: "wake up, look at the shared memory")
// or 'F' + u32 length + payload (a whole message). A request payload is
// [u8 op][u64 object id][op's fields]; an answer is [u8 status][fields]. Fields are fixed
// integers or byte strings [u32 length][bytes]. Values are mp::dumps bytes.

enum class Op : std::uint8_t {
  ping = 1,
  shutdown,
  channel,  // (Unix only) the client hands over its shared-memory block (SCM_RIGHTS)
  create,   // u8 kind, bytes type signature, bytes name, u64 parameter -> u64 id
  dict_get = 16,
  dict_set,
  dict_erase,
  dict_contains,
  dict_size,
  dict_items,
  dict_update,
  dict_pop,
  dict_update_with,
  dict_clear,
  dict_setdefault,
  list_append = 32,
  list_extend,
  list_get,
  list_set,
  list_pop,
  list_size,
  list_snapshot,
  list_clear,
  list_insert,
  ns_set = 48,
  ns_get,
  ns_contains,
  ns_erase,
  ns_names,
  lock_acquire = 64,
  lock_release,
  lock_locked,
  event_set = 80,
  event_clear,
  event_is_set,
  event_wait,
  queue_put = 96,
  queue_get,
  queue_size,
  queue_full,
};

enum class ObjectKind : std::uint8_t { dict = 1, list, namespace_, lock, event, queue };

// Answer statuses, and the kinds of error an answer can carry.
enum class Status : std::uint8_t { ok = 0, error = 1 };
enum class ErrorKind : std::uint8_t {
  out_of_range = 1,  // KeyError / IndexError
  invalid_argument,  // wrong types, unknown object
  process_error,     // misuse: releasing an unlocked Lock
  remote,            // an exception thrown by an update function
  protocol,          // a malformed request: the connection is closed
};

// A malformed record or message (the connection that sent it is closed).
class ProtocolError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The largest message the server accepts, and what a local connection's shared block holds.
inline constexpr std::size_t kMaxManagerMessage = std::size_t{64} << 20;

void put_u8(std::string& out, std::uint8_t v);
void put_u32(std::string& out, std::uint32_t v);
void put_u64(std::string& out, std::uint64_t v);
inline void put_i64(std::string& out, std::int64_t v) {
  put_u64(out, static_cast<std::uint64_t>(v));
}
void put_bytes(std::string& out, std::string_view bytes);
// A value as a byte field: [u32 length][mp::dumps(value)].
template <class T>
void put_value(std::string& out, const T& v) {
  std::size_t at = out.size();
  put_u32(out, 0);
  dump_into(out, v);
  auto len = static_cast<std::uint32_t>(out.size() - at - 4);
  std::memcpy(out.data() + at, &len, 4);
}

// A code address as [bytes module][u64 offset].
void put_code(std::string& out, const CodeAddress& where);
// locate_code with a small per-thread cache (update_with sends the same function often).
CodeAddress locate_function(const void* address);

// Reads a message; every read is bounds-checked (ProtocolError when short).
class WireReader {
 public:
  explicit WireReader(std::string_view bytes) noexcept : bytes_(bytes) {}
  std::uint8_t u8();
  std::uint32_t u32();
  std::uint64_t u64();
  std::int64_t i64() { return static_cast<std::int64_t>(u64()); }
  std::string_view bytes();
  template <class T>
  T value() {
    return load<T>(bytes());
  }
  bool done() const noexcept { return pos_ == bytes_.size(); }
  // Throws ProtocolError unless every byte was read.
  void finish() const;

 private:
  std::string_view take(std::size_t n);
  std::string_view bytes_;
  std::size_t pos_ = 0;
};

// Splits a byte stream into records: skips wake bytes, returns whole frames. Throws
// ProtocolError on an unknown record type or a frame over max_frame (nothing is allocated
// for an oversized frame). The server's socket reader, and the fuzz target's entry point.
class FrameReader {
 public:
  explicit FrameReader(std::size_t max_frame = kMaxManagerMessage) noexcept : max_(max_frame) {}
  void feed(std::string_view bytes);
  // Moves the next whole frame into `payload`; false when none is complete yet.
  bool next(std::string& payload);
  std::size_t buffered() const noexcept { return buf_.size() - pos_; }

 private:
  void compact();
  std::size_t max_;
  std::string buf_;
  std::size_t pos_ = 0;
};

// ---- update functions ------------------------------------------------------------------------

// Runs an update function: decodes the value from `in`, applies the target, encodes the
// result into `out`.
using UpdateTrampoline = void (*)(const void* target, std::string_view in, std::string& out);

// Records a trampoline this program instantiated, with its type signature; the server runs
// only recorded ones. Returns true (for a static initializer).
bool register_update_trampoline(UpdateTrampoline t, const char* signature) noexcept;

template <class F, class V>
struct UpdateFunction {
  static void run(const void* target, std::string_view in, std::string& out) {
    V value = load<V>(in);
    V result;
    if constexpr (std::is_pointer_v<F>) {
      F f = reinterpret_cast<F>(const_cast<void*>(target));
      result = f(std::move(value));
    } else {
      F f{};
      result = f(std::move(value));
    }
    dump_into(out, result);
  }
  static const char* signature() noexcept { return typeid(UpdateFunction).name(); }
  static inline const bool registered = register_update_trampoline(&run, signature());
};

// The type signature of a value type, used to check that a named object is used with the
// types it was created with.
template <class... Ts>
std::string type_signature() {
  std::string s;
  ((s += typeid(Ts).name(), s += ';'), ...);
  return s;
}
// A readable C++ type name, for error messages.
std::string demangle(const char* mangled);

// ---- the client side -------------------------------------------------------------------------

class ClientConn;
class ClientPool;

// Where a proxy's server is.
struct Endpoint {
  std::string address;
  std::string authkey;
};

// What every proxy holds: the server and the object id. Copyable and cheap.
class ProxyCore {
 public:
  ProxyCore() = default;
  ProxyCore(std::shared_ptr<const Endpoint> ep, std::uint64_t id) noexcept
      : ep_(std::move(ep)), id_(id) {}
  const Endpoint& endpoint() const;
  std::uint64_t id() const noexcept { return id_; }
  bool valid() const noexcept { return ep_ != nullptr; }
  friend bool operator==(const ProxyCore& a, const ProxyCore& b) noexcept {
    return a.id_ == b.id_ && a.ep_ && b.ep_ && a.ep_->address == b.ep_->address;
  }

  template <class Archive>
  void save(Archive& ar) const {
    const Endpoint& e = endpoint();
    ar(e.address, e.authkey, id_);
  }
  template <class Archive>
  void load(Archive& ar) {
    Endpoint e;
    ar(e.address, e.authkey, id_);
    ep_ = std::make_shared<const Endpoint>(std::move(e));
  }

 private:
  std::shared_ptr<const Endpoint> ep_;
  std::uint64_t id_ = 0;
};

// One request and its answer on a connection taken from this process's pool for the
// endpoint (returned when the Call ends). Write the fields into out(), then send().
class Call {
 public:
  Call(const ProxyCore& core, Op op);
  Call(const Endpoint& ep, Op op, std::uint64_t id);
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;
  ~Call();
  std::string& out() noexcept;
  // Sends the request and waits for the answer. Throws what the server reported
  // (std::out_of_range, std::invalid_argument, ProcessError, RemoteError), or
  // std::runtime_error when the server is gone.
  WireReader send();

 private:
  void take(const Endpoint& ep, Op op, std::uint64_t id);
  std::shared_ptr<ClientPool> pool_;
  std::unique_ptr<ClientConn> conn_;
};

// Creates (or finds by name) an object in the server; returns its id.
std::uint64_t create_object(const std::shared_ptr<const Endpoint>& ep, ObjectKind kind,
                            const std::string& signature, std::string_view name,
                            std::uint64_t parameter);

// Nanoseconds for a timeout field: -1 forever, 0 no wait.
std::int64_t timeout_ns(std::optional<Seconds> timeout);

// The server's entry point (an mp::Process target) and its configuration.
struct ServerConfig {
  int listen_fd = -1;  // travels through the FdChannel under spawn and forkserver
  std::string authkey;
  std::string socket_path;
  std::string private_dir;
  pid_t owner = 0;
  bool forked = false;  // started by fork: close the descriptors inherited from the owner

  template <class Archive>
  void save(Archive& ar) const {
    ar(export_fd(listen_fd), authkey, socket_path, private_dir, owner, forked);
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    ar(index, authkey, socket_path, private_dir, owner, forked);
    listen_fd = import_fd(index);
  }
};
int run_manager_server(ServerConfig config);

// ---- the server's request handling, without sockets (the fuzz target drives it) -------------

class ServerState;
struct Peer {
  std::uint64_t id = 0;                  // the connection's number (who holds a Lock)
  bool (*alive)(const Peer&) = nullptr;  // checked while a call waits; null: never wait
  int fd = -1;
};
std::shared_ptr<ServerState> make_server_state(bool allow_code);
// Handles one request; writes the answer. Throws ProtocolError on a malformed request.
// Returns false when the request asks the server to shut down.
bool handle_request(ServerState& state, const Peer& peer, std::string_view request,
                    std::string& answer);
// Releases what a closed connection held (manager Locks).
void forget_peer(ServerState& state, const Peer& peer);

}  // namespace detail

// ---- proxies -----------------------------------------------------------------------------------

// A dict in the server (Python: Manager().dict()). Keys compare by their serialized bytes.
template <class K, class V>
class DictProxy {
 public:
  DictProxy() = default;  // an empty handle; get one from a Manager
  explicit DictProxy(detail::ProxyCore core) noexcept : core_(std::move(core)) {}

  // d[key] = value.
  void set(const K& key, const V& value) {
    detail::Call c(core_, detail::Op::dict_set);
    detail::put_value(c.out(), key);
    detail::put_value(c.out(), value);
    c.send();
  }
  // d.get(key): std::nullopt when absent.
  std::optional<V> get(const K& key) const {
    detail::Call c(core_, detail::Op::dict_get);
    detail::put_value(c.out(), key);
    auto r = c.send();
    if (!r.u8()) return std::nullopt;
    return r.template value<V>();
  }
  V get(const K& key, const V& default_value) const {
    auto v = get(key);
    return v ? std::move(*v) : default_value;
  }
  // d[key]: throws std::out_of_range (Python's KeyError) when absent.
  V at(const K& key) const {
    auto v = get(key);
    if (!v) throw std::out_of_range("cannot read a dict entry: no such key (KeyError)");
    return std::move(*v);
  }
  // del d[key]; false when it was absent.
  bool erase(const K& key) {
    detail::Call c(core_, detail::Op::dict_erase);
    detail::put_value(c.out(), key);
    return c.send().u8() != 0;
  }
  bool contains(const K& key) const {
    detail::Call c(core_, detail::Op::dict_contains);
    detail::put_value(c.out(), key);
    return c.send().u8() != 0;
  }
  std::size_t size() const {
    detail::Call c(core_, detail::Op::dict_size);
    return static_cast<std::size_t>(c.send().u64());
  }
  bool empty() const { return size() == 0; }
  // All entries at one moment, in insertion order.
  std::vector<std::pair<K, V>> items() const {
    detail::Call c(core_, detail::Op::dict_items);
    auto r = c.send();
    std::vector<std::pair<K, V>> out(static_cast<std::size_t>(r.u64()));
    for (auto& [k, v] : out) {
      k = r.template value<K>();
      v = r.template value<V>();
    }
    return out;
  }
  std::vector<K> keys() const {
    std::vector<K> out;
    for (auto& kv : items()) out.push_back(std::move(kv.first));
    return out;
  }
  std::map<K, V> copy() const {
    std::map<K, V> out;
    for (auto& kv : items()) out.insert_or_assign(std::move(kv.first), std::move(kv.second));
    return out;
  }
  // Sets every pair of `pairs` in one atomic step (a range of std::pair<K, V>, a std::map).
  template <class Range>
  void update(const Range& pairs) {
    detail::Call c(core_, detail::Op::dict_update);
    std::string& out = c.out();
    std::size_t at = out.size();
    detail::put_u64(out, 0);
    std::uint64_t n = 0;
    for (const auto& [k, v] : pairs) {
      detail::put_value(out, static_cast<const K&>(k));
      detail::put_value(out, static_cast<const V&>(v));
      ++n;
    }
    std::memcpy(out.data() + at, &n, sizeof n);
    c.send();
  }
  // Removes the entry and returns its value (std::nullopt when absent).
  std::optional<V> pop(const K& key) {
    detail::Call c(core_, detail::Op::dict_pop);
    detail::put_value(c.out(), key);
    auto r = c.send();
    if (!r.u8()) return std::nullopt;
    return r.template value<V>();
  }
  // The value for key, after setting it to default_value if it was absent (atomic).
  V setdefault(const K& key, const V& default_value) {
    detail::Call c(core_, detail::Op::dict_setdefault);
    detail::put_value(c.out(), key);
    detail::put_value(c.out(), default_value);
    return c.send().template value<V>();
  }
  // d[key] = fn(d.get(key, default_value)) as one atomic step in the server; returns the
  // new value. fn: a plain function or a lambda without captures, taking and returning V.
  // An exception thrown by fn reaches the caller as RemoteError; the entry is unchanged.
  template <class F>
  requires std::is_invocable_r_v<V, F&, V> V update_with(const K& key, F fn,
                                                         const V& default_value = V{}) {
    static_assert(detail::PortableCallable<F>,
                  "update_with runs fn inside the manager's server: it must be a plain function "
                  "or a lambda without captures");
    using U = detail::UpdateFunction<F, V>;
    (void)U::registered;
    detail::Call c(core_, detail::Op::dict_update_with);
    std::string& out = c.out();
    detail::put_value(out, key);
    detail::put_value(out, default_value);
    static const detail::CodeAddress trampoline =
        detail::locate_code(reinterpret_cast<const void*>(&U::run));
    detail::put_code(out, trampoline);
    detail::put_bytes(out, U::signature());
    if constexpr (std::is_pointer_v<F>) {
      detail::put_u8(out, 1);
      detail::put_code(out, detail::locate_function(reinterpret_cast<const void*>(fn)));
    } else {
      detail::put_u8(out, 0);
    }
    return c.send().template value<V>();
  }
  void clear() {
    detail::Call c(core_, detail::Op::dict_clear);
    c.send();
  }

  const detail::ProxyCore& core() const noexcept { return core_; }
  friend bool operator==(const DictProxy& a, const DictProxy& b) noexcept {
    return a.core_ == b.core_;
  }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  detail::ProxyCore core_;
};

// A list in the server (Python: Manager().list()). Indices may be negative (from the end).
template <class T>
class ListProxy {
 public:
  ListProxy() = default;
  explicit ListProxy(detail::ProxyCore core) noexcept : core_(std::move(core)) {}

  void append(const T& value) {
    detail::Call c(core_, detail::Op::list_append);
    detail::put_value(c.out(), value);
    c.send();
  }
  // Appends every element of `values` in one atomic step.
  template <class Range>
  void extend(const Range& values) {
    detail::Call c(core_, detail::Op::list_extend);
    std::string& out = c.out();
    std::size_t at = out.size();
    detail::put_u64(out, 0);
    std::uint64_t n = 0;
    for (const auto& v : values) {
      detail::put_value(out, static_cast<const T&>(v));
      ++n;
    }
    std::memcpy(out.data() + at, &n, sizeof n);
    c.send();
  }
  void insert(std::int64_t index, const T& value) {
    detail::Call c(core_, detail::Op::list_insert);
    detail::put_i64(c.out(), index);
    detail::put_value(c.out(), value);
    c.send();
  }
  // l[index]: throws std::out_of_range (IndexError).
  T get(std::int64_t index) const {
    detail::Call c(core_, detail::Op::list_get);
    detail::put_i64(c.out(), index);
    return c.send().template value<T>();
  }
  T operator[](std::int64_t index) const { return get(index); }
  void set(std::int64_t index, const T& value) {
    detail::Call c(core_, detail::Op::list_set);
    detail::put_i64(c.out(), index);
    detail::put_value(c.out(), value);
    c.send();
  }
  // Removes and returns l[index] (the last by default); throws std::out_of_range when the
  // list is empty or the index is out of range.
  T pop(std::int64_t index = -1) {
    auto v = try_pop(index);
    if (!v) throw std::out_of_range("cannot pop from the list: index out of range (IndexError)");
    return std::move(*v);
  }
  // The same, with std::nullopt instead of the exception.
  std::optional<T> try_pop(std::int64_t index = -1) {
    detail::Call c(core_, detail::Op::list_pop);
    detail::put_i64(c.out(), index);
    auto r = c.send();
    if (!r.u8()) return std::nullopt;
    return r.template value<T>();
  }
  std::size_t size() const {
    detail::Call c(core_, detail::Op::list_size);
    return static_cast<std::size_t>(c.send().u64());
  }
  bool empty() const { return size() == 0; }
  // Every element at one moment.
  std::vector<T> snapshot() const {
    detail::Call c(core_, detail::Op::list_snapshot);
    auto r = c.send();
    std::vector<T> out(static_cast<std::size_t>(r.u64()));
    for (auto& v : out) v = r.template value<T>();
    return out;
  }
  void clear() {
    detail::Call c(core_, detail::Op::list_clear);
    c.send();
  }

  const detail::ProxyCore& core() const noexcept { return core_; }
  friend bool operator==(const ListProxy& a, const ListProxy& b) noexcept {
    return a.core_ == b.core_;
  }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  detail::ProxyCore core_;
};

// A namespace in the server (Python: Manager().Namespace()): fields set and read by name,
// each holding a value of any serializable type. Reading a field as another type than it
// holds throws std::invalid_argument naming both types.
class NamespaceProxy {
 public:
  NamespaceProxy() = default;
  explicit NamespaceProxy(detail::ProxyCore core) noexcept : core_(std::move(core)) {}

  template <class T>
  void set(std::string_view name, const T& value) {
    detail::Call c(core_, detail::Op::ns_set);
    detail::put_bytes(c.out(), name);
    detail::put_bytes(c.out(), typeid(T).name());
    detail::put_value(c.out(), value);
    c.send();
  }
  // Throws std::out_of_range (Python's AttributeError) when there is no such field.
  template <class T>
  T get(std::string_view name) const {
    auto v = try_get<T>(name);
    if (!v) {
      throw std::out_of_range("cannot read namespace field '" + std::string(name) +
                              "': no such field (AttributeError)");
    }
    return std::move(*v);
  }
  template <class T>
  std::optional<T> try_get(std::string_view name) const {
    detail::Call c(core_, detail::Op::ns_get);
    detail::put_bytes(c.out(), name);
    detail::put_bytes(c.out(), typeid(T).name());
    auto r = c.send();
    if (!r.u8()) return std::nullopt;
    return r.template value<T>();
  }
  bool contains(std::string_view name) const;
  bool erase(std::string_view name);
  std::vector<std::string> names() const;

  const detail::ProxyCore& core() const noexcept { return core_; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  detail::ProxyCore core_;
};

// A lock held in the server (Python: Manager().Lock()). Like Python's, any process may
// release it; releasing it when unlocked throws ProcessError. When the connection that
// acquired it closes (its process died), the server releases it. Lockable.
class LockProxy {
 public:
  LockProxy() = default;
  explicit LockProxy(detail::ProxyCore core) noexcept : core_(std::move(core)) {}

  bool acquire(bool block = true) { return acquire_ns(block ? -1 : 0); }
  bool acquire(Seconds timeout) { return acquire_ns(detail::timeout_ns(timeout)); }
  bool try_acquire() { return acquire_ns(0); }
  void release();
  bool locked() const;

  void lock() { acquire(); }
  void unlock() { release(); }
  bool try_lock() { return try_acquire(); }

  const detail::ProxyCore& core() const noexcept { return core_; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  bool acquire_ns(std::int64_t ns);
  detail::ProxyCore core_;
};

// An event held in the server (Python: Manager().Event()).
class EventProxy {
 public:
  EventProxy() = default;
  explicit EventProxy(detail::ProxyCore core) noexcept : core_(std::move(core)) {}

  void set();
  void clear();
  bool is_set() const;
  bool wait() { return wait_ns(-1); }
  // The flag when it returns: false when the time ran out first.
  bool wait(Seconds timeout) { return wait_ns(detail::timeout_ns(timeout)); }

  const detail::ProxyCore& core() const noexcept { return core_; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  bool wait_ns(std::int64_t ns);
  detail::ProxyCore core_;
};

// A FIFO queue held in the server (Python: Manager().Queue()). Slower than mp::Queue (every
// call is a request), but reachable by remote clients and passable inside messages.
template <class T>
class QueueProxy {
 public:
  QueueProxy() = default;
  explicit QueueProxy(detail::ProxyCore core) noexcept : core_(std::move(core)) {}

  void put(const T& item) { put_ns(item, -1); }
  // Throws Full when there is still no room after `timeout`.
  void put(const T& item, Seconds timeout) {
    if (!put_ns(item, detail::timeout_ns(timeout))) {
      throw Full("cannot put into the manager queue: it is full");
    }
  }
  void put_nowait(const T& item) { put(item, Seconds{0}); }
  bool try_put(const T& item) { return put_ns(item, 0); }

  T get() { return *get_ns(-1); }
  // Throws Empty when nothing arrived within `timeout`.
  T get(Seconds timeout) {
    auto v = get_ns(detail::timeout_ns(timeout));
    if (!v) throw Empty("cannot get from the manager queue: it is empty");
    return std::move(*v);
  }
  T get_nowait() { return get(Seconds{0}); }
  std::optional<T> try_get() { return get_ns(0); }
  std::optional<T> try_get(Seconds timeout) { return get_ns(detail::timeout_ns(timeout)); }

  std::size_t qsize() const {
    detail::Call c(core_, detail::Op::queue_size);
    return static_cast<std::size_t>(c.send().u64());
  }
  bool empty() const { return qsize() == 0; }
  bool full() const {
    detail::Call c(core_, detail::Op::queue_full);
    return c.send().u8() != 0;
  }

  const detail::ProxyCore& core() const noexcept { return core_; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  bool put_ns(const T& item, std::int64_t ns) {
    detail::Call c(core_, detail::Op::queue_put);
    detail::put_i64(c.out(), ns);
    detail::put_value(c.out(), item);
    return c.send().u8() != 0;
  }
  std::optional<T> get_ns(std::int64_t ns) {
    detail::Call c(core_, detail::Op::queue_get);
    detail::put_i64(c.out(), ns);
    auto r = c.send();
    if (!r.u8()) return std::nullopt;
    return r.template value<T>();
  }
  detail::ProxyCore core_;
};

// ---- ManagerClient, Manager, connect -------------------------------------------------------

// The manager's server is not running (it was shut down, or died): a call cannot reach it.
class ManagerGoneError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A connection to a manager's server: makes and finds its objects. Manager is one (the
// owner); mp::connect() gives one for a server started elsewhere. Copyable.
class ManagerClient {
 public:
  ManagerClient() = default;

  template <class K, class V>
  DictProxy<K, V> dict(std::string_view name = {}) const {
    return DictProxy<K, V>(make(detail::ObjectKind::dict, detail::type_signature<K, V>(), name, 0));
  }
  template <class T>
  ListProxy<T> list(std::string_view name = {}) const {
    return ListProxy<T>(make(detail::ObjectKind::list, detail::type_signature<T>(), name, 0));
  }
  NamespaceProxy Namespace(std::string_view name = {}) const {
    return NamespaceProxy(make(detail::ObjectKind::namespace_, {}, name, 0));
  }
  LockProxy Lock(std::string_view name = {}) const {
    return LockProxy(make(detail::ObjectKind::lock, {}, name, 0));
  }
  EventProxy Event(std::string_view name = {}) const {
    return EventProxy(make(detail::ObjectKind::event, {}, name, 0));
  }
  // maxsize 0: unbounded.
  template <class T>
  QueueProxy<T> Queue(std::size_t maxsize = 0, std::string_view name = {}) const {
    return QueueProxy<T>(
        make(detail::ObjectKind::queue, detail::type_signature<T>(), name, maxsize));
  }

  // The address clients connect to ("unix:/tmp/mp-XXXXXX/manager", "tcp:127.0.0.1:PORT").
  const std::string& address() const;
  const std::string& authkey() const;
  // The server's process id, as the server reports it.
  pid_t server_pid() const;

 protected:
  explicit ManagerClient(std::shared_ptr<const detail::Endpoint> ep) noexcept
      : ep_(std::move(ep)) {}
  detail::ProxyCore make(detail::ObjectKind kind, const std::string& signature,
                         std::string_view name, std::uint64_t parameter) const;
  std::shared_ptr<const detail::Endpoint> ep_;
};

// Connects to a manager's server (started with Manager(address, authkey) somewhere) and
// authenticates. Throws AuthenticationError on a wrong key, std::system_error when nothing
// listens at the address.
ManagerClient connect(std::string_view address, std::string_view authkey);

// Starts and owns a manager server process (Python: multiprocessing.Manager()).
class Manager : public ManagerClient {
 public:
  // A local manager: a Unix socket in a private directory, a random authkey, the default
  // start method.
  Manager();
  explicit Manager(const Context& context);
  // A manager at `address` ("tcp:127.0.0.1:0" lets the system pick the port: see
  // address()), with `authkey` (empty: a random one, see authkey()).
  explicit Manager(std::string_view address, std::string authkey = {},
                   std::optional<Context> context = std::nullopt);
  Manager(Manager&& other) noexcept;
  Manager& operator=(Manager&& other) noexcept;
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;
  // Shuts the server down (see shutdown()). In a fork child's copy it does nothing.
  ~Manager();

  // Stops the server, waits for it (killing it if it does not stop within a few seconds),
  // and removes its socket. Proxies fail from then on. Idempotent.
  void shutdown();
  // The server process.
  pid_t pid() const noexcept { return pid_; }
  bool is_alive();

 private:
  void start(std::string_view address, std::string authkey, const Context& context);
  Process server_;
  pid_t pid_ = 0;
  pid_t owner_ = 0;
  std::string socket_path_, private_dir_;
};

}  // namespace mp
