#pragma once
// bfloat16 storage for frozen weights and converted activations: the top 16 bits of an IEEE float,
// rounded to nearest even. Arithmetic always happens in fp32 (the GEMMs accumulate in fp32).
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "../view.hpp"

namespace comigs::kernels {

/// A bfloat16 value (storage only).
struct bf16 {
    std::uint16_t bits = 0;
};
static_assert(sizeof(bf16) == 2);

/// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline bf16 to_bf16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{static_cast<std::uint16_t>(u >> 16)};
}

inline float to_float(bf16 b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

/// dst[i] = bf16(src[i]) for n elements, round to nearest even (the AVX512-BF16 instruction where the
/// build targets it, else a branch-free loop giving the same bits as to_bf16).
inline void convert_to_bf16(bf16* dst, const float* src, Index n) {
    auto* d = reinterpret_cast<std::uint16_t*>(dst);
    Index i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    // vcvtne2ps2bf16 rounds to nearest even like the loop below; it differs only on NaN payloads and
    // denormal inputs (flushed to zero), which frozen weights and activations do not rely on.
    for (; i + 32 <= n; i += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
        _mm512_storeu_si512(d + i, reinterpret_cast<const __m512i&>(v));
    }
#endif
    const Index start = i;
#pragma omp simd
    for (Index j = start; j < n; ++j) {
        std::uint32_t u;
        std::memcpy(&u, src + j, 4);
        const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
        const std::uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        d[j] = static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x40u) : r);
    }
}

/// dst[i] = float(src[i]).
inline void convert_to_float(float* dst, const bf16* src, Index n) {
    const auto* s = reinterpret_cast<const std::uint16_t*>(src);
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
        const std::uint32_t u = static_cast<std::uint32_t>(s[i]) << 16;
        std::memcpy(dst + i, &u, 4);
    }
}

/// Rows of a view converted (dst contiguous with stride cols).
inline void convert_rows_to_bf16(bf16* dst, ConstMatrixView<float> src) {
#pragma omp parallel for schedule(static) if (src.rows * src.cols > 65536)
    for (Index i = 0; i < src.rows; ++i) convert_to_bf16(dst + i * src.cols, src.row_ptr(i), src.cols);
}

}  // namespace comigs::kernels
