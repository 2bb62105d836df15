#include <comigs/text/unicode.hpp>
#include <doctest/doctest.h>

#include <string>
#include <string_view>

using comigs::text::CharClass;
using comigs::text::char_class;

namespace {
comigs::text::Utf8Unit decode(std::string_view s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    return comigs::text::decode_utf8(p, p + s.size());
}
}  // namespace

TEST_CASE("char_class: \\p{L}, \\p{N}, White_Space and the rest (Unicode 15.0 tables)") {
    CHECK(std::string(comigs::text::unicode_version()) == "15.0.0");
    CHECK(char_class('a') == CharClass::Letter);
    CHECK(char_class(U'ǅ') == CharClass::Letter);      // Lt
    CHECK(char_class(U'ʰ') == CharClass::Letter);      // Lm
    CHECK(char_class(U'中') == CharClass::Letter);      // Lo
    CHECK(char_class(0x20000) == CharClass::Letter);   // CJK extension B, a range in UnicodeData.txt
    CHECK(char_class(0xAC00) == CharClass::Letter);    // Hangul syllable, a range too
    CHECK(char_class('7') == CharClass::Number);
    CHECK(char_class(U'٣') == CharClass::Number);      // Nd
    CHECK(char_class(U'Ⅻ') == CharClass::Number);      // Nl
    CHECK(char_class(U'½') == CharClass::Number);      // No
    CHECK(char_class(' ') == CharClass::Space);
    CHECK(char_class(0x85) == CharClass::Space);
    CHECK(char_class(0xA0) == CharClass::Space);
    CHECK(char_class(0x3000) == CharClass::Space);
    CHECK(char_class(0x2028) == CharClass::Space);
    CHECK(char_class(0xFEFF) == CharClass::Other);     // not White_Space (JavaScript's \s has it)
    CHECK(char_class(0x200B) == CharClass::Other);
    CHECK(char_class(0x180E) == CharClass::Other);     // no longer White_Space since Unicode 6.3
    CHECK(char_class(0x0301) == CharClass::Other);     // combining marks are not letters
    CHECK(char_class(U'😀') == CharClass::Other);
    CHECK(char_class('!') == CharClass::Other);
    CHECK(char_class(0x0378) == CharClass::Other);     // unassigned
    CHECK(char_class(0x10FFFF) == CharClass::Other);
    CHECK(char_class(0x110000) == CharClass::Other);
    CHECK(char_class(0x1E030) == CharClass::Letter);   // new in Unicode 15.0 (Cyrillic modifier letters)
}

TEST_CASE("decode_utf8: well-formed sequences, and one unit per ill-formed byte") {
    CHECK(decode("A").cp == 'A');
    CHECK(decode("\xC3\xA9").cp == 0xE9);
    CHECK(decode("\xC3\xA9").size == 2);
    CHECK(decode("\xE4\xB8\xAD").cp == 0x4E2D);
    CHECK(decode("\xF0\x9F\x98\x80").cp == 0x1F600);
    for (std::string_view bad : {"\xC0\x80", "\xE0\x80\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xF0\x9F\x98", "\x80", "\xFF",
                                 "\xC3"}) {
        CAPTURE(bad);
        CHECK_FALSE(decode(bad).valid);
        CHECK(decode(bad).size == 1);
    }
    std::string s;
    comigs::text::append_utf8(s, 0x1F600);
    CHECK(s == "\xF0\x9F\x98\x80");
}
