// semaphores.cpp - A Semaphore admits K processes at once: BoundedSemaphore catches over-release.
//
// Ten downloads, but the server allows only K connections: each worker takes a unit of
// the semaphore before it "downloads" and gives it back after. A shared counter, updated
// under its own lock, records how many are inside and the most there ever were: never
// more than K. A plain Semaphore can be released more often than acquired (its value
// grows, as in Python); a BoundedSemaphore treats that as the bug it usually is.
//
// Usage: semaphores [--workers N] [--slots K] [--items N] [--json]
//   $ build/1_synchronization/semaphores --workers 10 --slots 3
//
// Watch for: "inside" never above K while the downloads overlap; the value of the plain
// semaphore climbing past its start; the BoundedSemaphore's error.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

// Children print a line at once: into a pipe, stdout would keep it until the child exits.
template <class... Args>
void tell(bool story, fmt::format_string<Args...> f, Args&&... args) {
  if (!story) return;
  fmt::print(f, std::forward<Args>(args)...);
  std::fflush(stdout);
}

struct Room {
  int inside;      // downloads running now
  int max_inside;  // the most ever running at once
  int done;        // downloads finished
};

void download(int id, mp::Semaphore slots, mp::Value<Room> room, int files, bool story) {
  for (int f = 0; f < files; ++f) {
    std::lock_guard slot{slots};  // acquire(): waits while K downloads run
    int now = 0;
    {
      std::lock_guard g{room.get_lock()};
      Room& r = room.get_obj();
      now = ++r.inside;
      r.max_inside = std::max(r.max_inside, now);
    }
    tell(story, "  worker {} downloads file {} ({} running)\n", id, f, now);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the download
    std::lock_guard g{room.get_lock()};
    --room.get_obj().inside;
    ++room.get_obj().done;
  }  // release(): the next one may start
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{
      MP_LESSON_ID,
      "A Semaphore admits K processes at once: BoundedSemaphore catches over-release."};
  int& workers = L.add_workers(10, 64);
  int& files = L.add_items(2, 1, 10'000);
  int slots_n = 3;
  L.cli()
      .add_option("--slots", slots_n, "how many may download at once (K)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: K slots, more workers than slots.
    L.step(fmt::format("{} workers, {} slots, {} files each", workers, slots_n, files));
    mp::Semaphore slots(slots_n);
    mp::Value<Room> room;
    std::vector<mp::Process> procs;
    for (int i = 0; i < workers; ++i) {
      procs.emplace_back(download, i, slots, room, files, !L.json());
    }
    for (auto& p : procs) p.start();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    Room r = room.value();
    L.say("finished {} downloads; at most {} ran at once (limit {}); slots free again: {}", r.done,
          r.max_inside, slots_n, slots.get_value());
    bool within = r.max_inside >= 1 && r.max_inside <= slots_n;

    // Step 2: a plain Semaphore accepts a release it never gave out.
    L.step("one release too many");
    mp::Semaphore plain(2);
    plain.release();
    L.say("Semaphore(2) after an extra release(): value {}", plain.get_value());

    // Step 3: a BoundedSemaphore refuses it.
    mp::BoundedSemaphore bounded(2);
    bounded.acquire();
    bounded.release();  // fine: it was taken
    bool refused = false;
    try {
      bounded.release();  // not fine: nothing was taken
    } catch (const mp::ProcessError& e) {
      refused = true;
      L.say("BoundedSemaphore(2), released once too often: ProcessError: {}", e.what());
    }

    L.fact("workers", workers);
    L.fact("slots", slots_n);
    L.fact("files_each", files);
    L.fact("downloads_done", r.done);
    L.fact("max_inside", r.max_inside);
    L.fact("never_above_slots", within);
    L.fact("slots_free_after", slots.get_value());
    L.fact("plain_value_after_extra_release", plain.get_value());
    L.fact("bounded_over_release_refused", refused);
    L.fact("bounded_value_after", bounded.get_value());
    return all_ok && within && r.done == workers * files && r.inside == 0 &&
           slots.get_value() == slots_n && plain.get_value() == 3 && refused &&
           bounded.get_value() == 2;
  });
}
