// mp/src/serialize.cpp - the FdChannel scopes (see mp/serialize.hpp).
#include "mp/serialize.hpp"

#include <fmt/format.h>

namespace mp::detail {
namespace {
thread_local FdExport* t_export = nullptr;
thread_local FdImport* t_import = nullptr;
}  // namespace

FdExport::FdExport() : outer_(t_export) { t_export = this; }
FdExport::~FdExport() { t_export = outer_; }

FdImport::FdImport(std::vector<int> fds) : fds_(std::move(fds)), outer_(t_import) {
  t_import = this;
}
FdImport::~FdImport() { t_import = outer_; }

std::uint32_t export_fd(int fd) {
  if (!t_export) {
    throw std::logic_error(
        "cannot serialize an object that owns a descriptor here: pass it as an argument of "
        "a Process (or Pool initializer) instead, so that mp can hand the descriptor over");
  }
  t_export->fds_.push_back(fd);
  return static_cast<std::uint32_t>(t_export->fds_.size() - 1);
}

int import_fd(std::uint32_t index) {
  if (!t_import || index >= t_import->fds_.size()) {
    throw SerializationError(
        fmt::format("cannot deserialize: descriptor #{} was not received", index));
  }
  return t_import->fds_[index];
}

}  // namespace mp::detail
