// The comigs_demo library: run_demo (run.hpp) and demo_main (cli.hpp) compiled once for comigs-demo,
// comigs-demo-mpi and the tests, which see their declarations only.
#define COMIGS_DEMO_IMPLEMENTATION
#include "cli.hpp"
