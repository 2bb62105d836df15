// comigs-demo-mpi: comigs-demo with its users spread over MPI ranks (user u on rank u mod size; one user
// per rank with -np equal to --users). Same flags, same outputs (written by rank 0): with the default
// fixed-order reduction every aggregate is bitwise the in-process one, so results.json holds the
// in-process numbers. Methods that aggregate with fedavg or hetlora, or do not collaborate, run
// distributed (comigs-1g1s, comigs-2g, comigs-2s, fedavg, local, pfedmoe, hetlora with token weights).
//   mpirun -np 4 ./comigs-demo-mpi --users 4 --methods comigs-1g1s
#include <comigs/mpi.hpp>

#include "demo/demo_main.hpp"
#include "demo/placement.hpp"

int main(int argc, char** argv) {
    comigs::MpiEnvironment mpi(argc, argv);
    int rc = 0;
    {
        comigs::MpiCommunicator world;
        rc = comigs::demo::demo_main(argc, argv, comigs::demo::Placement{&world});
    }
    return rc;
}
