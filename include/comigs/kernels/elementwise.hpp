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

/// Elements per parallel chunk. Tests shrink it (any size works: the chunk tails take the same
/// padded vector path) to run many chunks and tails on small inputs.
inline Index& elementwise_chunk() {
    static Index chunk = 16384;
    return chunk;
}
/// Below this many elements one thread does it all (spawning costs more than it saves).
inline constexpr Index elementwise_parallel_min = 65536;

/// out[i] = f(in[i]...) over n elements on the calling thread, f taking and returning batches.
/// out may alias an input.
template <class T, class F, class... In>
inline void transform_serial(T* out, Index n, F f, const In*... in) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    Index i = 0;
    for (; i + w <= n; i += w) simd::store(out + i, f(simd::load(in + i)...));
    if (i < n) {
        const Index rest = n - i;
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

/// transform_serial over fixed chunks shared by the threads.
template <class T, class F, class... In>
void transform_n(T* out, Index n, F f, const In*... in) {
    const Index chunk = std::max<Index>(1, elementwise_chunk());
    const Index chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (n > elementwise_parallel_min)
    for (Index c = 0; c < chunks; ++c) {
        const Index lo = c * chunk, len = std::min(n - lo, chunk);
        transform_serial(out + lo, len, f, (in + lo)...);
    }
}

template <class T>
struct GeluConst {
    static constexpr T c = T(0.7978845608028654);  // sqrt(2/pi)
    static constexpr T a = T(0.044715);
};

template <class B, class T = typename B::value_type>
inline B sigmoid_of(const B& x) {
    return B(T(1)) / (B(T(1)) + simd::exp(-x));
}

/// gelu_tanh(x) = 0.5 x (1 + tanh(a)) = x sigmoid(2a), a = c (x + 0.044715 x^3): one exp per element.
template <class B, class T = typename B::value_type>
inline B gelu_of(const B& x) {
    const B two_a = x * simd::fma(B(T(2) * GeluConst<T>::c * GeluConst<T>::a), x * x, B(T(2) * GeluConst<T>::c));
    return x / (B(T(1)) + simd::exp(-two_a));
}

/// gelu_tanh'(x) = s + 2 x s (1 - s) a'(x) with s = sigmoid(2a), a' = c (1 + 3 * 0.044715 x^2).
template <class B, class T = typename B::value_type>
inline B gelu_grad_of(const B& x) {
    const B x2 = x * x;
    const B two_a = x * simd::fma(B(T(2) * GeluConst<T>::c * GeluConst<T>::a), x2, B(T(2) * GeluConst<T>::c));
    const B s = B(T(1)) / (B(T(1)) + simd::exp(-two_a));
    const B two_da = simd::fma(B(T(6) * GeluConst<T>::c * GeluConst<T>::a), x2, B(T(2) * GeluConst<T>::c));
    return simd::fma(x * s * (B(T(1)) - s), two_da, s);
}

template <class B, class T = typename B::value_type>
inline B silu_of(const B& x) {
    return x / (B(T(1)) + simd::exp(-x));
}

/// silu'(x) = s (1 + x (1 - s)).
template <class B, class T = typename B::value_type>
inline B silu_grad_of(const B& x) {
    const B s = sigmoid_of(x);
    return s * simd::fma(x, B(T(1)) - s, B(T(1)));
}

}  // namespace detail

/// u[i] = gelu_tanh(h[i]) for n elements (u may be h); threads share the work.
template <class T>
void gelu_forward(T* u, const T* h, Index n) {
    detail::transform_n(u, n, [](auto x) { return detail::gelu_of(x); }, h);
}

/// dh[i] = du[i] * gelu_tanh'(h[i]) (dh may be du); threads share the work.
template <class T>
void gelu_backward(T* dh, const T* du, const T* h, Index n) {
    detail::transform_n(dh, n, [](auto g, auto x) { return g * detail::gelu_grad_of(x); }, du, h);
}

/// The same on the calling thread only (for rows inside an outer parallel loop).
template <class T>
inline void gelu_forward_row(T* u, const T* h, Index n) {
    detail::transform_serial(u, n, [](auto x) { return detail::gelu_of(x); }, h);
}
template <class T>
inline void gelu_backward_row(T* dh, const T* du, const T* h, Index n) {
    detail::transform_serial(dh, n, [](auto g, auto x) { return g * detail::gelu_grad_of(x); }, du, h);
}

/// a[i] = silu(g[i]) * u[i] (SwiGLU), on the calling thread.
template <class T>
inline void swiglu_forward_row(T* a, const T* g, const T* u, Index n) {
    detail::transform_serial(a, n, [](auto x, auto y) { return detail::silu_of(x) * y; }, g, u);
}

/// dg[i] = da[i] u[i] silu'(g[i]) and du[i] = da[i] silu(g[i]), on the calling thread. dg must not
/// alias da; du may.
template <class T>
inline void swiglu_backward_row(T* dg, T* du, const T* da, const T* g, const T* u, Index n) {
    detail::transform_serial(dg, n, [](auto d, auto x, auto y) { return d * y * detail::silu_grad_of(x); }, da, g, u);
    detail::transform_serial(du, n, [](auto d, auto x) { return d * detail::silu_of(x); }, da, g);
}

/// a[i] = silu(g[i]) * u[i]; threads share the work.
template <class T>
void swiglu_forward(T* a, const T* g, const T* u, Index n) {
    detail::transform_n(a, n, [](auto x, auto y) { return detail::silu_of(x) * y; }, g, u);
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

/// max_i x[i] over n >= 1 values, in vectors (the tail as an overlapping last vector): the same value as
/// std::max_element for any finite or infinite inputs (max is exact and order-free). The softmax passes
/// of attention and the LM head's cross-entropy start from it.
template <class T>
inline T max_of(const T* x, Index n) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    if (n < w) return *std::max_element(x, x + n);
    simd::batch<T> m = simd::load(x);
    Index i = w;
    for (; i + w <= n; i += w) m = xsimd::max(m, simd::load(x + i));
    if (i < n) m = xsimd::max(m, simd::load(x + n - w));
    std::array<T, simd::width<T>> lanes;
    simd::store(lanes.data(), m);
    return *std::max_element(lanes.begin(), lanes.end());
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

/// x[i] = exp(x[i] - shift) for n elements, returning their sum: a softmax row's numerators. Every
/// element goes through the vector exp, the tail padded into one batch; the sum is taken in T lanes,
/// then across them, then over the tail (a fixed order).
template <class T>
inline T exp_shifted_sum(T* x, Index n, T shift) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const B sh(shift);
    B acc(T(0));
    Index i = 0;
    for (; i + w <= n; i += w) {
        const B e = simd::exp(simd::load(x + i) - sh);
        simd::store(x + i, e);
        acc = acc + e;
    }
    T sum = simd::reduce_add(acc);
    if (i < n) {
        std::array<T, simd::width<T>> tmp{};
        std::copy(x + i, x + n, tmp.begin());
        simd::store(tmp.data(), simd::exp(simd::load(tmp.data()) - sh));
        for (Index t = 0; t < n - i; ++t) {
            x[i + t] = tmp[static_cast<std::size_t>(t)];
            sum += tmp[static_cast<std::size_t>(t)];
        }
    }
    return sum;
}

}  // namespace comigs::kernels
