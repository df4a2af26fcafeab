// tests/test_logging.cpp - mp/logging.hpp: records from workers reach one file whole.
//
// Cases with other processes run under each start method this build has (one SECTION per
// method); their targets are plain functions taking the log queue as an argument. Every
// line a listener writes is parsed back: its time, level, process name, pid, logger and a
// message whose payload is derived from (worker, sequence number), so a line that was cut,
// joined with another or damaged fails the parse. Waits are hang guards, never speed checks.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <mp/logging.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "run.hpp"
#include "shm.hpp"

using namespace std::chrono_literals;

namespace {

// ---- helpers -----------------------------------------------------------------------------

bool has_method(const std::string& m) {
  auto all = mp::get_all_start_methods();
  return std::find(all.begin(), all.end(), m) != all.end();
}

// No child of this process is left unreaped.
bool no_zombies() {
  siginfo_t info{};
  int r = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
  return (r == -1 && errno == ECHILD) || (r == 0 && info.si_pid == 0);
}

// Puts this process's logging back as it was (the default handler, Level::warning).
struct RestoreLogging {
  ~RestoreLogging() {
    mp::set_log_handler(nullptr);
    mp::set_log_level(mp::Level::warning);
  }
};

// The payload of line `seq` of worker `w`: letters derived from both. Every 64th line is
// longer than PIPE_BUF (4096), which pipes would no longer write atomically.
std::string payload(int w, int seq) {
  std::size_t size = seq % 64 == 63 ? 9000 : static_cast<std::size_t>((seq * 37 + w * 11) % 300);
  std::string s(size, 'a');
  std::uint32_t x = static_cast<std::uint32_t>(w) * 2654435761u + static_cast<std::uint32_t>(seq);
  for (char& c : s) {
    x = x * 1664525u + 1013904223u;
    c = static_cast<char>('a' + (x >> 24) % 26);
  }
  return s;
}

// A big payload (20-60 KB), so that a SIGKILL often lands in the middle of a put.
std::string big_payload(int w, int seq) {
  std::string s = payload(w, seq);
  s.resize(20000 + static_cast<std::size_t>(seq * 7919 % 40000), 'z');
  return s;
}

// One line of a listener's output, parsed.
struct Line {
  std::string level, process, logger, message;
  pid_t pid = 0;
  int worker = -1, seq = -1;  // from a message "w<worker> #<seq> <payload>"
  std::string payload;
};

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Parses "YYYY-MM-DD HH:MM:SS.mmm [LEVEL/process:pid] logger: message" strictly (by hand:
// std::regex recurses per character and overflows the stack on 60 KB lines).
std::optional<Line> parse(std::string_view text) {
  // The time: digits where the pattern has 'd', the separators exactly.
  constexpr std::string_view time_shape = "dddd-dd-dd dd:dd:dd.ddd [";
  if (text.size() < time_shape.size()) return std::nullopt;
  for (std::size_t i = 0; i < time_shape.size(); ++i) {
    char want = time_shape[i], c = text[i];
    if (want == 'd' ? !(c >= '0' && c <= '9') : c != want) return std::nullopt;
  }
  text.remove_prefix(time_shape.size());
  std::size_t close = text.find("] ");
  if (close == std::string_view::npos) return std::nullopt;
  std::string_view inside = text.substr(0, close);
  std::size_t slash = inside.find('/'), colon = inside.rfind(':');
  if (slash == std::string_view::npos || colon == std::string_view::npos || colon < slash) {
    return std::nullopt;
  }
  Line l;
  l.level = inside.substr(0, slash);
  if (l.level.empty() ||
      !std::all_of(l.level.begin(), l.level.end(), [](char c) { return c >= 'A' && c <= 'Z'; })) {
    return std::nullopt;
  }
  l.process = inside.substr(slash + 1, colon - slash - 1);
  if (l.process.empty() || !all_digits(inside.substr(colon + 1))) return std::nullopt;
  l.pid = static_cast<pid_t>(std::stol(std::string(inside.substr(colon + 1))));
  text.remove_prefix(close + 2);
  std::size_t sep = text.find(": ");
  if (sep == 0 || sep == std::string_view::npos) return std::nullopt;
  l.logger = text.substr(0, sep);
  l.message = text.substr(sep + 2);
  // "w<worker> #<seq> <payload>"
  std::string_view m = l.message;
  std::size_t sp1 = m.find(" #"), sp2 = m.find(' ', sp1 + 2);
  if (m.size() > 1 && m[0] == 'w' && sp1 != std::string_view::npos &&
      sp2 != std::string_view::npos && all_digits(m.substr(1, sp1 - 1)) &&
      all_digits(m.substr(sp1 + 2, sp2 - sp1 - 2))) {
    std::string_view p = m.substr(sp2 + 1);
    if (std::all_of(p.begin(), p.end(), [](char c) { return c >= 'a' && c <= 'z'; })) {
      l.worker = std::stoi(std::string(m.substr(1, sp1 - 1)));
      l.seq = std::stoi(std::string(m.substr(sp1 + 2, sp2 - sp1 - 2)));
      l.payload = p;
    }
  }
  return l;
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The lines of a file that must end with '\n'; a last line without it is reported whole.
struct FileLines {
  std::vector<std::string> lines;
  bool ends_with_newline = true;
};
FileLines read_lines(const std::filesystem::path& p) {
  FileLines out;
  std::string all = slurp(p);
  if (!all.empty() && all.back() != '\n') out.ends_with_newline = false;
  std::size_t at = 0;
  while (at < all.size()) {
    std::size_t nl = all.find('\n', at);
    if (nl == std::string::npos) nl = all.size();
    out.lines.push_back(all.substr(at, nl - at));
    at = nl + 1;
  }
  return out;
}

// A scratch directory removed at the end of the test.
struct Scratch {
  std::filesystem::path dir;
  explicit Scratch(const std::string& name) : dir(testing::scratch_dir(name)) {
    std::filesystem::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::filesystem::path file(const std::string& name) const { return dir / name; }
};

// ---- targets (plain functions, so that every start method can run them) ----------------

// Logs n lines "w<worker> #<seq> <payload>" at info through the logger "worker".
void log_lines(mp::LogQueue q, int worker, int n) {
  mp::log_to_queue(q, mp::Level::debug);
  mp::Logger log{"worker"};
  for (int i = 0; i < n; ++i) log.info("w{} #{} {}", worker, i, payload(worker, i));
}

// Logs big lines until killed.
void log_forever(mp::LogQueue q, int worker) {
  mp::log_to_queue(q, mp::Level::debug);
  mp::Logger log{"worker"};
  for (int i = 0;; ++i) {
    std::string p = big_payload(worker, i);
    log.info("w{} #{} {}", worker, i, p);
  }
}

// Logs one line at each level under a process threshold of warning, and through a logger
// whose own level (debug) replaces it.
void log_each_level(mp::LogQueue q) {
  mp::log_to_queue(q, mp::Level::warning);
  mp::log(mp::Level::debug, "w0 #0 x");
  mp::log(mp::Level::info, "w0 #1 x");
  mp::log(mp::Level::warning, "w0 #2 x");
  mp::log(mp::Level::error, "w0 #3 x");
  mp::log(mp::Level::critical, "w0 #4 x");
  mp::Logger chatty{"chatty", mp::Level::debug};
  chatty.debug("w1 #0 x");
  chatty.info("w1 #1 x");
}

// A pool task: one line, and the pid of the worker that logged it.
int pool_task(int i) {
  mp::log(mp::Level::info, "w0 #{} {}", i, payload(0, i));
  return static_cast<int>(::getpid());
}

// ---- the multi-process case, per start method ---------------------------------------------

void several_workers(const std::string& method) {
  if (!has_method(method)) {
    WARN("start method " << method << " is not available in this build");
    return;
  }
  RestoreLogging restore;
  testing::ShmGuard shm;
  Scratch scratch("mp-test-logging");
  const auto path = scratch.file("run.log");
  auto ctx = mp::get_context(method);
  const int workers = 4, per_worker = 400, from_parent = 50;

  mp::LogQueue q;
  {
    mp::QueueListener listener{q, {mp::file_sink(path.string())}};
    listener.start();
    // The parent logs into the same queue, from its own thread, at the same time.
    mp::log_to_queue(q, mp::Level::info);
    std::vector<mp::Process> procs;
    for (int w = 0; w < workers; ++w) {
      procs.emplace_back(ctx, log_lines, q, w, per_worker);
      procs.back().set_name(fmt::format("logger-{}", w));
    }
    for (auto& p : procs) p.start();
    for (int i = 0; i < from_parent; ++i)
      mp::log(mp::Level::info, "w{} #{} {}", 99, i, payload(99, i));
    std::map<pid_t, int> worker_of;
    for (int w = 0; w < workers; ++w) {
      REQUIRE(procs[static_cast<std::size_t>(w)].join(120s));
      CHECK(procs[static_cast<std::size_t>(w)].exitcode() == 0);
      worker_of[procs[static_cast<std::size_t>(w)].pid()] = w;
    }
    listener.stop();
    CHECK(listener.records() == static_cast<std::uint64_t>(workers * per_worker + from_parent));
    CHECK(listener.failures() == 0);
    CHECK(q.empty());

    // Every line whole and well formed, each worker's lines counted by pid, in order.
    FileLines f = read_lines(path);
    CHECK(f.ends_with_newline);
    REQUIRE(f.lines.size() == static_cast<std::size_t>(workers * per_worker + from_parent));
    std::map<pid_t, int> count;
    std::map<int, int> next_seq;
    int malformed = 0, damaged = 0, misnamed = 0, out_of_order = 0;
    for (const std::string& text : f.lines) {
      auto l = parse(text);
      if (!l || l->worker < 0) {
        ++malformed;
        continue;
      }
      if (l->payload != payload(l->worker, l->seq)) ++damaged;
      ++count[l->pid];
      if (next_seq[l->worker]++ != l->seq) ++out_of_order;
      std::string want_name = l->worker == 99 ? "MainProcess" : fmt::format("logger-{}", l->worker);
      bool pid_right = l->worker == 99 ? l->pid == ::getpid()
                                       : worker_of.count(l->pid) && worker_of[l->pid] == l->worker;
      if (l->process != want_name || !pid_right || l->level != "INFO") ++misnamed;
      if (l->worker != 99 && l->logger != "worker") ++misnamed;
      if (l->worker == 99 && l->logger != "root") ++misnamed;
    }
    CHECK(malformed == 0);
    CHECK(damaged == 0);
    CHECK(misnamed == 0);
    CHECK(out_of_order == 0);
    CHECK(count.size() == static_cast<std::size_t>(workers + 1));
    for (auto& [pid, w] : worker_of) {
      INFO("worker " << w << " pid " << pid);
      CHECK(count[pid] == per_worker);
    }
    CHECK(count[::getpid()] == from_parent);
  }
  CHECK(shm.leaked().empty());
  CHECK(no_zombies());
}

}  // namespace

// ---- cases ---------------------------------------------------------------------------------

TEST_CASE("logging: level names and the default line format", "[logging]") {
  CHECK(mp::level_name(mp::Level::debug) == "DEBUG");
  CHECK(mp::level_name(mp::Level::info) == "INFO");
  CHECK(mp::level_name(mp::Level::warning) == "WARNING");
  CHECK(mp::level_name(mp::Level::error) == "ERROR");
  CHECK(mp::level_name(mp::Level::critical) == "CRITICAL");
  CHECK(mp::level_name(static_cast<mp::Level>(25)) == "LEVEL 25");
  CHECK(static_cast<int>(mp::Level::warning) == 30);  // Python's logging.WARNING

  mp::LogRecord r;
  r.level = mp::Level::error;
  r.logger = "db";
  r.process = "PoolWorker-2";
  r.pid = 4242;
  r.time_ns = std::int64_t{1'700'000'000} * 1'000'000'000 + 123'456'789;
  r.message = "first\nsecond\rthird";
  std::string line = mp::format_record(r);
  INFO(line);
  CHECK(line.find('\n') == std::string::npos);
  auto l = parse(line);
  REQUIRE(l);
  CHECK(l->level == "ERROR");
  CHECK(l->process == "PoolWorker-2");
  CHECK(l->pid == 4242);
  CHECK(l->logger == "db");
  CHECK(l->message == R"(first\nsecond\rthird)");
  CHECK(line.substr(19, 5) == ".123 ");  // milliseconds, truncated
}

TEST_CASE("logging: a record survives the trip through the queue", "[logging]") {
  mp::LogQueue q;
  mp::LogRecord r{mp::Level::critical, "name", "proc", 77, -5, std::string(10000, 'q')};
  q.put(r);
  mp::LogRecord back = q.get();
  CHECK(back.level == r.level);
  CHECK(back.logger == r.logger);
  CHECK(back.process == r.process);
  CHECK(back.pid == r.pid);
  CHECK(back.time_ns == r.time_ns);
  CHECK(back.message == r.message);
}

TEST_CASE("logging: several workers' lines reach one file whole, counted per pid",
          "[logging][processes]") {
  SECTION("fork") { several_workers("fork"); }
  SECTION("spawn") { several_workers("spawn"); }
  SECTION("forkserver") { several_workers("forkserver"); }
}

TEST_CASE("logging: pool workers log through mp::log_to_queue as their initializer",
          "[logging][processes]") {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  testing::ShmGuard shm;
  const int tasks = 60;
  mp::LogQueue q;
  std::mutex mutex;
  std::map<pid_t, int> lines_of;
  std::set<std::string> names;
  int malformed = 0;
  mp::QueueListener listener{q, {mp::LogSink{[&](const mp::LogRecord& r, std::string_view line) {
                               std::lock_guard lock(mutex);
                               auto l = parse(line.substr(0, line.size() - 1));
                               if (line.back() != '\n' || !l || l->pid != r.pid || l->seq < 0 ||
                                   l->payload != payload(0, l->seq)) {
                                 ++malformed;
                               }
                               ++lines_of[r.pid];
                               names.insert(r.process);
                             }}}};
  listener.start();
  std::vector<int> pids;
  {
    mp::Pool pool{2, {mp::log_to_queue, q, mp::Level::info}, 0, mp::get_context(method)};
    std::vector<int> items(tasks);
    for (int i = 0; i < tasks; ++i) items[static_cast<std::size_t>(i)] = i;
    pids = pool.map(pool_task, items);
    pool.close();
    pool.join();
  }
  listener.stop();
  std::map<pid_t, int> tasks_of;
  for (int pid : pids) ++tasks_of[static_cast<pid_t>(pid)];
  std::lock_guard lock(mutex);
  CHECK(malformed == 0);
  CHECK(lines_of == tasks_of);  // one line per task, from the worker that ran it
  for (const auto& n : names) CHECK(n.find("PoolWorker-") != std::string::npos);
  CHECK(shm.leaked().empty());
  CHECK(no_zombies());
}

TEST_CASE("logging: stop() writes every record put before it, later ones wait in the queue",
          "[logging][processes]") {
  RestoreLogging restore;
  Scratch scratch("mp-test-logging-stop");
  const auto path = scratch.file("stop.log");
  mp::LogQueue q;
  // A child logs and exits before any listener runs: its records wait in the queue.
  mp::Process child{mp::get_context("fork"), log_lines, q, 0, 3000};
  child.start();
  REQUIRE(child.join(120s));
  CHECK(child.exitcode() == 0);
  CHECK(q.qsize() == 3000);

  mp::QueueListener listener{q, {mp::file_sink(path.string())}};
  listener.start();
  mp::log_to_queue(q, mp::Level::info);
  for (int i = 0; i < 500; ++i) mp::log(mp::Level::info, "w1 #{} {}", i, payload(1, i));
  listener.stop();  // at once: the thread may not have written anything yet
  CHECK_FALSE(listener.running());
  CHECK(listener.records() == 3500);
  CHECK(read_lines(path).lines.size() == 3500);

  // Put while stopped: they wait, and a second run writes them.
  for (int i = 500; i < 510; ++i) mp::log(mp::Level::info, "w1 #{} {}", i, payload(1, i));
  CHECK(q.qsize() == 10);
  listener.start();
  CHECK_THROWS_AS(listener.start(), mp::ProcessError);
  listener.stop();
  listener.stop();  // harmless
  CHECK(listener.records() == 3510);
  FileLines f = read_lines(path);
  REQUIRE(f.lines.size() == 3510);
  std::map<int, int> next;
  int bad = 0;
  for (const auto& text : f.lines) {
    auto l = parse(text);
    if (!l || l->seq < 0 || l->payload != payload(l->worker, l->seq) ||
        next[l->worker]++ != l->seq) {
      ++bad;
    }
  }
  CHECK(bad == 0);
  CHECK(next[0] == 3000);
  CHECK(next[1] == 510);
  CHECK(no_zombies());
}

TEST_CASE("logging: a worker SIGKILLed mid-logging loses only its own unsent lines",
          "[logging][processes][crash]") {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  testing::ShmGuard shm;
  Scratch scratch("mp-test-logging-kill");
  const auto path = scratch.file("kill.log");
  auto ctx = mp::get_context(method);
  const int per_survivor = 300;
  // A small ring: puts often wait for room, so the kill may also land in a waiting put.
  mp::LogQueue q(0, mp::QueueOptions{256 * 1024});
  std::atomic<int> victim_lines{0};
  mp::QueueListener listener{
      q, {mp::file_sink(path.string()), mp::LogSink{[&](const mp::LogRecord& r, std::string_view) {
            if (r.process == "victim") victim_lines.fetch_add(1);
          }}}};
  listener.start();
  mp::Process victim{ctx, log_forever, q, 0};
  victim.set_name("victim");
  mp::Process s1{ctx, log_lines, q, 1, per_survivor};
  mp::Process s2{ctx, log_lines, q, 2, per_survivor};
  s1.set_name("survivor-1");
  s2.set_name("survivor-2");
  victim.start();
  s1.start();
  s2.start();
  // Kill the victim once 20 of its lines were written (the wait is a hang guard).
  auto guard = std::chrono::steady_clock::now() + 120s;
  while (victim_lines.load() < 20) {
    REQUIRE(std::chrono::steady_clock::now() < guard);
    std::this_thread::sleep_for(1ms);
  }
  victim.kill();  // most likely in the middle of copying a 20-60 KB record
  REQUIRE(victim.join(60s));
  CHECK(victim.exitcode() == -SIGKILL);
  REQUIRE(s1.join(120s));
  REQUIRE(s2.join(120s));
  CHECK(s1.exitcode() == 0);
  CHECK(s2.exitcode() == 0);
  listener.stop();  // returns: the dead put left nothing half-written in the queue
  CHECK(listener.failures() == 0);

  FileLines f = read_lines(path);
  CHECK(f.ends_with_newline);
  std::map<int, int> next;
  int malformed = 0, damaged = 0, gaps = 0;
  for (const auto& text : f.lines) {
    auto l = parse(text);
    if (!l || l->seq < 0) {
      ++malformed;
      continue;
    }
    std::string want = l->worker == 0 ? big_payload(0, l->seq) : payload(l->worker, l->seq);
    if (l->payload != want) ++damaged;
    if (next[l->worker]++ != l->seq) ++gaps;
  }
  CHECK(malformed == 0);
  CHECK(damaged == 0);
  CHECK(gaps == 0);  // the victim's lines are a prefix of what it logged, without holes
  CHECK(next[1] == per_survivor);
  CHECK(next[2] == per_survivor);
  CHECK(next[0] >= 20);
  CHECK(next.size() == 3);
  CHECK(listener.records() == f.lines.size());
  CHECK(shm.leaked().empty());
  CHECK(no_zombies());
}

TEST_CASE("logging: levels filter in the worker, in loggers and in each sink", "[logging]") {
  auto method = GENERATE(from_range(mp::get_all_start_methods()));
  INFO("start method " << method);
  mp::LogQueue q;
  std::vector<std::string> all, errors_only;
  std::mutex mutex;
  {
    mp::QueueListener listener{q,
                               {mp::LogSink{[&](const mp::LogRecord& r, std::string_view) {
                                  std::lock_guard lock(mutex);
                                  all.push_back(r.message);
                                }},
                                mp::LogSink{[&](const mp::LogRecord& r, std::string_view) {
                                              std::lock_guard lock(mutex);
                                              errors_only.push_back(r.message);
                                            },
                                            mp::Level::error}}};
    listener.start();
    mp::Process p{mp::get_context(method), log_each_level, q};
    p.start();
    REQUIRE(p.join(120s));
    CHECK(p.exitcode() == 0);
  }  // the destructor stops the listener, after writing everything
  std::lock_guard lock(mutex);
  CHECK(all == std::vector<std::string>{"w0 #2 x", "w0 #3 x", "w0 #4 x", "w1 #0 x", "w1 #1 x"});
  CHECK(errors_only == std::vector<std::string>{"w0 #3 x", "w0 #4 x"});
  CHECK(no_zombies());
}

namespace {
// Counts how often fmt formats it, to see that a disabled level formats nothing.
struct Counted {
  int* n;
};
}  // namespace
template <>
struct fmt::formatter<Counted> : fmt::formatter<int> {
  auto format(const Counted& c, format_context& ctx) const {
    return fmt::formatter<int>::format(++*c.n, ctx);
  }
};

TEST_CASE("logging: a disabled level costs no formatting; Logger levels", "[logging]") {
  RestoreLogging restore;
  std::vector<mp::LogRecord> got;
  mp::set_log_handler([&](const mp::LogRecord& r) { got.push_back(r); });
  mp::set_log_level(mp::Level::info);
  int formatted = 0;
  mp::log(mp::Level::debug, "{}", Counted{&formatted});
  CHECK(formatted == 0);
  CHECK(got.empty());
  mp::log(mp::Level::info, "{}", Counted{&formatted});
  CHECK(formatted == 1);
  REQUIRE(got.size() == 1);
  CHECK(got[0].message == "1");
  CHECK(got[0].logger == "root");
  CHECK(got[0].pid == ::getpid());
  CHECK(got[0].process == mp::current_process().name);
  CHECK(got[0].time_ns > 0);

  mp::Logger quiet{"quiet", mp::Level::error};
  CHECK(quiet.level() == mp::Level::error);
  quiet.warning("dropped");
  quiet.error("kept");
  quiet.set_level(std::nullopt);  // follows the process threshold again
  CHECK(quiet.level() == mp::Level::info);
  quiet.info("kept too");
  quiet.debug("dropped");
  REQUIRE(got.size() == 3);
  CHECK(got[1].message == "kept");
  CHECK(got[1].level == mp::Level::error);
  CHECK(got[1].logger == "quiet");
  CHECK(got[2].message == "kept too");

  mp::Logger& mp_logger = mp::log_to_stderr(mp::Level::critical);
  CHECK(&mp_logger == &mp::get_logger());
  CHECK(mp_logger.name() == "mp");
  CHECK(mp::log_level() == mp::Level::critical);
  CHECK_FALSE(mp::log_enabled(mp::Level::error));
}

namespace {
// Runs body with stderr sent to a file, and returns what was written to it.
template <class F>
std::string capture_stderr(const std::filesystem::path& p, F body) {
  int saved = ::dup(STDERR_FILENO);
  REQUIRE(saved >= 0);
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(::dup2(fd, STDERR_FILENO) == STDERR_FILENO);
  ::close(fd);
  body();
  REQUIRE(::dup2(saved, STDERR_FILENO) == STDERR_FILENO);
  ::close(saved);
  return slurp(p);
}
}  // namespace

TEST_CASE("logging: without a handler, or when the queue is closed, lines go to stderr",
          "[logging]") {
  RestoreLogging restore;
  Scratch scratch("mp-test-logging-stderr");
  mp::set_log_level(mp::Level::info);
  std::string out = capture_stderr(scratch.file("default"), [] {
    mp::set_log_handler(nullptr);
    mp::log(mp::Level::warning, "w5 #0 {}", payload(5, 0));
  });
  auto l = parse(std::string_view(out).substr(0, out.size() - 1));
  REQUIRE(l);
  CHECK(out.back() == '\n');
  CHECK(l->level == "WARNING");
  CHECK(l->pid == ::getpid());
  CHECK(l->payload == payload(5, 0));

  mp::LogQueue q;
  mp::log_to_queue(q, mp::Level::info);
  q.close();
  out = capture_stderr(scratch.file("closed"),
                       [] { CHECK_NOTHROW(mp::log(mp::Level::error, "after close")); });
  INFO(out);
  CHECK(out.find("after close [mp: sent to stderr: cannot put into the queue: it is closed]") !=
        std::string::npos);
  CHECK(std::count(out.begin(), out.end(), '\n') == 1);

  // A listener on a closed queue drains it and ends by itself; stop() still returns.
  mp::LogQueue q2;
  q2.put(mp::LogRecord{mp::Level::info, "x", "y", 1, 0, "left"});
  q2.close();
  mp::QueueListener listener{q2, {mp::LogSink{[](const mp::LogRecord&, std::string_view) {}}}};
  listener.start();
  listener.stop();
  CHECK(listener.records() == 1);
}

TEST_CASE("logging: a message too large for the queue arrives shortened, as one line",
          "[logging]") {
  RestoreLogging restore;
  mp::LogQueue q(0, mp::QueueOptions{4096});
  mp::log_to_queue(q, mp::Level::info);
  mp::log(mp::Level::info, "{}", std::string(100000, 'x'));
  REQUIRE(q.qsize() == 1);
  mp::LogRecord r = q.get();
  CHECK(r.message.size() < q.max_message_size());
  CHECK(r.message.rfind(std::string(1000, 'x'), 0) == 0);
  CHECK(r.message.find("bytes cut: too large for the log queue]") != std::string::npos);
}

TEST_CASE("logging: a sink that throws is counted, the others still get the record", "[logging]") {
  mp::LogQueue q;
  int good = 0;
  mp::QueueListener listener{
      q,
      {mp::LogSink{[](const mp::LogRecord&, std::string_view) {
         throw std::runtime_error("cannot write the record: the disk is full");
       }},
       mp::LogSink{[&](const mp::LogRecord&, std::string_view) { ++good; }}}};
  for (int i = 0; i < 3; ++i) q.put(mp::LogRecord{mp::Level::info, "x", "y", 1, 0, "m"});
  listener.start();
  listener.stop();
  CHECK(good == 3);
  CHECK(listener.records() == 3);
  CHECK(listener.failures() == 3);
  CHECK(listener.first_failure() == "cannot write the record: the disk is full");
  CHECK_THROWS_WITH(mp::file_sink("/nonexistent-dir/x.log"),
                    Catch::Contains("cannot open the log file /nonexistent-dir/x.log"));
}

TEST_CASE("logging: a fork child's copy of a running listener leaves the parent's alone",
          "[logging][processes]") {
  mp::LogQueue q;
  std::atomic<int> seen{0};
  mp::QueueListener listener{
      q, {mp::LogSink{[&](const mp::LogRecord&, std::string_view) { seen.fetch_add(1); }}}};
  listener.start();
  // The child's copy is not running; stopping it puts no marker and joins nothing.
  mp::Process child{mp::get_context("fork"), [&listener, q]() mutable {
                      if (listener.running()) return 3;
                      listener.stop();
                      mp::log_to_queue(q, mp::Level::info);
                      mp::log(mp::Level::info, "from the child");
                      return 0;
                    }};
  child.start();
  REQUIRE(child.join(120s));
  CHECK(child.exitcode() == 0);
  CHECK(listener.running());
  q.put(mp::LogRecord{mp::Level::info, "x", "y", 1, 0, "from the parent"});
  listener.stop();  // would hang, or miss a record, if the child's stop had ended the thread
  CHECK(listener.records() == 2);
  CHECK(seen.load() == 2);
  CHECK(no_zombies());
}
