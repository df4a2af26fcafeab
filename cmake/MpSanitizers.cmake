# mp_sanitizers: the sanitizer flags chosen by MP_SANITIZE ("address,undefined", "thread" or
# empty). Linked PRIVATE by every target, like mp_warnings, instead of global flags.
set(MP_SANITIZE "" CACHE STRING "Sanitizers to build with: address,undefined | thread | empty")
add_library(mp_sanitizers INTERFACE)
if(MP_SANITIZE)
  target_compile_options(mp_sanitizers INTERFACE
    -fsanitize=${MP_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_link_options(mp_sanitizers INTERFACE -fsanitize=${MP_SANITIZE})
endif()

# mp_build_options: what every project target links PRIVATE.
add_library(mp_build_options INTERFACE)
target_link_libraries(mp_build_options INTERFACE mp_warnings mp_sanitizers)
target_compile_features(mp_build_options INTERFACE cxx_std_20)
