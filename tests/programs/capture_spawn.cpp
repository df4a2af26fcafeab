// tests/programs/capture_spawn.cpp - must NOT compile: a capturing lambda with a start
// method fixed at compile time (mp::spawn). ctest builds it and expects the build to fail.
#include <mp/process.hpp>

int main() {
  int n = 3;
  mp::Process p{mp::spawn, [n] { return n; }};
  p.start();
  p.join();
}
