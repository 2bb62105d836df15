#include <comigs/mixture_linear.hpp>
#include <doctest/doctest.h>

#include <vector>

#include "gradcheck.hpp"

TEST_CASE("MixtureOfLoraLinear: gradients match finite differences; output equals the gated experts") {
    using comigs::ConstMatrixView;
    using comigs::Index;
    using comigs::MatrixView;
    struct C {
        Index E, k;
        comigs::Routing routing;
    };
    for (C c : {C{4, 2, comigs::Routing::top_k}, C{3, 1, comigs::Routing::top_k}, C{1, 1, comigs::Routing::top_k},
                C{3, 3, comigs::Routing::mean}}) {
        CAPTURE(c.E);
        CAPTURE(c.k);
        comigs::MixtureLinearConfig cfg;
        cfg.in_features = 5;
        cfg.out_features = 4;
        cfg.n_experts = c.E;
        cfg.top_k = c.k;
        cfg.rank = 2;
        cfg.alpha = 3.0;
        cfg.routing = c.routing;
        comigs::Rng rng(8);
        std::vector<double> W(20), b(4);
        for (auto& v : W) v = rng.normal();
        for (auto& v : b) v = rng.normal();
        comigs::FrozenLinear<double> base{ConstMatrixView<double>(W.data(), 4, 5), std::span<const double>(b)};
        comigs::MixtureOfLoraLinear<double> layer(cfg, base);
        layer.init(rng);
        for (const auto& spec : layer.params().layout().tensors())
            for (auto& v : layer.params().span(spec.name)) v = rng.normal(0.0, 0.8);
        const Index n = 6;
        std::vector<double> x(static_cast<std::size_t>(n * 5)), dy(static_cast<std::size_t>(n * 4));
        for (auto& v : dy) v = rng.normal();
        for (int attempt = 0;; ++attempt) {  // keep top-k decisions away from ties
            REQUIRE(attempt < 1000);
            for (auto& v : x) v = rng.normal();
            std::vector<double> y(dy.size());
            layer.forward(MatrixView<double>(y.data(), n, 4), ConstMatrixView<double>(x.data(), n, 5));
            const auto& r = layer.routing();
            if (r.logits.empty() || r.slots == r.experts) break;
            double worst = 1e9;
            for (Index t = 0; t < n; ++t) {
                std::vector<double> l(r.logits.begin() + t * c.E, r.logits.begin() + (t + 1) * c.E);
                std::sort(l.rbegin(), l.rend());
                worst = std::min(worst, l[static_cast<std::size_t>(c.k - 1)] - l[static_cast<std::size_t>(c.k)]);
            }
            if (worst > 0.05) break;
        }
        auto loss = [&] {
            std::vector<double> y(dy.size());
            double lb = layer.forward(MatrixView<double>(y.data(), n, 4), ConstMatrixView<double>(x.data(), n, 5));
            double s = 0.3 * lb;
            for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
            return s;
        };
        // Direct evaluation of sum_j g_j (W x + b + s B_e A_e x) for token 0.
        {
            std::vector<double> y(dy.size());
            layer.forward(MatrixView<double>(y.data(), n, 4), ConstMatrixView<double>(x.data(), n, 5));
            const auto& r = layer.routing();
            for (Index o = 0; o < 4; ++o) {
                double ref = 0;
                for (Index j = 0; j < r.slots; ++j) {
                    const Index e = r.expert_of(0, j);
                    const auto A = layer.params().view(comigs::MixtureOfLoraLinear<double>::tensor_name(e, 'A'));
                    const auto B = layer.params().view(comigs::MixtureOfLoraLinear<double>::tensor_name(e, 'B'));
                    double v = b[static_cast<std::size_t>(o)];
                    for (Index i = 0; i < 5; ++i) v += W[static_cast<std::size_t>(o * 5 + i)] * x[static_cast<std::size_t>(i)];
                    for (Index a = 0; a < 2; ++a) {
                        double z = 0;
                        for (Index i = 0; i < 5; ++i) z += A(a, i) * x[static_cast<std::size_t>(i)];
                        v += layer.scale() * B(o, a) * z;
                    }
                    ref += r.gate_of(0, j) * v;
                }
                CHECK(y[static_cast<std::size_t>(o)] == doctest::Approx(ref).epsilon(1e-12));
            }
        }
        layer.zero_grad();
        loss();
        std::vector<double> dx(x.size(), 0.0);
        layer.backward(MatrixView<double>(dx.data(), n, 5), ConstMatrixView<double>(dy.data(), n, 4), 0.3);
        for (const auto& spec : layer.params().layout().tensors()) {
            auto g = layer.grads().span(spec.name);
            comigs::test::gradcheck(layer.params().span(spec.name), std::span<const double>(g.data(), g.size()), loss,
                                    spec.name);
        }
        comigs::test::gradcheck(std::span<double>(x), std::span<const double>(dx), loss, "x");
    }
}

TEST_CASE("MixtureOfLoraLinear: bad configuration and shapes are named") {
    std::vector<float> W(12);
    comigs::FrozenLinear<float> base{comigs::ConstMatrixView<float>(W.data(), 3, 4), {}};
    comigs::MixtureLinearConfig cfg;
    cfg.in_features = 4;
    cfg.out_features = 2;
    CHECK_THROWS_WITH_AS(comigs::MixtureOfLoraLinear<float>(cfg, base), doctest::Contains("frozen weight"),
                         comigs::ShapeError);
    cfg.out_features = 3;
    cfg.rank = 0;
    CHECK_THROWS_WITH_AS(comigs::MixtureOfLoraLinear<float>(cfg, base), doctest::Contains("rank 0"),
                         comigs::InvalidArgument);
}

TEST_CASE("MixtureOfLoraLinear on a Q4_0 / Q8_0 weight: gradients match finite differences in double") {
    using comigs::ConstMatrixView;
    using comigs::Index;
    using comigs::MatrixView;
    for (auto t : {comigs::kernels::QuantType::q4_0, comigs::kernels::QuantType::q8_0}) {
        CAPTURE(std::string(comigs::kernels::to_string(t)));
        comigs::MixtureLinearConfig cfg;
        cfg.in_features = 64;
        cfg.out_features = 5;
        cfg.n_experts = 3;
        cfg.top_k = 2;
        cfg.rank = 2;
        comigs::Rng rng(9);
        std::vector<float> W(5 * 64);
        for (auto& v : W) v = static_cast<float>(rng.normal());
        std::vector<std::byte> blocks(5 * comigs::kernels::quant_row_bytes(t, 64));
        for (Index r = 0; r < 5; ++r)
            comigs::kernels::quantize_row(blocks.data() + r * comigs::kernels::quant_row_bytes(t, 64), t, W.data() + r * 64, 64);
        std::vector<double> b(5);
        for (auto& v : b) v = rng.normal();
        comigs::FrozenLinear<double> base{{}, std::span<const double>(b), {}, comigs::kernels::QuantMatrixView(t, blocks.data(), 5, 64)};
        CHECK(base.in_features() == 64);
        comigs::MixtureOfLoraLinear<double> layer(cfg, base);
        layer.init(rng);
        for (const auto& spec : layer.params().layout().tensors())
            for (auto& v : layer.params().span(spec.name)) v = rng.normal(0.0, 0.3);
        const Index n = 4;
        std::vector<double> x(static_cast<std::size_t>(n * 64)), dy(static_cast<std::size_t>(n * 5));
        for (auto& v : x) v = rng.normal();
        for (auto& v : dy) v = rng.normal();
        auto loss = [&] {
            std::vector<double> y(dy.size());
            const double lb = layer.forward(MatrixView<double>(y.data(), n, 5), ConstMatrixView<double>(x.data(), n, 64));
            double s = 0.2 * lb;
            for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
            return s;
        };
        layer.zero_grad();
        loss();
        std::vector<double> dx(x.size(), 0.0);
        layer.backward(MatrixView<double>(dx.data(), n, 64), ConstMatrixView<double>(dy.data(), n, 5), 0.2);
        for (const auto& spec : layer.params().layout().tensors()) {
            auto g = layer.grads().span(spec.name);
            comigs::test::gradcheck(layer.params().span(spec.name), std::span<const double>(g.data(), g.size()), loss, spec.name);
        }
        comigs::test::gradcheck(std::span<double>(x), std::span<const double>(dx), loss, "x");
        // A weight of the wrong shape is refused with both shapes named.
        comigs::MixtureLinearConfig wrong = cfg;
        wrong.in_features = 32;
        CHECK_THROWS_WITH_AS(comigs::MixtureOfLoraLinear<double>(wrong, base), doctest::Contains("[5, 64]"), comigs::ShapeError);
    }
}

TEST_CASE("MixtureOfLoraLinear: a forward refused for a missing generator leaves the last forward intact") {
    using comigs::ConstMatrixView;
    using comigs::Index;
    using comigs::MatrixView;
    comigs::MixtureLinearConfig cfg;
    cfg.in_features = 5;
    cfg.out_features = 4;
    cfg.n_experts = 3;
    cfg.top_k = 2;
    cfg.rank = 2;
    cfg.noise = comigs::RouterNoise::gaussian;
    comigs::Rng rng(3);
    std::vector<double> W(20), b(4);
    for (auto& v : W) v = rng.normal();
    comigs::FrozenLinear<double> base{ConstMatrixView<double>(W.data(), 4, 5), std::span<const double>(b)};
    comigs::MixtureOfLoraLinear<double> layer(cfg, base);
    layer.init(rng);
    for (auto& v : layer.params().all()) v = rng.normal(0.0, 0.5);
    std::vector<double> x2(10), y2(8), dy2(8, 1.0), dx2(10, 0.0), x6(30), y6(24), dy6(24, 1.0), dx6(30, 0.0);
    for (auto& v : x2) v = rng.normal();
    for (auto& v : x6) v = rng.normal();
    layer.forward(MatrixView<double>(y2.data(), 2, 4), ConstMatrixView<double>(x2.data(), 2, 5));
    layer.backward(MatrixView<double>(dx2.data(), 2, 5), ConstMatrixView<double>(dy2.data(), 2, 4), 0.01);
    CHECK_THROWS_WITH_AS(
        layer.forward(MatrixView<double>(y6.data(), 6, 4), ConstMatrixView<double>(x6.data(), 6, 5), true, nullptr),
        doctest::Contains("rng"), comigs::InvalidArgument);
    CHECK_THROWS_AS(layer.backward(MatrixView<double>(dx6.data(), 6, 5), ConstMatrixView<double>(dy6.data(), 6, 4), 0.01),
                    comigs::ShapeError);
    std::vector<double> again(10, 0.0);
    layer.backward(MatrixView<double>(again.data(), 2, 5), ConstMatrixView<double>(dy2.data(), 2, 4), 0.01);
    CHECK(again == dx2);
}
