#include <comigs/text/byte_level.hpp>
#include <doctest/doctest.h>

#include <set>
#include <string>

using namespace comigs::text;

TEST_CASE("byte-level alphabet: GPT-2's bytes_to_unicode and back") {
    CHECK(byte_to_char('!') == U'!');
    CHECK(byte_to_char(' ') == 0x120);   // 'Ġ'
    CHECK(byte_to_char('\n') == 0x10A);  // 'Ċ'
    CHECK(byte_to_char(0x00) == 0x100);
    CHECK(byte_to_char(0x7F) == 0x121);
    CHECK(byte_to_char(0xAD) == 0x143);
    CHECK(byte_to_char(0xE9) == 0xE9);
    std::set<char32_t> chars;
    for (unsigned b = 0; b < 256; ++b) {
        chars.insert(byte_to_char(static_cast<std::uint8_t>(b)));
        CHECK(char_to_byte(byte_to_char(static_cast<std::uint8_t>(b))) == static_cast<std::uint8_t>(b));
    }
    CHECK(chars.size() == 256);
    CHECK_FALSE(char_to_byte(' ').has_value());
    CHECK_FALSE(char_to_byte(0x144).has_value());
    CHECK(bytes_to_token_text(" the\n") == "\xC4\xA0the\xC4\x8A");
    CHECK(token_text_to_bytes("\xC4\xA0the") == std::optional<std::string>(" the"));
    CHECK_FALSE(token_text_to_bytes("<|x|> y").has_value());  // a space is not in the alphabet
    std::string all;
    for (unsigned b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
    CHECK(token_text_to_bytes(bytes_to_token_text(all)) == std::optional<std::string>(all));
}
