#pragma once
// The hosts' LM head + cross-entropy over a frozen head weight, in vocabulary chunks
// (kernels/cross_entropy.hpp): the [tokens, vocab] logits never exist whole. A FrozenLinear [V, d] held
// plain or in bf16 (bf16 products) reads its storage directly (HeadWeightView); a bf16 weight with
// fp32_compute, a quantized one or one with a bias goes through FrozenLinear's own products on a slice
// of its rows, so every form computes the logits exactly as FrozenLinear::forward would.
#include <algorithm>
#include <type_traits>

#include <comigs/frozen.hpp>
#include <comigs/kernels/cross_entropy.hpp>
#include <comigs/kernels/quant.hpp>

namespace comigs::models {

/// A FrozenLinear [V, d] as a head weight for kernels::lm_head_cross_entropy_with: chunk products on
/// row slices of the linear (its own forward and backward_input), bias included.
template <class T>
class FrozenLinearHead {
public:
    explicit FrozenLinearHead(const FrozenLinear<T>& w) : w_(w) {}
    Index rows() const { return w_.out_features(); }
    Index cols() const { return w_.in_features(); }
    void begin_block(ConstMatrixView<T>) {}
    void logits(MatrixView<T> z, ConstMatrixView<T> x, Index v0) const { slice(v0, z.cols).forward(z, x); }
    void accumulate(MatrixView<T> acc, ConstMatrixView<T> p, Index v0, bool add) const {
        slice(v0, p.cols).backward_input(acc, p, add);
    }
    void row(T* out, Index v) const {
        const Index d = cols();
        if (w_.is_quantized()) {
            kernels::dequantize_row(out, w_.weight_quant.type, w_.weight_quant.row_ptr(v), d);
            return;
        }
        if constexpr (std::is_same_v<T, float>) {
            if (w_.is_bf16()) {
                kernels::convert_to_float(out, w_.weight_bf16.row_ptr(v), d);
                return;
            }
        }
        std::copy_n(w_.weight.row_ptr(v), d, out);
    }

private:
    /// Rows [v0, v0 + count) of the linear (and of its bias).
    FrozenLinear<T> slice(Index v0, Index count) const {
        FrozenLinear<T> s = w_;
        if (w_.is_quantized()) {
            const auto& q = w_.weight_quant;
            s.weight_quant = kernels::QuantMatrixView(q.type, q.row_ptr(v0), count, q.cols, q.row_bytes);
        } else if (w_.is_bf16()) {
            s.weight_bf16 = w_.weight_bf16.middle_rows(v0, count);
        } else {
            s.weight = w_.weight.middle_rows(v0, count);
        }
        if (!w_.bias.empty()) s.bias = w_.bias.subspan(static_cast<std::size_t>(v0), static_cast<std::size_t>(count));
        return s;
    }
    const FrozenLinear<T>& w_;
};

/// sum_n nll_n of the LM head W [V, d] (a frozen linear) on x [N, d] with targets [N], chunked over the
/// vocabulary; when dx is not empty it ACCUMULATES grad_scale * dnll_n/dx_n (kernels::lm_head_cross_entropy_with).
template <class T>
double frozen_head_cross_entropy(const FrozenLinear<T>& W, std::type_identity_t<MatrixView<T>> dx,
                                 std::type_identity_t<ConstMatrixView<T>> x, const int* targets,
                                 std::type_identity_t<T> grad_scale) {
    if (W.bias.empty() && !W.is_quantized()) {
        if constexpr (std::is_same_v<T, float>) {
            if (W.takes_bf16_activations()) {
                kernels::HeadWeightView<float, kernels::bf16> h(W.weight_bf16);
                return kernels::lm_head_cross_entropy_with<float>(dx, nullptr, nullptr, x, h, targets, grad_scale);
            }
        }
        if (W.is_plain()) {
            kernels::HeadWeightView<T, T> h(W.weight);
            return kernels::lm_head_cross_entropy_with<T>(dx, nullptr, nullptr, x, h, targets, grad_scale);
        }
    }
    FrozenLinearHead<T> h(W);
    return kernels::lm_head_cross_entropy_with<T>(dx, nullptr, nullptr, x, h, targets, grad_scale);
}

}  // namespace comigs::models
