#pragma once
// comigs-demo's command line and run (defined in cli.hpp, compiled once in the comigs_demo library),
// declared apart so that a program's main() does not compile the demo's headers again.
namespace comigs::demo {

struct Placement;

/// The demo's command line and run, every user in this process.
int demo_main(int argc, char** argv);
/// The same with the users where `place` puts them (comigs-demo-mpi passes its MPI communicator);
/// rank 0 prints and writes the outputs.
int demo_main(int argc, char** argv, Placement place);

}  // namespace comigs::demo
