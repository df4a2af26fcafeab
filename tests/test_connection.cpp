// tests/test_connection.cpp - Pipe/Connection: round trips, EOF, limits, poll and wait.
#include <fcntl.h>
#include <signal.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mp/connection.hpp>
#include <mp/process.hpp>
#include <numeric>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

struct Point {
  double x, y;
  std::int32_t id;
  friend bool operator==(const Point&, const Point&) = default;
};

mp::Context any_context() {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  return mp::get_context(method);
}

// True when `pid` is no child of ours any more (reaped): no zombie left. (A forkserver,
// when that start method is in use, stays our child: so ask about this pid only.)
bool reaped(pid_t pid) {
  siginfo_t info{};
  return ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) == -1 && errno == ECHILD;
}

// Child targets (plain functions, so that every start method can run them).

// Echoes every message from `in` to `out` as bytes until EOF, then returns how many.
int echo_between(mp::Connection in, mp::Connection out) {
  int n = 0;
  try {
    for (;;) {
      out.send_bytes(in.recv_bytes());
      ++n;
    }
  } catch (const mp::EOFError&) {
  }
  return n;
}

void sleep_then_send(mp::Connection conn, int ms, std::string text) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  conn.send(text);
}

// Holds the connection open and waits to be killed.
void hold_forever(mp::Connection conn) {
  conn.send(1);
  for (;;) ::pause();
}

// Writes a header announcing 1000 bytes and only 10 of them, then waits to be killed.
void half_a_message(mp::Connection conn) {
  char frame[8 + 10] = {};
  std::uint64_t len = 1000;
  std::memcpy(frame, &len, 8);
  if (::write(conn.fileno(), frame, sizeof frame) != sizeof frame) ::_exit(3);
  for (;;) ::pause();
}

void send_numbers(mp::Connection conn, int from, int count) {
  for (int i = 0; i < count; ++i) conn.send(from + i);
}

}  // namespace

TEST_CASE("connection: values of every kind make the round trip through a child", "[connection]") {
  auto ctx = any_context();
  bool duplex = GENERATE(true, false);
  INFO("duplex " << duplex);
  // Duplex: one pair both ways. One-way: a pair for each direction.
  mp::Connection to_child, from_child;
  mp::Process p;
  if (duplex) {
    auto [mine, theirs] = mp::Pipe(true);
    p = mp::Process{ctx, echo_between, theirs, theirs};
    p.start();
    theirs.close();
    to_child = from_child = mine;
  } else {
    auto [r1, w1] = mp::Pipe(false);
    auto [r2, w2] = mp::Pipe(false);
    CHECK(r1.readable());
    CHECK_FALSE(r1.writable());
    CHECK(w1.writable());
    CHECK_FALSE(w1.readable());
    p = mp::Process{ctx, echo_between, r1, w2};
    p.start();
    r1.close();
    w2.close();
    to_child = w1;
    from_child = r2;
  }

  to_child.send(42);
  CHECK(from_child.recv<int>() == 42);
  to_child.send(2.5);
  CHECK(from_child.recv<double>() == 2.5);
  to_child.send(Point{1.5, -2.0, 7});
  CHECK(from_child.recv<Point>() == Point{1.5, -2.0, 7});
  to_child.send(std::string("hello, child"));
  CHECK(from_child.recv<std::string>() == "hello, child");
  to_child.send(std::string());
  CHECK(from_child.recv<std::string>().empty());
  std::vector<int> v(100'000);
  std::iota(v.begin(), v.end(), -50);
  to_child.send(v);
  CHECK(from_child.recv<std::vector<int>>() == v);
  std::map<std::string, std::vector<double>> m{{"a", {1, 2}}, {"b", {}}, {"c", {3.5}}};
  to_child.send(m);
  CHECK(from_child.recv<decltype(m)>() == m);
  to_child.send_bytes(std::string_view("raw bytes"));
  CHECK(from_child.recv_bytes() == "raw bytes");
  to_child.send_bytes(std::string_view());
  CHECK(from_child.recv_bytes().empty());
  // A message much larger than any kernel buffer, while the child echoes it back.
  std::string big(5 << 20, 'x');
  for (std::size_t i = 0; i < big.size(); i += 4093) big[i] = static_cast<char>(i);
  to_child.send_bytes(big);
  CHECK(from_child.recv_bytes() == big);

  to_child.close();  // the child sees EOF and ends with the count it echoed
  p.join();
  CHECK(p.exitcode() == 10);
  CHECK(reaped(p.pid()));
}

TEST_CASE("connection: many messages arrive complete and in order", "[connection]") {
  auto ctx = any_context();
  auto [parent_end, child_end] = mp::Pipe(false);
  mp::Process p{ctx, send_numbers, child_end, 1000, 20'000};
  p.start();
  child_end.close();
  long long bad = 0;
  for (int i = 0; i < 20'000; ++i) bad += parent_end.recv<int>() != 1000 + i;
  CHECK(bad == 0);
  CHECK_THROWS_AS(parent_end.recv<int>(), mp::EOFError);
  p.join();
  CHECK(p.exitcode() == 0);
}

TEST_CASE("connection: EOF comes after the messages sent before close", "[connection]") {
  auto [a, b] = mp::Pipe();
  b.send(std::string("last words"));
  b.send(7);
  b.close();
  CHECK(b.closed());
  CHECK(a.poll());
  CHECK(a.recv<std::string>() == "last words");
  CHECK(a.recv<int>() == 7);
  CHECK(a.poll());  // EOF is "ready" too
  try {
    a.recv<int>();
    FAIL("no EOFError");
  } catch (const mp::EOFError& e) {
    CHECK_THAT(e.what(), Catch::Contains("the other end was closed"));
  }
  CHECK_THROWS_AS(a.recv_bytes(), mp::EOFError);  // and again
}

TEST_CASE("connection: EOF reaches the reader when the peer is SIGKILLed", "[connection]") {
  auto ctx = any_context();
  bool duplex = GENERATE(true, false);
  auto [r, w] = mp::Pipe(duplex);
  mp::Process p{ctx, hold_forever, w};
  p.start();
  w.close();  // the child's copy is now the only one
  CHECK(r.recv<int>() == 1);
  CHECK_FALSE(r.poll(10ms));
  p.kill();
  p.join();
  CHECK(r.poll(60s));
  CHECK_THROWS_AS(r.recv<int>(), mp::EOFError);
  CHECK(reaped(p.pid()));
}

TEST_CASE("connection: a peer killed in the middle of a message gives EOF, not a hang",
          "[connection]") {
  auto [r, w] = mp::Pipe(false);  // the child writes raw bytes to w.fileno()
  mp::Process p{half_a_message, w};
  p.start();
  w.close();
  CHECK(r.poll(60s));
  p.kill();
  p.join();
  try {
    r.recv_bytes();
    FAIL("no EOFError");
  } catch (const mp::EOFError& e) {
    CHECK_THAT(e.what(), Catch::Contains("in the middle of a message (got 18 of 1008 bytes)"));
  }
}

TEST_CASE("connection: sending to a closed peer is an error, never SIGPIPE", "[connection]") {
  bool duplex = GENERATE(true, false);
  INFO("duplex " << duplex);
  auto [r, w] = mp::Pipe(duplex);
  r.close();
  try {
    w.send(std::string(100, 'x'));
    FAIL("no error");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == EPIPE);
    CHECK_THAT(e.what(), Catch::Contains("the other end is closed"));
  }
  CHECK_THROWS_AS(w.send_bytes(std::string(1 << 20, 'y')), std::system_error);
  // Nothing left pending, and the mask is as it was.
  sigset_t pending, mask;
  ::sigpending(&pending);
  ::pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  CHECK_FALSE(sigismember(&pending, SIGPIPE));
  CHECK_FALSE(sigismember(&mask, SIGPIPE));
}

namespace {
// In a child: after Pipe() installed mp's SIGPIPE handler, a write of the program's own to
// a broken pipe must still end the process by SIGPIPE, as the default action would.
int own_broken_pipe_write() {
  auto [r, w] = mp::Pipe(false);
  struct sigaction cur {};
  ::sigaction(SIGPIPE, nullptr, &cur);
  if (cur.sa_handler == SIG_DFL) return 3;  // mp should have installed its handler
  int fds[2];
  if (::pipe(fds) != 0) return 4;
  ::close(fds[0]);
  char c = 'x';
  (void)::write(fds[1], &c, 1);  // raises SIGPIPE
  return 5;                      // not reached when SIGPIPE ends the process
}
}  // namespace

TEST_CASE("connection: other SIGPIPEs still end the process as the default action would",
          "[connection]") {
  mp::Process p{own_broken_pipe_write};
  p.start();
  p.join();
  CHECK(p.exitcode() == -SIGPIPE);
}

TEST_CASE("connection: a message over the limit is refused and nothing is written",
          "[connection]") {
  bool duplex = GENERATE(true, false);
  auto [r, w] = mp::Pipe(duplex);
  CHECK(w.max_message_size() == mp::kDefaultMaxMessageSize);
  w.set_max_message_size(1000);
  try {
    w.send_bytes(std::string(1001, 'x'));
    FAIL("an oversized message was sent");
  } catch (const mp::MessageTooLarge& e) {
    CHECK(e.size() == 1001);
    CHECK(e.limit() == 1000);
    CHECK_THAT(e.what(), Catch::Contains("nothing was sent"));
  }
  // A serialized value counts its serialized size.
  CHECK_THROWS_AS(w.send(std::vector<int>(300)), mp::MessageTooLarge);
  CHECK_FALSE(r.poll());  // not a byte arrived
  w.send_bytes(std::string(1000, 'y'));
  w.send(5);
  CHECK(r.recv_bytes() == std::string(1000, 'y'));
  CHECK(r.recv<int>() == 5);
  CHECK_FALSE(r.poll());
}

TEST_CASE("connection: a receiver refuses a header announcing more than its limit",
          "[connection]") {
  auto [r, w] = mp::Pipe();
  r.set_max_message_size(100);
  w.send_bytes(std::string(200, 'z'));
  try {
    r.recv_bytes();
    FAIL("an oversized message was accepted");
  } catch (const mp::MessageTooLarge& e) {
    CHECK(e.size() == 200);
    CHECK(e.limit() == 100);
  }
  CHECK(r.closed());  // the stream cannot be trusted any more
  CHECK_THROWS_AS(r.recv_bytes(), std::system_error);
}

TEST_CASE("connection: asking for the wrong type is an error and keeps the stream",
          "[connection]") {
  auto [a, b] = mp::Pipe();
  a.send(std::int32_t{5});
  a.send(std::int64_t{6});
  CHECK_THROWS_AS(b.recv<double>(), mp::SerializationError);
  CHECK(b.recv<std::int64_t>() == 6);
  a.send(std::string("text"));
  CHECK_THROWS_AS(b.recv<std::vector<double>>(), mp::SerializationError);
}

TEST_CASE("connection: recv_bytes_into fills a buffer or throws BufferTooShort", "[connection]") {
  auto [a, b] = mp::Pipe();
  std::vector<std::byte> buf(16);
  a.send_bytes(std::string_view("0123456789"));
  CHECK(b.recv_bytes_into(buf) == 10);
  CHECK(std::memcmp(buf.data(), "0123456789", 10) == 0);
  a.send_bytes(std::string(17, 'q'));
  a.send(3);
  try {
    b.recv_bytes_into(buf);
    FAIL("no BufferTooShort");
  } catch (const mp::BufferTooShort& e) {
    CHECK(e.message() == std::string(17, 'q'));
  }
  CHECK(b.recv<int>() == 3);
}

TEST_CASE("connection: misuse gives clear errors", "[connection]") {
  auto [r, w] = mp::Pipe(false);
  CHECK_THROWS_AS(r.send(1), mp::ProcessError);
  CHECK_THROWS_AS(w.recv<int>(), mp::ProcessError);
  CHECK_THROWS_AS(w.poll(), mp::ProcessError);
  mp::Connection none;
  CHECK(none.closed());
  try {
    none.send(1);
    FAIL("sent on a closed connection");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == EBADF);
    CHECK_THAT(e.what(), Catch::Contains("cannot send on a closed connection"));
  }
  CHECK_THROWS_AS(none.fileno(), std::system_error);
  CHECK_THROWS_AS(r.set_max_message_size(0), std::invalid_argument);
  r.close();
  r.close();  // idempotent
  CHECK_THROWS_AS(r.recv<int>(), std::system_error);
}

TEST_CASE("connection: copies share one descriptor", "[connection]") {
  auto [a, b] = mp::Pipe();
  mp::Connection copy = a;
  CHECK(copy == a);
  CHECK(copy.fileno() == a.fileno());
  copy.send(9);
  CHECK(b.recv<int>() == 9);
  copy.close();
  CHECK(a.closed());
  CHECK_THROWS_AS(b.recv<int>(), mp::EOFError);  // the last descriptor is gone
}

TEST_CASE("connection: poll waits up to its timeout, or forever", "[connection]") {
  auto [a, b] = mp::Pipe();
  CHECK_FALSE(a.poll());
  auto t0 = std::chrono::steady_clock::now();
  CHECK_FALSE(a.poll(30ms));
  CHECK(std::chrono::steady_clock::now() - t0 >= 30ms);  // it did wait, at least that long
  mp::Process p{sleep_then_send, b, 50, std::string("late")};
  p.start();
  CHECK(a.poll(std::nullopt));
  CHECK(a.recv<std::string>() == "late");
  p.join();
}

namespace {
std::atomic<int> g_alarms{0};
void on_alarm(int) { g_alarms.fetch_add(1); }
}  // namespace

TEST_CASE("connection: signals during a blocking recv and poll are retried (EINTR)",
          "[connection]") {
  struct sigaction sa {};
  sa.sa_handler = on_alarm;  // no SA_RESTART: the system calls really fail with EINTR
  struct sigaction old {};
  REQUIRE(::sigaction(SIGALRM, &sa, &old) == 0);
  itimerval every{{0, 2000}, {0, 2000}};
  auto [a, b] = mp::Pipe();
  mp::Process p{sleep_then_send, b, 200, std::string("through the storm")};
  p.start();
  g_alarms = 0;
  REQUIRE(::setitimer(ITIMER_REAL, &every, nullptr) == 0);
  bool polled = a.poll(60s);
  std::string got = a.recv<std::string>();
  itimerval off{};
  ::setitimer(ITIMER_REAL, &off, nullptr);
  ::sigaction(SIGALRM, &old, nullptr);
  CHECK(polled);
  CHECK(got == "through the storm");
  CHECK(g_alarms.load() > 0);
  p.join();
}

TEST_CASE("connection: wait returns the ready connections and sentinels", "[connection]") {
  auto ctx = any_context();
  auto [a1, b1] = mp::Pipe();
  auto [a2, b2] = mp::Pipe();
  CHECK(mp::wait({a1, a2}, 20ms).empty());  // timeout: nothing ready
  b2.send(1);
  auto ready = mp::wait({a1, a2}, 60s);
  REQUIRE(ready.size() == 1);
  CHECK(ready[0] == a2);
  CHECK(a2.recv<int>() == 1);

  // Read-ahead counts as ready: two messages arrive, one is read, one is buffered.
  b1.send(10);
  b1.send(11);
  REQUIRE(a1.poll(60s));
  std::this_thread::sleep_for(10ms);  // let both messages land; then one read takes both
  CHECK(a1.recv<int>() == 10);
  CHECK(mp::wait({a1, a2}, 0s) == std::vector<mp::Connection>{a1});
  CHECK(a1.recv<int>() == 11);

  // A process sentinel becomes ready when the process ends.
  mp::Process p{ctx, sleep_then_send, b1, 10, std::string("bye")};
  p.start();
  std::vector<mp::Waitable> objects{a1, p.sentinel()};
  std::vector<mp::Waitable> got = mp::wait(objects, 60s);
  REQUIRE_FALSE(got.empty());
  CHECK(got[0] == objects[0]);  // the message comes before the exit
  CHECK(a1.recv<std::string>() == "bye");
  p.join();
  got = mp::wait(objects, 60s);
  CHECK(std::find(got.begin(), got.end(), objects[1]) != got.end());
  CHECK_THROWS_AS(mp::wait(std::vector<mp::Waitable>{-1}, 0s), std::invalid_argument);
}

TEST_CASE("connection: serialized for a spawn child, it carries its descriptor and read-ahead",
          "[connection]") {
  auto [a, b] = mp::Pipe();
  b.send(1);
  b.send(2);
  REQUIRE(a.poll(60s));
  std::this_thread::sleep_for(10ms);
  CHECK(a.recv<int>() == 1);  // 2 is now in a's read-ahead
  std::string bytes;
  std::vector<int> fds;
  {
    mp::detail::FdExport ex;
    bytes = mp::dumps(a);
    fds = ex.exported();
  }
  REQUIRE(fds.size() == 2);  // a duplex end reads one pipe and writes another
  mp::Connection copy;
  {
    mp::detail::FdImport im(fds);
    copy = mp::load<mp::Connection>(bytes);
  }
  CHECK_FALSE(copy == a);              // a new handle...
  CHECK(copy.fileno() != a.fileno());  // ...with its own descriptor
  CHECK(copy.recv<int>() == 2);
  b.send(3);
  CHECK(copy.recv<int>() == 3);
  // Without an FdExport scope there is nowhere to put the descriptor.
  CHECK_THROWS_AS(mp::dumps(a), std::logic_error);
}
