// common/lesson.hpp - what every lesson binary shares: flags, story vs --json, exit codes.
//
//   int main(int argc, char** argv) {
//     lesson::Lesson L{MP_LESSON_ID, "Start a child process and join it."};
//     int workers = L.add_workers(3);             // --workers N (1..256)
//     L.parse(argc, argv);                        // --help exits 0, a usage error exits 2
//     return L.run([&] {                          // an exception: "error: ..." and exit 1
//       L.say("started {} workers", workers);     // story text; silent with --json
//       L.fact("workers", workers);               // a claim, reported by --json
//       return workers > 0;                       // ok: exit 0 when true, 1 when false
//     });
//   }
//
// MP_LESSON_ID ("chapter/name") is defined by mp_add_lesson() in cmake/MpLesson.cmake.
#pragma once

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace lesson {

class Lesson {
 public:
  Lesson(std::string id, std::string summary);

  CLI::App& cli() noexcept { return app_; }

  // Common flags, with their usual ranges. Each returns the default until parse().
  // The reference stays valid: the value lives in this object.
  int& add_workers(int default_value, int max = 256);
  int& add_items(int default_value, int min = 1, int max = 100'000'000);
  std::uint64_t& add_seed(std::uint64_t default_value = 1);

  // Parses argv. --help prints the usage and exits 0; a usage error prints one line on
  // stderr and exits 2.
  void parse(int argc, char** argv);

  bool json() const noexcept { return json_; }
  const std::string& id() const noexcept { return id_; }

  // Story text for people, on stdout; nothing with --json.
  template <class... Args>
  void say(fmt::format_string<Args...> f, Args&&... args) const {
    if (!json_) fmt::print("{}\n", fmt::format(f, std::forward<Args>(args)...));
  }
  // A heading for a step of the story.
  void step(std::string_view title) const;

  // A fact the lesson claims; --json reports every fact, the tests assert them.
  template <class T>
  void fact(const std::string& key, T&& value) {
    facts_[key] = std::forward<T>(value);
  }
  nlohmann::json& facts() noexcept { return facts_; }

  // Runs the lesson body (returning ok), prints the --json report or the closing line,
  // and returns the exit status: 0 when ok, 1 when not ok or when the body threw.
  int run(const std::function<bool()>& body);

 private:
  std::string id_;
  CLI::App app_;
  bool json_ = false;
  int workers_ = 0;
  int items_ = 0;
  std::uint64_t seed_ = 0;
  nlohmann::json facts_ = nlohmann::json::object();
};

// The path of `program` in one of $PATH's directories (the first executable one), or
// nothing: for lessons that use an optional tool (gnuplot, python3) and say so when it is
// missing.
std::optional<std::string> find_program(std::string_view program);

// Seconds since `start`, as a double: for the timings lessons print.
double seconds_since(std::chrono::steady_clock::time_point start);

}  // namespace lesson
