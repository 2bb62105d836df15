#include <comigs/lora.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "gradcheck.hpp"

namespace {
using comigs::Index;
using comigs::Index;
using comigs::MatrixView;
using comigs::ConstMatrixView;

template <class T>
std::vector<T> randn(std::size_t n, comigs::Rng& rng, double std = 1.0) {
    std::vector<T> v(n);
    for (auto& x : v) x = static_cast<T>(rng.normal(0.0, std));
    return v;
}
}  // namespace

TEST_CASE("lora_scale: both conventions, and bad values name themselves") {
    CHECK(comigs::lora_scale(16, 4, comigs::LoraScaling::linear) == 4.0);
    CHECK(comigs::lora_scale(16, 4, comigs::LoraScaling::sqrt) == 8.0);
    CHECK_THROWS_WITH_AS(comigs::lora_scale(16, 0, comigs::LoraScaling::sqrt), doctest::Contains("rank 0"),
                         comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::lora_scale(NAN, 2, comigs::LoraScaling::sqrt), doctest::Contains("alpha nan"),
                         comigs::InvalidArgument);
}

TEST_CASE("LoraExpert: init is Kaiming-uniform A and zero B, seedable") {
    comigs::LoraConfig cfg{64, 10, 8};
    comigs::LoraExpert<float> a(cfg), b(cfg);
    comigs::Rng r1(5), r2(5);
    a.init(r1);
    b.init(r2);
    const double bound = 1.0 / std::sqrt(64.0);
    double maxabs = 0.0, sum2 = 0.0;
    for (Index i = 0; i < 8; ++i)
        for (Index j = 0; j < 64; ++j) {
            CHECK(a.A()(i, j) == b.A()(i, j));
            maxabs = std::max(maxabs, std::abs(static_cast<double>(a.A()(i, j))));
            sum2 += a.A()(i, j) * a.A()(i, j);
        }
    CHECK(maxabs <= bound);
    CHECK(maxabs > 0.9 * bound);
    CHECK(sum2 / 512 == doctest::Approx(bound * bound / 3).epsilon(0.15));  // variance of U(-b, b)
    for (Index i = 0; i < 10; ++i)
        for (Index j = 0; j < 8; ++j) CHECK(a.B()(i, j) == 0.0f);
}

TEST_CASE_TEMPLATE("LoraExpert: forward adds s B A x into y", T, float, double) {
    comigs::LoraConfig cfg{5, 4, 3, 6.0, comigs::LoraScaling::linear};
    comigs::LoraExpert<T> lora(cfg);
    comigs::Rng rng(2);
    for (auto& v : lora.params().span("lora_A")) v = static_cast<T>(rng.normal());
    for (auto& v : lora.params().span("lora_B")) v = static_cast<T>(rng.normal());
    auto x = randn<T>(2 * 5, rng);
    std::vector<T> y(2 * 4, T(1));
    lora.forward(MatrixView<T>(y.data(), 2, 4), ConstMatrixView<T>(x.data(), 2, 5));
    for (Index t = 0; t < 2; ++t)
        for (Index o = 0; o < 4; ++o) {
            double ref = 1.0;
            for (Index a = 0; a < 3; ++a) {
                double z = 0;
                for (Index c = 0; c < 5; ++c) z += lora.A()(a, c) * x[static_cast<std::size_t>(t * 5 + c)];
                ref += 2.0 * lora.B()(o, a) * z;  // s = 6 / 3
            }
            CHECK(y[static_cast<std::size_t>(t * 4 + o)] == doctest::Approx(ref).epsilon(1e-5));
        }
}

TEST_CASE("LoraExpert: gradients match finite differences (with and without dropout)") {
    for (double p : {0.0, 0.4}) {
        CAPTURE(p);
        comigs::LoraConfig cfg{6, 5, 3, 4.0, comigs::LoraScaling::sqrt, p};
        comigs::LoraExpert<double> lora(cfg);
        comigs::Rng rng(11);
        for (auto& v : lora.params().span("lora_A")) v = rng.normal();
        for (auto& v : lora.params().span("lora_B")) v = rng.normal();
        const Index n = 4;
        auto x = randn<double>(static_cast<std::size_t>(n * 6), rng);
        auto dy = randn<double>(static_cast<std::size_t>(n * 5), rng);
        auto loss = [&] {
            std::vector<double> y(static_cast<std::size_t>(n * 5), 0.0);
            comigs::Rng mask_rng(77);  // the same mask on every call
            lora.forward(MatrixView<double>(y.data(), n, 5), ConstMatrixView<double>(x.data(), n, 6), true, &mask_rng);
            double s = 0;
            for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
            return s;
        };
        lora.zero_grad();
        loss();
        std::vector<double> dx(x.size(), 0.0);
        lora.backward(MatrixView<double>(dx.data(), n, 6), ConstMatrixView<double>(dy.data(), n, 5));
        for (const char* name : {"lora_A", "lora_B"}) {
            auto g = lora.grads().span(name);
            comigs::test::gradcheck(lora.params().span(name), std::span<const double>(g.data(), g.size()), loss, name);
        }
        comigs::test::gradcheck(std::span<double>(x), std::span<const double>(dx), loss, "x");
        // Dropout actually dropped something and is inverted (kept values scaled by 1/(1-p)).
        if (p > 0) {
            std::vector<double> y1(static_cast<std::size_t>(n * 5), 0.0);
            comigs::Rng r(1);
            std::vector<double> ones(x.size(), 1.0);
            for (auto& v : lora.params().span("lora_B")) v = 0;
            lora.params().span("lora_B")[0] = 1;  // y[:, 0] = s * A[0, :] . dropout(1)
            lora.forward(MatrixView<double>(y1.data(), n, 5), ConstMatrixView<double>(ones.data(), n, 6), true, &r);
            std::vector<double> y0(y1.size(), 0.0);
            lora.forward(MatrixView<double>(y0.data(), n, 5), ConstMatrixView<double>(ones.data(), n, 6), false);
            bool differs = false;
            for (std::size_t i = 0; i < y0.size(); ++i) differs |= std::abs(y0[i] - y1[i]) > 1e-12;
            CHECK(differs);
        }
    }
}

TEST_CASE("LoraExpert: merge then unmerge restores the weight; merged weight equals the adapter") {
    comigs::LoraConfig cfg{7, 3, 2, 16.0};
    comigs::LoraExpert<double> lora(cfg);
    comigs::Rng rng(4);
    lora.init(rng);
    for (auto& v : lora.params().span("lora_B")) v = rng.normal();
    auto W = randn<double>(21, rng);
    const auto W0 = W;
    auto x = randn<double>(7, rng);
    std::vector<double> y_adapter(3, 0.0), y_merged(3, 0.0);
    for (Index o = 0; o < 3; ++o)
        for (Index c = 0; c < 7; ++c) y_adapter[static_cast<std::size_t>(o)] += W[static_cast<std::size_t>(o * 7 + c)] * x[static_cast<std::size_t>(c)];
    lora.forward(MatrixView<double>(y_adapter.data(), 1, 3), ConstMatrixView<double>(x.data(), 1, 7));
    lora.merge_into(MatrixView<double>(W.data(), 3, 7));
    for (Index o = 0; o < 3; ++o)
        for (Index c = 0; c < 7; ++c) y_merged[static_cast<std::size_t>(o)] += W[static_cast<std::size_t>(o * 7 + c)] * x[static_cast<std::size_t>(c)];
    for (Index o = 0; o < 3; ++o) CHECK(y_merged[static_cast<std::size_t>(o)] == doctest::Approx(y_adapter[static_cast<std::size_t>(o)]).epsilon(1e-12));
    lora.unmerge_from(MatrixView<double>(W.data(), 3, 7));
    for (std::size_t i = 0; i < W.size(); ++i) CHECK(W[i] == doctest::Approx(W0[i]).epsilon(1e-12));
    std::vector<double> wrong(20);
    CHECK_THROWS_WITH_AS(lora.merge_into(MatrixView<double>(wrong.data(), 4, 5)), doctest::Contains("[4, 5]"),
                         comigs::ShapeError);
}

TEST_CASE("LoraConfig: bad values are errors naming the value") {
    CHECK_THROWS_WITH_AS(comigs::LoraExpert<float>({4, 4, 0}), doctest::Contains("rank 0"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::LoraExpert<float>({0, 4, 2}), doctest::Contains("in_features 0"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::LoraExpert<float>({4, 4, 2, 16.0, comigs::LoraScaling::sqrt, 1.0}),
                         doctest::Contains("dropout 1"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::LoraExpert<float>({4, 4, 2, INFINITY}), doctest::Contains("alpha inf"),
                         comigs::InvalidArgument);
    comigs::LoraExpert<float> ok({4, 4, 2});
    std::vector<float> x(8), y(6);
    CHECK_THROWS_AS(ok.forward(MatrixView<float>(y.data(), 2, 3), ConstMatrixView<float>(x.data(), 2, 4)), comigs::ShapeError);
    CHECK_THROWS_WITH_AS(ok.forward(MatrixView<float>(y.data(), 2, 4), ConstMatrixView<float>(nullptr, 2, 4)),
                         doctest::Contains("null"), comigs::InvalidArgument);
}

TEST_CASE("LoraExpert: inverted dropout keeps an input element with weight exactly 1/(1-p)") {
    // A[0, :] = 1, B = e_0 and x = 1: y[i, 0] = s * (kept elements of row i) / (1 - p), an integer
    // multiple of s / (1 - p). Without the 1/(1-p) scaling it would be a multiple of s.
    const double p = 0.4;
    const Index n = 200, in = 6;
    comigs::LoraConfig cfg{in, 3, 2, 16.0, comigs::LoraScaling::sqrt, p};
    comigs::LoraExpert<double> lora(cfg);
    for (auto& v : lora.params().span("lora_A")) v = 0;
    for (Index j = 0; j < in; ++j) lora.A()(0, j) = 1;
    for (auto& v : lora.params().span("lora_B")) v = 0;
    lora.B()(0, 0) = 1;
    std::vector<double> ones(static_cast<std::size_t>(n * in), 1.0), y(static_cast<std::size_t>(n * 3), 0.0);
    comigs::Rng rng(3);
    lora.forward(MatrixView<double>(y.data(), n, 3), ConstMatrixView<double>(ones.data(), n, in), true, &rng);
    const double unit = lora.scale() / (1.0 - p);
    double kept = 0;
    bool some_dropped = false;
    for (Index i = 0; i < n; ++i) {
        const double k = y[static_cast<std::size_t>(i * 3)] / unit;
        CHECK(k == doctest::Approx(std::round(k)).epsilon(1e-12).scale(1.0));
        CHECK(k >= -1e-12);
        CHECK(k <= in + 1e-12);
        some_dropped |= std::round(k) < in;
        kept += k;
    }
    CHECK(some_dropped);
    // The kept fraction is about 1 - p (1200 Bernoulli draws: 4 standard deviations is 0.057).
    CHECK(std::abs(kept / static_cast<double>(n * in) - (1.0 - p)) < 0.06);
}

TEST_CASE("LoraExpert: a forward refused for a missing generator leaves the last forward intact") {
    comigs::LoraConfig cfg{4, 3, 2, 16.0, comigs::LoraScaling::sqrt, 0.3};
    comigs::LoraExpert<double> lora(cfg);
    comigs::Rng rng(8);
    lora.init(rng);
    for (auto& v : lora.params().span("lora_B")) v = rng.normal();
    auto x2 = randn<double>(2 * 4, rng), x5 = randn<double>(5 * 4, rng);
    std::vector<double> y2(2 * 3, 0.0), y5(5 * 3, 0.0), dy2(2 * 3, 1.0), dy5(5 * 3, 1.0);
    lora.forward(MatrixView<double>(y2.data(), 2, 3), ConstMatrixView<double>(x2.data(), 2, 4), false);
    lora.zero_grad();
    std::vector<double> dx2(2 * 4, 0.0);
    lora.backward(MatrixView<double>(dx2.data(), 2, 4), ConstMatrixView<double>(dy2.data(), 2, 3));
    const std::vector<double> g(lora.grads().all().begin(), lora.grads().all().end());

    CHECK_THROWS_WITH_AS(
        lora.forward(MatrixView<double>(y5.data(), 5, 3), ConstMatrixView<double>(x5.data(), 5, 4), true, nullptr),
        doctest::Contains("rng"), comigs::InvalidArgument);
    // The 5-row batch was never run: backward refuses it instead of reading past the 2-row state...
    std::vector<double> dx5(5 * 4, 0.0);
    CHECK_THROWS_AS(lora.backward(MatrixView<double>(dx5.data(), 5, 4), ConstMatrixView<double>(dy5.data(), 5, 3)),
                    comigs::ShapeError);
    // ...and the saved 2-row forward still gives exactly its gradients.
    lora.zero_grad();
    std::vector<double> again(2 * 4, 0.0);
    lora.backward(MatrixView<double>(again.data(), 2, 4), ConstMatrixView<double>(dy2.data(), 2, 3));
    CHECK(again == dx2);
    CHECK(std::vector<double>(lora.grads().all().begin(), lora.grads().all().end()) == g);
}
