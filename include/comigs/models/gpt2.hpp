#pragma once
// A GPT-2 style byte-level transformer with hand-written forward and backward (after llm.c):
// token + position embeddings, pre-LayerNorm blocks (causal multi-head attention, pluggable MLP),
// final LayerNorm, LM head tied to the token embedding, mean cross-entropy.
//
// Parameters use Hugging Face GPT-2 names in one contiguous buffer; linear weights are [out, in] as
// nn.Linear (HF's Conv1D stores [in, out]: hf_gpt2.hpp transposes at load time).
#include <cmath>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <comigs/detail/aligned.hpp>
#include <comigs/lora.hpp>
#include <comigs/params.hpp>
#include <comigs/random.hpp>

#include "layers.hpp"
#include "mlp_block.hpp"

namespace comigs::models {

/// Shape of the model. Defaults: a byte-level vocabulary and a host small enough to pretrain in seconds.
struct Gpt2Config {
    Index vocab = 256;
    Index n_ctx = 64;       ///< longest sequence (rows of the position embedding)
    Index d_model = 64;
    Index n_head = 4;       ///< must divide d_model
    Index n_layer = 2;
    Index mlp_hidden = 0;   ///< 0 means 4 * d_model

    Index hidden() const { return mlp_hidden > 0 ? mlp_hidden : 4 * d_model; }
    Index head_size() const { return d_model / n_head; }

    void validate() const {
        require(vocab >= 1, "vocab ", vocab, ": must be >= 1");
        require(n_ctx >= 1, "n_ctx ", n_ctx, ": must be >= 1");
        require(d_model >= 1, "d_model ", d_model, ": must be >= 1");
        require(n_head >= 1 && d_model % n_head == 0, "n_head ", n_head, ": must be >= 1 and divide d_model ",
                d_model);
        require(n_layer >= 1, "n_layer ", n_layer, ": must be >= 1");
        require(mlp_hidden >= 0, "mlp_hidden ", mlp_hidden, ": must be >= 0 (0 = 4 * d_model)");
    }
};

/// full: every parameter gets a gradient (pretraining). frozen_base: the GPT-2 weights get none (and
/// their weight-gradient GEMMs are skipped); only the LoRA adapters and whatever MLP plug-ins train.
enum class TrainMode { full, frozen_base };

/// LoRA on the attention projections: y = W x + b + s B A x, A [rank, in], B [out, rank].
struct AttentionLoraConfig {
    Index rank = 8;
    double alpha = 16;
    LoraScaling scaling = LoraScaling::sqrt;  ///< comigs' enum: linear = alpha / r, sqrt = alpha / sqrt(r)

    double scale() const { return lora_scale(alpha, rank, scaling); }
};

/// "h.{layer}.{tail}", the HF GPT-2 name of a per-block tensor.
inline std::string layer_name(Index layer, std::string_view tail) {
    return "h." + std::to_string(layer) + "." + std::string(tail);
}

/// The GPT-2 parameter layout for a config ([out, in] linear weights).
inline ParamLayout gpt2_layout(const Gpt2Config& c) {
    const Index d = c.d_model, h = c.hidden();
    ParamLayout L;
    L.add("wte.weight", {c.vocab, d});
    L.add("wpe.weight", {c.n_ctx, d});
    for (Index l = 0; l < c.n_layer; ++l) {
        L.add(layer_name(l, "ln_1.weight"), {d});
        L.add(layer_name(l, "ln_1.bias"), {d});
        L.add(layer_name(l, "attn.c_attn.weight"), {3 * d, d});
        L.add(layer_name(l, "attn.c_attn.bias"), {3 * d});
        L.add(layer_name(l, "attn.c_proj.weight"), {d, d});
        L.add(layer_name(l, "attn.c_proj.bias"), {d});
        L.add(layer_name(l, "ln_2.weight"), {d});
        L.add(layer_name(l, "ln_2.bias"), {d});
        L.add(layer_name(l, "mlp.c_fc.weight"), {h, d});
        L.add(layer_name(l, "mlp.c_fc.bias"), {h});
        L.add(layer_name(l, "mlp.c_proj.weight"), {d, h});
        L.add(layer_name(l, "mlp.c_proj.bias"), {d});
    }
    L.add("ln_f.weight", {d});
    L.add("ln_f.bias", {d});
    return L;
}

/// The model. Typical step:
///   model.zero_grad(); T loss = model.forward(tokens, targets, B, T); model.backward(); optimiser step
/// on (params(), grads()) in full mode, on (lora(), lora_grads()) and the plug-ins' own buffers in
/// frozen-base mode. Moving the model keeps every buffer (and the views plug-ins hold) in place.
template <class T>
class Gpt2 {
public:
    /// LayerNorm weights are 1, everything else 0: call init_weights or load weights next.
    explicit Gpt2(const Gpt2Config& config) : cfg_(config) {
        cfg_.validate();
        params_ = std::make_unique<ParamBuffer<T>>(gpt2_layout(cfg_));
        grads_ = std::make_unique<ParamBuffer<T>>(params_->layout_ptr());
        lora_ = std::make_unique<ParamBuffer<T>>();
        lora_grads_ = std::make_unique<ParamBuffer<T>>();
        for (Index l = 0; l < cfg_.n_layer; ++l)
            mlps_.push_back(std::make_unique<DenseMlp<T>>(*params_, *grads_, layer_name(l, "mlp.")));
        for (const auto& s : params_->layout().tensors())
            if (s.name.find("ln_") != std::string::npos && s.name.ends_with(".weight"))
                std::fill_n(params_->data() + s.offset, s.size, T(1));
    }

    const Gpt2Config& config() const { return cfg_; }

    /// GPT-2 initialisation: weights N(0, 0.02), residual projections (c_proj) N(0, 0.02 / sqrt(2 n_layer)),
    /// biases 0, LayerNorm weight 1 and bias 0.
    void init_weights(Rng& rng) {
        const double proj_std = 0.02 / std::sqrt(2.0 * double(cfg_.n_layer));
        for (const auto& s : params_->layout().tensors()) {
            T* p = params_->data() + s.offset;
            const bool is_ln = s.name.find("ln_") != std::string::npos;
            if (is_ln || s.name.ends_with(".bias")) {
                std::fill_n(p, s.size, T(is_ln && s.name.ends_with(".weight") ? 1 : 0));
            } else {
                const double sd = s.name.find("c_proj") != std::string::npos ? proj_std : 0.02;
                for (Index i = 0; i < s.size; ++i) p[i] = T(rng.normal(0.0, sd));
            }
        }
    }

    /// Base parameters (HF GPT-2 names) and their gradients (same layout).
    ParamBuffer<T>& params() { return *params_; }
    const ParamBuffer<T>& params() const { return *params_; }
    ParamBuffer<T>& grads() { return *grads_; }
    const ParamBuffer<T>& grads() const { return *grads_; }

    /// Adds (or replaces) LoRA adapters on c_attn and c_proj of every block: tensors
    /// "h.{i}.attn.c_attn.lora_A" [r, d], ".lora_B" [3d, r], "h.{i}.attn.c_proj.lora_A" [r, d],
    /// ".lora_B" [d, r]. A ~ U(-1/sqrt(d), 1/sqrt(d)), B = 0, so the model's function is unchanged.
    void add_attention_lora(const AttentionLoraConfig& lc, Rng& rng) {
        lc.scale();  // checks rank >= 1 and a finite alpha
        const Index d = cfg_.d_model;
        ParamLayout L;
        for (Index l = 0; l < cfg_.n_layer; ++l) {
            L.add(layer_name(l, "attn.c_attn.lora_A"), {lc.rank, d});
            L.add(layer_name(l, "attn.c_attn.lora_B"), {3 * d, lc.rank});
            L.add(layer_name(l, "attn.c_proj.lora_A"), {lc.rank, d});
            L.add(layer_name(l, "attn.c_proj.lora_B"), {d, lc.rank});
        }
        *lora_ = ParamBuffer<T>(std::move(L));
        *lora_grads_ = ParamBuffer<T>(lora_->layout_ptr());
        const double bound = 1.0 / std::sqrt(double(d));
        for (const auto& s : lora_->layout().tensors())
            if (s.name.ends_with("lora_A"))
                for (Index i = 0; i < s.size; ++i) lora_->data()[s.offset + i] = T(rng.uniform(-bound, bound));
        lora_cfg_ = lc;
        has_lora_ = true;
    }
    bool has_lora() const { return has_lora_; }
    const AttentionLoraConfig& lora_config() const { return lora_cfg_; }
    /// LoRA adapters (empty without add_attention_lora) and their gradients.
    ParamBuffer<T>& lora() { return *lora_; }
    const ParamBuffer<T>& lora() const { return *lora_; }
    ParamBuffer<T>& lora_grads() { return *lora_grads_; }

    /// Replaces the MLP of block `layer` (by default a DenseMlp over "h.{layer}.mlp.*"). The frozen
    /// base MLP weights stay in params() for the plug-in to read.
    void set_mlp(Index layer, std::unique_ptr<MlpBlock<T>> mlp) {
        require(layer >= 0 && layer < cfg_.n_layer, "layer ", layer, ": out of range [0, ", cfg_.n_layer, ")");
        require(mlp != nullptr, "mlp of layer ", layer, ": null");
        mlp->set_base_trainable(mode_ == TrainMode::full);
        mlps_[static_cast<std::size_t>(layer)] = std::move(mlp);
    }
    MlpBlock<T>& mlp(Index layer) { return *mlps_.at(static_cast<std::size_t>(layer)); }

    void set_train_mode(TrainMode mode) {
        mode_ = mode;
        for (auto& m : mlps_) m->set_base_trainable(mode == TrainMode::full);
    }
    TrainMode train_mode() const { return mode_; }

    /// Zeroes grads() and lora_grads() (plug-ins zero their own gradients).
    void zero_grad() {
        grads_->zero();
        lora_grads_->zero();
    }

    /// Runs the model on tokens [B*T] (row b*T + t is sequence b, position t; T <= n_ctx). With targets
    /// [B*T] returns mean cross-entropy + the MLPs' aux losses, else NaN. `training`: backward may follow
    /// (also passed to the MLPs). Activations are kept in one buffer that grows to the largest B*T seen.
    T forward(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn, bool training = true) {
        require(B >= 1, "B ", B, ": must be >= 1");
        require(Tn >= 1 && Tn <= cfg_.n_ctx, "T ", Tn, ": must be in [1, n_ctx = ", cfg_.n_ctx, "]");
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
        carve_acts(reserve(acts_buf_, carve_acts(nullptr)));

        const Index N = B * Tn, d = cfg_.d_model, V = cfg_.vocab;
        encoder_forward(mat(a_.res[0], N, d), tokens_.data(), P("wte.weight"), P("wpe.weight"), B, Tn);
        for (Index l = 0; l < cfg_.n_layer; ++l) {
            const LayerActs& a = a_.layer[static_cast<std::size_t>(l)];
            const auto x = mat(a_.res[static_cast<std::size_t>(l)], N, d);
            const auto y = mat(a_.res[static_cast<std::size_t>(l) + 1], N, d);
            layernorm_forward(mat(a.ln1, N, d), a.ln1_mean, a.ln1_rstd, x, pl(l, "ln_1.weight"), pl(l, "ln_1.bias"));
            projection_forward(l, "attn.c_attn.", mat(a.qkv, N, 3 * d), mat(a.ln1, N, d), a.xa_attn);
            attention_forward(mat(a.atty, N, d), a.probs, mat(a.qkv, N, 3 * d), B, Tn, cfg_.n_head);
            projection_forward(l, "attn.c_proj.", mat(a.mid, N, d), mat(a.atty, N, d), a.xa_proj);
            residual_forward(mat(a.mid, N, d), x);
            layernorm_forward(mat(a.ln2, N, d), a.ln2_mean, a.ln2_rstd, mat(a.mid, N, d), pl(l, "ln_2.weight"),
                              pl(l, "ln_2.bias"));
            mlps_[static_cast<std::size_t>(l)]->forward(y, mat(a.ln2, N, d), training);
            residual_forward(y, mat(a.mid, N, d));
        }
        layernorm_forward(mat(a_.lnf, N, d), a_.lnf_mean, a_.lnf_rstd, mat(a_.res.back(), N, d),
                          P("ln_f.weight").data, P("ln_f.bias").data);
        linear_forward(mat(a_.logits, N, V), mat(a_.lnf, N, d), P("wte.weight"), static_cast<const T*>(nullptr));

        aux_ = T(0);
        for (const auto& m : mlps_) aux_ += m->aux_loss();
        if (targets_.empty()) return ce_ = std::numeric_limits<T>::quiet_NaN();
        ce_ = crossentropy_forward(a_.lse, mat(a_.logits, N, V), targets_.data());
        return ce_ + aux_;
    }

    /// Accumulates d(loss of the last forward)/d(parameters) into grads() (full mode), lora_grads() (if
    /// LoRA is present) and the MLP plug-ins. Needs a training forward with targets just before.
    void backward() {
        require(training_ && !targets_.empty(), "backward: the last forward must be a training forward with targets");
        const Index B = B_, Tn = T_, N = B * Tn, d = cfg_.d_model, V = cfg_.vocab, r = lora_rank();
        const bool base = mode_ == TrainMode::full;
        carve_grad_acts(reserve(grad_buf_, carve_grad_acts(nullptr)));
        const GradActs& g = g_;
        const auto dres = mat(g.dres, N, d), dln = mat(g.dln, N, d);

        eigen(mat(g.dlogits, N, V)).setZero();
        crossentropy_backward(mat(g.dlogits, N, V), mat(a_.logits, N, V), a_.lse, targets_.data(), T(1));
        eigen(dln).setZero();
        linear_backward(dln, G("wte.weight"), static_cast<T*>(nullptr), mat(g.dlogits, N, V), mat(a_.lnf, N, d),
                        P("wte.weight"));
        eigen(dres).setZero();
        layernorm_backward(dres, G("ln_f.weight").data, G("ln_f.bias").data, dln, mat(a_.res.back(), N, d),
                           a_.lnf_mean, a_.lnf_rstd, P("ln_f.weight").data);

        for (Index l = cfg_.n_layer - 1; l >= 0; --l) {
            const LayerActs& a = a_.layer[static_cast<std::size_t>(l)];
            // dres holds dLoss/d(block output); the residual passes it straight through to the block input.
            eigen(dln).setZero();
            mlps_[static_cast<std::size_t>(l)]->backward(dln, dres, mat(a.ln2, N, d));
            layernorm_backward(dres, gl(l, "ln_2.weight"), gl(l, "ln_2.bias"), dln, mat(a.mid, N, d), a.ln2_mean,
                               a.ln2_rstd, pl(l, "ln_2.weight"));
            eigen(mat(g.datty, N, d)).setZero();
            projection_backward(l, "attn.c_proj.", mat(g.datty, N, d), dres, mat(a.atty, N, d), a.xa_proj,
                                mat(g.dxa, N, r));
            eigen(mat(g.dqkv, N, 3 * d)).setZero();
            attention_backward(mat(g.dqkv, N, 3 * d), mat(g.datty, N, d), mat(a.qkv, N, 3 * d), a.probs, B, Tn,
                               cfg_.n_head);
            // Below block 0's attention only the embeddings remain: frozen, they need no input gradient.
            const bool need_dx = base || l > 0;
            if (need_dx) eigen(dln).setZero();
            projection_backward(l, "attn.c_attn.", need_dx ? dln : MatrixView<T>(), mat(g.dqkv, N, 3 * d),
                                mat(a.ln1, N, d), a.xa_attn, mat(g.dxa, N, r));
            if (need_dx)
                layernorm_backward(dres, gl(l, "ln_1.weight"), gl(l, "ln_1.bias"), dln,
                                   mat(a_.res[static_cast<std::size_t>(l)], N, d), a.ln1_mean, a.ln1_rstd,
                                   pl(l, "ln_1.weight"));
        }
        if (base) encoder_backward(G("wte.weight"), G("wpe.weight"), dres, tokens_.data(), B, Tn);
    }

    /// Logits [B*T, vocab] of the last forward.
    ConstMatrixView<T> logits() const { return {a_.logits, B_ * T_, cfg_.vocab}; }
    /// The two parts of the last loss: mean cross-entropy and the sum of the MLPs' aux losses.
    T last_ce_loss() const { return ce_; }
    T last_aux_loss() const { return aux_; }

private:
    struct LayerActs {
        T *ln1, *ln1_mean, *ln1_rstd, *qkv, *probs, *atty, *mid, *ln2, *ln2_mean, *ln2_rstd, *xa_attn, *xa_proj;
    };
    struct Acts {
        std::vector<T*> res;  ///< residual stream: res[0] embeddings, res[l + 1] output of block l
        std::vector<LayerActs> layer;
        T *lnf, *lnf_mean, *lnf_rstd, *logits, *lse;
    };
    struct GradActs {
        T *dres, *dln, *dqkv, *datty, *dxa, *dlogits;
    };

    // Bump allocation of 16-element aligned slices. With base == nullptr only counts (pointers stay null).
    struct Carver {
        T* base;
        Index used = 0;
        T* take(Index n) {
            T* p = base ? base + used : nullptr;
            used += (n + 15) / 16 * 16;
            return p;
        }
    };

    Index carve_acts(T* base) {
        Carver c{base};
        const Index N = B_ * T_, d = cfg_.d_model, r = lora_rank();
        a_.res.resize(static_cast<std::size_t>(cfg_.n_layer) + 1);
        for (auto& p : a_.res) p = c.take(N * d);
        a_.layer.resize(static_cast<std::size_t>(cfg_.n_layer));
        for (auto& a : a_.layer) {
            a.ln1 = c.take(N * d);
            a.ln1_mean = c.take(N);
            a.ln1_rstd = c.take(N);
            a.qkv = c.take(N * 3 * d);
            a.probs = c.take(B_ * cfg_.n_head * T_ * T_);
            a.atty = c.take(N * d);
            a.mid = c.take(N * d);
            a.ln2 = c.take(N * d);
            a.ln2_mean = c.take(N);
            a.ln2_rstd = c.take(N);
            a.xa_attn = c.take(N * r);
            a.xa_proj = c.take(N * r);
        }
        a_.lnf = c.take(N * d);
        a_.lnf_mean = c.take(N);
        a_.lnf_rstd = c.take(N);
        a_.logits = c.take(N * cfg_.vocab);
        a_.lse = c.take(N);
        return c.used;
    }
    Index carve_grad_acts(T* base) {
        Carver c{base};
        const Index N = B_ * T_, d = cfg_.d_model;
        g_ = {c.take(N * d), c.take(N * d), c.take(N * 3 * d), c.take(N * d), c.take(N * lora_rank()),
              c.take(N * cfg_.vocab)};
        return c.used;
    }
    static T* reserve(comigs::detail::aligned_vector<T>& buf, Index n) {
        if (static_cast<Index>(buf.size()) < n) buf.resize(static_cast<std::size_t>(n));
        return buf.data();
    }
    static MatrixView<T> mat(T* p, Index rows, Index cols) { return {p, rows, cols}; }

    void check_tokens(std::span<const int> t, const char* what) const {
        for (std::size_t i = 0; i < t.size(); ++i)
            require(t[i] >= 0 && t[i] < cfg_.vocab, what, "[", i, "] = ", t[i], ": outside [0, vocab = ", cfg_.vocab,
                    ")");
    }
    Index lora_rank() const { return has_lora_ ? lora_cfg_.rank : 0; }

    ConstMatrixView<T> P(std::string_view name) const { return params_->view(name); }
    /// Gradient view of a base tensor, or an empty view (skip the work) when the base is frozen.
    MatrixView<T> G(std::string_view name) {
        return mode_ == TrainMode::full ? grads_->view(name) : MatrixView<T>();
    }
    const T* pl(Index l, std::string_view tail) const { return P(layer_name(l, tail)).data; }
    T* gl(Index l, std::string_view tail) { return G(layer_name(l, tail)).data; }

    // y = x W^T + b (+ s (x A^T) B^T with LoRA); `name` is "attn.c_attn." or "attn.c_proj.".
    void projection_forward(Index l, const std::string& name, MatrixView<T> y, ConstMatrixView<T> x, T* xa) {
        const std::string pre = layer_name(l, name);
        linear_forward(y, x, P(pre + "weight"), P(pre + "bias").data);
        if (has_lora_)
            lora_forward(y, mat(xa, x.rows, lora_cfg_.rank), x, lora().view(pre + "lora_A"), lora().view(pre + "lora_B"),
                         T(lora_cfg_.scale()));
    }
    void projection_backward(Index l, const std::string& name, MatrixView<T> dx, ConstMatrixView<T> dy,
                             ConstMatrixView<T> x, const T* xa, MatrixView<T> dxa) {
        const std::string pre = layer_name(l, name);
        linear_backward(dx, G(pre + "weight"), G(pre + "bias").data, dy, x, P(pre + "weight"));
        if (has_lora_)
            lora_backward(dx, lora_grads_->view(pre + "lora_A"), lora_grads_->view(pre + "lora_B"), dxa, dy, x,
                          ConstMatrixView<T>(xa, x.rows, lora_cfg_.rank), std::as_const(*lora_).view(pre + "lora_A"),
                          std::as_const(*lora_).view(pre + "lora_B"), T(lora_cfg_.scale()));
    }

    Gpt2Config cfg_;
    std::unique_ptr<ParamBuffer<T>> params_, grads_, lora_, lora_grads_;
    AttentionLoraConfig lora_cfg_;
    bool has_lora_ = false;
    std::vector<std::unique_ptr<MlpBlock<T>>> mlps_;
    TrainMode mode_ = TrainMode::full;

    std::vector<int> tokens_, targets_;
    Index B_ = 0, T_ = 0;
    bool training_ = false;
    T ce_ = 0, aux_ = 0;
    comigs::detail::aligned_vector<T> acts_buf_, grad_buf_;
    Acts a_;
    GradActs g_{};
};

}  // namespace comigs::models
