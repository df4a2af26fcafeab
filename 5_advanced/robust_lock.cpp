// robust_lock.cpp - An mp::Lock holder is SIGKILLed mid-update: the next holder recovers the lock.
//
// Two accounts hold 1000 between them. A transfer, under the lock, writes a journal entry,
// takes the amount from A, adds it to B, and clears the journal. One process is killed
// right between the two writes, lock in hand. With Python's Lock (or a plain pthread
// mutex) every other process would now wait forever; Boost.Interprocess would leave a lock
// that can never be taken again. mp::Lock is a robust mutex: the kernel releases it when
// its holder dies, and the next process to acquire it gets it *and* owner_died() == true -
// its cue to repair the data (here: roll the journaled transfer forward). The lock goes on
// working, and no money is lost.
//
// Usage: robust_lock [--workers N] [--items N] [--json]
//   $ build/5_advanced/robust_lock --workers 3 --items 200
//
// Watch for: the victim ending by SIGKILL with A debited and B not yet credited; exactly
// one worker told owner_died; the balance exact after every worker's transfers.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

constexpr std::int64_t kTotal = 1000;

struct Bank {
  std::int64_t a, b;
  std::int64_t journal_amount;  // the transfer in progress (0: none)
  int recoveries_seen;          // how many holders were told owner_died
  pid_t repaired_by;
  std::int64_t transfers;
};

// Whoever is told the last holder died repairs: a journaled transfer had debited A (the
// first write), so it is rolled forward by crediting B.
void repair(Bank& bank) {
  if (bank.journal_amount != 0 && bank.a + bank.b != kTotal) bank.b += bank.journal_amount;
  bank.journal_amount = 0;
  ++bank.recoveries_seen;
  bank.repaired_by = ::getpid();
}

void transfer(mp::Lock& lock, Bank& bank, std::int64_t amount) {
  std::lock_guard guard{lock};
  if (lock.owner_died()) repair(bank);
  bank.journal_amount = amount;
  bank.a -= amount;
  bank.b += amount;
  bank.journal_amount = 0;
  ++bank.transfers;
}

// The victim: starts a transfer and is killed half way, holding the lock.
void victim(mp::Lock lock, mp::RawValue<Bank> bank, mp::Event half_done) {
  lock.acquire();
  bank.value().journal_amount = 100;
  bank.value().a -= 100;
  half_done.set();
  std::this_thread::sleep_for(std::chrono::seconds(60));  // never finishes: it is killed
}

// The others move money back and forth; they are already waiting when the victim dies.
void worker(mp::Lock lock, mp::RawValue<Bank> bank, int items) {
  for (int i = 0; i < items; ++i) transfer(lock, bank.value(), i % 2 ? -3 : 3);
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{
      MP_LESSON_ID,
      "An mp::Lock holder is SIGKILLed mid-update: the next holder recovers the lock."};
  int& workers = L.add_workers(3, 64);
  int& items = L.add_items(200, 1, 1'000'000);
  L.parse(argc, argv);

  return L.run([&] {
    mp::Lock lock;
    mp::RawValue<Bank> bank{Bank{kTotal, 0, 0, 0, 0, 0}};

    // Step 1: the victim takes the lock and gets half way through a transfer.
    L.step("a transfer, half done");
    mp::Event half_done;
    mp::Process doomed{victim, lock, bank, half_done};
    doomed.start();
    if (!half_done.wait(std::chrono::seconds(60))) throw std::runtime_error("the victim is stuck");
    L.say("victim {} holds the lock; A = {}, B = {}: {} of {} accounted for", doomed.pid(),
          bank.value().a, bank.value().b, bank.value().a + bank.value().b, kTotal);

    // Step 2: workers queue up behind the lock, then the holder is killed.
    L.step("SIGKILL the holder while others wait");
    std::vector<mp::Process> procs;
    for (int i = 0; i < workers; ++i) procs.emplace_back(worker, lock, bank, items);
    for (auto& p : procs) p.start();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let them block on the lock
    doomed.kill();
    doomed.join();
    L.say("victim ended: {}", mp::describe_exitcode(*doomed.exitcode()));

    // Step 3: one of them recovers the lock and repairs; all of them finish.
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    // Had no worker come after the death, the next holder would be us: same check.
    {
      std::lock_guard guard{lock};
      if (lock.owner_died()) repair(bank.value());
    }
    Bank b = bank.value();
    L.step("after the recovery");
    L.say("owner_died was reported {} time(s), to pid {}; the lock was recovered {} time(s)",
          b.recoveries_seen, b.repaired_by, lock.recoveries());
    L.say("{} transfers done; A = {}, B = {}, total {} (expected {})", b.transfers, b.a, b.b,
          b.a + b.b, kTotal);

    bool exact = b.a + b.b == kTotal;
    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("victim_exitcode", *doomed.exitcode());
    L.fact("owner_died", b.recoveries_seen == 1);
    L.fact("recoveries", lock.recoveries());
    L.fact("transfers", b.transfers);
    L.fact("final_balance", b.a + b.b);
    L.fact("expected_balance", kTotal);
    L.fact("balance_exact", exact);
    L.fact("lock_free_at_end", !lock.locked());
    return all_ok && *doomed.exitcode() == -SIGKILL && b.recoveries_seen == 1 &&
           lock.recoveries() == 1 && exact && b.transfers == std::int64_t{workers} * items &&
           !lock.locked();
  });
}
