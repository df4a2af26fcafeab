// mp/shared_memory.hpp - memory shared between processes: SharedMemory by name, and
// Value/Array (with a lock) and RawValue/RawArray (without) for a parent and its children.
//
//   auto shm = mp::SharedMemory::create(4096);       // a new segment, name "/mp-<pid>-<hex>"
//   mp::Process p{worker, shm.name()};               // a child attaches by name:
//   ...  auto seg = mp::SharedMemory::attach(name);  //   seg.as<int>()[0] = 42;
//
// ---- Names --------------------------------------------------------------------------------
// A segment is a file in /dev/shm. Every name the library creates starts with "/mp-", so a
// leak is easy to find (ls /dev/shm/mp-*). create() without a name generates a unique one,
// "/mp-<pid>-<random>", or "/mp-<tag>-<pid>-<random>" when the environment variable
// MP_SHM_TAG is set (letters, digits, '_', '.'): children inherit the environment, so a test
// harness or a supervisor that sets a tag finds exactly its own process tree's segments;
// a name given to create() must start with "/mp-" (or "mp-"; the slash is added) and is
// otherwise rejected with std::invalid_argument: silently renaming would break the other
// program that looks the segment up by the name it was told. attach() accepts any name.
//
// ---- Nothing is left in /dev/shm -------------------------------------------------------------
// The process that creates a tracked segment (the default) owns its name:
// - normal end of the owner object (scope exit, exception unwinding): the destructor
//   unlinks the name. Copies of the object in fork children never unlink (they check
//   the pid), so a child finishing early cannot pull the name from under its siblings;
// - the creating process dies without running destructors (SIGKILL, abort, std::_Exit,
//   an uncaught exception): a tracker process unlinks every name the creator still owned.
//
// The tracker (one per creating process, like Python's resource_tracker, started by the
// first tracked create()) is forked twice so it is never the creator's child (a wait(-1)
// loop in the program never meets it), then calls setsid() and ignores SIGINT, SIGTERM,
// SIGHUP and SIGPIPE (Ctrl-C or a killpg of the program's group must not stop it before
// it cleans up), and closes every descriptor but two: its end of a socket pair to the
// creator, and a pidfd of the creator. Before creating a name the creator sends
// "register <name>" (so a SIGKILL right after shm_open cannot leak it), and after
// unlinking "unregister <name>". The tracker leaves when the creator's end reads EOF or
// the creator's pidfd reports its death, unlinks the names still registered, and exits:
// it never outlives its creator by more than that. The creator's socket is close-on-exec
// and closed in fork children (pthread_atfork), so only the creator holds it; a fork child
// that creates segments gets its own tracker. If the tracker ever goes away (someone
// SIGKILLs it), the next register starts a new one and hands it every live name.
//
// Unlinking removes the name, not the memory: processes that have the segment mapped keep
// working with it, as the lessons show; only new attach() calls by name fail.
//
// What it does not cover: create(..., track = false) segments (the caller unlinks them,
// e.g. a segment meant to outlive the program); a name unlinked by another process and
// then re-created under the same name while the first creator lives (its tracker would
// unlink the new one at the creator's end); a creator that is itself a child subreaper
// (the tracker would be reparented to it).
//
// Value<T>, Array<T>, RawValue<T> and RawArray<T> need no name at all: they live in an
// anonymous memfd region (mp/detail/region.hpp) that the kernel frees with its last user.
#pragma once

#include <fmt/format.h>
#include <sys/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mp/detail/region.hpp"
#include "mp/serialize.hpp"
#include "mp/sync.hpp"

namespace mp {

namespace detail {
// What may live in shared memory: bytes that mean the same in every process. A class that
// says how cereal should serialize it (a handle holding a descriptor) is not such a thing.
template <class T>
concept SharedPlain = TriviallySerializable<T>;
}  // namespace detail

class SharedMemory {
 public:
  // A closed object that owns nothing.
  SharedMemory() noexcept = default;

  // Creates a new segment of `size` bytes (> 0), zero-filled. An empty name generates a
  // unique "/mp-<pid>-<random>" name. Throws std::invalid_argument for a bad size or name,
  // std::system_error when the name exists already (EEXIST) or the system refuses.
  // With track = false the segment is neither tracked nor unlinked by the destructor: the
  // caller must unlink() it (Python 3.13's track=False).
  static SharedMemory create(std::size_t size, std::string_view name = {}, bool track = true);

  // Maps the existing segment `name` (read/write), at its full size. Never unlinks it.
  static SharedMemory attach(std::string_view name);

  SharedMemory(SharedMemory&& o) noexcept;
  SharedMemory& operator=(SharedMemory&& o) noexcept;
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  // close(), and for the creator of a tracked segment also unlink(). Reports, never throws.
  ~SharedMemory();

  // The POSIX name, with its leading slash ("/mp-..."); empty for a default object.
  const std::string& name() const noexcept { return name_; }
  std::size_t size() const noexcept { return size_; }
  std::byte* data() const noexcept { return data_; }
  std::span<std::byte> buf() const noexcept { return {data_, size_}; }
  // The memory as an array of T: size() / sizeof(T) elements.
  template <detail::SharedPlain T>
  std::span<T> as() const noexcept {
    return {reinterpret_cast<T*>(data_), size_ / sizeof(T)};
  }

  // Whether this object still maps the segment.
  bool is_open() const noexcept { return data_ != nullptr; }
  // Whether this process created the segment with tracking and has not unlinked it yet.
  bool owns_name() const noexcept;

  // Unmaps the segment in this process. Other processes are not affected; the name stays.
  // Idempotent. Throws system_error if munmap fails.
  void close();

  // Removes the name (shm_unlink): later attach() calls fail, the memory lives on while
  // anyone maps it. Any process may unlink; an already-removed name is not an error.
  void unlink();

 private:
  std::string name_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  pid_t creator_ = 0;  // the pid that must unlink; 0 when not tracked or already unlinked
};

namespace detail {
// Whether `name` ("/mp-...") is a valid POSIX shared memory name, with a reason if not.
std::string invalid_shm_name_reason(std::string_view name);
// For tests: the pid of this process's tracker, 0 when none has been started.
pid_t shm_tracker_pid() noexcept;
}  // namespace detail

// ---- Value, Array, RawValue, RawArray -------------------------------------------------------
//
// One T, or n of them, in memory shared with children (Python's multiprocessing.Value and
// Array, and their Raw forms). T is trivially copyable: an int, a double, a plain struct,
// never a pointer (an address means nothing in another process).
//
//   mp::Value<std::int64_t> counter;            // 0, with a lock of its own
//   mp::Process p{work, counter};               // the child's copy is the same memory
//   { std::lock_guard g{counter.get_lock()}; ++counter.get_obj(); }
//   counter.value();                            // reads under the lock
//
// Handles: copies share the memory (and the lock); pass them to mp::Process. Under fork the
// child inherits the mapping, spawn and forkserver children receive its memfd (save/load).
// The memory is a detail::Region, which has no name and cannot leak.
//
// Locking, as in Python: Value::value() and set() take the lock for one whole read or
// write, so no one sees half a struct. A read-modify-write (v += 1) is two steps: hold
// get_lock() around it and use get_obj(), the unlocked reference (calling value() while
// holding the lock throws ProcessError: the Lock is not recursive). Array's operator[],
// span() and iterators are unlocked references too: hold get_lock() while others may write.
// RawValue/RawArray have no lock at all: for data one process writes at a time, or for
// std::atomic_ref<T> on the elements.

namespace detail {
template <class T>
std::shared_ptr<Region> make_shared_block(std::size_t count, std::string_view label) {
  return std::make_shared<Region>(
      Region::create(std::max<std::size_t>(1, count * sizeof(T)), label));
}
template <class T>
std::shared_ptr<Region> attach_shared_block(int fd, std::size_t count, std::string_view what) {
  auto r = std::make_shared<Region>(Region::attach(fd));
  if (r->size() < count * sizeof(T)) {
    throw SerializationError(fmt::format("cannot receive {}: its memory is {} bytes, not {}", what,
                                         r->size(), count * sizeof(T)));
  }
  return r;
}
}  // namespace detail

template <detail::SharedPlain T>
class RawValue {
 public:
  explicit RawValue(const T& initial = T{})
      : region_(detail::make_shared_block<T>(1, "RawValue")),
        ptr_(new (region_->data()) T(initial)) {}

  // The value, unlocked: a reference into the shared memory.
  T& value() const noexcept { return *ptr_; }
  void set(const T& v) const noexcept { *ptr_ = v; }

  friend bool operator==(const RawValue& a, const RawValue& b) noexcept { return a.ptr_ == b.ptr_; }

  template <class Archive>
  void save(Archive& ar) const {
    ar(detail::export_fd(region_->fd()));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    ar(index);
    region_ = detail::attach_shared_block<T>(detail::import_fd(index), 1, "a RawValue");
    ptr_ = std::launder(reinterpret_cast<T*>(region_->data()));
  }

 private:
  std::shared_ptr<detail::Region> region_;
  T* ptr_;
};

template <detail::SharedPlain T>
class Value {
 public:
  // A value with a new lock of its own, or with `lock` (several values may share one).
  explicit Value(const T& initial = T{}) : Value(initial, Lock{}) {}
  Value(const T& initial, Lock lock) : raw_(initial), lock_(std::move(lock)) {}

  // One whole read / write, under the lock.
  T value() const {
    std::lock_guard g{lock_};
    return raw_.value();
  }
  void set(const T& v) const {
    std::lock_guard g{lock_};
    raw_.set(v);
  }
  // The lock, and the value unlocked: for read-modify-write under the lock.
  Lock& get_lock() const noexcept { return lock_; }
  T& get_obj() const noexcept { return raw_.value(); }

  friend bool operator==(const Value& a, const Value& b) noexcept { return a.raw_ == b.raw_; }

  template <class Archive>
  void save(Archive& ar) const {
    ar(raw_, lock_);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(raw_, lock_);
  }

 private:
  RawValue<T> raw_;
  mutable Lock lock_;
};

template <detail::SharedPlain T>
class RawArray {
 public:
  // n value-initialized elements (T{}: zero for numbers). Mind the braces: RawArray<int>(5)
  // is five zeros, RawArray<int>{5} is one five (as with std::vector).
  RawArray() : RawArray(0, nullptr) {}
  explicit RawArray(std::size_t n) : RawArray(n, nullptr) {}
  RawArray(std::initializer_list<T> values)
      : RawArray(std::span<const T>(values.begin(), values.size())) {}
  explicit RawArray(std::span<const T> values) : RawArray(values.size(), values.data()) {}

  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) const noexcept { return data_[i]; }
  // Bounds-checked: throws std::out_of_range.
  T& at(std::size_t i) const {
    if (i >= size_) {
      throw std::out_of_range(fmt::format("index {} is out of range for an Array of {}", i, size_));
    }
    return data_[i];
  }
  std::span<T> span() const noexcept { return {data_, size_}; }
  T* data() const noexcept { return data_; }
  T* begin() const noexcept { return data_; }
  T* end() const noexcept { return data_ + size_; }
  std::vector<T> to_vector() const { return std::vector<T>(begin(), end()); }

  friend bool operator==(const RawArray& a, const RawArray& b) noexcept {
    return a.data_ == b.data_;
  }

  template <class Archive>
  void save(Archive& ar) const {
    ar(detail::export_fd(region_->fd()), static_cast<std::uint64_t>(size_));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t index = 0;
    std::uint64_t n = 0;
    ar(index, n);
    region_ = detail::attach_shared_block<T>(detail::import_fd(index), static_cast<std::size_t>(n),
                                             "a RawArray");
    size_ = static_cast<std::size_t>(n);
    data_ = std::launder(reinterpret_cast<T*>(region_->data()));
  }

 private:
  RawArray(std::size_t n, const T* init)
      : region_(detail::make_shared_block<T>(n, "RawArray")), size_(n) {
    data_ = static_cast<T*>(region_->data());
    for (std::size_t i = 0; i < n; ++i) new (data_ + i) T(init ? init[i] : T{});
  }

  std::shared_ptr<detail::Region> region_;
  std::size_t size_ = 0;
  T* data_ = nullptr;
};

template <detail::SharedPlain T>
class Array {
 public:
  Array() = default;
  explicit Array(std::size_t n) : raw_(n) {}
  Array(std::size_t n, Lock lock) : raw_(n), lock_(std::move(lock)) {}
  Array(std::initializer_list<T> values) : raw_(values) {}
  explicit Array(std::span<const T> values) : raw_(values) {}
  Array(std::span<const T> values, Lock lock) : raw_(values), lock_(std::move(lock)) {}

  std::size_t size() const noexcept { return raw_.size(); }
  // Unlocked references (see above).
  T& operator[](std::size_t i) const noexcept { return raw_[i]; }
  T& at(std::size_t i) const { return raw_.at(i); }
  std::span<T> span() const noexcept { return raw_.span(); }
  T* data() const noexcept { return raw_.data(); }
  T* begin() const noexcept { return raw_.begin(); }
  T* end() const noexcept { return raw_.end(); }

  // A consistent copy of every element, and a whole assignment, under the lock.
  std::vector<T> to_vector() const {
    std::lock_guard g{lock_};
    return raw_.to_vector();
  }
  void assign(std::span<const T> values) const {
    if (values.size() != size()) {
      throw std::invalid_argument(
          fmt::format("cannot assign {} values to an Array of {}", values.size(), size()));
    }
    std::lock_guard g{lock_};
    std::copy(values.begin(), values.end(), raw_.begin());
  }

  Lock& get_lock() const noexcept { return lock_; }
  // The same memory, as an unlocked RawArray handle.
  const RawArray<T>& get_obj() const noexcept { return raw_; }

  friend bool operator==(const Array& a, const Array& b) noexcept { return a.raw_ == b.raw_; }

  template <class Archive>
  void save(Archive& ar) const {
    ar(raw_, lock_);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(raw_, lock_);
  }

 private:
  RawArray<T> raw_;
  mutable Lock lock_;
};

}  // namespace mp
