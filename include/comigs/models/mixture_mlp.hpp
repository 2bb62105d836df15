#pragma once
// comigs' MixtureOfLoraMlp as the MLP of a Gpt2 block: what turns the pretrained host into a
// CoMiGS model. The mixture reads a copy of the block's frozen dense MLP (a FrozenMlp) and trains its
// experts and router; the model's own weights stay frozen (TrainMode::frozen_base).
#include <memory>
#include <string>

#include <comigs/frozen.hpp>
#include <comigs/mixture.hpp>
#include <comigs/random.hpp>

#include "mlp_block.hpp"
#include "gpt2.hpp"

namespace comigs::models {

/// A GELU FrozenMlp holding a copy of the dense MLP of block `layer` ("h.{layer}.mlp.c_fc.*" and
/// ".c_proj.*"; both conventions store [out, in]).
template <class T>
std::shared_ptr<FrozenMlp<T>> frozen_mlp(const Gpt2<T>& model, Index layer) {
    const Gpt2Config& c = model.config();
    auto base = std::make_shared<FrozenMlp<T>>(MlpForm::gelu, c.d_model, c.hidden());
    for (const std::string name : {"fc.weight", "fc.bias", "proj.weight", "proj.bias"}) {
        const auto src = model.params().span(layer_name(layer, "mlp.c_" + name));
        std::copy(src.begin(), src.end(), base->weights().span(name).begin());
    }
    return base;
}

/// MlpBlock over a MixtureOfLoraMlp. aux_loss() is lb_weight times the mixture's load-balancing loss;
/// CoMiGS weights the layer average by 0.01, so pass lb_weight = 0.01 / n_layer for every block.
/// `rng` draws router noise and LoRA dropout in training forwards (needed only if the mixture uses them).
template <class T>
class MixtureMlp final : public MlpBlock<T> {
public:
    MixtureMlp(std::shared_ptr<MixtureOfLoraMlp<T>> mixture, double lb_weight, Rng* rng = nullptr)
        : mixture_(std::move(mixture)), lb_weight_(lb_weight), rng_(rng) {
        require(mixture_ != nullptr, "mixture: must not be null");
        require(std::isfinite(lb_weight) && lb_weight >= 0, "lb_weight ", lb_weight, ": must be finite and >= 0");
    }

    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool training) override {
        // The mixture borrows x instead of copying it (MlpBlock: x stays valid and unchanged until
        // backward; the hosts keep each block's input for their own backward).
        balance_ = mixture_->forward(y, x, training, rng_, /*borrow_x=*/true);
    }
    void backward(MatrixView<T> dx, ConstMatrixView<T> dy, ConstMatrixView<T> /*x: the mixture holds a view*/) override {
        mixture_->backward(dx, dy, T(lb_weight_));
    }
    T aux_loss() const override { return T(lb_weight_ * balance_); }

    MixtureOfLoraMlp<T>& mixture() { return *mixture_; }
    /// The unweighted load-balancing loss of the last forward.
    double balance_loss() const { return balance_; }

private:
    std::shared_ptr<MixtureOfLoraMlp<T>> mixture_;
    double lb_weight_;
    Rng* rng_;
    double balance_ = 0;
};

}  // namespace comigs::models
