// mp/src/queue.cpp - the shared-memory cores behind mp::Queue and mp::PriorityQueue.
//
// RingQueue: a byte ring in a memfd region. Producers take the producer lock, consumers
// the consumer lock; the two sides meet only through `tail` (bytes published) and `head`
// (bytes retired). A message is [length:8][payload][padding to 8]. A put writes the record
// into free space and publishes it with one store of `tail`; a get copies the record out
// and retires it with one store of `head`. Each side also keeps a message count; the
// counts and positions are made consistent again by a small journal when a process dies
// holding its side's lock (robust pthread mutexes tell the next locker that happened).
//
// PriorityCore: a binary heap of {message, sequence number} entries and a store of
// fixed-size blocks holding the messages, under one robust lock. Every change to the heap
// or the free list goes through an undo log, so the next locker rolls back an operation
// its owner did not finish.
//
// Waiting: spin on the shared words for a short while, then sleep on a futex word; a
// waker only makes the futex system call when a sleeper has announced itself, once per
// batch of sleepers (see wake_sleepers). Sleepers also wake every 100 ms to take their
// side's lock again: a process that died mid-operation wakes nobody, and the lock is how
// the others learn it died and repair what it left.
#include "mp/queue.hpp"

#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <new>

#include "mp/detail/futex.hpp"

namespace mp::detail {

std::string& encode_buffer() {
  thread_local std::string buffer;
  return buffer;
}

namespace {

using std::memory_order_acquire;
using std::memory_order_relaxed;
using std::memory_order_release;
using std::memory_order_seq_cst;
using U64 = std::atomic<std::uint64_t>;
using U32 = std::atomic<std::uint32_t>;

constexpr std::uint32_t kVersion = 1;
constexpr std::uint64_t kRingMagic = 0x6575'6575'712d'706dULL;  // "mp-queue", little-endian
constexpr std::uint64_t kHeapMagic = 0x0070'6165'682d'706dULL;  // "mp-heap"
constexpr std::size_t kMinCapacity = 4096;

// Each side keeps a recent copy of the other side's position (cached_head, cached_tail),
// read without a fence: it was read with acquire by whichever process of this side held
// the lock last, and the lock hand-off orders it. ThreadSanitizer sees that hand-off only
// within one process, so where the last holder was another process the copy looks
// unordered, and the bytes it lets us reuse look like a race with the thread of this
// process that read them. Under TSan each side reads the real position every time.
#if defined(__SANITIZE_THREAD__)
#define MP_QUEUE_UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MP_QUEUE_UNDER_TSAN 1
#endif
#endif
#ifdef MP_QUEUE_UNDER_TSAN
constexpr bool kUseCachedPositions = false;
#else
constexpr bool kUseCachedPositions = true;
#endif
constexpr std::size_t kMaxCapacity = std::size_t{1} << 40;

// ---- test hook --------------------------------------------------------------------------

std::atomic<int> g_crash_point{0};

inline bool crash_armed() noexcept { return g_crash_point.load(memory_order_relaxed) != 0; }

inline void crash_if(QueueCrashPoint p) noexcept {
  if (g_crash_point.load(memory_order_relaxed) == static_cast<int>(p)) [[unlikely]] {
    ::kill(::getpid(), SIGKILL);
    for (;;) ::pause();
  }
}

// ---- robust process-shared locks --------------------------------------------------------

void init_robust_mutex(pthread_mutex_t* m, const char* what) {
  pthread_mutexattr_t a;
  int rc = ::pthread_mutexattr_init(&a);
  if (rc == 0) rc = ::pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  if (rc == 0) rc = ::pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  if (rc == 0) rc = ::pthread_mutex_init(m, &a);
  ::pthread_mutexattr_destroy(&a);
  if (rc != 0) throw system_error(rc, fmt::format("initialize {}", what));
}

// Holds a robust lock for a scope. When the previous owner died holding it, `repair` runs
// first (with the lock held) to put the shared state back in order. With a deadline, gives
// up when it passes (owns() is then false); without one (or with kNoWait, since the lock
// is only ever held for the length of one copy), waits for the lock.
class RobustGuard {
 public:
  template <class Repair>
  RobustGuard(pthread_mutex_t* m, const char* what, Repair&& repair, const Deadline& deadline = {})
      : m_(m) {
    int rc = EBUSY;
    // A short spin: the holder is usually a few hundred nanoseconds from unlocking.
    for (int i = 0; i < 64 && rc == EBUSY; ++i) {
      rc = ::pthread_mutex_trylock(m);
      if (rc == EBUSY) cpu_relax();
    }
    if (rc == EBUSY) {
      if (deadline && *deadline != kNoWait) {
        auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline->time_since_epoch())
                      .count();
        timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
        rc = ::pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
        if (rc == ETIMEDOUT) return;
      } else {
        rc = ::pthread_mutex_lock(m);
      }
    }
    if (rc == EOWNERDEAD) {
      repair();
      rc = ::pthread_mutex_consistent(m);
      if (rc != 0) {
        ::pthread_mutex_unlock(m);
        throw system_error(rc, fmt::format("recover {} after its holder died", what));
      }
    } else if (rc != 0) {
      throw system_error(rc, fmt::format("lock {}", what));
    }
    owns_ = true;
  }
  RobustGuard(const RobustGuard&) = delete;
  RobustGuard& operator=(const RobustGuard&) = delete;
  ~RobustGuard() {
    if (!owns_) return;
    int rc = ::pthread_mutex_unlock(m_);
    if (rc != 0) {
      errno = rc;
      report_noexcept("cannot unlock a queue lock");
    }
  }
  bool owns() const noexcept { return owns_; }

 private:
  pthread_mutex_t* m_;
  bool owns_ = false;
};

// ---- waiting ----------------------------------------------------------------------------

// The futex words sleepers wait on. Bit 0 says "someone sleeps here, or is about to";
// the other bits count wake-ups. A sleeper sets the bit, checks its condition once more,
// and sleeps while the word is unchanged. A waker, after changing the condition, reads the
// word: with the bit clear (nobody sleeps, the common case) it does nothing; with the bit
// set it clears it by adding 1 (which also moves the count on) and wakes every sleeper,
// one system call for all of them. The next wakers find the bit clear until someone
// sleeps again. The seq_cst order of the two sides' operations means either the waker
// sees the bit, or the sleeper sees the changed condition.

// Wakes the sleepers on `seq`, if any announced themselves.
void wake_sleepers(U32& seq) {
  std::uint32_t w = seq.load(memory_order_seq_cst);
  while ((w & 1) != 0) {
    if (seq.compare_exchange_weak(w, w + 1, memory_order_seq_cst)) {
      futex_wake(seq);
      return;
    }
  }
}

// The same from a noexcept context (lock repair).
void wake_sleepers_noexcept(U32& seq) noexcept {
  try {
    wake_sleepers(seq);
  } catch (const std::exception& e) {
    report_noexcept(e.what());
  }
}

// Wakes everyone on `seq`, announced or not (close()).
void wake_everyone(U32& seq) {
  seq.fetch_add(2, memory_order_seq_cst);
  futex_wake(seq);
}

// How long a sleeper sleeps before it takes its side's lock again. A process that dies
// mid-operation can wake nobody; this bounds how long the others take to notice (the lock
// then tells them, and they repair what it left).
constexpr auto kRecheck = std::chrono::milliseconds(100);

// Waits a while for ready(). Returns false when the deadline has passed and ready() still
// does not hold; true otherwise (ready, or time to try the operation again). Spins first,
// then sleeps on `seq` (see above).
// How long a waiter spins before it sleeps: many small messages' worth, and well under the
// 20-80 us a sleep and a wake-up cost; longer spins waste the core when the machine is
// busy (the peer may be waiting for it). Measured in time, not iterations: a pause
// instruction takes from a few to ~50 ns depending on the CPU (detail::kSpinCount pauses
// are ~100 us on the AMD EPYC this was tuned on).
constexpr std::chrono::microseconds kSpinTime{10};

template <class Ready>
bool wait_until(U32& seq, const Deadline& deadline, Ready ready) {
  const auto spin_end = std::chrono::steady_clock::now() + kSpinTime;
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 16 == 0 && std::chrono::steady_clock::now() >= spin_end) break;
  }
  auto now = std::chrono::steady_clock::now();
  if (deadline && now >= *deadline) return ready();
  auto until = now + kRecheck;
  if (deadline && *deadline < until) until = *deadline;
  std::uint32_t w = seq.load(memory_order_seq_cst);
  while ((w & 1) == 0) {
    if (seq.compare_exchange_weak(w, w | 1, memory_order_seq_cst)) {
      w |= 1;
      break;
    }
  }
  if (!ready()) futex_wait(seq, w, until);
  if (ready()) return true;
  return !(deadline && std::chrono::steady_clock::now() >= *deadline);
}

// Repairs what a dead holder of `m` left, if it is free; does nothing when a live process
// holds it (it is mid-operation, and the state is only briefly off).
template <class Repair>
void recover_if_abandoned(pthread_mutex_t* m, Repair&& repair) noexcept {
  int rc = ::pthread_mutex_trylock(m);
  if (rc == EOWNERDEAD) {
    repair();
    ::pthread_mutex_consistent(m);
  }
  if (rc == 0 || rc == EOWNERDEAD) ::pthread_mutex_unlock(m);
}

std::size_t checked_capacity(std::size_t requested) {
  if (requested > kMaxCapacity) {
    throw std::invalid_argument(
        fmt::format("cannot create a queue of {} bytes: the largest capacity is {} bytes",
                    requested, kMaxCapacity));
  }
  return std::bit_ceil(std::max(requested, kMinCapacity));
}

constexpr std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

}  // namespace

void set_queue_crash_point(QueueCrashPoint point) noexcept {
  g_crash_point.store(static_cast<int>(point), memory_order_relaxed);
}

// =========================================================================================
// RingQueue
// =========================================================================================

namespace {
// Written under a side's lock before that side changes anything others can see; read by
// the next holder when the writer died (see repair_put / repair_get).
struct Journal {
  U64 active{0};
  U64 new_pos{0};    // tail (head) once the operation is complete
  U64 new_count{0};  // put_count (get_count) once the operation is complete
};

constexpr std::uint64_t kRecordHeader = 8;
constexpr std::uint64_t record_size(std::uint64_t n) {
  return (kRecordHeader + n + 7) & ~std::uint64_t{7};
}
}  // namespace

struct RingQueue::Header {
  // Fixed at creation.
  std::uint64_t magic = kRingMagic;
  std::uint32_t version = kVersion;
  std::uint32_t header_size = sizeof(Header);
  std::uint64_t type_tag = 0;
  std::uint64_t capacity = 0;  // bytes of the ring, a power of two
  std::uint64_t maxsize = 0;   // messages; 0: no bound
  std::uint64_t ring_offset = 0;

  // Producer side: put_lock guards everything up to `tail`.
  alignas(64) pthread_mutex_t put_lock;
  Journal put_journal;
  U64 cached_head{0};  // a recent head (<= the real one), to spare reading the consumers' line
  // Written by producers, read by consumers. put_count is raised before tail publishes.
  alignas(64) U64 tail{0};
  U64 put_count{0};

  // Consumer side.
  alignas(64) pthread_mutex_t get_lock;
  Journal get_journal;
  U64 cached_tail{0};  // a recent tail (<= the real one)
  alignas(64) U64 head{0};
  U64 get_count{0};

  // Sleeping: consumers wait for data, producers for room, joiners for task_done().
  alignas(64) U32 data_seq{0};
  alignas(64) U32 space_seq{0};
  alignas(64) U32 closed{0};
  U32 done_seq{0};
  U64 done_count{0};
};

namespace {
using RingHeader = RingQueue::Header;

// A producer died holding put_lock. If its message was not published, it never happened:
// take back the count it may have raised (and let joiners look again).
void repair_put(RingHeader& h) noexcept {
  if (h.put_journal.active.load(memory_order_acquire) == 0) return;
  if (h.tail.load(memory_order_acquire) != h.put_journal.new_pos.load(memory_order_relaxed)) {
    h.put_count.store(h.put_journal.new_count.load(memory_order_relaxed) - 1, memory_order_seq_cst);
    wake_sleepers_noexcept(h.done_seq);
  }
  h.put_journal.active.store(0, memory_order_release);
}

// A consumer died holding get_lock. If it retired its message, finish the count; if not,
// the message stays at the head for the next consumer.
void repair_get(RingHeader& h) noexcept {
  if (h.get_journal.active.load(memory_order_acquire) == 0) return;
  if (h.head.load(memory_order_acquire) == h.get_journal.new_pos.load(memory_order_relaxed)) {
    h.get_count.store(h.get_journal.new_count.load(memory_order_relaxed), memory_order_release);
  }
  h.get_journal.active.store(0, memory_order_release);
}
}  // namespace

std::shared_ptr<RingQueue> RingQueue::create(std::uint64_t type_tag, std::size_t maxsize,
                                             const QueueOptions& options) {
  std::size_t capacity = checked_capacity(options.capacity);
  std::size_t ring_offset = round_up(sizeof(Header), 4096);
  Region region = Region::create(ring_offset + capacity, "queue");
  auto* h = new (region.data()) Header();
  h->type_tag = type_tag;
  h->capacity = capacity;
  h->maxsize = maxsize;
  h->ring_offset = ring_offset;
  init_robust_mutex(&h->put_lock, "the queue's producer lock");
  init_robust_mutex(&h->get_lock, "the queue's consumer lock");
  return std::make_shared<RingQueue>(std::move(region), type_tag);
}

std::shared_ptr<RingQueue> RingQueue::attach(int fd, std::uint64_t type_tag) {
  return std::make_shared<RingQueue>(Region::attach(fd), type_tag);
}

RingQueue::RingQueue(Region region, std::uint64_t type_tag) : region_(std::move(region)) {
  if (region_.size() < sizeof(Header)) {
    throw SerializationError("cannot attach a queue: the shared memory is too small");
  }
  h_ = region_.as<Header>();
  if (h_->magic != kRingMagic || h_->version != kVersion || h_->header_size != sizeof(Header)) {
    throw SerializationError("cannot attach a queue: the shared memory holds no mp::Queue");
  }
  if (h_->type_tag != type_tag) {
    throw SerializationError("cannot attach a queue: it was made for another message type");
  }
  if (!std::has_single_bit(h_->capacity) || region_.size() < h_->ring_offset + h_->capacity) {
    throw SerializationError("cannot attach a queue: its header is damaged");
  }
  ring_ = static_cast<unsigned char*>(region_.data()) + h_->ring_offset;
}

Outcome RingQueue::put(const void* data, std::size_t n, Deadline deadline) {
  Header& h = *h_;
  const std::uint64_t cap = h.capacity;
  if (n > cap - kRecordHeader) {
    throw std::length_error(fmt::format(
        "cannot put a message of {} bytes into the queue: it takes at most {} bytes per "
        "message (QueueOptions::capacity is {} bytes; make the queue with a larger one)",
        n, cap - kRecordHeader, cap));
  }
  const std::uint64_t rec = record_size(n);
  const std::uint64_t mask = cap - 1;
  const auto* src = static_cast<const unsigned char*>(data);

  for (;;) {
    if (h.closed.load(memory_order_acquire)) return Outcome::shut_down;
    bool published = false;
    {
      RobustGuard g(
          &h.put_lock, "the queue's producer lock", [&]() noexcept { repair_put(h); }, deadline);
      if (!g.owns()) return Outcome::timed_out;
      if (h.closed.load(memory_order_acquire)) return Outcome::shut_down;
      const std::uint64_t tail = h.tail.load(memory_order_relaxed);
      std::uint64_t head = h.cached_head.load(memory_order_relaxed);
      if (!kUseCachedPositions || cap - (tail - head) < rec) {
        head = h.head.load(memory_order_acquire);
        h.cached_head.store(head, memory_order_relaxed);
      }
      const std::uint64_t count = h.put_count.load(memory_order_relaxed);
      bool room = cap - (tail - head) >= rec &&
                  (h.maxsize == 0 || count - h.get_count.load(memory_order_acquire) < h.maxsize);
      if (room) {
        h.put_journal.new_pos.store(tail + rec, memory_order_relaxed);
        h.put_journal.new_count.store(count + 1, memory_order_relaxed);
        h.put_journal.active.store(1, memory_order_release);

        // The record: its length word never wraps (8-byte aligned in a power-of-two ring),
        // the payload may, in which case it goes in two pieces.
        const std::uint64_t off = tail & mask;
        const std::uint64_t len = n;
        std::memcpy(ring_ + off, &len, sizeof len);
        const std::uint64_t at = (off + kRecordHeader) & mask;
        const std::size_t first = std::min<std::uint64_t>(n, cap - at);
        const std::size_t cut = crash_armed() ? first / 2 : first;
        if (cut != 0) std::memcpy(ring_ + at, src, cut);
        crash_if(QueueCrashPoint::put_mid_copy);
        if (cut < first) std::memcpy(ring_ + at + cut, src + cut, first - cut);
        if (first < n) std::memcpy(ring_, src + first, n - first);

        h.put_count.store(count + 1, memory_order_release);
        crash_if(QueueCrashPoint::put_before_publish);
        h.tail.store(tail + rec, memory_order_seq_cst);  // published
        crash_if(QueueCrashPoint::put_after_publish);
        h.put_journal.active.store(0, memory_order_release);
        published = true;
      }
    }
    if (published) break;
    if (deadline == kNoWait) return Outcome::timed_out;
    bool ready = wait_until(h.space_seq, deadline, [&] {
      if (h.closed.load(memory_order_seq_cst)) return true;
      std::uint64_t used = h.tail.load(memory_order_seq_cst) - h.head.load(memory_order_seq_cst);
      if (cap - used < rec) return false;
      return h.maxsize == 0 ||
             h.put_count.load(memory_order_seq_cst) - h.get_count.load(memory_order_seq_cst) <
                 h.maxsize;
    });
    if (!ready) return Outcome::timed_out;
  }
  wake_sleepers(h.data_seq);
  return Outcome::done;
}

Outcome RingQueue::get(ByteSink& sink, Deadline deadline) {
  Header& h = *h_;
  const std::uint64_t cap = h.capacity;
  const std::uint64_t mask = cap - 1;

  for (;;) {
    // Read before looking at the ring: a close() that happened before this load also
    // happened after every put it could race with (close takes the producer lock).
    const bool was_closed = h.closed.load(memory_order_acquire) != 0;
    bool retired = false;
    {
      RobustGuard g(
          &h.get_lock, "the queue's consumer lock", [&]() noexcept { repair_get(h); }, deadline);
      if (!g.owns()) return Outcome::timed_out;
      const std::uint64_t head = h.head.load(memory_order_relaxed);
      std::uint64_t tail = h.cached_tail.load(memory_order_relaxed);
      if (!kUseCachedPositions || tail == head) {
        tail = h.tail.load(memory_order_acquire);
        h.cached_tail.store(tail, memory_order_relaxed);
      }
      if (tail != head) {
        const std::uint64_t off = head & mask;
        std::uint64_t len = 0;
        std::memcpy(&len, ring_ + off, sizeof len);
        if (len > cap - kRecordHeader || record_size(len) > tail - head) {
          throw std::runtime_error(
              fmt::format("cannot get from the queue: its buffer is damaged (a record of "
                          "{} bytes where {} bytes are published)",
                          len, tail - head));
        }
        const std::uint64_t rec = record_size(len);
        sink.reserve(len);  // may throw: nothing has changed yet
        const std::uint64_t count = h.get_count.load(memory_order_relaxed);
        h.get_journal.new_pos.store(head + rec, memory_order_relaxed);
        h.get_journal.new_count.store(count + 1, memory_order_relaxed);
        h.get_journal.active.store(1, memory_order_release);

        const std::uint64_t at = (off + kRecordHeader) & mask;
        const std::size_t first = std::min<std::uint64_t>(len, cap - at);
        const std::size_t cut = crash_armed() ? first / 2 : first;
        if (cut != 0) sink.append(ring_ + at, cut);
        crash_if(QueueCrashPoint::get_mid_copy);
        if (cut < first) sink.append(ring_ + at + cut, first - cut);
        if (first < len) sink.append(ring_, len - first);

        h.head.store(head + rec, memory_order_seq_cst);  // retired
        crash_if(QueueCrashPoint::get_after_retire);
        h.get_count.store(count + 1, memory_order_release);
        h.get_journal.active.store(0, memory_order_release);
        retired = true;
      }
    }
    if (retired) break;
    if (was_closed) return Outcome::shut_down;
    if (deadline == kNoWait) return Outcome::timed_out;
    bool ready = wait_until(h.data_seq, deadline, [&] {
      return h.closed.load(memory_order_seq_cst) != 0 ||
             h.tail.load(memory_order_seq_cst) != h.head.load(memory_order_seq_cst);
    });
    if (!ready) return Outcome::timed_out;
  }
  wake_sleepers(h.space_seq);
  return Outcome::done;
}

std::size_t RingQueue::qsize() const noexcept {
  Header& h = *h_;
  recover_if_abandoned(&h.put_lock, [&]() noexcept { repair_put(h); });
  recover_if_abandoned(&h.get_lock, [&]() noexcept { repair_get(h); });
  // get_count first: put_count only grows past it (put raises it before publishing).
  std::uint64_t got = h_->get_count.load(memory_order_acquire);
  std::uint64_t put = h_->put_count.load(memory_order_acquire);
  return put > got ? static_cast<std::size_t>(put - got) : 0;
}

bool RingQueue::has_room_for_one() const noexcept {
  return h_->maxsize == 0 || qsize() < h_->maxsize;
}

std::size_t RingQueue::maxsize() const noexcept { return h_->maxsize; }
std::size_t RingQueue::capacity() const noexcept { return h_->capacity; }
std::size_t RingQueue::max_message_size() const noexcept { return h_->capacity - kRecordHeader; }

void RingQueue::close() {
  Header& h = *h_;
  {
    // Under the producer lock: once close() returns, no put is half done or can start.
    RobustGuard g(&h.put_lock, "the queue's producer lock", [&]() noexcept { repair_put(h); });
    h.closed.store(1, memory_order_seq_cst);
  }
  wake_everyone(h.data_seq);
  wake_everyone(h.space_seq);
}

bool RingQueue::closed() const noexcept { return h_->closed.load(memory_order_acquire) != 0; }

void RingQueue::task_done() {
  Header& h = *h_;
  std::uint64_t done = h.done_count.load(memory_order_acquire);
  for (;;) {
    if (done >= h.put_count.load(memory_order_acquire)) {
      throw ProcessError("task_done() called more times than items were put into the queue");
    }
    if (h.done_count.compare_exchange_weak(done, done + 1, memory_order_seq_cst)) break;
  }
  // A joiner can only be satisfied when this made done == put_count; if a put came in
  // meanwhile, the task_done() for it will wake the joiner.
  if (done + 1 >= h.put_count.load(memory_order_seq_cst)) wake_sleepers(h.done_seq);
}

bool RingQueue::join(Deadline deadline) {
  Header& h = *h_;
  auto all_done = [&] {
    return h.done_count.load(memory_order_seq_cst) >= h.put_count.load(memory_order_seq_cst);
  };
  for (;;) {
    // A producer that died mid-put may have counted a message it never published.
    recover_if_abandoned(&h.put_lock, [&]() noexcept { repair_put(h); });
    if (all_done()) return true;
    if (deadline == kNoWait) return false;
    if (!wait_until(h.done_seq, deadline, all_done)) return false;
  }
}

std::uint64_t RingQueue::unfinished_tasks() const noexcept {
  recover_if_abandoned(&h_->put_lock, [&]() noexcept { repair_put(*h_); });
  std::uint64_t done = h_->done_count.load(memory_order_acquire);
  std::uint64_t put = h_->put_count.load(memory_order_acquire);
  return put > done ? put - done : 0;
}

// =========================================================================================
// PriorityCore
// =========================================================================================

namespace {
constexpr std::size_t kBlockSize = 128;                // bytes per block, a next word first
constexpr std::size_t kBlockPayload = kBlockSize - 8;  // message bytes per block
constexpr std::uint64_t kMaxLog = 192;                 // a put or get logs ~4 + 2*depth words
constexpr std::uint64_t kNoBlock = ~std::uint64_t{0};

struct LogEntry {
  U64 offset{0};  // of the changed word, from the start of the region
  U64 old{0};
};

std::uint64_t blocks_for(std::uint64_t n) {
  return std::max<std::uint64_t>(1, (n + kBlockPayload - 1) / kBlockPayload);
}
}  // namespace

struct PriorityCore::Header {
  std::uint64_t magic = kHeapMagic;
  std::uint32_t version = kVersion;
  std::uint32_t header_size = sizeof(Header);
  std::uint64_t type_tag = 0;
  std::uint64_t maxsize = 0;
  std::uint64_t nblocks = 0;
  std::uint64_t entries_offset = 0;  // 2 words per heap slot: {first block | size << 32, seq}
  std::uint64_t blocks_offset = 0;

  alignas(64) pthread_mutex_t lock;
  // The state. Changed only under the lock and through the undo log.
  U64 count{0};        // messages in the heap
  U64 free_head{0};    // first free block
  U64 free_blocks{0};  // free blocks
  U64 next_seq{0};     // sequence number of the next put (ties come out in put order)
  U64 log_len{0};      // undo entries of the operation in progress; 0 between operations
  LogEntry log[kMaxLog];

  alignas(64) U32 data_seq{0};
  alignas(64) U32 space_seq{0};
  alignas(64) U32 closed{0};
};

namespace {
using HeapHeader = PriorityCore::Header;

unsigned char* base_of(HeapHeader& h) { return reinterpret_cast<unsigned char*>(&h); }
U64* entry_words(HeapHeader& h) { return reinterpret_cast<U64*>(base_of(h) + h.entries_offset); }
unsigned char* block_at(HeapHeader& h, std::uint64_t b) {
  return base_of(h) + h.blocks_offset + b * kBlockSize;
}
U64& next_of(HeapHeader& h, std::uint64_t b) { return *reinterpret_cast<U64*>(block_at(h, b)); }

// Undoes the logged changes of an unfinished operation, newest first. Safe to repeat: a
// process that dies while rolling back leaves the log as it was.
void rollback(HeapHeader& h, std::size_t region_size) noexcept {
  std::uint64_t n = std::min(h.log_len.load(memory_order_acquire), kMaxLog);
  for (std::uint64_t i = n; i-- > 0;) {
    std::uint64_t off = h.log[i].offset.load(memory_order_relaxed);
    if (off % 8 != 0 || off + 8 > region_size) continue;  // never written by us: ignore
    reinterpret_cast<U64*>(base_of(h) + off)
        ->store(h.log[i].old.load(memory_order_relaxed), memory_order_release);
  }
  h.log_len.store(0, memory_order_release);
}

struct Entry {
  std::uint64_t w0 = 0;  // first block | size << 32
  std::uint64_t w1 = 0;  // sequence number
  PayloadRef ref() const {
    return {static_cast<std::uint32_t>(w0), static_cast<std::uint32_t>(w0 >> 32)};
  }
};
}  // namespace

// Changes words of the heap state, logging each old value first. Destroyed uncommitted
// (an exception from Compare or a decoder), it rolls everything back.
class PqTransaction {
 public:
  PqTransaction(HeapHeader& h, std::size_t region_size) : h_(h), region_size_(region_size) {}
  PqTransaction(const PqTransaction&) = delete;
  PqTransaction& operator=(const PqTransaction&) = delete;
  ~PqTransaction() {
    if (!committed_) rollback(h_, region_size_);
  }

  void set(U64& word, std::uint64_t value) {
    std::uint64_t n = h_.log_len.load(memory_order_relaxed);
    if (n >= kMaxLog) throw std::logic_error("priority queue: undo log overflow");
    h_.log[n].offset.store(
        static_cast<std::uint64_t>(reinterpret_cast<unsigned char*>(&word) - base_of(h_)),
        memory_order_relaxed);
    h_.log[n].old.store(word.load(memory_order_relaxed), memory_order_relaxed);
    h_.log_len.store(n + 1, memory_order_release);
    if (n == 2) crash_if(QueueCrashPoint::pq_mid_update);
    word.store(value, memory_order_release);
  }
  void set_entry(std::uint64_t i, const Entry& e) {
    U64* w = entry_words(h_);
    set(w[2 * i], e.w0);
    set(w[2 * i + 1], e.w1);
  }
  void commit() {
    h_.log_len.store(0, memory_order_release);
    committed_ = true;
  }

 private:
  HeapHeader& h_;
  std::size_t region_size_;
  bool committed_ = false;
};

namespace {
Entry entry_at(HeapHeader& h, std::uint64_t i) {
  U64* w = entry_words(h);
  return {w[2 * i].load(memory_order_relaxed), w[2 * i + 1].load(memory_order_relaxed)};
}

// The last block of a chain of k blocks starting at `first`.
std::uint64_t last_block(HeapHeader& h, std::uint64_t first, std::uint64_t k) {
  std::uint64_t b = first;
  for (std::uint64_t i = 1; i < k; ++i) b = next_of(h, b).load(memory_order_relaxed);
  return b;
}
}  // namespace

std::shared_ptr<PriorityCore> PriorityCore::create(std::uint64_t type_tag, std::size_t maxsize,
                                                   const QueueOptions& options) {
  std::size_t capacity = checked_capacity(options.capacity);
  std::uint64_t nblocks = capacity / kBlockSize;
  if (nblocks > 0xffffffffULL) {
    throw std::invalid_argument("cannot create a priority queue that large: at most 512 GiB");
  }
  std::size_t entries_offset = round_up(sizeof(Header), 64);
  std::size_t blocks_offset = round_up(entries_offset + nblocks * 16, 4096);
  Region region = Region::create(blocks_offset + capacity, "priority-queue");
  auto* h = new (region.data()) Header();
  h->type_tag = type_tag;
  h->maxsize = maxsize;
  h->nblocks = nblocks;
  h->entries_offset = entries_offset;
  h->blocks_offset = blocks_offset;
  h->free_head.store(0, memory_order_relaxed);
  h->free_blocks.store(nblocks, memory_order_relaxed);
  for (std::uint64_t b = 0; b < nblocks; ++b) {
    next_of(*h, b).store(b + 1 < nblocks ? b + 1 : kNoBlock, memory_order_relaxed);
  }
  init_robust_mutex(&h->lock, "the priority queue's lock");
  return std::make_shared<PriorityCore>(std::move(region), type_tag);
}

std::shared_ptr<PriorityCore> PriorityCore::attach(int fd, std::uint64_t type_tag) {
  return std::make_shared<PriorityCore>(Region::attach(fd), type_tag);
}

PriorityCore::PriorityCore(Region region, std::uint64_t type_tag) : region_(std::move(region)) {
  if (region_.size() < sizeof(Header)) {
    throw SerializationError("cannot attach a priority queue: the shared memory is too small");
  }
  h_ = region_.as<Header>();
  if (h_->magic != kHeapMagic || h_->version != kVersion || h_->header_size != sizeof(Header)) {
    throw SerializationError(
        "cannot attach a priority queue: the shared memory holds no mp::PriorityQueue");
  }
  if (h_->type_tag != type_tag) {
    throw SerializationError(
        "cannot attach a priority queue: it was made for another message type");
  }
  if (region_.size() < h_->blocks_offset + h_->nblocks * kBlockSize) {
    throw SerializationError("cannot attach a priority queue: its header is damaged");
  }
}

void PriorityCore::read(PayloadRef p, ByteSink& sink) const {
  sink.reserve(p.size);
  std::uint64_t b = p.first_block;
  std::size_t left = p.size;
  while (left > 0) {
    std::size_t chunk = std::min(left, kBlockPayload);
    sink.append(block_at(*h_, b) + 8, chunk);
    left -= chunk;
    if (left > 0) b = next_of(*h_, b).load(memory_order_relaxed);
  }
}

std::size_t PriorityCore::max_message_size() const noexcept {
  return static_cast<std::size_t>(
      std::min<std::uint64_t>(h_->nblocks * kBlockPayload, 0xffffffffULL));
}

Outcome PriorityCore::put(const void* data, std::size_t n, PriorityOrder& order,
                          Deadline deadline) {
  Header& h = *h_;
  if (n > max_message_size()) {
    throw std::length_error(fmt::format(
        "cannot put a message of {} bytes into the priority queue: it takes at most {} bytes "
        "per message (QueueOptions::capacity is {} bytes; make the queue with a larger one)",
        n, max_message_size(), capacity()));
  }
  const std::uint64_t k = blocks_for(n);
  const auto* src = static_cast<const unsigned char*>(data);
  auto has_room = [&] {
    return (h.maxsize == 0 || h.count.load(memory_order_seq_cst) < h.maxsize) &&
           h.free_blocks.load(memory_order_seq_cst) >= k;
  };

  for (;;) {
    if (h.closed.load(memory_order_acquire)) return Outcome::shut_down;
    bool stored = false;
    {
      RobustGuard g(
          &h.lock, "the priority queue's lock", [&]() noexcept { rollback(h, region_.size()); },
          deadline);
      if (!g.owns()) return Outcome::timed_out;
      if (h.closed.load(memory_order_acquire)) return Outcome::shut_down;
      if (has_room()) {
        // Copy the message into free blocks first: until the free list says otherwise
        // they belong to nobody, so a death here changes nothing.
        const std::uint64_t first = h.free_head.load(memory_order_relaxed);
        std::uint64_t b = first;
        std::size_t left = n;
        for (std::uint64_t i = 0; i < k; ++i) {
          std::size_t chunk = std::min(left, kBlockPayload);
          if (chunk != 0) std::memcpy(block_at(h, b) + 8, src + (n - left), chunk);
          left -= chunk;
          if (i + 1 < k) b = next_of(h, b).load(memory_order_relaxed);
        }
        const std::uint64_t rest = next_of(h, b).load(memory_order_relaxed);

        PqTransaction tx(h, region_.size());
        tx.set(h.free_head, rest);
        tx.set(h.free_blocks, h.free_blocks.load(memory_order_relaxed) - k);
        const std::uint64_t seq = h.next_seq.load(memory_order_relaxed);
        tx.set(h.next_seq, seq + 1);
        const Entry e{first | (static_cast<std::uint64_t>(n) << 32), seq};
        std::uint64_t i = h.count.load(memory_order_relaxed);
        tx.set(h.count, i + 1);
        // Sift up. The new message is the youngest, so it passes a parent only when it
        // is strictly before it: equal messages keep their put order.
        while (i > 0) {
          std::uint64_t parent = (i - 1) / 2;
          Entry p = entry_at(h, parent);
          if (!order.before(*this, e.ref(), p.ref())) break;
          tx.set_entry(i, p);
          i = parent;
        }
        tx.set_entry(i, e);
        tx.commit();
        stored = true;
      }
    }
    if (stored) break;
    if (deadline == kNoWait) return Outcome::timed_out;
    bool ready = wait_until(h.space_seq, deadline,
                            [&] { return h.closed.load(memory_order_seq_cst) != 0 || has_room(); });
    if (!ready) return Outcome::timed_out;
  }
  wake_sleepers(h.data_seq);
  return Outcome::done;
}

Outcome PriorityCore::get(ByteSink& sink, PriorityOrder& order, Deadline deadline) {
  Header& h = *h_;
  // Full order: Compare first, then the sequence number.
  auto before = [&](const Entry& a, const Entry& b) {
    if (order.before(*this, a.ref(), b.ref())) return true;
    if (order.before(*this, b.ref(), a.ref())) return false;
    return a.w1 < b.w1;
  };

  for (;;) {
    const bool was_closed = h.closed.load(memory_order_acquire) != 0;
    bool taken = false;
    {
      RobustGuard g(
          &h.lock, "the priority queue's lock", [&]() noexcept { rollback(h, region_.size()); },
          deadline);
      if (!g.owns()) return Outcome::timed_out;
      const std::uint64_t count = h.count.load(memory_order_relaxed);
      if (count > 0) {
        const Entry top = entry_at(h, 0);
        read(top.ref(), sink);  // may throw: nothing has changed yet

        PqTransaction tx(h, region_.size());
        const std::uint64_t n = count - 1;
        tx.set(h.count, n);
        // Give the message's blocks back.
        const std::uint64_t k = blocks_for(top.ref().size);
        const std::uint64_t first = top.ref().first_block;
        tx.set(next_of(h, last_block(h, first, k)), h.free_head.load(memory_order_relaxed));
        tx.set(h.free_head, first);
        tx.set(h.free_blocks, h.free_blocks.load(memory_order_relaxed) + k);
        // Move the last entry to the root and sift it down.
        if (n > 0) {
          const Entry moving = entry_at(h, n);
          std::uint64_t i = 0;
          for (;;) {
            std::uint64_t c = 2 * i + 1;
            if (c >= n) break;
            Entry child = entry_at(h, c);
            if (c + 1 < n) {
              Entry right = entry_at(h, c + 1);
              if (before(right, child)) {
                child = right;
                ++c;
              }
            }
            if (!before(child, moving)) break;
            tx.set_entry(i, child);
            i = c;
          }
          tx.set_entry(i, moving);
        }
        tx.commit();
        taken = true;
      }
    }
    if (taken) break;
    if (was_closed) return Outcome::shut_down;
    if (deadline == kNoWait) return Outcome::timed_out;
    bool ready = wait_until(h.data_seq, deadline, [&] {
      return h.closed.load(memory_order_seq_cst) != 0 || h.count.load(memory_order_seq_cst) > 0;
    });
    if (!ready) return Outcome::timed_out;
  }
  wake_sleepers(h.space_seq);
  return Outcome::done;
}

std::size_t PriorityCore::qsize() const noexcept {
  recover_if_abandoned(&h_->lock, [&]() noexcept { rollback(*h_, region_.size()); });
  return static_cast<std::size_t>(h_->count.load(memory_order_acquire));
}
std::size_t PriorityCore::maxsize() const noexcept { return h_->maxsize; }
std::size_t PriorityCore::capacity() const noexcept { return h_->nblocks * kBlockSize; }

void PriorityCore::close() {
  Header& h = *h_;
  {
    RobustGuard g(&h.lock, "the priority queue's lock",
                  [&]() noexcept { rollback(h, region_.size()); });
    h.closed.store(1, memory_order_seq_cst);
  }
  wake_everyone(h.data_seq);
  wake_everyone(h.space_seq);
}

bool PriorityCore::closed() const noexcept { return h_->closed.load(memory_order_acquire) != 0; }

}  // namespace mp::detail
