#pragma once
// The MLP of a transformer block behind a small interface, so that a mixture of LoRA experts (or any
// other block) can replace GPT-2's dense MLP without the model knowing.
#include <string>
#include <utility>

#include <memory>

#include <comigs/detail/aligned.hpp>
#include <comigs/frozen.hpp>
#include <comigs/kernels/elementwise.hpp>
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

/// A block's MLP as it was pretrained, frozen: GPT-2's y = proj(gelu_tanh(fc x)) or Llama's
/// y = down(silu(gate x) * up x) over a shared comigs::FrozenMlp (fp32, bf16 or borrowed weights). Nothing
/// trains; backward gives only the input gradient. The host's default MLP when it is loaded to be adapted.
template <class T>
class FrozenMlpBlock final : public MlpBlock<T> {
public:
    explicit FrozenMlpBlock(std::shared_ptr<const FrozenMlp<T>> base) : base_(std::move(base)) {
        require(base_ != nullptr, "frozen MLP block: null base");
    }

    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool training) override {
        const Index n = x.rows, h = base_->d_hidden();
        // Training keeps this block's activations for its backward; inference uses a scratch shared by
        // every block (a 30-block model would otherwise hold 30 [N, hidden] x 4 buffers to evaluate).
        reserve(training ? buf_ : shared_scratch(), n, h);
        kept_ = training;
        if (base_->form() == MlpForm::gelu) {
            base_->linear("fc").forward(slot(0), x);
            kernels::gelu_forward(slot(1).data, slot(0).data, n * h);
            base_->linear("proj").forward(y, slot(1));
        } else {
            base_->linear("gate").forward(slot(0), x);
            base_->linear("up").forward(slot(1), x);
            kernels::swiglu_forward(slot(2).data, slot(0).data, slot(1).data, n * h);
            base_->linear("down").forward(y, slot(2));
        }
    }

    void backward(MatrixView<T> dx, ConstMatrixView<T> dy, ConstMatrixView<T> x) override {
        const Index n = x.rows, h = base_->d_hidden();
        require(kept_, "frozen MLP backward: the last forward was not a training forward");
        require<ShapeError>(n == n_, "frozen MLP backward on ", n, " tokens, forward had ", n_);
        if (base_->form() == MlpForm::gelu) {
            const MatrixView<T> pre = slot(0), dact = slot(2);
            base_->linear("proj").backward_input(dact, dy, false);
            kernels::gelu_backward(dact.data, dact.data, pre.data, n * h);
            base_->linear("fc").backward_input(dx, dact, true);
        } else {
            const MatrixView<T> g = slot(0), u = slot(1), da = slot(2), dg = slot(3);
            base_->linear("down").backward_input(da, dy, false);
#pragma omp parallel for schedule(static) if (n * h >= (Index(1) << 16))
            for (Index i = 0; i < n; ++i)
                kernels::swiglu_backward_row(dg.row_ptr(i), da.row_ptr(i), da.row_ptr(i), g.row_ptr(i), u.row_ptr(i), h);
            base_->linear("gate").backward_input(dx, dg, true);
            base_->linear("up").backward_input(dx, da, true);  // da now holds d(up)
        }
    }

    const FrozenMlp<T>& base() const { return *base_; }

private:
    static comigs::detail::aligned_vector<T>& shared_scratch() {
        thread_local comigs::detail::aligned_vector<T> scratch;
        return scratch;
    }
    void reserve(comigs::detail::aligned_vector<T>& buf, Index n, Index hidden) {
        n_ = n;
        hidden_ = hidden;
        if (static_cast<Index>(buf.size()) < 4 * n * hidden) buf.resize(static_cast<std::size_t>(4 * n * hidden));
        data_ = buf.data();
    }
    MatrixView<T> slot(int i) { return {data_ + i * n_ * hidden_, n_, hidden_}; }

    std::shared_ptr<const FrozenMlp<T>> base_;
    Index n_ = 0, hidden_ = 0;
    bool kept_ = false;
    T* data_ = nullptr;
    comigs::detail::aligned_vector<T> buf_;
};

}  // namespace comigs::models
