#pragma once
// What comigs-eval and comigs-generate share: loading a model folder or GGUF file (and an adapter file),
// how its BF16 weights are computed with, its tokenizer, and token ids from the command line.
#include <CLI/CLI.hpp>
#include <omp.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <comigs/models.hpp>

#if __has_include(<comigs/text/bpe_tokenizer.hpp>)
#include <comigs/text/bpe_tokenizer.hpp>
#define COMIGS_MODELS_HAVE_TOKENIZER 1
#else
#define COMIGS_MODELS_HAVE_TOKENIZER 0
#endif

namespace comigs::model_cli {

/// The options every model program takes.
struct ModelOptions {
    std::string model;
    std::string adapter;
    bool bf16_compute = false;  ///< bf16 activations against BF16 weights (faster; about 3 digits)
    bool widen = false;         ///< widen every BF16 matrix to fp32 at load (twice the memory)
    std::string precision;  ///< "" (as the file holds it), q8_0 or q4_0 (quantized at load)
    int threads = 0;

    void add_to(CLI::App& app) {
        app.add_option("--model", model,
                       "Hugging Face model folder (config.json + model.safetensors, or shards with "
                       "model.safetensors.index.json): GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM; or a "
                       "GGUF model file (llama.cpp; architecture llama or qwen2; F32/F16/BF16/Q8_0/Q4_0 tensors)")
            ->required();
        app.add_option("--adapter", adapter, "adapter file (comigs-demo's per-user adapters, save_adapters)")
            ->check(CLI::ExistingFile);
        app.add_flag("--bf16-compute", bf16_compute,
                     "multiply BF16 weights by bf16-rounded activations (bf16 dot products; about 3 significant "
                     "digits), and Q8_0/Q4_0 weights with their default rounded products (bf16 panels; int8 "
                     "activations for Q4_0 decode). Default: fp32 arithmetic on the exact BF16 / dequantized "
                     "values, weights widened a panel at a time inside each product, never as a whole");
        app.add_flag("--widen", widen, "widen the whole BF16 base to fp32 at load (twice the memory of the file)");
        app.add_option("--precision", precision,
                       "quantize the frozen matrices (attention, MLP, head) at load into GGML blocks: q8_0 "
                       "(1.0625 bytes a weight) or q4_0 (0.5625); products use the dequantized values. "
                       "Default: as the file holds them. A GGUF file's Q8_0/Q4_0 matrices stay as they are")
            ->check(CLI::IsMember({"q8_0", "q4_0"}));
        app.add_option("--threads", threads, "OpenMP threads (default: OMP_NUM_THREADS or all cores)");
    }
    models::WeightOptions weights() const {
        models::WeightOptions w{.keep_bf16 = !widen, .fp32_compute = !bf16_compute};
        if (precision == "q8_0") w.quantize = kernels::QuantType::q8_0;
        if (precision == "q4_0") w.quantize = kernels::QuantType::q4_0;
        return w;
    }
};

/// The loaded model, with the adapters installed when asked for.
struct Loaded {
    models::LoadedModel<float> lm;
    std::vector<std::shared_ptr<MixtureOfLoraMlp<float>>> mixtures;
    std::filesystem::path folder;
};

/// Loads the model (and the adapters). Compiled once, in model_cli.cpp (the comigs_model_cli library):
/// the loaders instantiate every host, the bulk of compiling comigs-eval and comigs-generate.
Loaded load(const ModelOptions& o);

#ifdef COMIGS_MODEL_CLI_IMPLEMENTATION
Loaded load(const ModelOptions& o) {
    if (o.threads > 0) omp_set_num_threads(o.threads);
    Loaded l;
    l.lm = models::load_model<float>(o.model, o.weights());
    std::error_code ec;
    l.folder = std::filesystem::is_directory(o.model, ec) ? std::filesystem::path(o.model)
                                                           : std::filesystem::path(o.model).parent_path();
    if (!o.adapter.empty()) l.mixtures = models::load_adapters(o.adapter, *l.lm.model);
    auto& m = *l.lm.model;
    std::fprintf(stderr, "%s: %s, %ld blocks, d %ld, vocabulary %ld, context %ld; %.1f MB of weights mapped; %s%s\n",
                 o.model.c_str(), l.lm.architecture.c_str(), long(m.n_layer()), long(m.d_model()), long(m.vocab()),
                 long(m.max_positions()), double(l.lm.file_bytes) / 1e6,
                 !o.precision.empty() ? ("quantized to " + o.precision + " at load").c_str()
                 : o.widen            ? "BF16 widened to fp32"
                 : o.bf16_compute     ? "bf16 products"
                                      : "fp32 compute",
                 o.adapter.empty() ? "" : (", adapters from " + o.adapter + (l.mixtures.empty() ? "" : " (mixtures on every MLP)")).c_str());
    return l;
}
#endif  // COMIGS_MODEL_CLI_IMPLEMENTATION

/// "1 2 3" or "1,2,3" -> ids, each checked against the vocabulary.
inline std::vector<int> parse_ids(const std::string& text, Index vocab) {
    std::string s = text;
    for (char& c : s)
        if (c == ',') c = ' ';
    std::istringstream in(s);
    std::vector<int> ids;
    std::string item;
    while (in >> item) {
        std::size_t used = 0;
        long v = -1;
        try {
            v = std::stol(item, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        require(used == item.size(), "--ids entry '", item, "': not an integer");
        require(v >= 0 && v < vocab, "--ids entry ", v, ": outside the vocabulary [0, ", vocab, ")");
        ids.push_back(static_cast<int>(v));
    }
    require(!ids.empty(), "--ids: no token ids given");
    return ids;
}

#if COMIGS_MODELS_HAVE_TOKENIZER
/// True when the model brings a tokenizer: tokenizer files in its folder, or a GGUF file's metadata.
inline bool has_tokenizer(const Loaded& l) {
    std::error_code ec;
    if (l.lm.gguf) return l.lm.gguf->find("tokenizer.ggml.model") != nullptr;
    return std::filesystem::exists(l.folder / "tokenizer.json", ec) || std::filesystem::exists(l.folder / "vocab.json", ec);
}

/// The model's tokenizer: a GGUF file's metadata (tokenizer.ggml.*), or the folder's tokenizer.json (or
/// vocab.json + merges.txt).
text::BpeTokenizer tokenizer(const Loaded& l, const std::string& model_path, Index vocab);

#ifdef COMIGS_MODEL_CLI_IMPLEMENTATION
text::BpeTokenizer tokenizer(const Loaded& l, const std::string& model_path, Index vocab) {
    auto t = l.lm.gguf ? models::gguf_tokenizer(*l.lm.gguf, model_path) : text::BpeTokenizer::load(l.folder);
    require(t.vocab_size() <= vocab, "tokenizer of '", model_path, "': ", t.vocab_size(),
            " tokens, more than the model's vocabulary of ", vocab);
    return t;
}
#endif  // COMIGS_MODEL_CLI_IMPLEMENTATION
#endif

}  // namespace comigs::model_cli
