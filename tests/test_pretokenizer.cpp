#include <comigs/text/pretokenizer.hpp>
#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

using comigs::text::PreTokenizer;
using comigs::text::PreTokenizerStage;
using comigs::text::SplitPattern;
using Pieces = std::vector<std::string>;

namespace {
Pieces split(SplitPattern p, const std::string& text) { return PreTokenizer::split(p).pieces(text); }
}  // namespace

TEST_CASE("recognise_pattern knows the published patterns and nothing else") {
    CHECK(comigs::text::recognise_pattern(comigs::text::gpt2_pattern) == SplitPattern::Gpt2);
    CHECK(comigs::text::recognise_pattern(R"('(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)") ==
          SplitPattern::Gpt2);
    CHECK(comigs::text::recognise_pattern(comigs::text::llama3_pattern) == SplitPattern::Llama3);
    CHECK(comigs::text::recognise_pattern(comigs::text::qwen2_pattern) == SplitPattern::Qwen2);
    CHECK_FALSE(comigs::text::recognise_pattern(R"(\s+|\w+)").has_value());
    CHECK_FALSE(comigs::text::recognise_pattern(std::string(comigs::text::gpt2_pattern) + " ").has_value());
}

TEST_CASE("GPT-2 pattern: pieces as the regex engine cuts them") {
    const auto p = SplitPattern::Gpt2;
    CHECK(split(p, "Hello world") == Pieces{"Hello", " world"});
    CHECK(split(p, "it's they'll I'M") == Pieces{"it", "'s", " they", "'ll", " I", "'", "M"});  // case-sensitive
    CHECK(split(p, "a  b") == Pieces{"a", " ", " b"});        // \s+(?!\S) gives the last space to the word
    CHECK(split(p, "a \tb") == Pieces{"a", " ", "\t", "b"});  // only a literal space joins a word
    CHECK(split(p, "x   ") == Pieces{"x", "   "});             // trailing spaces stay together
    CHECK(split(p, "12345 x1") == Pieces{"12345", " x", "1"});
    CHECK(split(p, " !!?x") == Pieces{" !!?", "x"});
    CHECK(split(p, "\n\n  y") == Pieces{"\n\n ", " y"});
    CHECK(split(p, "é中文 ß") == Pieces{"é中文", " ß"});
    // U+0085 and U+3000 are White_Space; U+FEFF and U+200B are not.
    CHECK(split(p, "a\xC2\x85\xC2\x85" "b") == Pieces{"a", "\xC2\x85", "\xC2\x85", "b"});
    CHECK(split(p, "a\xE3\x80\x80\xE3\x80\x80") == Pieces{"a", "\xE3\x80\x80\xE3\x80\x80"});
    CHECK(split(p, "a\xEF\xBB\xBF\xEF\xBB\xBF" "b") == Pieces{"a", "\xEF\xBB\xBF\xEF\xBB\xBF", "b"});
    // Ill-formed bytes are characters of class Other, one byte each.
    CHECK(split(p, "ab\xFF\xC3 cd") == Pieces{"ab", "\xFF\xC3", " cd"});
    CHECK(split(p, "") == Pieces{});
}

TEST_CASE("Llama-3 pattern: pieces as the regex engine cuts them") {
    const auto p = SplitPattern::Llama3;
    CHECK(split(p, "Hello world") == Pieces{"Hello", " world"});
    CHECK(split(p, "IT'S they'LL") == Pieces{"IT", "'S", " they", "'LL"});  // (?i)
    CHECK(split(p, "it'\xC5\xBF") == Pieces{"it", "'\xC5\xBF"});            // 'ſ folds to 's
    CHECK(split(p, "(word \tword") == Pieces{"(word", " ", "\tword"});      // one non-letter leads a word
    CHECK(split(p, "\nword") == Pieces{"\n", "word"});                      // ... but not a line break
    CHECK(split(p, "1234567") == Pieces{"123", "456", "7"});
    CHECK(split(p, " ...\n\nx") == Pieces{" ...\n\n", "x"});
    CHECK(split(p, "a  \n  \n  b") == Pieces{"a", "  \n  \n", " ", " b"});
    CHECK(split(p, "a\r\n") == Pieces{"a", "\r\n"});
    CHECK(split(p, "x   ") == Pieces{"x", "   "});
    CHECK(split(p, "\xFF" "abc") == Pieces{"\xFF" "abc"});
}

TEST_CASE("Qwen2 pattern: Llama-3's with one digit a piece") {
    CHECK(split(SplitPattern::Qwen2, "x 1234 IT'S") == Pieces{"x", " ", "1", "2", "3", "4", " IT", "'S"});
    CHECK(split(SplitPattern::Qwen2, "١٢") == Pieces{"١", "٢"});
}

TEST_CASE("Digits stage before a split stage, and pieces concatenate to the text") {
    const PreTokenizer digits({PreTokenizerStage{PreTokenizerStage::Kind::Digits, SplitPattern::Gpt2, true},
                               PreTokenizerStage{PreTokenizerStage::Kind::Split, SplitPattern::Gpt2, false}});
    CHECK(digits.pieces("ab 12 c") == Pieces{"ab", " ", "1", "2", " c"});
    const PreTokenizer runs({PreTokenizerStage{PreTokenizerStage::Kind::Digits, SplitPattern::Gpt2, false}});
    CHECK(runs.pieces("ab 12 c3") == Pieces{"ab ", "12", " c", "3"});
    CHECK(PreTokenizer().pieces("anything at all") == Pieces{"anything at all"});

    std::mt19937 rng(3);
    for (auto p : {SplitPattern::Gpt2, SplitPattern::Llama3, SplitPattern::Qwen2}) {
        for (int i = 0; i < 200; ++i) {
            std::string s(rng() % 64, '\0');
            for (char& c : s) c = static_cast<char>(i % 2 ? rng() : " a1'\n\t.\xC3\xA9"[rng() % 9]);
            std::string joined;
            std::size_t empty = 0;
            for (const auto& piece : split(p, s)) {
                joined += piece;
                empty += piece.empty();
            }
            CHECK(joined == s);
            CHECK(empty == 0);
        }
    }
}
