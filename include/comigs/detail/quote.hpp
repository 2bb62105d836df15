#pragma once
// Names and bytes from files, quoted for error messages: hostile input must not put control characters
// or megabytes of text into an exception's message.
#include <span>
#include <string>
#include <string_view>

namespace comigs::detail {

/// A name or value quoted for an error message: control and non-ASCII bytes as \xNN, long text cut.
inline std::string quote_name(std::string_view s) {
    std::string out = "'";
    const std::size_t limit = 120;
    for (std::size_t i = 0; i < s.size() && i < limit; ++i) {
        const auto c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c >= 0x7F || c == '\'' || c == '\\') {
            const char* hex = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 0xF];
        } else {
            out += static_cast<char>(c);
        }
    }
    if (s.size() > limit) out += "...";
    return out + "'";
}

/// Bytes quoted as quote_name quotes text.
inline std::string quote_bytes(std::span<const std::byte> b) {
    return quote_name(std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
}

}  // namespace comigs::detail
