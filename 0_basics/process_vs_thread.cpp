// process_vs_thread.cpp - Threads vs processes: creation cost, CPU scaling, isolation, crashes.
//
// C++ has no GIL: the threads of one process run CPU-bound code in parallel, as processes
// do. What differs is what they share. Threads share one address space: a write is seen by
// all, and one crash ends them all. A process gets its own copy: its writes stay private,
// its crash stays contained, and it costs more to start.
//
// Usage: process_vs_thread [--workers N] [--items N] [--starts N] [--json]
//   $ build/0_basics/process_vs_thread --workers 4 --items 4000000
//
// Watch for: how many microseconds a process start costs next to a thread start; both
// scaling alike up to the number of cores; the same address holding different values in
// parent and child; the parent carrying on after its child's segmentation fault.
#include <sys/mman.h>
#include <sys/resource.h>

#include <chrono>
#include <csignal>
#include <memory>
#include <mp/process.hpp>
#include <numeric>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

int g_value = 0;  // an ordinary global variable, for step 3

bool is_prime(long n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (long d = 3; d * d <= n; d += 2)
    if (n % d == 0) return false;
  return true;
}

// The CPU-bound work: counts the primes below `limit` in blocks part, part + parts, ...
// (interleaved blocks, so every part gets small and large numbers alike).
long count_primes(int part, int parts, long limit) {
  constexpr long kBlock = 4096;
  long count = 0;
  for (long lo = part * kBlock; lo < limit; lo += parts * kBlock)
    for (long n = lo; n < std::min(lo + kBlock, limit); ++n) count += is_prime(n);
  return count;
}

// Splits count_primes over `parts` threads, or `parts` forked processes; returns the total.
long with_threads(int parts, long limit) {
  std::vector<long> counts(parts);
  std::vector<std::jthread> threads;
  for (int k = 0; k < parts; ++k) {
    threads.emplace_back([&counts, k, parts, limit] { counts[k] = count_primes(k, parts, limit); });
  }
  threads.clear();  // a jthread joins when it is destroyed
  return std::reduce(counts.begin(), counts.end());
}
long with_processes(int parts, long limit) {
  // The children hand back their counts through memory mapped MAP_SHARED, which fork does
  // not copy (chapter 2 wraps this as mp::Array).
  std::size_t bytes = parts * sizeof(long);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) mp::throw_errno("map shared memory for the counts");
  auto unmap = [bytes](long* q) {
    if (::munmap(q, bytes) == -1) mp::detail::report_noexcept("cannot unmap the counts");
  };
  std::unique_ptr<long[], decltype(unmap)> counts(static_cast<long*>(p), unmap);
  {
    std::vector<mp::Process> children;
    for (int k = 0; k < parts; ++k) {
      long* slot = &counts[k];  // a pointer into shared memory: meaningful under fork only
      auto work = [slot, k, parts, limit] { *slot = count_primes(k, parts, limit); };
      children.emplace_back(mp::get_context("fork"), work).start();
    }
    for (auto& c : children) {
      c.join();
      if (c.exitcode() != 0) throw std::runtime_error("a counting process failed");
    }
  }
  return std::reduce(counts.get(), counts.get() + parts);
}

// Calls f() `times` times; returns the seconds that took.
template <class F>
double seconds_of(F&& f, int times = 1) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < times; ++i) f();
  return lesson::seconds_since(t0);
}

// A child that writes the global variable: in its own copy of the parent's memory.
int write_global(const lesson::Lesson& L) {
  g_value = 42;
  L.say("child:  g_value at {} is {}", fmt::ptr(&g_value), g_value);
  return g_value == 42 ? 0 : 1;
}

// A child that crashes: it writes to a page it may only read.
void crash() {
  rlimit no_core{0, 0};
  ::setrlimit(RLIMIT_CORE, &no_core);  // no core file for a crash we asked for
  std::signal(SIGSEGV, SIG_DFL);       // undo any crash handler (sanitizer builds have one)
  void* page = ::mmap(nullptr, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) mp::throw_errno("map a read-only page");
  *static_cast<volatile int*>(page) = 1;  // the kernel sends SIGSEGV
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Threads vs processes: creation cost, CPU scaling, isolation, crashes."};
  int& workers = L.add_workers(2, 64);
  int& items = L.add_items(2'000'000, 2);
  int starts = 100;
  L.cli()
      .add_option("--starts", starts, "threads and processes to create in step 1")
      ->check(CLI::Range(1, 10'000))
      ->capture_default_str();
  L.parse(argc, argv);
  // Every child here is forked: it starts as a copy of the parent (see process_contexts).
  const mp::Context fork = mp::get_context("fork");

  return L.run([&] {
    // Step 1: create and join a thread that does nothing, `starts` times; then a process.
    L.step(fmt::format("creation cost: {} threads, then {} processes", starts, starts));
    auto start_thread = [] { std::thread([] {}).join(); };
    auto start_process = [&] {
      mp::Process p{fork, [] {}};
      p.start();
      p.join();
    };
    double thread_us = seconds_of(start_thread, starts) * 1e6 / starts;
    double process_us = seconds_of(start_process, starts) * 1e6 / starts;
    L.say("thread:  {:8.1f} us to create and join\nprocess: {:8.1f} us, {:.1f} times as much",
          thread_us, process_us, process_us / thread_us);

    // Step 2: the same CPU-bound work, serial, then over 1..workers threads and processes.
    L.step(fmt::format("CPU-bound: count the primes below {}, {} CPUs online", items,
                       mp::cpu_count()));
    long expected = 0;  // the serial count is the reference
    double serial_s = seconds_of([&] { expected = count_primes(0, 1, items); });
    bool correct = true;
    L.say("serial: {} primes in {:.3f} s", expected, serial_s);
    L.say("\n{:>7} {:>10} {:>8} {:>12} {:>8}", "workers", "threads s", "speedup", "processes s",
          "speedup");
    nlohmann::json table = nlohmann::json::array();
    for (int w = 1; w <= workers; ++w) {
      long by_threads = 0, by_processes = 0;
      double threads_s = seconds_of([&] { by_threads = with_threads(w, items); });
      double processes_s = seconds_of([&] { by_processes = with_processes(w, items); });
      correct = correct && by_threads == expected && by_processes == expected;
      L.say("{:>7} {:>10.3f} {:>7.2f}x {:>12.3f} {:>7.2f}x", w, threads_s, serial_s / threads_s,
            processes_s, serial_s / processes_s);
      table.push_back({{"workers", w}, {"threads_s", threads_s}, {"processes_s", processes_s}});
    }
    L.say("every variant found {} primes: {}", expected, correct);
    L.say("no global interpreter lock: threads can scale as processes do, up to the idle cores");

    // Step 3: isolation. A forked child writes the global in its own copy of memory; a
    // thread writes the one the parent reads.
    L.step("isolation: who sees a write to a global variable?");
    mp::Process writer{fork, write_global, std::cref(L)};
    writer.start();
    writer.join();
    int after_child = g_value;
    L.say("parent: g_value at {} is {} after the child wrote 42", fmt::ptr(&g_value), after_child);
    std::thread([] { g_value = 42; }).join();
    int after_thread = g_value;
    L.say("parent: g_value is {} after a thread wrote 42", after_thread);

    // Step 4: a child that crashes ends alone. (A thread that crashed would take the whole
    // process down with it, parent and all its threads; we do not try that here.)
    L.step("crash containment: a child with a segmentation fault");
    mp::Process crasher{fork, crash};
    crasher.start();
    crasher.join();
    int crash_code = *crasher.exitcode();
    L.say("child {}; the parent (pid {}) carries on", mp::describe_exitcode(crash_code),
          mp::current_process().pid);

    L.fact("thread_start_us", thread_us);
    L.fact("process_start_us", process_us);
    L.fact("process_thread_start_ratio", process_us / thread_us);
    L.fact("primes", expected);
    L.fact("serial_s", serial_s);
    L.fact("scaling", table);
    L.fact("all_variants_correct", correct);
    L.fact("child_saw_own_write", *writer.exitcode() == 0);
    L.fact("global_after_child", after_child);
    L.fact("global_after_thread", after_thread);
    L.fact("crash_exitcode", crash_code);
    return correct && *writer.exitcode() == 0 && after_child == 0 && after_thread == 42 &&
           crash_code == -SIGSEGV;
  });
}
