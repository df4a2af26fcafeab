// rlock.cpp - An mp::RLock may be re-acquired by its holder, so locking functions can nest.
//
// A bank's transfer() locks the ledger and calls withdraw() and deposit(), which lock it
// too, so that each is safe on its own. With an RLock the holder may acquire again: it
// counts the depth and is free once released as often as acquired. A plain Lock would
// wait for itself forever; mp refuses that at once with ProcessError. And only the holder
// may release an RLock: another process trying gets ProcessError too.
//
// Usage: rlock [--workers N] [--items N] [--json]
//   $ build/1_synchronization/rlock --workers 3 --items 2000
//
// Watch for: the depth going 1, 2, 1, 0 through one transfer; money neither made nor lost
// by several processes transferring at once; the two errors, caught and explained.
#include <fmt/format.h>

#include <algorithm>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <vector>

#include "lesson.hpp"

namespace {

struct Ledger {
  std::int64_t accounts[2];
  int max_depth;  // the deepest nesting seen, written under the lock
};

// Each operation is safe on its own: it takes the lock itself.
void withdraw(mp::RLock& lock, Ledger& l, int from, int amount) {
  std::lock_guard guard{lock};
  l.max_depth = std::max(l.max_depth, lock.depth());
  l.accounts[from] -= amount;
}
void deposit(mp::RLock& lock, Ledger& l, int to, int amount) {
  std::lock_guard guard{lock};
  l.accounts[to] += amount;
}
// ...and so is the combination, which holds the lock across both steps.
void transfer(mp::RLock& lock, Ledger& l, int from, int to, int amount) {
  std::lock_guard guard{lock};
  withdraw(lock, l, from, amount);  // depth 2 inside
  deposit(lock, l, to, amount);
}

// A worker moves money back and forth: one unit from 0 to 1, then one back, and so on.
void bank_worker(mp::RLock lock, mp::RawValue<Ledger> ledger, int items) {
  for (int i = 0; i < items; ++i) transfer(lock, ledger.value(), i % 2, 1 - i % 2, 1);
}

// A process that does not hold the lock tries to release it: 0 when refused.
int release_someone_elses(mp::RLock lock) {
  try {
    lock.release();
  } catch (const mp::ProcessError&) {
    return 0;
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "An mp::RLock may be re-acquired by its holder, so locking functions can nest."};
  int& workers = L.add_workers(3, 64);
  int& items = L.add_items(2000, 1, 10'000'000);
  L.parse(argc, argv);

  return L.run([&] {
    mp::RLock lock;

    // Step 1: one transfer, watching the depth.
    L.step("one transfer, step by step");
    lock.acquire();
    int d1 = lock.depth();
    lock.acquire();  // what withdraw() does inside transfer()
    int d2 = lock.depth();
    lock.release();
    int d3 = lock.depth();
    lock.release();
    int d4 = lock.depth();
    L.say("depth after acquire, acquire, release, release: {}, {}, {}, {}", d1, d2, d3, d4);
    bool depths_ok = d1 == 1 && d2 == 2 && d3 == 1 && d4 == 0 && !lock.locked();

    // Step 2: a plain Lock would wait for itself; mp says so instead of hanging.
    L.step("the same nesting with a plain Lock");
    mp::Lock plain;
    bool refused = false;
    {
      std::lock_guard guard{plain};
      try {
        plain.acquire();
      } catch (const mp::ProcessError& e) {
        refused = true;
        L.say("plain Lock, acquired twice: ProcessError: {}", e.what());
      }
    }

    // Step 3: several processes transferring through the nested functions at once.
    L.step(fmt::format("{} processes x {} transfers", workers, items));
    mp::RawValue<Ledger> ledger{Ledger{{1000, 1000}, 0}};
    std::vector<mp::Process> procs;
    for (int i = 0; i < workers; ++i) procs.emplace_back(bank_worker, lock, ledger, items);
    for (auto& p : procs) p.start();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    const Ledger& l = ledger.value();
    std::int64_t total = l.accounts[0] + l.accounts[1];
    L.say("accounts: {} + {} = {} (started with 2000); deepest nesting: {}", l.accounts[0],
          l.accounts[1], total, l.max_depth);

    // Step 4: only the holder may release.
    L.step("release by a process that does not hold it");
    std::lock_guard guard{lock};
    mp::Process stranger{release_someone_elses, lock};
    stranger.start();
    stranger.join();
    bool stranger_refused = stranger.exitcode() == 0;
    L.say("the child's release() was refused: {}; we still hold it at depth {}", stranger_refused,
          lock.depth());

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("depths", std::vector<int>{d1, d2, d3, d4});
    L.fact("plain_lock_nested_refused", refused);
    L.fact("total", total);
    L.fact("total_exact", total == 2000);
    L.fact("max_depth", l.max_depth);
    L.fact("release_by_other_refused", stranger_refused);
    return depths_ok && refused && all_ok && total == 2000 && l.max_depth == 2 &&
           stranger_refused && lock.depth() == 1;
  });
}
