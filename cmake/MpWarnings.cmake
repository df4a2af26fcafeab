# mp_warnings: every target of the project links it PRIVATE, so the flags never leak to users.
option(MP_WERROR "Treat warnings as errors" OFF)
add_library(mp_warnings INTERFACE)
target_compile_options(mp_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion
  -Wnon-virtual-dtor -Wold-style-cast -Wcast-align -Woverloaded-virtual
  -Wnull-dereference -Wdouble-promotion -Wformat=2 -Wimplicit-fallthrough
  $<$<BOOL:${MP_WERROR}>:-Werror>)
