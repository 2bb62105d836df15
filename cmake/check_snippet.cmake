# Fails unless README contains SNIPPET's text verbatim (keeps the README's code compiling and current).
file(READ "${README}" readme)
file(READ "${SNIPPET}" snippet)
string(FIND "${readme}" "${snippet}" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "${README} does not quote ${SNIPPET} verbatim: update the README's code block")
endif()
