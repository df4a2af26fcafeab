// mp/detail/portable.hpp - a target described in a way another image of this program can run.
//
// spawn and forkserver children do not share the parent's memory, so `target(args...)` has to
// travel as data: the address of a trampoline instantiated for the target's type, the
// target's own address when it is a plain function, and the arguments as bytes. Addresses are
// sent relative to the module (executable or shared library) that holds them, because each
// image is loaded at a different place (ASLR).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/serialize.hpp"

namespace mp::detail {

// An address as module name + offset ("" is the main executable).
struct CodeAddress {
  std::string module;
  std::uint64_t offset = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(module, offset);
  }
};

// Where code at `address` lives, and back. Throws std::runtime_error when the address is in
// no loaded module, or the module is not loaded in this process.
CodeAddress locate_code(const void* address);
const void* resolve_code(const CodeAddress& where);

// The signature every trampoline has: runs the target at `target` (nullptr for class
// targets, which are default-constructed) with arguments decoded from `args`, and returns
// the exit status.
using Trampoline = int (*)(const void* target, std::string_view args);

// What spawn and forkserver send for a Process target.
struct PortableTarget {
  CodeAddress trampoline;
  CodeAddress target;  // offset 0 and empty module for class targets
  bool has_target = false;
  std::string args;
  std::vector<int> fds;  // descriptors the arguments exported (see FdExport)
};

template <class T>
struct is_reference_wrapper : std::false_type {};
template <class T>
struct is_reference_wrapper<std::reference_wrapper<T>> : std::true_type {};

// Can a value of type T be sent to another image? Trivially copyable types are (by bytes),
// except those that are nothing but an address; others need cereal support.
template <class T>
concept Sendable =
    !is_reference_wrapper<T>::value && !std::is_pointer_v<T> &&
    (TriviallySerializable<T> ||
     cereal::traits::is_output_serializable<T, cereal::BinaryOutputArchive>::value);

// A target another image can run: a plain function (through a pointer), or a class with no
// state that it can default-construct, such as a lambda that captures nothing.
template <class F>
concept PortableCallable =
    (std::is_pointer_v<F> && std::is_function_v<std::remove_pointer_t<F>>) ||
    (std::is_class_v<F> && std::is_empty_v<F> && std::is_default_constructible_v<F>);

template <class F, class... Args>
inline constexpr bool is_portable_v = PortableCallable<F> && (Sendable<Args> && ...);

template <class F, class Tuple>
int invoke_target(F& f, Tuple& args);  // process.hpp

template <class F, class... Args>
int trampoline(const void* target, std::string_view bytes) {
  auto args = loads<Args...>(bytes);
  if constexpr (std::is_pointer_v<F>) {
    F f = reinterpret_cast<F>(const_cast<void*>(target));
    return invoke_target(f, args);
  } else {
    F f{};
    return invoke_target(f, args);
  }
}

// Describes target(args...) for another image. Call only when is_portable_v holds.
template <class F, class... Args>
PortableTarget make_portable(const F& target, const std::tuple<Args...>& args) {
  PortableTarget p;
  Trampoline t = &trampoline<F, Args...>;
  p.trampoline = locate_code(reinterpret_cast<const void*>(t));
  if constexpr (std::is_pointer_v<F>) {
    p.target = locate_code(reinterpret_cast<const void*>(target));
    p.has_target = true;
  }
  FdExport fds;
  std::apply([&](const auto&... a) { dump_into(p.args, a...); }, args);
  p.fds = fds.exported();
  return p;
}

}  // namespace mp::detail
