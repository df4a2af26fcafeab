// tests/support/run.hpp - runs a program and captures what it printed and how it ended.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace testing {

struct RunResult {
  int exit_code = -1;  // the exit status, or -signal when a signal ended it
  std::string out;
  std::string err;
  bool timed_out = false;
};

// Runs argv[0] with the arguments. A program still running after `timeout` is killed
// (timed_out is then true): a hang guard, never a speed check.
RunResult run(const std::vector<std::string>& argv,
              std::chrono::seconds timeout = std::chrono::seconds(120));

// The number of lines in s (a last line without '\n' counts).
int count_lines(const std::string& s);

// Makes this process the reaper of its descendants' orphans (PR_SET_CHILD_SUBREAPER): a
// program that run() starts and that exits leaving processes behind hands them to this
// process, where no_children() sees them. Call it before run().
void adopt_orphans();

// True when this process has no child at all: none running, no zombie.
bool no_children();

}  // namespace testing

#include <filesystem>
#include <nlohmann/json.hpp>

#include "catalogue.hpp"

namespace testing {

// Runs build/<id> with args plus --json and returns the report. Fails the calling test
// (Catch2 REQUIREs inside) unless it exits 0 with exactly one JSON object and ok == true.
nlohmann::json run_lesson_json(const std::string& id, std::vector<std::string> args = {});

// The command the tour runs for a lesson, with `args` instead of its tour arguments: its
// runner (mpirun...) first, and before it the variables it needs that the environment does
// not set (through /usr/bin/env).
std::vector<std::string> tour_command(const playground::LessonEntry& e,
                                      const std::vector<std::string>& args);

// Runs a lesson as the tour does, with `args` plus --json; checks as run_lesson_json does.
nlohmann::json run_lesson_json(const playground::LessonEntry& e, std::vector<std::string> args);

// The path of a lesson binary: build/<chapter>/<name>.
std::string lesson_binary(const std::string& id);

// A directory name for a test's files, unique to this test process: /tmp/<name>-<pid>.
// Not created; the test removes it.
std::filesystem::path scratch_dir(const std::string& name);

// Whether the file at p starts with the PNG signature.
bool is_png(const std::filesystem::path& p);

}  // namespace testing
