#pragma once
// A folder of checkpoint generations, for runs that outlive processes (run_checkpoint.hpp saves round
// runners in it). Each generation is a subfolder named after the rounds it completes:
//
//   DIR/round-000012/manifest.json      format, round, the settings the run was made with, and the size
//                                        and XXH64 checksum of every file; itself checksummed
//   DIR/round-000012/<files>             whatever the writers put there (one file per user, the server's)
//
// Writing a generation: begin() makes a hidden DIR/.partial-round-000012/, the writers put their files
// in it (atomically, each one flushed to disk), commit() writes the manifest, flushes, renames the
// folder to round-000012 (the moment the generation exists) and flushes DIR. Only then are older
// generations removed, keeping the newest `keep`; generations numbered above the new one are left over
// from before a fall-back (below) and are removed too. A crash at any point leaves the previous
// generations intact; a partial folder is never read and is removed by the next commit.
//
// Reading: latest() verifies generations newest first (manifest parses and matches its checksum, every
// file listed is there with its size and checksum) and returns the first that passes; each one that
// fails is reported with the reason, so a damaged or truncated newest generation costs the rounds since
// the previous one, never the run. Settings are ordered (key, value) pairs: resuming compares them and
// names the first difference (first_difference()).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../detail/posix_file.hpp"
#include "../detail/xxhash64.hpp"
#include "../error.hpp"
#include "atomic_file.hpp"

namespace comigs::io {

/// What a run was made with, as ordered (key, value) pairs (e.g. ("seed", "3")); the order is the order
/// differences are looked for in.
using RunSettings = std::vector<std::pair<std::string, std::string>>;

/// "" when `run` equals `checkpoint`; otherwise a sentence naming the first key (in `run`'s order, then
/// keys only the checkpoint has) whose value differs or that only one side has.
inline std::string first_difference(const RunSettings& checkpoint, const RunSettings& run) {
    auto find = [](const RunSettings& s, const std::string& key) -> const std::string* {
        for (const auto& [k, v] : s)
            if (k == key) return &v;
        return nullptr;
    };
    for (const auto& [k, v] : run) {
        const std::string* c = find(checkpoint, k);
        if (c == nullptr) return "'" + k + "' is " + v + " in this run but not recorded in the checkpoint";
        if (*c != v) return "'" + k + "' is " + *c + " in the checkpoint but " + v + " in this run";
    }
    for (const auto& [k, v] : checkpoint)
        if (find(run, k) == nullptr) return "'" + k + "' is " + v + " in the checkpoint but not set in this run";
    return {};
}

/// One file of a generation as its manifest lists it.
struct GenerationFile {
    std::string name;
    std::uint64_t bytes = 0;
    std::uint64_t xxh64 = 0;
    bool operator==(const GenerationFile&) const = default;
};

/// A verified generation.
struct Generation {
    std::int64_t round = 0;
    std::filesystem::path path;
    RunSettings settings;
    std::vector<GenerationFile> files;  ///< sorted by name

    bool has(std::string_view name) const {
        return std::any_of(files.begin(), files.end(), [&](const GenerationFile& f) { return f.name == name; });
    }
};

inline constexpr const char* generation_manifest = "manifest.json";
inline constexpr int generation_format_version = 1;

namespace detail {
// comigs::io::detail must not hide comigs::detail from the io headers that say detail:: for the latter.
using namespace comigs::detail;  // NOLINT
inline std::string hex16(std::uint64_t v) {
    char b[17];
    std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
    return b;
}

inline std::uint64_t manifest_checksum(const nlohmann::json& body) {
    const std::string text = body.dump();
    return comigs::detail::Xxh64::hash(std::as_bytes(std::span(text.data(), text.size())));
}

/// XXH64 and size of a whole file, read in pieces.
inline std::pair<std::uint64_t, std::uint64_t> hash_file(const std::filesystem::path& path) {
    comigs::detail::UniqueFd fd = comigs::detail::open_for_reading(path);
    const std::uint64_t size = comigs::detail::file_size(fd.get(), path);
    comigs::detail::Xxh64 h;
    std::vector<std::byte> buf(std::size_t{1} << 20);
    for (std::uint64_t at = 0; at < size;) {
        const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), size - at));
        comigs::detail::read_exact(fd.get(), at, buf.data(), n, path);
        h.update(std::span<const std::byte>(buf.data(), n));
        at += n;
    }
    return {size, h.digest()};
}

/// "round-000012" -> 12; nullopt for any other name.
inline std::optional<std::int64_t> generation_round(std::string_view name) {
    constexpr std::string_view prefix = "round-";
    if (!name.starts_with(prefix) || name.size() == prefix.size() || name.size() > prefix.size() + 18)
        return std::nullopt;
    std::int64_t r = 0;
    for (char c : name.substr(prefix.size())) {
        if (c < '0' || c > '9') return std::nullopt;
        r = r * 10 + (c - '0');
    }
    return r;
}
}  // namespace detail

/// The generations of one run in one folder (see the file comment).
class CheckpointStore {
public:
    /// `keep` >= 1: generations left after a commit (2 keeps the previous one as a fall-back).
    explicit CheckpointStore(std::filesystem::path dir, std::int64_t keep = 2) : dir_(std::move(dir)), keep_(keep) {
        require(!dir_.empty(), "checkpoint folder: must not be empty");
        require(keep_ >= 1, "checkpoint keep ", keep_, ": must be >= 1");
    }

    const std::filesystem::path& dir() const { return dir_; }

    /// Folder name of the generation completing `round` rounds, e.g. "round-000012".
    static std::string generation_name(std::int64_t round) {
        char b[32];
        std::snprintf(b, sizeof b, "round-%06lld", static_cast<long long>(round));
        return b;
    }
    std::filesystem::path generation_path(std::int64_t round) const { return dir_ / generation_name(round); }
    std::filesystem::path partial_path(std::int64_t round) const { return dir_ / ("." + partial_name(round)); }

    // ---- writing ---------------------------------------------------------------------------------

    /// Creates an empty partial folder for the generation of `round` (removing a leftover one) and
    /// returns it. With several processes, one calls begin() and the others wait (a barrier) before
    /// writing into it.
    std::filesystem::path begin(std::int64_t round) const {
        require(round >= 0, "checkpoint round ", round, ": must be >= 0");
        std::filesystem::create_directories(dir_);
        const auto p = partial_path(round);
        std::error_code ec;
        std::filesystem::remove_all(p, ec);
        if (ec) comigs::detail::raise<IoError>("cannot remove the leftover '", p.string(), "': ", ec.message());
        std::filesystem::create_directory(p, ec);
        if (ec) comigs::detail::raise<IoError>("cannot create '", p.string(), "': ", ec.message());
        comigs::detail::fsync_directory(dir_);
        return p;
    }

    /// Writes `bytes` as `name` into a partial folder atomically and returns its manifest entry.
    static GenerationFile write_file(const std::filesystem::path& partial, const std::string& name,
                                     std::span<const std::byte> bytes) {
        require(!name.empty() && name.find('/') == std::string::npos && name != generation_manifest &&
                    name[0] != '.',
                "checkpoint file name '", name, "': must be a plain name other than ", generation_manifest);
        atomic_write_file(partial / name, bytes);
        return {name, bytes.size(), comigs::detail::Xxh64::hash(bytes)};
    }

    /// Makes the generation of `round` visible: checks that every file listed is in the partial folder,
    /// writes the manifest, renames the folder, flushes, then removes generations beyond `keep`, any
    /// generation numbered above `round` and leftover partial folders. Returns the generation's folder.
    std::filesystem::path commit(std::int64_t round, const RunSettings& settings, std::vector<GenerationFile> files) const {
        const auto partial = partial_path(round);
        std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
        for (std::size_t k = 0; k < files.size(); ++k) {
            require(k == 0 || files[k - 1].name != files[k].name, "checkpoint file '", files[k].name,
                    "': listed twice");
            std::error_code ec;
            const auto size = std::filesystem::file_size(partial / files[k].name, ec);
            require<IoError>(!ec && size == files[k].bytes, "checkpoint file '", (partial / files[k].name).string(),
                             "': ", ec ? ec.message() : "size " + std::to_string(size) + ", listed as " +
                                                            std::to_string(files[k].bytes));
        }
        nlohmann::json body;
        body["format"] = "comigs-run-checkpoint";
        body["version"] = generation_format_version;
        body["round"] = round;
        body["settings"] = nlohmann::json::array();
        for (const auto& [k, v] : settings) body["settings"].push_back({k, v});
        body["files"] = nlohmann::json::array();
        for (const auto& f : files)
            body["files"].push_back({{"name", f.name}, {"bytes", f.bytes}, {"xxh64", detail::hex16(f.xxh64)}});
        nlohmann::json doc = body;
        doc["checksum"] = detail::hex16(detail::manifest_checksum(body));
        const std::string text = doc.dump(1) + "\n";
        atomic_write_file(partial / generation_manifest, std::as_bytes(std::span(text.data(), text.size())));

        const auto target = generation_path(round);
        std::error_code ec;
        if (std::filesystem::exists(target, ec)) {  // a damaged generation a fall-back skipped
            std::filesystem::remove_all(target, ec);
            if (ec) comigs::detail::raise<IoError>("cannot replace '", target.string(), "': ", ec.message());
        }
        std::filesystem::rename(partial, target, ec);
        if (ec)
            comigs::detail::raise<IoError>("cannot rename '", partial.string(), "' to '", target.string(), "': ",
                                           ec.message());
        comigs::detail::fsync_directory(dir_, ("committed '" + target.string() + "' but").c_str());
        prune(round);
        return target;
    }

    // ---- reading ---------------------------------------------------------------------------------

    /// Rounds of the generation folders present (verified or not), newest first.
    std::vector<std::int64_t> rounds() const {
        std::vector<std::int64_t> out;
        std::error_code ec;
        if (!std::filesystem::is_directory(dir_, ec)) return out;
        for (const auto& e : std::filesystem::directory_iterator(dir_, ec))
            if (auto r = detail::generation_round(e.path().filename().string()); r && e.is_directory(ec))
                out.push_back(*r);
        std::sort(out.rbegin(), out.rend());
        return out;
    }

    /// The generation of `round`, verified (see the file comment); FormatError or IoError saying what
    /// is wrong otherwise.
    Generation verify(std::int64_t round) const {
        Generation g;
        g.round = round;
        g.path = generation_path(round);
        const auto mpath = g.path / generation_manifest;
        nlohmann::json doc;
        {
            std::error_code ec;
            if (!std::filesystem::exists(mpath, ec))
                comigs::detail::raise<FormatError>("'", mpath.string(), "': missing (the generation is incomplete)");
            comigs::detail::UniqueFd fd = comigs::detail::open_for_reading(mpath);
            const std::uint64_t n = comigs::detail::file_size(fd.get(), mpath);
            require<FormatError>(n <= (std::uint64_t{1} << 26), "'", mpath.string(), "': ", n,
                                 " bytes is too large for a manifest");
            std::string text(static_cast<std::size_t>(n), '\0');
            comigs::detail::read_exact(fd.get(), 0, reinterpret_cast<std::byte*>(text.data()), text.size(), mpath);
            doc = nlohmann::json::parse(text, nullptr, false);
        }
        auto bad = [&](auto&&... why) {
            comigs::detail::raise<FormatError>("'", mpath.string(), "': ", std::forward<decltype(why)>(why)...);
        };
        if (doc.is_discarded() || !doc.is_object()) bad("not a JSON object (damaged or truncated)");
        const auto checksum = doc.find("checksum");
        if (checksum == doc.end() || !checksum->is_string()) bad("no checksum");
        nlohmann::json body = doc;
        body.erase("checksum");
        if (checksum->get<std::string>() != detail::hex16(detail::manifest_checksum(body)))
            bad("checksum mismatch (the manifest is damaged)");
        try {
            if (body.at("format") != "comigs-run-checkpoint") bad("format ", body.at("format").dump());
            if (body.at("version") != generation_format_version)
                bad("version ", body.at("version").dump(), ", this build reads ", generation_format_version);
            if (body.at("round").get<std::int64_t>() != round)
                bad("round ", body.at("round").dump(), " in a folder named ", generation_name(round));
            for (const auto& kv : body.at("settings"))
                g.settings.emplace_back(kv.at(0).get<std::string>(), kv.at(1).get<std::string>());
            for (const auto& f : body.at("files"))
                g.files.push_back({f.at("name").get<std::string>(), f.at("bytes").get<std::uint64_t>(),
                                   std::stoull(f.at("xxh64").get<std::string>(), nullptr, 16)});
        } catch (const nlohmann::json::exception& e) {
            bad("malformed (", e.what(), ")");
        } catch (const std::logic_error& e) {  // stoull
            bad("malformed checksum (", e.what(), ")");
        }
        for (const auto& f : g.files) {
            require<FormatError>(!f.name.empty() && f.name.find('/') == std::string::npos && f.name[0] != '.',
                                 "'", mpath.string(), "': bad file name '", f.name, "'");
            const auto p = g.path / f.name;
            std::error_code ec;
            if (!std::filesystem::exists(p, ec)) comigs::detail::raise<FormatError>("'", p.string(), "': missing");
            const auto [size, hash] = detail::hash_file(p);
            if (size != f.bytes)
                comigs::detail::raise<FormatError>("'", p.string(), "': ", size, " bytes, the manifest says ", f.bytes,
                                                   " (truncated or replaced)");
            if (hash != f.xxh64)
                comigs::detail::raise<FormatError>("'", p.string(), "': checksum ", detail::hex16(hash),
                                                   ", the manifest says ", detail::hex16(f.xxh64), " (damaged)");
        }
        return g;
    }

    /// The newest generation that verifies, or nullopt when there is none; every newer one that fails
    /// is described in `rejected` (one line each: the folder and the reason).
    std::optional<Generation> latest(std::vector<std::string>* rejected = nullptr) const {
        for (std::int64_t r : rounds()) {
            try {
                return verify(r);
            } catch (const Error& e) {
                if (rejected != nullptr) rejected->push_back(generation_name(r) + " is unusable: " + e.what());
            }
        }
        return std::nullopt;
    }

private:
    static std::string partial_name(std::int64_t round) { return "partial-" + generation_name(round); }

    void prune(std::int64_t committed) const {
        std::vector<std::int64_t> older;
        for (std::int64_t r : rounds()) {
            if (r > committed)
                remove(generation_path(r));
            else if (r < committed)
                older.push_back(r);  // newest first
        }
        for (std::size_t k = static_cast<std::size_t>(keep_ - 1); k < older.size(); ++k)
            remove(generation_path(older[k]));
        std::error_code ec;
        for (const auto& e : std::filesystem::directory_iterator(dir_, ec)) {
            const std::string n = e.path().filename().string();
            if (n.starts_with(".partial-round-")) remove(e.path());
        }
    }

    // Best effort: a folder that cannot be removed is only disk space, never read as a generation
    // newer than it should be (it would fail to verify, or it is older than the newest).
    static void remove(const std::filesystem::path& p) {
        std::error_code ec;
        std::filesystem::remove_all(p, ec);
    }

    std::filesystem::path dir_;
    std::int64_t keep_;
};

}  // namespace comigs::io
