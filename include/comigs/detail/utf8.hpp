#pragma once
// Strict UTF-8 validation (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
// File headers and names are checked with it before they reach the JSON layer, so a bad byte gets a
// message with its offset instead of a generic parse error.
#include <cstddef>
#include <string_view>

namespace comigs::detail {

/// Offset of the first byte that breaks UTF-8 in `s`, or `std::string_view::npos` if `s` is valid.
inline std::size_t utf8_invalid_offset(std::string_view s) noexcept {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const std::size_t n = s.size();
    std::size_t i = 0;
    auto cont = [&](std::size_t k) { return k < n && (p[k] & 0xC0u) == 0x80u; };
    while (i < n) {
        const unsigned c = p[i];
        if (c < 0x80u) {
            ++i;
            continue;
        }
        std::size_t len = 0;
        unsigned lo = 0x80u, hi = 0xBFu;  // allowed range of the second byte
        if (c >= 0xC2u && c <= 0xDFu) {
            len = 2;
        } else if (c >= 0xE0u && c <= 0xEFu) {
            len = 3;
            if (c == 0xE0u) lo = 0xA0u;  // overlong
            if (c == 0xEDu) hi = 0x9Fu;  // surrogates
        } else if (c >= 0xF0u && c <= 0xF4u) {
            len = 4;
            if (c == 0xF0u) lo = 0x90u;  // overlong
            if (c == 0xF4u) hi = 0x8Fu;  // above U+10FFFF
        } else {
            return i;
        }
        if (i + 1 >= n || p[i + 1] < lo || p[i + 1] > hi) return i;
        for (std::size_t k = 2; k < len; ++k)
            if (!cont(i + k)) return i;
        i += len;
    }
    return std::string_view::npos;
}

inline bool is_valid_utf8(std::string_view s) noexcept { return utf8_invalid_offset(s) == std::string_view::npos; }

}  // namespace comigs::detail
