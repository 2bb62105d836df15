#pragma once
// The frozen base of a host block, held once and shared (by pointer) by every expert, every layer
// object and every simulated user that adapts it. Nothing here is ever trained.
#include <memory>
#include <span>
#include <string>

#include "kernels/gemm.hpp"
#include "params.hpp"
#include "random.hpp"

namespace comigs {

/// A frozen linear map y = x W^T + b over views; W is [out, in] (nn.Linear convention), b is [out] or empty.
template <class T>
struct FrozenLinear {
    ConstMatrixView<T> weight;  ///< [out, in]
    std::span<const T> bias;    ///< [out] or empty

    index in_features() const { return weight.cols; }
    index out_features() const { return weight.rows; }

    /// y[N, out] = x[N, in] W^T + b (overwrites y, or adds to it when `accumulate`).
    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool accumulate = false) const {
        kernels::gemm<T>(y, x, kernels::Op::none, weight, kernels::Op::trans, T(1), accumulate ? T(1) : T(0));
        if (!bias.empty()) {
            const index n = y.rows, m = y.cols;
#pragma omp parallel for schedule(static) if (n * m > 32768)
            for (index i = 0; i < n; ++i) {
                T* yi = y.row_ptr(i);
                for (index j = 0; j < m; ++j) yi[j] += bias[static_cast<std::size_t>(j)];
            }
        }
    }

    /// dx[N, in] (+)= dy[N, out] W.
    void backward_input(MatrixView<T> dx, ConstMatrixView<T> dy, bool accumulate = true) const {
        kernels::gemm<T>(dx, dy, kernels::Op::none, weight, kernels::Op::none, T(1), accumulate ? T(1) : T(0));
    }
};

/// Which MLP the mixture adapts: GPT-2 (d -> hidden with bias, GELU-tanh, hidden -> d with bias) or
/// Llama (SwiGLU: down(silu(gate x) * up x), no biases).
enum class MlpForm { gelu, swiglu };

inline const char* to_string(MlpForm f) { return f == MlpForm::gelu ? "gelu" : "swiglu"; }

/// Frozen MLP weights in one buffer. Tensor names: gelu: `fc.weight` [h, d], `fc.bias` [h],
/// `proj.weight` [d, h], `proj.bias` [d]; swiglu: `gate.weight` [h, d], `up.weight` [h, d],
/// `down.weight` [d, h].
template <class T>
class FrozenMlp {
public:
    FrozenMlp(MlpForm form, index d_model, index d_hidden) : form_(form), d_(d_model), h_(d_hidden) {
        require(d_model >= 1, "d_model ", d_model, ": must be >= 1");
        require(d_hidden >= 1, "d_hidden ", d_hidden, ": must be >= 1");
        ParamLayout l;
        if (form == MlpForm::gelu) {
            l.add("fc.weight", {h_, d_});
            l.add("fc.bias", {h_});
            l.add("proj.weight", {d_, h_});
            l.add("proj.bias", {d_});
        } else {
            l.add("gate.weight", {h_, d_});
            l.add("up.weight", {h_, d_});
            l.add("down.weight", {d_, h_});
        }
        weights_ = ParamBuffer<T>(std::move(l));
    }

    MlpForm form() const { return form_; }
    index d_model() const { return d_; }
    index d_hidden() const { return h_; }

    /// Mutable access for loading the host's weights before the layer is shared.
    ParamBuffer<T>& weights() { return weights_; }
    const ParamBuffer<T>& weights() const { return weights_; }

    /// A linear map by name: `fc`, `proj` (gelu) or `gate`, `up`, `down` (swiglu).
    FrozenLinear<T> linear(const std::string& name) const {
        FrozenLinear<T> f{weights_.view(name + ".weight"), {}};
        if (weights_.contains(name + ".bias")) f.bias = weights_.span(name + ".bias");
        return f;
    }

    /// Fills every weight and bias with N(0, std) draws (tests and toy examples).
    void randomize(Rng& rng, double std = 0.02) {
        for (const auto& spec : weights_.layout().tensors())
            for (T& w : weights_.span(spec.name)) w = static_cast<T>(rng.normal(0.0, std));
    }

private:
    MlpForm form_;
    index d_, h_;
    ParamBuffer<T> weights_;
};

}  // namespace comigs
