#pragma once
// comigs-demo --checkpoint-dir DIR [--checkpoint-every N] [--resume]: a demo run that survives being
// killed. Every method's rounds are checkpointed (io/run_checkpoint.hpp) with the method's results so
// far (its MethodResult: the curve, the personalised perplexities, ...) as the accounting, and a
// finished method's results are kept, so a resumed run skips what is done and ends with results.json
// equal number for number to a run that never stopped (timings excepted).
//
//   DIR/run.json                      the run's settings (results.json's "config" without the host
//                                     cache path), written before anything else
//   DIR/<method>/round-000012/        the method's generations (one file per user, the server's, manifest)
//   DIR/<method>/result.safetensors   the finished method's MethodResult and routing samples
//
// --resume with other settings is refused, naming the first difference; a damaged generation or
// result file is reported and the previous generation used. SIGINT, SIGTERM and SIGUSR1 stop the run
// at the end of the current round with a checkpoint. With MPI every rank writes its own users' files
// and rank 0 the rest; DIR must be on a file system every rank sees.
#include <comigs/detail/xxhash64.hpp>
#include <comigs/io/atomic_file.hpp>
#include <comigs/io/run_checkpoint.hpp>
#include <comigs/io/safetensors.hpp>
#include <comigs/stop_request.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "fields.hpp"
#include "placement.hpp"
#include "report.hpp"

namespace comigs::demo {

/// A run's settings from its results.json "config": every entry (nested objects flattened with dots,
/// values as JSON text), except `skip` (e.g. the host cache's path, which may move).
inline io::RunSettings settings_of(const nlohmann::json& config, const std::vector<std::string>& skip = {}) {
    io::RunSettings out;
    auto walk = [&](auto&& self, const nlohmann::json& j, const std::string& prefix) -> void {
        for (const auto& [k, v] : j.items()) {
            const std::string key = prefix + k;
            if (std::find(skip.begin(), skip.end(), key) != skip.end()) continue;
            if (v.is_object())
                self(self, v, key + ".");
            else
                out.emplace_back(key, v.dump());
        }
    };
    walk(walk, config, "");
    return out;
}

/// The checkpoints of one demo run (see the file comment).
class DemoCheckpoint {
public:
    /// Checks DIR/run.json against `config` (--resume: the same settings, else a clear refusal; no
    /// --resume: DIR must not hold a run) and writes it. Every rank calls this together.
    /// `data`: a hash of every user's token streams, so that changed text files are noticed too.
    DemoCheckpoint(std::filesystem::path dir, Index every, bool resume, Placement place, const nlohmann::json& config,
                   std::uint64_t data)
        : dir_(std::move(dir)), every_(every), resume_(resume), place_(place) {
        require(every_ >= 1, "--checkpoint-every ", every_, ": must be >= 1");
        settings_ = settings_of(config, {"host.cache", "host.reused"});
        settings_.emplace_back("data.xxh64", comigs::detail::hex16(data));
        const auto run_json = dir_ / "run.json";
        std::string error;
        if (place_.leader()) {
            try {
                std::filesystem::create_directories(dir_);
                if (std::filesystem::exists(run_json)) {
                    if (!resume_) {
                        error = "--checkpoint-dir '" + dir_.string() +
                                "' holds a run: add --resume to continue it, or give another folder";
                    } else {
                        const auto saved = read_settings(run_json);
                        const std::string diff = io::first_difference(saved, settings_);
                        if (!diff.empty())
                            error = "--resume: the checkpoint in '" + dir_.string() +
                                    "' was made with other settings: " + diff;
                    }
                } else if (!resume_ && !std::filesystem::is_empty(dir_)) {
                    error = "--checkpoint-dir '" + dir_.string() + "' is not empty: give an empty or new folder";
                }
                if (error.empty()) {
                    nlohmann::json j = nlohmann::json::array();
                    for (const auto& [k, v] : settings_) j.push_back({k, v});
                    const std::string text = j.dump(1) + "\n";
                    io::atomic_write_file(run_json, std::as_bytes(std::span(text.data(), text.size())));
                }
            } catch (const std::exception& e) {
                error = e.what();
            }
        }
        error = from_leader(error);
        if (!error.empty()) comigs::detail::raise<InvalidArgument>(error);
        stop_ = std::make_unique<StopOnSignals>();
    }

    /// Adds the host's weights (a hash) to the settings every generation is bound to.
    template <class Span>
    void bind_host(Span weights) {
        settings_.emplace_back("host.weights",
                               comigs::detail::hex16(comigs::detail::Xxh64::hash(std::as_bytes(std::span(weights)))));
    }

    /// Messages (resumed from, fell back, ...) go to stderr on rank 0, also with --quiet.
    void note(const std::string& s) const {
        if (place_.leader()) std::fprintf(stderr, "checkpoint: %s\n", s.c_str());
    }

    /// A finished method's results when DIR holds them intact (every rank calls this together).
    std::optional<std::pair<MethodResult, std::vector<RoutingSample>>> finished(const std::string& method) const {
        const auto path = dir_ / method / "result.safetensors";
        std::pair<MethodResult, std::vector<RoutingSample>> out;
        std::string problem;
        bool present = false;
        try {
            present = resume_ && std::filesystem::exists(path);
            if (present) {
                const auto f = io::SafetensorsFile::load(path);
                const auto it = f.metadata().find("settings");
                require<FormatError>(it != f.metadata().end(), "no settings");
                // run.json matched already, so a difference here is damage to the header (the file's
                // checksum covers its data only): the method is resumed from its generations instead.
                const std::string diff = io::first_difference(parse_settings(it->second), method_settings(method));
                require<FormatError>(diff.empty(), "made with other settings: ", diff);
                const auto bytes = f.get<std::uint8_t>("result");
                comigs::detail::ByteReader r(std::as_bytes(std::span(bytes.data(), bytes.size())), 0);
                get_fields(r, out.first);
                get_member(r, out.second);
                require<FormatError>(r.done(), "trailing bytes");
            }
        } catch (const std::exception& e) {
            problem = e.what();
        }
        // Every rank must agree (a rank that cannot read the file makes everyone run the method).
        problem = any_problem(problem);
        if (!present) return std::nullopt;
        if (!problem.empty()) {
            note("'" + path.string() + "' is unusable (" + problem + "); resuming the method from its generations");
            return std::nullopt;
        }
        note(method + ": finished before, results read from '" + path.string() + "'");
        return out;
    }

    /// Keeps a finished method's results (rank 0 writes).
    void save_finished(const std::string& method, const MethodResult& result,
                       const std::vector<RoutingSample>& samples) const {
        if (!place_.leader()) return;
        comigs::detail::ByteWriter w;
        put_fields(w, result);
        put_member(w, samples);
        io::SafetensorsFile f;
        f.metadata()["settings"] = settings_text(method_settings(method));
        f.add("result", {static_cast<Index>(w.bytes.size())},
              std::span(reinterpret_cast<const std::uint8_t*>(w.bytes.data()), w.bytes.size()));
        std::filesystem::create_directories(dir_ / method);
        f.save(dir_ / method / "result.safetensors");
    }

    /// How run_checkpointed() saves `method`: its accounting is `result` (gathered from every rank,
    /// with the seconds so far); `t_start` moves back by the seconds of a resumed run.
    io::RunCheckpointOptions options(const std::string& method, MethodResult& result, int users,
                                     std::chrono::steady_clock::time_point& t_start) const {
        io::RunCheckpointOptions o;
        o.dir = dir_ / method;
        o.every = every_;
        o.resume = resume_;
        o.settings = method_settings(method);
        o.log = [this, method](const std::string& s) { note(method + ": " + s); };
        o.save_accounting = [this, &result, users, &t_start] {
            MethodResult all = result;
            std::vector<RoutingSample> none;
            place_.gather(all, none, users);  // the users of every rank
            all.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
            comigs::detail::ByteWriter w;
            put_fields(w, all);
            return std::move(w.bytes);
        };
        o.load_accounting = [&result, &t_start](std::span<const std::byte> bytes) {
            comigs::detail::ByteReader r(bytes, 0);
            get_fields(r, result);
            require<FormatError>(r.done(), "checkpoint accounting: trailing bytes");
            t_start = std::chrono::steady_clock::now() -
                      std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                          std::chrono::duration<double>(result.seconds));
        };
        return o;
    }

private:
    io::RunSettings method_settings(const std::string& method) const {
        io::RunSettings s = settings_;
        s.emplace_back("method", method);
        return s;
    }
    static std::string settings_text(const io::RunSettings& s) {
        nlohmann::json j = nlohmann::json::array();
        for (const auto& [k, v] : s) j.push_back({k, v});
        return j.dump();
    }
    static io::RunSettings parse_settings(const std::string& text) {
        const auto j = nlohmann::json::parse(text, nullptr, false);
        require<FormatError>(j.is_array(), "settings are not a JSON array");
        io::RunSettings s;
        for (const auto& kv : j) {
            require<FormatError>(kv.is_array() && kv.size() == 2 && kv[0].is_string() && kv[1].is_string(),
                                 "settings entry ", kv.dump(), " is not [key, value]");
            s.emplace_back(kv[0].get<std::string>(), kv[1].get<std::string>());
        }
        return s;
    }
    static io::RunSettings read_settings(const std::filesystem::path& p) {
        std::ifstream in(p, std::ios::binary);
        std::string text((std::istreambuf_iterator<char>(in)), {});
        try {
            return parse_settings(text);
        } catch (const FormatError& e) {
            comigs::detail::raise<FormatError>("'", p.string(), "': ", e.what());
        }
    }
    std::string from_leader(const std::string& text) const {
        if (!place_.distributed()) return text;
        std::vector<std::byte> all;
        std::vector<std::size_t> sizes;
        const auto mine = place_.leader() ? std::as_bytes(std::span(text.data(), text.size())) : std::span<const std::byte>();
        place_.comm->allgather_bytes(mine, all, sizes);
        return std::string(reinterpret_cast<const char*>(all.data()), sizes[0]);
    }
    /// The first rank's problem (rank order), or "".
    std::string any_problem(const std::string& mine) const {
        if (!place_.distributed()) return mine;
        std::vector<std::byte> all;
        std::vector<std::size_t> sizes;
        place_.comm->allgather_bytes(std::as_bytes(std::span(mine.data(), mine.size())), all, sizes);
        std::size_t at = 0;
        for (std::size_t r = 0; r < sizes.size(); ++r) {
            if (sizes[r] > 0)
                return "rank " + std::to_string(r) + ": " +
                       std::string(reinterpret_cast<const char*>(all.data() + at), sizes[r]);
            at += sizes[r];
        }
        return {};
    }

    std::filesystem::path dir_;
    Index every_;
    bool resume_;
    Placement place_;
    io::RunSettings settings_;
    std::unique_ptr<StopOnSignals> stop_;
};

}  // namespace comigs::demo
