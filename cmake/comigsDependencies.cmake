# Finds what comigs::comigs links; a missing one stops configuration with the Debian package to install.
# Used by the build and, installed, by comigsConfig.cmake.
macro(_comigs_need _found _pkg _what)
  if(NOT ${_found})
    message(FATAL_ERROR "comigs needs ${_what}: install it with `apt-get install ${_pkg}`")
  endif()
endmacro()

find_package(Eigen3 3.4 QUIET NO_MODULE)
_comigs_need(Eigen3_FOUND libeigen3-dev "Eigen 3.4")
find_package(xsimd QUIET)
_comigs_need(xsimd_FOUND libxsimd-dev "xsimd")
# Debian's xsimd 8.1 exports a link to a target `xtl` without finding it; xsimd only needs xtl for
# xtl::xcomplex support, which comigs does not use, so stand in an empty target when xtl is absent.
if(NOT TARGET xtl)
  find_package(xtl QUIET)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
find_package(nlohmann_json 3 QUIET)
_comigs_need(nlohmann_json_FOUND nlohmann-json3-dev "nlohmann-json (safetensors headers)")
find_package(OpenMP QUIET COMPONENTS CXX)
_comigs_need(OpenMP_CXX_FOUND libomp-dev "OpenMP")
