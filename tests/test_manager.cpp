// tests/test_manager.cpp - mp::Manager, its proxies, Listener/Client and the HMAC handshake.
//
// Cases with other processes run under every start method, with plain-function targets
// that take proxies as arguments. Timeouts are hang guards, never speed checks.
#include <arpa/inet.h>
#include <dirent.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <mp/connection.hpp>
#include <mp/listener.hpp>
#include <mp/manager.hpp>
#include <mp/process.hpp>
#include <string>
#include <thread>
#include <vector>

#include "shm.hpp"

using namespace std::chrono_literals;

namespace {

mp::Context any_context() {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  return mp::get_context(method);
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// The directory that holds a local manager's socket ("unix:/tmp/mp-XXXX/manager").
std::string socket_dir(const std::string& address) {
  std::string path = address.substr(5);
  return path.substr(0, path.rfind('/'));
}

// Whether pid is a running process (a zombie, or no process at all, is not).
bool running(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z';
}

// Waits (hang guard: 30 s) until pid is no longer running.
bool ends_within_30s(pid_t pid) {
  for (int i = 0; i < 3000; ++i) {
    if (!running(pid)) return true;
    std::this_thread::sleep_for(10ms);
  }
  return false;
}

bool no_zombies() {
  siginfo_t info{};
  int r = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
  return (r == -1 && errno == ECHILD) || (r == 0 && info.si_pid == 0);
}

int add_one(int v) { return v + 1; }
int throw_on_negative(int v) {
  if (v < 0) throw std::domain_error("negative value");
  return v;
}

// ---- child targets -------------------------------------------------------------------------

void count_up(mp::DictProxy<std::string, int> d, int n) {
  for (int i = 0; i < n; ++i) d.update_with("hits", add_one, 0);
}

void append_tagged(mp::ListProxy<int> l, int tag, int n) {
  for (int i = 0; i < n; ++i) l.append(tag * 1000 + i);
}

void locked_increment(mp::LockProxy lock, mp::NamespaceProxy ns, int n) {
  for (int i = 0; i < n; ++i) {
    std::lock_guard guard(lock);
    ns.set("counter", ns.get<long>("counter") + 1);
  }
}

int use_every_proxy(mp::DictProxy<std::string, int> d, mp::ListProxy<int> l, mp::NamespaceProxy ns,
                    mp::EventProxy ready, mp::QueueProxy<std::string> q) {
  d.set("child", 1);
  d.update_with("hits", add_one, 0);
  l.append(42);
  ns.set("name", std::string("from the child"));
  q.put("hello from " + std::to_string(::getpid()));
  ready.set();
  return d.size() == 2 && l.size() == 1 ? 0 : 3;
}

// Loops on the dict until killed.
void hammer(mp::DictProxy<int, int> d, mp::LockProxy lock) {
  lock.acquire();  // held when the process dies: the server must release it
  for (int i = 0;; ++i) d.set(i % 8, i);
}

}  // namespace

// ---- the frame parser ----------------------------------------------------------------------

TEST_CASE("FrameReader: frames split anywhere, wake bytes skipped, bad records rejected",
          "[manager][frames]") {
  std::string stream = "WW";
  stream += 'F';
  std::uint32_t len = 5;
  stream.append(reinterpret_cast<char*>(&len), 4);
  stream += "helloW";
  stream += 'F';
  len = 0;
  stream.append(reinterpret_cast<char*>(&len), 4);
  for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
    mp::detail::FrameReader r;
    std::vector<std::string> got;
    std::string p;
    r.feed(std::string_view(stream).substr(0, cut));
    while (r.next(p)) got.push_back(p);
    r.feed(std::string_view(stream).substr(cut));
    while (r.next(p)) got.push_back(p);
    REQUIRE(got.size() == 2);
    CHECK(got[0] == "hello");
    CHECK(got[1].empty());
  }
  mp::detail::FrameReader bad;
  std::string p;
  bad.feed("X");
  CHECK_THROWS_AS(bad.next(p), mp::detail::ProtocolError);

  mp::detail::FrameReader big(100);
  std::string head = "F";
  len = 101;
  head.append(reinterpret_cast<char*>(&len), 4);
  big.feed(head);
  CHECK_THROWS_AS(big.next(p), mp::detail::ProtocolError);
}

TEST_CASE("handle_request rejects truncated and unknown requests", "[manager][frames]") {
  auto state = mp::detail::make_server_state(false);
  mp::detail::Peer peer;
  std::string answer;
  CHECK_THROWS_AS(mp::detail::handle_request(*state, peer, "", answer), mp::detail::ProtocolError);
  std::string req;
  mp::detail::put_u8(req, 200);
  mp::detail::put_u64(req, 1);
  CHECK_THROWS_AS(mp::detail::handle_request(*state, peer, req, answer), mp::detail::ProtocolError);
  // A dict_set with a length field that runs past the end.
  req.clear();
  mp::detail::put_u8(req, static_cast<std::uint8_t>(mp::detail::Op::create));
  mp::detail::put_u64(req, 0);
  mp::detail::put_u8(req, static_cast<std::uint8_t>(mp::detail::ObjectKind::dict));
  mp::detail::put_bytes(req, "");
  mp::detail::put_bytes(req, "");
  mp::detail::put_u64(req, 0);
  REQUIRE(mp::detail::handle_request(*state, peer, req, answer));
  mp::detail::WireReader made(answer);
  REQUIRE(made.u8() == 0);
  std::uint64_t id = made.u64();
  req.clear();
  mp::detail::put_u8(req, static_cast<std::uint8_t>(mp::detail::Op::dict_set));
  mp::detail::put_u64(req, id);
  mp::detail::put_u32(req, 1000);
  CHECK_THROWS_AS(mp::detail::handle_request(*state, peer, req, answer), mp::detail::ProtocolError);
}

// ---- proxy semantics -------------------------------------------------------------------------

TEST_CASE("dict proxy: Python's dict operations, atomic each", "[manager]") {
  mp::Manager m;
  auto d = m.dict<std::string, int>();
  CHECK(d.empty());
  d.set("b", 2);
  d.set("a", 1);
  d.set("c", 3);
  d.set("b", 20);  // an update keeps the insertion place
  CHECK(d.size() == 3);
  CHECK(d.get("b") == 20);
  CHECK(d.get("zz") == std::nullopt);
  CHECK(d.get("zz", -1) == -1);
  CHECK(d.at("a") == 1);
  CHECK_THROWS_AS(d.at("zz"), std::out_of_range);
  CHECK(d.contains("c"));
  CHECK_FALSE(d.contains("zz"));
  using Items = std::vector<std::pair<std::string, int>>;
  CHECK(d.items() == Items{{"b", 20}, {"a", 1}, {"c", 3}});
  CHECK(d.keys() == std::vector<std::string>{"b", "a", "c"});
  CHECK(d.erase("a"));
  CHECK_FALSE(d.erase("a"));
  CHECK(d.pop("c") == 3);
  CHECK(d.pop("c") == std::nullopt);
  d.update(std::map<std::string, int>{{"x", 10}, {"y", 11}});
  CHECK(d.copy() == std::map<std::string, int>{{"b", 20}, {"x", 10}, {"y", 11}});
  CHECK(d.setdefault("x", 99) == 10);
  CHECK(d.setdefault("new", 99) == 99);
  CHECK(d.update_with("x", add_one, 0) == 11);
  CHECK(d.update_with("fresh", add_one, 41) == 42);
  CHECK(d.update_with("x", [](int v) { return v * 10; }) == 110);
  // An exception in the update function reaches the caller; the entry is unchanged.
  d.set("neg", -5);
  CHECK_THROWS_AS(d.update_with("neg", throw_on_negative, 0), mp::RemoteError);
  try {
    d.update_with("neg", throw_on_negative, 0);
  } catch (const mp::RemoteError& e) {
    CHECK(e.type_name() == "std::domain_error");
    CHECK(e.message() == "negative value");
    CHECK(e.pid() == m.pid());
  }
  CHECK(d.get("neg") == -5);
  d.clear();
  CHECK(d.size() == 0);
}

TEST_CASE("list proxy: append, negative indices, pop, snapshot", "[manager]") {
  mp::Manager m;
  auto l = m.list<std::string>();
  l.append("a");
  l.extend(std::vector<std::string>{"b", "c", "d"});
  l.insert(0, "first");
  l.insert(-1, "before-last");
  CHECK(l.snapshot() == std::vector<std::string>{"first", "a", "b", "c", "before-last", "d"});
  CHECK(l.get(0) == "first");
  CHECK(l[-1] == "d");
  CHECK_THROWS_AS(l.get(6), std::out_of_range);
  CHECK_THROWS_AS(l.get(-7), std::out_of_range);
  l.set(1, "A");
  CHECK_THROWS_AS(l.set(10, "x"), std::out_of_range);
  CHECK(l.pop() == "d");
  CHECK(l.pop(0) == "first");
  CHECK(l.try_pop(100) == std::nullopt);
  CHECK(l.snapshot() == std::vector<std::string>{"A", "b", "c", "before-last"});
  l.clear();
  CHECK(l.empty());
  CHECK_THROWS_AS(l.pop(), std::out_of_range);
  CHECK(l.try_pop() == std::nullopt);
}

TEST_CASE("Namespace proxy: typed fields by name", "[manager]") {
  mp::Manager m;
  auto ns = m.Namespace();
  ns.set("x", 42);
  ns.set("name", std::string("mp"));
  ns.set("ratio", 0.5);
  CHECK(ns.get<int>("x") == 42);
  CHECK(ns.get<std::string>("name") == "mp");
  CHECK(ns.get<double>("ratio") == 0.5);
  CHECK_THROWS_AS(ns.get<double>("x"), std::invalid_argument);  // it holds an int
  CHECK_THROWS_AS(ns.get<int>("missing"), std::out_of_range);
  CHECK(ns.try_get<int>("missing") == std::nullopt);
  CHECK(ns.contains("x"));
  CHECK(ns.names() == std::vector<std::string>{"name", "ratio", "x"});
  CHECK(ns.erase("x"));
  CHECK_FALSE(ns.contains("x"));
  ns.set("x", std::string("now a string"));  // a field may change type by a set
  CHECK(ns.get<std::string>("x") == "now a string");
}

TEST_CASE("Lock, Event and Queue proxies", "[manager]") {
  mp::Manager m;
  auto lock = m.Lock();
  CHECK(lock.acquire());
  CHECK(lock.locked());
  CHECK_FALSE(lock.try_acquire());
  CHECK_FALSE(lock.acquire(50ms));
  lock.release();
  CHECK_FALSE(lock.locked());
  CHECK_THROWS_AS(lock.release(), mp::ProcessError);
  {
    std::lock_guard guard(lock);
    CHECK(lock.locked());
  }
  CHECK_FALSE(lock.locked());

  auto ev = m.Event();
  CHECK_FALSE(ev.is_set());
  CHECK_FALSE(ev.wait(20ms));
  ev.set();
  CHECK(ev.wait());
  CHECK(ev.wait(1ms));
  ev.clear();
  CHECK_FALSE(ev.is_set());

  auto q = m.Queue<int>(2);
  q.put(1);
  q.put(2);
  CHECK(q.full());
  CHECK_THROWS_AS(q.put(3, 20ms), mp::Full);
  CHECK_FALSE(q.try_put(3));
  CHECK(q.qsize() == 2);
  CHECK(q.get() == 1);
  CHECK(q.get(1s) == 2);
  CHECK(q.empty());
  CHECK_THROWS_AS(q.get(20ms), mp::Empty);
  CHECK_THROWS_AS(q.get_nowait(), mp::Empty);
  CHECK(q.try_get() == std::nullopt);
}

TEST_CASE("named objects are found again, with their types checked", "[manager]") {
  mp::Manager m;
  auto a = m.dict<std::string, int>("scores");
  a.set("x", 1);
  auto b = m.dict<std::string, int>("scores");
  CHECK(b.get("x") == 1);
  CHECK(a == b);
  CHECK_THROWS_AS((m.dict<int, int>("scores")), std::invalid_argument);
  CHECK_THROWS_AS(m.list<int>("scores"), std::invalid_argument);
  auto other = m.dict<std::string, int>();
  CHECK_FALSE(other == a);
}

TEST_CASE("values larger than the shared block travel on the socket", "[manager]") {
  mp::Manager m;
  auto d = m.dict<int, std::string>();
  std::string big(3 << 20, 'x');
  big[12345] = 'y';
  d.set(1, big);
  CHECK(d.get(1) == big);
  auto items = d.items();
  REQUIRE(items.size() == 1);
  CHECK(items[0].second == big);
  d.set(2, "small again");
  CHECK(d.get(2) == "small again");
  // Over the server's limit: refused before anything is sent, and the proxy goes on.
  CHECK_THROWS_AS(d.set(3, std::string(mp::detail::kMaxManagerMessage, 'z')), std::length_error);
  CHECK(d.size() == 2);
}

TEST_CASE("proxies survive serialization, as in a message", "[manager]") {
  mp::Manager m;
  auto d = m.dict<int, int>();
  d.set(1, 2);
  auto copy = mp::load<mp::DictProxy<int, int>>(mp::dumps(d));
  CHECK(copy.get(1) == 2);
  copy.set(3, 4);
  CHECK(d.get(3) == 4);
  mp::DictProxy<int, int> empty;
  CHECK_THROWS_AS(empty.size(), mp::ProcessError);
}

TEST_CASE("a Manager made in a thread that ends keeps its server", "[manager]") {
  // Linux's parent-death signal follows the thread that started a child; the server must
  // not die with that thread.
  std::optional<mp::Manager> m;
  std::thread([&] { m.emplace(); }).join();
  auto d = m->dict<int, int>();
  d.set(1, 1);
  CHECK(d.get(1) == 1);
  m.reset();
}

// ---- concurrency and start methods
// ---------------------------------------------------------------

TEST_CASE("several processes: exact counts with update_with, append and a manager Lock",
          "[manager][processes]") {
  auto ctx = any_context();
  mp::Manager m;
  auto d = m.dict<std::string, int>();
  auto l = m.list<int>();
  auto lock = m.Lock();
  auto ns = m.Namespace();
  ns.set("counter", 0L);
  constexpr int kWorkers = 4, kEach = 300;
  std::vector<mp::Process> ps;
  for (int w = 0; w < kWorkers; ++w) ps.emplace_back(ctx, count_up, d, kEach);
  for (int w = 0; w < kWorkers; ++w) ps.emplace_back(ctx, append_tagged, l, w, kEach);
  for (int w = 0; w < kWorkers; ++w) ps.emplace_back(ctx, locked_increment, lock, ns, kEach / 3);
  for (auto& p : ps) p.start();
  for (auto& p : ps) {
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == 0);
  }
  CHECK(d.get("hits") == kWorkers * kEach);
  auto items = l.snapshot();
  CHECK(items.size() == std::size_t{kWorkers * kEach});
  std::sort(items.begin(), items.end());
  CHECK(std::adjacent_find(items.begin(), items.end()) == items.end());
  CHECK(ns.get<long>("counter") == kWorkers * (kEach / 3));
}

TEST_CASE("proxies of every kind work in children of every start method", "[manager][processes]") {
  auto ctx = any_context();
  mp::Manager m(ctx);
  auto d = m.dict<std::string, int>();
  auto l = m.list<int>();
  auto ns = m.Namespace();
  auto ready = m.Event();
  auto q = m.Queue<std::string>();
  mp::Process p{ctx, use_every_proxy, d, l, ns, ready, q};
  p.start();
  CHECK(ready.wait(60s));
  std::string msg = q.get(60s);
  REQUIRE(p.join(60s));
  CHECK(p.exitcode() == 0);
  CHECK(msg == "hello from " + std::to_string(p.pid()));
  CHECK(d.get("child") == 1);
  CHECK(d.get("hits") == 1);
  CHECK(l.snapshot() == std::vector<int>{42});
  CHECK(ns.get<std::string>("name") == "from the child");
}

TEST_CASE("the server is started under every start method and leaves nothing behind",
          "[manager][processes]") {
  auto ctx = any_context();
  testing::ShmGuard shm;
  std::string dir;
  pid_t server = 0;
  {
    mp::Manager m(ctx);
    server = m.pid();
    dir = socket_dir(m.address());
    CHECK(exists(dir));
    CHECK(running(server));
    CHECK(m.server_pid() == server);
    auto d = m.dict<int, int>();
    d.set(1, 1);
    CHECK(d.get(1) == 1);
  }
  CHECK_FALSE(exists(dir));
  CHECK_FALSE(running(server));
  CHECK(no_zombies());
  CHECK(shm.leaked().empty());
}

// ---- faults
// ----------------------------------------------------------------------------------------

TEST_CASE("a client killed mid-request disturbs no one, and its Lock is released",
          "[manager][faults]") {
  auto ctx = any_context();
  mp::Manager m;
  auto d = m.dict<int, int>();
  auto lock = m.Lock();
  mp::Process victim{ctx, hammer, d, lock};
  victim.start();
  // Wait until it is busy, then kill it in the middle of its calls.
  for (int i = 0; i < 6000 && d.size() < 8; ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(d.size() == 8);
  CHECK(lock.locked());
  victim.kill();
  REQUIRE(victim.join(30s));
  CHECK(victim.exitcode() == -SIGKILL);
  // The server goes on; the lock the dead client held comes free.
  CHECK(lock.acquire(30s));
  lock.release();
  auto e = m.dict<int, int>();
  for (int i = 0; i < 100; ++i) e.update_with(0, add_one, 0);
  CHECK(e.get(0) == 100);
  CHECK(m.is_alive());
}

TEST_CASE("a dead server: calls fail at once with ManagerGoneError", "[manager][faults]") {
  int sig = GENERATE(SIGKILL, SIGTERM);
  INFO("signal " << sig);
  mp::Manager m;
  auto d = m.dict<int, int>();
  d.set(1, 1);  // a connection exists
  std::string dir = socket_dir(m.address());
  REQUIRE(::kill(m.pid(), sig) == 0);
  REQUIRE(ends_within_30s(m.pid()));
  // SIGTERM lets the server remove its socket itself; after SIGKILL the owner does it.
  if (sig == SIGTERM) CHECK_FALSE(exists(dir));
  CHECK_THROWS_AS(d.set(2, 2), mp::ManagerGoneError);  // the pooled connection hits EOF
  CHECK_THROWS_AS(d.get(1), mp::ManagerGoneError);     // a new connection is refused
  CHECK_THROWS_AS((m.dict<int, int>()), mp::ManagerGoneError);
  m.shutdown();  // reaps it and removes the socket
  CHECK_FALSE(exists(dir));
  CHECK(no_zombies());
}

TEST_CASE("malformed and oversized frames close that connection only", "[manager][faults]") {
  mp::Manager m;
  auto d = m.dict<int, int>();
  // An unknown record type; a frame over the size limit; a frame too short for a request;
  // a dict_get without its key.
  auto garbage = GENERATE(std::string("X"), std::string("F\xff\xff\xff\xff", 5),
                          std::string("F\x01\x00\x00\x00\x63", 6),
                          std::string("F\x09\x00\x00\x00\x10\x01\x00\x00\x00\x00\x00\x00\x00", 14));
  INFO("garbage of " << garbage.size() << " bytes");
  auto fd = mp::detail::connect_to(m.address());
  mp::detail::authenticate_as_client(fd.get(), m.authkey());
  mp::detail::send_all(fd.get(), garbage.data(), garbage.size(), "send garbage");
  // The server closes the connection: EOF (or a reset) without an answer.
  char c;
  ssize_t r;
  do r = ::recv(fd.get(), &c, 1, 0);
  while (r == -1 && errno == EINTR);
  CHECK(r <= 0);
  d.set(1, 1);
  CHECK(d.get(1) == 1);
}

TEST_CASE("a client that does not authenticate is dropped, the others are served",
          "[manager][faults]") {
  mp::Manager m;
  auto fd = mp::detail::connect_to(m.address());
  std::string junk(300, 'j');  // not an answer to the challenge
  mp::detail::send_all(fd.get(), junk.data(), junk.size(), "send junk");
  auto d = m.dict<int, int>();
  d.set(1, 1);
  CHECK(d.get(1) == 1);
}

TEST_CASE("the server dies with its owner process", "[manager][faults]") {
  // Orphans are re-parented to us, so that we can reap the server ourselves.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  auto [mine, theirs] = mp::Pipe();
  mp::Process owner{mp::get_context("fork"),
                    [](mp::Connection c) {
                      mp::Manager m;
                      c.send(static_cast<int>(m.pid()));
                      for (;;) ::pause();
                    },
                    theirs};
  owner.start();
  theirs.close();
  REQUIRE(mine.poll(60s));
  auto server = static_cast<pid_t>(mine.recv<int>());
  CHECK(running(server));
  owner.kill();
  REQUIRE(owner.join(30s));
  CHECK(ends_within_30s(server));
  ::waitpid(server, nullptr, 0);
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  CHECK(no_zombies());
}

// ---- remote use, authentication
// --------------------------------------------------------------------

TEST_CASE("a TCP manager: the right key connects, a wrong one gets AuthenticationError",
          "[manager][auth]") {
  mp::Manager m("tcp:127.0.0.1:0", "right key");
  CHECK(m.address().starts_with("tcp:127.0.0.1:"));
  CHECK(m.authkey() == "right key");
  auto d = m.dict<std::string, int>("shared");
  d.set("x", 1);

  auto client = mp::connect(m.address(), "right key");
  auto remote = client.dict<std::string, int>("shared");
  CHECK(remote.get("x") == 1);
  remote.update_with("x", add_one, 0);
  CHECK(d.get("x") == 2);
  CHECK(client.server_pid() == m.pid());

  CHECK_THROWS_AS(mp::connect(m.address(), "wrong key"), mp::AuthenticationError);
  CHECK_THROWS_AS(mp::connect(m.address(), ""), mp::AuthenticationError);
  // The server goes on serving the others.
  CHECK(remote.get("x") == 2);
  d.set("y", 3);
  CHECK(mp::connect(m.address(), "right key").dict<std::string, int>("shared").get("y") == 3);
}

namespace {

// A server that stops at a given point of the handshake, as one killed there would.
enum class HangUp { at_accept, after_challenge, after_answer, reset_after_answer, wrong_key };

// No Catch assertion here: they run on the server thread, and Catch is not thread-safe.
// Each returns false when a call failed; the test checks that on the main thread.
bool write_frame(int fd, const std::string& body) {
  std::string frame(4, '\0');
  auto len = static_cast<std::uint32_t>(body.size());
  std::memcpy(frame.data(), &len, 4);
  frame += body;
  return ::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL) == ssize_t(frame.size());
}

bool read_bytes(int fd, std::size_t n) {
  std::string buf(n, '\0');
  std::size_t got = 0;
  while (got < n) {
    ssize_t r = ::recv(fd, buf.data() + got, n - got, 0);
    if (r <= 0) return false;
    got += std::size_t(r);
  }
  return true;
}

bool serve_once(int listener, HangUp how) {
  int c = ::accept(listener, nullptr, nullptr);
  if (c < 0) return false;
  bool ok = true;
  if (how != HangUp::at_accept) {
    ok = write_frame(c, "#CHALLENGE#" + std::string(40, 'n'));
    if (ok && how != HangUp::after_challenge) {
      ok = read_bytes(c, 4 + 32);  // the framed HMAC-SHA256 answer
      if (ok && how == HangUp::reset_after_answer) {
        linger l{1, 0};  // close with a reset, as the kernel does for a killed process
        ok = ::setsockopt(c, SOL_SOCKET, SO_LINGER, &l, sizeof l) == 0;
      } else if (ok && how == HangUp::wrong_key) {
        ok = write_frame(c, "#FAILURE#");
      }
    }
  }
  ::close(c);
  return ok;
}

}  // namespace

TEST_CASE("a server that goes away during the handshake gives ManagerGoneError, not a key error",
          "[manager][faults]") {
  int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(l >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  REQUIRE(::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(l, 4) == 0);
  REQUIRE(::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  std::string address = fmt::format("tcp:127.0.0.1:{}", ntohs(a.sin_port));

  auto how = GENERATE(HangUp::at_accept, HangUp::after_challenge, HangUp::after_answer,
                      HangUp::reset_after_answer, HangUp::wrong_key);
  INFO("the server stops " << int(how));
  bool served = false;
  std::thread server([&] { served = serve_once(l, how); });
  if (how == HangUp::wrong_key) {
    // The one case where the exchange completed, and its verdict is "wrong key".
    CHECK_THROWS_AS(mp::connect(address, "k"), mp::AuthenticationError);
  } else {
    CHECK_THROWS_AS(mp::connect(address, "k"), mp::ManagerGoneError);
  }
  server.join();
  CHECK(served);
  ::close(l);
}

TEST_CASE("a remote client in another process, under every start method", "[manager][auth]") {
  auto ctx = any_context();
  mp::Manager m("tcp:127.0.0.1:0", "k3y", ctx);
  m.dict<std::string, int>("hits");
  mp::Process p{ctx,
                [](std::string address, int n) {
                  auto d = mp::connect(address, "k3y").dict<std::string, int>("hits");
                  for (int i = 0; i < n; ++i) d.update_with("n", add_one, 0);
                },
                m.address(), 50};
  p.start();
  REQUIRE(p.join(60s));
  CHECK(p.exitcode() == 0);
  CHECK(m.dict<std::string, int>("hits").get("n") == 50);
}

TEST_CASE("nothing listens: connect fails at once", "[manager][auth]") {
  std::string address;
  {
    mp::Manager m;
    address = m.address();
  }
  CHECK_THROWS_AS(mp::connect(address, "x"), mp::ManagerGoneError);
  CHECK_THROWS_AS(mp::connect("tcp:127.0.0.1:1", "x"), mp::ManagerGoneError);
}

TEST_CASE("Listener and Client: authenticated connections, a private socket removed at close",
          "[listener][auth]") {
  std::string path;
  {
    mp::Listener server{"", "secret"};
    REQUIRE(server.address().starts_with("unix:"));
    path = server.address().substr(5);
    CHECK(exists(path));
    // Catch2's assertions are not thread-safe: the client thread records, the test checks.
    std::string answer;
    bool wrong_key_refused = false;
    std::thread client([&] {
      auto c = mp::Client(server.address(), "secret");
      c.send(std::string("ping"));
      answer = c.recv<std::string>();
      try {
        mp::Client(server.address(), "wrong");
      } catch (const mp::AuthenticationError&) {
        wrong_key_refused = true;
      }
    });
    auto peer = server.accept();
    CHECK(peer.recv<std::string>() == "ping");
    peer.send(std::string("pong"));
    CHECK_THROWS_AS(server.accept(), mp::AuthenticationError);
    client.join();
    CHECK(answer == "pong");
    CHECK(wrong_key_refused);
  }
  CHECK_FALSE(exists(path));
  CHECK_FALSE(exists(path.substr(0, path.rfind('/'))));

  mp::Listener tcp{"tcp:127.0.0.1:0"};
  std::thread client([&] { mp::Client(tcp.address()).send(7); });
  CHECK(tcp.accept().recv<int>() == 7);
  client.join();
  CHECK_THROWS_AS(mp::Listener("tcp:127.0.0.1"), std::invalid_argument);
  CHECK_THROWS_AS(mp::Listener("tcp:127.0.0.1:99999"), std::invalid_argument);
}

TEST_CASE("HMAC-SHA256 matches the RFC 4231 test vector", "[listener][auth]") {
  std::string key(20, '\x0b');
  std::string digest = mp::detail::hmac_sha256(key, "Hi There");
  std::string hex;
  for (unsigned char ch : digest) hex += fmt::format("{:02x}", ch);
  CHECK(hex == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
}
