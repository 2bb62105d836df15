#pragma once
// Tiny random models for the host tests: a MemorySource holding every tensor a config implies, under
// Hugging Face names, with values drawn from a seeded generator (norm weights around 1, everything else
// small), so that logits are far from uniform and gradients far from zero.
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <fstream>

#include <nlohmann/json.hpp>

#include <comigs/io/safetensors.hpp>
#include <comigs/mixture.hpp>
#include <comigs/models.hpp>
#include <comigs/random.hpp>

namespace comigs::test {

inline std::vector<double> random_values(Index n, Rng& rng, double mean, double sd) {
    std::vector<double> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = mean + rng.normal(0.0, sd);
    return v;
}

/// Every tensor of a Llama-family config, as `type` (norm weights N(1, 0.1), the rest N(0, sd)).
inline std::shared_ptr<models::MemorySource> llama_source(const models::LlamaConfig& c, Rng& rng,
                                                          models::ElementType type = models::ElementType::f64,
                                                          double sd = 0.2) {
    using models::llama_layer_name;
    auto src = std::make_shared<models::MemorySource>("tiny llama");
    const Index d = c.d_model, H = c.n_head, KV = c.kv_heads(), hd = c.hd(), h = c.mlp_hidden, V = c.vocab;
    const auto add = [&](const std::string& name, std::vector<Index> shape, double mean, double s) {
        Index n = 1;
        for (Index x : shape) n *= x;
        const auto v = random_values(n, rng, mean, s);
        src->add(name, std::move(shape), std::span<const double>(v), type);
    };
    add("model.embed_tokens.weight", {V, d}, 0, 1.0);
    if (!c.tie_word_embeddings) add("lm_head.weight", {V, d}, 0, sd);
    add("model.norm.weight", {d}, 1, 0.1);
    for (Index l = 0; l < c.n_layer; ++l) {
        const auto n = [l](const std::string& t) { return llama_layer_name(l, t); };
        add(n("input_layernorm.weight"), {d}, 1, 0.1);
        add(n("post_attention_layernorm.weight"), {d}, 1, 0.1);
        add(n("self_attn.q_proj.weight"), {H * hd, d}, 0, sd);
        add(n("self_attn.k_proj.weight"), {KV * hd, d}, 0, sd);
        add(n("self_attn.v_proj.weight"), {KV * hd, d}, 0, sd);
        add(n("self_attn.o_proj.weight"), {d, H * hd}, 0, sd);
        if (c.has_qkv_bias()) {
            add(n("self_attn.q_proj.bias"), {H * hd}, 0, sd);
            add(n("self_attn.k_proj.bias"), {KV * hd}, 0, sd);
            add(n("self_attn.v_proj.bias"), {KV * hd}, 0, sd);
        }
        if (c.attention_bias) add(n("self_attn.o_proj.bias"), {d}, 0, sd);
        add(n("mlp.gate_proj.weight"), {h, d}, 0, sd);
        add(n("mlp.up_proj.weight"), {h, d}, 0, sd);
        add(n("mlp.down_proj.weight"), {d, h}, 0, sd);
    }
    return src;
}

/// A small Llama config exercising GQA, head_dim != d / heads and llama3 RoPE scaling.
inline models::LlamaConfig tiny_llama_config(bool qwen = false) {
    models::LlamaConfig c;
    c.model_type = qwen ? "qwen2" : "llama";
    c.qkv_bias = qwen;
    c.vocab = 23;
    c.d_model = 12;
    c.n_layer = 2;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.head_dim = 6;  // 4 x 6 = 24 != 12
    c.mlp_hidden = 20;
    c.max_positions = 64;
    c.rms_eps = 1e-5;
    c.rope_theta = 500;
    if (!qwen) c.rope_scaling = models::Llama3RopeScaling{4.0, 1.0, 2.0, 64.0};  // one wavelength kept, one blended, one divided
    c.tie_word_embeddings = qwen;
    return c;
}

/// Attention LoRA (B random, so it matters) and a mixture of LoRA experts on every MLP (all factors and
/// the router random) on any host: the CoMiGS model the generation and demo tests run.
template <class T>
std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>> add_random_adapters(models::CausalLm<T>& m, Rng& rng,
                                                                    Index experts = 2, Index top_k = 2,
                                                                    double sd = 0.1) {
    m.add_attention_lora({2, 4.0, LoraScaling::sqrt}, rng);
    for (T& v : m.lora().all()) v = T(rng.normal(0.0, sd));
    std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>> mixtures;
    for (Index l = 0; l < m.n_layer(); ++l) {
        MixtureConfig mc;
        mc.form = m.mlp_form();
        mc.d_model = m.d_model();
        mc.d_hidden = m.mlp_hidden();
        mc.n_experts = experts;
        mc.top_k = top_k;
        mc.rank = 2;
        auto mix = std::make_shared<MixtureOfLoraMlp<T>>(mc, m.frozen_mlp(l));
        mix->init(rng);
        for (T& v : mix->params().all()) v = T(rng.normal(0.0, 3 * sd));
        m.set_mlp(l, std::make_unique<models::MixtureMlp<T>>(mix, 0.01 / double(m.n_layer())));
        mixtures.push_back(mix);
    }
    return mixtures;
}

inline std::filesystem::path golden_model(const std::string& name) {
    return std::filesystem::path(COMIGS_GOLDEN_DIR) / "models" / name / "model";
}

/// Writes a Hugging Face folder (config.json + model.safetensors, F32) of a Llama-family config with the
/// random tensors of llama_source: a real-model host for tests of the programs and the demo.
inline void write_llama_folder(const std::filesystem::path& dir, const models::LlamaConfig& c, Rng& rng) {
    std::filesystem::create_directories(dir);
    const auto src = llama_source(c, rng, models::ElementType::f32);
    io::SafetensorsFile f;
    f.metadata()["format"] = "pt";
    for (const auto& name : src->names()) {
        const auto& t = src->at(name);
        f.add_raw(name, io::Dtype::F32, t.shape, std::vector<std::byte>(t.bytes.begin(), t.bytes.end()));
    }
    f.save(dir / "model.safetensors");
    nlohmann::json j = {{"architectures", {c.model_type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
                        {"model_type", c.model_type},
                        {"vocab_size", c.vocab},
                        {"hidden_size", c.d_model},
                        {"num_hidden_layers", c.n_layer},
                        {"num_attention_heads", c.n_head},
                        {"num_key_value_heads", c.kv_heads()},
                        {"intermediate_size", c.mlp_hidden},
                        {"max_position_embeddings", c.max_positions},
                        {"rms_norm_eps", c.rms_eps},
                        {"rope_theta", c.rope_theta},
                        {"tie_word_embeddings", c.tie_word_embeddings},
                        {"hidden_act", "silu"}};
    if (c.head_dim > 0) j["head_dim"] = c.head_dim;
    std::ofstream(dir / "config.json") << j.dump(2);
}

}  // namespace comigs::test
