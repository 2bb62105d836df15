#pragma once
// The one place that knows which xsimd is installed. Debian ships xsimd 8.1, whose API differs from
// later releases (hadd became reduce_add in 9; architecture names and load helpers changed): every
// comigs kernel uses only the names below, so a version change is fixed here alone.
#include <xsimd/xsimd.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace comigs::kernels::simd {

/// The widest batch the compiler was allowed to target (-march flags), for float or double.
template <class T>
using batch = xsimd::batch<T>;

template <class T>
inline constexpr std::size_t width = batch<T>::size;

template <class T>
inline batch<T> load(const T* p) {
    return batch<T>::load_unaligned(p);
}
template <class T>
inline void store(T* p, const batch<T>& v) {
    v.store_unaligned(p);
}
/// Stores v at p (aligned to the batch's size) bypassing the caches where the target has streaming
/// stores: for a row nobody reads again soon, it saves reading the line in before writing it. The
/// caller orders these stores before another thread reads them (stream_fence).
template <class T>
inline void store_stream(T* p, const batch<T>& v) {
#if defined(__AVX512F__)
    if constexpr (batch<T>::size * sizeof(T) == 64) {
        if constexpr (std::is_same_v<T, float>)
            _mm512_stream_ps(p, v);
        else
            _mm512_stream_pd(p, v);
        return;
    }
#endif
    v.store_aligned(p);
}
/// Orders the streaming stores of the calling thread before its later stores (e.g. a barrier's).
inline void stream_fence() {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}
template <class T>
inline batch<T> splat(T v) {
    return batch<T>(v);
}

/// Horizontal sum of the lanes.
template <class T>
inline T reduce_add(const batch<T>& v) {
#if XSIMD_VERSION_MAJOR >= 9
    return xsimd::reduce_add(v);
#else
    return xsimd::hadd(v);
#endif
}

/// Lane i of the result is the sum of the lanes of v[i], for the `width` batches v[0 .. width).
template <class T>
inline batch<T> reduce_add_each(const batch<T>* v) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && batch<T>::size == 16) {
        // xsimd 8.1's haddp for AVX-512 floats returns lanes 2..5 (and 10..13) swapped: our own
        // transposing reduction, halving the lanes per row at each step.
        __m512 r1[8], r2[4], r3[2];
        for (int i = 0; i < 8; ++i) {
            const __m512 a = v[2 * i], b = v[2 * i + 1];
            r1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
        }
        for (int i = 0; i < 4; ++i)  // each 128-bit quarter holds one row
            r2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        for (int i = 0; i < 2; ++i)
            r3[i] = _mm512_add_ps(_mm512_shuffle_ps(r2[2 * i], r2[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(r2[2 * i], r2[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(r3[0], r3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_ps(r3[0], r3[1], _MM_SHUFFLE(3, 1, 3, 1)));
        // Lane 4k + m now holds row 4m + k.
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        return batch<T>(_mm512_permutexvar_ps(order, s));
    }
#endif
    return xsimd::haddp(v);
}

/// out[i] = the sum of the lanes of v[i] for i < N (N = 4 or 8): the per-row reductions of the fused
/// mixture kernels, one transposing reduction instead of N horizontal sums.
template <int N, class T>
inline void reduce_add_rows(const batch<T>* v, T* out) {
    static_assert(N == 4 || N == 8, "reduce_add_rows takes 4 or 8 batches");
    constexpr int w = static_cast<int>(width<T>);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && w == 16) {
        __m512 a[8];
        for (int i = 0; i < 8; ++i) a[i] = i < N ? static_cast<__m512>(v[i]) : _mm512_setzero_ps();
        __m512 r[4], s[2];
        for (int i = 0; i < 4; ++i)  // lanes 0..7: row 2i, lanes 8..15: row 2i + 1
            r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        for (int i = 0; i < 2; ++i)  // quarter k: row 4i + k
            s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        // Quarter k: two lanes of row k, two of row 4 + k; then lane 0 row k, lane 2 row 4 + k.
        const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
        const __m512 u = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m256 sums = _mm512_castps512_ps256(_mm512_permutexvar_ps(order, u));
        if constexpr (N == 8)
            _mm256_storeu_ps(out, sums);
        else
            _mm_storeu_ps(out, _mm256_castps256_ps128(sums));
        return;
    }
#endif
    if constexpr (N % w == 0) {
        for (int g = 0; g < N; g += w) store(out + g, reduce_add_each(v + g));
    } else {
        batch<T> pad[w];
        for (int i = 0; i < w; ++i) pad[i] = i < N ? v[i] : batch<T>(T(0));
        alignas(64) T tmp[w];
        store(tmp, reduce_add_each(pad));
        for (int i = 0; i < N; ++i) out[i] = tmp[i];
    }
}

/// e^x, lane by lane. xsimd's exp converts round(x / ln 2) to an integer before it saturates, and that
/// conversion is undefined behaviour for NaN and for |x| beyond the integer range on targets without a
/// hardware instruction for it (SSE2, AVX2: UBSan reports it). Clamping just past the saturation points
/// keeps every finite result bit-identical (exp is already 0 below minlog and inf above maxlog); NaN lanes
/// are computed on 0 and put back afterwards.
template <class T, class A>
inline xsimd::batch<T, A> exp(const xsimd::batch<T, A>& x) {
    using B = xsimd::batch<T, A>;
    constexpr T lo = sizeof(T) == 4 ? T(-100) : T(-750);
    constexpr T hi = sizeof(T) == 4 ? T(100) : T(750);
    const auto is_nan = x != x;
    B arg = xsimd::select(x < B(lo), B(lo), xsimd::select(x > B(hi), B(hi), x));
    arg = xsimd::select(is_nan, B(T(0)), arg);
    return xsimd::select(is_nan, x, xsimd::exp(arg));
}

namespace detail {
/// s = 1 / (1 + e) and 1 - s = e s from e >= 0 (inf excluded): the hardware reciprocal estimate refined
/// by Newton steps (one from AVX-512's 14 bits, two from the 12 bits of SSE/AVX) instead of a division.
template <class A>
inline void logistic_from_exp(const xsimd::batch<float, A>& e, xsimd::batch<float, A>& s, xsimd::batch<float, A>& oms) {
    using B = xsimd::batch<float, A>;
    const B d = e + B(1.0f);
#if defined(__AVX512F__)
    if constexpr (B::size == 16) {
        const __m512 y = _mm512_rcp14_ps(d);
        s = B(_mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f))));
        oms = e * s;
        return;
    }
#endif
    B y = xsimd::reciprocal(d);
    y = y * xsimd::fma(-d, y, B(2.0f));
#if !defined(__AVX512F__)
    y = y * xsimd::fma(-d, y, B(2.0f));
#endif
    s = y;
    oms = e * y;
}
}  // namespace detail

/// s = 1 / (1 + e^-x) and its complement 1 - s = e^-x s for float lanes, both without cancellation
/// (the complement is what a GELU derivative needs when s is close to 1). e^-x by Cody-Waite
/// reduction to r in [-ln2/2, ln2/2], a degree-6 Taylor polynomial (truncation below 2e-7 relative)
/// and an exponent built in the integer lanes; then the hardware reciprocal estimate refined by Newton
/// steps (one from AVX-512's 14 bits, two from the 12 bits of SSE/AVX) instead of a division. -x is
/// clamped to [-80, 80] (s is then 1 or below 2e-35, and nothing passes through denormals); NaN gives
/// finite values (the callers multiply them by the NaN again), never undefined behaviour.
/// On AVX-512 the same steps with a shorter dependency chain (the fused kernels are bound by it, not
/// by instruction count): the polynomial evaluated in powers of r^2 and 2^n applied by vscalefps.
template <class A>
inline void sigmoid_fast(const xsimd::batch<float, A>& x, xsimd::batch<float, A>& s, xsimd::batch<float, A>& oms) {
    using B = xsimd::batch<float, A>;
    using I = xsimd::batch<std::int32_t, A>;
#if defined(__AVX512F__)
    if constexpr (B::size == 16) {
        const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(-80.0f)),
                                       _mm512_set1_ps(80.0f));
        const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.44269504088896341f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), z);
        rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), rr);
        // 1 + r + r^2 (1/2 + r/6) + r^4 (1/24 + r/120) + r^6 / 720, as a + r2 (b + r2 (c + r2 d)).
        const __m512 r2 = _mm512_mul_ps(rr, rr);
        const __m512 a = _mm512_add_ps(rr, _mm512_set1_ps(1.0f));
        const __m512 b = _mm512_fmadd_ps(rr, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f));
        const __m512 c = _mm512_fmadd_ps(rr, _mm512_set1_ps(1.0f / 120.0f), _mm512_set1_ps(1.0f / 24.0f));
        __m512 p = _mm512_fmadd_ps(r2, _mm512_set1_ps(1.0f / 720.0f), c);
        p = _mm512_fmadd_ps(r2, p, b);
        p = _mm512_fmadd_ps(r2, p, a);
        const __m512 e = _mm512_scalef_ps(p, n);  // e^-x
        detail::logistic_from_exp(B(e), s, oms);
        return;
    }
#endif
    // Clamped by comparisons, so that NaN becomes -80 on every target (x86's max returns its second
    // operand for NaN; NEON's vmaxq propagates NaN, which would reach the float-to-int conversion).
    const B mx = -x;
    const B lo = xsimd::select(mx > B(-80.0f), mx, B(-80.0f));
    const B z = xsimd::select(lo < B(80.0f), lo, B(80.0f));
    const B n = xsimd::nearbyint(z * B(1.44269504088896341f));  // round(z / ln 2), |n| <= 116
    B rr = xsimd::fma(-n, B(0.693359375f), z);                  // ln 2 = 0.693359375 - 2.12194440e-4
    rr = xsimd::fma(-n, B(-2.12194440e-4f), rr);
    B p = B(1.0f / 720.0f);
    p = xsimd::fma(p, rr, B(1.0f / 120.0f));
    p = xsimd::fma(p, rr, B(1.0f / 24.0f));
    p = xsimd::fma(p, rr, B(1.0f / 6.0f));
    p = xsimd::fma(p, rr, B(0.5f));
    p = xsimd::fma(p, rr, B(1.0f));
    p = xsimd::fma(p, rr, B(1.0f));
    const I bits = (xsimd::to_int(n) + I(127)) << 23;  // 2^n
    detail::logistic_from_exp(p * xsimd::bitwise_cast<B>(bits), s, oms);  // e^-x
}

/// s = 1 / (1 + 2^t) and 1 - s = 2^t s for float lanes: sigmoid_fast with the argument already in base
/// 2 (t = -x / ln 2), for callers that fold the 1 / ln 2 into their own constants (the GELU of the fused
/// kernels): no range reduction by a split ln 2, so four operations fewer per element. t is clamped to
/// [-120, 120] (s within 1e-36 of 0 or 1, no denormals; NaN stays NaN); 2^f for f = t - round(t) in
/// [-1/2, 1/2] by a degree-5 minimax polynomial (7.5e-8 relative), 2^round(t) applied exactly.
template <class A>
inline void sigmoid_pow2(const xsimd::batch<float, A>& t, xsimd::batch<float, A>& s, xsimd::batch<float, A>& oms) {
    using B = xsimd::batch<float, A>;
    using I = xsimd::batch<std::int32_t, A>;
    constexpr float c0 = 1.00000007f, c1 = 0.69314697f, c2 = 0.2402212f, c3 = 0.05550713f, c4 = 0.00967554f,
                    c5 = 0.00132765f;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if constexpr (B::size == 16) {
        // vrangeps: the operand of smaller magnitude with t's sign, i.e. t clamped to [-120, 120].
        // vscalefps multiplies by 2^floor of its second operand: with f = tc - floor(tc) in [0, 1)
        // from vreduceps, tc itself is that operand and no rounding instruction is needed (vrndscaleps
        // is two uops on port 0 here). 2^f on [0, 1) by its own degree-5 fit (relative error 2e-7
        // evaluated in float, as the [-1/2, 1/2] one). tc - floor(tc) loses at most the last bit of f
        // for -1 < tc < 0: 2^f changes by < 2e-8 relative.
        constexpr float d0 = 0.99999994f, d1 = 0.69315308f, d2 = 0.24015361f, d3 = 0.055826318f,
                        d4 = 0.0089893406f, d5 = 0.0018775767f;
        const __m512 tc = _mm512_range_ps(t, _mm512_set1_ps(120.0f), 0x02);
        const __m512 f = _mm512_reduce_ps(tc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // tc - floor(tc)
        const __m512 f2 = _mm512_mul_ps(f, f);
        const __m512 a = _mm512_fmadd_ps(f, _mm512_set1_ps(d1), _mm512_set1_ps(d0));
        const __m512 b = _mm512_fmadd_ps(f, _mm512_set1_ps(d3), _mm512_set1_ps(d2));
        const __m512 c = _mm512_fmadd_ps(f, _mm512_set1_ps(d5), _mm512_set1_ps(d4));
        const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(c, f2, b), f2, a);
        const __m512 e = _mm512_scalef_ps(p, tc);  // 2^t
        detail::logistic_from_exp(B(e), s, oms);
        return;
    }
#endif
    const B tc = xsimd::select(t != t, t, xsimd::min(xsimd::max(t, B(-120.0f)), B(120.0f)));
    const B n = xsimd::nearbyint(tc);
    const B f = tc - n;
    const B f2 = f * f;
    const B p = xsimd::fma(xsimd::fma(xsimd::fma(f, B(c5), B(c4)), f2, xsimd::fma(f, B(c3), B(c2))), f2,
                           xsimd::fma(f, B(c1), B(c0)));
    const I bits = (xsimd::to_int(xsimd::select(t != t, B(0.0f), n)) + I(127)) << 23;  // 2^n
    detail::logistic_from_exp(p * xsimd::bitwise_cast<B>(bits), s, oms);
}

/// s of sigmoid_fast alone.
template <class A>
inline xsimd::batch<float, A> sigmoid_fast(const xsimd::batch<float, A>& x) {
    xsimd::batch<float, A> s, oms;
    sigmoid_fast(x, s, oms);
    return s;
}

using xsimd::fma;
using xsimd::select;
using xsimd::sqrt;

}  // namespace comigs::kernels::simd
