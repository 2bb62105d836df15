#include <comigs/communicator.hpp>
#include <doctest/doctest.h>

#include "communicator_contract.hpp"

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

using namespace comigs;

TEST_CASE("in-process communicator: the communicator contract, rank-order sums") {
    for (int n : {1, 2, 3, 4, 5}) {
        CAPTURE(n);
        std::mutex m;
        std::vector<std::string> failures;
        run_in_process(n, [&](Communicator& comm) {
            const auto mine = comigs_test::communicator_contract_failures(comm, /*exact_sum_order=*/true);
            std::lock_guard lock(m);
            failures.insert(failures.end(), mine.begin(), mine.end());
        });
        CHECK(failures.empty());
        for (const auto& f : failures) MESSAGE(f);
    }
}

TEST_CASE("in-process communicator: errors") {
    SUBCASE("a rank that throws releases the others and its exception is rethrown") {
        std::atomic<int> released{0};
        CHECK_THROWS_WITH_AS(run_in_process(3,
                                            [&](Communicator& comm) {
                                                if (comm.rank() == 1) throw NumericError("rank 1 diverged");
                                                try {
                                                    comm.barrier();  // would wait forever for rank 1
                                                } catch (const Error&) {
                                                    ++released;
                                                    throw;
                                                }
                                            }),
                             "rank 1 diverged", NumericError);
        CHECK(released == 2);
    }
    SUBCASE("mismatched collectives are an error on every rank") {
        std::atomic<int> errors{0};
        run_in_process(2, [&](Communicator& comm) {
            std::vector<double> x(comm.rank() == 0 ? 3 : 4, 1.0);
            try {
                comm.allreduce_sum(std::span<double>(x));
            } catch (const InvalidArgument&) {
                ++errors;
            }
        });
        CHECK(errors == 2);
    }
    SUBCASE("bad arguments") {
        CHECK_THROWS_AS(run_in_process(0, [](Communicator&) {}), InvalidArgument);
        CHECK_THROWS_AS(run_in_process(2,
                                       [](Communicator& comm) {
                                           std::vector<std::byte> b(1);
                                           comm.broadcast_bytes(b, 2);
                                       }),
                        InvalidArgument);
    }
}
