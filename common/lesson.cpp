// common/lesson.cpp - the shared lesson harness (see lesson.hpp).
#include "lesson.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>

namespace lesson {

Lesson::Lesson(std::string id, std::string summary)
    : id_(std::move(id)), app_(std::move(summary), id_.substr(id_.find('/') + 1)) {
  app_.add_flag("--json", json_, "print one JSON object with the facts instead of the story");
  app_.set_help_flag("-h,--help", "print this help and exit");
}

int& Lesson::add_workers(int default_value, int max) {
  workers_ = default_value;
  app_.add_option("-w,--workers", workers_, "number of worker processes")
      ->check(CLI::Range(1, max))
      ->capture_default_str();
  return workers_;
}

int& Lesson::add_items(int default_value, int min, int max) {
  items_ = default_value;
  app_.add_option("-n,--items", items_, "number of items to process")
      ->check(CLI::Range(min, max))
      ->capture_default_str();
  return items_;
}

std::uint64_t& Lesson::add_seed(std::uint64_t default_value) {
  seed_ = default_value;
  app_.add_option("--seed", seed_, "seed for the random choices")->capture_default_str();
  return seed_;
}

void Lesson::parse(int argc, char** argv) {
  try {
    app_.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    fmt::print("{}", app_.help());
    std::exit(0);
  } catch (const CLI::ParseError& e) {
    // One line, then exit 2: a usage error, as the lesson rules say.
    fmt::print(stderr, "{}: {} (try --help)\n", app_.get_name(), e.what());
    std::exit(2);
  }
}

void Lesson::step(std::string_view title) const {
  if (!json_) fmt::print("\n== {}\n", title);
}

int Lesson::run(const std::function<bool()>& body) {
  bool ok = false;
  std::string error;
  try {
    ok = body();
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "an exception that is not a std::exception";
  }
  if (json_) {
    nlohmann::json report = {{"lesson", id_}, {"ok", ok && error.empty()}};
    for (auto& [k, v] : facts_.items()) report[k] = v;
    if (!error.empty()) report["error"] = error;
    // Invalid UTF-8 in a fact (a name read from /proc...) is replaced, never a throw.
    fmt::print("{}\n", report.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  } else if (error.empty()) {
    fmt::print("\n{}: {}\n", id_, ok ? "ok" : "FAILED (a claim did not hold; see above)");
  }
  if (!error.empty()) fmt::print(stderr, "error: {}\n", error);
  std::fflush(stdout);
  return ok && error.empty() ? 0 : 1;
}

namespace {
// A regular file we may execute (access() alone also accepts a directory).
bool executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}
}  // namespace

std::optional<std::string> find_program(std::string_view program) {
  if (program.find('/') != std::string_view::npos) {  // a path already: just check it
    std::string p{program};
    if (executable_file(p)) return p;
    return std::nullopt;
  }
  const char* path = std::getenv("PATH");
  std::string_view dirs = path ? path : "";
  for (std::size_t at = 0; at <= dirs.size();) {
    std::size_t end = std::min(dirs.find(':', at), dirs.size());
    std::string dir{dirs.substr(at, end - at)};
    if (!dir.empty()) {
      std::string candidate = dir + "/" + std::string{program};
      if (executable_file(candidate)) return candidate;
    }
    at = end + 1;
  }
  return std::nullopt;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace lesson
