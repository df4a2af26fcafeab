// array_value_ctypes.cpp - Share numbers and arrays with mp::Value and mp::Array, locked or not.
//
// Value<T> is one T in shared memory, Array<T> is n of them (Python's Value('i', 0) and
// Array('i', ...), typed by C++ instead of a typecode). Each comes with a lock, get_lock();
// RawValue/RawArray come without. The lesson counts with and without the lock, reads a
// struct whole while others write it, and processes an array in chunks as seed 003 does.
//
// Usage: array_value_ctypes [--workers N] [--items N] [--seed S] [--json]
//   $ build/2_communication/array_value_ctypes --workers 3 --items 20000
//
// Watch for: without a lock, read-then-write loses updates (how many varies from run to
// run, sometimes none); under get_lock() the count is exact, and so is an atomic
// fetch_add; a Value's value()/set() never show half a struct; the array ends exactly as
// a serial run computes it.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

// Read, then write: another process may write in between, and its update is lost. The
// yield() between them widens that window, as the seed's sleep does. (atomic_ref makes
// each access well defined; it is the pair that is not atomic.)
void add_unlocked(mp::Event go, mp::RawValue<int> c, int times) {
  go.wait();  // all start together, so that they overlap
  std::atomic_ref<int> a(c.value());
  for (int i = 0; i < times; ++i) {
    int seen = a.load(std::memory_order_relaxed);
    std::this_thread::yield();
    a.store(seen + 1, std::memory_order_relaxed);
  }
}

// The same read, yield, write, under the lock: nobody can write in between.
void add_locked(mp::Event go, mp::Value<int> c, int times) {
  go.wait();
  for (int i = 0; i < times; ++i) {
    std::lock_guard g{c.get_lock()};
    int seen = c.get_obj();  // the unlocked reference, used while we hold the lock
    std::this_thread::yield();
    c.get_obj() = seen + 1;
  }
}

void add_atomic(mp::Event go, mp::RawValue<int> c, int times) {
  go.wait();
  std::atomic_ref<int> a(c.value());
  for (int i = 0; i < times; ++i) a.fetch_add(1, std::memory_order_relaxed);
}

struct Reading {
  int sensor;
  double celsius;  // always 20 + sensor: a reader can tell a torn struct
  long serial;
};

void sensor(mp::Event go, mp::Value<Reading> v, int id, int times) {
  go.wait();
  for (int i = 0; i < times; ++i) v.set(Reading{id, 20.0 + id, i});  // one whole write
}

// Seed 003 §6.3: each element becomes element * 2 + a random 1..10, under the lock.
int bump(std::mt19937& rng) { return std::uniform_int_distribution<int>(1, 10)(rng); }

void process_chunk(mp::Array<int> a, std::size_t from, std::size_t to, unsigned seed) {
  std::mt19937 rng(seed);
  for (std::size_t i = from; i < to; ++i) {
    std::lock_guard g{a.get_lock()};
    a[i] = a[i] * 2 + bump(rng);
  }
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Share numbers and arrays with mp::Value and mp::Array, locked or not."};
  int& workers = L.add_workers(3, 64);
  int& items = L.add_items(20'000, 1, 10'000'000);
  std::uint64_t& seed = L.add_seed(1);
  L.parse(argc, argv);

  return L.run([&] {
    const long expected = static_cast<long>(workers) * items;
    // Runs `target` in `workers` processes, each doing `items` increments, and joins them.
    // An Event starts them at once: started one by one, each would be done before the next
    // one runs, and nothing would overlap.
    auto run_all = [&](auto target, auto counter) {
      mp::Event go;
      std::vector<mp::Process> procs;
      for (int w = 0; w < workers; ++w) procs.emplace_back(target, go, counter, items);
      for (auto& p : procs) p.start();
      go.set();
      for (auto& p : procs) p.join();
    };

    // Step 1: a counter with no lock.
    L.step("a counter without a lock (RawValue)");
    mp::RawValue<int> raw(0);
    run_all(add_unlocked, raw);
    long lost = expected - raw.value();
    L.say("{} workers x {} increments: {} (expected {}): {} updates lost", workers, items,
          raw.value(), expected, lost);

    // Step 2: the same under get_lock(), and with an atomic instead of a lock.
    L.step("the same under get_lock(), then with an atomic fetch_add");
    mp::Value<int> locked(0);
    run_all(add_locked, locked);
    mp::RawValue<int> atomic(0);
    run_all(add_atomic, atomic);
    L.say("with get_lock(): {}; with fetch_add: {} (expected {})", locked.value(), atomic.value(),
          expected);

    // Step 3: value() and set() read and write a struct whole.
    L.step("a struct read whole while two sensors write it");
    mp::Value<Reading> reading(Reading{0, 20.0, 0});
    mp::Event go;
    mp::Process s1{sensor, go, reading, 1, items}, s2{sensor, go, reading, 2, items};
    s1.start();
    s2.start();
    go.set();
    long reads = 0, torn = 0;
    while (s1.is_alive() || s2.is_alive() || reads == 0) {
      Reading r = reading.value();  // under the lock: all three fields from one write
      ++reads;
      torn += r.celsius != 20.0 + r.sensor;
    }
    s1.join();
    s2.join();
    L.say("{} reads while the sensors wrote, torn: {}; last: sensor {} at {} C", reads, torn,
          reading.value().sensor, reading.value().celsius);

    // Step 4: an Array processed in chunks (seed 003 §6.3).
    L.step("an Array processed in chunks");
    std::vector<int> init(10);
    for (int i = 0; i < 10; ++i) init[i] = i * 10;
    mp::Array<int> arr{std::span<const int>(init)};
    L.say("initial: {}", arr.to_vector());
    std::vector<int> serial = init;  // what a single process computes with the same seeds
    std::vector<mp::Process> procs;
    for (int w = 0; w < workers; ++w) {
      std::size_t from = init.size() * w / workers, to = init.size() * (w + 1) / workers;
      auto s = static_cast<unsigned>(seed + w);
      std::mt19937 rng(s);
      for (std::size_t i = from; i < to; ++i) serial[i] = serial[i] * 2 + bump(rng);
      procs.emplace_back(process_chunk, arr, from, to, s);
    }
    for (auto& p : procs) p.start();
    for (auto& p : procs) p.join();
    std::vector<int> final_values = arr.to_vector();  // a consistent copy, under the lock
    auto [lo, hi] = std::minmax_element(final_values.begin(), final_values.end());
    long sum = std::accumulate(final_values.begin(), final_values.end(), 0L);
    L.say("final: {}", final_values);
    L.say("sum {}, mean {:.1f}, min {}, max {}; equals the serial run: {}", sum,
          static_cast<double>(sum) / static_cast<double>(final_values.size()), *lo, *hi,
          final_values == serial);

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("expected", expected);
    L.fact("unlocked_total", raw.value());
    L.fact("unlocked_lost_updates", lost);
    L.fact("locked_total", locked.value());
    L.fact("atomic_total", atomic.value());
    L.fact("struct_reads", reads);
    L.fact("struct_torn_reads", torn);
    L.fact("array_final", final_values);
    L.fact("array_matches_serial", final_values == serial);
    return locked.value() == expected && atomic.value() == expected && torn == 0 &&
           final_values == serial;
  });
}
