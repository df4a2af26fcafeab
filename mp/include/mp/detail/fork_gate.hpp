// mp/detail/fork_gate.hpp - fork() only while mp's own background threads are at a safe point.
//
// A fork copies one thread. Whatever lock another thread held at that moment stays held
// in the child for ever, and the lock a child is most likely to need is the allocator's.
// glibc's malloc takes its locks in a fork handler, so fork is safe against it; other
// allocators do not (GCC 12's AddressSanitizer allocator, some custom mallocs), and there a
// fork child can hang in its first `new`.
//
// mp cannot make every thread of a program safe, but it can make its own: a pool's service
// thread allocates all the time and would otherwise be the usual culprit. Such a thread
// runs its work inside busy spans (BusySpan, with checkpoint() between steps and idle()
// around its sleeps), and a fork waits, inside ForkGuard, until no span is open. The
// invariant: while a ForkGuard is held, no mp background thread is between two safe points.
//
// Lock order: ForkGuard first, then the process registry. A span never waits for a
// ForkGuard holder's locks (a span's thread that wants to fork leaves its span first), so a
// fork waits at most one step of each busy thread.
#pragma once

#include <thread>
#include <utility>

namespace mp::detail {

// Marks the calling thread busy (allocating, taking locks) until destroyed; waits first
// while a fork is in progress. Not nestable.
class BusySpan {
 public:
  BusySpan();
  struct Adopt {};
  explicit BusySpan(Adopt) noexcept;  // takes over the span start_busy_thread() opened
  ~BusySpan();
  BusySpan(const BusySpan&) = delete;
  BusySpan& operator=(const BusySpan&) = delete;

  // A safe point between two steps: lets a waiting fork proceed, then goes on.
  void checkpoint();

  // Leaves the span while the thread sleeps (poll, futex, user code) and re-enters it after
  // fn() returns. The re-entry waits while a fork is in progress, so it must not happen
  // with a lock held that a busy thread may take: release such locks inside fn().
  template <class F>
  decltype(auto) idle(F&& fn) {
    leave();
    struct Reenter {
      BusySpan* s;
      ~Reenter() { s->enter(); }
    } reenter{this};
    return fn();
  }

  static void open_for_new_thread();  // start_busy_thread(): a span for a thread to come
  static void close_unadopted();      // ... whose thread could not be created

 private:
  void enter();
  void leave();
};

// Held across a fork() (Process::start, the shared memory tracker): waits until no busy
// span is open and keeps new ones from opening. A thread inside a BusySpan may take one:
// its span is left for the fork and re-entered after. A thread that holds one already may
// take another (the inner one does nothing).
class ForkGuard {
 public:
  ForkGuard();
  ~ForkGuard();
  ForkGuard(const ForkGuard&) = delete;
  ForkGuard& operator=(const ForkGuard&) = delete;

 private:
  bool owner_ = false;      // this guard took the gate (not a nested one)
  bool left_span_ = false;  // the thread's busy span was left for the fork
};

// Starts a thread that runs fn(BusySpan&) inside a busy span opened before the thread is
// created: a thread's start-up (the C library's, a sanitizer's) allocates too.
template <class F>
std::thread start_busy_thread(F fn) {
  BusySpan::open_for_new_thread();
  try {
    return std::thread([fn = std::move(fn)]() mutable {
      BusySpan span{BusySpan::Adopt{}};
      fn(span);
    });
  } catch (...) {
    BusySpan::close_unadopted();
    throw;
  }
}

// In a fork child (its only thread is the one that held the ForkGuard): resets the gate,
// so that the child can start processes and run busy spans of its own.
void fork_gate_after_fork_in_child() noexcept;

}  // namespace mp::detail
