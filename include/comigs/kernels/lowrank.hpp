#pragma once
// Rank-r work on one hidden-size row at a time, vectorised with xsimd: the LoRA projections of the
// routed rows in the mixture layers, fused so that a row stays in L1 while its r projections run.
// Rows are contiguous; the r vectors of a factor are rows of a [r, h] row-major matrix. Summation
// order is fixed by (r, h) alone, so results do not depend on threads or alignment.
#include <algorithm>
#include <array>
#include <type_traits>

#include "../view.hpp"
#include "simd.hpp"
#include "transpose.hpp"  // transpose_into, add_transposed: the factor B stored [out, r]

namespace comigs::kernels {

/// y[c] = x[c] + alpha * sum_q coef[q] * V[q * h + c] for c < h (V [r, h]); y may be x.
template <class T>
void lowrank_add(T* y, const T* x, const T* coef, const T* V, Index r, Index h, T alpha = T(1)) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    constexpr Index qb = 8;  // factor rows per sweep: the accumulator stays in a register
    const Index hv = h / w * w;
    for (Index q0 = 0; q0 < r; q0 += qb) {
        const Index nq = std::min(qb, r - q0);
        std::array<T, qb> cs{};
        for (Index q = 0; q < nq; ++q) cs[static_cast<std::size_t>(q)] = alpha * coef[q0 + q];
        const T* v = V + q0 * h;
        const T* src = q0 == 0 ? x : y;
        if (nq == qb) {
            for (Index c = 0; c < hv; c += w) {
                auto acc = simd::load(src + c);
                for (Index q = 0; q < qb; ++q)
                    acc = simd::fma(simd::batch<T>(cs[static_cast<std::size_t>(q)]), simd::load(v + q * h + c), acc);
                simd::store(y + c, acc);
            }
        } else {
            for (Index c = 0; c < hv; c += w) {
                auto acc = simd::load(src + c);
                for (Index q = 0; q < nq; ++q)
                    acc = simd::fma(simd::batch<T>(cs[static_cast<std::size_t>(q)]), simd::load(v + q * h + c), acc);
                simd::store(y + c, acc);
            }
        }
        for (Index c = hv; c < h; ++c) {
            T acc = src[c];
            for (Index q = 0; q < nq; ++q) acc += cs[static_cast<std::size_t>(q)] * v[q * h + c];
            y[c] = acc;
        }
    }
}

/// y[c] += alpha * sum_q coef[q] * V[q * h + c] for c < h (y += alpha * coef^T V, V [r, h]).
template <class T>
void lowrank_accumulate(T* y, const T* coef, const T* V, Index r, Index h, T alpha = T(1)) {
    lowrank_add(y, static_cast<const T*>(y), coef, V, r, h, alpha);
}

/// out[q] = alpha * sum_c V[q * h + c] * u[c] for q < r (out = alpha * V u, V [r, h]).
template <class T>
void lowrank_project(T* out, const T* V, const T* u, Index r, Index h, T alpha = T(1)) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    constexpr Index qb = 8;
    const Index hv = h / w * w;
    for (Index q0 = 0; q0 < r; q0 += qb) {
        const Index nq = std::min(qb, r - q0);
        simd::batch<T> acc[qb];
        for (Index q = 0; q < qb; ++q) acc[q] = simd::batch<T>(T(0));
        const T* v = V + q0 * h;
        if (nq == qb) {
            for (Index c = 0; c < hv; c += w) {
                const auto uc = simd::load(u + c);
                for (Index q = 0; q < qb; ++q) acc[q] = simd::fma(simd::load(v + q * h + c), uc, acc[q]);
            }
        } else {
            for (Index c = 0; c < hv; c += w) {
                const auto uc = simd::load(u + c);
                for (Index q = 0; q < nq; ++q) acc[q] = simd::fma(simd::load(v + q * h + c), uc, acc[q]);
            }
        }
        for (Index q = 0; q < nq; ++q) {
            T s = simd::reduce_add(acc[q]);
            for (Index c = hv; c < h; ++c) s += v[q * h + c] * u[c];
            out[q0 + q] = alpha * s;
        }
    }
}

namespace detail {
/// Rows per chunk of lowrank_outer: the chunk's partial sums stay in registers, C is read and written
/// once per chunk, and the chunk's rows are streamed sequentially.
inline constexpr Index lowrank_outer_rows = 16;

/// C[q, c .. c + 2w) += alpha * sum over rows [i0, i1) of X[i, q] Y[row(i), c ..], Q factor rows.
template <int Q, class T>
inline void lowrank_outer_block(T* C, Index ldc, const T* X, Index ldx, const T* Y, Index ldy, const Index* idx,
                                Index i0, Index i1, Index c, T alpha) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    simd::batch<T> acc[Q][2];
    for (int q = 0; q < Q; ++q) acc[q][0] = acc[q][1] = simd::batch<T>(T(0));
    for (Index i = i0; i < i1; ++i) {
        const T* y = Y + (idx ? idx[i] : i) * ldy + c;
        const auto y0 = simd::load(y), y1 = simd::load(y + w);
        const T* x = X + i * ldx;
        for (int q = 0; q < Q; ++q) {
            const simd::batch<T> xq(x[q]);
            acc[q][0] = simd::fma(xq, y0, acc[q][0]);
            acc[q][1] = simd::fma(xq, y1, acc[q][1]);
        }
    }
    const simd::batch<T> a(alpha);
    for (int q = 0; q < Q; ++q) {
        T* cq = C + q * ldc + c;
        simd::store(cq, simd::fma(a, acc[q][0], simd::load(cq)));
        simd::store(cq + w, simd::fma(a, acc[q][1], simd::load(cq + w)));
    }
}

template <int Q, class T>
inline void lowrank_outer_cols(T* C, Index ldc, const T* X, Index ldx, const T* Y, Index ldy, const Index* idx,
                               Index rows, Index c0, Index c1, T alpha) {
    constexpr Index cb = 2 * static_cast<Index>(simd::width<T>);
    for (Index i0 = 0; i0 < rows; i0 += lowrank_outer_rows) {
        const Index i1 = std::min(rows, i0 + lowrank_outer_rows);
#if defined(__GNUC__) || defined(__clang__)
        // The next chunk's rows when they are gathered (far apart: no hardware prefetcher follows them).
        if (idx)
            for (Index i = i1; i < std::min(rows, i1 + lowrank_outer_rows); ++i) {
                const char* y = reinterpret_cast<const char*>(Y + idx[i] * ldy + c0);
                for (Index b = 0; b < (c1 - c0) * static_cast<Index>(sizeof(T)); b += 64) __builtin_prefetch(y + b, 0, 3);
            }
#endif
        for (Index c = c0; c < c1; c += cb) lowrank_outer_block<Q>(C, ldc, X, ldx, Y, ldy, idx, i0, i1, c, alpha);
    }
}
}  // namespace detail

/// Column ranges of lowrank_outer: up to 8 (whole blocks of two batches), fixed by the shapes.
template <class T>
inline Index lowrank_outer_parts(Index cols) {
    return std::max<Index>(1, std::min<Index>(8, cols / (2 * static_cast<Index>(simd::width<T>))));
}

/// Part `part` of lowrank_outer_parts(cols) of lowrank_outer, on the calling thread: its column range,
/// and the scalar tail columns with the last part. Every part writes its own columns of C only.
template <class T>
void lowrank_outer_part(T* C, Index ldc, const T* X, Index ldx, const T* Y, Index ldy, const Index* idx, Index rows,
                        Index r, Index cols, T alpha, Index part) {
    constexpr Index cb = 2 * static_cast<Index>(simd::width<T>);
    const Index blocks = cols / cb, parts = lowrank_outer_parts<T>(cols);
    const Index c0 = blocks * part / parts * cb, c1 = blocks * (part + 1) / parts * cb;
    for (Index q0 = 0; q0 < r && c1 > c0; q0 += 8) {
        T* Cq = C + q0 * ldc;
        const T* Xq = X + q0;
        switch (std::min<Index>(8, r - q0)) {
            case 8: detail::lowrank_outer_cols<8>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            case 7: detail::lowrank_outer_cols<7>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            case 6: detail::lowrank_outer_cols<6>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            case 5: detail::lowrank_outer_cols<5>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            case 4: detail::lowrank_outer_cols<4>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            case 3: detail::lowrank_outer_cols<3>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            case 2: detail::lowrank_outer_cols<2>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
            default: detail::lowrank_outer_cols<1>(Cq, ldc, Xq, ldx, Y, ldy, idx, rows, c0, c1, alpha); break;
        }
    }
    if (part != parts - 1) return;
    // Tail columns: scalar, the same chunked row order.
    for (Index q = 0; q < r; ++q)
        for (Index c = blocks * cb; c < cols; ++c)
            for (Index i0 = 0; i0 < rows; i0 += detail::lowrank_outer_rows) {
                T s = T(0);
                for (Index i = i0; i < std::min(rows, i0 + detail::lowrank_outer_rows); ++i)
                    s += X[i * ldx + q] * Y[(idx ? idx[i] : i) * ldy + c];
                C[q * ldc + c] += alpha * s;
            }
}

/// C[q * ldc + c] += alpha * sum_i X[i * ldx + q] * Y[row(i) * ldy + c] for q < r, c < cols, i < rows,
/// with row(i) = idx[i] (or i when idx is null): the rank-r gradient C += alpha X^T Y of a LoRA factor
/// over (gathered) rows. Column ranges are shared between threads; the summation order (chunks of
/// rows, in order) depends on the shapes only, so results do not depend on the thread count.
template <class T>
void lowrank_outer(T* C, Index ldc, const T* X, Index ldx, const T* Y, Index ldy, const Index* idx, Index rows,
                   Index r, Index cols, T alpha = T(1)) {
    const Index parts = lowrank_outer_parts<T>(cols);
#pragma omp parallel for schedule(static) if (rows * r * cols > (Index(1) << 18))
    for (Index part = 0; part < parts; ++part) lowrank_outer_part(C, ldc, X, ldx, Y, ldy, idx, rows, r, cols, alpha, part);
}

}  // namespace comigs::kernels
