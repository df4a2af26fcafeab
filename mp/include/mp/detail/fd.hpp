// mp/detail/fd.hpp - a move-only owner of a file descriptor (sentinel -1).
#pragma once

#include <unistd.h>

#include <utility>

#include "mp/error.hpp"

namespace mp::detail {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the descriptor it holds (never retried: after EINTR the fd is gone on Linux)
  // and takes `fd` instead. A failing close is reported, not thrown.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0 && ::close(fd_) == -1 && errno != EINTR) {
      report_noexcept("cannot close a file descriptor");
    }
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace mp::detail
