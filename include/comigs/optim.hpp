#pragma once
// Optimisers (AdamW, SGD) over named parameter groups, learning-rate schedules, gradient clipping and
// non-finite-gradient guarding.
//
// An optimiser owns a fixed set of tensors chosen when it is built: for each bound buffer pair
// (parameters, gradients) a selector picks tensors by name. Every operation (step, zero_grad,
// clipping, norms) loops over that set only, so a second optimiser over other tensors of the same
// buffers (CoMiGS: experts vs router) can never read or write the first one's gradients. The
// reference implementation zeroes each optimiser's own gradients only, so router gradients computed on
// validation data leak into expert steps and vice versa; comigs callers zero both before each
// backward, and an optimiser cannot apply a gradient it does not own.
//
// Update rules follow torch.optim.AdamW and torch.optim.SGD (PyTorch 1.13, single-tensor path) step
// for step; tools/golden_optim.py regenerates the parity values the tests check.
//
// Determinism: all loops run over a fixed list of chunks (at most `chunk_elements` elements of one
// tensor each) that does not depend on the thread count; elementwise updates are therefore identical
// with any number of threads, and the gradient norm sums per-chunk partials (in double) in list order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numbers>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/aligned.hpp"
#include "error.hpp"
#include "kernels/simd.hpp"
#include "params.hpp"

namespace comigs {

// ------------------------------------------------------------------------------------------------
// Learning-rate schedules

/// Learning rate as a function of the 0-based step index t (t counts every call to `step()` of the
/// optimiser, skipped ones included, so the schedule follows the data and not the fault history).
///
/// - constant(lr): lr for every t.
/// - cosine(lr_max, lr_min, total, warmup):
///     t <  warmup:          lr_max * (t + 1) / warmup            (linear ramp, never 0)
///     warmup <= t < total:  lr_min + (lr_max - lr_min) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2
///     t >= total:           lr_min                               (PyTorch's CosineAnnealingLR would rise again)
///   With warmup 0 this is torch's CosineAnnealingLR(T_max = total, eta_min = lr_min) in closed form,
///   the CoMiGS reference's expert schedule (2e-3 to 2e-4 over rounds x local steps).
class LrSchedule {
public:
    static LrSchedule constant(double lr) {
        require(std::isfinite(lr) && lr >= 0, "lr ", lr, ": learning rate must be finite and >= 0");
        LrSchedule s;
        s.lr_max_ = s.lr_min_ = lr;
        return s;
    }

    static LrSchedule cosine(double lr_max, double lr_min, index total_steps, index warmup_steps = 0) {
        require(std::isfinite(lr_max) && lr_max >= 0, "lr_max ", lr_max, ": must be finite and >= 0");
        require(std::isfinite(lr_min) && lr_min >= 0 && lr_min <= lr_max, "lr_min ", lr_min,
                ": must be finite, >= 0 and <= lr_max ", lr_max);
        require(total_steps >= 1, "total_steps ", total_steps, ": cosine schedule needs >= 1 step");
        require(warmup_steps >= 0 && warmup_steps < total_steps, "warmup_steps ", warmup_steps,
                ": must be >= 0 and < total_steps ", total_steps);
        LrSchedule s;
        s.cosine_ = true;
        s.lr_max_ = lr_max;
        s.lr_min_ = lr_min;
        s.total_ = total_steps;
        s.warmup_ = warmup_steps;
        return s;
    }

    /// Learning rate at step t >= 0.
    double at(index t) const {
        require(t >= 0, "step ", t, ": schedule step must be >= 0");
        if (!cosine_) return lr_max_;
        if (t < warmup_) return lr_max_ * static_cast<double>(t + 1) / static_cast<double>(warmup_);
        if (t >= total_) return lr_min_;
        const double progress = static_cast<double>(t - warmup_) / static_cast<double>(total_ - warmup_);
        return lr_min_ + (lr_max_ - lr_min_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
    }
    double operator()(index t) const { return at(t); }

    bool is_constant() const { return !cosine_; }
    double lr_max() const { return lr_max_; }
    double lr_min() const { return lr_min_; }
    index total_steps() const { return total_; }
    index warmup_steps() const { return warmup_; }

private:
    LrSchedule() = default;
    bool cosine_ = false;
    double lr_max_ = 0, lr_min_ = 0;
    index total_ = 0, warmup_ = 0;
};

// ------------------------------------------------------------------------------------------------
// Which tensors an optimiser owns

/// Picks tensors of a buffer by name: all, an explicit list, a name prefix or a predicate.
class TensorSelector {
public:
    static TensorSelector all() {
        return TensorSelector([](std::string_view) { return true; }, "all tensors", {});
    }
    /// Exactly these tensors; each must exist in every buffer the selector is bound to.
    static TensorSelector names(std::vector<std::string> names) {
        std::vector<std::string> copy = names;
        std::string desc = "names {";
        for (std::size_t i = 0; i < names.size(); ++i) desc += (i ? ", '" : "'") + names[i] + "'";
        desc += "}";
        return TensorSelector(
            [n = std::move(copy)](std::string_view s) {
                for (const auto& x : n)
                    if (x == s) return true;
                return false;
            },
            std::move(desc), std::move(names));
    }
    /// Tensors whose name starts with `prefix` (e.g. "experts." or "router.").
    static TensorSelector prefix(std::string prefix) {
        std::string desc = "prefix '" + prefix + "'";
        return TensorSelector([p = std::move(prefix)](std::string_view s) { return s.starts_with(p); },
                              std::move(desc), {});
    }
    /// Tensors for which `pred(name)` is true; `description` appears in error messages.
    static TensorSelector where(std::function<bool(std::string_view)> pred, std::string description = "predicate") {
        require(static_cast<bool>(pred), "TensorSelector::where: empty predicate");
        return TensorSelector(std::move(pred), std::move(description), {});
    }

    bool matches(std::string_view name) const { return pred_(name); }
    const std::string& description() const { return description_; }
    /// Names that must exist (non-empty only for `names(...)`).
    const std::vector<std::string>& required_names() const { return required_; }

private:
    TensorSelector(std::function<bool(std::string_view)> pred, std::string desc, std::vector<std::string> req)
        : pred_(std::move(pred)), description_(std::move(desc)), required_(std::move(req)) {}
    std::function<bool(std::string_view)> pred_;
    std::string description_;
    std::vector<std::string> required_;
};

/// A (parameters, gradients, selection) triple. `label` names the buffer in state names and errors
/// ("layer3" gives "layer3.experts.0.A1.exp_avg"); it may be empty when tensor names are unique.
/// The optimiser keeps the two buffer addresses: both buffers must stay at their address (not be
/// moved, e.g. by a growing std::vector) and keep their layout while the optimiser is used; a changed
/// layout is detected and reported, a moved buffer is not.
template <class T>
struct ParamBinding {
    std::string label;
    ParamBuffer<T>* params = nullptr;
    ParamBuffer<T>* grads = nullptr;
    TensorSelector select = TensorSelector::all();
};

/// Convenience constructor for a binding.
template <class T>
ParamBinding<T> bind(std::string label, ParamBuffer<T>& params, ParamBuffer<T>& grads,
                     TensorSelector select = TensorSelector::all()) {
    return ParamBinding<T>{std::move(label), &params, &grads, std::move(select)};
}

// ------------------------------------------------------------------------------------------------
// Hyperparameters, groups, configuration, state records

/// torch.optim.AdamW semantics; defaults are PyTorch's. CoMiGS uses betas (0.9, 0.95), weight decay 0.01.
struct AdamWOptions {
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.01;  ///< decoupled: p *= 1 - lr * weight_decay before the Adam update
};

/// torch.optim.SGD semantics; weight decay is coupled (added to the gradient).
struct SgdOptions {
    double momentum = 0.0;
    double dampening = 0.0;
    double weight_decay = 0.0;
    bool nesterov = false;  ///< needs momentum > 0 and dampening 0
};

/// A named set of bindings sharing a learning-rate schedule and hyperparameters.
template <class T, class Options>
struct ParamGroup {
    std::string name;  ///< used in errors and `lr(name)`; unique within an optimiser when not empty
    std::vector<ParamBinding<T>> bindings;
    LrSchedule lr = LrSchedule::constant(1e-3);
    Options options{};
};

template <class T>
using AdamWGroup = ParamGroup<T, AdamWOptions>;
template <class T>
using SgdGroup = ParamGroup<T, SgdOptions>;

/// Settings of an optimiser that are not hyperparameters of the update.
struct OptimizerConfig {
    /// `step()` throws NumericError when more than this many consecutive steps were skipped.
    index max_consecutive_skips = 10;
    /// Work unit of every loop: results depend on it (the norm's summation order), not on threads.
    index chunk_elements = 8192;
    /// Loops run on OpenMP threads only when the optimiser owns at least this many elements.
    index min_parallel_elements = 65536;
};

enum class StepStatus { stepped, skipped };

/// One named state tensor of an optimiser ("<label>.<tensor>.exp_avg"); T is const for reading.
template <class T>
struct StateTensor {
    std::string name;
    std::vector<index> shape;
    std::span<T> data;
};

/// One named integer of an optimiser's state ("iteration", "<label>.<tensor>.step", ...).
struct StateScalar {
    std::string name;
    std::int64_t value = 0;
};

// ------------------------------------------------------------------------------------------------
// Update rules (elementwise kernels; plain loops the compiler vectorises, the work is memory-bound)

namespace detail {

struct AdamWRule {
    using Options = AdamWOptions;
    static constexpr const char* name = "AdamW";

    static void validate(const Options& o, const std::string& group) {
        require(std::isfinite(o.beta1) && o.beta1 >= 0 && o.beta1 < 1, "group '", group, "' beta1 ", o.beta1,
                ": must be in [0, 1)");
        require(std::isfinite(o.beta2) && o.beta2 >= 0 && o.beta2 < 1, "group '", group, "' beta2 ", o.beta2,
                ": must be in [0, 1)");
        require(std::isfinite(o.eps) && o.eps > 0, "group '", group, "' eps ", o.eps, ": must be finite and > 0");
        require(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "group '", group, "' weight_decay ",
                o.weight_decay, ": must be finite and >= 0");
    }
    static index slots(const Options&) { return 2; }
    static const char* slot_name(index s) { return s == 0 ? "exp_avg" : "exp_avg_sq"; }

    template <class T>
    struct Scalars {
        T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
    };

    /// `step` is the tensor's step count including this one (>= 1). Scalars are formed in double as
    /// PyTorch does in Python, then rounded to T.
    template <class T>
    static Scalars<T> scalars(const Options& o, double lr, std::int64_t step) {
        const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(step));
        const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(step));
        return {T(1.0 - lr * o.weight_decay), T(o.beta1), T(1.0 - o.beta1), T(o.beta2), T(1.0 - o.beta2),
                T(std::sqrt(bc2)),            T(o.eps),   T(-(lr / bc1))};
    }

    // p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g;
    // p += -(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)        (eps enters after the bias correction)
    //
    // Plain reference form; also what `update` computes, lane by lane.
    template <class T>
    static void update_reference(T* p, const T* g, T* m, T* v, index n, const Scalars<T>& s) {
        for (index i = 0; i < n; ++i) {
            const T gi = g[i];
            const T pi = p[i] * s.decay;
            const T mi = m[i] * s.beta1 + s.one_minus_beta1 * gi;
            const T vi = v[i] * s.beta2 + s.one_minus_beta2 * gi * gi;
            const T denom = std::sqrt(vi) / s.bias_correction2_sqrt + s.eps;
            m[i] = mi;
            v[i] = vi;
            p[i] = pi + s.neg_step_size * (mi / denom);
        }
    }

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
// GCC 12's AVX-512 sqrt intrinsics read an "undefined" register and warn about it (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
    // Explicit SIMD: with the default -fmath-errno the compiler will not vectorise std::sqrt. The tail
    // goes through the same vector code on a zero-padded copy, so every element of a chunk sees the
    // same instruction sequence.
    template <class T>
    static void update(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v, index n,
                       const Scalars<T>& s, bool /*first*/) {
        namespace simd = kernels::simd;
        using B = simd::batch<T>;
        constexpr index W = static_cast<index>(simd::width<T>);
        const B decay(s.decay), b1(s.beta1), omb1(s.one_minus_beta1), b2(s.beta2), omb2(s.one_minus_beta2),
            bc2(s.bias_correction2_sqrt), eps(s.eps), step(s.neg_step_size);
        const auto lanes = [&](T* pp, const T* gp, T* mp, T* vp) {
            const B gi = simd::load(gp);
            const B pi = simd::load(pp) * decay;
            const B mi = simd::load(mp) * b1 + omb1 * gi;
            const B vi = simd::load(vp) * b2 + omb2 * gi * gi;
            const B denom = simd::sqrt(vi) / bc2 + eps;
            simd::store(mp, mi);
            simd::store(vp, vi);
            simd::store(pp, pi + step * (mi / denom));
        };
        index i = 0;
        for (; i + W <= n; i += W) lanes(p + i, g + i, m + i, v + i);
        if (i < n) {
            T pt[W] = {}, gt[W] = {}, mt[W] = {}, vt[W] = {};
            const index r = n - i;
            std::copy(p + i, p + n, pt);
            std::copy(g + i, g + n, gt);
            std::copy(m + i, m + n, mt);
            std::copy(v + i, v + n, vt);
            lanes(pt, gt, mt, vt);
            std::copy(pt, pt + r, p + i);
            std::copy(mt, mt + r, m + i);
            std::copy(vt, vt + r, v + i);
        }
    }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
};

struct SgdRule {
    using Options = SgdOptions;
    static constexpr const char* name = "SGD";

    static void validate(const Options& o, const std::string& group) {
        require(std::isfinite(o.momentum) && o.momentum >= 0, "group '", group, "' momentum ", o.momentum,
                ": must be finite and >= 0");
        require(std::isfinite(o.dampening) && o.dampening >= 0 && o.dampening <= 1, "group '", group,
                "' dampening ", o.dampening, ": must be in [0, 1]");
        require(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "group '", group, "' weight_decay ",
                o.weight_decay, ": must be finite and >= 0");
        require(!o.nesterov || (o.momentum > 0 && o.dampening == 0), "group '", group,
                "' nesterov: needs momentum > 0 and dampening 0 (momentum ", o.momentum, ", dampening ",
                o.dampening, ")");
    }
    static index slots(const Options& o) { return o.momentum != 0 ? 1 : 0; }
    static const char* slot_name(index) { return "momentum_buffer"; }

    template <class T>
    struct Scalars {
        T weight_decay, momentum, one_minus_dampening, neg_lr;
        bool has_weight_decay, has_momentum, nesterov;
    };

    template <class T>
    static Scalars<T> scalars(const Options& o, double lr, std::int64_t /*step*/) {
        return {T(o.weight_decay), T(o.momentum), T(1.0 - o.dampening), T(-lr),
                o.weight_decay != 0, o.momentum != 0, o.nesterov};
    }

    // d = g + wd p;  buf = first ? d : momentum buf + (1 - dampening) d;
    // d = nesterov ? d + momentum buf : buf;  p += -lr d
    template <class T>
    static void update(T* __restrict p, const T* __restrict g, T* __restrict buf, T* /*unused*/, index n,
                       const Scalars<T>& s, bool first) {
        if (!s.has_momentum) {
            if (s.has_weight_decay)
                for (index i = 0; i < n; ++i) p[i] = p[i] + s.neg_lr * (g[i] + s.weight_decay * p[i]);
            else
                for (index i = 0; i < n; ++i) p[i] = p[i] + s.neg_lr * g[i];
            return;
        }
        const T wd = s.has_weight_decay ? s.weight_decay : T(0);
        // The branches differ only in loop-invariant flags; spelling them out keeps each loop simple
        // enough to vectorise. Without weight decay d is g itself (no `+ 0 * p`, as in PyTorch).
        if (s.has_weight_decay) {
            if (first) {
                for (index i = 0; i < n; ++i) {
                    const T d = g[i] + wd * p[i];
                    buf[i] = d;
                    p[i] = p[i] + s.neg_lr * (s.nesterov ? d + s.momentum * d : d);
                }
            } else {
                for (index i = 0; i < n; ++i) {
                    const T d = g[i] + wd * p[i];
                    const T b = buf[i] * s.momentum + s.one_minus_dampening * d;
                    buf[i] = b;
                    p[i] = p[i] + s.neg_lr * (s.nesterov ? d + s.momentum * b : b);
                }
            }
        } else {
            if (first) {
                for (index i = 0; i < n; ++i) {
                    const T d = g[i];
                    buf[i] = d;
                    p[i] = p[i] + s.neg_lr * (s.nesterov ? d + s.momentum * d : d);
                }
            } else {
                for (index i = 0; i < n; ++i) {
                    const T d = g[i];
                    const T b = buf[i] * s.momentum + s.one_minus_dampening * d;
                    buf[i] = b;
                    p[i] = p[i] + s.neg_lr * (s.nesterov ? d + s.momentum * b : b);
                }
            }
        }
    }
};

/// Sum of squares in double with a fixed association (8 lanes, then a fixed tree, then the tail).
template <class T>
double sum_of_squares(const T* x, index n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const index body = n - n % 8;
    for (index i = 0; i < body; i += 8)
        for (int j = 0; j < 8; ++j) {
            const double v = static_cast<double>(x[i + j]);
            acc[j] += v * v;
        }
    double tail = 0;
    for (index i = body; i < n; ++i) {
        const double v = static_cast<double>(x[i]);
        tail += v * v;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

/// True when every element is finite: x - x is 0 for finite x and NaN for NaN and +-Inf. An integer
/// AND reduction, unlike a floating-point sum or std::isfinite, vectorises without -ffast-math.
template <class T>
bool all_finite(const T* x, index n) {
    unsigned ok = 1;
    for (index i = 0; i < n; ++i) ok &= static_cast<unsigned>(x[i] - x[i] == T(0));
    return ok != 0;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// The optimiser

/// An optimiser over the tensors selected by its groups, with update rule `Rule` (detail::AdamWRule or
/// detail::SgdRule; use the aliases AdamW<T> and Sgd<T>). Lives across federated rounds: its moments
/// and counters persist until reset or restored.
///
/// Per step: check every owned gradient is finite (else skip, count, maybe throw); evaluate each
/// group's schedule at `iteration()`; update every owned tensor. Each tensor keeps its own step count
/// (as PyTorch keeps state["step"] per parameter), so resetting some tensors restarts their bias
/// correction only.
template <class T, class Rule>
class Optimizer {
    static_assert(std::is_floating_point_v<T>, "Optimizer<T>: T must be float or double");

public:
    using Options = typename Rule::Options;
    using Group = ParamGroup<T, Options>;

    explicit Optimizer(std::vector<Group> groups, OptimizerConfig config = {}) : config_(config) {
        require(config.max_consecutive_skips >= 0, "max_consecutive_skips ", config.max_consecutive_skips,
                ": must be >= 0");
        require(config.chunk_elements >= 1, "chunk_elements ", config.chunk_elements, ": must be >= 1");
        require(config.min_parallel_elements >= 0, "min_parallel_elements ", config.min_parallel_elements,
                ": must be >= 0");
        require(!groups.empty(), Rule::name, ": needs at least one parameter group");
        build(std::move(groups));
    }

    Optimizer(const Optimizer&) = delete;  // two copies would step the same parameters twice
    Optimizer& operator=(const Optimizer&) = delete;
    Optimizer(Optimizer&&) noexcept = default;
    Optimizer& operator=(Optimizer&&) noexcept = default;

    /// One optimisation step with the gradients now in the owned gradient tensors. When any of them is
    /// NaN or Inf the step is skipped: parameters and state untouched, `skipped()` and
    /// `consecutive_skipped()` incremented. Once consecutive skips exceed
    /// `config().max_consecutive_skips` it throws NumericError instead of returning (the counters are
    /// already updated and the parameters still untouched, so the caller may restore a checkpoint).
    StepStatus step() {
        check_bindings();
        std::string bad;
        if (!find_nonfinite_gradient(bad)) return skip("non-finite gradient in '" + bad + "'");
        const std::size_t ne = entries_.size();
        scalars_.resize(ne);
        for (std::size_t e = 0; e < ne; ++e) {
            const Entry& en = entries_[e];
            const Group& gr = groups_[en.group];
            scalars_[e] = Rule::template scalars<T>(gr.options, gr.lr.at(iteration_), en.step + 1);
        }
        for_each_chunk([&](const Chunk& c) {
            const Entry& en = entries_[c.entry];
            const Bound& b = bound_[en.bound];
            T* p = b.params->data() + en.offset + c.begin;
            const T* g = b.grads->data() + en.offset + c.begin;
            T* s0 = en.slots > 0 ? state_.data() + en.state_offset + c.begin : nullptr;
            T* s1 = en.slots > 1 ? state_.data() + en.state_offset + en.slot_stride + c.begin : nullptr;
            Rule::update(p, g, s0, s1, c.end - c.begin, scalars_[c.entry], en.step == 0);
        });
        for (auto& en : entries_) ++en.step;
        ++iteration_;
        ++steps_taken_;
        consecutive_skipped_ = 0;
        return StepStatus::stepped;
    }

    /// As `step()`, and also skips (counted the same way) when `loss` is not finite.
    StepStatus step(double loss) {
        if (!std::isfinite(loss)) {
            check_bindings();
            return skip(detail::concat("non-finite loss ", loss));
        }
        return step();
    }

    /// Zeroes exactly the owned gradient tensors (never another optimiser's, never padding).
    void zero_grad() {
        check_bindings();
        for_each_chunk([&](const Chunk& c) {
            const Entry& en = entries_[c.entry];
            T* g = bound_[en.bound].grads->data() + en.offset + c.begin;
            std::fill(g, g + (c.end - c.begin), T(0));
        });
    }

    /// True when every owned gradient is finite.
    bool grads_finite() const {
        check_bindings();
        std::string bad;
        return find_nonfinite_gradient(bad);
    }

    /// Euclidean norm of all owned gradients, accumulated in double in a fixed order (NaN/Inf when a
    /// gradient is not finite).
    double grad_norm() const {
        check_bindings();
        std::vector<double> partial(chunks_.size(), 0.0);
        for_each_chunk_index([&](std::size_t i) {
            const Chunk& c = chunks_[i];
            const Entry& en = entries_[c.entry];
            partial[i] = detail::sum_of_squares(bound_[en.bound].grads->data() + en.offset + c.begin,
                                                c.end - c.begin);
        });
        double total = 0;
        for (double x : partial) total += x;
        return std::sqrt(total);
    }

    /// Clips the owned gradients to global norm `max_norm` and returns the norm before clipping.
    /// Gradients are scaled by max_norm / (norm + 1e-6) (torch.nn.utils.clip_grad_norm_'s factor) only
    /// when norm > max_norm; a non-finite norm leaves them untouched (the next step() skips).
    double clip_grad_norm(double max_norm) {
        require(std::isfinite(max_norm) && max_norm > 0, "max_norm ", max_norm, ": must be finite and > 0");
        const double norm = grad_norm();
        if (std::isfinite(norm) && norm > max_norm) {
            const T coef = static_cast<T>(max_norm / (norm + 1e-6));
            for_each_chunk([&](const Chunk& c) {
                const Entry& en = entries_[c.entry];
                T* g = bound_[en.bound].grads->data() + en.offset + c.begin;
                for (index i = 0, n = c.end - c.begin; i < n; ++i) g[i] *= coef;
            });
        }
        return norm;
    }

    /// Learning rate the next step uses in group `group` (index or name).
    double lr(std::size_t group = 0) const {
        require(group < groups_.size(), "group ", group, ": out of range (", groups_.size(), " groups)");
        return groups_[group].lr.at(iteration_);
    }
    double lr(std::string_view group) const { return lr(group_index(group)); }

    /// Replaces a group's schedule (e.g. a new total when a run is extended); counters are kept.
    void set_schedule(std::size_t group, LrSchedule schedule) {
        require(group < groups_.size(), "group ", group, ": out of range (", groups_.size(), " groups)");
        groups_[group].lr = std::move(schedule);
    }

    index iteration() const { return iteration_; }                      ///< calls to step(): taken + skipped
    index steps_taken() const { return steps_taken_; }                  ///< steps that updated parameters
    index skipped() const { return skipped_; }                          ///< steps skipped in total
    index consecutive_skipped() const { return consecutive_skipped_; }  ///< skips since the last good step
    const std::string& last_skip_reason() const { return last_skip_reason_; }

    std::size_t num_groups() const { return groups_.size(); }
    const std::string& group_name(std::size_t group) const { return groups_.at(group).name; }
    const Options& options(std::size_t group) const { return groups_.at(group).options; }
    const OptimizerConfig& config() const { return config_; }

    /// "<label>.<tensor>" of every owned tensor, in update order.
    std::vector<std::string> tensor_names() const {
        std::vector<std::string> out;
        out.reserve(entries_.size());
        for (const auto& en : entries_) out.push_back(en.name);
        return out;
    }
    /// Whether tensor `tensor` of the buffer `params` is owned by this optimiser.
    bool owns(const ParamBuffer<T>& params, std::string_view tensor) const {
        for (const auto& en : entries_)
            if (bound_[en.bound].params == &params && en.tensor == tensor) return true;
        return false;
    }
    /// Number of owned parameter elements.
    index num_elements() const { return total_elements_; }

    /// Every state tensor: for AdamW "<name>.exp_avg" and "<name>.exp_avg_sq", for SGD with momentum
    /// "<name>.momentum_buffer" (<name> as in tensor_names()), with the parameter's shape.
    std::vector<StateTensor<const T>> state_tensors() const {
        std::vector<StateTensor<const T>> out;
        for (const auto& en : entries_)
            for (index s = 0; s < en.slots; ++s)
                out.push_back({en.name + "." + Rule::slot_name(s), en.shape,
                               std::span<const T>(state_.data() + en.state_offset + s * en.slot_stride,
                                                  static_cast<std::size_t>(en.size))});
        return out;
    }

    /// Every state integer: "iteration", "steps_taken", "skipped", "consecutive_skipped" and
    /// "<name>.step" per owned tensor (0 means its moments are fresh).
    std::vector<StateScalar> state_scalars() const {
        std::vector<StateScalar> out{{"iteration", iteration_},
                                     {"steps_taken", steps_taken_},
                                     {"skipped", skipped_},
                                     {"consecutive_skipped", consecutive_skipped_}};
        for (const auto& en : entries_) out.push_back({en.name + ".step", en.step});
        return out;
    }

    /// Restores state saved from `state_tensors()` / `state_scalars()` of an optimiser over the same
    /// tensors and groups. Every name must be given exactly once, with the same shape; values are
    /// checked (finite moments, non-negative second moments, consistent counters). Nothing changes
    /// unless everything is valid.
    void load_state(std::span<const StateTensor<const T>> tensors, std::span<const StateScalar> scalars) {
        const auto expected_tensors = state_tensors();
        const auto expected_scalars = state_scalars();
        require<ShapeError>(tensors.size() == expected_tensors.size(), Rule::name, " load_state: ", tensors.size(),
                            " state tensors given, expected ", expected_tensors.size());
        require<ShapeError>(scalars.size() == expected_scalars.size(), Rule::name, " load_state: ", scalars.size(),
                            " state scalars given, expected ", expected_scalars.size());
        std::vector<const StateTensor<const T>*> tensor_for(expected_tensors.size(), nullptr);
        for (const auto& t : tensors) {
            std::size_t k = 0;
            while (k < expected_tensors.size() && expected_tensors[k].name != t.name) ++k;
            require<ShapeError>(k < expected_tensors.size(), "state tensor '", t.name, "': not a state of this ",
                                Rule::name, " optimiser");
            require<ShapeError>(tensor_for[k] == nullptr, "state tensor '", t.name, "': given twice");
            const auto& want = expected_tensors[k];
            require<ShapeError>(t.shape == want.shape && t.data.size() == want.data.size(), "state tensor '", t.name,
                                "': shape ", shape_string(t.shape), " with ", t.data.size(),
                                " elements, expected ", shape_string(want.shape));
            const bool second_moment = t.name.ends_with(".exp_avg_sq");
            for (const T x : t.data)
                require<NumericError>(std::isfinite(x) && (!second_moment || x >= 0), "state tensor '", t.name,
                                      "': value ", x, second_moment ? " (must be finite and >= 0)" : " (not finite)");
            tensor_for[k] = &t;
        }
        std::vector<std::int64_t> value(expected_scalars.size(), -1);
        for (const auto& s : scalars) {
            std::size_t k = 0;
            while (k < expected_scalars.size() && expected_scalars[k].name != s.name) ++k;
            require<ShapeError>(k < expected_scalars.size(), "state scalar '", s.name, "': not a state of this ",
                                Rule::name, " optimiser");
            require<ShapeError>(value[k] < 0, "state scalar '", s.name, "': given twice");
            require(s.value >= 0, "state scalar '", s.name, "': value ", s.value, " must be >= 0");
            value[k] = s.value;
        }
        const std::int64_t it = value[0], taken = value[1], skipped = value[2], consecutive = value[3];
        require(it == taken + skipped, "state scalar 'iteration' ", it, ": must equal steps_taken ", taken,
                " + skipped ", skipped);
        require(consecutive <= skipped, "state scalar 'consecutive_skipped' ", consecutive, ": exceeds skipped ",
                skipped);
        for (std::size_t e = 0; e < entries_.size(); ++e)
            require(value[4 + e] <= taken, "state scalar '", expected_scalars[4 + e].name, "' ", value[4 + e],
                    ": exceeds steps_taken ", taken);

        // All checked: commit.
        std::size_t k = 0;
        for (const auto& en : entries_)
            for (index s = 0; s < en.slots; ++s, ++k) {
                const auto src = tensor_for[k]->data;
                std::copy(src.begin(), src.end(), state_.begin() + en.state_offset + s * en.slot_stride);
            }
        iteration_ = it;
        steps_taken_ = taken;
        skipped_ = skipped;
        consecutive_skipped_ = consecutive;
        for (std::size_t e = 0; e < entries_.size(); ++e) entries_[e].step = value[4 + e];
    }

    /// Zeroes the moments and the step count of every owned tensor whose name (within its buffer, e.g.
    /// "experts.0.A1") `which` matches, in every bound buffer; returns how many tensors were reset.
    /// When the server overwrites a generalist, the CoMiGS reference keeps its moments (PyTorch state is
    /// untouched by copying into a parameter); comigs keeps them too unless the caller resets them here.
    index reset_state(const TensorSelector& which) {
        index count = 0;
        for (auto& en : entries_) {
            if (!which.matches(en.tensor)) continue;
            std::fill(state_.begin() + en.state_offset, state_.begin() + en.state_offset + en.slots * en.slot_stride,
                      T(0));
            en.step = 0;
            ++count;
        }
        return count;
    }

private:
    struct Bound {
        std::string label;
        ParamBuffer<T>* params;
        ParamBuffer<T>* grads;
        std::shared_ptr<const ParamLayout> layout;  // as bound; checked before every use
    };
    struct Entry {
        std::size_t bound;
        std::size_t group;
        std::string tensor;  // name within the buffer
        std::string name;    // "<label>.<tensor>"
        std::vector<index> shape;
        index offset;        // in the buffer
        index size;
        index slots;
        index slot_stride;   // size rounded up to 16 elements so every state tensor starts 64-byte aligned
        index state_offset;  // in state_
        std::int64_t step = 0;
    };
    struct Chunk {
        std::size_t entry;
        index begin, end;  // element range within the tensor
    };

    void build(std::vector<Group> groups) {
        groups_ = std::move(groups);
        for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
            Group& g = groups_[gi];
            if (g.name.empty()) g.name = "group" + std::to_string(gi);
            for (std::size_t gj = 0; gj < gi; ++gj)
                require(groups_[gj].name != g.name, Rule::name, " group name '", g.name, "': used twice");
            Rule::validate(g.options, g.name);
            require(!g.bindings.empty(), "group '", g.name, "': has no bindings");
            for (const auto& b : g.bindings) add_binding(gi, b);
            g.bindings.clear();  // the resolved entries are the truth from here on
        }

        index state_total = 0;
        for (std::size_t e = 0; e < entries_.size(); ++e) {
            Entry& en = entries_[e];
            en.slot_stride = (en.size + 15) / 16 * 16;
            en.state_offset = state_total;
            state_total += en.slots * en.slot_stride;
            total_elements_ += en.size;
            for (index b = 0; b < en.size; b += config_.chunk_elements)
                chunks_.push_back({e, b, std::min(en.size, b + config_.chunk_elements)});
        }
        state_.assign(static_cast<std::size_t>(state_total), T(0));
    }

    void add_binding(std::size_t gi, const ParamBinding<T>& b) {
        const Group& g = groups_[gi];
        const std::string where = "group '" + g.name + "' binding '" + b.label + "'";
        require(b.params != nullptr && b.grads != nullptr, where, ": null parameter or gradient buffer");
        require(b.params != b.grads, where, ": parameters and gradients are the same buffer");
        require<ShapeError>(b.params->layout() == b.grads->layout(), where,
                            ": gradient buffer layout differs from the parameter buffer's");
        for (const auto& o : bound_)
            require(o.params != b.grads && o.grads != b.params, where,
                    ": a buffer is bound as parameters in one binding and as gradients in another (binding '",
                    o.label, "')");
        const ParamLayout& layout = b.params->layout();
        for (const auto& n : b.select.required_names())
            require(layout.find(n) != nullptr, where, ": tensor '", n, "' is not in the buffer");

        const std::size_t bi = bound_.size();
        bound_.push_back({b.label, b.params, b.grads, b.params->layout_ptr()});
        index selected = 0;
        for (const TensorSpec& spec : layout.tensors()) {
            if (!b.select.matches(spec.name)) continue;
            ++selected;
            for (const auto& en : entries_) {
                const Bound& ob = bound_[en.bound];
                require((ob.params != b.params && ob.grads != b.grads) || en.tensor != spec.name, where,
                        ": tensor '", spec.name, "' is already owned by group '", groups_[en.group].name,
                        "' (binding '", ob.label, "')");
            }
            Entry en{};
            en.bound = bi;
            en.group = gi;
            en.tensor = spec.name;
            en.name = b.label.empty() ? spec.name : b.label + "." + spec.name;
            for (const auto& other : entries_)
                require(other.name != en.name, where, ": state name '", en.name,
                        "' is not unique; give the bindings distinct labels");
            en.shape = spec.shape;
            en.offset = spec.offset;
            en.size = spec.size;
            en.slots = Rule::slots(g.options);
            entries_.push_back(std::move(en));
        }
        require(selected > 0, where, ": selector ", b.select.description(), " matches no tensor");
    }

    std::size_t group_index(std::string_view name) const {
        for (std::size_t i = 0; i < groups_.size(); ++i)
            if (groups_[i].name == name) return i;
        detail::raise<InvalidArgument>("group '", name, "': no such group in this ", Rule::name, " optimiser");
    }

    void check_bindings() const {
        for (const auto& b : bound_) {
            const bool same = (b.params->layout_ptr() == b.layout || b.params->layout() == *b.layout) &&
                              (b.grads->layout_ptr() == b.layout || b.grads->layout() == *b.layout);
            require<ShapeError>(same, Rule::name, " binding '", b.label,
                                "': parameter or gradient buffer layout changed since the optimiser was built");
        }
    }

    bool find_nonfinite_gradient(std::string& bad) const {
        std::vector<unsigned char> ok(chunks_.size(), 1);
        for_each_chunk_index([&](std::size_t i) {
            const Chunk& c = chunks_[i];
            const Entry& en = entries_[c.entry];
            ok[i] = detail::all_finite(bound_[en.bound].grads->data() + en.offset + c.begin, c.end - c.begin);
        });
        for (std::size_t i = 0; i < ok.size(); ++i)
            if (!ok[i]) {
                bad = entries_[chunks_[i].entry].name;
                return false;
            }
        return true;
    }

    StepStatus skip(std::string reason) {
        ++iteration_;
        ++skipped_;
        ++consecutive_skipped_;
        last_skip_reason_ = std::move(reason);
        require<NumericError>(consecutive_skipped_ <= config_.max_consecutive_skips, describe(), ": ", consecutive_skipped_,
                              " consecutive steps skipped, more than max_consecutive_skips ",
                              config_.max_consecutive_skips, "; last: ", last_skip_reason_);
        return StepStatus::skipped;
    }

    std::string describe() const {
        std::string out = std::string(Rule::name) + " {";
        for (std::size_t i = 0; i < groups_.size(); ++i) out += (i ? ", " : "") + groups_[i].name;
        return out + "}";
    }

    template <class F>
    void for_each_chunk_index(F&& f) const {
        const auto n = static_cast<std::ptrdiff_t>(chunks_.size());
        [[maybe_unused]] const bool parallel = total_elements_ >= config_.min_parallel_elements && n > 1;
#pragma omp parallel for schedule(static) if (parallel)
        for (std::ptrdiff_t i = 0; i < n; ++i) f(static_cast<std::size_t>(i));
    }
    template <class F>
    void for_each_chunk(F&& f) const {
        for_each_chunk_index([&](std::size_t i) { f(chunks_[i]); });
    }

    static std::string shape_string(const std::vector<index>& s) {
        std::string out = "[";
        for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
        return out + "]";
    }

    OptimizerConfig config_;
    std::vector<Group> groups_;
    std::vector<Bound> bound_;
    std::vector<Entry> entries_;
    std::vector<Chunk> chunks_;
    detail::aligned_vector<T> state_;
    std::vector<typename Rule::template Scalars<T>> scalars_;
    index total_elements_ = 0;
    std::int64_t iteration_ = 0, steps_taken_ = 0, skipped_ = 0, consecutive_skipped_ = 0;
    std::string last_skip_reason_;
};

/// torch.optim.AdamW over named parameter groups.
template <class T>
using AdamW = Optimizer<T, detail::AdamWRule>;

/// torch.optim.SGD (momentum, dampening, Nesterov, coupled weight decay) over named parameter groups.
template <class T>
using Sgd = Optimizer<T, detail::SgdRule>;

}  // namespace comigs
