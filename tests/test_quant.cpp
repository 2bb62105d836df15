#include <comigs/io/safetensors.hpp>
#include <comigs/kernels/quant.hpp>
#include <comigs/random.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
using namespace comigs;
using kernels::QuantType;

template <class V>
struct QuantKnob {
    V& ref;
    V saved;
    QuantKnob(V& r, V v) : ref(r), saved(r) { ref = v; }
    ~QuantKnob() { ref = saved; }
};

template <class F>
void quant_with_threads(int n, F f) {
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

std::vector<std::byte> quantized(QuantType t, const std::vector<float>& x, Index rows, Index cols) {
    std::vector<std::byte> out(static_cast<std::size_t>(rows) * kernels::quant_row_bytes(t, cols));
    for (Index i = 0; i < rows; ++i)
        kernels::quantize_row(out.data() + static_cast<std::size_t>(i) * kernels::quant_row_bytes(t, cols), t,
                              x.data() + i * cols, cols);
    return out;
}
}  // namespace

TEST_CASE("quantization: ggml's blocks and values, byte for byte against the numpy reference (golden)") {
    const auto f = io::SafetensorsFile::load(std::string(COMIGS_GOLDEN_DIR) + "/quant_blocks.safetensors");
    const auto shape = f.shape("x");
    REQUIRE(shape.size() == 2);
    const Index rows = shape[0], cols = shape[1];
    const auto x = f.get<float>("x");
    for (QuantType t : {QuantType::q8_0, QuantType::q4_0}) {
        CAPTURE(std::string(kernels::to_string(t)));
        const std::string name = kernels::to_string(t);
        const auto blocks = f.get<std::uint8_t>(name + ".blocks");
        const auto values = f.get<float>(name + ".values");
        const std::size_t rb = kernels::quant_row_bytes(t, cols);
        REQUIRE(blocks.size() == static_cast<std::size_t>(rows) * rb);
        const auto mine = quantized(t, x, rows, cols);
        Index differing = 0;
        for (std::size_t i = 0; i < mine.size(); ++i) differing += static_cast<std::uint8_t>(mine[i]) != blocks[i];
        CHECK(differing == 0);
        // Dequantized values, bit for bit, from the reference's blocks (and so from ours).
        std::vector<float> back(static_cast<std::size_t>(cols));
        for (Index r = 0; r < rows; ++r) {
            kernels::dequantize_row(back.data(), t, reinterpret_cast<const std::byte*>(blocks.data()) + r * rb, cols);
            for (Index c = 0; c < cols; ++c)
                REQUIRE(std::memcmp(&back[static_cast<std::size_t>(c)], &values[static_cast<std::size_t>(r * cols + c)], 4) == 0);
            // In double: the same float values, widened.
            std::vector<double> backd(static_cast<std::size_t>(cols));
            kernels::dequantize_row(backd.data(), t, reinterpret_cast<const std::byte*>(blocks.data()) + r * rb, cols);
            for (Index c = 0; c < cols; ++c)
                REQUIRE(backd[static_cast<std::size_t>(c)] == static_cast<double>(values[static_cast<std::size_t>(r * cols + c)]));
        }
    }
}

TEST_CASE("quantization: the rounding rules on hand-made blocks") {
    std::vector<float> x(32, 0.0f);
    x[0] = 127.0f;  // d = 1
    x[1] = 2.5f;    // half away from zero: 3
    x[2] = -2.5f;   // -3
    x[3] = std::nextafter(2.5f, 0.0f);  // 2
    kernels::BlockQ8_0 b8;
    kernels::quantize_row_q8_0(&b8, x.data(), 32);
    CHECK(detail::f16_bits_to_float(b8.d) == 1.0f);
    CHECK(b8.qs[0] == 127);
    CHECK(b8.qs[1] == 3);
    CHECK(b8.qs[2] == -3);
    CHECK(b8.qs[3] == 2);

    // Q4_0: the first of two values of equal magnitude sets the sign of d; -max maps to 16, clamped to 15.
    std::fill(x.begin(), x.end(), 0.0f);
    x[0] = 8.0f;
    x[1] = -8.0f;
    x[16] = 4.0f;
    kernels::BlockQ4_0 b4;
    kernels::quantize_row_q4_0(&b4, x.data(), 32);
    CHECK(detail::f16_bits_to_float(b4.d) == -1.0f);
    CHECK((b4.qs[0] & 0xF) == 0);      // 8 / -1 + 8.5 = 0.5 -> 0: value (0 - 8) * -1 = 8
    CHECK((b4.qs[1] & 0xF) == 15);     // -8 / -1 + 8.5 = 16.5 -> 16 -> 15: value 7 * -1 = -7
    CHECK((b4.qs[0] >> 4) == 4);       // x[16] = 4: 4.5 -> 4: value -4 * -1 = 4
    CHECK((b4.qs[2] & 0xF) == 8);      // zeros: 8.5 -> 8
    std::vector<float> y(32);
    kernels::dequantize_row(y.data(), QuantType::q4_0, reinterpret_cast<const std::byte*>(&b4), 32);
    CHECK(y[0] == 8.0f);
    CHECK(y[1] == -7.0f);
    CHECK(y[16] == 4.0f);

    // An all-zero block: d = 0, every value 0 (no division by zero).
    std::fill(x.begin(), x.end(), 0.0f);
    kernels::quantize_row_q8_0(&b8, x.data(), 32);
    CHECK(b8.d == 0);
    kernels::dequantize_row(y.data(), QuantType::q8_0, reinterpret_cast<const std::byte*>(&b8), 32);
    for (float v : y) CHECK(v == 0.0f);
}

TEST_CASE("quantization: bad rows are refused with the value named") {
    std::vector<float> x(64, 0.5f);
    std::vector<std::byte> out(kernels::quant_row_bytes(QuantType::q8_0, 64));
    CHECK_THROWS_WITH_AS(kernels::quantize_row(out.data(), QuantType::q8_0, x.data(), 48),
                         doctest::Contains("row length 48"), InvalidArgument);
    x[37] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(kernels::quantize_row(out.data(), QuantType::q4_0, x.data(), 64), doctest::Contains("at 37"),
                         NumericError);
    x[37] = 1e12f;  // the block scale would overflow fp16
    CHECK_THROWS_WITH_AS(kernels::quantize_row(out.data(), QuantType::q8_0, x.data(), 64), doctest::Contains("fp16"),
                         NumericError);
    CHECK_THROWS_AS(kernels::QuantMatrixView(QuantType::q4_0, out.data(), 2, 40), ShapeError);
    CHECK_THROWS_AS(kernels::QuantMatrixView(QuantType::q4_0, out.data(), 2, 64, 10), ShapeError);
}

namespace {
/// The exact product A op(Wdq) in double, Wdq the dequantized W, and the magnitude sum |a||w| for the
/// tolerance.
template <class T>
double quant_ref(const std::vector<T>& A, Index lda, const std::vector<float>& Wdq, Index wcols, kernels::Op op, Index i,
                 Index j, Index k, double* mag) {
    double s = 0, m = 0;
    for (Index p = 0; p < k; ++p) {
        const double a = static_cast<double>(A[static_cast<std::size_t>(i * lda + p)]);
        const double w = op == kernels::Op::trans ? Wdq[static_cast<std::size_t>(j * wcols + p)]
                                                  : Wdq[static_cast<std::size_t>(p * wcols + j)];
        s += a * w;
        m += std::abs(a * w);
    }
    *mag = m;
    return s;
}

template <class T>
void check_gemm_quant(QuantType t, Index m, Index n, Index k, kernels::Op op, float beta, Rng& rng) {
    CAPTURE(std::string(kernels::to_string(t)));
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(k);
    CAPTURE(op == kernels::Op::trans);
    CAPTURE(beta);
    // W [wr, wc] with wc a multiple of 32: [n, k] when trans, [k, n] when none.
    const Index wr = op == kernels::Op::trans ? n : k, wc = op == kernels::Op::trans ? k : n;
    std::vector<float> Wf(static_cast<std::size_t>(wr * wc));
    for (auto& v : Wf) v = static_cast<float>(rng.normal(0.0, 0.5));
    // Padded rows, and the first block one byte off any alignment.
    const std::size_t rb = kernels::quant_row_bytes(t, wc), stride = rb + 7;
    std::vector<std::byte> store(static_cast<std::size_t>(wr) * stride + 1);
    for (Index i = 0; i < wr; ++i) kernels::quantize_row(store.data() + 1 + i * stride, t, Wf.data() + i * wc, wc);
    const kernels::QuantMatrixView W(t, store.data() + 1, wr, wc, stride);
    std::vector<float> Wdq(Wf.size());
    for (Index i = 0; i < wr; ++i) kernels::dequantize_row(Wdq.data() + i * wc, t, W.row_ptr(i), wc);
    const Index lda = k + 3, ldc = n + 2;
    std::vector<T> A(static_cast<std::size_t>(m * lda + 1)), C0(static_cast<std::size_t>(m * ldc));
    for (auto& v : A) v = static_cast<T>(rng.normal());
    for (auto& v : C0) v = static_cast<T>(rng.normal());
    const T alpha = T(0.75);
    std::vector<T> C = C0;
    kernels::gemm_quant<T>(MatrixView<T>(C.data(), m, n, ldc), ConstMatrixView<T>(A.data() + 1, m, k, lda), W, op, alpha,
                           static_cast<T>(beta));
    const double eps = std::is_same_v<T, float> ? 6e-8 : 1.2e-16;
    std::vector<T> Ashift(A.begin() + 1, A.end());
    for (Index i = 0; i < m; ++i)
        for (Index j = 0; j < n; ++j) {
            double mag;
            const double ref = alpha * quant_ref(Ashift, lda, Wdq, wc, op, i, j, k, &mag) +
                               beta * static_cast<double>(C0[static_cast<std::size_t>(i * ldc + j)]);
            const double got = static_cast<double>(C[static_cast<std::size_t>(i * ldc + j)]);
            REQUIRE(std::abs(got - ref) <= 4.0 * static_cast<double>(k) * eps * (mag + 1.0));
        }
    // Padding between rows of C untouched.
    for (Index i = 0; i < m; ++i)
        for (Index j = n; j < ldc; ++j)
            REQUIRE(C[static_cast<std::size_t>(i * ldc + j)] == C0[static_cast<std::size_t>(i * ldc + j)]);
    // The same bits on one thread and on two.
    std::vector<T> C1 = C0, C2 = C0;
    quant_with_threads(1, [&] {
        kernels::gemm_quant<T>(MatrixView<T>(C1.data(), m, n, ldc), ConstMatrixView<T>(A.data() + 1, m, k, lda), W, op,
                               alpha, static_cast<T>(beta));
    });
    quant_with_threads(2, [&] {
        kernels::gemm_quant<T>(MatrixView<T>(C2.data(), m, n, ldc), ConstMatrixView<T>(A.data() + 1, m, k, lda), W, op,
                               alpha, static_cast<T>(beta));
    });
    REQUIRE(C1 == C2);
}
}  // namespace

TEST_CASE_TEMPLATE("kernels::gemm_quant: fused and panel paths equal the dequantized product (shapes, tails, strides)", T,
                   float, double) {
    // Small panels and no thread threshold, so tails and splits happen on small shapes.
    QuantKnob<Index> cols(kernels::detail::quant_panel_cols(), 64), depth(kernels::detail::quant_panel_depth(), 64);
    QuantKnob<Index> par(kernels::detail::gemm_parallel_min(), 1);
    Rng rng(31);
    for (QuantType t : {QuantType::q8_0, QuantType::q4_0})
        for (kernels::Op op : {kernels::Op::trans, kernels::Op::none})
            for (Index m : {1, 2, 3, 4, 5, 9})
                for (float beta : {0.0f, 1.0f}) {
                    // The quantized side must be a multiple of 32; the other any size.
                    const Index free_side = m * 37 % 300 + 1;
                    if (op == kernels::Op::trans)
                        check_gemm_quant<T>(t, m, free_side, 96 + 32 * (m % 3), op, beta, rng);
                    else
                        check_gemm_quant<T>(t, m, 288 + 32 * (m % 2), free_side, op, beta, rng);
                }
    // Longer reductions than a panel, wider outputs than a fused column chunk.
    check_gemm_quant<T>(QuantType::q4_0, 2, 33, 320, kernels::Op::trans, 0.0f, rng);
    check_gemm_quant<T>(QuantType::q8_0, 3, 544, 70, kernels::Op::none, 1.0f, rng);
    check_gemm_quant<T>(QuantType::q8_0, 40, 100, 320, kernels::Op::trans, 1.0f, rng);
    check_gemm_quant<T>(QuantType::q4_0, 40, 320, 150, kernels::Op::none, 0.0f, rng);
}

TEST_CASE("kernels::gemm_quant: shape errors and empty products") {
    std::vector<std::byte> store(kernels::quant_row_bytes(QuantType::q8_0, 64) * 3);
    const kernels::QuantMatrixView W(QuantType::q8_0, store.data(), 3, 64);
    std::vector<float> A(2 * 64), C(2 * 3, 5.0f);
    CHECK_THROWS_WITH_AS(kernels::gemm_quant<float>(MatrixView<float>(C.data(), 2, 3), ConstMatrixView<float>(A.data(), 2, 60),
                                                    W, kernels::Op::trans),
                         doctest::Contains("q8_0"), ShapeError);
    kernels::gemm_quant<float>(MatrixView<float>(C.data(), 0, 3), ConstMatrixView<float>(A.data(), 0, 64), W,
                               kernels::Op::trans);
    CHECK(C[0] == 5.0f);
}

TEST_CASE("quantization: the vector block decoders give the plain loops' values bit for bit") {
    Rng rng(77);
    const Index n = 32 * 40;
    std::vector<float> x(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) x[static_cast<std::size_t>(i)] = static_cast<float>(rng.normal() * std::exp(rng.uniform(-9, 9)));
    for (QuantType t : {QuantType::q8_0, QuantType::q4_0}) {
        std::vector<std::byte> blocks(kernels::quant_row_bytes(t, n) + 1);
        kernels::quantize_row(blocks.data() + 1, t, x.data(), n);  // unaligned blocks
        std::vector<float> fast(static_cast<std::size_t>(n)), plain(fast.size());
        kernels::dequantize_row(fast.data(), t, blocks.data() + 1, n);
        kernels::dequantize_row_plain(plain.data(), t, blocks.data() + 1, n);
        CHECK(std::memcmp(fast.data(), plain.data(), fast.size() * sizeof(float)) == 0);
    }
}

TEST_CASE("quantization: the build takes its target's vector block decoders (NEON on aarch64)") {
    // The vector forms equal the loops bit for bit (above), so only the compiled-in name tells a NEON
    // build from one that fell back to the loops: tools/test-aarch64.sh runs this under qemu.
    const std::string isa = kernels::quant_decoder_isa;
    CAPTURE(isa);
#if defined(__aarch64__)
    CHECK(isa == "neon");
#elif defined(__AVX512F__)
    CHECK(isa == "avx512");
#else
    CHECK(isa == "plain");
#endif
}
