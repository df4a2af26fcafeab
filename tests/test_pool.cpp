// tests/test_pool.cpp - mp::Pool: results, callbacks, errors, crash safety, lifetime.
//
// Cases that depend on how workers are created run under each start method. Task functions
// are plain functions (spawn and forkserver workers are fresh copies of this program).
// Workers reach shared counters (a "board" in shared memory) through the pool's
// initializer, whose arguments may carry descriptors. Timeouts are hang guards only.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <mp/detail/child.hpp>
#include <mp/detail/region.hpp>
#include <mp/monitor.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "shm.hpp"

using namespace std::chrono_literals;

namespace {

std::string any_method() {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  return method;
}

// No child of this process is left unreaped. Otherwise says which one.
bool no_zombies() {
  siginfo_t info{};
  int r = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
  if ((r == -1 && errno == ECHILD) || (r == 0 && info.si_pid == 0)) return true;
  std::ifstream comm("/proc/" + std::to_string(info.si_pid) + "/comm");
  std::string name;
  std::getline(comm, name);
  UNSCOPED_INFO("unreaped child " << info.si_pid << " (" << name << ")");
  return false;
}

// Whether process `pid` is gone (or a zombie of some other parent).
bool process_gone(pid_t pid) {
  if (::kill(pid, 0) == -1 && errno == ESRCH) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

// What every test ends with: nothing left behind.
void expect_clean(const testing::ShmGuard& guard) {
  CHECK(no_zombies());
  CHECK(guard.leaked().empty());
}

// ---- a board of counters in shared memory, reachable from every worker --------------

constexpr std::size_t kBoardWords = 16384;
enum Word : std::size_t {
  kInits = 0,    // initializer calls
  kGate = 1,     // tasks that wait spin until this is non-zero
  kBlocked = 2,  // tasks currently waiting at the gate
  kStarted = 3,  // tasks started (counted())
  kPids = 16,    // kPids + k: the pid of the k-th initializer call (up to 1000)
  kRuns = 4096,  // kRuns + i: how many times task i started
};

struct Board {
  std::shared_ptr<mp::detail::Region> region;

  static Board create() {
    Board b;
    b.region = std::make_shared<mp::detail::Region>(
        mp::detail::Region::create(kBoardWords * sizeof(std::uint32_t), "test-pool-board"));
    return b;
  }
  std::atomic<std::uint32_t>& at(std::size_t i) const {
    return region->as<std::atomic<std::uint32_t>>()[i];
  }

  template <class Archive>
  void save(Archive& ar) const {
    ar(mp::detail::export_fd(region->fd()));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    ar(index);
    region = std::make_shared<mp::detail::Region>(
        mp::detail::Region::attach(mp::detail::import_fd(index)));
  }
};

// In a worker: the board its initializer received, and how often the initializer ran here.
Board g_board;
int g_inits_here = 0;
int g_tasks_here = 0;

void init_board(Board board) {
  g_board = std::move(board);
  ++g_inits_here;
  std::uint32_t k = g_board.at(kInits).fetch_add(1);
  if (k < 1000) g_board.at(kPids + k).store(static_cast<std::uint32_t>(::getpid()));
}

// ---- tasks ----------------------------------------------------------------------------

long square(int x) { return static_cast<long>(x) * x; }
int add3(int a, int b, int c) { return a * 100 + b * 10 + c; }
std::size_t length(const std::string& s) { return s.size(); }
std::string repeat(std::string s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}
double weighted(std::vector<double> v, double w) {
  return std::accumulate(v.begin(), v.end(), 0.0) * w;
}

int fails_on_multiples_of_7(int x) {
  if (x % 7 == 0) throw std::invalid_argument("bad value " + std::to_string(x));
  return x + 1;
}

struct Custom {};
int throws_custom(int) { throw Custom{}; }

void busy_for(std::chrono::microseconds d) {
  auto end = std::chrono::steady_clock::now() + d;
  while (std::chrono::steady_clock::now() < end) {
  }
}

// Counts its own start on the board, works ~50 µs, answers 2i + 1.
long counted(int i) {
  g_board.at(kRuns + static_cast<std::size_t>(i)).fetch_add(1);
  g_board.at(kStarted).fetch_add(1);
  busy_for(50us);
  return 2L * i + 1;
}

// Dies the way it is told at item 7; otherwise i * 3.
int crash_at_7(int i, int how) {
  if (i == 7) {
    switch (how) {
      case 0:
        ::raise(SIGKILL);
        break;
      case 1: {
        ::signal(SIGSEGV, SIG_DFL);  // not the sanitizer's handler: a plain segfault
        ::raise(SIGSEGV);
        break;
      }
      default:
        ::_exit(3);
    }
  }
  return i * 3;
}

// Waits at the board's gate (signals the pool counted as blocked), then answers i.
int gated(int i) {
  if (i != 0) {
    g_board.at(kBlocked).fetch_add(1);
    while (g_board.at(kGate).load() == 0) std::this_thread::sleep_for(1ms);
  }
  return i;
}

// Item 5 waits at the gate; the others answer at once.
int gated_at_5(int i) {
  if (i == 5) {
    g_board.at(kBlocked).fetch_add(1);
    while (g_board.at(kGate).load() == 0) std::this_thread::sleep_for(1ms);
  }
  return i;
}

// Blocks "for ever"; with ignore_term, SIGTERM does not end it either.
int stuck(int ignore_term) {
  if (ignore_term) ::signal(SIGTERM, SIG_IGN);
  g_board.at(kBlocked).fetch_add(1);
  for (;;) ::pause();
}

// The pid, how many tasks this worker ran (this one included) and its initializer calls.
std::tuple<pid_t, int, int> worker_facts(int) { return {::getpid(), ++g_tasks_here, g_inits_here}; }

void throwing_init() { throw std::runtime_error("no configuration"); }

std::string echo(std::string s) { return s; }

template <class T>
std::vector<T> iota_vector(int n) {
  std::vector<T> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), T{0});
  return v;
}

void wait_for(const std::function<bool()>& condition) {
  auto deadline = std::chrono::steady_clock::now() + 60s;  // a hang guard
  while (!condition()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(1ms);
  }
}

}  // namespace

TEST_CASE("pool: map, imap, imap_unordered and starmap equal a serial computation", "[pool]") {
  testing::ShmGuard guard;
  auto method = any_method();
  INFO("start method " << method);
  mp::Pool pool{2, {}, 0, mp::get_context(method)};
  const int n = 500;
  auto items = iota_vector<int>(n);
  std::vector<long> serial;
  for (int x : items) serial.push_back(square(x));

  for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{3}, std::size_t{64}}) {
    INFO("chunksize " << chunksize);
    CHECK(pool.map(square, items, chunksize) == serial);
    CHECK(pool.map_async(square, items, chunksize).get() == serial);

    std::vector<long> ordered;
    for (long r : pool.imap(square, items, chunksize)) ordered.push_back(r);
    CHECK(ordered == serial);

    std::vector<long> unordered;
    auto it = pool.imap_unordered(square, items, chunksize);
    CHECK(it.size() == items.size());
    while (auto r = it.next(60s)) unordered.push_back(*r);
    std::sort(unordered.begin(), unordered.end());
    CHECK(unordered == serial);

    std::vector<std::tuple<int, int, int>> triples;
    std::vector<int> serial3;
    for (int i = 0; i < n; ++i) {
      triples.emplace_back(i % 10, (i / 10) % 10, i % 7);
      serial3.push_back(add3(i % 10, (i / 10) % 10, i % 7));
    }
    CHECK(pool.starmap(add3, triples, chunksize) == serial3);
    CHECK(pool.starmap_async(add3, triples, chunksize).get() == serial3);
  }

  // Non-trivial argument and result types, pairs, a lambda without captures, a range view.
  std::vector<std::string> words{"", "a", "hello", std::string(3000, 'x')};
  CHECK(pool.map(length, words) == std::vector<std::size_t>{0, 1, 5, 3000});
  std::vector<std::pair<std::string, int>> reps{{"ab", 3}, {"x", 0}, {"-", 5}};
  CHECK(pool.starmap(repeat, reps) == std::vector<std::string>{"ababab", "", "-----"});
  CHECK(pool.apply(weighted, std::vector<double>{1.5, 2.5}, 2.0) == 8.0);
  auto cube = [](int x) { return x * x * x; };
  CHECK(pool.map(cube, std::views::iota(0, 5)) == std::vector<int>{0, 1, 8, 27, 64});
  CHECK(pool.map(square, std::vector<int>{}).empty());
  // Arguments and results larger than the rings between the processes.
  std::string big(1 << 20, 'q');
  big[12345] = 'z';
  CHECK(pool.apply(echo, big) == big);

  pool.close();
  pool.join();
  expect_clean(guard);
}

TEST_CASE("pool: default chunksize follows Python's rule", "[pool]") {
  // chunksize, extra = divmod(len, 4 * processes); if extra: chunksize += 1
  CHECK(mp::detail::default_chunksize(100, 2) == 13);
  CHECK(mp::detail::default_chunksize(96, 2) == 12);
  CHECK(mp::detail::default_chunksize(10000, 2) == 1250);
  CHECK(mp::detail::default_chunksize(3, 4) == 1);
  CHECK(mp::detail::default_chunksize(0, 4) == 1);
}

TEST_CASE("pool: callbacks are called exactly once, in this process, before ready()", "[pool]") {
  testing::ShmGuard guard;
  mp::Pool pool{2};
  const int n = 300;
  std::vector<std::atomic<int>> ok(n), bad(n);
  std::atomic<int> wrong_thread{0};
  std::thread::id main_thread = std::this_thread::get_id();
  pid_t me = ::getpid();
  std::vector<mp::AsyncResult<int>> results;
  for (int i = 0; i < n; ++i) {
    results.push_back(pool.apply_async(
        fails_on_multiples_of_7, std::tuple{i},
        [&, i](const int& r) {
          if (r == i + 1) ok[i].fetch_add(1);
          if (std::this_thread::get_id() == main_thread || ::getpid() != me) wrong_thread++;
        },
        [&, i](const std::exception& e) {
          if (dynamic_cast<const mp::RemoteError*>(&e)) bad[i].fetch_add(1);
        }));
  }
  // A map with a callback gets the whole list once.
  std::atomic<int> map_calls{0};
  std::size_t map_size = 0;
  auto m = pool.map_async(square, iota_vector<int>(50), 4, [&](const std::vector<long>& v) {
    map_size = v.size();
    map_calls++;
  });
  for (int i = 0; i < n; ++i) {
    results[i].wait();
    // ready() means the callback has already run.
    if (i % 7 == 0) {
      CHECK(bad[i].load() == 1);
      CHECK_FALSE(results[i].successful());
      CHECK_THROWS_AS(results[i].get(), mp::RemoteError);
    } else {
      CHECK(ok[i].load() == 1);
      CHECK(results[i].successful());
      CHECK(results[i].get() == i + 1);
    }
  }
  m.wait();
  CHECK(map_calls.load() == 1);
  CHECK(map_size == 50);
  // A callback that throws is reported on stderr; its result still becomes ready.
  std::atomic<int> thrown{0};
  auto t = pool.apply_async(square, std::tuple{6}, [&](const long&) {
    thrown++;
    throw std::runtime_error("callback trouble (expected in this test)");
  });
  CHECK(t.get(60s) == 36);
  CHECK(thrown.load() == 1);
  pool.close();
  pool.join();
  for (int i = 0; i < n; ++i) CHECK(ok[i].load() + bad[i].load() == 1);
  CHECK(wrong_thread.load() == 0);
  expect_clean(guard);
}

// A task that never returns, for results that only terminate() can answer.
int never_returns(int) {
  for (;;) ::pause();
}

TEST_CASE("pool: in an error callback, std::current_exception() is the task's error", "[pool]") {
  // What an event loop needs to rethrow the error, with its type, where it awaits the result.
  testing::ShmGuard guard;
  std::mutex m;
  std::vector<std::exception_ptr> seen;  // recorded on the callback thread, checked here
  auto record = [&](const std::exception&) {
    std::lock_guard lock(m);
    seen.push_back(std::current_exception());
  };
  {
    mp::Pool pool{2};
    pool.apply_async(fails_on_multiples_of_7, std::tuple{7}, {}, record).wait();
    pool.apply_async(crash_at_7, std::tuple{7, 0}, {}, record).wait();
    auto cancelled = pool.apply_async(never_returns, std::tuple{0}, {}, record);
    pool.terminate();
    cancelled.wait();
  }
  REQUIRE(seen.size() == 3);
  for (const auto& e : seen) REQUIRE(e != nullptr);
  CHECK_THROWS_AS(std::rethrow_exception(seen[0]), mp::RemoteError);
  CHECK_THROWS_AS(std::rethrow_exception(seen[1]), mp::WorkerLostError);
  CHECK_THROWS_AS(std::rethrow_exception(seen[2]), mp::CancelledError);
  try {
    std::rethrow_exception(seen[0]);
  } catch (const mp::RemoteError& e) {
    CHECK(e.message() == "bad value 7");
  }
  expect_clean(guard);
}

TEST_CASE("pool: a task's exception arrives as RemoteError and the pool goes on", "[pool]") {
  testing::ShmGuard guard;
  mp::Pool pool{2};
  auto pids = pool.worker_pids();
  try {
    pool.apply(fails_on_multiples_of_7, 14);
    FAIL("no exception");
  } catch (const mp::RemoteError& e) {
    CHECK(e.type_name() == "std::invalid_argument");
    CHECK(e.message() == "bad value 14");
    CHECK(e.pid() != ::getpid());
    CHECK(std::find(pids.begin(), pids.end(), e.pid()) != pids.end());
    CHECK(std::string(e.what()).find("bad value 14") != std::string::npos);
  }
  try {
    pool.apply(throws_custom, 1);
    FAIL("no exception");
  } catch (const mp::RemoteError& e) {
    CHECK(e.type_name().find("Custom") != std::string::npos);
  }
  // map reports the error of the lowest failing item; imap reports each at its place.
  std::vector<int> items{1, 2, 21, 3, 14, 5};
  try {
    pool.map(fails_on_multiples_of_7, items, 1);
    FAIL("no exception");
  } catch (const mp::RemoteError& e) {
    CHECK(e.message() == "bad value 21");
  }
  auto it = pool.imap(fails_on_multiples_of_7, items);
  std::vector<std::string> seen;
  for (std::size_t k = 0; k < items.size(); ++k) {
    try {
      seen.push_back(std::to_string(*it.next()));
    } catch (const mp::RemoteError& e) {
      seen.push_back(e.message());
    }
  }
  CHECK_FALSE(it.next().has_value());
  CHECK(seen == std::vector<std::string>{"2", "3", "bad value 21", "4", "bad value 14", "6"});
  // The same workers are still there and still work.
  CHECK(pool.worker_pids() == pids);
  CHECK(pool.apply(square, 9) == 81);
  expect_clean(guard);
}

TEST_CASE("pool: a worker that dies mid-task fails exactly that task, and is replaced", "[pool]") {
  testing::ShmGuard guard;
  auto method = any_method();
  auto how = GENERATE(0, 1, 2);  // SIGKILL, segfault, _exit(3)
  INFO("start method " << method << ", death " << how);
  mp::Pool pool{2, {}, 0, mp::get_context(method)};
  auto items = iota_vector<int>(20);

  auto check_lost = [&](const mp::WorkerLostError& e) {
    CHECK(e.pid() > 0);
    if (how == 0) CHECK(e.signal() == SIGKILL);
    if (how == 1) CHECK(e.signal() == SIGSEGV);
    if (how == 2) {
      CHECK(e.signal() == 0);
      CHECK(e.exit_status() == 3);
    }
    CHECK(std::string(e.what()).find("task 7 of") != std::string::npos);
  };
  // map raises instead of hanging.
  std::vector<std::tuple<int, int>> args;
  for (int i : items) args.emplace_back(i, how);
  try {
    pool.starmap(crash_at_7, args, 1);
    FAIL("no exception");
  } catch (const mp::WorkerLostError& e) {
    check_lost(e);
  }
  // With imap, every other item arrives.
  auto it = pool.imap(
      [](std::tuple<int, int> a) { return crash_at_7(std::get<0>(a), std::get<1>(a)); }, args);
  int good = 0, lost = 0;
  for (int i = 0; i < 20; ++i) {
    try {
      auto r = it.next(60s);
      REQUIRE(r.has_value());
      CHECK(*r == i * 3);
      ++good;
    } catch (const mp::WorkerLostError& e) {
      CHECK(i == 7);
      check_lost(e);
      ++lost;
    }
  }
  CHECK(good == 19);
  CHECK(lost == 1);
  CHECK(pool.apply(square, 12) == 144);
  CHECK(pool.workers_started() >= 4);  // two replacements
  pool.close();
  pool.join();
  expect_clean(guard);
}

TEST_CASE(
    "pool: workers SIGKILLed at random moments during 10,000 tasks: every task is "
    "answered once, none runs twice",
    "[pool]") {
  testing::ShmGuard guard;
  auto method = any_method();
  INFO("start method " << method);
  Board board = Board::create();
  mp::Pool pool{2, {init_board, board}, 0, mp::get_context(method)};
  const int n = 10'000;
  auto it = pool.imap(counted, iota_vector<int>(n));

  // The killer: a random worker, at a random moment, a few dozen times; each time after
  // the workers got going again, so that most kills land in the middle of a task.
  std::atomic<bool> done{false};
  std::atomic<int> kills{0};
  std::thread killer([&] {
    std::mt19937 rng(12345);
    while (!done.load() && kills.load() < 25) {
      std::uint32_t before = board.at(kStarted).load();
      std::this_thread::sleep_for(std::chrono::microseconds(1000 + rng() % 8000));
      while (!done.load() && board.at(kStarted).load() < before + 20)
        std::this_thread::sleep_for(200us);
      auto pids = pool.worker_pids();
      if (pids.empty()) continue;
      if (::kill(pids[rng() % pids.size()], SIGKILL) == 0) kills++;
    }
  });

  int completed = 0;
  std::vector<int> lost;
  for (int i = 0; i < n; ++i) {
    try {
      auto r = it.next(120s);  // a hang guard: throws TimeoutError
      REQUIRE(r.has_value());
      CHECK(*r == 2L * i + 1);
      CHECK(board.at(kRuns + i).load() == 1);  // ran exactly once
      ++completed;
    } catch (const mp::WorkerLostError& e) {
      CHECK(e.signal() == SIGKILL);
      CHECK(std::string(e.what()).find(fmt::format("task {} of imap", i)) != std::string::npos);
      CHECK(board.at(kRuns + i).load() <= 1);  // never re-run
      lost.push_back(i);
    }
  }
  done = true;
  killer.join();
  CHECK_FALSE(it.next().has_value());
  INFO("kills " << kills.load() << ", lost " << lost.size());
  CHECK(completed + static_cast<int>(lost.size()) == n);
  CHECK(static_cast<int>(lost.size()) <= kills.load());  // at most the running task per kill
  // The pool is whole again.
  CHECK(pool.map(square, iota_vector<int>(100)).size() == 100);
  pool.close();
  pool.join();
  expect_clean(guard);
}

TEST_CASE("pool: maxtasksperchild = 1 over 1,000 tasks: a fresh worker for each", "[pool]") {
  testing::ShmGuard guard;
  // A thousand workers: forked from the small forkserver, each costs a fraction of a fork
  // of this (large, sanitized) test process. The bookkeeping is the same for every method.
  mp::Pool pool{2, {}, 1, mp::get_context("forkserver")};
  auto facts = pool.map(worker_facts, iota_vector<int>(1000), 1);
  REQUIRE(facts.size() == 1000);
  int fresh = 0;
  for (auto& [pid, tasks, inits] : facts) fresh += tasks == 1;
  CHECK(fresh == 1000);
  CHECK(pool.workers_started() >= 1000);
  pool.close();
  pool.join();
  expect_clean(guard);
}

TEST_CASE("pool: the initializer runs once in every worker, replacements included", "[pool]") {
  testing::ShmGuard guard;
  auto method = any_method();
  INFO("start method " << method);
  Board board = Board::create();
  // maxtasksperchild 5 with 60 tasks of one item: at least 12 workers in turn.
  mp::Pool pool{2, {init_board, board}, 5, mp::get_context(method)};
  auto facts = pool.map(worker_facts, iota_vector<int>(60), 1);
  pool.close();
  pool.join();
  std::uint32_t inits = board.at(kInits).load();
  std::multiset<pid_t> init_pids;
  for (std::uint32_t k = 0; k < inits; ++k)
    init_pids.insert(static_cast<pid_t>(board.at(kPids + k).load()));
  std::set<pid_t> task_pids;
  for (auto& [pid, tasks, inits_here] : facts) {
    CHECK(inits_here == 1);
    CHECK(tasks <= 5);
    task_pids.insert(pid);
  }
  CHECK(task_pids.size() >= 12);
  for (pid_t p : task_pids) CHECK(init_pids.count(p) == 1);
  CHECK(std::set<pid_t>(init_pids.begin(), init_pids.end()).size() == init_pids.size());
  CHECK(inits == pool.workers_started());
  expect_clean(guard);
}

TEST_CASE("pool: an initializer that throws breaks the pool with a clear error", "[pool]") {
  testing::ShmGuard guard;
  mp::Pool pool{2, {throwing_init}};
  try {
    pool.apply(square, 3);
    FAIL("no exception");
  } catch (const mp::RemoteError& e) {
    CHECK(e.type_name() == "std::runtime_error");
    CHECK(std::string(e.what()).find("initializer") != std::string::npos);
    CHECK(std::string(e.what()).find("no configuration") != std::string::npos);
  }
  CHECK_THROWS_AS(pool.map(square, iota_vector<int>(10)), mp::RemoteError);
  pool.close();
  pool.join();
  expect_clean(guard);
}

TEST_CASE("pool: AsyncResult get(timeout), wait(timeout), ready, successful", "[pool]") {
  testing::ShmGuard guard;
  Board board = Board::create();
  mp::Pool pool{2, {init_board, board}};
  auto r = pool.apply_async(gated, 5);
  wait_for([&] { return board.at(kBlocked).load() == 1; });
  CHECK_THROWS_AS(r.get(10ms), mp::TimeoutError);
  CHECK_FALSE(r.wait(10ms));
  CHECK_FALSE(r.ready());
  CHECK_THROWS_AS(r.successful(), mp::ProcessError);
  board.at(kGate).store(1);
  CHECK(r.get(60s) == 5);
  CHECK(r.ready());
  CHECK(r.successful());
  CHECK(r.get() == 5);  // again
  mp::AsyncResult<int> empty;
  CHECK_THROWS_AS(empty.get(), mp::ProcessError);
  expect_clean(guard);
}

TEST_CASE("pool: imap hands out results as they arrive, before the rest are done", "[pool]") {
  testing::ShmGuard guard;
  Board board = Board::create();
  mp::Pool pool{2, {init_board, board}};
  auto it = pool.imap(gated, iota_vector<int>(4));
  // Item 0 arrives while items 1..3 wait at the gate, which opens only afterwards.
  CHECK(it.next(60s) == 0);
  CHECK_THROWS_AS(it.next(10ms), mp::TimeoutError);
  board.at(kGate).store(1);
  CHECK(it.next(60s) == 1);
  CHECK(it.next(60s) == 2);
  CHECK(it.next(60s) == 3);
  CHECK_FALSE(it.next().has_value());
  expect_clean(guard);
}

TEST_CASE("pool: results reach the caller even while the worker's next task runs for ever",
          "[pool]") {
  testing::ShmGuard guard;
  Board board = Board::create();
  mp::Pool pool{1, {init_board, board}};
  pool.map(square, iota_vector<int>(2000), 1);  // tiny tasks: the worker gets a deep inbox
  // Items 0-4 are done before item 5 blocks, with many items queued behind it; the gate
  // opens only once 0-4 have been handed out here.
  auto it = pool.imap(gated_at_5, iota_vector<int>(200));
  for (int i = 0; i < 5; ++i) CHECK(it.next(60s) == i);
  board.at(kGate).store(1);
  for (int i = 5; i < 200; ++i) CHECK(it.next(60s) == i);
  expect_clean(guard);
}

TEST_CASE("pool: terminate during work never hangs and cancels what is unfinished", "[pool]") {
  testing::ShmGuard guard;
  auto method = any_method();
  INFO("start method " << method);
  Board board = Board::create();
  mp::Pool pool{2, {init_board, board}, 0, mp::get_context(method)};
  // Both workers blocked for ever, one of them deaf to SIGTERM; more work queued behind.
  auto a = pool.apply_async(stuck, 0);
  auto b = pool.apply_async(stuck, 1);
  std::vector<mp::AsyncResult<long>> queued;
  for (int i = 0; i < 10; ++i) queued.push_back(pool.apply_async(square, i));
  wait_for([&] { return board.at(kBlocked).load() == 2; });
  // A map waiting in another thread is released too.
  std::atomic<int> map_outcome{0};
  std::thread mapper([&] {
    try {
      pool.map(square, iota_vector<int>(100));
      map_outcome = 1;
    } catch (const mp::CancelledError&) {
      map_outcome = 2;
    } catch (const mp::ProcessError&) {
      map_outcome = 3;  // it came after terminate(): refused
    }
  });
  auto pids = pool.worker_pids();
  pool.terminate();
  mapper.join();
  CHECK_THROWS_AS(a.get(), mp::CancelledError);
  CHECK_THROWS_AS(b.get(), mp::CancelledError);
  for (auto& q : queued) {
    // Each finished before terminate() or was cancelled: never left waiting.
    CHECK(q.ready());
  }
  CHECK(map_outcome.load() != 0);
  CHECK(pool.worker_pids().empty());
  for (pid_t p : pids) CHECK(process_gone(p));
  CHECK_THROWS_AS(pool.apply_async(square, 1), mp::ProcessError);
  pool.join();  // after terminate: returns at once
  expect_clean(guard);
}

TEST_CASE("pool: close, join and the destructor", "[pool]") {
  testing::ShmGuard guard;
  std::vector<pid_t> pids;
  {
    mp::Pool pool{2};
    CHECK_THROWS_AS(pool.join(), mp::ProcessError);  // still running
    auto r = pool.map_async(square, iota_vector<int>(200), 7);
    pool.close();
    CHECK_THROWS_AS(pool.apply(square, 1), mp::ProcessError);
    pool.join();  // waits for the submitted work
    CHECK(r.ready());
    CHECK(r.get().size() == 200);
    CHECK(pool.worker_pids().empty());

    mp::Pool other{2};
    pids = other.worker_pids();
    CHECK(pids.size() == 2);
    auto pending = other.apply_async(square, 3);
    pending.wait();
  }  // other's destructor terminates it
  for (pid_t p : pids) CHECK(process_gone(p));
  CHECK(mp::active_children().empty());
  expect_clean(guard);
}

TEST_CASE("pool: bad arguments are clear errors", "[pool]") {
  CHECK_THROWS_AS(mp::Pool(-1), std::invalid_argument);
  CHECK_THROWS_AS(mp::Pool(2, {}, -3), std::invalid_argument);
  mp::Pool pool{1};
  CHECK(pool.processes() == 1);
  mp::Pool moved = std::move(pool);
  CHECK(moved.apply(square, 4) == 16);
  CHECK_THROWS_AS(pool.apply(square, 4), mp::ProcessError);  // NOLINT: use after move on purpose
  mp::Pool dflt;
  CHECK(dflt.processes() == mp::cpu_count());
}

namespace {
// In a child process: a pool whose worker pids go on the board; then wait to be killed.
int pool_owner(Board board, std::string method) {
  mp::Pool pool{2, {}, 0, mp::get_context(method)};
  auto pids = pool.worker_pids();
  for (std::size_t k = 0; k < pids.size(); ++k) {
    board.at(kPids + k).store(static_cast<std::uint32_t>(pids[k]));
  }
  board.at(kPids + 2).store(static_cast<std::uint32_t>(mp::detail::forkserver_pid()));
  board.at(kInits).store(static_cast<std::uint32_t>(pids.size()));
  for (;;) ::pause();
}
}  // namespace

TEST_CASE("pool: a spawn worker killed during its start handshake is replaced, not fatal",
          "[pool]") {
  // A thread SIGKILLs the first child of this process it sees: a spawn worker still in its
  // start handshake (exec and set-up take milliseconds), or at worst one just started.
  // Either way the constructor must not throw, and the pool must work.
  testing::ShmGuard guard;
  std::atomic<bool> stop{false};
  std::atomic<pid_t> killed{0};
  const std::vector<pid_t> before = mp::children(::getpid());  // a forkserver, say: not ours
  std::thread killer([&] {
    while (!stop.load() && killed.load() == 0) {
      for (pid_t p : mp::children(::getpid())) {
        if (std::find(before.begin(), before.end(), p) != before.end()) continue;
        if (::kill(p, SIGKILL) == 0) {
          killed = p;
          break;
        }
      }
    }
  });
  std::optional<mp::Pool> pool;
  try {
    pool.emplace(2, mp::Initializer{}, 0, mp::get_context("spawn"));
  } catch (const std::exception& e) {
    stop = true;
    killer.join();
    FAIL("the constructor threw: " << e.what());
  }
  stop = true;
  killer.join();
  CHECK(killed.load() > 0);
  CHECK(pool->map(square, iota_vector<int>(50)) == [] {
    std::vector<long> v;
    for (int i = 0; i < 50; ++i) v.push_back(i * i);
    return v;
  }());
  pool->close();
  pool->join();
  pool.reset();
  expect_clean(guard);
}

TEST_CASE("pool: when the pool's process dies, its workers die too", "[pool]") {
  testing::ShmGuard guard;
  auto method = any_method();
  INFO("start method " << method);
  Board board = Board::create();
  // The orphans (the workers, and the owner's forkserver) come to this process instead of
  // init, so that the test can reap them and leave no zombie anywhere.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  mp::Process owner{mp::get_context("fork"), pool_owner, board, method};
  owner.start();
  wait_for([&] { return board.at(kInits).load() == 2; });
  std::vector<pid_t> pids{static_cast<pid_t>(board.at(kPids).load()),
                          static_cast<pid_t>(board.at(kPids + 1).load())};
  auto server = static_cast<pid_t>(board.at(kPids + 2).load());
  for (pid_t p : pids) CHECK_FALSE(process_gone(p));
  owner.kill();
  owner.join();
  // Each one must end, come to us (a zombie of the dying server is not ours yet) and be
  // reaped: only then is it gone for good.
  auto reaped = [](pid_t p) {
    if (p <= 0) return true;
    ::waitpid(p, nullptr, WNOHANG);
    return ::kill(p, 0) == -1 && errno == ESRCH;
  };
  wait_for([&] { return reaped(pids[0]) & reaped(pids[1]) & reaped(server); });
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 0) == 0);
  expect_clean(guard);
}

TEST_CASE("pool: many threads submit at once", "[pool]") {
  testing::ShmGuard guard;
  mp::Pool pool{2};
  std::vector<std::thread> threads;
  std::atomic<int> right{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<mp::AsyncResult<long>> rs;
      for (int i = 0; i < 500; ++i) rs.push_back(pool.apply_async(square, t * 1000 + i));
      for (int i = 0; i < 500; ++i) right += rs[i].get() == square(t * 1000 + i);
    });
  }
  for (auto& th : threads) th.join();
  CHECK(right.load() == 2000);
  expect_clean(guard);
}
