// tests/support/run.cpp - see run.hpp.
#include "run.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>

extern char** environ;

namespace testing {
namespace {
[[noreturn]] void fail(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), "cannot " + what);
}
}  // namespace

RunResult run(const std::vector<std::string>& args, std::chrono::seconds timeout) {
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) == -1 || ::pipe2(err, O_CLOEXEC) == -1) fail("create pipes");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, err[1], STDERR_FILENO);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  ::close(err[1]);
  if (rc != 0) {
    errno = rc;
    fail("start " + args[0]);
  }
  RunResult r;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  int open_fds = 2;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    int n = ::poll(fds, 2, static_cast<int>(left.count()));
    if (n == -1) {
      if (errno == EINTR) continue;
      fail("poll the output of " + args[0]);
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        sinks[i]->append(buf, static_cast<std::size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) == -1) {
    if (errno != EINTR) fail("wait for " + args[0]);
  }
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  return r;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  if (!s.empty() && s.back() != '\n') ++n;
  return n;
}

void adopt_orphans() {
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) == -1) fail("make this process a child subreaper");
}

bool no_children() {
  siginfo_t info{};
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == -1 && errno == ECHILD;
}

}  // namespace testing

#include <catch2/catch.hpp>

#include "catalogue.hpp"

namespace testing {

std::string lesson_binary(const std::string& id) { return MP_BUILD_DIR "/" + id; }

std::filesystem::path scratch_dir(const std::string& name) {
  return std::filesystem::temp_directory_path() / (name + "-" + std::to_string(::getpid()));
}

bool is_png(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  char magic[8] = {};
  f.read(magic, sizeof magic);
  return f.gcount() == 8 && std::string(magic + 1, 3) == "PNG";
}

namespace {
nlohmann::json checked_report(const std::string& id, const std::vector<std::string>& argv) {
  RunResult r = run(argv);
  INFO(id << " stderr:\n" << r.err);
  REQUIRE_FALSE(r.timed_out);
  REQUIRE(count_lines(r.out) == 1);
  nlohmann::json report = nlohmann::json::parse(r.out);
  INFO("report: " << report.dump());
  REQUIRE(r.exit_code == 0);
  REQUIRE(report.at("lesson") == id);
  REQUIRE(report.at("ok") == true);
  return report;
}
}  // namespace

nlohmann::json run_lesson_json(const std::string& id, std::vector<std::string> args) {
  args.insert(args.begin(), lesson_binary(id));
  args.push_back("--json");
  return checked_report(id, args);
}

std::vector<std::string> tour_command(const playground::LessonEntry& e,
                                      const std::vector<std::string>& args) {
  std::vector<std::string> argv;
  auto added = playground::lesson_env_additions(e);
  if (!added.empty()) {
    argv.push_back("/usr/bin/env");
    argv.insert(argv.end(), added.begin(), added.end());
  }
  auto command = playground::lesson_command(e, args);
  argv.insert(argv.end(), command.begin(), command.end());
  return argv;
}

nlohmann::json run_lesson_json(const playground::LessonEntry& e, std::vector<std::string> args) {
  args.push_back("--json");
  return checked_report(e.id, tour_command(e, args));
}

}  // namespace testing
