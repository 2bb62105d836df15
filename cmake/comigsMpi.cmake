# comigs::mpi: the MPI transport for distributed rounds (include/comigs/mpi.hpp), a separate target so
# the core never needs MPI. COMIGS_BUILD_MPI: AUTO builds it when MPI is found, ON requires MPI, OFF skips.
set(COMIGS_BUILD_MPI AUTO CACHE STRING "Build comigs::mpi: AUTO (when Open MPI is found), ON or OFF")
set_property(CACHE COMIGS_BUILD_MPI PROPERTY STRINGS AUTO ON OFF)
set(COMIGS_BUILT_WITH_MPI OFF)
if(COMIGS_BUILD_MPI)  # AUTO and ON are both true in CMake's sense
  find_package(MPI QUIET COMPONENTS CXX)
  if(COMIGS_BUILD_MPI STREQUAL "ON")
    _comigs_need(MPI_CXX_FOUND "libopenmpi-dev openmpi-bin" "MPI for comigs::mpi (COMIGS_BUILD_MPI=ON)")
  endif()
  if(MPI_CXX_FOUND)
    set(COMIGS_BUILT_WITH_MPI ON)
  endif()
endif()

if(COMIGS_BUILT_WITH_MPI)
  add_library(comigs_mpi INTERFACE)
  add_library(comigs::mpi ALIAS comigs_mpi)
  set_target_properties(comigs_mpi PROPERTIES EXPORT_NAME mpi)
  target_link_libraries(comigs_mpi INTERFACE comigs MPI::MPI_CXX)
  # comigs uses MPI's C API only; skipping the long-deprecated C++ bindings saves compile time and warnings.
  target_compile_definitions(comigs_mpi INTERFACE OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)
  message(STATUS "comigs: MPI ${MPI_CXX_VERSION} found: building comigs::mpi")

  # How this project's tests and examples launch ranks. CI runs as root on 2 cores: Open MPI refuses
  # root without the two variables, and more ranks than cores without --oversubscribe. One OpenMP
  # thread per rank keeps 4 ranks from fighting over 2 cores.
  set(COMIGS_MPIEXEC_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1)
  if(COMIGS_SANITIZE)
    list(APPEND COMIGS_MPIEXEC_ENV ASAN_OPTIONS=detect_leaks=0)  # Open MPI never frees some allocations
  endif()
  set(COMIGS_MPIEXEC_FLAGS ${MPIEXEC_PREFLAGS})
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _comigs_mpiexec_version ERROR_QUIET)
  if(_comigs_mpiexec_version MATCHES "Open MPI|OpenRTE")
    list(APPEND COMIGS_MPIEXEC_FLAGS --oversubscribe --bind-to none)
  endif()
elseif(COMIGS_BUILD_MPI)
  message(STATUS "comigs: MPI not found (apt-get install libopenmpi-dev openmpi-bin): comigs::mpi not built")
endif()
