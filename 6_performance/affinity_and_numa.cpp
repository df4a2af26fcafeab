// affinity_and_numa.cpp - Topology (hwloc), CPU pinning, and placing two processes that talk.
//
// hwloc reads the machine: packages, NUMA nodes, cores, processing units (PUs: hardware
// threads), the caches and who shares them. The lesson prints that, then the CPUs this
// process may run on (its affinity: taskset and cgroups narrow it). A child pins itself to
// one CPU with sched_setaffinity, reads its affinity back and asks sched_getcpu() where
// it runs; another binds itself to a whole core with hwloc_set_cpubind.
//
// Then two processes play ping-pong, over an mp::Pipe and over two mp::Queue's (--via to
// choose one): N round trips of a small number, each reply checked, timed as round trips
// per second, with the pair placed three ways: both on the same PU, on two different
// cores, and left to the scheduler (unpinned); on a machine with SMT, also on two PUs of
// one core. The cases take turns for --rounds rounds, so the machine's other load falls on
// all of them alike; the table gives the median of each and its ratio to the others.
//
// Last, memory placement. On a machine with several NUMA nodes, memory is near one node's
// cores and farther from the others'; Linux places a page on the node of the CPU that
// first touches it. A child pinned to each node's CPUs writes a buffer and asks hwloc
// where its pages are, once with first-touch and once with hwloc_alloc_membind.
//
// Usage: affinity_and_numa [--round-trips N] [--rounds R] [--via pipe|queue|both] [--quick]
//                          [--json]
//   $ build/6_performance/affinity_and_numa
//   $ taskset -c 0 build/6_performance/affinity_and_numa   # one CPU allowed: no cross-core case
//
// Watch for: over a pipe each message wakes a sleeping reader. On the same PU that is a
// context switch on one CPU; on different cores it must wake another CPU, which may be
// idle (an inter-processor interrupt, and in a virtual machine a trip through the
// hypervisor), so the same PU can be much faster for this ping-pong. The queues spin
// briefly before they sleep: across cores the spinner sees the reply without sleeping,
// on one PU it spins while the other side cannot run, so the order reverses. Unpinned is
// whichever of the two the scheduler happened to choose. On one NUMA node, placement of
// memory changes nothing; the lesson says so rather than invent a gain.
#include <fmt/format.h>
#include <hwloc.h>
#include <hwloc/glibc-sched.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mp/connection.hpp>
#include <mp/context.hpp>
#include <mp/error.hpp>
#include <mp/monitor.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "lesson.hpp"

namespace {

// The topology, loaded once by the parent before any child is forked: fork children use
// their copy of it (hwloc_set_cpubind and the memory calls need one).
hwloc_topology_t g_topology = nullptr;

std::int64_t now_ns() {
  timespec ts{};
  if (::clock_gettime(CLOCK_MONOTONIC, &ts) == -1) mp::throw_errno("read CLOCK_MONOTONIC");
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

std::vector<int> cpus_of(const cpu_set_t& s) {
  std::vector<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &s)) out.push_back(c);
  }
  return out;
}

std::string list_text(const std::vector<int>& v) {
  return v.empty() ? "none" : fmt::format("{}", fmt::join(v, ","));
}

cpu_set_t one_cpu(int c) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(c, &s);
  return s;
}

cpu_set_t affinity_now() {
  cpu_set_t s;
  CPU_ZERO(&s);
  if (::sched_getaffinity(0, sizeof s, &s) == -1) mp::throw_errno("read the CPU affinity");
  return s;
}

std::string size_text(std::uint64_t bytes) {
  if (bytes >= (1ULL << 30) && bytes % (1ULL << 30) == 0) return fmt::format("{} GiB", bytes >> 30);
  if (bytes >= (1ULL << 20))
    return fmt::format("{:.0f} MiB", static_cast<double>(bytes) / (1 << 20));
  return fmt::format("{} KiB", bytes >> 10);
}

// An hwloc bitmap, freed at scope exit.
struct Bitmap {
  hwloc_bitmap_t b = hwloc_bitmap_alloc();
  Bitmap() {
    if (b == nullptr) throw std::bad_alloc();
  }
  ~Bitmap() { hwloc_bitmap_free(b); }
  Bitmap(const Bitmap&) = delete;
  Bitmap& operator=(const Bitmap&) = delete;
};

std::vector<int> bitmap_list(hwloc_const_bitmap_t b) {
  std::vector<int> out;
  for (int i = hwloc_bitmap_first(b); i != -1; i = hwloc_bitmap_next(b, i)) out.push_back(i);
  return out;
}

// ---- in the children ----------------------------------------------------------------------

enum Pin : int { kUnpinned = 0, kSched = 1, kHwloc = 2 };

// Pins this (single-threaded) process to `want` the way `how` says. Throws on failure.
void apply_pin(int how, const cpu_set_t& want) {
  if (how == kSched) {
    if (::sched_setaffinity(0, sizeof want, &want) == -1) mp::throw_errno("pin to a CPU set");
  } else if (how == kHwloc) {
    Bitmap set;
    hwloc_cpuset_from_glibc_sched_affinity(g_topology, set.b, &want, sizeof want);
    if (hwloc_set_cpubind(g_topology, set.b, HWLOC_CPUBIND_PROCESS) == -1) {
      mp::throw_errno("bind to a core with hwloc_set_cpubind");
    }
  }
}

// What a child of a ping-pong pair reports.
struct Report {
  int case_id = 0;
  int run = 0;
  int role = 0;    // 0: the side that pings and times, 1: the side that answers
  int pin_ok = 0;  // the affinity read back equals the one asked for
  cpu_set_t got{};
  int cpu_at_end = -1;
  long round_trips = 0;  // replies checked (role 0) or messages answered (role 1)
  int replies_right = 0;
  std::int64_t ns = 0;
  std::uint64_t voluntary = 0, involuntary = 0;  // context switches during the timed part
};

// The channel of a pair: an mp::Pipe end, or two queues (one each way).
struct Channel {
  std::optional<mp::Connection> conn;
  std::optional<mp::Queue<std::int64_t>> in, out;
  void send(std::int64_t v) {
    if (conn) {
      conn->send(v);
    } else {
      out->put(v);
    }
  }
  std::int64_t recv() { return conn ? conn->recv<std::int64_t>() : in->get(); }
};

int pinger(Channel ch, mp::Queue<Report> reports, Report r, int how, cpu_set_t want, long n,
           long warm) {
  r.role = 0;
  apply_pin(how, want);
  cpu_set_t got = affinity_now();
  r.got = got;
  r.pin_ok = CPU_EQUAL(&got, &want) ? 1 : 0;
  bool right = true;
  for (long i = 0; i < warm; ++i) {  // the other side is pinned once it answers
    ch.send(i);
    const std::int64_t reply = ch.recv();  // always read: one reply per message
    right = right && reply == i + 1;
  }
  mp::ContextSwitches c0 = mp::process_stats(::getpid()).ctx_switches;
  std::int64_t t0 = now_ns();
  long done = 0;
  for (long i = 0; i < n; ++i) {
    ch.send(i);
    if (ch.recv() == i + 1) ++done;
  }
  std::int64_t t1 = now_ns();
  mp::ContextSwitches c1 = mp::process_stats(::getpid()).ctx_switches;
  ch.send(-1);  // the other side stops
  r.ns = t1 - t0;
  r.round_trips = done;
  r.replies_right = right && done == n ? 1 : 0;
  r.voluntary = c1.voluntary - c0.voluntary;
  r.involuntary = c1.involuntary - c0.involuntary;
  r.cpu_at_end = ::sched_getcpu();
  reports.put(r);
  return 0;
}

int answerer(Channel ch, mp::Queue<Report> reports, Report r, int how, cpu_set_t want) {
  r.role = 1;
  apply_pin(how, want);
  cpu_set_t got = affinity_now();
  r.got = got;
  r.pin_ok = CPU_EQUAL(&got, &want) ? 1 : 0;
  long answered = 0;
  for (;;) {
    std::int64_t v = ch.recv();
    if (v < 0) break;
    ch.send(v + 1);
    ++answered;
  }
  r.round_trips = answered;
  r.replies_right = 1;
  r.cpu_at_end = ::sched_getcpu();
  reports.put(r);
  return 0;
}

// Pinned to `want` by `how`, busy for a few ms, then: what the affinity reads back, and
// where it ran.
struct PinCheck {
  int pin_ok = 0;
  cpu_set_t got{};
  int cpu = -1;
};

int pin_and_look(mp::Queue<PinCheck> out, int how, cpu_set_t want) {
  apply_pin(how, want);
  PinCheck c;
  c.got = affinity_now();
  c.pin_ok = CPU_EQUAL(&c.got, &want) ? 1 : 0;
  std::int64_t until = now_ns() + 5'000'000;
  volatile std::uint64_t x = 1;
  while (now_ns() < until) x = x * 3 + 1;
  c.cpu = ::sched_getcpu();
  out.put(c);
  return 0;
}

// Where a buffer's pages are, as a bit mask of NUMA node numbers (os_index < 64).
std::uint64_t where_is(const void* p, std::size_t bytes) {
  Bitmap nodes;
  if (hwloc_get_area_memlocation(g_topology, p, bytes, nodes.b, HWLOC_MEMBIND_BYNODESET) == -1) {
    mp::throw_errno("ask hwloc where a buffer's pages are");
  }
  std::uint64_t mask = 0;
  for (int n : bitmap_list(nodes.b)) {
    if (n < 64) mask |= 1ULL << n;
  }
  return mask;
}

struct Placement {
  int node = 0;
  std::uint64_t first_touch = 0;  // nodes holding the pages written after malloc
  std::uint64_t membind = 0;      // nodes holding the pages of hwloc_alloc_membind(node)
  int membind_ok = 0;
};

// Pinned to one node's CPUs: writes a malloc'd buffer (first touch), then one allocated
// with hwloc_alloc_membind on that node, and reports where each one's pages are.
int touch_on_node(mp::Queue<Placement> out, int node, cpu_set_t cpus, long bytes) {
  apply_pin(kSched, cpus);
  Placement pl;
  pl.node = node;
  std::size_t n = static_cast<std::size_t>(bytes);
  std::unique_ptr<char[]> buf(new char[n]);
  std::memset(buf.get(), 1, n);
  pl.first_touch = where_is(buf.get(), n);
  hwloc_obj_t obj = hwloc_get_numanode_obj_by_os_index(g_topology, static_cast<unsigned>(node));
  if (obj != nullptr) {
    void* m = hwloc_alloc_membind(g_topology, n, obj->nodeset, HWLOC_MEMBIND_BIND,
                                  HWLOC_MEMBIND_BYNODESET);
    if (m != nullptr) {
      std::memset(m, 2, n);
      pl.membind = where_is(m, n);
      pl.membind_ok = 1;
      hwloc_free(g_topology, m, n);
    }
  }
  out.put(pl);
  return 0;
}

std::vector<int> mask_list(std::uint64_t m) {
  std::vector<int> out;
  for (int i = 0; i < 64; ++i) {
    if (m & (1ULL << i)) out.push_back(i);
  }
  return out;
}

// ---- in the parent ------------------------------------------------------------------------

struct Case {
  std::string id;     // same_pu, smt_siblings, different_cores, unpinned
  std::string where;  // what the placement is, in words
  int how_a = kUnpinned, how_b = kUnpinned;
  cpu_set_t a{}, b{};
  std::vector<double> rates;  // round trips per second, one per round
  std::vector<double> vol_per_rt, invol_per_rt;
  std::vector<int> cpus_a, cpus_b;  // where each side ran at the end, per round
};

// The next report on `q` from one of `children`. A child that exits without reporting (it
// failed: its error is on stderr) ends the wait at once; the others are stopped and the
// step fails. 60 s without a report is a failure too.
template <class T>
T next_report(mp::Queue<T>& q, const std::vector<mp::Process*>& children, const std::string& what) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    try {
      return q.get(mp::Seconds(0.05));
    } catch (const mp::Empty&) {
    }
    std::string why;
    for (mp::Process* c : children) {
      if (auto code = c->exitcode(); code && *code != 0)
        why = fmt::format("a child exited {}", *code);
    }
    if (why.empty() && std::chrono::steady_clock::now() > deadline) why = "no report in 60 s";
    if (!why.empty()) {
      for (mp::Process* c : children) c->kill();
      for (mp::Process* c : children) c->join();
      throw std::runtime_error(fmt::format("cannot {}: {}", what, why));
    }
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  std::size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Topology (hwloc), CPU pinning, and placing two processes that talk."};
  long n = 10'000;
  int rounds = 3;
  std::string via = "both";
  bool quick = false;
  auto* n_opt = L.cli()
                    .add_option("--round-trips", n, "timed round trips per case and round")
                    ->check(CLI::Range(1L, 100'000'000L))
                    ->capture_default_str();
  L.cli()
      .add_option("--rounds", rounds, "rounds; the cases take turns in each")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  L.cli()
      .add_option("--via", via, "what carries the messages")
      ->check(CLI::IsMember({"pipe", "queue", "both"}))
      ->capture_default_str();
  L.cli().add_flag("--quick", quick, "3000 round trips: a smoke test");
  L.parse(argc, argv);
  if (quick && n_opt->count() == 0) n = 3'000;
  const long warm = std::min(1000L, std::max(10L, n / 10));

  return L.run([&] {
    // Step 1: the topology, as hwloc reads it.
    if (hwloc_topology_init(&g_topology) == -1) mp::throw_errno("initialise an hwloc topology");
    // Instruction caches are left out by default; keep them, to list every cache.
    if (hwloc_topology_set_icache_types_filter(g_topology, HWLOC_TYPE_FILTER_KEEP_ALL) == -1) {
      mp::throw_errno("ask hwloc for the instruction caches");
    }
    if (hwloc_topology_load(g_topology) == -1) mp::throw_errno("load the hwloc topology");
    struct Closer {
      ~Closer() { hwloc_topology_destroy(g_topology); }
    } closer;
    auto count = [](hwloc_obj_type_t t) { return hwloc_get_nbobjs_by_type(g_topology, t); };
    const int packages = count(HWLOC_OBJ_PACKAGE), nodes = count(HWLOC_OBJ_NUMANODE),
              cores = count(HWLOC_OBJ_CORE), pus = count(HWLOC_OBJ_PU);
    L.step("the machine, as hwloc reads it");
    L.say("hwloc {}: {} package(s), {} NUMA node(s), {} core(s), {} PU(s) (hardware threads){}.",
          HWLOC_VERSION, packages, nodes, cores, pus,
          cores > 0 && pus > cores ? fmt::format(": SMT, {} PUs per core", pus / cores)
                                   : ": one PU per core, no SMT");
    nlohmann::json jcaches = nlohmann::json::array();
    const std::pair<hwloc_obj_type_t, const char*> cache_types[] = {{HWLOC_OBJ_L1CACHE, "L1d"},
                                                                    {HWLOC_OBJ_L1ICACHE, "L1i"},
                                                                    {HWLOC_OBJ_L2CACHE, "L2"},
                                                                    {HWLOC_OBJ_L3CACHE, "L3"},
                                                                    {HWLOC_OBJ_L4CACHE, "L4"}};
    for (const auto& [type, name] : cache_types) {
      int k = count(type);
      if (k <= 0) continue;
      hwloc_obj_t c = hwloc_get_obj_by_type(g_topology, type, 0);
      int sharing = hwloc_bitmap_weight(c->cpuset);
      L.say("  {:<4} {:>8} x {}, each shared by {} PU(s), {}-byte lines", name,
            size_text(c->attr->cache.size), k, sharing, c->attr->cache.linesize);
      jcaches.push_back({{"level", name},
                         {"bytes", c->attr->cache.size},
                         {"count", k},
                         {"pus_sharing", sharing},
                         {"line", c->attr->cache.linesize}});
    }
    if (jcaches.empty()) L.say("  hwloc reports no caches on this machine.");
    nlohmann::json jnodes = nlohmann::json::array();
    for (int i = 0; i < nodes; ++i) {
      hwloc_obj_t o =
          hwloc_get_obj_by_type(g_topology, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(i));
      std::vector<int> cpus = bitmap_list(o->cpuset);
      L.say("  NUMA node {}: {} of memory, CPUs {}", o->os_index,
            size_text(o->attr->numanode.local_memory), list_text(cpus));
      jnodes.push_back(
          {{"os_index", o->os_index}, {"memory", o->attr->numanode.local_memory}, {"cpus", cpus}});
    }
    nlohmann::json jcores = nlohmann::json::array();
    for (int i = 0; i < cores; ++i) {
      hwloc_obj_t o = hwloc_get_obj_by_type(g_topology, HWLOC_OBJ_CORE, static_cast<unsigned>(i));
      jcores.push_back(bitmap_list(o->cpuset));
    }
    if (cores > 0) {
      std::vector<std::string> parts;
      for (const auto& c : jcores) parts.push_back(fmt::format("[{}]", list_text(c)));
      L.say("  cores and their PUs (OS numbers): {}", fmt::join(parts, " "));
    }

    // Step 2: the CPUs this process may use: its affinity (taskset, cgroups).
    const cpu_set_t allowed = affinity_now();
    const std::vector<int> allowed_list = cpus_of(allowed);
    L.say("This process may run on CPU(s) {} ({} of {} PUs; sched_getaffinity).",
          list_text(allowed_list), allowed_list.size(), pus);

    // The core of a PU (by OS number): the PU's Core ancestor, or the PU itself.
    auto core_of = [&](int pu) -> hwloc_obj_t {
      hwloc_obj_t p = hwloc_get_pu_obj_by_os_index(g_topology, static_cast<unsigned>(pu));
      if (p == nullptr) return nullptr;
      hwloc_obj_t c = hwloc_get_ancestor_obj_by_type(g_topology, HWLOC_OBJ_CORE, p);
      return c != nullptr ? c : p;
    };
    auto core_set = [&](hwloc_obj_t core) {  // the core's PUs this process may use
      cpu_set_t s;
      CPU_ZERO(&s);
      hwloc_cpuset_to_glibc_sched_affinity(g_topology, core->cpuset, &s, sizeof s);
      CPU_AND(&s, &s, &allowed);
      return s;
    };

    const mp::Context fork = mp::get_context("fork");  // the children use the topology copy

    // Step 3: pinning one child, two ways.
    L.step("pinning a child");
    const int pu_a = allowed_list.at(0);
    mp::Queue<PinCheck> checks;
    auto pin_child = [&](int how, const cpu_set_t& want) {
      mp::Process p{fork, pin_and_look, checks, how, want};
      p.start();
      PinCheck c = next_report(checks, {&p}, "pin a child");
      p.join();
      if (p.exitcode() != 0) throw std::runtime_error("cannot pin a child: it failed");
      return c;
    };
    PinCheck one = pin_child(kSched, one_cpu(pu_a));
    L.say("sched_setaffinity(CPU {}): read back {}, ran on CPU {} (sched_getcpu): {}", pu_a,
          list_text(cpus_of(one.got)), one.cpu,
          one.pin_ok && one.cpu == pu_a ? "as asked" : "NOT as asked");
    hwloc_obj_t core_a = core_of(pu_a);
    if (core_a == nullptr)
      throw std::runtime_error(fmt::format("cannot find CPU {} in the topology", pu_a));
    const cpu_set_t core_a_set = core_set(core_a);
    PinCheck whole = pin_child(kHwloc, core_a_set);
    L.say("hwloc_set_cpubind(its core, PUs {}): read back {}, ran on CPU {}: {}",
          list_text(cpus_of(core_a_set)), list_text(cpus_of(whole.got)), whole.cpu,
          whole.pin_ok && CPU_ISSET(whole.cpu, &core_a_set) ? "as asked" : "NOT as asked");
    const bool pin_checks_ok = one.pin_ok && one.cpu == pu_a && whole.pin_ok && whole.cpu >= 0 &&
                               CPU_ISSET(whole.cpu, &core_a_set);

    // Step 4: the cases of the ping-pong.
    std::vector<Case> cases;
    nlohmann::json skipped = nlohmann::json::array();
    {
      Case c;
      c.id = "same_pu";
      c.where = fmt::format("both on CPU {}", pu_a);
      c.how_a = c.how_b = kSched;
      c.a = c.b = one_cpu(pu_a);
      cases.push_back(c);
    }
    std::optional<int> sibling, other_core_pu;
    for (int p : allowed_list) {
      if (p == pu_a) continue;
      hwloc_obj_t c = core_of(p);
      if (c == core_a) {
        if (!sibling) sibling = p;
      } else if (!other_core_pu) {
        other_core_pu = p;
      }
    }
    if (sibling) {
      Case c;
      c.id = "smt_siblings";
      c.where = fmt::format("CPUs {} and {}, one core", pu_a, *sibling);
      c.how_a = c.how_b = kSched;
      c.a = one_cpu(pu_a);
      c.b = one_cpu(*sibling);
      cases.push_back(c);
    } else {
      skipped.push_back({{"case", "smt_siblings"},
                         {"why", "no allowed CPU shares a core with another: no SMT here"}});
    }
    if (other_core_pu) {
      Case c;
      hwloc_obj_t cb = core_of(*other_core_pu);
      c.id = "different_cores";
      c.b = core_set(cb);
      c.where = fmt::format("CPU {} and the core of CPUs {} (hwloc_set_cpubind)", pu_a,
                            list_text(cpus_of(c.b)));
      c.how_a = kSched;
      c.how_b = kHwloc;
      c.a = one_cpu(pu_a);
      cases.push_back(c);
    } else {
      skipped.push_back({{"case", "different_cores"},
                         {"why", fmt::format("this process may use only CPU(s) {}, all on one core",
                                             list_text(allowed_list))}});
    }
    {
      Case c;
      c.id = "unpinned";
      c.where = fmt::format("wherever the scheduler puts them (CPUs {})", list_text(allowed_list));
      c.a = c.b = allowed;
      cases.push_back(c);
    }

    L.step(fmt::format("ping-pong: {} round trips per case, {} rounds, the cases taking turns", n,
                       rounds));
    for (const Case& c : cases) L.say("  {:<16} {}", c.id, c.where);
    for (const auto& s : skipped) {
      L.say("skipped {}: {}", s["case"].get<std::string>(), s["why"].get<std::string>());
    }
    mp::Queue<Report> reports;
    bool pins_ok = true, counts_ok = true, exits_ok = true, single_cpu_seen = true;
    long runs = 0;
    const std::vector<std::string> kinds =
        via == "both" ? std::vector<std::string>{"pipe", "queue"} : std::vector<std::string>{via};
    nlohmann::json jvia = nlohmann::json::object();
    std::string base_id;
    const std::vector<Case> case_plan = cases;
    for (const std::string& kind : kinds) {
      cases = case_plan;
      L.say("");
      L.say("over {}:", kind == "pipe"
                            ? "an mp::Pipe (a pipe each way: each message wakes the reader)"
                            : "two mp::Queue's (shared memory: spin about 10 us, then a futex)");
      for (int round = 0; round < rounds; ++round) {
        for (std::size_t k = 0; k < cases.size(); ++k) {
          // Taking turns: each round starts one case later.
          Case& c = cases[(k + static_cast<std::size_t>(round)) % cases.size()];
          const int case_id =
              static_cast<int>((k + static_cast<std::size_t>(round)) % cases.size());
          Channel a, b;
          if (kind == "pipe") {
            auto [x, y] = mp::Pipe();
            a.conn = x;
            b.conn = y;
          } else {
            mp::Queue<std::int64_t> ping, pong;
            a.out = ping;
            a.in = pong;
            b.in = ping;
            b.out = pong;
          }
          Report base;
          base.case_id = case_id;
          base.run = round;
          mp::Process pa{fork, pinger, a, reports, base, c.how_a, c.a, n, warm};
          mp::Process pb{fork, answerer, b, reports, base, c.how_b, c.b};
          pb.start();
          pa.start();
          if (a.conn) a.conn->close();  // the children hold the ends now
          if (b.conn) b.conn->close();
          std::optional<Report> ra, rb;
          for (int i = 0; i < 2; ++i) {
            Report r = next_report(reports, {&pa, &pb}, fmt::format("run the {} ping-pong", c.id));
            (r.role == 0 ? ra : rb) = r;
          }
          pa.join();
          pb.join();
          ++runs;
          exits_ok = exits_ok && pa.exitcode() == 0 && pb.exitcode() == 0;
          if (!ra || !rb) throw std::runtime_error("cannot tell the two sides' reports apart");
          pins_ok = pins_ok && ra->pin_ok && rb->pin_ok;
          counts_ok =
              counts_ok && ra->replies_right && ra->round_trips == n && rb->round_trips == n + warm;
          if (CPU_COUNT(&c.a) == 1)
            single_cpu_seen = single_cpu_seen && CPU_ISSET(ra->cpu_at_end, &c.a);
          if (CPU_COUNT(&c.b) == 1)
            single_cpu_seen = single_cpu_seen && CPU_ISSET(rb->cpu_at_end, &c.b);
          double secs = static_cast<double>(ra->ns) / 1e9;
          c.rates.push_back(static_cast<double>(n) / secs);
          c.vol_per_rt.push_back(static_cast<double>(ra->voluntary) / static_cast<double>(n));
          c.invol_per_rt.push_back(static_cast<double>(ra->involuntary) / static_cast<double>(n));
          c.cpus_a.push_back(ra->cpu_at_end);
          c.cpus_b.push_back(rb->cpu_at_end);
        }
      }

      const Case* cross = nullptr;
      for (const Case& c : cases) {
        if (c.id == "different_cores") cross = &c;
      }
      const Case& base_case = cross ? *cross : cases.back();  // ratios against this one
      base_id = base_case.id;
      const double base_rate = median(base_case.rates);
      L.say("{:<16} {:>11} {:>11} {:>11} {:>8} {:>9} {:>7} {:>7}  {}", "case", "rt/s median", "min",
            "max", "vs " + std::string(cross ? "cores" : "unpin"), "us per rt", "vol/rt", "inv/rt",
            "CPUs at the end, A/B");
      nlohmann::json jcases = nlohmann::json::object();
      for (const Case& c : cases) {
        double med = median(c.rates);
        double lo = *std::min_element(c.rates.begin(), c.rates.end());
        double hi = *std::max_element(c.rates.begin(), c.rates.end());
        std::vector<std::string> ran;
        for (std::size_t i = 0; i < c.cpus_a.size(); ++i) {
          ran.push_back(fmt::format("{}/{}", c.cpus_a[i], c.cpus_b[i]));
        }
        L.say("{:<16} {:>11.0f} {:>11.0f} {:>11.0f} {:>7.2f}x {:>9.2f} {:>7.2f} {:>7.2f}  {}", c.id,
              med, lo, hi, med / base_rate, 1e6 / med, median(c.vol_per_rt), median(c.invol_per_rt),
              fmt::join(ran, " "));
        jcases[c.id] = {{"where", c.where},
                        {"rates", c.rates},
                        {"median", med},
                        {"min", lo},
                        {"max", hi},
                        {"ratio_to_base", med / base_rate},
                        {"us_per_round_trip", 1e6 / med},
                        {"voluntary_per_rt", median(c.vol_per_rt)},
                        {"involuntary_per_rt", median(c.invol_per_rt)},
                        {"requested_a", cpus_of(c.a)},
                        {"requested_b", cpus_of(c.b)},
                        {"cpu_at_end_a", c.cpus_a},
                        {"cpu_at_end_b", c.cpus_b}};
      }
      jvia[kind] = jcases;
    }
    L.say("");
    L.say(
        "(rt/s: round trips per second measured by side A; vs: the median over the {} case's;\n"
        "vol/rt, inv/rt: side A's voluntary and involuntary context switches per round trip,\n"
        "from mp::process_stats; CPUs at the end: sched_getcpu() of each side, per round.)",
        base_id);
    L.say("every child's affinity, read back with sched_getaffinity, was the one asked for: {}",
          pins_ok);
    L.say("every round trip answered and checked ({} x {} runs): {}", n, runs, counts_ok);
    L.say("a side pinned to one CPU was on that CPU at the end (sched_getcpu): {}",
          single_cpu_seen);

    // Step 5: memory placement.
    L.step("memory placement (NUMA)");
    const hwloc_topology_support* support = hwloc_topology_get_support(g_topology);
    const bool can_locate = support->membind->get_area_memlocation != 0;
    const long touch_bytes = quick ? (4L << 20) : (16L << 20);
    nlohmann::json jplace = nlohmann::json::array();
    if (nodes <= 1) {
      L.say(
          "One NUMA node: every core is as near to all of the memory as any other, so where\n"
          "memory is placed changes nothing on this machine, and this lesson measures no gain.");
    } else {
      L.say("{} NUMA nodes: memory is near one node's cores, farther from the others'.", nodes);
    }
    if (can_locate) {
      mp::Queue<Placement> places;
      for (int i = 0; i < nodes && i < 8; ++i) {
        hwloc_obj_t o =
            hwloc_get_obj_by_type(g_topology, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(i));
        cpu_set_t cpus;
        CPU_ZERO(&cpus);
        hwloc_cpuset_to_glibc_sched_affinity(g_topology, o->cpuset, &cpus, sizeof cpus);
        CPU_AND(&cpus, &cpus, &allowed);
        if (CPU_COUNT(&cpus) == 0) {
          L.say("node {}: none of its CPUs is allowed here, skipped", o->os_index);
          continue;
        }
        mp::Process p{fork, touch_on_node, places, static_cast<int>(o->os_index),
                      cpus, touch_bytes};
        p.start();
        Placement pl = next_report(places, {&p}, "place memory");
        p.join();
        exits_ok = exits_ok && p.exitcode() == 0;
        L.say(
            "a child on node {}'s CPUs wrote {}: first touch put its pages on node(s) {};\n"
            "  hwloc_alloc_membind(node {}): {}",
            pl.node, size_text(static_cast<std::uint64_t>(touch_bytes)),
            list_text(mask_list(pl.first_touch)), pl.node,
            pl.membind_ok ? fmt::format("pages on node(s) {}", list_text(mask_list(pl.membind)))
                          : "refused");
        jplace.push_back({{"node", pl.node},
                          {"first_touch_nodes", mask_list(pl.first_touch)},
                          {"membind_ok", pl.membind_ok == 1},
                          {"membind_nodes", mask_list(pl.membind)}});
      }
    } else {
      L.say("hwloc cannot tell where pages are on this system (no get_area_memlocation).");
    }
    L.say(
        "On a machine with several nodes: a page goes to the node of the CPU that first writes\n"
        "it (first touch), so a buffer that one process fills and others read sits near the\n"
        "filler only. Pin each worker to a node and let it allocate and fill its own data, or\n"
        "say where memory goes: hwloc_set_membind / hwloc_alloc_membind in the program, or from\n"
        "outside, numactl --cpunodebind=0 --membind=0 <program> (numactl --interleave=all\n"
        "spreads pages over every node for data that all of them share).");

    nlohmann::json jtopo = {{"packages", packages}, {"numa_nodes", nodes}, {"cores", cores},
                            {"pus", pus},           {"caches", jcaches},   {"nodes", jnodes},
                            {"core_pus", jcores}};
    L.fact("topology", jtopo);
    L.fact("allowed_cpus", allowed_list);
    L.fact("pin_one_cpu",
           nlohmann::json{{"cpu", pu_a}, {"read_back", cpus_of(one.got)}, {"ran_on", one.cpu}});
    L.fact("pin_core_hwloc", nlohmann::json{{"requested", cpus_of(core_a_set)},
                                            {"read_back", cpus_of(whole.got)},
                                            {"ran_on", whole.cpu}});
    L.fact("pin_checks_ok", pin_checks_ok);
    L.fact("via", via);
    L.fact("round_trips", n);
    L.fact("warm_up", warm);
    L.fact("rounds", rounds);
    L.fact("runs", runs);
    L.fact("cases", jvia);
    L.fact("skipped", skipped);
    L.fact("ratio_base", base_id);
    L.fact("pins_read_back_ok", pins_ok);
    L.fact("round_trips_ok", counts_ok);
    L.fact("single_cpu_seen", single_cpu_seen);
    L.fact("children_exit_0", exits_ok);
    L.fact("placement", jplace);
    L.fact("can_locate_pages", can_locate);
    L.fact("children_left", mp::children(::getpid()).size());
    return pin_checks_ok && pins_ok && counts_ok && single_cpu_seen && exits_ok &&
           mp::children(::getpid()).empty();
  });
}
