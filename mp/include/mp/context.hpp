// mp/context.hpp - start methods: how a child process is created.
//
//   auto ctx = mp::get_context("fork");
//   mp::Process p{ctx, target, args...};
//
// "fork" copies the parent's memory: the child starts with everything the parent had,
// including state that was mid-change in other threads (see 0_basics/process_contexts).
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace mp {

namespace detail {
struct LaunchSpec;

// A started child as a start method hands it back.
struct Launched {
  pid_t pid = -1;
  int pidfd = -1;  // owned by the caller from now on
};

// The seam between Process and the ways of creating a process. Each start method is one
// implementation; Process, and later Pool and the queues, only talk to this interface.
class StartMethod {
 public:
  virtual ~StartMethod() = default;
  virtual std::string_view name() const noexcept = 0;
  // Creates a child that runs spec's target and exits. Throws system_error on failure.
  virtual Launched launch(const LaunchSpec& spec) = 0;
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

// The default start method, used by objects created without a context. Python's rule:
// set it once, early; setting it again throws ProcessError unless force is true.
void set_start_method(std::string_view method, bool force = false);
std::string get_start_method();

// The start methods this build supports, in Python's order.
std::vector<std::string> get_all_start_methods();

}  // namespace mp
