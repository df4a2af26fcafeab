// tests/lessons/2_communication.cpp - the claims of chapter 2, read from each lesson's --json.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

#include "run.hpp"

TEST_CASE("2_communication/queues_basic: nothing lost, order per producer, join after "
          "task_done, a child may put and exit",
          "[lessons][2_communication]") {
  auto r = testing::run_lesson_json("2_communication/queues_basic",
                                    {"--workers", "3", "--items", "40"});
  CHECK(r["items_per_round"] == 80);
  CHECK(r["sentinel_round_got"] == 80);
  CHECK(r["close_round_got"] == 80);
  CHECK(r["order_kept_per_producer"] == true);
  CHECK(r["exited_child_items_waiting"] == 10000);
  CHECK(r["exited_child_sum"] == 10000L * 9999 / 2);
  CHECK(r["tasks"] == 160);
  CHECK(r["results_ready_at_join"] == 160);
  CHECK(r["sum_of_squares"] == 160L * 161 * 321 / 6);
  CHECK(r["unfinished_after_join"] == 0);
  CHECK(r["empty_after_timeout"] == true);
}

TEST_CASE("2_communication/priority_queue_example: most urgent first, ties in put order",
          "[lessons][2_communication]") {
  auto r = testing::run_lesson_json("2_communication/priority_queue_example",
                                    {"--workers", "4", "--items", "30", "--seed", "9"});
  CHECK(r["jobs"] == 120);
  CHECK(r["served_by_priority"] == true);
  CHECK(r["ties_in_put_order"] == true);
  CHECK(r["first_priority"] == 0);
  CHECK(r["largest_first_with_greater"] == true);
}

TEST_CASE(
    "2_communication/pipes_basic: a conversation, EOF after exit, wait over workers, "
    "limits",
    "[lessons][2_communication]") {
  auto r =
      testing::run_lesson_json("2_communication/pipes_basic", {"--workers", "3", "--items", "6"});
  CHECK(r["steps"] == 6);
  CHECK(r["progress_reports"] == 6);
  CHECK(r["notes_sent"] == 1);
  CHECK(r["notes_read_by_child"] == 1);
  CHECK(r["eof_after_child_exit"] == true);
  CHECK(r["workers"] == 3);
  CHECK(r["worker_sum"] == 999999L * 1000000L / 2);
  CHECK(r["expected_sum"] == r["worker_sum"]);
  CHECK(r["crasher_exitcode"] == -9);
  CHECK(r["crasher_eof"] == true);
  CHECK(r["oversized_refused"] == true);
  CHECK(r["oversized_nothing_written"] == true);
  CHECK(r["send_to_closed_is_epipe"] == true);
}

TEST_CASE(
    "2_communication/shm_basics: workers attach by name, unlink removes the name, a "
    "killed creator's name is removed",
    "[lessons][2_communication]") {
  auto r =
      testing::run_lesson_json("2_communication/shm_basics", {"--workers", "3", "--items", "999"});
  CHECK(r["items"] == 999);
  CHECK(r["workers_ok"] == true);
  CHECK(r["not_doubled"] == 0);
  CHECK(r["name_prefix_mp"] == true);
  CHECK(r["listed_while_open"] == true);
  CHECK(r["gone_after_unlink"] == true);
  CHECK(r["attach_after_unlink_fails"] == true);
  CHECK(r["killed_creator_segment_listed"] == true);
  CHECK(r["killed_creator_segment_removed"] == true);
}

TEST_CASE(
    "2_communication/array_value_ctypes: exact under get_lock() and fetch_add, whole "
    "struct reads, the array as a serial run computes it",
    "[lessons][2_communication]") {
  auto r = testing::run_lesson_json("2_communication/array_value_ctypes",
                                    {"--workers", "3", "--items", "3000", "--seed", "5"});
  CHECK(r["expected"] == 9000);
  CHECK(r["locked_total"] == 9000);
  CHECK(r["atomic_total"] == 9000);
  // Without a lock, updates may be lost (how many is up to the scheduler), never invented.
  CHECK(r["unlocked_total"] <= 9000);
  CHECK(r["unlocked_lost_updates"] == 9000 - r["unlocked_total"].get<int>());
  CHECK(r["struct_reads"] > 0);
  CHECK(r["struct_torn_reads"] == 0);
  CHECK(r["array_final"].size() == 10);
  CHECK(r["array_matches_serial"] == true);
}

namespace {
// Width and height from a PNG file's IHDR chunk (bytes 16..23, big-endian).
std::pair<long, long> png_size(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char b[24] = {};
  f.read(reinterpret_cast<char*>(b), sizeof b);
  if (!f || std::memcmp(b, "\x89PNG\r\n\x1a\n", 8) != 0) return {-1, -1};
  auto be = [&](int at) {
    return (long{b[at]} << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3];
  };
  return {be(16), be(20)};
}
}  // namespace

TEST_CASE(
    "2_communication/image_sharedmem: bands cover the image, the checksum equals the "
    "serial run's, the pictures are written",
    "[lessons][2_communication]") {
  auto dir =
      std::filesystem::temp_directory_path() / ("mp-lesson-image-" + std::to_string(::getpid()));
  auto r = testing::run_lesson_json(
      "2_communication/image_sharedmem",
      {"--workers", "3", "--width", "101", "--height", "37", "--seed", "7", "--out", dir.string()});
  CHECK(r["width"] == 101);
  CHECK(r["height"] == 37);
  CHECK(r["workers"] == 3);
  CHECK(r["checksum_equals_serial"] == true);
  CHECK(r["checksum"] == r["serial_checksum"]);
  CHECK(r["changed_by_filter"] == true);
  // The bands are contiguous and cover rows 0..36 once.
  int next = 0;
  for (const auto& band : r["bands"]) {
    CHECK(band[0] == next);
    CHECK(band[1] > band[0]);
    next = band[1];
  }
  CHECK(next == 37);
  REQUIRE(r["files"].size() == 2);
  for (const auto& f : r["files"]) CHECK(png_size(f.get<std::string>()) == std::pair{101L, 37L});

  // One worker or seven: the same picture gives the same result.
  auto one = testing::run_lesson_json(
      "2_communication/image_sharedmem",
      {"--workers", "1", "--width", "101", "--height", "37", "--seed", "7"});
  auto seven = testing::run_lesson_json(
      "2_communication/image_sharedmem",
      {"--workers", "7", "--width", "101", "--height", "37", "--seed", "7"});
  CHECK(one["checksum"] == r["checksum"]);
  CHECK(seven["checksum"] == r["checksum"]);
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "2_communication/image_sharedmem: bad sizes are usage errors, an unwritable --out "
    "a clear failure",
    "[lessons][2_communication]") {
  auto bin = testing::lesson_binary("2_communication/image_sharedmem");
  auto zero = testing::run({bin, "--width", "0"});
  CHECK(zero.exit_code == 2);
  CHECK(testing::count_lines(zero.err) == 1);
  auto huge = testing::run({bin, "--height", "100000"});
  CHECK(huge.exit_code == 2);
  auto bad = testing::run({bin, "--width", "8", "--height", "8", "--out", "/proc/no/such/dir"});
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.err, Catch::StartsWith("error: "));
}

TEST_CASE("2_communication/manager_dict_list: update_with and append are exact, the wrong key "
          "is refused, the socket is removed",
          "[lessons][2_communication]") {
  auto r = testing::run_lesson_json("2_communication/manager_dict_list",
                                    {"--workers", "3", "--items", "200"});
  CHECK(r["expected"] == 600);
  CHECK(r["signed_in"] == 3);
  CHECK(r["atomic_count"] == 600);
  CHECK(r["list_size"] == 600);
  // The racy counter is only reported (the race decides); it can never exceed the total.
  CHECK(r["racy_count"].get<long>() <= 600);
  CHECK(r["lost_updates"].get<long>() == 600 - r["racy_count"].get<long>());
  CHECK(r["remote_right_key_exitcode"] == 0);
  CHECK(r["remote_replied"] == true);
  CHECK(r["remote_wrong_key_refused"] == true);
  CHECK(r["served_after_wrong_key"] == true);
  CHECK(r["socket_removed"] == true);
}
