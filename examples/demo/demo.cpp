// The comigs_demo library: run_demo (run.hpp) compiled once for comigs-demo, comigs-demo-mpi and the
// tests, which see its declaration only.
#define COMIGS_DEMO_IMPLEMENTATION
#include "run.hpp"
