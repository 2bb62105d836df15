#pragma once
// Hugging Face model folders: `config.json` plus `model.safetensors`, or shards
// `model-0000i-of-0000N.safetensors` listed by `model.safetensors.index.json` (its "weight_map" names
// the shard of every tensor). Shards are memory-mapped and read in place (io::MappedFile): a BF16
// model's matrices stay in the page cache, held once, however many simulated users share them.
//
// Architectures: GPT2LMHeadModel (models/gpt2.hpp), LlamaForCausalLM and Qwen2ForCausalLM
// (models/llama.hpp). Anything else is a FormatError naming the architecture and the file; so are a
// missing shard, a tensor the index puts in a shard that does not hold it, and a config that disagrees
// with the tensors (ShapeError naming the tensor, its file, both shapes and the config values).
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include <comigs/error.hpp>
#include <comigs/io/gguf.hpp>
#include <comigs/io/mapped_file.hpp>
#include <comigs/io/safetensors.hpp>

#include "causal_lm.hpp"
#include "gpt2.hpp"
#include "hf_gpt2.hpp"
#include "llama.hpp"
#include "tensor_source.hpp"

namespace comigs::models {

/// The "weight_map" of a model.safetensors.index.json text: shard file -> the tensors it holds, in name
/// order. Every value must be a plain file name (a path leading out of the folder is refused, not
/// followed). FormatError naming `where` and the bad value otherwise.
inline std::map<std::string, std::vector<std::string>> parse_index(std::string_view text, const std::string& where) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        comigs::detail::raise<FormatError>(where, ": not valid JSON (", e.what(), ")");
    }
    require<FormatError>(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), where,
                         ": no \"weight_map\" object");
    std::map<std::string, std::vector<std::string>> shards;
    for (const auto& [name, file] : j["weight_map"].items()) {
        require<FormatError>(file.is_string(), where, ": weight_map[", comigs::detail::quote_name(name), "] is ", file.dump(),
                             ", not a file name");
        const std::string s = file.get<std::string>();
        require<FormatError>(!s.empty() && s.find('/') == std::string::npos && s.find('\\') == std::string::npos &&
                                 s.find('\0') == std::string::npos && s != "." && s != "..",
                             where, ": weight_map[", comigs::detail::quote_name(name), "] = ", file.dump(), " is not a file name in the folder");
        shards[s].push_back(name);
    }
    require<FormatError>(!shards.empty(), where, ": the weight_map is empty");
    return shards;
}

/// The tensors of a Hugging Face model folder (or of one safetensors file), mapped in place.
class SafetensorsFolder final : public TensorSource {
public:
    /// `path`: a folder with model.safetensors or model.safetensors.index.json + shards, or one
    /// .safetensors file. Errors name the folder or file and the bad value.
    static std::shared_ptr<const SafetensorsFolder> open(const std::filesystem::path& path) {
        namespace fs = std::filesystem;
        auto f = std::shared_ptr<SafetensorsFolder>(new SafetensorsFolder());
        std::error_code ec;
        if (fs::is_regular_file(path, ec)) {
            f->root_ = path.parent_path();
            f->what_ = "model file '" + path.string() + "'";
            f->add_shard(path, nullptr);
            return f;
        }
        require<IoError>(fs::is_directory(path, ec), "model '", path.string(), "': no such folder or file");
        f->root_ = path;
        f->what_ = "model folder '" + path.string() + "'";
        const fs::path single = path / "model.safetensors", index = path / "model.safetensors.index.json";
        if (fs::exists(index, ec)) {
            f->read_index(index);
        } else if (fs::exists(single, ec)) {
            f->add_shard(single, nullptr);
        } else {
            const bool pt = fs::exists(path / "pytorch_model.bin", ec);
            comigs::detail::raise<IoError>(f->what_, ": no model.safetensors or model.safetensors.index.json",
                                           pt ? " (pytorch_model.bin is not read: save the model with "
                                                "safe_serialization=True, or convert it)"
                                              : "");
        }
        return f;
    }

    const TensorRef* find(std::string_view name) const override {
        const auto it = tensors_.find(name);
        return it == tensors_.end() ? nullptr : &it->second;
    }
    std::vector<std::string> names() const override {
        std::vector<std::string> v;
        v.reserve(tensors_.size());
        for (const auto& [k, _] : tensors_) v.push_back(k);
        return v;
    }
    std::string description() const override { return what_; }

    /// Drops the resident pages of a tensor's bytes (whole pages inside it) from its shard's mapping.
    void release(const TensorRef& t) const override {
        const auto p = reinterpret_cast<std::uintptr_t>(t.bytes.data());
        for (const auto& m : maps_) {
            const auto b = m->bytes();
            const auto lo = reinterpret_cast<std::uintptr_t>(b.data());
            if (p >= lo && p - lo + t.bytes.size() <= b.size()) {
                m->release(static_cast<std::size_t>(p - lo), t.bytes.size());
                return;
            }
        }
    }

    const std::filesystem::path& root() const { return root_; }
    /// The `__metadata__` of the first shard (e.g. the n_head comigs writes into GPT-2 files).
    const io::SafetensorsMetadata& metadata() const { return metadata_; }
    /// Bytes of all shards (what a mapped model costs at most in memory).
    std::size_t file_bytes() const {
        std::size_t n = 0;
        for (const auto& m : maps_) n += m->size();
        return n;
    }

private:
    SafetensorsFolder() = default;

    void read_index(const std::filesystem::path& index) {
        std::string text;
        {
            std::ifstream in(index, std::ios::binary);
            require<IoError>(static_cast<bool>(in), what_, ": cannot open '", index.string(), "'");
            std::ostringstream ss;
            ss << in.rdbuf();
            text = ss.str();
        }
        const auto shards = parse_index(text, "'" + index.string() + "'");
        for (const auto& [file, names] : shards) {
            const std::filesystem::path p = root_ / file;
            std::error_code ec;
            require<IoError>(std::filesystem::is_regular_file(p, ec), what_, ": shard '", file, "' (holding '",
                             names.front(), "' and ", names.size() - 1, " more tensors, named by ",
                             "model.safetensors.index.json) is missing");
            add_shard(p, &names);
        }
    }

    /// Maps one safetensors file; with `only`, keeps exactly those tensors (each must be there).
    void add_shard(const std::filesystem::path& path, const std::vector<std::string>* only) {
        auto map = std::make_unique<io::MappedFile>(io::MappedFile::open(path));
        const auto bytes = map->bytes();
        const std::string file = path.filename().string();
        try {
            if (bytes.size() < 8)
                comigs::detail::raise<FormatError>("file is ", bytes.size(), " bytes, shorter than the 8-byte header length");
            const std::uint64_t n = comigs::detail::safetensors_header_length(bytes.first<8>(), bytes.size());
            const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, static_cast<std::size_t>(n));
            const auto data = bytes.subspan(8 + static_cast<std::size_t>(n));
            comigs::detail::SafetensorsHeader h = comigs::detail::parse_safetensors_header(text, data.size());
            if (maps_.empty()) metadata_ = h.metadata;
            std::set<std::string, std::less<>> wanted;
            if (only) wanted.insert(only->begin(), only->end());
            for (auto& e : h.entries) {
                if (only && !wanted.count(e.name)) continue;
                wanted.erase(e.name);
                require<FormatError>(!tensors_.count(e.name), "tensor '", e.name, "' is also in another shard");
                const ElementType type = element_type_of(e.dtype, "tensor '" + e.name + "'");
                TensorRef ref{e.name, type, e.shape,
                              data.subspan(static_cast<std::size_t>(e.begin), static_cast<std::size_t>(e.end - e.begin)),
                              file};
                tensors_.emplace(e.name, std::move(ref));
            }
            if (!wanted.empty())
                comigs::detail::raise<FormatError>("tensor '", *wanted.begin(), "' is put in this shard by ",
                                                   "model.safetensors.index.json but is not in it");
        } catch (const FormatError& e) {
            comigs::detail::raise<FormatError>(what_, ": safetensors file '", path.string(), "': ", e.what());
        }
        maps_.push_back(std::move(map));
    }

    std::filesystem::path root_;
    std::string what_;
    std::vector<std::unique_ptr<io::MappedFile>> maps_;
    std::map<std::string, TensorRef, std::less<>> tensors_;
    io::SafetensorsMetadata metadata_;
};

/// config.json, parsed, with where it came from (error messages name it).
struct HfConfig {
    nlohmann::json json;
    std::string where;         ///< "config.json '/models/x/config.json'"
    std::string architecture;  ///< "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"

    /// Reads `folder/config.json`; FormatError for a file that is not a JSON object.
    static HfConfig load(const std::filesystem::path& folder) {
        const std::filesystem::path p = folder / "config.json";
        HfConfig c;
        c.where = "config.json '" + p.string() + "'";
        std::ifstream in(p, std::ios::binary);
        require<IoError>(static_cast<bool>(in), "model folder '", folder.string(), "': cannot open config.json");
        try {
            c.json = nlohmann::json::parse(in);
        } catch (const nlohmann::json::exception& e) {
            comigs::detail::raise<FormatError>(c.where, ": not valid JSON (", e.what(), ")");
        }
        c.resolve_architecture();
        return c;
    }
    /// From JSON text (tests, the fuzzer): `where` names it in errors.
    static HfConfig parse(std::string_view text, std::string where = "config.json") {
        HfConfig c;
        c.where = std::move(where);
        try {
            c.json = nlohmann::json::parse(text);
        } catch (const nlohmann::json::exception& e) {
            comigs::detail::raise<FormatError>(c.where, ": not valid JSON (", e.what(), ")");
        }
        c.resolve_architecture();
        return c;
    }

    bool has(const char* key) const { return json.contains(key) && !json[key].is_null(); }

    Index integer(const char* key, std::optional<Index> fallback = std::nullopt) const {
        if (!has(key)) {
            require<FormatError>(fallback.has_value(), where, ": no \"", key, "\"");
            return *fallback;
        }
        const auto& v = json[key];
        require<FormatError>(v.is_number_integer(), where, ": \"", key, "\" is ", v.dump(), ", not an integer");
        const auto i = v.get<std::int64_t>();
        require<FormatError>(i >= 0 && i <= (std::int64_t(1) << 40), where, ": \"", key, "\" is ", i,
                             ", outside [0, 2^40]");
        return static_cast<Index>(i);
    }
    double number(const char* key, std::optional<double> fallback = std::nullopt) const {
        if (!has(key)) {
            require<FormatError>(fallback.has_value(), where, ": no \"", key, "\"");
            return *fallback;
        }
        const auto& v = json[key];
        require<FormatError>(v.is_number(), where, ": \"", key, "\" is ", v.dump(), ", not a number");
        return v.get<double>();
    }
    bool boolean(const char* key, bool fallback) const {
        if (!has(key)) return fallback;
        const auto& v = json[key];
        require<FormatError>(v.is_boolean(), where, ": \"", key, "\" is ", v.dump(), ", not true or false");
        return v.get<bool>();
    }
    /// A token id field that may be an int or a list of ints (eos_token_id); empty when absent.
    std::vector<int> token_ids(const char* key) const {
        std::vector<int> out;
        if (!has(key)) return out;
        const auto& v = json[key];
        const auto one = [&](const nlohmann::json& x) {
            require<FormatError>(x.is_number_integer() && x.get<std::int64_t>() >= 0 && x.get<std::int64_t>() < (1 << 30),
                                 where, ": \"", key, "\" holds ", x.dump(), ", not a token id");
            out.push_back(static_cast<int>(x.get<std::int64_t>()));
        };
        if (v.is_array())
            for (const auto& x : v) one(x);
        else
            one(v);
        return out;
    }

private:
    void resolve_architecture() {
        require<FormatError>(json.is_object(), where, ": not a JSON object");
        if (has("architectures")) {
            const auto& a = json["architectures"];
            require<FormatError>(a.is_array() && a.size() == 1 && a[0].is_string(), where, ": \"architectures\" is ",
                                 a.dump(), ", expected one name");
            architecture = a[0].get<std::string>();
        } else if (has("model_type") && json["model_type"].is_string()) {
            const std::string t = json["model_type"].get<std::string>();
            architecture = t == "gpt2" ? "GPT2LMHeadModel" : t == "llama" ? "LlamaForCausalLM"
                         : t == "qwen2" ? "Qwen2ForCausalLM" : t;
        } else {
            comigs::detail::raise<FormatError>(where, ": no \"architectures\" or \"model_type\"");
        }
        static const std::set<std::string, std::less<>> supported = {"GPT2LMHeadModel", "GPT2Model",
                                                                     "LlamaForCausalLM", "Qwen2ForCausalLM"};
        require<FormatError>(supported.count(architecture) > 0, where, ": architecture '", architecture,
                             "' is not supported (comigs runs GPT2LMHeadModel, LlamaForCausalLM and Qwen2ForCausalLM)");
    }
};

/// The LlamaConfig of a LlamaForCausalLM or Qwen2ForCausalLM config.json (transformers' defaults where
/// a field is absent).
inline LlamaConfig llama_config(const HfConfig& h) {
    const bool qwen = h.architecture == "Qwen2ForCausalLM";
    require<FormatError>(qwen || h.architecture == "LlamaForCausalLM", h.where, ": architecture '", h.architecture,
                         "' is not a Llama-family model");
    LlamaConfig c;
    c.model_type = qwen ? "qwen2" : "llama";
    c.vocab = h.integer("vocab_size");
    c.d_model = h.integer("hidden_size");
    c.n_layer = h.integer("num_hidden_layers");
    c.n_head = h.integer("num_attention_heads");
    c.n_kv_head = h.integer("num_key_value_heads", c.n_head);
    c.head_dim = h.integer("head_dim", Index(0));
    c.mlp_hidden = h.integer("intermediate_size");
    c.max_positions = h.integer("max_position_embeddings", qwen ? Index(32768) : Index(2048));
    c.rms_eps = h.number("rms_norm_eps", 1e-6);
    c.rope_theta = h.number("rope_theta", qwen ? 1e6 : 1e4);
    c.tie_word_embeddings = h.boolean("tie_word_embeddings", false);
    c.attention_bias = !qwen && h.boolean("attention_bias", false);
    c.qkv_bias = qwen;
    require<FormatError>(!h.boolean("mlp_bias", false), h.where, ": \"mlp_bias\" true is not supported");
    if (qwen)
        require<FormatError>(!h.boolean("use_sliding_window", false), h.where,
                             ": \"use_sliding_window\" true is not supported (full attention only)");
    if (h.has("hidden_act")) {
        const auto& act = h.json["hidden_act"];
        require<FormatError>(act == "silu", h.where, ": \"hidden_act\" ", act.dump(), " is not supported (silu)");
    }
    if (h.has("rope_scaling")) {
        const auto& r = h.json["rope_scaling"];
        require<FormatError>(r.is_object(), h.where, ": \"rope_scaling\" is ", r.dump(), ", expected an object or null");
        const std::string type = r.contains("rope_type") && r["rope_type"].is_string() ? r["rope_type"].get<std::string>()
                                 : r.contains("type") && r["type"].is_string()         ? r["type"].get<std::string>()
                                                                                       : std::string();
        if (type != "default") {
            require<FormatError>(type == "llama3", h.where, ": rope_scaling type '", type,
                                 "' is not supported (llama3, or none)");
            HfConfig sub{r, h.where + " rope_scaling", h.architecture};
            Llama3RopeScaling s;
            s.factor = sub.number("factor");
            s.low_freq_factor = sub.number("low_freq_factor");
            s.high_freq_factor = sub.number("high_freq_factor");
            s.original_max_position_embeddings = sub.number("original_max_position_embeddings");
            c.rope_scaling = s;
        }
    }
    // Beyond any model's sizes (and what a test's memory holds): refused before anything is allocated.
    for (const auto& [name, value, limit] : {std::tuple<const char*, Index, Index>{"vocab_size", c.vocab, Index(1) << 24},
                                             {"hidden_size", c.d_model, Index(1) << 17},
                                             {"intermediate_size", c.mlp_hidden, Index(1) << 19},
                                             {"num_hidden_layers", c.n_layer, Index(1) << 12},
                                             {"num_attention_heads", c.n_head, Index(1) << 12},
                                             {"head_dim", c.head_dim, Index(1) << 13}})
        require<FormatError>(value <= limit, h.where, ": \"", name, "\" ", value, " is beyond what comigs loads (", limit, ")");
    try {
        c.validate();
    } catch (const InvalidArgument& e) {
        comigs::detail::raise<FormatError>(h.where, ": ", e.what());
    }
    return c;
}

/// The Gpt2Config of a GPT2LMHeadModel config.json.
inline Gpt2Config gpt2_config(const HfConfig& h) {
    Gpt2Config c;
    c.vocab = h.integer("vocab_size", Index(50257));
    c.n_ctx = h.integer("n_positions", Index(1024));
    c.d_model = h.integer("n_embd", Index(768));
    c.n_layer = h.integer("n_layer", Index(12));
    c.n_head = h.integer("n_head", Index(12));
    c.mlp_hidden = h.integer("n_inner", Index(0));
    if (h.has("activation_function")) {
        const auto& act = h.json["activation_function"];
        require<FormatError>(act == "gelu_new" || act == "gelu_pytorch_tanh", h.where, ": \"activation_function\" ",
                             act.dump(), " is not supported (gelu_new)");
    }
    const double eps = h.number("layer_norm_epsilon", 1e-5);
    require<FormatError>(eps == 1e-5, h.where, ": \"layer_norm_epsilon\" ", eps, " is not supported (1e-5)");
    require<FormatError>(h.boolean("tie_word_embeddings", true), h.where,
                         ": \"tie_word_embeddings\" false is not supported for GPT-2 (the head is wte)");
    for (const char* k : {"scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"})
        require<FormatError>(!h.boolean(k, false), h.where, ": \"", k, "\" true is not supported");
    require<FormatError>(h.boolean("scale_attn_weights", true), h.where, ": \"scale_attn_weights\" false is not supported");
    for (const auto& [name, value, limit] : {std::tuple<const char*, Index, Index>{"vocab_size", c.vocab, Index(1) << 24},
                                             {"n_embd", c.d_model, Index(1) << 17},
                                             {"n_inner", c.mlp_hidden, Index(1) << 19},
                                             {"n_layer", c.n_layer, Index(1) << 12},
                                             {"n_positions", c.n_ctx, Index(1) << 20}})
        require<FormatError>(value <= limit, h.where, ": \"", name, "\" ", value, " is beyond what comigs loads (", limit, ")");
    try {
        c.validate();
    } catch (const InvalidArgument& e) {
        comigs::detail::raise<FormatError>(h.where, ": ", e.what());
    }
    return c;
}

/// A model loaded from a folder, with what generation needs from its config.
template <class T>
struct LoadedModel {
    std::unique_ptr<CausalLm<T>> model;
    std::string architecture;     ///< as config.json names it
    std::vector<int> eos_tokens;  ///< eos_token_id (an int or a list), may be empty
    std::optional<int> bos_token;
    std::size_t file_bytes = 0;   ///< the model's file bytes (mapped)
    /// The GGUF file a model came from (its metadata holds the tokenizer: gguf_model.hpp), or null.
    std::shared_ptr<const io::GgufFile> gguf;
};

/// Loads a GPT-2, Llama or Qwen2 model folder (see the file comment). `options` decide how the frozen
/// weights are held (WeightOptions: BF16 kept as BF16 by default; F16 is widened, as no F16 products
/// exist). A GPT-2 safetensors file without config.json (the demo's saved host) loads too when it
/// records its head count.
template <class T>
LoadedModel<T> load_hf_model(const std::filesystem::path& path, const WeightOptions& options = {}) {
    namespace fs = std::filesystem;
    auto src = SafetensorsFolder::open(path);
    LoadedModel<T> out;
    out.file_bytes = src->file_bytes();
    std::error_code ec;
    const fs::path folder = fs::is_directory(path, ec) ? path : path.parent_path();
    if (!fs::exists(folder / "config.json", ec) && src->metadata().count(std::string(detail::n_head_key))) {
        out.architecture = "GPT2LMHeadModel";
        out.model = load_gpt2<T>(src, hf_gpt2_config_from_source(*src, std::nullopt, src->metadata()), options,
                                 "the file's metadata");
        return out;
    }
    const HfConfig h = HfConfig::load(folder);
    out.architecture = h.architecture;
    out.eos_tokens = h.token_ids("eos_token_id");
    const auto bos = h.token_ids("bos_token_id");
    if (!bos.empty()) out.bos_token = bos.front();
    if (h.architecture == "LlamaForCausalLM" || h.architecture == "Qwen2ForCausalLM") {
        out.model = std::make_unique<Llama<T>>(load_llama_weights<T>(src, llama_config(h), options, h.where));
    } else {
        out.model = load_gpt2<T>(src, gpt2_config(h), options, h.where);
    }
    return out;
}

}  // namespace comigs::models
