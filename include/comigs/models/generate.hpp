#pragma once
// Sampling text from the model, one byte at a time, for the demo's sample texts. No KV cache: every
// new token reruns the model on the last n_ctx tokens, which is plenty for a few hundred bytes.
#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <comigs/random.hpp>

#include "gpt2.hpp"

namespace comigs::models {

/// Picks the next token from one row of logits [vocab]: argmax when temperature <= 0, else a draw from
/// softmax(logits / temperature).
template <class T>
int sample_token(std::span<const T> logits, double temperature, Rng& rng) {
    require(!logits.empty(), "logits: empty");
    const auto best = std::max_element(logits.begin(), logits.end());
    if (temperature <= 0) return static_cast<int>(best - logits.begin());
    std::vector<double> p(logits.size());
    double total = 0;
    for (std::size_t i = 0; i < p.size(); ++i) total += p[i] = std::exp((double(logits[i]) - double(*best)) / temperature);
    double u = rng.uniform() * total;
    for (std::size_t i = 0; i < p.size(); ++i)
        if ((u -= p[i]) < 0) return static_cast<int>(i);
    return static_cast<int>(best - logits.begin());  // only reached through rounding at the very end
}

/// Continues `prompt` (at least one token) by n_new tokens; returns only the new ones. Overwrites the
/// model's saved activations (call it between training steps, not between forward and backward).
template <class T>
std::vector<int> generate(Gpt2<T>& model, std::span<const int> prompt, Index n_new, double temperature,
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

/// generate() on bytes: the model's vocabulary must hold all 256 byte values.
template <class T>
std::string generate_text(Gpt2<T>& model, std::string_view prompt, Index n_new, double temperature, Rng& rng) {
    require(model.config().vocab >= 256, "vocab ", model.config().vocab, ": byte text needs vocab >= 256");
    const std::vector<int> out = generate(model, bytes_to_tokens(prompt), n_new, temperature, rng);
    std::string s(out.size(), '\0');
    std::transform(out.begin(), out.end(), s.begin(), [](int t) { return static_cast<char>(static_cast<unsigned char>(t)); });
    return s;
}

}  // namespace comigs::models
