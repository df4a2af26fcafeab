// mpi_sanitizers.cpp - Open MPI under the asan preset: what LeakSanitizer must not report.
//
// Open MPI keeps much of what MPI_Init allocates until the process ends. These hooks, read
// only by the sanitizer runtime, make LeakSanitizer skip allocations made inside Open MPI
// and its libraries, and nothing else: a leak in the lesson's own code is still reported.
// Finding the library in an allocation's stack needs the slow unwinder (Open MPI is built
// without frame pointers) and components that stay loaded (one unloaded at MPI_Finalize
// leaves "<unknown module>" frames). Without AddressSanitizer this file is empty.
#if defined(__SANITIZE_ADDRESS__)
#include <cstdio>
#include <cstdlib>

extern "C" {
// The names and signatures are fixed by the sanitizer runtime.
const char* __asan_default_options() { return "fast_unwind_on_malloc=0"; }
const char* __lsan_default_suppressions() {
  return "leak:libmpi.so\n"
         "leak:libopen-pal.so\n"
         "leak:libopen-rte.so\n"
         "leak:libpmix.so\n"
         "leak:libhwloc.so\n"
         "leak:libevent\n"
         "leak:mca_\n";
}
}

namespace {
// Before main, and so before MPI_Init reads its parameters: keep the components loaded.
const bool kKeepComponents = [] {
  if (::setenv("OMPI_MCA_mca_base_component_disable_dlclose", "1", 0) == 0) return true;
  std::perror("mpi_sanitizers: cannot set OMPI_MCA_mca_base_component_disable_dlclose");
  return false;
}();
}  // namespace
#endif
