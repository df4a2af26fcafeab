// tests/test_shared_memory.cpp - SharedMemory (names, RAII, attach from children, the
// tracker that cleans up after a SIGKILL) and Value/Array/RawValue/RawArray.
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <mp/detail/pidfd.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <numeric>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

// Like testing::ShmGuard, but it only looks at this test's own segments: it sets
// MP_SHM_TAG, so every name mp generates here or in any child is "/mp-t<pid>-...", and
// unique_name() gives "/mp-test-<pid>-<n>". ctest runs tests in parallel, and one test must
// neither report nor remove another's segments.
class OwnShm {
 public:
  OwnShm() : tag_(fmt::format("t{}", ::getpid())) { ::setenv("MP_SHM_TAG", tag_.c_str(), 1); }
  ~OwnShm() {
    for (const auto& n : leaked()) ::shm_unlink(("/" + n).c_str());
    ::unsetenv("MP_SHM_TAG");
  }
  OwnShm(const OwnShm&) = delete;
  OwnShm& operator=(const OwnShm&) = delete;

  std::string unique_name() { return fmt::format("/mp-test-{}-{}", ::getpid(), ++counter_); }
  std::vector<std::string> leaked() const {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
      std::string n = e.path().filename().string();
      if (n.rfind(fmt::format("mp-{}-", tag_), 0) == 0 ||
          n.rfind(fmt::format("mp-test-{}-", ::getpid()), 0) == 0) {
        out.push_back(n);
      }
    }
    return out;
  }

 private:
  std::string tag_;
  int counter_ = 0;
};

bool name_exists(const std::string& name) {
  return ::access(("/dev/shm" + name).c_str(), F_OK) == 0;
}

// Waits until `name` has left /dev/shm. The limit is a hang guard, not a speed check.
bool gone_within(const std::string& name, std::chrono::seconds guard = 30s) {
  auto deadline = std::chrono::steady_clock::now() + guard;
  while (name_exists(name)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// Waits until nothing the guard watches is left (a tracker cleans up just after its creator
// has gone). The limit is a hang guard.
bool none_left_within(const OwnShm& guard, std::chrono::seconds limit = 30s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!guard.leaked().empty()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// True when this process has no children at all: none running, no zombie.
bool no_children() {
  siginfo_t info{};
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) == -1 && errno == ECHILD;
}

int wait_status(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) == -1) {
    if (errno != EINTR) return -1000;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

// Reads exactly n bytes; false on EOF or error.
bool read_all(int fd, void* p, std::size_t n) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::read(fd, c, n);
    if (r == -1 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

bool write_all(int fd, const void* p, std::size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t r = ::write(fd, c, n);
    if (r == -1 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

bool send_name(int fd, const std::string& name) {
  std::uint32_t n = static_cast<std::uint32_t>(name.size());
  return write_all(fd, &n, sizeof n) && write_all(fd, name.data(), n);
}

std::string recv_name(int fd) {
  std::uint32_t n = 0;
  if (!read_all(fd, &n, sizeof n) || n > 4096) return {};
  std::string s(n, '\0');
  if (!read_all(fd, s.data(), n)) return {};
  return s;
}

// A child target: attaches by name and writes i * 3 into the first `count` ints.
int fill_by_name(std::string name, int count) {
  auto seg = mp::SharedMemory::attach(name);
  auto ints = seg.as<std::int32_t>();
  if (ints.size() < static_cast<std::size_t>(count)) return 2;
  for (int i = 0; i < count; ++i) ints[i] = i * 3;
  return 0;
}

}  // namespace

TEST_CASE("shared_memory: create gives a zero-filled /mp- segment of the size asked",
          "[shared_memory]") {
  OwnShm guard;
  {
    auto shm = mp::SharedMemory::create(10'000);
    CHECK(shm.name().rfind("/mp-", 0) == 0);
    CHECK(shm.size() == 10'000);
    CHECK(shm.buf().size() == 10'000);
    CHECK(shm.is_open());
    CHECK(shm.owns_name());
    CHECK(name_exists(shm.name()));
    bool zero = true;
    for (std::byte b : shm.buf()) zero = zero && b == std::byte{0};
    CHECK(zero);
    CHECK(shm.as<std::uint64_t>().size() == 10'000 / 8);
  }
  CHECK(guard.leaked().empty());
  CHECK(no_children());  // the tracker is never our child
}

TEST_CASE("shared_memory: generated names are unique", "[shared_memory]") {
  OwnShm guard;
  auto a = mp::SharedMemory::create(1);
  auto b = mp::SharedMemory::create(1);
  CHECK(a.name() != b.name());
}

TEST_CASE("shared_memory: MP_SHM_TAG goes into generated names, checked", "[shared_memory]") {
  OwnShm guard;  // sets MP_SHM_TAG=t<pid>
  auto a = mp::SharedMemory::create(1);
  CHECK(a.name().rfind(fmt::format("/mp-t{}-{}-", ::getpid(), ::getpid()), 0) == 0);
  CHECK(guard.leaked().size() == 1);
  ::setenv("MP_SHM_TAG", "bad/tag", 1);
  try {
    mp::SharedMemory::create(1);
    FAIL("a bad tag was accepted");
  } catch (const std::invalid_argument& e) {
    CHECK_THAT(e.what(), Catch::Contains("MP_SHM_TAG"));
  }
}

TEST_CASE("shared_memory: attach by name sees the same bytes, both ways", "[shared_memory]") {
  OwnShm guard;
  auto name = guard.unique_name();
  auto shm = mp::SharedMemory::create(4096, name);
  CHECK(shm.name() == name);
  auto other = mp::SharedMemory::attach(name);
  CHECK(other.size() == 4096);
  CHECK_FALSE(other.owns_name());
  std::memcpy(shm.data(), "hello", 5);
  CHECK(std::memcmp(other.data(), "hello", 5) == 0);
  other.as<char>()[100] = 'x';
  CHECK(shm.as<char>()[100] == 'x');
  // An attached object never unlinks: destroying it leaves the name to its creator.
  other = mp::SharedMemory{};
  CHECK(name_exists(name));
}

TEST_CASE("shared_memory: a child attaches by name and writes what the parent reads",
          "[shared_memory]") {
  OwnShm guard;
  auto shm = mp::SharedMemory::create(1000 * sizeof(std::int32_t));
  mp::Process p{fill_by_name, shm.name(), 1000};
  p.start();
  p.join();
  REQUIRE(p.exitcode() == 0);
  auto ints = shm.as<std::int32_t>();
  long long sum = 0;
  for (auto v : ints) sum += v;
  CHECK(sum == 3LL * 999 * 1000 / 2);
  CHECK(ints[999] == 2997);
}

TEST_CASE("shared_memory: names are checked", "[shared_memory]") {
  OwnShm guard;
  CHECK_THROWS_AS(mp::SharedMemory::create(16, "/other-name"), std::invalid_argument);
  CHECK_THROWS_AS(mp::SharedMemory::create(16, "plain"), std::invalid_argument);
  CHECK_THROWS_AS(mp::SharedMemory::create(16, "/mp-a/b"), std::invalid_argument);
  CHECK_THROWS_AS(mp::SharedMemory::create(16, "/mp-" + std::string(300, 'x')),
                  std::invalid_argument);
  CHECK_THROWS_AS(mp::SharedMemory::create(0), std::invalid_argument);
  CHECK_THROWS_AS(mp::SharedMemory::attach(""), std::invalid_argument);
  try {
    mp::SharedMemory::create(16, "/x");
    FAIL("a name without /mp- was accepted");
  } catch (const std::invalid_argument& e) {
    CHECK_THAT(e.what(), Catch::Contains("/mp-"));
  }
  // "mp-..." gets its slash.
  std::string name = guard.unique_name();
  auto shm = mp::SharedMemory::create(16, name.substr(1));
  CHECK(shm.name() == name);
  CHECK(guard.leaked().size() == 1);
}

TEST_CASE("shared_memory: attaching a missing name and creating an existing one fail clearly",
          "[shared_memory]") {
  OwnShm guard;
  auto name = guard.unique_name();
  try {
    mp::SharedMemory::attach(name);
    FAIL("attached a segment that does not exist");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == ENOENT);
    CHECK_THAT(e.what(), Catch::Contains("cannot attach shared memory '" + name + "'"));
  }
  auto first = mp::SharedMemory::create(64, name);
  first.as<char>()[0] = 'A';
  try {
    mp::SharedMemory::create(64, name);
    FAIL("created a name twice");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == EEXIST);
  }
  // The failed attempt did not touch the segment that was there.
  auto again = mp::SharedMemory::attach(name);
  CHECK(again.as<char>()[0] == 'A');
}

TEST_CASE("shared_memory: the creator's object unlinks at scope end, also on an exception",
          "[shared_memory]") {
  OwnShm guard;
  std::string name;
  {
    auto shm = mp::SharedMemory::create(128);
    name = shm.name();
    CHECK(name_exists(name));
  }
  CHECK_FALSE(name_exists(name));
  try {
    auto shm = mp::SharedMemory::create(128);
    name = shm.name();
    throw std::runtime_error("failure while the segment is in use");
  } catch (const std::runtime_error&) {
  }
  CHECK_FALSE(name_exists(name));
  CHECK_THROWS_AS(mp::SharedMemory::attach(name), std::system_error);
  CHECK(guard.leaked().empty());
}

TEST_CASE("shared_memory: moves transfer ownership, close and unlink are explicit too",
          "[shared_memory]") {
  OwnShm guard;
  auto a = mp::SharedMemory::create(256);
  std::string name = a.name();
  mp::SharedMemory b = std::move(a);
  CHECK_FALSE(a.is_open());
  CHECK(a.name().empty());
  CHECK(b.owns_name());
  { mp::SharedMemory dropped = std::move(b); }
  CHECK_FALSE(name_exists(name));

  auto c = mp::SharedMemory::create(256);
  name = c.name();
  c.close();
  CHECK_FALSE(c.is_open());
  CHECK(c.size() == 0);
  CHECK(name_exists(name));  // close unmaps; the name stays until unlink
  c.close();                 // idempotent
  c.unlink();
  CHECK_FALSE(name_exists(name));
  CHECK_FALSE(c.owns_name());
  CHECK_NOTHROW(c.unlink());  // already gone: not an error
  CHECK(guard.leaked().empty());
}

TEST_CASE("shared_memory: track = false leaves the name to the caller", "[shared_memory]") {
  OwnShm guard;
  std::string name;
  {
    auto shm = mp::SharedMemory::create(64, {}, false);
    name = shm.name();
    CHECK_FALSE(shm.owns_name());
  }
  CHECK(name_exists(name));
  mp::SharedMemory::attach(name).unlink();
  CHECK_FALSE(name_exists(name));
}

TEST_CASE("shared_memory: a fork child's copy of the creator's object never unlinks",
          "[shared_memory]") {
  OwnShm guard;
  auto shm = mp::SharedMemory::create(64);
  pid_t pid = ::fork();
  REQUIRE(pid != -1);
  if (pid == 0) {
    int code = 0;
    {
      mp::SharedMemory copy = std::move(shm);  // destroyed here, in the child
      if (copy.owns_name()) code = 3;
    }
    ::_exit(code);
  }
  CHECK(wait_status(pid) == 0);
  CHECK(name_exists(shm.name()));
  CHECK(shm.owns_name());
}

TEST_CASE("shared_memory: names are cleaned up when the creator ends without destructors",
          "[shared_memory]") {
  OwnShm guard;
  // How the creator ends: abort (an uncaught exception ends the same way), std::exit with
  // the object leaked on the heap, _exit, and SIGKILL.
  auto how = GENERATE(as<std::string>{}, "abort", "uncaught", "exit", "_exit", "sigkill");
  INFO("creator ends by " << how);
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid != -1);
  if (pid == 0) {
    ::close(fds[0]);
    auto* a = new mp::SharedMemory(mp::SharedMemory::create(4096));
    auto* b = new mp::SharedMemory(mp::SharedMemory::create(4096));
    send_name(fds[1], a->name());
    send_name(fds[1], b->name());
    if (how == "abort") std::abort();
    if (how == "uncaught") {
      std::set_terminate([] { std::_Exit(134); });  // no core dump; no destructors either
      // An exception that escapes a thread's function ends the program in std::terminate.
      std::thread([] { throw std::runtime_error("nobody catches this"); }).join();
    }
    if (how == "exit") std::exit(0);
    if (how == "_exit") ::_exit(0);
    ::pause();  // sigkill: wait for it
    ::_exit(9);
  }
  ::close(fds[1]);
  std::string a = recv_name(fds[0]);
  std::string b = recv_name(fds[0]);
  ::close(fds[0]);
  REQUIRE_FALSE(a.empty());
  REQUIRE_FALSE(b.empty());
  if (how == "sigkill") ::kill(pid, SIGKILL);
  wait_status(pid);
  CHECK(gone_within(a));
  CHECK(gone_within(b));
  CHECK(guard.leaked().empty());
  CHECK(no_children());
}

// The scenario of the design: a supervisor process S (a child subreaper, so that orphans
// come back to it) runs a creator C; C creates a segment and forks a worker W that attaches
// by name; S SIGKILLs C. Then the name must leave /dev/shm while W still runs, W must keep
// working on its mapping, and once W ends, S must have no process left to wait for: the
// tracker has exited too.
namespace {
enum Failure {
  kOk = 0,
  kSubreaper = 10,
  kPipe,
  kFork,
  kNoName,
  kNoAttach,
  kNameStayed,
  kWorkerFailed,
  kLeftovers,
  kTrackerNotReparented,
};

int worker_body(const std::string& name, int report, int go) {
  try {
    auto seg = mp::SharedMemory::attach(name);
    char ok = 'A';
    write_all(report, &ok, 1);
    char g = 0;
    if (!read_all(go, &g, 1)) return 1;  // S says: C is dead and the name is gone
    // Work on the mapping after the name is gone.
    auto ints = seg.as<std::int32_t>();
    for (std::size_t i = 0; i < ints.size(); ++i) ints[i] = static_cast<std::int32_t>(i);
    long long sum = 0;
    for (auto v : ints) sum += v;
    long long n = static_cast<long long>(ints.size());
    char done = sum == n * (n - 1) / 2 ? 'D' : 'X';
    write_all(report, &done, 1);
    return 0;
  } catch (...) {
    return 2;
  }
}

int supervisor() {
  ::alarm(60);  // hang guard: a lingering process would block the final wait forever
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) == -1) return kSubreaper;
  int names[2], report[2], go[2];
  if (::pipe(names) == -1 || ::pipe(report) == -1 || ::pipe(go) == -1) return kPipe;
  pid_t c = ::fork();
  if (c == -1) return kFork;
  if (c == 0) {
    auto shm = mp::SharedMemory::create(1 << 20);
    send_name(names[1], shm.name());
    pid_t tracker = mp::detail::shm_tracker_pid();
    write_all(names[1], &tracker, sizeof tracker);
    pid_t w = ::fork();
    if (w == 0) ::_exit(worker_body(shm.name(), report[1], go[0]));
    ::pause();  // until SIGKILL
    ::_exit(0);
  }
  ::close(names[1]);
  ::close(report[1]);
  ::close(go[0]);
  std::string name = recv_name(names[0]);
  pid_t tracker = 0;
  if (name.empty() || !read_all(names[0], &tracker, sizeof tracker)) return kNoName;
  char a = 0;
  if (!read_all(report[0], &a, 1) || a != 'A') return kNoAttach;
  ::kill(c, SIGKILL);
  wait_status(c);
  if (!gone_within(name)) return kNameStayed;
  char g = 'g';
  write_all(go[1], &g, 1);
  char d = 0;
  if (!read_all(report[0], &d, 1) || d != 'D') return kWorkerFailed;
  // Wait for every process that came back to us: W and the tracker. ECHILD ends it.
  bool saw_tracker = false;
  for (;;) {
    int status = 0;
    pid_t p = ::waitpid(-1, &status, 0);
    if (p == -1) {
      if (errno == EINTR) continue;
      break;
    }
    if (p == tracker) saw_tracker = true;
  }
  if (!saw_tracker) return kTrackerNotReparented;
  return name_exists(name) ? kLeftovers : kOk;
}
}  // namespace

TEST_CASE(
    "shared_memory: creator SIGKILLed while its child works: the child finishes, the "
    "name is removed, no process lingers",
    "[shared_memory]") {
  OwnShm guard;
  pid_t s = ::fork();
  REQUIRE(s != -1);
  if (s == 0) ::_exit(supervisor());
  CHECK(wait_status(s) == kOk);
  CHECK(guard.leaked().empty());
  CHECK(no_children());
}

TEST_CASE("shared_memory: a tracker that was killed is replaced and told every live name",
          "[shared_memory]") {
  OwnShm guard;
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid != -1);
  if (pid == 0) {
    ::close(fds[0]);
    auto a = mp::SharedMemory::create(64);
    pid_t first = mp::detail::shm_tracker_pid();
    int pfd = mp::detail::pidfd_open(first);
    ::kill(first, SIGKILL);
    pollfd p{pfd, POLLIN, 0};
    ::poll(&p, 1, 30'000);
    auto b = mp::SharedMemory::create(64);  // starts a second tracker
    pid_t second = mp::detail::shm_tracker_pid();
    send_name(fds[1], a.name());
    send_name(fds[1], b.name());
    char differs = second != first && second != 0 ? 'y' : 'n';
    write_all(fds[1], &differs, 1);
    ::pause();
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string a = recv_name(fds[0]);
  std::string b = recv_name(fds[0]);
  char differs = 0;
  REQUIRE(read_all(fds[0], &differs, 1));
  ::close(fds[0]);
  CHECK(differs == 'y');
  ::kill(pid, SIGKILL);
  wait_status(pid);
  CHECK(gone_within(a));
  CHECK(gone_within(b));
  CHECK(guard.leaked().empty());
}

TEST_CASE("shared_memory: the tracker holds no descriptor of the program", "[shared_memory]") {
  OwnShm guard;
  // In a child (so that its tracker starts now): a pipe made before the tracker starts.
  // If the tracker kept a copy of the write end, the read end would not see EOF while the
  // tracker lives, which is as long as the child lives.
  pid_t pid = ::fork();
  REQUIRE(pid != -1);
  if (pid == 0) {
    int fds[2];
    if (::pipe(fds) != 0) ::_exit(2);  // deliberately not close-on-exec
    auto shm = mp::SharedMemory::create(64);
    if (mp::detail::shm_tracker_pid() == 0) ::_exit(3);
    ::close(fds[1]);
    pollfd p{fds[0], POLLIN, 0};
    if (::poll(&p, 1, 0) != 1) ::_exit(4);
    char c;
    ::_exit(::read(fds[0], &c, 1) == 0 ? 0 : 5);  // EOF: nobody else holds the write end
  }
  CHECK(wait_status(pid) == 0);
  CHECK(none_left_within(guard));  // the child's tracker removed its segment
}

// ---- Value, Array, RawValue, RawArray -------------------------------------------------------

namespace {

mp::Context any_context() {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  return mp::get_context(method);
}

struct Reading {
  double celsius;
  std::int32_t sensor;
};

void add_locked(mp::Value<std::int64_t> v, int times) {
  for (int i = 0; i < times; ++i) {
    std::lock_guard g{v.get_lock()};
    ++v.get_obj();
  }
}

void add_to_all_locked(mp::Array<std::int32_t> a, int times) {
  for (int t = 0; t < times; ++t) {
    std::lock_guard g{a.get_lock()};
    for (auto& x : a) x += 1;
  }
}

// Doubles a[from, to) of a raw array: the ranges of different children do not overlap.
void double_range(mp::RawArray<std::int32_t> a, std::size_t from, std::size_t to) {
  for (std::size_t i = from; i < to; ++i) a[i] *= 2;
}

void store_reading(mp::RawValue<Reading> r, double c, std::int32_t id) { r.set(Reading{c, id}); }

int value_while_holding_lock(mp::Value<int> v) {
  std::lock_guard g{v.get_lock()};
  try {
    (void)v.value();
  } catch (const mp::ProcessError&) {
    return 0;  // a clear error instead of a deadlock
  }
  return 1;
}

}  // namespace

TEST_CASE("shared_memory: Value holds one T, set and read whole, copies share it",
          "[shared_memory][value]") {
  mp::Value<int> zero;
  CHECK(zero.value() == 0);
  mp::Value<double> d(2.5);
  CHECK(d.value() == 2.5);
  d.set(-1.25);
  CHECK(d.value() == -1.25);
  mp::Value<double> copy = d;
  CHECK(copy == d);
  copy.get_obj() = 9.0;
  CHECK(d.value() == 9.0);
  CHECK(copy.get_lock() == d.get_lock());
  // A lock can be shared by several values.
  mp::Lock shared;
  mp::Value<int> a(1, shared), b(2, shared);
  CHECK(a.get_lock() == b.get_lock());
  CHECK_FALSE(a.get_lock() == zero.get_lock());
}

TEST_CASE("shared_memory: Value::value() under its own lock is an error, not a deadlock",
          "[shared_memory][value]") {
  mp::Value<int> v(3);
  mp::Process p{value_while_holding_lock, v};
  p.start();
  p.join();
  CHECK(p.exitcode() == 0);
}

TEST_CASE("shared_memory: Value increments under get_lock() from several processes are exact",
          "[shared_memory][value]") {
  auto ctx = any_context();
  constexpr int kProcs = 3, kTimes = 20'000;
  mp::Value<std::int64_t> counter;
  std::vector<mp::Process> procs;
  for (int i = 0; i < kProcs; ++i) procs.emplace_back(ctx, add_locked, counter, kTimes);
  for (auto& p : procs) p.start();
  add_locked(counter, kTimes);  // the parent takes part too
  for (auto& p : procs) {
    p.join();
    CHECK(p.exitcode() == 0);
  }
  CHECK(counter.value() == std::int64_t{kProcs + 1} * kTimes);
}

TEST_CASE("shared_memory: RawValue carries a struct to and from a child",
          "[shared_memory][value]") {
  auto ctx = any_context();
  mp::RawValue<Reading> r(Reading{20.0, 0});
  mp::Process p{ctx, store_reading, r, 23.5, 7};
  p.start();
  p.join();
  REQUIRE(p.exitcode() == 0);
  CHECK(r.value().celsius == 23.5);
  CHECK(r.value().sensor == 7);
}

TEST_CASE("shared_memory: Array elements, bounds, copies and whole assignment",
          "[shared_memory][array]") {
  mp::Array<std::int32_t> a{0, 10, 20, 30};
  CHECK(a.size() == 4);
  CHECK(a[2] == 20);
  CHECK(a.to_vector() == std::vector<std::int32_t>{0, 10, 20, 30});
  mp::Array<std::int32_t> copy = a;
  copy[1] = 11;
  CHECK(a[1] == 11);
  CHECK_THROWS_AS(a.at(4), std::out_of_range);
  std::vector<std::int32_t> v{4, 3, 2, 1};
  a.assign(v);
  CHECK(a.to_vector() == v);
  CHECK_THROWS_AS(a.assign(std::vector<std::int32_t>{1}), std::invalid_argument);
  mp::Array<double> zeros(5);
  CHECK(zeros.to_vector() == std::vector<double>(5, 0.0));
  mp::RawArray<char> none(0);
  CHECK(none.size() == 0);
  CHECK(none.begin() == none.end());
}

TEST_CASE("shared_memory: RawArray halves written by two children meet in the parent",
          "[shared_memory][array]") {
  auto ctx = any_context();
  std::vector<std::int32_t> init(1000);
  std::iota(init.begin(), init.end(), 0);
  mp::RawArray<std::int32_t> a{std::span<const std::int32_t>(init)};
  mp::Process p1{ctx, double_range, a, std::size_t{0}, std::size_t{500}};
  mp::Process p2{ctx, double_range, a, std::size_t{500}, std::size_t{1000}};
  p1.start();
  p2.start();
  p1.join();
  p2.join();
  long long sum = 0;
  for (auto x : a) sum += x;
  CHECK(sum == 2LL * 999 * 1000 / 2);
  CHECK(a[999] == 1998);
}

TEST_CASE("shared_memory: Array updates under get_lock() from several processes are exact",
          "[shared_memory][array]") {
  auto ctx = any_context();
  constexpr int kProcs = 3, kTimes = 2'000;
  mp::Array<std::int32_t> a(16);
  std::vector<mp::Process> procs;
  for (int i = 0; i < kProcs; ++i) procs.emplace_back(ctx, add_to_all_locked, a, kTimes);
  for (auto& p : procs) p.start();
  for (auto& p : procs) p.join();
  CHECK(a.to_vector() == std::vector<std::int32_t>(16, kProcs * kTimes));
}

TEST_CASE("shared_memory: Value and Array travel as descriptors when serialized",
          "[shared_memory][value][array]") {
  mp::Value<std::int64_t> v(5);
  mp::Array<float> a{1.f, 2.f};
  std::string bytes;
  std::vector<int> fds;
  {
    mp::detail::FdExport ex;
    bytes = mp::dumps(v, a);
    fds = ex.exported();
  }
  CHECK(fds.size() == 4);  // memory and lock of each
  mp::detail::FdImport im(fds);
  auto [v2, a2] = mp::loads<mp::Value<std::int64_t>, mp::Array<float>>(bytes);
  v2.set(6);
  a2[1] = 3.f;
  CHECK(v.value() == 6);  // the same memory, mapped again
  CHECK(a[1] == 3.f);
  CHECK(a2.size() == 2);
  CHECK_FALSE(v2 == v);                             // another mapping, another handle
  CHECK_THROWS_AS(mp::dumps(v), std::logic_error);  // no FdExport scope: nowhere to go
}
