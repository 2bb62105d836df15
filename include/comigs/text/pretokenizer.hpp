#pragma once
// Pre-tokenizers of byte-level BPE tokenizers: the text is cut into pieces ("pre-tokens") before BPE
// merges bytes inside each piece. The split patterns are regular expressions in the tokenizer files;
// comigs recognises the few that published tokenizers use and matches each with a hand-written scanner
// that follows the regex engine's leftmost-first alternation and backtracking exactly:
//
//   GPT-2   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama-3 (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//           \s*[\r\n]+|\s+(?!\S)|\s+
//   Qwen2   Llama-3's with \p{N} (one digit per piece)
//
// \s is the White_Space property (as in Rust's regex, Oniguruma and ICU; JavaScript's \s differs at
// U+0085 and U+FEFF). (?i) folds case as Unicode simple case folding does: 's also matches 'S and 'ſ
// (U+017F). Bytes that are not well-formed UTF-8 count as one character each, of class Other.
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "../error.hpp"
#include "unicode.hpp"

namespace comigs::text {

/// The split patterns comigs can match.
enum class SplitPattern : std::uint8_t { Gpt2, Llama3, Qwen2 };

/// The regular expressions as the tokenizer files spell them.
inline constexpr std::string_view gpt2_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view llama3_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view qwen2_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

/// The pattern a regular expression spells, if it is one comigs knows (tiktoken's spelling of GPT-2's,
/// `'(?:[sdmt]|ll|ve|re)| ?\p{L}+...`, is the same language and accepted too).
inline std::optional<SplitPattern> recognise_pattern(std::string_view regex) noexcept {
    if (regex == gpt2_pattern) return SplitPattern::Gpt2;
    if (regex == R"('(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)") return SplitPattern::Gpt2;
    if (regex == llama3_pattern) return SplitPattern::Llama3;
    if (regex == qwen2_pattern) return SplitPattern::Qwen2;
    return std::nullopt;
}

inline const char* pattern_name(SplitPattern p) noexcept {
    switch (p) {
        case SplitPattern::Gpt2: return "gpt2";
        case SplitPattern::Llama3: return "llama3";
        case SplitPattern::Qwen2: return "qwen2";
    }
    return "?";
}

namespace detail {

inline constexpr std::array<CharClass, 128> ascii_classes = [] {
    std::array<CharClass, 128> t{};
    for (unsigned c = 0; c < 128; ++c) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) t[c] = CharClass::Letter;
        else if (c >= '0' && c <= '9') t[c] = CharClass::Number;
        else if ((c >= 0x09 && c <= 0x0D) || c == ' ') t[c] = CharClass::Space;
        else t[c] = CharClass::Other;
    }
    return t;
}();

/// A character of the input: its class and length in bytes (an ill-formed byte is a character of 1).
struct Char {
    CharClass cls;
    std::uint32_t size;
    char32_t cp;
};

inline Char char_at(const unsigned char* p, const unsigned char* end) noexcept {
    if (*p < 0x80u) return {ascii_classes[*p], 1, *p};
    const Utf8Unit u = decode_utf8(p, end);
    return {u.valid ? char_class(u.cp) : CharClass::Other, u.size, u.cp};
}

/// End of the run of characters of class `cls` starting at `p` (which may be `end`).
inline const unsigned char* run_end(CharClass cls, const unsigned char* p, const unsigned char* end) noexcept {
    while (p < end) {
        if (*p < 0x80u) {
            if (ascii_classes[*p] != cls) return p;
            ++p;
            continue;
        }
        const Char c = char_at(p, end);
        if (c.cls != cls) return p;
        p += c.size;
    }
    return p;
}

/// The shared tail of all three patterns at a whitespace character `p`: `\s+(?!\S)|\s+`, and before it,
/// for Llama-3 and Qwen2, `\s*[\r\n]+` (the run up to its last line break).
inline const unsigned char* whitespace_piece(const unsigned char* p, const unsigned char* end,
                                             bool line_breaks) noexcept {
    const unsigned char* last_start = p;  // start of the run's last character
    const unsigned char* last_break = nullptr;
    const unsigned char* q = p;
    while (q < end) {
        const Char c = char_at(q, end);
        if (c.cls != CharClass::Space) break;
        if (*q == '\r' || *q == '\n') last_break = q;
        last_start = q;
        q += c.size;
    }
    if (line_breaks && last_break) return last_break + 1;
    if (q == end) return q;            // \s+(?!\S) at the end of the text
    if (last_start != p) return last_start;  // give back the last space: it may lead the next word
    return q;                          // \s+: a single space before a non-space
}

inline bool ascii_lower_is(unsigned char c, char lower) noexcept { return (c | 0x20u) == static_cast<unsigned char>(lower); }

/// GPT-2: the end of the piece that starts at `p` (< end).
inline const unsigned char* gpt2_piece(const unsigned char* p, const unsigned char* end) noexcept {
    if (*p == '\'' && end - p >= 2) {
        const unsigned char c = p[1];
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return p + 2;
        if (end - p >= 3 && ((c == 'r' && p[2] == 'e') || (c == 'v' && p[2] == 'e') || (c == 'l' && p[2] == 'l')))
            return p + 3;
    }
    const Char c0 = char_at(p, end);
    const unsigned char* q = p;
    CharClass cls = c0.cls;
    if (*p == ' ' && end - p >= 2) {  // ' ?' leading a letter, number or symbol run
        const Char c1 = char_at(p + 1, end);
        if (c1.cls != CharClass::Space) {
            q = p + 1;
            cls = c1.cls;
        }
    }
    if (cls != CharClass::Space) return run_end(cls, q, end);
    return whitespace_piece(p, end, false);
}

/// Llama-3 (`max_digits` 3) and Qwen2 (`max_digits` 1): the end of the piece that starts at `p` (< end).
inline const unsigned char* llama3_piece(const unsigned char* p, const unsigned char* end, int max_digits) noexcept {
    if (*p == '\'' && end - p >= 2) {  // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        const unsigned char c = p[1];
        if (ascii_lower_is(c, 's') || ascii_lower_is(c, 't') || ascii_lower_is(c, 'm') || ascii_lower_is(c, 'd'))
            return p + 2;
        if (c == 0xC5u && end - p >= 3 && p[2] == 0xBFu) return p + 3;  // U+017F folds to s
        if (end - p >= 3 &&
            ((ascii_lower_is(c, 'r') && ascii_lower_is(p[2], 'e')) || (ascii_lower_is(c, 'v') && ascii_lower_is(p[2], 'e')) ||
             (ascii_lower_is(c, 'l') && ascii_lower_is(p[2], 'l'))))
            return p + 3;
    }
    const Char c0 = char_at(p, end);
    switch (c0.cls) {
        case CharClass::Letter: return run_end(CharClass::Letter, p + c0.size, end);
        case CharClass::Number: {
            const unsigned char* q = p + c0.size;
            for (int n = 1; n < max_digits && q < end; ++n) {
                const Char c = char_at(q, end);
                if (c.cls != CharClass::Number) break;
                q += c.size;
            }
            return q;
        }
        default: break;
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+ : one symbol or space (not a line break) leading a letter run
    const bool line_break = *p == '\r' || *p == '\n';
    const unsigned char* q = p + c0.size;
    if (!line_break && q < end) {
        const Char c1 = char_at(q, end);
        if (c1.cls == CharClass::Letter) return run_end(CharClass::Letter, q + c1.size, end);
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    const unsigned char* s = nullptr;
    if (c0.cls == CharClass::Other) s = p;
    else if (*p == ' ' && q < end && char_at(q, end).cls == CharClass::Other) s = q;
    if (s) {
        const unsigned char* r = run_end(CharClass::Other, s, end);
        while (r < end && (*r == '\r' || *r == '\n')) ++r;
        return r;
    }
    return whitespace_piece(p, end, true);
}

}  // namespace detail

/// End offset of the piece of `text` starting at `begin` (< text.size()) under `pattern`.
inline std::size_t next_piece(SplitPattern pattern, std::string_view text, std::size_t begin) noexcept {
    const auto* base = reinterpret_cast<const unsigned char*>(text.data());
    const unsigned char* end = base + text.size();
    const unsigned char* p = base + begin;
    const unsigned char* q = pattern == SplitPattern::Gpt2 ? detail::gpt2_piece(p, end)
                             : pattern == SplitPattern::Llama3 ? detail::llama3_piece(p, end, 3)
                                                               : detail::llama3_piece(p, end, 1);
    return static_cast<std::size_t>(q - base);
}

/// Calls `on_piece(std::string_view)` for each piece of `text` under `pattern`, in order; the pieces
/// concatenate to `text`.
template <class OnPiece>
void split_pieces(SplitPattern pattern, std::string_view text, OnPiece&& on_piece) {
    std::size_t i = 0;
    while (i < text.size()) {
        const std::size_t j = next_piece(pattern, text, i);
        on_piece(text.substr(i, j - i));
        i = j;
    }
}

/// Hugging Face's `Digits` pre-tokenizer: runs of \p{N} characters (or, with `individual`, each one)
/// are pieces of their own; the text between them is a piece too.
template <class OnPiece>
void split_digits(bool individual, std::string_view text, OnPiece&& on_piece) {
    const auto* base = reinterpret_cast<const unsigned char*>(text.data());
    const unsigned char* end = base + text.size();
    const unsigned char* start = base;
    const unsigned char* p = base;
    while (p < end) {
        const detail::Char c = detail::char_at(p, end);
        if (c.cls != CharClass::Number) {
            p += c.size;
            continue;
        }
        if (p > start) on_piece(text.substr(static_cast<std::size_t>(start - base), static_cast<std::size_t>(p - start)));
        const unsigned char* q = individual ? p + c.size : detail::run_end(CharClass::Number, p, end);
        on_piece(text.substr(static_cast<std::size_t>(p - base), static_cast<std::size_t>(q - p)));
        start = p = q;
    }
    if (p > start) on_piece(text.substr(static_cast<std::size_t>(start - base), static_cast<std::size_t>(p - start)));
}

/// One stage of a pre-tokenizer: a split pattern, or Hugging Face's Digits.
struct PreTokenizerStage {
    enum class Kind : std::uint8_t { Split, Digits } kind = Kind::Split;
    SplitPattern pattern = SplitPattern::Gpt2;  ///< for Split
    bool individual_digits = false;             ///< for Digits
};

/// A sequence of stages; each cuts every piece of the one before it (Hugging Face's `Sequence`).
class PreTokenizer {
public:
    PreTokenizer() = default;
    explicit PreTokenizer(std::vector<PreTokenizerStage> stages) : stages_(std::move(stages)) {}
    static PreTokenizer split(SplitPattern p) { return PreTokenizer({PreTokenizerStage{PreTokenizerStage::Kind::Split, p, false}}); }

    const std::vector<PreTokenizerStage>& stages() const noexcept { return stages_; }

    /// Calls `on_piece(std::string_view)` for each final piece of `text`, in order. No stage: one piece.
    template <class OnPiece>
    void for_each_piece(std::string_view text, OnPiece&& on_piece) const {
        run(0, text, on_piece);
    }

    /// The pieces as strings (for tests and tools; encoding uses for_each_piece).
    std::vector<std::string> pieces(std::string_view text) const {
        std::vector<std::string> out;
        for_each_piece(text, [&](std::string_view s) { out.emplace_back(s); });
        return out;
    }

private:
    template <class OnPiece>
    void run(std::size_t stage, std::string_view text, OnPiece& on_piece) const {
        if (text.empty()) return;
        if (stage == stages_.size()) {
            on_piece(text);
            return;
        }
        const PreTokenizerStage& s = stages_[stage];
        if (stage + 1 == stages_.size() && s.kind == PreTokenizerStage::Kind::Split) {
            split_pieces(s.pattern, text, on_piece);  // the common case: no recursion per piece
            return;
        }
        auto next = [&](std::string_view piece) { run(stage + 1, piece, on_piece); };
        if (s.kind == PreTokenizerStage::Kind::Split) split_pieces(s.pattern, text, next);
        else split_digits(s.individual_digits, text, next);
    }

    std::vector<PreTokenizerStage> stages_;
};

}  // namespace comigs::text
