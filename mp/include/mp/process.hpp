// mp/process.hpp - child processes with Python's multiprocessing.Process interface.
//
//   mp::Process p{work, 42, "text"};   // target and its arguments, copied into the child
//   p.start();
//   p.join();                          // or p.join(2s): true when the child has ended
//   *p.exitcode();                     // 0, the target's int result, 1 if it threw,
//                                      // -N if a signal N ended it
//
// Lifetime rules (children never outlive the parent by accident):
// - A child dies with its parent (PR_SET_PDEATHSIG(SIGKILL)), unless set_detached(true).
//   Note: Linux sends that signal when the *thread* that started the child exits, so start
//   long-lived children from a long-lived thread (main, typically).
// - When a started Process is destroyed it joins the child; a daemon child, or any child
//   destroyed while an exception unwinds, is terminated (SIGTERM, then SIGKILL after a
//   grace period) and reaped. Nothing is left as a zombie.
// - At normal exit, daemon children still running are terminated and the others joined,
//   as Python does.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <concepts>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/context.hpp"
#include "mp/detail/portable.hpp"
#include "mp/error.hpp"

namespace mp {

// Timeouts are given in any std::chrono unit: p.join(2s), p.join(250ms), p.join(Seconds{0.5}).
using Seconds = std::chrono::duration<double>;

namespace detail {
struct ChildState;

// What a start method needs to create a child. `body` runs in the child and returns its
// exit status; it may hold anything, so only start methods that copy the parent's memory
// (fork) can run it. Start methods that build a fresh image (spawn, forkserver) call
// `portable` instead, which describes the target as data; it is empty when the target or
// an argument cannot travel, and `not_portable_why` says why.
struct LaunchSpec {
  std::string identity;  // "3", or "1:3" in a child: its place in the family
  std::string name;
  bool daemon = false;
  bool detached = false;
  std::function<int()> body;
  std::function<PortableTarget()> portable;
  std::string not_portable_why;
};

// Runs a target with its arguments and maps the result to an exit status: an int result
// is the status, any other result 0.
template <class F, class Tuple>
int invoke_target(F& f, Tuple& args) {
  using R = decltype(std::apply(f, args));
  if constexpr (std::is_integral_v<R> && !std::is_same_v<R, bool>) {
    return static_cast<int>(std::apply(f, args));
  } else {
    std::apply(f, args);
    return 0;
  }
}
}  // namespace detail

// Facts about a process: the current one, the parent, or an active child.
struct ProcessInfo {
  pid_t pid = 0;
  std::string name;
  bool daemon = false;
};

class Process {
 public:
  // An empty Process that owns nothing; assign a real one to it.
  Process() noexcept;

  // A process that will run target(args...) once started, with the default context.
  // The target and the arguments are copied (decayed), as std::thread does.
  template <class F, class... Args>
    requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
  explicit Process(F&& target, Args&&... args)
      : Process(get_context(), std::forward<F>(target), std::forward<Args>(args)...) {}

  // The same, with an explicit start method: mp::Process p{mp::get_context("fork"), f, 1};
  template <class F, class... Args>
    requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
  Process(const Context& context, F&& target, Args&&... args)
      : Process(context, make_spec(std::forward<F>(target), std::forward<Args>(args)...)) {}

  // The same with a start method fixed at compile time (mp::spawn, mp::forkserver): a
  // target that cannot run in a fresh image (a lambda that captures, a pointer argument)
  // is a compile-time error instead of a runtime one.
  template <StartMethodTag Tag, class F, class... Args>
    requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
  Process(Tag tag, F&& target, Args&&... args)
      : Process(get_context(tag.name), std::forward<F>(target), std::forward<Args>(args)...) {
    static_assert(Tag::fork || detail::is_portable_v<std::decay_t<F>, std::decay_t<Args>...>,
                  "spawn and forkserver children run a fresh copy of the program: the target "
                  "must be a plain function or a lambda without captures, and every argument "
                  "must be serializable (trivially copyable or supported by cereal), not a "
                  "pointer or std::ref");
  }

  Process(Process&& other) noexcept;
  Process& operator=(Process&& other) noexcept;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  ~Process();

  // Name (default "Process-N") and flags. Set them before start().
  const std::string& name() const noexcept;
  void set_name(std::string name);
  bool daemon() const noexcept;
  void set_daemon(bool daemon);
  bool detached() const noexcept;
  // A detached child is not killed when its parent dies, and is neither joined nor
  // terminated when this object is destroyed. Use it only for work meant to survive.
  void set_detached(bool detached);
  const Context& context() const noexcept { return context_; }

  // Creates the child. Throws ProcessError if already started, system_error if the
  // system cannot create it.
  void start();

  // Waits for the child to end. The timed form returns false if it is still running.
  void join();
  bool join(Seconds timeout);

  // Whether the child has been started and has not ended (it reaps an ended child).
  bool is_alive();

  // Sends SIGTERM / SIGKILL. Harmless when the child has already ended.
  void terminate();
  void kill();

  // std::nullopt while running or before start; the exit status when it exited; the
  // negated signal number when a signal ended it.
  std::optional<int> exitcode();

  // 0 before start().
  pid_t pid() const noexcept;

  // A descriptor that becomes readable when the child ends (a pidfd): poll it, or pass it
  // to mp::wait() later. Valid from start() until this object is destroyed. -1 before.
  int sentinel() const noexcept;

 private:
  Process(const Context& context, detail::LaunchSpec spec);

  // The target and its arguments are stored once, shared by the fork body and the
  // portable description.
  template <class F, class... Args>
  static detail::LaunchSpec make_spec(F&& target, Args&&... args) {
    using Fn = std::decay_t<F>;
    using Stored = std::pair<Fn, std::tuple<std::decay_t<Args>...>>;
    auto stored = std::make_shared<Stored>(
        Fn(std::forward<F>(target)),
        std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...));
    detail::LaunchSpec spec;
    spec.body = [stored] { return detail::invoke_target(stored->first, stored->second); };
    if constexpr (detail::is_portable_v<Fn, std::decay_t<Args>...>) {
      spec.portable = [stored] { return detail::make_portable(stored->first, stored->second); };
    } else if constexpr (!detail::PortableCallable<Fn>) {
      spec.not_portable_why =
          "its target is not a plain function or a lambda without captures (capturing "
          "closures work only with the fork start method)";
    } else {
      spec.not_portable_why =
          "an argument cannot be serialized (it must be trivially copyable or supported by "
          "cereal, and not a pointer or std::ref); such arguments work only with fork";
    }
    return spec;
  }

  void release() noexcept;  // the destructor's work

  Context context_;
  detail::LaunchSpec spec_;
  std::shared_ptr<detail::ChildState> state_;
};

// The process this code runs in (name "MainProcess" in the original program).
ProcessInfo current_process();

// The parent, if this process was started by mp::Process (std::nullopt in the main process).
std::optional<ProcessInfo> parent_process();

// Children started by this process that are still running. It reaps those that ended.
std::vector<ProcessInfo> active_children();

// The number of CPUs online.
int cpu_count();

}  // namespace mp
