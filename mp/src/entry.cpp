// mp/src/entry.cpp - the automatic child entry point of spawn and forkserver.
//
// mp's CMake target links programs with -Wl,--wrap=main, so the C runtime calls
// __wrap_main instead of main(), after every static initializer has run. In a spawn child
// or a forkserver it runs that and never returns; otherwise it calls the program's own
// main(). This file is alone in its object so that only --wrap=main pulls it in: a program
// linked without the option has no __real_main to call.
#include "mp/context.hpp"

extern "C" int __real_main(int argc, char** argv, char** envp);
extern "C" int __wrap_main(int argc, char** argv, char** envp) {
  mp::freeze_support(argc, argv);
  return __real_main(argc, argv, envp);
}
