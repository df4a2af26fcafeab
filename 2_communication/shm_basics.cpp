// shm_basics.cpp - Share an array with children through named mp::SharedMemory.
//
// The parent creates a segment (a file in /dev/shm named "/mp-..."), fills it with
// 0, 1, 2, ..., and starts workers that attach to it by name and double their slice in
// place: no copies, no messages. Then the segment is closed and unlinked, and last a child
// that created a segment of its own is SIGKILLed before it could unlink it: mp's tracker
// removes the name anyway.
//
// Usage: shm_basics [--workers N] [--items N] [--json]
//   $ build/2_communication/shm_basics --workers 4 --items 1000
//
// Watch for: every worker sees the parent's data by name alone; the parent sees every
// worker's writes without being sent anything; /dev/shm holds the name only while it is
// needed, even when its creator is killed.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <mp/connection.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

bool in_dev_shm(const std::string& name) { return std::filesystem::exists("/dev/shm" + name); }

// A worker attaches by name and doubles elements [from, to).
void double_slice(std::string name, std::size_t from, std::size_t to) {
  auto shm = mp::SharedMemory::attach(name);  // the name is all it needs
  std::span<std::int32_t> values = shm.as<std::int32_t>();
  for (std::size_t i = from; i < to; ++i) values[i] *= 2;
}  // shm.close() here: unmapped in this process; the segment lives on

// Creates a segment, tells the parent its name, and waits to be killed.
void create_and_hang(mp::Connection out) {
  auto shm = mp::SharedMemory::create(1 << 20);
  out.send(shm.name());
  for (;;) ::pause();
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID, "Share an array with children through named mp::SharedMemory."};
  int& workers = L.add_workers(4, 64);
  int& items = L.add_items(1000, 1, 10'000'000);
  L.parse(argc, argv);

  return L.run([&] {
    auto n = static_cast<std::size_t>(items);

    // Step 1: create the segment and fill it.
    L.step("create and fill");
    auto shm = mp::SharedMemory::create(n * sizeof(std::int32_t));
    std::span<std::int32_t> values = shm.as<std::int32_t>();
    for (std::size_t i = 0; i < n; ++i) values[i] = static_cast<std::int32_t>(i);
    bool listed = in_dev_shm(shm.name());
    L.say("created '{}' ({} bytes), visible as /dev/shm{}: {}", shm.name(), shm.size(), shm.name(),
          listed);
    L.say("first values: {}", values.first(std::min<std::size_t>(10, n)));

    // Step 2: workers attach by name and double their slice.
    L.step(fmt::format("{} workers double their slices", workers));
    std::vector<mp::Process> procs;
    for (int w = 0; w < workers; ++w) {
      std::size_t from = n * w / workers, to = n * (w + 1) / workers;
      L.say("worker {} takes [{}, {})", w, from, to);
      procs.emplace_back(double_slice, shm.name(), from, to);
    }
    for (auto& p : procs) p.start();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }

    // Step 3: the parent reads what they wrote.
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += values[i] != static_cast<std::int32_t>(2 * i);
    L.say("first values now: {}", values.first(std::min<std::size_t>(10, n)));
    L.say("last values now: {}", values.last(std::min<std::size_t>(10, n)));
    L.say("elements not doubled: {}", wrong);

    // Step 4: close (unmap here) and unlink (remove the name).
    L.step("close and unlink");
    std::string name = shm.name();
    shm.close();
    shm.unlink();
    bool gone = !in_dev_shm(name);
    bool attach_fails = false;
    try {
      mp::SharedMemory::attach(name);
    } catch (const std::system_error& e) {
      attach_fails = e.code().value() == ENOENT;
      L.say("attach after unlink: {}", e.what());
    }

    // Step 5: a creator that is killed cannot unlink; its tracker does.
    L.step("a creator killed with SIGKILL");
    auto [r, w] = mp::Pipe(false);
    mp::Process victim{create_and_hang, w};
    victim.start();
    w.close();
    std::string orphan = r.recv<std::string>();
    bool orphan_listed = in_dev_shm(orphan);
    victim.kill();
    victim.join();
    // The tracker notices the death and unlinks; give it a moment (a hang guard, not a
    // measurement: it takes well under a millisecond).
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (in_dev_shm(orphan) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    bool orphan_removed = !in_dev_shm(orphan);
    L.say("'{}' was listed: {}; after the SIGKILL ({}) it was removed: {}", orphan, orphan_listed,
          mp::describe_exitcode(*victim.exitcode()), orphan_removed);

    L.fact("items", items);
    L.fact("workers", workers);
    L.fact("name_prefix_mp", name.rfind("/mp-", 0) == 0);
    L.fact("listed_while_open", listed);
    L.fact("workers_ok", all_ok);
    L.fact("not_doubled", wrong);
    L.fact("gone_after_unlink", gone);
    L.fact("attach_after_unlink_fails", attach_fails);
    L.fact("killed_creator_segment_listed", orphan_listed);
    L.fact("killed_creator_segment_removed", orphan_removed);
    return listed && all_ok && wrong == 0 && gone && attach_fails && orphan_listed &&
           orphan_removed;
  });
}
