#include <comigs/text/bpe_tokenizer.hpp>
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "tokenizer_files.hpp"

using comigs::text::BpeTokenizer;
using comigs::text::MergeAlgorithm;
using comigs::text::StreamingDecoder;
namespace tf = tokenizer_files;

namespace {

std::vector<std::int32_t> ids_of(const nlohmann::json& a) { return a.get<std::vector<std::int32_t>>(); }

/// Compares encode() with the golden ids of one tokenizer (`key`, and `key`_special when given) on
/// every case, and decode() with the text.
void check_golden(const BpeTokenizer& t, const char* key, const char* special_key) {
    int compared = 0;
    for (const auto& c : tf::golden_cases()["cases"]) {
        if (c[key].is_null()) continue;
        const std::string text = c["text"].get<std::string>();
        CAPTURE(c["name"].get<std::string>());
        const auto ids = t.encode(text);
        CHECK(ids == ids_of(c[key]));
        const std::string expected = t.normalizes_nfc() ? comigs::text::nfc(text) : text;
        CHECK(t.decode(ids) == expected);
        if (special_key) {
            const auto sids = t.encode(text, true);
            CHECK(sids == ids_of(c[special_key]));
            CHECK(t.decode(sids) == expected);
        }
        ++compared;
    }
    CHECK(compared >= 30);
}

std::uint32_t fnv1a(const std::vector<std::int32_t>& ids) {
    std::uint32_t h = 0x811c9dc5u;
    for (std::int32_t id : ids)
        for (int k = 0; k < 4; ++k) h = (h ^ ((static_cast<std::uint32_t>(id) >> (8 * k)) & 0xFFu)) * 16777619u;
    return h;
}

std::string random_bytes(std::mt19937& rng, std::size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng() & 0xFFu);
    return s;
}

/// Text that mixes what tokenizers see: words, spaces, digits, punctuation, multi-byte characters and
/// a few ill-formed bytes.
std::string random_text(std::mt19937& rng, std::size_t n) {
    static const std::vector<std::string> parts = {"the", " the", " ", "  ", "\n", "\n\n", "\t", "'s", "'LL", "123", "4567",
                                                   "é", "ß", "中文", "😀", "\xC2\xA0", "\xE3\x80\x80", ".", "...", "!?", "<|", "|>",
                                                   "<|endoftext|>", "<|eot_id|>", "\xFF", "\xC3", "ab", "Zq", "ー", "١٢"};
    std::string s;
    while (s.size() < n) s += parts[rng() % parts.size()];
    return s;
}

std::filesystem::path temp_dir(const char* name) {
    auto p = std::filesystem::temp_directory_path() / (std::string("comigs-tok-") + std::to_string(::getpid()) + "-" + name);
    std::filesystem::create_directories(p);
    return p;
}

void write_file(const std::filesystem::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

/// The message of the FormatError `f` throws ("" if it throws nothing or something else).
template <class F>
std::string format_error(F&& f) {
    try {
        f();
    } catch (const comigs::FormatError& e) {
        return e.what();
    } catch (...) {
        return "unexpected exception type";
    }
    return "";
}

/// A small byte-level tokenizer.json: every byte, the tokens of `extra` merges, given pre-tokenizer.
nlohmann::json tiny_json() {
    nlohmann::json vocab = nlohmann::json::object();
    for (unsigned b = 0; b < 256; ++b) vocab[comigs::text::bytes_to_token_text(std::string(1, char(b)))] = b;
    vocab["ab"] = 256;
    vocab["abc"] = 257;
    return {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b", "ab c"}}}},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"added_tokens", nlohmann::json::array()}};
}

}  // namespace

TEST_CASE("BpeTokenizer: GPT-2 gives the ids of tiktoken and js-tiktoken") {
    if (!tf::available(tf::gpt2_dir())) return;
    const BpeTokenizer& t = tf::gpt2();
    CHECK(t.vocab_size() == 50257);
    CHECK(t.merge_count() == 50000);
    CHECK(t.token_id("<|endoftext|>") == 50256);
    CHECK(t.token_id("Ġthe") == 262);
    CHECK_FALSE(t.token_id("no such token").has_value());
    CHECK(t.encode("Hello world") == std::vector<std::int32_t>{15496, 995});
    check_golden(t, "gpt2", "gpt2_special");
}

TEST_CASE("BpeTokenizer: GPT-2 as a tokenizer.json (merges as pairs) equals encoder.json + vocab.bpe") {
    if (!tf::available(tf::gpt2_dir())) return;
    const BpeTokenizer t = BpeTokenizer::from_tokenizer_json(tf::gpt2_as_tokenizer_json(false).dump(), "gpt2 json");
    CHECK(t.vocab_size() == 50257);
    check_golden(t, "gpt2", "gpt2_special");
    // The folder forms: vocab.json + merges.txt, and a path naming vocab.json.
    const auto dir = temp_dir("hf-names");
    std::filesystem::copy_file(tf::gpt2_dir() / "encoder.json", dir / "vocab.json", std::filesystem::copy_options::overwrite_existing);
    std::filesystem::copy_file(tf::gpt2_dir() / "vocab.bpe", dir / "merges.txt", std::filesystem::copy_options::overwrite_existing);
    const std::string text = "Folders and files: the same tokenizer.";
    CHECK(BpeTokenizer::load(dir).encode(text) == tf::gpt2().encode(text));
    CHECK(BpeTokenizer::load(dir / "vocab.json").encode(text) == tf::gpt2().encode(text));
    std::filesystem::remove_all(dir);
}

TEST_CASE("BpeTokenizer: SmolLM2's Digits + ByteLevel pre-tokenizer") {
    if (!tf::available(tf::gpt2_dir())) return;
    const BpeTokenizer t = BpeTokenizer::from_tokenizer_json(tf::gpt2_as_tokenizer_json(true).dump(), "digits variant");
    check_golden(t, "digits_variant", nullptr);
    // Hugging Face's Digits splits at every \p{N} (Rust's char::is_numeric), not only ASCII digits.
    CHECK(t.pre_tokenizer().pieces("x١٢ 3") == std::vector<std::string>{"x", "١", "٢", " ", "3"});
}

TEST_CASE("BpeTokenizer: Llama-3 gives the ids of tiktoken and transformers.js") {
    if (!tf::available(tf::llama3_json())) return;
    const BpeTokenizer& t = tf::llama3();
    CHECK(t.vocab_size() == 128256);
    CHECK(t.ignore_merges());
    CHECK(t.token_id("<|begin_of_text|>") == 128000);
    CHECK(t.token_id("<|eot_id|>") == 128009);
    CHECK(t.added_tokens().size() == 256);
    check_golden(t, "llama3", "llama3_special");
}

TEST_CASE("BpeTokenizer: Qwen2's pattern (one digit a piece) and NFC normalizer, without ignore_merges") {
    if (!tf::available(tf::llama3_json())) return;
    const BpeTokenizer& t = tf::qwen2_variant();
    CHECK_FALSE(t.ignore_merges());
    CHECK(t.normalizes_nfc());
    check_golden(t, "qwen2", "qwen2_special");
    // Decomposed and composed spellings give the same ids; decode gives the NFC text.
    CHECK(t.encode("cafe\xCC\x81 \xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB") == t.encode("caf\xC3\xA9 \xED\x95\x9C"));
    CHECK(t.decode(t.encode("cafe\xCC\x81")) == "caf\xC3\xA9");
    CHECK(tf::llama3().encode("cafe\xCC\x81") != tf::llama3().encode("caf\xC3\xA9"));  // no normalizer there
}

TEST_CASE("BpeTokenizer: whole multilingual fortune files give the oracles' ids") {
    const auto golden = nlohmann::json::parse(
        tf::read_text(std::filesystem::path(COMIGS_GOLDEN_DIR) / "tokenizer" / "fortunes.json"));
    if (!tf::available(tf::gpt2_dir()) || !tf::available(tf::llama3_json())) return;
    int files = 0;
    for (const auto& f : golden["files"]) {
        const std::filesystem::path path = f["file"].get<std::string>();
        if (!tf::available(path)) continue;  // fails under CI: install-deps installs the fortunes packages
        const std::string text = tf::read_text(path);
        CAPTURE(path.string());
        REQUIRE(text.size() == f["bytes"].get<std::size_t>());
        const struct {
            const BpeTokenizer& t;
            const char* key;
        } runs[] = {{tf::gpt2(), "gpt2"}, {tf::llama3(), "llama3"}, {tf::qwen2_variant(), "qwen2"}};
        for (const auto& r : runs) {
            CAPTURE(r.key);
            const auto ids = r.t.encode(text);
            CHECK(ids.size() == f[r.key]["count"].get<std::size_t>());
            CHECK(fnv1a(ids) == f[r.key]["fnv1a"].get<std::uint32_t>());
            CHECK(r.t.decode(ids) == (r.t.normalizes_nfc() ? comigs::text::nfc(text) : text));
        }
        ++files;
    }
    CHECK(files == static_cast<int>(golden["files"].size()));
}

TEST_CASE("BpeTokenizer: decode(encode(b)) == b for any bytes, ill-formed UTF-8 included") {
    if (!tf::available(tf::gpt2_dir()) || !tf::available(tf::llama3_json())) return;
    std::mt19937 rng(21);
    const BpeTokenizer* tokenizers[] = {&tf::gpt2(), &tf::llama3(), &tf::qwen2_variant()};
    for (const BpeTokenizer* t : tokenizers) {
        for (int i = 0; i < 40; ++i) {
            const std::string b = i % 2 ? random_bytes(rng, rng() % 300) : random_text(rng, rng() % 400);
            const std::string expected = t->normalizes_nfc() ? comigs::text::nfc(b) : b;
            CHECK(t->decode(t->encode(b)) == expected);
            CHECK(t->decode(t->encode(b, true)) == expected);
        }
    }
    // Every single byte, and a truncated 4-byte sequence, become one token each.
    for (unsigned b = 0; b < 256; ++b) {
        const std::string s(1, static_cast<char>(b));
        CHECK(tf::gpt2().encode(s).size() == 1);
        CHECK(tf::gpt2().decode(tf::gpt2().encode(s)) == s);
    }
    CHECK(tf::llama3().decode(tf::llama3().encode("\xF0\x9F\x98")) == "\xF0\x9F\x98");
}

TEST_CASE("BpeTokenizer: the scan and heap merge loops give the same ids") {
    if (!tf::available(tf::gpt2_dir()) || !tf::available(tf::llama3_json())) return;
    std::mt19937 rng(5);
    const BpeTokenizer* tokenizers[] = {&tf::gpt2(), &tf::qwen2_variant()};
    for (const BpeTokenizer* t : tokenizers) {
        int merged = 0;
        for (int i = 0; i < 300; ++i) {
            std::string piece = random_text(rng, 1 + rng() % 120);
            if (i % 3 == 0) piece = std::string(1 + rng() % 200, "a =\n"[rng() % 4]);
            const auto scan = t->encode_piece(piece, MergeAlgorithm::Scan);
            CHECK(scan == t->encode_piece(piece, MergeAlgorithm::Heap));
            merged += scan.size() < piece.size();
            CHECK(t->decode(scan) == piece);
        }
        CHECK(merged > 200);  // the comparison saw real merging
    }
    // Long pieces (the heap path inside encode) against the scan.
    const std::string spaces(5000, ' ');
    CHECK(tf::gpt2().encode(spaces) == tf::gpt2().encode_piece(spaces, MergeAlgorithm::Scan));
}

TEST_CASE("BpeTokenizer: special tokens are matched only when allowed; others always") {
    if (!tf::available(tf::gpt2_dir())) return;
    const BpeTokenizer& t = tf::gpt2();
    const auto plain = t.encode("a<|endoftext|>b");
    CHECK(std::find(plain.begin(), plain.end(), 50256) == plain.end());
    CHECK(t.encode("a<|endoftext|>b", true) == std::vector<std::int32_t>{64, 50256, 65});

    // A non-special added token (and the longest of overlapping ones) is matched in any mode.
    nlohmann::json j = tiny_json();
    j["added_tokens"] = {{{"id", 300}, {"content", "<x>"}, {"special", false}},
                         {{"id", 301}, {"content", "<x>>"}, {"special", false}},
                         {{"id", 302}, {"content", "#"}, {"special", true}}};
    const BpeTokenizer tiny = BpeTokenizer::from_tokenizer_json(j.dump(), "tiny");
    CHECK(tiny.vocab_size() == 303);
    CHECK(tiny.encode("ab<x>>abc<x>#") == std::vector<std::int32_t>{256, 301, 257, 300, '#'});
    CHECK(tiny.encode("ab<x>>abc<x>#", true) == std::vector<std::int32_t>{256, 301, 257, 300, 302});
    CHECK(tiny.decode(std::vector<std::int32_t>{301, 302}) == "<x>>#");
}

TEST_CASE("BpeTokenizer: decode and token queries reject ids that are no token") {
    const BpeTokenizer t = BpeTokenizer::from_tokenizer_json(tiny_json().dump(), "tiny");
    CHECK(t.vocab_size() == 258);
    CHECK(t.token_bytes(257) == std::optional<std::string_view>("abc"));
    CHECK_FALSE(t.token_bytes(258).has_value());
    CHECK_THROWS_WITH_AS(t.decode(std::vector<std::int32_t>{1, 258}), doctest::Contains("token id 258"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(t.decode(std::vector<std::int32_t>{-1}), doctest::Contains("token id -1"), comigs::InvalidArgument);
    // An id gap (300 with nothing at 258..299) is not a token either.
    nlohmann::json j = tiny_json();
    j["added_tokens"] = {{{"id", 300}, {"content", "<x>"}, {"special", true}}};
    const BpeTokenizer gap = BpeTokenizer::from_tokenizer_json(j.dump(), "gap");
    CHECK(gap.vocab_size() == 301);
    CHECK_THROWS_WITH_AS(gap.decode(std::vector<std::int32_t>{270}), doctest::Contains("no token has this id"),
                         comigs::InvalidArgument);
}

TEST_CASE("BpeTokenizer: malformed or unsupported tokenizer files get an error naming the file and the value") {
    auto err = [](const nlohmann::json& j) {
        return format_error([&] { (void)BpeTokenizer::from_tokenizer_json(j.dump(), "bad.json"); });
    };
    SUBCASE("sanity: the base file loads") { CHECK(err(tiny_json()).empty()); }
    SUBCASE("not JSON") {
        const auto m = format_error([] { (void)BpeTokenizer::from_tokenizer_json("{\"model\": [", "bad.json"); });
        CHECK(m.find("bad.json") != std::string::npos);
        CHECK(m.find("not valid JSON") != std::string::npos);
    }
    SUBCASE("another model type") {
        nlohmann::json j = tiny_json();
        j["model"]["type"] = "Unigram";
        const auto m = err(j);
        CHECK(m.find("bad.json") != std::string::npos);
        CHECK(m.find("'Unigram'") != std::string::npos);
        j["model"]["type"] = "WordPiece";
        CHECK(err(j).find("'WordPiece'") != std::string::npos);
    }
    SUBCASE("an unknown split pattern") {
        nlohmann::json j = tiny_json();
        j["pre_tokenizer"] = {{"type", "Sequence"},
                              {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "\\w+|\\s+"}}}, {"behavior", "Isolated"}},
                                                 {{"type", "ByteLevel"}, {"use_regex", false}}}}};
        const auto m = err(j);
        CHECK(m.find("bad.json") != std::string::npos);
        CHECK(m.find("'\\w+|\\s+'") != std::string::npos);
    }
    SUBCASE("merges naming unknown tokens") {
        nlohmann::json j = tiny_json();
        j["model"]["merges"] = {"a b", "ab zz"};
        auto m = err(j);
        CHECK(m.find("bad.json") != std::string::npos);
        CHECK(m.find("merge 1") != std::string::npos);
        CHECK(m.find("'zz'") != std::string::npos);
        j["model"]["merges"] = {"b c"};  // both known, "bc" is not
        m = err(j);
        CHECK(m.find("'bc'") != std::string::npos);
        j["model"]["merges"] = {"a b c"};
        CHECK(err(j).find("'a b c'") != std::string::npos);
        j["model"]["merges"] = nlohmann::json::array({nlohmann::json::array({"a", 3})});
        CHECK(err(j).find("merges[0]") != std::string::npos);
    }
    SUBCASE("other unsupported parts") {
        nlohmann::json j = tiny_json();
        j["normalizer"] = {{"type", "NFKC"}};
        CHECK(err(j).find("normalizer 'NFKC'") != std::string::npos);
        j["normalizer"] = {{"type", "NFC"}};
        CHECK(err(j).empty());
        j = tiny_json();
        j["pre_tokenizer"] = {{"type", "Metaspace"}};
        CHECK(err(j).find("'Metaspace'") != std::string::npos);
        j = tiny_json();
        j["pre_tokenizer"]["add_prefix_space"] = true;
        CHECK(err(j).find("add_prefix_space") != std::string::npos);
        j = tiny_json();
        j["decoder"] = {{"type", "WordPiece"}};
        CHECK(err(j).find("decoder 'WordPiece'") != std::string::npos);
        j = tiny_json();
        j["model"]["byte_fallback"] = true;
        CHECK(err(j).find("byte_fallback") != std::string::npos);
        j = tiny_json();
        j["added_tokens"] = {{{"id", 300}, {"content", "<x>"}, {"lstrip", true}}};
        CHECK(err(j).find("lstrip") != std::string::npos);
        j["added_tokens"] = {{{"id", 300}, {"content", ""}}};
        CHECK(err(j).find("added_tokens[0].content") != std::string::npos);
    }
    SUBCASE("a vocabulary that is not byte-level or has bad ids") {
        nlohmann::json j = tiny_json();
        j["model"]["vocab"].erase("Ġ");
        CHECK(err(j).find("byte 0x20") != std::string::npos);
        j = tiny_json();
        j["model"]["vocab"]["zz"] = -4;
        CHECK(err(j).find("'zz': id -4") != std::string::npos);
        j = tiny_json();
        j["model"]["vocab"]["zz"] = 5;  // 5 is byte 0x05's
        CHECK(err(j).find("id 5 is given to two tokens") != std::string::npos);
    }
    SUBCASE("files and folders") {
        const auto dir = temp_dir("bad-files");
        const std::string dir_name = dir.string();
        CHECK_THROWS_WITH_AS((void)BpeTokenizer::load(dir), doctest::Contains(dir_name.c_str()), comigs::IoError);
        CHECK_THROWS_AS((void)BpeTokenizer::load(dir / "missing.json"), comigs::IoError);
        write_file(dir / "encoder.json", "{\"a\": 0}");
        write_file(dir / "vocab.bpe", "#version: 0.2\na b\n");
        const auto m = format_error([&] { (void)BpeTokenizer::load(dir); });
        CHECK(m.find((dir / "encoder.json").string()) != std::string::npos);
        CHECK(m.find("byte 0x00") != std::string::npos);
        std::filesystem::remove_all(dir);
    }
}

TEST_CASE("StreamingDecoder emits whole UTF-8 characters as their last byte arrives") {
    if (!tf::available(tf::llama3_json())) return;
    const BpeTokenizer& t = tf::llama3();
    const std::string text = "Emoji 😀👨‍👩‍👧 and 中文字符 and ελληνικά, plus \xFF ill-formed \xC3 bytes.";
    StreamingDecoder d(t);
    std::string out;
    int split_characters = 0;
    for (std::int32_t id : t.encode(text)) {
        const std::string piece = d.push(id);
        const auto bytes = t.token_bytes(id);
        split_characters += piece.size() != bytes->size();
        // Whatever was released is whole: it ends where a character ends.
        CHECK(StreamingDecoder::incomplete_tail(piece) == 0);
        out += piece;
    }
    out += d.flush();
    CHECK(out == text);
    CHECK(split_characters > 0);  // the text has characters split across tokens
    CHECK(StreamingDecoder::incomplete_tail("a\xE4\xB8") == 2);
    CHECK(StreamingDecoder::incomplete_tail("a\xF0") == 1);
    CHECK(StreamingDecoder::incomplete_tail("a\xE4\xB8\xAD") == 0);
    CHECK(StreamingDecoder::incomplete_tail("a\xE0\x80") == 0);  // overlong: never completes
}
