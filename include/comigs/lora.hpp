#pragma once
// LoRA: y += s * B (A * dropout(x)), A [r, in], B [out, r]. The kernels below work on views so the
// mixture layers can run them on tensors inside their own contiguous buffers; `LoraExpert` is the
// self-contained single adapter built on the same kernels.
#include <cmath>
#include <string>

#include "kernels/gemm.hpp"
#include "params.hpp"
#include "random.hpp"

namespace comigs {

/// How alpha and the rank give the LoRA scale s. Files record which one an adapter uses: mixing them up
/// is the most common LoRA interoperability bug.
enum class LoraScaling {
    linear,  ///< s = alpha / r (PEFT's default)
    sqrt,    ///< s = alpha / sqrt(r) (rsLoRA; what CoMiGS uses)
};

inline const char* to_string(LoraScaling s) { return s == LoraScaling::linear ? "linear" : "sqrt"; }

/// The scale s for `alpha`, `rank` and `scaling`; checks rank >= 1 and finite alpha.
inline double lora_scale(double alpha, Index rank, LoraScaling scaling) {
    require(rank >= 1, "rank ", rank, ": LoRA rank must be >= 1");
    require(std::isfinite(alpha), "alpha ", alpha, ": LoRA alpha must be finite");
    return scaling == LoraScaling::linear ? alpha / static_cast<double>(rank)
                                          : alpha / std::sqrt(static_cast<double>(rank));
}

/// Kaiming-uniform (a = sqrt(5)) as torch.nn.Linear and PEFT initialise A: U(-1/sqrt(in), 1/sqrt(in)).
template <class T>
void kaiming_uniform(MatrixView<T> a, Rng& rng) {
    const double bound = a.cols > 0 ? 1.0 / std::sqrt(static_cast<double>(a.cols)) : 0.0;
    for (Index i = 0; i < a.rows; ++i)
        for (T& v : a.row(i)) v = static_cast<T>(rng.uniform(-bound, bound));
}

/// Forward of one LoRA path on N rows: z[N, r] = x A^T (saved for backward), y[N, out] += s z B^T.
template <class T>
void lora_forward(MatrixView<T> y, MatrixView<T> z, ConstMatrixView<T> x, ConstMatrixView<T> A,
                  ConstMatrixView<T> B, T s) {
    kernels::gemm<T>(z, x, kernels::Op::none, A, kernels::Op::trans);
    kernels::gemm<T>(y, z, kernels::Op::none, B, kernels::Op::trans, s, T(1));
}

/// Backward of `lora_forward`: dz = s dy B (work buffer [N, r]); dB += s dy^T z; dA += dz^T x;
/// dx += dz A (skipped when dx is empty). x is the (dropped-out) input the forward saw.
template <class T>
void lora_backward(MatrixView<T> dx, MatrixView<T> dA, MatrixView<T> dB, MatrixView<T> dz, ConstMatrixView<T> dy,
                   ConstMatrixView<T> x, ConstMatrixView<T> z, ConstMatrixView<T> A, ConstMatrixView<T> B, T s) {
    kernels::gemm<T>(dz, dy, kernels::Op::none, B, kernels::Op::none, s);
    kernels::gemm<T>(dB, dy, kernels::Op::trans, z, kernels::Op::none, s, T(1));
    kernels::gemm<T>(dA, dz, kernels::Op::trans, x, kernels::Op::none, T(1), T(1));
    if (!dx.empty()) kernels::gemm<T>(dx, dz, kernels::Op::none, A, kernels::Op::none, T(1), T(1));
}

/// Shape and options of one LoRA adapter.
struct LoraConfig {
    Index in_features = 0;
    Index out_features = 0;
    Index rank = 8;
    double alpha = 16.0;
    LoraScaling scaling = LoraScaling::sqrt;
    double dropout = 0.0;  ///< probability of zeroing an input element of the LoRA path (training only)

    double scale() const { return lora_scale(alpha, rank, scaling); }
    void validate() const {
        require(in_features >= 1, "in_features ", in_features, ": must be >= 1");
        require(out_features >= 1, "out_features ", out_features, ": must be >= 1");
        require(rank >= 1, "rank ", rank, ": LoRA rank must be >= 1");
        require(std::isfinite(alpha), "alpha ", alpha, ": LoRA alpha must be finite");
        require(dropout >= 0.0 && dropout < 1.0, "dropout ", dropout, ": must be in [0, 1)");
    }
};

/// A single LoRA adapter with its own parameters (`lora_A` [r, in], `lora_B` [out, r]) and gradients.
/// forward adds s B A dropout(x) into y and keeps what backward needs; backward accumulates dA, dB, dx.
template <class T>
class LoraExpert {
public:
    explicit LoraExpert(const LoraConfig& cfg) : cfg_(cfg) {
        cfg_.validate();
        ParamLayout l;
        l.add("lora_A", {cfg_.rank, cfg_.in_features});
        l.add("lora_B", {cfg_.out_features, cfg_.rank});
        params_ = ParamBuffer<T>(std::move(l));
        grads_ = ParamBuffer<T>(params_.layout_ptr());
        s_ = static_cast<T>(cfg_.scale());
    }

    /// Kaiming-uniform A and zero B (so the adapter starts as the identity change).
    void init(Rng& rng) {
        kaiming_uniform(A(), rng);
        for (Index i = 0; i < cfg_.out_features; ++i)
            for (T& v : B().row(i)) v = T(0);
    }

    const LoraConfig& config() const { return cfg_; }
    T scale() const { return s_; }
    MatrixView<T> A() { return params_.view("lora_A"); }
    MatrixView<T> B() { return params_.view("lora_B"); }
    ConstMatrixView<T> A() const { return params_.view("lora_A"); }
    ConstMatrixView<T> B() const { return params_.view("lora_B"); }
    ParamBuffer<T>& params() { return params_; }
    ParamBuffer<T>& grads() { return grads_; }
    const ParamBuffer<T>& params() const { return params_; }
    const ParamBuffer<T>& grads() const { return grads_; }
    void zero_grad() { grads_.zero(); }

    /// y[N, out] += s B A dropout(x[N, in]). With `training` and dropout > 0 a fresh inverted-dropout
    /// mask is drawn from `rng` (required then) and kept for backward.
    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool training = false, Rng* rng = nullptr) {
        require_shape(x, x.rows, cfg_.in_features, "lora input x");
        require_shape(y, x.rows, cfg_.out_features, "lora output y");
        // Checked before anything is overwritten: a refused forward leaves the last one to backward.
        require(rng != nullptr || !training || cfg_.dropout == 0.0, "rng: dropout ", cfg_.dropout,
                " in training needs a generator");
        complete_ = false;
        n_ = x.rows;
        z_.assign(static_cast<std::size_t>(n_ * cfg_.rank), T(0));
        dropped_ = training && cfg_.dropout > 0.0;
        ConstMatrixView<T> xin = x;
        if (dropped_) {
            const T keep = T(1) / static_cast<T>(1.0 - cfg_.dropout);
            mask_.resize(static_cast<std::size_t>(n_ * cfg_.in_features));
            xdrop_.resize(mask_.size());
            for (Index i = 0; i < n_; ++i)
                for (Index j = 0; j < cfg_.in_features; ++j) {
                    const std::size_t o = static_cast<std::size_t>(i * cfg_.in_features + j);
                    mask_[o] = rng->uniform() < cfg_.dropout ? T(0) : keep;
                    xdrop_[o] = x(i, j) * mask_[o];
                }
            xin = ConstMatrixView<T>(xdrop_.data(), n_, cfg_.in_features);
        } else {
            xcopy_.resize(static_cast<std::size_t>(n_ * cfg_.in_features));
            for (Index i = 0; i < n_; ++i)
                std::copy(x.row_ptr(i), x.row_ptr(i) + cfg_.in_features, xcopy_.data() + i * cfg_.in_features);
            xin = ConstMatrixView<T>(xcopy_.data(), n_, cfg_.in_features);
        }
        lora_forward<T>(y, MatrixView<T>(z_.data(), n_, cfg_.rank), xin, A(), B(), s_);
        complete_ = true;
    }

    /// Given dy[N, out] of the last forward: dA, dB accumulate into grads(); dx[N, in] accumulates
    /// (pass an empty view to skip it).
    void backward(MatrixView<T> dx, ConstMatrixView<T> dy) {
        require(complete_ || (n_ == 0 && dy.rows == 0), "lora backward: no completed forward to differentiate");
        require_shape(dy, n_, cfg_.out_features, "lora output gradient dy");
        if (!dx.empty()) require_shape(dx, n_, cfg_.in_features, "lora input gradient dx");
        const ConstMatrixView<T> xin(dropped_ ? xdrop_.data() : xcopy_.data(), n_, cfg_.in_features);
        dz_.assign(static_cast<std::size_t>(n_ * cfg_.rank), T(0));
        MatrixView<T> dz(dz_.data(), n_, cfg_.rank);
        if (!dropped_) {
            lora_backward<T>(dx, grads_.view("lora_A"), grads_.view("lora_B"), dz, dy, xin,
                             ConstMatrixView<T>(z_.data(), n_, cfg_.rank), A(), B(), s_);
            return;
        }
        // With dropout the input gradient passes through the mask, so compute it aside first.
        std::vector<T> dxd(static_cast<std::size_t>(n_ * cfg_.in_features), T(0));
        lora_backward<T>(MatrixView<T>(dxd.data(), n_, cfg_.in_features), grads_.view("lora_A"),
                         grads_.view("lora_B"), dz, dy, xin, ConstMatrixView<T>(z_.data(), n_, cfg_.rank), A(), B(),
                         s_);
        if (!dx.empty())
            for (Index i = 0; i < n_; ++i)
                for (Index j = 0; j < cfg_.in_features; ++j)
                    dx(i, j) += dxd[static_cast<std::size_t>(i * cfg_.in_features + j)] *
                                mask_[static_cast<std::size_t>(i * cfg_.in_features + j)];
    }

    /// W[out, in] += s B A: the adapter folded into a frozen weight for inference.
    void merge_into(MatrixView<T> W) const { apply_delta(W, s_); }
    /// W[out, in] -= s B A: undoes `merge_into` (exact up to rounding).
    void unmerge_from(MatrixView<T> W) const { apply_delta(W, -s_); }

private:
    void apply_delta(MatrixView<T> W, T s) const {
        require_shape(W, cfg_.out_features, cfg_.in_features, "merged weight W");
        kernels::gemm<T>(W, B(), kernels::Op::none, A(), kernels::Op::none, s, T(1));
    }

    LoraConfig cfg_;
    T s_{};
    ParamBuffer<T> params_, grads_;
    Index n_ = 0;
    bool complete_ = false;  // the last forward ran to its end
    bool dropped_ = false;
    std::vector<T> z_, dz_, mask_, xdrop_, xcopy_;
};

}  // namespace comigs
