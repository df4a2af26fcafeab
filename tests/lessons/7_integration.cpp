// tests/lessons/7_integration.cpp - the claims of chapter 7, read from each lesson's --json;
// the MPI word count run with 1, 2 and 3 ranks and compared with a serial count made here.
#include <signal.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "catalogue.hpp"
#include "run.hpp"
#include "shm.hpp"
#include "wordcount.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const playground::LessonEntry& entry(const std::string& id) {
  for (const auto& e : playground::catalogue()) {
    if (e.id == id) return e;
  }
  FAIL("no lesson " << id << " in the catalogue");
  throw std::logic_error("unreachable");
}

// A folder of text with the tokenizer's tricky cases, words of a skewed distribution and a
// last line without a newline: the input of the word-count tests.
fs::path make_corpus(const std::string& name) {
  fs::path dir = testing::scratch_dir(name);
  fs::create_directories(dir / "sub");
  {
    std::ofstream a(dir / "a.txt");
    for (int i = 0; i < 200; ++i) {
      a << "The cat, the CAT; the-cat! don't 'quoted' ''' rock'n'roll it\u2019s\n"
        << "Éte ÉTÉ straße Жук жук abc123def x_y line" << i << "\n";
    }
  }
  {
    std::ofstream b(dir / "sub" / "b.txt");
    std::mt19937 rng(7);
    std::vector<std::string> vocabulary;
    for (int i = 0; i < 3000; ++i) {
      std::string w;
      for (int k = 0; k < 2 + i % 9; ++k) w += static_cast<char>('a' + (i * 7 + k * 13) % 26);
      vocabulary.push_back(w);
    }
    std::geometric_distribution<std::size_t> pick(0.002);
    for (int i = 0; i < 40'000; ++i) {
      b << vocabulary[std::min(pick(rng), vocabulary.size() - 1)] << (i % 17 == 0 ? "\n" : " ");
    }
    b << "last words without a newline";
  }
  return dir;
}

// The counts a --out file holds ("word<TAB>count" lines).
wordcount::Counts read_counts(const fs::path& file) {
  wordcount::Counts c;
  std::ifstream f(file);
  for (std::string line; std::getline(f, line);) {
    auto tab = line.find('\t');
    REQUIRE(tab != std::string::npos);
    c[line.substr(0, tab)] = std::stoull(line.substr(tab + 1));
  }
  return c;
}

// The MPI lesson started by mpirun with `ranks` ranks, as its runner does it.
std::vector<std::string> mpirun(int ranks, const std::vector<std::string>& args) {
  const auto& e = entry("7_integration/mpi_mapreduce");
  REQUIRE(!e.runner.empty());
  std::vector<std::string> argv;
  auto added = playground::lesson_env_additions(e);
  if (!added.empty()) {
    argv.push_back("/usr/bin/env");
    argv.insert(argv.end(), added.begin(), added.end());
  }
  argv.insert(argv.end(), {e.runner[0], "-n", std::to_string(ranks), "--oversubscribe",
                           testing::lesson_binary(e.id)});
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

json parse_one_report(const testing::RunResult& r) {
  INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
  REQUIRE_FALSE(r.timed_out);
  REQUIRE(r.exit_code == 0);
  REQUIRE(testing::count_lines(r.out) == 1);
  json report = json::parse(r.out);
  REQUIRE(report.at("ok") == true);
  return report;
}

// Processes whose command line mentions `marker` (a test's scratch path): none may be left.
std::vector<int> processes_mentioning(const std::string& marker) {
  std::vector<int> found;
  for (const auto& d : fs::directory_iterator("/proc")) {
    std::string name = d.path().filename();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    std::ifstream f(d.path() / "cmdline", std::ios::binary);
    std::string cmdline((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (cmdline.find(marker) != std::string::npos) found.push_back(std::stoi(name));
  }
  return found;
}

// What one run of the MPI lesson must show for `input`, with `ranks` ranks.
void check_mpi_report(const json& r, int ranks, const fs::path& input, const fs::path& out) {
  wordcount::Counts serial = wordcount::count(wordcount::read_input(input).bytes);
  CHECK(r["ranks"] == ranks);
  CHECK(r["matches_serial"] == true);
  CHECK(r["words_reduced_once"] == true);
  CHECK(r["total_words"] == wordcount::total(serial));
  CHECK(r["distinct_words"] == serial.size());
  // The gathered counts, written by rank 0, equal the count made here word for word.
  CHECK(read_counts(out) == serial);
  // The top words, by count then word.
  auto top = wordcount::top(serial, r["top"].size());
  REQUIRE(r["top"].size() == top.size());
  for (std::size_t i = 0; i < top.size(); ++i) {
    CHECK(r["top"][i][0] == top[i].first);
    CHECK(r["top"][i][1] == top[i].second);
  }
  // Every rank reported; the pieces cover the text; each word was owned by one rank.
  REQUIRE(r["per_rank"].size() == static_cast<std::size_t>(ranks));
  std::uint64_t bytes = 0, owned = 0, mapped = 0;
  for (const auto& k : r["per_rank"]) {
    bytes += k["piece_bytes"].get<std::uint64_t>();
    owned += k["words_owned"].get<std::uint64_t>();
    mapped += k["words_mapped"].get<std::uint64_t>();
    CHECK(k["map_ms"].get<double>() >= 0);  // a figure, reported
  }
  CHECK(bytes == r["bytes"].get<std::uint64_t>());
  CHECK(owned == serial.size());
  CHECK(mapped == wordcount::total(serial));
}

}  // namespace

// ---- event_loop_bridge ----------------------------------------------------------------

TEST_CASE(
    "7_integration/event_loop_bridge: one thread watches pidfds, pipes, a timer and SIGINT, "
    "results equal serial, SIGINT stops the workers",
    "[lessons][7_integration]") {
  testing::ShmGuard shm;
  auto r = testing::run_lesson_json(
      "7_integration/event_loop_bridge",
      {"--workers", "2", "--items", "100000", "--period", "5", "--interrupt-after", "0.2"});
  CHECK(r["results_match_serial"] == true);
  CHECK(r["all_exited_0"] == true);
  CHECK(r["progress_messages"] == 20);  // 10 slices per worker, every message read
  CHECK(r["parent_threads"] == 1);      // no thread per child
  // The heartbeat's figures are reported, never judged: the machine may be busy.
  CHECK(r["heartbeat_ticks"].get<int>() >= 0);
  CHECK(r["heartbeat_mean_ms"].get<double>() >= 0);
  CHECK(r["heartbeat_max_late_ms"].get<double>() >= 0);
  CHECK(r["period_ms"] == 5);
  // The simulated Ctrl-C: an event in the loop, which stops the endless workers.
  CHECK(r["sigint_handled"] == true);
  CHECK(r["stopped_exitcodes"] == std::vector<int>{-SIGTERM, -SIGTERM});
  CHECK(r["ctrl_c_child_exitcode"] == 0);
  CHECK(r["active_children_after"] == 0);
  CHECK(shm.leaked().empty());
}

TEST_CASE(
    "7_integration/event_loop_bridge: a child that dies while the loop waits on it is "
    "reported at once, not waited for",
    "[lessons][7_integration]") {
  auto workers = GENERATE(1, 3);
  INFO("--workers " << workers);
  auto r = testing::run_lesson_json(
      "7_integration/event_loop_bridge",
      {"--workers", std::to_string(workers), "--items", "50000", "--interrupt-after", "0"});
  CHECK(r["killed_exitcode"] == -SIGKILL);
  CHECK(r["killed_messages"] == 2);  // what it sent before it died was still read
  CHECK(r["killed_eof_seen"] == true);
  CHECK(r["others_match_serial"] == true);
  CHECK(r["active_children_after"] == 0);
}

TEST_CASE("7_integration/event_loop_bridge: bad values are usage errors",
          "[lessons][7_integration]") {
  auto bin = testing::lesson_binary("7_integration/event_loop_bridge");
  for (auto bad : {std::vector<std::string>{"--period", "0"},
                   {"--interrupt-after", "-1"},
                   {"--items", "10"}}) {
    auto r = testing::run({bin, bad[0], bad[1]});
    INFO(bad[0] << " " << bad[1]);
    CHECK(r.exit_code == 2);
    CHECK(testing::count_lines(r.err) == 1);
  }
}

// ---- async_multiprocessing_pattern --------------------------------------------------------

TEST_CASE(
    "7_integration/async_multiprocessing_pattern: coroutines await pool tasks as they "
    "complete, results equal serial, errors and timeouts reach the coroutine",
    "[lessons][7_integration]") {
  testing::ShmGuard shm;
  auto [workers, items] = GENERATE(std::pair{2, 8}, std::pair{1, 3});
  INFO("--workers " << workers << " --items " << items);
  auto r = testing::run_lesson_json(
      "7_integration/async_multiprocessing_pattern",
      {"--workers", std::to_string(workers), "--items", std::to_string(items)});
  CHECK(r["one_result"] == 9592);  // primes below 100000
  CHECK(r["results_match_serial"] == true);
  // Every task was awaited exactly once; the order is chance, reported.
  auto order = r["completion_order"].get<std::vector<std::size_t>>();
  std::sort(order.begin(), order.end());
  std::vector<std::size_t> all(static_cast<std::size_t>(items));
  std::iota(all.begin(), all.end(), 0);
  CHECK(order == all);
  // No thread blocks per pending task: as many threads with all of them as with none.
  CHECK(r["threads_all_pending"] == r["threads_idle"]);
  CHECK(r["threads_one_pending"] == r["threads_idle"]);
  CHECK(r["no_thread_per_pending_task"] == true);
  CHECK(r["resumed_on_loop_thread"] == true);
  // A failing task's exception reaches the awaiting coroutine with its type.
  CHECK(r["remote_error_type"] == "std::domain_error");
  CHECK(r["remote_error_message"] == "cannot count primes below -4");
  CHECK(r["worker_lost_signal"] == "SIGKILL");
  CHECK(r["timeout_caught"] == true);
  CHECK(r["timeout_waited_s"].get<double>() > 0);
  CHECK(r["heartbeat_ticks"].get<int>() >= 0);  // reported
  CHECK(shm.leaked().empty());
}

// ---- tbb_comparison ------------------------------------------------------------------------

TEST_CASE(
    "7_integration/tbb_comparison: threads, processes and one thread count the same words, "
    "a crash kills the TBB run, and only one piece of the pool's",
    "[lessons][7_integration]") {
  testing::ShmGuard shm;
  SECTION("the default input, twice over") {
    auto r = testing::run_lesson_json("7_integration/tbb_comparison",
                                      {"--workers", "2", "--repeat", "2"});
    auto once = wordcount::count(wordcount::read_input(wordcount::kDefaultInput).bytes);
    CHECK(r["total_words"] == 2 * wordcount::total(once));
    CHECK(r["distinct_words"] == once.size());
    CHECK(r["all_equal_serial"] == true);
    REQUIRE(r["runs"].size() == 4);
    std::vector<std::string> names;
    for (const auto& row : r["runs"]) {
      names.push_back(row["name"]);
      CHECK(row["equal"] == true);
      CHECK(row["seconds"].get<double>() > 0);  // figures, reported
      CHECK(row.contains("parent_peak_growth_mib"));
    }
    CHECK(names == std::vector<std::string>{"serial", "tbb threads", "mp::Pool, pieces copied",
                                            "mp::Pool, text shared"});
    CHECK(r["runs"][2].contains("workers_pss_mib"));
    CHECK(r["runs"][3].contains("workers_pss_mib"));
    CHECK(r["crash_pool_pieces_lost"] == 1);
    CHECK(r["crash_pool_pieces_counted"] == r["pieces"].get<int>() - 1);
    CHECK(r["crash_pool_rest_intact"] == true);
    CHECK(r["crash_tbb_exitcode"] == -SIGKILL);
  }
  SECTION("a folder of tricky text, three workers") {
    fs::path dir = make_corpus("mp-tbb-corpus");
    auto r = testing::run_lesson_json("7_integration/tbb_comparison",
                                      {"--workers", "3", "--repeat", "1", "--input", dir.string()});
    auto serial = wordcount::count(wordcount::read_input(dir).bytes);
    CHECK(r["total_words"] == wordcount::total(serial));
    CHECK(r["distinct_words"] == serial.size());
    CHECK(r["all_equal_serial"] == true);
    CHECK(r["crash_pool_rest_intact"] == true);
    fs::remove_all(dir);
  }
  CHECK(shm.leaked().empty());
}

TEST_CASE("7_integration/tbb_comparison: a missing input is an error, a bad repeat a usage one",
          "[lessons][7_integration]") {
  auto bin = testing::lesson_binary("7_integration/tbb_comparison");
  auto missing = testing::run({bin, "--input", "/no/such/input"});
  CHECK(missing.exit_code == 1);
  CHECK_THAT(missing.err, Catch::Contains("cannot read /no/such/input"));
  auto bad = testing::run({bin, "--repeat", "0"});
  CHECK(bad.exit_code == 2);
  CHECK(testing::count_lines(bad.err) == 1);
}

// ---- mpi_mapreduce -------------------------------------------------------------------------

TEST_CASE(
    "7_integration/mpi_mapreduce: 1 rank without mpirun, 2 and 3 ranks with it, the "
    "gathered counts equal a serial count word for word",
    "[lessons][7_integration][mpi]") {
  fs::path dir = make_corpus("mp-mpi-corpus");
  fs::path out = dir.string() + ".counts";
  SECTION("without mpirun: one rank") {
    auto r =
        testing::run_lesson_json("7_integration/mpi_mapreduce",
                                 {"--input", dir.string(), "--out", out.string(), "--top", "7"});
    CHECK(r["under_mpirun"] == false);
    CHECK(r["top"].size() == 7);
    check_mpi_report(r, 1, dir, out);
  }
  SECTION("mpirun -n 1, 2 and 3") {
    auto ranks = GENERATE(1, 2, 3);
    INFO(ranks << " ranks");
    auto r = parse_one_report(
        testing::run(mpirun(ranks, {"--input", dir.string(), "--out", out.string(), "--json"})));
    CHECK(r["under_mpirun"] == true);
    check_mpi_report(r, ranks, dir, out);
  }
  SECTION("the default input, with 2 ranks") {
    auto r = parse_one_report(testing::run(mpirun(2, {"--out", out.string(), "--json"})));
    check_mpi_report(r, 2, wordcount::kDefaultInput, out);
  }
  CHECK(processes_mentioning(dir.string()).empty());  // no rank left behind
  fs::remove_all(dir);
  fs::remove(out);
}

TEST_CASE("7_integration/mpi_mapreduce: less text than ranks, and no text at all",
          "[lessons][7_integration][mpi]") {
  fs::path dir = testing::scratch_dir("mp-mpi-small");
  fs::create_directories(dir);
  fs::path out = dir / "counts";
  auto text = GENERATE(std::string("solo"), std::string(""));
  INFO("text '" << text << "'");
  fs::path input = dir / "input.txt";
  std::ofstream(input) << text;
  auto r = parse_one_report(
      testing::run(mpirun(3, {"--input", input.string(), "--out", out.string(), "--json"})));
  check_mpi_report(r, 3, input, out);
  CHECK(r["distinct_words"] == (text.empty() ? 0 : 1));
  fs::remove_all(dir);
}

TEST_CASE(
    "7_integration/mpi_mapreduce: a missing input ends every rank with an error, and no "
    "rank is left",
    "[lessons][7_integration][mpi]") {
  std::string missing = testing::scratch_dir("mp-mpi-missing").string();
  auto plain =
      testing::run({testing::lesson_binary("7_integration/mpi_mapreduce"), "--input", missing});
  CHECK(plain.exit_code == 1);
  CHECK_THAT(plain.err, Catch::Contains("cannot read " + missing));
  auto r = testing::run(mpirun(2, {"--input", missing}));
  INFO(r.out << r.err);
  CHECK_FALSE(r.timed_out);
  CHECK(r.exit_code != 0);
  CHECK_THAT(r.err, Catch::Contains("cannot read " + missing));
  CHECK(processes_mentioning(missing).empty());
  auto bad = testing::run({testing::lesson_binary("7_integration/mpi_mapreduce"), "--top", "0"});
  CHECK(bad.exit_code == 2);
  CHECK(testing::count_lines(bad.err) == 1);
}

TEST_CASE(
    "7_integration/mpi_mapreduce: ./playground run and tour start it through mpirun with "
    "two ranks",
    "[lessons][7_integration][mpi][launcher]") {
  std::string launcher = MP_BUILD_DIR "/launcher/playground";
  auto r = parse_one_report(
      testing::run({launcher, "run", "7_integration/mpi_mapreduce", "--", "--top", "3", "--json"}));
  CHECK(r["ranks"] == 2);
  CHECK(r["under_mpirun"] == true);
  CHECK(r["matches_serial"] == true);
  CHECK(r["top"].size() == 3);
  auto tour = testing::run({launcher, "tour", "--filter", "7_integration/mpi_mapreduce"});
  INFO(tour.out << tour.err);
  CHECK(tour.exit_code == 0);
  CHECK_THAT(tour.out, Catch::Contains("1/1 ok"));
  std::ifstream log(MP_BUILD_DIR "/tour/7_integration__mpi_mapreduce.log");
  std::stringstream text;
  text << log.rdbuf();
  CHECK_THAT(text.str(), Catch::Contains("2 ranks (started by mpirun)"));
}
