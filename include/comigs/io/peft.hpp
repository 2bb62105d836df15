#pragma once
// One LoRA adapter as a Hugging Face PEFT adapter folder (`adapter_model.safetensors` +
// `adapter_config.json`), so that a single comigs expert (usually the generalist) can be used by PEFT,
// served by tools that read PEFT adapters, or joined to a Python federated fleet; and the way back.
//
// Keys: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], metadata
// {"format": "pt"}. The config records r, lora_alpha and use_rslora: alpha/sqrt(r) when true, alpha/r
// when false. Readers that only know alpha/r (llama.cpp's converter ignores use_rslora) get a config
// with sqrt(r) folded into alpha when `fold_rslora_into_alpha` is set: the product s B A is unchanged.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../lora.hpp"
#include "../mixture.hpp"
#include "../mixture_linear.hpp"
#include "safetensors.hpp"

namespace comigs::io {

/// One adapted linear map: its module path in the host (PEFT key middle part) and its factors.
template <class T>
struct PeftModule {
    std::string module;         ///< e.g. "transformer.h.0.mlp.c_fc"
    ConstMatrixView<T> lora_A;  ///< [r, in]
    ConstMatrixView<T> lora_B;  ///< [out, r]
};

struct PeftExportOptions {
    std::string base_model;            ///< base_model_name_or_path
    bool fold_rslora_into_alpha = false;
    bool fan_in_fan_out = false;       ///< true for GPT-2's Conv1D modules (weights stored [in, out])
    std::string task_type = "CAUSAL_LM";
    nlohmann::json comigs_info = nlohmann::json::object();  ///< extra fields (PEFT ignores unknown ones)
};

/// Writes `dir/adapter_model.safetensors` and `dir/adapter_config.json` (each atomically) for modules
/// sharing one rank, alpha and scaling convention.
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const std::vector<PeftModule<T>>& modules, Index rank,
                       double alpha, LoraScaling scaling, const PeftExportOptions& options = {}) {
    require(!modules.empty(), "peft export: no modules");
    lora_scale(alpha, rank, scaling);  // checks rank and alpha
    SafetensorsFile file;
    file.metadata()["format"] = "pt";
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& m : modules) {
        require(!m.module.empty(), "peft export: empty module name");
        require<ShapeError>(m.lora_A.rows == rank && m.lora_B.cols == rank, "peft export module '", m.module,
                            "': factors of rank ", m.lora_A.rows, "/", m.lora_B.cols, ", expected ", rank);
        file.add("base_model.model." + m.module + ".lora_A.weight", m.lora_A, Dtype::F32);
        file.add("base_model.model." + m.module + ".lora_B.weight", m.lora_B, Dtype::F32);
        const auto dot = m.module.rfind('.');
        const std::string leaf = dot == std::string::npos ? m.module : m.module.substr(dot + 1);
        if (std::find(targets.begin(), targets.end(), leaf) == targets.end()) targets.push_back(leaf);
    }
    const bool rs = scaling == LoraScaling::sqrt;
    nlohmann::json cfg = {{"peft_type", "LORA"},
                          {"r", rank},
                          {"lora_alpha", rs && options.fold_rslora_into_alpha
                                             ? alpha * std::sqrt(static_cast<double>(rank))
                                             : alpha},
                          {"use_rslora", rs && !options.fold_rslora_into_alpha},
                          {"target_modules", targets},
                          {"lora_dropout", 0.0},
                          {"bias", "none"},
                          {"fan_in_fan_out", options.fan_in_fan_out},
                          {"task_type", options.task_type},
                          {"base_model_name_or_path", options.base_model},
                          {"inference_mode", true},
                          {"comigs", options.comigs_info}};
    std::filesystem::create_directories(dir);
    file.save(dir / "adapter_model.safetensors", {.checksum = false});
    const std::string text = cfg.dump(2) + "\n";
    atomic_write_file(dir / "adapter_config.json", std::as_bytes(std::span(text.data(), text.size())));
}

/// Exports expert e of an MLP mixture. `module_of(linear)` maps comigs' linear names (fc, proj, gate,
/// up, down) to the host's module paths, e.g. "fc" -> "transformer.h.0.mlp.c_fc".
template <class T, class ModuleOf>
void save_peft_expert(const std::filesystem::path& dir, const MixtureOfLoraMlp<T>& layer, Index e, ModuleOf&& module_of,
                      PeftExportOptions options = {}) {
    layer.expert_tensors(e);  // checks e
    std::vector<PeftModule<T>> modules;
    for (const auto& lin : layer.linears())
        modules.push_back({module_of(lin), layer.params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'A')),
                           layer.params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'B'))});
    options.comigs_info["expert"] = e;
    options.comigs_info["role"] = to_string(layer.role(e));
    options.comigs_info["scaling"] = to_string(layer.config().scaling);
    save_peft_adapter(dir, modules, layer.config().rank, layer.config().alpha, layer.config().scaling, options);
}

/// A PEFT adapter read back: its convention and every module's factors (float64 values).
struct PeftAdapter {
    Index rank = 0;
    double alpha = 0;
    LoraScaling scaling = LoraScaling::linear;
    nlohmann::json config;
    SafetensorsFile tensors;

    double scale() const { return lora_scale(alpha, rank, scaling); }
    bool has_module(const std::string& module) const {
        return tensors.contains("base_model.model." + module + ".lora_A.weight");
    }
};

inline PeftAdapter load_peft_adapter(const std::filesystem::path& dir) {
    PeftAdapter a;
    std::ifstream in(dir / "adapter_config.json");
    require<IoError>(static_cast<bool>(in), "peft adapter '", dir.string(), "': cannot open adapter_config.json");
    try {
        a.config = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        detail::raise<FormatError>("peft adapter '", dir.string(), "': adapter_config.json: ", e.what());
    }
    auto field = [&](const char* key) -> const nlohmann::json& {
        require<FormatError>(a.config.is_object() && a.config.contains(key), "peft adapter '", dir.string(),
                             "': adapter_config.json has no '", key, "'");
        return a.config.at(key);
    };
    require<FormatError>(field("peft_type") == "LORA", "peft adapter '", dir.string(), "': peft_type ",
                         field("peft_type").dump(), " is not LORA");
    require<FormatError>(field("r").is_number_integer(), "peft adapter: r ", field("r").dump(), " is not an integer");
    require<FormatError>(field("lora_alpha").is_number(), "peft adapter: lora_alpha ", field("lora_alpha").dump(),
                         " is not a number");
    a.rank = field("r").get<Index>();
    a.alpha = field("lora_alpha").get<double>();
    a.scaling = a.config.value("use_rslora", false) ? LoraScaling::sqrt : LoraScaling::linear;
    lora_scale(a.alpha, a.rank, a.scaling);
    a.tensors = SafetensorsFile::load(dir / "adapter_model.safetensors");
    return a;
}

/// Loads module `module` of an adapter into factors A [r, in], B [out, r] of a target whose scale is
/// `target_scale`. Shapes and rank must match; a different convention is converted exactly by scaling
/// B by s_file / s_target (the product s B A is what the adapter means). Returns that factor.
template <class T>
double load_peft_module(const PeftAdapter& adapter, const std::string& module, MatrixView<T> A, MatrixView<T> B,
                        double target_scale) {
    const std::string ka = "base_model.model." + module + ".lora_A.weight";
    const std::string kb = "base_model.model." + module + ".lora_B.weight";
    require<FormatError>(adapter.tensors.contains(ka) && adapter.tensors.contains(kb), "peft adapter: module '",
                         module, "' not in the adapter");
    require<ShapeError>(A.rows == adapter.rank, "peft module '", module, "': adapter rank ", adapter.rank,
                        ", target rank ", A.rows);
    adapter.tensors.get_into(ka, A);
    adapter.tensors.get_into(kb, B);
    const double factor = adapter.scale() / target_scale;
    if (factor != 1.0)
        for (Index i = 0; i < B.rows; ++i)
            for (T& v : B.row(i)) v = static_cast<T>(v * factor);
    return factor;
}

/// Imports a PEFT adapter into expert e of an MLP mixture (module names as for save_peft_expert).
/// Returns the factor applied to B to convert conventions (1 when they agree).
template <class T, class ModuleOf>
double load_peft_expert(const PeftAdapter& adapter, MixtureOfLoraMlp<T>& layer, Index e, ModuleOf&& module_of) {
    layer.expert_tensors(e);
    double factor = 1.0;
    for (const auto& lin : layer.linears())
        factor = load_peft_module(adapter, module_of(lin), layer.params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'A')),
                                  layer.params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'B')),
                                  static_cast<double>(layer.scale()));
    return factor;
}

}  // namespace comigs::io
