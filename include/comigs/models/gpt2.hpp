#pragma once
// The GPT-2 host with hand-written forward and backward (after llm.c): token + position embeddings,
// pre-LayerNorm blocks (causal multi-head attention, pluggable MLP), final LayerNorm, LM head tied to
// the token embedding, mean cross-entropy. From the demo's byte-level host (2 layers, d = 64) to GPT-2
// itself (124M, vocabulary 50257).
//
// Two ways to hold the base:
//   - trainable (Gpt2(config)): every weight in one fp32/fp64 buffer with Hugging Face GPT-2 names and a
//     gradient buffer beside it, for pretraining (the demo's host) and fine-tuning with a frozen base;
//   - frozen (Gpt2(weights), load_gpt2 in hf_gpt2.hpp): Gpt2Weights shared by every model over them,
//     each linear a comigs::FrozenLinear (fp32, BF16 kept as BF16, or Q8_0 / Q4_0 blocks quantized at load:
//     WeightOptions::quantize), the MLPs FrozenMlps.
// Linear weights are [out, in] as nn.Linear (HF's Conv1D stores [in, out]: hf_gpt2.hpp transposes).
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <comigs/detail/aligned.hpp>
#include <comigs/frozen.hpp>
#include <comigs/kernels/bf16.hpp>
#include <comigs/lora.hpp>
#include <comigs/params.hpp>
#include <comigs/random.hpp>

#include <comigs/kernels/attention.hpp>
#include <comigs/profile.hpp>

#include "attention.hpp"
#include "lm_head.hpp"
#include "causal_lm.hpp"
#include "layers.hpp"
#include "mlp_block.hpp"
#include "tensor_source.hpp"

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

/// The frozen weights of a GPT-2 model as views (shared by every Gpt2 over them): each linear a
/// FrozenLinear [out, in], each block's MLP a FrozenMlp. `owner` keeps the memory the views point into.
template <class T>
struct Gpt2Weights {
    struct Layer {
        std::span<const T> ln1_w, ln1_b, ln2_w, ln2_b;
        FrozenLinear<T> c_attn, c_proj;          ///< [3d, d] + [3d], [d, d] + [d]
        std::shared_ptr<const FrozenMlp<T>> mlp;  ///< GELU fc [h, d] + [h], proj [d, h] + [d]
    };
    Gpt2Config config;
    FrozenLinear<T> wte;        ///< [vocab, d]: the embedding rows, and the tied head
    ConstMatrixView<T> wpe;     ///< [n_ctx, d]
    std::span<const T> lnf_w, lnf_b;
    std::vector<Layer> layers;
    std::shared_ptr<const void> owner;
};

/// Views of a GPT-2 parameter buffer (gpt2_layout) as Gpt2Weights; `owner` must keep `params` alive.
template <class T>
std::shared_ptr<Gpt2Weights<T>> gpt2_weights_view(const Gpt2Config& c, const ParamBuffer<T>& params,
                                                  std::shared_ptr<const void> owner) {
    auto w = std::make_shared<Gpt2Weights<T>>();
    w->config = c;
    w->owner = owner;
    w->wte = {params.view("wte.weight"), {}};
    w->wpe = params.view("wpe.weight");
    w->lnf_w = params.span("ln_f.weight");
    w->lnf_b = params.span("ln_f.bias");
    for (Index l = 0; l < c.n_layer; ++l) {
        const auto n = [l](std::string_view tail) { return layer_name(l, tail); };
        typename Gpt2Weights<T>::Layer L;
        L.ln1_w = params.span(n("ln_1.weight"));
        L.ln1_b = params.span(n("ln_1.bias"));
        L.ln2_w = params.span(n("ln_2.weight"));
        L.ln2_b = params.span(n("ln_2.bias"));
        L.c_attn = {params.view(n("attn.c_attn.weight")), params.span(n("attn.c_attn.bias"))};
        L.c_proj = {params.view(n("attn.c_proj.weight")), params.span(n("attn.c_proj.bias"))};
        std::map<std::string, FrozenLinear<T>> mlp;
        mlp["fc"] = {params.view(n("mlp.c_fc.weight")), params.span(n("mlp.c_fc.bias"))};
        mlp["proj"] = {params.view(n("mlp.c_proj.weight")), params.span(n("mlp.c_proj.bias"))};
        L.mlp = std::make_shared<FrozenMlp<T>>(MlpForm::gelu, c.d_model, c.hidden(), std::move(mlp), owner);
        w->layers.push_back(std::move(L));
    }
    return w;
}

/// The weights `w` with every linear (attention c_attn and c_proj, the MLPs' fc and proj, and wte: the
/// tied head and the embedding rows) held in GGML's Q8_0 or Q4_0 blocks along its [out, in] rows,
/// quantized from the current values (fp32/fp64, bf16, or the dequantized values of other blocks) as
/// FrozenMlp::set_precision does for one MLP: the way to a quantized base for a GPT-2 held in memory
/// (a pretrained Gpt2(config)'s weights_ptr(); a file quantizes at load: WeightOptions::quantize).
/// LayerNorms, biases and wpe stay where they are (`w` is kept alive). Rows must be multiples of 32
/// values (InvalidArgument naming the linear); NumericError for a non-finite weight.
template <class T>
std::shared_ptr<const Gpt2Weights<T>> quantized_gpt2_weights(std::shared_ptr<const Gpt2Weights<T>> w, Precision p) {
    require(w != nullptr, "quantized_gpt2_weights: null weights");
    require(is_quantized(p), "quantized_gpt2_weights: precision ", to_string(p), " is not q8_0 or q4_0");
    struct Owner {
        std::shared_ptr<const void> previous;
        std::vector<comigs::detail::aligned_vector<std::byte>> blocks;
    };
    auto owner = std::make_shared<Owner>();
    owner->previous = w;
    const kernels::QuantType q = quant_type(p);
    const auto quantize = [&](const FrozenLinear<T>& f, const std::string& what) {
        const Index rows = f.out_features(), cols = f.in_features();
        require(cols % kernels::quant_block_size == 0, "quantized_gpt2_weights: ", what, " has rows of ", cols,
                " values, not a multiple of 32 (GGML blocks)");
        const std::size_t rb = kernels::quant_row_bytes(q, cols);
        auto& buf = owner->blocks.emplace_back(static_cast<std::size_t>(rows) * rb);
        std::vector<float> row(static_cast<std::size_t>(cols));
        for (Index i = 0; i < rows; ++i) {
            f.row_as_float(i, row.data());
            try {
                kernels::quantize_row(buf.data() + static_cast<std::size_t>(i) * rb, q, row.data(), cols);
            } catch (const NumericError& e) {
                comigs::detail::raise<NumericError>("quantized_gpt2_weights: ", what, " row ", i, ": ", e.what());
            }
        }
        FrozenLinear<T> out;
        out.weight_quant = kernels::QuantMatrixView(q, buf.data(), rows, cols);
        out.bias = f.bias;
        return out;
    };
    auto n = std::make_shared<Gpt2Weights<T>>(*w);
    n->owner = owner;
    n->wte = quantize(w->wte, "wte");
    for (std::size_t l = 0; l < n->layers.size(); ++l) {
        auto& L = n->layers[l];
        const auto name = [l](std::string_view tail) { return layer_name(static_cast<Index>(l), tail); };
        L.c_attn = quantize(w->layers[l].c_attn, name("attn.c_attn"));
        L.c_proj = quantize(w->layers[l].c_proj, name("attn.c_proj"));
        std::map<std::string, FrozenLinear<T>> mlp;
        mlp["fc"] = quantize(w->layers[l].mlp->linear("fc"), name("mlp.c_fc"));
        mlp["proj"] = quantize(w->layers[l].mlp->linear("proj"), name("mlp.c_proj"));
        L.mlp = std::make_shared<FrozenMlp<T>>(MlpForm::gelu, n->config.d_model, n->config.hidden(), std::move(mlp), owner);
    }
    return n;
}

/// The model. Typical step:
///   model.zero_grad(); T loss = model.forward(tokens, targets, B, T); model.backward(); optimiser step
/// on (params(), grads()) in full mode, on (lora(), lora_grads()) and the plug-ins' own buffers in
/// frozen-base mode. Moving the model keeps every buffer (and the views plug-ins hold) in place.
template <class T>
class Gpt2 final : public CausalLm<T> {
public:
    /// A trainable model: LayerNorm weights are 1, everything else 0: call init_weights or load weights next.
    explicit Gpt2(const Gpt2Config& config) : cfg_(config) {
        cfg_.validate();
        params_ = std::make_shared<ParamBuffer<T>>(gpt2_layout(cfg_));
        grads_ = std::make_unique<ParamBuffer<T>>(params_->layout_ptr());
        lora_ = std::make_unique<ParamBuffer<T>>();
        lora_grads_ = std::make_unique<ParamBuffer<T>>();
        for (Index l = 0; l < cfg_.n_layer; ++l)
            mlps_.push_back(std::make_unique<DenseMlp<T>>(*params_, *grads_, layer_name(l, "mlp.")));
        for (const auto& s : params_->layout().tensors())
            if (s.name.find("ln_") != std::string::npos && s.name.ends_with(".weight"))
                std::fill_n(params_->data() + s.offset, s.size, T(1));
        w_ = gpt2_weights_view<T>(cfg_, *params_, params_);
    }

    /// A model over frozen weights (shared, not copied): frozen-base mode only, the MLPs FrozenMlpBlocks.
    explicit Gpt2(std::shared_ptr<const Gpt2Weights<T>> weights) : cfg_(weights ? weights->config : Gpt2Config{}) {
        require(weights != nullptr, "Gpt2: null weights");
        cfg_.validate();
        w_ = std::move(weights);
        lora_ = std::make_unique<ParamBuffer<T>>();
        lora_grads_ = std::make_unique<ParamBuffer<T>>();
        for (const auto& layer : w_->layers) mlps_.push_back(std::make_unique<FrozenMlpBlock<T>>(layer.mlp));
        mode_ = TrainMode::frozen_base;
    }

    const Gpt2Config& config() const { return cfg_; }
    /// The frozen weights the model computes with (views into params() for a trainable model).
    std::shared_ptr<const Gpt2Weights<T>> weights_ptr() const { return w_; }

    /// Whether the model holds its own trainable parameter buffer (Gpt2(config)).
    bool trainable() const { return params_ != nullptr; }

    /// GPT-2 initialisation: weights N(0, 0.02), residual projections (c_proj) N(0, 0.02 / sqrt(2 n_layer)),
    /// biases 0, LayerNorm weight 1 and bias 0.
    void init_weights(Rng& rng) {
        const double proj_std = 0.02 / std::sqrt(2.0 * double(cfg_.n_layer));
        for (const auto& s : params().layout().tensors()) {
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

    /// Base parameters (HF GPT-2 names) and their gradients (same layout); trainable models only.
    ParamBuffer<T>& params() {
        require(trainable(), "params: a model over frozen Gpt2Weights has no parameter buffer");
        return *params_;
    }
    const ParamBuffer<T>& params() const {
        require(trainable(), "params: a model over frozen Gpt2Weights has no parameter buffer");
        return *params_;
    }
    ParamBuffer<T>& grads() {
        require(trainable(), "grads: a model over frozen Gpt2Weights has no parameter gradients");
        return *grads_;
    }
    const ParamBuffer<T>& grads() const {
        require(trainable(), "grads: a model over frozen Gpt2Weights has no parameter gradients");
        return *grads_;
    }

    // ---- CausalLm ------------------------------------------------------------------------------------

    std::string architecture() const override { return "gpt2"; }
    Index vocab() const override { return cfg_.vocab; }
    Index max_positions() const override { return cfg_.n_ctx; }
    Index n_layer() const override { return cfg_.n_layer; }
    Index d_model() const override { return cfg_.d_model; }
    MlpForm mlp_form() const override { return MlpForm::gelu; }
    Index mlp_hidden() const override { return cfg_.hidden(); }
    /// The frozen MLP of a block (views into the weights; for a trainable model, into params(), which
    /// must then not change while the MLP is in use).
    std::shared_ptr<const FrozenMlp<T>> frozen_mlp(Index layer) const override {
        check_layer(layer);
        return w_->layers[static_cast<std::size_t>(layer)].mlp;
    }
    std::string mlp_prefix(Index layer) const override {
        check_layer(layer);
        return layer_name(layer, "mlp.");
    }
    std::string mlp_module(Index layer, const std::string& linear) const override {
        check_layer(layer);
        require(linear == "fc" || linear == "proj", "mlp linear '", linear, "': a GPT-2 MLP has fc and proj");
        return "transformer." + layer_name(layer, "mlp.c_" + linear);
    }

    /// Adds (or replaces) LoRA adapters on c_attn and c_proj of every block: tensors
    /// "h.{i}.attn.c_attn.lora_A" [r, d], ".lora_B" [3d, r], "h.{i}.attn.c_proj.lora_A" [r, d],
    /// ".lora_B" [d, r]. A ~ U(-1/sqrt(d), 1/sqrt(d)), B = 0, so the model's function is unchanged.
    void add_attention_lora(const AttentionLoraConfig& lc, Rng& rng) override {
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
    bool has_lora() const override { return has_lora_; }
    const AttentionLoraConfig& lora_config() const override { return lora_cfg_; }
    std::vector<AttentionProjection> attention_projections() const override {
        std::vector<AttentionProjection> v;
        const Index d = cfg_.d_model;
        for (Index l = 0; l < cfg_.n_layer; ++l) {
            v.push_back({layer_name(l, "attn.c_attn."), "transformer." + layer_name(l, "attn.c_attn"), d, 3 * d});
            v.push_back({layer_name(l, "attn.c_proj."), "transformer." + layer_name(l, "attn.c_proj"), d, d});
        }
        return v;
    }
    /// LoRA adapters (empty without add_attention_lora) and their gradients.
    ParamBuffer<T>& lora() override { return *lora_; }
    const ParamBuffer<T>& lora() const { return *lora_; }
    ParamBuffer<T>& lora_grads() override { return *lora_grads_; }

    /// Replaces the MLP of block `layer` (by default a DenseMlp over "h.{layer}.mlp.*", or the frozen
    /// MLP of the weights). The frozen base MLP weights stay where they are for the plug-in to read.
    void set_mlp(Index layer, std::unique_ptr<MlpBlock<T>> mlp) override {
        check_layer(layer);
        require(mlp != nullptr, "mlp of layer ", layer, ": null");
        mlp->set_base_trainable(mode_ == TrainMode::full);
        mlps_[static_cast<std::size_t>(layer)] = std::move(mlp);
    }
    MlpBlock<T>& mlp(Index layer) override { return *mlps_.at(static_cast<std::size_t>(layer)); }

    void set_train_mode(TrainMode mode) {
        require(mode == TrainMode::frozen_base || trainable(),
                "train mode full: a model over frozen Gpt2Weights trains adapters only");
        mode_ = mode;
        for (auto& m : mlps_) m->set_base_trainable(mode == TrainMode::full);
    }
    TrainMode train_mode() const { return mode_; }

    /// Zeroes grads() and lora_grads() (plug-ins zero their own gradients).
    void zero_grad() override {
        if (grads_) grads_->zero();
        lora_grads_->zero();
    }

    /// Runs the model on tokens [B*T] (row b*T + t is sequence b, position t; T <= n_ctx). With targets
    /// [B*T] returns mean cross-entropy + the MLPs' aux losses, else NaN. `training`: backward may follow
    /// (also passed to the MLPs). Activations are kept in one buffer that grows to the largest B*T seen;
    /// an inference forward keeps one block's worth.
    T forward(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn,
              bool training = true) override {
        // A frozen base's training forward runs the head and the loss in vocabulary chunks and computes
        // the loss's gradient at the final norm's output at once: no [B*T, vocab] logits are kept.
        const bool fused_head = training && !targets.empty() && mode_ == TrainMode::frozen_base;
        begin(tokens, targets, B, Tn, training, !fused_head);
        run_layers();
        const Index N = B * Tn, d = cfg_.d_model, V = cfg_.vocab;
        aux_ = T(0);
        for (const auto& m : mlps_) aux_ += m->aux_loss();
        profile::Scope scope(profile::Phase::head);
        if (fused_head) {
            const auto dlnf = mat(a_.dlnf, N, d);
            eigen(dlnf).setZero();
            ce_ = T(frozen_head_cross_entropy(w_->wte, dlnf, mat(a_.lnf, N, d), targets_.data(), T(1) / T(N)) /
                    double(N));
            return ce_ + aux_;
        }
        linear_fwd(w_->wte, mat(a_.logits, N, V), mat(a_.lnf, N, d), /*bias=*/false);
        if (targets_.empty()) return ce_ = std::numeric_limits<T>::quiet_NaN();
        ce_ = crossentropy_forward(a_.lse, mat(a_.logits, N, V), targets_.data());
        return ce_ + aux_;
    }

    double evaluate_loss(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn) override {
        require(!targets.empty(), "evaluate_loss: needs targets");
        begin(tokens, targets, B, Tn, false, false);
        run_layers();
        const Index N = B * Tn, d = cfg_.d_model;
        // The head in vocabulary chunks: never [N, vocab] logits.
        profile::Scope scope(profile::Phase::head);
        const double total = frozen_head_cross_entropy(w_->wte, MatrixView<T>(), mat(a_.lnf, N, d), targets_.data(), T(0));
        ce_ = T(total / double(N));
        aux_ = T(0);
        return total / double(N);
    }

    /// Accumulates d(loss of the last forward)/d(parameters) into grads() (full mode), lora_grads() (if
    /// LoRA is present) and the MLP plug-ins. Needs a training forward with targets just before.
    void backward() override {
        require(training_ && !targets_.empty(), "backward: the last forward must be a training forward with targets");
        const Index B = B_, Tn = T_, N = B * Tn, d = cfg_.d_model, V = cfg_.vocab, r = lora_rank();
        const bool base = mode_ == TrainMode::full;
        carve_grad_acts(reserve(grad_buf_, carve_grad_acts(nullptr)));
        const GradActs& g = g_;
        const auto dres = mat(g.dres, N, d), dln = mat(g.dln, N, d);

        // dhead: dLoss/d(final norm output); the fused head computed it in the forward.
        MatrixView<T> dhead = head_fused_ ? mat(a_.dlnf, N, d) : dln;
        if (!head_fused_) {
            profile::Scope scope(profile::Phase::head, profile::Pass::backward);
            eigen(mat(g.dlogits, N, V)).setZero();
            crossentropy_backward(mat(g.dlogits, N, V), mat(a_.logits, N, V), a_.lse, targets_.data(), T(1));
            eigen(dln).setZero();
            linear_bwd(w_->wte, dln, G("wte.weight"), nullptr, mat(g.dlogits, N, V), mat(a_.lnf, N, d));
        }
        eigen(dres).setZero();
        layernorm_backward(dres, G("ln_f.weight").data, G("ln_f.bias").data, dhead, mat(a_.res.back(), N, d),
                           a_.lnf_mean, a_.lnf_rstd, w_->lnf_w.data());
        const kernels::AttentionShape shape = attention_shape(B, Tn, Tn);

        for (Index l = cfg_.n_layer - 1; l >= 0; --l) {
            const LayerActs& a = a_.layer[static_cast<std::size_t>(l)];
            const auto& lw = w_->layers[static_cast<std::size_t>(l)];
            // dres holds dLoss/d(block output); the residual passes it straight through to the block input.
            eigen(dln).setZero();
            {
                profile::Scope scope(profile::Phase::mlp, profile::Pass::backward);
                mlps_[static_cast<std::size_t>(l)]->backward(dln, dres, mat(a.ln2, N, d));
            }
            {
                profile::Scope scope(profile::Phase::norm, profile::Pass::backward);
                layernorm_backward(dres, gl(l, "ln_2.weight"), gl(l, "ln_2.bias"), dln, mat(a.mid, N, d), a.ln2_mean,
                                   a.ln2_rstd, lw.ln2_w.data());
            }
            {
                profile::Scope scope(profile::Phase::out_proj, profile::Pass::backward);
                projection_backward(l, "attn.c_proj.", lw.c_proj, mat(g.datty, N, d), dres, mat(a.atty, N, d),
                                    a.xa_proj, mat(g.dxa, N, r), /*overwrite=*/true);
            }
            eigen(mat(g.dqkv, N, 3 * d)).setZero();
            {
                profile::Scope scope(profile::Phase::attention, profile::Pass::backward);
                const auto qkv = ConstMatrixView<T>(a.qkv, N, 3 * d);
                const auto dqkv = mat(g.dqkv, N, 3 * d);
                kernels::attention_backward(qkv_part(dqkv, 0), qkv_part(dqkv, 1), qkv_part(dqkv, 2),
                                            ConstMatrixView<T>(g.datty, N, d), qkv_part(qkv, 0), qkv_part(qkv, 1),
                                            qkv_part(qkv, 2), ConstMatrixView<T>(a.atty, N, d), a.lse, shape);
            }
            // Below block 0's attention only the embeddings remain: frozen, they need no input gradient.
            const bool need_dx = base || l > 0;
            {
                profile::Scope scope(profile::Phase::qkv, profile::Pass::backward);
                projection_backward(l, "attn.c_attn.", lw.c_attn, need_dx ? dln : MatrixView<T>(),
                                    mat(g.dqkv, N, 3 * d), mat(a.ln1, N, d), a.xa_attn, mat(g.dxa, N, r),
                                    /*overwrite=*/true);
            }
            if (need_dx) {
                profile::Scope scope(profile::Phase::norm, profile::Pass::backward);
                layernorm_backward(dres, gl(l, "ln_1.weight"), gl(l, "ln_1.bias"), dln,
                                   mat(a_.res[static_cast<std::size_t>(l)], N, d), a.ln1_mean, a.ln1_rstd,
                                   lw.ln1_w.data());
            }
        }
        if (base) encoder_backward(G("wte.weight"), G("wpe.weight"), dres, tokens_.data(), B, Tn);
    }

    /// Logits [B*T, vocab] of the last forward.
    ConstMatrixView<T> logits() const override { return {a_.logits, keep_logits_ ? B_ * T_ : 0, cfg_.vocab}; }
    /// The two parts of the last loss: mean cross-entropy and the sum of the MLPs' aux losses.
    T last_ce_loss() const override { return ce_; }
    T last_aux_loss() const override { return aux_; }

    // ---- generation ----------------------------------------------------------------------------------

    void reset_cache(Index capacity) override {
        require(capacity >= 1 && capacity <= cfg_.n_ctx, "cache capacity ", capacity, ": must be in [1, n_ctx = ",
                cfg_.n_ctx, "]");
        cache_k_.assign(static_cast<std::size_t>(cfg_.n_layer), {});
        cache_v_.assign(static_cast<std::size_t>(cfg_.n_layer), {});
        for (Index l = 0; l < cfg_.n_layer; ++l) {
            cache_k_[static_cast<std::size_t>(l)].resize(static_cast<std::size_t>(capacity * cfg_.d_model));
            cache_v_[static_cast<std::size_t>(l)].resize(static_cast<std::size_t>(capacity * cfg_.d_model));
        }
        cache_cap_ = capacity;
        cached_ = 0;
    }
    Index cached_tokens() const override { return cached_; }

    std::span<const T> decode(std::span<const int> tokens) override {
        const Index n = static_cast<Index>(tokens.size()), d = cfg_.d_model, V = cfg_.vocab,
                    p0 = cached_;
        require(cache_cap_ > 0, "decode: call reset_cache(capacity) first");
        require(n >= 1, "decode: needs at least one token");
        require(p0 + n <= cache_cap_, "decode: ", p0, " cached + ", n, " new tokens exceed the cache capacity ", cache_cap_);
        check_tokens(tokens, "tokens");
        DecodeBuffers& b = dec_;
        const auto grow = [](auto& v, Index size) {
            if (static_cast<Index>(v.size()) < size) v.resize(static_cast<std::size_t>(size));
        };
        grow(b.x, n * d);
        grow(b.ln, n * d);
        grow(b.qkv, n * 3 * d);
        grow(b.att, n * d);
        grow(b.mid, n * d);
        grow(b.xa, n * xa_cols());
        grow(b.logits, V);
        grow(b.mean, 2 * n);
        const auto x = mat(b.x.data(), n, d), ln = mat(b.ln.data(), n, d), mid = mat(b.mid.data(), n, d),
                   qkv = mat(b.qkv.data(), n, 3 * d);
        embed(x, tokens, p0);
        const kernels::AttentionShape shape = attention_shape(1, n, p0 + n);
        for (Index l = 0; l < cfg_.n_layer; ++l) {
            const auto& lw = w_->layers[static_cast<std::size_t>(l)];
            T* kc = cache_k_[static_cast<std::size_t>(l)].data();
            T* vc = cache_v_[static_cast<std::size_t>(l)].data();
            layernorm_forward(ln, b.mean.data(), b.mean.data() + n, x, lw.ln1_w.data(), lw.ln1_b.data());
            projection_forward(l, "attn.c_attn.", lw.c_attn, qkv, ln, b.xa.data());
            for (Index i = 0; i < n; ++i) {
                std::copy_n(qkv.row_ptr(i) + d, d, kc + (p0 + i) * d);
                std::copy_n(qkv.row_ptr(i) + 2 * d, d, vc + (p0 + i) * d);
            }
            kernels::attention_forward(mat(b.att.data(), n, d), static_cast<T*>(nullptr),
                                       ConstMatrixView<T>(qkv.data, n, d, 3 * d), ConstMatrixView<T>(kc, p0 + n, d),
                                       ConstMatrixView<T>(vc, p0 + n, d), shape);
            projection_forward(l, "attn.c_proj.", lw.c_proj, mid, mat(b.att.data(), n, d), b.xa.data());
            residual_forward(mid, ConstMatrixView<T>(x));
            layernorm_forward(ln, b.mean.data(), b.mean.data() + n, mid, lw.ln2_w.data(), lw.ln2_b.data());
            mlps_[static_cast<std::size_t>(l)]->forward(x, ln, false);
            residual_forward(x, ConstMatrixView<T>(mid));
        }
        cached_ = p0 + n;
        const auto last = mat(b.x.data() + (n - 1) * d, 1, d), lastn = mat(b.ln.data(), 1, d);
        layernorm_forward(lastn, b.mean.data(), b.mean.data() + 1, last, w_->lnf_w.data(), w_->lnf_b.data());
        linear_fwd(w_->wte, mat(b.logits.data(), 1, V), lastn, false);
        return {b.logits.data(), static_cast<std::size_t>(V)};
    }

    /// A frozen-base model over the same weights (for a trainable model: views into its params(), which
    /// must then stay unchanged while the new model lives; the buffer itself is kept alive).
    std::unique_ptr<CausalLm<T>> share_base() const override { return std::make_unique<Gpt2<T>>(w_); }

private:
    struct LayerActs {
        T *ln1, *ln1_mean, *ln1_rstd, *qkv, *lse, *atty, *mid, *ln2, *ln2_mean, *ln2_rstd, *xa_attn, *xa_proj;
    };
    struct Acts {
        std::vector<T*> res;  ///< residual stream: res[0] embeddings, res[l + 1] output of block l
        std::vector<LayerActs> layer;
        T *lnf, *lnf_mean, *lnf_rstd, *logits, *lse;
        T* dlnf;  ///< dLoss/d(lnf), computed by the fused head's training forward (else null)
    };
    struct GradActs {
        T *dres, *dln, *dqkv, *datty, *dxa, *dlogits;
    };
    struct DecodeBuffers {
        std::vector<T> x, ln, qkv, att, mid, xa, logits, mean;
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

    void check_layer(Index layer) const {
        require(layer >= 0 && layer < cfg_.n_layer, "layer ", layer, ": out of range [0, ", cfg_.n_layer, ")");
    }

    void begin(std::span<const int> tokens, std::span<const int> targets, Index B, Index Tn, bool training,
               bool keep_logits) {
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
        keep_logits_ = keep_logits;
        head_fused_ = training && !keep_logits;
        carve_acts(reserve(acts_buf_, carve_acts(nullptr)));
    }

    void run_layers() {
        const Index B = B_, Tn = T_, N = B * Tn, d = cfg_.d_model;
        {
            profile::Scope scope(profile::Phase::embed);
            embed_batch(mat(a_.res[0], N, d));
        }
        for (Index l = 0; l < cfg_.n_layer; ++l) {
            const LayerActs& a = a_.layer[static_cast<std::size_t>(l)];
            const auto& lw = w_->layers[static_cast<std::size_t>(l)];
            const auto x = mat(a_.res[static_cast<std::size_t>(l)], N, d);
            // In inference res[l + 1] is res[l]: x is not read after mid is formed.
            const auto y = mat(a_.res[static_cast<std::size_t>(l) + 1], N, d);
            {
                profile::Scope scope(profile::Phase::norm);
                layernorm_forward(mat(a.ln1, N, d), a.ln1_mean, a.ln1_rstd, x, lw.ln1_w.data(), lw.ln1_b.data());
            }
            {
                profile::Scope scope(profile::Phase::qkv);
                projection_forward(l, "attn.c_attn.", lw.c_attn, mat(a.qkv, N, 3 * d), mat(a.ln1, N, d), a.xa_attn);
            }
            {
                profile::Scope scope(profile::Phase::attention);
                const auto qkv = ConstMatrixView<T>(a.qkv, N, 3 * d);
                kernels::attention_forward(mat(a.atty, N, d), training_ ? a.lse : static_cast<T*>(nullptr),
                                           qkv_part(qkv, 0), qkv_part(qkv, 1), qkv_part(qkv, 2),
                                           attention_shape(B, Tn, Tn));
            }
            {
                profile::Scope scope(profile::Phase::out_proj);
                projection_forward(l, "attn.c_proj.", lw.c_proj, mat(a.mid, N, d), mat(a.atty, N, d), a.xa_proj);
            }
            {
                profile::Scope scope(profile::Phase::norm);
                residual_forward(mat(a.mid, N, d), x);
                layernorm_forward(mat(a.ln2, N, d), a.ln2_mean, a.ln2_rstd, mat(a.mid, N, d), lw.ln2_w.data(),
                                  lw.ln2_b.data());
            }
            {
                profile::Scope scope(profile::Phase::mlp);
                mlps_[static_cast<std::size_t>(l)]->forward(y, mat(a.ln2, N, d), training_);
            }
            profile::Scope scope(profile::Phase::norm);
            residual_forward(y, mat(a.mid, N, d));
        }
        profile::Scope scope(profile::Phase::norm);
        layernorm_forward(mat(a_.lnf, N, d), a_.lnf_mean, a_.lnf_rstd, mat(a_.res.back(), N, d), w_->lnf_w.data(),
                          w_->lnf_b.data());
    }

    /// out[n, d] = wte[tokens[i]] + wpe[first + i] for one sequence (bf16 rows widened exactly).
    void embed(MatrixView<T> out, std::span<const int> tokens, Index first) const {
        const Index d = cfg_.d_model;
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            T* dst = out.row_ptr(static_cast<Index>(i));
            embedding_row(dst, tokens[i]);
            const T* pos = w_->wpe.row_ptr(first + static_cast<Index>(i));
            for (Index c = 0; c < d; ++c) dst[c] += pos[c];
        }
    }
    void embedding_row(T* dst, int token) const {
        if (w_->wte.is_quantized()) {
            kernels::dequantize_row(dst, w_->wte.weight_quant.type, w_->wte.weight_quant.row_ptr(token), cfg_.d_model);
            return;
        }
        if constexpr (std::is_same_v<T, float>) {
            if (w_->wte.is_bf16()) {
                kernels::convert_to_float(dst, w_->wte.weight_bf16.row_ptr(token), cfg_.d_model);
                return;
            }
        }
        std::copy_n(w_->wte.weight.row_ptr(token), cfg_.d_model, dst);
    }
    void embed_batch(MatrixView<T> out) const {
        if (w_->wte.is_plain()) {
            encoder_forward(out, tokens_.data(), w_->wte.weight, w_->wpe, B_, T_);
            return;
        }
        for (Index b = 0; b < B_; ++b)
            embed(out.middle_rows(b * T_, T_),
                  std::span<const int>(tokens_).subspan(static_cast<std::size_t>(b * T_), static_cast<std::size_t>(T_)), 0);
    }

    Index carve_acts(T* base) {
        Carver c{base};
        const Index N = B_ * T_, d = cfg_.d_model, L = cfg_.n_layer;
        // Training keeps every block's activations; inference reuses one block's (and one residual).
        const Index blocks = training_ ? L : 1;
        a_.res.resize(static_cast<std::size_t>(L) + 1);
        if (training_) {
            for (auto& p : a_.res) p = c.take(N * d);
        } else {
            T* r0 = c.take(N * d);
            for (auto& p : a_.res) p = r0;
        }
        a_.layer.resize(static_cast<std::size_t>(L));
        for (Index l = 0; l < blocks; ++l) {
            LayerActs& a = a_.layer[static_cast<std::size_t>(l)];
            a.ln1 = c.take(N * d);
            a.ln1_mean = c.take(N);
            a.ln1_rstd = c.take(N);
            a.qkv = c.take(N * 3 * d);
            a.lse = c.take(B_ * cfg_.n_head * T_);
            a.atty = c.take(N * d);
            a.mid = c.take(N * d);
            a.ln2 = c.take(N * d);
            a.ln2_mean = c.take(N);
            a.ln2_rstd = c.take(N);
            a.xa_attn = c.take(N * xa_cols());
            a.xa_proj = c.take(N * xa_cols());
        }
        for (Index l = blocks; l < L; ++l) a_.layer[static_cast<std::size_t>(l)] = a_.layer[0];
        a_.lnf = c.take(N * d);
        a_.lnf_mean = c.take(N);
        a_.lnf_rstd = c.take(N);
        a_.logits = keep_logits_ ? c.take(N * cfg_.vocab) : nullptr;
        a_.lse = c.take(N);
        a_.dlnf = head_fused_ ? c.take(N * d) : nullptr;
        return c.used;
    }
    Index carve_grad_acts(T* base) {
        Carver c{base};
        const Index N = B_ * T_, d = cfg_.d_model;
        g_ = {c.take(N * d), c.take(N * d), c.take(N * 3 * d), c.take(N * d), c.take(N * lora_rank()),
              c.take(head_fused_ ? 0 : N * cfg_.vocab)};
        return c.used;
    }
    static T* reserve(comigs::detail::aligned_vector<T>& buf, Index n) {
        if (static_cast<Index>(buf.size()) < n) buf.resize(static_cast<std::size_t>(n));
        return buf.data();
    }
    static MatrixView<T> mat(T* p, Index rows, Index cols) { return {p, rows, cols}; }
    /// Part i (0 q, 1 k, 2 v) of a packed [N, 3d] qkv matrix, as a strided view.
    template <class U>
    MatrixView<U> qkv_part(MatrixView<U> qkv, int i) const {
        return {qkv.data + i * cfg_.d_model, qkv.rows, cfg_.d_model, qkv.stride};
    }
    kernels::AttentionShape attention_shape(Index B, Index n, Index L) const {
        return {B, n, L, cfg_.n_head, cfg_.n_head, cfg_.head_size()};
    }

    void check_tokens(std::span<const int> t, const char* what) const {
        for (std::size_t i = 0; i < t.size(); ++i)
            require(t[i] >= 0 && t[i] < cfg_.vocab, what, "[", i, "] = ", t[i], ": outside [0, vocab = ", cfg_.vocab,
                    ")");
    }
    Index lora_rank() const { return has_lora_ ? lora_cfg_.rank : 0; }

    /// Gradient view of a base tensor, or an empty view (skip the work) when the base is frozen.
    MatrixView<T> G(std::string_view name) {
        return mode_ == TrainMode::full ? grads_->view(name) : MatrixView<T>();
    }
    T* gl(Index l, std::string_view tail) { return G(layer_name(l, tail)).data; }

    /// y = x W^T (+ b): an fp32/fp64 weight through linear_forward (the trainable model's numbers), a
    /// bf16 or quantized one through its FrozenLinear.
    static void linear_fwd(const FrozenLinear<T>& W, MatrixView<T> y, ConstMatrixView<T> x, bool bias = true) {
        if (!W.is_plain()) {
            FrozenLinear<T> w = W;
            if (!bias) w.bias = {};
            w.forward(y, x);
        } else {
            linear_forward(y, x, W.weight, bias && !W.bias.empty() ? W.bias.data() : static_cast<const T*>(nullptr));
        }
    }
    /// dx += dy W (dx may be empty); in full mode also dW += dy^T x, db += sum dy.
    static void linear_bwd(const FrozenLinear<T>& W, MatrixView<T> dx, MatrixView<T> dW, T* db, ConstMatrixView<T> dy,
                           ConstMatrixView<T> x) {
        if (!W.is_plain()) {
            if (dx.data) W.backward_input(dx, dy, true);
        } else {
            linear_backward(dx, dW, db, dy, x, W.weight);
        }
    }

    /// Columns a projection's saved LoRA input takes per row: xa = x A^T (r) and a column of ones (the
    /// fused path's bias term).
    Index xa_cols() const { return has_lora_ ? lora_cfg_.rank + 1 : 1; }
    /// Whether projections take the fused path: a frozen base with LoRA. (A trainable model keeps the
    /// layers.hpp products its pretraining results were computed with.)
    bool fused_projections() const { return has_lora_ && mode_ == TrainMode::frozen_base; }

    // y = x W^T + b (+ s (x A^T) B^T with LoRA); `name` is "attn.c_attn." or "attn.c_proj.". xa [N,
    // xa_cols()] receives x A^T (and the fused path's ones).
    //
    // Fused path (frozen base with LoRA), two parallel regions instead of a GEMM, a bias pass and two
    // serial LoRA products:
    //   xa = x A^T                                  (small product, chunks of rows; xa[:, r] = 1)
    //   y  = x W^T + [xa | 1] [s B | b]^T           (the base GEMM, then the rank-(r+1) update on
    //                                                each thread's rows, while they are in cache)
    void projection_forward(Index l, const std::string& name, const FrozenLinear<T>& W, MatrixView<T> y,
                            ConstMatrixView<T> x, T* xa) {
        if (!fused_projections()) {
            linear_fwd(W, y, x);
            if (has_lora_) {
                const std::string pre = layer_name(l, name);
                lora_forward(y, MatrixView<T>(xa, x.rows, lora_cfg_.rank, xa_cols()), x,
                             std::as_const(*lora_).view(pre + "lora_A"), std::as_const(*lora_).view(pre + "lora_B"),
                             T(lora_cfg_.scale()));
            }
            return;
        }
        using Prod = kernels::GemmProduct<T>;
        const std::string pre = layer_name(l, name);
        const auto A = std::as_const(*lora_).view(pre + "lora_A"), Bl = std::as_const(*lora_).view(pre + "lora_B");
        const Index N = x.rows, r = lora_cfg_.rank, out = y.cols, kc = r + (W.bias.empty() ? 0 : 1);
        const T s = T(lora_cfg_.scale());
        if (static_cast<Index>(proj_bb_.size()) < out * kc) proj_bb_.resize(static_cast<std::size_t>(out * kc));
        const MatrixView<T> Bb(proj_bb_.data(), out, kc);  // [s B | b]
        for (Index o = 0; o < out; ++o) {
            for (Index q = 0; q < r; ++q) Bb(o, q) = s * Bl(o, q);
            if (kc > r) Bb(o, r) = W.bias[static_cast<std::size_t>(o)];
        }
        const Index xc = xa_cols(), in = x.cols;
        const Prod update{y, ConstMatrixView<T>(xa, N, kc, xc), kernels::Op::none, ConstMatrixView<T>(Bb),
                          kernels::Op::trans, T(1), T(1)};
        const Prod lora_in{MatrixView<T>(xa, N, r, xc), x, kernels::Op::none, A, kernels::Op::trans};
        FrozenLinear<T> w = W;
        w.bias = {};
        if constexpr (std::is_same_v<T, float>) {
            if (w.takes_bf16_activations()) {  // x rounded to bf16 beside the small product
                kernels::bf16* xb = bf16_scratch(N * in);
                kernels::gemm_chunked_and<T>({lora_in}, N, N * in, [&](Index i) {
                    xa[i * xc + r] = T(1);
                    kernels::convert_to_bf16(xb + i * in, x.row_ptr(i), in);
                });
                w.forward(y, ConstMatrixView<kernels::bf16>(xb, N, in));
                kernels::gemm_chunked<T>({update});
                return;
            }
        }
        kernels::gemm_chunked_and<T>({lora_in}, N, N, [&](Index i) { xa[i * xc + r] = T(1); });
        if (w.is_plain()) {
            kernels::gemm_with<T>(Prod{y, x, kernels::Op::none, w.weight, kernels::Op::trans}, {update}, {}, 0, 0,
                                  [](Index) {});
        } else {
            w.forward(y, x);
            kernels::gemm_chunked<T>({update});
        }
    }
    // dx (+)= dL/dx of projection_forward (dx may be empty: no input gradient), and the LoRA gradients;
    // `overwrite`: dx is written, not accumulated into. dxa [N, r] is scratch. Fused path (frozen base
    // with LoRA):
    //   dB += s dy^T xa,  dxa = s dy B              (one region of small products)
    //   dx (+)= dy W + dxa A,  dA += dxa^T x        (the base GEMM, then the rank-r update on each
    //                                                thread's rows; dA on the threads done first)
    void projection_backward(Index l, const std::string& name, const FrozenLinear<T>& W, MatrixView<T> dx,
                             ConstMatrixView<T> dy, ConstMatrixView<T> x, const T* xa, MatrixView<T> dxa,
                             bool overwrite) {
        const std::string pre = layer_name(l, name);
        const Index r = lora_rank();
        const ConstMatrixView<T> xav(xa, x.rows, r, xa_cols());
        if (!fused_projections()) {
            if (overwrite && dx.data) eigen(dx).setZero();
            linear_bwd(W, dx, G(pre + "weight"), G(pre + "bias").data, dy, x);
            if (has_lora_)
                lora_backward(dx, lora_grads_->view(pre + "lora_A"), lora_grads_->view(pre + "lora_B"), dxa, dy, x,
                              xav, std::as_const(*lora_).view(pre + "lora_A"),
                              std::as_const(*lora_).view(pre + "lora_B"), T(lora_cfg_.scale()));
            return;
        }
        using Prod = kernels::GemmProduct<T>;
        const auto A = std::as_const(*lora_).view(pre + "lora_A"), Bl = std::as_const(*lora_).view(pre + "lora_B");
        const auto dA = lora_grads_->view(pre + "lora_A"), dB = lora_grads_->view(pre + "lora_B");
        const T s = T(lora_cfg_.scale());
        const Prod grad_b{dB, dy, kernels::Op::trans, xav, kernels::Op::none, s, T(1)},
            lora_dy{dxa, dy, kernels::Op::none, Bl, kernels::Op::none, s, T(0)};
        const Prod grad_a{dA, ConstMatrixView<T>(dxa), kernels::Op::trans, x, kernels::Op::none, T(1), T(1)};
        const Prod update{dx, ConstMatrixView<T>(dxa), kernels::Op::none, A, kernels::Op::none, T(1), T(1)};
        if constexpr (std::is_same_v<T, float>) {
            if (dx.data && W.takes_bf16_activations()) {  // dy rounded to bf16 beside the small products
                const Index N = dy.rows, out = dy.cols;
                kernels::bf16* dyb = bf16_scratch(N * out);
                kernels::gemm_chunked_and<T>({grad_b, lora_dy}, N, N * out, [&](Index i) {
                    kernels::convert_to_bf16(dyb + i * out, dy.row_ptr(i), out);
                });
                W.backward_input(dx, ConstMatrixView<kernels::bf16>(dyb, N, out), !overwrite);
                kernels::gemm_chunked<T>({update, grad_a});
                return;
            }
        }
        kernels::gemm_chunked<T>({grad_b, lora_dy});
        if (!dx.data) {
            kernels::gemm_chunked<T>({grad_a});
            return;
        }
        if (W.is_plain()) {
            kernels::gemm_with<T>(Prod{dx, dy, kernels::Op::none, W.weight, kernels::Op::none, T(1),
                                       overwrite ? T(0) : T(1)},
                                  {update}, {grad_a}, 0, 0, [](Index) {});
        } else {
            W.backward_input(dx, dy, !overwrite);
            kernels::gemm_chunked<T>({update, grad_a});
        }
    }

    Gpt2Config cfg_;
    std::shared_ptr<ParamBuffer<T>> params_;        // trainable models only
    std::unique_ptr<ParamBuffer<T>> grads_;         // trainable models only
    std::shared_ptr<const Gpt2Weights<T>> w_;      // what forward and backward read
    std::unique_ptr<ParamBuffer<T>> lora_, lora_grads_;
    AttentionLoraConfig lora_cfg_;
    bool has_lora_ = false;
    std::vector<std::unique_ptr<MlpBlock<T>>> mlps_;
    TrainMode mode_ = TrainMode::full;

    std::vector<int> tokens_, targets_;
    Index B_ = 0, T_ = 0;
    bool training_ = false, keep_logits_ = true;
    bool head_fused_ = false;  ///< the last forward ran the fused head (frozen base, training, targets)
    T ce_ = 0, aux_ = 0;
    comigs::detail::aligned_vector<T> acts_buf_, grad_buf_;
    comigs::detail::aligned_vector<T> proj_bb_;  // [s B | b] of the projection being run (fused path)
    comigs::detail::aligned_vector<kernels::bf16> proj_bf16_;  // its input or output gradient in bf16
    kernels::bf16* bf16_scratch(Index n) {
        if (static_cast<Index>(proj_bf16_.size()) < n) proj_bf16_.resize(static_cast<std::size_t>(n));
        return proj_bf16_.data();
    }
    Acts a_;
    GradActs g_{};

    std::vector<comigs::detail::aligned_vector<T>> cache_k_, cache_v_;
    Index cache_cap_ = 0, cached_ = 0;
    DecodeBuffers dec_;
};

}  // namespace comigs::models
