#pragma once
// One-pass kernels for a routed row of the GELU mixture (rank r <= 8, no dropout): everything the
// row needs from its expert's rank-r factors happens in a single sweep over the hidden size, so each
// factor column is read once from L2 per row and no intermediate row is written. The mixture uses
// them when they apply and the separate kernels (lowrank.hpp, elementwise.hpp) otherwise; both give
// the same values up to rounding.
#include <algorithm>
#include <array>
#include <cmath>

#include "../view.hpp"
#include "elementwise.hpp"
#include "simd.hpp"

namespace comigs::kernels {

/// Largest rank the fused kernels take.
inline constexpr Index fused_max_rank = 8;

namespace detail {

/// Test and benchmark switch: false makes the mixture take the separate kernels instead.
inline bool& fused_rows_enabled() {
    static bool on = true;
    return on;
}

template <class T>
inline T gelu_scalar(T x) {
    const T two_a = x * (T(2) * GeluConst<T>::c * GeluConst<T>::a * x * x + T(2) * GeluConst<T>::c);
    return x / (T(1) + std::exp(-two_a));
}
template <class T>
inline T gelu_grad_scalar(T x) {
    const T x2 = x * x;
    const T two_a = x * (T(2) * GeluConst<T>::c * GeluConst<T>::a * x2 + T(2) * GeluConst<T>::c);
    const T s = T(1) / (T(1) + std::exp(-two_a));
    return x * s * (T(1) - s) * (T(6) * GeluConst<T>::c * GeluConst<T>::a * x2 + T(2) * GeluConst<T>::c) + s;
}

template <int Q, class T>
void gelu_row_forward_q(T* u, T* m, bool first, T g, T* z2, const T* H, const T* zs, const T* B1T, const T* A2,
                        Index h) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index hv = h / w * w;
    B acc[Q];
    for (int q = 0; q < Q; ++q) acc[q] = B(T(0));
    const B gb(g);
    for (Index c = 0; c < hv; c += w) {
        B p = simd::load(H + c);
        for (int q = 0; q < Q; ++q) p = simd::fma(B(zs[q]), simd::load(B1T + q * h + c), p);
        const B uc = gelu_of(p);
        simd::store(u + c, uc);
        simd::store(m + c, first ? gb * uc : simd::fma(gb, uc, simd::load(m + c)));
        for (int q = 0; q < Q; ++q) acc[q] = simd::fma(simd::load(A2 + q * h + c), uc, acc[q]);
    }
    std::array<T, Q> tail{};
    for (Index c = hv; c < h; ++c) {
        T p = H[c];
        for (int q = 0; q < Q; ++q) p += zs[q] * B1T[q * h + c];
        const T uc = gelu_scalar(p);
        u[c] = uc;
        m[c] = first ? g * uc : m[c] + g * uc;
        for (int q = 0; q < Q; ++q) tail[static_cast<std::size_t>(q)] += A2[q * h + c] * uc;
    }
    for (int q = 0; q < Q; ++q) z2[q] = simd::reduce_add(acc[q]) + tail[static_cast<std::size_t>(q)];
}

template <int Q, class T>
T gelu_row_backward_q(T* dp_out, T* dH, bool first, T* dz, T s, const T* dm, T g, const T* qg, const T* A2,
                      const T* H, const T* zs, const T* B1T, const T* u, Index h) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index hv = h / w * w;
    B acc[Q];
    for (int q = 0; q < Q; ++q) acc[q] = B(T(0));
    B dot(T(0));
    const B gb(g);
    for (Index c = 0; c < hv; c += w) {
        const B dmc = simd::load(dm + c);
        dot = simd::fma(simd::load(u + c), dmc, dot);
        B du = gb * dmc;
        for (int q = 0; q < Q; ++q) du = simd::fma(B(qg[q]), simd::load(A2 + q * h + c), du);
        B p = simd::load(H + c);
        B b1[Q];
        for (int q = 0; q < Q; ++q) {
            b1[q] = simd::load(B1T + q * h + c);
            p = simd::fma(B(zs[q]), b1[q], p);
        }
        const B dp = du * gelu_grad_of(p);
        simd::store(dp_out + c, dp);
        simd::store(dH + c, first ? dp : simd::load(dH + c) + dp);
        for (int q = 0; q < Q; ++q) acc[q] = simd::fma(b1[q], dp, acc[q]);
    }
    std::array<T, Q> tail{};
    T dot_tail = T(0);
    for (Index c = hv; c < h; ++c) {
        dot_tail += u[c] * dm[c];
        T du = g * dm[c];
        for (int q = 0; q < Q; ++q) du += qg[q] * A2[q * h + c];
        T p = H[c];
        for (int q = 0; q < Q; ++q) p += zs[q] * B1T[q * h + c];
        const T dp = du * gelu_grad_scalar(p);
        dp_out[c] = dp;
        dH[c] = first ? dp : dH[c] + dp;
        for (int q = 0; q < Q; ++q) tail[static_cast<std::size_t>(q)] += B1T[q * h + c] * dp;
    }
    for (int q = 0; q < Q; ++q) dz[q] = s * (simd::reduce_add(acc[q]) + tail[static_cast<std::size_t>(q)]);
    return simd::reduce_add(dot) + dot_tail;
}

}  // namespace detail

/// Forward of one routed GELU row: u = gelu(H + zs^T B1T) (zs = s z1, the scaled rank-r input),
/// m = g u (first slot of the token) or m += g u, z2 = A2 u. B1T and A2 are [r, h] rows, r <= 8.
template <class T>
void gelu_row_forward(T* u, T* m, bool first, T g, T* z2, const T* H, const T* zs, const T* B1T, const T* A2,
                      Index r, Index h) {
    switch (r) {
        case 8: detail::gelu_row_forward_q<8>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 7: detail::gelu_row_forward_q<7>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 6: detail::gelu_row_forward_q<6>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 5: detail::gelu_row_forward_q<5>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 4: detail::gelu_row_forward_q<4>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 3: detail::gelu_row_forward_q<3>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 2: detail::gelu_row_forward_q<2>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        case 1: detail::gelu_row_forward_q<1>(u, m, first, g, z2, H, zs, B1T, A2, h); break;
        default: require(false, "gelu_row_forward rank ", r, ": the fused kernel takes 1..", fused_max_rank);
    }
}

/// Backward of one routed GELU row, with dm = dL/dm of its token, qg = g s B2^T dy (rank r) and the
/// forward's H, zs, u: dp = (g dm + qg^T A2) * gelu'(H + zs^T B1T) is stored in dp_out and added to
/// dH (or stored, for the token's first slot), dz = s B1T dp. Returns u . dm (the gate gradient's
/// main term).
template <class T>
T gelu_row_backward(T* dp_out, T* dH, bool first, T* dz, T s, const T* dm, T g, const T* qg, const T* A2, const T* H,
                    const T* zs, const T* B1T, const T* u, Index r, Index h) {
    switch (r) {
        case 8: return detail::gelu_row_backward_q<8>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 7: return detail::gelu_row_backward_q<7>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 6: return detail::gelu_row_backward_q<6>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 5: return detail::gelu_row_backward_q<5>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 4: return detail::gelu_row_backward_q<4>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 3: return detail::gelu_row_backward_q<3>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 2: return detail::gelu_row_backward_q<2>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        case 1: return detail::gelu_row_backward_q<1>(dp_out, dH, first, dz, s, dm, g, qg, A2, H, zs, B1T, u, h);
        default: require(false, "gelu_row_backward rank ", r, ": the fused kernel takes 1..", fused_max_rank);
    }
    return T(0);
}

}  // namespace comigs::kernels
