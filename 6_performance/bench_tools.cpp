// bench_tools.cpp - see bench_tools.hpp.
#include "bench_tools.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mp/detail/fd.hpp>
#include <mp/error.hpp>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <system_error>

#include "lesson.hpp"

extern char** environ;

namespace bench {
namespace {

using Clock = std::chrono::steady_clock;

// posix_spawn's attributes and file actions, destroyed at scope exit.
struct SpawnSetup {
  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  SpawnSetup() {
    if (int e = ::posix_spawnattr_init(&attr)) {
      throw std::system_error(e, std::generic_category(), "cannot set up posix_spawn");
    }
    if (int e = ::posix_spawn_file_actions_init(&actions)) {
      ::posix_spawnattr_destroy(&attr);
      throw std::system_error(e, std::generic_category(), "cannot set up posix_spawn");
    }
  }
  ~SpawnSetup() {
    ::posix_spawn_file_actions_destroy(&actions);
    ::posix_spawnattr_destroy(&attr);
  }
  SpawnSetup(const SpawnSetup&) = delete;
  SpawnSetup& operator=(const SpawnSetup&) = delete;
};

void check(int error, const std::string& what) {
  if (error != 0) throw std::system_error(error, std::generic_category(), "cannot " + what);
}

// Waits for `pid` and returns its exit status, or -signal.
int reap(pid_t pid, const std::string& name) {
  int status = 0;
  if (mp::detail::retry_eintr([&] { return ::waitpid(pid, &status, 0); }) == -1) {
    mp::throw_errno("wait for " + name);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

// The last line of `text` that is not empty, for error messages.
std::string last_line(const std::string& text) {
  std::size_t end = text.find_last_not_of("\r\n");
  if (end == std::string::npos) return "(no output)";
  std::size_t begin = text.rfind('\n', end);
  return text.substr(begin == std::string::npos ? 0 : begin + 1, end + 1 - (begin + 1));
}

}  // namespace

Ran run_program(const std::vector<std::string>& argv, std::chrono::seconds limit) {
  const std::string& name = argv.at(0);
  int p[2];
  if (::pipe2(p, O_CLOEXEC) == -1) mp::throw_errno("create a pipe for the output of " + name);
  mp::detail::UniqueFd out_r{p[0]}, out_w{p[1]};
  mp::detail::UniqueFd null{::open("/dev/null", O_RDONLY | O_CLOEXEC)};
  if (!null) mp::throw_errno("open /dev/null for " + name);

  // The child: stdin from /dev/null, stdout and stderr into the pipe, its own process
  // group (so that a timeout kills Python's children too), default signal handling.
  SpawnSetup s;
  check(::posix_spawn_file_actions_adddup2(&s.actions, null.get(), 0), "redirect stdin");
  check(::posix_spawn_file_actions_adddup2(&s.actions, out_w.get(), 1), "redirect stdout");
  check(::posix_spawn_file_actions_adddup2(&s.actions, out_w.get(), 2), "redirect stderr");
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  check(::posix_spawnattr_setflags(
            &s.attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF),
        "set the spawn flags");
  check(::posix_spawnattr_setpgroup(&s.attr, 0), "set the process group");
  check(::posix_spawnattr_setsigmask(&s.attr, &none), "set the signal mask");
  check(::posix_spawnattr_setsigdefault(&s.attr, &all), "set default signal actions");
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  check(::posix_spawn(&pid, name.c_str(), &s.actions, &s.attr, args.data(), environ),
        "start " + name);
  out_w.reset();  // only the child writes: end of file once it (and its children) are done

  // Read until end of file or the deadline. On any failure the whole group is killed and
  // our child reaped before the error goes up: nothing is left running.
  auto stop_all = [&] {
    int e = errno;
    ::kill(-pid, SIGKILL);
    reap(pid, name);
    errno = e;
  };
  Ran ran;
  auto deadline = Clock::now() + limit;
  char buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    pollfd pfd{out_r.get(), POLLIN, 0};
    int r = left.count() > 0 ? ::poll(&pfd, 1, static_cast<int>(left.count())) : 0;
    if (r == -1 && errno == EINTR) continue;
    if (r == -1) {
      stop_all();
      mp::throw_errno("poll the output of " + name);
    }
    if (r == 0) {
      stop_all();
      throw std::runtime_error(
          fmt::format("{} did not finish within {} s, so it was killed", name, limit.count()));
    }
    ssize_t n = mp::detail::retry_eintr([&] { return ::read(out_r.get(), buf, sizeof buf); });
    if (n == -1) {
      stop_all();
      mp::throw_errno("read the output of " + name);
    }
    if (n == 0) break;
    ran.output.append(buf, static_cast<std::size_t>(n));
  }
  ran.exit_code = reap(pid, name);
  return ran;
}

std::optional<std::string> find_python() {
  const char* chosen = std::getenv("MP_PYTHON");
  return lesson::find_program(chosen && *chosen ? chosen : "python3");
}

std::string python_dir() { return MP_PYTHON_DIR; }

double run_python_workload(const std::string& python, const std::string& script,
                           const std::vector<std::string>& args, long n, const std::string& unit,
                           std::chrono::seconds limit) {
  // -B: no __pycache__ in the source tree.
  std::vector<std::string> argv{python, "-B", python_dir() + "/" + script};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"--n", std::to_string(n)});
  Ran ran = run_program(argv, limit);
  if (ran.exit_code != 0) {
    throw std::runtime_error(fmt::format("python/{} failed ({}): {}", script,
                                         ran.exit_code > 0
                                             ? fmt::format("exit status {}", ran.exit_code)
                                             : fmt::format("signal {}", -ran.exit_code),
                                         last_line(ran.output)));
  }
  // The report is the last line that is a JSON object.
  std::string line = last_line(ran.output);
  nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("value") || !j["value"].is_number() || !j.contains("unit")) {
    throw std::runtime_error(
        fmt::format("python/{} printed no figure; its last line: {}", script, line));
  }
  double value = j["value"].get<double>();
  if (j["unit"] != unit || !std::isfinite(value) || value <= 0) {
    throw std::runtime_error(
        fmt::format("python/{} reported {} {}, expected a positive figure in {}", script,
                    j["value"].dump(), j["unit"].dump(), unit));
  }
  return value;
}

Spread spread_of(std::vector<double> runs) {
  if (runs.empty()) throw std::invalid_argument("cannot take the spread of no runs");
  std::sort(runs.begin(), runs.end());
  std::size_t m = runs.size() / 2;
  double median = runs.size() % 2 ? runs[m] : (runs[m - 1] + runs[m]) / 2;
  return {median, runs.front(), runs.back()};
}

bool is_time(const std::string& unit) { return unit == "us" || unit == "ns" || unit == "ms"; }

double cost_ratio(double a, double b, const std::string& unit) {
  return is_time(unit) ? a / b : b / a;
}

}  // namespace bench
