// mp/src/fork_gate.cpp - the fork gate (mp/detail/fork_gate.hpp).
//
// Two counters, in the manner of Dekker: a busy thread announces itself (busy += 1) and
// then looks for a fork; a forker announces itself (forking = 1) and then looks for busy
// threads. With sequentially consistent operations at least one of them sees the other,
// so a fork never runs while a span is open. Forkers are serialized by a mutex; both sides
// sleep on a futex word, never spin.
#include "mp/detail/fork_gate.hpp"

#include <atomic>
#include <cstdint>
#include <mutex>

#include "mp/detail/futex.hpp"

namespace mp::detail {
namespace {

std::mutex g_forker;                    // one fork at a time
std::atomic<std::uint32_t> g_busy{0};     // open busy spans
std::atomic<std::uint32_t> g_forking{0};  // 1 while a ForkGuard is held
thread_local bool t_in_span = false;
thread_local bool t_holds_guard = false;

// Opens a span (waiting while a fork is in progress) without marking the calling thread.
void count_in() {
  for (;;) {
    g_busy.fetch_add(1, std::memory_order_seq_cst);
    if (g_forking.load(std::memory_order_seq_cst) == 0) break;
    // A fork is waiting for the spans to close: back out and wait until it is done.
    if (g_busy.fetch_sub(1, std::memory_order_seq_cst) == 1) futex_wake(g_busy);
    while (g_forking.load(std::memory_order_seq_cst) != 0) futex_wait(g_forking, 1);
  }
}

void open_span() {
  count_in();
  t_in_span = true;
}

void count_out() {
  if (g_busy.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
      g_forking.load(std::memory_order_seq_cst) != 0) {
    futex_wake(g_busy);
  }
}

void close_span() {
  t_in_span = false;
  count_out();
}

}  // namespace

BusySpan::BusySpan() { open_span(); }
BusySpan::BusySpan(Adopt) noexcept { t_in_span = true; }
void BusySpan::open_for_new_thread() { count_in(); }
void BusySpan::close_unadopted() { count_out(); }
BusySpan::~BusySpan() { close_span(); }
void BusySpan::enter() { open_span(); }
void BusySpan::leave() { close_span(); }

void BusySpan::checkpoint() {
  if (g_forking.load(std::memory_order_relaxed) == 0) return;
  close_span();
  open_span();
}

ForkGuard::ForkGuard() {
  if (t_holds_guard) return;  // already held by this thread: nothing more to wait for
  if (t_in_span) {
    close_span();
    left_span_ = true;
  }
  g_forker.lock();
  t_holds_guard = true;
  g_forking.store(1, std::memory_order_seq_cst);
  for (std::uint32_t busy; (busy = g_busy.load(std::memory_order_seq_cst)) != 0;) {
    futex_wait(g_busy, busy);
  }
  owner_ = true;
}

ForkGuard::~ForkGuard() {
  if (owner_) {
    g_forking.store(0, std::memory_order_seq_cst);
    futex_wake(g_forking);
    t_holds_guard = false;
    g_forker.unlock();
  }
  if (left_span_) open_span();
}

void fork_gate_after_fork_in_child() noexcept {
  // The child's only thread is the copy of the forker: no span is open here, and the
  // forker's mutex is released by unlocking it (which ThreadSanitizer sees).
  g_busy.store(0, std::memory_order_relaxed);
  g_forking.store(0, std::memory_order_relaxed);
  if (t_holds_guard) {
    t_holds_guard = false;
    g_forker.unlock();
  }
}

}  // namespace mp::detail
