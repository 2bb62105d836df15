#pragma once
// comigs-demo on a real model (--model PATH): a Hugging Face folder (GPT-2, Llama, Qwen2; models/hf_model.hpp)
// or a GGUF model file (llama, qwen2; models/gguf_model.hpp, Q8_0 / Q4_0 bases kept quantized) replaces the
// pretrained tiny host, and the users' text is cut with the model's own tokenizer (a GGUF file's from its
// metadata).
//
// A folder with tokenizer.json (or vocab.json + merges.txt) uses its byte-level BPE tokenizer
// (comigs/text/bpe_tokenizer.hpp); a model of vocabulary 256 without tokenizer files is byte-level
// (the demo's own saved host is one: `--model comigs-demo-out/host-<key>.safetensors`). Split sizes
// (--train-tokens, --val-tokens, --test-tokens) count the model's tokens: each user's text is split by
// bytes in proportion (its bytes per token, measured on the whole text), then every split is cut to
// the tokens asked for.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <comigs/models.hpp>

#include "corpus.hpp"

#if __has_include(<comigs/text/bpe_tokenizer.hpp>)
#include <comigs/text/bpe_tokenizer.hpp>
#define COMIGS_DEMO_HAVE_TOKENIZER 1
#else
#define COMIGS_DEMO_HAVE_TOKENIZER 0
#endif

namespace comigs::demo {

/// How text becomes a model's token ids, and a token id text again (routing.html).
class TextCodec {
public:
    /// The tokenizer of a model folder, or bytes for a byte-level model (vocabulary 256, no tokenizer).
    static TextCodec for_model(const std::filesystem::path& folder, Index vocab) {
        namespace fs = std::filesystem;
        std::error_code ec;
        const bool has_files = fs::exists(folder / "tokenizer.json", ec) ||
                               (fs::exists(folder / "vocab.json", ec) && fs::exists(folder / "merges.txt", ec)) ||
                               (fs::exists(folder / "encoder.json", ec) && fs::exists(folder / "vocab.bpe", ec));
        TextCodec c;
        if (has_files) {
#if COMIGS_DEMO_HAVE_TOKENIZER
            c.bpe_ = std::make_shared<text::BpeTokenizer>(text::BpeTokenizer::load(folder));
            require(c.bpe_->vocab_size() <= vocab, "tokenizer of '", folder.string(), "': ", c.bpe_->vocab_size(),
                    " tokens, more than the model's vocabulary of ", vocab);
            c.what_ = "the model's BPE tokenizer (" + std::to_string(c.bpe_->vocab_size()) + " tokens)";
            return c;
#else
            comigs::detail::raise<InvalidArgument>("--model '", folder.string(), "': has a tokenizer, but this build of "
                                                   "comigs-demo has none (include/comigs/text/bpe_tokenizer.hpp)");
#endif
        }
        require(vocab == 256, "--model '", folder.string(), "': no tokenizer.json (or vocab.json + merges.txt) and a "
                "vocabulary of ", vocab, ", not 256: the text cannot be cut into its tokens");
        c.what_ = "bytes (a byte-level model)";
        return c;
    }

#if COMIGS_DEMO_HAVE_TOKENIZER
    /// A tokenizer the model brought in another form (a GGUF file's metadata); `path` names the model.
    static TextCodec for_tokenizer(text::BpeTokenizer t, const std::string& path, Index vocab) {
        require(t.vocab_size() <= vocab, "tokenizer of '", path, "': ", t.vocab_size(),
                " tokens, more than the model's vocabulary of ", vocab);
        TextCodec c;
        c.bpe_ = std::make_shared<text::BpeTokenizer>(std::move(t));
        c.what_ = "the model's BPE tokenizer (" + std::to_string(c.bpe_->vocab_size()) + " tokens, from the GGUF file)";
        return c;
    }
#endif

    bool byte_level() const { return !bpe_; }
    const std::string& description() const { return what_; }

    std::vector<std::int32_t> encode(std::string_view text) const {
        std::vector<std::int32_t> out;
#if COMIGS_DEMO_HAVE_TOKENIZER
        if (bpe_) {
            const auto ids = bpe_->encode(text);
            out.assign(ids.begin(), ids.end());
            return out;
        }
#endif
        append_bytes(out, text);
        return out;
    }
    /// The text of one token (a BPE token may hold part of a UTF-8 character: its bytes as they are).
    std::string token_text(std::int32_t id) const {
#if COMIGS_DEMO_HAVE_TOKENIZER
        if (bpe_) {
            const std::int32_t one[1] = {id};
            return bpe_->decode(one);
        }
#endif
        return std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
    }

private:
#if COMIGS_DEMO_HAVE_TOKENIZER
    std::shared_ptr<const text::BpeTokenizer> bpe_;
#else
    std::shared_ptr<const void> bpe_;
#endif
    std::string what_;
};

/// The real host of a run: the model (frozen base, mapped) and its codec.
template <class T>
struct DemoModel {
    models::LoadedModel<T> loaded;
    TextCodec codec;
    std::string path;

    models::CausalLm<T>& model() { return *loaded.model; }
};

/// Loads --model PATH. BF16 weights stay BF16; products round activations to bf16 unless
/// `fp32_compute` (then the weights' exact values are multiplied in fp32, slower).
template <class T>
DemoModel<T> load_demo_model(const std::string& path, bool fp32_compute) {
    namespace fs = std::filesystem;
    DemoModel<T> d;
    d.path = path;
    d.loaded = models::load_model<T>(path, {.keep_bf16 = true, .fp32_compute = fp32_compute});
    std::error_code ec;
#if COMIGS_DEMO_HAVE_TOKENIZER
    if (d.loaded.gguf && d.loaded.gguf->find("tokenizer.ggml.model")) {
        d.codec = TextCodec::for_tokenizer(models::gguf_tokenizer(*d.loaded.gguf, path), path, d.loaded.model->vocab());
        return d;
    }
#endif
    const fs::path folder = fs::is_directory(path, ec) ? fs::path(path) : fs::path(path).parent_path();
    d.codec = TextCodec::for_model(folder, d.loaded.model->vocab());
    return d;
}

/// Bytes of text per model token, measured on `text` (1 for a byte-level codec).
inline double bytes_per_token(const TextCodec& codec, std::string_view text) {
    if (codec.byte_level() || text.empty()) return 1.0;
    const auto ids = codec.encode(text);
    return ids.empty() ? 1.0 : double(text.size()) / double(ids.size());
}

/// A byte budget that holds `tokens` model tokens of a text with `bpt` bytes per token (with margin:
/// the splits differ a little in density); 0 (none) and negative (all of it) stay as they are.
inline Index byte_budget(Index tokens, double bpt) {
    if (tokens <= 0 || bpt == 1.0) return tokens;
    return static_cast<Index>(std::ceil(double(tokens) * bpt * 1.15)) + 64;
}

/// Re-encodes a stream of byte tokens with the codec and cuts it to `limit` tokens (< 0: all).
inline void tokenize_stream(Stream& s, const TextCodec& codec, Index limit) {
    if (!codec.byte_level()) {
        std::string text(s.tokens.size(), '\0');
        for (std::size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>(static_cast<unsigned char>(s.tokens[i]));
        s.tokens = codec.encode(text);
    }
    if (limit >= 0 && s.size() > limit) s.tokens.resize(static_cast<std::size_t>(limit));
    s.personal.assign(s.tokens.size(), 0);
}

}  // namespace comigs::demo
