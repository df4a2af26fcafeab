// tests/lessons/2_communication.cpp - the claims of chapter 2, read from each lesson's --json.
#include <catch2/catch.hpp>

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
