// mp/supervisor.hpp - supervision trees as Erlang/OTP's supervisor does them.
//
//   mp::Supervisor sup{{.strategy = mp::Strategy::one_for_one,
//                       .max_restarts = 3, .max_seconds = 60s,
//                       .on_event = [](const mp::SupervisorEvent& e) { log(e); }}};
//   sup.add({.name = "db", .make = [](const mp::Heartbeat&) { return mp::Process{db_main}; }});
//   sup.add({.name = "web", .make = [](const mp::Heartbeat& hb) { return mp::Process{web, hb}; },
//            .heartbeat_timeout = 2s});           // web must call hb.beat() every < 2 s
//   sup.start();                                   // starts the children in order
//   sup.wait();                                    // until all are done, or it gave up
//   sup.stop();                                    // or: stop in reverse order, with grace
//
// Rules, as in OTP:
// - Restart policy per child: permanent (always restarted), transient (restarted only
//   after an abnormal end: a non-zero exit code, a signal, or being found unhealthy),
//   temporary (never restarted).
// - Strategy: one_for_one restarts the child that ended; one_for_all stops all the others
//   (in reverse order) and restarts them all; rest_for_one stops and restarts the children
//   added after it. Temporary children stopped this way are not restarted.
// - Intensity: more than max_restarts restarts within max_seconds and the supervisor gives
//   up: it stops every child in reverse order, state() becomes gave_up and reason() says
//   which child and how many restarts. An optional backoff delays each restart of a child
//   (backoff, doubled after each consecutive restart, up to backoff_max).
// - Health, not only liveness: a child with heartbeat_timeout must call beat() on its
//   Heartbeat more often than that; a child with an `unhealthy` predicate is read with
//   mp::process_stats every check_interval. Unhealthy -> SIGTERM, its grace period,
//   SIGKILL -> restart per its policy (it counts as abnormal).
// - Shutdown: stop() and the destructor stop the children in reverse order, each with
//   SIGTERM, then SIGKILL after its own shutdown_grace.
// - No orphans: the children are started by the supervisor's own thread with mp::Process's
//   PR_SET_PDEATHSIG, so they die with the supervisor's process (even on SIGKILL).
//
// Differences from OTP: a Supervisor is an object in the calling process (its loop runs on
// a thread of its own), not a process; it supervises processes, not other supervisors.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mp/monitor.hpp"
#include "mp/process.hpp"
#include "mp/shared_memory.hpp"

namespace mp {

enum class Restart { permanent, transient, temporary };
enum class Strategy { one_for_one, one_for_all, rest_for_one };

// A timestamp in shared memory that a child refreshes to say it is making progress.
// Copies (into a Process, across any start method) share it.
class Heartbeat {
 public:
  Heartbeat();
  void beat() const noexcept;               // now
  std::int64_t last_ns() const noexcept;    // CLOCK_MONOTONIC of the last beat
  std::uint64_t count() const noexcept;     // beats since the last reset
  void reset() const noexcept;              // counts as a beat, and count() back to 0

  template <class Archive>
  void save(Archive& ar) const {
    ar(cell_);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(cell_);
  }

  struct Cell {
    std::int64_t last_ns;
    std::uint64_t count;
  };

 private:
  RawValue<Cell> cell_;
};

struct ChildSpec {
  std::string name;
  // Builds the (unstarted) Process for each start; it receives the child's Heartbeat.
  std::function<Process(const Heartbeat&)> make;
  Restart restart = Restart::permanent;
  Seconds shutdown_grace = std::chrono::seconds(5);
  // When set, the child must beat() more often than this.
  std::optional<Seconds> heartbeat_timeout{};
  // When set and true for a reading of the running child, the child is unhealthy.
  std::function<bool(const ProcessStats&)> unhealthy{};
};

struct SupervisorEvent {
  enum class Kind {
    started,    // pid: the new child
    exited,     // exitcode: its status, or -signal
    unhealthy,  // reason: what the check found; the child is terminated next
    stopped,    // stopped by the supervisor (strategy, shutdown or give-up); exitcode
    gave_up,    // reason: the intensity that was exceeded
  };
  Kind kind;
  std::string child;  // empty for gave_up
  pid_t pid = 0;
  int exitcode = 0;
  int restarts = 0;  // restarts of this child so far
  std::string reason;
};
std::string to_string(SupervisorEvent::Kind kind);

struct SupervisorOptions {
  Strategy strategy = Strategy::one_for_one;
  int max_restarts = 3;                            // OTP's intensity
  Seconds max_seconds = std::chrono::seconds(5);   // OTP's period
  Seconds backoff = Seconds(0);                    // delay before a child's first restart
  Seconds backoff_max = std::chrono::seconds(30);  // the doubling stops here
  Seconds check_interval = std::chrono::milliseconds(50);  // health checks
  // Called on the supervisor's thread; keep it short, and do not call stop() from it.
  std::function<void(const SupervisorEvent&)> on_event{};
};

class Supervisor {
 public:
  enum class State { idle, running, finished, gave_up, stopped };

  explicit Supervisor(SupervisorOptions options = {});
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;
  ~Supervisor();  // stop()

  // Before start(). Names are unique (ProcessError otherwise).
  void add(ChildSpec spec);

  // Starts the children in the order they were added, then supervises them.
  void start();

  // Blocks until no child is left to run (finished), or the supervisor gave up or was
  // stopped. The timed form returns false when the time ran out first.
  void wait();
  bool wait(Seconds timeout);

  // Stops every child in reverse order (SIGTERM, grace, SIGKILL) and the supervision.
  void stop();

  State state() const;
  std::string reason() const;              // why it gave up; empty otherwise
  int restarts(const std::string& child) const;
  std::optional<pid_t> pid(const std::string& child) const;  // while it runs

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mp
