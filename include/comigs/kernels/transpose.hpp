#pragma once
// Exact blocked transposes of row-major blocks: the LoRA factor B stored [out, r] (mixture layers) and
// the keys and values packed [hd, keys] for attention's products. Copies only: results are
// bit-identical whichever block body runs.
#include <type_traits>

#include "../view.hpp"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace comigs::kernels {

namespace detail {

/// Whether transpose8x8 has a vector body: the float 8 x 8 blocks below are AVX shuffles (with the
/// LoRA factor B stored [out, r], a transpose is E h r elements per step, and element by element it
/// was ~1 cycle each: 7 us per GPT-2 factor, a tenth of a decode step for two experts).
template <class T>
inline constexpr bool has_transpose8x8 =
#if defined(__AVX__)
    std::is_same_v<T, float>;
#else
    false;
#endif

/// Whether transpose16x16 has a vector body (float, AVX-512): attention packs [keys, 64] blocks of
/// keys and values, where 16 x 16 blocks halve the shuffles per element of the 8 x 8 ones.
template <class T>
inline constexpr bool has_transpose16x16 =
#if defined(__AVX512F__)
    std::is_same_v<T, float>;
#else
    false;
#endif

/// d[q * ld + j] = s[j * st + q] for j, q < 8 (float, when has_transpose8x8).
template <class T>
inline void transpose8x8(const T* s, Index st, T* d, Index ld) {
#if defined(__AVX__)
    if constexpr (std::is_same_v<T, float>) {
        __m256 r[8], t[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(s + j * st);
        for (int j = 0; j < 8; j += 2) {
            t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
            t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
        }
        // Then r[q] (q < 4) holds column q of rows 0-3 in its low half and column q + 4 in its high
        // half; r[4 + q] the same of rows 4-7.
        for (int hh = 0; hh < 8; hh += 4)
            for (int m = 0; m < 2; ++m) {
                r[hh + 2 * m] = _mm256_shuffle_ps(t[hh + m], t[hh + 2 + m], _MM_SHUFFLE(1, 0, 1, 0));
                r[hh + 2 * m + 1] = _mm256_shuffle_ps(t[hh + m], t[hh + 2 + m], _MM_SHUFFLE(3, 2, 3, 2));
            }
        for (int q = 0; q < 4; ++q) {
            _mm256_storeu_ps(d + q * ld, _mm256_permute2f128_ps(r[q], r[4 + q], 0x20));
            _mm256_storeu_ps(d + (q + 4) * ld, _mm256_permute2f128_ps(r[q], r[4 + q], 0x31));
        }
        return;
    }
#endif
    for (int j = 0; j < 8; ++j)
        for (int q = 0; q < 8; ++q) d[q * ld + j] = s[j * st + q];
}

/// d[q * ld + j] = s[j * st + q] for j, q < 16 (float, when has_transpose16x16).
template <class T>
inline void transpose16x16(const T* s, Index st, T* d, Index ld) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
        __m512 r[16], t[16];
        for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(s + j * st);
        // Interleave pairs of rows (32-bit), then pairs of pairs (64-bit): each 128-bit lane of t holds a
        // 4 x 4 block transposed; two rounds of lane shuffles put the lanes in place.
        for (int j = 0; j < 16; j += 2) {
            t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
            t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
        }
        for (int j = 0; j < 16; j += 4) {
            const __m512d a = _mm512_castps_pd(t[j]), b = _mm512_castps_pd(t[j + 1]), c = _mm512_castps_pd(t[j + 2]),
                          e = _mm512_castps_pd(t[j + 3]);
            r[j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            r[j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            r[j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
            r[j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
        }
        // r[4 q + m] lane l = rows 4 q .. 4 q + 3 of column 4 l + m.
        for (int m = 0; m < 4; ++m)
            for (int half = 0; half < 2; ++half) {
                const __m512 x = r[m + 8 * half], y = r[m + 4 + 8 * half];
                t[2 * m + 8 * half] = _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0));
                t[2 * m + 1 + 8 * half] = _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1));
            }
        // t[2 m + 8 h] lanes: columns m, 8 + m of row groups 2 h, 2 h + 1; t[2 m + 1 + 8 h]: columns 4 + m, 12 + m.
        for (int m = 0; m < 4; ++m)
            for (int odd = 0; odd < 2; ++odd) {
                const __m512 x = t[2 * m + odd], y = t[2 * m + odd + 8];
                // column c = 4 * (2 * sel + odd) + m for sel in {0, 1}
                _mm512_storeu_ps(d + (4 * odd + m) * ld, _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)));
                _mm512_storeu_ps(d + (4 * (2 + odd) + m) * ld, _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
            }
        return;
    }
#endif
    for (int j = 0; j < 16; ++j)
        for (int q = 0; q < 16; ++q) d[q * ld + j] = s[j * st + q];
}

}  // namespace detail

/// dst[q * ldd + i] = src[i * stride + q]: a [rows, cols] block transposed to [cols, rows] with rows
/// ldd >= rows apart (columns rows .. ldd of dst untouched).
template <class T>
void transpose_into(T* dst, Index ldd, ConstMatrixView<T> src) {
    const Index rows = src.rows, cols = src.cols;
    // 16 x 16 blocks over [0, i16) x [0, q16), 8 x 8 blocks over the rest of [0, i8) x [0, q8), then
    // element by element.
    Index i16 = 0, q16 = 0, i8 = 0, q8 = 0;
    if constexpr (detail::has_transpose16x16<T>) {
        i16 = rows / 16 * 16;
        q16 = cols / 16 * 16;
        for (Index i = 0; i < i16; i += 16)
            for (Index q = 0; q < q16; q += 16)
                detail::transpose16x16(src.data + i * src.stride + q, src.stride, dst + q * ldd + i, ldd);
    }
    if constexpr (detail::has_transpose8x8<T>) {
        i8 = rows / 8 * 8;
        q8 = cols / 8 * 8;
        for (Index i = 0; i < i8; i += 8)
            for (Index q = i < i16 ? q16 : 0; q < q8; q += 8)
                detail::transpose8x8(src.data + i * src.stride + q, src.stride, dst + q * ldd + i, ldd);
    }
    for (Index i = 0; i < rows; ++i)
        for (Index q = i < i8 ? q8 : 0; q < cols; ++q) dst[q * ldd + i] = src(i, q);
}

/// dst[q * rows + i] = src[i * stride + q]: a [rows, r] block transposed to a contiguous [r, rows].
template <class T>
void transpose_into(T* dst, ConstMatrixView<T> src) {
    transpose_into(dst, src.rows, src);
}

/// dst(i, q) += alpha * src[q * dst.rows + i]: a [r, rows] block added transposed into [rows, r].
template <class T>
void add_transposed(MatrixView<T> dst, const T* src, T alpha = T(1)) {
    const Index rows = dst.rows, cols = dst.cols;
    Index i0 = 0, q0 = 0;
    if constexpr (detail::has_transpose8x8<T>) {
        i0 = rows / 8 * 8;
        q0 = cols / 8 * 8;
        alignas(32) T blk[64];
        for (Index i = 0; i < i0; i += 8)
            for (Index q = 0; q < q0; q += 8) {
                detail::transpose8x8(src + q * rows + i, rows, blk, Index(8));
                for (Index j = 0; j < 8; ++j) {
                    T* d = dst.row_ptr(i + j) + q;
                    for (Index c = 0; c < 8; ++c) d[c] += alpha * blk[j * 8 + c];
                }
            }
    }
    for (Index i = 0; i < rows; ++i)
        for (Index q = i < i0 ? q0 : 0; q < cols; ++q) dst(i, q) += alpha * src[q * rows + i];
}

}  // namespace comigs::kernels
