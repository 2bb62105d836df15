#pragma once
// The Unicode classes the byte-level BPE pre-tokenizer patterns need (\p{L}, \p{N}, \s), and a UTF-8
// decoder that never fails: a byte that does not start a well-formed sequence is one unit of its own
// (class Other, like the U+FFFD it would be replaced by), so any byte string can be split and no byte is
// lost. Tables: detail/unicode_tables.hpp, generated from Debian's Unicode Character Database by
// tools/gen_unicode_tables.py.
#include <cstddef>
#include <cstdint>

#include "detail/unicode_tables.hpp"

namespace comigs::text {

/// Class of a code point in the pre-tokenizer patterns: \p{L} (Letter), \p{N} (Number), \s (Space, the
/// White_Space property), everything else Other.
enum class CharClass : std::uint8_t { Other = 0, Letter = 1, Number = 2, Space = 3 };

/// The Unicode version of the tables (e.g. "15.0.0").
inline constexpr const char* unicode_version() noexcept { return detail::unicode_version; }

/// Class of code point `cp` (any value; above U+10FFFF is Other).
inline CharClass char_class(char32_t cp) noexcept {
    if (cp >= 0x110000u) return CharClass::Other;
    const unsigned block = detail::class_block_index[cp >> detail::class_block_shift];
    const unsigned i = cp & ((1u << detail::class_block_shift) - 1u);
    const unsigned byte = detail::class_blocks[block * (1u << detail::class_block_shift) / 4u + i / 4u];
    return static_cast<CharClass>((byte >> (2u * (i % 4u))) & 3u);
}

/// One unit of UTF-8 text: a well-formed sequence (its code point) or a single ill-formed byte.
struct Utf8Unit {
    char32_t cp;          ///< the code point; for an ill-formed byte, 0xFFFD
    std::uint32_t size;   ///< bytes consumed, 1-4
    bool valid;           ///< false for an ill-formed byte
};

/// Decodes the unit starting at `p` (`p < end`). Well-formed means RFC 3629: no overlong forms, no
/// surrogates, nothing above U+10FFFF; anything else is one ill-formed byte.
inline Utf8Unit decode_utf8(const unsigned char* p, const unsigned char* end) noexcept {
    const unsigned c = p[0];
    if (c < 0x80u) return {c, 1, true};
    const std::ptrdiff_t left = end - p;
    auto cont = [&](std::ptrdiff_t k) { return k < left && (p[k] & 0xC0u) == 0x80u; };
    if (c >= 0xC2u && c <= 0xDFu) {
        if (cont(1)) return {((c & 0x1Fu) << 6) | (p[1] & 0x3Fu), 2, true};
    } else if (c >= 0xE0u && c <= 0xEFu) {
        if (cont(1) && cont(2)) {
            const char32_t cp = ((c & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
            if (cp >= 0x800u && (cp < 0xD800u || cp > 0xDFFFu)) return {cp, 3, true};
        }
    } else if (c >= 0xF0u && c <= 0xF4u) {
        if (cont(1) && cont(2) && cont(3)) {
            const char32_t cp =
                ((c & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
            if (cp >= 0x10000u && cp <= 0x10FFFFu) return {cp, 4, true};
        }
    }
    return {0xFFFDu, 1, false};
}

/// Appends the UTF-8 encoding of `cp` (<= U+10FFFF, not a surrogate) to `out`.
template <class String>
void append_utf8(String& out, char32_t cp) {
    using Char = typename String::value_type;
    if (cp < 0x80u) {
        out.push_back(static_cast<Char>(cp));
    } else if (cp < 0x800u) {
        out.push_back(static_cast<Char>(0xC0u | (cp >> 6)));
        out.push_back(static_cast<Char>(0x80u | (cp & 0x3Fu)));
    } else if (cp < 0x10000u) {
        out.push_back(static_cast<Char>(0xE0u | (cp >> 12)));
        out.push_back(static_cast<Char>(0x80u | ((cp >> 6) & 0x3Fu)));
        out.push_back(static_cast<Char>(0x80u | (cp & 0x3Fu)));
    } else {
        out.push_back(static_cast<Char>(0xF0u | (cp >> 18)));
        out.push_back(static_cast<Char>(0x80u | ((cp >> 12) & 0x3Fu)));
        out.push_back(static_cast<Char>(0x80u | ((cp >> 6) & 0x3Fu)));
        out.push_back(static_cast<Char>(0x80u | (cp & 0x3Fu)));
    }
}

}  // namespace comigs::text
