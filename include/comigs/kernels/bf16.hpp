#pragma once
// bfloat16 storage for frozen weights and converted activations: the top 16 bits of an IEEE float,
// rounded to nearest even. Arithmetic always happens in fp32 (the GEMMs accumulate in fp32).
#include <cstdint>
#include <cstring>

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

/// dst[i] = bf16(src[i]) for n elements. A branch-free loop the compiler vectorises; it gives the
/// same bits as to_bf16 for every input (NaN included).
inline void convert_to_bf16(bf16* dst, const float* src, Index n) {
    auto* d = reinterpret_cast<std::uint16_t*>(dst);
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
        std::uint32_t u;
        std::memcpy(&u, src + i, 4);
        const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
        const std::uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        d[i] = static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x40u) : r);
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
#pragma omp parallel for schedule(static) if (src.rows * src.cols > 262144)
    for (Index i = 0; i < src.rows; ++i) convert_to_bf16(dst + i * src.cols, src.row_ptr(i), src.cols);
}

}  // namespace comigs::kernels
