#include <comigs/router.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "gradcheck.hpp"

namespace {
using comigs::ConstMatrixView;
using comigs::Index;
using comigs::MatrixView;

comigs::RouterConfig config(Index E, Index k, double importance = -1.0) {
    comigs::RouterConfig c;
    c.d_model = 4;
    c.n_experts = E;
    c.top_k = k;
    c.expert0_importance = importance;
    return c;
}

// One token whose logits are exactly `l` (x = e_0..e_{E-1} picks rows of W = identity-like).
comigs::RoutingResult<double> route_logits(const std::vector<double>& l, Index k, double importance = -1.0) {
    const Index E = static_cast<Index>(l.size());
    auto cfg = config(E, k, importance);
    cfg.d_model = E;
    std::vector<double> W(static_cast<std::size_t>(E * E), 0.0), x = l;
    for (Index e = 0; e < E; ++e) W[static_cast<std::size_t>(e * E + e)] = 1.0;
    comigs::RoutingResult<double> r;
    comigs::router_forward(r, ConstMatrixView<double>(x.data(), 1, E), ConstMatrixView<double>(W.data(), E, E), cfg);
    return r;
}
}  // namespace

TEST_CASE("router: gate semantics for k >= 2, k = 1, E = 1 and mean") {
    SUBCASE("k = 2: softmax over the two largest logits, in descending order") {
        const auto r = route_logits({0.1, 2.0, -1.0, 1.0}, 2);
        CHECK(r.expert_of(0, 0) == 1);
        CHECK(r.expert_of(0, 1) == 3);
        const double g1 = 1.0 / (1.0 + std::exp(-1.0));
        CHECK(r.gate_of(0, 0) == doctest::Approx(g1));
        CHECK(r.gate_of(0, 1) == doctest::Approx(1.0 - g1));
    }
    SUBCASE("k = 1: the top probability of the full softmax, unnormalised") {
        const std::vector<double> l = {0.1, 2.0, -1.0, 1.0};
        const auto r = route_logits(l, 1);
        double z = 0;
        for (double v : l) z += std::exp(v);
        CHECK(r.expert_of(0, 0) == 1);
        CHECK(r.gate_of(0, 0) == doctest::Approx(std::exp(2.0) / z));
        CHECK(r.gate_of(0, 0) < 1.0);
    }
    SUBCASE("k = E: all experts, softmax over all") {
        const auto r = route_logits({0.5, -0.5, 0.0}, 3);
        double sum = 0;
        for (Index j = 0; j < 3; ++j) sum += r.gate_of(0, j);
        CHECK(sum == doctest::Approx(1.0));
        CHECK(r.lb_loss == doctest::Approx(1.0));  // f_e = 1/E for all e: E * sum P_e / E = 1
    }
    SUBCASE("E = 1 and mean routing have no weights and fixed gates") {
        auto c1 = config(1, 1);
        CHECK_FALSE(c1.has_weight());
        comigs::RoutingResult<double> r;
        std::vector<double> x(8, 1.0);
        comigs::router_forward(r, ConstMatrixView<double>(x.data(), 2, 4), ConstMatrixView<double>(), c1);
        CHECK(r.slots == 1);
        CHECK(r.gate_of(1, 0) == 1.0);
        auto cm = config(3, 1);
        cm.routing = comigs::Routing::mean;
        CHECK_FALSE(cm.has_weight());
        comigs::router_forward(r, ConstMatrixView<double>(x.data(), 2, 4), ConstMatrixView<double>(), cm);
        CHECK(r.slots == 3);
        for (Index j = 0; j < 3; ++j) {
            CHECK(r.expert_of(0, j) == j);
            CHECK(r.gate_of(0, j) == doctest::Approx(1.0 / 3));
        }
        CHECK(r.lb_loss == 0.0);
    }
}

TEST_CASE("router: load-balancing loss with a generalist target share") {
    // Two tokens, E = 3, k = 1: hand-computed sum_e P_e f_e / t_e.
    auto cfg = config(3, 1, 0.5);
    cfg.d_model = 3;
    std::vector<double> W = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    std::vector<double> x = {2.0, 0.0, 0.0, 0.0, 0.0, 1.0};
    comigs::RoutingResult<double> r;
    comigs::router_forward(r, ConstMatrixView<double>(x.data(), 2, 3), ConstMatrixView<double>(W.data(), 3, 3), cfg);
    auto sm = [](std::vector<double> l) {
        double z = 0;
        for (double v : l) z += std::exp(v);
        for (double& v : l) v = std::exp(v) / z;
        return l;
    };
    const auto p0 = sm({2, 0, 0}), p1 = sm({0, 0, 1});
    const double P[3] = {(p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2, (p0[2] + p1[2]) / 2};
    const double f[3] = {0.5, 0.0, 0.5};
    const double t[3] = {0.5, 0.25, 0.25};
    double lb = 0;
    for (int e = 0; e < 3; ++e) lb += P[e] * f[e] / t[e];
    CHECK(r.lb_loss == doctest::Approx(lb).epsilon(1e-12));
    CHECK(r.counts[0] == 1);
    CHECK(r.counts[2] == 1);
    // Uniform target 1/E gives the Switch loss E * sum P_e f_e.
    cfg.expert0_importance = -1;
    comigs::router_forward(r, ConstMatrixView<double>(x.data(), 2, 3), ConstMatrixView<double>(W.data(), 3, 3), cfg);
    CHECK(r.lb_loss == doctest::Approx(3 * (P[0] * f[0] + P[2] * f[2])).epsilon(1e-12));
}

TEST_CASE("router: backward through gates and balancing loss matches finite differences") {
    for (Index k : {1, 2, 3}) {
        CAPTURE(k);
        auto cfg = config(4, k, 0.4);
        comigs::TopKRouter<double> router(cfg);
        comigs::Rng rng(21);
        router.init(rng, 0.7);
        const Index n = 5;
        std::vector<double> x(static_cast<std::size_t>(n * 4)), w(static_cast<std::size_t>(n * k));
        // Keep every token's top-k boundary clear of ties.
        for (int attempt = 0;; ++attempt) {
            REQUIRE(attempt < 1000);
            for (auto& v : x) v = rng.normal();
            const auto& r = router.forward(ConstMatrixView<double>(x.data(), n, 4));
            double worst = 1e9;
            for (Index t = 0; t < n && k < 4; ++t) {
                std::vector<double> l(r.logits.begin() + t * 4, r.logits.begin() + (t + 1) * 4);
                std::sort(l.rbegin(), l.rend());
                worst = std::min(worst, l[static_cast<std::size_t>(k - 1)] - l[static_cast<std::size_t>(k)]);
            }
            if (worst > 0.05) break;
        }
        for (auto& v : w) v = rng.normal();
        const double lbw = 0.8;
        // loss = sum_t,j w_tj g_tj + lbw * lb
        auto loss = [&] {
            const auto& r = router.forward(ConstMatrixView<double>(x.data(), n, 4));
            double s = lbw * r.lb_loss;
            for (std::size_t i = 0; i < w.size(); ++i) s += w[i] * r.gate[i];
            return s;
        };
        router.zero_grad();
        loss();
        std::vector<double> dx(x.size(), 0.0);
        router.backward(MatrixView<double>(dx.data(), n, 4), ConstMatrixView<double>(w.data(), n, k), lbw);
        auto g = router.grads().span("router.weight");
        comigs::test::gradcheck(router.params().span("router.weight"), std::span<const double>(g.data(), g.size()), loss,
                                "router.weight");
        comigs::test::gradcheck(std::span<double>(x), std::span<const double>(dx), loss, "x");
    }
}

TEST_CASE("router: noise only in training, reproducible from the seed") {
    auto cfg = config(4, 2);
    cfg.noise = comigs::RouterNoise::gumbel;
    comigs::TopKRouter<float> router(cfg);
    comigs::Rng init(1);
    router.init(init);
    std::vector<float> x(40);
    for (auto& v : x) v = static_cast<float>(init.normal());
    const ConstMatrixView<float> xv(x.data(), 10, 4);
    const auto clean = router.forward(xv, false).logits;
    comigs::Rng a(9), b(9);
    const auto n1 = router.forward(xv, true, &a).logits;
    const auto n2 = router.forward(xv, true, &b).logits;
    CHECK(n1 == n2);
    CHECK(n1 != clean);
    CHECK_THROWS_WITH_AS(router.forward(xv, true, nullptr), doctest::Contains("rng"), comigs::InvalidArgument);
}

TEST_CASE("router: statistics accumulate shares and probabilities") {
    const auto r = route_logits({3.0, 0.0, 0.0}, 1);
    comigs::RoutingStats stats;
    stats.add(r);
    stats.add(r);
    CHECK(stats.tokens == 2);
    CHECK(stats.share(0) == 1.0);
    CHECK(stats.share(1) == 0.0);
    CHECK(stats.mean_prob(0) == doctest::Approx(r.mean_prob[0]));
}

TEST_CASE("RouterConfig: bad values are errors naming the value") {
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>(config(4, 5)), doctest::Contains("top_k 5"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>(config(4, 0)), doctest::Contains("top_k 0"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>(config(0, 1)), doctest::Contains("experts 0"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>(config(4, 2, 1.5)), doctest::Contains("expert0_importance 1.5"),
                         comigs::InvalidArgument);
    auto c = config(4, 2);
    c.noise_scale = NAN;
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>{c}, doctest::Contains("noise_scale"), comigs::InvalidArgument);
    comigs::TopKRouter<float> ok(config(4, 2));
    std::vector<float> x(6);
    CHECK_THROWS_WITH_AS(ok.forward(ConstMatrixView<float>(x.data(), 2, 3)), doctest::Contains("router input x"),
                         comigs::ShapeError);
}

TEST_CASE("router: the generalist target share goes to the generalists by role") {
    using comigs::Role;
    auto c = config(3, 2, 0.6);
    CHECK(c.target_share(0) == doctest::Approx(0.6));  // default roles: expert 0 is the generalist
    CHECK(c.target_share(2) == doctest::Approx(0.2));
    c.roles = {Role::specialist, Role::generalist, Role::specialist};
    CHECK(c.target_share(1) == doctest::Approx(0.6));
    CHECK(c.target_share(0) == doctest::Approx(0.2));
    c.roles = {Role::generalist, Role::specialist, Role::generalist};
    CHECK(c.target_share(0) == doctest::Approx(0.3));
    CHECK(c.target_share(2) == doctest::Approx(0.3));
    CHECK(c.target_share(1) == doctest::Approx(0.4));
    c.expert0_importance = -1;
    CHECK(c.target_share(1) == doctest::Approx(1.0 / 3));
    c.expert0_importance = 0.6;
    c.roles = {Role::specialist, Role::specialist, Role::specialist};
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>{c}, doctest::Contains("0 of the 3 experts are generalists"),
                         comigs::InvalidArgument);
    c.roles = {Role::generalist};
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>{c}, doctest::Contains("roles: 1 given for 3"), comigs::InvalidArgument);
    c.roles.clear();
    c.n_experts = comigs::RouterConfig::max_experts + 1;
    CHECK_THROWS_WITH_AS(comigs::TopKRouter<float>{c}, doctest::Contains("experts 65537"), comigs::InvalidArgument);
}
