// mp/context.hpp - start methods: how a child process is created.
//
//   auto ctx = mp::get_context("fork");
//   mp::Process p{ctx, target, args...};
//
// "fork" copies the parent's memory: the child starts with everything the parent had,
// including state that was mid-change in other threads (see 0_basics/process_contexts).
// Fast, and any callable works, but a fork from a multi-threaded parent can inherit a lock
// some other thread held.
// "spawn" starts a fresh run of this program (posix_spawn of /proc/self/exe) that runs only
// the target: safe with threads, slower, and the target must be a plain function or a
// captureless lambda with serializable arguments (mp/serialize.hpp).
// "forkserver" forks children from a server process started with spawn when first needed:
// a single-threaded parent, so fork is safe again, at spawn's rules for targets.
#pragma once

#include <sys/types.h>

#include <concepts>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace mp {

namespace detail {
struct LaunchSpec;

// A started child as a start method hands it back. The caller owns the descriptors.
struct Launched {
  pid_t pid = -1;
  int pidfd = -1;      // for signals, and for waitid() when it is our own child
  int status_fd = -1;  // when another process reaps the child (forkserver): the exit
                       // code arrives here as an int32, and this is the sentinel
};

// The seam between Process and the ways of creating a process. Each start method is one
// implementation; Process, and later Pool and the queues, only talk to this interface.
class StartMethod {
 public:
  virtual ~StartMethod() = default;
  virtual std::string_view name() const noexcept = 0;
  // Creates a child that runs spec's target and exits. Throws system_error on failure.
  virtual Launched launch(const LaunchSpec& spec) = 0;
  // Whether launch() forks this process (and must wait at the fork gate first).
  virtual bool forks_this_process() const noexcept { return false; }
};
}  // namespace detail

// A start method, as a value: cheap to copy, compared by name.
class Context {
 public:
  std::string_view start_method() const noexcept { return method_->name(); }
  detail::StartMethod& method() const noexcept { return *method_; }
  friend bool operator==(const Context& a, const Context& b) noexcept {
    return a.method_ == b.method_;
  }

 private:
  friend Context get_context(std::string_view);
  explicit Context(detail::StartMethod* m) noexcept : method_(m) {}
  detail::StartMethod* method_;
};

// The context for a start method ("fork"), or the default one when `method` is empty.
// Throws std::invalid_argument for an unknown method.
Context get_context(std::string_view method = {});

// Start methods known at compile time, for mp::Process{mp::spawn, target, args...}.
struct ForkTag {
  static constexpr bool fork = true;
  static constexpr const char* name = "fork";
};
struct SpawnTag {
  static constexpr bool fork = false;
  static constexpr const char* name = "spawn";
};
struct ForkserverTag {
  static constexpr bool fork = false;
  static constexpr const char* name = "forkserver";
};
inline constexpr ForkTag fork{};
inline constexpr SpawnTag spawn{};
inline constexpr ForkserverTag forkserver{};
template <class T>
concept StartMethodTag = requires {
  { T::fork } -> std::convertible_to<bool>;
  { T::name } -> std::convertible_to<const char*>;
};

// The default start method, used by objects created without a context. Python's rule:
// set it once, early; setting it again throws ProcessError unless force is true.
void set_start_method(std::string_view method, bool force = false);
std::string get_start_method();

// The start methods this build supports, in Python's order: fork, spawn, forkserver.
std::vector<std::string> get_all_start_methods();

// The child entry point of spawn and forkserver - the counterpart of Python's
// `if __name__ == "__main__":` guard. A spawn child is a new run of this program; before
// main() it must run the target it was started for and exit, instead of main().
//
// Programs linked with the mp CMake target need nothing: the target links them with
// -Wl,--wrap=main, and mp runs this before main(), after all static initialisation. Other
// builds must make this the first line of main():
//
//   int main(int argc, char** argv) {
//     mp::freeze_support(argc, argv);   // returns at once, except in a child image
//
// Forgetting it is a clear error from Process::start() in the parent, never a fork bomb:
// a child image whose entry point did not run refuses to start processes.
void freeze_support(int argc, char** argv);

// Functions the forkserver runs once, before it forks any child (Python's
// set_forkserver_preload takes module names; C++ takes plain functions). What they set up
// is shared copy-on-write by every child. Takes effect when the server starts.
void set_forkserver_preload(const std::vector<void (*)()>& functions);

}  // namespace mp
