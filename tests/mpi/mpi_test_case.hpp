#pragma once
// MPI_TEST_CASE(name, n_ranks): a doctest test case run on ranks 0 .. n_ranks-1 of the world, with
// `test_comm` (a comigs::Communicator&) holding exactly those ranks; the other ranks skip it. The same
// idea as doctest's MPI extension, which Debian's doctest-dev does not ship. Each rank runs doctest
// itself (rank 0 prints everything, the others only failures) and main() fails every rank when any
// rank failed. Use CHECK, not REQUIRE, before a collective: a rank leaving a test early would leave
// the others waiting (CTest's timeout ends such a run).
#include <comigs/communicator.hpp>
#include <doctest/doctest.h>

namespace comigs_mpi_test {

/// The world communicator, set by main() for the duration of the run.
inline comigs::Communicator* world = nullptr;

template <class F>
void run_on_ranks(int n_ranks, F&& body) {
    REQUIRE(world != nullptr);
    if (world->size() < n_ranks) {
        FAIL("this test needs ", n_ranks, " ranks, the run has ", world->size(), " (mpiexec -n ", n_ranks, ")");
    }
    const bool member = world->rank() < n_ranks;
    auto comm = world->split(member ? 0 : -1, world->rank());
    try {
        if (member) body(*comm);
    } catch (...) {
        world->barrier();  // doctest reports the exception; the other ranks must not wait for this one
        throw;
    }
    world->barrier();  // the next test starts together on every rank
}

}  // namespace comigs_mpi_test

#define COMIGS_MPI_CAT_(a, b) a##b
#define COMIGS_MPI_CAT(a, b) COMIGS_MPI_CAT_(a, b)
#define COMIGS_MPI_TEST_CASE_(fn, name, n_ranks)                                                   \
    static void fn(comigs::Communicator& test_comm);                                               \
    TEST_CASE(name " [" #n_ranks " ranks]") { comigs_mpi_test::run_on_ranks(n_ranks, fn); }        \
    static void fn([[maybe_unused]] comigs::Communicator& test_comm)
#define MPI_TEST_CASE(name, n_ranks) \
    COMIGS_MPI_TEST_CASE_(COMIGS_MPI_CAT(comigs_mpi_test_fn_, __LINE__), name, n_ranks)
