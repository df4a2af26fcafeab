// mp/src/sync.cpp - see mp/sync.hpp.
#include "mp/sync.hpp"

#include <fmt/format.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <mutex>
#include <new>

#include "mp/detail/futex.hpp"

namespace mp {
namespace detail {

namespace {

constexpr std::uint32_t kMagic = 0x6d707379;  // "mpsy"

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
    for (int i = 0; i < kSpinCount && r == EBUSY; ++i) {
      cpu_relax();
      if ((mutex_word(m) & FUTEX_TID_MASK) == 0) r = ::pthread_mutex_trylock(&m.mutex);
    }
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
  check_pthread(r, fmt::format("release {}", what));
}

bool mutex_held_by_me(const MutexState& m) noexcept {
  return (mutex_word(m) & FUTEX_TID_MASK) == my_tid();
}

bool mutex_locked(const MutexState& m) noexcept { return (mutex_word(m) & FUTEX_TID_MASK) != 0; }

// ---- SyncRegion ---------------------------------------------------------------------------

std::shared_ptr<SyncRegion> SyncRegion::create(std::size_t size, SyncKind kind) {
  return std::make_shared<SyncRegion>(Region::create(size, kind_name(kind)), kind);
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

}  // namespace mp
