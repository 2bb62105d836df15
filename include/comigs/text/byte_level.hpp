#pragma once
// GPT-2's byte-to-character map (`bytes_to_unicode`): byte-level BPE vocabularies spell every byte as
// a printable character, so tokens are strings over a 256-character alphabet. The printable Latin-1
// bytes ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for themselves; the other 68 bytes, in order,
// for U+0100 onwards (so the space 0x20 is 'Ġ', U+0120, and the newline 0x0A is 'Ċ', U+010A).
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "unicode.hpp"

namespace comigs::text {

namespace detail {
inline constexpr bool byte_is_printable(unsigned b) noexcept {
    return (b >= 0x21u && b <= 0x7Eu) || (b >= 0xA1u && b <= 0xACu) || (b >= 0xAEu && b <= 0xFFu);
}

inline constexpr std::array<char32_t, 256> byte_chars = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 0x100;
    for (unsigned b = 0; b < 256; ++b) t[b] = byte_is_printable(b) ? char32_t(b) : next++;
    return t;
}();
}  // namespace detail

/// The character that stands for byte `b` in byte-level vocabularies.
inline constexpr char32_t byte_to_char(std::uint8_t b) noexcept { return detail::byte_chars[b]; }

/// The byte a character stands for, if it is one of the 256.
inline constexpr std::optional<std::uint8_t> char_to_byte(char32_t c) noexcept {
    if (c < 0x100u) {
        if (detail::byte_is_printable(c)) return static_cast<std::uint8_t>(c);
        return std::nullopt;
    }
    if (c < 0x100u + 68u) {
        // The 68 non-printable bytes in order: 0x00-0x20, 0x7F-0xA0, 0xAD.
        const unsigned k = c - 0x100u;
        if (k <= 0x20u) return static_cast<std::uint8_t>(k);
        if (k <= 0x20u + 34u) return static_cast<std::uint8_t>(0x7Fu + (k - 0x21u));
        return static_cast<std::uint8_t>(0xADu);
    }
    return std::nullopt;
}

/// Bytes -> their byte-level spelling (UTF-8).
inline std::string bytes_to_token_text(std::string_view bytes) {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (unsigned char b : bytes) append_utf8(out, byte_to_char(b));
    return out;
}

/// A byte-level spelling (UTF-8) -> its bytes; nullopt if it has a character outside the alphabet or is
/// not well-formed UTF-8.
inline std::optional<std::string> token_text_to_bytes(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const unsigned char* end = p + text.size();
    while (p < end) {
        const Utf8Unit u = decode_utf8(p, end);
        if (!u.valid) return std::nullopt;
        const auto b = char_to_byte(u.cp);
        if (!b) return std::nullopt;
        out.push_back(static_cast<char>(*b));
        p += u.size;
    }
    return out;
}

}  // namespace comigs::text
