#pragma once
// A mixture layer described by one safetensors file: configuration in `__metadata__`, frozen base and
// adapter tensors by name. Lets users run comigs on tensors exported from their own framework and
// compare (the comigs-layer program, the golden-data tests).
//
// Metadata: form = gelu | swiglu, experts, top_k, rank, alpha, scaling = sqrt | linear,
// expert0_importance, routing = topk | mean. Tensors: x [T, d], dy [T, d]; gelu: fc.weight [h, d],
// fc.bias [h], proj.weight [d, h], proj.bias [d]; swiglu: gate.weight, up.weight [h, d], down.weight
// [d, h]; experts.{e}.{linear}.lora_A [r, in], .lora_B [out, r]; router.weight [E, d] (topk, E > 1;
// accepted and left unused for one expert or mean routing, as files from the reference carry it).
#include <charconv>
#include <concepts>
#include <cmath>
#include <memory>
#include <string>
#include <string_view>

#include "../mixture.hpp"
#include "safetensors.hpp"

namespace comigs::detail {
inline const std::string& meta_value(const io::SafetensorsMetadata& meta, const char* key) {
    const auto it = meta.find(key);
    require<FormatError>(it != meta.end(), "metadata '", key, "': missing");
    return it->second;
}
inline Index meta_int(const io::SafetensorsMetadata& meta, const char* key) {
    const std::string& s = meta_value(meta, key);
    long long v = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    require<FormatError>(ec == std::errc() && p == s.data() + s.size(), "metadata ", key, " '", s,
                         "': not an integer");
    return static_cast<Index>(v);
}
inline double meta_double(const io::SafetensorsMetadata& meta, const char* key) {
    const std::string& s = meta_value(meta, key);
    std::size_t used = 0;
    double v = 0;
    try {
        v = std::stod(s, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    require<FormatError>(used == s.size() && used > 0, "metadata ", key, " '", s, "': not a number");
    return v;
}
}  // namespace comigs::detail

namespace comigs::io {

/// Checks that `file` holds every tensor of the layer `cfg` describes, with its shape, before anything
/// is allocated for it: sizes in the metadata are bounded by what the file really contains. The router
/// is required with top-k routing over several experts and optional (unused) otherwise.
inline void check_layer_tensors(const SafetensorsFile& file, const MixtureConfig& cfg) {
    const Index d = cfg.d_model, h = cfg.d_hidden, r = cfg.rank;
    auto expect = [&file](const std::string& name, std::vector<Index> shape) {
        require<FormatError>(file.contains(name), "tensor '", name, "': missing");
        require<ShapeError>(file.shape(name) == shape, "tensor '", name, "': shape ", detail::shape_text(file.shape(name)),
                            ", expected ", detail::shape_text(shape));
    };
    const Index tokens = file.shape("x")[0];
    expect("dy", {tokens, d});
    const bool gelu = cfg.form == MlpForm::gelu;
    const std::vector<std::pair<std::string, Index>> linears =
        gelu ? std::vector<std::pair<std::string, Index>>{{"fc", h}, {"proj", d}}
             : std::vector<std::pair<std::string, Index>>{{"gate", h}, {"up", h}, {"down", d}};
    for (const auto& [name, out] : linears) {
        expect(name + ".weight", {out, out == h ? d : h});
        if (gelu) expect(name + ".bias", {out});
    }
    for (Index e = 0; e < cfg.n_experts; ++e)
        for (const auto& [name, out] : linears) {
            const std::string stem = "experts." + std::to_string(e) + "." + name;
            expect(stem + ".lora_A", {r, out == h ? d : h});
            expect(stem + ".lora_B", {out, r});
        }
    if (cfg.router().has_weight() || file.contains("router.weight")) expect("router.weight", {cfg.n_experts, d});
}

/// The mixture configuration a layer file describes (d_model and d_hidden from its tensors).
inline MixtureConfig mixture_config_from_file(const SafetensorsFile& file) {
    const auto& meta = file.metadata();
    MixtureConfig cfg;
    const std::string& form = detail::meta_value(meta, "form");
    require<FormatError>(form == "gelu" || form == "swiglu", "metadata form '", form, "': expected gelu or swiglu");
    cfg.form = form == "gelu" ? MlpForm::gelu : MlpForm::swiglu;
    const std::string& scaling = detail::meta_value(meta, "scaling");
    require<FormatError>(scaling == "sqrt" || scaling == "linear", "metadata scaling '", scaling,
                         "': expected sqrt or linear");
    cfg.scaling = scaling == "sqrt" ? LoraScaling::sqrt : LoraScaling::linear;
    const std::string& routing = detail::meta_value(meta, "routing");
    require<FormatError>(routing == "topk" || routing == "mean", "metadata routing '", routing,
                         "': expected topk or mean");
    cfg.routing = routing == "topk" ? Routing::top_k : Routing::mean;
    cfg.n_experts = detail::meta_int(meta, "experts");
    cfg.top_k = detail::meta_int(meta, "top_k");
    cfg.rank = detail::meta_int(meta, "rank");
    cfg.alpha = detail::meta_double(meta, "alpha");
    cfg.expert0_importance = detail::meta_double(meta, "expert0_importance");
    if (cfg.routing == Routing::mean || cfg.n_experts == 1) cfg.expert0_importance = -1.0;  // unused there
    const auto& x = file.shape("x");
    require<ShapeError>(x.size() == 2, "tensor x: expected [T, d], got rank ", x.size());
    cfg.d_model = x[1];
    const auto& first = file.shape(cfg.form == MlpForm::gelu ? "fc.weight" : "gate.weight");
    require<ShapeError>(first.size() == 2, "first base weight: expected [hidden, d]");
    cfg.d_hidden = first[0];
    cfg.validate();
    check_layer_tensors(file, cfg);
    return cfg;
}

/// Runs the layer a file describes: forward on x, backward of loss = sum(y * dy) + lb_loss. Returns
/// a file with y, dx, lb_loss [1] and `<name>.grad` for every trainable tensor, in the input's dtype
/// (float32 or float64). Tensors the layer does not know are an error (typos must not pass silently).
template <class T>
SafetensorsFile run_layer_file(const SafetensorsFile& in) {
    const MixtureConfig cfg = mixture_config_from_file(in);
    auto base = std::make_shared<FrozenMlp<T>>(cfg.form, cfg.d_model, cfg.d_hidden);
    for (const auto& spec : base->weights().layout().tensors())
        in.get_into(spec.name, spec.shape, base->weights().span(spec.name));
    MixtureOfLoraMlp<T> layer(cfg, base);
    for (const auto& spec : layer.params().layout().tensors())
        in.get_into(spec.name, spec.shape, layer.params().span(spec.name));
    // A router.weight of a layer without a router (one expert, mean routing) is read past (its shape
    // was checked) and gets a zero gradient, as in the framework that wrote the file.
    const bool unused_router = !cfg.router().has_weight() && in.contains("router.weight");
    for (const auto& t : in.tensors()) {
        const bool known = t.name == "x" || t.name == "dy" || base->weights().contains(t.name) ||
                           layer.params().contains(t.name) || (unused_router && t.name == "router.weight");
        require<FormatError>(known, "tensor '", t.name, "': not part of a ", to_string(cfg.form), " mixture with ",
                             cfg.n_experts, " experts");
    }
    const Index n = in.shape("x")[0], d = cfg.d_model;
    const auto x = in.get<T>("x", {n, d});
    const auto dy = in.get<T>("dy", {n, d});
    std::vector<T> y(x.size()), dx(x.size(), T(0));
    const double lb = layer.forward(MatrixView<T>(y.data(), n, d), ConstMatrixView<T>(x.data(), n, d));
    layer.backward(MatrixView<T>(dx.data(), n, d), ConstMatrixView<T>(dy.data(), n, d), T(1));
    SafetensorsFile out;
    out.metadata() = in.metadata();
    out.add("y", {n, d}, y);
    out.add("dx", {n, d}, dx);
    out.add("lb_loss", {1}, std::vector<T>{static_cast<T>(lb)});
    for (const auto& spec : layer.grads().layout().tensors())
        out.add(spec.name + ".grad", spec.shape, layer.grads().span(spec.name));
    if (unused_router)
        out.add("router.weight.grad", {cfg.n_experts, d}, std::vector<T>(static_cast<std::size_t>(cfg.n_experts * d), T(0)));
    return out;
}

/// run_layer_file in the precision of the file's `x` (F32 -> float, F64 -> double). A template only so
/// that including this header does not compile the float and double layers for every file that
/// never calls it.
template <std::same_as<SafetensorsFile> File>
SafetensorsFile run_layer_file(const File& in) {
    const Dtype dt = in.at("x").dtype;
    if (dt == Dtype::F64) return run_layer_file<double>(in);
    require<FormatError>(dt == Dtype::F32, "tensor x: dtype ", dtype_name(dt), " not supported (F32 or F64)");
    return run_layer_file<float>(in);
}

}  // namespace comigs::io
