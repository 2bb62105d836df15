# Cross compilation for 64-bit ARM with Debian's cross toolchain (apt-get install g++-aarch64-linux-gnu);
# the programs run under qemu-user (apt-get install qemu-user): tools/test-aarch64.sh does both.
# comigs' dependencies are header-only (Eigen, xsimd, nlohmann-json, doctest, CLI11), so the host's
# headers and CMake package files serve the target too; libraries (OpenMP's libgomp) come from the
# cross toolchain.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
# ctest and the tests' own subprocesses run the target's programs through qemu.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
# Debian installs xsimd's (architecture-independent) package files under the build machine's multiarch
# directory, which a cross build does not search.
if(NOT xsimd_DIR)
  file(GLOB _comigs_xsimd_dirs /usr/lib/*/cmake/xsimd)
  if(_comigs_xsimd_dirs)
    list(GET _comigs_xsimd_dirs 0 _comigs_xsimd_dir)
    set(xsimd_DIR "${_comigs_xsimd_dir}" CACHE PATH "xsimd's CMake package files (header-only library)")
  endif()
endif()
