#pragma once
// Generating tokens from a model.
//
// generate(): KV-cached generation for any CausalLm (GPT-2, Llama, Qwen2), the MLP plug-ins (mixtures:
// the router runs per token) in inference mode. The prompt is run once, then one token per step against
// the cache. Sampling as transformers' logits warpers do it, in this order: temperature, top-k, top-p
// (nucleus: the smallest set of most likely tokens whose probability reaches p), then a draw from a
// seeded generator; temperature <= 0 is greedy (argmax). Generation stops after max_new_tokens, after a
// stop token (EOS; it is part of the output), or when the streaming callback returns false.
//
// generate_windowed() / generate_text(): the demo's byte-level sampler, which reruns the model on the
// last n_ctx tokens for every new one, so that it can continue past the context of a tiny host.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <comigs/random.hpp>

#include "causal_lm.hpp"
#include "gpt2.hpp"

namespace comigs::models {

/// How the next token is chosen from the logits.
struct SamplingConfig {
    double temperature = 0.0;  ///< <= 0: greedy (argmax); else logits / temperature
    Index top_k = 0;           ///< keep the k most likely tokens (0: all)
    double top_p = 1.0;        ///< keep the smallest set of most likely tokens with probability >= top_p (1: all)

    void validate() const {
        require(std::isfinite(temperature), "temperature ", temperature, ": must be finite");
        require(top_k >= 0, "top_k ", top_k, ": must be >= 0 (0 keeps every token)");
        require(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "top_p ", top_p, ": must be in (0, 1]");
    }
};

/// The next token from one row of logits [vocab] (see SamplingConfig). Ties go to the lower token id.
template <class T>
int sample_token(std::span<const T> logits, const SamplingConfig& s, Rng& rng) {
    require(!logits.empty(), "logits: empty");
    s.validate();
    const auto best = std::max_element(logits.begin(), logits.end());
    require(std::isfinite(double(*best)), "logits: the largest is ", double(*best));
    if (s.temperature <= 0) return static_cast<int>(best - logits.begin());
    // Candidates by decreasing logit (ties by id): top-k keeps a prefix, top-p a shorter one.
    std::vector<int> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    const std::size_t k = s.top_k > 0 ? std::min<std::size_t>(order.size(), static_cast<std::size_t>(s.top_k)) : order.size();
    const auto by_logit = [&](int a, int b) {
        return logits[static_cast<std::size_t>(a)] > logits[static_cast<std::size_t>(b)] ||
               (logits[static_cast<std::size_t>(a)] == logits[static_cast<std::size_t>(b)] && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(), by_logit);
    order.resize(k);
    std::vector<double> p(k);
    double total = 0;
    for (std::size_t i = 0; i < k; ++i)
        total += p[i] = std::exp((double(logits[static_cast<std::size_t>(order[i])]) - double(*best)) / s.temperature);
    std::size_t keep = k;
    if (s.top_p < 1) {
        double cum = 0;
        for (std::size_t i = 0; i < k; ++i) {
            cum += p[i] / total;
            if (cum >= s.top_p) {
                keep = i + 1;
                break;
            }
        }
        total = std::accumulate(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
    }
    double u = rng.uniform() * total;
    for (std::size_t i = 0; i < keep; ++i)
        if ((u -= p[i]) < 0) return order[i];
    return order[keep - 1];  // only reached through rounding at the very end
}

/// The demo's form: argmax when temperature <= 0, else a draw from softmax(logits / temperature).
template <class T>
int sample_token(std::span<const T> logits, double temperature, Rng& rng) {
    return sample_token(logits, SamplingConfig{temperature, 0, 1.0}, rng);
}

struct GenerateOptions {
    Index max_new_tokens = 64;
    SamplingConfig sampling;
    std::uint64_t seed = 0;
    std::vector<int> stop_tokens;  ///< e.g. the model's eos_token_id: generation ends after one of them
    /// Called with every new token as soon as it is chosen; returning false ends generation.
    std::function<bool(int)> on_token;
};

/// Continues `prompt` (at least one token) with the model's KV cache; returns the new tokens only.
/// Needs prompt + max_new_tokens <= the model's context. Resets the model's cache; call it between
/// training steps, not between a forward and its backward (the MLP plug-ins run forwards too).
template <class T>
std::vector<int> generate(CausalLm<T>& model, std::span<const int> prompt, const GenerateOptions& o) {
    require(!prompt.empty(), "prompt: needs at least one token");
    require(o.max_new_tokens >= 0, "max_new_tokens ", o.max_new_tokens, ": must be >= 0");
    o.sampling.validate();
    const Index need = static_cast<Index>(prompt.size()) + o.max_new_tokens;
    require(need <= model.max_positions(), "prompt of ", prompt.size(), " tokens + max_new_tokens ", o.max_new_tokens,
            " = ", need, ": more than the model's context of ", model.max_positions(), " positions");
    std::vector<int> out;
    if (o.max_new_tokens == 0) return out;
    Rng rng(o.seed);
    model.reset_cache(need);
    std::span<const T> logits = model.decode(prompt);
    while (true) {
        const int next = sample_token(logits, o.sampling, rng);
        out.push_back(next);
        const bool stop = std::find(o.stop_tokens.begin(), o.stop_tokens.end(), next) != o.stop_tokens.end();
        if (o.on_token && !o.on_token(next)) break;
        if (stop || static_cast<Index>(out.size()) >= o.max_new_tokens) break;
        const int one[1] = {next};
        logits = model.decode(one);
    }
    return out;
}

/// Continues `prompt` (at least one token) by n_new tokens without a cache, rerunning the model on the
/// last n_ctx tokens every step (so it goes on past the context); returns only the new ones. Overwrites
/// the model's saved activations (call it between training steps, not between forward and backward).
template <class T>
std::vector<int> generate_windowed(Gpt2<T>& model, std::span<const int> prompt, Index n_new, double temperature,
                                   Rng& rng) {
    require(!prompt.empty(), "prompt: needs at least one token");
    require(n_new >= 0, "n_new ", n_new, ": must be >= 0");
    std::vector<int> seq(prompt.begin(), prompt.end());
    const Index ctx = model.config().n_ctx;
    for (Index i = 0; i < n_new; ++i) {
        const Index len = std::min<Index>(static_cast<Index>(seq.size()), ctx);
        model.forward(std::span<const int>(seq).last(static_cast<std::size_t>(len)), {}, 1, len, false);
        seq.push_back(sample_token<T>(model.logits().row(len - 1), temperature, rng));
    }
    return {seq.end() - n_new, seq.end()};
}

/// Bytes as tokens of a byte-level vocabulary.
inline std::vector<int> bytes_to_tokens(std::string_view text) {
    std::vector<int> t(text.size());
    std::transform(text.begin(), text.end(), t.begin(), [](char c) { return int(static_cast<unsigned char>(c)); });
    return t;
}

/// generate_windowed() on bytes: the model's vocabulary must hold all 256 byte values.
template <class T>
std::string generate_text(Gpt2<T>& model, std::string_view prompt, Index n_new, double temperature, Rng& rng) {
    require(model.config().vocab >= 256, "vocab ", model.config().vocab, ": byte text needs vocab >= 256");
    const std::vector<int> out = generate_windowed(model, bytes_to_tokens(prompt), n_new, temperature, rng);
    std::string s(out.size(), '\0');
    std::transform(out.begin(), out.end(), s.begin(), [](int t) { return static_cast<char>(static_cast<unsigned char>(t)); });
    return s;
}

}  // namespace comigs::models
