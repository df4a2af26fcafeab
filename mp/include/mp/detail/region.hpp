// mp/detail/region.hpp - a block of memory shared between processes, with no name.
//
// The memory is a memfd mapped MAP_SHARED: children made by fork inherit the mapping;
// spawn and forkserver children receive the descriptor (see mp/serialize.hpp, FdChannel)
// and map it again. The kernel frees it when the last mapping and descriptor are gone, so
// nothing can be left behind in /dev/shm, however the processes end. Sync objects and
// queues live in regions; mp::SharedMemory is for memory that needs a name.
#pragma once

#include <cstddef>
#include <string_view>

#include "mp/detail/fd.hpp"

namespace mp::detail {

class Region {
 public:
  Region() noexcept = default;
  // A new zero-filled region of `size` bytes; `label` shows in /proc/PID/maps.
  static Region create(std::size_t size, std::string_view label);
  // Maps the region behind `fd` (a memfd from create(), received from another process).
  // The descriptor is duplicated; the caller keeps its own.
  static Region attach(int fd);

  Region(Region&& o) noexcept;
  Region& operator=(Region&& o) noexcept;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  ~Region();

  void* data() const noexcept { return data_; }
  template <class T>
  T* as() const noexcept {
    return static_cast<T*>(data_);
  }
  std::size_t size() const noexcept { return size_; }
  int fd() const noexcept { return fd_.get(); }
  explicit operator bool() const noexcept { return data_ != nullptr; }

 private:
  UniqueFd fd_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace mp::detail
