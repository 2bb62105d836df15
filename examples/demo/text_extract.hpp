#pragma once
// Plain text out of the formats the demo's real-text settings read from Debian packages: HTML (the Debian
// Administrator's Handbook), troff (man pages), dictd databases (dict-gcide), and gzip-compressed files
// of any of them (man pages and dictd data are gzip or dictzip). What a language model should see is the
// prose, code and commands, not the markup, so each extractor drops markup and keeps text:
//
// - html_to_text: drops <head>, <script>, <style>, comments and tags; block elements (p, div, li, h1-6,
//   pre, tr, ...) become line breaks; whitespace runs collapse to one space except inside <pre>;
//   character references (&amp;, &#233;, &#xE9;, common named ones) are decoded to UTF-8.
// - troff_to_text: man(7) source. Comments and requests that only format are dropped; section headings
//   and font macros (.SH, .B, .BR, ...) keep their arguments; text lines of a paragraph are joined with
//   spaces (.nf blocks keep their lines); escapes: fonts and sizes dropped, special characters (\(em,
//   \[u00E9], ...) mapped to UTF-8, \- to '-', \e to '\'. Macro definitions (.de ... ..) are skipped.
// - dictd_to_text: a dictd database (the .index and the .dict data): the entries the index points to, in
//   data order, without the 00-database-* header entries and without the {cross-reference} braces.
//
// Every extractor accepts any bytes (it is fuzzed: tests/fuzz/fuzz_text_extract.cpp): malformed markup
// is kept as text, never an error, except a dictd index that does not parse (FormatError naming the
// line). Output is a best effort for the formats as Debian ships them, not a full parser of each.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <comigs/error.hpp>

namespace comigs::demo {

namespace text_detail {

inline void append_utf8(std::string& out, std::uint32_t cp) {
    if (cp == 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) cp = 0xFFFD;  // not a character
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
inline bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
inline bool is_digit(char c) { return c >= '0' && c <= '9'; }
inline char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

/// Case-insensitive: does `s` continue at `i` with `word`?
inline bool starts_with_ci(std::string_view s, std::size_t i, std::string_view word) {
    if (s.size() - std::min(i, s.size()) < word.size()) return false;
    for (std::size_t k = 0; k < word.size(); ++k)
        if (lower(s[i + k]) != word[k]) return false;
    return true;
}

/// Text with collapsible whitespace: runs of spaces become one space, breaks one newline, and nothing
/// is written before the first character or twice in a row.
class FlowWriter {
public:
    void text(char c) {
        flush();
        out_ += c;
    }
    void text(std::string_view s) {
        for (char c : s) {
            if (is_space(c)) space();
            else text(c);
        }
    }
    void raw(char c) {  // preformatted: written as is (a pending break first)
        flush();
        out_ += c;
    }
    void space() {
        if (pending_ == Pending::none) pending_ = Pending::space;
    }
    void line_break() { pending_ = Pending::line; }
    std::string finish() {
        if (!out_.empty() && out_.back() != '\n') out_ += '\n';
        return std::move(out_);
    }

private:
    enum class Pending { none, space, line };
    void flush() {
        if (!out_.empty()) {
            if (pending_ == Pending::line && out_.back() != '\n') out_ += '\n';
            else if (pending_ == Pending::space && out_.back() != '\n' && out_.back() != ' ') out_ += ' ';
        }
        pending_ = Pending::none;
    }
    std::string out_;
    Pending pending_ = Pending::none;
};

struct NamedChar {
    std::string_view name;
    std::uint32_t cp;
};

/// HTML character references of the names seen in documentation (the rest are kept as written).
inline std::uint32_t html_entity(std::string_view name) {
    static constexpr NamedChar table[] = {
        {"amp", '&'},       {"lt", '<'},        {"gt", '>'},        {"quot", '"'},      {"apos", '\''},
        {"nbsp", ' '},      {"shy", 0xAD},      {"copy", 0xA9},     {"reg", 0xAE},      {"trade", 0x2122},
        {"mdash", 0x2014},  {"ndash", 0x2013},  {"hellip", 0x2026}, {"lsquo", 0x2018},  {"rsquo", 0x2019},
        {"ldquo", 0x201C},  {"rdquo", 0x201D},  {"laquo", 0xAB},    {"raquo", 0xBB},    {"bull", 0x2022},
        {"middot", 0xB7},   {"times", 0xD7},    {"deg", 0xB0},      {"euro", 0x20AC},   {"sect", 0xA7},
        {"para", 0xB6},     {"szlig", 0xDF},    {"auml", 0xE4},     {"ouml", 0xF6},     {"uuml", 0xFC},
        {"Auml", 0xC4},     {"Ouml", 0xD6},     {"Uuml", 0xDC},     {"eacute", 0xE9},   {"egrave", 0xE8},
        {"ecirc", 0xEA},    {"euml", 0xEB},     {"agrave", 0xE0},   {"aacute", 0xE1},   {"acirc", 0xE2},
        {"ccedil", 0xE7},   {"iacute", 0xED},   {"igrave", 0xEC},   {"icirc", 0xEE},    {"iuml", 0xEF},
        {"oacute", 0xF3},   {"ograve", 0xF2},   {"ocirc", 0xF4},    {"uacute", 0xFA},   {"ugrave", 0xF9},
        {"ucirc", 0xFB},    {"ntilde", 0xF1},   {"Eacute", 0xC9},   {"Egrave", 0xC8},   {"Agrave", 0xC0},
        {"Ccedil", 0xC7},   {"oelig", 0x153},   {"aelig", 0xE6},    {"rarr", 0x2192},   {"larr", 0x2190},
    };
    for (const auto& e : table)
        if (e.name == name) return e.cp;
    return 0;
}

/// Decodes the character reference at s[i] == '&' into `out`; returns the index after it, or i + 1
/// (and writes '&') when it is not one.
template <class Sink>
std::size_t html_reference(std::string_view s, std::size_t i, Sink&& sink) {
    std::size_t j = i + 1;
    std::uint32_t cp = 0;
    if (j < s.size() && s[j] == '#') {
        ++j;
        const bool hex = j < s.size() && (s[j] == 'x' || s[j] == 'X');
        if (hex) ++j;
        const std::size_t start = j;
        std::uint64_t v = 0;
        while (j < s.size() && j - start < 8) {
            const char c = s[j];
            int d = -1;
            if (is_digit(c)) d = c - '0';
            else if (hex && lower(c) >= 'a' && lower(c) <= 'f') d = lower(c) - 'a' + 10;
            if (d < 0) break;
            v = v * (hex ? 16 : 10) + static_cast<std::uint64_t>(d);
            ++j;
        }
        if (j == start || j >= s.size() || s[j] != ';') {
            sink('&');
            return i + 1;
        }
        cp = v > 0x10FFFF ? 0xFFFD : static_cast<std::uint32_t>(v);
    } else {
        const std::size_t start = j;
        while (j < s.size() && j - start < 10 && (is_alpha(s[j]) || is_digit(s[j]))) ++j;
        if (j == start || j >= s.size() || s[j] != ';' || (cp = html_entity(s.substr(start, j - start))) == 0) {
            sink('&');
            return i + 1;
        }
    }
    std::string enc;
    append_utf8(enc, cp);
    for (char c : enc) sink(c);
    return j + 1;
}

inline bool html_block(std::string_view tag) {
    static constexpr std::string_view blocks[] = {
        "p",     "div",   "br",      "li",      "ul",    "ol",         "dl",      "dt",     "dd",
        "h1",    "h2",    "h3",      "h4",      "h5",    "h6",         "pre",     "table",  "tr",
        "hr",    "title", "section", "article", "header", "footer",    "nav",     "blockquote",
        "tbody", "thead", "figure",  "figcaption", "caption", "address", "body",  "html",   "main"};
    return std::find(std::begin(blocks), std::end(blocks), tag) != std::end(blocks);
}

}  // namespace text_detail

/// Text of an HTML (or XHTML) document; see the file comment.
inline std::string html_to_text(std::string_view s) {
    using namespace text_detail;
    FlowWriter w;
    int pre = 0;  // depth of <pre>
    std::size_t i = 0;
    auto put = [&](char c) {
        if (pre > 0) w.raw(c);
        else if (is_space(c)) w.space();
        else w.text(c);
    };
    while (i < s.size()) {
        const char c = s[i];
        if (c == '&') {
            i = html_reference(s, i, put);
            continue;
        }
        if (c != '<') {
            put(c);
            ++i;
            continue;
        }
        if (s.compare(i, 4, "<!--") == 0) {
            const std::size_t end = s.find("-->", i + 4);
            i = end == std::string_view::npos ? s.size() : end + 3;
            continue;
        }
        if (s.compare(i, 9, "<![CDATA[") == 0) {
            const std::size_t end = s.find("]]>", i + 9);
            const std::size_t stop = end == std::string_view::npos ? s.size() : end;
            for (std::size_t k = i + 9; k < stop; ++k) put(s[k]);
            i = end == std::string_view::npos ? s.size() : end + 3;
            continue;
        }
        if (i + 1 < s.size() && (s[i + 1] == '!' || s[i + 1] == '?')) {  // doctype, processing instruction
            const std::size_t end = s.find('>', i);
            i = end == std::string_view::npos ? s.size() : end + 1;
            continue;
        }
        const bool closing = i + 1 < s.size() && s[i + 1] == '/';
        std::size_t j = i + (closing ? 2 : 1);
        std::string name;
        while (j < s.size() && (is_alpha(s[j]) || is_digit(s[j])) && name.size() < 16) name += lower(s[j++]);
        if (name.empty() || !is_alpha(name[0])) {  // "a < b": not a tag
            put('<');
            ++i;
            continue;
        }
        while (j < s.size() && (is_alpha(s[j]) || is_digit(s[j]) || s[j] == ':' || s[j] == '-')) ++j;
        // Attributes up to '>', quotes honoured.
        char quote = 0;
        for (; j < s.size(); ++j) {
            if (quote) {
                if (s[j] == quote) quote = 0;
            } else if (s[j] == '"' || s[j] == '\'') {
                quote = s[j];
            } else if (s[j] == '>') {
                break;
            }
        }
        const bool self_closing = j < s.size() && j > i && s[j - 1] == '/';
        i = j < s.size() ? j + 1 : s.size();
        if (!closing && !self_closing && (name == "head" || name == "script" || name == "style")) {
            // Skip to the matching end tag (these do not nest).
            std::size_t k = i;
            for (;;) {
                k = s.find("</", k);
                if (k == std::string_view::npos) {
                    i = s.size();
                    break;
                }
                if (starts_with_ci(s, k + 2, name)) {
                    const std::size_t end = s.find('>', k);
                    i = end == std::string_view::npos ? s.size() : end + 1;
                    break;
                }
                k += 2;
            }
            continue;
        }
        if (name == "pre") pre = closing ? std::max(0, pre - 1) : (self_closing ? pre : pre + 1);
        if (html_block(name)) w.line_break();
        else if (name == "td" || name == "th") w.space();
    }
    return w.finish();
}

namespace text_detail {

/// troff special characters (\(xx, \[xx]) and strings (\*(xx) seen in man pages; unknown ones vanish.
inline std::string_view troff_special(std::string_view name) {
    static constexpr std::pair<std::string_view, std::string_view> table[] = {
        {"em", "\u2014"}, {"en", "\u2013"}, {"hy", "-"},      {"bu", "\u2022"}, {"aq", "'"},       {"dq", "\""},
        {"lq", "\u201C"}, {"rq", "\u201D"}, {"oq", "\u2018"}, {"cq", "\u2019"}, {"co", "\u00A9"},  {"rg", "\u00AE"},
        {"tm", "\u2122"}, {"mu", "\u00D7"}, {"de", "\u00B0"}, {">=", "\u2265"}, {"<=", "\u2264"},  {"!=", "\u2260"},
        {"->", "\u2192"}, {"<-", "\u2190"}, {"+-", "\u00B1"}, {"sl", "/"},      {"rs", "\\"},      {"ba", "|"},
        {"ti", "~"},      {"ha", "^"},      {"at", "@"},      {"sh", "#"},      {"Do", "$"},       {"ul", "_"},
        {"ga", "`"},      {"a\"", "\""},    {"R", "\u00AE"},  {"Tm", "\u2122"}, {"ss", "\u00DF"},  {"'e", "\u00E9"},
        {"`e", "\u00E8"}, {":a", "\u00E4"}, {":o", "\u00F6"}, {":u", "\u00FC"}, {"pc", "\u00B7"},  {"fo", "\u2039"},
        {"fc", "\u203A"}, {"Fo", "\u00AB"}, {"Fc", "\u00BB"}, {"or", "|"},      {"ua", "\u2191"},  {"da", "\u2193"}};
    for (const auto& [n, v] : table)
        if (n == name) return v;
    return {};
}

/// The name after an escape like \f, \*, \n: "(xx", "[name]" or one character. Advances i past it.
inline std::string_view troff_name(std::string_view s, std::size_t& i) {
    if (i >= s.size()) return {};
    if (s[i] == '(') {
        const std::size_t start = i + 1, n = std::min<std::size_t>(2, s.size() - start);
        i = start + n;
        return s.substr(start, n);
    }
    if (s[i] == '[') {
        const std::size_t end = s.find(']', i + 1);
        const std::size_t start = i + 1, stop = end == std::string_view::npos ? s.size() : end;
        i = end == std::string_view::npos ? s.size() : end + 1;
        return s.substr(start, stop - start);
    }
    return s.substr(i++, 1);
}

/// One line of troff text with its escapes resolved (the line has no '\n').
inline std::string troff_escapes(std::string_view s) {
    std::string out;
    std::size_t i = 0;
    while (i < s.size()) {
        const char c = s[i++];
        if (c != '\\') {
            out += c;
            continue;
        }
        if (i >= s.size()) break;  // a trailing backslash continues the line: nothing to write
        const char e = s[i++];
        switch (e) {
            case '"':
            case '#':
                return out;  // comment to the end of the line
            case 'e':
            case '\\':
                out += '\\';
                break;
            case '-':
                out += '-';
                break;
            case ' ':
            case '~':
            case '0':
                out += ' ';
                break;
            case '\'':
                out += '\'';
                break;
            case '`':
                out += '`';
                break;
            case '.':
                out += '.';
                break;
            case '(':
            case '[': {
                --i;
                const std::string_view name = troff_name(s, i);
                if (name.size() == 5 && name[0] == 'u') {  // \[u00E9]
                    std::uint32_t cp = 0;
                    bool ok = true;
                    for (char h : name.substr(1)) {
                        const char l = lower(h);
                        if (is_digit(l)) cp = cp * 16 + static_cast<std::uint32_t>(l - '0');
                        else if (l >= 'a' && l <= 'f') cp = cp * 16 + static_cast<std::uint32_t>(l - 'a' + 10);
                        else ok = false;
                    }
                    if (ok) append_utf8(out, cp);
                } else {
                    out += troff_special(name);
                }
                break;
            }
            case '*': {
                const std::string_view name = troff_name(s, i);
                out += troff_special(name);
                break;
            }
            case 'f':
            case 'n':
            case 'k':
            case 'g':
            case 'V':
            case 'Y':
            case 'M':
            case 'm':
            case 'F':
                if (e == 'n' && i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
                (void)troff_name(s, i);
                break;
            case 's':  // \s+1, \s-1, \s0, \s12, \s(12, \s[12]
                if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
                if (i < s.size() && (s[i] == '(' || s[i] == '[')) {
                    (void)troff_name(s, i);
                } else {
                    if (i < s.size() && is_digit(s[i])) ++i;
                    if (i < s.size() && is_digit(s[i]) && s[i - 1] >= '1' && s[i - 1] <= '3') ++i;
                }
                break;
            case 'h':
            case 'v':
            case 'w':
            case 'l':
            case 'L':
            case 'o':
            case 'b':
            case 'x':
            case 'X':
            case 'D':
            case 'Z':
            case 'R':
            case 'N':
            case 'A':
            case 'B':
            case 'C':
            case 'S': {  // a delimited argument: \h'1n'
                if (i >= s.size()) break;
                const char delim = s[i++];
                const std::size_t end = s.find(delim, i);
                i = end == std::string_view::npos ? s.size() : end + 1;
                break;
            }
            case '&':
            case '|':
            case '^':
            case ')':
            case '%':
            case ':':
            case 'c':
            case 'd':
            case 'u':
            case 'r':
            case 'p':
            case 't':
            case 'a':
            case 'z':
            case '{':
            case '}':
                break;  // zero-width or motion: nothing to write
            default:
                out += e;
        }
    }
    return out;
}

/// Arguments of a request line (after the request name): space-separated, "double quoted" ones may
/// hold spaces ("" inside quotes is a quote). Escapes are resolved.
inline std::vector<std::string> troff_args(std::string_view s) {
    std::vector<std::string> args;
    std::size_t i = 0;
    while (i < s.size()) {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
        if (i >= s.size()) break;
        std::string raw;
        if (s[i] == '"') {
            ++i;
            while (i < s.size()) {
                if (s[i] == '"') {
                    if (i + 1 < s.size() && s[i + 1] == '"') {
                        raw += '"';
                        i += 2;
                        continue;
                    }
                    ++i;
                    break;
                }
                raw += s[i++];
            }
        } else {
            while (i < s.size() && s[i] != ' ' && s[i] != '\t') {
                if (s[i] == '\\' && i + 1 < s.size()) raw += s[i++];
                raw += s[i++];
            }
        }
        if (raw.starts_with("\\\"")) break;  // a comment ends the arguments
        args.push_back(troff_escapes(raw));
    }
    return args;
}

}  // namespace text_detail

/// Text of a man page in troff (man(7)) source; see the file comment.
inline std::string troff_to_text(std::string_view s) {
    using namespace text_detail;
    FlowWriter w;
    bool fill = true;         // .nf ... .fi: lines kept
    bool table = false;       // .TS ... .TE
    bool table_format = false;  // the format lines at a table's start, up to one ending in '.'
    std::string skip_until;   // inside .de/.ig: the line that ends it
    std::size_t pos = 0;
    std::string joined;
    while (pos < s.size()) {
        std::size_t end = s.find('\n', pos);
        if (end == std::string_view::npos) end = s.size();
        std::string_view line = s.substr(pos, end - pos);
        pos = end + 1;
        // A line ending in an unescaped backslash continues on the next one.
        joined.assign(line);
        while (!joined.empty() && joined.back() == '\\' &&
               (joined.size() < 2 || joined[joined.size() - 2] != '\\') && pos < s.size()) {
            joined.pop_back();
            std::size_t e2 = s.find('\n', pos);
            if (e2 == std::string_view::npos) e2 = s.size();
            joined.append(s.substr(pos, e2 - pos));
            pos = e2 + 1;
        }
        if (!joined.empty() && joined.back() == '\r') joined.pop_back();
        line = joined;
        if (!skip_until.empty()) {
            std::string_view t = line;
            while (!t.empty() && (t.back() == ' ' || t.back() == '\t')) t.remove_suffix(1);
            if (t == skip_until) skip_until.clear();
            continue;
        }
        const bool control = !line.empty() && (line[0] == '.' || line[0] == '\'');
        if (control) {
            std::size_t i = 1;
            while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
            if (line.compare(i, 2, "\\\"") == 0 || line.compare(i, 2, "\\#") == 0) continue;  // comment
            const std::size_t name_start = i;
            while (i < line.size() && line[i] != ' ' && line[i] != '\t' && i - name_start < 8) ++i;
            const std::string name(line.substr(name_start, i - name_start));
            const std::string_view rest = line.substr(std::min(i, line.size()));
            if (table) {
                if (name == "TE") table = false;
                continue;
            }
            if (name == "de" || name == "de1" || name == "am" || name == "am1" || name == "ig") {
                const auto a = troff_args(rest);
                skip_until = name == "ig" && !a.empty() ? "." + a.front() : "..";
                if (name != "ig" && a.size() >= 2) skip_until = "." + a[1];
                continue;
            }
            if (name == "TS") {
                table = true;
                table_format = true;
                w.line_break();
                continue;
            }
            const auto args = troff_args(rest);
            if (name == "SH" || name == "SS") {
                w.line_break();
                for (const auto& a : args) {
                    w.text(a);
                    w.space();
                }
                w.line_break();
            } else if (name == "B" || name == "I" || name == "SM" || name == "SB") {
                for (const auto& a : args) {
                    w.text(a);
                    w.space();
                }
                if (!fill) w.line_break();
            } else if (name == "BR" || name == "RB" || name == "BI" || name == "IB" || name == "IR" || name == "RI") {
                for (const auto& a : args) w.text(a);
                if (fill) w.space();
                else w.line_break();
            } else if (name == "IP" || name == "TP" || name == "TQ" || name == "PP" || name == "LP" || name == "P" ||
                       name == "HP" || name == "sp" || name == "br" || name == "RS" || name == "RE" || name == "EX" ||
                       name == "EE" || name == "bp") {
                w.line_break();
                if (name == "IP" && !args.empty()) {
                    w.text(args.front());
                    w.space();
                }
            } else if (name == "nf") {
                fill = false;
                w.line_break();
            } else if (name == "fi") {
                fill = true;
                w.line_break();
            }
            // Any other request only formats (.TH, .ft, .if, .ds, .nr, .so, .UR, .in, ...): dropped.
            continue;
        }
        if (table && table_format) {  // skip the format lines: options "...;" and column specs ending in '.'
            std::string_view t = line;
            while (!t.empty() && (t.back() == ' ' || t.back() == '\t')) t.remove_suffix(1);
            if (!t.empty() && t.back() == '.') table_format = false;
            continue;
        }
        const std::string text = troff_escapes(line);
        if (table) {
            for (char c : text) {
                if (c == '\t') w.space();
                else w.text(std::string_view(&c, 1));
            }
            w.line_break();
            continue;
        }
        if (text.empty() && line.empty()) {  // a blank line: a paragraph break
            w.line_break();
            continue;
        }
        if (fill) {
            w.text(text);
            w.space();
        } else {
            for (char c : text) w.raw(c);
            w.raw('\n');
        }
    }
    return w.finish();
}

namespace text_detail {
/// A dictd index number: base64 digits (A-Z a-z 0-9 + /), most significant first.
inline std::uint64_t dictd_number(std::string_view digits, std::size_t line) {
    require<FormatError>(!digits.empty() && digits.size() <= 10, "dictd index line ", line, ": number '", digits,
                         "' must have 1 to 10 base64 digits");
    std::uint64_t v = 0;
    for (char c : digits) {
        int d = -1;
        if (c >= 'A' && c <= 'Z') d = c - 'A';
        else if (c >= 'a' && c <= 'z') d = c - 'a' + 26;
        else if (c >= '0' && c <= '9') d = c - '0' + 52;
        else if (c == '+') d = 62;
        else if (c == '/') d = 63;
        require<FormatError>(d >= 0, "dictd index line ", line, ": '", digits, "' is not a base64 number");
        v = v * 64 + static_cast<std::uint64_t>(d);
    }
    return v;
}
}  // namespace text_detail

/// Entries of a dictd database as text: `index` is the .index file (lines "headword<TAB>offset<TAB>
/// length", base64 numbers), `data` the uncompressed .dict file. Entries come in data order, each
/// once; 00-database-* entries are left out, as are entries outside the data; braces are dropped.
/// Throws FormatError naming the first index line that does not parse.
inline std::string dictd_to_text(std::string_view index, std::string_view data) {
    using namespace text_detail;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;  // (offset, length)
    std::size_t pos = 0, line_no = 0;
    while (pos < index.size()) {
        std::size_t end = index.find('\n', pos);
        if (end == std::string_view::npos) end = index.size();
        std::string_view line = index.substr(pos, end - pos);
        pos = end + 1;
        ++line_no;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.empty()) continue;
        const std::size_t t1 = line.find('\t');
        const std::size_t t2 = t1 == std::string_view::npos ? t1 : line.find('\t', t1 + 1);
        require<FormatError>(t2 != std::string_view::npos, "dictd index line ", line_no,
                             ": expected 'headword<TAB>offset<TAB>length'");
        std::size_t t3 = line.find('\t', t2 + 1);  // some indexes carry a fourth column
        if (t3 == std::string_view::npos) t3 = line.size();
        const std::string_view word = line.substr(0, t1);
        const std::uint64_t off = dictd_number(line.substr(t1 + 1, t2 - t1 - 1), line_no);
        const std::uint64_t len = dictd_number(line.substr(t2 + 1, t3 - t2 - 1), line_no);
        if (word.starts_with("00-database") || word.starts_with("00database")) continue;
        if (off > data.size() || len > data.size() - off) continue;
        ranges.emplace_back(off, len);
    }
    std::sort(ranges.begin(), ranges.end());
    std::string out;
    std::uint64_t done = 0;
    for (const auto& [off, len] : ranges) {
        if (off < done || len == 0) continue;  // the same entry again, or an overlap
        for (char c : data.substr(off, len))
            if (c != '{' && c != '}') out += c;
        if (!out.empty() && out.back() != '\n') out += '\n';
        done = off + len;
    }
    return out;
}

/// Bytes of a file, gunzipped when it is gzip (or dictzip) compressed, as is otherwise. Throws IoError
/// when it cannot be opened, FormatError when the compressed data is corrupt or truncated, and
/// InvalidArgument when it holds more than `max_bytes` bytes.
inline std::string read_maybe_gzip(const std::filesystem::path& path, std::size_t max_bytes = std::size_t{1} << 30) {
    gzFile f = gzopen(path.c_str(), "rb");
    require<IoError>(f != nullptr, "'", path.string(), "': cannot be opened");
    std::string out;
    char buf[1 << 16];
    for (;;) {
        const int n = gzread(f, buf, sizeof buf);
        if (n < 0) {
            int err = 0;
            const std::string msg = gzerror(f, &err);
            gzclose(f);
            comigs::detail::raise<FormatError>("'", path.string(), "': corrupt compressed data (", msg, ")");
        }
        if (n == 0) break;
        out.append(buf, static_cast<std::size_t>(n));
        if (out.size() > max_bytes) {
            gzclose(f);
            comigs::detail::raise<InvalidArgument>("'", path.string(), "': more than ", max_bytes, " bytes uncompressed");
        }
    }
    int err = 0;
    const std::string msg = gzerror(f, &err);
    gzclose(f);
    require<FormatError>(err == Z_OK || err == Z_STREAM_END, "'", path.string(), "': corrupt or truncated compressed data (",
                         msg, ")");
    return out;
}

}  // namespace comigs::demo
