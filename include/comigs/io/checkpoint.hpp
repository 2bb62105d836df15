#pragma once
// Training checkpoints of one user in a single safetensors file: every adapter parameter, both
// optimisers' moments and counters, the trainer's step counters and batch-generator states, and the
// round. Written atomically (temporary file, fsync, rename: a crash mid-save leaves the previous
// checkpoint intact) with an XXH64 checksum of the data section that loading verifies.
//
// File layout (names of the tensors):
//   "param/<prefix><tensor>"     adapter parameters (F32 or F64 as the model), e.g. "param/h.0.mlp.router.weight"
//   "optim/<state tensor>"       optimiser moments, e.g. "optim/expert_optimizer.h.0.mlp.experts.0.fc.lora_A.exp_avg"
//   "count/<state scalar>"       I64 scalars: optimiser iteration/step counts, "trainer.expert_steps", ...
//   "rng/train", "rng/validation" U64 [4]: the batch generators' states
//   "round"                      I64 scalar
// Metadata: "comigs.format" = "checkpoint", "comigs.checkpoint_version" = "1", "comigs.dtype" = "F32" |
// "F64", plus whatever the caller adds (keys starting with "comigs." are reserved).
//
// Resuming is exact: loading restores the parameters and the trainer state bit for bit, so training on
// (at the same thread count) gives the same result as a run that never stopped.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "../error.hpp"
#include "../train.hpp"
#include "safetensors.hpp"

namespace comigs::io {

/// The content of a checkpoint, in memory.
template <class T>
struct Checkpoint {
    std::vector<NamedTensor<T>> parameters;  ///< as adapter_parameters() names them
    TrainerState<T> trainer;
    std::int64_t round = 0;              ///< e.g. the number of completed rounds
    SafetensorsMetadata metadata;        ///< caller's extra string entries (no "comigs." keys)
};

inline constexpr const char* checkpoint_version = "1";

/// The safetensors image of a checkpoint (see the file comment for the layout).
template <class T>
SafetensorsFile to_safetensors(const Checkpoint<T>& c) {
    SafetensorsFile f;
    for (const auto& [k, v] : c.metadata) {
        require(!k.starts_with("comigs."), "checkpoint metadata key '", k, "': keys starting with 'comigs.' are reserved");
        f.metadata()[k] = v;
    }
    f.metadata()["comigs.format"] = "checkpoint";
    f.metadata()["comigs.checkpoint_version"] = checkpoint_version;
    f.metadata()["comigs.dtype"] = std::string(dtype_name(dtype_of<T>()));
    for (const auto& p : c.parameters) f.add("param/" + p.name, p.shape, p.data);
    for (const auto& t : c.trainer.tensors) f.add("optim/" + t.name, t.shape, t.data);
    for (const auto& s : c.trainer.scalars) f.add("count/" + s.name, {}, std::vector<std::int64_t>{s.value});
    f.add("rng/train", {4}, std::vector<std::uint64_t>(c.trainer.train_rng.begin(), c.trainer.train_rng.end()));
    f.add("rng/validation", {4},
          std::vector<std::uint64_t>(c.trainer.validation_rng.begin(), c.trainer.validation_rng.end()));
    f.add("round", {}, std::vector<std::int64_t>{c.round});
    return f;
}

/// Reads a checkpoint back from its safetensors image; FormatError when the file is not a comigs
/// checkpoint of element type T or a tensor is malformed.
template <class T>
Checkpoint<T> from_safetensors(const SafetensorsFile& f) {
    const auto meta = [&](std::string_view key) -> std::string {
        const auto it = f.metadata().find(key);
        return it == f.metadata().end() ? std::string("(absent)") : it->second;
    };
    if (meta("comigs.format") != "checkpoint")
        detail::raise<FormatError>("not a comigs checkpoint: metadata comigs.format is ", meta("comigs.format"));
    if (meta("comigs.checkpoint_version") != checkpoint_version)
        detail::raise<FormatError>("checkpoint version ", meta("comigs.checkpoint_version"), ": this build reads ",
                                   checkpoint_version);
    const std::string want = std::string(dtype_name(dtype_of<T>()));
    if (meta("comigs.dtype") != want)
        detail::raise<FormatError>("checkpoint dtype ", meta("comigs.dtype"), ": the model is ", want,
                                   " (exact resumption needs the same element type)");
    Checkpoint<T> c;
    for (const auto& [k, v] : f.metadata())
        if (!k.starts_with("comigs.")) c.metadata[k] = v;
    bool have_round = false, have_train = false, have_val = false;
    for (const auto& t : f.tensors()) {
        const std::string_view n = t.name;
        if (n.starts_with("param/")) {
            c.parameters.push_back({std::string(n.substr(6)), t.shape, f.get<T>(n)});
        } else if (n.starts_with("optim/")) {
            c.trainer.tensors.push_back({std::string(n.substr(6)), t.shape, f.get<T>(n)});
        } else if (n.starts_with("count/")) {
            c.trainer.scalars.push_back({std::string(n.substr(6)), f.get<std::int64_t>(n, {})[0]});
        } else if (n == "rng/train" || n == "rng/validation") {
            const auto v = f.get<std::uint64_t>(n, {4});
            auto& dst = n == "rng/train" ? c.trainer.train_rng : c.trainer.validation_rng;
            std::copy(v.begin(), v.end(), dst.begin());
            (n == "rng/train" ? have_train : have_val) = true;
        } else if (n == "round") {
            c.round = f.get<std::int64_t>(n, {})[0];
            have_round = true;
        } else {
            detail::raise<FormatError>("checkpoint tensor ", detail::quote_name(n), ": unknown entry");
        }
    }
    if (!have_round || !have_train || !have_val)
        detail::raise<FormatError>("checkpoint: missing ", !have_round ? "'round'" : !have_train ? "'rng/train'" : "'rng/validation'");
    // The writer lays scalars out in state order, but the reader returns tensors sorted by offset, which
    // is the same order: nothing to reorder.
    return c;
}

/// The checkpoint of a trainer and the model it trains.
template <class Model, class Batch>
Checkpoint<typename Model::scalar_type> make_checkpoint(const Trainer<Model, Batch>& trainer, std::int64_t round,
                                                         SafetensorsMetadata metadata = {}) {
    Checkpoint<typename Model::scalar_type> c;
    c.parameters = adapter_parameters(trainer.adapters());
    c.trainer = trainer.state();
    c.round = round;
    c.metadata = std::move(metadata);
    return c;
}

/// Restores the parameters and the trainer state of a checkpoint; returns its round. Everything is
/// checked first (every adapter tensor present with its shape, no unknown tensor, valid optimiser
/// state); on any error the model and the trainer are left as they were.
template <class Model, class Batch>
std::int64_t restore_checkpoint(const Checkpoint<typename Model::scalar_type>& c, Trainer<Model, Batch>& trainer) {
    using T = typename Model::scalar_type;
    const auto previous = adapter_parameters(trainer.adapters());
    load_adapter_parameters<T>(trainer.adapters(), c.parameters);  // checks all before writing
    try {
        trainer.load_state(c.trainer);  // all or nothing
    } catch (...) {
        load_adapter_parameters<T>(trainer.adapters(), previous);
        throw;
    }
    return c.round;
}

/// Saves the checkpoint of `trainer` (and its model's adapters) at `path` atomically, with a checksum.
template <class Model, class Batch>
void save_checkpoint(const std::filesystem::path& path, const Trainer<Model, Batch>& trainer, std::int64_t round,
                     SafetensorsMetadata metadata = {}) {
    SafetensorsWriteOptions options;
    options.checksum = true;
    to_safetensors(make_checkpoint(trainer, round, std::move(metadata))).save(path, options);
}

/// Loads the checkpoint at `path` into `trainer` and its model (see restore_checkpoint); returns the
/// round. A corrupted file fails its checksum (FormatError) and changes nothing.
template <class Model, class Batch>
std::int64_t load_checkpoint(const std::filesystem::path& path, Trainer<Model, Batch>& trainer,
                             SafetensorsMetadata* metadata = nullptr) {
    using T = typename Model::scalar_type;
    Checkpoint<T> c;
    try {
        c = from_safetensors<T>(SafetensorsFile::load(path));
    } catch (const FormatError& e) {
        const std::string what = e.what();
        if (what.find(path.string()) != std::string::npos) throw;
        detail::raise<FormatError>("checkpoint '", path.string(), "': ", what);
    }
    const std::int64_t round = restore_checkpoint(c, trainer);
    if (metadata != nullptr) *metadata = std::move(c.metadata);
    return round;
}

}  // namespace comigs::io
