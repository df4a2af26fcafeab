// mp/src/supervisor.cpp - the supervision loop: one thread that starts the children, polls
// their pidfds and a wake-up eventfd, runs the health checks, and applies the strategy.
#include "mp/supervisor.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <fmt/format.h>
#include <mutex>
#include <thread>
#include <utility>

#include "mp/detail/fd.hpp"
#include "mp/error.hpp"

namespace mp {

namespace {
std::int64_t monotonic_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);  // cannot fail with a valid clock and pointer
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}
using Clock = std::chrono::steady_clock;
}  // namespace

// ---- Heartbeat ------------------------------------------------------------------------------

Heartbeat::Heartbeat() : cell_(Cell{monotonic_ns(), 0}) {}

void Heartbeat::beat() const noexcept {
  std::atomic_ref<std::int64_t>(cell_.value().last_ns).store(monotonic_ns(), std::memory_order_relaxed);
  std::atomic_ref<std::uint64_t>(cell_.value().count).fetch_add(1, std::memory_order_relaxed);
}
std::int64_t Heartbeat::last_ns() const noexcept {
  return std::atomic_ref<std::int64_t>(cell_.value().last_ns).load(std::memory_order_relaxed);
}
std::uint64_t Heartbeat::count() const noexcept {
  return std::atomic_ref<std::uint64_t>(cell_.value().count).load(std::memory_order_relaxed);
}
void Heartbeat::reset() const noexcept {
  std::atomic_ref<std::int64_t>(cell_.value().last_ns).store(monotonic_ns(), std::memory_order_relaxed);
  std::atomic_ref<std::uint64_t>(cell_.value().count).store(0, std::memory_order_relaxed);
}

std::string to_string(SupervisorEvent::Kind kind) {
  switch (kind) {
    case SupervisorEvent::Kind::started: return "started";
    case SupervisorEvent::Kind::exited: return "exited";
    case SupervisorEvent::Kind::unhealthy: return "unhealthy";
    case SupervisorEvent::Kind::stopped: return "stopped";
    case SupervisorEvent::Kind::gave_up: return "gave_up";
  }
  return "unknown";
}

// ---- Supervisor -----------------------------------------------------------------------------

struct Supervisor::Impl {
  struct Child {
    ChildSpec spec;
    Heartbeat heartbeat;
    Process process;  // touched by the loop thread only
    bool running = false;
    std::optional<Clock::time_point> start_at;  // a start is pending
    Clock::time_point started;
    int consecutive = 0;  // restarts without a calm period between them (for the backoff)
    // Read by other threads, under `mutex`:
    int restarts = 0;
    pid_t pid = 0;
  };

  SupervisorOptions options;
  std::vector<Child> children;
  detail::UniqueFd wake;
  std::thread thread;
  std::atomic<bool> stop_requested{false};
  std::deque<Clock::time_point> restart_times;

  mutable std::mutex mutex;
  std::condition_variable changed;
  State state = State::idle;
  bool initial_start_done = false;
  std::string reason;

  void emit(SupervisorEvent e) {
    if (options.on_event) options.on_event(e);
  }
  void set_state(State s, std::string why = {}) {
    {
      std::lock_guard g{mutex};
      state = s;
      if (!why.empty()) reason = std::move(why);
    }
    changed.notify_all();
  }
  int restarts_of(const Child& c) {
    std::lock_guard g{mutex};
    return c.restarts;
  }

  void start_child(Child& c) {
    c.heartbeat.reset();
    c.process = c.spec.make(c.heartbeat);
    c.process.start();
    c.running = true;
    c.start_at.reset();
    c.started = Clock::now();
    {
      std::lock_guard g{mutex};
      c.pid = c.process.pid();
    }
    emit({SupervisorEvent::Kind::started, c.spec.name, c.process.pid(), 0, restarts_of(c), {}});
  }

  // SIGTERM, the child's grace period, SIGKILL. Returns the exit code.
  int terminate_child(Child& c) {
    c.process.terminate();
    if (!c.process.join(c.spec.shutdown_grace)) {
      c.process.kill();
      c.process.join();
    }
    c.running = false;
    {
      std::lock_guard g{mutex};
      c.pid = 0;
    }
    return c.process.exitcode().value_or(-9);
  }

  void stop_child(Child& c, const char* why) {
    pid_t pid = c.process.pid();
    int code = terminate_child(c);
    emit({SupervisorEvent::Kind::stopped, c.spec.name, pid, code, restarts_of(c), why});
  }

  void stop_all(const char* why) {
    for (auto it = children.rbegin(); it != children.rend(); ++it) {
      it->start_at.reset();
      if (it->running) stop_child(*it, why);
    }
  }

  Seconds backoff_for(const Child& c) const {
    if (options.backoff.count() <= 0) return Seconds(0);
    double d = options.backoff.count() * std::pow(2.0, std::min(c.consecutive, 30));
    return Seconds(std::min(d, options.backoff_max.count()));
  }

  // Child i ended (exit code `code`; `abnormal` also when it was killed as unhealthy).
  // Returns false when the supervisor gave up.
  bool child_ended(std::size_t i, bool abnormal) {
    Child& c = children[i];
    c.running = false;
    {
      std::lock_guard g{mutex};
      c.pid = 0;
    }
    bool restart = c.spec.restart == Restart::permanent ||
                   (c.spec.restart == Restart::transient && abnormal);
    if (!restart) return true;

    auto now = Clock::now();
    restart_times.push_back(now);
    auto window = std::chrono::duration_cast<Clock::duration>(options.max_seconds);
    while (!restart_times.empty() && restart_times.front() < now - window) restart_times.pop_front();
    if (static_cast<int>(restart_times.size()) > options.max_restarts) {
      std::string why = fmt::format(
          "child {} needed restart {} within {} s, more than max_restarts = {}; all children "
          "stopped",
          c.spec.name, restart_times.size(), options.max_seconds.count(), options.max_restarts);
      stop_all("supervisor gave up");
      emit({SupervisorEvent::Kind::gave_up, {}, 0, 0, 0, why});  // before wait() returns
      set_state(State::gave_up, why);
      return false;
    }

    std::size_t first = i, last = i + 1;
    if (options.strategy == Strategy::one_for_all) first = 0, last = children.size();
    if (options.strategy == Strategy::rest_for_one) last = children.size();
    // The siblings in the group that are alive (running, or waiting for a start) go down
    // with it, in reverse order, and come back with it unless they are temporary. Those
    // that had ended for good stay ended.
    std::vector<std::size_t> again{i};
    for (std::size_t j = last; j-- > first;) {
      if (j == i) continue;
      Child& s = children[j];
      if (!s.running && !s.start_at) continue;
      if (s.running) stop_child(s, "restarted with a sibling");
      s.start_at.reset();
      if (s.spec.restart != Restart::temporary) again.push_back(j);
    }
    std::sort(again.begin(), again.end());
    for (std::size_t j : again) {
      Child& s = children[j];
      if (now - s.started > window) s.consecutive = 0;  // a calm period resets the backoff
      s.start_at = now + std::chrono::duration_cast<Clock::duration>(backoff_for(s));
      ++s.consecutive;
      std::lock_guard g{mutex};
      ++s.restarts;
    }
    return true;
  }

  void loop() {
    try {
      for (auto& c : children) start_child(c);
    } catch (const std::exception& e) {
      stop_all("a start failed");
      set_state(State::gave_up, fmt::format("cannot start the children: {}", e.what()));
      std::lock_guard g{mutex};
      initial_start_done = true;
      changed.notify_all();
      return;
    }
    {
      std::lock_guard g{mutex};
      initial_start_done = true;
    }
    changed.notify_all();

    auto next_check = Clock::now();
    try {
      while (!stop_requested.load()) {
        auto now = Clock::now();
        // Pending starts that are due, in order.
        for (auto& c : children) {
          if (c.start_at && *c.start_at <= now && !stop_requested.load()) start_child(c);
        }
        bool any_running = false, any_pending = false, any_check = false;
        std::optional<Clock::time_point> wake_at;
        std::vector<pollfd> fds{{wake.get(), POLLIN, 0}};
        std::vector<std::size_t> index;
        for (std::size_t i = 0; i < children.size(); ++i) {
          Child& c = children[i];
          if (c.running) {
            any_running = true;
            fds.push_back({c.process.sentinel(), POLLIN, 0});
            index.push_back(i);
            if (c.spec.heartbeat_timeout || c.spec.unhealthy) any_check = true;
          }
          if (c.start_at) {
            any_pending = true;
            if (!wake_at || *c.start_at < *wake_at) wake_at = *c.start_at;
          }
        }
        if (!any_running && !any_pending) {
          set_state(State::finished);
          return;
        }
        if (any_check && (!wake_at || next_check < *wake_at)) wake_at = next_check;
        int timeout = -1;
        if (wake_at) {
          auto ms = std::chrono::ceil<std::chrono::milliseconds>(*wake_at - Clock::now()).count();
          timeout = static_cast<int>(std::clamp<long long>(ms, 0, 60'000));
        }
        int n = detail::retry_eintr(
            [&] { return ::poll(fds.data(), static_cast<nfds_t>(fds.size()), timeout); });
        if (n == -1) throw_errno("poll the supervised children");
        if (fds[0].revents & POLLIN) {
          std::uint64_t v = 0;
          if (::read(wake.get(), &v, sizeof v) == -1 && errno != EAGAIN) {
            throw_errno("read the supervisor's wake-up eventfd");
          }
        }
        if (stop_requested.load()) break;

        for (std::size_t k = 0; k < index.size(); ++k) {
          if (!(fds[k + 1].revents & (POLLIN | POLLHUP))) continue;
          Child& c = children[index[k]];
          if (!c.running) continue;  // stopped meanwhile by a sibling's restart
          c.process.join();
          int code = c.process.exitcode().value_or(-9);
          emit({SupervisorEvent::Kind::exited, c.spec.name, c.process.pid(), code, restarts_of(c),
                describe_exitcode(code)});
          if (!child_ended(index[k], code != 0)) return;
        }

        if (any_check && Clock::now() >= next_check) {
          next_check = Clock::now() + std::chrono::duration_cast<Clock::duration>(options.check_interval);
          if (!health_checks()) return;
        }
      }
      stop_all("supervisor stopped");
      set_state(State::stopped);
    } catch (const std::exception& e) {
      stop_all("supervisor failed");
      set_state(State::gave_up, fmt::format("supervision failed: {}", e.what()));
    }
  }

  // Returns false when the supervisor gave up.
  bool health_checks() {
    for (std::size_t i = 0; i < children.size(); ++i) {
      Child& c = children[i];
      if (!c.running) continue;
      std::string why;
      if (c.spec.heartbeat_timeout) {
        double silent = static_cast<double>(monotonic_ns() - c.heartbeat.last_ns()) / 1e9;
        if (silent > c.spec.heartbeat_timeout->count()) {
          why = fmt::format("no heartbeat for {:.2f} s (limit {} s)", silent,
                            c.spec.heartbeat_timeout->count());
        }
      }
      if (why.empty() && c.spec.unhealthy) {
        try {
          if (c.spec.unhealthy(process_stats(c.process.pid()))) why = "its health predicate failed";
        } catch (const NoSuchProcess&) {
          continue;  // it just ended: poll reports it next
        }
      }
      if (why.empty()) continue;
      pid_t pid = c.process.pid();
      emit({SupervisorEvent::Kind::unhealthy, c.spec.name, pid, 0, restarts_of(c), why});
      int code = terminate_child(c);
      emit({SupervisorEvent::Kind::exited, c.spec.name, pid, code, restarts_of(c),
            describe_exitcode(code)});
      if (!child_ended(i, true)) return false;
    }
    return true;
  }
};

Supervisor::Supervisor(SupervisorOptions options) : impl_(std::make_unique<Impl>()) {
  if (options.max_restarts < 0) throw std::invalid_argument("max_restarts must be >= 0");
  if (options.max_seconds.count() <= 0) throw std::invalid_argument("max_seconds must be > 0");
  if (options.check_interval.count() <= 0) throw std::invalid_argument("check_interval must be > 0");
  impl_->options = std::move(options);
}

Supervisor::~Supervisor() {
  try {
    stop();
  } catch (const std::exception& e) {
    detail::report_noexcept(fmt::format("cannot stop a supervisor: {}", e.what()));
  }
}

void Supervisor::add(ChildSpec spec) {
  if (state() != State::idle) throw ProcessError("Supervisor::add: the supervisor has started");
  if (!spec.make) throw std::invalid_argument(fmt::format("child {}: no make function", spec.name));
  for (auto& c : impl_->children) {
    if (c.spec.name == spec.name) {
      throw ProcessError(fmt::format("Supervisor::add: a child is already named {}", spec.name));
    }
  }
  impl_->children.emplace_back();
  impl_->children.back().spec = std::move(spec);
}

void Supervisor::start() {
  if (state() != State::idle) throw ProcessError("Supervisor::start: already started");
  int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd == -1) throw_errno("create the supervisor's eventfd");
  impl_->wake.reset(fd);
  impl_->set_state(State::running);
  impl_->thread = std::thread([this] { impl_->loop(); });
  std::unique_lock g{impl_->mutex};
  impl_->changed.wait(g, [&] { return impl_->initial_start_done; });
}

void Supervisor::wait() {
  std::unique_lock g{impl_->mutex};
  if (impl_->state == State::idle) throw ProcessError("Supervisor::wait: not started");
  impl_->changed.wait(g, [&] { return impl_->state != State::running; });
}

bool Supervisor::wait(Seconds timeout) {
  std::unique_lock g{impl_->mutex};
  if (impl_->state == State::idle) throw ProcessError("Supervisor::wait: not started");
  return impl_->changed.wait_for(g, timeout, [&] { return impl_->state != State::running; });
}

void Supervisor::stop() {
  if (!impl_->thread.joinable()) return;
  impl_->stop_requested.store(true);
  std::uint64_t one = 1;
  if (detail::retry_eintr([&] { return ::write(impl_->wake.get(), &one, sizeof one); }) == -1) {
    throw_errno("wake the supervisor");
  }
  impl_->thread.join();
}

Supervisor::State Supervisor::state() const {
  std::lock_guard g{impl_->mutex};
  return impl_->state;
}

std::string Supervisor::reason() const {
  std::lock_guard g{impl_->mutex};
  return impl_->reason;
}

int Supervisor::restarts(const std::string& child) const {
  std::lock_guard g{impl_->mutex};
  for (auto& c : impl_->children) {
    if (c.spec.name == child) return c.restarts;
  }
  throw std::out_of_range(fmt::format("Supervisor: no child named {}", child));
}

std::optional<pid_t> Supervisor::pid(const std::string& child) const {
  std::lock_guard g{impl_->mutex};
  for (auto& c : impl_->children) {
    if (c.spec.name == child) return c.pid != 0 ? std::optional<pid_t>(c.pid) : std::nullopt;
  }
  throw std::out_of_range(fmt::format("Supervisor: no child named {}", child));
}

}  // namespace mp
