// mp/queue.hpp - queues between processes, moving messages through shared memory.
//
//   mp::Queue<std::string> q;                     // unbounded by count (Python: Queue())
//   mp::Process p{producer, q};                   // the child gets the same queue
//   q.put("hello");                               // blocks while there is no room
//   std::string s = q.get();                      // blocks until a message arrives
//   auto maybe = q.try_get();                     // std::nullopt when the queue is empty
//   q.get(2s);                                    // throws mp::Empty after 2 s
//   q.close();                                    // puts throw mp::ShutDown from now on;
//                                                 // gets drain what is left, then throw it
//
// The family, with Python's names:
//   Queue<T>(maxsize)          FIFO, many producers and consumers in any processes.
//   JoinableQueue<T>(maxsize)  a Queue plus task_done() and join().
//   SimpleQueue<T>             put, get, empty, close: the small interface.
//   PriorityQueue<T, Compare>  get() returns the *smallest* message first, as Python's
//                              queue.PriorityQueue and heapq do (Compare = std::less<T>);
//                              pass std::greater<T> to get the largest first. Equal
//                              messages come out in the order they were put.
//
// How it works. A queue is a memfd region (mp::detail::Region): nothing is created in
// /dev/shm, and the kernel frees the memory when the last process holding it is gone. A
// Queue handle shares that region, so copies of a handle (into a Process, across fork, or
// serialized for spawn and forkserver children) all talk to the same queue. There is no
// feeder thread: put() has copied the message into shared memory when it returns, so a
// child may put and exit at once (Python's Queue deadlocks or loses data here).
//
// Messages of any size up to max_message_size() travel through a ring buffer of
// QueueOptions::capacity bytes. A larger message is refused before anything is written
// (std::length_error): raise the capacity when you need bigger messages. maxsize bounds
// the number of messages; put() also waits while the ring has no room for the bytes.
// Values are encoded as mp::dumps does (cereal), with two fast paths: trivially copyable
// types are copied byte for byte, and std::string / std::vector of trivially copyable
// elements as their raw bytes.
//
// Crashes. A producer or consumer killed at any moment (SIGKILL included) leaves the queue
// working for the others: each side has a robust process-shared lock, a put publishes its
// message with a single store once it is completely written, and a get retires a message
// only once it is completely copied out. A process that dies inside put() leaves either
// its whole message in the queue or nothing of it; one that dies inside get() before the
// message was retired leaves it to the next consumer, which receives it whole (the dead
// process's get() never returned it: no message is handed to a program twice).
// The next process to take the lock repairs the counts; sleepers look every 100 ms, so a
// death never wedges them. What a dead process cannot do is finish its own work: a task it
// took is never task_done(), so JoinableQueue::join() would wait for it; use
// join(timeout) where workers may die.
//
// Blocking calls spin for about 10 us, then sleep on a futex; an uncontended put or get
// makes no system call, and a put wakes sleeping consumers with one system call at most.
#pragma once

#include <algorithm>
#include <array>
#include <cereal/cereal.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "mp/detail/region.hpp"
#include "mp/error.hpp"
#include "mp/process.hpp"
#include "mp/serialize.hpp"

namespace mp {

// get(timeout) or get_nowait() found no message (Python: queue.Empty).
class Empty : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// put(timeout) or put_nowait() found no room (Python: queue.Full).
class Full : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The queue was closed: put() after close(), or get() once a closed queue is drained
// (Python 3.13: queue.ShutDown).
class ShutDown : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The size of the shared buffer behind a queue.
struct QueueOptions {
  // Bytes of the ring (Queue) or of the message store (PriorityQueue), rounded up to a
  // power of two (at least 4 KiB). The largest message is a little smaller: see
  // max_message_size(). The memory is only used as messages pass through it.
  std::size_t capacity = std::size_t{4} << 20;
};

namespace detail {

// nullopt: wait forever; time_point::min(): do not wait at all.
using Deadline = std::optional<std::chrono::steady_clock::time_point>;
inline constexpr std::chrono::steady_clock::time_point kNoWait =
    std::chrono::steady_clock::time_point::min();
inline Deadline deadline_of(Seconds timeout) {
  if (timeout <= Seconds::zero()) return kNoWait;
  if (timeout > Seconds(1e9)) return std::nullopt;  // "forever" in practice
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout);
}

enum class Outcome { done, timed_out, shut_down };

// Where a get writes a message: reserve(size) once, before anything changes (it may
// throw), then append() with the bytes, in one or more pieces.
class ByteSink {
 public:
  virtual void reserve(std::size_t n) = 0;
  virtual void append(const void* data, std::size_t n) = 0;

 protected:
  ~ByteSink() = default;
};

// Identifies the message type of a queue, so that a descriptor of a Queue<int> is not
// attached as a Queue<std::string>.
template <class T>
std::uint64_t type_tag() {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const char* p = typeid(T).name(); *p; ++p) {
    h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
  }
  return h ^ sizeof(T);
}

// ---- encoding ---------------------------------------------------------------------------

// Types a queue copies byte for byte: those mp::dumps copies so (TriviallySerializable),
// and also numbers, enums and std::arrays of such, which cereal would write as the same
// bytes anyway.
template <class T>
struct IsBytesCopyable
    : std::bool_constant<TriviallySerializable<T> || std::is_arithmetic_v<T> || std::is_enum_v<T>> {
};
template <class U, std::size_t N>
struct IsBytesCopyable<std::array<U, N>> : IsBytesCopyable<U> {};
template <class T>
concept BytesCopyable = IsBytesCopyable<T>::value;

template <class T>
struct IsByteVector : std::false_type {};
template <class U, class A>
struct IsByteVector<std::vector<U, A>>
    : std::bool_constant<BytesCopyable<U> && std::is_default_constructible_v<U> &&
                         !std::is_same_v<U, bool>> {};
template <class C, class Tr, class A>
struct IsByteVector<std::basic_string<C, Tr, A>> : std::true_type {};

// Types sent as their raw element bytes (std::string, std::vector<double>...).
template <class T>
concept RawRange = IsByteVector<T>::value;

// A buffer per thread for encoding messages that go through cereal.
std::string& encode_buffer();

// Calls put(data, size) with the bytes of `value`.
template <class T, class Put>
decltype(auto) encode(const T& value, Put&& put) {
  if constexpr (BytesCopyable<T>) {
    return put(static_cast<const void*>(&value), sizeof(T));
  } else if constexpr (RawRange<T>) {
    return put(static_cast<const void*>(value.data()), value.size() * sizeof(value[0]));
  } else {
    std::string& buf = encode_buffer();
    buf.clear();
    dump_into(buf, value);
    return put(static_cast<const void*>(buf.data()), buf.size());
  }
}

// Receives the bytes of one T from a queue and turns them back into a T. Each byte is
// copied once, straight into the result (no zero-filling first).
template <class T>
class Decoder final : public ByteSink {
 public:
  void reserve(std::size_t n) override {
    if constexpr (BytesCopyable<T>) {
      if (n != sizeof(T)) throw SerializationError(size_mismatch(n, sizeof(T)));
    } else if constexpr (RawRange<T>) {
      if (n % kElem != 0) throw SerializationError(size_mismatch(n, kElem));
      value_.emplace();
      value_->reserve(n / kElem);
    } else {
      bytes_.clear();
      bytes_.reserve(n);
    }
    filled_ = 0;
  }
  void append(const void* data, std::size_t n) override {
    if constexpr (BytesCopyable<T>) {
      std::memcpy(storage_ + filled_, data, n);
      filled_ += n;
    } else if constexpr (RawRange<T>) {
      append_elements(static_cast<const unsigned char*>(data), n);
    } else {
      bytes_.append(static_cast<const char*>(data), n);
    }
  }
  T take() {
    if constexpr (BytesCopyable<T>) {
      // append() copied the bytes into storage_: that made the object (implicit lifetime).
      return *std::launder(reinterpret_cast<T*>(storage_));
    } else if constexpr (RawRange<T>) {
      return std::move(*value_);
    } else {
      return load<T>(bytes_);
    }
  }

 private:
  using Elem = typename std::conditional_t<RawRange<T>, T, std::string>::value_type;
  static constexpr std::size_t kElem = sizeof(Elem);

  // Whole elements go straight into the container; an element split between two pieces
  // waits in carry_.
  void append_elements(const unsigned char* s, std::size_t n) {
    if (carry_n_ != 0) {
      std::size_t take = std::min(kElem - carry_n_, n);
      std::memcpy(carry_ + carry_n_, s, take);
      carry_n_ += take;
      s += take;
      n -= take;
      if (carry_n_ == kElem) {
        value_->push_back(*std::launder(reinterpret_cast<Elem*>(carry_)));
        carry_n_ = 0;
      }
    }
    std::size_t whole = n / kElem;
    if (whole != 0) {
      if (reinterpret_cast<std::uintptr_t>(s) % alignof(Elem) == 0) {
        const auto* first = reinterpret_cast<const Elem*>(s);
        if constexpr (IsBasicString<T>::value) {
          value_->append(first, whole);
        } else {
          value_->insert(value_->end(), first, first + whole);
        }
      } else {
        std::size_t old = value_->size();
        value_->resize(old + whole);
        std::memcpy(value_->data() + old, s, whole * kElem);
      }
      s += whole * kElem;
      n -= whole * kElem;
    }
    if (n != 0) {
      std::memcpy(carry_, s, n);
      carry_n_ = n;
    }
  }
  template <class U>
  struct IsBasicString : std::false_type {};
  template <class C, class Tr, class A>
  struct IsBasicString<std::basic_string<C, Tr, A>> : std::true_type {};

  static std::string size_mismatch(std::size_t got, std::size_t unit) {
    return "cannot decode a queue message of " + std::to_string(got) + " bytes as values of " +
           std::to_string(unit) + " bytes";
  }

  alignas(T) unsigned char storage_[BytesCopyable<T> ? sizeof(T) : 1];
  std::size_t filled_ = 0;
  std::optional<T> value_;  // RawRange
  alignas(Elem) unsigned char carry_[kElem];
  std::size_t carry_n_ = 0;
  std::string bytes_;  // cereal
};

// ---- the shared FIFO (non-template core, mp/src/queue.cpp) ------------------------------

class RingQueue {
 public:
  // A new queue in a new region. maxsize 0: no bound on the number of messages.
  static std::shared_ptr<RingQueue> create(std::uint64_t type_tag, std::size_t maxsize,
                                           const QueueOptions& options);
  // The queue in the region behind fd (a memfd received from another process).
  static std::shared_ptr<RingQueue> attach(int fd, std::uint64_t type_tag);

  RingQueue(Region region, std::uint64_t type_tag);  // checks the header

  // Copies n bytes in as one message. shut_down: the queue is closed. Throws
  // std::length_error (before writing anything) when n > max_message_size().
  Outcome put(const void* data, std::size_t n, Deadline deadline);
  // Copies the oldest message out into sink.
  Outcome get(ByteSink& sink, Deadline deadline);

  std::size_t qsize() const noexcept;
  bool has_room_for_one() const noexcept;  // maxsize not reached (ignores bytes)
  std::size_t maxsize() const noexcept;
  std::size_t capacity() const noexcept;
  std::size_t max_message_size() const noexcept;
  void close();
  bool closed() const noexcept;

  // JoinableQueue.
  void task_done();
  bool join(Deadline deadline);
  std::uint64_t unfinished_tasks() const noexcept;

  int fd() const noexcept { return region_.fd(); }

  struct Header;

 private:
  Region region_;
  Header* h_;
  unsigned char* ring_;
};

// ---- the shared heap (non-template core) ------------------------------------------------

class PriorityCore;

// A message stored in a PriorityCore, by reference.
struct PayloadRef {
  std::uint32_t first_block = 0;
  std::uint32_t size = 0;
};

// The order of messages, supplied by PriorityQueue<T, Compare>.
class PriorityOrder {
 public:
  // True when message a must come out before message b.
  virtual bool before(const PriorityCore& q, PayloadRef a, PayloadRef b) = 0;

 protected:
  ~PriorityOrder() = default;
};

class PriorityCore {
 public:
  static std::shared_ptr<PriorityCore> create(std::uint64_t type_tag, std::size_t maxsize,
                                              const QueueOptions& options);
  static std::shared_ptr<PriorityCore> attach(int fd, std::uint64_t type_tag);

  PriorityCore(Region region, std::uint64_t type_tag);

  Outcome put(const void* data, std::size_t n, PriorityOrder& order, Deadline deadline);
  Outcome get(ByteSink& sink, PriorityOrder& order, Deadline deadline);
  // Copies a stored message out (for PriorityOrder implementations).
  void read(PayloadRef p, ByteSink& sink) const;

  std::size_t qsize() const noexcept;
  std::size_t maxsize() const noexcept;
  std::size_t capacity() const noexcept;
  std::size_t max_message_size() const noexcept;
  void close();
  bool closed() const noexcept;
  int fd() const noexcept { return region_.fd(); }

  struct Header;

 private:
  friend class PqTransaction;
  Region region_;
  Header* h_;
};

// Test hook: makes this process kill itself with SIGKILL at one of the worst moments of
// a queue operation, to check that the others recover. Never set outside tests.
enum class QueueCrashPoint : int {
  none,
  put_mid_copy,        // half of the message written into the ring
  put_before_publish,  // message complete and counted, not yet published
  put_after_publish,   // published, bookkeeping not finished
  get_mid_copy,        // half of the message copied out
  get_after_retire,    // message retired, count not yet updated
  pq_mid_update,       // the heap half updated (PriorityQueue put or get)
};
void set_queue_crash_point(QueueCrashPoint point) noexcept;

}  // namespace detail

// ---- Queue ----------------------------------------------------------------------------

template <class T>
class Queue {
 public:
  // A new queue. maxsize 0 (the default) puts no bound on the number of messages; the
  // ring's capacity still bounds their bytes.
  explicit Queue(std::size_t maxsize = 0, const QueueOptions& options = {})
      : core_(detail::RingQueue::create(detail::type_tag<T>(), maxsize, options)) {}

  // Blocks until there is room. Throws ShutDown when the queue is closed and
  // std::length_error when the message can never fit (see max_message_size()).
  void put(const T& item) { check_put(do_put(item, std::nullopt)); }
  // Waits at most `timeout`, then throws Full.
  void put(const T& item, Seconds timeout) {
    check_put(do_put(item, detail::deadline_of(timeout)));
  }
  void put_nowait(const T& item) { check_put(do_put(item, detail::kNoWait)); }
  // false when there is no room (now, or within `timeout`).
  bool try_put(const T& item) { return try_put_outcome(do_put(item, detail::kNoWait)); }
  bool try_put(const T& item, Seconds timeout) {
    return try_put_outcome(do_put(item, detail::deadline_of(timeout)));
  }

  // Blocks until a message arrives. Throws ShutDown once the queue is closed and empty.
  T get() { return check_get(do_get(std::nullopt)); }
  // Waits at most `timeout`, then throws Empty.
  T get(Seconds timeout) { return check_get(do_get(detail::deadline_of(timeout))); }
  T get_nowait() { return check_get(do_get(detail::kNoWait)); }
  // std::nullopt when no message came (now, or within `timeout`), or the queue is closed
  // and drained (closed() tells which). Never throws Empty or ShutDown.
  std::optional<T> try_get() { return do_get(detail::kNoWait).second; }
  std::optional<T> try_get(Seconds timeout) { return do_get(detail::deadline_of(timeout)).second; }

  // The number of messages in the queue (a snapshot: others may change it at once).
  std::size_t qsize() const noexcept { return core_->qsize(); }
  bool empty() const noexcept { return qsize() == 0; }
  // True when maxsize messages are queued (never for an unbounded queue).
  bool full() const noexcept { return !core_->has_room_for_one(); }
  std::size_t maxsize() const noexcept { return core_->maxsize(); }
  std::size_t capacity() const noexcept { return core_->capacity(); }
  // The largest message (its encoded bytes) that put() accepts.
  std::size_t max_message_size() const noexcept { return core_->max_message_size(); }

  // Closes the queue for every process: puts throw ShutDown, blocked putters wake up and
  // throw it, gets return what is left and then throw it. Cannot be undone.
  void close() { core_->close(); }
  bool closed() const noexcept { return core_->closed(); }

  // cereal: a queue travels to spawn and forkserver children as its descriptor.
  template <class Archive>
  void save(Archive& ar) const {
    ar(detail::export_fd(core_->fd()));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    ar(index);
    core_ = detail::RingQueue::attach(detail::import_fd(index), detail::type_tag<T>());
  }

 protected:
  std::shared_ptr<detail::RingQueue> core_;

 private:
  detail::Outcome do_put(const T& item, detail::Deadline d) {
    return detail::encode(item, [&](const void* p, std::size_t n) { return core_->put(p, n, d); });
  }
  std::pair<detail::Outcome, std::optional<T>> do_get(detail::Deadline d) {
    detail::Decoder<T> dec;
    detail::Outcome o = core_->get(dec, d);
    if (o != detail::Outcome::done) return {o, std::nullopt};
    return {o, dec.take()};
  }
  static void check_put(detail::Outcome o) {
    if (o == detail::Outcome::timed_out) throw Full("cannot put into the queue: it is full");
    if (o == detail::Outcome::shut_down) throw ShutDown("cannot put into the queue: it is closed");
  }
  static bool try_put_outcome(detail::Outcome o) {
    if (o == detail::Outcome::shut_down) throw ShutDown("cannot put into the queue: it is closed");
    return o == detail::Outcome::done;
  }
  static T check_get(std::pair<detail::Outcome, std::optional<T>>&& r) {
    if (r.first == detail::Outcome::timed_out) {
      throw Empty("cannot get from the queue: it is empty");
    }
    if (r.first == detail::Outcome::shut_down) {
      throw ShutDown("cannot get from the queue: it is closed and empty");
    }
    return std::move(*r.second);
  }
};

// A Queue whose consumers report each message done with task_done(), so that join() can
// wait until every message put so far has been processed.
template <class T>
class JoinableQueue : public Queue<T> {
 public:
  explicit JoinableQueue(std::size_t maxsize = 0, const QueueOptions& options = {})
      : Queue<T>(maxsize, options) {}

  // Marks one message taken by get() as processed. Calling it more often than put() was
  // called is an error: it throws ProcessError (Python: ValueError).
  void task_done() { this->core_->task_done(); }
  // Blocks until every message put so far is task_done(). The timed form returns false
  // when that has not happened within `timeout`.
  void join() { this->core_->join(std::nullopt); }
  bool join(Seconds timeout) { return this->core_->join(detail::deadline_of(timeout)); }
  // Messages put and not yet task_done().
  std::uint64_t unfinished_tasks() const noexcept { return this->core_->unfinished_tasks(); }
};

// Python's SimpleQueue: an unbounded queue with the smallest interface.
template <class T>
class SimpleQueue {
 public:
  explicit SimpleQueue(const QueueOptions& options = {}) : q_(0, options) {}
  void put(const T& item) { q_.put(item); }
  T get() { return q_.get(); }
  bool empty() const noexcept { return q_.empty(); }
  void close() { q_.close(); }

  template <class Archive>
  void save(Archive& ar) const {
    q_.save(ar);
  }
  template <class Archive>
  void load(Archive& ar) {
    q_.load(ar);
  }

 private:
  Queue<T> q_;
};

// ---- PriorityQueue ----------------------------------------------------------------------

// get() returns the message that comes first in Compare's order: with the default
// std::less<T>, the smallest (as Python's PriorityQueue; the opposite of
// std::priority_queue). Ties come out first-in, first-out. Use a pair such as
// std::pair<int, std::string> (priority, payload) as Python programs use tuples.
//
// Every comparison decodes the two messages it compares, so keep the type cheap to decode
// (trivially copyable types cost a memcpy). put and get take O(log n) comparisons.
template <class T, class Compare = std::less<T>>
class PriorityQueue {
 public:
  explicit PriorityQueue(std::size_t maxsize = 0, const QueueOptions& options = {},
                         Compare compare = Compare())
      : core_(detail::PriorityCore::create(detail::type_tag<T>(), maxsize, options)),
        compare_(std::move(compare)) {}

  void put(const T& item) { check_put(do_put(item, std::nullopt)); }
  void put(const T& item, Seconds timeout) {
    check_put(do_put(item, detail::deadline_of(timeout)));
  }
  void put_nowait(const T& item) { check_put(do_put(item, detail::kNoWait)); }
  bool try_put(const T& item) { return try_put_outcome(do_put(item, detail::kNoWait)); }
  bool try_put(const T& item, Seconds timeout) {
    return try_put_outcome(do_put(item, detail::deadline_of(timeout)));
  }

  T get() { return check_get(do_get(std::nullopt)); }
  T get(Seconds timeout) { return check_get(do_get(detail::deadline_of(timeout))); }
  T get_nowait() { return check_get(do_get(detail::kNoWait)); }
  std::optional<T> try_get() { return do_get(detail::kNoWait).second; }
  std::optional<T> try_get(Seconds timeout) { return do_get(detail::deadline_of(timeout)).second; }

  std::size_t qsize() const noexcept { return core_->qsize(); }
  bool empty() const noexcept { return qsize() == 0; }
  bool full() const noexcept { return maxsize() != 0 && qsize() >= maxsize(); }
  std::size_t maxsize() const noexcept { return core_->maxsize(); }
  std::size_t capacity() const noexcept { return core_->capacity(); }
  std::size_t max_message_size() const noexcept { return core_->max_message_size(); }
  void close() { core_->close(); }
  bool closed() const noexcept { return core_->closed(); }

  template <class Archive>
  void save(Archive& ar) const {
    ar(detail::export_fd(core_->fd()));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    ar(index);
    core_ = detail::PriorityCore::attach(detail::import_fd(index), detail::type_tag<T>());
  }

 private:
  // Decodes messages for Compare, remembering the last few (an operation compares the
  // message it moves with one after another).
  class Order final : public detail::PriorityOrder {
   public:
    explicit Order(Compare& compare) : compare_(compare) {}
    bool before(const detail::PriorityCore& q, detail::PayloadRef a,
                detail::PayloadRef b) override {
      std::size_t ia = slot(q, a, slots_.size());
      std::size_t ib = slot(q, b, ia);
      return compare_(*slots_[ia].value, *slots_[ib].value);
    }

   private:
    // The slot holding the decoded message p; a miss replaces a slot other than `keep`.
    std::size_t slot(const detail::PriorityCore& q, detail::PayloadRef p, std::size_t keep) {
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        if (slots_[i].value && slots_[i].block == p.first_block) return i;
      }
      std::size_t i = next_++ % slots_.size();
      if (i == keep) i = next_++ % slots_.size();
      detail::Decoder<T> dec;
      q.read(p, dec);
      slots_[i].value.reset();
      slots_[i].value.emplace(dec.take());
      slots_[i].block = p.first_block;
      return i;
    }
    struct Slot {
      std::uint32_t block = 0;
      std::optional<T> value;
    };
    Compare& compare_;
    std::array<Slot, 4> slots_{};
    std::size_t next_ = 0;
  };

  detail::Outcome do_put(const T& item, detail::Deadline d) {
    Order order(compare_);
    return detail::encode(item,
                          [&](const void* p, std::size_t n) { return core_->put(p, n, order, d); });
  }
  std::pair<detail::Outcome, std::optional<T>> do_get(detail::Deadline d) {
    Order order(compare_);
    detail::Decoder<T> dec;
    detail::Outcome o = core_->get(dec, order, d);
    if (o != detail::Outcome::done) return {o, std::nullopt};
    return {o, dec.take()};
  }
  static void check_put(detail::Outcome o) {
    if (o == detail::Outcome::timed_out) {
      throw Full("cannot put into the priority queue: it is full");
    }
    if (o == detail::Outcome::shut_down) {
      throw ShutDown("cannot put into the priority queue: it is closed");
    }
  }
  static bool try_put_outcome(detail::Outcome o) {
    if (o == detail::Outcome::shut_down) {
      throw ShutDown("cannot put into the priority queue: it is closed");
    }
    return o == detail::Outcome::done;
  }
  static T check_get(std::pair<detail::Outcome, std::optional<T>>&& r) {
    if (r.first == detail::Outcome::timed_out) {
      throw Empty("cannot get from the priority queue: it is empty");
    }
    if (r.first == detail::Outcome::shut_down) {
      throw ShutDown("cannot get from the priority queue: it is closed and empty");
    }
    return std::move(*r.second);
  }

  std::shared_ptr<detail::PriorityCore> core_;
  Compare compare_;
};

}  // namespace mp
