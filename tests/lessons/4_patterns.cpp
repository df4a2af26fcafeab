// tests/lessons/4_patterns.cpp - the claims of chapter 4, read from each lesson's --json.
//
// Guarantees are asserted (exactly once, clean ends, order, counts equal to serial); chance
// figures (how often producers blocked, queue depths, speed-ups) are only read, never
// compared with a threshold. Every test also checks that the lesson left nothing behind: no
// /mp-* in /dev/shm, and no process - this test adopts a lesson's orphans, so any child the
// lesson failed to reap or stop would show up here.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "run.hpp"
#include "shm.hpp"
#include "wordcount.hpp"

namespace {

// Runs a lesson with --json and checks that it left no process and no segment behind.
nlohmann::json run_clean(const std::string& id, std::vector<std::string> args) {
  testing::ShmGuard shm;
  testing::adopt_orphans();
  auto r = testing::run_lesson_json(id, std::move(args));
  CHECK(r["children_left"] == 0);
  CHECK(testing::no_children());
  CHECK(shm.leaked().empty());
  return r;
}

// A bad value: exit 2, one line on stderr, nothing on stdout.
void check_usage_error(const std::string& id, const std::vector<std::string>& args) {
  std::vector<std::string> argv{testing::lesson_binary(id)};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = testing::run(argv);
  INFO(id << " " << args.front() << " " << (args.size() > 1 ? args[1] : ""));
  CHECK(r.exit_code == 2);
  CHECK(r.out.empty());
  CHECK(testing::count_lines(r.err) == 1);
}

void write_file(const std::filesystem::path& p, const std::string& bytes) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f << bytes;
  REQUIRE(f.good());
}

}  // namespace

// ---- producer_consumer ---------------------------------------------------------------------

TEST_CASE(
    "4_patterns/producer_consumer: every item exactly once, the bound holds, a killed "
    "consumer loses at most the item it held and none twice",
    "[lessons][4_patterns]") {
  auto work_us = GENERATE("20", "0");  // consumers slower than producers, then faster
  INFO("--work-us " << work_us);
  auto r = run_clean("4_patterns/producer_consumer",
                     {"--producers", "3", "--consumers", "4", "--items", "3000", "--maxsize", "8",
                      "--work-us", work_us, "--seed", "5"});
  CHECK(r["producers"] == 3);
  CHECK(r["consumers"] == 4);
  for (const char* round : {"bounded", "unbounded"}) {
    INFO(round);
    const auto& b = r[round];
    CHECK(b["puts"] == 9000);
    CHECK(b["recorded"] == 9000);
    CHECK(b["counts_match"] == true);
    CHECK(b["checksums_match"] == true);
    CHECK(b["lost"] == 0);
    CHECK(b["duplicated"] == 0);
    CHECK(b["corrupt"] == 0);
    CHECK(b["exactly_once"] == true);
    CHECK(b["all_exited_cleanly"] == true);
    std::uint64_t per_consumer = 0;
    for (const auto& n : b["per_consumer"]) per_consumer += n.get<std::uint64_t>();
    CHECK(per_consumer == 9000);
    // Reported figures: within their natural ranges, nothing more.
    CHECK(b["blocked_puts"].get<std::uint64_t>() <= 9000);
    CHECK(b["full_fraction"].get<double>() >= 0.0);
    CHECK(b["full_fraction"].get<double>() <= 1.0);
  }
  CHECK(r["bounded"]["depth_max"].get<int>() <= 8);
  CHECK(r["unbounded"]["blocked_puts"] == 0);  // an unbounded queue never makes a put wait
  CHECK(r["bound_held"] == true);

  const auto& k = r["killed"];
  CHECK(k["killed"] == true);
  CHECK(k["victim_exitcode"] == -9);
  CHECK(k["duplicated"] == 0);
  CHECK(k["corrupt"] == 0);
  CHECK(k["lost"].get<int>() <= 1);  // a consumer holds one item at a time
  CHECK(k["recorded"].get<int>() + k["lost"].get<int>() == 9000);
  CHECK(k["lost_items"].size() == k["lost"].get<std::size_t>());
  CHECK(k["all_exited_cleanly"] == true);
  CHECK(k["per_consumer"].size() == 5);  // four consumers and the replacement
  CHECK(r["kill_accounted"] == true);
}

TEST_CASE("4_patterns/producer_consumer: a single producer and consumer, and one item",
          "[lessons][4_patterns]") {
  auto r = run_clean("4_patterns/producer_consumer",
                     {"--producers", "1", "--consumers", "1", "--items", "1", "--maxsize", "1"});
  CHECK(r["bounded"]["exactly_once"] == true);
  CHECK(r["unbounded"]["exactly_once"] == true);
  CHECK(r["killed"]["killed"] == true);
  CHECK(r["killed"]["lost"].get<int>() + r["killed"]["recorded"].get<int>() == 1);
}

TEST_CASE("4_patterns/producer_consumer: bad values exit 2 with one line",
          "[lessons][4_patterns]") {
  for (std::vector<std::string> bad : {std::vector<std::string>{"--consumers", "0"},
                                       {"--producers", "0"},
                                       {"--items", "-5"},
                                       {"--items", "0"},
                                       {"--maxsize", "0"},
                                       {"--work-us", "-1"},
                                       {"--consumers", "many"}}) {
    check_usage_error("4_patterns/producer_consumer", bad);
  }
}

// ---- worker_pool_pattern -------------------------------------------------------------------

TEST_CASE(
    "4_patterns/worker_pool_pattern: results by id, remote errors, a crash fails its task "
    "only, stop drains or cancels, the Pool agrees",
    "[lessons][4_patterns]") {
  auto r = run_clean("4_patterns/worker_pool_pattern", {"--workers", "3", "--items", "20"});
  CHECK(r["workers"] == 3);
  // The seed's re-queueing lookup: n(n+1)/2 gets and n(n-1)/2 puts for n results.
  CHECK(r["requeue_gets"] == 210);
  CHECK(r["requeue_puts"] == 190);
  CHECK(r["results_match_serial"] == true);
  CHECK(r["routed_by_id"].get<int>() <= 20);
  CHECK(r["remote_error_type"] == "std::domain_error");
  CHECK_THAT(r["remote_error_what"].get<std::string>(), Catch::Contains("job 7 refuses to run"));
  CHECK(r["same_workers_after_exception"] == true);
  CHECK(r["lost_task_named"] == true);
  CHECK(r["lost_signal"] == "SIGKILL");
  CHECK(r["crashes"] == 1);
  CHECK(r["workers_started"] == 4);  // three, and the replacement
  CHECK(r["after_crash_ok"] == true);
  CHECK(r["drained"] == 20);
  CHECK(r["unfinished_after_drain"] == 0);
  CHECK(r["cancel_batch"] == 12);
  CHECK(r["cancel_done"].get<int>() + r["cancel_cancelled"].get<int>() == 12);
  CHECK(r["cancel_done"].get<int>() >= 1);  // the first one was awaited before stop()
  CHECK(r["all_answered"] == true);
  CHECK(r["same_results_as_pool"] == true);
}

TEST_CASE("4_patterns/worker_pool_pattern: one worker, one task", "[lessons][4_patterns]") {
  auto r = run_clean("4_patterns/worker_pool_pattern", {"--workers", "1", "--items", "1"});
  CHECK(r["requeue_gets"] == 1);
  CHECK(r["requeue_puts"] == 0);
  CHECK(r["workers_started"] == 2);
  CHECK(r["cancel_done"].get<int>() + r["cancel_cancelled"].get<int>() == 4);
}

TEST_CASE("4_patterns/worker_pool_pattern: bad values exit 2 with one line",
          "[lessons][4_patterns]") {
  check_usage_error("4_patterns/worker_pool_pattern", {"--items", "0"});
  check_usage_error("4_patterns/worker_pool_pattern", {"--items", "-3"});
  check_usage_error("4_patterns/worker_pool_pattern", {"--workers", "0"});
}

// ---- pipeline_fanout_fanin -----------------------------------------------------------------

TEST_CASE(
    "4_patterns/pipeline_fanout_fanin: several workers end on their markers, and the "
    "reordered output equals the serial one",
    "[lessons][4_patterns]") {
  auto r = run_clean("4_patterns/pipeline_fanout_fanin",
                     {"--workers", "4", "--items", "400", "--ordered", "--cost-us", "20"});
  CHECK(r["ordered"] == true);
  CHECK(r["serial"]["items"] == 400);
  for (const char* run : {"one_worker", "fanout"}) {
    INFO(run);
    CHECK(r[run]["items"] == 400);
    CHECK(r[run]["words"] == r["serial"]["words"]);
    CHECK(r[run]["marker_items"] == 400);
    CHECK(r[run]["clean_exit"] == true);
    for (const char* stage : {"read", "transform", "aggregate"}) {
      CHECK(r[run]["stages"][stage]["items"] == 400);
    }
  }
  CHECK(r["one_worker"]["end_markers"] == 1);
  CHECK(r["one_worker"]["out_of_order"] == 0);  // FIFO queues, one process per stage
  CHECK(r["fanout"]["end_markers"] == 4);
  CHECK(r["fanout"]["stages"]["transform"]["processes"] == 4);
  CHECK(r["one_worker_output_equals_serial"] == true);
  CHECK(r["output_equals_serial"] == true);
  CHECK(r["same_items_as_serial"] == true);
  CHECK(r["end_markers_ok"] == true);
  CHECK(r["everyone_ended"] == true);
}

TEST_CASE("4_patterns/pipeline_fanout_fanin: unordered, the same results as a set",
          "[lessons][4_patterns]") {
  auto r = run_clean("4_patterns/pipeline_fanout_fanin",
                     {"--workers", "3", "--items", "300", "--cost-us", "0", "--maxsize", "2"});
  CHECK(r["ordered"] == false);
  CHECK(r["fanout"]["items"] == 300);
  CHECK(r["fanout"]["end_markers"] == 3);
  CHECK(r["same_items_as_serial"] == true);
  CHECK(r["fanout"]["max_buffered"] == 0);  // no reorder buffer without --ordered
  // Whether the output happened to be in order is chance: read, not asserted.
  CHECK(r["output_equals_serial"].is_boolean());
}

TEST_CASE("4_patterns/pipeline_fanout_fanin: the slowest stage is the one it names",
          "[lessons][4_patterns]") {
  // One stage does 1 ms of CPU per item more than the others: far beyond their own cost.
  auto slow = GENERATE("read", "transform", "aggregate");
  INFO("--slow " << slow);
  auto r = run_clean(
      "4_patterns/pipeline_fanout_fanin",
      {"--workers", "2", "--items", "60", "--ordered", "--slow", slow, "--cost-us", "1000"});
  CHECK(r["one_worker"]["slowest_stage"] == slow);
  CHECK(r["fanout"]["slowest_stage"] == slow);
  CHECK(r["output_equals_serial"] == true);
}

TEST_CASE("4_patterns/pipeline_fanout_fanin: a small file, fewer lines than asked for",
          "[lessons][4_patterns]") {
  auto dir = testing::scratch_dir("mp-lesson-pipeline");
  write_file(dir / "three.txt", "one line\nTwo lines\nthree, no newline");
  auto r = run_clean(
      "4_patterns/pipeline_fanout_fanin",
      {"--workers", "3", "--items", "100", "--ordered", "--input", (dir / "three.txt").string()});
  CHECK(r["serial"]["items"] == 3);
  CHECK(r["serial"]["words"] == 7);
  CHECK(r["fanout"]["items"] == 3);
  CHECK(r["fanout"]["end_markers"] == 3);
  CHECK(r["output_equals_serial"] == true);
  std::filesystem::remove_all(dir);
}

TEST_CASE("4_patterns/pipeline_fanout_fanin: bad values exit 2 with one line",
          "[lessons][4_patterns]") {
  for (std::vector<std::string> bad : {std::vector<std::string>{"--items", "-1"},
                                       {"--input", "/nonexistent/mp-no-such-file"},
                                       {"--slow", "write"},
                                       {"--maxsize", "0"},
                                       {"--cost-us", "-5"}}) {
    check_usage_error("4_patterns/pipeline_fanout_fanin", bad);
  }
}

// ---- mapreduce_example ---------------------------------------------------------------------

TEST_CASE("4_patterns/mapreduce_example: the default text, counts equal to serial",
          "[lessons][4_patterns]") {
  auto r = run_clean("4_patterns/mapreduce_example", {"--mappers", "2", "--reducers", "3"});
  CHECK(r["input"] == wordcount::kDefaultInput);
  CHECK(r["counts_equal_serial"] == true);
  CHECK(r["differing_words"] == 0);
  CHECK(r["total_words"] == r["serial_total_words"]);
  CHECK(r["distinct_words"] == r["serial_distinct_words"]);
  CHECK(r["total_words"].get<int>() > 0);
  CHECK(r["top"].size() == 10);
  CHECK(r["partition_sizes"].size() == 3);
  CHECK(r["words_in_two_partitions"] == 0);
  CHECK(r["misrouted_pairs"] == 0);
  // The combiner sends at most one pair per word and chunk.
  CHECK(r["shuffled_pairs"].get<int>() <= r["total_words"].get<int>());
  // The top list is what the test's own serial count says.
  auto serial = wordcount::count(wordcount::read_input(wordcount::kDefaultInput).bytes);
  auto want = wordcount::top(serial, 10);
  for (std::size_t i = 0; i < want.size(); ++i) {
    CHECK(r["top"][i][0] == want[i].first);
    CHECK(r["top"][i][1] == want[i].second);
  }
}

TEST_CASE(
    "4_patterns/mapreduce_example: tricky text - an empty file, words across chunk "
    "boundaries, non-ASCII letters, no trailing newline",
    "[lessons][4_patterns]") {
  auto dir = testing::scratch_dir("mp-lesson-mapreduce");
  std::string long_words;
  for (int i = 0; i < 40; ++i)
    long_words +=
        i % 8 == 7 ? "supercalifragilisticexpialidocious\n" : "supercalifragilisticexpialidocious ";
  write_file(dir / "a" / "empty.txt", "");
  write_file(dir / "a" / "no_newline.txt", "Tail words END");  // must not join the next file
  write_file(dir / "a" / "unicode.txt", "Été ÉTÉ été straße STRASSE Жук жук naïve\n");
  write_file(dir / "b" / "crlf.txt", "one two\r\nthree one\r\n");
  write_file(dir / "b" / "nested" / "long.txt", long_words + "don't Don't DON'T 'quoted'\n");
  // By count, then by the words' bytes.
  nlohmann::json want = nlohmann::json::array({{"supercalifragilisticexpialidocious", 40},
                                               {"don't", 3},
                                               {"été", 3},
                                               {"one", 2},
                                               {"жук", 2},
                                               {"end", 1},
                                               {"naïve", 1},
                                               {"quoted", 1},
                                               {"strasse", 1},
                                               {"straße", 1},
                                               {"tail", 1},
                                               {"three", 1},
                                               {"two", 1},
                                               {"words", 1}});

  // Many more chunks than words: almost every cut is first placed inside a word.
  auto chunks = GENERATE("1", "7", "300", "5000");
  INFO("--chunks " << chunks);
  auto r = run_clean("4_patterns/mapreduce_example",
                     {"--input", dir.string(), "--mappers", "3", "--reducers", "4", "--chunks",
                      chunks, "--top", "100"});
  CHECK(r["files"] == 5);
  CHECK(r["counts_equal_serial"] == true);
  CHECK(r["total_words"] == 59);
  CHECK(r["distinct_words"] == 14);
  CHECK(r["top"] == want);
  CHECK(r["words_in_two_partitions"] == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("4_patterns/mapreduce_example: one file, and an input with no words at all",
          "[lessons][4_patterns]") {
  auto dir = testing::scratch_dir("mp-lesson-mapreduce-one");
  SECTION("any text file: the counts equal a serial count of it") {
    write_file(dir / "text.txt", "The cat and the hat.\nThe END, the end");
    auto r = run_clean("4_patterns/mapreduce_example",
                       {"--input", (dir / "text.txt").string(), "--chunks", "9", "--top", "3"});
    CHECK(r["files"] == 1);
    CHECK(r["counts_equal_serial"] == true);
    CHECK(r["total_words"] == 9);
    CHECK(r["distinct_words"] == 5);
    CHECK(r["top"] == nlohmann::json::array({{"the", 4}, {"end", 2}, {"and", 1}}));
  }
  SECTION("an empty file") {
    write_file(dir / "empty.txt", "");
    auto r = run_clean("4_patterns/mapreduce_example", {"--input", (dir / "empty.txt").string()});
    CHECK(r["counts_equal_serial"] == true);
    CHECK(r["total_words"] == 0);
    CHECK(r["distinct_words"] == 0);
    CHECK(r["top"].empty());
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("4_patterns/mapreduce_example: bad values exit 2 with one line",
          "[lessons][4_patterns]") {
  for (std::vector<std::string> bad : {std::vector<std::string>{"--input", "/nonexistent/mp-none"},
                                       {"--input"},
                                       {"--mappers", "0"},
                                       {"--reducers", "0"},
                                       {"--top", "0"},
                                       {"--chunks", "-1"}}) {
    check_usage_error("4_patterns/mapreduce_example", bad);
  }
}
