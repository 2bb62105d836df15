#pragma once
// One user's adapters on a host model in one safetensors file, with PEFT-style keys that other tools
// can read: attention LoRA as PEFT names it, the MLP mixtures as MixLoRA does.
//
//   base_model.model.<attention module>.lora_A.weight           [r, in]   e.g. model.layers.0.self_attn.q_proj
//   base_model.model.<attention module>.lora_B.weight           [out, r]
//   base_model.model.<mlp module>.moe_gate.weight               [E, d]    the router (top-k routing, E > 1)
//   base_model.model.<mlp linear>.experts.<e>.lora_A.weight     [r, in]   e.g. model.layers.0.mlp.up_proj.experts.1
//   base_model.model.<mlp linear>.experts.<e>.lora_B.weight     [out, r]
//
// Metadata: "format" = "pt"; "comigs.adapter_format" = "1"; "comigs.architecture" (gpt2, llama, qwen2);
// "comigs.attention" = {"rank", "alpha", "scaling"} (JSON; absent without attention LoRA);
// "comigs.mixture" = {"experts", "top_k", "routing", "expert0_importance", "rank", "alpha", "scaling",
// "roles"} (JSON; absent when the MLPs are the frozen ones); plus whatever the caller adds. The scaling
// convention is explicit ("sqrt": alpha / sqrt(r), "linear": alpha / r), so no reader has to guess it.
// A single expert can also be written as a plain PEFT adapter folder (io/peft.hpp, save_peft_expert).
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <comigs/error.hpp>
#include <comigs/io/safetensors.hpp>
#include <comigs/mixture.hpp>

#include "causal_lm.hpp"
#include "mixture_mlp.hpp"

namespace comigs::models {

namespace detail {
inline std::string peft_key(const std::string& module, const char* tail) { return "base_model.model." + module + "." + tail; }
/// "model.layers.3.mlp" from "model.layers.3.mlp.gate_proj".
inline std::string parent_module(const std::string& module) { return module.substr(0, module.rfind('.')); }
inline LoraScaling scaling_from(const std::string& s, const std::string& where) {
    if (s == "sqrt") return LoraScaling::sqrt;
    if (s == "linear") return LoraScaling::linear;
    comigs::detail::raise<FormatError>(where, ": scaling '", s, "' is neither sqrt nor linear");
}
}  // namespace detail

/// Writes the model's attention LoRA (if any) and `mixtures` (one per block, or empty: no mixtures) to
/// `path` atomically. `extra` metadata keys must not start with "comigs.adapter", "comigs.attention",
/// "comigs.mixture" or "comigs.architecture".
template <class T>
void save_adapters(const std::filesystem::path& path, CausalLm<T>& model,
                   const std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>>& mixtures,
                   const io::SafetensorsMetadata& extra = {}) {
    require(mixtures.empty() || static_cast<Index>(mixtures.size()) == model.n_layer(), "save_adapters: ",
            mixtures.size(), " mixtures for ", model.n_layer(), " blocks");
    require(model.has_lora() || !mixtures.empty(), "save_adapters: the model has no adapters");
    io::SafetensorsFile f;
    for (const auto& [k, v] : extra) {
        for (const char* reserved : {"comigs.adapter", "comigs.attention", "comigs.mixture", "comigs.architecture"})
            require(!k.starts_with(reserved), "adapter metadata key '", k, "' is reserved");
        f.metadata()[k] = v;
    }
    f.metadata()["format"] = "pt";
    f.metadata()["comigs.adapter_format"] = "1";
    f.metadata()["comigs.architecture"] = model.architecture();
    if (model.has_lora()) {
        const auto& lc = model.lora_config();
        f.metadata()["comigs.attention"] =
            nlohmann::json{{"rank", lc.rank}, {"alpha", lc.alpha}, {"scaling", to_string(lc.scaling)}}.dump();
        const auto& lora = std::as_const(model.lora());
        for (const auto& p : model.attention_projections()) {
            f.add(detail::peft_key(p.module, "lora_A.weight"), lora.view(p.prefix + "lora_A"), io::Dtype::F32);
            f.add(detail::peft_key(p.module, "lora_B.weight"), lora.view(p.prefix + "lora_B"), io::Dtype::F32);
        }
    }
    if (!mixtures.empty()) {
        const MixtureConfig& mc = mixtures.front()->config();
        nlohmann::json roles = nlohmann::json::array();
        for (Index e = 0; e < mc.n_experts; ++e) roles.push_back(to_string(mc.role(e)));
        f.metadata()["comigs.mixture"] = nlohmann::json{{"experts", mc.n_experts},
                                                        {"top_k", mc.top_k},
                                                        {"routing", to_string(mc.routing)},
                                                        {"expert0_importance", mc.expert0_importance},
                                                        {"rank", mc.rank},
                                                        {"alpha", mc.alpha},
                                                        {"scaling", to_string(mc.scaling)},
                                                        {"roles", roles}}
                                             .dump();
        for (Index l = 0; l < model.n_layer(); ++l) {
            const auto& mix = *mixtures[static_cast<std::size_t>(l)];
            require(mix.config().n_experts == mc.n_experts && mix.config().rank == mc.rank,
                    "save_adapters: block ", l, "'s mixture differs from block 0's");
            const auto& params = std::as_const(mix).params();
            const std::string mlp = detail::parent_module(model.mlp_module(l, mix.linears().front()));
            if (params.contains("router.weight"))
                f.add(detail::peft_key(mlp, "moe_gate.weight"), params.view("router.weight"), io::Dtype::F32);
            for (Index e = 0; e < mc.n_experts; ++e)
                for (const auto& lin : mix.linears()) {
                    const std::string module = model.mlp_module(l, lin) + ".experts." + std::to_string(e);
                    f.add(detail::peft_key(module, "lora_A.weight"),
                          params.view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'A')), io::Dtype::F32);
                    f.add(detail::peft_key(module, "lora_B.weight"),
                          params.view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'B')), io::Dtype::F32);
                }
        }
    }
    f.save(path);
}

/// Loads an adapter file written by save_adapters into `model`: attention LoRA into model.lora(), and a
/// MixtureOfLoraMlp over each block's frozen MLP installed as that block's MLP (load-balancing weight
/// `lb_weight`, 0.01 / n_layer when negative). Returns the mixtures (empty when the file has none).
/// Errors name the file: another architecture, a missing or extra tensor, a shape that differs.
template <class T>
std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>> load_adapters(const std::filesystem::path& path, CausalLm<T>& model,
                                                                double lb_weight = -1) {
    const std::string where = "adapter file '" + path.string() + "'";
    const io::SafetensorsFile f = io::SafetensorsFile::load(path);
    const auto meta = [&](const char* key) -> const std::string* {
        const auto it = f.metadata().find(key);
        return it == f.metadata().end() ? nullptr : &it->second;
    };
    require<FormatError>(meta("comigs.adapter_format") && *meta("comigs.adapter_format") == "1", where,
                         ": no \"comigs.adapter_format\": \"1\" metadata (not written by comigs' save_adapters)");
    require<FormatError>(meta("comigs.architecture") && *meta("comigs.architecture") == model.architecture(), where,
                         ": adapters of a '", meta("comigs.architecture") ? *meta("comigs.architecture") : "?",
                         "' model, this model is '", model.architecture(), "'");
    const auto json_of = [&](const std::string& text, const char* key) {
        try {
            auto j = nlohmann::json::parse(text);
            require<FormatError>(j.is_object(), where, ": \"", key, "\" is not a JSON object");
            return j;
        } catch (const nlohmann::json::exception& e) {
            comigs::detail::raise<FormatError>(where, ": \"", key, "\" is not valid JSON (", e.what(), ")");
        }
    };
    const auto field = [&](const nlohmann::json& j, const char* key, const char* obj) -> const nlohmann::json& {
        require<FormatError>(j.contains(key), where, ": \"", obj, "\" has no \"", key, "\"");
        return j.at(key);
    };
    std::set<std::string> used;
    const auto read = [&](const std::string& key, MatrixView<T> out) {
        require<FormatError>(f.contains(key), where, ": no tensor '", key, "'");
        try {
            f.get_into<T>(key, out);
        } catch (const Error& e) {
            comigs::detail::raise<ShapeError>(where, ": ", e.what());
        }
        used.insert(key);
    };
    try {
        if (const std::string* att = meta("comigs.attention")) {
            const auto j = json_of(*att, "comigs.attention");
            AttentionLoraConfig lc;
            lc.rank = field(j, "rank", "comigs.attention").template get<Index>();
            lc.alpha = field(j, "alpha", "comigs.attention").template get<double>();
            lc.scaling = detail::scaling_from(field(j, "scaling", "comigs.attention").template get<std::string>(), where);
            Rng unused(0);
            model.add_attention_lora(lc, unused);
            for (const auto& p : model.attention_projections()) {
                read(detail::peft_key(p.module, "lora_A.weight"), model.lora().view(p.prefix + "lora_A"));
                read(detail::peft_key(p.module, "lora_B.weight"), model.lora().view(p.prefix + "lora_B"));
            }
        }
        std::vector<std::shared_ptr<MixtureOfLoraMlp<T>>> mixtures;
        if (const std::string* mtext = meta("comigs.mixture")) {
            const auto j = json_of(*mtext, "comigs.mixture");
            MixtureConfig mc;
            mc.form = model.mlp_form();
            mc.d_model = model.d_model();
            mc.d_hidden = model.mlp_hidden();
            mc.n_experts = field(j, "experts", "comigs.mixture").template get<Index>();
            mc.top_k = field(j, "top_k", "comigs.mixture").template get<Index>();
            const std::string routing = field(j, "routing", "comigs.mixture").template get<std::string>();
            require<FormatError>(routing == "topk" || routing == "mean", where, ": routing '", routing, "' unknown");
            mc.routing = routing == "topk" ? Routing::top_k : Routing::mean;
            mc.expert0_importance = field(j, "expert0_importance", "comigs.mixture").template get<double>();
            mc.rank = field(j, "rank", "comigs.mixture").template get<Index>();
            mc.alpha = field(j, "alpha", "comigs.mixture").template get<double>();
            mc.scaling = detail::scaling_from(field(j, "scaling", "comigs.mixture").template get<std::string>(), where);
            for (const auto& r : field(j, "roles", "comigs.mixture")) {
                const std::string role = r.template get<std::string>();
                require<FormatError>(role == "generalist" || role == "specialist", where, ": role '", role, "' unknown");
                mc.roles.push_back(role == "generalist" ? Role::generalist : Role::specialist);
            }
            const double weight = lb_weight >= 0 ? lb_weight : 0.01 / double(model.n_layer());
            for (Index l = 0; l < model.n_layer(); ++l) {
                auto mix = std::make_shared<MixtureOfLoraMlp<T>>(mc, model.frozen_mlp(l));
                const std::string mlp = detail::parent_module(model.mlp_module(l, mix->linears().front()));
                if (mix->params().contains("router.weight"))
                    read(detail::peft_key(mlp, "moe_gate.weight"), mix->params().view("router.weight"));
                for (Index e = 0; e < mc.n_experts; ++e)
                    for (const auto& lin : mix->linears()) {
                        const std::string module = model.mlp_module(l, lin) + ".experts." + std::to_string(e);
                        read(detail::peft_key(module, "lora_A.weight"),
                             mix->params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'A')));
                        read(detail::peft_key(module, "lora_B.weight"),
                             mix->params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'B')));
                    }
                mixtures.push_back(mix);
            }
            for (Index l = 0; l < model.n_layer(); ++l)
                model.set_mlp(l, std::make_unique<MixtureMlp<T>>(mixtures[static_cast<std::size_t>(l)], weight));
        }
        for (const auto& t : f.tensors())
            require<FormatError>(used.count(t.name) > 0, where, ": tensor '", t.name, "' is not an adapter of this ",
                                 model.architecture(), " model (", model.n_layer(), " blocks)");
        return mixtures;
    } catch (const nlohmann::json::exception& e) {
        comigs::detail::raise<FormatError>(where, ": a metadata field has the wrong type (", e.what(), ")");
    } catch (const InvalidArgument& e) {
        if (dynamic_cast<const ShapeError*>(&e)) throw;
        comigs::detail::raise<FormatError>(where, ": ", e.what());
    }
}

}  // namespace comigs::models
