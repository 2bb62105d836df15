# Configures, builds and runs one consumer project from scratch: cmake -P run_consumer.cmake with
#   PROJECT_DIR  the consumer project,  BUILD_DIR  its (deleted and recreated) build directory,
#   GENERATOR, CXX  what the comigs build itself uses,  ARGS  extra -D arguments separated by '|'
# (a ';' would not survive add_test),  LAUNCHER  a command line (also '|'-separated) to run it under.
# Debug: the consumer only proves the wiring, and -O0 compiles Eigen's templates fastest.
string(REPLACE "|" ";" ARGS "${ARGS}")
string(REPLACE "|" ";" LAUNCHER "${LAUNCHER}")
file(REMOVE_RECURSE "${BUILD_DIR}")
function(_run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}): ${ARGN}")
  endif()
endfunction()
_run("configure" ${CMAKE_COMMAND} -S "${PROJECT_DIR}" -B "${BUILD_DIR}" -G "${GENERATOR}"
     -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Debug ${ARGS})
_run("build" ${CMAKE_COMMAND} --build "${BUILD_DIR}" --config Debug --parallel 2)
set(exe "${BUILD_DIR}/consumer")
if(NOT EXISTS "${exe}")
  set(exe "${BUILD_DIR}/Debug/consumer")  # multi-config generators
endif()
_run("run" ${LAUNCHER} "${exe}")
