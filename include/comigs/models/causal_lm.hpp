#pragma once
// What every host model offers, whatever its architecture (GPT-2, Llama, Qwen2): the programs, the
// generation loop and the demo's real-model path work through this interface only.
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <comigs/frozen.hpp>
#include <comigs/lora.hpp>
#include <comigs/params.hpp>
#include <comigs/random.hpp>

#include "mlp_block.hpp"

namespace comigs::models {

/// LoRA on attention projections: y = W x + b + s B A x, A [rank, in], B [out, rank].
struct AttentionLoraConfig {
    Index rank = 8;
    double alpha = 16;
    LoraScaling scaling = LoraScaling::sqrt;  ///< comigs' enum: linear = alpha / r, sqrt = alpha / sqrt(r)

    double scale() const { return lora_scale(alpha, rank, scaling); }
};

/// One adapted attention projection: its tensors in lora() are `<prefix>lora_A` [rank, in] and
/// `<prefix>lora_B` [out, rank]; `module` is its Hugging Face module path (PEFT keys).
struct AttentionProjection {
    std::string prefix;  ///< e.g. "model.layers.0.self_attn.q_proj." or "h.0.attn.c_attn."
    std::string module;  ///< e.g. "model.layers.0.self_attn.q_proj" or "transformer.h.0.attn.c_attn"
    Index in = 0, out = 0;
};

/// A causal language model with a frozen base, pluggable MLPs and optional attention LoRA.
///
/// Training step (adapters only): zero_grad(); forward(tokens, targets, B, T, true); backward(); then
/// the optimiser on lora()/lora_grads() and the MLP plug-ins' buffers. Evaluation: evaluate_loss().
/// Generation: reset_cache(capacity); decode(prompt); decode({next}); ... (models/generate.hpp).
template <class T>
class CausalLm {
public:
    virtual ~CausalLm() = default;

    /// "gpt2", "llama" or "qwen2".
    virtual std::string architecture() const = 0;
    virtual Index vocab() const = 0;
    /// Longest sequence the model takes (position embeddings, or the configured RoPE context).
    virtual Index max_positions() const = 0;
    virtual Index n_layer() const = 0;
    virtual Index d_model() const = 0;

    // ---- MLPs --------------------------------------------------------------------------------------
    virtual MlpForm mlp_form() const = 0;
    virtual Index mlp_hidden() const = 0;
    /// The frozen MLP of block `layer`, shared (never copied): what a MixtureOfLoraMlp adapts.
    virtual std::shared_ptr<const FrozenMlp<T>> frozen_mlp(Index layer) const = 0;
    /// Replaces the MLP of block `layer` (by default the frozen one).
    virtual void set_mlp(Index layer, std::unique_ptr<MlpBlock<T>> mlp) = 0;
    virtual MlpBlock<T>& mlp(Index layer) = 0;
    /// The Hugging Face module path of an MLP linear of block `layer` (`fc`/`proj` or `gate`/`up`/`down`,
    /// comigs' names): "transformer.h.3.mlp.c_fc", "model.layers.3.mlp.up_proj".
    virtual std::string mlp_module(Index layer, const std::string& linear) const = 0;
    /// The name prefix of block `layer`'s MLP adapters in comigs' registries, uploads and checkpoints:
    /// "h.3.mlp." (GPT-2), "model.layers.3.mlp." (Llama).
    virtual std::string mlp_prefix(Index layer) const = 0;

    // ---- attention LoRA ----------------------------------------------------------------------------
    /// Adds (or replaces) LoRA on every attention projection (A Kaiming-uniform, B = 0: the function
    /// is unchanged until B trains).
    virtual void add_attention_lora(const AttentionLoraConfig& config, Rng& rng) = 0;
    virtual bool has_lora() const = 0;
    virtual const AttentionLoraConfig& lora_config() const = 0;
    /// The adapted projections, in lora() order.
    virtual std::vector<AttentionProjection> attention_projections() const = 0;
    virtual ParamBuffer<T>& lora() = 0;
    virtual ParamBuffer<T>& lora_grads() = 0;

    // ---- training and evaluation --------------------------------------------------------------------
    /// Runs tokens [B*T] (row b*T + t: sequence b, position t). With targets returns mean cross-entropy
    /// plus the MLPs' aux losses, else NaN. `training`: backward may follow (activations are kept).
    virtual T forward(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn,
                      bool training = true) = 0;
    /// Accumulates the gradients of the last training forward into lora_grads() and the MLP plug-ins.
    virtual void backward() = 0;
    /// Logits [B*T, vocab] of the last forward.
    virtual ConstMatrixView<T> logits() const = 0;
    virtual T last_ce_loss() const = 0;
    virtual T last_aux_loss() const = 0;
    virtual void zero_grad() = 0;
    /// Mean cross-entropy of targets given tokens (B sequences of T) in inference mode, without keeping
    /// [B*T, vocab] logits (the head runs on blocks of rows) or the layers' activations.
    virtual double evaluate_loss(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn) = 0;

    // ---- generation (one sequence, KV cache) -------------------------------------------------------
    /// Empties the cache and sizes it for `capacity` positions (at most max_positions()).
    virtual void reset_cache(Index capacity) = 0;
    virtual Index cached_tokens() const = 0;
    /// Appends tokens at the next positions (a prompt at once, or one sampled token) and returns the
    /// logits [vocab] after the last of them. The MLP plug-ins run in inference mode on the new rows.
    virtual std::span<const T> decode(std::span<const int> tokens) = 0;

    /// A model over the same frozen weights (shared, not copied) with the default MLPs, no LoRA and no
    /// cache: what each simulated user of one device gets.
    virtual std::unique_ptr<CausalLm<T>> share_base() const = 0;
};

}  // namespace comigs::models
