// The demo's text extractors (examples/demo/text_extract.hpp) on hand-written HTML, troff and dictd
// inputs of the kinds the Debian packages ship, and the gzip reader.
#include <doctest/doctest.h>

#include <demo/text_extract.hpp>

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <string>

using namespace comigs::demo;

TEST_CASE("html_to_text: markup out, text and line structure in") {
    const std::string html =
        "<?xml version=\"1.0\"?>\n<!DOCTYPE html><html><head><title>Kapitel 6</title>"
        "<style>p { color: red }</style></head><body>"
        "<div class=\"para\">Die   <code class=\"filename\">sources.list</code>\n  Datei &amp; mehr.</div>"
        "<!-- a comment <p>hidden</p> -->"
        "<p>Gr&#252;&#xDF;e &mdash; &lt;tag&gt; &bogus; a &lt b &#99999999; x < y</p>"
        "<script type=\"text/javascript\">var x = \"<p>no</p>\";</script>"
        "<pre class=\"screen\"><code># apt  install\n   foo</code>\n</pre>"
        "<ul><li>one</li><li>two<br/>three</li></ul><table><tr><td>a</td><td>b</td></tr></table>"
        "<p title='quoted > in attribute'>end</p></body></html>";
    const std::string text = html_to_text(html);
    CHECK(text ==
          "Die sources.list Datei & mehr.\n"
          "Gr\u00FC\u00DFe \u2014 <tag> &bogus; a &lt b \uFFFD x < y\n"
          "# apt  install\n   foo\n"
          "one\ntwo\nthree\na b\nend\n");
    CHECK(html_to_text("").empty());
    CHECK(html_to_text("<p>unterminated <b") == "unterminated\n");
    CHECK(html_to_text("<head>never closed") == "");
    CHECK(html_to_text("a &#0; b &#xD800; c") == "a \uFFFD b \uFFFD c\n");  // not characters
}

TEST_CASE("troff_to_text: a man page's text without its markup") {
    const std::string man =
        ".\\\" Copyright line, a comment\n"
        ".TH FUTEX 7 2017-09-15 \"Linux\" \"Linux Programmer's Manual\"\n"
        ".de XX\n"
        "macro body that must not show\n"
        "..\n"
        ".SH NAME\n"
        "futex \\- fast user-space locking\n"
        ".SH DESCRIPTION\n"
        "The Linux kernel provides futexes (\\(lqFast user-space mutexes\\(rq)\n"
        "as a building block \\(em see\n"
        ".BR futex (2)\n"
        "and \\fBmmap\\fP(2) or \\f[I]clone\\f[R]\\s-1(2)\\s0.\n"
        "\n"
        ".B \"bold words\" more\n"
        ".IP \\(bu 2\n"
        "item with \\[u00E9]t\\['e] and a \\e backslash, a\\ space\\&.\n"
        ".nf\n"
        "line one\n"
        "  line two\n"
        ".fi\n"
        ".TS\n"
        "allbox;\n"
        "l l.\n"
        "cell1\tcell2\n"
        ".TE\n"
        "joined \\\n"
        "across lines \\h'2n'done \\\" trailing comment\n";
    const std::string text = troff_to_text(man);
    CHECK(text ==
          "NAME\n"
          "futex - fast user-space locking\n"
          "DESCRIPTION\n"
          "The Linux kernel provides futexes (\u201CFast user-space mutexes\u201D) as a building block \u2014 see "
          "futex(2) and mmap(2) or clone(2).\n"
          "bold words more\n"
          "\u2022 item with \u00E9t\u00E9 and a \\ backslash, a space.\n"
          "line one\n"
          "  line two\n"
          "cell1 cell2\n"
          "joined across lines done\n");
    CHECK(troff_to_text("").empty());
    CHECK(troff_to_text("\\") == "");
    CHECK(troff_to_text(".de\n") == "");  // a definition never ended: the rest is skipped
    CHECK(troff_to_text("a\\(") == "a\n");
    CHECK(troff_to_text(".BR \"unterminated quote") == "unterminated quote\n");
}

TEST_CASE("dictd_to_text: entries in data order, once each, without the header and the braces") {
    const std::string data = "00-database-info\n  header text\nApple \\Ap\"ple\\, n. See {Fruit}.\nZebra, n. A horse.\n";
    const std::size_t apple = data.find("Apple"), zebra = data.find("Zebra");
    auto b64 = [](std::size_t v) {
        const char* digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        std::string s;
        do {
            s.insert(s.begin(), digits[v % 64]);
            v /= 64;
        } while (v);
        return s;
    };
    const std::string index = "00-database-info\tA\t" + b64(apple) + "\n" + "zebra\t" + b64(zebra) + "\t" +
                              b64(data.size() - zebra) + "\n" + "apple\t" + b64(apple) + "\t" + b64(zebra - apple) +
                              "\n" + "pomme\t" + b64(apple) + "\t" + b64(zebra - apple) + "\tfr\n" +
                              "far-away\t" + b64(1000) + "\tB\n";
    CHECK(dictd_to_text(index, data) == "Apple \\Ap\"ple\\, n. See Fruit.\nZebra, n. A horse.\n");
    CHECK(dictd_to_text("", data).empty());
    CHECK_THROWS_WITH_AS(dictd_to_text("word\tA\n", data), doctest::Contains("dictd index line 1"), comigs::FormatError);
    CHECK_THROWS_WITH_AS(dictd_to_text("ok\tA\tB\nword\tA!\tB\n", data), doctest::Contains("line 2"),
                         comigs::FormatError);
    CHECK_THROWS_AS(dictd_to_text("word\tAAAAAAAAAAA\tB\n", data), comigs::FormatError);  // 11 digits
}

TEST_CASE("read_maybe_gzip: gzip and plain files, clear errors for the rest") {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / "comigs-test-text-extract";
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::string text;
    for (int i = 0; i < 20000; ++i) text += static_cast<char>('a' + i % 23);
    {
        gzFile f = gzopen((dir / "a.gz").c_str(), "wb");
        REQUIRE(f != nullptr);
        REQUIRE(gzwrite(f, text.data(), static_cast<unsigned>(text.size())) == static_cast<int>(text.size()));
        gzclose(f);
        std::ofstream(dir / "plain.txt", std::ios::binary) << text;
    }
    CHECK(read_maybe_gzip(dir / "a.gz") == text);
    CHECK(read_maybe_gzip(dir / "plain.txt") == text);
    CHECK_THROWS_AS(read_maybe_gzip(dir / "a.gz", 1000), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(read_maybe_gzip(dir / "missing.gz"), doctest::Contains("missing.gz"), comigs::IoError);
    // A truncated gzip stream is an error, not a silently short text.
    std::string gz;
    {
        std::ifstream in(dir / "a.gz", std::ios::binary);
        gz.assign(std::istreambuf_iterator<char>(in), {});
    }
    std::ofstream(dir / "cut.gz", std::ios::binary) << gz.substr(0, gz.size() / 2);
    CHECK_THROWS_WITH_AS(read_maybe_gzip(dir / "cut.gz"), doctest::Contains("cut.gz"), comigs::FormatError);
    fs::remove_all(dir);
}
