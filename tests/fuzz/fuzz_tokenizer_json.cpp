// libFuzzer target for BpeTokenizer::from_tokenizer_json (build with -DCOMIGS_BUILD_FUZZERS=ON and clang;
// run with tests/fuzz/run.sh). Any input may be rejected with a comigs::FormatError; anything else (a
// crash, a sanitizer report, another exception type, a leak, gigabytes for a few bytes) is a bug. A
// tokenizer that loads must work: encode and decode of texts made from the input round-trip, and every
// id encode gives is below vocab_size().
#include <comigs/text/bpe_tokenizer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_tokenizer_json: %s\n", what);
    std::abort();
}

void check_round_trip(const comigs::text::BpeTokenizer& t, std::string_view text) {
    for (bool special : {false, true}) {
        const auto ids = t.encode(text, special);
        for (std::int32_t id : ids)
            if (id < 0 || id >= t.vocab_size()) fail("encode gave an id outside [0, vocab_size)");
        if (t.decode(ids) != text) fail("decode(encode(text)) != text");
    }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    comigs::text::BpeTokenizer t;
    try {
        t = comigs::text::BpeTokenizer::from_tokenizer_json(input, "fuzz.json");
    } catch (const comigs::FormatError&) {
        return 0;
    }
    check_round_trip(t, input);
    check_round_trip(t, "Hello, world! it's 1234567 \n\n  tokens\t\xC3\xA9\xFF <|endoftext|>");
    for (std::int32_t id = 0; id < t.vocab_size() && id < 4096; ++id)
        if (const auto b = t.token_bytes(id); b && t.decode(std::span<const std::int32_t>(&id, 1)) != *b)
            fail("decode of one id differs from token_bytes");
    return 0;
}
