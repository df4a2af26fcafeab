// mp/sync.hpp - synchronization between processes: Lock, RLock, Semaphore, BoundedSemaphore,
// Event, Condition, Barrier, with Python's names and semantics.
//
//   mp::Lock lock;                          // lives in shared memory
//   mp::Process p{worker, lock};            // the child's copy is the same lock
//   {
//     std::lock_guard guard{lock};          // or lock.acquire() / lock.release()
//     if (lock.owner_died()) repair();      // the last holder died holding it
//   }
//   if (lock.acquire(250ms)) { ...; lock.release(); }
//
// Handles. Every object lives in its own block of shared memory (detail::Region, a memfd:
// there is no name in /dev/shm, so nothing can leak there, however the processes end). A
// handle is cheap to copy (it shares the mapping) and every copy is the same object: pass
// it to mp::Process, which copies its arguments. Under fork the child inherits the mapping;
// spawn and forkserver children receive the memfd through the FdChannel (save/load below)
// and map it again. There is no empty state: a default-constructed handle is a new object.
//
// Timeouts are std::chrono durations (mp::Seconds is duration<double>); a negative timeout
// means "try once". Calls whose failure is an expected outcome return bool; misuse
// (releasing a lock one does not hold, over-releasing a BoundedSemaphore, notifying without
// the lock) throws mp::ProcessError; a system failure throws std::system_error.
//
// Robustness. Lock and RLock are robust pthread mutexes (PTHREAD_PROCESS_SHARED,
// PTHREAD_MUTEX_ROBUST): when the holder dies (SIGKILL, a crash, _exit), the kernel releases
// the lock and the next acquirer - one already waiting, or a later one - gets it with
// owner_died() true. The lock keeps working; the data it protects may be half updated, and
// repairing it is the new holder's job. Semaphore and Event have no owner, so a process
// that dies holding a semaphore unit cannot be detected (as in Python): give waits a
// timeout. A Barrier breaks (BrokenBarrierError) when a party that has arrived dies.
//
// Speed. Acquiring a free lock and releasing it costs no system call (an atomic exchange on
// a word in shared memory); a busy lock is polled for a few microseconds (kSpinCount)
// before the caller sleeps on a futex.
#pragma once

#include <pthread.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <variant>

#include "mp/detail/region.hpp"
#include "mp/error.hpp"
#include "mp/serialize.hpp"

namespace mp {

// Timeouts, in any std::chrono unit (the same alias as in mp/process.hpp).
using Seconds = std::chrono::duration<double>;

namespace detail {

using Deadline = std::optional<std::chrono::steady_clock::time_point>;

// A relative timeout as an absolute deadline (negative: already passed).
Deadline deadline_from(std::optional<Seconds> timeout);

// The kinds of object, written in each region's header so that a descriptor received from
// another process is checked before it is used.
enum class SyncKind : std::uint32_t { lock = 1, rlock, semaphore, event, condition, barrier };

struct SyncHeader {
  std::uint32_t magic;
  SyncKind kind;
};

// The shared part of a Lock or RLock.
struct MutexState {
  SyncHeader header;
  pthread_mutex_t mutex;                  // robust, process-shared, error-checking
  std::atomic<std::uint32_t> owner_died;  // did the current holder recover it?
  std::atomic<std::uint64_t> recoveries;  // how many times a dead holder's lock was recovered
  std::uint32_t depth;                    // RLock: recursion depth, touched by the holder only
};

enum class Acquired { no, yes, recovered };

// Acquires m (blocking until `deadline` when `block`). Spins kSpinCount times, then sleeps.
// Throws ProcessError when the calling thread already holds m and would wait forever.
Acquired mutex_acquire(MutexState& m, bool block, const Deadline& deadline);
// Releases m. Throws ProcessError when the calling thread does not hold it (`what` names
// the object in the message).
void mutex_release(MutexState& m, std::string_view what);
// Whether the calling thread holds m.
bool mutex_held_by_me(const MutexState& m) noexcept;
// Whether anyone holds m.
bool mutex_locked(const MutexState& m) noexcept;

// Owns a Region holding one sync object: creates it, checks what it received, and when the
// last handle of this process goes away while the calling thread still holds the lock in it,
// releases that lock (a mapping must not vanish under a held robust mutex).
class SyncRegion {
 public:
  static std::shared_ptr<SyncRegion> create(std::size_t size, SyncKind kind);
  // Maps the object behind fd (a memfd received from another process). Throws
  // SerializationError when it is not an object of that kind.
  static std::shared_ptr<SyncRegion> attach(int fd, std::size_t size, SyncKind kind);
  explicit SyncRegion(Region r, SyncKind kind) noexcept : region_(std::move(r)), kind_(kind) {}
  SyncRegion(const SyncRegion&) = delete;
  SyncRegion& operator=(const SyncRegion&) = delete;
  ~SyncRegion();

  template <class T>
  T* as() const noexcept {
    return region_.as<T>();
  }
  int fd() const noexcept { return region_.fd(); }

 private:
  Region region_;
  SyncKind kind_;
};

// cereal glue shared by the handles: a region travels as an exported descriptor.
template <class Archive>
void save_region(Archive& ar, const SyncRegion& r) {
  std::uint32_t index = export_fd(r.fd());
  ar(index);
}
template <class Archive>
std::shared_ptr<SyncRegion> load_region(Archive& ar, std::size_t size, SyncKind kind) {
  std::uint32_t index = 0;
  ar(index);
  return SyncRegion::attach(import_fd(index), size, kind);
}

}  // namespace detail

// ---- Lock ---------------------------------------------------------------------------------
//
// A mutual-exclusion lock shared by processes (Python: multiprocessing.Lock). Unlike Python's,
// it has an owner, the thread that acquired it: only that thread may release it (another
// gets ProcessError), and it is that ownership which lets a dead holder be detected.
// Acquiring it again from the holding thread would deadlock, so acquire() throws
// ProcessError instead; try_acquire() and a timed acquire() return false.
//
// Lockable and TimedLockable: std::lock_guard, std::unique_lock and std::scoped_lock work.
class Lock {
 public:
  Lock();

  // Blocks until acquired; returns true. acquire(false) is try_acquire(), as in Python.
  bool acquire(bool block = true);
  // Waits at most `timeout`; false when it ran out.
  bool acquire(Seconds timeout);
  bool try_acquire();
  // Throws ProcessError when the calling thread does not hold the lock.
  void release();

  // True when the current holder got the lock from a holder that died with it: the data it
  // protects may be half updated. Meaningful to the holder, after acquiring.
  bool owner_died() const noexcept;
  // How many times a dead holder's lock was recovered, over the lock's life.
  std::uint64_t recoveries() const noexcept;
  // Whether some thread of some process holds it now (a snapshot), and whether it is us.
  bool locked() const noexcept;
  bool held_by_me() const noexcept;

  // Lockable names.
  void lock() { acquire(); }
  void unlock() { release(); }
  bool try_lock() { return try_acquire(); }
  template <class Rep, class Period>
  bool try_lock_for(const std::chrono::duration<Rep, Period>& d) {
    return acquire(std::chrono::duration_cast<Seconds>(d));
  }
  template <class Clock, class Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& t) {
    return try_lock_for(t - Clock::now());
  }

  // Serialization for mp's start methods (the descriptor travels through the FdChannel).
  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    set(detail::load_region(ar, sizeof(detail::MutexState), detail::SyncKind::lock));
  }

  friend bool operator==(const Lock& a, const Lock& b) noexcept { return a.state_ == b.state_; }

 private:
  friend class Condition;
  void set(std::shared_ptr<detail::SyncRegion> r) noexcept;
  std::shared_ptr<detail::SyncRegion> region_;
  detail::MutexState* state_ = nullptr;
};

// ---- RLock --------------------------------------------------------------------------------
//
// A recursive lock (Python: multiprocessing.RLock): the thread that holds it may acquire it
// again; it is free once released as many times as acquired. Releasing it from a thread
// that does not hold it throws ProcessError. Robust like Lock: when the holder dies at any
// depth, the next acquirer gets it at depth 1 with owner_died() true.
class RLock {
 public:
  RLock();

  bool acquire(bool block = true);
  bool acquire(Seconds timeout);
  bool try_acquire();
  void release();

  bool owner_died() const noexcept;
  std::uint64_t recoveries() const noexcept;
  bool locked() const noexcept;
  bool held_by_me() const noexcept;
  // How many times the calling thread holds it (0: not at all).
  int depth() const noexcept;

  void lock() { acquire(); }
  void unlock() { release(); }
  bool try_lock() { return try_acquire(); }
  template <class Rep, class Period>
  bool try_lock_for(const std::chrono::duration<Rep, Period>& d) {
    return acquire(std::chrono::duration_cast<Seconds>(d));
  }
  template <class Clock, class Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& t) {
    return try_lock_for(t - Clock::now());
  }

  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    set(detail::load_region(ar, sizeof(detail::MutexState), detail::SyncKind::rlock));
  }

  friend bool operator==(const RLock& a, const RLock& b) noexcept { return a.state_ == b.state_; }

 private:
  friend class Condition;
  bool acquire_until(bool block, const detail::Deadline& deadline);
  // Condition::wait: release every level, then take them all back.
  std::uint32_t release_all();
  void reacquire_all(std::uint32_t depth);
  void set(std::shared_ptr<detail::SyncRegion> r) noexcept;
  std::shared_ptr<detail::SyncRegion> region_;
  detail::MutexState* state_ = nullptr;
};

}  // namespace mp
