// The MPI test runner: every rank runs the doctest suite on its own; see mpi_test_case.hpp.
#define DOCTEST_CONFIG_IMPLEMENT
#include <comigs/mpi.hpp>
#include <doctest/doctest.h>

#include <cstdint>

#include "mpi_test_case.hpp"

int main(int argc, char** argv) {
    comigs::MpiEnvironment env(argc, argv);
    int failed = 0;
    {
        comigs::MpiCommunicator world;
        comigs_mpi_test::world = &world;
        doctest::Context context(argc, argv);
        if (world.rank() != 0) context.setOption("minimal", true);  // one full report, from rank 0
        std::int64_t bad = context.run() != 0 ? 1 : 0;
        if (context.shouldExit()) return static_cast<int>(bad);  // --help, --list-test-cases, ...
        world.allreduce_sum(std::span<std::int64_t>(&bad, 1));
        failed = bad > 0 ? 1 : 0;
        comigs_mpi_test::world = nullptr;
    }
    return failed;
}
