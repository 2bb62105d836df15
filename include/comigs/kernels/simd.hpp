#pragma once
// The one place that knows which xsimd is installed. Debian ships xsimd 8.1, whose API differs from
// later releases (hadd became reduce_add in 9; architecture names and load helpers changed): every
// comigs kernel uses only the names below, so a version change is fixed here alone.
#include <xsimd/xsimd.hpp>

#include <cstddef>

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

using xsimd::fma;
using xsimd::sqrt;

}  // namespace comigs::kernels::simd
