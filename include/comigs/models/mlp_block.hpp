#pragma once
// The MLP of a transformer block behind a small interface, so that a mixture of LoRA experts (or any
// other block) can replace GPT-2's dense MLP without the model knowing.
#include <string>
#include <utility>

#include <comigs/detail/aligned.hpp>
#include <comigs/params.hpp>

#include "layers.hpp"

namespace comigs::models {

/// The position-wise part of a block: y[N, d] = mlp(x[N, d]) for N = B*T tokens, each token on its own.
/// The model calls forward once per step, then (when training) backward once with the same x.
template <class T>
class MlpBlock {
public:
    virtual ~MlpBlock() = default;

    /// y[N, d] = mlp(x[N, d]) (y is overwritten). `training`: a backward may follow, and training-only
    /// behaviour (dropout, router noise) is on. x stays valid and unchanged until backward.
    virtual void forward(MatrixView<T> y, ConstMatrixView<T> x, bool training) = 0;

    /// Given dy[N, d] = dLoss/dy for the x of the last forward: ACCUMULATES dLoss/dx into dx[N, d] and
    /// the gradients of the parameters this block trains, including the gradient of aux_loss() (with
    /// weight 1: aux_loss() already carries its coefficient).
    virtual void backward(MatrixView<T> dx, ConstMatrixView<T> dy, ConstMatrixView<T> x) = 0;

    /// Extra loss term of the last forward, already weighted (e.g. 0.01 * load balancing / n_layer);
    /// the model adds it to its loss.
    virtual T aux_loss() const { return T(0); }

    /// Whether the frozen base weights this block reads (if any) get gradients; the model forwards its
    /// train mode here (full pretraining: true; frozen-base fine-tuning: false).
    virtual void set_base_trainable(bool) {}
};

/// GPT-2's MLP: y = c_proj(gelu_tanh(c_fc(x))), c_fc [hidden, d] + bias, c_proj [d, hidden] + bias.
/// Its weights live in the model's parameter buffer (names `<prefix>c_fc.weight` etc.) and its gradients
/// in the model's gradient buffer; both buffers must outlive the block.
template <class T>
class DenseMlp final : public MlpBlock<T> {
public:
    /// prefix e.g. "h.0.mlp."; params and grads share one layout holding the four tensors.
    DenseMlp(ParamBuffer<T>& params, ParamBuffer<T>& grads, std::string prefix)
        : params_(&params), grads_(&grads), prefix_(std::move(prefix)) {
        require(params.contains(prefix_ + "c_fc.weight"), "mlp prefix '", prefix_, "': no c_fc.weight in the buffer");
        require(grads.layout() == params.layout(), "mlp '", prefix_, "': grads and params layouts differ");
    }

    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool /*training*/) override {
        const auto w_fc = params_->view(prefix_ + "c_fc.weight");
        reserve(x.rows, w_fc.rows);
        linear_forward(slot(0), x, w_fc, params_->view(prefix_ + "c_fc.bias").data);
        gelu_forward(slot(1), slot(0));
        linear_forward(y, slot(1), params_->view(prefix_ + "c_proj.weight"),
                       params_->view(prefix_ + "c_proj.bias").data);
    }

    void backward(MatrixView<T> dx, ConstMatrixView<T> dy, ConstMatrixView<T> x) override {
        const auto grad = [&](const char* name) {
            return train_base_ ? grads_->view(prefix_ + name) : MatrixView<T>();
        };
        require<ShapeError>(x.rows == n_, "mlp '", prefix_, "' backward on ", x.rows, " tokens, forward had ", n_);
        MatrixView<T> pre = slot(0), act = slot(1), dact = slot(2), dpre = slot(3);
        eigen(dact).setZero();
        linear_backward(dact, grad("c_proj.weight"), grad("c_proj.bias").data, dy, act,
                        params_->view(prefix_ + "c_proj.weight"));
        eigen(dpre).setZero();
        gelu_backward(dpre, dact, pre);
        linear_backward(dx, grad("c_fc.weight"), grad("c_fc.bias").data, dpre, x,
                        params_->view(prefix_ + "c_fc.weight"));
    }

    void set_base_trainable(bool trainable) override { train_base_ = trainable; }

private:
    // One buffer of four [N, hidden] slots: pre-activation, activation (both kept for backward), and
    // the gradients w.r.t. them (backward scratch). Grows with N, never shrinks.
    void reserve(Index n, Index hidden) {
        n_ = n;
        hidden_ = hidden;
        if (static_cast<Index>(buf_.size()) < 4 * n * hidden) buf_.resize(static_cast<std::size_t>(4 * n * hidden));
    }
    MatrixView<T> slot(int i) { return {buf_.data() + i * n_ * hidden_, n_, hidden_}; }

    ParamBuffer<T>* params_;
    ParamBuffer<T>* grads_;
    std::string prefix_;
    bool train_base_ = true;
    Index n_ = 0, hidden_ = 0;
    comigs::detail::aligned_vector<T> buf_;
};

}  // namespace comigs::models
