#pragma once
// GGUF model files (llama.cpp's format) as hosts: Llama-architecture files (Llama 2/3/3.1/3.2, SmolLM2, ...;
// general.architecture "llama") and Qwen2 files ("qwen2") load into the Llama host, their byte-level BPE
// tokenizer from the metadata.
//
// What differs from a Hugging Face folder, and how it is undone on load:
//   - names: llama.cpp's (token_embd, blk.N.attn_q, ..., output_norm, output) map onto transformers' names,
//     so the model is built by the same code (load_llama_weights) with the same checks;
//   - dims: ne0 first, so a GGUF [in, out] is the [out, in] weight; F32, F16, BF16, Q8_0 and Q4_0 are
//     held as the file holds them (mapped, not copied; a Q8_0 / Q4_0 matrix is a quantized FrozenLinear);
//   - q/k row order: llama.cpp's converter permutes the rows of attn_q and attn_k of llama models so that
//     GGML's pairwise RoPE (elements 2i, 2i+1) computes transformers' rotate-half RoPE:
//       gguf = hf.reshape(heads, 2, hd / 2, in).swapaxes(1, 2).reshape(rows, in)
//     (heads: the query heads for q, the key/value heads for k). Those two matrices are put back in
//     transformers' order once, into memory the source owns (whole rows move: blocks stay intact);
//   - RoPE scaling: a llama3-scaled model carries `rope_freqs` (per-frequency divisors of inv_freq)
//     instead of rope_scaling; they become LlamaConfig::rope_freq_divisors.
// Anything else is refused with a FormatError naming the file and the key or tensor: another
// architecture, partial rotary embeddings, a rope scaling type other than none, a tokenizer that is not
// byte-level BPE ("gpt2") or a pre-tokenizer comigs does not know. Tensor types other than F32, F16, BF16,
// Q8_0 and Q4_0 (e.g. the Q6_K output matrix llama-quantize writes into Q4_0 files unless --pure) are
// refused by the GGUF reader itself, naming the type.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <comigs/detail/aligned.hpp>
#include <comigs/error.hpp>
#include <comigs/io/gguf.hpp>
#include <comigs/text/bpe_tokenizer.hpp>

#include "hf_model.hpp"
#include "llama.hpp"
#include "tensor_source.hpp"

namespace comigs::models {

/// transformers' name of a llama.cpp tensor name of a Llama-family model, or "" when there is none
/// (rope_freqs, which becomes part of the config, and names llama.cpp does not give a Llama model).
inline std::string hf_name_of_gguf(std::string_view name) {
    static const std::map<std::string, std::string, std::less<>> top = {
        {"token_embd.weight", "model.embed_tokens.weight"},
        {"output_norm.weight", "model.norm.weight"},
        {"output.weight", "lm_head.weight"}};
    if (const auto it = top.find(name); it != top.end()) return it->second;
    if (!name.starts_with("blk.")) return "";
    const std::size_t dot = name.find('.', 4);
    if (dot == std::string_view::npos || dot == 4) return "";
    const std::string_view layer = name.substr(4, dot - 4);
    if (!std::all_of(layer.begin(), layer.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        (layer.size() > 1 && layer[0] == '0'))
        return "";
    static const std::map<std::string, std::string, std::less<>> block = {
        {"attn_norm.weight", "input_layernorm.weight"},
        {"ffn_norm.weight", "post_attention_layernorm.weight"},
        {"attn_q.weight", "self_attn.q_proj.weight"},
        {"attn_q.bias", "self_attn.q_proj.bias"},
        {"attn_k.weight", "self_attn.k_proj.weight"},
        {"attn_k.bias", "self_attn.k_proj.bias"},
        {"attn_v.weight", "self_attn.v_proj.weight"},
        {"attn_v.bias", "self_attn.v_proj.bias"},
        {"attn_output.weight", "self_attn.o_proj.weight"},
        {"attn_output.bias", "self_attn.o_proj.bias"},
        {"ffn_gate.weight", "mlp.gate_proj.weight"},
        {"ffn_up.weight", "mlp.up_proj.weight"},
        {"ffn_down.weight", "mlp.down_proj.weight"}};
    const auto it = block.find(name.substr(dot + 1));
    if (it == block.end()) return "";
    return "model.layers." + std::string(layer) + "." + it->second;
}

/// llama.cpp's q/k permutation: row (h, j, i) of transformers' [heads * hd, ...] matrix (head h, half j,
/// i < hd / 2) is row h * hd + 2 i + j of the file's, so `rows` must be a multiple of 2 heads.
inline void check_permuted_rows(Index rows, Index heads) {
    require<FormatError>(heads >= 1 && rows % (2 * heads) == 0, "q/k rows ", rows, ": not a multiple of 2 x ", heads,
                         " heads (llama.cpp's RoPE row permutation needs whole pairs per head)");
}

/// Row order of llama.cpp's q/k permutation undone (see check_permuted_rows for `rows`): for each
/// transformers row, the file's row.
inline std::vector<Index> unpermute_rows(Index rows, Index heads) {
    check_permuted_rows(rows, heads);
    const Index hd = rows / heads, half = hd / 2;
    std::vector<Index> from(static_cast<std::size_t>(rows));
    for (Index h = 0; h < heads; ++h)
        for (Index j = 0; j < 2; ++j)
            for (Index i = 0; i < half; ++i) from[static_cast<std::size_t>(h * hd + j * half + i)] = h * hd + 2 * i + j;
    return from;
}

/// The element type of a GGUF tensor type.
inline ElementType element_type_of(io::GgmlType t) {
    switch (t) {
        case io::GgmlType::f32: return ElementType::f32;
        case io::GgmlType::f16: return ElementType::f16;
        case io::GgmlType::bf16: return ElementType::bf16;
        case io::GgmlType::q8_0: return ElementType::q8_0;
        case io::GgmlType::q4_0: return ElementType::q4_0;
    }
    comigs::detail::raise<FormatError>("ggml type ", static_cast<unsigned>(t), ": not a model weight type");
}

/// The tensors of a GGUF model file under transformers' names (see the file comment), mapped in place
/// except the q/k matrices of llama models, put back in transformers' row order once.
class GgufSource final : public TensorSource {
public:
    /// `qk_heads`: {query heads, key/value heads} of a llama model whose q/k rows llama.cpp permuted, or
    /// nullopt (Qwen2: not permuted). `rope_freqs.weight` is left out (it belongs to the config).
    GgufSource(std::shared_ptr<const io::GgufFile> file, std::string what,
               std::optional<std::pair<Index, Index>> qk_heads)
        : file_(std::move(file)), what_(std::move(what)) {
        require(file_ != nullptr, "GGUF source: null file");
        for (const io::GgufTensor& t : file_->tensors()) {
            if (t.name == "rope_freqs.weight") continue;
            std::string name = hf_name_of_gguf(t.name);
            if (name.empty()) name = t.name;  // kept under its own name: the model load refuses it, naming it
            TensorRef ref;
            ref.name = name;
            ref.type = element_type_of(t.type);
            for (auto it = t.dims.rbegin(); it != t.dims.rend(); ++it) ref.shape.push_back(static_cast<Index>(*it));
            ref.bytes = t.bytes;
            ref.file = t.name;  // error messages name the tensor as the file names it
            if (qk_heads && (t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_q.bias") ||
                             t.name.ends_with(".attn_k.weight") || t.name.ends_with(".attn_k.bias"))) {
                const bool is_q = t.name.find(".attn_q.") != std::string::npos;
                unpermute(ref, is_q ? qk_heads->first : qk_heads->second);
            }
            const std::string key = ref.name;
            require<FormatError>(tensors_.emplace(key, std::move(ref)).second, what_, ": tensors '", t.name,
                                 "' and another both stand for '", key, "'");
        }
    }

    const TensorRef* find(std::string_view name) const override {
        const auto it = tensors_.find(name);
        return it == tensors_.end() ? nullptr : &it->second;
    }
    std::vector<std::string> names() const override {
        std::vector<std::string> v;
        for (const auto& [k, _] : tensors_) v.push_back(k);
        return v;
    }
    std::string description() const override { return what_; }

    const io::GgufFile& file() const { return *file_; }
    /// Bytes of the q/k matrices put back in transformers' order (held beside the mapping).
    std::size_t reordered_bytes() const {
        std::size_t n = 0;
        for (const auto& b : reordered_) n += b.size();
        return n;
    }

private:
    void unpermute(TensorRef& ref, Index heads) {
        const Index rows = ref.shape.empty() ? 1 : ref.shape[0];
        require<FormatError>(ref.shape.size() == 1 || ref.shape.size() == 2, what_, ": tensor '", ref.file, "' has ",
                             ref.shape.size(), " dimensions, expected a matrix or a bias");
        require<FormatError>(!(ref.shape.size() == 1 && is_quantized(ref.type)), what_, ": tensor '", ref.file,
                             "': a ", to_string(ref.type), " bias cannot be reordered");
        try {
            check_permuted_rows(rows, heads);
        } catch (const FormatError& e) {
            comigs::detail::raise<FormatError>(what_, ": tensor '", ref.file, "': ", e.what());
        }
        const std::size_t total = tensor_bytes(ref.type, ref.shape, ref.file);
        require<FormatError>(total == ref.bytes.size(), what_, ": tensor '", ref.file, "' holds ", ref.bytes.size(),
                             " bytes, not ", total);
        // A tensor with a zero dimension has no bytes to move (and null data pointers, which memcpy must not
        // see); its row count, unbounded by the file's size, must not size the row map either.
        if (total == 0) return;
        const std::vector<Index> from = unpermute_rows(rows, heads);  // rows <= total: at least a byte a row
        const std::size_t row = total / static_cast<std::size_t>(rows);
        auto& out = reordered_.emplace_back(total);
        for (std::size_t r = 0; r < from.size(); ++r)
            std::memcpy(out.data() + r * row, ref.bytes.data() + static_cast<std::size_t>(from[r]) * row, row);
        ref.bytes = {out.data(), out.size()};
    }

    std::shared_ptr<const io::GgufFile> file_;
    std::string what_;
    std::map<std::string, TensorRef, std::less<>> tensors_;
    std::vector<comigs::detail::aligned_vector<std::byte>> reordered_;  // never resized: views stay valid
};

/// The LlamaConfig a GGUF file's metadata (and its token_embd, output and rope_freqs tensors) describes;
/// errors are FormatErrors naming the file (`path`) and the key. general.architecture must be "llama" or
/// "qwen2".
inline LlamaConfig gguf_llama_config(const io::GgufFile& f, const std::string& path) {
    const std::string where = "GGUF file '" + path + "'";
    const auto fail = [](auto&&... args) { comigs::detail::raise<FormatError>(args...); };
    try {
        const io::GgufValue* arch_v = f.find("general.architecture");
        if (arch_v == nullptr) fail("no general.architecture (not a model file?)");
        const std::string arch = f.get<std::string>("general.architecture");
        if (arch != "llama" && arch != "qwen2")
            fail("general.architecture '", arch, "' is not supported (comigs loads 'llama' and 'qwen2' GGUF models)");
        if (const io::GgufValue* type = f.find("general.type"); type && type->type == io::GgufType::string &&
                                                                 std::get<std::string>(type->scalar) != "model")
            fail("general.type '", std::get<std::string>(type->scalar), "': not a model (a LoRA adapter?)");
        const auto key = [&](const char* k) { return arch + "." + k; };
        const auto integer = [&](const char* k, std::optional<Index> fallback) -> Index {
            if (!f.find(key(k))) {
                if (!fallback) fail("no metadata key '", key(k), "'");
                return *fallback;
            }
            const std::int64_t v = f.get_int(key(k));
            if (v < 0 || v > (std::int64_t(1) << 40)) fail("'", key(k), "' is ", v, ", outside [0, 2^40]");
            return static_cast<Index>(v);
        };
        const auto number = [&](const char* k, std::optional<double> fallback) -> double {
            if (!f.find(key(k))) {
                if (!fallback) fail("no metadata key '", key(k), "'");
                return *fallback;
            }
            return f.get_float(key(k));
        };
        LlamaConfig c;
        c.model_type = arch;
        c.d_model = integer("embedding_length", std::nullopt);
        c.n_layer = integer("block_count", std::nullopt);
        c.n_head = integer("attention.head_count", std::nullopt);
        c.n_kv_head = integer("attention.head_count_kv", c.n_head);
        c.mlp_hidden = integer("feed_forward_length", std::nullopt);
        c.max_positions = integer("context_length", Index(2048));
        c.rms_eps = number("attention.layer_norm_rms_epsilon", std::nullopt);
        c.rope_theta = number("rope.freq_base", arch == "qwen2" ? 1e6 : 1e4);
        const Index key_length = integer("attention.key_length", Index(0));
        const Index value_length = integer("attention.value_length", key_length);
        if (key_length != value_length)
            fail("'", key("attention.key_length"), "' ", key_length, " and '", key("attention.value_length"), "' ",
                 value_length, " differ (comigs needs one head size)");
        c.head_dim = key_length;
        if (c.n_head >= 1 && c.head_dim == 0 && c.d_model % c.n_head != 0)
            fail("'", key("embedding_length"), "' ", c.d_model, " is not divisible by '", key("attention.head_count"), "' ",
                 c.n_head, " (and no key_length)");
        const Index hd = c.head_dim > 0 ? c.head_dim : (c.n_head > 0 ? c.d_model / c.n_head : 0);
        const Index rope_dims = integer("rope.dimension_count", hd);
        if (rope_dims != hd)
            fail("'", key("rope.dimension_count"), "' ", rope_dims, " is not the head size ", hd,
                 " (partial rotary embeddings are not supported)");
        if (const io::GgufValue* s = f.find(key("rope.scaling.type"))) {
            const std::string type = s->type == io::GgufType::string ? std::get<std::string>(s->scalar) : "?";
            if (type != "none")
                fail("'", key("rope.scaling.type"), "' is '", type, "' (comigs supports none, and llama3's rope_freqs)");
        }
        const io::GgufTensor* embd = f.tensor("token_embd.weight");
        if (embd == nullptr) fail("no tensor 'token_embd.weight'");
        if (embd->dims.size() != 2) fail("tensor 'token_embd.weight' has ", embd->dims.size(), " dimensions, expected 2");
        c.vocab = f.find(key("vocab_size")) ? integer("vocab_size", std::nullopt) : static_cast<Index>(embd->dims[1]);
        c.tie_word_embeddings = f.tensor("output.weight") == nullptr;
        if (arch == "qwen2") {
            c.qkv_bias = true;
        } else {
            c.attention_bias = f.tensor("blk.0.attn_output.bias") != nullptr;
            c.qkv_bias = !c.attention_bias && f.tensor("blk.0.attn_q.bias") != nullptr;
        }
        if (const io::GgufTensor* rf = f.tensor("rope_freqs.weight")) {
            if (rf->type != io::GgmlType::f32 || rf->elements() * 2 != static_cast<std::uint64_t>(hd))
                fail("tensor 'rope_freqs.weight' (", io::to_string(rf->type), ", ", rf->elements(),
                     " values): expected F32, head size / 2 = ", hd / 2, " values");
            c.rope_freq_divisors = f.values<float>("rope_freqs.weight");
        }
        for (const auto& [name, value, limit] : {std::tuple<const char*, Index, Index>{"vocab_size", c.vocab, Index(1) << 24},
                                                 {"embedding_length", c.d_model, Index(1) << 17},
                                                 {"feed_forward_length", c.mlp_hidden, Index(1) << 19},
                                                 {"block_count", c.n_layer, Index(1) << 12},
                                                 {"attention.head_count", c.n_head, Index(1) << 12},
                                                 {"attention.key_length", c.head_dim, Index(1) << 13}})
            if (value > limit) fail("'", key(name), "' ", value, " is beyond what comigs loads (", limit, ")");
        c.validate();
        return c;
    } catch (const Error& e) {  // the metadata's own errors, and the config's checks
        comigs::detail::raise<FormatError>(where, ": ", e.what());
    }
}

/// The pre-tokenizer llama.cpp names by `tokenizer.ggml.pre`, as transformers' tokenizer.json of those
/// models spells it: {stages, ignore_merges, nfc}; nullopt for a name comigs does not know.
struct GgufPreTokenizer {
    text::PreTokenizer pre;
    bool ignore_merges = false;
    bool nfc = false;
};
inline std::optional<GgufPreTokenizer> gguf_pre_tokenizer(std::string_view name) {
    using text::PreTokenizerStage;
    using text::SplitPattern;
    if (name == "gpt-2" || name == "gpt2") return GgufPreTokenizer{text::PreTokenizer::split(SplitPattern::Gpt2)};
    if (name == "llama-bpe" || name == "llama3" || name == "llama-v3")
        return GgufPreTokenizer{text::PreTokenizer::split(SplitPattern::Llama3), true};
    if (name == "smollm")  // SmolLM / SmolLM2: every digit alone, then GPT-2's pattern
        return GgufPreTokenizer{text::PreTokenizer({PreTokenizerStage{PreTokenizerStage::Kind::Digits, SplitPattern::Gpt2, true},
                                                    PreTokenizerStage{PreTokenizerStage::Kind::Split, SplitPattern::Gpt2, false}})};
    if (name == "qwen2") return GgufPreTokenizer{text::PreTokenizer::split(SplitPattern::Qwen2), false, true};
    return std::nullopt;
}

/// The byte-level BPE tokenizer a GGUF file records (tokenizer.ggml.model "gpt2": tokens, token_type,
/// merges, pre); errors are FormatErrors naming the file (`path`): none there, another kind, a bad entry.
inline text::BpeTokenizer gguf_tokenizer(const io::GgufFile& f, const std::string& path) {
    const std::string where = "GGUF file '" + path + "'";
    const auto fail = [](auto&&... args) { comigs::detail::raise<FormatError>(args...); };
    try {
        if (!f.find("tokenizer.ggml.model")) fail("no tokenizer (no tokenizer.ggml.model)");
        const std::string model = f.get<std::string>("tokenizer.ggml.model");
        if (model != "gpt2")
            fail("tokenizer.ggml.model '", model, "' is not supported (comigs reads byte-level BPE, 'gpt2')");
        const std::string pre = f.find("tokenizer.ggml.pre") ? f.get<std::string>("tokenizer.ggml.pre") : "gpt-2";
        const auto p = gguf_pre_tokenizer(pre);
        if (!p)
            fail("tokenizer.ggml.pre '", pre, "' is not a pre-tokenizer comigs knows (gpt-2, llama-bpe, smollm, qwen2)");
        text::BpeVocabulary v;
        v.tokens = f.get_strings("tokenizer.ggml.tokens");
        if (const io::GgufValue* types = f.find("tokenizer.ggml.token_type")) {
            if (!types->is_array() || types->array.size() != v.tokens.size())
                fail("tokenizer.ggml.token_type is not an array of ", v.tokens.size(), " values (one per token)");
            v.kinds.reserve(v.tokens.size());
            for (std::size_t i = 0; i < types->array.size(); ++i) {
                const std::int64_t t = std::visit(
                    [](const auto& x) -> std::int64_t {
                        using U = std::decay_t<decltype(x)>;
                        if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool>) return static_cast<std::int64_t>(x);
                        else return -1;
                    },
                    types->array[i]);
                // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
                using K = text::BpeVocabulary::Kind;
                switch (t) {
                    case 1: case 6: v.kinds.push_back(K::normal); break;
                    case 3: v.kinds.push_back(K::special); break;
                    case 4: v.kinds.push_back(K::added); break;
                    case 2: case 5: v.kinds.push_back(K::unused); break;
                    default: fail("tokenizer.ggml.token_type[", i, "] = ", t, " is not a token type (1 to 6)");
                }
            }
        }
        const std::vector<std::string> merges =
            f.find("tokenizer.ggml.merges") ? f.get_strings("tokenizer.ggml.merges") : std::vector<std::string>{};
        v.merges.reserve(merges.size());
        for (std::size_t r = 0; r < merges.size(); ++r) {
            const std::string& m = merges[r];
            const std::size_t sp = m.find(' ');
            if (sp == std::string::npos || sp == 0 || sp + 1 == m.size() || m.find(' ', sp + 1) != std::string::npos)
                fail("tokenizer.ggml.merges[", r, "] = '", m, "' is not two tokens separated by one space");
            v.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
        }
        v.pre_tokenizer = p->pre;
        v.ignore_merges = p->ignore_merges;
        v.nfc = p->nfc;
        return text::BpeTokenizer::from_vocabulary(v, path);
    } catch (const FormatError& e) {
        if (std::string_view(e.what()).starts_with("tokenizer file '")) throw;  // names the file already
        comigs::detail::raise<FormatError>(where, ": ", e.what());
    }
}

/// Loads a GGUF model file into the Llama host (see the file comment). `options` decide how F16/BF16
/// weights are held (WeightOptions); Q8_0 / Q4_0 matrices are used in place.
template <class T>
LoadedModel<T> load_gguf_model(const std::filesystem::path& path, const WeightOptions& options = {}) {
    const std::string where = "GGUF file '" + path.string() + "'";
    auto file = std::make_shared<const io::GgufFile>(io::GgufFile::open(path));
    const LlamaConfig config = gguf_llama_config(*file, path.string());
    std::optional<std::pair<Index, Index>> qk;
    if (config.model_type == "llama") qk = std::pair<Index, Index>{config.n_head, config.kv_heads()};
    auto source = std::make_shared<const GgufSource>(file, where, qk);
    LoadedModel<T> out;
    out.architecture = config.model_type == "qwen2" ? "Qwen2ForCausalLM (GGUF)" : "LlamaForCausalLM (GGUF)";
    out.model = std::make_unique<Llama<T>>(load_llama_weights<T>(source, config, options, "the GGUF metadata"));
    for (const char* k : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"})
        if (file->find(k)) {
            const std::int64_t id = file->get_int(k);
            if (id >= 0 && id < config.vocab &&
                std::find(out.eos_tokens.begin(), out.eos_tokens.end(), static_cast<int>(id)) == out.eos_tokens.end())
                out.eos_tokens.push_back(static_cast<int>(id));
        }
    if (file->find("tokenizer.ggml.bos_token_id")) {
        const std::int64_t id = file->get_int("tokenizer.ggml.bos_token_id");
        if (id >= 0 && id < config.vocab) out.bos_token = static_cast<int>(id);
    }
    std::error_code ec;
    out.file_bytes = static_cast<std::size_t>(std::filesystem::file_size(path, ec));
    out.gguf = std::move(file);
    return out;
}

/// True when `path` is a file that starts with GGUF's magic.
inline bool is_gguf_file(const std::filesystem::path& path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) return false;
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) return false;
    char magic[4] = {};
    const bool ok = std::fread(magic, 1, 4, f) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
    std::fclose(f);
    return ok;
}

/// A GGUF model file (load_gguf_model) or a Hugging Face model folder (load_hf_model).
template <class T>
LoadedModel<T> load_model(const std::filesystem::path& path, const WeightOptions& options = {}) {
    return is_gguf_file(path) ? load_gguf_model<T>(path, options) : load_hf_model<T>(path, options);
}

}  // namespace comigs::models
