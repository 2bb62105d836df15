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

using xsimd::exp;
using xsimd::fma;
using xsimd::sqrt;
using xsimd::tanh;

}  // namespace comigs::kernels::simd
