// kernels/cross_entropy.hpp: the chunked LM head + cross-entropy against its plain reference (odd
// vocabularies, many row blocks and vocabulary chunks with tails, logits large enough that the running
// maximum moves from chunk to chunk), finite differences in double, the bf16 weight path, repeatability
// and errors.
#include <comigs/kernels/cross_entropy.hpp>
#include <comigs/random.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gradcheck.hpp"

namespace head_loss_test {
using namespace comigs;
using comigs::Index;

/// Sets the chunking knobs for the scope of a test.
struct Chunking {
    Index rows, elements, min_cols;
    Chunking(Index r, Index e, Index m)
        : rows(kernels::detail::head_block_rows()),
          elements(kernels::detail::head_chunk_elements()),
          min_cols(kernels::detail::head_min_chunk_cols()) {
        kernels::detail::head_block_rows() = r;
        kernels::detail::head_chunk_elements() = e;
        kernels::detail::head_min_chunk_cols() = m;
    }
    ~Chunking() {
        kernels::detail::head_block_rows() = rows;
        kernels::detail::head_chunk_elements() = elements;
        kernels::detail::head_min_chunk_cols() = min_cols;
    }
};

template <class T>
std::vector<T> randn(std::size_t n, Rng& rng, double std = 1.0) {
    std::vector<T> v(n);
    for (T& x : v) x = T(rng.normal(0.0, std));
    return v;
}

template <class T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
    double m = 0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
    return m;
}

std::vector<int> random_targets(Index n, Index V, Rng& rng) {
    std::vector<int> t(static_cast<std::size_t>(n));
    for (int& x : t) x = static_cast<int>(rng.below(static_cast<std::uint64_t>(V)));
    return t;
}

TEST_CASE_TEMPLATE("kernels::lm_head_cross_entropy equals the plain reference: odd vocabularies, row blocks, "
                   "vocabulary chunks and tails, moving maxima",
                   T, float, double) {
    const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
    struct Case {
        Index N, d, V;
        double x_std;
    };
    // x_std 4: logits of a few tens, so the running maximum changes between chunks and exp underflows
    // for much of each row.
    for (const Case c : {Case{1, 1, 1, 1.0}, Case{5, 7, 97, 1.0}, Case{33, 16, 1031, 4.0}, Case{8, 3, 2, 1.0},
                         Case{19, 24, 300, 4.0}}) {
        for (const auto& knob : {std::array<Index, 3>{1024, Index(1) << 21, 256}, std::array<Index, 3>{4, 64, 1},
                                 std::array<Index, 3>{1, 7, 3}, std::array<Index, 3>{7, 130, 16}}) {
            // Named copies, not a structured binding: clang 14 cannot capture one in CAPTURE's lambda.
            const Index rows = knob[0], elements = knob[1], min_cols = knob[2];
            CAPTURE(c.N);
            CAPTURE(c.d);
            CAPTURE(c.V);
            CAPTURE(rows);
            CAPTURE(elements);
            Chunking knobs(rows, elements, min_cols);
            Rng rng(c.V + 3);
            // x with a padded stride, the weight unaligned (offset by one element).
            const Index sx = c.d + 2;
            const auto xbuf = randn<T>(static_cast<std::size_t>(c.N * sx), rng, c.x_std);
            const auto wbuf = randn<T>(static_cast<std::size_t>(c.V * c.d + 1), rng);
            const ConstMatrixView<T> x(xbuf.data(), c.N, c.d, sx), W(wbuf.data() + 1, c.V, c.d);
            const auto t = random_targets(c.N, c.V, rng);
            const T g = T(1) / T(c.N);
            auto dx0 = randn<T>(static_cast<std::size_t>(c.N * c.d), rng);
            auto dx = dx0, dx_ref = dx0;
            std::vector<T> lse(static_cast<std::size_t>(c.N)), nll(lse.size()), lse_ref(lse.size()), nll_ref(lse.size());
            const double sum = kernels::lm_head_cross_entropy<T, T>({dx.data(), c.N, c.d}, lse.data(), nll.data(), x, W,
                                                                   t.data(), g);
            const double sum_ref = kernels::lm_head_cross_entropy_reference<T, T>(
                {dx_ref.data(), c.N, c.d}, lse_ref.data(), nll_ref.data(), x, W, t.data(), g);
            const double scale = c.x_std * std::sqrt(double(c.d));  // size of a logit
            CHECK(std::abs(sum - sum_ref) < tol * scale * double(c.N));
            CHECK(max_abs_diff(lse, lse_ref) < tol * scale);
            CHECK(max_abs_diff(nll, nll_ref) < tol * scale);
            CHECK(max_abs_diff(dx, dx_ref) < tol * 10);
            if (c.V > 1) CHECK(max_abs_diff(dx, dx0) > 1e-4);  // the gradient was added
            // Without dx: the same losses, nothing else written.
            std::vector<T> lse2(lse.size());
            const double sum2 =
                kernels::lm_head_cross_entropy<T, T>(MatrixView<T>(), lse2.data(), nullptr, x, W, t.data(), g);
            CHECK(sum2 == sum);
            CHECK(lse2 == lse);
        }
    }
}

TEST_CASE("kernels::lm_head_cross_entropy: finite differences of the mean loss in double") {
    Chunking knobs(3, 20, 4);  // several row blocks and chunks
    Rng rng(2);
    const Index N = 7, d = 5, V = 23;
    auto x = randn<double>(static_cast<std::size_t>(N * d), rng, 2.0);
    const auto W = randn<double>(static_cast<std::size_t>(V * d), rng);
    const auto t = random_targets(N, V, rng);
    const auto loss = [&] {
        return kernels::lm_head_cross_entropy<double, double>(MatrixView<double>(), nullptr, nullptr, {x.data(), N, d},
                                                              {W.data(), V, d}, t.data(), 0.0) /
               double(N);
    };
    std::vector<double> dx(x.size(), 0.0);
    kernels::lm_head_cross_entropy<double, double>({dx.data(), N, d}, nullptr, nullptr, {x.data(), N, d},
                                                   {W.data(), V, d}, t.data(), 1.0 / double(N));
    comigs::test::gradcheck(x, dx, loss, "dx");
}

TEST_CASE("kernels::lm_head_cross_entropy: a bf16 weight gives the loss of the bf16-rounded product and a "
          "gradient within bf16 tolerance") {
    Chunking knobs(16, 512, 32);
    Rng rng(4);
    const Index N = 37, d = 48, V = 1000;
    const auto x = randn<float>(static_cast<std::size_t>(N * d), rng);
    const auto Wf = randn<float>(static_cast<std::size_t>(V * d), rng, 0.5);
    std::vector<kernels::bf16> Wb(Wf.size());
    kernels::convert_to_bf16(Wb.data(), Wf.data(), static_cast<Index>(Wf.size()));
    // The reference on the same rounded operands: x rounded to bf16, W widened from bf16.
    std::vector<float> xr(x.size()), Wr(Wf.size());
    for (std::size_t i = 0; i < x.size(); ++i) xr[i] = kernels::to_float(kernels::to_bf16(x[i]));
    kernels::convert_to_float(Wr.data(), Wb.data(), static_cast<Index>(Wr.size()));
    const auto t = random_targets(N, V, rng);
    std::vector<float> dx(x.size(), 0.0f), dx_ref(x.size(), 0.0f), nll(static_cast<std::size_t>(N)), nll_ref(nll.size());
    const double sum = kernels::lm_head_cross_entropy<float, kernels::bf16>(
        {dx.data(), N, d}, nullptr, nll.data(), {x.data(), N, d}, {Wb.data(), V, d}, t.data(), 1.0f / float(N));
    const double sum_ref = kernels::lm_head_cross_entropy_reference<float, float>(
        {dx_ref.data(), N, d}, nullptr, nll_ref.data(), {xr.data(), N, d}, {Wr.data(), V, d}, t.data(), 1.0f / float(N));
    CHECK(std::abs(sum - sum_ref) < 1e-3 * double(N));
    CHECK(max_abs_diff(nll, nll_ref) < 1e-3);
    double dmax = 0;
    for (float v : dx_ref) dmax = std::max(dmax, double(std::abs(v)));
    CHECK(dmax > 1e-3);
    // The probabilities enter the second product in bf16 (8 bits of mantissa).
    CHECK(max_abs_diff(dx, dx_ref) < 2e-2 * dmax);
}

TEST_CASE("kernels::lm_head_cross_entropy: repeatable bit for bit, and exactly invariant to how rows are "
          "blocked when the chunk width stays the same") {
    Rng rng(6);
    const Index N = 50, d = 32, V = 777;
    const auto x = randn<float>(static_cast<std::size_t>(N * d), rng);
    const auto W = randn<float>(static_cast<std::size_t>(V * d), rng);
    const auto t = random_targets(N, V, rng);
    const auto run = [&](Index rows) {
        Chunking knobs(rows, rows * 100, 100);
        std::vector<float> dx(x.size(), 0.0f), lse(static_cast<std::size_t>(N));
        kernels::lm_head_cross_entropy<float, float>({dx.data(), N, d}, lse.data(), nullptr, {x.data(), N, d},
                                                     {W.data(), V, d}, t.data(), 0.02f);
        dx.insert(dx.end(), lse.begin(), lse.end());
        return dx;
    };
    const auto a = run(50);
    CHECK(run(50) == a);
    // Each row's sums run over the same chunks in the same order: blocking the rows changes nothing
    // but which product a row's dot products come from, within rounding.
    CHECK(max_abs_diff(run(7), a) < 1e-5);
}

TEST_CASE("kernels::lm_head_cross_entropy: out-of-range targets and mismatched shapes are named errors") {
    std::vector<float> x(12, 0.5f), W(20, 0.1f), dx(12);
    const auto run = [&](MatrixView<float> d, ConstMatrixView<float> xv, ConstMatrixView<float> wv,
                         const std::vector<int>& t) {
        return kernels::lm_head_cross_entropy<float, float>(d, nullptr, nullptr, xv, wv, t.data(), 1.0f);
    };
    CHECK_THROWS_WITH_AS(run(MatrixView<float>(), {x.data(), 3, 4}, {W.data(), 5, 4}, {0, 4, 5}),
                         doctest::Contains("target[2] = 5"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(run(MatrixView<float>(), {x.data(), 3, 4}, {W.data(), 5, 4}, {0, -1, 2}),
                         doctest::Contains("target[1] = -1"), comigs::InvalidArgument);
    CHECK_THROWS_AS(run(MatrixView<float>(), {x.data(), 3, 4}, {W.data(), 4, 5}, {0, 1, 2}), comigs::ShapeError);
    CHECK_THROWS_AS(run({dx.data(), 4, 3}, {x.data(), 3, 4}, {W.data(), 5, 4}, {0, 1, 2}), comigs::ShapeError);
}

}  // namespace head_loss_test
