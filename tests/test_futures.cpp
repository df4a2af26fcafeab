// Tests for mp/futures.hpp: ProcessPoolExecutor, Future, as_completed and wait on
// mp::Pool's engine. Tasks that must stay pending wait on an mp::Event handed to every
// worker by the initializer; every order asserted is an order by construction, and
// timeouts are hang guards only.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <mp/connection.hpp>  // its mp::wait overloads must not clash with futures'
#include <mp/futures.hpp>
#include <mp/sync.hpp>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "shm.hpp"

using namespace std::chrono_literals;

namespace {

// In a worker: the gate its initializer received.
std::optional<mp::Event> g_gate;
void init_gate(mp::Event gate) { g_gate.emplace(std::move(gate)); }

int square(int x) { return x * x; }
int gated(int x) {
  if (!g_gate->wait(60s)) throw std::runtime_error("gate never opened");  // a hang guard
  return x;
}
int sleeps_ms(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}
int fails(int x) { throw std::invalid_argument("bad item " + std::to_string(x)); }
int dies_at_7(int x) {
  if (x == 7) ::raise(SIGKILL);
  return x;
}
void nothing() {}

// No child of this process is left unreaped.
bool no_zombies() {
  siginfo_t info{};
  int r = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
  if ((r == -1 && errno == ECHILD) || (r == 0 && info.si_pid == 0)) return true;
  UNSCOPED_INFO("unreaped child " << info.si_pid);
  return false;
}

void wait_for(const std::function<bool()>& condition) {
  auto deadline = std::chrono::steady_clock::now() + 60s;  // a hang guard
  while (!condition()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(1ms);
  }
}

mp::ProcessPoolExecutor gated_executor(mp::Event& gate, std::size_t workers,
                                       std::string method = "fork") {
  return mp::ProcessPoolExecutor{{.max_workers = workers,
                                  .mp_context = mp::get_context(method),
                                  .initializer = {init_gate, gate}}};
}

}  // namespace

TEST_CASE("futures: submit and result under fork, spawn and forkserver", "[futures]") {
  testing::ShmGuard guard;
  auto run = [](const char* method) {
    mp::ProcessPoolExecutor ex{{.max_workers = 2, .mp_context = mp::get_context(method)}};
    auto f = ex.submit(square, 12);
    CHECK(f.result(60s) == 144);
    auto v = ex.submit(nothing);
    v.result(60s);
    CHECK(v.done());
    CHECK(ex.map(square, std::vector<int>{1, 2, 3, 4}) == std::vector<int>{1, 4, 9, 16});
  };
  SECTION("fork") { run("fork"); }
  SECTION("spawn") { run("spawn"); }
  SECTION("forkserver") { run("forkserver"); }
  CHECK(guard.leaked().empty());
}

TEST_CASE("futures: a future goes from pending to done; callbacks run once", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 1);
  auto f = ex.submit(gated, 5);
  CHECK_FALSE(f.done());
  CHECK_FALSE(f.running());  // documented: the engine does not say
  CHECK_FALSE(f.cancelled());
  CHECK_THROWS_AS(f.result(0.05s), mp::TimeoutError);
  CHECK_THROWS_AS(f.exception(0.05s), mp::TimeoutError);
  std::atomic<int> calls{0};
  std::atomic<bool> done_in_callback{false};
  f.add_done_callback([&](mp::Future<int>& g) {  // on the pool's thread: no Catch macros here
    done_in_callback = g.done();
    calls++;
  });
  CHECK(calls == 0);
  gate.set();
  CHECK(f.result(60s) == 5);
  CHECK(f.exception() == nullptr);
  CHECK(f.done());
  CHECK_FALSE(f.cancelled());
  // As in Python, waiters wake before the callbacks run (a callback may call result()).
  wait_for([&] { return calls.load() == 1; });
  CHECK(done_in_callback);
  CHECK_FALSE(f.cancel());  // done: too late
  CHECK_FALSE(f.cancelled());
  bool at_once = false;
  f.add_done_callback([&](mp::Future<int>&) { at_once = true; });
  CHECK(at_once);
  CHECK(calls == 1);
}

TEST_CASE("futures: cancel marks a pending future cancelled and discards its result", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 1);
  auto f = ex.submit(gated, 1);
  int calls = 0;
  f.add_done_callback([&](mp::Future<int>&) { calls++; });
  CHECK(f.cancel());
  CHECK(f.cancel());  // still cancelled
  CHECK(f.cancelled());
  CHECK(f.done());
  CHECK(calls == 1);
  CHECK_THROWS_AS(f.result(), mp::CancelledError);
  CHECK_THROWS_AS(f.exception(), mp::CancelledError);
  gate.set();
  auto g = ex.submit(square, 3);  // the pool goes on; the cancelled work ran and was dropped
  CHECK(g.result(60s) == 9);
  CHECK(f.cancelled());
  CHECK(calls == 1);
}

TEST_CASE("futures: a task's exception reaches result() and exception()", "[futures]") {
  mp::ProcessPoolExecutor ex{{.max_workers = 1}};
  auto f = ex.submit(fails, 7);
  try {
    f.result(60s);
    FAIL("result() did not throw");
  } catch (const mp::RemoteError& e) {
    CHECK(e.type_name().find("invalid_argument") != std::string::npos);
    CHECK(e.message() == "bad item 7");
  }
  auto e = f.exception();
  REQUIRE(e != nullptr);
  CHECK_THROWS_AS(std::rethrow_exception(e), mp::RemoteError);
  CHECK(f.done());
  CHECK_FALSE(f.cancel());
  CHECK_THROWS_AS(ex.map(fails, std::vector<int>{1, 2}), mp::RemoteError);
}

TEST_CASE("futures: map returns results in input order and times out", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 2);
  std::vector<int> items{30, 1, 20, 2, 10, 3};
  CHECK(ex.map(sleeps_ms, items) == items);
  CHECK_THROWS_AS(ex.map(gated, std::vector<int>{1, 2}, 0.1s), mp::TimeoutError);
  gate.set();
}

TEST_CASE("futures: as_completed yields every future, the last one to finish last", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 2);
  std::vector<mp::Future<int>> fs;
  auto others = std::make_shared<std::atomic<int>>(0);
  for (int ms : {40, 10, 30, 20}) {
    auto f = ex.submit(sleeps_ms, ms);
    // The gate opens in the callback of the last of the others: by construction, `last`
    // cannot finish before every other future is done.
    f.add_done_callback([others, &gate](mp::Future<int>&) {
      if (++*others == 4) gate.set();
    });
    fs.push_back(f);
  }
  // Submitted last: the engine may queue a task behind a busy worker's current one, so
  // nothing may wait behind the gated task.
  auto last = ex.submit(gated, 999);  // runs only once the gate opens
  fs.insert(fs.begin(), last);
  auto order = mp::as_completed(fs, 60s);
  REQUIRE(order.size() == fs.size());
  std::multiset<int> got, want{999, 40, 10, 30, 20};
  for (auto& f : order) got.insert(f.result());
  CHECK(got == want);
  CHECK(order.back().result() == 999);
}

TEST_CASE("futures: as_completed throws TimeoutError when a future is not done in time",
          "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 2);
  std::vector<mp::Future<int>> fs{ex.submit(square, 2), ex.submit(gated, 1)};
  CHECK_THROWS_AS(mp::as_completed(fs, 0.2s), mp::TimeoutError);
  gate.set();
  CHECK(mp::as_completed(fs, 60s).size() == 2);
}

TEST_CASE("futures: wait with FIRST_COMPLETED, FIRST_EXCEPTION and ALL_COMPLETED", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 2);
  SECTION("FIRST_COMPLETED") {
    auto quick = ex.submit(square, 4);
    auto slow = ex.submit(gated, 1);
    auto [done, not_done] = mp::wait<int>({quick, slow}, 60s, mp::FIRST_COMPLETED);
    REQUIRE(done.size() == 1);
    CHECK(done[0].result() == 16);
    REQUIRE(not_done.size() == 1);
    CHECK_FALSE(not_done[0].done());
  }
  SECTION("FIRST_EXCEPTION") {
    auto bad = ex.submit(fails, 3);
    auto slow = ex.submit(gated, 1);
    auto [done, not_done] = mp::wait<int>({slow, bad}, 60s, mp::FIRST_EXCEPTION);
    REQUIRE(done.size() == 1);
    CHECK(done[0].exception() != nullptr);
    REQUIRE(not_done.size() == 1);
    CHECK_FALSE(not_done[0].done());
  }
  SECTION("FIRST_EXCEPTION without one waits for all") {
    std::vector<mp::Future<int>> fs{ex.submit(square, 1), ex.submit(square, 2)};
    auto r = mp::wait(fs, 60s, mp::FIRST_EXCEPTION);
    CHECK(r.done.size() == 2);
    CHECK(r.not_done.empty());
  }
  SECTION("ALL_COMPLETED, and its timeout") {
    std::vector<mp::Future<int>> fs{ex.submit(square, 1), ex.submit(gated, 2)};
    auto early = mp::wait(fs, 0.2s, mp::ALL_COMPLETED);
    CHECK(early.not_done.size() == 1);
    gate.set();
    auto r = mp::wait(fs);
    CHECK(r.done.size() == 2);
    CHECK(r.not_done.empty());
  }
  gate.set();
}

TEST_CASE("futures: shutdown with cancel_futures cancels what is not done", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 1);
  auto running = ex.submit(gated, 0);
  std::vector<mp::Future<int>> pending;
  for (int i = 1; i <= 3; ++i) pending.push_back(ex.submit(square, i));
  ex.shutdown(/*wait=*/false, /*cancel_futures=*/true);
  for (auto& f : pending) CHECK(f.cancelled());
  CHECK(running.cancelled());  // documented: not-done futures all count as pending
  CHECK_THROWS_AS(ex.submit(square, 1), std::runtime_error);
  gate.set();
  ex.shutdown(true);
  for (auto& f : pending) CHECK_THROWS_AS(f.result(), mp::CancelledError);
}

TEST_CASE("futures: shutdown(wait) lets submitted work finish; submit then fails",
          "[futures]") {
  testing::ShmGuard guard;
  std::vector<mp::Future<int>> fs;
  {
    mp::ProcessPoolExecutor ex{{.max_workers = 2}};
    for (int i = 0; i < 10; ++i) fs.push_back(ex.submit(square, i));
  }  // the destructor is shutdown(wait=true)
  for (int i = 0; i < 10; ++i) CHECK(fs[i].result(0s) == i * i);
  CHECK(no_zombies());
  CHECK(guard.leaked().empty());
}

TEST_CASE("futures: a worker SIGKILLed in a task fails that future only", "[futures]") {
  mp::ProcessPoolExecutor ex{{.max_workers = 2}};
  std::vector<mp::Future<int>> fs;
  for (int i = 0; i < 12; ++i) fs.push_back(ex.submit(dies_at_7, i));
  for (int i = 0; i < 12; ++i) {
    if (i == 7) {
      try {
        fs[i].result(60s);
        FAIL("no WorkerLostError");
      } catch (const mp::WorkerLostError& e) {
        CHECK(e.signal() == SIGKILL);
      }
    } else {
      CHECK(fs[i].result(60s) == i);
    }
  }
  CHECK(ex.submit(square, 5).result(60s) == 25);  // the executor is not broken
}

TEST_CASE("futures: terminate_workers and kill_workers fail unfinished futures", "[futures]") {
  mp::Event gate;
  auto ex = gated_executor(gate, 2);
  auto a = ex.submit(gated, 1);
  auto b = ex.submit(gated, 2);
  SECTION("terminate_workers") { ex.terminate_workers(); }
  SECTION("kill_workers") { ex.kill_workers(); }
  CHECK(a.done());
  CHECK(b.done());
  CHECK_THROWS(a.result(0s));
  CHECK_THROWS(b.result(0s));
  CHECK_THROWS_AS(ex.submit(square, 1), std::runtime_error);
  CHECK(no_zombies());
}
