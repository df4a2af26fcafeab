// launcher/main.cpp - the compiled half of ./playground: list, run, tour, bench.
//
// ./playground builds the project, then runs this program with its own arguments.
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "catalogue.hpp"

extern char** environ;

namespace {

using playground::catalogue;
using playground::LessonEntry;

const LessonEntry* find_lesson(const std::string& id) {
  for (const auto& e : catalogue()) {
    if (e.id == id) return &e;
  }
  return nullptr;
}

// A null-terminated array of pointers into `words`, for exec and posix_spawn.
std::vector<char*> c_strings(const std::vector<std::string>& words) {
  std::vector<char*> out;
  for (const auto& w : words) out.push_back(const_cast<char*>(w.c_str()));
  out.push_back(nullptr);
  return out;
}

// How a lesson is started: the command (its runner first, if it has one) and the
// environment (ours, plus the variables it needs that we do not set).
struct Launch {
  std::vector<std::string> argv;
  std::vector<std::string> env;
};

Launch make_launch(const LessonEntry& e, const std::vector<std::string>& args) {
  Launch l{playground::lesson_command(e, args), {}};
  for (char** v = environ; *v; ++v) l.env.emplace_back(*v);
  for (auto& kv : playground::lesson_env_additions(e)) l.env.push_back(std::move(kv));
  return l;
}

int cmd_list() {
  std::string chapter;
  for (const auto& e : catalogue()) {
    std::string ch = e.id.substr(0, e.id.find('/'));
    if (ch != chapter) {
      fmt::print("{}{}\n", chapter.empty() ? "" : "\n", ch);
      chapter = ch;
    }
    fmt::print("  {:<32} {}\n", e.id.substr(e.id.find('/') + 1), e.summary);
    if (!e.runner.empty()) {  // say how run and tour start it: "mpirun -np 2 ..."
      std::string how = e.runner[0].substr(e.runner[0].rfind('/') + 1);
      for (std::size_t i = 1; i < e.runner.size(); ++i) how += " " + e.runner[i];
      fmt::print("  {:<32} (run and tour start it with {})\n", "", how);
    }
  }
  fmt::print("\nrun one with: ./playground run <chapter/lesson> [-- args]\n");
  return 0;
}

int cmd_run(const std::string& id, const std::vector<std::string>& args) {
  const LessonEntry* e = find_lesson(id);
  if (!e) {
    fmt::print(stderr, "playground: no lesson '{}' (see ./playground list)\n", id);
    return 2;
  }
  Launch l = make_launch(*e, args);
  auto argv = c_strings(l.argv);
  auto envp = c_strings(l.env);
  ::execvpe(argv[0], argv.data(), envp.data());
  fmt::print(stderr, "playground: cannot run {}: {}\n", l.argv[0], std::strerror(errno));
  return 1;
}

// How long a lesson may run in the tour before it is stopped (ctest allows the same), and
// how long it then has to end after SIGTERM. PLAYGROUND_LESSON_TIMEOUT (seconds) changes
// the limit, for slow machines.
constexpr auto kLessonLimit = std::chrono::seconds(120);
constexpr auto kGrace = std::chrono::seconds(2);

// The limit: kLessonLimit, or PLAYGROUND_LESSON_TIMEOUT. Nothing when that is not a number
// of seconds from 0 to 86400.
std::optional<std::chrono::seconds> lesson_limit() {
  const char* v = std::getenv("PLAYGROUND_LESSON_TIMEOUT");
  if (!v) return kLessonLimit;
  char* end = nullptr;
  errno = 0;
  long s = std::strtol(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || s < 0 || s > 86400) return std::nullopt;
  return std::chrono::seconds(s);
}

// How a lesson run in the tour ended.
struct Outcome {
  bool ok = false;
  std::string why;  // when not ok: "exit status 1", "killed by signal 11", "timed out"...
};

// Runs a lesson (through its runner, if it has one) with its output in `log`. A lesson
// still running after `limit` gets SIGTERM, then SIGKILL; its children die with it (mp
// gives them a parent-death signal; mpirun passes SIGTERM on to its ranks, and the MPI
// lesson's ranks die with their launcher). It stays in our process group, so that Ctrl-C
// reaches it too.
Outcome run_logged(const LessonEntry& e, const std::string& log, std::chrono::seconds limit) {
  std::string path = playground::lesson_path(e);
  auto fail = [&](const char* what, int err) {
    return Outcome{false, fmt::format("cannot {} for {}: {}", what, path, std::strerror(err))};
  };
  posix_spawn_file_actions_t fa;
  if (int rc = posix_spawn_file_actions_init(&fa)) return fail("set up posix_spawn", rc);
  int rc = posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log.c_str(),
                                            O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (rc == 0) rc = posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  if (rc == 0) rc = posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  Launch l = make_launch(e, e.args);
  auto argv = c_strings(l.argv);
  auto envp = c_strings(l.env);
  pid_t pid = 0;
  if (rc == 0) rc = ::posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return fail("start the lesson", rc);

  // Wait, looking every 20 ms. Past the limit: SIGTERM, and SIGKILL if it is still there
  // after a grace period. Until it is reaped its pid cannot be reused, so the signals
  // cannot reach another process.
  using Clock = std::chrono::steady_clock;
  auto deadline = Clock::now() + limit;
  bool timed_out = false;
  bool killed = false;
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r == -1 && errno == EINTR) continue;
    if (r == -1) return fail("wait for the lesson", errno);
    if (!timed_out && Clock::now() >= deadline) {
      timed_out = true;
      ::kill(pid, SIGTERM);
      deadline = Clock::now() + kGrace;
    } else if (timed_out && !killed && Clock::now() >= deadline) {
      killed = true;
      ::kill(pid, SIGKILL);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (timed_out) return {false, fmt::format("timed out after {} s", limit.count())};
  if (WIFEXITED(status)) {
    if (WEXITSTATUS(status) == 0) return {true, ""};
    return {false, fmt::format("exit status {}", WEXITSTATUS(status))};
  }
  return {false, fmt::format("killed by signal {}", WTERMSIG(status))};
}

int cmd_tour(const std::string& filter) {
  struct Row {
    std::string id;
    double seconds;
    Outcome outcome;
    std::string log;
  };
  std::vector<Row> rows;
  std::vector<const LessonEntry*> todo;
  for (const auto& e : catalogue()) {
    if (filter.empty() || e.id.find(filter) != std::string::npos) todo.push_back(&e);
  }
  std::optional<std::chrono::seconds> found_limit = lesson_limit();
  if (!found_limit) {
    fmt::print(stderr,
               "playground: PLAYGROUND_LESSON_TIMEOUT must be a number of seconds (0 to 86400)\n");
    return 2;
  }
  std::chrono::seconds limit = *found_limit;
  if (todo.empty()) {
    fmt::print(stderr, "playground: no lesson matches '{}' (see ./playground list)\n", filter);
    return 2;
  }
  std::string logdir = MP_BUILD_DIR "/tour";
  if (::mkdir(logdir.c_str(), 0755) == -1 && errno != EEXIST) {
    fmt::print(stderr, "playground: cannot create {}: {}\n", logdir, std::strerror(errno));
    return 1;
  }
  bool tty = ::isatty(STDOUT_FILENO);
  for (std::size_t i = 0; i < todo.size(); ++i) {
    const LessonEntry& e = *todo[i];
    fmt::print("{}[{}/{}] {:<44}", tty ? "\r" : "", i + 1, todo.size(), e.id);
    std::fflush(stdout);
    std::string log = logdir + "/" + e.id.substr(0, e.id.find('/')) + "__" +
                      e.id.substr(e.id.find('/') + 1) + ".log";
    auto t0 = std::chrono::steady_clock::now();
    Outcome outcome = run_logged(e, log, limit);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!tty) fmt::print("{}\n", outcome.ok ? "ok" : "FAILED (" + outcome.why + ")");
    rows.push_back({e.id, s, std::move(outcome), log});
  }
  if (tty) fmt::print("\r{:<60}\r", "");

  fmt::print("\n{:<44} {:>8}  {}\n", "lesson", "seconds", "ok");
  fmt::print("{:-<44} {:->8}  {:-<6}\n", "", "", "");
  int failed = 0;
  double total = 0;
  for (const auto& r : rows) {
    fmt::print("{:<44} {:>8.2f}  {}\n", r.id, r.seconds,
               r.outcome.ok ? "yes" : "NO (" + r.outcome.why + ")");
    total += r.seconds;
    if (!r.outcome.ok) ++failed;
  }
  fmt::print("{:-<44} {:->8}  {:-<6}\n", "", "", "");
  fmt::print("{:<44} {:>8.2f}  {}/{} ok\n", "total", total, rows.size() - failed, rows.size());
  for (const auto& r : rows) {
    if (r.outcome.ok) continue;
    fmt::print(stderr, "\n--- {} failed ({}); its output ({}):\n", r.id, r.outcome.why, r.log);
    std::ifstream in(r.log);
    std::stringstream ss;
    ss << in.rdbuf();
    fmt::print(stderr, "{}", ss.str());
  }
  return failed == 0 ? 0 : 1;
}

// The whole comparison: mp, the raw floor and Python, with the CSV and the chart written
// under build/bench/ of the source tree. Arguments after -- are added (--filter, --repeat...).
int cmd_bench(const std::vector<std::string>& args) {
  const LessonEntry* e = find_lesson("6_performance/ipc_benchmark");
  if (!e) {
    fmt::print(stderr, "playground: the benchmark (6_performance/ipc_benchmark) is not built\n");
    return 1;
  }
  std::vector<std::string> all{"--compare-python", "--out", MP_SOURCE_DIR "/build/bench"};
  all.insert(all.end(), args.begin(), args.end());
  return cmd_run(e->id, all);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mp-playground: lessons in multiprocess programming, and the mp library",
               "playground"};
  app.require_subcommand(1);
  auto* list = app.add_subcommand("list", "list the lessons, one line each");
  std::string run_id;
  std::vector<std::string> run_args;
  auto* run = app.add_subcommand("run", "run one lesson: run <chapter/lesson> [-- args]");
  run->add_option("lesson", run_id, "the lesson, as chapter/name")->required();
  run->add_option("args", run_args, "arguments for the lesson (after --)");
  std::string tour_filter;
  auto* tour = app.add_subcommand("tour", "run every lesson with small defaults");
  tour->add_option("--filter", tour_filter, "only lessons whose id contains this text");
  std::vector<std::string> bench_args;
  auto* bench = app.add_subcommand(
      "bench", "run the IPC benchmark beside raw syscalls and Python; results in build/bench/");
  bench->add_option("args", bench_args, "arguments for the benchmark (after --)");
  app.add_subcommand("test", "build and run every test (handled by ./playground itself)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    fmt::print("{}", app.help());
    return 0;
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "playground: {} (try --help)\n", e.what());
    return 2;
  }
  if (*list) return cmd_list();
  if (*run) return cmd_run(run_id, run_args);
  if (*tour) return cmd_tour(tour_filter);
  if (*bench) return cmd_bench(bench_args);
  fmt::print(stderr, "playground: 'test' is run by ./playground itself (ctest)\n");
  return 2;
}
