#pragma once
// The demo's real-text settings: which users read which text, and which text the host is pretrained on,
// all from Debian packages (tools/install-deps.sh --real-text installs them). A source is "the files of
// package P under a path, in a format": the file list comes from dpkg's record of the installed package
// (<root>/var/lib/dpkg/info/P.list, or P:<arch>.list), so a source reads the same files on every machine
// with the same package version, whatever else is installed there. Files are read in sorted order,
// extracted to text (text_extract.hpp) and joined with newlines.
//
//   multilingual  the paper's Multilingual Wikipedia setting: users = the Debian Administrator's Handbook
//                 (debian-handbook) in German, French, Italian and Dutch; host = its English edition.
//   domains       the paper's SlimPajama-like users, four English sources of different kinds: the
//                 handbook (en), the man pages of `manpages`, the GCIDE dictionary (dict-gcide), the C
//                 headers of glibc (libc6-dev); host = the English fortunes (fortunes).
//
// A user's text is capped to `cap` bytes (default 1.2 MB, the size of one handbook edition, so "all of a
// user's text" is about the same amount in both settings) by keeping evenly spaced 16 kB pieces of it.
// Licences: the texts are GPL / CC-BY-SA / public domain; they are read from the installed packages and
// never copied into this repository.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <comigs/error.hpp>

#include "text_extract.hpp"
#include "text_split.hpp"

namespace comigs::demo {

enum class TextFormat { plain, html, troff, dictd };

/// The files of one Debian package under `under` whose names end in `suffix`, read as `format`;
/// paths containing any of `exclude` are left out; `no_extension` keeps only file names without a dot.
struct TextSource {
    std::string name;     ///< what results.json calls the user
    std::string package;  ///< Debian package
    std::string under;    ///< path prefix inside the package (absolute, as dpkg lists it)
    std::string suffix;   ///< file name ending ("" = any)
    TextFormat format = TextFormat::plain;
    std::vector<std::string> exclude;
    bool no_extension = false;
};

struct TextSetting {
    std::string name;
    std::vector<TextSource> users;
    TextSource host;
};

inline std::vector<std::string> text_setting_names() { return {"multilingual", "domains"}; }

/// The setting called `name` (see the file comment).
inline TextSetting text_setting(std::string_view name) {
    const std::string handbook = "/usr/share/doc/debian-handbook/html/";
    auto edition = [&](const char* lang, const char* user) {
        return TextSource{user, "debian-handbook", handbook + lang + "/", ".html", TextFormat::html, {}, false};
    };
    TextSetting s;
    s.name = std::string(name);
    if (name == "multilingual") {
        s.users = {edition("de-DE", "handbook-de"), edition("fr-FR", "handbook-fr"), edition("it-IT", "handbook-it"),
                   edition("nl-NL", "handbook-nl")};
        s.host = edition("en-US", "handbook-en");
    } else if (name == "domains") {
        s.users = {edition("en-US", "handbook-en"),
                   {"man-pages", "manpages", "/usr/share/man/", ".gz", TextFormat::troff, {}, false},
                   {"dictionary", "dict-gcide", "/usr/share/dictd/", ".index", TextFormat::dictd, {}, false},
                   {"c-headers", "libc6-dev", "/usr/include/", ".h", TextFormat::plain, {}, false}};
        s.host = {"fortunes", "fortunes", "/usr/share/games/fortunes/", "", TextFormat::plain, {"/off/"}, true};
    } else {
        comigs::detail::raise<InvalidArgument>("--setting '", name, "': unknown (known: multilingual, domains)");
    }
    return s;
}

/// The installed files of `src` under `root` (normally "/"), sorted. Throws IoError naming the package
/// when it is not installed, InvalidArgument when it has no such files.
inline std::vector<std::filesystem::path> source_files(const std::filesystem::path& root, const TextSource& src) {
    namespace fs = std::filesystem;
    const fs::path info = root / "var/lib/dpkg/info";
    fs::path list = info / (src.package + ".list");
    if (!fs::exists(list) && fs::is_directory(info)) {
        // A Multi-Arch package has one list per installed architecture (libc6-dev:amd64.list beside a
        // cross-build's libc6-dev:arm64.list), with different files: take the native one (the first line
        // of dpkg's <root>/var/lib/dpkg/arch), else the first in name order, never whichever the directory
        // lists last (that made the text depend on what else was installed).
        std::vector<fs::path> lists;
        for (const auto& e : fs::directory_iterator(info)) {
            const std::string f = e.path().filename().string();
            if (f.starts_with(src.package + ":") && f.ends_with(".list")) lists.push_back(e.path());
        }
        std::sort(lists.begin(), lists.end());
        std::string native;
        if (std::ifstream arch(info.parent_path() / "arch"); arch) std::getline(arch, native);
        const auto it = std::find_if(lists.begin(), lists.end(), [&](const fs::path& l) {
            return !native.empty() && l.filename() == src.package + ":" + native + ".list";
        });
        if (it != lists.end()) list = *it;
        else if (!lists.empty()) list = lists.front();
    }
    require<IoError>(fs::exists(list), "text source '", src.name, "': Debian package '", src.package,
                     "' is not installed (no ", list.string(), "); install it with: apt-get install ", src.package,
                     " (or tools/install-deps.sh --real-text)");
    std::ifstream in(list);
    std::vector<fs::path> files;
    for (std::string line; std::getline(in, line);) {
        if (!line.starts_with(src.under) || !line.ends_with(src.suffix)) continue;
        if (std::any_of(src.exclude.begin(), src.exclude.end(),
                        [&](const std::string& x) { return line.find(x) != std::string::npos; }))
            continue;
        const fs::path p = fs::path(line);
        if (src.no_extension && p.filename().string().find('.') != std::string::npos) continue;
        const fs::path on_disk = root / p.relative_path();
        if (fs::is_regular_file(on_disk)) files.push_back(on_disk);
    }
    std::sort(files.begin(), files.end());
    require(!files.empty(), "text source '", src.name, "': package '", src.package, "' has no files under ",
            src.under, " ending in '", src.suffix, "'");
    return files;
}

/// The text of one file of a source, extracted from its format.
inline std::string extract_file(const std::filesystem::path& file, TextFormat format) {
    switch (format) {
        case TextFormat::plain: return read_maybe_gzip(file);
        case TextFormat::html: return html_to_text(read_maybe_gzip(file));
        case TextFormat::troff: return troff_to_text(read_maybe_gzip(file));
        case TextFormat::dictd: {
            // file is the .index; the data is beside it, dictzip-compressed or not.
            std::string stem = file.string();
            stem.resize(stem.size() - std::string_view(".index").size());
            const std::filesystem::path data =
                std::filesystem::exists(stem + ".dict.dz") ? stem + ".dict.dz" : stem + ".dict";
            return dictd_to_text(read_maybe_gzip(file), read_maybe_gzip(data));
        }
    }
    return {};
}

/// Every file of a source as text, in sorted path order, joined by newlines.
inline std::string source_text(const std::filesystem::path& root, const TextSource& src) {
    std::string all;
    for (const auto& f : source_files(root, src)) {
        all += extract_file(f, src.format);
        if (!all.empty() && all.back() != '\n') all += '\n';
    }
    return all;
}

/// At most `cap` bytes of `text`: evenly spaced pieces of `piece` bytes (text_split.hpp's spacing), so
/// a capped text still samples the whole source. cap <= 0 or a text within the cap: unchanged.
inline std::string cap_text(std::string_view text, Index cap, Index piece = 16384) {
    const Index n = static_cast<Index>(text.size());
    if (cap <= 0 || n <= cap) return std::string(text);
    const Index pieces = (n + piece - 1) / piece, keep = std::max<Index>(1, cap / piece);
    std::string out;
    out.reserve(static_cast<std::size_t>(cap));
    for (Index k : detail::spread_evenly(pieces, std::min(keep, pieces))) {
        const Index begin = k * piece;
        out.append(text.substr(static_cast<std::size_t>(begin), static_cast<std::size_t>(std::min(piece, n - begin))));
    }
    if (static_cast<Index>(out.size()) > cap) out.resize(static_cast<std::size_t>(cap));
    return out;
}

}  // namespace comigs::demo
