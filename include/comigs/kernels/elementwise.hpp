#pragma once
// Vectorised elementwise kernels of the MLP forms (xsimd, through simd.hpp). Every element goes
// through the same vector code, the tail included (it is padded into one batch), so a result does
// not depend on where an element falls in a chunk, i.e. not on the thread count. The scalar
// formulas in activation.hpp are the plain references these are tested against.
#include <algorithm>
#include <array>

#include "../view.hpp"
#include "simd.hpp"

namespace comigs::kernels {

namespace detail {

/// Elements per parallel chunk (a multiple of every batch width).
inline constexpr Index elementwise_chunk = 16384;
/// Below this many elements one thread does it all (spawning costs more than it saves).
inline constexpr Index elementwise_parallel_min = 65536;

/// out[i] = f(in[i]...) over n elements, f taking and returning batches. out may alias an input.
template <class T, class F, class... In>
void transform_n(T* out, Index n, F f, const In*... in) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index chunks = (n + elementwise_chunk - 1) / elementwise_chunk;
#pragma omp parallel for schedule(static) if (n > elementwise_parallel_min)
    for (Index c = 0; c < chunks; ++c) {
        const Index lo = c * elementwise_chunk, hi = std::min(n, lo + elementwise_chunk);
        Index i = lo;
        for (; i + w <= hi; i += w) simd::store(out + i, f(simd::load(in + i)...));
        if (i < hi) {
            const Index rest = hi - i;
            auto pad = [&](const T* p) {
                std::array<T, simd::width<T>> b{};
                std::copy(p + i, p + i + rest, b.begin());
                return simd::load(b.data());
            };
            std::array<T, simd::width<T>> o{};
            simd::store(o.data(), f(pad(in)...));
            std::copy(o.begin(), o.begin() + rest, out + i);
        }
    }
}

template <class T>
struct GeluConst {
    static constexpr T c = T(0.7978845608028654);  // sqrt(2/pi)
    static constexpr T a = T(0.044715);
};

template <class B, class T = typename B::value_type>
inline B gelu_tanh_of(const B& x, B& th) {
    const B x2 = x * x;
    th = simd::tanh(x * simd::fma(B(GeluConst<T>::c * GeluConst<T>::a), x2, B(GeluConst<T>::c)));
    return B(T(0.5)) * x * (B(T(1)) + th);
}

template <class B, class T = typename B::value_type>
inline B sigmoid_of(const B& x) {
    return B(T(1)) / (B(T(1)) + simd::exp(-x));
}

}  // namespace detail

/// u[i] = gelu_tanh(h[i]) for n elements (u may be h).
template <class T>
void gelu_forward(T* u, const T* h, Index n) {
    detail::transform_n(
        u, n,
        [](auto x) {
            decltype(x) th;
            return detail::gelu_tanh_of(x, th);
        },
        h);
}

/// dh[i] = du[i] * gelu_tanh'(h[i]) (dh may be du).
template <class T>
void gelu_backward(T* dh, const T* du, const T* h, Index n) {
    using C = detail::GeluConst<T>;
    detail::transform_n(
        dh, n,
        [](auto g, auto x) {
            using B = decltype(x);
            const B x2 = x * x;
            const B th = simd::tanh(x * simd::fma(B(C::c * C::a), x2, B(C::c)));
            const B half(T(0.5));
            const B inner_grad = simd::fma(B(T(3) * C::a * C::c), x2, B(C::c));
            const B grad = simd::fma(half * x * (B(T(1)) - th * th), inner_grad, half * (B(T(1)) + th));
            return g * grad;
        },
        du, h);
}

/// a[i] = silu(g[i]) * u[i] (SwiGLU).
template <class T>
void swiglu_forward(T* a, const T* g, const T* u, Index n) {
    detail::transform_n(a, n, [](auto x, auto y) { return x * detail::sigmoid_of(x) * y; }, g, u);
}

/// dg[i] = da[i] u[i] silu'(g[i]) and du[i] = da[i] silu(g[i]). dg must not alias da; du may.
template <class T>
void swiglu_backward(T* dg, T* du, const T* da, const T* g, const T* u, Index n) {
    detail::transform_n(
        dg, n,
        [](auto d, auto x, auto y) {
            using B = decltype(x);
            const B s = detail::sigmoid_of(x);
            return d * y * (s * (B(T(1)) + x * (B(T(1)) - s)));
        },
        da, g, u);
    detail::transform_n(du, n, [](auto d, auto x) { return d * x * detail::sigmoid_of(x); }, da, g);
}

/// y[i] += a * x[i].
template <class T>
inline void axpy(T* y, T a, const T* x, Index n) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const simd::batch<T> va(a);
    Index i = 0;
    for (; i + w <= n; i += w) simd::store(y + i, simd::fma(va, simd::load(x + i), simd::load(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
}

/// y[i] = a * x[i].
template <class T>
inline void scale_copy(T* y, T a, const T* x, Index n) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const simd::batch<T> va(a);
    Index i = 0;
    for (; i + w <= n; i += w) simd::store(y + i, va * simd::load(x + i));
    for (; i < n; ++i) y[i] = a * x[i];
}

/// sum_i x[i] y[i], accumulated in T lanes then summed (fixed order: deterministic).
template <class T>
inline T dot(const T* x, const T* y, Index n) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    simd::batch<T> acc0(T(0)), acc1(T(0));
    Index i = 0;
    for (; i + 2 * w <= n; i += 2 * w) {
        acc0 = simd::fma(simd::load(x + i), simd::load(y + i), acc0);
        acc1 = simd::fma(simd::load(x + i + w), simd::load(y + i + w), acc1);
    }
    for (; i + w <= n; i += w) acc0 = simd::fma(simd::load(x + i), simd::load(y + i), acc0);
    T s = simd::reduce_add(acc0 + acc1);
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

}  // namespace comigs::kernels
