#pragma once
// The Llama-family host (Llama 2/3/3.1/3.2, SmolLM2, Qwen2/2.5) with hand-written forward and backward
// over a frozen base, as transformers' LlamaForCausalLM / Qwen2ForCausalLM compute it:
//   x_0 = embed[token]
//   per block: a = x + o(attention(rope(q(rms1(x))), rope(k(rms1(x))), v(rms1(x))))
//              x' = a + mlp(rms2(a)),   mlp(z) = down(silu(gate z) * up z)
//   logits = head(rms_f(x_L)), head = lm_head or the embedding (tied)
// RMSNorm x * rsqrt(mean(x^2) + eps) * w; rotate-half RoPE with rope_theta and optional llama3
// scaling (rope.hpp); grouped-query attention (attention.hpp); q/k/v biases for Qwen2 (and q/k/v/o
// with Llama's attention_bias). LoRA on q, k, v and o; the MLP is pluggable (a MixtureOfLoraMlp in
// SwiGLU form turns the model into a CoMiGS model). Only adapters train: the base is frozen, held once
// (LlamaWeights, shared by every model over it) as comigs::FrozenLinear views into the source where
// possible (a mapped BF16 file stays the only copy).
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <comigs/detail/aligned.hpp>
#include <comigs/frozen.hpp>
#include <comigs/kernels/attention.hpp>
#include <comigs/kernels/bf16.hpp>
#include <comigs/kernels/gemm.hpp>
#include <comigs/params.hpp>
#include <comigs/profile.hpp>
#include <comigs/random.hpp>

#include "attention.hpp"
#include "causal_lm.hpp"
#include "layers.hpp"
#include "lm_head.hpp"
#include "mlp_block.hpp"
#include "rope.hpp"
#include "tensor_source.hpp"

namespace comigs::models {

/// Shape and semantics of a Llama-family model (the fields of its config.json).
struct LlamaConfig {
    std::string model_type = "llama";  ///< "llama" or "qwen2"
    Index vocab = 0;                   ///< vocab_size
    Index d_model = 0;                 ///< hidden_size
    Index n_layer = 0;                 ///< num_hidden_layers
    Index n_head = 0;                  ///< num_attention_heads
    Index n_kv_head = 0;               ///< num_key_value_heads (0: n_head)
    Index head_dim = 0;                ///< head_dim (0: d_model / n_head)
    Index mlp_hidden = 0;              ///< intermediate_size
    Index max_positions = 2048;        ///< max_position_embeddings
    double rms_eps = 1e-6;             ///< rms_norm_eps
    double rope_theta = 10000;
    std::optional<Llama3RopeScaling> rope_scaling;  ///< rope_scaling of rope_type "llama3", or none
    /// Per-frequency divisors of inv_freq [head_dim / 2] (llama.cpp's `rope_freqs` tensor, which a GGUF file
    /// carries instead of rope_scaling: the llama3 rule's factors), or empty.
    std::vector<float> rope_freq_divisors;
    bool tie_word_embeddings = false;
    bool attention_bias = false;  ///< biases on q, k, v and o (Llama's attention_bias)
    bool qkv_bias = false;        ///< biases on q, k, v only (Qwen2)

    Index kv_heads() const { return n_kv_head > 0 ? n_kv_head : n_head; }
    Index hd() const { return head_dim > 0 ? head_dim : (n_head > 0 ? d_model / n_head : 0); }
    AttentionHeads heads() const { return {n_head, kv_heads(), hd()}; }
    bool has_qkv_bias() const { return qkv_bias || attention_bias; }

    void validate() const {
        require(model_type == "llama" || model_type == "qwen2", "model_type '", model_type,
                "': the Llama host runs 'llama' and 'qwen2'");
        require(vocab >= 1, "vocab_size ", vocab, ": must be >= 1");
        require(d_model >= 1, "hidden_size ", d_model, ": must be >= 1");
        require(n_layer >= 1, "num_hidden_layers ", n_layer, ": must be >= 1");
        require(n_head >= 1, "num_attention_heads ", n_head, ": must be >= 1");
        require(kv_heads() >= 1 && n_head % kv_heads() == 0, "num_key_value_heads ", kv_heads(),
                ": must divide num_attention_heads ", n_head);
        require(head_dim > 0 || d_model % n_head == 0, "hidden_size ", d_model, ": not divisible by num_attention_heads ",
                n_head, " (and no head_dim given)");
        require(hd() >= 2 && hd() % 2 == 0, "head_dim ", hd(), ": RoPE needs an even head size");
        require(mlp_hidden >= 1, "intermediate_size ", mlp_hidden, ": must be >= 1");
        require(max_positions >= 1, "max_position_embeddings ", max_positions, ": must be >= 1");
        require(std::isfinite(rms_eps) && rms_eps > 0, "rms_norm_eps ", rms_eps, ": must be > 0");
        require(std::isfinite(rope_theta) && rope_theta > 1, "rope_theta ", rope_theta, ": must be > 1");
        if (rope_scaling) rope_scaling->validate();
        require(rope_freq_divisors.empty() || !rope_scaling, "rope_freqs and rope_scaling: give one of them");
        require(rope_freq_divisors.empty() || static_cast<Index>(rope_freq_divisors.size()) * 2 == hd(), "rope_freqs: ",
                rope_freq_divisors.size(), " divisors, expected head_dim / 2 = ", hd() / 2);
        for (std::size_t j = 0; j < rope_freq_divisors.size(); ++j)
            require(std::isfinite(rope_freq_divisors[j]) && rope_freq_divisors[j] > 0, "rope_freqs[", j, "] = ",
                    rope_freq_divisors[j], ": must be finite and > 0");
    }
};

/// The frozen weights of a Llama-family model, shared by every Llama over them (users, clones).
template <class T>
struct LlamaWeights {
    struct Layer {
        std::span<const T> attn_norm, mlp_norm;  ///< input_layernorm, post_attention_layernorm [d]
        FrozenLinear<T> q, k, v, o;              ///< [H hd, d], [KV hd, d], [KV hd, d], [d, H hd]
        std::shared_ptr<const FrozenMlp<T>> mlp;  ///< SwiGLU gate/up/down, borrowed from the store
    };
    LlamaConfig config;
    std::shared_ptr<WeightStore<T>> store;
    FrozenLinear<T> embed;  ///< embed_tokens [vocab, d]: row t is token t's embedding
    FrozenLinear<T> head;   ///< lm_head [vocab, d], or embed_tokens when tied
    std::span<const T> final_norm;
    std::vector<Layer> layers;
    std::vector<float> inv_freq;  ///< RoPE frequencies [hd / 2] (fp32, as transformers)
};

/// "model.layers.{layer}.{tail}"
inline std::string llama_layer_name(Index layer, std::string_view tail) {
    return "model.layers." + std::to_string(layer) + "." + std::string(tail);
}

/// Builds the frozen weights of `config` from a source under transformers' names. Every tensor the
/// config implies must be there with the shape it implies (ShapeError naming the file, the tensor and
/// the config values, `config_name` saying where they came from, e.g. "config.json"); a tensor the
/// config does not explain (another layer, a bias) is an error too: the config and the file disagree.
template <class T>
std::shared_ptr<const LlamaWeights<T>> load_llama_weights(std::shared_ptr<const TensorSource> source,
                                                          const LlamaConfig& config, WeightOptions options = {},
                                                          std::string_view config_name = "the config") {
    config.validate();
    const TensorSource& src = *source;
    auto w = std::make_shared<LlamaWeights<T>>();
    w->config = config;
    w->store = std::make_shared<WeightStore<T>>(source, options);
    WeightStore<T>& store = *w->store;
    const Index d = config.d_model, V = config.vocab, H = config.n_head, KV = config.kv_heads(), hd = config.hd(),
                h = config.mlp_hidden;
    const std::string cfg(config_name);
    const std::string why_d = cfg + " (hidden_size " + std::to_string(d) + ")";
    const std::string why_q = cfg + " (num_attention_heads " + std::to_string(H) + " x head_dim " + std::to_string(hd) +
                              ", hidden_size " + std::to_string(d) + ")";
    const std::string why_kv = cfg + " (num_key_value_heads " + std::to_string(KV) + " x head_dim " +
                               std::to_string(hd) + ", hidden_size " + std::to_string(d) + ")";
    const std::string why_mlp = cfg + " (intermediate_size " + std::to_string(h) + ", hidden_size " + std::to_string(d) + ")";
    const std::string why_v = cfg + " (vocab_size " + std::to_string(V) + ", hidden_size " + std::to_string(d) + ")";

    std::vector<std::string> used;
    const auto take = [&](const std::string& name, const std::vector<Index>& shape, const std::string& why) -> const TensorRef& {
        used.push_back(name);
        return src.expect(name, shape, why);
    };
    const TensorRef& embed = take("model.embed_tokens.weight", {V, d}, why_v);
    w->embed = store.linear(embed);
    if (config.tie_word_embeddings) {
        w->head = w->embed;
        if (src.contains("lm_head.weight")) used.push_back("lm_head.weight");  // some files store the tied copy
    } else {
        require<FormatError>(src.contains("lm_head.weight"), src.description(), ": no tensor 'lm_head.weight', and ", cfg,
                             " says tie_word_embeddings false");
        w->head = store.linear(take("lm_head.weight", {V, d}, why_v));
    }
    w->final_norm = store.vector(take("model.norm.weight", {d}, why_d));
    const bool qkv_bias = config.has_qkv_bias();
    for (Index l = 0; l < config.n_layer; ++l) {
        const auto n = [l](std::string_view tail) { return llama_layer_name(l, tail); };
        typename LlamaWeights<T>::Layer L;
        L.attn_norm = store.vector(take(n("input_layernorm.weight"), {d}, why_d));
        L.mlp_norm = store.vector(take(n("post_attention_layernorm.weight"), {d}, why_d));
        const auto proj = [&](const char* name, Index out, Index in, bool bias, const std::string& why) {
            const std::string base = n(std::string("self_attn.") + name);
            const TensorRef& wt = take(base + ".weight", {out, in}, why);
            if (!bias) return store.linear(wt);
            require<FormatError>(src.contains(base + ".bias"), src.description(), ": no tensor '", base, ".bias', and ",
                                 cfg, config.model_type == "qwen2" ? " is a qwen2 model (q/k/v biases)" : " sets attention_bias");
            return store.linear(wt, &take(base + ".bias", {out}, why));
        };
        L.q = proj("q_proj", H * hd, d, qkv_bias, why_q);
        L.k = proj("k_proj", KV * hd, d, qkv_bias, why_kv);
        L.v = proj("v_proj", KV * hd, d, qkv_bias, why_kv);
        L.o = proj("o_proj", d, H * hd, config.attention_bias, why_q);
        std::map<std::string, FrozenLinear<T>> mlp;
        mlp["gate"] = store.linear(take(n("mlp.gate_proj.weight"), {h, d}, why_mlp));
        mlp["up"] = store.linear(take(n("mlp.up_proj.weight"), {h, d}, why_mlp));
        mlp["down"] = store.linear(take(n("mlp.down_proj.weight"), {d, h}, why_mlp));
        L.mlp = std::make_shared<FrozenMlp<T>>(MlpForm::swiglu, d, h, std::move(mlp), w->store);
        w->layers.push_back(std::move(L));
    }
    // Whatever the config does not explain means the config and the file disagree (a layer more, a
    // bias, another architecture's tensor). Rotary inverse frequencies some old files carry are buffers.
    std::sort(used.begin(), used.end());
    for (const std::string& name : src.names()) {
        if (std::binary_search(used.begin(), used.end(), name) || name.ends_with("rotary_emb.inv_freq")) continue;
        const TensorRef& t = src.at(name);
        comigs::detail::raise<FormatError>(src.description(), ": tensor '", name, "' in '", t.file, "' (",
                                           shape_text(t.shape), ") is not part of the model ", cfg, " describes (",
                                           config.model_type, ", num_hidden_layers ", config.n_layer,
                                           qkv_bias ? ", q/k/v biases" : ", no biases", ")");
    }
    w->inv_freq = rope_inv_freq(hd, config.rope_theta, config.rope_scaling);
    for (std::size_t j = 0; j < config.rope_freq_divisors.size(); ++j) w->inv_freq[j] /= config.rope_freq_divisors[j];
    return w;
}

/// A Llama-family causal LM over shared frozen weights (see the file comment).
template <class T>
class Llama final : public CausalLm<T> {
public:
    explicit Llama(std::shared_ptr<const LlamaWeights<T>> weights) : w_(std::move(weights)) {
        require(w_ != nullptr, "Llama: null weights");
        lora_ = std::make_unique<ParamBuffer<T>>();
        lora_grads_ = std::make_unique<ParamBuffer<T>>();
        for (const auto& layer : w_->layers) mlps_.push_back(std::make_unique<FrozenMlpBlock<T>>(layer.mlp));
    }

    const LlamaConfig& config() const { return w_->config; }
    const LlamaWeights<T>& weights() const { return *w_; }
    std::shared_ptr<const LlamaWeights<T>> weights_ptr() const { return w_; }

    std::string architecture() const override { return config().model_type; }
    Index vocab() const override { return config().vocab; }
    Index max_positions() const override { return config().max_positions; }
    Index n_layer() const override { return config().n_layer; }
    Index d_model() const override { return config().d_model; }

    MlpForm mlp_form() const override { return MlpForm::swiglu; }
    Index mlp_hidden() const override { return config().mlp_hidden; }
    std::shared_ptr<const FrozenMlp<T>> frozen_mlp(Index layer) const override {
        check_layer(layer);
        return w_->layers[static_cast<std::size_t>(layer)].mlp;
    }
    void set_mlp(Index layer, std::unique_ptr<MlpBlock<T>> mlp) override {
        check_layer(layer);
        require(mlp != nullptr, "mlp of layer ", layer, ": null");
        mlps_[static_cast<std::size_t>(layer)] = std::move(mlp);
    }
    MlpBlock<T>& mlp(Index layer) override {
        check_layer(layer);
        return *mlps_[static_cast<std::size_t>(layer)];
    }
    std::string mlp_prefix(Index layer) const override {
        check_layer(layer);
        return llama_layer_name(layer, "mlp.");
    }
    std::string mlp_module(Index layer, const std::string& linear) const override {
        check_layer(layer);
        require(linear == "gate" || linear == "up" || linear == "down", "mlp linear '", linear,
                "': a SwiGLU MLP has gate, up and down");
        return llama_layer_name(layer, "mlp." + linear + "_proj");
    }

    void add_attention_lora(const AttentionLoraConfig& lc, Rng& rng) override {
        lc.scale();  // checks rank >= 1 and a finite alpha
        ParamLayout L;
        for (const auto& p : projections(lc.rank)) {
            L.add(p.prefix + "lora_A", {lc.rank, p.in});
            L.add(p.prefix + "lora_B", {p.out, lc.rank});
        }
        *lora_ = ParamBuffer<T>(std::move(L));
        *lora_grads_ = ParamBuffer<T>(lora_->layout_ptr());
        for (const auto& p : projections(lc.rank)) {
            const double bound = 1.0 / std::sqrt(double(p.in));
            for (T& v : lora_->span(p.prefix + "lora_A")) v = T(rng.uniform(-bound, bound));
        }
        lora_cfg_ = lc;
        has_lora_ = true;
    }
    bool has_lora() const override { return has_lora_; }
    const AttentionLoraConfig& lora_config() const override { return lora_cfg_; }
    std::vector<AttentionProjection> attention_projections() const override { return projections(lora_rank()); }
    ParamBuffer<T>& lora() override { return *lora_; }
    ParamBuffer<T>& lora_grads() override { return *lora_grads_; }

    void zero_grad() override { lora_grads_->zero(); }

    T forward(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn, bool training = true) override {
        // A training forward runs the head and the loss in vocabulary chunks and computes the loss's
        // gradient at the final norm's output at once: no [B*T, vocab] logits are kept.
        const bool fused_head = training && !targets.empty();
        begin(tokens, targets, B, Tn, training, !fused_head);
        run_layers();
        const Index N = B * Tn, d = config().d_model, V = config().vocab;
        auto& a = acts_;
        aux_ = T(0);
        for (const auto& m : mlps_) aux_ += m->aux_loss();
        profile::Scope scope(profile::Phase::head);
        if (fused_head) {
            const auto dfin = mat(a.dfin, N, d);
            eigen(dfin).setZero();
            ce_ = T(frozen_head_cross_entropy(w_->head, dfin, mat(a.fin, N, d), targets_.data(), T(1) / T(N)) /
                    double(N));
            return ce_ + aux_;
        }
        w_->head.forward(mat(a.logits, N, V), mat(a.fin, N, d));
        if (targets_.empty()) return ce_ = std::numeric_limits<T>::quiet_NaN();
        ce_ = crossentropy_forward(a.lse, mat(a.logits, N, V), targets_.data());
        return ce_ + aux_;
    }

    double evaluate_loss(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn) override {
        require(!targets.empty(), "evaluate_loss: needs targets");
        begin(tokens, targets, B, Tn, false, /*keep_logits=*/false);
        run_layers();
        const Index N = B * Tn, d = config().d_model;
        // The head in vocabulary chunks: never [N, vocab] logits.
        profile::Scope scope(profile::Phase::head);
        const double total =
            frozen_head_cross_entropy(w_->head, MatrixView<T>(), mat(acts_.fin, N, d), targets_.data(), T(0));
        ce_ = T(total / double(N));
        aux_ = T(0);
        return total / double(N);
    }

    void backward() override {
        require(training_ && !targets_.empty(), "backward: the last forward must be a training forward with targets");
        const auto& c = config();
        const Index N = B_ * T_, d = c.d_model, H = c.n_head, KV = c.kv_heads(), hd = c.hd(), r = lora_rank();
        carve_grads();
        const auto& g = grads_;
        const auto dres = mat(g.dres, N, d), dln = mat(g.dln, N, d);
        auto& a = acts_;

        // The fused head of the training forward left dLoss/d(final norm output) in dfin.
        zero_rows<T>({dres});
        rmsnorm_backward(dres, static_cast<T*>(nullptr), mat(a.dfin, N, d), mat(res(c.n_layer), N, d), a.rstd_f,
                         w_->final_norm.data());
        const kernels::AttentionShape shape = attention_shape(B_, T_, T_);

        for (Index l = c.n_layer - 1; l >= 0; --l) {
            const Layer& la = a.layer[static_cast<std::size_t>(l)];
            const auto& lw = w_->layers[static_cast<std::size_t>(l)];
            // dres: dLoss/d(block output); the residual passes it to the attention output (mid) as is.
            zero_rows<T>({dln});
            {
                profile::Scope scope(profile::Phase::mlp, profile::Pass::backward);
                mlps_[static_cast<std::size_t>(l)]->backward(dln, dres, mat(la.mn, N, d));
            }
            {
                profile::Scope scope(profile::Phase::norm, profile::Pass::backward);
                rmsnorm_backward(dres, static_cast<T*>(nullptr), dln, mat(la.mid, N, d), la.rstd2, lw.mlp_norm.data());
            }
            // The buffers the attention's backward accumulates into, in one region (datt and dln are
            // overwritten by the first product into them).
            zero_rows<T>({mat(g.dq, N, H * hd), mat(g.dk, N, KV * hd), mat(g.dv, N, KV * hd)});
            const bool need_dx = l > 0;  // below block 0's attention only the frozen embedding remains
            {
                profile::Scope scope(profile::Phase::out_proj, profile::Pass::backward);
                proj_backward(lw.o, l, 3, mat(g.datt, N, H * hd), dres, mat(la.att, N, H * hd), la.xa[3],
                              mat(g.dxa, N, r));
            }
            {
                profile::Scope scope(profile::Phase::attention, profile::Pass::backward);
                kernels::attention_backward(mat(g.dq, N, H * hd), mat(g.dk, N, KV * hd), mat(g.dv, N, KV * hd),
                                            ConstMatrixView<T>(g.datt, N, H * hd), ConstMatrixView<T>(la.q, N, H * hd),
                                            ConstMatrixView<T>(la.k, N, KV * hd), ConstMatrixView<T>(la.v, N, KV * hd),
                                            ConstMatrixView<T>(la.att, N, H * hd), la.lse, shape);
            }
            {
                // The rotation's backward is the rotation by the opposite angle.
                profile::Scope scope(profile::Phase::norm, profile::Pass::backward);
                const auto pos = [Tn = T_](Index i) { return i % Tn; };
                rope_apply(mat(g.dq, N, H * hd), H, hd, rope_, pos, true);
                rope_apply(mat(g.dk, N, KV * hd), KV, hd, rope_, pos, true);
            }
            const MatrixView<T> dx = need_dx ? dln : MatrixView<T>();
            {
                profile::Scope scope(profile::Phase::qkv, profile::Pass::backward);
                qkv_backward(lw, l, dx, mat(g.dq, N, H * hd), mat(g.dk, N, KV * hd), mat(g.dv, N, KV * hd),
                             mat(la.xn, N, d), la.xa, g.dxa);
            }
            if (need_dx) {
                profile::Scope scope(profile::Phase::norm, profile::Pass::backward);
                rmsnorm_backward(dres, static_cast<T*>(nullptr), dln, mat(res(l), N, d), la.rstd1, lw.attn_norm.data());
            }
        }
    }

    ConstMatrixView<T> logits() const override {
        return {acts_.logits, keep_logits_ ? B_ * T_ : 0, config().vocab};
    }
    T last_ce_loss() const override { return ce_; }
    T last_aux_loss() const override { return aux_; }

    // ---- generation ----------------------------------------------------------------------------------

    void reset_cache(Index capacity) override {
        const auto& c = config();
        require(capacity >= 1 && capacity <= c.max_positions, "cache capacity ", capacity, ": must be in [1, ",
                c.max_positions, "] (max_position_embeddings)");
        const Index kvw = c.kv_heads() * c.hd();
        cache_k_.assign(static_cast<std::size_t>(c.n_layer), {});
        cache_v_.assign(static_cast<std::size_t>(c.n_layer), {});
        for (Index l = 0; l < c.n_layer; ++l) {
            cache_k_[static_cast<std::size_t>(l)].resize(static_cast<std::size_t>(capacity * kvw));
            cache_v_[static_cast<std::size_t>(l)].resize(static_cast<std::size_t>(capacity * kvw));
        }
        cache_cap_ = capacity;
        cached_ = 0;
    }
    Index cached_tokens() const override { return cached_; }

    std::span<const T> decode(std::span<const int> tokens) override {
        const auto& c = config();
        const Index n = static_cast<Index>(tokens.size()), d = c.d_model, H = c.n_head, KV = c.kv_heads(), hd = c.hd(),
                    V = c.vocab, r = lora_rank(), p0 = cached_;
        require(cache_cap_ > 0, "decode: call reset_cache(capacity) first");
        require(n >= 1, "decode: needs at least one token");
        require(p0 + n <= cache_cap_, "decode: ", p0, " cached + ", n, " new tokens exceed the cache capacity ", cache_cap_);
        check_tokens(tokens, "tokens");
        DecodeBuffers& b = dec_;
        const auto grow = [](auto& v, Index size) {
            if (static_cast<Index>(v.size()) < size) v.resize(static_cast<std::size_t>(size));
        };
        grow(b.x, n * d);
        grow(b.xn, n * d);
        grow(b.q, n * H * hd);
        grow(b.att, n * H * hd);
        grow(b.mid, n * d);
        grow(b.xa, n * std::max<Index>(r, 1));
        grow(b.logits, V);
        const auto x = mat(b.x.data(), n, d), xn = mat(b.xn.data(), n, d), mid = mat(b.mid.data(), n, d);
        embed_rows(x, tokens);
        RopeTable<T> table;
        table.build(w_->inv_freq, p0, n);
        const Index kvw = KV * hd;
        for (Index l = 0; l < c.n_layer; ++l) {
            const auto& lw = w_->layers[static_cast<std::size_t>(l)];
            T* kc = cache_k_[static_cast<std::size_t>(l)].data();
            T* vc = cache_v_[static_cast<std::size_t>(l)].data();
            rmsnorm_forward(xn, static_cast<T*>(nullptr), x, lw.attn_norm.data(), T(c.rms_eps));
            const auto q = mat(b.q.data(), n, H * hd);
            const auto knew = mat(kc + p0 * kvw, n, kvw), vnew = mat(vc + p0 * kvw, n, kvw);
            proj_forward(lw.q, l, 0, q, xn, b.xa.data());
            proj_forward(lw.k, l, 1, knew, xn, b.xa.data());
            proj_forward(lw.v, l, 2, vnew, xn, b.xa.data());
            const auto pos = [](Index i) { return i; };
            rope_apply(q, H, hd, table, pos);
            rope_apply(knew, KV, hd, table, pos);
            kernels::attention_forward(mat(b.att.data(), n, H * hd), static_cast<T*>(nullptr), ConstMatrixView<T>(q),
                                       ConstMatrixView<T>(kc, p0 + n, kvw), ConstMatrixView<T>(vc, p0 + n, kvw),
                                       attention_shape(1, n, p0 + n));
            proj_forward(lw.o, l, 3, mid, mat(b.att.data(), n, H * hd), b.xa.data());
            residual_forward(mid, ConstMatrixView<T>(x));
            rmsnorm_forward(xn, static_cast<T*>(nullptr), mid, lw.mlp_norm.data(), T(c.rms_eps));
            mlps_[static_cast<std::size_t>(l)]->forward(x, xn, false);
            residual_forward(x, ConstMatrixView<T>(mid));
        }
        cached_ = p0 + n;
        // Only the last row needs the final norm and the head.
        const auto last = mat(b.x.data() + (n - 1) * d, 1, d), lastn = mat(b.xn.data(), 1, d);
        rmsnorm_forward(lastn, static_cast<T*>(nullptr), last, w_->final_norm.data(), T(c.rms_eps));
        w_->head.forward(mat(b.logits.data(), 1, V), lastn);
        return {b.logits.data(), static_cast<std::size_t>(V)};
    }

    std::unique_ptr<CausalLm<T>> share_base() const override { return std::make_unique<Llama<T>>(w_); }

private:
    struct Layer {
        T *xn, *rstd1, *q, *k, *v, *lse, *att, *mid, *mn, *rstd2;
        T* xa[4];
    };
    struct Acts {
        std::vector<T*> res;  ///< residual stream: res[l] input of block l, res[L] the last output
        std::vector<Layer> layer;
        T *fin, *rstd_f, *logits, *lse;
        T* dfin;  ///< dLoss/d(fin), computed by the fused head of a training forward (else null)
    };
    struct Grads {
        T *dres, *dln, *dq, *dk, *dv, *datt, *dxa;
    };
    struct DecodeBuffers {
        std::vector<T> x, xn, q, att, mid, xa, logits;
    };
    struct Carver {
        T* base;
        Index used = 0;
        T* take(Index n) {
            T* p = base ? base + used : nullptr;
            used += (n + 15) / 16 * 16;
            return p;
        }
    };
    struct LoraViews {
        ConstMatrixView<T> A, B;
        MatrixView<T> dA, dB;
    };

    static MatrixView<T> mat(T* p, Index rows, Index cols) { return {p, rows, cols}; }
    kernels::AttentionShape attention_shape(Index B, Index n, Index L) const {
        const auto& c = config();
        return {B, n, L, c.n_head, c.kv_heads(), c.hd()};
    }
    void check_layer(Index layer) const {
        require(layer >= 0 && layer < config().n_layer, "layer ", layer, ": out of range [0, ", config().n_layer, ")");
    }
    void check_tokens(std::span<const int> t, const char* what) const {
        for (std::size_t i = 0; i < t.size(); ++i)
            require(t[i] >= 0 && t[i] < config().vocab, what, "[", i, "] = ", t[i], ": outside [0, vocab_size = ",
                    config().vocab, ")");
    }
    Index lora_rank() const { return has_lora_ ? lora_cfg_.rank : 0; }

    std::vector<AttentionProjection> projections(Index /*rank*/) const {
        const auto& c = config();
        const Index d = c.d_model, qw = c.n_head * c.hd(), kvw = c.kv_heads() * c.hd();
        std::vector<AttentionProjection> v;
        for (Index l = 0; l < c.n_layer; ++l)
            for (const auto& [name, in, out] : {std::tuple<const char*, Index, Index>{"q_proj", d, qw},
                                                {"k_proj", d, kvw}, {"v_proj", d, kvw}, {"o_proj", qw, d}}) {
                const std::string module = llama_layer_name(l, std::string("self_attn.") + name);
                v.push_back({module + ".", module, in, out});
            }
        return v;
    }

    /// Checks the inputs, keeps them, lays out the activations (one block's worth in inference).
    void begin(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn, bool training,
               bool keep_logits = true) {
        require(B >= 1, "B ", B, ": must be >= 1");
        require(Tn >= 1 && Tn <= config().max_positions, "T ", Tn, ": must be in [1, max_position_embeddings = ",
                config().max_positions, "]");
        require<ShapeError>(static_cast<Index>(tokens.size()) == B * Tn, "tokens has ", tokens.size(),
                            " entries, expected B*T = ", B * Tn);
        require<ShapeError>(targets.empty() || static_cast<Index>(targets.size()) == B * Tn, "targets has ",
                            targets.size(), " entries, expected 0 or B*T = ", B * Tn);
        check_tokens(tokens, "tokens");
        check_tokens(targets, "targets");
        tokens_.assign(tokens.begin(), tokens.end());
        targets_.assign(targets.begin(), targets.end());
        B_ = B;
        T_ = Tn;
        training_ = training;
        keep_logits_ = keep_logits;
        Carver count{nullptr};
        carve_acts(count);
        if (static_cast<Index>(acts_buf_.size()) < count.used) acts_buf_.resize(static_cast<std::size_t>(count.used));
        Carver real{acts_buf_.data()};
        carve_acts(real);
        if (rope_len_ != Tn) {
            rope_.build(w_->inv_freq, 0, Tn);
            rope_len_ = Tn;
        }
    }

    void carve_acts(Carver& c) {
        const auto& cf = config();
        const Index N = B_ * T_, d = cf.d_model, qw = cf.n_head * cf.hd(), kvw = cf.kv_heads() * cf.hd(),
                    r = lora_rank(), L = cf.n_layer;
        // Training keeps every block's activations; inference reuses one block's (and one residual).
        const Index blocks = training_ ? L : 1;
        acts_.res.resize(static_cast<std::size_t>(L + 1));
        if (training_) {
            for (auto& p : acts_.res) p = c.take(N * d);
        } else {
            T* r0 = c.take(N * d);
            for (auto& p : acts_.res) p = r0;
        }
        acts_.layer.resize(static_cast<std::size_t>(L));
        for (Index l = 0; l < blocks; ++l) {
            Layer& a = acts_.layer[static_cast<std::size_t>(l)];
            a.xn = c.take(N * d);
            a.rstd1 = c.take(N);
            a.q = c.take(N * qw);
            a.k = c.take(N * kvw);
            a.v = c.take(N * kvw);
            a.lse = training_ ? c.take(B_ * cf.n_head * T_) : nullptr;
            a.att = c.take(N * qw);
            a.mid = c.take(N * d);
            a.mn = c.take(N * d);
            a.rstd2 = c.take(N);
            for (auto& p : a.xa) p = c.take(N * r);
        }
        for (Index l = blocks; l < L; ++l) acts_.layer[static_cast<std::size_t>(l)] = acts_.layer[0];
        acts_.fin = c.take(N * d);
        acts_.rstd_f = c.take(N);
        acts_.logits = keep_logits_ ? c.take(N * cf.vocab) : nullptr;
        acts_.lse = c.take(N);
        acts_.dfin = training_ && !keep_logits_ ? c.take(N * d) : nullptr;
    }
    void carve_grads() {
        const auto& cf = config();
        const Index N = B_ * T_, d = cf.d_model, qw = cf.n_head * cf.hd(), kvw = cf.kv_heads() * cf.hd();
        const auto layout = [&](Carver& c) {
            grads_ = {c.take(N * d), c.take(N * d), c.take(N * qw), c.take(N * kvw), c.take(N * kvw), c.take(N * qw),
                      c.take(N * 3 * lora_rank())};  // dxa: [N, 3 r] for q, k and v side by side
        };
        Carver count{nullptr};
        layout(count);
        if (static_cast<Index>(grad_buf_.size()) < count.used) grad_buf_.resize(static_cast<std::size_t>(count.used));
        Carver real{grad_buf_.data()};
        layout(real);
    }
    T* res(Index l) const { return acts_.res[static_cast<std::size_t>(l)]; }

    /// out[n, d] = embedding rows of the tokens (bf16 rows widened exactly, quantized rows dequantized).
    void embed_rows(MatrixView<T> out, std::span<const int> tokens) const {
        const FrozenLinear<T>& e = w_->embed;
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            T* dst = out.row_ptr(static_cast<Index>(i));
            if constexpr (std::is_same_v<T, float>) {
                if (e.is_bf16()) {
                    kernels::convert_to_float(dst, e.weight_bf16.row_ptr(tokens[i]), out.cols);
                    continue;
                }
            }
            if (e.is_quantized()) {
                kernels::dequantize_row(dst, e.weight_quant.type, e.weight_quant.row_ptr(tokens[i]), out.cols);
                continue;
            }
            std::copy_n(e.weight.row_ptr(tokens[i]), out.cols, dst);
        }
    }

    void run_layers() {
        const auto& c = config();
        const Index N = B_ * T_, d = c.d_model, H = c.n_head, KV = c.kv_heads(), hd = c.hd();
        {
            profile::Scope scope(profile::Phase::embed);
            embed_rows(mat(res(0), N, d), tokens_);
        }
        const auto pos = [Tn = T_](Index i) { return i % Tn; };
        {
            // Block 0's input norm; every later norm is fused with the residual add before it.
            profile::Scope scope(profile::Phase::norm);
            const Layer& a0 = acts_.layer[0];
            rmsnorm_forward(mat(a0.xn, N, d), a0.rstd1, mat(res(0), N, d), w_->layers[0].attn_norm.data(), T(c.rms_eps));
        }
        for (Index l = 0; l < c.n_layer; ++l) {
            const Layer& a = acts_.layer[static_cast<std::size_t>(l)];
            const auto& lw = w_->layers[static_cast<std::size_t>(l)];
            const auto x = mat(res(l), N, d);
            {
                profile::Scope scope(profile::Phase::qkv);
                qkv_forward(lw, l, mat(a.q, N, H * hd), mat(a.k, N, KV * hd), mat(a.v, N, KV * hd), mat(a.xn, N, d),
                            a.xa);
            }
            {
                profile::Scope scope(profile::Phase::norm);
                rope_apply(mat(a.q, N, H * hd), H, hd, rope_, pos);
                rope_apply(mat(a.k, N, KV * hd), KV, hd, rope_, pos);
            }
            {
                profile::Scope scope(profile::Phase::attention);
                kernels::attention_forward(mat(a.att, N, H * hd), a.lse, ConstMatrixView<T>(a.q, N, H * hd),
                                           ConstMatrixView<T>(a.k, N, KV * hd), ConstMatrixView<T>(a.v, N, KV * hd),
                                           attention_shape(B_, T_, T_));
            }
            {
                profile::Scope scope(profile::Phase::out_proj);
                proj_forward(lw.o, l, 3, mat(a.mid, N, d), mat(a.att, N, H * hd), a.xa[3]);
            }
            {
                profile::Scope scope(profile::Phase::norm);
                residual_rmsnorm_forward(mat(a.mid, N, d), ConstMatrixView<T>(x), mat(a.mn, N, d), a.rstd2,
                                         lw.mlp_norm.data(), T(c.rms_eps));
            }
            const auto y = mat(res(l + 1), N, d);  // in inference the same buffer as x: x is no longer needed
            {
                profile::Scope scope(profile::Phase::mlp);
                mlps_[static_cast<std::size_t>(l)]->forward(y, mat(a.mn, N, d), training_);
            }
            // y += mid, then the next block's input norm (or the final norm) of y in the same pass.
            profile::Scope scope(profile::Phase::norm);
            if (l + 1 < c.n_layer) {
                const Layer& next = acts_.layer[static_cast<std::size_t>(l + 1)];
                residual_rmsnorm_forward(y, ConstMatrixView<T>(a.mid, N, d), mat(next.xn, N, d), next.rstd1,
                                         w_->layers[static_cast<std::size_t>(l + 1)].attn_norm.data(), T(c.rms_eps));
            } else {
                residual_rmsnorm_forward(y, ConstMatrixView<T>(a.mid, N, d), mat(acts_.fin, N, d), acts_.rstd_f,
                                         w_->final_norm.data(), T(c.rms_eps));
            }
        }
    }

    LoraViews lora_views(Index l, int p) {
        const auto& proj = projection_prefix(l, p);
        return {std::as_const(*lora_).view(proj + "lora_A"), std::as_const(*lora_).view(proj + "lora_B"),
                lora_grads_->view(proj + "lora_A"), lora_grads_->view(proj + "lora_B")};
    }
    const std::string& projection_prefix(Index l, int p) {
        const std::size_t i = static_cast<std::size_t>(l * 4 + p);
        if (prefixes_.empty()) {
            for (const auto& pr : projections(0)) prefixes_.push_back(pr.prefix);
        }
        return prefixes_[i];
    }

    // y = x W^T + b (+ s (x A^T) B^T with LoRA: models::lora_forward); p: 0 q, 1 k, 2 v, 3 o.
    void proj_forward(const FrozenLinear<T>& W, Index l, int p, MatrixView<T> y, ConstMatrixView<T> x, T* xa) {
        W.forward(y, x);
        if (!has_lora_) return;
        const LoraViews v = lora_views(l, p);
        lora_forward(y, mat(xa, x.rows, lora_cfg_.rank), x, v.A, v.B, T(lora_cfg_.scale()));
    }
    // q, k and v of layer l from the same x: the three base products, then each rank-r step of the
    // three LoRAs as one parallel region (xa = x A^T, then y += s xa B^T).
    void qkv_forward(const typename LlamaWeights<T>::Layer& lw, Index l, MatrixView<T> q, MatrixView<T> k,
                     MatrixView<T> v, ConstMatrixView<T> x, T* const* xa) {
        bool done = false;
        if constexpr (std::is_same_v<T, float>) {
            // bf16 products: x rounded to bf16 once for the three (gemm_bf16 would round it per product).
            if (lw.q.takes_bf16_activations() && lw.k.takes_bf16_activations() && lw.v.takes_bf16_activations() &&
                x.rows > 0 && x.cols > 0) {
                if (xb_.size() < static_cast<std::size_t>(x.size())) xb_.resize(static_cast<std::size_t>(x.size()));
                kernels::convert_rows_to_bf16(xb_.data(), x);
                const ConstMatrixView<kernels::bf16> xb(xb_.data(), x.rows, x.cols);
                lw.q.forward(q, xb);
                lw.k.forward(k, xb);
                lw.v.forward(v, xb);
                done = true;
            }
        }
        if (!done) {
            lw.q.forward(q, x);
            lw.k.forward(k, x);
            lw.v.forward(v, x);
        }
        if (!has_lora_) return;
        using P = kernels::GemmProduct<T>;
        using kernels::Op;
        const Index r = lora_cfg_.rank;
        const T s = T(lora_cfg_.scale());
        const LoraViews a = lora_views(l, 0), b = lora_views(l, 1), c = lora_views(l, 2);
        const auto xq = mat(xa[0], x.rows, r), xk = mat(xa[1], x.rows, r), xv = mat(xa[2], x.rows, r);
        kernels::gemm_chunked<T>({P{xq, x, Op::none, a.A, Op::trans}, P{xk, x, Op::none, b.A, Op::trans},
                                  P{xv, x, Op::none, c.A, Op::trans}});
        kernels::gemm_chunked<T>({P{q, ConstMatrixView<T>(xq), Op::none, a.B, Op::trans, s, T(1)},
                                  P{k, ConstMatrixView<T>(xk), Op::none, b.B, Op::trans, s, T(1)},
                                  P{v, ConstMatrixView<T>(xv), Op::none, c.B, Op::trans, s, T(1)}});
    }
    // dx = dy W (overwritten, when dx has data); with LoRA models::lora_backward adds to it (dxa [N, r]
    // scratch).
    void proj_backward(const FrozenLinear<T>& W, Index l, int p, MatrixView<T> dx, ConstMatrixView<T> dy,
                       ConstMatrixView<T> x, const T* xa, MatrixView<T> dxa) {
        if (dx.data) W.backward_input(dx, dy, false);
        if (!has_lora_) return;
        const LoraViews v = lora_views(l, p);
        lora_backward(dx, v.dA, v.dB, dxa, dy, x, ConstMatrixView<T>(xa, x.rows, lora_cfg_.rank), v.A, v.B,
                      T(lora_cfg_.scale()));
    }
    // The backward of qkv_forward: the three base input gradients into dx (overwritten, when it has data), then
    // the three LoRAs' rank-r steps, each one region: dB += s dy^T xa and dxa = s dy B; then dA +=
    // dxa^T x and dx += [dxa_q dxa_k dxa_v] [A_q; A_k; A_v] (one product: the three write the same dx).
    // dxa3 [N, 3 r] is scratch.
    void qkv_backward(const typename LlamaWeights<T>::Layer& lw, Index l, MatrixView<T> dx, ConstMatrixView<T> dq,
                      ConstMatrixView<T> dk, ConstMatrixView<T> dv, ConstMatrixView<T> x, T* const* xa, T* dxa3) {
        if (dx.data) {
            lw.q.backward_input(dx, dq, false);  // overwrites dx
            lw.k.backward_input(dx, dk, true);
            lw.v.backward_input(dx, dv, true);
        }
        if (!has_lora_) return;
        using P = kernels::GemmProduct<T>;
        using kernels::Op;
        const Index r = lora_cfg_.rank, N = x.rows, d = x.cols;
        const T s = T(lora_cfg_.scale());
        const LoraViews a = lora_views(l, 0), b = lora_views(l, 1), c = lora_views(l, 2);
        const MatrixView<T> dxa[3] = {MatrixView<T>(dxa3, N, r, 3 * r), MatrixView<T>(dxa3 + r, N, r, 3 * r),
                                      MatrixView<T>(dxa3 + 2 * r, N, r, 3 * r)};
        const auto xv = [&](int p) { return ConstMatrixView<T>(xa[p], N, r); };
        if (detail::lora_dy_pass_rank(r)) {  // one pass over each of dq, dk, dv (models::lora_backward's)
            detail::lora_dy_pass<T>({{a.dB, dxa[0], dq, xv(0), a.B}, {b.dB, dxa[1], dk, xv(1), b.B},
                                     {c.dB, dxa[2], dv, xv(2), c.B}},
                                    s);
        } else {
            kernels::gemm_chunked<T>(
                {P{a.dB, dq, Op::trans, xv(0), Op::none, s, T(1)}, P{dxa[0], dq, Op::none, a.B, Op::none, s},
                 P{b.dB, dk, Op::trans, xv(1), Op::none, s, T(1)}, P{dxa[1], dk, Op::none, b.B, Op::none, s},
                 P{c.dB, dv, Op::trans, xv(2), Op::none, s, T(1)}, P{dxa[2], dv, Op::none, c.B, Op::none, s}});
        }
        const auto dc = [&](int p) { return ConstMatrixView<T>(dxa[p]); };
        if (!dx.data) {
            kernels::gemm_chunked<T>({P{a.dA, dc(0), Op::trans, x, Op::none, T(1), T(1)},
                                      P{b.dA, dc(1), Op::trans, x, Op::none, T(1), T(1)},
                                      P{c.dA, dc(2), Op::trans, x, Op::none, T(1), T(1)}});
            return;
        }
        lora_a3_.resize(static_cast<std::size_t>(3 * r * d));
        for (int p = 0; p < 3; ++p) {
            const ConstMatrixView<T> A = p == 0 ? a.A : p == 1 ? b.A : c.A;
            for (Index q = 0; q < r; ++q) std::copy_n(A.row_ptr(q), d, lora_a3_.data() + (p * r + q) * d);
        }
        kernels::gemm_chunked<T>({P{a.dA, dc(0), Op::trans, x, Op::none, T(1), T(1)},
                                  P{b.dA, dc(1), Op::trans, x, Op::none, T(1), T(1)},
                                  P{c.dA, dc(2), Op::trans, x, Op::none, T(1), T(1)},
                                  P{dx, ConstMatrixView<T>(dxa3, N, 3 * r), Op::none,
                                    ConstMatrixView<T>(lora_a3_.data(), 3 * r, d), Op::none, T(1), T(1)}});
    }

    std::shared_ptr<const LlamaWeights<T>> w_;
    std::vector<std::unique_ptr<MlpBlock<T>>> mlps_;
    std::unique_ptr<ParamBuffer<T>> lora_, lora_grads_;
    AttentionLoraConfig lora_cfg_;
    bool has_lora_ = false;
    std::vector<std::string> prefixes_;
    comigs::detail::aligned_vector<T> lora_a3_;  // [A_q; A_k; A_v] for qkv_backward
    comigs::detail::aligned_vector<kernels::bf16> xb_;  // q/k/v input rounded to bf16 (bf16 products)

    std::vector<int> tokens_, targets_;
    Index B_ = 0, T_ = 0;
    bool training_ = false, keep_logits_ = true;
    T ce_ = 0, aux_ = 0;
    comigs::detail::aligned_vector<T> acts_buf_, grad_buf_;
    Acts acts_;
    Grads grads_{};
    RopeTable<T> rope_;
    Index rope_len_ = -1;

    std::vector<comigs::detail::aligned_vector<T>> cache_k_, cache_v_;
    Index cache_cap_ = 0, cached_ = 0;
    DecodeBuffers dec_;
};

}  // namespace comigs::models
