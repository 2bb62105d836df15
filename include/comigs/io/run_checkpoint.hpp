#pragma once
// Crash-safe collaborative runs: RoundRunner and DistributedRoundRunner with a checkpoint every N rounds
// and on request (SIGINT/SIGTERM, stop_request.hpp), resumed to exactly the result of a run that never
// stopped (same thread count), in one process or over any number of ranks.
//
//   io::RunCheckpointOptions ck;
//   ck.dir = "ckpt";  ck.resume = true;          // continue from ckpt's newest valid generation, if any
//   io::run_checkpointed(runner, ck, hooks);     // instead of runner.run(hooks)
//
// A generation (checkpoint_store.hpp: one folder per generation, manifest with checksums, the previous
// generation kept until the new one is complete) holds:
//   user-<id>.safetensors   one per user, written by the process that trains it: its trainer checkpoint
//                           (checkpoint.hpp: adapter parameters, optimiser moments and counters, batch
//                           generators, the round) and its pending download ("pending/<tensor>", the
//                           aggregate it applies at the start of its next round or in finish()).
//   server.safetensors      written by rank 0: the rounds done, the server's last aggregate ("global/...",
//                           the reference of norm_clip and dp_fedavg) and the caller's accounting bytes
//                           (whatever it keeps across rounds, e.g. what goes into its results file).
// The rest of the rules' state is a function of the settings and the round, so nothing more is saved:
// DP noise is drawn from Rng(seed, round), shuffled processing from Rng(shuffle_seed, round), HetLoRA
// and FlexLoRA ranks are the users' configurations.
//
// Resuming picks the newest generation that verifies (a damaged or truncated one is reported and the
// previous used) and refuses one made with other settings, naming the first difference: the caller's
// settings (RunCheckpointOptions::settings, compared first) and the runner's (strategy, schedule, users,
// element type, reduction). The number of ranks is not a setting: users are found by id, so a run may
// resume with more or fewer ranks (users reassigned) or in one process. RunnerConfig::present cannot be
// compared: resume with the same function.
//
// The runner's hooks run only for the rounds run in this process; the returned reports likewise.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../communicator.hpp"
#include "../distributed.hpp"
#include "../distributed_runner.hpp"
#include "../stop_request.hpp"
#include "../strategy.hpp"
#include "checkpoint.hpp"
#include "checkpoint_store.hpp"
#include "safetensors.hpp"

namespace comigs::io {

/// How run_checkpointed() saves and resumes.
struct RunCheckpointOptions {
    std::filesystem::path dir;  ///< the generations' folder (required)
    Index every = 1;            ///< a generation after every `every` rounds, after the last round and on a stop request
    Index keep = 2;             ///< generations kept (>= 1; 2 keeps the previous one as a fall-back)
    /// Continue from the newest valid generation in `dir` (none there: start at round 0). Without it,
    /// a `dir` holding generations is refused rather than overwritten.
    bool resume = false;
    /// The caller's settings, compared before the runner's on resume (e.g. seed, data, model).
    RunSettings settings;
    /// The caller's state across rounds, saved with the server's (bytes from rank 0; every rank gets
    /// them back on resume). Must be the same on every rank.
    std::function<std::vector<std::byte>()> save_accounting;
    std::function<void(std::span<const std::byte>)> load_accounting;
    /// Messages (resumed from, generation skipped and why), on rank 0.
    std::function<void(const std::string&)> log;
    /// Check stop_requested() after every round: save, then throw Interrupted.
    bool stop_on_request = true;
};

namespace detail {
// comigs::io::detail must not hide comigs::detail from the io headers that say detail:: for the latter.
using namespace comigs::detail;  // NOLINT

/// The ranks of a distributed runner, or this process alone.
class RunRanks {
public:
    explicit RunRanks(Communicator* comm) : comm_(comm) {}
    int rank() const { return comm_ ? comm_->rank() : 0; }
    bool leader() const { return rank() == 0; }
    void barrier() const {
        if (comm_) comm_->barrier();
    }
    /// Every rank's bytes, in rank order.
    std::vector<std::vector<std::byte>> allgather(std::span<const std::byte> mine) const {
        if (!comm_) return {std::vector<std::byte>(mine.begin(), mine.end())};
        return comigs::allgather<std::byte>(*comm_, mine);
    }
    /// Rank 0's text on every rank.
    std::string from_leader(const std::string& text) const {
        if (!comm_) return text;
        const auto all = allgather(leader() ? std::as_bytes(std::span(text.data(), text.size()))
                                            : std::span<const std::byte>());
        return std::string(reinterpret_cast<const char*>(all[0].data()), all[0].size());
    }
    /// Runs `work` on every rank; if it throws anywhere, every rank throws (the failing rank its own
    /// error), so no rank is left waiting in a collective.
    template <class F>
    void together(const char* what, F&& work) const {
        std::exception_ptr failure;
        try {
            work();
        } catch (...) {
            failure = std::current_exception();
        }
        if (!comm_) {
            if (failure) std::rethrow_exception(failure);
            return;
        }
        const auto failed = allgather_value<std::int64_t>(*comm_, failure ? 1 : 0);
        if (failure) std::rethrow_exception(failure);
        for (std::size_t r = 0; r < failed.size(); ++r)
            if (failed[r] != 0) comigs::detail::raise<Error>(what, ": failed on rank ", r, " (see its message)");
    }
    /// The first rank's nonzero value, or 0.
    int any_signal(int mine) const {
        if (!comm_) return mine;
        for (auto v : allgather_value<std::int64_t>(*comm_, mine))
            if (v != 0) return static_cast<int>(v);
        return 0;
    }

private:
    Communicator* comm_;
};

/// `a` as tensors "<prefix><name>" (values) and "<prefix>meta/<name>" (F64 [alpha, scale, scaling,
/// rank policy]); shapes carry rows, columns and so the rank.
template <class T>
void add_aggregate(SafetensorsFile& f, const std::string& prefix, const SharedAggregate<T>& a) {
    for (const auto& i : a.tensors()) {
        f.add(prefix + i.name, {i.rows, i.cols}, a.span(i));
        f.add(prefix + "meta/" + i.name, {4},
              std::vector<double>{i.alpha, i.scale, static_cast<double>(i.scaling), static_cast<double>(i.rank_policy)});
    }
}

/// Removes the tensors add_aggregate() wrote under `prefix` from `f` and returns the aggregate they hold.
template <class T>
SharedAggregate<T> take_aggregate(SafetensorsFile& f, const std::string& prefix) {
    std::map<std::string, std::pair<SharedTensorInfo, std::vector<T>>> by_name;  // sorted by name
    std::vector<std::string> names;
    for (const auto& t : f.tensors())
        if (t.name.starts_with(prefix) && !t.name.starts_with(prefix + "meta/")) names.push_back(t.name);
    for (const auto& full : names) {
        SharedTensorInfo i;
        i.name = full.substr(prefix.size());
        require<FormatError>(split_lora_name(i.name, i.pair, i.factor), "tensor '", full, "': not a LoRA factor");
        const auto& shape = f.shape(full);
        require<FormatError>(shape.size() == 2, "tensor '", full, "': shape must be [rows, cols]");
        i.rows = shape[0];
        i.cols = shape[1];
        i.rank = i.factor == LoraFactor::A ? i.rows : i.cols;
        const auto meta = f.get<double>(prefix + "meta/" + i.name, {4});
        require<FormatError>((meta[2] == 0 || meta[2] == 1) && (meta[3] == 0 || meta[3] == 1), "tensor '", prefix,
                             "meta/", i.name, "': scaling ", meta[2], " / rank policy ", meta[3], " unknown");
        i.alpha = meta[0];
        i.scale = meta[1];
        i.scaling = static_cast<LoraScaling>(static_cast<int>(meta[2]));
        i.rank_policy = static_cast<RankPolicy>(static_cast<int>(meta[3]));
        by_name.emplace(i.name, std::make_pair(i, f.get<T>(full)));
    }
    std::vector<SharedTensorInfo> infos;
    std::vector<T> values;
    for (auto& [name, iv] : by_name) {
        f.erase(prefix + name);
        f.erase(prefix + "meta/" + name);
        infos.push_back(iv.first);
        values.insert(values.end(), iv.second.begin(), iv.second.end());
    }
    for (const auto& t : f.tensors())
        require<FormatError>(!t.name.starts_with(prefix), "tensor '", t.name, "': no tensor of its aggregate");
    return SharedAggregate<T>(std::move(infos), std::span<const T>(values));
}

inline std::string user_file_name(UserId id) { return "user-" + std::to_string(id) + ".safetensors"; }
inline constexpr const char* server_file_name = "server.safetensors";

/// A strategy as text, every field that changes what a run computes.
inline std::string describe(const Strategy& s) {
    std::string roles;
    for (Role r : s.roles) roles += r == Role::generalist ? 'G' : 'S';
    std::string rule = "none";
    if (const auto* a = s.aggregation())
        rule = comigs::detail::concat(to_string(a->rule), " weighting ", to_string(a->weighting), " all_tensors ",
                                      a->require_all_tensors, " clip ", a->clip_norm, " trim ", a->trim, " noise ",
                                      a->noise_multiplier, " seed ", a->seed);
    else if (const auto* p = s.personalised())
        rule = comigs::detail::concat("pcl temperature ", p->temperature);
    return comigs::detail::concat(s.name, " roles ", roles, " top_k ", s.top_k, " routing ", to_string(s.routing),
                                  " router ", to_string(s.router_training), " share_adapters ", s.share_adapters,
                                  " rule ", rule, " freeze_shared_lora_A ", s.freeze_shared_lora_A);
}

}  // namespace detail

/// Runs `runner` (RoundRunner or DistributedRoundRunner; with the latter every rank calls this
/// together) to the end with checkpoints, resuming first when options.resume is set. Returns the
/// reports of the rounds run by this call. Throws Interrupted after saving when a stop was requested.
template <class Runner>
std::vector<RoundReport> run_checkpointed(Runner& runner, const RunCheckpointOptions& options,
                                          const RunnerHooks<typename Runner::T>& hooks = {}) {
    using T = typename Runner::T;
    constexpr bool distributed = requires { runner.communicator(); };
    require(!options.dir.empty(), "checkpoint dir: must be given");
    require(options.every >= 1, "checkpoint every ", options.every, ": must be >= 1");
    CheckpointStore store(options.dir, options.keep);
    Communicator* comm = nullptr;
    if constexpr (distributed) comm = &runner.communicator();
    const detail::RunRanks ranks(comm);
    auto log = [&](const std::string& s) {
        if (ranks.leader() && options.log) options.log(s);
    };

    // The settings: the caller's, then the runner's (users gathered from every rank, by id).
    RunSettings settings = options.settings;
    {
        const RunnerConfig& rc = runner.config();
        std::string mine;
        for (const auto& u : runner.users()) {
            std::string roles;
            for (Role r : (u.roles.empty() ? runner.strategy().roles : u.roles)) roles += r == Role::generalist ? 'G' : 'S';
            mine += comigs::detail::concat(u.id, ":", u.weight, ":", roles, "\n");
        }
        std::map<UserId, std::string> users;
        for (const auto& part : ranks.allgather(std::as_bytes(std::span(mine.data(), mine.size())))) {
            std::string text(reinterpret_cast<const char*>(part.data()), part.size());
            for (std::size_t at = 0, nl; (nl = text.find('\n', at)) != std::string::npos; at = nl + 1) {
                const std::string line = text.substr(at, nl - at);
                users[static_cast<UserId>(std::stoull(line.substr(0, line.find(':'))))] = line;
            }
        }
        std::string all;
        for (const auto& [id, line] : users) all += (all.empty() ? "" : " ") + line;
        std::string reduction = "fixed_order";
        if constexpr (distributed) reduction = to_string(runner.reduction());
        settings.emplace_back("runner.strategy", detail::describe(runner.strategy()));
        settings.emplace_back("runner.rounds", std::to_string(rc.rounds));
        settings.emplace_back("runner.local_steps", std::to_string(rc.local_steps));
        settings.emplace_back("runner.reset_moments_on_download", std::to_string(rc.reset_moments_on_download));
        settings.emplace_back("runner.sync_initial", std::to_string(rc.sync_initial));
        settings.emplace_back("runner.shuffle_seed", rc.shuffle_seed ? std::to_string(*rc.shuffle_seed) : "none");
        settings.emplace_back("runner.users", all);
        settings.emplace_back("runner.dtype", std::string(dtype_name(dtype_of<T>())));
        settings.emplace_back("runner.reduction", reduction);
    }

    // Resume, or refuse to overwrite.
    std::int64_t resumed = -1;
    {
        std::string error, note;
        if (ranks.leader()) {
            std::vector<std::string> rejected;
            const auto gen = options.resume ? store.latest(&rejected) : std::nullopt;
            for (const auto& r : rejected) log(r + "; falling back to the previous generation");
            if (options.resume && gen) {
                resumed = gen->round;
                const std::string diff = first_difference(gen->settings, settings);
                if (!diff.empty())
                    error = "cannot resume from '" + gen->path.string() + "': it was made with other settings: " + diff;
                else if (!gen->has(detail::server_file_name))
                    error = "'" + gen->path.string() + "' has no " + detail::server_file_name;
            } else if (options.resume) {
                note = "no usable checkpoint in '" + options.dir.string() + "': starting at round 0";
            } else if (!store.rounds().empty()) {
                error = "'" + options.dir.string() + "' holds a checkpoint of a run; resume it, or give another folder";
            }
        }
        error = ranks.from_leader(error);
        if (!error.empty()) comigs::detail::raise<InvalidArgument>(error);
        if (!note.empty()) log(note);
        resumed = std::stoll(ranks.from_leader(std::to_string(resumed)));
    }
    if (resumed >= 0) {
        const std::filesystem::path gen = store.generation_path(resumed);
        ranks.together("resuming from a checkpoint", [&] {
            std::vector<std::optional<SharedAggregate<T>>> pending(runner.users().size());
            for (std::size_t i = 0; i < runner.users().size(); ++i) {
                const auto& u = runner.users()[i];
                const auto path = gen / detail::user_file_name(u.id);
                require<FormatError>(std::filesystem::exists(path), "'", gen.string(), "' has no state of user ", u.id);
                SafetensorsFile f = SafetensorsFile::load(path);
                if (f.metadata().count("comigs.run.pending") && f.metadata().at("comigs.run.pending") == "1")
                    pending[i] = detail::take_aggregate<T>(f, "pending/");
                Checkpoint<T> c;
                try {
                    c = from_safetensors<T>(f);
                } catch (const FormatError& e) {
                    comigs::detail::raise<FormatError>("'", path.string(), "': ", e.what());
                }
                require<FormatError>(c.round == resumed, "'", path.string(), "': round ", c.round, " in generation ",
                                     resumed);
                restore_checkpoint(c, *u.trainer);
            }
            SafetensorsFile server = SafetensorsFile::load(gen / detail::server_file_name);
            const auto round = server.get<std::int64_t>("round", {})[0];
            require<FormatError>(round == resumed, "'", (gen / detail::server_file_name).string(), "': round ", round,
                                 " in generation ", resumed);
            std::optional<SharedAggregate<T>> global;
            if (server.metadata().count("comigs.run.global") && server.metadata().at("comigs.run.global") == "1")
                global = detail::take_aggregate<T>(server, "global/");
            runner.resume_at(static_cast<Index>(resumed), std::move(pending));
            if constexpr (!distributed) runner.set_global_aggregate(std::move(global));
            if (options.load_accounting) {
                const auto bytes = server.get<std::uint8_t>("accounting");
                options.load_accounting(std::as_bytes(std::span(bytes.data(), bytes.size())));
            }
        });
        log("resumed from '" + gen.string() + "' (" + std::to_string(resumed) + " of " +
            std::to_string(runner.config().rounds) + " rounds done)");
    }

    // One generation: rank 0 makes the folder, every rank writes its users, rank 0 the server and the
    // manifest.
    auto save = [&](Index done) -> std::filesystem::path {
        std::filesystem::path partial;
        ranks.together("saving a checkpoint", [&] {
            if (ranks.leader()) partial = store.begin(done);
        });
        partial = store.partial_path(done);
        std::vector<GenerationFile> files;
        ranks.together("saving a checkpoint", [&] {
            SafetensorsWriteOptions wo;
            wo.checksum = true;
            for (std::size_t i = 0; i < runner.users().size(); ++i) {
                const auto& u = runner.users()[i];
                SafetensorsFile f = to_safetensors(make_checkpoint(*u.trainer, done));
                f.metadata()["comigs.run.user"] = std::to_string(u.id);
                const auto& p = runner.pending_download(i);
                f.metadata()["comigs.run.pending"] = p ? "1" : "0";
                if (p) detail::add_aggregate(f, "pending/", *p);
                const auto bytes = f.serialize(wo);
                files.push_back(CheckpointStore::write_file(partial, detail::user_file_name(u.id), bytes));
            }
        });
        comigs::detail::ByteWriter w;
        for (const auto& g : files) {
            w.put_string(g.name);
            w.put(g.bytes);
            w.put(g.xxh64);
        }
        std::vector<GenerationFile> all;
        for (const auto& part : ranks.allgather(w.bytes)) {
            comigs::detail::ByteReader r(part, 0);
            while (!r.done()) {
                GenerationFile g;
                g.name = r.get_string();
                g.bytes = r.get<std::uint64_t>();
                g.xxh64 = r.get<std::uint64_t>();
                all.push_back(std::move(g));
            }
        }
        std::filesystem::path committed = store.generation_path(done);
        ranks.together("saving a checkpoint", [&] {
            if (!ranks.leader()) return;
            SafetensorsFile server;
            server.metadata()["comigs.format"] = "run-server";
            server.metadata()["comigs.dtype"] = std::string(dtype_name(dtype_of<T>()));
            server.add("round", {}, std::vector<std::int64_t>{done});
            const SharedAggregate<T>* global = nullptr;
            if constexpr (!distributed) global = runner.global_aggregate();
            server.metadata()["comigs.run.global"] = global ? "1" : "0";
            if (global) detail::add_aggregate(server, "global/", *global);
            std::vector<std::uint8_t> acc;
            if (options.save_accounting) {
                const auto bytes = options.save_accounting();
                acc.resize(bytes.size());
                if (!bytes.empty()) std::memcpy(acc.data(), bytes.data(), bytes.size());
            }
            server.add("accounting", {static_cast<Index>(acc.size())}, acc);
            SafetensorsWriteOptions wo;
            wo.checksum = true;
            all.push_back(CheckpointStore::write_file(partial, detail::server_file_name, server.serialize(wo)));
            store.commit(done, settings, std::move(all));
        });
        return committed;
    };

    std::vector<RoundReport> reports;
    const Index rounds = runner.config().rounds;
    while (runner.rounds_done() < rounds) {
        reports.push_back(runner.round(hooks));
        const Index done = runner.rounds_done();
        const int sig = options.stop_on_request ? ranks.any_signal(stop_requested()) : 0;
        if (done % options.every == 0 || done == rounds || sig != 0) {
            const auto path = save(done);
            if (sig != 0) throw Interrupted(sig, done, path.string());
        }
    }
    runner.finish(hooks);
    return reports;
}

}  // namespace comigs::io
