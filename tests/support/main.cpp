// tests/support/main.cpp - Catch2's main(), compiled once for every test binary.
//
// Catch's own handlers for fatal signals are off: forked children inherit them, and a child
// that a test terminates on purpose would print a failure report of its own. ctest still
// reports a test process that crashes.
#define CATCH_CONFIG_NO_POSIX_SIGNALS
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
