// process_inheritance.cpp - What a child inherits from its parent under fork, spawn and forkserver.
//
// The parent changes its own state - opens descriptors with and without O_CLOEXEC, sets an
// environment variable, changes directory, lowers a resource limit, installs a signal
// handler, ignores and blocks signals, writes a global - and then starts one child per
// start method. Each child checks each item and answers in its exit status, one bit per
// item. fork copies everything; spawn (an exec) keeps descriptors without O_CLOEXEC, the
// environment, cwd, limits, ignored signals and the mask, but resets handlers and memory;
// a forkserver child inherits from the server, which was started before these changes.
//
// Usage: process_inheritance [--json]
//   $ build/5_advanced/process_inheritance
//
// Watch for: O_CLOEXEC matters only at exec, so a fork child still has the descriptor;
// forkserver children see none of the parent's later changes.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mp/process.hpp>
#include <string>
#include <vector>

#include "lesson.hpp"

namespace {

// What the parent sets before the children start.
const char* const kItems[] = {"fd_without_cloexec", "fd_with_cloexec", "environment",
                              "cwd",                "rlimit_nofile",   "signal_handler",
                              "signal_ignored",     "signal_mask",     "memory"};
constexpr int kItemCount = 9;

int g_runtime_value = 0;  // 0 in a fresh image; the parent sets 42 at run time
void on_usr1(int) {}

// What each child checks; bit i of the exit status set = item i inherited. Exit statuses
// have 8 bits, so the ninth item (memory) answers with 0 or 1 in a second run.
struct Expect {
  int plain_fd, cloexec_fd;
  char cwd[256];
  rlim_t nofile;
};

// The descriptor is open and is the /dev/null the parent opened (not some other file that
// happens to have the same number in this process).
bool is_dev_null(int fd) {
  struct stat a {}, b {};
  return ::fstat(fd, &a) == 0 && ::stat("/dev/null", &b) == 0 && a.st_rdev == b.st_rdev &&
         S_ISCHR(a.st_mode);
}

std::vector<bool> check_all(const Expect& e) {
  struct sigaction sa {};
  sigaction(SIGUSR1, nullptr, &sa);
  struct sigaction ign {};
  sigaction(SIGUSR2, nullptr, &ign);
  sigset_t mask;
  sigprocmask(SIG_BLOCK, nullptr, &mask);
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  const char* env = std::getenv("MP_LESSON_INHERITED");
  std::error_code ec;
  return {is_dev_null(e.plain_fd),
          is_dev_null(e.cloexec_fd),
          env && std::string(env) == "from-parent",
          std::filesystem::current_path(ec) == std::filesystem::path(e.cwd),
          rl.rlim_cur == e.nofile,
          sa.sa_handler != SIG_DFL && sa.sa_handler != SIG_IGN,
          ign.sa_handler == SIG_IGN,
          sigismember(&mask, SIGWINCH) == 1,
          g_runtime_value == 42};
}

int child_low_bits(Expect e) {
  auto r = check_all(e);
  int bits = 0;
  for (int i = 0; i < 8; ++i) bits |= r[i] ? 1 << i : 0;
  return bits;
}
int child_memory_bit(Expect e) { return check_all(e)[8] ? 1 : 0; }

int run_child(const std::string& method, int (*f)(Expect), const Expect& e) {
  mp::Process p{mp::get_context(method), f, e};
  p.start();
  p.join();
  if (*p.exitcode() < 0) throw std::runtime_error(method + " child was killed by a signal");
  return *p.exitcode();
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "What a child inherits from its parent under fork, spawn and forkserver."};
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: start the forkserver now, before the parent changes anything.
    run_child("forkserver", child_memory_bit, Expect{});

    // Step 2: change the parent's state, item by item.
    Expect e{};
    e.plain_fd = ::open("/dev/null", O_RDONLY);
    e.cloexec_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (e.plain_fd == -1 || e.cloexec_fd == -1) mp::throw_errno("open /dev/null");
    if (::setenv("MP_LESSON_INHERITED", "from-parent", 1) == -1) mp::throw_errno("set MP_LESSON_INHERITED");
    auto old_cwd = std::filesystem::current_path();
    auto tmp = std::filesystem::temp_directory_path();
    std::filesystem::current_path(tmp);
    std::snprintf(e.cwd, sizeof e.cwd, "%s", std::filesystem::current_path().c_str());
    rlimit old_rl{};
    if (getrlimit(RLIMIT_NOFILE, &old_rl) == -1) mp::throw_errno("read RLIMIT_NOFILE");
    rlimit rl = old_rl;
    rl.rlim_cur = std::min<rlim_t>(old_rl.rlim_cur, 1000) - 1;
    if (setrlimit(RLIMIT_NOFILE, &rl) == -1) mp::throw_errno("lower RLIMIT_NOFILE");
    e.nofile = rl.rlim_cur;
    auto old_usr1 = std::signal(SIGUSR1, on_usr1);
    auto old_usr2 = std::signal(SIGUSR2, SIG_IGN);
    sigset_t block, old_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGWINCH);
    sigprocmask(SIG_BLOCK, &block, &old_mask);
    g_runtime_value = 42;

    // Step 3: one child per start method checks every item.
    L.step("inherited by the child?");
    std::vector<std::string> methods = mp::get_all_start_methods();
    L.say("{:<20} {:>6} {:>6} {:>11}", "item", methods[0], methods[1], methods[2]);
    nlohmann::json table;
    std::vector<std::vector<bool>> got;
    for (const auto& m : methods) {
      int low = run_child(m, child_low_bits, e);
      int mem = run_child(m, child_memory_bit, e);
      std::vector<bool> row;
      for (int i = 0; i < 8; ++i) row.push_back(low & (1 << i));
      row.push_back(mem == 1);
      got.push_back(row);
    }
    for (int i = 0; i < kItemCount; ++i) {
      L.say("{:<20} {:>6} {:>6} {:>11}", kItems[i], got[0][i] ? "yes" : "no",
            got[1][i] ? "yes" : "no", got[2][i] ? "yes" : "no");
      for (std::size_t m = 0; m < methods.size(); ++m) table[methods[m]][kItems[i]] = bool(got[m][i]);
    }
    L.fact("inherited", table);

    // Step 4: put the parent back as it was.
    sigprocmask(SIG_SETMASK, &old_mask, nullptr);
    std::signal(SIGUSR1, old_usr1);
    std::signal(SIGUSR2, old_usr2);
    setrlimit(RLIMIT_NOFILE, &old_rl);
    std::filesystem::current_path(old_cwd);
    ::unsetenv("MP_LESSON_INHERITED");
    ::close(e.plain_fd);
    ::close(e.cloexec_fd);

    // What POSIX promises: fork copies all; exec keeps all but O_CLOEXEC descriptors,
    // caught handlers and memory; the forkserver predates every change.
    bool fork_all = std::all_of(got[0].begin(), got[0].end(), [](bool b) { return b; });
    std::vector<bool> spawn_expected{true, false, true, true, true, false, true, true, false};
    bool server_none = std::none_of(got[2].begin(), got[2].end(), [](bool b) { return b; });
    L.say("\nfork inherits everything: {}; spawn keeps what exec keeps: {}; forkserver "
          "children see none of it: {}",
          fork_all, got[1] == spawn_expected, server_none);
    return fork_all && got[1] == spawn_expected && server_none;
  });
}
