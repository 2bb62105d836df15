#pragma once
// GPT-2 weights in the Hugging Face safetensors layout: load them into a Gpt2, save a Gpt2 so that
// a later run (or transformers' GPT2LMHeadModel) reads it back.
//
// HF GPT-2 keeps its projections in Conv1D modules whose weight is [in, out], the transpose of
// nn.Linear; Gpt2 stores [out, in], so c_attn, c_proj and c_fc weights are transposed here and only
// here. Keys may carry the "transformer." prefix of GPT2LMHeadModel checkpoints. The file's constant
// buffers ("h.{i}.attn.bias", "masked_bias") and "lm_head.weight" (tied to wte) are ignored.
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <algorithm>
#include <memory>

#include <comigs/io/safetensors.hpp>

#include "gpt2.hpp"
#include "tensor_source.hpp"

namespace comigs::models {

namespace detail {
inline bool is_conv1d_weight(std::string_view name) {
    return name.ends_with("c_attn.weight") || name.ends_with("c_proj.weight") || name.ends_with("c_fc.weight");
}
/// "transformer." when the file holds GPT2LMHeadModel keys, "" for GPT2Model keys.
inline std::string hf_prefix(const io::SafetensorsFile& f) {
    if (f.contains("wte.weight")) return "";
    if (f.contains("transformer.wte.weight")) return "transformer.";
    comigs::detail::raise<FormatError>("GPT-2 file: no 'wte.weight' or 'transformer.wte.weight' tensor (", f.size(), " tensors)");
}
// The key files written before the host moved into include/comigs/models/ carry: kept, so they load.
inline constexpr std::string_view n_head_key = "comigs.tiny_gpt.n_head";
}  // namespace detail

/// The Gpt2Config of a GPT-2 file: vocab, n_ctx and d_model from wte and wpe, n_layer from the blocks present,
/// mlp_hidden from c_fc. The head count is not in the weights (HF keeps it in config.json: 12 for gpt2):
/// pass it, or it is read from the metadata save_hf_gpt2 writes.
inline Gpt2Config hf_gpt2_config(const io::SafetensorsFile& f, std::optional<Index> n_head = std::nullopt) {
    const std::string p = detail::hf_prefix(f);
    Gpt2Config c;
    const auto& wte = f.shape(p + "wte.weight");
    const auto& wpe = f.shape(p + "wpe.weight");
    require<FormatError>(wte.size() == 2 && wpe.size() == 2 && wte[1] == wpe[1], "GPT-2 file: wte ",
                         comigs::detail::shape_text(wte), " and wpe ", comigs::detail::shape_text(wpe),
                         " must be [vocab, d] and [n_ctx, d]");
    c.vocab = wte[0];
    c.n_ctx = wpe[0];
    c.d_model = wte[1];
    c.n_layer = 0;
    while (f.contains(p + layer_name(c.n_layer, "ln_1.weight"))) ++c.n_layer;
    if (c.n_layer > 0) c.mlp_hidden = f.shape(p + layer_name(0, "mlp.c_fc.weight")).back();
    if (n_head) {
        c.n_head = *n_head;
    } else {
        const auto it = f.metadata().find(detail::n_head_key);
        require(it != f.metadata().end(), "n_head: not given and the file has no '", detail::n_head_key,
                "' metadata (HF keeps it in config.json)");
        c.n_head = std::stol(it->second);
    }
    c.validate();
    return c;
}

/// Copies the weights of `f` into model.params(); every tensor of the model must be in the file with the
/// HF shape (Conv1D weights [in, out]), in F32, F64, F16 or BF16. FormatError / ShapeError name the key.
template <class T>
void load_hf_gpt2(Gpt2<T>& model, const io::SafetensorsFile& f) {
    const std::string prefix = detail::hf_prefix(f);
    for (const TensorSpec& s : model.params().layout().tensors()) {
        const std::string key = prefix + s.name;
        if (detail::is_conv1d_weight(s.name)) {
            const Index out = s.rows(), in = s.cols();
            const std::vector<T> w = f.get<T>(key, {in, out});
            auto dst = model.params().view(s.name);
            for (Index i = 0; i < in; ++i)
                for (Index o = 0; o < out; ++o) dst(o, i) = w[static_cast<std::size_t>(i * out + o)];
        } else {
            f.get_into<T>(key, s.shape, model.params().span(s.name));
        }
    }
}

/// Loads the model of a GPT-2 safetensors file (config from hf_gpt2_config).
template <class T>
Gpt2<T> load_hf_gpt2(const std::filesystem::path& path, std::optional<Index> n_head = std::nullopt) {
    const io::SafetensorsFile f = io::SafetensorsFile::load(path);
    Gpt2<T> model(hf_gpt2_config(f, n_head));
    load_hf_gpt2(model, f);
    return model;
}

/// Writes model.params() in the HF GPT-2 layout (GPT2Model keys, Conv1D weights [in, out]) as `dtype`
/// (F32 by default, like HF), with the head count in the metadata so load_hf_gpt2 needs no config.
template <class T>
void save_hf_gpt2(const Gpt2<T>& model, const std::filesystem::path& path, io::Dtype dtype = io::Dtype::F32) {
    io::SafetensorsFile f;
    f.metadata()["format"] = "pt";
    f.metadata()[std::string(detail::n_head_key)] = std::to_string(model.config().n_head);
    for (const TensorSpec& s : model.params().layout().tensors()) {
        if (detail::is_conv1d_weight(s.name)) {
            const Index out = s.rows(), in = s.cols();
            const auto w = model.params().view(s.name);
            std::vector<T> t(static_cast<std::size_t>(in * out));
            for (Index i = 0; i < in; ++i)
                for (Index o = 0; o < out; ++o) t[static_cast<std::size_t>(i * out + o)] = w(o, i);
            f.add(s.name, {in, out}, t, dtype);
        } else {
            f.add(s.name, s.shape, model.params().span(s.name), dtype);
        }
    }
    f.save(path);
}

/// "transformer." when a source holds GPT2LMHeadModel keys, "" for GPT2Model keys.
inline std::string hf_gpt2_prefix(const TensorSource& src) {
    if (src.contains("wte.weight")) return "";
    if (src.contains("transformer.wte.weight")) return "transformer.";
    comigs::detail::raise<FormatError>(src.description(), ": no 'wte.weight' or 'transformer.wte.weight' tensor: not a GPT-2 model");
}

/// The Gpt2Config of a source from its tensors (for files without config.json): vocab, n_ctx and d_model
/// from wte and wpe, n_layer from the blocks present, the hidden size from c_fc; the head count given,
/// or from the metadata save_hf_gpt2 writes (`metadata` of the file).
inline Gpt2Config hf_gpt2_config_from_source(const TensorSource& src, std::optional<Index> n_head,
                                             const io::SafetensorsMetadata& metadata = {}) {
    const std::string p = hf_gpt2_prefix(src);
    const TensorRef& wte = src.at(p + "wte.weight");
    const TensorRef& wpe = src.at(p + "wpe.weight");
    require<FormatError>(wte.shape.size() == 2 && wpe.shape.size() == 2 && wte.shape[1] == wpe.shape[1],
                         src.description(), ": wte ", shape_text(wte.shape), " and wpe ", shape_text(wpe.shape),
                         " must be [vocab, d] and [n_ctx, d]");
    Gpt2Config c;
    c.vocab = wte.shape[0];
    c.n_ctx = wpe.shape[0];
    c.d_model = wte.shape[1];
    c.n_layer = 0;
    while (src.contains(p + layer_name(c.n_layer, "ln_1.weight"))) ++c.n_layer;
    if (c.n_layer > 0) c.mlp_hidden = src.at(p + layer_name(0, "mlp.c_fc.weight")).cols();
    if (n_head) {
        c.n_head = *n_head;
    } else {
        const auto it = metadata.find(detail::n_head_key);
        require<FormatError>(it != metadata.end(), src.description(), ": no config.json and no '", detail::n_head_key,
                             "' metadata: the head count is unknown");
        c.n_head = std::stol(it->second);
    }
    c.validate();
    return c;
}

/// A frozen GPT-2 over the tensors of a source (Hugging Face names, "transformer." prefix or not).
/// Conv1D weights ([in, out]) are transposed once into storage of the model's own (with
/// `options.quantize`, straight into Q8_0 / Q4_0 blocks along their [out, in] rows; wte, the tied
/// head, too), after which the source is told it may drop their bytes (TensorSource::release: a mapped
/// file's pages go, so the base is held once, not as file + copy); wte, wpe, biases
/// and LayerNorms are read in place where their type allows. Every tensor the config implies must be
/// there with its shape (ShapeError naming the tensor, its file and the config values, `config_name`
/// saying where they came from); other tensors are an error, except the attention mask buffers
/// (`attn.bias`, `attn.masked_bias`) and a stored copy of the tied head (`lm_head.weight`).
template <class T>
std::unique_ptr<Gpt2<T>> load_gpt2(std::shared_ptr<const TensorSource> source, const Gpt2Config& config,
                                   WeightOptions options = {}, std::string_view config_name = "the config") {
    config.validate();
    const TensorSource& src = *source;
    const std::string p = hf_gpt2_prefix(src);
    auto store = std::make_shared<WeightStore<T>>(source, options);
    auto w = std::make_shared<Gpt2Weights<T>>();
    w->config = config;
    w->owner = store;
    const Index d = config.d_model, h = config.hidden(), V = config.vocab;
    const std::string cfg(config_name);
    const std::string why_d = cfg + " (n_embd " + std::to_string(d) + ")";
    const std::string why_h = cfg + " (n_embd " + std::to_string(d) + ", n_inner " + std::to_string(h) + ")";
    std::vector<std::string> used;
    const auto take = [&](const std::string& name, const std::vector<Index>& shape, const std::string& why) -> const TensorRef& {
        used.push_back(p + name);
        return src.expect(p + name, shape, why);
    };
    w->wte = store->linear(take("wte.weight", {V, d}, cfg + " (vocab_size " + std::to_string(V) + ", n_embd " + std::to_string(d) + ")"));
    w->wpe = store->matrix(take("wpe.weight", {config.n_ctx, d}, cfg + " (n_positions " + std::to_string(config.n_ctx) + ", n_embd " + std::to_string(d) + ")"));
    w->lnf_w = store->vector(take("ln_f.weight", {d}, why_d));
    w->lnf_b = store->vector(take("ln_f.bias", {d}, why_d));
    for (Index l = 0; l < config.n_layer; ++l) {
        const auto n = [l](std::string_view tail) { return layer_name(l, tail); };
        typename Gpt2Weights<T>::Layer L;
        L.ln1_w = store->vector(take(n("ln_1.weight"), {d}, why_d));
        L.ln1_b = store->vector(take(n("ln_1.bias"), {d}, why_d));
        L.ln2_w = store->vector(take(n("ln_2.weight"), {d}, why_d));
        L.ln2_b = store->vector(take(n("ln_2.bias"), {d}, why_d));
        L.c_attn = store->linear_transposed(take(n("attn.c_attn.weight"), {d, 3 * d}, why_d),
                                            &take(n("attn.c_attn.bias"), {3 * d}, why_d));
        L.c_proj = store->linear_transposed(take(n("attn.c_proj.weight"), {d, d}, why_d),
                                            &take(n("attn.c_proj.bias"), {d}, why_d));
        std::map<std::string, FrozenLinear<T>> mlp;
        mlp["fc"] = store->linear_transposed(take(n("mlp.c_fc.weight"), {d, h}, why_h), &take(n("mlp.c_fc.bias"), {h}, why_h));
        mlp["proj"] = store->linear_transposed(take(n("mlp.c_proj.weight"), {h, d}, why_h),
                                               &take(n("mlp.c_proj.bias"), {d}, why_h));
        L.mlp = std::make_shared<FrozenMlp<T>>(MlpForm::gelu, d, h, std::move(mlp), store);
        w->layers.push_back(std::move(L));
    }
    std::sort(used.begin(), used.end());
    for (const std::string& name : src.names()) {
        if (std::binary_search(used.begin(), used.end(), name) || name.ends_with(".attn.bias") ||
            name.ends_with(".attn.masked_bias") || name == "lm_head.weight")
            continue;
        comigs::detail::raise<FormatError>(src.description(), ": tensor '", name, "' in '", src.at(name).file, "' (",
                                           shape_text(src.at(name).shape), ") is not part of the GPT-2 model ", cfg,
                                           " describes (n_layer ", config.n_layer, ")");
    }
    return std::make_unique<Gpt2<T>>(std::shared_ptr<const Gpt2Weights<T>>(std::move(w)));
}

}  // namespace comigs::models
