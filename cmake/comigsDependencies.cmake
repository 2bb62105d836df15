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

# Optional: oneDNN runs the GEMMs against bf16 frozen weights on AMX / AVX512-BF16. Found -> used;
# not found -> those GEMMs take the fp32 path. COMIGS_USE_ONEDNN=OFF skips the search.
if(DEFINED _comigs_built_with_onednn)
  # Installed: comigs::comigs links DNNL::dnnl exactly when the installation was built with it.
  if(_comigs_built_with_onednn AND NOT TARGET DNNL::dnnl)
    find_package(dnnl QUIET)
    _comigs_need(dnnl_FOUND libdnnl-dev "oneDNN (this comigs installation was built with it)")
  endif()
  return()
endif()
option(COMIGS_USE_ONEDNN "Use oneDNN (libdnnl-dev) for the bf16 frozen-weight GEMMs when it is installed" ON)
if(COMIGS_USE_ONEDNN AND NOT TARGET DNNL::dnnl)
  find_package(dnnl QUIET)
endif()
if(COMIGS_USE_ONEDNN AND TARGET DNNL::dnnl)
  message(STATUS "comigs: oneDNN ${dnnl_VERSION} (libdnnl-dev) found: bf16 frozen-weight GEMMs use it")
elseif(COMIGS_USE_ONEDNN)
  message(STATUS "comigs: oneDNN not found (apt-get install libdnnl-dev): bf16 frozen-weight GEMMs use the fp32 path")
else()
  message(STATUS "comigs: oneDNN off (COMIGS_USE_ONEDNN=OFF): bf16 frozen-weight GEMMs use the fp32 path")
endif()
