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
// a word in shared memory, ~15 ns); a blocked caller polls briefly before it sleeps on a
// futex - 0.25 to 5 us, adapted per thread: longer while polling pays off (the peer runs on
// another CPU), shorter when it does not (the peer needs our CPU) - and sleeps in slices
// of at most 100 ms, so that a wake-up lost to a process killed at the wrong moment costs
// one slice, not a hang. 6_performance/sync_bench measures it.
//
// Every object here also works between threads of one process.
#pragma once

#include <pthread.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <type_traits>
#include <variant>

#include "mp/detail/portable.hpp"
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
enum class SyncKind : std::uint32_t {
  lock = 1,
  rlock,
  semaphore,
  bounded_semaphore,
  event,
  condition,
  barrier
};

struct SyncHeader {
  std::uint32_t magic;
  SyncKind kind;
  std::uint64_t id;  // unique per object: handles compare equal when they share it
};

// The shared part of a Lock or RLock.
struct MutexState {
  SyncHeader header;
  pthread_mutex_t mutex;                  // robust, process-shared, error-checking
  std::atomic<std::uint32_t> owner_died;  // did the current holder recover it?
  std::atomic<std::uint64_t> recoveries;  // how many times a dead holder's lock was recovered
  std::uint32_t depth;                    // RLock: recursion depth, touched by the holder only
};

// The shared part of a Semaphore: the value is the futex word.
struct SemaphoreState {
  SyncHeader header;
  std::atomic<std::uint32_t> value;
  std::atomic<std::uint32_t> waiters;  // processes parked on `value` (or about to be)
  std::uint32_t max;                   // BoundedSemaphore: the initial value
};

struct EventState {
  SyncHeader header;
  std::atomic<std::uint32_t> flag;  // the futex word: 0 clear, 1 set
  std::atomic<std::uint32_t> waiters;
};

// A Condition's waiters: one slot each, with a futex word of its own, so that notify() wakes
// exactly the waiters it chose - the ones that have waited longest (lowest ticket) - and no
// later arrival can take their turn. Everything but the futex words changes only under the
// Condition's lock, in an order that a recount can repair if a holder dies half way.
struct ConditionSlot {
  std::atomic<std::uint32_t> word;   // futex: 0 waiting, 1 notified
  std::atomic<std::uint32_t> state;  // 0 free, 1 waiting, 2 notified
  std::atomic<pid_t> pid;            // the waiter (to reclaim the slots of dead ones)
  std::uint32_t reserved;
  std::uint64_t ticket;  // arrival order
};

struct ConditionState {
  SyncHeader header;
  std::uint64_t next_ticket;
  std::uint64_t seen_recoveries;  // the lock's recoveries() when the slots were last checked
  std::uint32_t waiting;          // slots in state 1
  std::uint32_t high_water;       // slots [0, high_water) have been used
  std::uint32_t capacity;
  std::uint32_t reserved;
  // Then ConditionSlot slots[capacity].
};

struct BarrierState {
  SyncHeader header;
  MutexState lock;                 // guards the fields below; robust
  std::atomic<std::uint32_t> seq;  // the futex word: bumped at every change
  std::atomic<std::uint32_t> generation;
  std::atomic<std::uint32_t> count;       // parties arrived in this generation
  std::atomic<std::uint32_t> broken;      // 0, or why it broke (BarrierBreak)
  std::atomic<std::uint64_t> reset_mask;  // bit g % 64: generation g was broken or reset
  std::uint32_t parties;
  std::int64_t timeout_ns;  // the default timeout; < 0: none
  // Then std::atomic<pid_t> arrived[parties]: who arrived in this round, in order.
};

enum class Acquired { no, yes, recovered };

// Sleeps on `word` while it equals `expected`, at most until `deadline` and at most one
// short slice (so callers re-check their condition even if a wake-up was lost to a process
// that died). Returns false when the deadline has passed.
bool park(std::atomic<std::uint32_t>& word, std::uint32_t expected, const Deadline& deadline);

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
  std::size_t size() const noexcept { return region_.size(); }

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

// The standard Lockable and TimedLockable names over acquire/try_acquire/release, so that
// std::lock_guard, std::unique_lock and std::scoped_lock work with Lock, RLock, Semaphore
// and Condition.
template <class Derived>
class LockableNames {
 public:
  void lock() { self().acquire(); }
  void unlock() { self().release(); }
  bool try_lock() { return self().try_acquire(); }
  template <class Rep, class Period>
  bool try_lock_for(const std::chrono::duration<Rep, Period>& d) {
    return self().acquire(std::chrono::duration_cast<Seconds>(d));
  }
  template <class Clock, class Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& t) {
    return try_lock_for(t - Clock::now());
  }

 private:
  Derived& self() noexcept { return static_cast<Derived&>(*this); }
};

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
class Lock : public detail::LockableNames<Lock> {
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
  // A holder that died with it still holds it, until the next acquirer recovers it (as in
  // Python, where a dead holder never gives the semaphore back).
  bool locked() const noexcept;
  bool held_by_me() const noexcept;

  // Serialization for mp's start methods (the descriptor travels through the FdChannel).
  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    set(detail::load_region(ar, sizeof(detail::MutexState), detail::SyncKind::lock));
  }

  friend bool operator==(const Lock& a, const Lock& b) noexcept {
    return a.state_->header.id == b.state_->header.id;
  }

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
class RLock : public detail::LockableNames<RLock> {
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

  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    set(detail::load_region(ar, sizeof(detail::MutexState), detail::SyncKind::rlock));
  }

  friend bool operator==(const RLock& a, const RLock& b) noexcept {
    return a.state_->header.id == b.state_->header.id;
  }

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

// ---- Semaphore, BoundedSemaphore ----------------------------------------------------------
//
// A counter of free units (Python: multiprocessing.Semaphore): acquire() takes one, waiting
// while there is none; release() gives one back, from any process. Nobody owns a unit, so a
// process that dies holding one cannot be detected: it is simply gone (give waits a
// timeout). Lockable: std::lock_guard takes and gives back one unit.
class Semaphore : public detail::LockableNames<Semaphore> {
 public:
  // Throws std::invalid_argument when value is negative.
  explicit Semaphore(int value = 1);

  bool acquire(bool block = true);
  bool acquire(Seconds timeout);
  bool try_acquire();
  // Gives back one unit and wakes one waiter. BoundedSemaphore: throws ProcessError when
  // that would exceed the initial value (Python raises ValueError there).
  void release();
  // The number of free units now (a snapshot).
  int get_value() const noexcept;

  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    set(detail::load_region(ar, sizeof(detail::SemaphoreState), kind_));
  }

  friend bool operator==(const Semaphore& a, const Semaphore& b) noexcept {
    return a.state_->header.id == b.state_->header.id;
  }

 protected:
  Semaphore(int value, bool bounded);

 private:
  bool acquire_until(bool block, const detail::Deadline& deadline);
  void set(std::shared_ptr<detail::SyncRegion> r) noexcept;
  detail::SyncKind kind_;
  std::shared_ptr<detail::SyncRegion> region_;
  detail::SemaphoreState* state_ = nullptr;
};

// A Semaphore that refuses to be released above its initial value: the error of releasing
// more often than acquiring is caught where it happens (ProcessError).
class BoundedSemaphore : public Semaphore {
 public:
  explicit BoundedSemaphore(int value = 1) : Semaphore(value, true) {}
};

// ---- Event --------------------------------------------------------------------------------
//
// A flag processes can wait for (Python: multiprocessing.Event): set() raises it and wakes
// every waiter, clear() lowers it, wait() returns at once while it is raised.
class Event {
 public:
  Event();

  void set();
  void clear();
  bool is_set() const noexcept;
  // Waits until the flag is set; returns true. The timed form returns the flag as it
  // returns: false when the time ran out first.
  bool wait();
  bool wait(Seconds timeout);

  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    set_region(detail::load_region(ar, sizeof(detail::EventState), detail::SyncKind::event));
  }

  friend bool operator==(const Event& a, const Event& b) noexcept {
    return a.state_->header.id == b.state_->header.id;
  }

 private:
  bool wait_until(const detail::Deadline& deadline);
  void set_region(std::shared_ptr<detail::SyncRegion> r) noexcept;
  std::shared_ptr<detail::SyncRegion> region_;
  detail::EventState* state_ = nullptr;
};

// ---- Condition ----------------------------------------------------------------------------
//
// A condition variable over a Lock or an RLock (Python: multiprocessing.Condition; the
// default lock is a new RLock). Hold the lock to wait() or notify(); wait() releases it
// (every level of an RLock), sleeps until notified, and takes it back. Lockable itself, so
// std::unique_lock<mp::Condition> works.
//
// Python's rules: notify(n) wakes the n processes that have waited longest (at most n, and
// none that started waiting after the call); wait() returns only when notified or timed out.
// Still, test the shared state in a loop, or use wait_for(predicate): another process may
// change it between the notify and the waiter's return. Limits: up to 4096 processes (or
// threads) wait at once; a waiter killed while it waits may absorb one notify() (its slot
// is reclaimed when the table fills up). If the holder of the lock dies, the waiter that
// takes it back gets OwnerDiedError from wait() or wait_for() (mp differs from Python here,
// whose locks are not robust): it holds the lock, owner_died() is true, the Condition's own
// bookkeeping has been checked again, and the guarded data is the program's to repair.
class Condition : public detail::LockableNames<Condition> {
 public:
  Condition();
  explicit Condition(Lock lock);
  explicit Condition(RLock lock);

  bool acquire(bool block = true);
  bool acquire(Seconds timeout);
  bool try_acquire();
  void release();
  bool owner_died() const noexcept;

  // Waits for a notify. Returns false when the timeout ran out first. Throws ProcessError
  // when the calling thread does not hold the lock, OwnerDiedError (with the lock held)
  // when it took the lock back from a holder that died.
  bool wait();
  bool wait(Seconds timeout);

  // Waits until pred() is true (checked first, and after each wake-up) or the timeout runs
  // out; returns pred()'s last value. Python: Condition.wait_for. Throws OwnerDiedError as
  // wait() does, before pred() sees the data a dead holder left.
  template <class Pred>
  bool wait_for(Pred pred, std::optional<Seconds> timeout = std::nullopt) {
    detail::Deadline deadline = detail::deadline_from(timeout);
    bool result = pred();
    while (!result) {
      if (deadline && std::chrono::steady_clock::now() >= *deadline) break;
      wait_until(deadline);
      result = pred();
    }
    return result;
  }

  // Wakes up to n / all waiting processes. Throws ProcessError when the calling thread does
  // not hold the lock.
  void notify(int n = 1);
  void notify_all();

  template <class Archive>
  void save(Archive& ar) const {
    std::uint8_t recursive = std::holds_alternative<RLock>(lock_) ? 1 : 0;
    ar(recursive);
    std::visit([&](const auto& l) { l.save(ar); }, lock_);
    detail::save_region(ar, *region_);
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint8_t recursive = 0;
    ar(recursive);
    if (recursive) {
      RLock l;
      l.load(ar);
      lock_ = std::move(l);
    } else {
      Lock l;
      l.load(ar);
      lock_ = std::move(l);
    }
    set_region(
        detail::load_region(ar, sizeof(detail::ConditionState), detail::SyncKind::condition));
  }

 private:
  bool wait_until(const detail::Deadline& deadline);
  bool held_by_me() const noexcept;
  std::uint64_t lock_recoveries() const noexcept;
  // With the lock held: the slots, after a recount if a holder died since the last look.
  detail::ConditionSlot* slots();
  void create_region();
  // Throws SerializationError when the region is too small for its slots.
  void set_region(std::shared_ptr<detail::SyncRegion> r);
  std::variant<Lock, RLock> lock_;
  std::shared_ptr<detail::SyncRegion> region_;
  detail::ConditionState* state_ = nullptr;
};

// ---- Barrier ------------------------------------------------------------------------------
//
// A meeting point for a fixed number of parties (Python: multiprocessing.Barrier): wait()
// blocks until `parties` processes (or threads) have called it, then all return together
// and the barrier is ready for the next round. wait() returns the arrival index, 0 to
// parties-1, a different one for each party. The action, if any, runs in the last party to
// arrive, before the others are released.
//
// wait() throws BrokenBarrierError when the barrier is broken: by abort(), by reset() while
// parties wait, by a wait that timed out, by an action that threw (which rethrows its own
// exception in the party that ran it), or by the death of a party that had arrived. A broken
// barrier stays broken until reset().
//
// Death detection: each party writes its pid when it arrives; parties parked in wait()
// check every 50 ms that the ones that arrived before them still run, and the last party
// checks them all before it completes the round, so a round never passes with a dead
// party. Limits: a party that dies before it reaches wait() cannot be noticed (the others
// wait for it: give the barrier a timeout); one that dies after the round completed is not
// the barrier's concern; a pid reused before the check would hide a death.
//
// Passing a Barrier to a spawn or forkserver child needs an action that is a plain function
// or a lambda without captures (so that it can be found again in the child's image); any
// action works with fork.
class Barrier {
 public:
  // Throws std::invalid_argument unless 1 <= parties <= 65536.
  explicit Barrier(int parties, std::optional<Seconds> timeout = std::nullopt);
  // A one-party barrier: what a received Barrier starts as before it is loaded.
  Barrier() : Barrier(1) {}
  template <class F>
  requires std::invocable<F&> Barrier(int parties, F action,
                                      std::optional<Seconds> timeout = std::nullopt)
      : Barrier(parties, timeout) {
    set_action(std::move(action));
  }

  // The default timeout is the one given to the constructor.
  int wait();
  int wait(Seconds timeout);

  // Breaks the barrier: current and future waiters get BrokenBarrierError until reset().
  void abort();
  // Back to the empty state; parties waiting now get BrokenBarrierError.
  void reset();

  int parties() const noexcept;
  // Parties waiting in the current round (0 when broken).
  int n_waiting() const noexcept;
  bool broken() const noexcept;

  template <class Archive>
  void save(Archive& ar) const {
    detail::save_region(ar, *region_);
    bool has_action = static_cast<bool>(action_);
    ar(has_action);
    if (has_action) {
      if (!portable_) {
        throw std::logic_error(
            "cannot pass a Barrier to a spawn or forkserver child: its action is not a plain "
            "function or a lambda without captures");
      }
      ar(*portable_);
    }
  }
  template <class Archive>
  void load(Archive& ar) {
    set_region(detail::load_region(ar, sizeof(detail::BarrierState), detail::SyncKind::barrier));
    bool has_action = false;
    ar(has_action);
    action_.reset();
    portable_.reset();
    if (has_action) {
      PortableAction p;
      ar(p);
      set_portable_action(std::move(p));
    }
  }

  friend bool operator==(const Barrier& a, const Barrier& b) noexcept {
    return a.state_->header.id == b.state_->header.id;
  }

 private:
  // An action described as data: a trampoline instantiated for its type, and its address
  // when it is a plain function.
  struct PortableAction {
    detail::CodeAddress trampoline;
    detail::CodeAddress target;
    bool has_target = false;
    template <class Archive>
    void serialize(Archive& ar) {
      ar(trampoline, target, has_target);
    }
  };
  using ActionTrampoline = void (*)(const void* target);
  template <class F>
  static void run_action(const void* target) {
    if constexpr (std::is_pointer_v<F>) {
      reinterpret_cast<F>(const_cast<void*>(target))();
    } else {
      F f{};
      f();
    }
  }

  template <class F>
  void set_action(F action) {
    if constexpr (detail::PortableCallable<F>) {
      PortableAction p;
      ActionTrampoline t = &run_action<F>;
      p.trampoline = detail::locate_code(reinterpret_cast<const void*>(t));
      if constexpr (std::is_pointer_v<F>) {
        p.target = detail::locate_code(reinterpret_cast<const void*>(action));
        p.has_target = true;
      }
      portable_ = std::move(p);
    }
    action_ = std::make_shared<const std::function<void()>>(std::move(action));
  }
  void set_portable_action(PortableAction p);
  // Throws SerializationError when the region is too small for its parties.
  void set_region(std::shared_ptr<detail::SyncRegion> r);
  int wait_until(const detail::Deadline& deadline);
  void lock_state();
  void break_locked(std::uint32_t reason) noexcept;

  std::shared_ptr<detail::SyncRegion> region_;
  detail::BarrierState* state_ = nullptr;
  std::shared_ptr<const std::function<void()>> action_;
  std::optional<PortableAction> portable_;
};

}  // namespace mp
