// locks.cpp - Processes race on a shared bank balance, and an mp::Lock makes every deposit count.
//
// Each worker makes deposits into one balance in shared memory: read it, add one, write it
// back. Without a lock two processes read the same balance and one deposit overwrites the
// other (a lost update); with mp::Lock the read-add-write is one step and the total is
// exact. Then the idioms: a scoped guard (std::lock_guard) that lets go even when an
// exception leaves the block, and try-lock with a timeout while another process holds it.
//
// Usage: locks [--workers N] [--items N] [--json]
//   $ build/1_synchronization/locks --workers 4 --items 50000
//
// Watch for: the unlocked balance falls short by a different amount on every run (on one
// CPU it may even come out right: a race is a chance, not a certainty); the locked one is
// exact every time, and costs more time.
#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

volatile int g_think;  // writes the compiler must keep: a moment of thought

// Read, think a moment, write back: the moment is where another process slips in. Each read
// and each write is whole (atomic), yet the read-add-write as a whole is not.
void deposit(std::int64_t& balance) {
  std::atomic_ref<std::int64_t> cell{balance};
  std::int64_t seen = cell.load(std::memory_order_relaxed);
  for (int k = 0; k < 200; ++k) g_think = k;
  cell.store(seen + 1, std::memory_order_relaxed);
}

// Targets are plain functions with copyable arguments: the handles below share memory.
// Each waits for `go`, so that all of them run at the same time.
void deposit_unlocked(mp::Event go, mp::RawValue<std::int64_t> balance, int items) {
  go.wait();
  for (int i = 0; i < items; ++i) deposit(balance.value());
}

void deposit_locked(mp::Event go, mp::RawValue<std::int64_t> balance, mp::Lock lock, int items) {
  go.wait();
  for (int i = 0; i < items; ++i) {
    std::lock_guard guard{lock};  // acquire() here, release() at the closing brace
    deposit(balance.value());
  }
}

// Holds the lock until told to let go, like a long transaction.
void hold_lock(mp::Lock lock, mp::Event holding, mp::Event may_release) {
  std::lock_guard guard{lock};
  holding.set();
  may_release.wait(std::chrono::seconds(60));
}

// Runs `workers` copies of target(go, args...) side by side, all released at once by
// `go`; returns the seconds they took.
template <class F, class... Args>
double run_workers(int workers, F target, Args... args) {
  mp::Event go;
  std::vector<mp::Process> procs;
  for (int i = 0; i < workers; ++i) procs.emplace_back(target, go, args...);
  for (auto& p : procs) p.start();
  auto start = std::chrono::steady_clock::now();
  go.set();
  for (auto& p : procs) p.join();
  for (auto& p : procs) {
    if (p.exitcode() != 0) throw std::runtime_error("a worker failed");
  }
  return lesson::seconds_since(start);
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{
      MP_LESSON_ID,
      "Processes race on a shared bank balance, and an mp::Lock makes every deposit count."};
  int& workers = L.add_workers(4, 64);
  int& items = L.add_items(100'000, 1, 10'000'000);
  L.parse(argc, argv);

  return L.run([&] {
    const std::int64_t expected = std::int64_t{workers} * items;

    // Step 1: no lock. Every worker reads and writes the balance whenever it likes.
    L.step("without a lock");
    mp::RawValue<std::int64_t> unlocked{0};
    double t_unlocked = run_workers(workers, deposit_unlocked, unlocked, items);
    std::int64_t lost = expected - unlocked.value();
    L.say("{} workers x {} deposits: balance {} instead of {} - {} deposits lost ({:.3f} s)",
          workers, items, unlocked.value(), expected, lost, t_unlocked);

    // Step 2: the same work, each deposit under the lock.
    L.step("with mp::Lock");
    mp::RawValue<std::int64_t> locked{0};
    mp::Lock lock;
    double t_locked = run_workers(workers, deposit_locked, locked, lock, items);
    bool exact = locked.value() == expected;
    L.say("balance {} of {} expected: exact = {} ({:.3f} s)", locked.value(), expected, exact,
          t_locked);

    // Step 3: a scoped guard releases the lock however the block is left.
    L.step("a scoped guard and an exception");
    try {
      std::lock_guard guard{lock};
      throw std::runtime_error("the transfer failed half way");
    } catch (const std::runtime_error& e) {
      L.say("caught '{}'; lock still held afterwards: {}", e.what(), lock.locked());
    }
    bool released_after_exception = !lock.locked();

    // Step 4: try-lock, and acquire with a timeout, while another process holds the lock.
    L.step("try-lock and timeouts while a child holds the lock");
    mp::Event holding, may_release;
    mp::Process holder{hold_lock, lock, holding, may_release};
    holder.start();
    holding.wait(std::chrono::seconds(60));
    bool try_got = lock.try_acquire();
    auto t0 = std::chrono::steady_clock::now();
    bool timed_got = lock.acquire(std::chrono::milliseconds(100));
    double waited = lesson::seconds_since(t0);
    L.say("try_acquire(): {}; acquire(100ms): {} after {:.3f} s", try_got, timed_got, waited);
    may_release.set();                                        // the child lets go...
    bool later_got = lock.acquire(std::chrono::seconds(30));  // ...and we get it
    L.say("after the child released it, acquire(30s): {}", later_got);
    if (later_got) lock.release();
    holder.join();

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("expected", expected);
    L.fact("unlocked_final", unlocked.value());
    L.fact("unlocked_lost_updates", lost);  // nondeterministic: reported, not claimed
    L.fact("locked_final", locked.value());
    L.fact("locked_exact", exact);
    L.fact("released_after_exception", released_after_exception);
    L.fact("try_acquire_while_held", try_got);
    L.fact("timed_acquire_while_held", timed_got);
    L.fact("acquire_after_release", later_got);
    L.fact("holder_exitcode", *holder.exitcode());
    return exact && released_after_exception && !try_got && !timed_got && later_got &&
           holder.exitcode() == 0;
  });
}
