#pragma once
// Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM2, ...) from a Hugging Face tokenizer.json or
// from GPT-2's encoder.json + vocab.bpe, giving the ids the published tokenizers give.
//
// encode(text): added tokens are matched in the raw text first (leftmost, longest; `special` ones only
// with allow_special); the text between them is put in NFC if the file asks for it (Qwen2), then cut
// into pieces by the pre-tokenizer; each piece, as bytes, becomes one token if `ignore_merges` is set
// and it is in the vocabulary, else starts as one token per byte and is merged repeatedly at the
// adjacent pair of lowest merge rank (leftmost first) until no pair has a merge. decode(ids) concatenates the tokens' bytes, so decode(encode(b)) == b for
// any bytes, ill-formed UTF-8 included (== nfc(b) when the file asks for NFC).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../error.hpp"
#include "../io/mapped_file.hpp"
#include "byte_level.hpp"
#include "detail/hash_tables.hpp"
#include "normalizer.hpp"
#include "pretokenizer.hpp"

namespace comigs::text {

/// A token matched in the raw text before pre-tokenization (Hugging Face's `added_tokens`).
struct AddedToken {
    std::int32_t id = 0;
    std::string content;   ///< the text it matches (UTF-8 bytes)
    bool special = false;  ///< matched only when encode() is asked to (allow_special)
};

/// How a piece is merged: `Automatic` picks `Scan` for short pieces and `Heap` for long ones. Both give
/// the same ids (tests check); `Scan` is O(n^2) and fastest for a few bytes, `Heap` O(n log n).
enum class MergeAlgorithm : std::uint8_t { Automatic, Scan, Heap };

namespace detail {

/// Leftmost-longest matching of a set of strings (the added tokens) in a text. A 64 Ki-bit filter on
/// the first two bytes rejects most positions with one load.
class AddedTokenMatcher {
public:
    AddedTokenMatcher() = default;
    AddedTokenMatcher(const std::vector<AddedToken>& tokens, bool include_special) {
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            const AddedToken& t = tokens[i];
            if (t.special && !include_special) continue;
            const auto b0 = static_cast<unsigned char>(t.content[0]);
            if (t.content.size() == 1) {
                single_[b0] = true;
                single_index_[b0] = i;
                continue;
            }
            const unsigned key = b0 << 8 | static_cast<unsigned char>(t.content[1]);
            pair_filter_[key >> 6] |= std::uint64_t(1) << (key & 63u);
            by_pair_[key].push_back(i);
        }
        for (auto& [key, list] : by_pair_)
            std::stable_sort(list.begin(), list.end(),
                             [&](std::size_t a, std::size_t b) { return tokens[a].content.size() > tokens[b].content.size(); });
        empty_ = by_pair_.empty() && std::find(single_.begin(), single_.end(), true) == single_.end();
    }

    bool empty() const noexcept { return empty_; }

    /// The first match at or after `from`: {position, token index}; position == text.size() if none.
    std::pair<std::size_t, std::size_t> find(std::string_view text, std::size_t from,
                                             const std::vector<AddedToken>& tokens) const {
        const auto* p = reinterpret_cast<const unsigned char*>(text.data());
        const std::size_t n = text.size();
        for (std::size_t i = from; i < n; ++i) {
            if (i + 1 < n) {
                const unsigned key = unsigned(p[i]) << 8 | p[i + 1];
                if (pair_filter_[key >> 6] >> (key & 63u) & 1u) {
                    for (std::size_t k : by_pair_.at(key)) {
                        const std::string& c = tokens[k].content;
                        if (c.size() <= n - i && std::memcmp(c.data(), p + i, c.size()) == 0) return {i, k};
                    }
                }
            }
            if (single_[p[i]]) return {i, single_index_[p[i]]};
        }
        return {n, 0};
    }

private:
    std::vector<std::uint64_t> pair_filter_ = std::vector<std::uint64_t>(1024, 0);
    std::unordered_map<unsigned, std::vector<std::size_t>> by_pair_;
    std::vector<bool> single_ = std::vector<bool>(256, false);
    std::vector<std::size_t> single_index_ = std::vector<std::size_t>(256, 0);
    bool empty_ = true;
};

/// Scratch buffers of one encode call (kept across pieces so merging allocates nothing).
struct MergeScratch {
    std::vector<std::int32_t> ids;
    std::vector<std::uint32_t> ranks;
    std::vector<std::int32_t> prev, next;
    struct HeapEntry {
        std::uint32_t rank;
        std::int32_t pos;
        std::int32_t left, right, merged;
        bool operator>(const HeapEntry& o) const noexcept { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<HeapEntry> heap;
};

inline const nlohmann::json* member(const nlohmann::json& obj, const char* key) {
    if (!obj.is_object()) return nullptr;
    const auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
}

}  // namespace detail

/// A byte-level BPE tokenizer's parts as files other than tokenizer.json record them (a GGUF file's
/// tokenizer.ggml.* keys): the spelling of every id, what kind of token each is, the merges in rank order
/// and the pre-tokenizer.
struct BpeVocabulary {
    enum class Kind : std::uint8_t {
        normal,   ///< a vocabulary token spelled in the byte-level alphabet ("Ġthe")
        special,  ///< an added token matched only when asked (Hugging Face `special`, GGUF CONTROL); its text as is
        added,    ///< an added token always matched (GGUF USER_DEFINED); its text as is
        unused,   ///< an id no text encodes to (GGUF UNUSED, "[PAD5]"); decodes to its spelling
    };
    std::vector<std::string> tokens;                          ///< index = id
    std::vector<Kind> kinds;                                  ///< per id, or empty (all normal)
    std::vector<std::pair<std::string, std::string>> merges;  ///< (left, right) in rank order
    PreTokenizer pre_tokenizer;
    bool ignore_merges = false;  ///< a piece that is itself a token is taken whole (Llama-3)
    bool nfc = false;            ///< text put in Unicode NFC first (Qwen2)
};

/// A byte-level BPE tokenizer. Immutable after loading; encode() and decode() may run concurrently.
class BpeTokenizer {
public:
    BpeTokenizer() = default;

    /// PATH: a tokenizer.json, or a folder holding tokenizer.json, or encoder.json + vocab.bpe (or the
    /// same data under Hugging Face's names, vocab.json + merges.txt); encoder.json or vocab.json itself
    /// names the pair too. Errors: IoError (unreadable), FormatError naming the file and the bad value.
    static BpeTokenizer load(const std::filesystem::path& path) {
        namespace fs = std::filesystem;
        std::error_code ec;
        if (fs::is_directory(path, ec)) {
            if (fs::exists(path / "tokenizer.json")) return load(path / "tokenizer.json");
            for (const auto& [enc, merges] : gpt2_file_names())
                if (fs::exists(path / enc) && fs::exists(path / merges)) return load_gpt2(path / enc, path / merges);
            comigs::detail::raise<IoError>("tokenizer folder '", path.string(),
                                           "' holds neither tokenizer.json nor encoder.json + vocab.bpe nor vocab.json + merges.txt");
        }
        const std::string name = path.filename().string();
        for (const auto& [enc, merges] : gpt2_file_names())
            if (name == enc) return load_gpt2(path, path.parent_path() / merges);
        const io::MappedFile file = io::MappedFile::open(path);
        const auto bytes = file.bytes();
        return from_tokenizer_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path.string());
    }

    /// GPT-2's vocabulary (encoder.json: token -> id) and merges (vocab.bpe: "#version" line, then one
    /// "left right" pair per line), read from two files.
    static BpeTokenizer load_gpt2(const std::filesystem::path& encoder_json, const std::filesystem::path& vocab_bpe) {
        const io::MappedFile enc = io::MappedFile::open(encoder_json);
        const io::MappedFile bpe = io::MappedFile::open(vocab_bpe);
        return from_gpt2_files(as_view(enc), as_view(bpe), encoder_json.string(), vocab_bpe.string());
    }

    /// From the text of a tokenizer.json; `source` names it in error messages.
    static BpeTokenizer from_tokenizer_json(std::string_view json_text, const std::string& source = "tokenizer.json") {
        nlohmann::json root;
        try {
            root = nlohmann::json::parse(json_text.begin(), json_text.end());
        } catch (const nlohmann::json::exception& e) {
            comigs::detail::raise<FormatError>("tokenizer file '", source, "': not valid JSON: ", e.what());
        }
        BpeTokenizer t;
        t.source_ = source;
        t.parse_tokenizer_json(root);
        return t;
    }

    /// From the texts of GPT-2's encoder.json and vocab.bpe (names for error messages).
    static BpeTokenizer from_gpt2_files(std::string_view encoder_json, std::string_view vocab_bpe,
                                        const std::string& encoder_source = "encoder.json",
                                        const std::string& merges_source = "vocab.bpe") {
        nlohmann::json vocab;
        try {
            vocab = nlohmann::json::parse(encoder_json.begin(), encoder_json.end());
        } catch (const nlohmann::json::exception& e) {
            comigs::detail::raise<FormatError>("vocabulary file '", encoder_source, "': not valid JSON: ", e.what());
        }
        BpeTokenizer t;
        t.source_ = encoder_source;
        t.read_vocab(vocab, "vocabulary");
        std::vector<std::pair<std::string, std::string>> merges;
        std::size_t line_no = 0, pos = 0;
        while (pos < vocab_bpe.size()) {
            std::size_t eol = vocab_bpe.find('\n', pos);
            if (eol == std::string_view::npos) eol = vocab_bpe.size();
            std::string_view line = vocab_bpe.substr(pos, eol - pos);
            pos = eol + 1;
            ++line_no;
            if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
            if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
            const std::size_t sp = line.find(' ');
            if (sp == std::string_view::npos || line.find(' ', sp + 1) != std::string_view::npos || sp == 0 ||
                sp + 1 == line.size())
                comigs::detail::raise<FormatError>("merges file '", merges_source, "' line ", line_no, ": '", std::string(line),
                                                   "' is not two tokens separated by one space");
            merges.emplace_back(std::string(line.substr(0, sp)), std::string(line.substr(sp + 1)));
        }
        t.source_ = merges_source;
        t.build_merges(merges);
        t.source_ = encoder_source;
        // GPT-2's end-of-text token is special, as in tiktoken and Hugging Face.
        for (std::size_t i = 0; i < t.pending_.size(); ++i)
            if (t.kinds_[i] == Kind::Vocab && t.pending_[i] == "<|endoftext|>")
                t.added_.push_back(AddedToken{static_cast<std::int32_t>(i), "<|endoftext|>", true});
        t.pre_tokenizer_ = PreTokenizer::split(SplitPattern::Gpt2);
        t.finish();
        return t;
    }

    /// From its parts (BpeVocabulary); `source` names them in error messages (FormatError: a kinds list of
    /// another length, an empty added token or one added twice, a byte without a token, a merge whose sides
    /// or result are not tokens).
    static BpeTokenizer from_vocabulary(const BpeVocabulary& v, const std::string& source) {
        using K = BpeVocabulary::Kind;
        BpeTokenizer t;
        t.source_ = source;
        if (!v.kinds.empty() && v.kinds.size() != v.tokens.size())
            t.fail(v.kinds.size(), " token kinds for ", v.tokens.size(), " tokens");
        if (v.tokens.size() >= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
            t.fail(v.tokens.size(), " tokens: more than ids can number");
        for (std::size_t i = 0; i < v.tokens.size(); ++i) {
            const auto id = static_cast<std::int32_t>(i);
            const std::string& spelling = v.tokens[i];
            const K kind = v.kinds.empty() ? K::normal : v.kinds[i];
            if (kind == K::special || kind == K::added) {
                if (spelling.empty()) t.fail("token ", id, ": an added token with empty text");
                for (const AddedToken& other : t.added_)
                    if (other.content == spelling) t.fail("token ", id, ": added token '", spelling, "' is also token ", other.id);
                t.set_token(id, Kind::Raw, spelling, spelling);
                t.added_.push_back(AddedToken{id, spelling, kind == K::special});
            } else if (auto bytes = kind == K::normal ? token_text_to_bytes(spelling) : std::nullopt) {
                t.set_token(id, Kind::Vocab, std::move(*bytes), spelling);
            } else {
                t.raw_spellings_.emplace(spelling, id);
                t.set_token(id, Kind::Raw, spelling, spelling);
            }
        }
        t.find_byte_tokens("the token list");
        t.build_merges(v.merges);
        t.pre_tokenizer_ = v.pre_tokenizer;
        t.ignore_merges_ = v.ignore_merges;
        t.nfc_ = v.nfc;
        t.finish();
        return t;
    }

    /// Token ids of `text` (any bytes). With `allow_special`, added tokens marked special are matched in
    /// the text too (Hugging Face always matches them; tiktoken only when allowed); without, their text
    /// is encoded as ordinary text. No BOS/EOS is added.
    std::vector<std::int32_t> encode(std::string_view text, bool allow_special = false) const {
        std::vector<std::int32_t> out;
        out.reserve(text.size() / 3 + 1);
        encode_to(text, out, allow_special);
        return out;
    }

    /// Appends the ids of `text` to `out`.
    void encode_to(std::string_view text, std::vector<std::int32_t>& out, bool allow_special = false) const {
        detail::MergeScratch scratch;
        detail::PieceCache cache;
        // Normalized copies of the text live as long as the cache, whose keys point into them.
        std::vector<std::unique_ptr<std::string>> normalized;
        const detail::AddedTokenMatcher& matcher = allow_special ? match_all_ : match_ordinary_;
        if (matcher.empty()) {
            encode_ordinary(text, out, scratch, &cache, normalized);
            return;
        }
        std::size_t pos = 0;
        while (pos < text.size()) {
            const auto [at, k] = matcher.find(text, pos, added_);
            encode_ordinary(text.substr(pos, at - pos), out, scratch, &cache, normalized);
            if (at == text.size()) break;
            out.push_back(added_[k].id);
            pos = at + added_[k].content.size();
        }
    }

    /// The bytes of `ids` concatenated. Errors: InvalidArgument naming an id that is not a token.
    std::string decode(std::span<const std::int32_t> ids) const {
        std::string out;
        out.reserve(ids.size() * 4);
        for (std::int32_t id : ids) out.append(token_bytes_checked(id));
        return out;
    }

    /// Highest id + 1, added tokens included.
    std::int32_t vocab_size() const noexcept { return static_cast<std::int32_t>(kinds_.size()); }

    /// The id of a token by its spelling in the tokenizer file (an added token's content, e.g.
    /// "<|endoftext|>", or a vocabulary entry such as "Ġthe"), if there is one.
    std::optional<std::int32_t> token_id(std::string_view token) const {
        for (const AddedToken& a : added_)
            if (a.content == token) return a.id;
        if (const auto it = raw_spellings_.find(std::string(token)); it != raw_spellings_.end()) return it->second;
        const auto bytes = token_text_to_bytes(token);
        if (!bytes) return std::nullopt;
        return index_lookup_bytes(*bytes);
    }

    /// The bytes token `id` stands for, or nullopt if `id` is not a token.
    std::optional<std::string_view> token_bytes(std::int32_t id) const noexcept {
        if (id < 0 || id >= vocab_size() || kinds_[static_cast<std::size_t>(id)] == Kind::None) return std::nullopt;
        return bytes_of(id);
    }

    const std::vector<AddedToken>& added_tokens() const noexcept { return added_; }
    const PreTokenizer& pre_tokenizer() const noexcept { return pre_tokenizer_; }
    bool ignore_merges() const noexcept { return ignore_merges_; }
    /// True if text is put in Unicode NFC before pre-tokenization (Qwen2's normalizer); then
    /// decode(encode(b)) == nfc(b).
    bool normalizes_nfc() const noexcept { return nfc_; }
    std::size_t merge_count() const noexcept { return merges_.size(); }

    /// The ids of one pre-token `piece` (bytes) by BPE merges alone (no added tokens, no pre-tokenizer,
    /// no cache; `ignore_merges` applies). For tests and tools.
    std::vector<std::int32_t> encode_piece(std::string_view piece, MergeAlgorithm algorithm = MergeAlgorithm::Automatic) const {
        std::vector<std::int32_t> out;
        detail::MergeScratch scratch;
        encode_piece_to(piece, out, scratch, nullptr, algorithm);
        return out;
    }

private:
    enum class Kind : std::uint8_t { None, Vocab, Raw };

    static std::vector<std::pair<std::string, std::string>> gpt2_file_names() {
        return {{"encoder.json", "vocab.bpe"}, {"vocab.json", "merges.txt"}};
    }
    static std::string_view as_view(const io::MappedFile& f) {
        return {reinterpret_cast<const char*>(f.bytes().data()), f.size()};
    }

    template <class... Args>
    [[noreturn]] void fail(Args&&... args) const {
        comigs::detail::raise<FormatError>("tokenizer file '", source_, "': ", std::forward<Args>(args)...);
    }

    std::string_view bytes_of(std::int32_t id) const noexcept {
        const auto i = static_cast<std::size_t>(id);
        return std::string_view(pool_).substr(offsets_[i], offsets_[i + 1] - offsets_[i]);
    }
    std::string_view token_bytes_checked(std::int32_t id) const {
        if (id < 0 || id >= vocab_size())
            comigs::detail::raise<InvalidArgument>("token id ", id, ": out of range [0, ", vocab_size(), ")");
        if (kinds_[static_cast<std::size_t>(id)] == Kind::None)
            comigs::detail::raise<InvalidArgument>("token id ", id, ": no token has this id");
        return bytes_of(id);
    }

    std::optional<std::int32_t> index_lookup_bytes(std::string_view bytes) const {
        const std::int32_t id = index_.find(bytes, detail::hash_bytes(bytes), [this](std::int32_t i) { return bytes_of(i); });
        if (id < 0) return std::nullopt;
        return id;
    }

    // ---- loading -------------------------------------------------------------------------------------

    /// Reads {token: id}: byte-level spellings become their bytes; other spellings (never produced by
    /// encoding) keep their UTF-8 text for decoding, as Hugging Face's ByteLevel decoder does.
    void read_vocab(const nlohmann::json& vocab, const char* what) {
        if (!vocab.is_object()) fail(what, " is not an object of token: id");
        std::vector<std::pair<std::int32_t, std::string>> entries;
        entries.reserve(vocab.size());
        for (const auto& [spelling, id] : vocab.items()) {
            if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= std::numeric_limits<std::int32_t>::max())
                fail(what, " token '", spelling, "': id ", id.dump(), " is not an integer in [0, 2^31-1)");
            entries.emplace_back(static_cast<std::int32_t>(id.get<std::int64_t>()), spelling);
        }
        for (auto& [id, spelling] : entries) {
            check_id_bound(id, entries.size(), what);
            auto bytes = token_text_to_bytes(spelling);
            if (bytes) {
                set_token(id, Kind::Vocab, std::move(*bytes), spelling);
            } else {
                raw_spellings_.emplace(spelling, id);
                set_token(id, Kind::Raw, spelling, spelling);
            }
        }
        find_byte_tokens(what);
    }

    /// The token of every single byte (a byte-level vocabulary has all 256).
    void find_byte_tokens(const char* what) {
        for (unsigned b = 0; b < 256; ++b) {
            const std::string one(1, static_cast<char>(b));
            const auto it = byte_tokens_.find(one);
            if (it == byte_tokens_.end())
                fail(what, " has no token for byte 0x", hex_byte(b), " ('", bytes_to_token_text(one),
                     "'): not a byte-level BPE vocabulary");
            byte_ids_[b] = it->second;
        }
    }

    /// Ids index flat tables, so a file may not name ids far beyond its token count (one id near 2^31
    /// would otherwise cost gigabytes): at most max_unassigned_ids ids may go unused.
    static constexpr std::size_t max_unassigned_ids = std::size_t(1) << 20;
    void check_id_bound(std::int32_t id, std::size_t tokens, const char* what) const {
        if (static_cast<std::size_t>(id) >= tokens + max_unassigned_ids)
            fail(what, ": id ", id, " leaves more than ", max_unassigned_ids, " ids unassigned (", tokens, " tokens)");
    }

    static std::string hex_byte(unsigned b) {
        const char* d = "0123456789ABCDEF";
        return {d[b >> 4], d[b & 15]};
    }

    void set_token(std::int32_t id, Kind kind, std::string bytes, const std::string& spelling) {
        const auto i = static_cast<std::size_t>(id);
        if (i >= pending_.size()) {
            pending_.resize(i + 1);
            kinds_.resize(i + 1, Kind::None);
        }
        if (kinds_[i] != Kind::None && spellings_[i] != spelling)
            fail("id ", id, " is given to two tokens, '", spellings_[i], "' and '", spelling, "'");
        if (spellings_.size() < pending_.size()) spellings_.resize(pending_.size());
        kinds_[i] = kind;
        spellings_[i] = spelling;
        if (kind == Kind::Vocab && bytes.size() == 1) byte_tokens_.emplace(bytes, id);
        pending_[i] = std::move(bytes);
    }

    /// Merges (left, right) in rank order: both sides and their concatenation must be vocabulary tokens.
    void build_merges(const std::vector<std::pair<std::string, std::string>>& merges) {
        std::unordered_map<std::string, std::int32_t> by_spelling;
        by_spelling.reserve(spellings_.size());
        for (std::size_t i = 0; i < spellings_.size(); ++i)
            if (kinds_[i] != Kind::None) by_spelling.emplace(spellings_[i], static_cast<std::int32_t>(i));
        pairs_.reserve(merges.size());
        merges_.reserve(merges.size());
        for (std::size_t r = 0; r < merges.size(); ++r) {
            const auto& [a, b] = merges[r];
            const auto ia = by_spelling.find(a);
            if (ia == by_spelling.end()) fail("merge ", r, " ('", a, " ", b, "'): '", a, "' is not in the vocabulary");
            const auto ib = by_spelling.find(b);
            if (ib == by_spelling.end()) fail("merge ", r, " ('", a, " ", b, "'): '", b, "' is not in the vocabulary");
            const auto im = by_spelling.find(a + b);
            if (im == by_spelling.end())
                fail("merge ", r, " ('", a, " ", b, "'): the merged token '", a + b, "' is not in the vocabulary");
            pairs_.put(ia->second, ib->second, {static_cast<std::uint32_t>(r), im->second});
            merges_.emplace_back(ia->second, ib->second);
        }
    }

    void parse_tokenizer_json(const nlohmann::json& root) {
        using nlohmann::json;
        if (!root.is_object()) fail("not a JSON object");
        const json* model = detail::member(root, "model");
        if (!model || !model->is_object()) fail("no \"model\" object");
        const json* type = detail::member(*model, "type");
        if (!type) {
            // Older files omit the type; a BPE model is the one with merges.
            if (!detail::member(*model, "merges")) fail("model has no \"type\" and no \"merges\": not a BPE model");
        } else if (!type->is_string()) {
            fail("model.type ", type->dump(), " is not a string");
        } else if (type->get<std::string>() != "BPE") {
            fail("model.type '", type->get<std::string>(), "' is not supported (comigs reads byte-level BPE only)");
        }
        auto require_null_or = [&](const char* key, auto&& ok) {
            const json* v = detail::member(*model, key);
            if (v && !v->is_null() && !ok(*v)) fail("model.", key, " = ", v->dump(), " is not supported");
        };
        require_null_or("dropout", [](const json& v) { return v.is_number() && v.get<double>() == 0.0; });
        require_null_or("continuing_subword_prefix", [](const json& v) { return v.is_string() && v.get<std::string>().empty(); });
        require_null_or("end_of_word_suffix", [](const json& v) { return v.is_string() && v.get<std::string>().empty(); });
        require_null_or("byte_fallback", [](const json& v) { return v.is_boolean() && !v.get<bool>(); });
        if (const json* im = detail::member(*model, "ignore_merges")) {
            if (!im->is_boolean()) fail("model.ignore_merges = ", im->dump(), " is not true or false");
            ignore_merges_ = im->get<bool>();
        }
        const json* vocab = detail::member(*model, "vocab");
        if (!vocab) fail("model has no \"vocab\"");
        read_vocab(*vocab, "model.vocab");

        const json* merges = detail::member(*model, "merges");
        if (!merges || !merges->is_array()) fail("model.merges is missing or not an array");
        std::vector<std::pair<std::string, std::string>> pairs;
        pairs.reserve(merges->size());
        for (std::size_t r = 0; r < merges->size(); ++r) {
            const json& m = (*merges)[r];
            if (m.is_string()) {
                const std::string& s = m.get_ref<const std::string&>();
                const std::size_t sp = s.find(' ');
                if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
                    fail("model.merges[", r, "] = '", s, "' is not two tokens separated by one space");
                pairs.emplace_back(s.substr(0, sp), s.substr(sp + 1));
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                pairs.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
            } else {
                fail("model.merges[", r, "] = ", m.dump(), " is neither \"left right\" nor [\"left\", \"right\"]");
            }
        }
        build_merges(pairs);

        if (const json* norm = detail::member(root, "normalizer"); norm && !norm->is_null()) {
            // NFC (Qwen2), alone or as the one step of a Sequence.
            const json* only = norm;
            if (const json* t = detail::member(*norm, "type"); t && *t == "Sequence") {
                const json* list = detail::member(*norm, "normalizers");
                if (list && list->is_array() && list->size() == 1) only = &(*list)[0];
            }
            const json* t = detail::member(*only, "type");
            if (!t || *t != "NFC") fail("normalizer ", describe(*norm), " is not supported (only NFC)");
            nfc_ = true;
        }
        const json* pre = detail::member(root, "pre_tokenizer");
        bool byte_level = false;
        std::vector<PreTokenizerStage> stages;
        if (pre && !pre->is_null()) parse_pre_tokenizer(*pre, "pre_tokenizer", stages, byte_level);
        if (!byte_level) fail("pre_tokenizer has no ByteLevel step: not a byte-level BPE tokenizer");
        pre_tokenizer_ = PreTokenizer(std::move(stages));

        const json* dec = detail::member(root, "decoder");
        if (!dec || dec->is_null()) fail("decoder is missing: a byte-level BPE tokenizer needs the ByteLevel decoder");
        if (const json* dt = detail::member(*dec, "type"); !dt || *dt != "ByteLevel")
            fail("decoder ", describe(*dec), " is not supported (only ByteLevel)");

        if (const json* added = detail::member(root, "added_tokens"); added && !added->is_null()) {
            if (!added->is_array()) fail("added_tokens is not an array");
            for (std::size_t i = 0; i < added->size(); ++i) parse_added_token((*added)[i], i);
        }
        finish();
    }

    static std::string describe(const nlohmann::json& v) {
        // (concat, not operator+: GCC 12 warns falsely in "'" + std::string at -O3, bug 105329)
        if (const nlohmann::json* t = detail::member(v, "type"); t && t->is_string())
            return comigs::detail::concat('\'', t->get<std::string>(), '\'');
        std::string s = v.dump();
        if (s.size() > 200) {
            s.resize(200);
            s.append("...");
        }
        return s;
    }
    void parse_pre_tokenizer(const nlohmann::json& p, const std::string& where, std::vector<PreTokenizerStage>& stages,
                             bool& byte_level) {
        using nlohmann::json;
        const json* type = detail::member(p, "type");
        if (!type || !type->is_string()) fail(where, " has no \"type\"");
        const std::string t = type->get<std::string>();
        auto flag = [&](const char* key, bool fallback) {
            const json* v = detail::member(p, key);
            if (!v || v->is_null()) return fallback;
            if (!v->is_boolean()) fail(where, ".", key, " = ", v->dump(), " is not true or false");
            return v->get<bool>();
        };
        if (t == "Sequence") {
            const json* list = detail::member(p, "pretokenizers");
            if (!list || !list->is_array()) fail(where, ".pretokenizers is missing or not an array");
            for (std::size_t i = 0; i < list->size(); ++i)
                parse_pre_tokenizer((*list)[i], where + ".pretokenizers[" + std::to_string(i) + "]", stages, byte_level);
        } else if (t == "ByteLevel") {
            if (flag("add_prefix_space", false))
                fail(where, ".add_prefix_space = true is not supported (comigs never adds a leading space)");
            if (flag("use_regex", true)) stages.push_back({PreTokenizerStage::Kind::Split, SplitPattern::Gpt2, false});
            byte_level = true;
        } else if (t == "Split") {
            if (byte_level) fail(where, ": a Split after the ByteLevel step is not supported");
            const json* pattern = detail::member(p, "pattern");
            const json* regex = pattern ? detail::member(*pattern, "Regex") : nullptr;
            if (!regex || !regex->is_string())
                fail(where, ".pattern = ", pattern ? pattern->dump() : std::string("null"), " is not a {\"Regex\": ...} pattern");
            const auto known = recognise_pattern(regex->get<std::string>());
            if (!known)
                fail(where, ".pattern.Regex '", regex->get<std::string>(),
                     "' is not a pattern comigs knows (GPT-2's, Llama-3's or Qwen2's)");
            const json* behavior = detail::member(p, "behavior");
            if (!behavior || *behavior != "Isolated")
                fail(where, ".behavior = ", behavior ? behavior->dump() : std::string("null"), " is not supported (only \"Isolated\")");
            if (flag("invert", false)) fail(where, ".invert = true is not supported");
            stages.push_back({PreTokenizerStage::Kind::Split, *known, false});
        } else if (t == "Digits") {
            if (byte_level) fail(where, ": Digits after the ByteLevel step is not supported");
            stages.push_back({PreTokenizerStage::Kind::Digits, SplitPattern::Gpt2, flag("individual_digits", false)});
        } else {
            fail(where, ".type '", t, "' is not supported (ByteLevel, Split, Digits, Sequence)");
        }
    }

    void parse_added_token(const nlohmann::json& a, std::size_t i) {
        using nlohmann::json;
        const std::string where = "added_tokens[" + std::to_string(i) + "]";
        const json* id = detail::member(a, "id");
        const json* content = detail::member(a, "content");
        if (!id || !id->is_number_integer() || id->get<std::int64_t>() < 0 ||
            id->get<std::int64_t>() >= std::numeric_limits<std::int32_t>::max())
            fail(where, ".id = ", id ? id->dump() : std::string("null"), " is not an integer in [0, 2^31-1)");
        if (!content || !content->is_string() || content->get_ref<const std::string&>().empty())
            fail(where, ".content = ", content ? content->dump() : std::string("null"), " is not a non-empty string");
        for (const char* key : {"single_word", "lstrip", "rstrip"}) {
            const json* v = detail::member(a, key);
            if (v && !v->is_null() && !(v->is_boolean() && !v->get<bool>()))
                fail(where, " ('", content->get<std::string>(), "'): ", key, " = ", v->dump(), " is not supported");
        }
        const json* special = detail::member(a, "special");
        if (special && !special->is_null() && !special->is_boolean()) fail(where, ".special = ", special->dump(), " is not true or false");
        const auto tid = static_cast<std::int32_t>(id->get<std::int64_t>());
        check_id_bound(tid, kinds_.size() + i + 1, where.c_str());
        const std::string& text = content->get_ref<const std::string&>();
        const auto ti = static_cast<std::size_t>(tid);
        if (ti < kinds_.size() && kinds_[ti] != Kind::None) {
            // Already a vocabulary token (GPT-2's <|endoftext|>): its bytes must be the content.
            if (pending_[ti] != text && spellings_[ti] != text)
                fail(where, " ('", text, "'): id ", tid, " is the vocabulary token '", spellings_[ti], "'");
        } else {
            set_token(tid, Kind::Raw, text, text);
        }
        for (const AddedToken& other : added_)
            if (other.content == text) fail(where, ": content '", text, "' is added twice");
        added_.push_back(AddedToken{tid, text, special && special->is_boolean() && special->get<bool>()});
    }

    /// Lays the token bytes out in one pool and builds the lookup tables.
    void finish() {
        offsets_.assign(pending_.size() + 1, 0);
        std::size_t total = 0;
        for (const auto& b : pending_) total += b.size();
        pool_.clear();
        pool_.reserve(total);
        std::vector<std::int32_t> vocab_ids;
        for (std::size_t i = 0; i < pending_.size(); ++i) {
            offsets_[i] = static_cast<std::uint32_t>(pool_.size());
            pool_ += pending_[i];
            if (kinds_[i] == Kind::Vocab) vocab_ids.push_back(static_cast<std::int32_t>(i));
        }
        offsets_[pending_.size()] = static_cast<std::uint32_t>(pool_.size());
        if (pool_.size() >= std::numeric_limits<std::uint32_t>::max()) fail("tokens hold more than 4 GB of bytes");
        // What only loading needed goes (about 10 MB for Llama-3's spellings).
        pending_ = {};
        spellings_ = {};
        byte_tokens_ = {};
        index_.build(vocab_ids, [this](std::int32_t id) { return bytes_of(id); });
        byte_pair_ranks_.resize(256 * 256);
        for (unsigned a = 0; a < 256; ++a)
            for (unsigned b = 0; b < 256; ++b) byte_pair_ranks_[a << 8 | b] = pairs_.find(byte_ids_[a], byte_ids_[b]).rank;
        match_ordinary_ = detail::AddedTokenMatcher(added_, false);
        match_all_ = detail::AddedTokenMatcher(added_, true);
    }

    // ---- encoding ------------------------------------------------------------------------------------

    void encode_ordinary(std::string_view text, std::vector<std::int32_t>& out, detail::MergeScratch& scratch,
                         detail::PieceCache* cache, std::vector<std::unique_ptr<std::string>>& normalized) const {
        if (nfc_ && !is_nfc_quick(text)) {
            normalized.push_back(std::make_unique<std::string>(nfc(text)));
            text = *normalized.back();
        }
        pre_tokenizer_.for_each_piece(text, [&](std::string_view piece) {
            encode_piece_to(piece, out, scratch, cache, MergeAlgorithm::Automatic);
        });
    }

    void encode_piece_to(std::string_view piece, std::vector<std::int32_t>& out, detail::MergeScratch& s,
                         detail::PieceCache* cache, MergeAlgorithm algorithm) const {
        if (piece.empty()) return;
        if (piece.size() == 1) {
            out.push_back(byte_ids_[static_cast<unsigned char>(piece[0])]);
            return;
        }
        const std::uint64_t h = detail::hash_bytes(piece);
        const std::int32_t *first = nullptr, *last = nullptr;
        if (cache && cache->find(piece, h, first, last)) {
            for (; first != last; ++first) out.push_back(*first);  // mostly one or two ids: no memmove call
            return;
        }
        if (ignore_merges_) {
            const std::int32_t id = index_.find(piece, h, [this](std::int32_t i) { return bytes_of(i); });
            if (id >= 0) {
                out.push_back(id);
                if (cache) cache->put(piece, h, std::span<const std::int32_t>(&id, 1));
                return;
            }
        }
        s.ids.clear();
        for (unsigned char b : piece) s.ids.push_back(byte_ids_[b]);
        const bool heap = algorithm == MergeAlgorithm::Heap || (algorithm == MergeAlgorithm::Automatic && piece.size() > 48);
        if (heap) merge_heap(s);
        else merge_scan(s, piece);
        out.insert(out.end(), s.ids.begin(), s.ids.end());
        if (cache) cache->put(piece, h, s.ids);
    }

    /// Repeatedly merges the leftmost pair of lowest rank in s.ids, scanning all pairs each time:
    /// O(n^2) for n symbols, no allocation; fastest for short pieces.
    /// The first ranks come from the dense table of byte pairs (hot in cache for common pairs).
    void merge_scan(detail::MergeScratch& s, std::string_view piece) const {
        auto& ids = s.ids;
        auto& ranks = s.ranks;
        ranks.resize(ids.size());
        const auto* b = reinterpret_cast<const unsigned char*>(piece.data());
        for (std::size_t k = 0; k + 1 < ids.size(); ++k) ranks[k] = byte_pair_ranks_[unsigned(b[k]) << 8 | b[k + 1]];
        std::size_t n = ids.size();
        while (n > 1) {
            std::uint32_t best = detail::PairTable::no_rank;
            std::size_t at = 0;
            for (std::size_t k = 0; k + 1 < n; ++k)
                if (ranks[k] < best) {
                    best = ranks[k];
                    at = k;
                }
            if (best == detail::PairTable::no_rank) break;
            ids[at] = pairs_.find(ids[at], ids[at + 1]).merged;
            for (std::size_t k = at + 1; k + 1 < n; ++k) {
                ids[k] = ids[k + 1];
                ranks[k] = ranks[k + 1];
            }
            --n;
            if (at + 1 < n) ranks[at] = pairs_.find(ids[at], ids[at + 1]).rank;
            if (at > 0) ranks[at - 1] = pairs_.find(ids[at - 1], ids[at]).rank;
        }
        ids.resize(n);
    }

    /// The same merges with a min-heap of (rank, position) over a linked list of symbols: O(n log n).
    /// A popped pair is stale when either symbol changed since it was pushed.
    void merge_heap(detail::MergeScratch& s) const {
        using Entry = detail::MergeScratch::HeapEntry;
        auto& ids = s.ids;
        const auto n = static_cast<std::int32_t>(ids.size());
        s.prev.resize(ids.size());
        s.next.resize(ids.size());
        for (std::int32_t i = 0; i < n; ++i) {
            s.prev[static_cast<std::size_t>(i)] = i - 1;
            s.next[static_cast<std::size_t>(i)] = i + 1 < n ? i + 1 : -1;
        }
        auto& heap = s.heap;
        heap.clear();
        auto push = [&](std::int32_t pos) {
            const std::int32_t nx = s.next[static_cast<std::size_t>(pos)];
            if (nx < 0) return;
            const std::int32_t l = ids[static_cast<std::size_t>(pos)], r = ids[static_cast<std::size_t>(nx)];
            const auto m = pairs_.find(l, r);
            if (m.rank == detail::PairTable::no_rank) return;
            heap.push_back(Entry{m.rank, pos, l, r, m.merged});
            std::push_heap(heap.begin(), heap.end(), std::greater<>{});
        };
        for (std::int32_t i = 0; i + 1 < n; ++i) push(i);
        while (!heap.empty()) {
            std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
            const Entry e = heap.back();
            heap.pop_back();
            const auto p = static_cast<std::size_t>(e.pos);
            if (ids[p] != e.left) continue;  // the left symbol was merged away or grew
            const std::int32_t nx = s.next[p];
            if (nx < 0 || ids[static_cast<std::size_t>(nx)] != e.right) continue;
            ids[p] = e.merged;
            ids[static_cast<std::size_t>(nx)] = -1;  // dead
            const std::int32_t after = s.next[static_cast<std::size_t>(nx)];
            s.next[p] = after;
            if (after >= 0) s.prev[static_cast<std::size_t>(after)] = e.pos;
            if (s.prev[p] >= 0) push(s.prev[p]);
            push(e.pos);
        }
        std::size_t w = 0;
        for (std::int32_t i = 0; i >= 0; i = s.next[static_cast<std::size_t>(i)]) ids[w++] = ids[static_cast<std::size_t>(i)];
        ids.resize(w);
    }

    std::string source_;
    // Token bytes: id i is pool_[offsets_[i], offsets_[i + 1]).
    std::string pool_;
    std::vector<std::uint32_t> offsets_ = {0};
    std::vector<Kind> kinds_;
    std::vector<std::string> spellings_;  // while loading
    std::vector<std::string> pending_;    // while loading
    std::unordered_map<std::string, std::int32_t> byte_tokens_;  // while loading
    std::unordered_map<std::string, std::int32_t> raw_spellings_;  // vocabulary tokens that are not byte-level
    std::int32_t byte_ids_[256] = {};
    detail::BytesIndex index_;
    detail::PairTable pairs_;
    std::vector<std::uint32_t> byte_pair_ranks_;  // rank of (byte a, byte b) at a << 8 | b
    std::vector<std::pair<std::int32_t, std::int32_t>> merges_;
    bool ignore_merges_ = false;
    bool nfc_ = false;
    PreTokenizer pre_tokenizer_;
    std::vector<AddedToken> added_;
    detail::AddedTokenMatcher match_ordinary_, match_all_;
};

/// Decodes ids one at a time for generation: push() returns the bytes that now form complete UTF-8
/// characters (an ill-formed byte is released as soon as it cannot start a character), holding back a
/// character split across tokens until its last byte arrives. flush() returns whatever is held.
class StreamingDecoder {
public:
    explicit StreamingDecoder(const BpeTokenizer& tokenizer) : tokenizer_(&tokenizer) {}

    std::string push(std::int32_t id) {
        const std::int32_t one[1] = {id};
        held_ += tokenizer_->decode(one);
        const std::size_t keep = incomplete_tail(held_);
        std::string out = held_.substr(0, held_.size() - keep);
        held_.erase(0, held_.size() - keep);
        return out;
    }

    std::string flush() { return std::exchange(held_, std::string()); }

    /// Length of the suffix of `s` that is the start of a well-formed UTF-8 character still missing bytes.
    static std::size_t incomplete_tail(std::string_view s) noexcept {
        const auto* p = reinterpret_cast<const unsigned char*>(s.data());
        const std::size_t n = s.size();
        for (std::size_t k = 1; k <= 3 && k <= n; ++k) {
            const unsigned c = p[n - k];
            if ((c & 0xC0u) == 0x80u) continue;  // a continuation byte: look further back
            std::size_t len = 0;
            unsigned lo = 0x80u, hi = 0xBFu;
            if (c >= 0xC2u && c <= 0xDFu) len = 2;
            else if (c >= 0xE0u && c <= 0xEFu) {
                len = 3;
                if (c == 0xE0u) lo = 0xA0u;
                if (c == 0xEDu) hi = 0x9Fu;
            } else if (c >= 0xF0u && c <= 0xF4u) {
                len = 4;
                if (c == 0xF0u) lo = 0x90u;
                if (c == 0xF4u) hi = 0x8Fu;
            }
            if (len <= k) return 0;  // complete, ill-formed, or ASCII: nothing to wait for
            if (k >= 2 && (p[n - k + 1] < lo || p[n - k + 1] > hi)) return 0;
            return k;
        }
        return 0;
    }

private:
    const BpeTokenizer* tokenizer_;
    std::string held_;
};

}  // namespace comigs::text
