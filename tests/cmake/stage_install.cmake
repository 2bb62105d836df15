# cmake -P stage_install.cmake -DBUILD_DIR=<comigs build> -DPREFIX=<staging prefix>: a fresh install of
# comigs into PREFIX, for the find_package consumer.
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${PREFIX}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed (${rc})")
endif()
