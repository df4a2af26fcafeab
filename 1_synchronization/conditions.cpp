// conditions.cpp - An mp::Condition lets processes sleep until shared data changes.
//
// A bounded buffer in shared memory, guarded by a Condition's lock: producers wait while
// it is full, consumers while it is empty, and each change wakes the other side with
// notify_all(). wait_for(predicate) sleeps and rechecks until the predicate holds, so a
// wake-up that comes too early does no harm. Then notify(1) against notify_all(): one
// sleeper woken, or all of them.
//
// Usage: conditions [--workers N] [--items N] [--json]
//   $ build/1_synchronization/conditions --workers 2 --items 500
//
// Watch for: the buffer never over- or underflowing, every item consumed exactly once
// (the sums match); notify(1) waking exactly one of three sleepers.
#include <fmt/format.h>

#include <chrono>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

constexpr int kSlots = 8;

struct Buffer {
  std::int64_t slot[kSlots];
  int head, count;  // the oldest item, and how many there are
  int producers_left;
  std::int64_t consumed_sum;
  int consumed;
};

struct Board {
  int waiting;  // sleepers about to wait (counted under the lock)
  int woken;    // sleepers that woke up
};

void producer(mp::Condition cond, mp::RawValue<Buffer> buf, int first, int items) {
  Buffer& b = buf.value();
  for (int i = first; i < first + items; ++i) {
    std::unique_lock guard{cond};
    cond.wait_for([&] { return b.count < kSlots; });  // room for one more
    b.slot[(b.head + b.count) % kSlots] = i;
    ++b.count;
    cond.notify_all();  // a consumer may be waiting for this
  }
  std::lock_guard guard{cond};
  --b.producers_left;
  cond.notify_all();
}

void consumer(mp::Condition cond, mp::RawValue<Buffer> buf) {
  Buffer& b = buf.value();
  for (;;) {
    std::unique_lock guard{cond};
    cond.wait_for([&] { return b.count > 0 || b.producers_left == 0; });
    if (b.count == 0) return;  // empty, and nobody will fill it again
    b.consumed_sum += b.slot[b.head];
    ++b.consumed;
    b.head = (b.head + 1) % kSlots;
    --b.count;
    cond.notify_all();  // a producer may be waiting for room
  }
}

// Sleeps until notified once.
void sleeper(mp::Condition cond, mp::RawValue<Board> board) {
  std::unique_lock guard{cond};
  ++board.value().waiting;  // still under the lock, which wait() lets go of only once asleep
  cond.wait();
  ++board.value().woken;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "An mp::Condition lets processes sleep until shared data changes."};
  int& workers = L.add_workers(2, 32);
  int& items = L.add_items(500, 1, 1'000'000);
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: producers and consumers around a buffer of 8 slots.
    L.step(fmt::format("{} producers and {} consumers, {} items each", workers, workers, items));
    mp::Condition cond;  // its lock is a new RLock, as in Python
    mp::RawValue<Buffer> buf{Buffer{}};
    buf.value().producers_left = workers;
    std::vector<mp::Process> procs;
    for (int i = 0; i < workers; ++i) procs.emplace_back(producer, cond, buf, i * items + 1, items);
    for (int i = 0; i < workers; ++i) procs.emplace_back(consumer, cond, buf);
    for (auto& p : procs) p.start();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    const std::int64_t n = std::int64_t{workers} * items;
    const std::int64_t expected_sum = n * (n + 1) / 2;  // the items are 1..n
    Buffer b = buf.value();
    L.say("consumed {} items (sum {}, expected {}); left in the buffer: {}", b.consumed,
          b.consumed_sum, expected_sum, b.count);

    // Step 2: three sleepers; notify(1) wakes one, notify_all() the others.
    L.step("notify(1) and notify_all()");
    mp::Condition bell{mp::Lock{}};  // a Condition over a plain Lock works too
    mp::RawValue<Board> board{Board{}};
    auto read = [&](int Board::*field) {  // one field, read under the lock
      std::lock_guard g{bell};
      return board.value().*field;
    };
    std::vector<mp::Process> sleepers;
    for (int i = 0; i < 3; ++i) sleepers.emplace_back(sleeper, bell, board);
    for (auto& p : sleepers) p.start();
    while (read(&Board::waiting) < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    {
      std::lock_guard g{bell};
      bell.notify(1);
    }
    while (read(&Board::woken) < 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // time for a wrong extra one
    int after_one = read(&Board::woken);
    {
      std::lock_guard g{bell};
      bell.notify_all();
    }
    for (auto& p : sleepers) p.join();
    int after_all = board.value().woken;
    L.say("woken after notify(1): {}; after notify_all(): {}", after_one, after_all);

    L.fact("producers", workers);
    L.fact("consumers", workers);
    L.fact("items_produced", n);
    L.fact("items_consumed", b.consumed);
    L.fact("sum_matches", b.consumed_sum == expected_sum);
    L.fact("woken_by_notify_1", after_one);
    L.fact("woken_by_notify_all", after_all);
    return all_ok && b.consumed == n && b.consumed_sum == expected_sum && b.count == 0 &&
           after_one == 1 && after_all == 3;
  });
}
