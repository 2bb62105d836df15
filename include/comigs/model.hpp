#pragma once
// The contract between a host model and comigs' training and collaboration code. comigs never owns
// the host: the host keeps its frozen weights and its layers, and tells comigs where the trainable
// adapter layers are. comigs::models::Gpt2 (models/gpt2.hpp) is a complete host that satisfies this contract.
#include <concepts>
#include <string>
#include <vector>

#include "lora.hpp"
#include "mixture.hpp"
#include "mixture_linear.hpp"

namespace comigs {

/// The two parts of the training objective: cross-entropy (or any task loss) and the load-balancing
/// loss averaged over the mixture layers. What is minimised is `task + lb_weight * balance`.
struct LossParts {
    double task = 0.0;
    double balance = 0.0;
    double tokens = 0.0;  ///< number of predicted tokens (for token-weighted averages)
    double total(double lb_weight) const { return task + lb_weight * balance; }
};

/// Where a host keeps its adapter layers. Prefixes make tensor names unique across layers
/// ("h.0.mlp." + "experts.1.fc.lora_A"); they are also the names files and uploads use.
template <class T>
struct AdapterRegistry {
    template <class Layer>
    struct Entry {
        std::string prefix;
        Layer* layer = nullptr;
    };
    std::vector<Entry<MixtureOfLoraMlp<T>>> mixtures;
    std::vector<Entry<MixtureOfLoraLinear<T>>> mixture_linears;
    /// Plain LoRA adapters (e.g. on attention projections), shared like generalists.
    std::vector<Entry<LoraExpert<T>>> shared_adapters;

    /// Calls f(prefix, params, grads) for every adapter layer, in registry order.
    template <class F>
    void for_each_buffer(F&& f) const {
        for (const auto& m : mixtures) f(m.prefix, m.layer->params(), m.layer->grads());
        for (const auto& m : mixture_linears) f(m.prefix, m.layer->params(), m.layer->grads());
        for (const auto& a : shared_adapters) f(a.prefix, a.layer->params(), a.layer->grads());
    }
    void zero_grad() const {
        for_each_buffer([](const std::string&, ParamBuffer<T>&, ParamBuffer<T>& g) { g.zero(); });
    }
};

/// A host model comigs can train on batches of type Batch:
/// - `adapters()` lists its adapter layers (the only trainable tensors during collaborative training);
/// - `forward_backward(batch)` runs the model in training mode and ACCUMULATES the gradients of every
///   adapter tensor (experts and routers alike: the trainer zeroes all of them before each call, so
///   gradients of one optimiser can never leak into the other's step);
/// - `evaluate(batch)` runs it in inference mode without touching gradients.
template <class M, class Batch>
concept HostModel = requires(M& m, const Batch& b) {
    typename M::scalar_type;
    { m.adapters() } -> std::convertible_to<AdapterRegistry<typename M::scalar_type>>;
    { m.forward_backward(b) } -> std::convertible_to<LossParts>;
    { m.evaluate(b) } -> std::convertible_to<LossParts>;
};

}  // namespace comigs
