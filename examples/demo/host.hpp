#pragma once
// The demo's host model as comigs sees it: a TinyGpt with frozen GPT-2 weights whose MLPs are comigs
// mixtures of LoRA experts. This is the whole integration (the HostModel contract of model.hpp):
// tell comigs where the adapters are, run forward+backward, report the loss parts.
#include <memory>
#include <string>
#include <vector>

#include <comigs/mixture.hpp>
#include <comigs/model.hpp>
#include <tiny_gpt/tiny_gpt.hpp>

namespace comigs::demo {

/// B sequences of T input tokens and their next tokens, row-major ([B*T] each).
struct TokenBatch {
    std::vector<int> inputs, targets;
    Index B = 0, T = 0;
};

/// One user's model: a copy of the pretrained host (frozen) with a mixture on every MLP.
template <class T>
class MixtureHost {
public:
    using scalar_type = T;

    /// `bases[l]`: the frozen MLP of block l (shared by every user's model; only read).
    MixtureHost(const tiny_gpt::TinyGpt<T>& host, const std::vector<std::shared_ptr<FrozenMlp<T>>>& bases,
                const MixtureConfig& mixture, Rng& init_rng)
        : model_(std::make_unique<tiny_gpt::TinyGpt<T>>(host.config())) {
        std::copy(host.params().all().begin(), host.params().all().end(), model_->params().all().begin());
        model_->set_train_mode(tiny_gpt::TrainMode::frozen_base);
        const Index L = host.config().n_layer;
        for (Index l = 0; l < L; ++l) {
            auto m = std::make_shared<MixtureOfLoraMlp<T>>(mixture, bases[static_cast<std::size_t>(l)]);
            m->init(init_rng);
            mixtures_.push_back(m);
            // CoMiGS weights the layer-averaged balancing loss by 0.01.
            model_->set_mlp(l, std::make_unique<tiny_gpt::MixtureMlp<T>>(m, 0.01 / double(L)));
        }
    }

    AdapterRegistry<T> adapters() const {
        AdapterRegistry<T> r;
        for (std::size_t l = 0; l < mixtures_.size(); ++l)
            r.mixtures.push_back({tiny_gpt::layer_name(Index(l), "mlp."), mixtures_[l].get()});
        return r;
    }

    LossParts forward_backward(const TokenBatch& b) {
        model_->forward(b.inputs, b.targets, b.B, b.T, true);
        model_->backward();
        return parts(b);
    }
    LossParts evaluate(const TokenBatch& b) {
        model_->forward(b.inputs, b.targets, b.B, b.T, false);
        return parts(b);
    }

    MixtureOfLoraMlp<T>& mixture(Index layer) { return *mixtures_.at(static_cast<std::size_t>(layer)); }
    Index layers() const { return static_cast<Index>(mixtures_.size()); }
    tiny_gpt::TinyGpt<T>& model() { return *model_; }

private:
    LossParts parts(const TokenBatch& b) const {
        LossParts p;
        p.task = double(model_->last_ce_loss());
        for (const auto& m : mixtures_) p.balance += m->routing().lb_loss;
        p.balance /= double(mixtures_.size());
        p.tokens = double(b.B * b.T);
        return p;
    }

    std::unique_ptr<tiny_gpt::TinyGpt<T>> model_;
    std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>> mixtures_;
};

}  // namespace comigs::demo
