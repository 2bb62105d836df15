#include <comigs/mpi.hpp>
#include <doctest/doctest.h>

#include "communicator_contract.hpp"
#include "mpi_test_case.hpp"

using namespace comigs;

namespace {
void check_contract(Communicator& comm) {
    // MPI chooses its own summation order, so sums are checked to a tolerance here.
    const auto failures = comigs_test::communicator_contract_failures(comm, /*exact_sum_order=*/false);
    CHECK(failures.empty());
    for (const auto& f : failures) MESSAGE(f);
}
}  // namespace

MPI_TEST_CASE("MPI communicator: the communicator contract", 2) { check_contract(test_comm); }
MPI_TEST_CASE("MPI communicator: the communicator contract", 4) { check_contract(test_comm); }

MPI_TEST_CASE("MPI communicator: errors are exceptions, not aborts", 2) {
    std::vector<std::byte> b(4);
    CHECK_THROWS_AS(test_comm.broadcast_bytes(b, 2), InvalidArgument);
    CHECK_THROWS_AS(test_comm.broadcast_bytes(b, -1), InvalidArgument);
    // The communicator still works afterwards.
    std::vector<double> one{1.0};
    test_comm.allreduce_sum(std::span<double>(one));
    CHECK(one[0] == 2.0);
}
