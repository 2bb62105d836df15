#pragma once
// Server-side aggregation of generalist uploads: FedAvg (uniform, the CoMiGS reference, or weighted by
// training tokens), heterogeneous ranks (HetLoRA zero-padding, FlexLoRA SVD redistribution), FFA-LoRA,
// exact stacking, and robust rules for untrusted fleets (norm clipping, coordinate-wise median,
// trimmed mean, Krum, DP-FedAvg). Device-side helpers for these methods live here too (FFA-LoRA's
// seeded A, HetLoRA's rank self-pruning).
//
// Every rule:
// - sorts uploads by user id and sums in that order (in double), so the aggregate is bitwise the same
//   whatever order the uploads arrived in;
// - excludes uploads holding a NaN or Inf (counted and named in the report), never averages them in;
// - rejects duplicate users, bad weights, shape and metadata mismatches with an error naming the user
//   and the tensor, never a silent partial result;
// - aggregates each tensor over the users that hold it (users may share different sets of experts),
//   with weights renormalised over them.
//
// Averaging A and B separately (FedAvg, HetLoRA, FFA's B) is not the average of the products B A;
// FlexLoRA and stacking are the product-exact alternatives (stacking exactly, at a larger rank).
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "detail/xxhash64.hpp"
#include "random.hpp"
#include "upload.hpp"

namespace comigs {

/// The aggregation rules.
enum class AggregationRule {
    fedavg,        ///< weighted mean of each factor (CoMiGS reference: uniform weights)
    hetlora,       ///< zero-pad factors to the largest rank, mean, devices truncate (Cho et al. 2024)
    flexlora,      ///< mean of full products s B A, truncated SVD, top-r factors per device (Bai et al. 2024)
    ffa_lora,      ///< A frozen at a shared seed (must be identical), only B averaged (Sun et al. 2024)
    stacking,      ///< concatenate weighted factors: B_stack A_stack = sum w s B A exactly, rank sum r_i
    norm_clip,     ///< weighted mean of updates clipped to norm C
    median,        ///< coordinate-wise median (unweighted)
    trimmed_mean,  ///< coordinate-wise mean after dropping the f largest and f smallest (unweighted)
    krum,          ///< the upload closest to its n - f - 2 nearest neighbours (Blanchard et al. 2017)
    dp_fedavg,     ///< clipped mean plus Gaussian noise (McMahan et al. 2018), settings reported
};

inline const char* to_string(AggregationRule r) {
    switch (r) {
        case AggregationRule::fedavg: return "fedavg";
        case AggregationRule::hetlora: return "hetlora";
        case AggregationRule::flexlora: return "flexlora";
        case AggregationRule::ffa_lora: return "ffa_lora";
        case AggregationRule::stacking: return "stacking";
        case AggregationRule::norm_clip: return "norm_clip";
        case AggregationRule::median: return "median";
        case AggregationRule::trimmed_mean: return "trimmed_mean";
        case AggregationRule::krum: return "krum";
        case AggregationRule::dp_fedavg: return "dp_fedavg";
    }
    return "?";
}

/// How users are weighted by the linear rules.
enum class Weighting {
    uniform,      ///< 1 per user (renormalised over the users holding a tensor)
    tokens,       ///< the upload's weight (training tokens / data size)
    update_norm,  ///< HetLoRA only: per adapter, the Frobenius norm of the user's update s B A
};

inline const char* to_string(Weighting w) {
    return w == Weighting::uniform ? "uniform" : w == Weighting::tokens ? "tokens" : "update_norm";
}

/// A rule and its settings. Build with the named constructors, e.g. AggregationConfig::flexlora().
struct AggregationConfig {
    AggregationRule rule = AggregationRule::fedavg;
    Weighting weighting = Weighting::uniform;
    /// Every included user must hold every shared tensor (else an error naming user and tensor).
    bool require_all_tensors = false;
    double clip_norm = 0.0;         ///< C of norm_clip and dp_fedavg
    Index trim = 0;                 ///< f: trimmed_mean drops f per side (2f < n); krum tolerates f (n > 2f + 2)
    double noise_multiplier = 0.0;  ///< z of dp_fedavg: noise N(0, (z C)^2) on the sum
    std::uint64_t seed = 0;         ///< dp_fedavg noise generator: Rng(seed, stream)
    std::uint64_t stream = 0;       ///< e.g. the round index, so rounds draw independent noise

    static AggregationConfig fedavg(Weighting w = Weighting::uniform) { return make(AggregationRule::fedavg, w); }
    static AggregationConfig hetlora(Weighting w = Weighting::uniform) { return make(AggregationRule::hetlora, w); }
    static AggregationConfig flexlora(Weighting w = Weighting::tokens) { return make(AggregationRule::flexlora, w); }
    static AggregationConfig ffa_lora(Weighting w = Weighting::uniform) { return make(AggregationRule::ffa_lora, w); }
    static AggregationConfig stacking(Weighting w = Weighting::uniform) { return make(AggregationRule::stacking, w); }
    static AggregationConfig norm_clip(double C, Weighting w = Weighting::uniform) {
        auto c = make(AggregationRule::norm_clip, w);
        c.clip_norm = C;
        return c;
    }
    static AggregationConfig median() { return make(AggregationRule::median, Weighting::uniform); }
    static AggregationConfig trimmed_mean(Index f) {
        auto c = make(AggregationRule::trimmed_mean, Weighting::uniform);
        c.trim = f;
        return c;
    }
    static AggregationConfig krum(Index f) {
        auto c = make(AggregationRule::krum, Weighting::uniform);
        c.trim = f;
        return c;
    }
    static AggregationConfig dp_fedavg(double C, double z, std::uint64_t seed, std::uint64_t stream = 0) {
        auto c = make(AggregationRule::dp_fedavg, Weighting::uniform);
        c.clip_norm = C;
        c.noise_multiplier = z;
        c.seed = seed;
        c.stream = stream;
        return c;
    }

    /// Rules that accept users of different ranks (and LoRA scales) for the same adapter.
    bool heterogeneous_ranks() const {
        return rule == AggregationRule::hetlora || rule == AggregationRule::flexlora || rule == AggregationRule::stacking;
    }
    /// Rules that work on whole (A, B) pairs.
    bool pairwise() const { return heterogeneous_ranks(); }
    /// Rules that take the previous global aggregate as the reference for update norms.
    bool uses_reference() const { return rule == AggregationRule::norm_clip || rule == AggregationRule::dp_fedavg; }

    void validate() const {
        const char* r = to_string(rule);
        require(weighting != Weighting::update_norm || rule == AggregationRule::hetlora, "weighting update_norm: ",
                "only HetLoRA weights by update norm (rule ", r, ")");
        const bool unweighted = rule == AggregationRule::median || rule == AggregationRule::trimmed_mean ||
                                rule == AggregationRule::krum || rule == AggregationRule::dp_fedavg;
        require(!unweighted || weighting == Weighting::uniform, "weighting ", to_string(weighting), ": rule ", r,
                " is unweighted (use uniform)");
        if (rule == AggregationRule::norm_clip || rule == AggregationRule::dp_fedavg)
            require(std::isfinite(clip_norm) && clip_norm > 0, "clip_norm ", clip_norm, ": rule ", r,
                    " needs a finite C > 0");
        if (rule == AggregationRule::dp_fedavg)
            require(std::isfinite(noise_multiplier) && noise_multiplier >= 0, "noise_multiplier ", noise_multiplier,
                    ": must be finite and >= 0");
        require(trim >= 0, "trim ", trim, ": must be >= 0");
    }

private:
    static AggregationConfig make(AggregationRule r, Weighting w) {
        AggregationConfig c;
        c.rule = r;
        c.weighting = w;
        return c;
    }
};

/// An upload left out of the aggregate, and why.
struct ExcludedUpload {
    UserId user = 0;
    std::string tensor;  ///< the first offending tensor
    std::string reason;
};

/// How one output tensor was formed: the users holding it and their normalised weights (empty for the
/// order-statistic rules median and trimmed_mean).
struct TensorAggregation {
    std::string name;
    std::vector<UserId> users;
    std::vector<double> weights;
    Index rank = 0;  ///< rank of the output tensor
};

/// Per-user update norm before clipping and the factor applied (norm_clip, dp_fedavg).
struct ClipRecord {
    UserId user = 0;
    double norm = 0.0;
    double factor = 1.0;  ///< min(1, C / norm)
};

/// FlexLoRA: the spectrum of one adapter's averaged product.
struct PairSpectrum {
    std::string pair;
    std::vector<double> singular_values;  ///< descending, all nonzero candidates (at most sum of ranks)
    Index kept_rank = 0;                  ///< largest user rank: the aggregate keeps this many
    double discarded_energy = 0.0;        ///< sum of the squares of the singular values beyond kept_rank
};

/// What an external privacy accountant needs from a DP-FedAvg round.
struct DpAccounting {
    double clip_norm = 0.0;         ///< C: per-user L2 bound on the clipped update
    double noise_multiplier = 0.0;  ///< z
    double noise_stddev = 0.0;      ///< z C: std of the Gaussian added to each coordinate of the sum
    Index users = 0;                ///< n: users in the sum (the sum is divided by the users holding each tensor)
    std::uint64_t seed = 0, stream = 0;
};

/// Everything an aggregation decided: the settings, who was in, who was out and why, weights used.
struct AggregationReport {
    AggregationConfig config;
    std::vector<UserId> included;        ///< ascending
    std::vector<double> upload_weights;  ///< weight() of each included upload, same order
    std::vector<ExcludedUpload> excluded;
    std::vector<TensorAggregation> tensors;
    bool reference_used = false;
    std::vector<ClipRecord> clipping;     ///< norm_clip, dp_fedavg
    std::vector<PairSpectrum> spectra;    ///< flexlora
    std::optional<DpAccounting> dp;       ///< dp_fedavg
    std::optional<UserId> krum_selected;  ///< krum
    std::vector<std::string> notes;       ///< e.g. HetLoRA norm weights falling back to uniform

    Index excluded_count() const { return static_cast<Index>(excluded.size()); }
    const TensorAggregation* tensor(std::string_view name) const {
        for (const auto& t : tensors)
            if (t.name == name) return &t;
        return nullptr;
    }
    /// One line for logs.
    std::string summary() const {
        std::ostringstream os;
        os.precision(6);
        os << to_string(config.rule) << " (" << to_string(config.weighting) << "): " << included.size()
           << " users, " << tensors.size() << " tensors, " << excluded.size() << " excluded";
        for (const auto& e : excluded) os << " [user " << e.user << ": " << e.reason << " in " << e.tensor << "]";
        if (dp) os << ", DP C=" << dp->clip_norm << " z=" << dp->noise_multiplier << " n=" << dp->users;
        if (krum_selected) os << ", krum chose user " << *krum_selected;
        return os.str();
    }
};

/// The aggregate to download and the report.
template <class T>
struct AggregationResult {
    SharedAggregate<T> aggregate;
    AggregationReport report;
};

// ------------------------------------------------------------------------------------------------
// Rank padding (HetLoRA) and device-side helpers

/// Zero-pads a LoRA factor to rank R >= its rank: A [r, in] gets zero rows, B [out, r] zero columns.
/// Returns the padded factor row-major ([R, in] or [out, R]).
template <class T>
std::vector<T> pad_rank(ConstMatrixView<T> m, LoraFactor f, Index R) {
    const Index r = f == LoraFactor::A ? m.rows : m.cols;
    require<ShapeError>(R >= r, "rank ", R, ": cannot pad a rank-", r, " factor to a smaller rank");
    const Index rows = f == LoraFactor::A ? R : m.rows, cols = f == LoraFactor::A ? m.cols : R;
    std::vector<T> out(static_cast<std::size_t>(rows * cols), T(0));
    for (Index i = 0; i < m.rows; ++i) std::copy(m.row_ptr(i), m.row_ptr(i) + m.cols, out.data() + i * cols);
    return out;
}

/// Keeps the first r rank components of a LoRA factor: A [R, in] -> [r, in], B [out, R] -> [out, r].
template <class T>
std::vector<T> truncate_rank(ConstMatrixView<T> m, LoraFactor f, Index r) {
    const Index R = f == LoraFactor::A ? m.rows : m.cols;
    require<ShapeError>(r >= 0 && r <= R, "rank ", r, ": cannot truncate a rank-", R, " factor to it");
    const Index rows = f == LoraFactor::A ? r : m.rows, cols = f == LoraFactor::A ? m.cols : r;
    std::vector<T> out(static_cast<std::size_t>(rows * cols));
    for (Index i = 0; i < rows; ++i) std::copy(m.row_ptr(i), m.row_ptr(i) + cols, out.data() + i * cols);
    return out;
}

/// HetLoRA rank self-pruning, after the idea of Cho et al. (2024): each device penalises the norm of
/// its rank tail so that unneeded components shrink, and drops the tail once it is negligible.
/// comigs' formula, for a rank-r adapter and a kept head of `keep` components (0 < keep < r), with
/// A_t = A[keep:r, :] and B_t = B[:, keep:r]:
///   value = gamma * ||B_t||_F * ||A_t||_F
///   dA_t += gamma * ||B_t||_F * A_t / ||A_t||_F,   dB_t += gamma * ||A_t||_F * B_t / ||B_t||_F
/// (a zero tail factor contributes the subgradient 0). Gradients accumulate (llm.c convention); the
/// head is untouched. Returns the value to add to the loss. dA, dB are shaped like A, B.
template <class T>
double hetlora_tail_regulariser(MatrixView<T> dA, MatrixView<T> dB, ConstMatrixView<T> A, ConstMatrixView<T> B,
                                Index keep, double gamma) {
    const Index r = A.rows;
    require<ShapeError>(B.cols == r, "lora_B has rank ", B.cols, ", lora_A has rank ", r);
    require_shape(dA, A.rows, A.cols, "gradient of lora_A");
    require_shape(dB, B.rows, B.cols, "gradient of lora_B");
    require(keep >= 0 && keep <= r, "keep ", keep, ": must be in [0, ", r, "]");
    require(std::isfinite(gamma) && gamma >= 0, "gamma ", gamma, ": must be finite and >= 0");
    double na = 0.0, nb = 0.0;
    for (Index k = keep; k < r; ++k)
        for (Index j = 0; j < A.cols; ++j) na += static_cast<double>(A(k, j)) * static_cast<double>(A(k, j));
    for (Index i = 0; i < B.rows; ++i)
        for (Index k = keep; k < r; ++k) nb += static_cast<double>(B(i, k)) * static_cast<double>(B(i, k));
    na = std::sqrt(na);
    nb = std::sqrt(nb);
    if (na > 0)
        for (Index k = keep; k < r; ++k)
            for (Index j = 0; j < A.cols; ++j) dA(k, j) += static_cast<T>(gamma * nb * static_cast<double>(A(k, j)) / na);
    if (nb > 0)
        for (Index i = 0; i < B.rows; ++i)
            for (Index k = keep; k < r; ++k) dB(i, k) += static_cast<T>(gamma * na * static_cast<double>(B(i, k)) / nb);
    return gamma * na * nb;
}

/// HetLoRA pruning rule: with the tail ratio
///   rho = ||B_t||_F ||A_t||_F / (||B||_F ||A||_F)      (tail [keep, r) as above, in [0, 1])
/// returns `keep` when rho < threshold (drop the tail), else the current rank r. An all-zero adapter
/// (rho undefined, e.g. B at its zero init) is never pruned. Apply a smaller rank by copying the head
/// (truncate_rank) into a layer of that rank, or zero the tail with zero_rank_tail.
template <class T>
Index hetlora_pruned_rank(ConstMatrixView<T> A, ConstMatrixView<T> B, Index keep, double threshold) {
    const Index r = A.rows;
    require<ShapeError>(B.cols == r, "lora_B has rank ", B.cols, ", lora_A has rank ", r);
    require(keep >= 1 && keep <= r, "keep ", keep, ": must be in [1, ", r, "]");
    require(std::isfinite(threshold) && threshold >= 0, "threshold ", threshold, ": must be finite and >= 0");
    auto norm2 = [](ConstMatrixView<T> m, Index r0, Index r1, bool rows) {
        double s = 0.0;
        for (Index i = 0; i < m.rows; ++i)
            for (Index j = 0; j < m.cols; ++j) {
                const Index k = rows ? i : j;
                if (k >= r0 && k < r1) s += static_cast<double>(m(i, j)) * static_cast<double>(m(i, j));
            }
        return s;
    };
    const double full = std::sqrt(norm2(A, 0, r, true) * norm2(B, 0, r, false));
    if (!(full > 0)) return r;
    const double tail = std::sqrt(norm2(A, keep, r, true) * norm2(B, keep, r, false));
    return tail / full < threshold ? keep : r;
}

/// Zeroes rank components [keep, r) of a LoRA pair (rows of A, columns of B).
template <class T>
void zero_rank_tail(MatrixView<T> A, MatrixView<T> B, Index keep) {
    require<ShapeError>(B.cols == A.rows, "lora_B has rank ", B.cols, ", lora_A has rank ", A.rows);
    require(keep >= 0 && keep <= A.rows, "keep ", keep, ": must be in [0, ", A.rows, "]");
    for (Index k = keep; k < A.rows; ++k)
        for (Index j = 0; j < A.cols; ++j) A(k, j) = T(0);
    for (Index i = 0; i < B.rows; ++i)
        for (Index k = keep; k < B.cols; ++k) B(i, k) = T(0);
}

/// FFA-LoRA: the seed-derived generator of one tensor. Its stream is a hash of the tensor's full name,
/// so every device draws the same A for the same tensor and different tensors get different A.
inline Rng ffa_generator(std::uint64_t seed, std::string_view full_name) {
    return Rng(seed, detail::Xxh64::hash(std::as_bytes(std::span<const char>(full_name.data(), full_name.size()))));
}

/// FFA-LoRA: re-initialises every shared lora_A of the layer (generalists only; specialists keep
/// theirs) with Kaiming-uniform values from ffa_generator(seed, prefix + name): identical on every
/// device that uses the same seed and prefix. Call before training and keep A frozen (exclude it from
/// the optimiser).
template <class T>
void ffa_init_lora_A(MixtureOfLoraMlp<T>& layer, std::string_view prefix, std::uint64_t seed) {
    for (const auto& spec : layer.params().layout().tensors())
        if (layer.shared(spec.name) && spec.name.ends_with(".lora_A")) {
            Rng rng = ffa_generator(seed, std::string(prefix) + spec.name);
            kaiming_uniform(layer.params().view(spec.name), rng);
        }
}
template <class T>
void ffa_init_lora_A(MixtureOfLoraLinear<T>& layer, std::string_view prefix, std::uint64_t seed) {
    for (const auto& spec : layer.params().layout().tensors())
        if (layer.shared(spec.name) && spec.name.ends_with(".lora_A")) {
            Rng rng = ffa_generator(seed, std::string(prefix) + spec.name);
            kaiming_uniform(layer.params().view(spec.name), rng);
        }
}
template <class T>
void ffa_init_lora_A(LoraExpert<T>& adapter, std::string_view prefix, std::uint64_t seed) {
    Rng rng = ffa_generator(seed, std::string(prefix) + "lora_A");
    kaiming_uniform(adapter.A(), rng);
}
template <class T>
void ffa_init_lora_A(const AdapterRegistry<T>& registry, std::uint64_t seed) {
    for (const auto& m : registry.mixtures) ffa_init_lora_A(*m.layer, m.prefix, seed);
    for (const auto& m : registry.mixture_linears) ffa_init_lora_A(*m.layer, m.prefix, seed);
    for (const auto& a : registry.shared_adapters) ffa_init_lora_A(*a.layer, a.prefix, seed);
}

// ------------------------------------------------------------------------------------------------
// Aggregation

namespace detail {

/// The included uploads and, per output tensor, who holds it.
template <class T>
struct AggregationInput {
    struct Slot {
        std::string name;
        std::vector<std::size_t> holders;  // indices into users, ascending user id
        std::vector<const SharedTensorInfo*> infos;
    };
    std::vector<const GeneralistUpload<T>*> users;  // included, ascending user id
    std::vector<double> base_weight;                // per user: 1 or weight()
    std::vector<Slot> slots;                        // union of tensor names, sorted
};

inline std::string shape_str(const SharedTensorInfo& i) {
    return concat("[", i.rows, ", ", i.cols, "]");
}

template <class T>
void check_uploads(const std::vector<const GeneralistUpload<T>*>& all, const AggregationConfig& cfg) {
    struct Seen {
        UserId user;
        const SharedTensorInfo* info;
    };
    std::map<std::string, Seen, std::less<>> first;
    const char* rule = to_string(cfg.rule);
    for (const auto* u : all) {
        const UserId id = u->user();
        require(u->sends_lora_A() || cfg.rule == AggregationRule::ffa_lora || u->empty(), "user ", id,
                ": upload built without lora_A (FFA-LoRA), but rule ", rule, " needs both factors");
        for (const auto& i : u->tensors()) {
            if (cfg.pairwise()) {
                const std::string other = i.pair + (i.factor == LoraFactor::A ? ".lora_B" : ".lora_A");
                require(u->contains(other), "user ", id, " tensor '", other, "': missing, rule ", rule,
                        " needs both factors of '", i.pair, "'");
            }
            auto [it, fresh] = first.try_emplace(i.name, Seen{id, &i});
            if (fresh) continue;
            const SharedTensorInfo& f = *it->second.info;
            const UserId fu = it->second.user;
            require<ShapeError>(i.features() == f.features(), "user ", id, " tensor '", i.name, "': shape ",
                                shape_str(i), ", user ", fu, " has ", shape_str(f));
            if (!cfg.heterogeneous_ranks()) {
                require<ShapeError>(i.rank == f.rank, "user ", id, " tensor '", i.name, "': rank ", i.rank, ", user ",
                                    fu, " has rank ", f.rank, " (rule ", rule,
                                    " averages factors of equal rank; use hetlora, flexlora or stacking)");
                require(i.alpha == f.alpha && i.scaling == f.scaling, "user ", id, " tensor '", i.name, "': alpha ",
                        i.alpha, " ", to_string(i.scaling), " scaling, user ", fu, " has alpha ", f.alpha, " ",
                        to_string(f.scaling), " (averaging factors needs one LoRA scale; use flexlora or stacking)");
            }
        }
    }
}

template <class T>
AggregationInput<T> prepare(const std::vector<GeneralistUpload<T>>& uploads, const AggregationConfig& cfg,
                            const SharedAggregate<T>* reference, AggregationReport& rep) {
    cfg.validate();
    require(!uploads.empty(), "uploads: none given");
    std::vector<const GeneralistUpload<T>*> all;
    for (const auto& u : uploads) all.push_back(&u);
    std::sort(all.begin(), all.end(), [](const auto* a, const auto* b) { return a->user() < b->user(); });
    for (std::size_t k = 1; k < all.size(); ++k)
        require(all[k - 1]->user() != all[k]->user(), "user ", all[k]->user(), ": two uploads with this user id");
    for (const auto* u : all)
        require(std::isfinite(u->weight()) && u->weight() > 0, "user ", u->user(), " weight ", u->weight(),
                ": must be finite and > 0");
    check_uploads(all, cfg);

    AggregationInput<T> in;
    for (const auto* u : all) {
        if (const SharedTensorInfo* bad = u->first_non_finite()) {
            rep.excluded.push_back({u->user(), bad->name, "non-finite value (NaN or Inf)"});
            continue;
        }
        in.users.push_back(u);
        in.base_weight.push_back(cfg.weighting == Weighting::tokens ? u->weight() : 1.0);
        rep.included.push_back(u->user());
        rep.upload_weights.push_back(u->weight());
    }
    require<NumericError>(!in.users.empty(), "aggregation: no upload left after excluding ", rep.excluded.size(),
                          " with non-finite values");

    std::map<std::string, typename AggregationInput<T>::Slot, std::less<>> slots;
    for (std::size_t k = 0; k < in.users.size(); ++k)
        for (const auto& i : in.users[k]->tensors()) {
            auto& s = slots[i.name];
            s.name = i.name;
            s.holders.push_back(k);
            s.infos.push_back(&i);
        }
    for (auto& [name, s] : slots) {
        if (cfg.require_all_tensors && s.holders.size() != in.users.size())
            for (std::size_t k = 0, h = 0; k < in.users.size(); ++k) {
                if (h < s.holders.size() && s.holders[h] == k) {
                    ++h;
                    continue;
                }
                detail::raise<InvalidArgument>("user ", in.users[k]->user(), " tensor '", name,
                                               "': missing (require_all_tensors: every user must hold every shared "
                                               "tensor)");
            }
        in.slots.push_back(std::move(s));
    }

    if (cfg.uses_reference() && reference != nullptr) {
        rep.reference_used = true;
        if (const SharedTensorInfo* bad = reference->first_non_finite())
            detail::raise<NumericError>("reference tensor '", bad->name, "': holds a NaN or Inf");
        for (const auto* u : in.users)
            for (const auto& i : u->tensors()) {
                const SharedTensorInfo* r = reference->find(i.name);
                require(r != nullptr, "user ", u->user(), " tensor '", i.name,
                        "': not in the reference (previous global) aggregate");
                require<ShapeError>(r->rows == i.rows && r->cols == i.cols, "user ", u->user(), " tensor '", i.name,
                                    "': shape ", shape_str(i), ", the reference has ", shape_str(*r));
            }
    }
    return in;
}

/// Output being assembled: tensors in name order, values packed.
template <class T>
struct Output {
    std::vector<SharedTensorInfo> infos;
    std::vector<T> values;

    /// Appends a tensor and returns its (zeroed) values.
    T* add(SharedTensorInfo info) {
        info.offset = static_cast<Index>(values.size());
        values.resize(values.size() + static_cast<std::size_t>(info.size()), T(0));
        T* p = values.data() + info.offset;
        infos.push_back(std::move(info));
        return p;
    }
    SharedAggregate<T> finish() { return SharedAggregate<T>(std::move(infos), std::span<const T>(values)); }
};

inline SharedTensorInfo unit_scale_info(const SharedTensorInfo& like, Index rank, RankPolicy policy) {
    SharedTensorInfo o = like;
    o.rank = rank;
    if (o.factor == LoraFactor::A)
        o.rows = rank;
    else
        o.cols = rank;
    o.alpha = static_cast<double>(rank);
    o.scaling = LoraScaling::linear;
    o.scale = 1.0;
    o.rank_policy = policy;
    return o;
}

/// Per-user L2 norm of the update (value minus reference, or the value without one) over all of
/// the user's tensors in name order.
template <class T>
double update_norm(const GeneralistUpload<T>& u, const SharedAggregate<T>* ref) {
    double s = 0.0;
    for (const auto& i : u.tensors()) {
        const auto x = u.span(i);
        if (ref != nullptr) {
            const auto r = ref->span(i.name);
            for (std::size_t e = 0; e < x.size(); ++e) {
                const double d = static_cast<double>(x[e]) - static_cast<double>(r[e]);
                s += d * d;
            }
        } else {
            for (T v : x) s += static_cast<double>(v) * static_cast<double>(v);
        }
    }
    return std::sqrt(s);
}

/// Clip factors min(1, C / norm) per included user, recorded in the report.
template <class T>
std::vector<double> clip_factors(const AggregationInput<T>& in, const SharedAggregate<T>* ref, double C,
                                 AggregationReport& rep) {
    std::vector<double> f;
    for (const auto* u : in.users) {
        const double n = update_norm(*u, ref);
        const double c = n > C ? C / n : 1.0;
        f.push_back(c);
        rep.clipping.push_back({u->user(), n, c});
    }
    return f;
}

template <class T>
std::span<const T> ref_span(const SharedAggregate<T>* ref, const std::string& name) {
    return ref != nullptr ? ref->span(name) : std::span<const T>();
}

/// Weighted mean of a slot: ref + sum_h w_h c_h (x_h - ref) / sum_h w_h (ref = 0 when absent).
template <class T>
void weighted_mean(T* out, const AggregationInput<T>& in, const typename AggregationInput<T>::Slot& s,
                   const std::vector<double>& clip, std::span<const T> ref, TensorAggregation& ta) {
    const std::size_t n = static_cast<std::size_t>(s.infos[0]->size());
    std::vector<double> acc(n, 0.0);
    double W = 0.0;
    for (std::size_t h = 0; h < s.holders.size(); ++h) W += in.base_weight[s.holders[h]];
    for (std::size_t h = 0; h < s.holders.size(); ++h) {
        const std::size_t k = s.holders[h];
        const double w = in.base_weight[k] * (clip.empty() ? 1.0 : clip[k]);
        const auto x = in.users[k]->span(*s.infos[h]);
        if (ref.empty())
            for (std::size_t e = 0; e < n; ++e) acc[e] += w * static_cast<double>(x[e]);
        else
            for (std::size_t e = 0; e < n; ++e)
                acc[e] += w * (static_cast<double>(x[e]) - static_cast<double>(ref[e]));
        ta.weights.push_back(in.base_weight[k] / W);
    }
    for (std::size_t e = 0; e < n; ++e)
        out[e] = static_cast<T>((ref.empty() ? 0.0 : static_cast<double>(ref[e])) + acc[e] / W);
}

template <class T>
TensorAggregation slot_record(const AggregationInput<T>& in, const typename AggregationInput<T>::Slot& s, Index rank) {
    TensorAggregation ta;
    ta.name = s.name;
    ta.rank = rank;
    for (std::size_t k : s.holders) ta.users.push_back(in.users[k]->user());
    return ta;
}

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;

template <class T>
Mat to_double(ConstMatrixView<T> v) {
    return eigen(v).template cast<double>();
}

/// Thin QR: M [rows, K] = Q [rows, p] R [p, K], p = min(rows, K). A template (any Eigen expression) so
/// that a file including this header does not compile the QR unless it aggregates with FlexLoRA.
template <class Matrix>
void thin_qr(const Matrix& M, Mat& Q, Mat& R) {
    const Index p = std::min<Index>(M.rows(), M.cols());
    Eigen::HouseholderQR<Mat> qr(M);
    Q = qr.householderQ() * Mat::Identity(M.rows(), p);
    R = qr.matrixQR().topRows(p).template triangularView<Eigen::Upper>();
}

template <class T>
AggregationResult<T> run_pairwise(const AggregationInput<T>& in, const AggregationConfig& cfg, AggregationReport rep) {
    Output<T> out;
    for (std::size_t a = 0; a < in.slots.size(); ++a) {
        const auto& sa = in.slots[a];
        require(a + 1 < in.slots.size() && sa.infos[0]->factor == LoraFactor::A &&
                    in.slots[a + 1].infos[0]->factor == LoraFactor::B && in.slots[a + 1].infos[0]->pair == sa.infos[0]->pair,
                "tensor '", sa.name, "': its LoRA pair is incomplete");
        const auto& sb = in.slots[a + 1];
        ++a;
        require(sa.holders == sb.holders, "tensor '", sa.name, "': A and B held by different users");
        const std::size_t n = sa.holders.size();
        const Index din = sa.infos[0]->cols, dout = sb.infos[0]->rows;
        Index R = 0, K = 0;
        std::size_t ref = 0;
        for (std::size_t h = 0; h < n; ++h) {
            K += sa.infos[h]->rank;
            if (sa.infos[h]->rank > R) {
                R = sa.infos[h]->rank;
                ref = h;
            }
        }
        // Weights, normalised over the holders.
        std::vector<double> w(n);
        if (cfg.weighting == Weighting::update_norm) {
            for (std::size_t h = 0; h < n; ++h) {
                const Mat A = to_double(in.users[sa.holders[h]]->view(*sa.infos[h]));
                const Mat B = to_double(in.users[sb.holders[h]]->view(*sb.infos[h]));
                // ||B A||_F^2 = sum_kl (A A^T)_kl (B^T B)_kl: r x r work instead of out x in.
                const double sq = (A * A.transpose()).cwiseProduct(B.transpose() * B).sum();
                w[h] = sa.infos[h]->scale * std::sqrt(std::max(sq, 0.0));
            }
            double total = 0.0;
            for (double v : w) total += v;
            if (!(total > 0)) {
                std::fill(w.begin(), w.end(), 1.0);
                rep.notes.push_back("pair '" + sa.infos[0]->pair + "': every update is zero, uniform weights used");
            }
        } else {
            for (std::size_t h = 0; h < n; ++h) w[h] = in.base_weight[sa.holders[h]];
        }
        double W = 0.0;
        for (double v : w) W += v;

        TensorAggregation ta = slot_record(in, sa, 0), tb = slot_record(in, sb, 0);
        for (double v : w) ta.weights.push_back(v / W);
        tb.weights = ta.weights;

        if (cfg.rule == AggregationRule::hetlora) {
            // Zero-pad to R and average; each user's factors are first brought to the scale S of the
            // highest-rank user (c_h = sqrt(s_h / S), exactly 1 when the scales agree) so that padded
            // rows of users with different LoRA scales add up in the same units.
            SharedTensorInfo ia = *sa.infos[ref], ib = *sb.infos[ref];
            ia.rank_policy = ib.rank_policy = RankPolicy::truncate;
            const double S = ia.scale;
            std::vector<double> Aacc(static_cast<std::size_t>(R * din), 0.0), Bacc(static_cast<std::size_t>(dout * R), 0.0);
            for (std::size_t h = 0; h < n; ++h) {
                const double s = sa.infos[h]->scale;
                // Same operations as fedavg when the scales agree (w_h x summed, then / W): equal-rank
                // users get bitwise the FedAvg result.
                const double c = s == S ? w[h] : w[h] * std::sqrt(s / S);
                const auto A = in.users[sa.holders[h]]->view(*sa.infos[h]);
                const auto B = in.users[sb.holders[h]]->view(*sb.infos[h]);
                for (Index k = 0; k < A.rows; ++k)
                    for (Index j = 0; j < din; ++j) Aacc[static_cast<std::size_t>(k * din + j)] += c * static_cast<double>(A(k, j));
                for (Index i = 0; i < dout; ++i)
                    for (Index k = 0; k < B.cols; ++k) Bacc[static_cast<std::size_t>(i * R + k)] += c * static_cast<double>(B(i, k));
            }
            T* pa = out.add(ia);
            for (std::size_t e = 0; e < Aacc.size(); ++e) pa[e] = static_cast<T>(Aacc[e] / W);
            T* pb = out.add(ib);
            for (std::size_t e = 0; e < Bacc.size(); ++e) pb[e] = static_cast<T>(Bacc[e] / W);
        } else {
            // Weighted stack: Bs = [w_h s_h B_h] (out x K), As = [A_h] (K x in), Bs As = sum w s B A.
            Mat Bs(dout, K), As(K, din);
            Index off = 0;
            for (std::size_t h = 0; h < n; ++h) {
                const Index r = sa.infos[h]->rank;
                As.middleRows(off, r) = to_double(in.users[sa.holders[h]]->view(*sa.infos[h]));
                Bs.middleCols(off, r) = (w[h] / W * sa.infos[h]->scale) * to_double(in.users[sb.holders[h]]->view(*sb.infos[h]));
                off += r;
            }
            if (cfg.rule == AggregationRule::stacking) {
                T* pa = out.add(unit_scale_info(*sa.infos[0], K, RankPolicy::exact));
                for (Index k = 0; k < K; ++k)
                    for (Index j = 0; j < din; ++j) pa[k * din + j] = static_cast<T>(As(k, j));
                T* pb = out.add(unit_scale_info(*sb.infos[0], K, RankPolicy::exact));
                for (Index i = 0; i < dout; ++i)
                    for (Index k = 0; k < K; ++k) pb[i * K + k] = static_cast<T>(Bs(i, k));
            } else {
                // FlexLoRA: SVD of the averaged product W = Bs As without forming it (it may be large):
                // Bs = Qb Rb, As^T = Qa Ra, W = Qb (Rb Ra^T) Qa^T, SVD of the small core.
                Mat Qb, Rb, Qa, Ra;
                thin_qr(Bs, Qb, Rb);
                thin_qr(As.transpose(), Qa, Ra);
                const Mat core = Rb * Ra.transpose();
                Eigen::JacobiSVD<Mat> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
                const Mat U = Qb * svd.matrixU(), V = Qa * svd.matrixV();
                const Eigen::VectorXd& sv = svd.singularValues();
                const Index m = sv.size();
                PairSpectrum ps;
                ps.pair = sa.infos[0]->pair;
                ps.kept_rank = R;
                for (Index k = 0; k < m; ++k) {
                    ps.singular_values.push_back(sv(k));
                    if (k >= R) ps.discarded_energy += sv(k) * sv(k);
                }
                rep.spectra.push_back(std::move(ps));
                // Split sqrt(sigma) to both factors; the aggregate carries scale 1 and devices take the
                // first r_j components (the best rank-r_j approximation) at their own scale.
                T* pa = out.add(unit_scale_info(*sa.infos[0], R, RankPolicy::truncate));
                for (Index k = 0; k < std::min(R, m); ++k)
                    for (Index j = 0; j < din; ++j) pa[k * din + j] = static_cast<T>(std::sqrt(sv(k)) * V(j, k));
                T* pb = out.add(unit_scale_info(*sb.infos[0], R, RankPolicy::truncate));  // pa is stale now
                for (Index k = 0; k < std::min(R, m); ++k)
                    for (Index i = 0; i < dout; ++i) pb[i * R + k] = static_cast<T>(std::sqrt(sv(k)) * U(i, k));
            }
        }
        ta.rank = tb.rank = out.infos.back().rank;
        rep.tensors.push_back(std::move(ta));
        rep.tensors.push_back(std::move(tb));
    }
    return {out.finish(), std::move(rep)};
}

template <class T>
AggregationResult<T> run_krum(const AggregationInput<T>& in, const AggregationConfig& cfg, AggregationReport rep) {
    const std::size_t n = in.users.size();
    const Index f = cfg.trim;
    for (const auto& s : in.slots)
        if (s.holders.size() != n)
            for (std::size_t k = 0, h = 0; k < n; ++k) {
                if (h < s.holders.size() && s.holders[h] == k) {
                    ++h;
                    continue;
                }
                detail::raise<InvalidArgument>("user ", in.users[k]->user(), " tensor '", s.name,
                                               "': missing; krum compares whole uploads, every user must hold the "
                                               "same tensors");
            }
    require(static_cast<Index>(n) > 2 * f + 2, "krum: f = ", f, " with n = ", n, " users: needs n > 2f + 2");
    std::vector<double> d(n * n, 0.0);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = i + 1; j < n; ++j) {
            double s = 0.0;
            const auto xi = in.users[i]->values(), xj = in.users[j]->values();
            for (std::size_t e = 0; e < xi.size(); ++e) {
                const double t = static_cast<double>(xi[e]) - static_cast<double>(xj[e]);
                s += t * t;
            }
            d[i * n + j] = d[j * n + i] = s;
        }
    const std::size_t m = n - static_cast<std::size_t>(f) - 2;
    std::size_t best = 0;
    double best_score = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        std::vector<double> row;
        for (std::size_t j = 0; j < n; ++j)
            if (j != i) row.push_back(d[i * n + j]);
        std::sort(row.begin(), row.end());
        double score = 0.0;
        for (std::size_t k = 0; k < m; ++k) score += row[k];
        if (i == 0 || score < best_score) {
            best = i;
            best_score = score;
        }
    }
    rep.krum_selected = in.users[best]->user();
    Output<T> out;
    for (const auto& s : in.slots) {
        SharedTensorInfo info = *s.infos[best];
        T* p = out.add(info);
        const auto x = in.users[best]->span(*s.infos[best]);
        std::copy(x.begin(), x.end(), p);
        auto ta = slot_record(in, s, info.rank);
        for (std::size_t k = 0; k < n; ++k) ta.weights.push_back(k == best ? 1.0 : 0.0);
        rep.tensors.push_back(std::move(ta));
    }
    return {out.finish(), std::move(rep)};
}

}  // namespace detail

/// Aggregates one round's uploads with `cfg`. `reference` is the previous global aggregate (what the
/// devices started the round from); norm_clip and dp_fedavg measure each user's update against it
/// and other rules ignore it (see the report's reference_used).
///
/// Rules, per tensor over its holders h (in ascending user id), weights w_h normalised to sum 1:
/// - fedavg:      x = sum_h w_h x_h  (uniform w = 1/n is the CoMiGS reference; tokens: w ∝ weight()).
/// - ffa_lora:    every holder's lora_A must be bitwise identical (frozen at one seed, see
///                ffa_init_lora_A) and is passed through; lora_B as fedavg. Uploads may omit A.
/// - hetlora:     per adapter, R = largest holder rank; A_h, B_h zero-padded to R, scaled by
///                sqrt(s_h / S) (S: scale of the highest-rank holder, smallest id on ties) and averaged;
///                rank policy `truncate` (device j takes the first r_j components and applies its own
///                scale through download's sqrt(S / s_j)). Weighting update_norm: w_h ∝ s_h ||B_h A_h||_F
///                (HetLoRA's norm-weighted aggregation; uniform when every update is zero).
/// - flexlora:    M = sum_h w_h s_h B_h A_h (w ∝ data size by default), SVD M = U Σ V^T;
///                B = U_R Σ_R^{1/2}, A = Σ_R^{1/2} V_R^T at scale 1, R = largest holder rank, policy
///                `truncate`: device j gets s_j B_j A_j = the rank-r_j truncation of M (its own rank and
///                scaling convention; download divides each factor by sqrt(s_j)). The report holds the
///                spectrum. Unlike the reference server, every user counts (not only the last) and
///                each user's own scale s_h (alpha/sqrt(r) for CoMiGS) is used, never 16/r.
/// - stacking:    B = [w_1 s_1 B_1 | ... | w_n s_n B_n], A = [A_1; ...; A_n] so B A = sum w_h s_h B_h A_h
///                exactly; rank sum r_h, scale 1 (alpha = rank, linear), policy exact: a device uses it as
///                an adapter of that larger rank (download rescales to its scale), or merges it into W.
/// - norm_clip:   v_h = concatenation over the user's tensors (name order) of x_h - reference, or of
///                x_h itself without a reference; x = reference + sum_h w_h min(1, C/||v_h||) v_h.
///                LoRA factors are not unique (B A = (cB)(A/c)), so this bounds influence in factor
///                space, the space being averaged; all devices start the round from the same global
///                factors, which fixes that gauge, so pass the reference. A user moves the aggregate
///                by at most w_h C.
/// - median:      per coordinate, the median of the holders' values (mean of the two middle ones for
///                even n). With f < n/2 arbitrary users, it lies within the honest users' range.
/// - trimmed_mean: per coordinate, drop the f smallest and f largest, average the rest; needs
///                2f < n for every tensor (InvalidArgument otherwise). With at most f arbitrary users
///                it lies within the honest users' range.
/// - krum:        the whole upload with the smallest sum of squared distances to its n - f - 2 nearest
///                others (ties: smallest id); needs n > 2f + 2 and equal tensor sets.
/// - dp_fedavg:   v_h clipped to C as in norm_clip (uniform); x = reference + (sum_h clip(v_h) + N(0, (zC)^2)
///                per coordinate) / n_t, n_t = holders of the tensor; noise from Rng(seed, stream) drawn
///                tensor by tensor in name order. Settings in report.dp for an external accountant.
template <class T>
AggregationResult<T> aggregate(const std::vector<GeneralistUpload<T>>& uploads, const AggregationConfig& cfg,
                               const SharedAggregate<T>* reference = nullptr) {
    AggregationReport rep;
    rep.config = cfg;
    const auto in = detail::prepare(uploads, cfg, reference, rep);
    const SharedAggregate<T>* ref = cfg.uses_reference() ? reference : nullptr;

    if (cfg.pairwise()) return detail::run_pairwise(in, cfg, std::move(rep));
    if (cfg.rule == AggregationRule::krum) return detail::run_krum(in, cfg, std::move(rep));

    std::vector<double> clip;
    if (cfg.rule == AggregationRule::norm_clip || cfg.rule == AggregationRule::dp_fedavg)
        clip = detail::clip_factors(in, ref, cfg.clip_norm, rep);
    std::optional<Rng> rng;
    if (cfg.rule == AggregationRule::dp_fedavg) {
        rng.emplace(cfg.seed, cfg.stream);
        rep.dp = DpAccounting{cfg.clip_norm, cfg.noise_multiplier, cfg.noise_multiplier * cfg.clip_norm,
                              static_cast<Index>(in.users.size()), cfg.seed, cfg.stream};
    }

    detail::Output<T> out;
    std::vector<double> column;
    for (const auto& s : in.slots) {
        SharedTensorInfo info = *s.infos[0];
        info.rank_policy = RankPolicy::exact;
        T* p = out.add(info);
        auto ta = detail::slot_record(in, s, info.rank);
        const std::size_t n = static_cast<std::size_t>(info.size()), m = s.holders.size();
        switch (cfg.rule) {
            case AggregationRule::fedavg:
            case AggregationRule::norm_clip:
                detail::weighted_mean(p, in, s, clip, detail::ref_span(ref, s.name), ta);
                break;
            case AggregationRule::ffa_lora:
                if (info.factor == LoraFactor::A) {
                    const auto first = in.users[s.holders[0]]->span(*s.infos[0]);
                    for (std::size_t h = 1; h < m; ++h) {
                        const auto x = in.users[s.holders[h]]->span(*s.infos[h]);
                        require(std::memcmp(x.data(), first.data(), n * sizeof(T)) == 0, "user ",
                                in.users[s.holders[h]]->user(), " tensor '", s.name, "': lora_A differs from user ",
                                in.users[s.holders[0]]->user(),
                                "'s; FFA-LoRA needs A frozen at one shared seed on every device (ffa_init_lora_A)");
                    }
                    std::copy(first.begin(), first.end(), p);
                    for (std::size_t h = 0; h < m; ++h) ta.weights.push_back(h == 0 ? 1.0 : 0.0);
                } else {
                    detail::weighted_mean(p, in, s, clip, {}, ta);
                }
                break;
            case AggregationRule::median:
            case AggregationRule::trimmed_mean: {
                const std::size_t f = static_cast<std::size_t>(cfg.trim);
                if (cfg.rule == AggregationRule::trimmed_mean)
                    require(2 * f < m, "trimmed mean: trim f = ", f, " needs 2f < n, tensor '", s.name, "' has n = ",
                            m, " users");
                column.resize(m);
                for (std::size_t e = 0; e < n; ++e) {
                    for (std::size_t h = 0; h < m; ++h)
                        column[h] = static_cast<double>(in.users[s.holders[h]]->span(*s.infos[h])[e]);
                    std::sort(column.begin(), column.end());
                    double v;
                    if (cfg.rule == AggregationRule::median) {
                        v = m % 2 == 1 ? column[m / 2] : 0.5 * (column[m / 2 - 1] + column[m / 2]);
                    } else {
                        double acc = 0.0;
                        for (std::size_t h = f; h < m - f; ++h) acc += column[h];
                        v = acc / static_cast<double>(m - 2 * f);
                    }
                    p[e] = static_cast<T>(v);
                }
                break;
            }
            case AggregationRule::dp_fedavg: {
                const auto r = detail::ref_span(ref, s.name);
                std::vector<double> acc(n, 0.0);
                for (std::size_t h = 0; h < m; ++h) {
                    const std::size_t k = s.holders[h];
                    const auto x = in.users[k]->span(*s.infos[h]);
                    for (std::size_t e = 0; e < n; ++e)
                        acc[e] += clip[k] * (static_cast<double>(x[e]) - (r.empty() ? 0.0 : static_cast<double>(r[e])));
                    ta.weights.push_back(1.0 / static_cast<double>(m));
                }
                const double sd = cfg.noise_multiplier * cfg.clip_norm;
                for (std::size_t e = 0; e < n; ++e) {
                    const double noise = sd > 0 ? sd * rng->normal() : 0.0;
                    p[e] = static_cast<T>((r.empty() ? 0.0 : static_cast<double>(r[e])) +
                                          (acc[e] + noise) / static_cast<double>(m));
                }
                break;
            }
            default:
                detail::raise<InvalidArgument>("rule ", to_string(cfg.rule), ": not handled here");
        }
        rep.tensors.push_back(std::move(ta));
    }
    return {out.finish(), std::move(rep)};
}

}  // namespace comigs
