// Distributed rounds over MPI against the in-process aggregate() of the same uploads.
#include <comigs/distributed.hpp>
#include <comigs/mpi.hpp>
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "distributed_fixture.hpp"
#include "mpi_test_case.hpp"

using namespace comigs;
using comigs_test::FleetOptions;

namespace {

template <class T>
void check_round(Communicator& comm, Index users, const AggregationConfig& cfg, Reduction red,
                 const FleetOptions& opt, double tolerance) {
    const auto want = aggregate(comigs_test::fleet_uploads<T>(users, opt), cfg);
    const auto local = comigs_test::rank_uploads<T>(users, comm.rank(), comm.size(), opt);
    DistributedAggregator<T> agg(comm, cfg, red);
    const auto got = agg(local);
    const auto diffs = comigs_test::compare(got, want, tolerance, red == Reduction::allreduce);
    CHECK(diffs.empty());
    for (const auto& d : diffs) MESSAGE("rank ", comm.rank(), ": ", d);
    CHECK(got.aggregate.size() > 0);
}

template <class T>
void check_rounds(Communicator& comm) {
    FleetOptions fed, het;
    het.heterogeneous_ranks = true;
    // One user per rank, then several (7 users: ids on a rank are not contiguous).
    for (Index users : {Index(comm.size()), Index(7)}) {
        CAPTURE(users);
        // Bitwise: the fixed-order reduction does aggregate()'s operations in aggregate()'s order.
        check_round<T>(comm, users, AggregationConfig::fedavg(), Reduction::fixed_order, fed, 0.0);
        check_round<T>(comm, users, AggregationConfig::fedavg(Weighting::tokens), Reduction::fixed_order, fed, 0.0);
        check_round<T>(comm, users, AggregationConfig::hetlora(Weighting::tokens), Reduction::fixed_order, het, 0.0);
        // MPI_Allreduce sums in its own order: the double sums agree to about 1e-16 relative, one unit in
        // the last place of T after the cast.
        const double tol = std::is_same_v<T, float> ? 2e-7 : 1e-14;
        check_round<T>(comm, users, AggregationConfig::fedavg(Weighting::tokens), Reduction::allreduce, fed, tol);
        check_round<T>(comm, users, AggregationConfig::hetlora(), Reduction::allreduce, het, tol);
    }
}

void check_privacy(Communicator& comm) {
    for (Reduction red : {Reduction::fixed_order, Reduction::allreduce})
        for (auto cfg : {AggregationConfig::fedavg(), AggregationConfig::hetlora()}) {
            CAPTURE(to_string(red));
            CAPTURE(to_string(cfg.rule));
            FleetOptions opt;
            opt.heterogeneous_ranks = cfg.rule == AggregationRule::hetlora;
            comigs_test::RecordingCommunicator rec(comm);
            DistributedAggregator<float> agg(rec, cfg, red);
            const auto local = comigs_test::rank_uploads<float>(7, comm.rank(), comm.size(), opt);
            agg(local);
            agg(local);
            std::size_t bytes = 0, with_canary = 0;
            for (const auto& b : rec.sent()) {
                bytes += b.size();
                with_canary += comigs_test::holds_canary(b) ? 1 : 0;
            }
            CHECK(bytes > 0);
            CHECK(with_canary == 0);
        }
}

void check_nan_excluded(Communicator& comm) {
    FleetOptions opt;
    opt.nan_users = {1};  // on rank 1 (user u sits on rank u mod size)
    for (Reduction red : {Reduction::fixed_order, Reduction::allreduce}) {
        CAPTURE(to_string(red));
        const auto want = aggregate(comigs_test::fleet_uploads<float>(5, opt), AggregationConfig::fedavg());
        REQUIRE(want.report.excluded.size() == 1);
        const auto local = comigs_test::rank_uploads<float>(5, comm.rank(), comm.size(), opt);
        const auto got = aggregate_distributed(comm, local, AggregationConfig::fedavg(), red);
        REQUIRE(got.report.excluded.size() == 1);
        CHECK(got.report.excluded[0].user == 1);
        CHECK(got.report.excluded[0].tensor == "h.0.mlp.experts.0.proj.lora_B");
        CHECK(got.aggregate.first_non_finite() == nullptr);
        const auto diffs =
            comigs_test::compare(got, want, red == Reduction::fixed_order ? 0.0 : 2e-7, red == Reduction::allreduce);
        CHECK(diffs.empty());
        for (const auto& d : diffs) MESSAGE("rank ", comm.rank(), ": ", d);
    }
}

}  // namespace

MPI_TEST_CASE("MPI round: the same generalists as the in-process aggregate (float)", 2) {
    check_rounds<float>(test_comm);
}
MPI_TEST_CASE("MPI round: the same generalists as the in-process aggregate (float)", 4) {
    check_rounds<float>(test_comm);
}
MPI_TEST_CASE("MPI round: the same generalists as the in-process aggregate (double)", 2) {
    check_rounds<double>(test_comm);
}
MPI_TEST_CASE("MPI round: the same generalists as the in-process aggregate (double)", 4) {
    check_rounds<double>(test_comm);
}
MPI_TEST_CASE("MPI round: no specialist or router value in any buffer sent", 2) {
    check_privacy(test_comm);
}
MPI_TEST_CASE("MPI round: no specialist or router value in any buffer sent", 4) {
    check_privacy(test_comm);
}
MPI_TEST_CASE("MPI round: a rank contributing a NaN is excluded as in-process", 2) {
    check_nan_excluded(test_comm);
}
MPI_TEST_CASE("MPI round: a rank contributing a NaN is excluded as in-process", 4) {
    check_nan_excluded(test_comm);
}
