#pragma once
// What leaves a device in collaborative training (a typed generalist upload), and how the server's
// aggregate comes back into the device's layers (download).
//
// Privacy by construction: a GeneralistUpload can only be made by UploadBuilder, whose only inputs
// are layer objects; from each layer it copies exactly the tensors the layer itself reports as
// shared() (generalist experts of a mixture, every tensor of a plain shared LoRA adapter). There is no
// public way to put named data of one's choosing into an upload, so specialists and routers cannot
// leave the device through it.
//
// Layout: uploads and aggregates keep their tensors sorted by full name and packed back to back (no
// padding) in ONE contiguous buffer. Two devices holding the same shared tensors therefore have
// identical layouts (same layout_fingerprint()), and averaging them over MPI is one all-reduce of
// `values()`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "detail/aligned.hpp"
#include "detail/xxhash64.hpp"
#include "error.hpp"
#include "lora.hpp"
#include "mixture.hpp"
#include "mixture_linear.hpp"
#include "model.hpp"
#include "optim.hpp"
#include "view.hpp"

namespace comigs {

/// Identifies a user (device) in a federation. Aggregation sorts uploads by it, so it also fixes the
/// summation order.
using UserId = std::uint64_t;

/// Which factor of a LoRA pair a tensor is: A [rank, in] or B [out, rank].
enum class LoraFactor { A, B };

inline const char* to_string(LoraFactor f) { return f == LoraFactor::A ? "lora_A" : "lora_B"; }

/// How a device may use the rank of an aggregated tensor. `exact`: the device's rank must equal it.
/// `truncate`: rank components are ordered by importance (HetLoRA's zero-padded average, FlexLoRA's
/// singular vectors), so a device of rank r takes the first r of them.
enum class RankPolicy { exact, truncate };

inline const char* to_string(RankPolicy p) { return p == RankPolicy::exact ? "exact" : "truncate"; }

/// One shared LoRA factor of an upload or an aggregate. The adapter it belongs to adds
/// `scale * B A` to its frozen weight; `scale` always equals lora_scale(alpha, rank, scaling).
struct SharedTensorInfo {
    std::string name;  ///< full name: layer prefix + tensor, e.g. "h.0.mlp.experts.0.fc.lora_A"
    std::string pair;  ///< the name without ".lora_A" / ".lora_B": links A and B of one adapter
    LoraFactor factor = LoraFactor::A;
    Index rows = 0;  ///< A: rank; B: out_features
    Index cols = 0;  ///< A: in_features; B: rank
    Index rank = 0;
    double alpha = 0.0;
    LoraScaling scaling = LoraScaling::sqrt;
    double scale = 0.0;
    RankPolicy rank_policy = RankPolicy::exact;  ///< uploads: always exact
    Index offset = 0;                            ///< elements from the start of the values buffer

    Index size() const { return rows * cols; }
    /// The dimension that is not the rank: in_features for A, out_features for B.
    Index features() const { return factor == LoraFactor::A ? cols : rows; }
};

/// Splits "x.lora_A" / "x.lora_B" into ("x", factor); false when the name is neither.
inline bool split_lora_name(std::string_view name, std::string& pair, LoraFactor& factor) {
    constexpr std::string_view a = ".lora_A", b = ".lora_B";
    if (name.ends_with(a) && name.size() > a.size()) {
        pair = std::string(name.substr(0, name.size() - a.size()));
        factor = LoraFactor::A;
        return true;
    }
    if (name.ends_with(b) && name.size() > b.size()) {
        pair = std::string(name.substr(0, name.size() - b.size()));
        factor = LoraFactor::B;
        return true;
    }
    return false;
}

/// A sorted table of shared LoRA factors with their values in one contiguous, packed buffer. Base of
/// GeneralistUpload (what a device sends) and SharedAggregate (what the server sends back); read-only.
template <class T>
class SharedTensors {
public:
    /// Tensors sorted by name; `offset` gives each one's place in `values()`.
    const std::vector<SharedTensorInfo>& tensors() const { return infos_; }
    const SharedTensorInfo* find(std::string_view name) const {
        auto it = std::lower_bound(infos_.begin(), infos_.end(), name,
                                   [](const SharedTensorInfo& i, std::string_view n) { return i.name.compare(n) < 0; });
        return it != infos_.end() && it->name == name ? &*it : nullptr;
    }
    const SharedTensorInfo& at(std::string_view name) const {
        const SharedTensorInfo* i = find(name);
        require(i != nullptr, "tensor '", name, "': not in this ", kind_());
        return *i;
    }
    bool contains(std::string_view name) const { return find(name) != nullptr; }

    /// Every value, tensor after tensor, no padding: the buffer MPI reduces.
    std::span<const T> values() const { return {values_.data(), values_.size()}; }
    std::span<const T> span(const SharedTensorInfo& i) const {
        return {values_.data() + i.offset, static_cast<std::size_t>(i.size())};
    }
    std::span<const T> span(std::string_view name) const { return span(at(name)); }
    ConstMatrixView<T> view(const SharedTensorInfo& i) const {
        return ConstMatrixView<T>(values_.data() + i.offset, i.rows, i.cols);
    }
    ConstMatrixView<T> view(std::string_view name) const { return view(at(name)); }
    Index size() const { return static_cast<Index>(values_.size()); }
    bool empty() const { return infos_.empty(); }

    /// The first tensor holding a NaN or Inf (nullptr when all values are finite).
    const SharedTensorInfo* first_non_finite() const {
        for (const auto& i : infos_)
            for (T v : span(i))
                if (!std::isfinite(v)) return &i;
        return nullptr;
    }

    /// Hash of names, factors, shapes and LoRA metadata (not values). Equal fingerprints mean the
    /// buffers can be reduced element by element (e.g. check it across MPI ranks before an all-reduce).
    std::uint64_t layout_fingerprint() const {
        detail::Xxh64 h(0x636f6d696773ull);
        auto put = [&h](const void* p, std::size_t n) { h.update({static_cast<const std::byte*>(p), n}); };
        for (const auto& i : infos_) {
            const std::uint64_t n = i.name.size();
            put(&n, sizeof n);
            put(i.name.data(), i.name.size());
            const std::int64_t dims[4] = {static_cast<std::int64_t>(i.factor), static_cast<std::int64_t>(i.rows),
                                          static_cast<std::int64_t>(i.cols), static_cast<std::int64_t>(i.rank)};
            put(dims, sizeof dims);
            const double meta[2] = {i.alpha, static_cast<double>(i.scaling)};
            put(meta, sizeof meta);
            const std::int64_t policy = static_cast<std::int64_t>(i.rank_policy);
            put(&policy, sizeof policy);
        }
        return h.digest();
    }

protected:
    SharedTensors() = default;

    /// Takes `infos` sorted by name with values packed in that order (offsets are recomputed and the
    /// total checked); validates names, shapes and LoRA metadata.
    SharedTensors(std::vector<SharedTensorInfo> infos, std::span<const T> values) : infos_(std::move(infos)) {
        Index offset = 0;
        for (std::size_t k = 0; k < infos_.size(); ++k) {
            auto& i = infos_[k];
            validate_info(i);
            require(k == 0 || infos_[k - 1].name < i.name, "tensor '", i.name,
                    "': tensors must be sorted by name and unique");
            if (k > 0 && infos_[k - 1].pair == i.pair) {
                const auto& a = infos_[k - 1];
                require<ShapeError>(a.rank == i.rank && a.alpha == i.alpha && a.scaling == i.scaling &&
                                        a.rank_policy == i.rank_policy,
                                    "tensor '", i.name, "': rank ", i.rank, " alpha ", i.alpha, " scaling ",
                                    to_string(i.scaling), " disagree with '", a.name, "' (rank ", a.rank, " alpha ",
                                    a.alpha, " scaling ", to_string(a.scaling), ")");
            }
            i.offset = offset;
            offset += i.size();
        }
        require<ShapeError>(static_cast<Index>(values.size()) == offset, "values: ", values.size(),
                            " elements given, the tensors need ", offset);
        values_.assign(values.begin(), values.end());
    }

    static void validate_info(const SharedTensorInfo& i) {
        std::string pair;
        LoraFactor f{};
        require(split_lora_name(i.name, pair, f), "tensor '", i.name, "': a shared tensor must be a LoRA factor (",
                "name ending in .lora_A or .lora_B)");
        require(pair == i.pair && f == i.factor, "tensor '", i.name, "': pair '", i.pair, "' / factor ",
                to_string(i.factor), " do not match the name");
        require<ShapeError>(i.rows >= 1 && i.cols >= 1, "tensor '", i.name, "': shape [", i.rows, ", ", i.cols,
                            "] must be non-empty");
        const Index r = i.factor == LoraFactor::A ? i.rows : i.cols;
        require<ShapeError>(r == i.rank, "tensor '", i.name, "': shape [", i.rows, ", ", i.cols,
                            "] does not carry its rank ", i.rank, " (A is [rank, in], B is [out, rank])");
        const double s = lora_scale(i.alpha, i.rank, i.scaling);
        require(std::isfinite(i.scale) && i.scale > 0, "tensor '", i.name, "': scale ", i.scale,
                " must be finite and > 0");
        require(std::abs(s - i.scale) <= 1e-12 * std::abs(s), "tensor '", i.name, "': scale ", i.scale,
                " is not alpha ", i.alpha, " with ", to_string(i.scaling), " scaling at rank ", i.rank, " (", s, ")");
    }

    virtual const char* kind_() const { return "tensor table"; }

    std::vector<SharedTensorInfo> infos_;
    detail::aligned_vector<T> values_;

    // Copy and assignment only as part of a derived object: through a SharedTensors& one could
    // otherwise assign an aggregate (or any tensors) into a GeneralistUpload.
    SharedTensors(const SharedTensors&) = default;
    SharedTensors(SharedTensors&&) noexcept = default;
    SharedTensors& operator=(const SharedTensors&) = default;
    SharedTensors& operator=(SharedTensors&&) noexcept = default;

public:
    virtual ~SharedTensors() = default;
};

template <class T>
class UploadBuilder;

/// What a device sends to the server in a round: its generalist / shared LoRA factors, its user id and
/// its weight (e.g. training tokens of the round). Only UploadBuilder can make one (private
/// constructor, final class).
template <class T>
class GeneralistUpload final : public SharedTensors<T> {
public:
    UserId user() const { return user_; }
    /// Aggregation weight (training tokens, examples...): finite and > 0.
    double weight() const { return weight_; }
    /// False when the device froze A (FFA-LoRA) and sent only the B factors.
    bool sends_lora_A() const { return sends_lora_A_; }

private:
    friend class UploadBuilder<T>;
    GeneralistUpload(UserId user, double weight, bool sends_a, std::vector<SharedTensorInfo> infos,
                     std::span<const T> values)
        : SharedTensors<T>(std::move(infos), values), user_(user), weight_(weight), sends_lora_A_(sends_a) {}
    const char* kind_() const override { return "upload"; }

    UserId user_ = 0;
    double weight_ = 1.0;
    bool sends_lora_A_ = true;
};

/// Options of an upload.
struct UploadOptions {
    /// FFA-LoRA devices keep A frozen at a shared seed and may send only B (half the bytes).
    bool send_lora_A = true;
};

/// Builds a GeneralistUpload on the device from layer objects, copying exactly their shared tensors
/// (values are copied when a layer is added). Names are prefix + tensor name, e.g.
///   UploadBuilder<float> b(user, tokens);
///   b.add("h.0.mlp.", mlp0).add("h.1.mlp.", mlp1).add_shared_adapter("h.0.attn.c_attn.", attn0);
///   GeneralistUpload<float> up = std::move(b).finish();
template <class T>
class UploadBuilder {
public:
    /// `weight` must be finite and > 0 (a device with no training tokens this round should not upload).
    UploadBuilder(UserId user, double weight, UploadOptions options = {}) : user_(user), weight_(weight), opt_(options) {
        require(std::isfinite(weight) && weight > 0, "user ", user, " weight ", weight, ": must be finite and > 0");
    }

    /// The generalist experts' LoRA factors of an MLP mixture (specialists and router are skipped).
    UploadBuilder& add(std::string_view prefix, const MixtureOfLoraMlp<T>& layer) {
        const auto& c = layer.config();
        take(prefix, layer.params(), [&layer](std::string_view n) { return layer.shared(n); }, c.rank, c.alpha,
             c.scaling);
        return *this;
    }
    /// The generalist experts' LoRA factors of a linear mixture.
    UploadBuilder& add(std::string_view prefix, const MixtureOfLoraLinear<T>& layer) {
        const auto& c = layer.config();
        take(prefix, layer.params(), [&layer](std::string_view n) { return layer.shared(n); }, c.rank, c.alpha,
             c.scaling);
        return *this;
    }
    /// A plain LoRA adapter shared like a generalist (e.g. on attention projections): lora_A, lora_B.
    UploadBuilder& add_shared_adapter(std::string_view prefix, const LoraExpert<T>& adapter) {
        const auto& c = adapter.config();
        take(prefix, adapter.params(), [](std::string_view) { return true; }, c.rank, c.alpha, c.scaling);
        return *this;
    }
    /// Every layer of a host model's adapter registry, under its registered prefix.
    UploadBuilder& add(const AdapterRegistry<T>& registry) {
        for (const auto& m : registry.mixtures) add(m.prefix, *non_null(m.layer, m.prefix));
        for (const auto& m : registry.mixture_linears) add(m.prefix, *non_null(m.layer, m.prefix));
        for (const auto& a : registry.shared_adapters) add_shared_adapter(a.prefix, *non_null(a.layer, a.prefix));
        return *this;
    }

    /// The upload, tensors sorted by name in one packed buffer. The builder is spent afterwards.
    GeneralistUpload<T> finish() && {
        std::sort(entries_.begin(), entries_.end(),
                  [](const Entry& a, const Entry& b) { return a.info.name < b.info.name; });
        std::vector<SharedTensorInfo> infos;
        std::size_t total = 0;
        for (const auto& e : entries_) total += e.values.size();
        detail::aligned_vector<T> values;
        values.reserve(total);
        for (auto& e : entries_) {
            infos.push_back(std::move(e.info));
            values.insert(values.end(), e.values.begin(), e.values.end());
        }
        entries_.clear();
        return GeneralistUpload<T>(user_, weight_, opt_.send_lora_A, std::move(infos),
                                   std::span<const T>(values.data(), values.size()));
    }

private:
    struct Entry {
        SharedTensorInfo info;
        std::vector<T> values;
    };

    template <class L>
    static const L* non_null(const L* p, const std::string& prefix) {
        require(p != nullptr, "adapter registry entry '", prefix, "': null layer");
        return p;
    }

    template <class Shared>
    void take(std::string_view prefix, const ParamBuffer<T>& params, Shared shared, Index rank, double alpha,
              LoraScaling scaling) {
        const double s = lora_scale(alpha, rank, scaling);
        for (const auto& spec : params.layout().tensors()) {
            if (!shared(spec.name)) continue;
            SharedTensorInfo i;
            i.name = std::string(prefix) + spec.name;
            require(split_lora_name(i.name, i.pair, i.factor), "user ", user_, " tensor '", i.name,
                    "': shared tensors must be LoRA factors (.lora_A / .lora_B)");
            require(std::isfinite(s) && s > 0, "user ", user_, " tensor '", i.name, "': LoRA scale ", s,
                    " (alpha ", alpha, ", rank ", rank, ") must be finite and > 0 to be aggregated");
            for (const auto& e : entries_)
                require(e.info.name != i.name, "user ", user_, " tensor '", i.name,
                        "': added twice (the same layer prefix used for two layers?)");
            if (i.factor == LoraFactor::A && !opt_.send_lora_A) continue;
            i.rows = spec.rows();
            i.cols = spec.cols();
            i.rank = rank;
            i.alpha = alpha;
            i.scaling = scaling;
            i.scale = s;
            const auto src = params.span(spec.name);
            entries_.push_back({std::move(i), std::vector<T>(src.begin(), src.end())});
        }
    }

    UserId user_;
    double weight_;
    UploadOptions opt_;
    std::vector<Entry> entries_;
};

/// What the server sends back: aggregated shared LoRA factors (sorted by name, one packed buffer).
/// Aggregation rules make these; a public constructor exists for other transports (e.g. the result
/// of an MPI all-reduce of upload buffers, see with_layout_of), since what comes INTO a device is not
/// private. A device applies it with Downloader / download().
template <class T>
class SharedAggregate : public SharedTensors<T> {
public:
    SharedAggregate() = default;
    /// `tensors` sorted by name, `values` packed in that order (offsets are recomputed).
    SharedAggregate(std::vector<SharedTensorInfo> tensors, std::span<const T> values)
        : SharedTensors<T>(std::move(tensors), values) {}
    /// The tensors of `like` (e.g. this device's own upload) with new values, e.g. the weighted sum of
    /// every device's buffer divided by the total weight after an all-reduce.
    static SharedAggregate with_layout_of(const SharedTensors<T>& like, std::span<const T> values) {
        return SharedAggregate(like.tensors(), values);
    }

private:
    const char* kind_() const override { return "aggregate"; }
};

/// Options of a download.
struct DownloadOptions {
    /// Every shared tensor of the device must be in the aggregate (the B-only pairs of an FFA-LoRA
    /// aggregate excepted: the device keeps its frozen A). When false, absent ones are kept and listed.
    bool require_all = true;
};

/// One tensor a download overwrote.
struct DownloadedTensor {
    std::string prefix;        ///< the layer's prefix
    std::string tensor;        ///< the name inside the layer's buffer (what optimiser selectors match)
    Index aggregate_rank = 0;  ///< rank of the aggregated tensor
    Index rank = 0;            ///< the device's rank (first `rank` components taken)
    double factor = 1.0;       ///< sqrt(aggregate scale / device scale) applied to the values
};

/// What a download did.
struct DownloadReport {
    UserId user = 0;
    std::vector<DownloadedTensor> written;
    std::vector<std::string> kept;  ///< full names of shared tensors not in the aggregate (left as they were)

    /// Selector of the overwritten tensors by their names inside their layer, for
    /// `optimizer.reset_state(report.selector())` when the caller wants fresh moments for them
    /// (keeping them, the CoMiGS reference behaviour, needs nothing). Names repeat across layers of the
    /// same kind, so this also matches a same-named tensor of a layer whose copy was kept.
    TensorSelector selector() const {
        std::vector<std::string> names;
        for (const auto& w : written)
            if (std::find(names.begin(), names.end(), w.tensor) == names.end()) names.push_back(w.tensor);
        return TensorSelector::names(std::move(names));
    }
};

/// Applies an aggregate to a device's layers, writing only into their shared tensors (generalist
/// experts, shared adapters); specialists and routers are never touched. For each shared tensor of the
/// device with rank r and scale s and its aggregated counterpart (rank R, scale S):
///   A_dev = c * A_agg[0:r, :],   B_dev = c * B_agg[:, 0:r],   c = sqrt(S / s)
/// so that s B_dev A_dev = S B_agg[:, 0:r] A_agg[0:r, :] (c = 1 exactly, a plain copy, when S == s).
/// r must equal R unless the aggregate's rank policy is `truncate` (then r <= R); every other
/// dimension must match. Everything is checked when layers are added and nothing is written before
/// apply(), so a mismatch anywhere leaves every layer untouched. The optimiser's moments are not
/// touched: reset them with DownloadReport::selector() if wanted. The aggregate must outlive this.
template <class T>
class Downloader {
public:
    Downloader(const SharedAggregate<T>& aggregate, UserId user, DownloadOptions options = {})
        : agg_(&aggregate), user_(user), opt_(options) {
        if (const auto* bad = aggregate.first_non_finite())
            detail::raise<NumericError>("user ", user, " tensor '", bad->name,
                                        "': the aggregate holds a NaN or Inf; nothing downloaded");
    }

    Downloader& add(std::string_view prefix, MixtureOfLoraMlp<T>& layer) {
        const auto& c = layer.config();
        plan(prefix, layer.params(), [&layer](std::string_view n) { return layer.shared(n); }, c.rank,
             lora_scale(c.alpha, c.rank, c.scaling));
        return *this;
    }
    Downloader& add(std::string_view prefix, MixtureOfLoraLinear<T>& layer) {
        const auto& c = layer.config();
        plan(prefix, layer.params(), [&layer](std::string_view n) { return layer.shared(n); }, c.rank,
             lora_scale(c.alpha, c.rank, c.scaling));
        return *this;
    }
    Downloader& add_shared_adapter(std::string_view prefix, LoraExpert<T>& adapter) {
        plan(prefix, adapter.params(), [](std::string_view) { return true; }, adapter.config().rank,
             adapter.config().scale());
        return *this;
    }
    Downloader& add(const AdapterRegistry<T>& registry) {
        for (const auto& m : registry.mixtures) add(m.prefix, *non_null(m.layer, m.prefix));
        for (const auto& m : registry.mixture_linears) add(m.prefix, *non_null(m.layer, m.prefix));
        for (const auto& a : registry.shared_adapters) add_shared_adapter(a.prefix, *non_null(a.layer, a.prefix));
        return *this;
    }

    /// Writes every planned tensor; the downloader is spent afterwards.
    DownloadReport apply() {
        for (const auto& w : writes_) {
            const SharedTensorInfo& src = *w.src;
            const ConstMatrixView<T> from = agg_->view(src);
            const bool copy = w.factor == 1.0;
            const Index rows = src.factor == LoraFactor::A ? w.rank : src.rows;
            const Index cols = src.factor == LoraFactor::A ? src.cols : w.rank;
            for (Index i = 0; i < rows; ++i) {
                const T* f = from.row_ptr(i);
                T* t = w.dst.row_ptr(i);
                if (copy)
                    std::copy(f, f + cols, t);
                else
                    for (Index j = 0; j < cols; ++j) t[j] = static_cast<T>(static_cast<double>(f[j]) * w.factor);
            }
        }
        report_.user = user_;
        writes_.clear();
        return std::move(report_);
    }

private:
    struct Write {
        MatrixView<T> dst;
        const SharedTensorInfo* src;
        Index rank;
        double factor;
    };

    template <class L>
    static L* non_null(L* p, const std::string& prefix) {
        require(p != nullptr, "adapter registry entry '", prefix, "': null layer");
        return p;
    }

    template <class Shared>
    void plan(std::string_view prefix, ParamBuffer<T>& params, Shared shared, Index rank, double scale) {
        require(std::isfinite(scale) && scale > 0, "user ", user_, " layer '", prefix, "': LoRA scale ", scale,
                " must be finite and > 0");
        for (const auto& spec : params.layout().tensors()) {
            if (!shared(spec.name)) continue;
            const std::string name = std::string(prefix) + spec.name;
            for (const auto& w : writes_)
                require(w.src->name != name, "user ", user_, " tensor '", name, "': layer added twice");
            std::string pair;
            LoraFactor factor{};
            require(split_lora_name(name, pair, factor), "user ", user_, " tensor '", name,
                    "': shared tensors must be LoRA factors (.lora_A / .lora_B)");
            const SharedTensorInfo* src = agg_->find(name);
            if (src == nullptr) {
                const bool frozen_a = factor == LoraFactor::A && agg_->contains(pair + ".lora_B");
                require(!opt_.require_all || frozen_a, "user ", user_, " tensor '", name,
                        "': not in the aggregate (pass require_all = false to keep the device's copy)");
                report_.kept.push_back(name);
                continue;
            }
            const Index rows = spec.rows(), cols = spec.cols();
            const Index dev_features = factor == LoraFactor::A ? cols : rows;
            const Index dev_rank = factor == LoraFactor::A ? rows : cols;
            require<ShapeError>(dev_rank == rank, "user ", user_, " tensor '", name, "': shape [", rows, ", ", cols,
                                "] does not carry the layer's rank ", rank);
            require<ShapeError>(dev_features == src->features(), "user ", user_, " tensor '", name, "': shape [",
                                rows, ", ", cols, "] on the device, the aggregate has [", src->rows, ", ", src->cols,
                                "]");
            if (src->rank_policy == RankPolicy::exact)
                require<ShapeError>(rank == src->rank, "user ", user_, " tensor '", name, "': device rank ", rank,
                                    ", aggregate rank ", src->rank, " (this aggregate is not truncatable)");
            else
                require<ShapeError>(rank <= src->rank, "user ", user_, " tensor '", name, "': device rank ", rank,
                                    " exceeds the aggregate's rank ", src->rank);
            const double f = src->scale == scale ? 1.0 : std::sqrt(src->scale / scale);
            // Rescaling keeps s B A only when both factors are rescaled: a B-only (FFA-LoRA) pair leaves
            // the device's A as it is, so its scale must already agree.
            require(f == 1.0 || factor == LoraFactor::A || agg_->contains(pair + ".lora_A"), "user ", user_,
                    " tensor '", name, "': the aggregate has no lora_A for this pair, so its scale ", src->scale,
                    " must equal the device's ", scale);
            writes_.push_back({params.view(spec.name), src, rank, f});
            report_.written.push_back({std::string(prefix), spec.name, src->rank, rank, f});
        }
    }

    const SharedAggregate<T>* agg_;
    UserId user_;
    DownloadOptions opt_;
    std::vector<Write> writes_;
    DownloadReport report_;
};

/// Applies `aggregate` to every layer of a host's adapter registry (see Downloader).
template <class T>
DownloadReport download(const SharedAggregate<T>& aggregate, UserId user, const AdapterRegistry<T>& registry,
                        DownloadOptions options = {}) {
    Downloader<T> d(aggregate, user, options);
    d.add(registry);
    return d.apply();
}

}  // namespace comigs
