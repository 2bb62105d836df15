#pragma once
// LoRA adapters as llama.cpp reads them (GGUF): a user's generalist, or any one expert, exported so that
// llama.cpp / Ollama can apply it to the base model at inference time.
//
// The file: `general.type` = "adapter", `general.architecture` (the base model's, e.g. "llama", "gpt2"),
// `adapter.type` = "lora", `adapter.lora.alpha` (FLOAT32); per adapted weight `<tensor>.weight.lora_a`
// with dims [in, r] (PyTorch [r, in]) and `<tensor>.weight.lora_b` with dims [r, out] (PyTorch [out, r]),
// `<tensor>` the base model's GGUF name (`blk.3.ffn_up`). llama.cpp scales B A x by alpha / r, r read
// from lora_b: comigs writes alpha = s r, s its own scale (alpha / sqrt(r) or alpha / r), so the product
// is the same whatever convention the expert was trained with. One alpha serves the whole file, so every
// module must have the same s r.
//
// What a llama.cpp adapter cannot express: the router. An exported expert is applied to every token
// (weight 1); the mixture's per-token choice between generalist and specialists stays on the device.
//
// llama.cpp's converter permutes the rows of Llama's attn_q / attn_k weights (see on-device design note);
// a LoRA B of those projections needs the same row permutation (GgufLoraModule::permute_heads).
#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "../mixture.hpp"
#include "../mixture_linear.hpp"
#include "gguf.hpp"

namespace comigs::io {

/// One adapted weight: its GGUF base tensor name (without ".weight") and its factors.
template <class T>
struct GgufLoraModule {
    std::string tensor;         ///< e.g. "blk.0.ffn_up"
    ConstMatrixView<T> lora_A;  ///< [r, in]
    ConstMatrixView<T> lora_B;  ///< [out, r]
    double scale = 1.0;         ///< the s of s B A x
    Index permute_heads = 0;    ///< > 0: permute B's rows as llama.cpp permutes attn_q / attn_k (n_head or n_head_kv)
};

/// Rows of a [rows, cols] matrix in llama.cpp's q/k order for `heads` heads:
/// w.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2).reshape(rows, cols), i.e. new row
/// (h, i, j) = old row (h, j, i) for i < rows / heads / 2, j < 2.
inline Index llama_permuted_row(Index row, Index rows, Index heads) {
    const Index half = rows / heads / 2;
    const Index h = row / (2 * half), r = row % (2 * half);
    const Index i = r / 2, j = r % 2;  // new index within the head: i * 2 + j
    return h * 2 * half + j * half + i;  // the old row it takes
}

/// Builds the llama.cpp LoRA adapter file of `modules` for a base model of `architecture`. Factors are
/// stored as F32 (exact) or F16. Every module must have the same s r (one alpha per file).
template <class T>
GgufFile make_gguf_lora_adapter(const std::vector<GgufLoraModule<T>>& modules, const std::string& architecture,
                                GgmlType type = GgmlType::f32, const std::string& name = "comigs adapter") {
    require(!modules.empty(), "gguf lora export: no modules");
    require(!architecture.empty(), "gguf lora export: the base model's architecture must be named");
    require(type == GgmlType::f32 || type == GgmlType::f16, "gguf lora export: factors are F32 or F16, not ",
            to_string(type));
    const double alpha = modules.front().scale * static_cast<double>(modules.front().lora_A.rows);
    require(std::isfinite(alpha) && alpha != 0.0, "gguf lora export: alpha ", alpha,
            " (s r): llama.cpp reads alpha 0 as no scaling, and it must be finite");
    GgufFile f;
    f.set("general.architecture", GgufValue(architecture));
    f.set("general.type", GgufValue("adapter"));
    f.set("general.name", GgufValue(name));
    f.set("adapter.type", GgufValue("lora"));
    f.set("adapter.lora.alpha", GgufValue(static_cast<float>(alpha)));
    std::vector<float> a, b;
    for (const auto& m : modules) {
        const Index r = m.lora_A.rows, in = m.lora_A.cols, out = m.lora_B.rows;
        require<ShapeError>(r >= 1 && m.lora_B.cols == r, "gguf lora export '", m.tensor, "': lora_A [", r, ", ", in,
                            "] and lora_B [", out, ", ", m.lora_B.cols, "] do not share a rank");
        const double a_m = m.scale * static_cast<double>(r);
        require(std::abs(a_m - alpha) <= 1e-6 * std::abs(alpha), "gguf lora export '", m.tensor, "': s r = ", a_m,
                " differs from the file's alpha ", alpha, " (llama.cpp has one alpha per adapter)");
        if (m.permute_heads > 0)
            require<ShapeError>(out % (2 * m.permute_heads) == 0, "gguf lora export '", m.tensor, "': ", out,
                                " rows cannot be split into ", m.permute_heads, " heads of pairs");
        a.resize(static_cast<std::size_t>(r * in));
        b.resize(static_cast<std::size_t>(out * r));
        for (Index i = 0; i < r; ++i)
            for (Index c = 0; c < in; ++c) a[static_cast<std::size_t>(i * in + c)] = static_cast<float>(m.lora_A(i, c));
        for (Index o = 0; o < out; ++o) {
            const Index src = m.permute_heads > 0 ? llama_permuted_row(o, out, m.permute_heads) : o;
            for (Index c = 0; c < r; ++c) b[static_cast<std::size_t>(o * r + c)] = static_cast<float>(m.lora_B(src, c));
        }
        f.add_matrix(m.tensor + ".weight.lora_a", ConstMatrixView<float>(a.data(), r, in), type);
        f.add_matrix(m.tensor + ".weight.lora_b", ConstMatrixView<float>(b.data(), out, r), type);
    }
    return f;
}

/// The modules of expert e of an MLP mixture; `tensor_of(linear)` maps comigs' linear names (fc, proj,
/// gate, up, down) to GGUF base tensor names, e.g. "fc" -> "blk.0.ffn_up", "proj" -> "blk.0.ffn_down".
template <class T>
std::vector<GgufLoraModule<T>> gguf_lora_modules(const MixtureOfLoraMlp<T>& layer, Index e,
                                                 const std::function<std::string(const std::string&)>& tensor_of) {
    layer.expert_tensors(e);  // checks e
    std::vector<GgufLoraModule<T>> out;
    for (const auto& lin : layer.linears())
        out.push_back({tensor_of(lin), layer.params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'A')),
                       layer.params().view(MixtureOfLoraMlp<T>::tensor_name(e, lin, 'B')),
                       static_cast<double>(layer.scale())});
    return out;
}

/// The module of expert e of a mixture on one linear map (`tensor`: its GGUF base tensor name).
template <class T>
GgufLoraModule<T> gguf_lora_module(const MixtureOfLoraLinear<T>& layer, Index e, const std::string& tensor,
                                   Index permute_heads = 0) {
    require(e >= 0 && e < layer.config().n_experts, "expert ", e, ": out of range [0, ", layer.config().n_experts, ")");
    return {tensor, layer.params().view(MixtureOfLoraLinear<T>::tensor_name(e, 'A')),
            layer.params().view(MixtureOfLoraLinear<T>::tensor_name(e, 'B')), static_cast<double>(layer.scale()),
            permute_heads};
}

/// A llama.cpp LoRA adapter read back: alpha and each module's factors (rows of B in llama.cpp's order).
struct GgufLoraAdapter {
    std::string architecture;
    double alpha = 0;
    struct Module {
        std::string tensor;
        Index rank = 0, in = 0, out = 0;
        std::vector<float> lora_A, lora_B;  ///< [r, in], [out, r]
    };
    std::vector<Module> modules;
};

/// Reads a llama.cpp LoRA adapter, checking what llama.cpp checks: the adapter type, alpha, and that
/// every lora_a has its lora_b with dims [in, r] and [r, out]. FormatError naming what is wrong.
inline GgufLoraAdapter read_gguf_lora_adapter(const GgufFile& f) {
    GgufLoraAdapter out;
    if (f.get<std::string>("general.type") != "adapter" || f.get<std::string>("adapter.type") != "lora")
        detail::raise<FormatError>("GGUF: not a LoRA adapter (general.type '", f.get<std::string>("general.type"), "')");
    out.architecture = f.get<std::string>("general.architecture");
    out.alpha = f.get<float>("adapter.lora.alpha");
    for (const auto& t : f.tensors()) {
        const std::string suffix = ".weight.lora_a";
        if (t.name.size() <= suffix.size() || t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) != 0)
            continue;
        GgufLoraAdapter::Module m;
        m.tensor = t.name.substr(0, t.name.size() - suffix.size());
        const GgufTensor& b = f.require_tensor(m.tensor + ".weight.lora_b");
        if (t.dims.size() != 2 || b.dims.size() != 2 || t.dims[1] != b.dims[0])
            detail::raise<FormatError>("GGUF: LoRA '", m.tensor, "': lora_a and lora_b dims do not share a rank");
        m.in = static_cast<Index>(t.dims[0]);
        m.rank = static_cast<Index>(t.dims[1]);
        m.out = static_cast<Index>(b.dims[1]);
        m.lora_A = f.values<float>(t.name);
        m.lora_B = f.values<float>(b.name);
        out.modules.push_back(std::move(m));
    }
    return out;
}

}  // namespace comigs::io
