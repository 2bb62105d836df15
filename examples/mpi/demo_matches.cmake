# cmake -P demo_matches.cmake: runs comigs-demo (DEMO) and comigs-demo-mpi (DEMO_MPI under MPIEXEC) with
# the same FLAGS into DIR/in-process and DIR/mpi, sharing one pretrained host, then compares their
# results.json with COMPARE (numbers must be equal; timings and the host-reuse flag are skipped).
file(REMOVE_RECURSE "${DIR}")
file(MAKE_DIRECTORY "${DIR}")
function(_run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc})")
  endif()
endfunction()
_run("comigs-demo" ${DEMO} ${FLAGS} --out ${DIR}/in-process --host-cache ${DIR}/host.safetensors)
_run("comigs-demo-mpi" ${MPIEXEC} ${DEMO_MPI} ${FLAGS} --out ${DIR}/mpi --host-cache ${DIR}/host.safetensors)
_run("comparison" ${COMPARE} ${DIR}/in-process/results.json ${DIR}/mpi/results.json --ignore seconds
     --ignore reused)
