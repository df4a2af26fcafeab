// bench_tools.cpp - see bench_tools.hpp.
#include "bench_tools.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <mp/detail/fd.hpp>
#include <mp/error.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "lesson.hpp"

extern char** environ;

namespace bench {
namespace {

using Clock = std::chrono::steady_clock;

// A started child: killed with its whole process group and reaped when the guard goes out
// of scope before wait_until() saw it end, on any path (a timeout, an error, an exception).
class ChildGuard {
 public:
  ChildGuard(pid_t pid, std::string name) : pid_(pid), name_(std::move(name)) {}
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  ~ChildGuard() {
    if (pid_ <= 0) return;
    ::kill(-pid_, SIGKILL);  // not reaped yet, so the group id cannot belong to anyone else
    while (::waitpid(pid_, nullptr, 0) == -1 && errno == EINTR) {
    }
  }

  // Waits until the child ends or `deadline` passes. Returns its exit status (or -signal),
  // or nothing when time ran out (the destructor then kills it).
  std::optional<int> wait_until(Clock::time_point deadline) {
    for (;;) {
      int status = 0;
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == -1 && errno == EINTR) continue;
      if (r == -1) mp::throw_errno("wait for " + name_);
      if (r == pid_) {
        pid_ = 0;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      }
      if (Clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

 private:
  pid_t pid_;
  std::string name_;
};

// fork() + exec of argv in a child with stdin from /dev/null, stdout and stderr into
// `out_w`, a process group of its own, default signal handling, and SIGKILL when this
// process dies (so a killed benchmark leaves no Python behind). A failed exec comes back
// as an exception, through a close-on-exec pipe.
pid_t start_child(const std::vector<std::string>& argv, int null_fd, int out_w) {
  const std::string& name = argv.at(0);
  // Everything the child needs is prepared here: between fork and exec it may only make
  // async-signal-safe calls (another thread of ours may hold the allocator's lock).
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int e[2];
  if (::pipe2(e, O_CLOEXEC) == -1) mp::throw_errno("create a pipe to start " + name);
  mp::detail::UniqueFd err_r{e[0]}, err_w{e[1]};
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == -1) mp::throw_errno("fork to start " + name);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the parent died before prctl
    ::setpgid(0, 0);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; ++sig) ::sigaction(sig, &dfl, nullptr);  // fails harmlessly
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (::dup2(null_fd, 0) != -1 && ::dup2(out_w, 1) != -1 && ::dup2(out_w, 2) != -1) {
      ::execve(args[0], args.data(), environ);
    }
    int err = errno;
    (void)!::write(err_w.get(), &err, sizeof err);
    ::_exit(127);
  }
  // Also from this side, so that the group exists before anyone signals it (the child may
  // not have run yet; after its exec this fails harmlessly).
  ::setpgid(pid, pid);
  err_w.reset();
  int err = 0;
  ssize_t n = mp::detail::retry_eintr([&] { return ::read(err_r.get(), &err, sizeof err); });
  if (n != 0) {  // exec failed (the child is exiting), or we cannot tell: stop it
    if (n == -1) err = errno;
    ::kill(pid, SIGKILL);
    while (::waitpid(pid, nullptr, 0) == -1 && errno == EINTR) {
    }
    errno = n == static_cast<ssize_t>(sizeof err) || n == -1 ? err : EIO;
    mp::throw_errno("start " + name);
  }
  return pid;
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
  auto deadline = Clock::now() + limit;
  int p[2];
  if (::pipe2(p, O_CLOEXEC) == -1) mp::throw_errno("create a pipe for the output of " + name);
  mp::detail::UniqueFd out_r{p[0]}, out_w{p[1]};
  mp::detail::UniqueFd null{::open("/dev/null", O_RDONLY | O_CLOEXEC)};
  if (!null) mp::throw_errno("open /dev/null for " + name);
  ChildGuard child{start_child(argv, null.get(), out_w.get()), name};
  out_w.reset();  // only the child writes: end of file once it (and its children) are done

  // Read until end of file, then wait for the child to end, all before the deadline.
  auto out_of_time = [&] {
    return std::runtime_error(
        fmt::format("{} did not finish within {} s, so it was killed", name, limit.count()));
  };
  Ran ran;
  char buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) throw out_of_time();
    pollfd pfd{out_r.get(), POLLIN, 0};
    int r = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (r == -1 && errno == EINTR) continue;
    if (r == -1) mp::throw_errno("poll the output of " + name);
    if (r == 0) continue;  // the deadline is checked above
    ssize_t n = mp::detail::retry_eintr([&] { return ::read(out_r.get(), buf, sizeof buf); });
    if (n == -1) mp::throw_errno("read the output of " + name);
    if (n == 0) break;
    ran.output.append(buf, static_cast<std::size_t>(n));
  }
  std::optional<int> code = child.wait_until(deadline);
  if (!code) throw out_of_time();
  ran.exit_code = *code;
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
  // The report is the last line that is a JSON object with a figure; anything after it
  // (a warning Python prints at exit, say) is ignored.
  nlohmann::json j;
  for (std::size_t end = ran.output.size(); end > 0 && j.is_null();) {
    std::size_t begin = ran.output.rfind('\n', end - 1);
    begin = begin == std::string::npos ? 0 : begin + 1;
    std::string_view line(ran.output.data() + begin, end - begin);
    if (!line.empty() && line.front() == '{') {
      auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (parsed.is_object() && parsed.contains("value") && parsed["value"].is_number() &&
          parsed.contains("unit")) {
        j = std::move(parsed);
      }
    }
    end = begin == 0 ? 0 : begin - 1;
  }
  if (j.is_null()) {
    throw std::runtime_error(fmt::format("python/{} printed no figure; its last line: {}", script,
                                         last_line(ran.output)));
  }
  double value = j["value"].get<double>();
  if (j["unit"] != unit || !std::isfinite(value) || value <= 0) {
    throw std::runtime_error(
        fmt::format("python/{} reported {} {}, expected a positive figure in {}", script,
                    j["value"].dump(), j["unit"].dump(), unit));
  }
  return value;
}

std::filesystem::path gnuplot_png(const std::string& gnuplot, const std::filesystem::path& dir,
                                  const std::string& name, const std::string& data,
                                  const std::string& commands, int width, int height) {
  auto dat = dir / (name + ".dat"), script = dir / (name + ".gp"), png = dir / (name + ".png");
  auto write = [](const std::filesystem::path& path, const std::string& text) {
    std::ofstream out(path);
    out << text;
    out.close();
    if (!out) throw std::runtime_error(fmt::format("cannot write {}", path.string()));
  };
  write(dat, data);
  write(script, fmt::format("set terminal png size {},{} noenhanced\n"
                            "set output '{}'\n"
                            "datafile = '{}'\n"
                            "{}",
                            width, height, png.string(), dat.string(), commands));
  Ran ran = run_program({gnuplot, script.string()}, std::chrono::seconds(60));
  if (ran.exit_code != 0) {
    throw std::runtime_error(fmt::format("cannot draw {}: gnuplot failed: {}", png.string(),
                                         last_line(ran.output)));
  }
  return png;
}

std::string human(double v) {
  if (v >= 1e9) return fmt::format("{:.3g} G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.3g} M", v / 1e6);
  if (v >= 1e4) return fmt::format("{:.3g} k", v / 1e3);
  if (v >= 100) return fmt::format("{:.0f}", v);
  return fmt::format("{:.3g}", v);
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

std::uint64_t hash_chain(std::uint64_t seed, long steps) {
  std::uint64_t x = seed;
  for (long i = 0; i < steps; ++i) {
    x += 0x9e3779b97f4a7c15ULL;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    x = z ^ (z >> 31);
  }
  return x;
}

double hash_chain_rate(long probe, int tries) {
  double best = 1e300;
  for (int i = 0; i < tries; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    volatile std::uint64_t sink = hash_chain(static_cast<std::uint64_t>(i), probe);
    (void)sink;
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return static_cast<double>(probe) / best;
}

}  // namespace bench
