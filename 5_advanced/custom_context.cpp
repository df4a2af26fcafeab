// custom_context.cpp - Start methods as values (mp::get_context): a fork pool and a spawn pool at once, and the set_start_method rules.
//
// A context is a start method you can hold: mp::get_context("spawn") returns one, and
// whatever is created with it starts its processes that way, whatever the program's
// default is. So one program can run a fork pool for quick throw-away work and a spawn pool
// for workers that must not inherit the parent's threads and state, side by side.
//
// What takes a context in mp (read the headers): mp::Process{ctx, target, args...},
// mp::Pool{n, initializer, maxtasksperchild, ctx}, mp::Manager{ctx}, and the executor's
// ExecutorOptions::mp_context. That is all: the queues and the locks (mp::Queue, mp::Lock,
// Event, Value...) take none, because they are memfd regions that any child can use
// whichever way it was started (a spawn or forkserver child receives the descriptor with
// SCM_RIGHTS). Where mp differs from Python:
//   - Python's context is a factory: ctx.Process(), ctx.Pool(), ctx.Queue(), ctx.Lock().
//     mp has no factory methods: the context is an argument of the constructors that
//     create processes, and the other objects need none. Python warns that a lock made in
//     a fork context cannot be passed to spawn children; in mp one Lock serves all three.
//   - set_start_method: a second call with a different method throws mp::ProcessError
//     (Python: RuntimeError) unless force is true, as in Python; but setting the same
//     method again is allowed (Python raises), and get_start_method() does not fix the
//     default (in Python it does: a later set_start_method raises).
//   - The default is fork (Python before 3.14 on Linux; 3.14 chose forkserver).
//
// Usage: custom_context [--workers N] [--items N] [--default-method M] [--json]
//   $ build/5_advanced/custom_context
//
// Watch for: fork workers see the value the parent stored after start-up, spawn and
// forkserver children see the initial 0 (a fresh image); forkserver children's parent is
// the server, not us; every child reports the parent's default start method; the second
// set_start_method with another method throws, with force it does not.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mp/context.hpp>
#include <mp/error.hpp>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <mp/queue.hpp>
#include <mp/shared_memory.hpp>
#include <mp/sync.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lesson.hpp"

namespace {

using namespace std::chrono_literals;

// Stored by main() after the program started: a fork child has it (a copy of the memory),
// a child of a fresh image (spawn, forkserver) has the initial 0.
int g_configured_by = 0;

// What a child sees: trivially copyable, so it travels as it is (pool result, queue item).
struct Seen {
  pid_t pid;
  pid_t ppid;
  int configured_by;
  double start, end;  // steady_clock seconds: CLOCK_MONOTONIC, the same in every process
  char default_method[12];
  char name[24];
};

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <std::size_t N>
void copy_into(char (&to)[N], const std::string& from) {
  std::memset(to, 0, N);
  std::memcpy(to, from.data(), std::min(from.size(), N - 1));
}

Seen look_around() {
  Seen s{};
  s.pid = ::getpid();
  s.ppid = ::getppid();
  s.configured_by = g_configured_by;
  copy_into(s.default_method, mp::get_start_method());
  copy_into(s.name, mp::current_process().name);
  return s;
}

// A pool task: a little work (so that the two pools overlap), then the report.
Seen pool_task(int) {
  double start = now_seconds();
  std::this_thread::sleep_for(30ms);
  Seen s = look_around();
  s.start = start;
  s.end = now_seconds();
  return s;
}

// A Process target: reports on one queue, counting under one lock - the same two objects
// for every child, whatever its start method.
void child_report(mp::Queue<Seen> q, mp::Lock lock, mp::RawValue<int> counted) {
  {
    std::lock_guard g{lock};
    ++counted.value();
  }
  q.put(look_around());
}

// The outcome of one call: "ok" or the exception's type and message.
template <class F>
std::string attempt(F f) {
  try {
    f();
    return "ok";
  } catch (const mp::ProcessError& e) {
    return std::string("mp::ProcessError: ") + e.what();
  } catch (const std::invalid_argument& e) {
    return std::string("std::invalid_argument: ") + e.what();
  }
}

struct PoolView {
  std::set<pid_t> pids;
  std::set<int> configured_by;
  std::set<std::string> default_methods;
  std::set<pid_t> ppids;
  std::string a_name;
  double start = 1e300, end = 0;
};

PoolView summarize(const std::vector<Seen>& seen) {
  PoolView v;
  for (const auto& s : seen) {
    v.pids.insert(s.pid);
    v.configured_by.insert(s.configured_by);
    v.default_methods.insert(s.default_method);
    v.ppids.insert(s.ppid);
    v.a_name = s.name;
    v.start = std::min(v.start, s.start);
    v.end = std::max(v.end, s.end);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Start methods as values (mp::get_context): a fork pool and a spawn pool at "
                   "once, and the set_start_method rules."};
  int& workers = L.add_workers(2, 16);
  int& items = L.add_items(6, 1, 1000);
  std::string default_method = "spawn";
  L.cli()
      .add_option("--default-method", default_method,
                  "the default start method the lesson sets last (with force)")
      ->check(CLI::IsMember({"fork", "spawn", "forkserver"}))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    const pid_t me = ::getpid();

    // Step 1: the rules of the program-wide default.
    L.step("the default start method: set_start_method, get_start_method");
    std::vector<std::string> all = mp::get_all_start_methods();
    std::string initial = mp::get_start_method();
    std::map<std::string, std::string> rules;
    rules["set spawn (first call)"] = attempt([] { mp::set_start_method("spawn"); });
    rules["set spawn again (same method)"] = attempt([] { mp::set_start_method("spawn"); });
    rules["set fork (a different method)"] = attempt([] { mp::set_start_method("fork"); });
    std::string after_refusal = mp::get_start_method();
    rules["set fork, force=true"] = attempt([] { mp::set_start_method("fork", true); });
    std::string after_force = mp::get_start_method();
    rules["get_context(\"vfork\")"] = attempt([] { (void)mp::get_context("vfork"); });
    mp::set_start_method(default_method, true);
    L.say("get_all_start_methods(): {}", all);
    L.say("get_start_method() before any set: {} (and, unlike Python, the call fixes nothing)",
          initial);
    for (const char* k :
         {"set spawn (first call)", "set spawn again (same method)",
          "set fork (a different method)", "set fork, force=true", "get_context(\"vfork\")"}) {
      L.say("  {:<32} -> {}", k, rules[k]);
    }
    L.say("after the refusal the default was still {}; after force, {}; the lesson now sets {}",
          after_refusal, after_force, mp::get_start_method());

    // Step 2: contexts are values. Objects made without one use the default.
    L.step("contexts as values");
    const mp::Context fork = mp::get_context("fork");
    const mp::Context spawn = mp::get_context("spawn");
    const mp::Context forkserver = mp::get_context("forkserver");
    mp::Process plain{child_report, mp::Queue<Seen>{}, mp::Lock{}, mp::RawValue<int>{0}};
    bool same_value = fork == mp::get_context("fork") && !(fork == spawn);
    std::string plain_method{plain.context().start_method()};
    L.say("get_context(\"fork\") == get_context(\"fork\"): {}; fork == spawn: {}",
          fork == mp::get_context("fork"), fork == spawn);
    L.say("a Process made without a context takes the default: {}", plain_method);

    // The parent changes its memory after start-up: only fork children will see it.
    g_configured_by = me;
    L.say("parent {} sets g_configured_by = {} now, after start-up", me, g_configured_by);

    // Step 3: a fork pool and a spawn pool, at once.
    L.step(fmt::format("a fork pool and a spawn pool side by side, {} workers and {} tasks each",
                       workers, items));
    std::vector<int> inputs(static_cast<std::size_t>(items));
    auto t0 = std::chrono::steady_clock::now();
    mp::Pool fork_pool{workers, {}, 0, fork};
    mp::Pool spawn_pool{workers, {}, 0, spawn};
    auto fork_async = fork_pool.map_async(pool_task, inputs, 1);
    auto spawn_async = spawn_pool.map_async(pool_task, inputs, 1);
    PoolView fv = summarize(fork_async.get());
    PoolView sv = summarize(spawn_async.get());
    double both_secs = lesson::seconds_since(t0);
    fork_pool.close();
    spawn_pool.close();
    fork_pool.join();
    spawn_pool.join();
    bool overlapped = fv.start < sv.end && sv.start < fv.end;  // timing: reported
    auto show = [&](const char* what, const PoolView& v) {
      L.say(
          "  {:<5} pool: {} workers (e.g. '{}'), g_configured_by {}, parent {}, default "
          "method {}",
          what, v.pids.size(), v.a_name, v.configured_by, v.ppids, v.default_methods);
    };
    show("fork", fv);
    show("spawn", sv);
    L.say("the two pools' tasks overlapped in time: {} ({:.3f} s for both)", overlapped, both_secs);

    // Step 4: one Process per context, all sharing one Queue and one Lock made without any.
    L.step("one Process per context, one Queue and one Lock for all");
    mp::Queue<Seen> q;
    mp::Lock lock;
    mp::RawValue<int> counted{0};
    std::vector<mp::Process> children;
    for (const mp::Context* ctx : {&fork, &spawn, &forkserver}) {
      children.emplace_back(*ctx, child_report, q, lock, counted);
    }
    for (auto& c : children) c.start();
    std::map<pid_t, Seen> by_pid;
    for (std::size_t i = 0; i < children.size(); ++i) {
      Seen s = q.get(30s);
      by_pid[s.pid] = s;
    }
    for (auto& c : children) c.join();
    nlohmann::json per_method;
    bool all_exited_0 = true;
    for (auto& c : children) {
      std::string m{c.context().start_method()};
      const Seen& s = by_pid.at(c.pid());
      all_exited_0 = all_exited_0 && *c.exitcode() == 0;
      per_method[m] = {{"sees_configured_by_parent", s.configured_by == me},
                       {"ppid_is_parent", s.ppid == me},
                       {"default_method", std::string(s.default_method)},
                       {"exitcode", *c.exitcode()}};
      L.say("  {:<10} child {}: g_configured_by {}, parent {}{}, default method {}", m, s.pid,
            s.configured_by, s.ppid, s.ppid == me ? " (us)" : " (the fork server)",
            s.default_method);
    }
    L.say("the shared lock counted {} children; the shared queue carried {} reports",
          counted.value(), by_pid.size());

    L.fact("all_start_methods", all);
    L.fact("initial_default", initial);
    L.fact("rules", rules);
    L.fact("default_after_refusal", after_refusal);
    L.fact("default_after_force", after_force);
    L.fact("default_method", mp::get_start_method());
    L.fact("plain_process_method", plain_method);
    L.fact("contexts_compare_by_method", same_value);
    auto pool_fact = [&](const PoolView& v) {
      return nlohmann::json{{"workers", v.pids.size()},
                            {"sees_configured_by_parent", v.configured_by == std::set<int>{me}},
                            {"sees_initial_value", v.configured_by == std::set<int>{0}},
                            {"ppid_is_parent", v.ppids == std::set<pid_t>{me}},
                            {"default_methods", v.default_methods},
                            {"name", v.a_name}};
    };
    L.fact("fork_pool", pool_fact(fv));
    L.fact("spawn_pool", pool_fact(sv));
    L.fact("pools_overlapped", overlapped);  // timing: reported, not claimed
    L.fact("processes", per_method);
    L.fact("counted_under_the_lock", counted.value());
    L.fact("children_left", mp::active_children().size());

    const std::set<std::string> dm{default_method};
    bool rules_ok = rules["set spawn (first call)"] == "ok" &&
                    rules["set spawn again (same method)"] == "ok" &&
                    rules["set fork (a different method)"].starts_with("mp::ProcessError") &&
                    rules["set fork, force=true"] == "ok" &&
                    rules["get_context(\"vfork\")"].starts_with("std::invalid_argument") &&
                    after_refusal == "spawn" && after_force == "fork";
    bool pools_ok = fv.configured_by == std::set<int>{me} && sv.configured_by == std::set<int>{0} &&
                    fv.default_methods == dm && sv.default_methods == dm &&
                    fv.ppids == std::set<pid_t>{me} && sv.ppids == std::set<pid_t>{me};
    bool procs_ok = all_exited_0 && by_pid.size() == 3 && counted.value() == 3 &&
                    per_method["fork"]["sees_configured_by_parent"] == true &&
                    per_method["spawn"]["sees_configured_by_parent"] == false &&
                    per_method["forkserver"]["sees_configured_by_parent"] == false &&
                    per_method["fork"]["ppid_is_parent"] == true &&
                    per_method["spawn"]["ppid_is_parent"] == true &&
                    per_method["forkserver"]["ppid_is_parent"] == false;
    for (const auto& [m, v] : per_method.items())
      procs_ok = procs_ok && v["default_method"] == default_method;
    return rules_ok && pools_ok && procs_ok && plain_method == default_method && same_value &&
           mp::active_children().empty();
  });
}
