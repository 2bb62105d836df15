// Optimised kernels against plain references: odd shapes (1, primes, block sizes +- 1), ranks
// {1, 2, 3, 7, 8, 16, 17}, unaligned pointers, padded strides, small forced tiles/chunks/splits so the
// multi-part and tail paths run on small inputs. Tolerances grow with the reduction length.
#include <comigs/frozen.hpp>
#include <comigs/kernels/activation.hpp>
#include <comigs/kernels/bf16.hpp>
#include <comigs/kernels/elementwise.hpp>
#include <comigs/kernels/fused.hpp>
#include <comigs/kernels/gemm.hpp>
#include <comigs/kernels/gemm_bf16.hpp>
#include <comigs/kernels/lowrank.hpp>
#include <comigs/mixture.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
using namespace comigs;
using comigs::Index;

/// Sets a tuning knob for the scope of a test and restores it.
template <class V>
struct Knob {
    V& ref;
    V saved;
    Knob(V& r, V v) : ref(r), saved(r) { ref = v; }
    ~Knob() { ref = saved; }
};

/// Runs f with the OpenMP thread count set to n (restored after).
template <class F>
void with_threads(int n, F f) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(n);
    f();
    omp_set_num_threads(saved);
#else
    (void)n;
    f();
#endif
}

template <class T>
std::vector<T> randn(std::size_t n, Rng& rng, double std = 1.0) {
    std::vector<T> v(n);
    for (T& x : v) x = static_cast<T>(rng.normal(0.0, std));
    return v;
}

template <class T>
constexpr double eps() {
    return static_cast<double>(std::numeric_limits<T>::epsilon());
}

/// A [rows, cols] matrix inside a buffer with a one-element offset (unaligned) and padded stride.
template <class T>
struct Mat {
    std::vector<T> buf;
    MatrixView<T> v;
    Mat(Index rows, Index cols, Rng& rng, Index pad = 3) {
        const Index stride = cols + pad;
        buf = randn<T>(static_cast<std::size_t>(rows * stride + 1), rng);
        v = MatrixView<T>(buf.data() + 1, rows, cols, stride);
    }
    T operator()(Index i, Index j) const { return v(i, j); }
};

/// Element (i, j) of op(X).
template <class T>
T at(ConstMatrixView<T> X, kernels::Op op, Index i, Index j) {
    return op == kernels::Op::none ? X(i, j) : X(j, i);
}

const Index kSizes[] = {1, 2, 7, 15, 16, 17, 31, 33, 48, 49, 97};
const Index kRanks[] = {1, 2, 3, 7, 8, 16, 17};

}  // namespace

namespace {

/// Every op, beta, odd shape, unaligned and padded operand of kernels::gemm against a double-precision
/// product; returns the number of elements checked. C starts as NaN when beta is 0 (must not be read).
/// chunk > 0 checks kernels::gemm_chunked with that chunk size instead of kernels::gemm.
template <class T>
int check_gemm_against_reference(Rng& rng, Index chunk = 0) {
    Knob<Index> q(kernels::detail::gemm_split_quantum(), 1);
    Knob<Index> pmin(kernels::detail::gemm_parallel_min(), 0);
    int checked = 0;
    for (Index m : {Index(1), Index(7), Index(17), Index(49)})
        for (Index n : {Index(1), Index(16), Index(33)})
            for (Index k : {Index(1), Index(15), Index(97)})
                for (auto opa : {kernels::Op::none, kernels::Op::trans})
                    for (auto opb : {kernels::Op::none, kernels::Op::trans})
                        for (T beta : {T(0), T(1)}) {
                            Mat<T> A(opa == kernels::Op::none ? m : k, opa == kernels::Op::none ? k : m, rng);
                            Mat<T> B(opb == kernels::Op::none ? k : n, opb == kernels::Op::none ? n : k, rng);
                            Mat<T> C(m, n, rng, 2);
                            if (beta == T(0))
                                for (Index i = 0; i < m; ++i)
                                    for (Index j = 0; j < n; ++j)
                                        C.buf[static_cast<std::size_t>(1 + i * (n + 2) + j)] =
                                            std::numeric_limits<T>::quiet_NaN();
                            const Mat<T> C0 = C;
                            const T alpha = T(0.75);
                            MatrixView<T> Cv(C.buf.data() + 1, m, n, n + 2);
                            if (chunk > 0)
                                kernels::gemm_chunked<T>(Cv, ConstMatrixView<T>(A.v), opa, ConstMatrixView<T>(B.v), opb,
                                                         alpha, beta, chunk);
                            else
                                kernels::gemm<T>(Cv, ConstMatrixView<T>(A.v), opa, ConstMatrixView<T>(B.v), opb, alpha,
                                                 beta);
                            for (Index i = 0; i < m; ++i)
                                for (Index j = 0; j < n; ++j) {
                                    double ref = 0, mag = 0;
                                    for (Index p = 0; p < k; ++p) {
                                        const double a = at<T>(A.v, opa, i, p), b = at<T>(B.v, opb, p, j);
                                        ref += a * b;
                                        mag += std::abs(a * b);
                                    }
                                    const double c0 = beta == T(1) ? double(C0.buf[static_cast<std::size_t>(1 + i * (n + 2) + j)]) : 0.0;
                                    ref = alpha * ref + c0;
                                    const double tol = (double(k) + 2) * eps<T>() * (mag + std::abs(c0)) + 1e-300;
                                    REQUIRE(std::abs(double(Cv(i, j)) - ref) <= tol);
                                    ++checked;
                                }
                            // Padding between rows untouched.
                            if (m > 1) CHECK(C.buf[static_cast<std::size_t>(1 + n)] == C0.buf[static_cast<std::size_t>(1 + n)]);
                        }
    return checked;
}

}  // namespace

TEST_CASE_TEMPLATE("kernels::gemm: split products equal the plain reference on odd shapes and ops", T, float, double) {
    Rng rng(1);
    CHECK(check_gemm_against_reference<T>(rng) > 10000);
}

#ifdef COMIGS_HAVE_ONEDNN
TEST_CASE("kernels::gemm: the oneDNN sgemm path equals the plain reference on odd shapes and ops") {
    Knob<Index> all(kernels::detail::gemm_onednn_min(), 0);  // every fp32 product through oneDNN
    Rng rng(4);
    CHECK(check_gemm_against_reference<float>(rng) > 10000);
}
#endif

TEST_CASE_TEMPLATE("kernels::gemm_chunked: equals the plain reference on odd shapes and ops, any chunk size", T, float,
                   double) {
    Rng rng(6);
    for (Index chunk : {Index(1), Index(5), Index(16), Index(128)}) {
        CAPTURE(chunk);
        CHECK(check_gemm_against_reference<T>(rng, chunk) > 10000);
    }
#ifdef COMIGS_HAVE_ONEDNN
    if constexpr (std::is_same_v<T, float>) {
        Knob<Index> small(kernels::detail::gemm_onednn_small_min(), 0);  // every chunk through oneDNN
        for (Index chunk : {Index(1), Index(16)}) CHECK(check_gemm_against_reference<T>(rng, chunk) > 10000);
    }
#endif
}

TEST_CASE("kernels::gemm_chunked: bitwise identical for 1, 2 and 3 threads (either side split, both backends)") {
    Knob<Index> pmin(kernels::detail::gemm_parallel_min(), 0);
    for (Index small_min : {kernels::detail::gemm_onednn_small_min(), Index(0)})
        for (const auto& shape : {std::array<Index, 3>{301, 36, 97}, std::array<Index, 3>{36, 301, 211}}) {
            const Index m = shape[0], n = shape[1], k = shape[2];  // no structured binding: clang 14 cannot capture one
            CAPTURE(small_min);
            CAPTURE(m);
            Knob<Index> backend(kernels::detail::gemm_onednn_small_min(), small_min);
            Rng rng(12);
            auto A = randn<float>(static_cast<std::size_t>(m * k), rng), B = randn<float>(static_cast<std::size_t>(k * n), rng);
            auto run = [&](int threads) {
                std::vector<float> C(static_cast<std::size_t>(m * n), 1.0f);
                with_threads(threads, [&] {
                    kernels::gemm_chunked<float>(MatrixView<float>(C.data(), m, n), ConstMatrixView<float>(A.data(), k, m),
                                                 kernels::Op::trans, ConstMatrixView<float>(B.data(), k, n),
                                                 kernels::Op::none, 1.0f, 1.0f, 32);
                });
                return C;
            };
            const auto one = run(1);
            CHECK(run(2) == one);
            CHECK(run(3) == one);
            CHECK(run(2) == one);
        }
}

TEST_CASE("kernels::gemm_chunked: a batch of products equals each product alone, bitwise, for 1 and 2 threads") {
    Knob<Index> pmin(kernels::detail::gemm_parallel_min(), 0);
    for (Index small_min : {kernels::detail::gemm_onednn_small_min(), Index(0)}) {
        CAPTURE(small_min);
        Knob<Index> backend(kernels::detail::gemm_onednn_small_min(), small_min);
        Rng rng(13);
        const Index n = 203, d = 77, c = 19;
        const auto D = randn<float>(static_cast<std::size_t>(n * c), rng), X = randn<float>(static_cast<std::size_t>(n * d), rng);
        const auto W = randn<float>(static_cast<std::size_t>(c * d), rng), Y0 = randn<float>(static_cast<std::size_t>(n * d), rng);
        const ConstMatrixView<float> Dv(D.data(), n, c), Xv(X.data(), n, d), Wv(W.data(), c, d);
        auto alone = [&] {
            std::vector<float> G(static_cast<std::size_t>(c * d)), Y(Y0);
            kernels::gemm_chunked<float>(MatrixView<float>(G.data(), c, d), Dv, kernels::Op::trans, Xv, kernels::Op::none,
                                         1.0f, 0.0f, 16);
            kernels::gemm_chunked<float>(MatrixView<float>(Y.data(), n, d), Dv, kernels::Op::none, Wv, kernels::Op::none,
                                         1.0f, 1.0f, 16);
            G.insert(G.end(), Y.begin(), Y.end());
            return G;
        };
        auto batch = [&](int threads) {
            std::vector<float> G(static_cast<std::size_t>(c * d)), Y(Y0);
            with_threads(threads, [&] {
                using P = kernels::GemmProduct<float>;
                kernels::gemm_chunked<float>({P{MatrixView<float>(G.data(), c, d), Dv, kernels::Op::trans, Xv, kernels::Op::none},
                                              P{MatrixView<float>(Y.data(), n, d), Dv, kernels::Op::none, Wv, kernels::Op::none,
                                                1.0f, 1.0f}},
                                             16);
            });
            G.insert(G.end(), Y.begin(), Y.end());
            return G;
        };
        const auto ref = alone();
        CHECK(batch(1) == ref);
        CHECK(batch(2) == ref);
        CHECK(batch(3) == ref);
        // and against the plain double product
        double worst = 0;
        for (Index i = 0; i < c; ++i)
            for (Index j = 0; j < d; ++j) {
                double sum = 0;
                for (Index t = 0; t < n; ++t) sum += double(D[static_cast<std::size_t>(t * c + i)]) * X[static_cast<std::size_t>(t * d + j)];
                worst = std::max(worst, std::abs(sum - ref[static_cast<std::size_t>(i * d + j)]));
            }
        CHECK(worst < 1e-3);
    }
}

TEST_CASE("kernels::gemm_chunked_and: the side work runs once per index beside the products, any thread count") {
    Knob<Index> pmin(kernels::detail::gemm_parallel_min(), 0);
    Rng rng(29);
    const Index n = 150, d = 33, c = 7, side = 1000;
    const auto X = randn<float>(static_cast<std::size_t>(n * d), rng), W = randn<float>(static_cast<std::size_t>(c * d), rng);
    std::vector<float> ref(static_cast<std::size_t>(n * c));
    kernels::gemm_chunked<float>(MatrixView<float>(ref.data(), n, c), ConstMatrixView<float>(X.data(), n, d), kernels::Op::none,
                                 ConstMatrixView<float>(W.data(), c, d), kernels::Op::trans, 1.0f, 0.0f, 16);
    for (int threads : {1, 2, 3}) {
        CAPTURE(threads);
        std::vector<float> Y(static_cast<std::size_t>(n * c), -1.0f);
        std::vector<int> hits(static_cast<std::size_t>(side), 0);
        with_threads(threads, [&] {
            kernels::gemm_chunked_and<float>({{MatrixView<float>(Y.data(), n, c), ConstMatrixView<float>(X.data(), n, d),
                                               kernels::Op::none, ConstMatrixView<float>(W.data(), c, d), kernels::Op::trans}},
                                             side, 100000, [&](Index i) { ++hits[static_cast<std::size_t>(i)]; }, 16);
        });
        CHECK(Y == ref);
        CHECK(std::count(hits.begin(), hits.end(), 1) == side);
    }
}

TEST_CASE("kernels::gemm_with: base, products after it on its rows, independent products and side work") {
    Knob<Index> pmin(kernels::detail::gemm_parallel_min(), 0);
    using P = kernels::GemmProduct<float>;
    // (m, nb): rows split with 16-row chunks, a row count off the chunk grid, and columns split (the
    // products after the base then run after the region).
    for (const auto& shape : {std::array<Index, 2>{150, 40}, std::array<Index, 2>{67, 13}, std::array<Index, 2>{20, 90}}) {
        const Index m = shape[0], nb = shape[1];  // not a structured binding: clang 14 cannot capture one
        CAPTURE(m);
        CAPTURE(nb);
        Rng rng(31);
        const Index k = 37, c = 5, side = 300;
        // one float of offset: unaligned data
        const auto A = randn<float>(static_cast<std::size_t>(m * k + 1), rng), W = randn<float>(static_cast<std::size_t>(nb * k + 1), rng);
        const auto Z = randn<float>(static_cast<std::size_t>(m * c + 1), rng), V = randn<float>(static_cast<std::size_t>(c * nb + 1), rng);
        const ConstMatrixView<float> Av(A.data() + 1, m, k), Wv(W.data() + 1, nb, k), Zv(Z.data() + 1, m, c), Vv(V.data() + 1, c, nb);
        // plain double reference of C = A W^T + Z V
        std::vector<double> ref(static_cast<std::size_t>(m * nb));
        for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < nb; ++j) {
                double sum = 0;
                for (Index t = 0; t < k; ++t) sum += double(Av(i, t)) * Wv(j, t);
                for (Index t = 0; t < c; ++t) sum += double(Zv(i, t)) * Vv(t, j);
                ref[static_cast<std::size_t>(i * nb + j)] = sum;
            }
        // the independent products alone: G = Z^T A and H = Z V (thread-count independent)
        std::vector<float> G0(static_cast<std::size_t>(c * k)), H0(static_cast<std::size_t>(m * nb));
        kernels::gemm_chunked<float>({P{MatrixView<float>(G0.data(), c, k), Zv, kernels::Op::trans, Av, kernels::Op::none},
                                      P{MatrixView<float>(H0.data(), m, nb), Zv, kernels::Op::none, Vv, kernels::Op::none}},
                                     16);
        for (int threads : {1, 2, 3}) {
            CAPTURE(threads);
            const auto run = [&](std::vector<int>& hits) {
                std::vector<float> C(static_cast<std::size_t>(m * nb + 1), -7.0f), G(G0.size(), -7.0f), H(H0.size(), -7.0f);
                const MatrixView<float> Cv(C.data() + 1, m, nb);
                with_threads(threads, [&] {
                    kernels::gemm_with<float>({Cv, Av, kernels::Op::none, Wv, kernels::Op::trans},
                                              {P{Cv, Zv, kernels::Op::none, Vv, kernels::Op::none, 1.0f, 1.0f}},
                                              {P{MatrixView<float>(G.data(), c, k), Zv, kernels::Op::trans, Av, kernels::Op::none},
                                               P{MatrixView<float>(H.data(), m, nb), Zv, kernels::Op::none, Vv, kernels::Op::none}},
                                              side, 100000, [&](Index i) { ++hits[static_cast<std::size_t>(i)]; }, 16);
                });
                C.erase(C.begin());
                CHECK(G == G0);
                CHECK(H == H0);
                return C;
            };
            std::vector<int> hits(static_cast<std::size_t>(side), 0);
            const auto C = run(hits);
            CHECK(std::count(hits.begin(), hits.end(), 1) == side);
            double worst = 0;
            for (std::size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::abs(ref[i] - C[i]));
            CHECK(worst < 1e-4);
            std::vector<int> again(static_cast<std::size_t>(side), 0);
            CHECK(run(again) == C);  // identical run after run
        }
    }
}

TEST_CASE("kernels::gemm_with: a product after the base must write the base's C") {
    std::vector<float> A(6, 1.0f), C(4), D(4);
    const ConstMatrixView<float> Av(A.data(), 2, 3);
    using P = kernels::GemmProduct<float>;
    CHECK_THROWS_AS(kernels::gemm_with<float>({MatrixView<float>(C.data(), 2, 2), Av, kernels::Op::none, Av, kernels::Op::trans},
                                              {P{MatrixView<float>(D.data(), 2, 2), Av, kernels::Op::none, Av, kernels::Op::trans}},
                                              {}, 0, 0, [](Index) {}),
                    ShapeError);
}

TEST_CASE("kernels::detail::GroupQueue: every unit handed out once, owners from the front, thieves from the back") {
    using kernels::detail::GroupQueue;
    SUBCASE("one thread drains every slot: its own in order, then the others' from their ends") {
        GroupQueue q(7, 3);  // slots [0,2) [2,4) [4,7)
        std::vector<Index> got;
        for (Index u = q.next(0); u >= 0; u = q.next(0)) got.push_back(u);
        CHECK(got == std::vector<Index>{0, 1, 3, 2, 6, 5, 4});
        CHECK(q.next(1) == -1);
        CHECK(q.next(2) == -1);
    }
    SUBCASE("more slots than units, and a thread id past the slots") {
        GroupQueue q(2, 4);
        CHECK(q.next(3) == 1);
        CHECK(q.next(7) == 0);
        CHECK(q.next(0) == -1);
    }
#ifdef _OPENMP
    SUBCASE("threads taking concurrently") {
        for (int threads : {2, 3, 4}) {
            CAPTURE(threads);
            const Index units = 1000;
            GroupQueue q(units, threads);
            std::vector<std::atomic<int>> seen(static_cast<std::size_t>(units));
            for (auto& s : seen) s.store(0);
#pragma omp parallel num_threads(threads)
            {
                const Index tid = omp_get_thread_num();
                for (Index u = q.next(tid); u >= 0; u = q.next(tid)) seen[static_cast<std::size_t>(u)].fetch_add(1);
            }
            CHECK(std::all_of(seen.begin(), seen.end(), [](const std::atomic<int>& s) { return s.load() == 1; }));
        }
    }
#endif
}

TEST_CASE("kernels::gemm: identical results for a fixed thread count, run after run") {
    Knob<Index> pmin(kernels::detail::gemm_parallel_min(), 0);
    for (Index onednn_min : {kernels::detail::gemm_onednn_min(), Index(0)}) {
        Knob<Index> backend(kernels::detail::gemm_onednn_min(), onednn_min);
        Rng rng(2);
        const Index m = 67, n = 45, k = 301;
        auto A = randn<float>(static_cast<std::size_t>(m * k), rng), B = randn<float>(static_cast<std::size_t>(k * n), rng);
        std::vector<float> C1(static_cast<std::size_t>(m * n)), C2(C1.size());
        kernels::gemm<float>(MatrixView<float>(C1.data(), m, n), ConstMatrixView<float>(A.data(), m, k),
                             kernels::Op::none, ConstMatrixView<float>(B.data(), k, n), kernels::Op::none);
        for (int run = 0; run < 3; ++run) {
            kernels::gemm<float>(MatrixView<float>(C2.data(), m, n), ConstMatrixView<float>(A.data(), m, k),
                                 kernels::Op::none, ConstMatrixView<float>(B.data(), k, n), kernels::Op::none);
            CHECK(std::memcmp(C1.data(), C2.data(), C1.size() * sizeof(float)) == 0);
        }
    }
}

TEST_CASE("bf16 conversion: round to nearest even, tails, NaN and infinities") {
    using kernels::bf16;
    CHECK(kernels::to_bf16(1.0f).bits == 0x3f80);
    CHECK(kernels::to_float(kernels::to_bf16(1.0f)) == 1.0f);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0); 1 + 3 * 2^-8 rounds up.
    CHECK(kernels::to_float(kernels::to_bf16(1.0f + 0x1p-8f)) == 1.0f);
    CHECK(kernels::to_float(kernels::to_bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);
    CHECK(std::isnan(kernels::to_float(kernels::to_bf16(std::numeric_limits<float>::quiet_NaN()))));
    CHECK(std::isinf(kernels::to_float(kernels::to_bf16(std::numeric_limits<float>::infinity()))));
    Rng rng(3);
    for (Index n : {0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000}) {
        auto x = randn<float>(static_cast<std::size_t>(n + 1), rng, 3.0);
        std::vector<bf16> b(static_cast<std::size_t>(n + 1));
        kernels::convert_to_bf16(b.data() + 1, x.data() + 1, n);  // unaligned both sides
        std::vector<float> back(static_cast<std::size_t>(n + 1));
        kernels::convert_to_float(back.data() + 1, b.data() + 1, n);
        for (Index i = 1; i <= n; ++i) {
            REQUIRE(b[static_cast<std::size_t>(i)].bits == kernels::to_bf16(x[static_cast<std::size_t>(i)]).bits);
            REQUIRE(std::abs(back[static_cast<std::size_t>(i)] - x[static_cast<std::size_t>(i)]) <=
                    0x1p-8f * std::abs(x[static_cast<std::size_t>(i)]));
        }
    }
}

namespace {
/// C = A op(W) with bf16-rounded A and W, in double: the exact product gemm_bf16 approximates.
double bf16_ref(const std::vector<float>& A, Index k, const std::vector<kernels::bf16>& W, Index wstride,
                kernels::Op op, Index i, Index j, double* mag) {
    double s = 0;
    *mag = 0;
    for (Index p = 0; p < k; ++p) {
        const double a = kernels::to_float(kernels::to_bf16(A[static_cast<std::size_t>(i * k + p)]));
        const double w = kernels::to_float(op == kernels::Op::trans ? W[static_cast<std::size_t>(1 + j * wstride + p)]
                                                                    : W[static_cast<std::size_t>(1 + p * wstride + j)]);
        s += a * w;
        *mag += std::abs(a * w);
    }
    return s;
}
}  // namespace

TEST_CASE("kernels::gemm_bf16: every backend matches the bf16-rounded product; within bf16 tolerance of fp32") {
    Knob<Index> panel(kernels::detail::bf16_fallback_panel(), 5);
    Rng rng(4);
    for (bool force_fallback : {false, true}) {
        Knob<bool> force(kernels::detail::force_bf16_fallback(), force_fallback);
        CAPTURE(kernels::to_string(kernels::bf16_backend()));
        for (Index m : {Index(1), Index(3), Index(17), Index(64)})
            for (Index n : {Index(1), Index(13), Index(33)})
                for (Index k : {Index(1), Index(31), Index(32), Index(97), Index(768)})
                    for (auto op : {kernels::Op::none, kernels::Op::trans})
                        for (float beta : {0.0f, 1.0f}) {
                            auto A = randn<float>(static_cast<std::size_t>(m * k), rng);
                            const Index wr = op == kernels::Op::trans ? n : k, wc = op == kernels::Op::trans ? k : n;
                            const Index ws = wc + 2;  // padded stride, unaligned start
                            auto Wf = randn<float>(static_cast<std::size_t>(wr * ws + 1), rng, 0.1);
                            std::vector<kernels::bf16> W(Wf.size());
                            kernels::convert_to_bf16(W.data(), Wf.data(), static_cast<Index>(Wf.size()));
                            auto C = randn<float>(static_cast<std::size_t>(m * n), rng);
                            const auto C0 = C;
                            kernels::gemm_bf16(MatrixView<float>(C.data(), m, n), ConstMatrixView<float>(A.data(), m, k),
                                               ConstMatrixView<kernels::bf16>(W.data() + 1, wr, wc, ws), op, 0.5f, beta);
                            for (Index i = 0; i < m; ++i)
                                for (Index j = 0; j < n; ++j) {
                                    double mag = 0;
                                    const double prod = bf16_ref(A, k, W, ws, op, i, j, &mag);
                                    const double c0 = beta == 1.0f ? C0[static_cast<std::size_t>(i * n + j)] : 0.0;
                                    const double got = C[static_cast<std::size_t>(i * n + j)];
                                    // Same rounded inputs: only fp32 accumulation order differs.
                                    REQUIRE(std::abs(got - (0.5 * prod + c0)) <=
                                            (double(k) + 2) * eps<float>() * (0.5 * mag + std::abs(c0)) + 1e-30);
                                    // Against the unrounded fp32 inputs: bf16 rounding of both operands.
                                    double exact = 0, emag = 0;
                                    for (Index p = 0; p < k; ++p) {
                                        const double a = A[static_cast<std::size_t>(i * k + p)];
                                        const double w = op == kernels::Op::trans ? Wf[static_cast<std::size_t>(1 + j * ws + p)]
                                                                                  : Wf[static_cast<std::size_t>(1 + p * ws + j)];
                                        exact += a * w;
                                        emag += std::abs(a * w);
                                    }
                                    REQUIRE(std::abs(got - (0.5 * exact + c0)) <=
                                            (2.01 * 0x1p-8 + double(k) * eps<float>()) * (0.5 * emag + std::abs(c0)) + 1e-30);
                                }
                        }
    }
}

TEST_CASE("kernels::gemm_bf16_widened: fp32 arithmetic on the exact bf16 values, activations not rounded") {
    Knob<Index> panel(kernels::detail::bf16_widen_panel_elements(), 150);  // a few columns per panel, with tails
    Rng rng(14);
    for (Index m : {Index(1), Index(7), Index(40)})
        for (Index n : {Index(1), Index(13), Index(33)})
            for (Index k : {Index(1), Index(31), Index(97)})
                for (auto op : {kernels::Op::none, kernels::Op::trans})
                    for (float beta : {0.0f, 1.0f}) {
                        auto A = randn<float>(static_cast<std::size_t>(m * k), rng);
                        const Index wr = op == kernels::Op::trans ? n : k, wc = op == kernels::Op::trans ? k : n;
                        const Index ws = wc + 3;
                        auto Wf = randn<float>(static_cast<std::size_t>(wr * ws + 1), rng, 0.1);
                        std::vector<kernels::bf16> W(Wf.size());
                        kernels::convert_to_bf16(W.data(), Wf.data(), static_cast<Index>(Wf.size()));
                        auto C = randn<float>(static_cast<std::size_t>(m * n), rng);
                        const auto C0 = C;
                        kernels::gemm_bf16_widened(MatrixView<float>(C.data(), m, n), ConstMatrixView<float>(A.data(), m, k),
                                                   ConstMatrixView<kernels::bf16>(W.data() + 1, wr, wc, ws), op, 0.5f, beta);
                        double worst = 0;
                        for (Index i = 0; i < m; ++i)
                            for (Index j = 0; j < n; ++j) {
                                double s = 0, mag = 0;
                                for (Index p = 0; p < k; ++p) {
                                    const double a = A[static_cast<std::size_t>(i * k + p)];  // not rounded
                                    const std::size_t wi = static_cast<std::size_t>(
                                        1 + (op == kernels::Op::trans ? j * ws + p : p * ws + j));
                                    const double w = kernels::to_float(W[wi]);
                                    s += a * w;
                                    mag += std::abs(a * w);
                                }
                                const double c0 = beta == 1.0f ? C0[static_cast<std::size_t>(i * n + j)] : 0.0;
                                const double err = std::abs(C[static_cast<std::size_t>(i * n + j)] - (0.5 * s + c0));
                                // Only fp32 accumulation: far inside the bf16 rounding of the activations
                                // (2^-8 relative) that gemm_bf16 would add.
                                REQUIRE(err <= (double(k) + 2) * eps<float>() * (0.5 * mag + std::abs(c0)) + 1e-30);
                                worst = std::max(worst, err);
                            }
                        CHECK(worst < 1e-3);
                    }
    CHECK_THROWS_AS(kernels::gemm_bf16_widened(MatrixView<float>(), ConstMatrixView<float>(nullptr, 0, 3),
                                               ConstMatrixView<kernels::bf16>(nullptr, 0, 4), kernels::Op::trans),
                    ShapeError);
}

TEST_CASE_TEMPLATE("elementwise kernels equal the scalar activation formulas on odd lengths and offsets", T, float,
                   double) {
    const double tol = std::is_same_v<T, float> ? 2e-6 : 1e-13;
    Rng rng(5);
    for (Index n : {1, 3, 7, 8, 9, 15, 16, 17, 33, 1001}) {
        auto x = randn<T>(static_cast<std::size_t>(n + 1), rng, 3.0);
        auto g = randn<T>(x.size(), rng);
        auto v = randn<T>(x.size(), rng);
        std::vector<T> out(x.size());
        kernels::gelu_forward(out.data() + 1, x.data() + 1, n);
        for (Index i = 1; i <= n; ++i) {
            const double ref = kernels::gelu_tanh(static_cast<double>(x[static_cast<std::size_t>(i)]));
            REQUIRE(std::abs(out[static_cast<std::size_t>(i)] - ref) <= tol * (1 + std::abs(ref)));
        }
        kernels::gelu_backward(out.data() + 1, g.data() + 1, x.data() + 1, n);
        for (Index i = 1; i <= n; ++i) {
            const auto si = static_cast<std::size_t>(i);
            const double ref = double(g[si]) * kernels::gelu_tanh_grad(static_cast<double>(x[si]));
            REQUIRE(std::abs(out[si] - ref) <= tol * (1 + std::abs(ref)));
        }
        kernels::swiglu_forward_row(out.data() + 1, x.data() + 1, v.data() + 1, n);
        for (Index i = 1; i <= n; ++i) {
            const auto si = static_cast<std::size_t>(i);
            const double fwd = kernels::silu(static_cast<double>(x[si])) * double(v[si]);
            REQUIRE(std::abs(out[si] - fwd) <= tol * (1 + std::abs(fwd)));
        }
        // Backward with separate buffers: da, gate pre-activation a, up pre-activation b.
        auto da = randn<T>(x.size(), rng);
        std::vector<T> dg(x.size()), du(x.size());
        kernels::swiglu_backward_row(dg.data() + 1, du.data() + 1, da.data() + 1, x.data() + 1, v.data() + 1, n);
        for (Index i = 1; i <= n; ++i) {
            const auto si = static_cast<std::size_t>(i);
            const double a = static_cast<double>(x[si]), b = static_cast<double>(v[si]), d = static_cast<double>(da[si]);
            const double rg = d * b * kernels::silu_grad(a), ru = d * kernels::silu(a);
            REQUIRE(std::abs(dg[si] - rg) <= tol * (1 + std::abs(rg)));
            REQUIRE(std::abs(du[si] - ru) <= tol * (1 + std::abs(ru)));
        }
    }
    // Extremes stay finite and exact where the formulas saturate.
    const T big[] = {T(-80), T(-20), T(0), T(20), T(80)};
    T o[5];
    kernels::gelu_forward(o, big, 5);
    CHECK(o[0] == T(0));
    CHECK(o[2] == T(0));
    CHECK(o[4] == T(80));
    kernels::gelu_backward(o, std::vector<T>(5, T(1)).data(), big, 5);
    for (T val : o) CHECK(std::isfinite(val));
}

TEST_CASE("simd::batch: the widest vectors of the target (NEON on aarch64)") {
    // xsimd falls back to scalar batches when it sees no vector unit; the aarch64 run under qemu checks
    // that the kernels were compiled for NEON (tools/test-aarch64.sh).
    const std::string arch = kernels::simd::batch<float>::arch_type::name();
    CAPTURE(arch);
#if defined(__aarch64__)
    CHECK(arch == "arm64+neon");
    CHECK(kernels::simd::width<float> == 4);
    CHECK(kernels::simd::width<double> == 2);
#elif defined(__AVX512F__)
    CHECK(kernels::simd::width<float> == 16);
#elif defined(__AVX__)
    CHECK(kernels::simd::width<float> == 8);
#elif defined(__x86_64__)
    CHECK(kernels::simd::width<float> == 4);
#endif
    CHECK(kernels::simd::width<float> == 2 * kernels::simd::width<double>);
}

TEST_CASE_TEMPLATE("simd::exp: saturates like std::exp far outside the range, keeps NaN (no UB under UBSan)", T, float,
                   double) {
    constexpr auto W = kernels::simd::width<T>;
    const T inf = std::numeric_limits<T>::infinity();
    const T nan = std::numeric_limits<T>::quiet_NaN();
    const T xs[] = {T(-1e30), -inf, T(-800), T(-90), T(-1), T(0), T(0.5), T(2), T(80), T(90), T(800), T(1e30), inf, nan};
    for (T x : xs) {
        std::vector<T> lanes(W, T(0));
        lanes[W - 1] = x;  // the odd lane out next to ordinary ones
        std::vector<T> out(W);
        kernels::simd::store(out.data(), kernels::simd::exp(kernels::simd::load(lanes.data())));
        CAPTURE(x);
        CHECK(out[0] == T(1));
        const T ref = std::exp(x);
        if (std::isnan(x)) {
            CHECK(std::isnan(out[W - 1]));
        } else if (ref == T(0) || std::isinf(ref)) {
            CHECK(out[W - 1] == ref);
        } else {
            // Below minlog xsimd returns 0 where std::exp still has a subnormal.
            CHECK(std::abs(out[W - 1] - ref) <=
                  T(4) * std::numeric_limits<T>::epsilon() * ref + std::numeric_limits<T>::min());
        }
    }
    // The activations on values an x1e6 attacker or a diverged run produces.
    const T extreme[] = {T(-1e30), T(-3e12), T(-1e6), T(1e6), T(3e12), T(1e30), nan};
    T o[7];
    kernels::gelu_forward(o, extreme, 7);
    CHECK(o[0] == T(0));
    CHECK(o[2] == T(0));
    CHECK(o[3] == T(1e6));
    CHECK(o[5] == T(1e30));
    CHECK(std::isnan(o[6]));
    kernels::swiglu_forward_row(o, extreme, std::vector<T>(7, T(1)).data(), 7);
    CHECK(o[0] == T(0));
    CHECK(o[3] == T(1e6));
    CHECK(std::isnan(o[6]));
}

TEST_CASE_TEMPLATE("kernels::max_of: std::max_element's value on every length, offset and position, infinities", T, float,
                   double) {
    std::vector<T> x(80);
    for (Index n = 1; n <= 70; ++n) {
        for (Index off : {Index(0), Index(3)}) {
            for (Index at = 0; at < n; at += (n > 20 ? 7 : 1)) {
                for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(-1000.0 + 0.5 * static_cast<double>(i % 13));
                x[static_cast<std::size_t>(off + at)] = static_cast<T>(7.25);
                REQUIRE(kernels::max_of(x.data() + off, n) == *std::max_element(x.begin() + off, x.begin() + off + n));
                x[static_cast<std::size_t>(off + at)] = std::numeric_limits<T>::infinity();
                CHECK(kernels::max_of(x.data() + off, n) == std::numeric_limits<T>::infinity());
            }
            std::fill(x.begin(), x.end(), -std::numeric_limits<T>::infinity());
            CHECK(kernels::max_of(x.data() + off, n) == -std::numeric_limits<T>::infinity());
        }
    }
}

TEST_CASE("elementwise kernels: results identical whatever the chunk size and thread count") {
    Rng rng(6);
    const Index n = 200003;
    auto x = randn<float>(static_cast<std::size_t>(n), rng, 2.0);
    std::vector<float> ref(x.size()), got(x.size());
    kernels::gelu_forward(ref.data(), x.data(), n);
    for (Index chunk : {Index(1), Index(5), Index(16), Index(1023)}) {
        Knob<Index> c(kernels::detail::elementwise_chunk(), chunk);
        for (int threads : {1, 2, 3}) {
            with_threads(threads, [&] { kernels::gelu_forward(got.data(), x.data(), n); });
            REQUIRE(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)) == 0);
        }
    }
}

TEST_CASE_TEMPLATE("lowrank kernels equal plain loops for ranks 1..17, odd widths, offsets and gathers", T, float,
                   double) {
    Rng rng(7);
    for (Index r : kRanks)
        for (Index h : kSizes) {
            const auto V = randn<T>(static_cast<std::size_t>(r * h + 1), rng);
            const T* v = V.data() + 1;
            auto coef = randn<T>(static_cast<std::size_t>(r), rng);
            auto y0 = randn<T>(static_cast<std::size_t>(h + 1), rng);
            auto x = randn<T>(y0.size(), rng);
            // lowrank_accumulate / lowrank_add
            auto y = y0;
            kernels::lowrank_accumulate(y.data() + 1, coef.data(), v, r, h, T(0.5));
            std::vector<T> z(y0.size());
            kernels::lowrank_add(z.data() + 1, x.data() + 1, coef.data(), v, r, h, T(0.5));
            for (Index c = 0; c < h; ++c) {
                double s = 0, mag = 0;
                for (Index q = 0; q < r; ++q) {
                    s += double(coef[static_cast<std::size_t>(q)]) * v[q * h + c];
                    mag += std::abs(double(coef[static_cast<std::size_t>(q)]) * v[q * h + c]);
                }
                const auto sc = static_cast<std::size_t>(c + 1);
                REQUIRE(std::abs(y[sc] - (y0[sc] + 0.5 * s)) <= (r + 2) * eps<T>() * (std::abs(y0[sc]) + mag));
                REQUIRE(std::abs(z[sc] - (x[sc] + 0.5 * s)) <= (r + 2) * eps<T>() * (std::abs(x[sc]) + mag));
            }
            // lowrank_project
            std::vector<T> out(static_cast<std::size_t>(r));
            kernels::lowrank_project(out.data(), v, x.data() + 1, r, h, T(2));
            for (Index q = 0; q < r; ++q) {
                double s = 0, mag = 0;
                for (Index c = 0; c < h; ++c) {
                    s += double(v[q * h + c]) * x[static_cast<std::size_t>(c + 1)];
                    mag += std::abs(double(v[q * h + c]) * x[static_cast<std::size_t>(c + 1)]);
                }
                REQUIRE(std::abs(out[static_cast<std::size_t>(q)] - 2 * s) <= 2 * (h + 2) * eps<T>() * mag);
            }
        }
}

TEST_CASE_TEMPLATE("lowrank_outer: gradient outer products equal plain loops; thread count does not matter", T, float,
                   double) {
    Rng rng(8);
    for (Index r : kRanks)
        for (Index cols : {Index(1), Index(31), Index(32), Index(33), Index(97), Index(257)})
            for (Index rows : {Index(1), Index(15), Index(16), Index(17), Index(40)})
                for (bool gathered : {false, true}) {
                    const Index ldx = r + 1, ldy = cols + 3, ny = rows + 5, ldc = cols + 2;
                    const auto X = randn<T>(static_cast<std::size_t>(rows * ldx + 1), rng);
                    const auto Y = randn<T>(static_cast<std::size_t>(ny * ldy + 1), rng);
                    std::vector<Index> idx(static_cast<std::size_t>(rows));
                    for (Index i = 0; i < rows; ++i) idx[static_cast<std::size_t>(i)] = (i * 7 + 3) % ny;
                    const auto C0 = randn<T>(static_cast<std::size_t>(r * ldc + 1), rng);
                    std::vector<std::vector<T>> results;
                    for (int threads : {1, 2, 3}) {
                        auto C = C0;
                        with_threads(threads, [&] {
                            kernels::lowrank_outer(C.data() + 1, ldc, X.data() + 1, ldx, Y.data() + 1, ldy,
                                                   gathered ? idx.data() : nullptr, rows, r, cols, T(0.25));
                        });
                        results.push_back(C);
                    }
                    for (std::size_t t = 1; t < results.size(); ++t)
                        REQUIRE(std::memcmp(results[0].data(), results[t].data(), results[0].size() * sizeof(T)) == 0);
                    const auto& C = results[0];
                    for (Index q = 0; q < r; ++q)
                        for (Index c = 0; c < cols; ++c) {
                            double s = 0, mag = 0;
                            for (Index i = 0; i < rows; ++i) {
                                const Index yr = gathered ? idx[static_cast<std::size_t>(i)] : i;
                                const double p = double(X[static_cast<std::size_t>(1 + i * ldx + q)]) *
                                                 Y[static_cast<std::size_t>(1 + yr * ldy + c)];
                                s += p;
                                mag += std::abs(p);
                            }
                            const double c0 = C0[static_cast<std::size_t>(1 + q * ldc + c)];
                            REQUIRE(std::abs(C[static_cast<std::size_t>(1 + q * ldc + c)] - (c0 + 0.25 * s)) <=
                                    (rows + 2) * eps<T>() * (std::abs(c0) + 0.25 * mag));
                        }
                    // Padding columns untouched.
                    if (ldc > cols) CHECK(C[static_cast<std::size_t>(1 + cols)] == C0[static_cast<std::size_t>(1 + cols)]);
                }
}

TEST_CASE_TEMPLATE("transpose_into / add_transposed: exact on odd shapes, strides and unaligned pointers", T, float,
                   double) {
    Rng rng(9);
    for (Index rows : {Index(1), Index(7), Index(8), Index(9), Index(16), Index(37), Index(3072)})
        for (Index cols : {Index(1), Index(3), Index(8), Index(11), Index(16), Index(17)}) {
            const Index stride = cols + (rows % 3);  // padded rows too
            const auto S = randn<T>(static_cast<std::size_t>(rows * stride + 1), rng);
            const ConstMatrixView<T> src(S.data() + 1, rows, cols, stride);
            std::vector<T> t(static_cast<std::size_t>(rows * cols + 1), T(-7));
            kernels::transpose_into(t.data() + 1, src);  // unaligned destination
            REQUIRE(t[0] == T(-7));
            for (Index i = 0; i < rows; ++i)
                for (Index q = 0; q < cols; ++q) REQUIRE(t[static_cast<std::size_t>(1 + q * rows + i)] == src(i, q));
            // Added back with alpha 1/2 (exact products: fused or not, the same sums), into padded rows.
            const Index ld = cols + 2;
            const auto D0 = randn<T>(static_cast<std::size_t>(rows * ld + 1), rng);
            auto D = D0;
            kernels::add_transposed(MatrixView<T>(D.data() + 1, rows, cols, ld), t.data() + 1, T(0.5));
            for (Index i = 0; i < rows; ++i)
                for (Index q = 0; q < ld; ++q) {
                    const auto at = static_cast<std::size_t>(1 + i * ld + q);
                    REQUIRE(D[at] == (q < cols ? D0[at] + T(0.5) * src(i, q) : D0[at]));
                }
        }
}

TEST_CASE("FrozenMlp precision: bf16 storage halves the bytes, stays within bf16 tolerance, converts back") {
    Rng rng(9);
    const Index d = 24, h = 56, n = 5;
    FrozenMlp<float> mlp(MlpForm::gelu, d, h);
    mlp.randomize(rng, 0.2);
    CHECK(mlp.precision() == Precision::fp32);
    const auto fp32_bytes = mlp.weight_bytes();
    auto x = randn<float>(static_cast<std::size_t>(n * d), rng);
    std::vector<float> y32(static_cast<std::size_t>(n * h)), y16(y32.size()), dx32(x.size(), 0.f), dx16(x.size(), 0.f);
    mlp.linear("fc").forward(MatrixView<float>(y32.data(), n, h), ConstMatrixView<float>(x.data(), n, d));
    mlp.linear("fc").backward_input(MatrixView<float>(dx32.data(), n, d), ConstMatrixView<float>(y32.data(), n, h));
    const auto W = std::vector<float>(mlp.weights().span("fc.weight").begin(), mlp.weights().span("fc.weight").end());
    mlp.set_precision(Precision::bf16);
    CHECK(mlp.precision() == Precision::bf16);
    CHECK(mlp.weight_bytes() < fp32_bytes * 6 / 10);
    CHECK(mlp.linear("fc").is_bf16());
    CHECK(mlp.linear("fc").out_features() == h);
    CHECK(mlp.linear("fc").bias.size() == static_cast<std::size_t>(h));
    mlp.linear("fc").forward(MatrixView<float>(y16.data(), n, h), ConstMatrixView<float>(x.data(), n, d));
    mlp.linear("fc").backward_input(MatrixView<float>(dx16.data(), n, d), ConstMatrixView<float>(y32.data(), n, h));
    double worst = 0;
    for (std::size_t i = 0; i < y32.size(); ++i) worst = std::max(worst, double(std::abs(y32[i] - y16[i])));
    CHECK(worst > 0);  // really went through bf16
    CHECK(worst < 0.05);
    for (std::size_t i = 0; i < dx32.size(); ++i) CHECK(std::abs(dx32[i] - dx16[i]) < 0.05 * (1 + std::abs(dx32[i])));
    mlp.set_precision(Precision::fp32);
    auto back = mlp.weights().span("fc.weight");
    for (std::size_t i = 0; i < W.size(); ++i) REQUIRE(back[i] == kernels::to_float(kernels::to_bf16(W[i])));
    FrozenMlp<double> dbl(MlpForm::gelu, d, h);
    CHECK_THROWS_AS(dbl.set_precision(Precision::bf16), InvalidArgument);
}

TEST_CASE("MixtureOfLoraMlp on a bf16 base: close to the fp32 layer, bitwise repeatable") {
    for (MlpForm form : {MlpForm::gelu, MlpForm::swiglu}) {
        CAPTURE(to_string(form));
        Rng rng(10);
        MixtureConfig cfg;
        cfg.form = form;
        cfg.d_model = 40;
        cfg.d_hidden = 72;
        cfg.n_experts = 4;
        cfg.top_k = 2;
        cfg.rank = 3;
        auto base = std::make_shared<FrozenMlp<float>>(form, cfg.d_model, cfg.d_hidden);
        base->randomize(rng, 0.15);
        auto base16 = std::make_shared<FrozenMlp<float>>(*base);
        base16->set_precision(Precision::bf16);
        MixtureOfLoraMlp<float> a(cfg, base), b(cfg, base16);
        a.init(rng);
        for (float& v : a.params().all()) v = static_cast<float>(rng.normal(0.0, 0.2));
        std::copy(a.params().all().begin(), a.params().all().end(), b.params().all().begin());
        const Index n = 37;
        auto x = randn<float>(static_cast<std::size_t>(n * cfg.d_model), rng);
        auto dy = randn<float>(x.size(), rng);
        auto run = [&](MixtureOfLoraMlp<float>& m, std::vector<float>& y, std::vector<float>& dx) {
            y.assign(x.size(), 0.f);
            dx.assign(x.size(), 0.f);
            m.zero_grad();
            m.forward(MatrixView<float>(y.data(), n, cfg.d_model), ConstMatrixView<float>(x.data(), n, cfg.d_model));
            m.backward(MatrixView<float>(dx.data(), n, cfg.d_model), ConstMatrixView<float>(dy.data(), n, cfg.d_model),
                       0.01f);
        };
        std::vector<float> ya, dxa, yb, dxb, yb2, dxb2;
        run(a, ya, dxa);
        run(b, yb, dxb);
        const std::vector<float> gb(b.grads().all().begin(), b.grads().all().end());
        run(b, yb2, dxb2);
        CHECK(std::memcmp(yb.data(), yb2.data(), yb.size() * sizeof(float)) == 0);
        CHECK(std::memcmp(dxb.data(), dxb2.data(), dxb.size() * sizeof(float)) == 0);
        CHECK(std::memcmp(gb.data(), b.grads().all().data(), gb.size() * sizeof(float)) == 0);
        // Routing sees x only (identical); the base products differ by bf16 rounding.
        double num = 0, den = 0;
        for (std::size_t i = 0; i < ya.size(); ++i) {
            num += double(ya[i] - yb[i]) * double(ya[i] - yb[i]);
            den += double(ya[i]) * double(ya[i]);
        }
        CHECK(num > 0);
        CHECK(std::sqrt(num / den) < 0.02);
        // The input gradient passes through both base products (dM = dy W2 and dx = dH W1) in bf16.
        num = den = 0;
        for (std::size_t i = 0; i < dxa.size(); ++i) {
            num += double(dxa[i] - dxb[i]) * double(dxa[i] - dxb[i]);
            den += double(dxa[i]) * double(dxa[i]);
        }
        CHECK(den > 1.0);
        CHECK(num > 0);
        CHECK(std::sqrt(num / den) < 0.02);
        num = den = 0;
        for (std::size_t i = 0; i < gb.size(); ++i) {
            const double g = a.grads().all()[i];
            num += (g - gb[i]) * (g - gb[i]);
            den += g * g;
        }
        CHECK(std::sqrt(num / den) < 0.02);
    }
}

TEST_CASE_TEMPLATE("MixtureOfLoraMlp: one-pass row kernels equal the separate kernels (GELU and SwiGLU, ranks 1..8, odd hidden sizes, column groups)", T,
                   float, double) {
    const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-11;
    for (MlpForm form : {MlpForm::gelu, MlpForm::swiglu})
    for (Index group : {Index(7), Index(256)})
    for (Index rank : {Index(1), Index(3), Index(8)})
        for (Index hidden : {Index(17), Index(48), Index(61)}) {
            const char* form_name = to_string(form);
            CAPTURE(form_name);
            CAPTURE(group);
            CAPTURE(rank);
            CAPTURE(hidden);
            Knob<Index> gc(kernels::detail::mix_group_cols(), group);
            Rng rng(11);
            MixtureConfig cfg;
            cfg.form = form;
            cfg.d_model = 19;
            cfg.d_hidden = hidden;
            cfg.n_experts = 3;
            cfg.top_k = 2;
            cfg.rank = rank;
            auto base = std::make_shared<FrozenMlp<T>>(form, cfg.d_model, cfg.d_hidden);
            base->randomize(rng, 0.3);
            MixtureOfLoraMlp<T> layer(cfg, base);
            layer.init(rng);
            for (T& v : layer.params().all()) v = static_cast<T>(rng.normal(0.0, 0.3));
            const Index n = 13;
            auto x = randn<T>(static_cast<std::size_t>(n * cfg.d_model), rng);
            auto dy = randn<T>(x.size(), rng);
            std::vector<std::vector<T>> out;
            for (bool fused : {true, false}) {
                Knob<bool> on(kernels::detail::fused_rows_enabled(), fused);
                std::vector<T> y(x.size()), dx(x.size(), T(0));
                layer.zero_grad();
                layer.forward(MatrixView<T>(y.data(), n, cfg.d_model), ConstMatrixView<T>(x.data(), n, cfg.d_model));
                layer.backward(MatrixView<T>(dx.data(), n, cfg.d_model), ConstMatrixView<T>(dy.data(), n, cfg.d_model),
                               T(0.1));
                std::vector<T> all(y);
                all.insert(all.end(), dx.begin(), dx.end());
                all.insert(all.end(), layer.grads().all().begin(), layer.grads().all().end());
                out.push_back(all);
            }
            double scale = 0;
            for (T v : out[1]) scale = std::max(scale, double(std::abs(v)));
            CHECK(scale > 1e-3);
            for (std::size_t i = 0; i < out[0].size(); ++i) REQUIRE(std::abs(out[0][i] - out[1][i]) <= tol * scale);
        }
}

namespace {

/// Routed rows for the fused-pass tests: n tokens, k distinct experts each (a rotation of a random
/// start), gates in (0, 1).
struct RoutedRows {
    std::vector<std::int32_t> expert;
    std::vector<double> gate;
    RoutedRows(Index n, Index k, Index E, Rng& rng) {
        for (Index t = 0; t < n; ++t) {
            const auto e0 = static_cast<std::int32_t>(rng.uniform() * double(E)) % static_cast<std::int32_t>(E);
            for (Index j = 0; j < k; ++j) {
                expert.push_back(static_cast<std::int32_t>((e0 + 2 * j + (j > 0 && 2 * j >= E ? 1 : 0)) % E));
                gate.push_back(0.1 + 0.8 * rng.uniform());
            }
        }
    }
};

/// The plain-loop reference of the fused forward and backward (kernels/fused.hpp), in double.
struct FusedReference {
    std::vector<double> M, z2, dH, dz, udm, gA2, gB1T;
    FusedReference(Index n, Index h, Index k, Index E, Index r, const std::vector<double>& H, const std::vector<double>& b1,
                   const RoutedRows& route, const std::vector<double>& zs, const std::vector<double>& qg,
                   const std::vector<double>& B1T, const std::vector<double>& A2, const std::vector<double>& dM,
                   const std::vector<double>& gA2_0, double s) {
        M.assign(static_cast<std::size_t>(n * h), 0.0);
        dH = M;
        z2.assign(static_cast<std::size_t>(n * k * r), 0.0);
        dz = z2;
        udm.assign(static_cast<std::size_t>(n * k), 0.0);
        gA2 = gA2_0;
        gB1T.assign(static_cast<std::size_t>(E * r * h), 0.0);
        for (Index t = 0; t < n; ++t)
            for (Index j = 0; j < k; ++j) {
                const Index i = t * k + j, e = route.expert[static_cast<std::size_t>(i)];
                const double g = route.gate[static_cast<std::size_t>(i)];
                for (Index c = 0; c < h; ++c) {
                    double p = H[static_cast<std::size_t>(t * h + c)] + b1[static_cast<std::size_t>(c)];
                    double du = g * dM[static_cast<std::size_t>(t * h + c)];
                    for (Index q = 0; q < r; ++q) {
                        p += zs[static_cast<std::size_t>(i * r + q)] * B1T[static_cast<std::size_t>((e * r + q) * h + c)];
                        du += qg[static_cast<std::size_t>(i * r + q)] * A2[static_cast<std::size_t>((e * r + q) * h + c)];
                    }
                    const double u = kernels::gelu_tanh(p), dp = du * kernels::gelu_tanh_grad(p);
                    M[static_cast<std::size_t>(t * h + c)] += g * u;
                    dH[static_cast<std::size_t>(t * h + c)] += dp;
                    udm[static_cast<std::size_t>(i)] += u * dM[static_cast<std::size_t>(t * h + c)];
                    for (Index q = 0; q < r; ++q) {
                        z2[static_cast<std::size_t>(i * r + q)] += A2[static_cast<std::size_t>((e * r + q) * h + c)] * u;
                        dz[static_cast<std::size_t>(i * r + q)] += s * B1T[static_cast<std::size_t>((e * r + q) * h + c)] * dp;
                        gA2[static_cast<std::size_t>((e * r + q) * h + c)] += qg[static_cast<std::size_t>(i * r + q)] * u;
                        gB1T[static_cast<std::size_t>((e * r + q) * h + c)] += zs[static_cast<std::size_t>(i * r + q)] * dp;
                    }
                }
            }
    }
};

/// Pointers to the E expert blocks of `stride` elements in buf (the kernels' per-expert factor tables).
template <class P, class V>
std::vector<P> expert_blocks(V& buf, Index E, Index stride) {
    std::vector<P> p;
    for (Index e = 0; e < E; ++e) p.push_back(buf.data() + e * stride);
    return p;
}

template <class T>
std::vector<T> cast_vec(const std::vector<double>& v) {
    return std::vector<T>(v.begin(), v.end());
}

/// max |a - b| <= tol * max |b| (and the reference is not all zero).
template <class T>
void check_close(const T* a, const std::vector<double>& b, double tol, const char* what) {
    double scale = 0, err = 0;
    for (std::size_t i = 0; i < b.size(); ++i) {
        scale = std::max(scale, std::abs(b[i]));
        err = std::max(err, std::abs(double(a[i]) - b[i]));
    }
    CAPTURE(what);
    CHECK(scale > 0);
    CHECK(err <= tol * scale);
}

}  // namespace

TEST_CASE_TEMPLATE("fused mixture passes equal plain loops: ranks 1..8, odd widths, groups, tails, padded strides", T,
                   float, double) {
    const double tol = std::is_same_v<T, float> ? 3e-5 : 1e-12;
    Rng rng(21);
    const Index E = 4, n = 11;
    for (Index r : {Index(1), Index(3), Index(4), Index(5), Index(8)})
        for (Index h : {Index(1), Index(17), Index(48), Index(61), Index(96)})
            for (Index k : {Index(1), Index(2), Index(3)})
                for (Index group : {Index(1), Index(7), Index(32), Index(256)})
                    for (Index block : {Index(1), Index(4), Index(64)}) {
                        CAPTURE(r);
                        CAPTURE(h);
                        CAPTURE(k);
                        CAPTURE(group);
                        CAPTURE(block);
                        Knob<Index> gc(kernels::detail::mix_group_cols(), group);
                        Knob<Index> tb(kernels::detail::mix_token_block(), block);
                        const RoutedRows route(n, k, E, rng);
                        auto rnd = [&](Index count, double sd) {
                            std::vector<double> v(static_cast<std::size_t>(count));
                            for (double& x : v) x = rng.normal(0.0, sd);
                            return v;
                        };
                        const auto H = rnd(n * h, 1.0), b1 = rnd(h, 0.3), dM = rnd(n * h, 1.0);
                        const auto zs = rnd(n * k * r, 0.5), qg = rnd(n * k * r, 0.5);
                        const auto B1T = rnd(E * r * h, 0.5), A2 = rnd(E * r * h, 0.5), gA2_0 = rnd(E * r * h, 0.5);
                        const double s = 0.75;
                        const FusedReference ref(n, h, k, E, r, H, b1, route, zs, qg, B1T, A2, dM, gA2_0, s);
                        // The kernels' operands: padded strides and a one-element offset for the big ones.
                        const Index ld = h + 3;
                        auto padded = [&](const std::vector<double>& v) {
                            std::vector<T> p(static_cast<std::size_t>(n * ld + 1), T(7));
                            for (Index t = 0; t < n; ++t)
                                for (Index c = 0; c < h; ++c)
                                    p[static_cast<std::size_t>(1 + t * ld + c)] = static_cast<T>(v[static_cast<std::size_t>(t * h + c)]);
                            return p;
                        };
                        // The outputs: one element off alignment too, or (block 4) 64-byte aligned rows, which the
                        // passes write with streaming stores.
                        const bool aligned = block == 4;
                        const Index ldo = aligned ? (h + 15) / 16 * 16 : ld, off = aligned ? 0 : 1;
                        auto unpad = [&](const auto& p) {
                            std::vector<T> v(static_cast<std::size_t>(n * h));
                            for (Index t = 0; t < n; ++t)
                                for (Index c = 0; c < h; ++c)
                                    v[static_cast<std::size_t>(t * h + c)] = p[static_cast<std::size_t>(off + t * ldo + c)];
                            return v;
                        };
                        const auto Hp = padded(H), dMp = padded(dM);
                        comigs::detail::aligned_vector<T> Mp(static_cast<std::size_t>(n * ldo + 1), T(7)), dHp(Mp);
                        const auto b1f = cast_vec<T>(b1), zsf = cast_vec<T>(zs), qgf = cast_vec<T>(qg);
                        const auto B1Tf = cast_vec<T>(B1T), A2f = cast_vec<T>(A2);
                        auto gA2f = cast_vec<T>(gA2_0);
                        std::vector<T> gB1Tf(B1Tf.size(), T(7));
                        const auto fb = expert_blocks<const T*>(B1Tf, E, r * h), fa = expert_blocks<const T*>(A2f, E, r * h);
                        const auto ga = expert_blocks<T*>(gA2f, E, r * h), gb = expert_blocks<T*>(gB1Tf, E, r * h);
                        const auto gate = cast_vec<T>(route.gate);
                        std::vector<T> z2(static_cast<std::size_t>(n * k * r)), dz(z2.size()), udm(static_cast<std::size_t>(n * k)),
                            part;
                        kernels::gelu_mixture_forward(MatrixView<T>(Mp.data() + off, n, h, ldo), z2.data(),
                                                      ConstMatrixView<T>(Hp.data() + 1, n, h, ld), b1f.data(), k,
                                                      route.expert.data(), gate.data(), zsf.data(), fb.data(), fa.data(),
                                                      E, r, part);
                        kernels::gelu_mixture_backward(MatrixView<T>(dHp.data() + off, n, h, ldo), dz.data(), udm.data(),
                                                       ConstMatrixView<T>(dMp.data() + 1, n, h, ld),
                                                       ConstMatrixView<T>(Hp.data() + 1, n, h, ld), b1f.data(), k,
                                                       route.expert.data(), gate.data(), zsf.data(), qgf.data(), fb.data(),
                                                       fa.data(), ga.data(), h, gb.data(), E, T(s), r, part);
                        check_close(unpad(Mp).data(), ref.M, tol, "M");
                        check_close(z2.data(), ref.z2, tol, "z2");
                        check_close(unpad(dHp).data(), ref.dH, tol, "dH");
                        check_close(dz.data(), ref.dz, tol, "dz");
                        check_close(udm.data(), ref.udm, tol, "u.dm");
                        check_close(gA2f.data(), ref.gA2, tol, "dA2");
                        check_close(gB1Tf.data(), ref.gB1T, tol, "dB1^T");
                        // The padding between rows is never written.
                        if (!aligned) CHECK(Mp[0] == T(7));
                        if (ldo > h) CHECK(Mp[static_cast<std::size_t>(off + h)] == T(7));
                        if (ldo > h) CHECK(dHp[static_cast<std::size_t>(off + h)] == T(7));
                    }
}

namespace {

/// Random routed rows and operands of the fused float passes, and one forward + backward over them.
struct FusedCase {
    Index n, h, k, E, r;
    RoutedRows route;
    std::vector<float> gate, H, dM, b1, zs, qg, B1T, A2;
    FusedCase(Index n_, Index h_, Index k_, Index E_, Index r_, Rng& rng)
        : n(n_), h(h_), k(k_), E(E_), r(r_), route(n_, k_, E_, rng) {
        gate = cast_vec<float>(route.gate);
        auto rnd = [&](Index count) { return randn<float>(static_cast<std::size_t>(count), rng, 0.5); };
        H = rnd(n * h);
        dM = rnd(n * h);
        b1 = rnd(h);
        zs = rnd(n * k * r);
        qg = rnd(n * k * r);
        B1T = rnd(E * r * h);
        A2 = rnd(E * r * h);
    }
    struct Out {
        comigs::detail::aligned_vector<float> M, dH;  // aligned: rows at 64-byte starts take streaming stores
        std::vector<float> rest;                       // z2, dz, u.dm, dA2, dB1^T
    };
    /// Forward then backward; Mb and dHb as in gelu_mixture_forward / gelu_mixture_backward (with them
    /// set, `fp32_out` false passes empty fp32 outputs).
    Out run(MatrixView<kernels::bf16> Mb = {}, MatrixView<kernels::bf16> dHb = {}, bool fp32_out = true) const {
        Out o;
        o.M.assign(H.size(), 0.0f);
        o.dH.assign(H.size(), 0.0f);
        const auto Mv = fp32_out ? MatrixView<float>(o.M.data(), n, h) : MatrixView<float>();
        const auto dHv = fp32_out ? MatrixView<float>(o.dH.data(), n, h) : MatrixView<float>();
        std::vector<float> z2(static_cast<std::size_t>(n * k * r)), dz(z2.size()), udm(static_cast<std::size_t>(n * k)),
            gA2(B1T.size(), 0.5f), gB1T(B1T.size()), part;
        const auto fb = expert_blocks<const float*>(B1T, E, r * h), fa = expert_blocks<const float*>(A2, E, r * h);
        const auto ga = expert_blocks<float*>(gA2, E, r * h), gb = expert_blocks<float*>(gB1T, E, r * h);
        kernels::gelu_mixture_forward(Mv, z2.data(), ConstMatrixView<float>(H.data(), n, h),
                                      b1.data(), k, route.expert.data(), gate.data(), zs.data(), fb.data(), fa.data(), E, r,
                                      part, Mb);
        kernels::gelu_mixture_backward(dHv, dz.data(), udm.data(),
                                       ConstMatrixView<float>(dM.data(), n, h), ConstMatrixView<float>(H.data(), n, h),
                                       b1.data(), k, route.expert.data(), gate.data(), zs.data(), qg.data(), fb.data(),
                                       fa.data(), ga.data(), h, gb.data(), E, 0.5f, r, part, dHb);
        for (const auto* v : {&z2, &dz, &udm, &gA2, &gB1T}) o.rest.insert(o.rest.end(), v->begin(), v->end());
        return o;
    }
};

}  // namespace

TEST_CASE("fused mixture passes: bitwise identical for 1, 2 and 3 threads and from run to run") {
    Knob<Index> pmin(kernels::detail::mix_parallel_min(), 0);
    Knob<Index> gc(kernels::detail::mix_group_cols(), 16);
    Knob<Index> tb(kernels::detail::mix_token_block(), 5);
    Rng rng(22);
    // h = 203: rows of m and dH start at every alignment; 208: all start 64-byte aligned (streamed).
    for (Index h : {Index(203), Index(208)}) {
        const FusedCase fc(29, h, 2, 3, 7, rng);
        std::vector<std::vector<float>> results;
        for (int threads : {1, 2, 3, 2}) {
            FusedCase::Out o;
            with_threads(threads, [&] { o = fc.run(); });
            std::vector<float> all(o.M.begin(), o.M.end());
            all.insert(all.end(), o.dH.begin(), o.dH.end());
            all.insert(all.end(), o.rest.begin(), o.rest.end());
            results.push_back(all);
        }
        for (std::size_t i = 1; i < results.size(); ++i)
            CHECK(std::memcmp(results[0].data(), results[i].data(), results[0].size() * sizeof(float)) == 0);
    }
}

TEST_CASE("fused mixture passes: bf16 output rows are the finished fp32 rows rounded, everything else unchanged") {
    Knob<Index> pmin(kernels::detail::mix_parallel_min(), 0);
    Rng rng(23);
    const Index n = 23, h = 203;  // h: column tails after the vector batches
    // Padded bf16 rows: odd (no row but the first 32-byte aligned) and whole batches (every row
    // aligned, so the finished rows take the streaming stores).
    for (Index ldb : {h + 5, Index(208)})
        for (Index k : {Index(1), Index(2), Index(3)})
            for (Index group : {Index(16), Index(256)})
                for (Index block : {Index(3), Index(64)}) {
                    CAPTURE(ldb);
                    CAPTURE(k);
                    CAPTURE(group);
                    CAPTURE(block);
                    Knob<Index> gc(kernels::detail::mix_group_cols(), group);
                    Knob<Index> tb(kernels::detail::mix_token_block(), block);
                    const FusedCase fc(n, h, k, 4, 8, rng);
                    comigs::detail::aligned_vector<kernels::bf16> Mb(static_cast<std::size_t>(n * ldb), kernels::bf16{0x7fc1}),
                        dHb(Mb);
                    const auto plain = fc.run();
                    const auto rounded = fc.run(MatrixView<kernels::bf16>(Mb.data(), n, h, ldb),
                                                MatrixView<kernels::bf16>(dHb.data(), n, h, ldb));
                    CHECK(std::memcmp(plain.rest.data(), rounded.rest.data(), plain.rest.size() * sizeof(float)) == 0);
                    // Without fp32 outputs (they are not written when the bf16 ones are set): the same bits.
                    comigs::detail::aligned_vector<kernels::bf16> Mb2(Mb.size(), kernels::bf16{0x7fc1}), dHb2(Mb2);
                    const auto alone = fc.run(MatrixView<kernels::bf16>(Mb2.data(), n, h, ldb),
                                              MatrixView<kernels::bf16>(dHb2.data(), n, h, ldb), false);
                    CHECK(std::memcmp(plain.rest.data(), alone.rest.data(), plain.rest.size() * sizeof(float)) == 0);
                    CHECK(std::memcmp(Mb.data(), Mb2.data(), Mb.size() * sizeof(kernels::bf16)) == 0);
                    CHECK(std::memcmp(dHb.data(), dHb2.data(), dHb.size() * sizeof(kernels::bf16)) == 0);
                    for (Index t = 0; t < n; ++t) {
                        for (Index c = 0; c < h; ++c) {
                            const auto at = static_cast<std::size_t>(t * h + c), atb = static_cast<std::size_t>(t * ldb + c);
                            REQUIRE(Mb[atb].bits == kernels::to_bf16(plain.M[at]).bits);
                            REQUIRE(dHb[atb].bits == kernels::to_bf16(plain.dH[at]).bits);
                        }
                        for (Index c = h; c < ldb; ++c)  // padding untouched
                            REQUIRE(Mb[static_cast<std::size_t>(t * ldb + c)].bits == 0x7fc1);
                    }
                }
    // A bf16 output of another shape is refused.
    std::vector<float> M(4), H(4), z2(2), part;
    std::vector<kernels::bf16> Mb(4);
    const std::int32_t expert[2] = {0, 1};
    const float gate[2] = {1.0f, 1.0f}, zs[2] = {0, 0}, f[2] = {0, 0};
    const float* fp[2] = {f, f};
    CHECK_THROWS_AS(kernels::gelu_mixture_forward<float>(MatrixView<float>(M.data(), 2, 2), z2.data(),
                                                  ConstMatrixView<float>(H.data(), 2, 2), nullptr, 1, expert, gate, zs, fp,
                                                  fp, 2, 1, part, MatrixView<kernels::bf16>(Mb.data(), 1, 2)),
                    ShapeError);
}

TEST_CASE_TEMPLATE("simd::reduce_add_rows sums each batch; simd::sigmoid_fast, sigmoid_pow2 and the fused GELU are within a few ulp", T, float, double) {
    using B = kernels::simd::batch<T>;
    constexpr Index w = static_cast<Index>(kernels::simd::width<T>);
    Rng rng(23);
    B v[8];
    std::vector<T> lanes(static_cast<std::size_t>(8 * w));
    for (T& x : lanes) x = static_cast<T>(rng.normal());
    for (Index i = 0; i < 8; ++i) v[i] = kernels::simd::load(lanes.data() + i * w);
    T out8[8], out4[4];
    kernels::simd::reduce_add_rows<8>(v, out8);
    kernels::simd::reduce_add_rows<4>(v, out4);
    for (Index i = 0; i < 8; ++i) {
        double s = 0, mag = 0;
        for (Index l = 0; l < w; ++l) {
            s += lanes[static_cast<std::size_t>(i * w + l)];
            mag += std::abs(double(lanes[static_cast<std::size_t>(i * w + l)]));
        }
        CHECK(std::abs(out8[i] - s) <= w * eps<T>() * mag);
        if (i < 4) CHECK(out4[i] == out8[i]);
    }
    if constexpr (std::is_same_v<T, float>) {
        // Every argument from -120 to 120 in steps of 1/64, plus the extremes, against double.
        std::vector<float> xs;
        for (int i = -120 * 64; i <= 120 * 64; ++i) xs.push_back(float(i) / 64.0f);
        for (float x : {1e-30f, -1e-30f, 3e38f, -3e38f, std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity()})
            xs.push_back(x);
        while (xs.size() % static_cast<std::size_t>(w) != 0) xs.push_back(0.5f);
        for (std::size_t i = 0; i < xs.size(); i += static_cast<std::size_t>(w)) {
            alignas(64) float out[64];
            kernels::simd::store(out, kernels::simd::sigmoid_fast(kernels::simd::load(xs.data() + i)));
            for (std::size_t l = 0; l < static_cast<std::size_t>(w); ++l) {
                const double x = xs[i + l];
                const double ref = 1.0 / (1.0 + std::exp(-std::clamp(x, -80.0, 80.0)));
                CAPTURE(x);
                REQUIRE(std::abs(out[l] - ref) <= 8 * eps<float>() * ref);
            }
        }
        alignas(64) float nan_in[64], nan_out[64];
        for (Index l = 0; l < w; ++l) nan_in[l] = std::numeric_limits<float>::quiet_NaN();
        kernels::simd::store(nan_out, kernels::simd::sigmoid_fast(kernels::simd::load(nan_in)));
        for (Index l = 0; l < w; ++l) CHECK(std::isfinite(nan_out[l]));

        // sigmoid_pow2: s = 1 / (1 + 2^t) and 1 - s for t from -140 to 140 (clamped at +-120).
        std::vector<float> ts;
        for (int i = -140 * 64; i <= 140 * 64; ++i) ts.push_back(float(i) / 64.0f + 1.0f / 4096.0f);
        while (ts.size() % static_cast<std::size_t>(w) != 0) ts.push_back(0.25f);
        for (std::size_t i = 0; i < ts.size(); i += static_cast<std::size_t>(w)) {
            alignas(64) float s[64], oms[64];
            B sb, ob;
            kernels::simd::sigmoid_pow2(kernels::simd::load(ts.data() + i), sb, ob);
            kernels::simd::store(s, sb);
            kernels::simd::store(oms, ob);
            for (std::size_t l = 0; l < static_cast<std::size_t>(w); ++l) {
                const double e = std::exp2(std::clamp(double(ts[i + l]), -120.0, 120.0));
                CAPTURE(ts[i + l]);
                REQUIRE(std::abs(s[l] - 1.0 / (1.0 + e)) <= 8 * eps<float>() / (1.0 + e));
                REQUIRE(std::abs(oms[l] - e / (1.0 + e)) <= 8 * eps<float>() * e / (1.0 + e));
            }
        }

        // The fused kernels' GELU pieces against double: sigmoid(2a(x)), 1 - it and gelu'(x). Their
        // error is that of 2a(x) in float times its size, as for any float evaluation of the formula.
        for (int i = -9 * 256; i <= 9 * 256; i += static_cast<int>(w)) {  // 2a(x) / ln 2 within +-120
            alignas(64) float xv[64], s[64], oms[64], gd[64];
            for (Index l = 0; l < w; ++l) xv[l] = float(i + l) / 256.0f;
            B ob;
            const B xb = kernels::simd::load(xv), sb = kernels::detail::gelu_sigmoid(xb, &ob);
            kernels::simd::store(s, sb);
            kernels::simd::store(oms, ob);
            kernels::simd::store(gd, kernels::detail::gelu_grad_from(xb, sb, ob));
            for (Index l = 0; l < w; ++l) {
                const double x = xv[l], two_a = 2 * 0.7978845608028654 * (x + 0.044715 * x * x * x);
                const double e = std::exp(-two_a), S = 1 / (1 + e), C = e / (1 + e);
                const double G = S + x * S * C * 2 * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x);
                const double tol = (8 + 4 * std::abs(two_a)) * eps<float>();  // two_a rounded: ~2 ulp of it
                CAPTURE(x);
                REQUIRE(std::abs(s[l] - S) <= tol * S);
                REQUIRE(std::abs(oms[l] - C) <= tol * C);
                REQUIRE(std::abs(gd[l] - G) <= tol * std::max(1.0, std::abs(G)) * 4);
            }
        }
    }
}

TEST_CASE_TEMPLATE("fused SwiGLU mixture passes equal plain loops (biases, ranks, groups, blocks, tails); bf16 outputs are the rows rounded",
                   T, float, double) {
    const double tol = std::is_same_v<T, float> ? 3e-5 : 1e-12;
    Knob<Index> pmin(kernels::detail::mix_parallel_min(), 0);
    Rng rng(29);
    const Index E = 4, n = 11;
    for (Index r : {Index(1), Index(3), Index(8)})
        for (Index h : {Index(17), Index(61)})
            for (Index k : {Index(1), Index(2)})
                for (Index group : {Index(1), Index(7), Index(256)})
                    for (Index block : {Index(1), Index(64)}) {
                        CAPTURE(r);
                        CAPTURE(h);
                        CAPTURE(k);
                        CAPTURE(group);
                        CAPTURE(block);
                        Knob<Index> gc(kernels::detail::mix_group_cols(), group);
                        Knob<Index> tb(kernels::detail::mix_token_block(), block);
                        const RoutedRows route(n, k, E, rng);
                        auto rnd = [&](Index count, double sd) {
                            std::vector<double> v(static_cast<std::size_t>(count));
                            for (double& x : v) x = rng.normal(0.0, sd);
                            return v;
                        };
                        const auto Hg = rnd(n * h, 1.0), Hu = rnd(n * h, 1.0), bg = rnd(h, 0.3), bu = rnd(h, 0.3);
                        const auto dM = rnd(n * h, 1.0), zg = rnd(n * k * r, 0.5), zu = rnd(n * k * r, 0.5);
                        const auto qg = rnd(n * k * r, 0.5), BgT = rnd(E * r * h, 0.5), BuT = rnd(E * r * h, 0.5);
                        const auto A2 = rnd(E * r * h, 0.5), gA2_0 = rnd(E * r * h, 0.5);
                        const double s = 0.75;
                        // The plain-loop reference in double.
                        std::vector<double> M(static_cast<std::size_t>(n * h), 0.0), dHg(M), dHu(M),
                            z2(static_cast<std::size_t>(n * k * r), 0.0), dzg(z2), dzu(z2),
                            udm(static_cast<std::size_t>(n * k), 0.0), gA2(gA2_0),
                            gBg(static_cast<std::size_t>(E * r * h), 0.0), gBu(gBg);
                        for (Index t = 0; t < n; ++t)
                            for (Index j = 0; j < k; ++j) {
                                const Index i = t * k + j, e = route.expert[static_cast<std::size_t>(i)];
                                const double g = route.gate[static_cast<std::size_t>(i)];
                                for (Index c = 0; c < h; ++c) {
                                    const auto tc = static_cast<std::size_t>(t * h + c);
                                    double pg = Hg[tc] + bg[static_cast<std::size_t>(c)];
                                    double pu = Hu[tc] + bu[static_cast<std::size_t>(c)], da = g * dM[tc];
                                    for (Index q = 0; q < r; ++q) {
                                        const auto iq = static_cast<std::size_t>(i * r + q);
                                        const auto fq = static_cast<std::size_t>((e * r + q) * h + c);
                                        pg += zg[iq] * BgT[fq];
                                        pu += zu[iq] * BuT[fq];
                                        da += qg[iq] * A2[fq];
                                    }
                                    const double sg = 1.0 / (1.0 + std::exp(-pg)), silu = pg * sg, a = silu * pu;
                                    const double dpg = da * pu * sg * (1.0 + pg * (1.0 - sg)), dpu = da * silu;
                                    M[tc] += g * a;
                                    dHg[tc] += dpg;
                                    dHu[tc] += dpu;
                                    udm[static_cast<std::size_t>(i)] += a * dM[tc];
                                    for (Index q = 0; q < r; ++q) {
                                        const auto iq = static_cast<std::size_t>(i * r + q);
                                        const auto fq = static_cast<std::size_t>((e * r + q) * h + c);
                                        z2[iq] += A2[fq] * a;
                                        dzg[iq] += s * BgT[fq] * dpg;
                                        dzu[iq] += s * BuT[fq] * dpu;
                                        gA2[fq] += qg[iq] * a;
                                        gBg[fq] += zg[iq] * dpg;
                                        gBu[fq] += zu[iq] * dpu;
                                    }
                                }
                            }
                        const auto Hgf = cast_vec<T>(Hg), Huf = cast_vec<T>(Hu), bgf = cast_vec<T>(bg), buf = cast_vec<T>(bu);
                        const auto dMf = cast_vec<T>(dM), zgf = cast_vec<T>(zg), zuf = cast_vec<T>(zu), qgf = cast_vec<T>(qg);
                        const auto BgTf = cast_vec<T>(BgT), BuTf = cast_vec<T>(BuT), A2f = cast_vec<T>(A2);
                        auto gA2f = cast_vec<T>(gA2_0);
                        std::vector<T> gBgf(BgTf.size(), T(7)), gBuf(gBgf);
                        const auto fg = expert_blocks<const T*>(BgTf, E, r * h), fu = expert_blocks<const T*>(BuTf, E, r * h);
                        const auto fa = expert_blocks<const T*>(A2f, E, r * h);
                        const auto ga = expert_blocks<T*>(gA2f, E, r * h), gbg = expert_blocks<T*>(gBgf, E, r * h),
                                   gbu = expert_blocks<T*>(gBuf, E, r * h);
                        const auto gate = cast_vec<T>(route.gate);
                        std::vector<T> Mf(M.size()), dHgf(M.size()), dHuf(M.size()), z2f(z2.size()), dzgf(z2.size()),
                            dzuf(z2.size()), udmf(udm.size()), part;
                        const ConstMatrixView<T> Hgv(Hgf.data(), n, h), Huv(Huf.data(), n, h);
                        kernels::swiglu_mixture_forward(MatrixView<T>(Mf.data(), n, h), z2f.data(), Hgv, Huv, bgf.data(),
                                                        buf.data(), k, route.expert.data(), gate.data(), zgf.data(),
                                                        zuf.data(), fg.data(), fu.data(), fa.data(), E, r, part);
                        kernels::swiglu_mixture_backward(MatrixView<T>(dHgf.data(), n, h), MatrixView<T>(dHuf.data(), n, h),
                                                         dzgf.data(), dzuf.data(), udmf.data(),
                                                         ConstMatrixView<T>(dMf.data(), n, h), Hgv, Huv, bgf.data(),
                                                         buf.data(), k, route.expert.data(), gate.data(), zgf.data(),
                                                         zuf.data(), qgf.data(), fg.data(), fu.data(), fa.data(),
                                                         ga.data(), h, gbg.data(), gbu.data(), E, T(s), r, part);
                        check_close(Mf.data(), M, tol, "M");
                        check_close(z2f.data(), z2, tol, "z2");
                        check_close(dHgf.data(), dHg, tol, "dHg");
                        check_close(dHuf.data(), dHu, tol, "dHu");
                        check_close(dzgf.data(), dzg, tol, "dzg");
                        check_close(dzuf.data(), dzu, tol, "dzu");
                        check_close(udmf.data(), udm, tol, "a.dm");
                        check_close(gA2f.data(), gA2, tol, "dA2");
                        check_close(gBgf.data(), gBg, tol, "dBg^T");
                        check_close(gBuf.data(), gBu, tol, "dBu^T");
                        if constexpr (std::is_same_v<T, float>) {
                            // bf16 outputs: the finished fp32 rows rounded, everything else the same bits.
                            std::vector<kernels::bf16> Mb(M.size()), dHgb(M.size()), dHub(M.size());
                            std::vector<T> z2b(z2.size()), dzgb(z2.size()), dzub(z2.size()), udmb(udm.size());
                            auto gA2b = cast_vec<T>(gA2_0);
                            std::vector<T> gBgb(BgTf.size()), gBub(gBgb);
                            const auto gab = expert_blocks<T*>(gA2b, E, r * h), gbgb = expert_blocks<T*>(gBgb, E, r * h),
                                       gbub = expert_blocks<T*>(gBub, E, r * h);
                            kernels::swiglu_mixture_forward(MatrixView<T>(), z2b.data(), Hgv, Huv, bgf.data(), buf.data(), k,
                                                            route.expert.data(), gate.data(), zgf.data(), zuf.data(),
                                                            fg.data(), fu.data(), fa.data(), E, r, part,
                                                            MatrixView<kernels::bf16>(Mb.data(), n, h));
                            kernels::swiglu_mixture_backward(
                                MatrixView<T>(), MatrixView<T>(), dzgb.data(), dzub.data(), udmb.data(),
                                ConstMatrixView<T>(dMf.data(), n, h), Hgv, Huv, bgf.data(), buf.data(), k, route.expert.data(),
                                gate.data(), zgf.data(), zuf.data(), qgf.data(), fg.data(), fu.data(), fa.data(), gab.data(), h,
                                gbgb.data(), gbub.data(), E, T(s), r, part, MatrixView<kernels::bf16>(dHgb.data(), n, h),
                                MatrixView<kernels::bf16>(dHub.data(), n, h));
                            for (std::size_t x = 0; x < M.size(); ++x) {
                                REQUIRE(Mb[x].bits == kernels::to_bf16(Mf[x]).bits);
                                REQUIRE(dHgb[x].bits == kernels::to_bf16(dHgf[x]).bits);
                                REQUIRE(dHub[x].bits == kernels::to_bf16(dHuf[x]).bits);
                            }
                            CHECK(z2b == z2f);
                            CHECK(dzgb == dzgf);
                            CHECK(dzub == dzuf);
                            CHECK(udmb == udmf);
                            CHECK(gA2b == gA2f);
                            CHECK(gBgb == gBgf);
                            CHECK(gBub == gBuf);
                        }
                    }
}
