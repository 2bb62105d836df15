#pragma once
// The frozen base of a host block, held once and shared (by pointer) by every expert, every layer
// object and every simulated user that adapts it. Nothing here is ever trained.
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/gemm.hpp"
#include "kernels/gemm_bf16.hpp"
#include "params.hpp"
#include "random.hpp"

namespace comigs {

/// A frozen linear map y = x W^T + b over views; W is [out, in] (nn.Linear convention), b is [out] or empty.
/// When the weight is held in bf16 (`weight_bf16` set, `weight` empty; float only), the products
/// convert the activations to bf16 and accumulate in fp32 (kernels/gemm_bf16.hpp), unless
/// `fp32_compute` asks for fp32 arithmetic on the weight's exact values (widened a panel at a time:
/// what a framework computes on the model cast to fp32, without an fp32 copy of the weight).
template <class T>
struct FrozenLinear {
    ConstMatrixView<T> weight;                 ///< [out, in] (empty when held in bf16)
    std::span<const T> bias;                   ///< [out] or empty
    ConstMatrixView<kernels::bf16> weight_bf16{};  ///< [out, in] when held in bf16, else empty
    bool fp32_compute = false;                 ///< a bf16 weight: products in fp32, activations not rounded

    bool is_bf16() const { return weight_bf16.data != nullptr; }
    Index in_features() const { return is_bf16() ? weight_bf16.cols : weight.cols; }
    Index out_features() const { return is_bf16() ? weight_bf16.rows : weight.rows; }

    /// y[N, out] = x[N, in] W^T + b (overwrites y, or adds to it when `accumulate`).
    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool accumulate = false) const {
        if constexpr (std::is_same_v<T, float>) {
            if (is_bf16() && fp32_compute)
                kernels::gemm_bf16_widened(y, x, weight_bf16, kernels::Op::trans, 1.0f, accumulate ? 1.0f : 0.0f);
            else if (is_bf16())
                kernels::gemm_bf16(y, x, weight_bf16, kernels::Op::trans, 1.0f, accumulate ? 1.0f : 0.0f);
            else
                kernels::gemm<T>(y, x, kernels::Op::none, weight, kernels::Op::trans, T(1), accumulate ? T(1) : T(0));
        } else {
            kernels::gemm<T>(y, x, kernels::Op::none, weight, kernels::Op::trans, T(1), accumulate ? T(1) : T(0));
        }
        add_bias(y);
    }

    /// y[i] += b for every row (nothing without a bias).
    void add_bias(MatrixView<T> y) const {
        if (bias.empty()) return;
        const Index n = y.rows, m = y.cols;
#pragma omp parallel for schedule(static) if (n * m > 32768)
        for (Index i = 0; i < n; ++i) {
            T* yi = y.row_ptr(i);
            for (Index j = 0; j < m; ++j) yi[j] += bias[static_cast<std::size_t>(j)];
        }
    }

    /// y[N, out] = x W^T + b for activations already in bf16 (a bf16-held weight only; float only).
    void forward(MatrixView<float> y, ConstMatrixView<kernels::bf16> xb, bool accumulate = false) const
        requires std::is_same_v<T, float>
    {
        require(is_bf16(), "FrozenLinear: bf16 activations need a weight held in bf16");
        kernels::gemm_bf16_from(y, xb, weight_bf16, kernels::Op::trans, 1.0f, accumulate ? 1.0f : 0.0f);
        add_bias(y);
    }

    /// dx[N, in] (+)= dy W for gradients already in bf16 (a bf16-held weight only; float only).
    void backward_input(MatrixView<float> dx, ConstMatrixView<kernels::bf16> dyb, bool accumulate = true) const
        requires std::is_same_v<T, float>
    {
        require(is_bf16(), "FrozenLinear: bf16 gradients need a weight held in bf16");
        kernels::gemm_bf16_from(dx, dyb, weight_bf16, kernels::Op::none, 1.0f, accumulate ? 1.0f : 0.0f);
    }

    /// dx[N, in] (+)= dy[N, out] W.
    void backward_input(MatrixView<T> dx, ConstMatrixView<T> dy, bool accumulate = true) const {
        if constexpr (std::is_same_v<T, float>) {
            if (is_bf16()) {
                if (fp32_compute)
                    kernels::gemm_bf16_widened(dx, dy, weight_bf16, kernels::Op::none, 1.0f, accumulate ? 1.0f : 0.0f);
                else
                    kernels::gemm_bf16(dx, dy, weight_bf16, kernels::Op::none, 1.0f, accumulate ? 1.0f : 0.0f);
                return;
            }
        }
        kernels::gemm<T>(dx, dy, kernels::Op::none, weight, kernels::Op::none, T(1), accumulate ? T(1) : T(0));
    }
};

/// Which MLP the mixture adapts: GPT-2 (d -> hidden with bias, GELU-tanh, hidden -> d with bias) or
/// Llama (SwiGLU: down(silu(gate x) * up x), no biases).
enum class MlpForm { gelu, swiglu };

inline const char* to_string(MlpForm f) { return f == MlpForm::gelu ? "gelu" : "swiglu"; }

/// How a frozen MLP holds its weight matrices: fp32 (the default, and the fallback everywhere), or
/// bf16 (half the bytes; products convert activations to bf16 and accumulate in fp32).
enum class Precision { fp32, bf16 };

inline const char* to_string(Precision p) { return p == Precision::fp32 ? "fp32" : "bf16"; }

/// Frozen MLP weights in one buffer. Tensor names: gelu: `fc.weight` [h, d], `fc.bias` [h],
/// `proj.weight` [d, h], `proj.bias` [d]; swiglu: `gate.weight` [h, d], `up.weight` [h, d],
/// `down.weight` [d, h]. One copy serves every expert, layer object and user that adapts it.
template <class T>
class FrozenMlp {
public:
    FrozenMlp(MlpForm form, Index d_model, Index d_hidden) : FrozenMlp(form, d_model, d_hidden, Layout{}) {
        weights_ = ParamBuffer<T>(full_layout_);
    }

private:
    struct Layout {};
    /// Shapes only: the owning constructor allocates the weights, the borrowing one never does.
    FrozenMlp(MlpForm form, Index d_model, Index d_hidden, Layout) : form_(form), d_(d_model), h_(d_hidden) {
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
        full_layout_ = std::make_shared<const ParamLayout>(std::move(l));
    }

public:

    /// An MLP over weights held elsewhere (e.g. a memory-mapped model file, read in place): `linears`
    /// gives every linear of the form by name (`fc`, `proj` or `gate`, `up`, `down`), each [out, in]
    /// with the shapes of the form; `owner` keeps their memory alive as long as the MLP lives. Nothing
    /// is copied. weights() is then empty and set_precision() refuses: the source decides the storage.
    FrozenMlp(MlpForm form, Index d_model, Index d_hidden, std::map<std::string, FrozenLinear<T>> linears,
              std::shared_ptr<const void> owner)
        : FrozenMlp(form, d_model, d_hidden, Layout{}) {
        for (const auto& spec : full_layout_->tensors()) {
            if (!spec.name.ends_with(".weight")) continue;
            const std::string name = spec.name.substr(0, spec.name.size() - 7);
            const auto it = linears.find(name);
            require(it != linears.end(), "borrowed ", to_string(form), " MLP: no linear '", name, "'");
            const FrozenLinear<T>& f = it->second;
            require<ShapeError>(f.out_features() == spec.rows() && f.in_features() == spec.cols(), "borrowed MLP linear '",
                                name, "': weight [", f.out_features(), ", ", f.in_features(), "], expected [",
                                spec.rows(), ", ", spec.cols(), "]");
            const auto bias = full_layout_->find(name + ".bias");
            require<ShapeError>(f.bias.empty() || (bias && static_cast<Index>(f.bias.size()) == bias->size),
                                "borrowed MLP linear '", name, "': bias of ", f.bias.size(), " values, expected ",
                                bias ? bias->size : 0);
            borrowed_.emplace(name, f);
        }
        require(borrowed_.size() == linears.size(), "borrowed ", to_string(form), " MLP: ", linears.size(),
                " linears given, the form has ", borrowed_.size());
        owner_ = std::move(owner);
        precision_ = borrowed_.begin()->second.is_bf16() ? Precision::bf16 : Precision::fp32;
    }

    MlpForm form() const { return form_; }
    Index d_model() const { return d_; }
    Index d_hidden() const { return h_; }

    /// Mutable access for loading the host's weights before the layer is shared. In bf16 precision it
    /// holds the biases only (the matrices are in bf16_weight()).
    ParamBuffer<T>& weights() { return weights_; }
    const ParamBuffer<T>& weights() const { return weights_; }

    Precision precision() const { return precision_; }

    /// Stores the weight matrices in `p`, converting the current values once (fp32 -> bf16 rounds to
    /// nearest even; back to fp32 is exact). bf16 needs T = float; biases always stay in T. Call it
    /// after loading the weights and before sharing the base: views taken earlier become invalid.
    void set_precision(Precision p) {
        if (p == precision_) return;
        require(!is_borrowed(), "precision ", to_string(p), ": a borrowed MLP keeps the storage of its source");
        if (p == Precision::bf16) {
            require(std::is_same_v<T, float>, "precision bf16: only FrozenMlp<float> can hold bf16 weights");
            if constexpr (std::is_same_v<T, float>) {
                ParamLayout biases;
                Index total = 0;
                bf16_offsets_.clear();
                for (const auto& spec : full_layout_->tensors()) {
                    if (spec.shape.size() == 2) {
                        bf16_offsets_.push_back({spec.name, total, spec.rows(), spec.cols()});
                        total += (spec.size + 31) / 32 * 32;  // 64-byte aligned starts
                    } else {
                        biases.add(spec.name, spec.shape);
                    }
                }
                bf16_.assign(static_cast<std::size_t>(total), kernels::bf16{});
                for (const auto& m : bf16_offsets_)
                    kernels::convert_to_bf16(bf16_.data() + m.offset, weights_.span(m.name).data(), m.rows * m.cols);
                ParamBuffer<T> kept(std::move(biases));
                for (const auto& spec : kept.layout().tensors()) {
                    auto src = weights_.span(spec.name);
                    std::copy(src.begin(), src.end(), kept.span(spec.name).begin());
                }
                weights_ = std::move(kept);
            }
        } else {
            if constexpr (std::is_same_v<T, float>) {
                ParamBuffer<T> full(full_layout_);
                for (const auto& spec : weights_.layout().tensors()) {
                    auto src = weights_.span(spec.name);
                    std::copy(src.begin(), src.end(), full.span(spec.name).begin());
                }
                for (const auto& m : bf16_offsets_)
                    kernels::convert_to_float(full.span(m.name).data(), bf16_.data() + m.offset, m.rows * m.cols);
                weights_ = std::move(full);
                bf16_ = {};
                bf16_offsets_.clear();
            }
        }
        precision_ = p;
    }

    /// A weight matrix held in bf16 (`fc.weight`, ...); empty in fp32 precision.
    ConstMatrixView<kernels::bf16> bf16_weight(const std::string& name) const {
        if (is_borrowed() && name.ends_with(".weight")) {
            const auto it = borrowed_.find(name.substr(0, name.size() - 7));
            return it == borrowed_.end() ? ConstMatrixView<kernels::bf16>() : it->second.weight_bf16;
        }
        for (const auto& m : bf16_offsets_)
            if (m.name == name) return {bf16_.data() + m.offset, m.rows, m.cols};
        return {};
    }

    /// Bytes held for the frozen weights (matrices and biases), whatever the number of experts (0 when
    /// borrowed: the owner holds them).
    std::size_t weight_bytes() const {
        return static_cast<std::size_t>(weights_.size()) * sizeof(T) + bf16_.size() * sizeof(kernels::bf16);
    }

    /// Whether the weights are held elsewhere (the borrowing constructor).
    bool is_borrowed() const { return !borrowed_.empty(); }

    /// A linear map by name: `fc`, `proj` (gelu) or `gate`, `up`, `down` (swiglu).
    FrozenLinear<T> linear(const std::string& name) const {
        if (is_borrowed()) {
            const auto it = borrowed_.find(name);
            require(it != borrowed_.end(), "linear '", name, "': not in this MLP (no '", name, ".weight')");
            return it->second;
        }
        FrozenLinear<T> f;
        if (precision_ == Precision::bf16) {
            f.weight_bf16 = bf16_weight(name + ".weight");
            require(f.weight_bf16.data != nullptr, "linear '", name, "': not in this MLP");
        } else {
            f.weight = weights_.view(name + ".weight");
        }
        if (weights_.contains(name + ".bias")) f.bias = weights_.span(name + ".bias");
        return f;
    }

    /// Fills every weight and bias with N(0, std) draws (tests and toy examples; fp32 precision).
    void randomize(Rng& rng, double std = 0.02) {
        require(precision_ == Precision::fp32 && !is_borrowed(), "randomize: call it before set_precision(bf16), on an owned MLP");
        for (const auto& spec : weights_.layout().tensors())
            for (T& w : weights_.span(spec.name)) w = static_cast<T>(rng.normal(0.0, std));
    }

private:
    struct Bf16Matrix {
        std::string name;
        Index offset, rows, cols;
    };

    MlpForm form_;
    Index d_, h_;
    Precision precision_ = Precision::fp32;
    std::shared_ptr<const ParamLayout> full_layout_;
    ParamBuffer<T> weights_;
    comigs::detail::aligned_vector<kernels::bf16> bf16_;
    std::vector<Bf16Matrix> bf16_offsets_;
    std::map<std::string, FrozenLinear<T>> borrowed_;  // the borrowing constructor's linears
    std::shared_ptr<const void> owner_;                // keeps their memory alive
};

}  // namespace comigs
