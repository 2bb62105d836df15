#include <comigs/distributed.hpp>
#include <doctest/doctest.h>

#include <mutex>
#include <string>
#include <vector>

#include "distributed_fixture.hpp"

using namespace comigs;
using comigs_test::FleetOptions;

namespace {

// Runs one distributed round of `n_users` users on `n_ranks` in-process ranks and returns every
// rank's differences from the in-process aggregate (empty when all agree).
template <class T>
std::vector<std::string> round_differences(int n_ranks, Index n_users, const AggregationConfig& cfg,
                                           Reduction reduction, const FleetOptions& opt, double tolerance) {
    const auto want = aggregate(comigs_test::fleet_uploads<T>(n_users, opt), cfg);
    std::mutex m;
    std::vector<std::string> diffs;
    run_in_process(n_ranks, [&](Communicator& comm) {
        const auto local = comigs_test::rank_uploads<T>(n_users, comm.rank(), comm.size(), opt);
        DistributedAggregator<T> agg(comm, cfg, reduction);
        const auto got = agg(local);
        auto d = comigs_test::compare(got, want, tolerance, reduction == Reduction::allreduce);
        // allreduce: the rank holds exactly the tensors its users hold.
        if (reduction == Reduction::allreduce)
            for (const auto& u : local)
                for (const auto& i : u.tensors())
                    if (u.first_non_finite() == nullptr && !got.aggregate.contains(i.name))
                        d.push_back(i.name + ": missing on the rank of user " + std::to_string(u.user()));
        std::lock_guard lock(m);
        for (auto& s : d) diffs.push_back("rank " + std::to_string(comm.rank()) + ": " + s);
    });
    return diffs;
}

}  // namespace

TEST_CASE_TEMPLATE("distributed round: fixed order is bitwise the in-process aggregate", T, float, double) {
    for (int ranks : {1, 2, 3, 4}) {
        for (Index users : {Index(1), Index(4), Index(7)}) {
            if (users < ranks) continue;
            CAPTURE(ranks);
            CAPTURE(users);
            FleetOptions fed;
            const auto d1 = round_differences<T>(ranks, users, AggregationConfig::fedavg(), Reduction::fixed_order,
                                                 fed, 0.0);
            CHECK(d1.empty());
            for (const auto& s : d1) MESSAGE(s);
            const auto d2 = round_differences<T>(ranks, users, AggregationConfig::fedavg(Weighting::tokens),
                                                 Reduction::fixed_order, fed, 0.0);
            CHECK(d2.empty());
            FleetOptions het;
            het.heterogeneous_ranks = true;
            const auto d3 = round_differences<T>(ranks, users, AggregationConfig::hetlora(Weighting::tokens),
                                                 Reduction::fixed_order, het, 0.0);
            CHECK(d3.empty());
            for (const auto& s : d3) MESSAGE(s);
        }
    }
}

TEST_CASE_TEMPLATE("distributed round: allreduce agrees with the in-process aggregate to rounding", T, float,
                   double) {
    // Per-rank partial sums change the order of the additions: the double sums then agree to about
    // 1e-16 relative, so the values cast to T agree to one unit in the last place of T.
    const double tol = std::is_same_v<T, float> ? 2e-7 : 1e-14;
    for (int ranks : {1, 2, 3, 4}) {
        CAPTURE(ranks);
        FleetOptions fed;
        const auto d1 =
            round_differences<T>(ranks, 7, AggregationConfig::fedavg(Weighting::tokens), Reduction::allreduce, fed, tol);
        CHECK(d1.empty());
        for (const auto& s : d1) MESSAGE(s);
        FleetOptions het;
        het.heterogeneous_ranks = true;
        const auto d2 = round_differences<T>(ranks, 7, AggregationConfig::hetlora(), Reduction::allreduce, het, tol);
        CHECK(d2.empty());
        for (const auto& s : d2) MESSAGE(s);
    }
}

TEST_CASE("distributed round: a user with a NaN is excluded on every rank, as in-process") {
    FleetOptions opt;
    opt.nan_users = {2};
    for (Reduction red : {Reduction::fixed_order, Reduction::allreduce}) {
        CAPTURE(to_string(red));
        const auto d = round_differences<float>(3, 6, AggregationConfig::fedavg(), red, opt,
                                                red == Reduction::fixed_order ? 0.0 : 2e-7);
        CHECK(d.empty());
        for (const auto& s : d) MESSAGE(s);
    }
    const auto want = aggregate(comigs_test::fleet_uploads<float>(6, opt), AggregationConfig::fedavg());
    REQUIRE(want.report.excluded.size() == 1);
    CHECK(want.report.excluded[0].user == 2);

    // Every user NaN: the same NumericError as in-process.
    opt.nan_users = {0, 1};
    CHECK_THROWS_AS(aggregate(comigs_test::fleet_uploads<float>(2, opt), AggregationConfig::fedavg()), NumericError);
    CHECK_THROWS_AS(run_in_process(2,
                                   [&](Communicator& comm) {
                                       aggregate_distributed(comm,
                                                             comigs_test::rank_uploads<float>(2, comm.rank(), 2, opt),
                                                             AggregationConfig::fedavg());
                                   }),
                    NumericError);
}

TEST_CASE("distributed round: specialists and routers never enter a collective") {
    for (Reduction red : {Reduction::fixed_order, Reduction::allreduce}) {
        for (auto cfg : {AggregationConfig::fedavg(), AggregationConfig::hetlora()}) {
            CAPTURE(to_string(red));
            FleetOptions opt;
            opt.heterogeneous_ranks = cfg.rule == AggregationRule::hetlora;
            std::mutex m;
            std::size_t buffers = 0, with_canary = 0, values_sent = 0;
            run_in_process(3, [&](Communicator& comm) {
                comigs_test::RecordingCommunicator rec(comm);
                const auto local = comigs_test::rank_uploads<float>(7, comm.rank(), comm.size(), opt);
                DistributedAggregator<float> agg(rec, cfg, red);
                agg(local);
                agg(local);  // a second round reuses the sub-communicators
                std::lock_guard lock(m);
                for (const auto& b : rec.sent()) {
                    ++buffers;
                    with_canary += comigs_test::holds_canary(b) ? 1 : 0;
                    values_sent += b.size();
                }
            });
            CHECK(buffers > 0);
            CHECK(values_sent > 0);
            CHECK(with_canary == 0);
        }
    }
    // The detector works: a buffer holding a specialist's values is caught.
    const auto user = comigs_test::make_user<float>(1, {});
    const auto sp = user.mlp->params().span("experts.1.fc.lora_A");
    std::vector<std::byte> b(std::as_bytes(sp).begin(), std::as_bytes(sp).end());
    CHECK(comigs_test::holds_canary(b));
}

TEST_CASE("distributed round: allreduce groups users by the tensors they hold") {
    // 6 users on 3 ranks (user u on rank u mod 3). Expert 0 is held by everyone and the attention
    // adapter by users 0, 2, 4 (ranks 0, 2, 1): both reduce over all ranks. Expert 1 is shared by
    // users 2 and 5 only, both on rank 2: one sub-communicator, the same on every rank, made once.
    std::mutex m;
    std::vector<std::size_t> subs;
    std::vector<bool> has_expert1(3);
    run_in_process(3, [&](Communicator& comm) {
        DistributedAggregator<double> agg(comm, AggregationConfig::fedavg(), Reduction::allreduce);
        const auto local = comigs_test::rank_uploads<double>(6, comm.rank(), comm.size(), {});
        agg(local);
        const auto got = agg(local);
        std::lock_guard lock(m);
        subs.push_back(agg.subcommunicators());
        has_expert1[static_cast<std::size_t>(comm.rank())] = got.aggregate.contains("h.0.mlp.experts.1.fc.lora_A");
    });
    CHECK(subs == std::vector<std::size_t>{1, 1, 1});
    CHECK(has_expert1 == std::vector<bool>{false, false, true});
}

TEST_CASE("distributed round: bad configurations and uploads") {
    run_in_process(1, [&](Communicator& comm) {
        CHECK_THROWS_AS(DistributedAggregator<float>(comm, AggregationConfig::median()), InvalidArgument);
        CHECK_THROWS_AS(DistributedAggregator<float>(comm, AggregationConfig::hetlora(Weighting::update_norm)),
                        InvalidArgument);
        DistributedAggregator<float> agg(comm, AggregationConfig::fedavg());
        CHECK_THROWS_AS(agg({}), InvalidArgument);  // nobody uploaded
    });
    // The same user on two ranks: the in-process error, on every rank.
    CHECK_THROWS_WITH_AS(run_in_process(2,
                                        [&](Communicator& comm) {
                                            std::vector<GeneralistUpload<float>> local;
                                            local.push_back(comigs_test::make_user<float>(3, {}).upload());
                                            aggregate_distributed(comm, local, AggregationConfig::fedavg());
                                        }),
                         "user 3: two uploads with this user id", InvalidArgument);
    // Different ranks for fedavg: the in-process error.
    FleetOptions het;
    het.heterogeneous_ranks = true;
    CHECK_THROWS_AS(run_in_process(2,
                                   [&](Communicator& comm) {
                                       aggregate_distributed(comm,
                                                             comigs_test::rank_uploads<float>(3, comm.rank(), 2, het),
                                                             AggregationConfig::fedavg());
                                   }),
                    ShapeError);
}
