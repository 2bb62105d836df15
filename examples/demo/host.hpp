#pragma once
// The demo's host model as comigs sees it: a host model (models::CausalLm: the demo's pretrained tiny
// GPT-2, or a real GPT-2 / Llama / Qwen2 from --model) with its frozen base shared by every user and
// comigs mixtures of LoRA experts on its MLPs. This is the whole integration (the HostModel contract
// of model.hpp): tell comigs where the adapters are, run forward+backward, report the loss parts.
//
// Optional LoRA on the attention projections (GPT-2's c_attn and c_proj; Llama's q, k, v, o), shared
// like a generalist as in the CoMiGS reference. The host model keeps its attention LoRA in one buffer
// of its own; comigs trains and uploads comigs::LoraExpert objects, so the host holds one LoraExpert per
// projection as the registered copy and mirrors it: parameters are copied into the model before every
// forward (a download may have changed them), gradients are added back after every backward (a few
// thousand values per step).
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <comigs/io/safetensors.hpp>
#include <comigs/lora.hpp>
#include <comigs/mixture.hpp>
#include <comigs/model.hpp>
#include <comigs/models.hpp>

namespace comigs::demo {

/// B sequences of T input tokens and their next tokens, row-major ([B*T] each).
struct TokenBatch {
    std::vector<int> inputs, targets;
    Index B = 0, T = 0;
};

/// One user's model: the host's frozen base (shared, not copied) with a mixture on every MLP.
template <class T>
class MixtureHost {
public:
    using scalar_type = T;

    /// `bases[l]`: the frozen MLP of block l (shared by every user's model; only read).
    /// `attention_rank` > 0 adds LoRA of that rank (and `attention_alpha`, alpha/sqrt(r)) to every
    /// attention projection.
    MixtureHost(const models::CausalLm<T>& host, const std::vector<std::shared_ptr<const FrozenMlp<T>>>& bases,
                const MixtureConfig& mixture, Rng& init_rng, Index attention_rank = 0, double attention_alpha = 16)
        : model_(host.share_base()) {
        const Index L = host.n_layer();
        for (Index l = 0; l < L; ++l) {
            auto m = std::make_shared<MixtureOfLoraMlp<T>>(mixture, bases[static_cast<std::size_t>(l)]);
            m->init(init_rng);
            mixtures_.push_back(m);
            // CoMiGS weights the layer-averaged balancing loss by 0.01.
            model_->set_mlp(l, std::make_unique<models::MixtureMlp<T>>(m, 0.01 / double(L)));
        }
        if (attention_rank > 0) {
            model_->add_attention_lora({attention_rank, attention_alpha, LoraScaling::sqrt}, init_rng);
            for (const auto& p : model_->attention_projections()) {
                LoraConfig lc;
                lc.in_features = p.in;
                lc.out_features = p.out;
                lc.rank = attention_rank;
                lc.alpha = attention_alpha;
                lc.scaling = LoraScaling::sqrt;
                auto e = std::make_unique<LoraExpert<T>>(lc);
                for (const char* f : {"lora_A", "lora_B"}) {
                    const auto src = model_->lora().span(p.prefix + f);
                    std::copy(src.begin(), src.end(), e->params().span(f).begin());
                }
                attention_.push_back({p.prefix, std::move(e)});
            }
        }
    }

    AdapterRegistry<T> adapters() const {
        AdapterRegistry<T> r;
        for (std::size_t l = 0; l < mixtures_.size(); ++l)
            r.mixtures.push_back({model_->mlp_prefix(Index(l)), mixtures_[l].get()});
        for (const auto& a : attention_) r.shared_adapters.push_back({a.prefix, a.lora.get()});
        return r;
    }

    LossParts forward_backward(const TokenBatch& b) {
        mirror_in();
        if (!attention_.empty()) model_->lora_grads().zero();
        model_->forward(b.inputs, b.targets, b.B, b.T, true);
        model_->backward();
        for (const auto& a : attention_)
            for (const char* f : {"lora_A", "lora_B"}) {
                const auto g = model_->lora_grads().span(a.prefix + f);
                auto dst = a.lora->grads().span(f);
                for (std::size_t i = 0; i < g.size(); ++i) dst[i] += g[i];
            }
        return parts(b);
    }
    LossParts evaluate(const TokenBatch& b) {
        mirror_in();
        model_->forward(b.inputs, b.targets, b.B, b.T, false);
        return parts(b);
    }

    MixtureOfLoraMlp<T>& mixture(Index layer) { return *mixtures_.at(static_cast<std::size_t>(layer)); }
    Index layers() const { return static_cast<Index>(mixtures_.size()); }
    models::CausalLm<T>& model() { return *model_; }

    /// Writes this user's adapters (attention LoRA, every mixture) with PEFT-style keys
    /// (models/adapter_file.hpp): comigs-eval and comigs-generate load them with --adapter.
    void save_adapters(const std::filesystem::path& path, const io::SafetensorsMetadata& metadata = {}) {
        mirror_in();
        models::save_adapters(path, *model_, mixtures_, metadata);
    }

private:
    struct AttentionLora {
        std::string prefix;  ///< e.g. "h.{l}.attn.c_attn." or "model.layers.{l}.self_attn.q_proj."
        std::unique_ptr<LoraExpert<T>> lora;
    };

    void mirror_in() {
        for (const auto& a : attention_)
            for (const char* f : {"lora_A", "lora_B"}) {
                const auto src = std::as_const(*a.lora).params().span(f);
                std::copy(src.begin(), src.end(), model_->lora().span(a.prefix + f).begin());
            }
    }

    LossParts parts(const TokenBatch& b) const {
        LossParts p;
        p.task = double(model_->last_ce_loss());
        for (const auto& m : mixtures_) p.balance += m->routing().lb_loss;
        p.balance /= double(mixtures_.size());
        p.tokens = double(b.B * b.T);
        return p;
    }

    std::unique_ptr<models::CausalLm<T>> model_;
    std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>> mixtures_;
    std::vector<AttentionLora> attention_;
};

}  // namespace comigs::demo
