#pragma once
// Local training of one user's adapters: the alternating bi-level trainer of CoMiGS (Algorithm 1), the
// joint trainer (pFedMoE) and router-free training (mean-routing baselines), over any HostModel.
//
// Two optimisers are built from the host's AdapterRegistry. The expert optimiser owns every adapter
// tensor except the routers (`router.weight`); the router optimiser owns only the routers. Experts
// step on training batches; after every `router_every`-th expert step (a global counter that runs on
// across rounds, as in the reference) the router takes `router_iters` steps on validation batches
// (RouterPhase::before moves each phase to just before that count's next expert step: with
// router_every = local steps per round, to the start of every round, right after the download).
//
// Gradient isolation. The reference zeroes each optimiser's own gradients only, so the router's
// validation gradients leak into the next expert step (the expert tensors received gradients from the
// validation backward too) and the experts' training gradients into router steps. Here every step
// starts by zeroing ALL adapter gradients (every buffer of the registry, padding included), so a step
// only ever sees gradients of the batches drawn for that step.
//
// Batches come from two callables `Batch(Rng&)` (training and validation) that draw from generators the
// trainer owns (streams 0 and 1 of its seed): the batch sequence is part of the trainer's state and a
// checkpoint restores it. A batch source must be a pure function of the generator it is handed (any
// randomness the host needs for a step, e.g. dropout, should be drawn into the batch from that
// generator); then a resumed run equals an uninterrupted one bit for bit at a fixed thread count.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "error.hpp"
#include "model.hpp"
#include "optim.hpp"
#include "params.hpp"
#include "random.hpp"

namespace comigs {

/// How the routers (`router.weight` tensors) are trained.
enum class RouterTraining {
    alternating,  ///< CoMiGS: separate optimiser, `router_iters` steps on validation batches every `router_every` expert steps
    joint,        ///< pFedMoE: one optimiser updates experts and routers together on training batches
    none,         ///< routers stay as they are (mean-routing baselines have none)
};

inline const char* to_string(RouterTraining r) {
    switch (r) {
        case RouterTraining::alternating: return "alternating";
        case RouterTraining::joint: return "joint";
        case RouterTraining::none: return "none";
    }
    return "?";
}

/// When a router phase runs relative to the expert step that reaches a multiple of `router_every`.
enum class RouterPhase {
    after,   ///< after it (the reference): the router sees the experts as local training left them
    before,  ///< before the expert step whose 0-based index is a multiple of router_every: with
             ///< router_every = local steps per round, at the start of every round, right after the
             ///< download, so the router learns to weigh the averaged generalist users deploy
};

inline const char* to_string(RouterPhase p) { return p == RouterPhase::after ? "after" : "before"; }

/// True for tensors a router owns (`router.weight`, or anything under `router.`).
inline bool is_router_tensor(std::string_view tensor) {
    return tensor == "router.weight" || tensor.starts_with("router.");
}

/// Settings of a Trainer. Defaults are the CoMiGS reference's (GPT-2 runs): AdamW betas (0.9, 0.95),
/// weight decay 0.01, expert lr 2e-3 cosine to 2e-4 over all expert steps, router lr 2e-3 constant,
/// router every 30 expert steps for 10 iterations, load-balancing weight 0.01.
struct TrainerConfig {
    RouterTraining router_training = RouterTraining::alternating;
    Index router_every = 30;  ///< expert steps between router phases (global count, across rounds)
    Index router_iters = 10;  ///< router steps per phase
    RouterPhase router_phase = RouterPhase::after;

    /// Weight of the balancing loss in the objective the trainer reports and checks for finiteness
    /// (LossParts::total). The host applies its own weight in backward: configure both the same.
    double lb_weight = 0.01;

    double expert_lr = 2e-3;
    double expert_lr_min = 2e-4;
    /// Cosine horizon of the expert schedule, in expert steps (rounds x local steps); 0 keeps the
    /// expert learning rate constant at `expert_lr`.
    Index total_expert_steps = 0;
    Index expert_warmup = 0;
    /// Specialists' learning rates (peak and final) are the experts' times this: specialists learn from
    /// one user's data only, generalists from everyone's. 1: one schedule for every expert tensor.
    double specialist_lr_scale = 1.0;
    double router_lr = 2e-3;  ///< constant
    AdamWOptions expert_adamw{0.9, 0.95, 1e-8, 0.01};
    AdamWOptions router_adamw{0.9, 0.95, 1e-8, 0.01};

    /// Global-norm gradient clipping per optimiser (its own tensors only); <= 0 turns it off.
    double clip_norm = 0.0;
    /// Batches whose gradients are averaged into one step (the reference's gradient accumulation).
    Index micro_batches = 1;
    OptimizerConfig optimizer{};

    /// Tensors no optimiser updates, given (registry prefix, tensor name within the layer), e.g.
    /// FFA-LoRA's lora_A. Empty: nothing frozen.
    std::function<bool(std::string_view prefix, std::string_view tensor)> frozen;

    LrSchedule expert_schedule() const {
        if (total_expert_steps <= 0) return LrSchedule::constant(expert_lr);
        return LrSchedule::cosine(expert_lr, expert_lr_min, total_expert_steps, expert_warmup);
    }
    LrSchedule router_schedule() const { return LrSchedule::constant(router_lr); }
    LrSchedule specialist_schedule() const {
        const double s = specialist_lr_scale;
        if (total_expert_steps <= 0) return LrSchedule::constant(expert_lr * s);
        return LrSchedule::cosine(expert_lr * s, expert_lr_min * s, total_expert_steps, expert_warmup);
    }

    void validate() const {
        require(router_every >= 1, "router_every ", router_every, ": must be >= 1");
        require(router_iters >= 0, "router_iters ", router_iters, ": must be >= 0");
        require(std::isfinite(lb_weight) && lb_weight >= 0, "lb_weight ", lb_weight, ": must be finite and >= 0");
        require(total_expert_steps >= 0, "total_expert_steps ", total_expert_steps, ": must be >= 0");
        require(micro_batches >= 1, "micro_batches ", micro_batches, ": must be >= 1");
        require(std::isfinite(clip_norm), "clip_norm ", clip_norm, ": must be finite (<= 0 turns clipping off)");
        require(std::isfinite(specialist_lr_scale) && specialist_lr_scale > 0, "specialist_lr_scale ",
                specialist_lr_scale, ": must be finite and > 0");
        (void)expert_schedule();  // validates the learning rates
        (void)router_schedule();
    }
};

/// A named tensor with its own storage (trainer state, adapter snapshots, checkpoints).
template <class T>
struct NamedTensor {
    std::string name;
    std::vector<Index> shape;
    std::vector<T> data;
    bool operator==(const NamedTensor&) const = default;
};

/// Everything a Trainer needs to continue exactly where it stopped, apart from the adapter
/// parameters themselves: both optimisers' moments ("expert_optimizer.<tensor>.exp_avg", ...) and
/// counters ("expert_optimizer.iteration", ..., "trainer.expert_steps", "trainer.router_steps") and
/// both batch generators.
template <class T>
struct TrainerState {
    std::vector<NamedTensor<T>> tensors;
    std::vector<StateScalar> scalars;
    Rng::State train_rng{};
    Rng::State validation_rng{};
};

/// What one optimiser step did.
struct StepReport {
    enum class Kind { expert, router, joint };
    Kind kind = Kind::expert;
    StepStatus status = StepStatus::stepped;
    LossParts loss;     ///< mean over the step's micro-batches (tokens: their sum)
    double lr = 0.0;    ///< learning rate of the step (first group of the optimiser that stepped)
    Index index = 0;    ///< 0-based count of steps of this kind before this one
};

/// Summary of `Trainer::train_steps`.
struct LocalTrainingReport {
    Index expert_steps = 0;
    Index router_steps = 0;
    Index skipped = 0;          ///< steps (of either optimiser) skipped for non-finite loss or gradients
    double mean_loss = 0.0;     ///< token-weighted mean objective of the expert steps' batches
    double tokens = 0.0;        ///< training tokens processed by expert steps
    double seconds = 0.0;       ///< wall time (for throughput reports only)
    double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0.0; }
};

namespace detail {
inline std::string registry_label(const std::string& prefix) {
    if (!prefix.empty() && prefix.back() == '.') return prefix.substr(0, prefix.size() - 1);
    return prefix;
}

template <class T>
std::vector<StateTensor<const T>> as_state_views(const std::vector<NamedTensor<T>>& v, std::string_view prefix) {
    std::vector<StateTensor<const T>> out;
    for (const auto& t : v)
        if (t.name.starts_with(prefix))
            out.push_back({t.name.substr(prefix.size()), t.shape, std::span<const T>(t.data.data(), t.data.size())});
    return out;
}

inline std::vector<StateScalar> scalars_with_prefix(const std::vector<StateScalar>& v, std::string_view prefix) {
    std::vector<StateScalar> out;
    for (const auto& s : v)
        if (s.name.starts_with(prefix)) out.push_back({s.name.substr(prefix.size()), s.value});
    return out;
}
}  // namespace detail

/// Copies of the parameters of every adapter buffer, named "<prefix><tensor>" (e.g.
/// "h.0.mlp.experts.1.fc.lora_A"), in registry and layout order; `keep(prefix, tensor)` filters.
template <class T>
std::vector<NamedTensor<T>> adapter_parameters(
    const AdapterRegistry<T>& registry,
    const std::function<bool(std::string_view prefix, std::string_view tensor)>& keep = {}) {
    std::vector<NamedTensor<T>> out;
    registry.for_each_buffer([&](const std::string& prefix, ParamBuffer<T>& p, ParamBuffer<T>&) {
        for (const auto& spec : p.layout().tensors()) {
            if (keep && !keep(prefix, spec.name)) continue;
            const auto s = p.span(spec.name);
            out.push_back({prefix + spec.name, spec.shape, std::vector<T>(s.begin(), s.end())});
        }
    });
    return out;
}

/// Writes `tensors` (named as adapter_parameters names them) into the registry's parameter buffers.
/// Every given tensor must exist with the same shape; with `require_all`, every adapter tensor must be
/// given (filtered by `keep` as in adapter_parameters). All names and shapes are checked before
/// anything is written.
template <class T>
void load_adapter_parameters(const AdapterRegistry<T>& registry, std::span<const NamedTensor<T>> tensors,
                             bool require_all = true,
                             const std::function<bool(std::string_view prefix, std::string_view tensor)>& keep = {}) {
    struct Target {
        std::span<T> dst;
        const NamedTensor<T>* src;
    };
    std::vector<Target> targets;
    std::vector<char> used(tensors.size(), 0);
    registry.for_each_buffer([&](const std::string& prefix, ParamBuffer<T>& p, ParamBuffer<T>&) {
        for (const auto& spec : p.layout().tensors()) {
            if (keep && !keep(prefix, spec.name)) continue;
            const std::string full = prefix + spec.name;
            std::size_t k = 0;
            while (k < tensors.size() && tensors[k].name != full) ++k;
            if (k == tensors.size()) {
                require<ShapeError>(!require_all, "adapter tensor '", full, "': missing from the given parameters");
                continue;
            }
            require<ShapeError>(!used[k], "adapter tensor '", full, "': given twice");
            used[k] = 1;
            const auto& src = tensors[k];
            require<ShapeError>(src.shape == spec.shape && static_cast<Index>(src.data.size()) == spec.size,
                                "adapter tensor '", full, "': ", src.data.size(),
                                " values of the given shape do not match the layer's shape (", spec.size,
                                " elements)");
            targets.push_back({p.span(spec.name), &src});
        }
    });
    for (std::size_t k = 0; k < tensors.size(); ++k)
        require<ShapeError>(used[k], "tensor '", tensors[k].name, "': not an adapter tensor of this model",
                            keep ? " (or not selected)" : "");
    for (const auto& t : targets) std::copy(t.src->data.begin(), t.src->data.end(), t.dst.begin());
}

/// Local trainer of one user's adapters over a HostModel (see the file comment for the schedule and the
/// gradient isolation). Keeps a reference to the model and pointers to its adapter buffers: both must
/// outlive the trainer and stay in place. Not copyable (two copies would step the same tensors).
template <class Model, class Batch>
    requires HostModel<Model, Batch>
class Trainer {
public:
    using T = typename Model::scalar_type;
    using BatchSource = std::function<Batch(Rng&)>;
    using StepCallback = std::function<void(const StepReport&)>;

    /// `train` draws a training batch, `validation` a validation batch (needed with alternating router
    /// training when the model has routers). `seed` seeds the two batch generators.
    Trainer(Model& model, TrainerConfig config, BatchSource train, BatchSource validation = {},
            std::uint64_t seed = 0)
        : model_(&model),
          config_(std::move(config)),
          registry_(model.adapters()),
          train_(std::move(train)),
          validation_(std::move(validation)),
          train_rng_(seed, 0),
          validation_rng_(seed, 1),
          expert_opt_(expert_groups(), config_.optimizer) {
        config_.validate();
        require(static_cast<bool>(train_), "train: a training batch source is required");
        if (config_.router_training == RouterTraining::alternating && has_router_tensors()) {
            router_opt_.emplace(router_groups(), config_.optimizer);
            require(config_.router_iters == 0 || static_cast<bool>(validation_),
                    "validation: alternating router training needs a validation batch source");
        }
    }

    Trainer(const Trainer&) = delete;
    Trainer& operator=(const Trainer&) = delete;

    /// One expert step (joint step in joint mode) on training batches, then the router phase when the
    /// global expert-step count reaches a multiple of `router_every`. Returns the expert step's report;
    /// router steps are reported through the step callback.
    StepReport expert_step() {
        const bool joint = config_.router_training == RouterTraining::joint;
        StepReport rep;
        rep.kind = joint ? StepReport::Kind::joint : StepReport::Kind::expert;
        rep.index = expert_steps_;
        rep.lr = expert_opt_.lr(std::size_t{0});
        if (router_phase_due(RouterPhase::before))
            for (Index i = 0; i < config_.router_iters; ++i) router_step();
        rep.loss = accumulate(train_, train_rng_);
        if (config_.clip_norm > 0) expert_opt_.clip_grad_norm(config_.clip_norm);
        rep.status = expert_opt_.step(rep.loss.total(config_.lb_weight));
        ++expert_steps_;
        emit(rep);
        if (router_phase_due(RouterPhase::after))
            for (Index i = 0; i < config_.router_iters; ++i) router_step();
        return rep;
    }

    /// One router step on validation batches (alternating mode with routers only).
    StepReport router_step() {
        require(router_opt_.has_value(), "router_step: this trainer has no router optimiser (router training ",
                to_string(config_.router_training), ", model routers: ", has_router_tensors() ? "yes" : "no", ")");
        StepReport rep;
        rep.kind = StepReport::Kind::router;
        rep.index = router_steps_;
        rep.lr = router_opt_->lr(std::size_t{0});
        rep.loss = accumulate(validation_, validation_rng_);
        if (config_.clip_norm > 0) router_opt_->clip_grad_norm(config_.clip_norm);
        rep.status = router_opt_->step(rep.loss.total(config_.lb_weight));
        ++router_steps_;
        emit(rep);
        return rep;
    }

    /// `steps` expert steps with their router phases (one round's local training).
    LocalTrainingReport train_steps(Index steps) {
        require(steps >= 0, "steps ", steps, ": must be >= 0");
        LocalTrainingReport out;
        const Index router_before = router_steps_, skipped_before = skipped();
        double weighted = 0.0;
        const auto t0 = std::chrono::steady_clock::now();
        for (Index s = 0; s < steps; ++s) {
            const StepReport r = expert_step();
            const double w = r.loss.tokens > 0 ? r.loss.tokens : 1.0;
            weighted += w * r.loss.total(config_.lb_weight);
            out.tokens += r.loss.tokens;
            ++out.expert_steps;
        }
        out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double wsum = out.tokens > 0 ? out.tokens : static_cast<double>(out.expert_steps);
        out.mean_loss = out.expert_steps > 0 ? weighted / wsum : 0.0;
        out.router_steps = router_steps_ - router_before;
        out.skipped = skipped() - skipped_before;
        return out;
    }

    /// Called after every step (expert, joint and router) with its report; for progress output.
    void on_step(StepCallback cb) { on_step_ = std::move(cb); }

    Index expert_steps() const { return expert_steps_; }  ///< expert (or joint) steps so far, skipped included
    Index router_steps() const { return router_steps_; }  ///< router steps so far, skipped included
    Index expert_skipped() const { return expert_opt_.skipped(); }
    Index router_skipped() const { return router_opt_ ? router_opt_->skipped() : 0; }
    Index skipped() const { return expert_skipped() + router_skipped(); }

    AdamW<T>& expert_optimizer() { return expert_opt_; }
    const AdamW<T>& expert_optimizer() const { return expert_opt_; }
    /// The router optimiser, or nullptr (joint/none mode, or a model without routers).
    AdamW<T>* router_optimizer() { return router_opt_ ? &*router_opt_ : nullptr; }
    const AdamW<T>* router_optimizer() const { return router_opt_ ? &*router_opt_ : nullptr; }
    const TrainerConfig& config() const { return config_; }
    const AdapterRegistry<T>& adapters() const { return registry_; }
    Model& model() { return *model_; }

    /// Zeroes the moments and step counts of the optimiser entries of tensors for which
    /// `which(prefix, tensor)` holds (e.g. the shared tensors after a download, when configured);
    /// returns how many tensors were reset. Learning-rate counters are kept.
    Index reset_moments(const std::function<bool(std::string_view prefix, std::string_view tensor)>& which) {
        Index n = 0;
        // Optimiser entries are named "<label>.<tensor>"; map each registry tensor to that name.
        std::vector<std::string> names;
        registry_.for_each_buffer([&](const std::string& prefix, ParamBuffer<T>& p, ParamBuffer<T>&) {
            const std::string label = detail::registry_label(prefix);
            for (const auto& spec : p.layout().tensors())
                if (which(prefix, spec.name)) names.push_back(label.empty() ? spec.name : label + "." + spec.name);
        });
        n += reset_entries(expert_opt_, names);
        if (router_opt_) n += reset_entries(*router_opt_, names);
        return n;
    }

    /// The trainer's complete state (optimisers, counters, batch generators); see TrainerState.
    TrainerState<T> state() const {
        TrainerState<T> s;
        append_state(s, expert_opt_, "expert_optimizer.");
        if (router_opt_) append_state(s, *router_opt_, "router_optimizer.");
        s.scalars.push_back({"trainer.expert_steps", expert_steps_});
        s.scalars.push_back({"trainer.router_steps", router_steps_});
        s.train_rng = train_rng_.state();
        s.validation_rng = validation_rng_.state();
        return s;
    }

    /// Restores a state taken from a trainer with the same configuration over the same model. Every
    /// name must match (the optimisers check names, shapes and values); nothing changes unless all of
    /// it is valid.
    void load_state(const TrainerState<T>& s) {
        std::int64_t expert_steps = -1, router_steps = -1;
        for (const auto& sc : s.scalars) {
            if (sc.name == "trainer.expert_steps") expert_steps = sc.value;
            if (sc.name == "trainer.router_steps") router_steps = sc.value;
        }
        require<ShapeError>(expert_steps >= 0 && router_steps >= 0,
                            "trainer state: missing or negative 'trainer.expert_steps' / 'trainer.router_steps'");
        for (const auto& t : s.tensors)
            require<ShapeError>(t.name.starts_with("expert_optimizer.") ||
                                    (router_opt_ && t.name.starts_with("router_optimizer.")),
                                "trainer state tensor '", t.name, "': not a state of this trainer");
        for (const auto& sc : s.scalars)
            require<ShapeError>(sc.name.starts_with("expert_optimizer.") ||
                                    (router_opt_ && sc.name.starts_with("router_optimizer.")) ||
                                    sc.name == "trainer.expert_steps" || sc.name == "trainer.router_steps",
                                "trainer state scalar '", sc.name, "': not a state of this trainer");
        // The expert optimiser commits on success; keep its previous state to undo that if the router's
        // state turns out invalid.
        const TrainerState<T> previous = state();
        load_optimizer(expert_opt_, s, "expert_optimizer.");
        if (router_opt_) {
            try {
                load_optimizer(*router_opt_, s, "router_optimizer.");
            } catch (...) {
                load_optimizer(expert_opt_, previous, "expert_optimizer.");
                throw;
            }
        }
        expert_steps_ = expert_steps;
        router_steps_ = router_steps;
        train_rng_.set_state(s.train_rng);
        validation_rng_.set_state(s.validation_rng);
    }

private:
    /// A router phase at this point: the phase is configured here and the expert-step count (steps
    /// taken so far) is a multiple of router_every.
    bool router_phase_due(RouterPhase where) const {
        return router_opt_ && config_.router_iters > 0 && config_.router_phase == where &&
               expert_steps_ % config_.router_every == 0;
    }
    bool has_router_tensors() const {
        bool any = false;
        registry_.for_each_buffer([&](const std::string& prefix, ParamBuffer<T>& p, ParamBuffer<T>&) {
            for (const auto& spec : p.layout().tensors())
                if (is_router_tensor(spec.name) && !is_frozen(prefix, spec.name)) any = true;
        });
        return any;
    }
    bool is_frozen(std::string_view prefix, std::string_view tensor) const {
        return config_.frozen && config_.frozen(prefix, tensor);
    }
    /// A tensor of a specialist expert of a mixture layer (plain shared adapters are not).
    bool is_specialist(std::string_view prefix, std::string_view tensor) const {
        const Index e = expert_of_tensor(tensor);
        if (e < 0) return false;
        for (const auto& m : registry_.mixtures)
            if (m.prefix == prefix) return m.layer->role(e) == Role::specialist;
        for (const auto& m : registry_.mixture_linears)
            if (m.prefix == prefix) return m.layer->role(e) == Role::specialist;
        return false;
    }

    /// Which tensors of one buffer a selector picks; empty when it picks none (no binding then).
    template <class Pred>
    std::vector<std::string> select(const ParamBuffer<T>& p, Pred&& pred) const {
        std::vector<std::string> names;
        for (const auto& spec : p.layout().tensors())
            if (pred(spec.name)) names.push_back(spec.name);
        return names;
    }

    std::vector<AdamWGroup<T>> expert_groups() {
        config_.validate();
        const bool joint = config_.router_training == RouterTraining::joint;
        AdamWGroup<T> experts{"experts", {}, config_.expert_schedule(), config_.expert_adamw};
        // With a specialist learning-rate scale, specialist tensors form a group of their own (same
        // options, scaled schedule); without it the groups are exactly as before.
        const bool split = config_.specialist_lr_scale != 1.0;
        AdamWGroup<T> specialists{"specialists", {}, config_.specialist_schedule(), config_.expert_adamw};
        // Joint mode: one optimiser and one schedule for everything, as the reference's single
        // optimiser; the router tensors form their own group only to keep their AdamW options.
        AdamWGroup<T> routers{"router", {}, config_.expert_schedule(), config_.router_adamw};
        registry_.for_each_buffer([&](const std::string& prefix, ParamBuffer<T>& p, ParamBuffer<T>& g) {
            const auto label = detail::registry_label(prefix);
            auto trainable = [&](std::string_view t) { return !is_router_tensor(t) && !is_frozen(prefix, t); };
            auto e = select(p, [&](std::string_view t) { return trainable(t) && !(split && is_specialist(prefix, t)); });
            if (!e.empty()) experts.bindings.push_back(bind(label, p, g, TensorSelector::names(std::move(e))));
            if (split) {
                auto sp = select(p, [&](std::string_view t) { return trainable(t) && is_specialist(prefix, t); });
                if (!sp.empty()) specialists.bindings.push_back(bind(label, p, g, TensorSelector::names(std::move(sp))));
            }
            if (joint) {
                auto r = select(p, [&](std::string_view t) { return is_router_tensor(t) && !is_frozen(prefix, t); });
                if (!r.empty()) routers.bindings.push_back(bind(label, p, g, TensorSelector::names(std::move(r))));
            }
        });
        require(!experts.bindings.empty() || !specialists.bindings.empty(),
                "trainer: the model has no trainable expert tensor");
        std::vector<AdamWGroup<T>> groups;
        if (!experts.bindings.empty()) groups.push_back(std::move(experts));
        if (!specialists.bindings.empty()) groups.push_back(std::move(specialists));
        if (!routers.bindings.empty()) groups.push_back(std::move(routers));
        return groups;
    }

    std::vector<AdamWGroup<T>> router_groups() {
        AdamWGroup<T> routers{"router", {}, config_.router_schedule(), config_.router_adamw};
        registry_.for_each_buffer([&](const std::string& prefix, ParamBuffer<T>& p, ParamBuffer<T>& g) {
            auto r = select(p, [&](std::string_view t) { return is_router_tensor(t) && !is_frozen(prefix, t); });
            if (!r.empty())
                routers.bindings.push_back(bind(detail::registry_label(prefix), p, g, TensorSelector::names(std::move(r))));
        });
        return {std::move(routers)};
    }

    /// Zeroes every adapter gradient, then runs forward_backward on `micro_batches` batches drawn from
    /// `rng`; the gradients (and the loss) are averaged over the micro-batches.
    LossParts accumulate(const BatchSource& source, Rng& rng) {
        registry_.zero_grad();
        LossParts sum;
        for (Index m = 0; m < config_.micro_batches; ++m) {
            const Batch batch = source(rng);
            const LossParts lp = model_->forward_backward(batch);
            sum.task += lp.task;
            sum.balance += lp.balance;
            sum.tokens += lp.tokens;
        }
        if (config_.micro_batches > 1) {
            const double inv = 1.0 / static_cast<double>(config_.micro_batches);
            sum.task *= inv;
            sum.balance *= inv;
            const T scale = static_cast<T>(inv);
            registry_.for_each_buffer([&](const std::string&, ParamBuffer<T>&, ParamBuffer<T>& g) {
                for (T& v : g.all()) v *= scale;
            });
        }
        return sum;
    }

    void emit(const StepReport& r) {
        if (on_step_) on_step_(r);
    }

    static void append_state(TrainerState<T>& s, const AdamW<T>& opt, const std::string& prefix) {
        for (const auto& t : opt.state_tensors())
            s.tensors.push_back({prefix + t.name, t.shape, std::vector<T>(t.data.begin(), t.data.end())});
        for (const auto& sc : opt.state_scalars()) s.scalars.push_back({prefix + sc.name, sc.value});
    }
    static void load_optimizer(AdamW<T>& opt, const TrainerState<T>& s, std::string_view prefix) {
        const auto tensors = detail::as_state_views(s.tensors, prefix);
        const auto scalars = detail::scalars_with_prefix(s.scalars, prefix);
        opt.load_state(tensors, scalars);
    }
    static Index reset_entries(AdamW<T>& opt, const std::vector<std::string>& names) {
        // Reset through the named state so that a tensor name repeated in several buffers is reset only
        // where it was selected (reset_state selects by the name within a buffer).
        auto tensors = opt.state_tensors();
        auto scalars = opt.state_scalars();
        std::vector<std::vector<T>> zeros;
        zeros.reserve(tensors.size());
        Index n = 0;
        auto selected = [&](std::string_view entry) {
            return std::find(names.begin(), names.end(), entry) != names.end();
        };
        for (auto& sc : scalars) {
            if (!sc.name.ends_with(".step")) continue;
            const std::string entry = sc.name.substr(0, sc.name.size() - 5);
            if (selected(entry)) {
                sc.value = 0;
                ++n;
            }
        }
        if (n == 0) return 0;
        for (auto& t : tensors) {
            const auto dot = t.name.rfind('.');
            if (dot != std::string::npos && selected(std::string_view(t.name).substr(0, dot))) {
                zeros.emplace_back(t.data.size(), T(0));
                t.data = std::span<const T>(zeros.back().data(), zeros.back().size());
            }
        }
        opt.load_state(tensors, scalars);
        return n;
    }

    Model* model_;
    TrainerConfig config_;
    AdapterRegistry<T> registry_;
    BatchSource train_, validation_;
    Rng train_rng_, validation_rng_;
    AdamW<T> expert_opt_;
    std::optional<AdamW<T>> router_opt_;
    Index expert_steps_ = 0, router_steps_ = 0;
    StepCallback on_step_;
};

}  // namespace comigs
