#include <comigs/text/normalizer.hpp>
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using comigs::text::nfc;

namespace {
std::string utf8_of(const std::string& hex_code_points) {
    std::istringstream in(hex_code_points);
    std::string out, h;
    while (in >> h) comigs::text::append_utf8(out, static_cast<char32_t>(std::stoul(h, nullptr, 16)));
    return out;
}

bool in_ci() {
    const char* ci = std::getenv("CI");
    return ci && *ci && std::string(ci) != "false";
}
}  // namespace

TEST_CASE("nfc: composition, ordering, Hangul, singletons, exclusions") {
    CHECK(nfc("plain ASCII stays") == "plain ASCII stays");
    CHECK(nfc("e\xCC\x81") == "\xC3\xA9");                                    // e + acute -> é
    CHECK(nfc("\xE2\x84\xAB") == "\xC3\x85");                                 // ANGSTROM SIGN -> Å (singleton)
    CHECK(nfc("\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB") == "\xED\x95\x9C");     // Hangul L V T -> 한
    CHECK(nfc("o\xCC\x82\xCC\xA3") == nfc("o\xCC\xA3\xCC\x82"));             // marks reordered by class
    CHECK(nfc("o\xCC\xA3\xCC\x82") == "\xE1\xBB\x99");                        // -> ộ
    CHECK(nfc("\xE0\xA5\x98") == "\xE0\xA4\x95\xE0\xA4\xBC");                 // U+0958 is excluded from composition
    CHECK(nfc("\xCC\x81" "a") == "\xCC\x81" "a");                             // a leading mark stays
    CHECK(nfc("a\xFF\xCC\x81") == "a\xFF\xCC\x81");                           // an ill-formed byte blocks and stays
    CHECK(comigs::text::is_nfc_quick("caf\xC3\xA9 \xE4\xB8\xAD"));
    CHECK_FALSE(comigs::text::is_nfc_quick("cafe\xCC\x81"));
    CHECK(comigs::text::combining_class(0x0301) == 230);
    CHECK(comigs::text::combining_class(0x0323) == 220);
}

TEST_CASE("nfc passes the Unicode 15.0 conformance test (NormalizationTest.txt, NFC columns)") {
    const std::filesystem::path path = "/usr/share/unicode/NormalizationTest.txt.bz2";
    if (!std::filesystem::exists(path)) {
        const std::string why = path.string() + " is missing (Debian package unicode-data, installed by tools/install-deps.sh)";
        if (in_ci()) FAIL(why);
        MESSAGE("skipped: ", why);
        return;
    }
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(("bzcat " + path.string()).c_str(), "r"), ::pclose);
    REQUIRE(pipe);
    std::string line;
    std::vector<char> buf(4096);
    int checked = 0, failed = 0;
    std::set<char32_t> listed;  // part 1 lists single code points; every other one must be its own NFC
    bool part1 = false;
    while (std::fgets(buf.data(), static_cast<int>(buf.size()), pipe.get())) {
        line = buf.data();
        if (line.starts_with("@Part")) part1 = line.starts_with("@Part1");
        if (line.empty() || line[0] == '#' || line[0] == '@') continue;
        std::vector<std::string> c;
        std::size_t pos = 0;
        for (int k = 0; k < 5; ++k) {
            const std::size_t semi = line.find(';', pos);
            if (semi == std::string::npos) break;
            c.push_back(utf8_of(line.substr(pos, semi - pos)));
            pos = semi + 1;
        }
        if (c.size() != 5) continue;
        if (part1) listed.insert(static_cast<char32_t>(std::stoul(line, nullptr, 16)));
        // c2 == toNFC(c1) == toNFC(c2) == toNFC(c3);  c4 == toNFC(c4) == toNFC(c5)
        const bool ok = nfc(c[0]) == c[1] && nfc(c[1]) == c[1] && nfc(c[2]) == c[1] && nfc(c[3]) == c[3] && nfc(c[4]) == c[3];
        if (!ok && ++failed <= 5) MESSAGE("fails: ", line);
        ++checked;
    }
    CHECK(failed == 0);
    CHECK(checked > 19000);
    int others = 0;
    for (char32_t cp = 0; cp < 0x110000; ++cp) {
        if ((cp >= 0xD800 && cp <= 0xDFFF) || listed.count(cp)) continue;
        std::string s;
        comigs::text::append_utf8(s, cp);
        if (nfc(s) != s && ++others <= 5) MESSAGE("U+", std::hex, unsigned(cp), " is not its own NFC");
    }
    CHECK(others == 0);
}
