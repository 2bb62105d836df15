#pragma once
// Real-shaped hosts with random frozen weights (GPT-2-124M, SmolLM2-135M, Llama-3.2-1B) held in fp32,
// bf16, Q8_0 or Q4_0, and the CoMiGS adapters a fine-tuning step trains on them: shared by
// comigs-model-memory (model_memory.cpp) and the whole-model cases of bench_quant.cpp and bench_model.cpp.
#include <algorithm>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <comigs/mixture.hpp>
#include <comigs/models.hpp>
#include <comigs/models/mixture_mlp.hpp>
#include <comigs/optim.hpp>
#include <comigs/random.hpp>

namespace comigs::bench {

namespace cm = comigs::models;

/// The step of the memory table and the step benchmark: 8 x 128 tokens; attention LoRA rank 8; on
/// every MLP a mixture of 2 experts (1G1S), top-2, rank 8.
struct ModelStepShape {
    static constexpr Index B = 8, T = 128, rank = 8, experts = 2, top_k = 2;
};

enum class RandomHost { gpt2_124m, smollm2_135m, llama32_1b };

inline cm::Gpt2Config gpt2_124m_config() {
    cm::Gpt2Config c;
    c.vocab = 50257;
    c.n_ctx = 1024;
    c.d_model = 768;
    c.n_head = 12;
    c.n_layer = 12;
    return c;
}
inline cm::LlamaConfig smollm2_135m_config() {
    cm::LlamaConfig c;
    c.vocab = 49152;
    c.d_model = 576;
    c.n_layer = 30;
    c.n_head = 9;
    c.n_kv_head = 3;
    c.mlp_hidden = 1536;
    c.max_positions = 2048;
    c.rms_eps = 1e-5;
    c.rope_theta = 100000;
    c.tie_word_embeddings = true;
    return c;
}
inline cm::LlamaConfig llama32_1b_config() {
    cm::LlamaConfig c;
    c.vocab = 128256;
    c.d_model = 2048;
    c.n_layer = 16;
    c.n_head = 32;
    c.n_kv_head = 8;
    c.mlp_hidden = 8192;
    c.max_positions = 131072;
    c.rms_eps = 1e-5;
    c.rope_theta = 500000;
    c.tie_word_embeddings = true;
    return c;
}

/// The Llama-family shape of a host (SmolLM2-135M or Llama-3.2-1B).
inline cm::LlamaConfig random_llama_config(RandomHost host) {
    return host == RandomHost::smollm2_135m ? smollm2_135m_config() : llama32_1b_config();
}

/// Random tensors under Hugging Face names: matrices U(-0.05, 0.05) stored as `type` (Q8_0 / Q4_0
/// quantized as ggml does: what a GGUF file maps), vectors (norms 1, biases 0) in F32.
struct RandomSource {
    std::shared_ptr<cm::MemorySource> src = std::make_shared<cm::MemorySource>("random weights");
    cm::ElementType type = cm::ElementType::f32;
    Rng rng{25};
    void matrix(const std::string& name, Index rows, Index cols) {
        std::vector<float> v(static_cast<std::size_t>(rows * cols));
        for (float& x : v) x = static_cast<float>(rng.uniform() * 0.1 - 0.05);
        src->add(name, {rows, cols}, std::span<const float>(v), type);
    }
    void fill(const std::string& name, Index n, float value) {
        std::vector<float> v(static_cast<std::size_t>(n), value);
        src->add(name, {n}, std::span<const float>(v), cm::ElementType::f32);
    }
};

/// Every tensor of a host under Hugging Face names, random, matrices stored as `type`. `free_released`:
/// the bytes a host copies at load (GPT-2's Conv1D matrices, transposed or quantized) are freed, as a
/// mapped file drops their pages (TensorSource::release).
inline std::shared_ptr<cm::MemorySource> random_source(RandomHost host, cm::ElementType type,
                                                       bool free_released = false) {
    RandomSource r;
    r.src = std::make_shared<cm::MemorySource>("random weights", free_released);
    r.type = type;
    if (host == RandomHost::gpt2_124m) {
        const auto c = gpt2_124m_config();
        const Index d = c.d_model, h = c.hidden();
        r.matrix("wte.weight", c.vocab, d);
        r.matrix("wpe.weight", c.n_ctx, d);
        r.fill("ln_f.weight", d, 1);
        r.fill("ln_f.bias", d, 0);
        for (Index l = 0; l < c.n_layer; ++l) {
            const auto n = [l](const std::string& t) { return cm::layer_name(l, t); };
            for (const std::string ln : {"ln_1", "ln_2"}) {
                r.fill(n(ln + ".weight"), d, 1);
                r.fill(n(ln + ".bias"), d, 0);
            }
            r.matrix(n("attn.c_attn.weight"), d, 3 * d);  // Conv1D: [in, out]
            r.fill(n("attn.c_attn.bias"), 3 * d, 0);
            r.matrix(n("attn.c_proj.weight"), d, d);
            r.fill(n("attn.c_proj.bias"), d, 0);
            r.matrix(n("mlp.c_fc.weight"), d, h);
            r.fill(n("mlp.c_fc.bias"), h, 0);
            r.matrix(n("mlp.c_proj.weight"), h, d);
            r.fill(n("mlp.c_proj.bias"), d, 0);
        }
        return r.src;
    }
    const cm::LlamaConfig c = random_llama_config(host);
    const Index d = c.d_model, qw = c.n_head * c.hd(), kvw = c.kv_heads() * c.hd(), h = c.mlp_hidden;
    r.matrix("model.embed_tokens.weight", c.vocab, d);
    r.fill("model.norm.weight", d, 1);
    for (Index l = 0; l < c.n_layer; ++l) {
        const auto n = [l](const char* t) { return cm::llama_layer_name(l, t); };
        r.fill(n("input_layernorm.weight"), d, 1);
        r.fill(n("post_attention_layernorm.weight"), d, 1);
        r.matrix(n("self_attn.q_proj.weight"), qw, d);
        r.matrix(n("self_attn.k_proj.weight"), kvw, d);
        r.matrix(n("self_attn.v_proj.weight"), kvw, d);
        r.matrix(n("self_attn.o_proj.weight"), d, qw);
        r.matrix(n("mlp.gate_proj.weight"), h, d);
        r.matrix(n("mlp.up_proj.weight"), h, d);
        r.matrix(n("mlp.down_proj.weight"), d, h);
    }
    return r.src;
}

/// A frozen host of random weights held in `type`, with the default (fast) products: bf16 matrices
/// multiply bf16-rounded activations, quantized ones bf16 panels (training) or int8 activations (Q4_0
/// decode) where the CPU has them (FrozenLinear::fp32_compute off). The Llama hosts get their matrices
/// already in blocks (what a GGUF file maps); GPT-2 gets an F32 file's tensors and quantizes them at load
/// (WeightOptions::quantize: its Conv1D matrices are [in, out] there, quantized transposed), and the
/// source frees what the host copied (a mapped file's released pages).
inline std::unique_ptr<cm::CausalLm<float>> random_host(RandomHost host, cm::ElementType type) {
    cm::WeightOptions options{.keep_bf16 = true, .fp32_compute = false};
    if (host == RandomHost::gpt2_124m) {
        if (cm::is_quantized(type)) options.quantize = cm::quant_type_of(type);
        return cm::load_gpt2<float>(random_source(host, cm::is_quantized(type) ? cm::ElementType::f32 : type, true),
                                    gpt2_124m_config(), options);
    }
    return std::make_unique<cm::Llama<float>>(
        cm::load_llama_weights<float>(random_source(host, type), random_llama_config(host), options));
}

/// Sets every LoRA B (zero after init) to small random values, so that no work is skipped for zeros.
inline void randomize_lora_b(ParamBuffer<float>& p, Rng& rng) {
    for (const auto& s : p.layout().tensors())
        if (s.name.find("lora_B") != std::string::npos)
            for (float& v : p.span(s.name)) v = static_cast<float>(rng.normal() * 0.01);
}

/// The CoMiGS adapters on a host (ModelStepShape): attention LoRA, a mixture on every MLP (non-zero B,
/// so no work is skipped for zeros; `experts` = 1, top-1: plain LoRA on the MLP), AdamW over all of
/// them, random tokens (at least a batch; more for a decode prompt) and targets for a batch.
struct ModelAdapters {
    using S = ModelStepShape;
    std::vector<std::shared_ptr<MixtureOfLoraMlp<float>>> mixtures;
    std::unique_ptr<AdamW<float>> opt;
    std::vector<int> tokens, targets;

    explicit ModelAdapters(cm::CausalLm<float>& model, Index experts = S::experts, Index top_k = S::top_k,
                           Index n_tokens = S::B * S::T) {
        Rng rng(26);
        model.add_attention_lora({S::rank, 16.0, LoraScaling::sqrt}, rng);
        randomize_lora_b(model.lora(), rng);
        std::vector<ParamBinding<float>> bindings{bind("attention", model.lora(), model.lora_grads())};
        for (Index l = 0; l < model.n_layer(); ++l) {
            MixtureConfig mc;
            mc.form = model.mlp_form();
            mc.d_model = model.d_model();
            mc.d_hidden = model.mlp_hidden();
            mc.n_experts = experts;
            mc.top_k = top_k;
            mc.rank = S::rank;
            auto mix = std::make_shared<MixtureOfLoraMlp<float>>(mc, model.frozen_mlp(l));
            mix->init(rng);
            randomize_lora_b(mix->params(), rng);
            model.set_mlp(l, std::make_unique<cm::MixtureMlp<float>>(mix, 0.01 / double(model.n_layer())));
            bindings.push_back(bind("mlp" + std::to_string(l), mix->params(), mix->grads()));
            mixtures.push_back(std::move(mix));
        }
        opt = std::make_unique<AdamW<float>>(std::vector<AdamWGroup<float>>{
            {.name = "adapters",
             .bindings = std::move(bindings),
             .lr = LrSchedule::constant(1e-4),
             .options = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.01}}});
        tokens.resize(static_cast<std::size_t>(std::max(S::B * S::T, n_tokens)));
        targets.resize(static_cast<std::size_t>(S::B * S::T));
        const auto V = static_cast<std::uint64_t>(model.vocab());
        for (int& t : tokens) t = static_cast<int>(rng.below(V));
        for (int& t : targets) t = static_cast<int>(rng.below(V));
    }
    /// The first batch of the tokens.
    std::span<const int> batch() const { return {tokens.data(), static_cast<std::size_t>(S::B * S::T)}; }
    /// One fine-tuning step: forward with the loss, backward, AdamW.
    void step(cm::CausalLm<float>& model) {
        model.zero_grad();
        for (auto& m : mixtures) m->zero_grad();
        model.forward(batch(), targets, S::B, S::T, true);
        model.backward();
        opt->step();
    }

};

}  // namespace comigs::bench
