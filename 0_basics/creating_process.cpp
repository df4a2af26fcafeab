// creating_process.cpp - Start child processes with mp::Process, pass them arguments, join them.
//
// A child is a copy of the parent made by fork(): it gets its own pid and runs the target
// you gave it with copies of the arguments. The parent waits with join() and reads how the
// child ended from exitcode(); a target that returns an int uses it as its exit status.
//
// Usage: creating_process [--workers N] [--json]
//   $ build/0_basics/creating_process --workers 3
//
// Watch for: every child has its own pid but the same parent pid; the children finish in
// any order, yet join() collects each one; the exit codes carry the children's answers.
#include <fmt/ranges.h>
#include <unistd.h>

#include <mp/process.hpp>
#include <set>
#include <string>
#include <vector>

#include "lesson.hpp"

namespace {

// A target is any callable. This one reports who it is and returns a status.
int greet(const lesson::Lesson& L, int index, std::string text) {
  L.say("  child {}: pid {}, parent {}, name '{}', says '{}'", index, ::getpid(), ::getppid(),
        mp::current_process().name, text);
  return index;  // the exit status the parent will see
}

// Python subclasses Process and overrides run(); in C++ a callable object plays that part:
// its members are the state the child starts with.
struct Countdown {
  int from;
  int operator()() const {
    int steps = 0;
    for (int i = from; i > 0; --i) ++steps;
    return steps == from ? 0 : 3;
  }
};

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Start child processes with mp::Process, pass them arguments, join them."};
  int& workers = L.add_workers(3, 64);
  L.parse(argc, argv);

  return L.run([&] {
    pid_t me = ::getpid();
    L.say("parent: pid {}, name '{}'", me, mp::current_process().name);

    // Step 1: one child, one function, two arguments.
    L.step("one child");
    mp::Process one{greet, std::cref(L), 0, std::string("hello from the child")};
    one.start();
    pid_t one_pid = one.pid();
    one.join();
    L.say("parent: child {} ended, exitcode {}", one_pid, *one.exitcode());

    // Step 2: several children at once. start() them all first, then join() them all:
    // joining right after each start would run them one after another.
    L.step(fmt::format("{} children side by side", workers));
    std::vector<mp::Process> children;
    for (int i = 1; i <= workers; ++i) {
      children.emplace_back(greet, std::cref(L), i, fmt::format("I am number {}", i));
    }
    for (auto& c : children) c.start();
    L.say("parent: active children right after start: {}", mp::active_children().size());
    std::set<pid_t> pids{me};
    std::vector<int> codes;
    for (auto& c : children) {
      pids.insert(c.pid());
      c.join();
      codes.push_back(*c.exitcode());
    }
    L.say("parent: exit codes in start order: {}", codes);

    // Step 3: a callable object with state, and a name of our choosing.
    L.step("a callable object as the target");
    mp::Process counter{Countdown{1000}};
    counter.set_name("countdown");
    counter.start();
    counter.join();
    L.say("parent: '{}' ended with {}", counter.name(), *counter.exitcode());

    // Check what the story claimed.
    bool distinct = pids.size() == static_cast<std::size_t>(workers) + 1;
    bool codes_match = true;
    for (int i = 0; i < workers; ++i) codes_match = codes_match && codes[i] == i + 1;
    bool none_left = mp::active_children().empty();
    L.say("\nevery child had its own pid: {}; exit codes carried the answers: {}", distinct,
          codes_match);
    L.fact("workers", workers);
    L.fact("first_child_exitcode", *one.exitcode());
    L.fact("exitcodes", codes);
    L.fact("distinct_pids", distinct);
    L.fact("callable_object_exitcode", *counter.exitcode());
    L.fact("active_children_after_join", mp::active_children().size());
    return distinct && codes_match && *one.exitcode() == 0 && *counter.exitcode() == 0 &&
           none_left;
  });
}
