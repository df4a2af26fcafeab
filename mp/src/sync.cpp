// mp/src/sync.cpp - see mp/sync.hpp.
#include "mp/sync.hpp"

#include <fmt/format.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "mp/detail/futex.hpp"
#include "mp/detail/pidfd.hpp"

namespace mp {
namespace detail {

namespace {

constexpr std::uint32_t kMagic = 0x6d707379;  // "mpsy"

// How long a blocked caller polls before it sleeps. Polling pays when the peer runs on
// another CPU and is about to let go (a hand-off then takes ~100 ns instead of a 5-80 us
// sleep and wake-up), and costs when the peer is waiting for *our* CPU (a busy machine):
// every microsecond spent polling is one it cannot run. So the budget adapts, per thread:
// it doubles (up to the maximum) when polling succeeded and halves (down to the minimum)
// when the caller had to sleep anyway. Bounded in time rather than in iterations
// (kSpinCount): a pause instruction takes 1 to 40 ns depending on the CPU.
constexpr std::int64_t kSpinMaxNs = 5000;
constexpr std::int64_t kSpinMinNs = 250;
thread_local std::int64_t t_spin_ns = kSpinMaxNs;

}  // namespace

// Polls ready() with cpu_relax() in between until it returns true (then true), or until
// this thread's spin budget or kSpinCount polls are spent (then false).
template <class Ready>
bool spin(Ready ready) {
  auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(t_spin_ns);
  for (int i = 1; i <= kSpinCount; ++i) {
    cpu_relax();
    if (ready()) {
      t_spin_ns = std::min(kSpinMaxNs, t_spin_ns * 2);
      return true;
    }
    if ((i & 7) == 0 && std::chrono::steady_clock::now() >= end) break;
  }
  t_spin_ns = std::max(kSpinMinNs, t_spin_ns / 2);
  return false;
}

namespace {

// The longest a waiter sleeps before it checks again (see mutex_acquire).
constexpr auto kParkSlice = std::chrono::milliseconds(100);

std::string_view kind_name(SyncKind k) noexcept {
  switch (k) {
    case SyncKind::lock:
      return "lock";
    case SyncKind::rlock:
      return "rlock";
    case SyncKind::semaphore:
      return "semaphore";
    case SyncKind::bounded_semaphore:
      return "bounded semaphore";
    case SyncKind::event:
      return "event";
    case SyncKind::condition:
      return "condition";
    case SyncKind::barrier:
      return "barrier";
  }
  return "sync object";
}

// The calling thread's id, cached: gettid() is a system call, and ownership checks are on
// the fast path. A forked child's thread has a new id, so the cache is cleared in the child.
thread_local pid_t t_tid = 0;
void forget_tid() noexcept { t_tid = 0; }

pid_t my_tid() noexcept {
  if (t_tid == 0) {
    static std::once_flag once;
    std::call_once(once, [] { ::pthread_atfork(nullptr, nullptr, forget_tid); });
    t_tid = static_cast<pid_t>(::syscall(SYS_gettid));
  }
  return t_tid;
}

// The futex word of a glibc mutex: the holder's thread id, plus FUTEX_WAITERS and
// FUTEX_OWNER_DIED bits (the robust-futex protocol the kernel follows when a holder dies).
int mutex_word(const MutexState& m) noexcept {
  return __atomic_load_n(&m.mutex.__data.__lock, __ATOMIC_RELAXED);
}

timespec to_timespec(std::chrono::steady_clock::time_point t) noexcept {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  if (ns < 0) ns = 0;
  return timespec{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
}

void check_pthread(int r, std::string_view action) {
  if (r != 0) throw system_error(r, action);
}

void init_mutex(MutexState& m) {
  pthread_mutexattr_t attr;
  check_pthread(::pthread_mutexattr_init(&attr), "initialize mutex attributes");
  struct AttrGuard {
    pthread_mutexattr_t* a;
    ~AttrGuard() { ::pthread_mutexattr_destroy(a); }
  } guard{&attr};
  check_pthread(::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED),
                "make a mutex process-shared");
  check_pthread(::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST), "make a mutex robust");
  check_pthread(::pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK),
                "make a mutex error-checking");
  check_pthread(::pthread_mutex_init(&m.mutex, &attr), "initialize a process-shared mutex");
}

}  // namespace

Deadline deadline_from(std::optional<Seconds> timeout) {
  if (!timeout) return std::nullopt;
  // Beyond ~30 years is "forever" (and would overflow the clock's representation).
  if (timeout->count() > 1e9) return std::nullopt;
  auto now = std::chrono::steady_clock::now();
  if (timeout->count() <= 0) return now;
  return now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(*timeout);
}

Acquired mutex_acquire(MutexState& m, bool block, const Deadline& deadline) {
  int r = ::pthread_mutex_trylock(&m.mutex);
  if (r == EBUSY && block) {
    // Busy: poll the word for a few microseconds, as a holder is often about to let go...
    spin([&] {
      if ((mutex_word(m) & FUTEX_TID_MASK) != 0) return false;
      r = ::pthread_mutex_trylock(&m.mutex);
      return r != EBUSY;
    });
    // ...then sleep on the futex (glibc sets FUTEX_WAITERS so that the holder wakes us), in
    // slices: a waiter woken by an unlock that is killed before it takes the lock swallows
    // the wake-up while another process may have taken the lock meanwhile without
    // FUTEX_WAITERS; the kernel cannot repair that case, and the other sleepers would wait
    // for ever. Waking now and then to set the bit again bounds that loss to one slice.
    while (r == EBUSY) {
      auto now = std::chrono::steady_clock::now();
      auto until = now + kParkSlice;
      bool last = false;
      if (deadline && *deadline <= until) {
        until = *deadline;
        last = true;
      }
      timespec ts = to_timespec(until);
      r = ::pthread_mutex_clocklock(&m.mutex, CLOCK_MONOTONIC, &ts);
      if (r == ETIMEDOUT && !last) r = EBUSY;
    }
  }
  switch (r) {
    case 0:
      m.owner_died.store(0, std::memory_order_relaxed);
      return Acquired::yes;
    case EOWNERDEAD:
      // The holder died: we hold it now. Mark it consistent at once, so that the lock keeps
      // working whatever we do next, and tell the caller.
      check_pthread(::pthread_mutex_consistent(&m.mutex), "make a recovered lock consistent");
      m.owner_died.store(1, std::memory_order_relaxed);
      m.recoveries.fetch_add(1, std::memory_order_relaxed);
      return Acquired::recovered;
    case EBUSY:
    case ETIMEDOUT:
      return Acquired::no;
    case EDEADLK:
      if (!block || deadline) return Acquired::no;
      throw ProcessError(
          "cannot acquire a lock the calling thread already holds: it would wait forever "
          "(use an RLock to acquire it again)");
    default:
      throw system_error(r, "acquire a process-shared lock");
  }
}

void mutex_release(MutexState& m, std::string_view what) {
  int r = ::pthread_mutex_unlock(&m.mutex);
  if (r == EPERM) {
    throw ProcessError(fmt::format("cannot release {}: the calling thread does not hold it", what));
  }
  if (r != 0) throw system_error(r, fmt::format("release {}", what));
}

bool mutex_held_by_me(const MutexState& m) noexcept {
  return (mutex_word(m) & FUTEX_TID_MASK) == my_tid();
}

// A holder that died with the lock leaves FUTEX_OWNER_DIED and no thread id in the word (the
// kernel's robust-list walk at its exit): still locked, until the next acquirer recovers it.
bool mutex_locked(const MutexState& m) noexcept {
  return (mutex_word(m) & (FUTEX_TID_MASK | FUTEX_OWNER_DIED)) != 0;
}

// ---- SyncRegion ---------------------------------------------------------------------------

std::shared_ptr<SyncRegion> SyncRegion::create(std::size_t size, SyncKind kind) {
  auto r = std::make_shared<SyncRegion>(Region::create(size, kind_name(kind)), kind);
  // An identity for operator==: 64 random bits (two handles mapping the same object at
  // different addresses are equal; two objects are not).
  std::uint64_t id = 0;
  if (retry_eintr([&] { return ::getrandom(&id, sizeof id, 0); }) != sizeof id) {
    throw_errno(fmt::format("get a random identity for a {}", kind_name(kind)));
  }
  r->as<SyncHeader>()->id = id;
  return r;
}

std::shared_ptr<SyncRegion> SyncRegion::attach(int fd, std::size_t size, SyncKind kind) {
  Region r = Region::attach(fd);
  const auto* h = r.as<SyncHeader>();
  if (r.size() < size || h->magic != kMagic || h->kind != kind) {
    throw SerializationError(
        fmt::format("cannot attach a {}: the descriptor received is not one", kind_name(kind)));
  }
  return std::make_shared<SyncRegion>(std::move(r), kind);
}

SyncRegion::~SyncRegion() {
  if (!region_ || (kind_ != SyncKind::lock && kind_ != SyncKind::rlock)) return;
  auto* m = region_.as<MutexState>();
  if (!mutex_held_by_me(*m)) return;
  // Unmapping a robust mutex that is still on this thread's robust list would corrupt the
  // list, so let it go first.
  report_noexcept(
      fmt::format("the last handle of a {} held by this thread was destroyed; "
                  "releasing it",
                  kind_name(kind_)));
  m->depth = 0;
  if (::pthread_mutex_unlock(&m->mutex) != 0) {
    report_noexcept(fmt::format("cannot release a {} being destroyed", kind_name(kind_)));
  }
}

}  // namespace detail

// ---- Lock ---------------------------------------------------------------------------------

Lock::Lock() {
  auto r = detail::SyncRegion::create(sizeof(detail::MutexState), detail::SyncKind::lock);
  auto* s = r->as<detail::MutexState>();
  detail::init_mutex(*s);
  s->header.kind = detail::SyncKind::lock;
  s->header.magic = detail::kMagic;
  set(std::move(r));
}

void Lock::set(std::shared_ptr<detail::SyncRegion> r) noexcept {
  region_ = std::move(r);
  state_ = region_->as<detail::MutexState>();
}

bool Lock::acquire(bool block) {
  return detail::mutex_acquire(*state_, block, std::nullopt) != detail::Acquired::no;
}

bool Lock::acquire(Seconds timeout) {
  return detail::mutex_acquire(*state_, true, detail::deadline_from(timeout)) !=
         detail::Acquired::no;
}

bool Lock::try_acquire() { return acquire(false); }

void Lock::release() { detail::mutex_release(*state_, "a Lock"); }

bool Lock::owner_died() const noexcept {
  return state_->owner_died.load(std::memory_order_relaxed) != 0;
}
std::uint64_t Lock::recoveries() const noexcept {
  return state_->recoveries.load(std::memory_order_relaxed);
}
bool Lock::locked() const noexcept { return detail::mutex_locked(*state_); }
bool Lock::held_by_me() const noexcept { return detail::mutex_held_by_me(*state_); }

// ---- RLock --------------------------------------------------------------------------------

RLock::RLock() {
  auto r = detail::SyncRegion::create(sizeof(detail::MutexState), detail::SyncKind::rlock);
  auto* s = r->as<detail::MutexState>();
  detail::init_mutex(*s);
  s->header.kind = detail::SyncKind::rlock;
  s->header.magic = detail::kMagic;
  set(std::move(r));
}

void RLock::set(std::shared_ptr<detail::SyncRegion> r) noexcept {
  region_ = std::move(r);
  state_ = region_->as<detail::MutexState>();
}

bool RLock::acquire_until(bool block, const detail::Deadline& deadline) {
  if (detail::mutex_held_by_me(*state_)) {
    ++state_->depth;
    return true;
  }
  if (detail::mutex_acquire(*state_, block, deadline) == detail::Acquired::no) return false;
  state_->depth = 1;  // also after a recovery: the dead holder's depth means nothing
  return true;
}

bool RLock::acquire(bool block) { return acquire_until(block, std::nullopt); }
bool RLock::acquire(Seconds timeout) { return acquire_until(true, detail::deadline_from(timeout)); }
bool RLock::try_acquire() { return acquire_until(false, std::nullopt); }

void RLock::release() {
  if (!detail::mutex_held_by_me(*state_)) {
    throw ProcessError("cannot release an RLock: the calling thread does not hold it");
  }
  if (--state_->depth == 0) detail::mutex_release(*state_, "an RLock");
}

std::uint32_t RLock::release_all() {
  if (!detail::mutex_held_by_me(*state_)) {
    throw ProcessError("cannot release an RLock: the calling thread does not hold it");
  }
  std::uint32_t depth = state_->depth;
  state_->depth = 0;
  detail::mutex_release(*state_, "an RLock");
  return depth;
}

void RLock::reacquire_all(std::uint32_t depth) {
  detail::mutex_acquire(*state_, true, std::nullopt);
  state_->depth = depth;
}

bool RLock::owner_died() const noexcept {
  return state_->owner_died.load(std::memory_order_relaxed) != 0;
}
std::uint64_t RLock::recoveries() const noexcept {
  return state_->recoveries.load(std::memory_order_relaxed);
}
bool RLock::locked() const noexcept { return detail::mutex_locked(*state_); }
bool RLock::held_by_me() const noexcept { return detail::mutex_held_by_me(*state_); }
int RLock::depth() const noexcept { return held_by_me() ? static_cast<int>(state_->depth) : 0; }

// ---- parking ------------------------------------------------------------------------------

namespace detail {

bool park(std::atomic<std::uint32_t>& word, std::uint32_t expected, const Deadline& deadline) {
  auto now = std::chrono::steady_clock::now();
  if (deadline && now >= *deadline) return false;
  auto until = now + kParkSlice;
  if (deadline && *deadline < until) until = *deadline;
  futex_wait(word, expected, until);
  return true;
}

}  // namespace detail

// ---- Semaphore ----------------------------------------------------------------------------

namespace {
// Semaphores count up to what a futex word holds comfortably (SEM_VALUE_MAX).
constexpr std::uint32_t kSemaphoreMax = 0x7fffffff;

bool try_take(std::atomic<std::uint32_t>& value) noexcept {
  std::uint32_t v = value.load(std::memory_order_relaxed);
  while (v > 0) {
    if (value.compare_exchange_weak(v, v - 1, std::memory_order_acquire,
                                    std::memory_order_relaxed)) {
      return true;
    }
  }
  return false;
}
}  // namespace

Semaphore::Semaphore(int value) : Semaphore(value, false) {}

Semaphore::Semaphore(int value, bool bounded)
    : kind_(bounded ? detail::SyncKind::bounded_semaphore : detail::SyncKind::semaphore) {
  if (value < 0) {
    throw std::invalid_argument(
        fmt::format("cannot create a {} with value {}: it must be 0 or more",
                    bounded ? "BoundedSemaphore" : "Semaphore", value));
  }
  auto r = detail::SyncRegion::create(sizeof(detail::SemaphoreState), kind_);
  auto* s = r->as<detail::SemaphoreState>();
  s->value.store(static_cast<std::uint32_t>(value));
  s->max = bounded ? static_cast<std::uint32_t>(value) : kSemaphoreMax;
  s->header.kind = kind_;
  s->header.magic = detail::kMagic;
  set(std::move(r));
}

void Semaphore::set(std::shared_ptr<detail::SyncRegion> r) noexcept {
  region_ = std::move(r);
  state_ = region_->as<detail::SemaphoreState>();
}

bool Semaphore::acquire_until(bool block, const detail::Deadline& deadline) {
  auto& s = *state_;
  if (try_take(s.value)) return true;
  if (!block) return false;
  if (detail::spin(
          [&] { return s.value.load(std::memory_order_relaxed) > 0 && try_take(s.value); })) {
    return true;
  }
  s.waiters.fetch_add(1);
  bool got = false;
  for (;;) {
    if (try_take(s.value)) {
      got = true;
      break;
    }
    if (!detail::park(s.value, 0, deadline)) break;
  }
  s.waiters.fetch_sub(1);
  return got;
}

bool Semaphore::acquire(bool block) { return acquire_until(block, std::nullopt); }
bool Semaphore::acquire(Seconds timeout) {
  return acquire_until(true, detail::deadline_from(timeout));
}
bool Semaphore::try_acquire() { return acquire_until(false, std::nullopt); }

void Semaphore::release() {
  auto& s = *state_;
  std::uint32_t v = s.value.load(std::memory_order_relaxed);
  do {
    if (v >= s.max) {
      throw ProcessError(kind_ == detail::SyncKind::bounded_semaphore
                             ? fmt::format("cannot release a BoundedSemaphore above its initial "
                                           "value {}: released more often than acquired",
                                           s.max)
                             : std::string("cannot release a Semaphore: its value would overflow"));
    }
  } while (!s.value.compare_exchange_weak(v, v + 1));
  // seq_cst on both sides: a waiter that registered before our increment is seen here.
  if (s.waiters.load() > 0) detail::futex_wake(s.value, 1);
}

int Semaphore::get_value() const noexcept {
  return static_cast<int>(state_->value.load(std::memory_order_relaxed));
}

// ---- Event --------------------------------------------------------------------------------

Event::Event() {
  auto r = detail::SyncRegion::create(sizeof(detail::EventState), detail::SyncKind::event);
  auto* s = r->as<detail::EventState>();
  s->header.kind = detail::SyncKind::event;
  s->header.magic = detail::kMagic;
  set_region(std::move(r));
}

void Event::set_region(std::shared_ptr<detail::SyncRegion> r) noexcept {
  region_ = std::move(r);
  state_ = region_->as<detail::EventState>();
}

void Event::set() {
  state_->flag.store(1);
  if (state_->waiters.load() > 0) detail::futex_wake(state_->flag);
}

void Event::clear() { state_->flag.store(0); }

bool Event::is_set() const noexcept { return state_->flag.load() != 0; }

bool Event::wait_until(const detail::Deadline& deadline) {
  auto& s = *state_;
  if (s.flag.load() != 0) return true;
  if (detail::spin([&] { return s.flag.load(std::memory_order_relaxed) != 0; })) return true;
  s.waiters.fetch_add(1);
  bool set = false;
  for (;;) {
    if (s.flag.load() != 0) {
      set = true;
      break;
    }
    if (!detail::park(s.flag, 0, deadline)) break;
  }
  s.waiters.fetch_sub(1);
  return set;
}

bool Event::wait() { return wait_until(std::nullopt); }
bool Event::wait(Seconds timeout) { return wait_until(detail::deadline_from(timeout)); }

// ---- Condition ----------------------------------------------------------------------------

namespace {

constexpr std::uint32_t kConditionSlots = 4096;
enum SlotState : std::uint32_t { kFree = 0, kWaiting = 1, kNotified = 2 };

std::size_t condition_size(std::uint32_t capacity) {
  return sizeof(detail::ConditionState) + capacity * sizeof(detail::ConditionSlot);
}

detail::ConditionSlot* slots_of(detail::ConditionState& s) noexcept {
  static_assert(sizeof(detail::ConditionState) % alignof(detail::ConditionSlot) == 0);
  return reinterpret_cast<detail::ConditionSlot*>(reinterpret_cast<char*>(&s) +
                                                  sizeof(detail::ConditionState));
}

// Whether pid has ended (a zombie has ended too). A process we may not signal is alive.
bool process_ended(pid_t pid) noexcept {
  int fd = detail::pidfd_open(pid);
  if (fd < 0) return errno == ESRCH;
  pollfd p{fd, POLLIN, 0};
  int r = detail::retry_eintr([&] { return ::poll(&p, 1, 0); });
  ::close(fd);
  return r == 1;
}

}  // namespace

Condition::Condition() : Condition(RLock{}) {}

Condition::Condition(Lock lock) : lock_(std::move(lock)) { create_region(); }

Condition::Condition(RLock lock) : lock_(std::move(lock)) { create_region(); }

void Condition::create_region() {
  auto r = detail::SyncRegion::create(condition_size(kConditionSlots), detail::SyncKind::condition);
  auto* s = r->as<detail::ConditionState>();
  s->capacity = kConditionSlots;
  s->header.kind = detail::SyncKind::condition;
  s->header.magic = detail::kMagic;
  set_region(std::move(r));
}

void Condition::set_region(std::shared_ptr<detail::SyncRegion> r) {
  auto* s = r->as<detail::ConditionState>();
  if (s->capacity == 0 || r->size() < condition_size(s->capacity)) {
    throw SerializationError("cannot attach a condition: the region received is too small");
  }
  region_ = std::move(r);
  state_ = s;
}

bool Condition::acquire(bool block) {
  return std::visit([&](auto& l) { return l.acquire(block); }, lock_);
}
bool Condition::acquire(Seconds timeout) {
  return std::visit([&](auto& l) { return l.acquire(timeout); }, lock_);
}
bool Condition::try_acquire() {
  return std::visit([&](auto& l) { return l.try_acquire(); }, lock_);
}
void Condition::release() {
  std::visit([&](auto& l) { l.release(); }, lock_);
}
bool Condition::owner_died() const noexcept {
  return std::visit([&](const auto& l) { return l.owner_died(); }, lock_);
}
bool Condition::held_by_me() const noexcept {
  return std::visit([&](const auto& l) { return l.held_by_me(); }, lock_);
}
std::uint64_t Condition::lock_recoveries() const noexcept {
  return std::visit([&](const auto& l) { return l.recoveries(); }, lock_);
}

detail::ConditionSlot* Condition::slots() {
  auto& s = *state_;
  detail::ConditionSlot* slot = slots_of(s);
  std::uint64_t recoveries = lock_recoveries();
  if (recoveries != s.seen_recoveries) {
    // A holder died with the lock, perhaps half way through a wait() or notify() of ours:
    // make the counts agree with the slots again. A slot whose word says notified is.
    std::uint32_t waiting = 0;
    for (std::uint32_t i = 0; i < s.high_water && i < s.capacity; ++i) {
      if (slot[i].state.load() == kWaiting) {
        if (slot[i].word.load() != 0) {
          slot[i].state.store(kNotified);
        } else {
          ++waiting;
        }
      }
    }
    s.waiting = waiting;
    s.seen_recoveries = recoveries;
  }
  return slot;
}

bool Condition::wait_until(const detail::Deadline& deadline) {
  if (!held_by_me()) {
    throw ProcessError("cannot wait on a Condition: the calling thread does not hold its lock");
  }
  auto& s = *state_;
  detail::ConditionSlot* slot = slots();

  // Take a slot (the lowest free one), under the lock we hold.
  auto find_free = [&]() -> std::uint32_t {
    for (std::uint32_t i = 0; i < s.capacity; ++i) {
      if (slot[i].state.load() == kFree) return i;
    }
    return s.capacity;
  };
  std::uint32_t me = find_free();
  if (me == s.capacity) {
    // Full: reclaim the slots of waiters that died.
    for (std::uint32_t i = 0; i < s.capacity; ++i) {
      std::uint32_t st = slot[i].state.load();
      if (st != kFree && process_ended(slot[i].pid.load())) {
        if (st == kWaiting) --s.waiting;
        slot[i].state.store(kFree);
      }
    }
    me = find_free();
    if (me == s.capacity) {
      throw ProcessError(
          fmt::format("cannot wait on a Condition: {} processes are waiting already", s.capacity));
    }
  }
  detail::ConditionSlot& mine = slot[me];
  mine.pid.store(::getpid());
  mine.ticket = s.next_ticket++;
  mine.word.store(0);
  mine.state.store(kWaiting);
  ++s.waiting;
  if (me >= s.high_water) s.high_water = me + 1;

  // Let go of the lock (every level of an RLock) and sleep on our own word.
  std::uint32_t depth = 0;
  if (auto* r = std::get_if<RLock>(&lock_)) {
    depth = r->release_all();
  } else {
    std::get<Lock>(lock_).release();
  }
  bool notified = detail::spin([&] { return mine.word.load(std::memory_order_relaxed) != 0; });
  while (!notified) {
    if (mine.word.load() != 0) {
      notified = true;
    } else if (!detail::park(mine.word, 0, deadline)) {
      break;
    }
  }

  // Take the lock back, whatever happened.
  if (auto* r = std::get_if<RLock>(&lock_)) {
    r->reacquire_all(depth);
  } else {
    detail::mutex_acquire(*std::get<Lock>(lock_).state_, true, std::nullopt);
  }
  slots();                                     // a recount, if the lock was recovered
  if (mine.word.load() != 0) notified = true;  // a notify raced with the timeout
  if (mine.state.load() == kWaiting) --s.waiting;
  mine.state.store(kFree);
  // A holder died while we waited: say so now. A return would let wait_for() (or the
  // caller's own loop) test its predicate on half-updated data, find it false and wait
  // again, and the next acquire would clear the flag: nobody would ever learn of it.
  if (owner_died()) {
    throw OwnerDiedError(
        "cannot wait on a Condition: the holder of its lock died while holding it; the lock "
        "is held again and the data it guards may be half updated");
  }
  return notified;
}

bool Condition::wait() { return wait_until(std::nullopt); }
bool Condition::wait(Seconds timeout) { return wait_until(detail::deadline_from(timeout)); }

void Condition::notify(int n) {
  if (!held_by_me()) {
    throw ProcessError("cannot notify a Condition: the calling thread does not hold its lock");
  }
  auto& s = *state_;
  detail::ConditionSlot* slot = slots();
  const std::uint32_t end = std::min(s.high_water, s.capacity);
  auto wake = [&](detail::ConditionSlot& w) {
    w.word.store(1);
    w.state.store(kNotified);
    --s.waiting;
    detail::futex_wake(w.word, 1);
  };
  if (n <= 0 || s.waiting == 0) return;
  if (static_cast<std::uint32_t>(n) >= s.waiting) {
    for (std::uint32_t i = 0; i < end; ++i) {
      if (slot[i].state.load() == kWaiting) wake(slot[i]);
    }
    return;
  }
  // The n longest waiting: the lowest tickets.
  for (int k = 0; k < n && s.waiting > 0; ++k) {
    std::uint32_t oldest = end;
    for (std::uint32_t i = 0; i < end; ++i) {
      if (slot[i].state.load() == kWaiting &&
          (oldest == end || slot[i].ticket < slot[oldest].ticket)) {
        oldest = i;
      }
    }
    if (oldest == end) break;
    wake(slot[oldest]);
  }
}

void Condition::notify_all() { notify(std::numeric_limits<int>::max()); }

// ---- Barrier ------------------------------------------------------------------------------

namespace {

enum BarrierBreak : std::uint32_t {
  kNotBroken = 0,
  kAborted,
  kTimedOut,
  kPartyDied,
  kActionFailed,
};

std::string broken_message(std::uint32_t reason) {
  switch (reason) {
    case kAborted:
      return "the Barrier is broken: it was aborted";
    case kTimedOut:
      return "the Barrier is broken: a party's wait timed out";
    case kPartyDied:
      return "the Barrier is broken: a party died while it waited";
    case kActionFailed:
      return "the Barrier is broken: its action threw";
    default:
      return "the Barrier is broken";
  }
}

constexpr auto kLivenessPeriod = std::chrono::milliseconds(50);

std::size_t barrier_size(std::uint32_t parties) {
  return sizeof(detail::BarrierState) + parties * sizeof(std::atomic<pid_t>);
}

// The pids of the parties that arrived, right after the state.
std::atomic<pid_t>* arrivals(detail::BarrierState& s) noexcept {
  static_assert(sizeof(detail::BarrierState) % alignof(std::atomic<pid_t>) == 0);
  return reinterpret_cast<std::atomic<pid_t>*>(reinterpret_cast<char*>(&s) +
                                               sizeof(detail::BarrierState));
}

// The first of the parties [0, n) that arrived and have ended since, or n. `me` (this
// process: another thread of it may be a party) is alive by definition.
std::uint32_t first_dead_party(std::atomic<pid_t>* arrived_at, std::uint32_t n, pid_t me) {
  for (std::uint32_t i = 0; i < n; ++i) {
    pid_t pid = arrived_at[i].load();
    if (pid != me && pid > 0 && process_ended(pid)) return i;
  }
  return n;
}

}  // namespace

Barrier::Barrier(int parties, std::optional<Seconds> timeout) {
  if (parties < 1 || parties > 65536) {
    throw std::invalid_argument(fmt::format(
        "cannot create a Barrier for {} parties: it takes 1 to 65536 parties", parties));
  }
  auto n = static_cast<std::uint32_t>(parties);
  auto r = detail::SyncRegion::create(barrier_size(n), detail::SyncKind::barrier);
  auto* s = r->as<detail::BarrierState>();
  detail::init_mutex(s->lock);
  s->parties = n;
  s->timeout_ns = -1;
  if (timeout) {
    s->timeout_ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::max(*timeout, Seconds(0)))
            .count();
  }
  s->header.kind = detail::SyncKind::barrier;
  s->header.magic = detail::kMagic;
  set_region(std::move(r));
}

void Barrier::set_region(std::shared_ptr<detail::SyncRegion> r) {
  auto* s = r->as<detail::BarrierState>();
  if (s->parties < 1 || r->size() < barrier_size(s->parties)) {
    throw SerializationError("cannot attach a barrier: the region received is too small");
  }
  region_ = std::move(r);
  state_ = s;
}

void Barrier::set_portable_action(PortableAction p) {
  auto t =
      reinterpret_cast<ActionTrampoline>(const_cast<void*>(detail::resolve_code(p.trampoline)));
  const void* target = p.has_target ? detail::resolve_code(p.target) : nullptr;
  action_ = std::make_shared<const std::function<void()>>([t, target] { t(target); });
  portable_ = std::move(p);
}

void Barrier::lock_state() {
  if (detail::mutex_acquire(state_->lock, true, std::nullopt) == detail::Acquired::recovered) {
    // A party died inside wait() holding this lock (while running the action, most likely):
    // the round cannot complete.
    if (state_->broken.load() == kNotBroken) break_locked(kPartyDied);
  }
}

void Barrier::break_locked(std::uint32_t reason) noexcept {
  auto& s = *state_;
  s.broken.store(reason);
  s.reset_mask.fetch_or(std::uint64_t{1} << (s.generation.load() % 64));
  s.seq.fetch_add(1);
  try {
    detail::futex_wake(s.seq);
  } catch (const std::exception& e) {
    detail::report_noexcept(e.what());
  }
}

int Barrier::wait() {
  std::optional<Seconds> timeout;
  if (state_->timeout_ns >= 0) timeout = std::chrono::nanoseconds(state_->timeout_ns);
  return wait_until(detail::deadline_from(timeout));
}

int Barrier::wait(Seconds timeout) { return wait_until(detail::deadline_from(timeout)); }

int Barrier::wait_until(const detail::Deadline& deadline) {
  auto& s = *state_;
  std::atomic<pid_t>* arrived_at = arrivals(s);
  pid_t me = ::getpid();
  lock_state();
  std::uint32_t reason = s.broken.load();
  if (reason != kNotBroken) {
    detail::mutex_release(s.lock, "a Barrier's lock");
    throw BrokenBarrierError(broken_message(reason));
  }
  const std::uint32_t g = s.generation.load();
  const std::uint32_t index = s.count.load();
  arrived_at[index].store(me);
  s.count.store(index + 1);
  if (index + 1 == s.parties) {
    // The last to arrive completes the round only if every party that arrived before it is
    // still alive: a round that "passed" with a dead party would let the survivors go on as
    // if it had done its share. The waiters' own periodic check cannot be relied on here:
    // the last party may arrive before any of them looks.
    if (first_dead_party(arrived_at, index, me) < index) {
      break_locked(kPartyDied);
      detail::mutex_release(s.lock, "a Barrier's lock");
      throw BrokenBarrierError(broken_message(kPartyDied));
    }
    // The last to arrive runs the action, then releases everyone.
    if (action_) {
      try {
        (*action_)();
      } catch (...) {
        break_locked(kActionFailed);
        detail::mutex_release(s.lock, "a Barrier's lock");
        throw;
      }
    }
    s.reset_mask.fetch_and(~(std::uint64_t{1} << (g % 64)));
    s.count.store(0);
    s.generation.store(g + 1);
    s.seq.fetch_add(1);
    detail::mutex_release(s.lock, "a Barrier's lock");
    detail::futex_wake(s.seq);
    return static_cast<int>(index);
  }
  detail::mutex_release(s.lock, "a Barrier's lock");

  auto next_check = std::chrono::steady_clock::now() + kLivenessPeriod;
  for (;;) {
    std::uint32_t seq = s.seq.load();
    if (s.generation.load() != g) {
      if (s.reset_mask.load() & (std::uint64_t{1} << (g % 64))) {
        std::uint32_t why = s.broken.load();
        throw BrokenBarrierError(why != kNotBroken
                                     ? broken_message(why)
                                     : "the Barrier is broken: it was reset while parties waited");
      }
      return static_cast<int>(index);
    }
    if ((reason = s.broken.load()) != kNotBroken) throw BrokenBarrierError(broken_message(reason));

    auto now = std::chrono::steady_clock::now();
    if (deadline && now >= *deadline) {
      lock_state();
      if (s.generation.load() == g && s.broken.load() == kNotBroken) break_locked(kTimedOut);
      detail::mutex_release(s.lock, "a Barrier's lock");
      continue;  // released just in time, or broken: the checks above tell
    }
    if (now >= next_check) {
      next_check = now + kLivenessPeriod;
      std::uint32_t arrived = std::min(s.count.load(), s.parties);
      std::uint32_t i = first_dead_party(arrived_at, arrived, me);
      if (i < arrived) {
        pid_t pid = arrived_at[i].load();
        lock_state();
        if (s.generation.load() == g && s.broken.load() == kNotBroken && i < s.count.load() &&
            arrived_at[i].load() == pid) {
          break_locked(kPartyDied);
        }
        detail::mutex_release(s.lock, "a Barrier's lock");
      }
      continue;
    }
    detail::Deadline until = next_check;
    if (deadline && *deadline < next_check) until = deadline;
    detail::futex_wait(s.seq, seq, until);
  }
}

void Barrier::abort() {
  lock_state();
  if (state_->broken.load() == kNotBroken) break_locked(kAborted);
  detail::mutex_release(state_->lock, "a Barrier's lock");
}

void Barrier::reset() {
  auto& s = *state_;
  lock_state();
  std::uint32_t g = s.generation.load();
  s.reset_mask.fetch_or(std::uint64_t{1} << (g % 64));
  s.count.store(0);
  s.broken.store(kNotBroken);
  s.generation.store(g + 1);
  s.seq.fetch_add(1);
  detail::mutex_release(s.lock, "a Barrier's lock");
  detail::futex_wake(s.seq);
}

int Barrier::parties() const noexcept { return static_cast<int>(state_->parties); }

int Barrier::n_waiting() const noexcept {
  if (state_->broken.load() != kNotBroken) return 0;
  return static_cast<int>(state_->count.load());
}

bool Barrier::broken() const noexcept { return state_->broken.load() != kNotBroken; }

}  // namespace mp
