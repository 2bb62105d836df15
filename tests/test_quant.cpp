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

namespace {
/// llama.cpp's Q4_0 x Q8_0 block dot product in double, from the blocks: sum_b dw_b dx_b sum_j
/// (nibble_j - 8) q_j, the activations quantized by the plain quantize_row_q8_0.
double int8_dot_reference(const std::byte* w, const float* x, Index k) {
    std::vector<kernels::BlockQ8_0> xb(static_cast<std::size_t>(k / 32));
    kernels::quantize_row_q8_0(xb.data(), x, k);
    double sum = 0.0;
    for (Index b = 0; b < k / 32; ++b) {
        kernels::BlockQ4_0 wb;
        std::memcpy(&wb, w + b * 18, sizeof wb);
        const auto& xq = xb[static_cast<std::size_t>(b)];
        long dot = 0;
        for (int j = 0; j < 16; ++j)
            dot += long((wb.qs[j] & 0x0F) - 8) * xq.qs[j] + long((wb.qs[j] >> 4) - 8) * xq.qs[j + 16];
        sum += double(kernels::detail::block_scale(wb.d)) * double(kernels::detail::block_scale(xq.d)) * double(dot);
    }
    return sum;
}
}  // namespace

TEST_CASE("kernels::gemm_quant_rounded: decode rows of Q4_0 take llama.cpp's int8 block dot products") {
    QuantKnob<Index> par(kernels::detail::gemm_parallel_min(), 1);
    Rng rng(41);
    for (Index k : {64, 192, 640})
        for (Index n : {1, 63, 65, 130})
            for (Index m : {1, 2, 4})
                for (float beta : {0.0f, 1.0f}) {
                    CAPTURE(k);
                    CAPTURE(n);
                    CAPTURE(m);
                    CAPTURE(beta);
                    std::vector<float> Wf(static_cast<std::size_t>(n * k));
                    for (auto& v : Wf) v = static_cast<float>(rng.normal(0.0, 0.05));
                    const std::size_t rb = kernels::quant_row_bytes(QuantType::q4_0, k), stride = rb + 5;
                    std::vector<std::byte> store(static_cast<std::size_t>(n) * stride + 1);
                    for (Index i = 0; i < n; ++i)
                        kernels::quantize_row(store.data() + 1 + i * stride, QuantType::q4_0, Wf.data() + i * k, k);
                    const kernels::QuantMatrixView W(QuantType::q4_0, store.data() + 1, n, k, stride);
                    const Index lda = k + 3, ldc = n + 2;
                    std::vector<float> A(static_cast<std::size_t>(m * lda)), C0(static_cast<std::size_t>(m * ldc));
                    for (auto& v : A) v = static_cast<float>(rng.normal());
                    for (auto& v : C0) v = static_cast<float>(rng.normal());
                    // Ties of the activation rounding (x / d = j + 0.5 exactly: d = 1 when amax = 127) and a
                    // zero block.
                    A[0] = 127.0f;
                    A[1] = 2.5f;
                    A[2] = -2.5f;
                    A[3] = 0.5f;
                    std::fill_n(A.begin() + 32, 32, 0.0f);
                    const ConstMatrixView<float> Av(A.data(), m, k, lda);
                    std::vector<float> C = C0;
                    kernels::gemm_quant_rounded(MatrixView<float>(C.data(), m, n, ldc), Av, W, kernels::Op::trans, 0.75f,
                                                beta);
                    for (Index i = 0; i < m; ++i)
                        for (Index j = 0; j < n; ++j) {
                            double ref = 0.0, mag = 0.0;
                            if (kernels::quant_int8_products()) {
                                ref = int8_dot_reference(W.row_ptr(j), Av.row_ptr(i), k);
                                // |terms| bound for the tolerance: the dequantized weight times |x|.
                                std::vector<float> wd(static_cast<std::size_t>(k));
                                kernels::dequantize_row(wd.data(), QuantType::q4_0, W.row_ptr(j), k);
                                for (Index c = 0; c < k; ++c) mag += std::abs(double(wd[static_cast<std::size_t>(c)]) * Av(i, c));
                            } else {  // the exact products
                                std::vector<float> wd(static_cast<std::size_t>(k));
                                kernels::dequantize_row(wd.data(), QuantType::q4_0, W.row_ptr(j), k);
                                for (Index c = 0; c < k; ++c) {
                                    ref += double(wd[static_cast<std::size_t>(c)]) * Av(i, c);
                                    mag += std::abs(double(wd[static_cast<std::size_t>(c)]) * Av(i, c));
                                }
                            }
                            ref = 0.75 * ref + beta * double(C0[static_cast<std::size_t>(i * ldc + j)]);
                            const double got = C[static_cast<std::size_t>(i * ldc + j)];
                            REQUIRE(std::abs(got - ref) <= 4.0 * double(k) * 6e-8 * (mag + 1.0));
                        }
                    for (Index i = 0; i < m; ++i)  // padding untouched
                        for (Index j = n; j < ldc; ++j)
                            REQUIRE(C[static_cast<std::size_t>(i * ldc + j)] == C0[static_cast<std::size_t>(i * ldc + j)]);
                    std::vector<float> C1 = C0, C2 = C0;
                    quant_with_threads(1, [&] {
                        kernels::gemm_quant_rounded(MatrixView<float>(C1.data(), m, n, ldc), Av, W, kernels::Op::trans,
                                                    0.75f, beta);
                    });
                    quant_with_threads(2, [&] {
                        kernels::gemm_quant_rounded(MatrixView<float>(C2.data(), m, n, ldc), Av, W, kernels::Op::trans,
                                                    0.75f, beta);
                    });
                    REQUIRE(C1 == C2);
                    REQUIRE(C1 == C);
                }
}

TEST_CASE("kernels::gemm_quant_rounded: the activation quantizer gives quantize_row_q8_0's blocks") {
    Rng rng(43);
    const Index k = 64 * 7;
    std::vector<float> x(static_cast<std::size_t>(k));
    for (auto& v : x) v = static_cast<float>(rng.normal() * std::exp(rng.uniform(-6, 6)));
    // Ties both ways, values an ulp either side of a tie, a zero block, a one-value block.
    for (int j = 0; j < 32; ++j) x[static_cast<std::size_t>(j)] = float(j - 16) + 0.5f;
    x[0] = 127.0f;
    x[33] = 127.0f;
    x[34] = std::nextafter(2.5f, 0.0f);
    x[35] = std::nextafter(-2.5f, 0.0f);
    x[36] = std::nextafter(0.5f, 1.0f);
    std::fill_n(x.begin() + 64, 32, 0.0f);
    std::fill_n(x.begin() + 96, 32, 0.0f);
    x[100] = -3e-3f;
    kernels::detail::Q8ActivationRow row;
    kernels::detail::quantize_activation_row(row, x.data(), k);
    std::vector<kernels::BlockQ8_0> ref(static_cast<std::size_t>(k / 32));
    kernels::quantize_row_q8_0(ref.data(), x.data(), k);
    for (Index b = 0; b < k / 32; ++b) {
        CAPTURE(b);
        const auto& r = ref[static_cast<std::size_t>(b)];
        CHECK(row.scale[static_cast<std::size_t>(b)] == kernels::detail::block_scale(r.d));
        const std::int8_t* q = row.q.data() + (b / 2) * 64 + (b % 2) * 16;
        CHECK(std::memcmp(q, r.qs, 16) == 0);
        CHECK(std::memcmp(q + 32, r.qs + 16, 16) == 0);
        int sum = 0;
        for (int j = 0; j < 32; ++j) sum += r.qs[j];
        CHECK(row.offset[static_cast<std::size_t>(b / 2 * 16 + (b % 2) * 4)] == -8 * sum);
    }
}

TEST_CASE("kernels::gemm_quant_rounded: many rows multiply bf16-rounded activations and weights") {
    // Panels of 5 rows of W, so that several panels and a tail happen.
    QuantKnob<Index> panel(kernels::detail::quant_bf16_panel_elements(), 5 * 96);
    Rng rng(47);
    for (QuantType t : {QuantType::q8_0, QuantType::q4_0})
        for (kernels::Op op : {kernels::Op::trans, kernels::Op::none})
            for (float beta : {0.0f, 1.0f}) {
                CAPTURE(kernels::to_string(t));
                CAPTURE(op == kernels::Op::trans);
                CAPTURE(beta);
                const Index m = 9, wr = 23, wc = 96;  // W [wr, wc]
                const Index k = op == kernels::Op::trans ? wc : wr, n = op == kernels::Op::trans ? wr : wc;
                std::vector<float> Wf(static_cast<std::size_t>(wr * wc));
                for (auto& v : Wf) v = static_cast<float>(rng.normal(0.0, 0.5));
                const auto store = quantized(t, Wf, wr, wc);
                const kernels::QuantMatrixView W(t, store.data(), wr, wc);
                std::vector<float> Wdq(Wf.size());
                for (Index i = 0; i < wr; ++i) kernels::dequantize_row(Wdq.data() + i * wc, t, W.row_ptr(i), wc);
                const Index lda = k + 1, ldc = n + 3;
                std::vector<float> A(static_cast<std::size_t>(m * lda)), C0(static_cast<std::size_t>(m * ldc));
                for (auto& v : A) v = static_cast<float>(rng.normal());
                for (auto& v : C0) v = static_cast<float>(rng.normal());
                std::vector<float> C = C0;
                kernels::gemm_quant_rounded(MatrixView<float>(C.data(), m, n, ldc), ConstMatrixView<float>(A.data(), m, k, lda),
                                            W, op, 0.5f, beta);
                const bool b16 = kernels::quant_bf16_products();
                const auto round = [&](float v) { return b16 ? kernels::to_float(kernels::to_bf16(v)) : v; };
                for (Index i = 0; i < m; ++i)
                    for (Index j = 0; j < n; ++j) {
                        double ref = 0.0, mag = 0.0;
                        for (Index c = 0; c < k; ++c) {
                            const float w = op == kernels::Op::trans ? Wdq[static_cast<std::size_t>(j * wc + c)]
                                                                     : Wdq[static_cast<std::size_t>(c * wc + j)];
                            const double p = double(round(w)) * double(round(A[static_cast<std::size_t>(i * lda + c)]));
                            ref += p;
                            mag += std::abs(p);
                        }
                        ref = 0.5 * ref + beta * double(C0[static_cast<std::size_t>(i * ldc + j)]);
                        REQUIRE(std::abs(double(C[static_cast<std::size_t>(i * ldc + j)]) - ref) <=
                                4.0 * double(k) * 6e-8 * (mag + 1.0));
                    }
                for (Index i = 0; i < m; ++i)
                    for (Index j = n; j < ldc; ++j)
                        REQUIRE(C[static_cast<std::size_t>(i * ldc + j)] == C0[static_cast<std::size_t>(i * ldc + j)]);
            }
}

TEST_CASE("kernels::gemm_quant_rounded: bad input is refused") {
    std::vector<std::byte> store(kernels::quant_row_bytes(QuantType::q4_0, 64) * 3);
    const kernels::QuantMatrixView W(QuantType::q4_0, store.data(), 3, 64);
    std::vector<float> A(64, 1.0f), C(3);
    CHECK_THROWS_WITH_AS(kernels::gemm_quant_rounded(MatrixView<float>(C.data(), 1, 3),
                                                     ConstMatrixView<float>(A.data(), 1, 32), W, kernels::Op::trans),
                         doctest::Contains("q4_0"), ShapeError);
    if (kernels::quant_int8_products()) {
        A[7] = std::numeric_limits<float>::quiet_NaN();
        CHECK_THROWS_WITH_AS(kernels::gemm_quant_rounded(MatrixView<float>(C.data(), 1, 3),
                                                         ConstMatrixView<float>(A.data(), 1, 64), W, kernels::Op::trans),
                             doctest::Contains("not finite"), NumericError);
    }
}

TEST_CASE("kernels::gemm_quant_rounded: int8 decode products equal the numpy reference's block dot products (golden)") {
    const auto f = io::SafetensorsFile::load(std::string(COMIGS_GOLDEN_DIR) + "/quant_blocks.safetensors");
    const Index rows = f.shape("x")[0], cols = f.shape("x")[1];
    const auto x = f.get<float>("x");
    const auto blocks = f.get<std::uint8_t>("q4_0.blocks");
    const auto dot = f.get<double>("q4_0_q8_0.dot");
    REQUIRE(dot.size() == static_cast<std::size_t>(rows * rows));
    const kernels::QuantMatrixView W(QuantType::q4_0, reinterpret_cast<const std::byte*>(blocks.data()), rows, cols);
    std::vector<float> wd(static_cast<std::size_t>(rows * cols));
    for (Index i = 0; i < rows; ++i) kernels::dequantize_row(wd.data() + i * cols, QuantType::q4_0, W.row_ptr(i), cols);
    for (Index j0 = 0; j0 < rows; j0 += 4) {  // up to 4 activation rows at a time: the decode path
        const Index m = std::min<Index>(4, rows - j0);
        const ConstMatrixView<float> A(x.data() + j0 * cols, m, cols);
        std::vector<float> C(static_cast<std::size_t>(m * rows)), E(C.size());
        kernels::gemm_quant_rounded(MatrixView<float>(C.data(), m, rows), A, W, kernels::Op::trans);
        kernels::gemm_quant<float>(MatrixView<float>(E.data(), m, rows), A, W, kernels::Op::trans);
        for (Index j = 0; j < m; ++j)
            for (Index i = 0; i < rows; ++i) {
                CAPTURE(i);
                CAPTURE(j0 + j);
                double mag = 0.0;
                for (Index c = 0; c < cols; ++c) mag += std::abs(double(wd[static_cast<std::size_t>(i * cols + c)]) * A(j, c));
                const double got = C[static_cast<std::size_t>(j * rows + i)];
                if (kernels::quant_int8_products())
                    CHECK(std::abs(got - dot[static_cast<std::size_t>(i * rows + j0 + j)]) <= 1e-5 * mag + 1e-30);
                else  // no int8 products on this target: the exact ones
                    CHECK(got == E[static_cast<std::size_t>(j * rows + i)]);
            }
    }
}
