#pragma once
// GGML's block-quantized formats for frozen weights, and the products against them.
//
// Q8_0: blocks of 32 consecutive values of a row; an IEEE fp16 scale d = amax / 127 and 32 int8
//       q = roundf(x / d) (half away from zero). Value q * d. 34 bytes a block (8.5 bits a weight).
// Q4_0: blocks of 32; d = max / -8, max the value of largest magnitude (sign kept, first one on ties);
//       16 bytes, byte j holding q_j = min(15, (int8)(x_j / d + 8.5)) in its low nibble and q_{j+16} in
//       its high nibble. Value (q - 8) * d. 18 bytes a block (4.5 bits a weight).
// The quantizers are ggml's reference functions (quantize_row_q8_0_ref / q4_0_ref) with the float
// operations in the same order and no contraction into FMAs, so the bytes are those llama.cpp writes
// and the dequantized values those it reads; tools/quant_reference.py re-implements them in numpy for
// the golden tests. A dequantized value is always the float q * d (also for double callers).
//
// The products never hold an fp32 copy of a whole weight matrix. gemm_quant computes with the
// dequantized values in fp32 (the reference; gradient checks and golden tests): many activation rows
// (training) dequantize a panel of W at a time into a small buffer and multiply it with the fp32 GEMM
// (the same numbers as with the dequantized weight up to summation order, at fp32 speed); a few rows
// (decode) take fused kernels that decode each block in registers and multiply it at once.
// gemm_quant_rounded (what a FrozenLinear uses unless fp32_compute) rounds operands where the CPU then
// multiplies faster: bf16 panels into the bf16 GEMM for many rows (as the bf16 base), and for decode
// rows of Q4_0 llama.cpp's int8 block dot products (activations quantized to Q8_0 blocks, AVX512-VNNI).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
// The block decoders below have one vector form per target: AVX-512 (x86-64 builds with -mavx512f),
// NEON (aarch64); every other target takes the plain loops, which are also the reference the tests
// hold the vector forms to. The macros are internal and undefined at the end of this header.
#if defined(__AVX512F__)
#include <immintrin.h>
#define COMIGS_QUANT_AVX512 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define COMIGS_QUANT_NEON 1
#endif
// The int8 decode products (Q4_0 weights against Q8_0-quantized activations) need AVX512-VNNI's
// vpdpbusd (with BW/VL); without it those products take the exact fused kernels.
#if defined(COMIGS_QUANT_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COMIGS_QUANT_VNNI 1
#endif
#if defined(__F16C__) && !defined(COMIGS_QUANT_AVX512)
#include <immintrin.h>
#endif

#include "../detail/aligned.hpp"
#include "../detail/float16.hpp"
#include "gemm.hpp"
#include "gemm_bf16.hpp"

namespace comigs::kernels {

/// The GGML block formats comigs stores frozen weights in.
enum class QuantType { q8_0, q4_0 };

inline const char* to_string(QuantType t) { return t == QuantType::q8_0 ? "q8_0" : "q4_0"; }

/// The instruction set the block decoders were compiled for: "avx512", "neon" or "plain" (the loops).
/// The aarch64 test run checks that it is "neon" there: the vector forms equal the loops bit for bit,
/// so only this tells which one a build took.
inline constexpr const char* quant_decoder_isa =
#if defined(COMIGS_QUANT_AVX512)
    "avx512";
#elif defined(COMIGS_QUANT_NEON)
    "neon";
#else
    "plain";
#endif

/// Values per block (both formats).
inline constexpr Index quant_block_size = 32;

/// One Q8_0 block: fp16 scale, then 32 int8 values.
struct BlockQ8_0 {
    std::uint16_t d;
    std::int8_t qs[32];
};
/// One Q4_0 block: fp16 scale, then 16 bytes of two 4-bit values each (low nibble j, high nibble j + 16).
struct BlockQ4_0 {
    std::uint16_t d;
    std::uint8_t qs[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && alignof(BlockQ8_0) == 2, "Q8_0 blocks are 34 bytes, as in GGML");
static_assert(sizeof(BlockQ4_0) == 18 && alignof(BlockQ4_0) == 2, "Q4_0 blocks are 18 bytes, as in GGML");

/// Bytes of one block of type t.
constexpr std::size_t quant_block_bytes(QuantType t) { return t == QuantType::q8_0 ? 34 : 18; }

/// Bytes of a row of `cols` values (cols a multiple of 32).
constexpr std::size_t quant_row_bytes(QuantType t, Index cols) {
    return static_cast<std::size_t>(cols / quant_block_size) * quant_block_bytes(t);
}

/// Q8_0 blocks of x[0, n) (n a multiple of 32; values finite), ggml's quantize_row_q8_0_ref.
inline void quantize_row_q8_0(BlockQ8_0* y, const float* x, Index n) {
    for (Index b = 0; b < n / 32; ++b) {
        const float* xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = comigs::detail::float_to_f16_bits(d);
        for (int j = 0; j < 32; ++j) y[b].qs[j] = static_cast<std::int8_t>(std::round(xb[j] * id));
    }
}

/// Q4_0 blocks of x[0, n) (n a multiple of 32; values finite), ggml's quantize_row_q4_0_ref.
inline void quantize_row_q4_0(BlockQ4_0* y, const float* x, Index n) {
    for (Index b = 0; b < n / 32; ++b) {
        const float* xb = x + b * 32;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; ++j)
            if (amax < std::fabs(xb[j])) {
                amax = std::fabs(xb[j]);
                max = xb[j];
            }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = comigs::detail::float_to_f16_bits(d);
        for (int j = 0; j < 16; ++j) {
            // The product is rounded to float before 8.5 is added (a product of two floats is exact in
            // double, so this rounds once, and no compiler can fuse it into an FMA).
            const float x0 = static_cast<float>(static_cast<double>(xb[j]) * id);
            const float x1 = static_cast<float>(static_cast<double>(xb[j + 16]) * id);
            const auto q0 = static_cast<std::uint8_t>(std::min(15, static_cast<int>(static_cast<std::int8_t>(x0 + 8.5f))));
            const auto q1 = static_cast<std::uint8_t>(std::min(15, static_cast<int>(static_cast<std::int8_t>(x1 + 8.5f))));
            y[b].qs[j] = static_cast<std::uint8_t>(q0 | (q1 << 4));
        }
    }
}

namespace detail {
/// The fp16 block scale as float (exact: every fp16 value is a float).
inline float block_scale(std::uint16_t d) {
#if defined(__F16C__)
    return _cvtsh_ss(d);
#elif defined(__aarch64__)
    return static_cast<float>(std::bit_cast<__fp16>(d));
#else
    return comigs::detail::f16_bits_to_float(d);
#endif
}
inline float block_scale(const std::byte* block) {
    std::uint16_t d;
    std::memcpy(&d, block, 2);
    return block_scale(d);
}

/// y[0, 32) = the values of one block (as float q * d, then converted to T): the plain reference.
template <class T>
inline void dequantize_block(T* y, const BlockQ8_0& b) {
    const float d = block_scale(b.d);
    for (int j = 0; j < 32; ++j) y[j] = static_cast<T>(static_cast<float>(b.qs[j]) * d);
}
template <class T>
inline void dequantize_block(T* y, const BlockQ4_0& b) {
    const float d = block_scale(b.d);
    for (int j = 0; j < 16; ++j) {
        y[j] = static_cast<T>(static_cast<float>((b.qs[j] & 0x0F) - 8) * d);
        y[j + 16] = static_cast<T>(static_cast<float>((b.qs[j] >> 4) - 8) * d);
    }
}
template <class T>
inline void dequantize_block_plain(T* y, QuantType t, const std::byte* p) {
    if (t == QuantType::q8_0) {
        BlockQ8_0 blk;
        std::memcpy(&blk, p, sizeof blk);
        dequantize_block(y, blk);
    } else {
        BlockQ4_0 blk;
        std::memcpy(&blk, p, sizeof blk);
        dequantize_block(y, blk);
    }
}

#if defined(COMIGS_QUANT_AVX512)
/// The 32 levels of a block (q for Q8_0, q - 8 for Q4_0) as floats in two registers (0-15, 16-31).
inline void decode_levels(const std::byte* p, QuantType t, __m512& lo, __m512& hi) {
    const auto* q = reinterpret_cast<const __m128i*>(p + 2);
    if (t == QuantType::q8_0) {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
    } else {
        // Each byte in a 32-bit lane; the permute reads the low 4 bits of the lane as the index into
        // the table of q - 8, so the low nibble needs no mask.
        const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q));
        lo = _mm512_permutexvar_ps(v, table);
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    }
}
/// The 32 values of a block in two registers (values 0-15, 16-31), each the float q * d.
inline void decode_block(const std::byte* p, QuantType t, __m512& lo, __m512& hi) {
    decode_levels(p, t, lo, hi);
    const __m512 d = _mm512_set1_ps(block_scale(p));
    lo = _mm512_mul_ps(lo, d);
    hi = _mm512_mul_ps(hi, d);
}
#elif defined(COMIGS_QUANT_NEON)
/// The 32 values of a block in eight registers, each the float q * d.
inline void decode_block(const std::byte* p, QuantType t, float32x4_t v[8]) {
    const float32x4_t d = vdupq_n_f32(block_scale(p));
    const auto* q = reinterpret_cast<const std::uint8_t*>(p + 2);
    int8x16_t q0, q1;
    if (t == QuantType::q8_0) {
        q0 = vreinterpretq_s8_u8(vld1q_u8(q));
        q1 = vreinterpretq_s8_u8(vld1q_u8(q + 16));
    } else {
        const uint8x16_t b = vld1q_u8(q);
        q0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
        q1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), vdupq_n_s8(8));
    }
    const int16x8_t w[4] = {vmovl_s8(vget_low_s8(q0)), vmovl_high_s8(q0), vmovl_s8(vget_low_s8(q1)), vmovl_high_s8(q1)};
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w[i]))), d);
        v[2 * i + 1] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(w[i])), d);
    }
}
#endif

/// y[0, 32) = the values of the block at p (the vector decoders for float where the target has one).
template <class T>
inline void dequantize_block(T* y, QuantType t, const std::byte* p) {
#if defined(COMIGS_QUANT_AVX512)
    if constexpr (std::is_same_v<T, float>) {
        __m512 lo, hi;
        decode_block(p, t, lo, hi);
        _mm512_storeu_ps(y, lo);
        _mm512_storeu_ps(y + 16, hi);
        return;
    }
#elif defined(COMIGS_QUANT_NEON)
    if constexpr (std::is_same_v<T, float>) {
        float32x4_t v[8];
        decode_block(p, t, v);
        for (int i = 0; i < 8; ++i) vst1q_f32(y + 4 * i, v[i]);
        return;
    }
#endif
    dequantize_block_plain(y, t, p);
}
}  // namespace detail

/// y[0, n) = the values of the blocks at `blocks` (n a multiple of 32; blocks need no alignment).
template <class T>
void dequantize_row(T* y, QuantType t, const std::byte* blocks, Index n) {
    for (Index b = 0; b < n / 32; ++b)
        detail::dequantize_block(y + b * 32, t, blocks + static_cast<std::size_t>(b) * quant_block_bytes(t));
}

/// As dequantize_row, always through the plain loops (the reference of the vector decoders).
template <class T>
void dequantize_row_plain(T* y, QuantType t, const std::byte* blocks, Index n) {
    for (Index b = 0; b < n / 32; ++b)
        detail::dequantize_block_plain(y + b * 32, t, blocks + static_cast<std::size_t>(b) * quant_block_bytes(t));
}

/// Quantizes x[0, n) (n a multiple of 32) into blocks of type t at `blocks` (quant_row_bytes(t, n)).
/// Non-finite values are an error: ggml's rounding of them is undefined behaviour.
inline void quantize_row(std::byte* blocks, QuantType t, const float* x, Index n) {
    require(n % quant_block_size == 0, "quantize ", to_string(t), ": row length ", n, " is not a multiple of 32");
    for (Index i = 0; i < n; ++i)
        require<NumericError>(std::isfinite(x[i]), "quantize ", to_string(t), ": value ", x[i], " at ", i,
                              " is not finite");
    // A block scale beyond fp16's range would be stored as infinity.
    const float limit = t == QuantType::q8_0 ? 65504.0f * 127.0f : 65504.0f * 8.0f;
    for (Index i = 0; i < n; ++i)
        require<NumericError>(std::fabs(x[i]) < limit, "quantize ", to_string(t), ": value ", x[i], " at ", i,
                              " gives a block scale beyond fp16's range");
    // Blocks are 2-byte aligned structs; go through a staging block for any address.
    for (Index b = 0; b < n / 32; ++b) {
        std::byte* p = blocks + static_cast<std::size_t>(b) * quant_block_bytes(t);
        if (t == QuantType::q8_0) {
            BlockQ8_0 blk;
            quantize_row_q8_0(&blk, x + b * 32, 32);
            std::memcpy(p, &blk, sizeof blk);
        } else {
            BlockQ4_0 blk;
            quantize_row_q4_0(&blk, x + b * 32, 32);
            std::memcpy(p, &blk, sizeof blk);
        }
    }
}

/// A [rows, cols] weight matrix of GGML blocks, each row `cols / 32` blocks, rows `row_bytes` apart
/// (at least quant_row_bytes(type, cols)). Read-only; the bytes belong to the caller (a FrozenMlp,
/// a mapped GGUF file).
struct QuantMatrixView {
    QuantType type = QuantType::q8_0;
    const std::byte* data = nullptr;
    Index rows = 0;
    Index cols = 0;
    std::size_t row_bytes = 0;

    QuantMatrixView() = default;
    QuantMatrixView(QuantType t, const std::byte* d, Index r, Index c)
        : QuantMatrixView(t, d, r, c, c >= 0 ? quant_row_bytes(t, c) : 0) {}
    QuantMatrixView(QuantType t, const std::byte* d, Index r, Index c, std::size_t stride)
        : type(t), data(d), rows(r), cols(c), row_bytes(stride) {
        require<ShapeError>(r >= 0 && c >= 0, "quantized matrix [", r, ", ", c, "]: sizes must be >= 0");
        require<ShapeError>(c % quant_block_size == 0, "quantized matrix [", r, ", ", c, "] (", to_string(t),
                            "): the row length must be a multiple of 32");
        require<ShapeError>(stride >= quant_row_bytes(t, c), "quantized matrix row stride ", stride,
                            " bytes: below the ", quant_row_bytes(t, c), " bytes of a row");
        require(d != nullptr || r * c == 0, "quantized matrix [", r, ", ", c, "]: null data pointer");
    }
    const std::byte* row_ptr(Index i) const { return data + static_cast<std::size_t>(i) * row_bytes; }
    /// Block b of row i.
    const std::byte* block_ptr(Index i, Index b) const {
        return row_ptr(i) + static_cast<std::size_t>(b) * quant_block_bytes(type);
    }
    bool empty() const { return rows == 0 || cols == 0; }
};

namespace detail {
/// Below this many activation rows the products take the fused kernels (no dequantized panel).
inline Index& quant_fused_max_rows() {
    static Index m = 4;
    return m;
}
/// Rows (trans) or columns (none) of W dequantized at a time by the panel path, a multiple of 32; a
/// test shrinks both to hit the tails.
inline Index& quant_panel_cols() {
    static Index p = 128;
    return p;
}
/// The reduction length of a panel (the other side of the dequantized tile).
inline Index& quant_panel_depth() {
    static Index p = 1024;
    return p;
}

/// out[r][c0 + j] for the rows [i0, i0 + ni) and columns [c0, c0 + nc) of W (c0, nc multiples of 32),
/// into dst with row stride ld.
template <class T>
void dequantize_tile(T* dst, Index ld, const QuantMatrixView& W, Index i0, Index ni, Index c0, Index nc) {
    for (Index i = 0; i < ni; ++i)
        dequantize_row(dst + i * ld, W.type, W.block_ptr(i0 + i, c0 / 32), nc);
}

/// Fused y[m, o] = alpha * sum_k A[m, k] W[o, k] (+ y when accumulate) for rows o in [o0, o1) and the
/// MR <= 4 rows of A: each block is dequantized once into registers and multiplied with every row of
/// A; each row keeps its partial sums in vector lanes until the end of the row (a fixed order: the same
/// result on every thread).
template <class T, int MR>
void fused_rows_trans(MatrixView<T> C, ConstMatrixView<T> A, Index m0, const QuantMatrixView& W, Index o0, Index o1,
                      T alpha, bool accumulate) {
    const Index nb = W.cols / 32;
    const auto store = [&](int m, Index o, T v) {
        T& c = C(m0 + m, o);
        c = accumulate ? c + alpha * v : alpha * v;
    };
#if defined(COMIGS_QUANT_AVX512)
    if constexpr (std::is_same_v<T, float>) {
        // The block type as a compile-time constant: no branch per block.
        const auto rows = [&](auto type) {
            for (Index o = o0; o < o1; ++o) {
                // Per block: the levels times the activations summed in one register, then one FMA with
                // the block scale; even and odd blocks in separate accumulators (two FMA chains).
                __m512 e[MR], d[MR];
                for (int m = 0; m < MR; ++m) e[m] = d[m] = _mm512_setzero_ps();
                const auto step = [&](Index b, __m512* acc) {
                    const std::byte* p = W.block_ptr(o, b);
                    __m512 lo, hi;
                    decode_levels(p, decltype(type)::value, lo, hi);
                    const __m512 scale = _mm512_set1_ps(block_scale(p));
                    for (int m = 0; m < MR; ++m) {
                        const float* a = A.row_ptr(m0 + m) + b * 32;
                        const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(a + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(a)));
                        acc[m] = _mm512_fmadd_ps(t, scale, acc[m]);
                    }
                };
                Index b = 0;
                for (; b + 2 <= nb; b += 2) {
                    step(b, e);
                    step(b + 1, d);
                }
                if (b < nb) step(b, e);
                for (int m = 0; m < MR; ++m) store(m, o, _mm512_reduce_add_ps(_mm512_add_ps(e[m], d[m])));
            }
        };
        if (W.type == QuantType::q8_0)
            rows(std::integral_constant<QuantType, QuantType::q8_0>{});
        else
            rows(std::integral_constant<QuantType, QuantType::q4_0>{});
        return;
    }
#elif defined(COMIGS_QUANT_NEON)
    if constexpr (std::is_same_v<T, float>) {
        for (Index o = o0; o < o1; ++o) {
            float32x4_t acc[MR][2];
            for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.0f);
            for (Index b = 0; b < nb; ++b) {
                float32x4_t v[8];
                decode_block(W.block_ptr(o, b), W.type, v);
                for (int m = 0; m < MR; ++m) {
                    const float* a = A.row_ptr(m0 + m) + b * 32;
                    for (int i = 0; i < 8; ++i) acc[m][i & 1] = vfmaq_f32(acc[m][i & 1], v[i], vld1q_f32(a + 4 * i));
                }
            }
            for (int m = 0; m < MR; ++m) store(m, o, vaddvq_f32(vaddq_f32(acc[m][0], acc[m][1])));
        }
        return;
    }
#endif
    alignas(64) T w[32];
    for (Index o = o0; o < o1; ++o) {
        alignas(64) T acc[MR][32] = {};
        for (Index b = 0; b < nb; ++b) {
            dequantize_block(w, W.type, W.block_ptr(o, b));
            for (int m = 0; m < MR; ++m) {
                const T* a = A.row_ptr(m0 + m) + b * 32;
                T* s = acc[m];
#pragma omp simd
                for (int j = 0; j < 32; ++j) s[j] += w[j] * a[j];
            }
        }
        for (int m = 0; m < MR; ++m) {
            // Pairwise sum of the 32 lanes.
            T* s = acc[m];
            for (int half = 16; half >= 1; half /= 2)
                for (int j = 0; j < half; ++j) s[j] += s[j + half];
            store(m, o, s[0]);
        }
    }
}

/// Fused C[m, c] = alpha * sum_o A[m, o] W[o, c] (+ C when accumulate) for the columns [c0, c0 + nc)
/// (c0 and nc multiples of 32) and the MR <= 4 rows of A: the columns' sums stay in a buffer while the
/// rows of W stream past in order (whole row segments one after the other: strided reads of a few
/// blocks per row would cost a TLB miss per row on large matrices). Each column is summed over the
/// rows in order, whatever the column range: results do not depend on how the columns are split.
template <class T, int MR>
void fused_cols_none(MatrixView<T> C, ConstMatrixView<T> A, Index m0, const QuantMatrixView& W, Index c0, Index nc,
                     T alpha, bool accumulate) {
    thread_local comigs::detail::aligned_vector<T> acc_store, w_store;
    acc_store.assign(static_cast<std::size_t>(MR * nc), T(0));
    w_store.resize(static_cast<std::size_t>(nc));
    T* w = w_store.data();
    for (Index o = 0; o < W.rows; ++o) {
        dequantize_row(w, W.type, W.block_ptr(o, c0 / 32), nc);
        for (int m = 0; m < MR; ++m) {
            const T a = A(m0 + m, o);
            T* s = acc_store.data() + m * nc;
#pragma omp simd
            for (Index j = 0; j < nc; ++j) s[j] += a * w[j];
        }
    }
    for (int m = 0; m < MR; ++m) {
        T* c = C.row_ptr(m0 + m) + c0;
        const T* s = acc_store.data() + m * nc;
        for (Index j = 0; j < nc; ++j) c[j] = accumulate ? c[j] + alpha * s[j] : alpha * s[j];
    }
}

template <class T, int MR>
void fused_part(MatrixView<T> C, ConstMatrixView<T> A, Index m0, const QuantMatrixView& W, Op opw, Index lo, Index hi,
                T alpha, bool accumulate) {
    if (opw == Op::trans)
        fused_rows_trans<T, MR>(C, A, m0, W, lo, hi, alpha, accumulate);
    else
        fused_cols_none<T, MR>(C, A, m0, W, lo, hi - lo, alpha, accumulate);
}

/// The fused kernels over all rows of A (at most quant_fused_max_rows), for the output range [lo, hi)
/// (W rows when trans, W columns when none).
template <class T>
void fused_range(MatrixView<T> C, ConstMatrixView<T> A, const QuantMatrixView& W, Op opw, Index lo, Index hi, T alpha,
                 bool accumulate) {
    for (Index m0 = 0; m0 < A.rows; m0 += 4) {
        switch (std::min<Index>(4, A.rows - m0)) {
            case 1: fused_part<T, 1>(C, A, m0, W, opw, lo, hi, alpha, accumulate); break;
            case 2: fused_part<T, 2>(C, A, m0, W, opw, lo, hi, alpha, accumulate); break;
            case 3: fused_part<T, 3>(C, A, m0, W, opw, lo, hi, alpha, accumulate); break;
            default: fused_part<T, 4>(C, A, m0, W, opw, lo, hi, alpha, accumulate); break;
        }
    }
}

/// The panel path for the output columns [lo, lo + cnt) of C: tiles of W dequantized into `buf` and
/// multiplied with the serial GEMM, the reduction in panels of quant_panel_depth (accumulated in order).
template <class T>
void panel_range(MatrixView<T> C, ConstMatrixView<T> A, const QuantMatrixView& W, Op opw, Index lo, Index cnt, T alpha,
                 T beta) {
    thread_local comigs::detail::aligned_vector<T> buf;  // kept between calls: no page faults per call
    const Index k = A.cols;
    // The depth is a multiple of 32 (W's blocks run along k when trans, across it when none).
    const Index depth = std::max<Index>(32, detail::quant_panel_depth() / 32 * 32);
    for (Index k0 = 0; k0 < k; k0 += depth) {
        const Index kc = std::min(depth, k - k0);
        buf.resize(static_cast<std::size_t>(kc * cnt));
        const MatrixView<T> Cp(C.data + lo, C.rows, cnt, C.stride);
        const ConstMatrixView<T> Ap(A.data + k0, A.rows, kc, A.stride);
        const T b = k0 == 0 ? beta : T(1);
        if (opw == Op::trans) {  // W [n, k]: rows lo.. of W, columns k0..
            dequantize_tile(buf.data(), kc, W, lo, cnt, k0, kc);
            gemm_serial<T>(Cp, Ap, Op::none, ConstMatrixView<T>(buf.data(), cnt, kc), Op::trans, alpha, b);
        } else {  // W [k, n]: rows k0.. of W, columns lo..
            dequantize_tile(buf.data(), cnt, W, k0, kc, lo, cnt);
            gemm_serial<T>(Cp, Ap, Op::none, ConstMatrixView<T>(buf.data(), kc, cnt), Op::none, alpha, b);
        }
    }
}
}  // namespace detail

/// C[M, N] = alpha * A[M, K] op(W) + beta * C (beta 0 or 1), W quantized: op = trans means W is [N, K]
/// (y = x W^T, the nn.Linear forward), none means W is [K, N] (dx = dy W, the input gradient). The
/// numbers are those of the dequantized W (the float values q * d) up to summation order. The output
/// columns are cut into fixed chunks shared by the threads, each computed alone: results do not depend
/// on the thread count.
template <class T>
void gemm_quant(MatrixView<T> C, ConstMatrixView<T> A, const QuantMatrixView& W, Op opw, T alpha = T(1),
                T beta = T(0)) {
    const Index m = A.rows, k = A.cols;
    const Index kw = opw == Op::none ? W.rows : W.cols;
    const Index n = opw == Op::none ? W.cols : W.rows;
    require<ShapeError>(k == kw && C.rows == m && C.cols == n, "gemm_quant: A [", m, ", ", k, "] x op(W) [", kw, ", ",
                        n, "] (", to_string(W.type), ") -> C [", C.rows, ", ", C.cols, "] do not agree");
    require(beta == T(0) || beta == T(1), "gemm_quant beta ", beta, ": only 0 or 1 supported");
    if (m == 0 || n == 0) return;
    if (k == 0) {
        if (beta == T(0))
            for (Index i = 0; i < m; ++i) std::fill(C.row_ptr(i), C.row_ptr(i) + n, T(0));
        return;
    }
    const bool fused = m <= detail::quant_fused_max_rows();
    int threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel() && m * n * k >= detail::gemm_parallel_min() / (fused ? 4 : 1)) threads = omp_get_max_threads();
#endif
    // Chunks of the output columns: multiples of 32 (W's blocks run along the columns when none). The
    // fused input gradient streams whole rows of W: one column range a thread.
    Index chunk = std::max<Index>(32, detail::quant_panel_cols() / 32 * 32);
    if (fused) chunk = opw == Op::trans ? 64 : std::max<Index>(32, (n + 32 * threads - 1) / (32 * threads) * 32);
    const Index chunks = (n + chunk - 1) / chunk;
    threads = static_cast<int>(std::min<Index>(threads, chunks));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (Index c = 0; c < chunks; ++c) {
            const Index lo = c * chunk, cnt = std::min(chunk, n - lo);
            if (fused)
                detail::fused_range<T>(C, A, W, opw, lo, lo + cnt, alpha, beta != T(0));
            else
                detail::panel_range<T>(C, A, W, opw, lo, cnt, alpha, beta);
        }
    }
}

namespace detail {
/// Elements of W gemm_quant_rounded dequantizes at a time (4 MB of bf16: a whole projection of a small
/// model, a few panels of a large one; a test shrinks it to hit the tails).
inline Index& quant_bf16_panel_elements() {
    static Index elements = Index(1) << 21;
    return elements;
}

/// One activation row quantized as ggml quantizes the vector side of its Q4_0 dot products: Q8_0
/// blocks of 32 (quantize_row_q8_0: d = amax / 127 stored in fp16, q = round(x / d) half away from
/// zero). Laid out for the kernel: each pair of blocks (b, b + 1) as 64 bytes [q_b 0-15, q_b+1 0-15,
/// q_b 16-31, q_b+1 16-31] (the order of a Q4_0 pair's nibbles: low of b, low of b + 1, high of b,
/// high of b + 1); `scale` the fp16 scales read back as float; `offset` per pair 16 int32 lanes, zero
/// but lane 0 = -8 sum(q_b) and lane 4 = -8 sum(q_b+1) (the Q4_0 levels are nibble - 8).
struct Q8ActivationRow {
    comigs::detail::aligned_vector<std::int8_t> q;
    comigs::detail::aligned_vector<std::int32_t> offset;
    std::vector<float> scale;
};

/// Quantizes x[0, k) (k a multiple of 64; finite values) into `out`.
inline void quantize_activation_row(Q8ActivationRow& out, const float* x, Index k) {
    const Index nb = k / 32;
    out.q.resize(static_cast<std::size_t>(k));
    out.offset.assign(static_cast<std::size_t>(nb / 2 * 16), 0);
    out.scale.resize(static_cast<std::size_t>(nb));
    for (Index b = 0; b < nb; ++b) {
        BlockQ8_0 blk;
#if defined(COMIGS_QUANT_VNNI)
        // quantize_row_q8_0 in registers: the same float operations (x * id rounded to float, then
        // rounded half away from zero: truncate, and step away when the dropped part is >= 0.5).
        const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        blk.d = comigs::detail::float_to_f16_bits(d);
        const auto level = [&](__m512 v) {
            const __m512 t = _mm512_mul_ps(v, _mm512_set1_ps(id));
            const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __mmask16 away = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(t, r)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
            const __m512 step = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(t, _mm512_set1_ps(-0.0f)));
            return _mm512_cvttps_epi32(_mm512_mask_add_ps(r, away, r, step));
        };
        _mm_storeu_si128(reinterpret_cast<__m128i*>(blk.qs), _mm512_cvtepi32_epi8(level(v0)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(blk.qs + 16), _mm512_cvtepi32_epi8(level(v1)));
#else
        quantize_row_q8_0(&blk, x + b * 32, 32);
#endif
        out.scale[static_cast<std::size_t>(b)] = block_scale(blk.d);
        std::int32_t sum = 0;
        for (int j = 0; j < 32; ++j) sum += blk.qs[j];
        std::int8_t* dst = out.q.data() + (b & ~Index(1)) * 32 + (b & 1) * 16;
        std::memcpy(dst, blk.qs, 16);
        std::memcpy(dst + 32, blk.qs + 16, 16);
        out.offset[static_cast<std::size_t>(b / 2 * 16 + (b & 1) * 4)] = -8 * sum;
    }
}

/// Whether the int8 products take a Q4_0 product of `rows` activation rows against W (op trans) on this
/// build: AVX512-VNNI, few rows, an even number of blocks a row.
inline bool quant_int8_applies(const QuantMatrixView& W, Op opw, Index rows) {
#if defined(COMIGS_QUANT_VNNI)
    return W.type == QuantType::q4_0 && opw == Op::trans && rows <= quant_fused_max_rows() && W.cols % 64 == 0;
#else
    (void)W, (void)opw, (void)rows;
    return false;
#endif
}

#if defined(COMIGS_QUANT_VNNI)
/// y[o] = alpha * sum_b dw_b dx_b sum_j (nibble_j - 8) q_j (+ y[o] when accumulate) for the rows o in
/// [o0, o1) of a Q4_0 W, x a quantized activation row: per pair of blocks one vpdpbusd of the 64
/// nibbles (as unsigned bytes) against the activations, started from the pair's -8 sum(q) offsets,
/// converted to float (exact: |sum| < 2^24) and added with the pair's scales dw dx in its lanes.
inline void int8_rows_trans(float* y, const Q8ActivationRow& x, const QuantMatrixView& W, Index o0, Index o1,
                            float alpha, bool accumulate) {
    const Index pairs = W.cols / 64;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    // Lanes 0-3 and 8-11 belong to the pair's first block, 4-7 and 12-15 to its second.
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    for (Index o = o0; o < o1; ++o) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const std::byte* row = W.row_ptr(o);
        const auto step = [&](Index pr, __m512& acc) {
            const std::byte* p = row + pr * 36;
            const __m256i both = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2))),
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)), 1);
            const __m512i w = _mm512_and_si512(
                _mm512_inserti64x4(_mm512_castsi256_si512(both), _mm256_srli_epi16(both, 4), 1), nibble);
            const __m512i sum = _mm512_dpbusd_epi32(_mm512_load_si512(x.offset.data() + pr * 16), w,
                                                    _mm512_load_si512(x.q.data() + pr * 64));
            std::uint16_t d0, d1;
            std::memcpy(&d0, p, 2);
            std::memcpy(&d1, p + 18, 2);
            const __m128 dw = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d0 | (std::uint32_t(d1) << 16))));
            const __m128 dx = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x.scale.data() + 2 * pr)));
            const __m512 sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(dw, dx)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sc, acc);
        };
        Index pr = 0;
        for (; pr + 2 <= pairs; pr += 2) {
            step(pr, acc0);
            step(pr + 1, acc1);
        }
        if (pr < pairs) step(pr, acc0);
        const float v = alpha * _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        y[o] = accumulate ? y[o] + v : v;
    }
}
#endif

/// The int8 products for every row of A (quant_int8_applies): each row quantized once, the output
/// rows in fixed chunks shared by the threads (results independent of the thread count).
inline void gemm_quant_int8(MatrixView<float> C, ConstMatrixView<float> A, const QuantMatrixView& W, float alpha,
                            bool accumulate) {
#if defined(COMIGS_QUANT_VNNI)
    thread_local std::vector<Q8ActivationRow> rows;
    if (rows.size() < static_cast<std::size_t>(A.rows)) rows.resize(static_cast<std::size_t>(A.rows));
    for (Index m = 0; m < A.rows; ++m) {
        const float* a = A.row_ptr(m);
        for (Index j = 0; j < A.cols; ++j)
            require<NumericError>(std::isfinite(a[j]), "gemm_quant (int8 products): activation ", a[j], " at [", m,
                                  ", ", j, "] is not finite");
        quantize_activation_row(rows[static_cast<std::size_t>(m)], a, A.cols);
    }
    const Index n = W.rows, chunk = 64, chunks = (n + chunk - 1) / chunk;
    int threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel() && A.rows * n * A.cols >= detail::gemm_parallel_min() / 4) threads = omp_get_max_threads();
#endif
    threads = static_cast<int>(std::min<Index>(threads, chunks));
    const std::vector<Q8ActivationRow>& xr = rows;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
    for (Index c = 0; c < chunks; ++c)
        for (Index m = 0; m < A.rows; ++m)
            int8_rows_trans(C.row_ptr(m), xr[static_cast<std::size_t>(m)], W, c * chunk, std::min(n, c * chunk + chunk),
                            alpha, accumulate);
#else
    (void)C, (void)A, (void)W, (void)alpha, (void)accumulate;
    comigs::detail::raise<InvalidArgument>("gemm_quant_int8: not built for this target (needs AVX512-VNNI)");
#endif
}
}  // namespace detail

/// Whether gemm_quant_rounded multiplies many rows in bf16 on this machine and build (oneDNN with bf16
/// dot products); elsewhere those products are gemm_quant's.
inline bool quant_bf16_products() { return bf16_backend() == Bf16Backend::onednn; }

/// Whether gemm_quant_rounded takes int8 products for few rows of Q4_0 on this build (AVX512-VNNI).
inline bool quant_int8_products() {
#if defined(COMIGS_QUANT_VNNI)
    return true;
#else
    return false;
#endif
}

/// As gemm_quant<float>, with rounded operands where the CPU multiplies them faster (what FrozenLinear
/// uses unless fp32_compute, as for a bf16 weight):
///   - many rows (training; more than quant_fused_max_rows), with bf16 dot products
///     (quant_bf16_products()): the activations rounded to bf16 once, W dequantized a panel at a time
///     into bf16 (q * d rounded to nearest even: 8 significant bits) and multiplied by the bf16 GEMM
///     (oneDNN, AMX / AVX512-BF16), accumulating in fp32: what the bf16 base computes;
///   - few rows (decode) of a Q4_0 W, y = x W^T, with AVX512-VNNI (quant_int8_products()): each
///     activation row quantized to Q8_0 blocks as llama.cpp does for its Q4_0 dot products, then
///     integer dot products per block (exact) scaled by the two fp16 scales;
///   - anything else: gemm_quant (the dequantized values in fp32).
inline void gemm_quant_rounded(MatrixView<float> C, ConstMatrixView<float> A, const QuantMatrixView& W, Op opw,
                               float alpha = 1.0f, float beta = 0.0f) {
    const Index m = A.rows, k = A.cols;
    const Index kw = opw == Op::none ? W.rows : W.cols;
    const Index n = opw == Op::none ? W.cols : W.rows;
    const bool int8 = detail::quant_int8_applies(W, opw, m);
    if (!(int8 || (quant_bf16_products() && m > detail::quant_fused_max_rows())) || m == 0 || k == 0 || n == 0 ||
        kw != k || C.rows != m || C.cols != n || !(beta == 0.0f || beta == 1.0f)) {
        gemm_quant<float>(C, A, W, opw, alpha, beta);  // also reports shape and beta errors
        return;
    }
    if (int8) {
        detail::gemm_quant_int8(C, A, W, alpha, beta != 0.0f);
        return;
    }
    // Buffers kept between calls: no page faults per call.
    thread_local comigs::detail::aligned_vector<bf16> abuf, wbuf;
    if (abuf.size() < static_cast<std::size_t>(m * k)) abuf.resize(static_cast<std::size_t>(m * k));
    convert_rows_to_bf16(abuf.data(), A);
    const ConstMatrixView<bf16> Ab(abuf.data(), m, k);
    // Panels of whole rows of W (contiguous blocks): output rows when trans, reduction rows when none.
    const Index row_len = W.cols;
    const Index rows = std::clamp<Index>(detail::quant_bf16_panel_elements() / row_len, 1, W.rows);
    if (wbuf.size() < static_cast<std::size_t>(rows * row_len)) wbuf.resize(static_cast<std::size_t>(rows * row_len));
    for (Index r0 = 0; r0 < W.rows; r0 += rows) {
        const Index cnt = std::min(rows, W.rows - r0);
        bf16* wp = wbuf.data();
#pragma omp parallel if (cnt * row_len >= 65536)
        {
            thread_local comigs::detail::aligned_vector<float> row;
            row.resize(static_cast<std::size_t>(row_len));
#pragma omp for schedule(static)
            for (Index i = 0; i < cnt; ++i) {
                dequantize_row(row.data(), W.type, W.row_ptr(r0 + i), row_len);
                convert_to_bf16(wp + i * row_len, row.data(), row_len);
            }
        }
        const ConstMatrixView<bf16> Wp(wp, cnt, row_len);
        if (opw == Op::trans)
            gemm_bf16_from(MatrixView<float>(C.data + r0, m, cnt, C.stride), Ab, Wp, Op::trans, alpha, beta);
        else
            gemm_bf16_from(C, ConstMatrixView<bf16>(Ab.data + r0, m, cnt, k), Wp, Op::none, alpha,
                           r0 == 0 ? beta : 1.0f);
    }
}

}  // namespace comigs::kernels

#undef COMIGS_QUANT_AVX512
#undef COMIGS_QUANT_NEON
#undef COMIGS_QUANT_VNNI
