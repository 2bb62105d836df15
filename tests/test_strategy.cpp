#include <comigs/strategy.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tiny_host.hpp"

using namespace comigs;
using comigs_test::RegressionBatch;
using comigs_test::TinyHost;
using comigs_test::TinyHostConfig;
using comigs_test::UserData;

namespace {

/// N simulated users of the tiny regression host under one strategy: user u's data share a common map
/// G and have a personal P_u.
template <class T>
struct Federation {
    using Host = TinyHost<T>;
    using Tr = Trainer<Host, RegressionBatch<T>>;
    Strategy strategy;
    std::vector<UserData<T>> data;
    std::vector<std::unique_ptr<Host>> hosts;
    std::vector<std::unique_ptr<Tr>> trainers;
    std::shared_ptr<const FrozenMlp<T>> base;

    Federation(const Strategy& s, Index n_users, Index rounds, Index local_steps, Index head_rank = 2,
               std::vector<Index> ranks = {}, std::uint64_t seed = 1, std::vector<Index> experts = {})
        : strategy(s) {
        TinyHostConfig hc;
        hc.n_experts = s.n_experts();
        hc.top_k = s.top_k;
        hc.routing = s.routing;
        hc.roles = s.roles;
        hc.head_rank = head_rank;
        base = comigs_test::make_base<T>(hc, seed);
        TrainerConfig tc;
        tc.router_every = 5;
        tc.router_iters = 2;
        tc.expert_lr = 2e-2;
        tc.expert_lr_min = 2e-3;
        tc.router_lr = 1e-2;
        tc.total_expert_steps = rounds * local_steps;
        tc = s.trainer_config(tc);
        for (Index u = 0; u < n_users; ++u) {
            data.push_back(UserData<T>::make(hc.d, u, seed, 48, 32, 64));
            TinyHostConfig c = hc;
            if (!ranks.empty()) c.rank = ranks[static_cast<std::size_t>(u)];
            if (!experts.empty()) {
                c.n_experts = experts[static_cast<std::size_t>(u)];
                c.roles.assign(static_cast<std::size_t>(c.n_experts), Role::specialist);
                c.roles[0] = Role::generalist;
            }
            Rng init(seed * 1000 + static_cast<std::uint64_t>(u));
            hosts.push_back(std::make_unique<Host>(c, base, init));
            trainers.push_back(std::make_unique<Tr>(
                *hosts.back(), tc,
                [this, u](Rng& r) { return data[static_cast<std::size_t>(u)].train_batch(8, r); },
                [this, u](Rng& r) { return data[static_cast<std::size_t>(u)].val_batch(8, r); },
                seed * 7919 + static_cast<std::uint64_t>(u)));
        }
    }
    Federation(const Federation&) = delete;

    std::vector<SimulatedUser<Host, RegressionBatch<T>>> users(bool reversed = false) {
        std::vector<SimulatedUser<Host, RegressionBatch<T>>> out;
        for (std::size_t u = 0; u < hosts.size(); ++u) {
            SimulatedUser<Host, RegressionBatch<T>> su;
            su.id = 100 + u;
            su.trainer = trainers[u].get();
            su.roles = hosts[u]->config().roles;
            su.validation_perplexity = [this, u] {
                const auto& d = data[u];
                RegressionBatch<T> b{d.n_val, d.val_x, d.val_y, comigs_test::Fault::none};
                return std::exp(hosts[u]->evaluate(b).task);
            };
            out.push_back(std::move(su));
        }
        if (reversed) std::reverse(out.begin(), out.end());
        return out;
    }

    double test_loss(std::size_t u) { return hosts[u]->evaluate(data[u].test_batch()).task; }
    double mean_test_loss() {
        double s = 0;
        for (std::size_t u = 0; u < hosts.size(); ++u) s += test_loss(u);
        return s / static_cast<double>(hosts.size());
    }
    std::vector<NamedTensor<T>> params(std::size_t u) const { return adapter_parameters(hosts[u]->adapters()); }
};

template <class T>
bool bitwise_same(const std::vector<NamedTensor<T>>& a, const std::vector<NamedTensor<T>>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].name != b[i].name || a[i].data.size() != b[i].data.size() ||
            std::memcmp(a[i].data.data(), b[i].data.data(), a[i].data.size() * sizeof(T)) != 0)
            return false;
    return true;
}

template <class T>
std::vector<T> tensor_values(const std::vector<NamedTensor<T>>& v, std::string_view name) {
    for (const auto& t : v)
        if (t.name == name) return t.data;
    FAIL("no tensor ", name);
    return {};
}

RunnerConfig rounds(Index r, Index steps) {
    RunnerConfig c;
    c.rounds = r;
    c.local_steps = steps;
    return c;
}

}  // namespace

TEST_CASE("strategies: presets describe the paper's methods") {
    using R = Role;
    const auto g = R::generalist, s = R::specialist;
    SUBCASE("CoMiGS variants") {
        const auto a = strategies::comigs_1g1s();
        CHECK(a.roles == std::vector<Role>{g, s});
        CHECK(a.routing == Routing::top_k);
        CHECK(a.top_k == 2);
        CHECK(a.router_training == RouterTraining::alternating);
        CHECK(a.share_adapters);
        REQUIRE(a.aggregation() != nullptr);
        CHECK(a.aggregation()->rule == AggregationRule::fedavg);
        CHECK(a.aggregation()->weighting == Weighting::uniform);
        CHECK(strategies::comigs_1gns(3).roles == std::vector<Role>{g, s, s, s});
        CHECK(strategies::comigs_1gns(3).name == "comigs-1g3s");
        CHECK_THROWS_AS(strategies::comigs_1gns(0), InvalidArgument);
        CHECK(strategies::comigs_2g().roles == std::vector<Role>{g, g});
        const auto b = strategies::comigs_2s();
        CHECK(b.roles == std::vector<Role>{s, s});
        CHECK_FALSE(b.collaborates());
        CHECK(b.router_training == RouterTraining::alternating);
    }
    SUBCASE("baselines") {
        const auto l = strategies::local();
        CHECK(l.routing == Routing::mean);
        CHECK(l.router_training == RouterTraining::joint);
        CHECK_FALSE(l.collaborates());
        const auto f = strategies::fedavg();
        CHECK(f.roles == std::vector<Role>{g, g});
        CHECK(f.routing == Routing::mean);
        CHECK(f.aggregation()->rule == AggregationRule::fedavg);
        CHECK(strategies::fedavg(Weighting::tokens).aggregation()->weighting == Weighting::tokens);
        const auto p = strategies::pfedmoe();
        CHECK(p.roles == std::vector<Role>{g, s});
        CHECK(p.router_training == RouterTraining::joint);
        const auto c = strategies::pcl(0.5);
        REQUIRE(c.personalised() != nullptr);
        CHECK(c.personalised()->temperature == 0.5);
        CHECK(c.roles == std::vector<Role>{g, g});
        for (const auto& h : {strategies::hetlora(), strategies::flexlora(), strategies::ffa_lora()}) {
            CHECK(h.roles == std::vector<Role>{g});
            CHECK(h.router_training == RouterTraining::none);
        }
        CHECK(strategies::hetlora().aggregation()->weighting == Weighting::update_norm);
        CHECK(strategies::flexlora().aggregation()->rule == AggregationRule::flexlora);
        CHECK(strategies::ffa_lora().freeze_shared_lora_A);
        CHECK_FALSE(strategies::ffa_lora().upload_options().send_lora_A);
    }
    SUBCASE("every preset is valid, names are unique") {
        const auto all = strategies::all();
        CHECK(all.size() == 11);
        for (std::size_t i = 0; i < all.size(); ++i) {
            CHECK_NOTHROW(all[i].validate());
            for (std::size_t j = 0; j < i; ++j) CHECK(all[i].name != all[j].name);
        }
    }
    SUBCASE("configuration helpers") {
        MixtureConfig base;
        base.d_model = 4;
        base.d_hidden = 8;
        const auto m = strategies::fedavg().mixture_config(base);
        CHECK(m.n_experts == 2);
        CHECK(m.routing == Routing::mean);
        CHECK(m.roles == std::vector<Role>{g, g});
        CHECK(strategies::hetlora().mixture_config(base).top_k == 1);
        const auto t = strategies::ffa_lora().trainer_config({});
        REQUIRE(t.frozen);
        CHECK(t.frozen("h.", "experts.0.fc.lora_A"));
        CHECK_FALSE(t.frozen("h.", "experts.0.fc.lora_B"));
        CHECK(t.frozen("attn.", "lora_A"));
        auto bad = strategies::comigs_2s();
        bad.collaboration = AggregationConfig::fedavg();
        CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("shares nothing"), InvalidArgument);
        auto bad2 = strategies::fedavg();
        bad2.freeze_shared_lora_A = true;
        CHECK_THROWS_AS(bad2.validate(), InvalidArgument);
    }
}

TEST_CASE("RoundRunner: upload sizes per strategy (1G1S uploads half of FedAvg)") {
    auto floats_per_round = [](const Strategy& s, Index head_rank) {
        Federation<double> f(s, 3, 1, 2, head_rank);
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(1, 2), f.users());
        const auto reps = runner.run();
        REQUIRE(reps.size() == 1);
        CHECK(reps[0].upload_floats == 3 * runner.upload_floats(0));
        return reps[0].upload_floats;
    };
    // d = 4, hidden 8, rank 2: one expert = fc A [2,4] B [8,2] + proj A [2,8] B [4,2] = 48 values.
    const Index one_expert = 2 * 4 + 8 * 2 + 2 * 8 + 4 * 2;
    CHECK(floats_per_round(strategies::comigs_1g1s(), 0) == 3 * one_expert);
    CHECK(floats_per_round(strategies::fedavg(), 0) == 2 * 3 * one_expert);
    CHECK(floats_per_round(strategies::comigs_2g(), 0) == 2 * 3 * one_expert);
    CHECK(floats_per_round(strategies::comigs_1gns(2), 0) == 3 * one_expert);
    CHECK(floats_per_round(strategies::pfedmoe(), 0) == 3 * one_expert);
    CHECK(floats_per_round(strategies::local(), 2) == 0);
    CHECK(floats_per_round(strategies::comigs_2s(), 2) == 0);
    // With the shared head adapter (A [2,4], B [4,2]) travelling too.
    CHECK(floats_per_round(strategies::comigs_1g1s(), 2) == 3 * (one_expert + 16));
    CHECK(floats_per_round(strategies::fedavg(), 2) == 3 * (2 * one_expert + 16));
    // FFA-LoRA sends B only: half of HetLoRA's pairs here (A and B have the same size).
    CHECK(floats_per_round(strategies::hetlora(), 0) == 3 * one_expert);
    CHECK(floats_per_round(strategies::ffa_lora(), 0) == 3 * one_expert / 2);
}

TEST_CASE("RoundRunner: specialists and routers never leave a device, in every strategy") {
    for (const Strategy& s : strategies::all()) {
        CAPTURE(s.name);
        Federation<double> f(s, 3, 2, 3);
        // Canaries in every tensor that must stay: specialists and routers.
        for (auto& h : f.hosts) {
            auto& p = h->mixture().params();
            for (const auto& spec : p.layout().tensors())
                if (!h->mixture().shared(spec.name))
                    for (double& v : p.span(spec.name)) v = 4242.0;
        }
        if (!s.share_adapters)
            for (auto& h : f.hosts)
                for (double& v : h->head()->params().all()) v = 4242.0;
        RunnerHooks<double> hooks;
        Index uploads = 0;
        hooks.on_upload = [&](Index, const GeneralistUpload<double>& up) {
            ++uploads;
            for (const auto& info : up.tensors()) {
                const bool generalist = info.name.starts_with("layer0.mlp.experts.") &&
                                        s.roles[static_cast<std::size_t>(info.name[19] - '0')] == Role::generalist;
                CHECK((generalist || (s.share_adapters && info.name.starts_with("head."))));
            }
            for (double v : up.values()) CHECK(std::abs(v) < 100.0);
        };
        if (s.personalised()) {
            // PCL evaluates models with canaries: their perplexity overflows to inf, which must not break it.
        }
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(2, 3), f.users());
        runner.run(hooks);
        CHECK(uploads == (s.collaborates() ? 6 : 0));
    }
}

TEST_CASE("RoundRunner: CoMiGS-1G1S lowers the loss, is deterministic and independent of user order") {
    const Strategy s = strategies::comigs_1g1s();
    const Index R = 6, K = 10;
    Federation<double> a(s, 4, R, K);
    const double before = a.mean_test_loss();
    std::vector<double> personalised(4, 0.0);
    RunnerHooks<double> hooks;
    hooks.after_local = [&](Index round, UserId user, std::size_t index) {
        CHECK(a.users()[index].id == user);
        if (round == R - 1) personalised[index] = a.test_loss(index);
    };
    std::vector<double> progress;
    hooks.after_round = [&](const RoundReport& r) {
        CHECK(r.present.size() == 4);
        CHECK(r.local.size() == 4);
        CHECK(r.aggregation.has_value());
        CHECK(r.tokens() == 4 * K * 8);
        progress.push_back(r.mean_loss());
    };
    Index deployed = 0;
    hooks.deployed = [&](UserId, std::size_t) { ++deployed; };
    RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(R, K), a.users());
    const auto reps = runner.run(hooks);
    CHECK(reps.size() == static_cast<std::size_t>(R));
    CHECK(deployed == 4);
    const double after = a.mean_test_loss();
    double pers = 0;
    for (double x : personalised) pers += x / 4;
    MESSAGE("1G1S mean test MSE: before ", before, ", personalised ", pers, ", deployed ", after);
    CHECK(after < 0.5 * before);
    CHECK(pers < 0.5 * before);
    CHECK(progress.back() < progress.front());
    for (std::size_t u = 0; u < 4; ++u) CHECK(a.trainers[u]->expert_steps() == R * K);
    CHECK(a.trainers[0]->router_steps() == (R * K / 5) * 2);

    // Deployed: generalists (and the head) equal on every device, specialists personal.
    const auto p0 = a.params(0);
    for (std::size_t u = 1; u < 4; ++u) {
        const auto pu = a.params(u);
        CHECK(tensor_values(pu, "layer0.mlp.experts.0.fc.lora_A") == tensor_values(p0, "layer0.mlp.experts.0.fc.lora_A"));
        CHECK(tensor_values(pu, "head.lora_B") == tensor_values(p0, "head.lora_B"));
        CHECK(tensor_values(pu, "layer0.mlp.experts.1.fc.lora_B") != tensor_values(p0, "layer0.mlp.experts.1.fc.lora_B"));
        CHECK(tensor_values(pu, "layer0.mlp.router.weight") != tensor_values(p0, "layer0.mlp.router.weight"));
    }

    // The same seeds again, users listed in reverse and processed in a shuffled order: bitwise equal.
    Federation<double> b(s, 4, R, K);
    RunnerConfig shuffled = rounds(R, K);
    shuffled.shuffle_seed = 77;
    RoundRunner<TinyHost<double>, RegressionBatch<double>> runner_b(s, shuffled, b.users(true));
    runner_b.run();
    for (std::size_t u = 0; u < 4; ++u) CHECK(bitwise_same(a.params(u), b.params(u)));
}

TEST_CASE("RoundRunner: every preset trains, heterogeneous ranks where the rule allows them") {
    for (const Strategy& s : strategies::all()) {
        CAPTURE(s.name);
        std::vector<Index> ranks;
        if (s.aggregation() && s.aggregation()->heterogeneous_ranks()) ranks = {2, 3, 2, 4};
        Federation<double> f(s, 4, 4, 8, 2, ranks);
        const double before = f.mean_test_loss();
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(4, 8), f.users());
        runner.run();
        const double after = f.mean_test_loss();
        MESSAGE(s.name, ": mean test MSE ", before, " -> ", after);
        CHECK(after < 0.7 * before);
        for (const auto& t : f.trainers) CHECK(t->skipped() == 0);
    }
}

TEST_CASE("RoundRunner: users with different numbers of experts share their generalist") {
    const Strategy s = strategies::comigs_1g1s();
    Federation<double> f(s, 3, 3, 6, 2, {}, 1, {1, 2, 3});
    const double before = f.mean_test_loss();
    RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(3, 6), f.users());
    const auto reps = runner.run();
    CHECK(f.mean_test_loss() < before);
    CHECK(reps.back().aggregation->included.size() == 3);
    CHECK(f.trainers[0]->router_optimizer() == nullptr);  // a single expert has no router
    const auto g0 = tensor_values(f.params(0), "layer0.mlp.experts.0.proj.lora_B");
    CHECK(tensor_values(f.params(1), "layer0.mlp.experts.0.proj.lora_B") == g0);
    CHECK(tensor_values(f.params(2), "layer0.mlp.experts.0.proj.lora_B") == g0);
    // Without the per-user roles the runner rejects users whose layers differ from the strategy.
    auto users = f.users();
    users[2].roles.clear();
    using Runner = RoundRunner<TinyHost<double>, RegressionBatch<double>>;
    CHECK_THROWS_WITH_AS(Runner(s, rounds(3, 6), users), doctest::Contains("3 experts"), InvalidArgument);
}

TEST_CASE("RoundRunner: absent users neither train nor upload; the aggregate renormalises over the present") {
    const Strategy s = strategies::comigs_1g1s();
    Federation<double> f(s, 4, 3, 4);
    RunnerConfig cfg = rounds(3, 4);
    cfg.present = [](Index round, UserId user) { return !(round == 1 && user == 102) && !(round == 2 && user == 100); };
    std::vector<std::vector<UserId>> trained(3);
    RunnerHooks<double> hooks;
    hooks.after_local = [&](Index round, UserId user, std::size_t) { trained[static_cast<std::size_t>(round)].push_back(user); };
    // The server's aggregate equals the uniform mean of the present users' uploads.
    std::vector<std::vector<double>> uploaded;
    hooks.on_upload = [&](Index, const GeneralistUpload<double>& up) {
        uploaded.emplace_back(up.values().begin(), up.values().end());
    };
    RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, cfg, f.users());
    const RoundReport r0 = runner.round(hooks);
    CHECK(r0.present == std::vector<UserId>{100, 101, 102, 103});
    uploaded.clear();
    const RoundReport r1 = runner.round(hooks);
    CHECK(r1.present == std::vector<UserId>{100, 101, 103});
    CHECK(r1.aggregation->included == std::vector<UserId>{100, 101, 103});
    REQUIRE(uploaded.size() == 3);
    const auto agg = runner.global_aggregate()->values();
    for (std::size_t e = 0; e < agg.size(); ++e)
        CHECK(agg[e] == doctest::Approx((uploaded[0][e] + uploaded[1][e] + uploaded[2][e]) / 3.0).epsilon(1e-12));
    const RoundReport r2 = runner.round(hooks);
    runner.finish(hooks);
    CHECK(r2.present == std::vector<UserId>{101, 102, 103});
    CHECK(trained[1] == std::vector<UserId>{100, 101, 103});
    CHECK(f.trainers[2]->expert_steps() == 2 * 4);
    CHECK(f.trainers[0]->expert_steps() == 2 * 4);
    CHECK(f.trainers[1]->expert_steps() == 3 * 4);
    CHECK(r1.upload_floats == 3 * runner.upload_floats(0));
    // User 102 was away in round 1: it downloaded nothing then, and took the newest aggregate in round 2.
    CHECK(r2.download_floats == 3 * runner.upload_floats(0));
    CHECK_THROWS_AS(runner.round(hooks), InvalidArgument);  // all rounds done
}

TEST_CASE("RoundRunner: PCL weights are a softmax of validation perplexities; model swaps are undone") {
    SUBCASE("temperature 1: weights from the perplexity matrix, whose diagonal is each user's own model") {
        const Strategy s = strategies::pcl(1.0);
        Federation<double> f(s, 3, 2, 5);
        RunnerHooks<double> hooks;
        std::vector<double> own(3);
        std::vector<std::vector<double>> agg_expected(3);
        std::vector<std::vector<double>> uploads(3);
        hooks.after_local = [&](Index, UserId, std::size_t i) { own[i] = f.users()[i].validation_perplexity(); };
        hooks.on_upload = [&](Index, const GeneralistUpload<double>& up) {
            uploads[up.user() - 100].assign(up.values().begin(), up.values().end());
        };
        Index checked = 0;
        hooks.after_round = [&](const RoundReport& r) {
            REQUIRE(r.pcl_perplexities.size() == 3);
            for (std::size_t i = 0; i < 3; ++i) {
                CHECK(r.pcl_perplexities[i][i] == own[i]);
                double z = 0;
                for (std::size_t j = 0; j < 3; ++j) z += std::exp(-r.pcl_perplexities[i][j]);
                for (std::size_t j = 0; j < 3; ++j)
                    CHECK(r.pcl_weights[i][j] == doctest::Approx(std::exp(-r.pcl_perplexities[i][j]) / z).epsilon(1e-12));
                // Off-diagonal entries really are other models (they differ from the own one).
                for (std::size_t j = 0; j < 3; ++j)
                    if (j != i) CHECK(r.pcl_perplexities[i][j] != r.pcl_perplexities[i][i]);
                agg_expected[i].assign(uploads[0].size(), 0.0);
                for (std::size_t e = 0; e < uploads[0].size(); ++e)
                    for (std::size_t j = 0; j < 3; ++j) agg_expected[i][e] += r.pcl_weights[i][j] * uploads[j][e];
            }
            ++checked;
        };
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(2, 5), f.users());
        runner.run(hooks);
        CHECK(checked == 2);
        // Deployed: each user holds its own weighted average of the last round's uploads.
        for (std::size_t i = 0; i < 3; ++i) {
            UploadBuilder<double> b(100 + i, 1.0);
            b.add(f.hosts[i]->adapters());
            const auto mine = std::move(b).finish();
            REQUIRE(mine.values().size() == agg_expected[i].size());
            for (std::size_t e = 0; e < agg_expected[i].size(); ++e)
                CHECK(mine.values()[e] == doctest::Approx(agg_expected[i][e]).epsilon(1e-12));
        }
    }
    SUBCASE("high temperature: uniform weights, every user ends with (nearly) the same model") {
        const Strategy s = strategies::pcl(1e12);
        Federation<double> f(s, 3, 2, 5);
        RunnerHooks<double> hooks;
        std::vector<std::vector<NamedTensor<double>>> after_local(3);
        hooks.after_local = [&](Index, UserId, std::size_t i) { after_local[i] = f.params(i); };
        hooks.after_round = [&](const RoundReport& r) {
            REQUIRE(r.pcl_weights.size() == 3);
            for (const auto& row : r.pcl_weights)
                for (double w : row) CHECK(w == doctest::Approx(1.0 / 3).epsilon(1e-9));
            // Evaluating other users' models inside each device left every device's model as it was.
            for (std::size_t i = 0; i < 3; ++i) CHECK(bitwise_same(after_local[i], f.params(i)));
        };
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(2, 5), f.users());
        runner.run(hooks);
        const auto p0 = f.params(0);
        for (std::size_t u = 1; u < 3; ++u) {
            const auto pu = f.params(u);
            for (std::size_t t = 0; t < p0.size(); ++t)
                for (std::size_t e = 0; e < p0[t].data.size(); ++e)
                    CHECK(pu[t].data[e] == doctest::Approx(p0[t].data[e]).epsilon(1e-9));
        }
    }
    SUBCASE("low temperature: each user takes the model with the best validation perplexity on its data") {
        const Strategy s = strategies::pcl(1e-9);
        Federation<double> f(s, 3, 1, 5);
        RunnerHooks<double> hooks;
        std::vector<RoundReport> reports;
        hooks.after_round = [&](const RoundReport& r) { reports.push_back(r); };
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(1, 5), f.users());
        runner.run(hooks);
        for (const auto& row : reports[0].pcl_weights) {
            double sum = 0, mx = 0;
            for (double w : row) {
                sum += w;
                mx = std::max(mx, w);
            }
            CHECK(sum == doctest::Approx(1.0));
            CHECK(mx == doctest::Approx(1.0));
        }
    }
}

TEST_CASE("RoundRunner: optimiser moments of downloaded tensors persist unless configured otherwise") {
    const Strategy s = strategies::comigs_1g1s();
    auto step_counts = [](const Trainer<TinyHost<double>, RegressionBatch<double>>& t) {
        std::vector<std::pair<std::string, std::int64_t>> out;
        for (const auto& sc : t.state().scalars)
            if (sc.name.starts_with("expert_optimizer.") && sc.name.ends_with(".step")) out.emplace_back(sc.name, sc.value);
        return out;
    };
    for (bool reset : {false, true}) {
        CAPTURE(reset);
        Federation<double> f(s, 2, 3, 4);
        RunnerConfig cfg = rounds(3, 4);
        cfg.reset_moments_on_download = reset;
        RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, cfg, f.users());
        runner.run();
        for (const auto& entry : step_counts(*f.trainers[0])) {
            const std::string& name = entry.first;
            const std::int64_t value = entry.second;
            CAPTURE(name);
            const bool downloaded = name.starts_with("expert_optimizer.layer0.mlp.experts.0.") ||
                                    name.starts_with("expert_optimizer.head.");
            CHECK(value == (reset && downloaded ? 0 : 12));
        }
    }
}

TEST_CASE("RoundRunner: configuration errors") {
    using Runner = RoundRunner<TinyHost<double>, RegressionBatch<double>>;
    Federation<double> f(strategies::comigs_1g1s(), 2, 1, 1);
    SUBCASE("trainer configured for another router training") {
        CHECK_THROWS_WITH_AS(Runner(strategies::pfedmoe(), rounds(1, 1), f.users()), doctest::Contains("router"),
                             InvalidArgument);
    }
    SUBCASE("layers built for another strategy") {
        auto s = strategies::comigs_2g();
        auto users = f.users();
        for (auto& u : users) u.roles.clear();
        CHECK_THROWS_WITH_AS(Runner(s, rounds(1, 1), users), doctest::Contains("role specialist"), InvalidArgument);
    }
    SUBCASE("PCL without a validation callback") {
        Federation<double> p(strategies::pcl(), 2, 1, 1);
        auto users = p.users();
        users[1].validation_perplexity = nullptr;
        CHECK_THROWS_WITH_AS(Runner(strategies::pcl(), rounds(1, 1), users), doctest::Contains("validation_perplexity"),
                             InvalidArgument);
    }
    SUBCASE("duplicate ids") {
        auto users = f.users();
        users[1].id = users[0].id;
        CHECK_THROWS_WITH_AS(Runner(strategies::comigs_1g1s(), rounds(1, 1), users), doctest::Contains("twice"),
                             InvalidArgument);
    }
}

TEST_CASE("RoundRunner: PCL refuses a user whose every candidate has an infinite validation perplexity") {
    // softmax(-inf) over every candidate is 0 / 0: no weights exist, and NaN must never be averaged.
    const Strategy s = strategies::pcl(1.0);
    Federation<double> f(s, 3, 1, 2);
    auto users = f.users();
    users[1].validation_perplexity = [] { return std::numeric_limits<double>::infinity(); };
    RoundRunner<TinyHost<double>, RegressionBatch<double>> runner(s, rounds(1, 2), std::move(users));
    RunnerHooks<double> hooks;
    CHECK_THROWS_WITH_AS(runner.run(hooks), doctest::Contains("user 101: every candidate model"), NumericError);

    // Some infinite candidates are fine: they get weight 0.
    Federation<double> g(s, 3, 1, 2);
    auto some = g.users();
    std::size_t calls = 0;
    some[1].validation_perplexity = [&calls] {
        return ++calls % 3 == 1 ? 2.0 : std::numeric_limits<double>::infinity();
    };
    RoundRunner<TinyHost<double>, RegressionBatch<double>> ok(s, rounds(1, 2), std::move(some));
    RunnerHooks<double> seen;
    std::vector<std::vector<double>> weights;
    seen.after_round = [&](const RoundReport& r) { weights = r.pcl_weights; };
    ok.run(seen);
    REQUIRE(weights.size() == 3);
    CHECK(weights[1][0] == 1.0);
    CHECK(weights[1][1] == 0.0);
    CHECK(weights[1][2] == 0.0);
}
