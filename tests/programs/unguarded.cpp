// tests/programs/unguarded.cpp - a program linked WITHOUT mp's --wrap=main and without
// mp::freeze_support(): what a user gets who forgets the spawn entry point.
//
// Top level: starts a spawn child, expects start() to fail with a clear ProcessError, prints
// it and exits 3. The re-executed child runs this main() too (that is the mistake); there,
// starting a process must be refused - never a fork bomb - so it prints the refusal, exits 4.
#include <fmt/format.h>

#include <cstring>
#include <mp/process.hpp>

namespace {
void noop() {}
}  // namespace

int main(int argc, char** argv) {
  bool is_child = argc > 1 && std::strncmp(argv[1], "--mp-spawn-child=", 17) == 0;
  try {
    mp::Process p{mp::get_context("spawn"), noop};
    p.start();
    p.join();
    fmt::print("started: exitcode {}\n", *p.exitcode());
    return 0;
  } catch (const mp::ProcessError& e) {
    fmt::print("{}: {}\n", is_child ? "child refused" : "parent error", e.what());
    return is_child ? 4 : 3;
  }
}
