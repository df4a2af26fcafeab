// mp/src/region.cpp - see mp/detail/region.hpp.
#include "mp/detail/region.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <string>
#include <utility>

namespace mp::detail {

namespace {
void* map_shared(int fd, std::size_t size, std::string_view what) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw_errno(fmt::format("map {} ({} bytes)", what, size));
  return p;
}
}  // namespace

Region Region::create(std::size_t size, std::string_view label) {
  std::string name = fmt::format("mp-{}", label);
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC));
  if (!fd) throw_errno(fmt::format("create shared memory for {}", label));
  if (retry_eintr([&] { return ::ftruncate(fd.get(), static_cast<off_t>(size)); }) == -1) {
    throw_errno(fmt::format("size shared memory for {} to {} bytes", label, size));
  }
  Region r;
  r.data_ = map_shared(fd.get(), size, label);
  r.size_ = size;
  r.fd_ = std::move(fd);
  return r;
}

Region Region::attach(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) == -1) throw_errno(fmt::format("inspect shared memory descriptor {}", fd));
  UniqueFd own(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!own) throw_errno(fmt::format("duplicate shared memory descriptor {}", fd));
  Region r;
  r.size_ = static_cast<std::size_t>(st.st_size);
  r.data_ = map_shared(own.get(), r.size_, "received shared memory");
  r.fd_ = std::move(own);
  return r;
}

Region::Region(Region&& o) noexcept
    : fd_(std::move(o.fd_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)) {}

Region& Region::operator=(Region&& o) noexcept {
  if (this != &o) {
    if (data_ && ::munmap(data_, size_) == -1) report_noexcept("cannot unmap a shared region");
    fd_ = std::move(o.fd_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

Region::~Region() {
  if (data_ && ::munmap(data_, size_) == -1) report_noexcept("cannot unmap a shared region");
}

}  // namespace mp::detail
