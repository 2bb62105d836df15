#pragma once
// Activations of the MLP forms with their derivatives. Plain loops the compiler vectorises; the
// tanh-GELU matches torch.nn.functional.gelu(approximate="tanh").
#include <cmath>

#include "../view.hpp"

namespace comigs::kernels {

template <class T>
inline T gelu_tanh(T x) {
    constexpr T c = T(0.7978845608028654);  // sqrt(2/pi)
    const T inner = c * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(1) + std::tanh(inner));
}

template <class T>
inline T gelu_tanh_grad(T x) {
    constexpr T c = T(0.7978845608028654);
    const T x2 = x * x;
    const T th = std::tanh(c * (x + T(0.044715) * x2 * x));
    return T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * c * (T(1) + T(3) * T(0.044715) * x2);
}

template <class T>
inline T sigmoid(T x) {
    return T(1) / (T(1) + std::exp(-x));
}

template <class T>
inline T silu(T x) {
    return x * sigmoid(x);
}

template <class T>
inline T silu_grad(T x) {
    const T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
}

}  // namespace comigs::kernels
