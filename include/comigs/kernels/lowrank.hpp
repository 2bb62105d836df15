#pragma once
// Rank-r work on one hidden-size row at a time, vectorised with xsimd: the LoRA projections of the
// routed rows in the mixture layers, fused so that a row stays in L1 while its r projections run.
// Rows are contiguous; the r vectors of a factor are rows of a [r, h] row-major matrix. Summation
// order is fixed by (r, h) alone, so results do not depend on threads or alignment.
#include <algorithm>

#include "../view.hpp"
#include "simd.hpp"

namespace comigs::kernels {

/// y[c] += alpha * sum_q coef[q] * V[q * h + c] for c < h (y += alpha * coef^T V, V [r, h]).
template <class T>
void lowrank_accumulate(T* y, const T* coef, const T* V, Index r, Index h, T alpha = T(1)) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    constexpr Index qb = 8;  // factor rows per sweep: the accumulator stays in a register
    T cs[qb];
    for (Index q0 = 0; q0 < r; q0 += qb) {
        const Index nq = std::min(qb, r - q0);
        for (Index q = 0; q < nq; ++q) cs[q] = alpha * coef[q0 + q];
        const T* v = V + q0 * h;
        Index c = 0;
        for (; c + w <= h; c += w) {
            auto acc = simd::load(y + c);
            for (Index q = 0; q < nq; ++q) acc = simd::fma(simd::batch<T>(cs[q]), simd::load(v + q * h + c), acc);
            simd::store(y + c, acc);
        }
        for (; c < h; ++c) {
            T acc = y[c];
            for (Index q = 0; q < nq; ++q) acc += cs[q] * v[q * h + c];
            y[c] = acc;
        }
    }
}

/// out[q] = alpha * sum_c V[q * h + c] * u[c] for q < r (out = alpha * V u, V [r, h]).
template <class T>
void lowrank_project(T* out, const T* V, const T* u, Index r, Index h, T alpha = T(1)) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    constexpr Index qb = 4;
    for (Index q0 = 0; q0 < r; q0 += qb) {
        const Index nq = std::min(qb, r - q0);
        simd::batch<T> acc[qb];
        for (Index q = 0; q < qb; ++q) acc[q] = simd::batch<T>(T(0));
        const T* v = V + q0 * h;
        Index c = 0;
        for (; c + w <= h; c += w) {
            const auto uc = simd::load(u + c);
            for (Index q = 0; q < nq; ++q) acc[q] = simd::fma(simd::load(v + q * h + c), uc, acc[q]);
        }
        for (Index q = 0; q < nq; ++q) {
            T s = simd::reduce_add(acc[q]);
            for (Index cc = c; cc < h; ++cc) s += v[q * h + cc] * u[cc];
            out[q0 + q] = alpha * s;
        }
    }
}

/// dst[q * rows + i] = src[i * stride + q]: a [rows, r] block transposed to [r, rows].
template <class T>
void transpose_into(T* dst, ConstMatrixView<T> src) {
    for (Index i = 0; i < src.rows; ++i)
        for (Index q = 0; q < src.cols; ++q) dst[q * src.rows + i] = src(i, q);
}

}  // namespace comigs::kernels
