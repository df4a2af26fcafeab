// memory_overhead_benchmark.cpp - What a process costs in memory: RSS, PSS and USS per start method, pool workers, copy-on-write, threads.
//
// Four measurements, each read with mp::process_stats:
// 1. an idle child under fork, spawn and forkserver: its RSS, PSS and USS;
// 2. a pool of --workers idle workers under each start method, summed;
// 3. copy-on-write made visible: this process fills a --mib buffer, then forks a child
//    that writes to 0%, 10%, 50% and 100% of its pages (one child at a time), and the
//    child's USS and PSS move with the pages it wrote;
// 4. the same number of threads in this one process instead: how much RSS they add.
//
// RSS counts every page a process has in memory; PSS divides each shared page by the
// number of processes that map it; USS counts the pages only this process maps, what its
// exit would give back.
//
// Usage: memory_overhead_benchmark [--workers N] [--mib M] [--quick] [--json]
//   $ build/6_performance/memory_overhead_benchmark --workers 4 --mib 64
//
// Watch for: a fork child's RSS includes everything it shares with its parent, so summing
// RSS over processes overcounts; its USS is tens of KiB until it writes. Each page it
// writes is copied (copy-on-write) and moves from shared to its own: USS grows by the
// bytes written, PSS by half of them (such a page counted half while it was shared).
// A spawn child shares no heap with anyone: its USS is its whole start-up. A thread costs
// its stack's touched pages only.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <latch>
#include <map>
#include <mp/monitor.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::uint64_t kKiB = 1024;
constexpr std::uint64_t kMiB = 1024 * 1024;

// An idle child: says it is ready, then waits to be told to go.
int idle(mp::Event ready, mp::Event stop) {
  ready.set();
  stop.wait();
  return 0;
}

int square(int x) { return x * x; }

std::string kib(std::uint64_t bytes) { return fmt::format("{:.0f}", static_cast<double>(bytes) / kKiB); }

nlohmann::json memory_json(const mp::MemoryInfo& m) {
  return {{"rss", m.rss}, {"pss", m.pss}, {"uss", m.uss}};
}

// USS <= PSS <= RSS: a page of one's own counts whole in all three, a shared one whole in
// RSS only. The kernel's own rounding leaves at most a few KiB of slack.
bool ordered(const mp::MemoryInfo& m) { return m.uss <= m.pss + 8 * kKiB && m.pss <= m.rss + 8 * kKiB; }

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "What a process costs in memory: RSS, PSS and USS per start method, pool "
                   "workers, copy-on-write, threads."};
  int& workers = L.add_workers(4, 64);
  int mib = 64;
  bool quick = false;
  auto* mib_opt = L.cli()
                      .add_option("--mib", mib, "the buffer the copy-on-write children share")
                      ->check(CLI::Range(1, 4096))
                      ->capture_default_str();
  L.cli().add_flag("--quick", quick, "a 16 MiB buffer and 2 workers: a smoke test");
  L.parse(argc, argv);
  if (quick && mib_opt->count() == 0) mib = 16;
  if (quick && L.cli().get_option("--workers")->count() == 0) workers = 2;

  return L.run([&] {
    bool all_ordered = true;
    auto read = [&](pid_t pid) {
      mp::MemoryInfo m = mp::process_stats(pid).memory;
      all_ordered = all_ordered && ordered(m);
      return m;
    };
    const std::vector<std::string> methods = mp::get_all_start_methods();
    mp::MemoryInfo self = read(::getpid());
    L.say("This process ({}): RSS {} KiB, PSS {} KiB, USS {} KiB. Start methods: {}.", ::getpid(),
          kib(self.rss), kib(self.pss), kib(self.uss), fmt::join(methods, ", "));
    L.fact("parent", memory_json(self));

    // Step 1: one idle child per start method, read once it says it is ready.
    L.step("an idle child per start method (KiB)");
    L.say("{:<11} {:>8} {:>8} {:>8}", "method", "RSS", "PSS", "USS");
    nlohmann::json idle_facts = nlohmann::json::object();
    for (const std::string& m : methods) {
      mp::Event ready, stop;
      mp::Process p{mp::get_context(m), idle, ready, stop};
      p.start();
      if (!ready.wait(std::chrono::seconds(60))) {
        throw std::runtime_error(fmt::format("cannot start an idle {} child: it never got ready", m));
      }
      mp::MemoryInfo c = read(p.pid());
      stop.set();
      p.join();
      L.say("{:<11} {:>8} {:>8} {:>8}", m, kib(c.rss), kib(c.pss), kib(c.uss));
      idle_facts[m] = memory_json(c);
      idle_facts[m]["exitcode"] = p.exitcode().value_or(-100);
    }
    L.fact("idle_child", idle_facts);

    // Step 2: a pool of `workers` idle workers per start method, after one map so that
    // every worker has started and taken its first tasks.
    L.step(fmt::format("a pool of {} idle workers per start method (KiB)", workers));
    L.say("{:<11} {:>10} {:>10} {:>10} {:>12}", "method", "RSS sum", "PSS sum", "USS sum",
          "USS/worker");
    nlohmann::json pool_facts = nlohmann::json::object();
    for (const std::string& m : methods) {
      mp::Pool pool{workers, {}, 0, mp::get_context(m)};
      std::vector<int> items(static_cast<std::size_t>(workers) * 8);
      for (std::size_t i = 0; i < items.size(); ++i) items[i] = static_cast<int>(i);
      std::vector<int> got = pool.map(square, items, 1);
      bool right = got.size() == items.size();
      for (std::size_t i = 0; right && i < items.size(); ++i) right = got[i] == items[i] * items[i];
      mp::MemoryInfo sum;
      std::vector<pid_t> pids = pool.worker_pids();
      for (pid_t w : pids) {
        mp::MemoryInfo one = read(w);
        sum.rss += one.rss;
        sum.pss += one.pss;
        sum.uss += one.uss;
      }
      pool.close();
      pool.join();
      std::uint64_t per = pids.empty() ? 0 : sum.uss / pids.size();
      L.say("{:<11} {:>10} {:>10} {:>10} {:>12}", m, kib(sum.rss), kib(sum.pss), kib(sum.uss),
            kib(per));
      pool_facts[m] = memory_json(sum);
      pool_facts[m]["workers"] = pids.size();
      pool_facts[m]["uss_per_worker"] = per;
      pool_facts[m]["map_right"] = right;
    }
    L.fact("pool", pool_facts);

    // Step 3: copy-on-write. Fill a buffer here, so that every page of it is resident and
    // this process's own; then, one at a time, fork a child that writes one byte into
    // each of the first 0%, 10%, 50%, 100% of its pages, and read the child.
    L.step(fmt::format("copy-on-write: a child writes part of a {} MiB buffer it shares (KiB)", mib));
    const std::uint64_t bytes = static_cast<std::uint64_t>(mib) * kMiB;
    const long page = ::sysconf(_SC_PAGESIZE);
    if (page <= 0) throw std::runtime_error("cannot read the page size");
    const std::uint64_t pages = bytes / static_cast<std::uint64_t>(page);
    std::vector<char> buffer(bytes);
    std::memset(buffer.data(), 1, buffer.size());
    mp::MemoryInfo parent_alone = read(::getpid());
    L.say("this process with the buffer: RSS {} KiB, USS {} KiB ({} pages of {} bytes)",
          kib(parent_alone.rss), kib(parent_alone.uss), pages, page);
    L.say("{:>8} {:>10} {:>8} {:>8} {:>8} {:>11} {:>14} {:>12}", "written", "bytes", "RSS", "PSS",
          "USS", "parent PSS", "USS - USS(0%)", "us per page");
    nlohmann::json cow = nlohmann::json::array();
    std::vector<mp::MemoryInfo> readings;
    std::vector<std::uint64_t> written_bytes;
    const mp::Context fork = mp::get_context("fork");
    for (int percent : {0, 10, 50, 100}) {
      mp::Event ready, stop;
      mp::RawValue<double> seconds{0};
      const std::uint64_t n = pages * static_cast<std::uint64_t>(percent) / 100;
      // A fork child may capture: it is a copy of this process, buffer included.
      mp::Process child{fork, [&buffer, n, page, ready, stop, seconds]() mutable {
                          auto t0 = Clock::now();
                          for (std::uint64_t i = 0; i < n; ++i) {
                            buffer[i * static_cast<std::uint64_t>(page)] = 2;  // one byte a page
                          }
                          seconds.set(std::chrono::duration<double>(Clock::now() - t0).count());
                          ready.set();
                          stop.wait();
                          return 0;
                        }};
      child.start();
      if (!ready.wait(std::chrono::seconds(120))) {
        throw std::runtime_error("cannot see the copy-on-write child finish writing");
      }
      mp::MemoryInfo c = read(child.pid());
      mp::MemoryInfo parent = read(::getpid());
      stop.set();
      child.join();
      if (child.exitcode() != 0) throw std::runtime_error("the copy-on-write child failed");
      const std::uint64_t written = n * static_cast<std::uint64_t>(page);
      readings.push_back(c);
      written_bytes.push_back(written);
      double grew = static_cast<double>(c.uss) - static_cast<double>(readings.front().uss);
      double us = n > 0 ? 1e6 * seconds.value() / static_cast<double>(n) : 0;
      L.say("{:>7}% {:>10} {:>8} {:>8} {:>8} {:>11} {:>14.0f} {:>12}", percent, written,
            kib(c.rss), kib(c.pss), kib(c.uss), kib(parent.pss), grew / kKiB,
            n > 0 ? fmt::format("{:.2f}", us) : "-");
      cow.push_back(nlohmann::json{{"percent", percent},
                     {"pages_written", n},
                     {"bytes_written", written},
                     {"child", memory_json(c)},
                     {"parent_pss", parent.pss},
                     {"seconds", seconds.value()},
                     {"us_per_page", n > 0 ? nlohmann::json(us) : nlohmann::json()}});
    }
    buffer = std::vector<char>();  // given back before the threads are measured
    L.fact("mib", mib);
    L.fact("page_size", page);
    L.fact("buffer_bytes", bytes);
    L.fact("cow", cow);

    // What must hold. USS grows with the pages written, by at least most of the bytes
    // written (each written page is a private copy now); a child that wrote nothing shares
    // the whole buffer with this process, so its PSS counts half of it where its RSS
    // counts all of it.
    bool uss_monotonic = true, uss_covers = true;
    for (std::size_t i = 1; i < readings.size(); ++i) {
      uss_monotonic = uss_monotonic && readings[i].uss >= readings[i - 1].uss;
      double grew = static_cast<double>(readings[i].uss) - static_cast<double>(readings[0].uss);
      uss_covers = uss_covers && grew >= 0.9 * static_cast<double>(written_bytes[i]);
    }
    const mp::MemoryInfo& untouched = readings.front();
    double shared_gap = static_cast<double>(untouched.rss) - static_cast<double>(untouched.pss);
    bool pss_halved = shared_gap >= 0.45 * static_cast<double>(bytes);
    L.say(
        "\nUSS grew with every step: {}; by at least 90% of the bytes written: {}.\n"
        "The child that wrote nothing: RSS - PSS = {} KiB, {:.0f}% of the buffer (half of it\n"
        "is counted in the parent's PSS instead): at least 45%: {}.",
        uss_monotonic, uss_covers, kib(static_cast<std::uint64_t>(shared_gap)),
        100 * shared_gap / static_cast<double>(bytes), pss_halved);
    L.fact("uss_monotonic", uss_monotonic);
    L.fact("uss_growth_covers_written", uss_covers);
    L.fact("untouched_rss_minus_pss", static_cast<std::uint64_t>(shared_gap));
    L.fact("untouched_pss_halved", pss_halved);

    // Step 4: `workers` threads in this process instead of processes: what they add.
    L.step(fmt::format("{} threads in this process instead (KiB)", workers));
    mp::ProcessStats before = mp::process_stats(::getpid());
    std::latch started(workers);
    std::mutex mu;
    std::condition_variable cv;
    bool go = false;
    std::vector<std::thread> threads;
    for (int i = 0; i < workers; ++i) {
      threads.emplace_back([&] {
        started.count_down();
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return go; });
      });
    }
    started.wait();
    mp::ProcessStats after = mp::process_stats(::getpid());
    {
      std::lock_guard lock(mu);
      go = true;
    }
    cv.notify_all();
    for (auto& t : threads) t.join();
    all_ordered = all_ordered && ordered(before.memory) && ordered(after.memory);
    double growth = static_cast<double>(after.memory.rss) - static_cast<double>(before.memory.rss);
    const std::uint64_t fork_uss = pool_facts.contains("fork")
                                       ? pool_facts["fork"]["uss_per_worker"].get<std::uint64_t>()
                                       : 0;
    L.say("threads {} -> {}; RSS {} -> {} KiB: {:.0f} KiB for {} threads, {:.1f} KiB each.",
          before.threads, after.threads, kib(before.memory.rss), kib(after.memory.rss),
          growth / kKiB, workers, growth / kKiB / workers);
    L.say("A fork pool worker's own memory (USS) was {} KiB: {} workers, {} KiB together.",
          kib(fork_uss), workers, kib(fork_uss * static_cast<std::uint64_t>(workers)));
    bool threads_counted = after.threads == before.threads + workers;
    L.fact("threads", nlohmann::json{{"count", workers},
                       {"threads_before", before.threads},
                       {"threads_after", after.threads},
                       {"rss_before", before.memory.rss},
                       {"rss_after", after.memory.rss},
                       {"rss_growth", growth}});
    L.fact("threads_counted", threads_counted);
    L.fact("readings_ordered", all_ordered);

    bool children_ok = true;
    for (const auto& [m, f] : idle_facts.items()) children_ok = children_ok && f["exitcode"] == 0;
    for (const auto& [m, f] : pool_facts.items()) {
      children_ok = children_ok && f["map_right"] == true && f["workers"] == workers;
    }
    L.fact("children_ok", children_ok);
    return uss_monotonic && uss_covers && pss_halved && threads_counted && all_ordered &&
           children_ok;
  });
}
