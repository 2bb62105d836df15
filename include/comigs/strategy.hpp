#pragma once
// Collaboration strategies as data, and an in-process round runner that simulates N users.
//
// A Strategy says what each user's mixture looks like (roles of its experts, top-k or mean routing),
// how its router is trained (alternating on validation data, jointly on training data, not at all),
// whether plain shared LoRA adapters (e.g. on attention) travel with the generalists, and how the
// server combines what users send (an aggregate.hpp rule with its settings, personalised averaging as
// in PCL, or nothing). The methods the CoMiGS paper compares are presets in comigs::strategies; there
// is no code path per method.
//
// What may travel is decided by the layers themselves: a mixture uploads exactly its generalist
// experts (MixtureOfLoraMlp::shared), a plain shared adapter all of its tensors. Routers and
// specialists never leave a device, in every strategy: "whole-model averaging" (FedAvg, PCL) therefore
// means mixtures whose experts are all generalists, with mean routing (no router), plus the shared
// adapters. (The reference's whole-model FedAvg of MoEs that also averages routers is not offered.)
//
// RoundRunner runs the rounds in one process. Each user has its own host model (sharing the frozen
// base), its own Trainer and data. Per round, every present user: downloads its current aggregate
// (overwriting its shared tensors; optimiser moments are kept unless configured otherwise), runs its
// local steps, uploads; then the server aggregates over the present users (weights renormalised over
// them). After the last round every user downloads its final aggregate. Users are independent until
// aggregation and aggregation sorts by user id, so the result does not depend on the order in which
// users are processed (RunnerConfig::shuffle_seed processes them in a random order to show it).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "aggregate.hpp"
#include "error.hpp"
#include "mixture.hpp"
#include "model.hpp"
#include "random.hpp"
#include "train.hpp"
#include "upload.hpp"

namespace comigs {

/// No collaboration: nothing is uploaded, nothing downloaded (Local, CoMiGS-2S).
struct NoCollaboration {};

/// Personalised collaborative learning (PCL): every user averages the shared tensors of all present
/// users with its own weights w_ij = softmax_j(-ppl_i(j) / temperature), where ppl_i(j) is the
/// validation perplexity on user i's validation data of user i's model with user j's shared tensors.
/// With mean-routing mixtures whose experts are all generalists, that is the whole adapter model.
struct PersonalisedAveraging {
    double temperature = 1.0;  ///< > 0; large: uniform weights (FedAvg), small: each user picks the best model
};

/// How the server combines uploads: nothing, one aggregate for everyone (an aggregate.hpp rule and its
/// settings), or one personalised average per user.
using CollaborationRule = std::variant<NoCollaboration, AggregationConfig, PersonalisedAveraging>;

/// A collaboration method as data; see the presets in comigs::strategies for the paper's methods.
struct Strategy {
    std::string name;
    /// Role of each expert of every mixture layer (their count is the number of experts). Generalists
    /// are uploaded and averaged; specialists stay on the device.
    std::vector<Role> roles{Role::generalist, Role::specialist};
    Index top_k = 2;                  ///< experts per token with top-k routing (clamped to the expert count)
    Routing routing = Routing::top_k; ///< top_k (learned router) or mean (no router)
    RouterTraining router_training = RouterTraining::alternating;
    /// Plain shared LoRA adapters of the registry (attention LoRA) travel with the generalists.
    bool share_adapters = true;
    CollaborationRule collaboration = AggregationConfig::fedavg();
    /// FFA-LoRA: the shared lora_A tensors are never trained (and not uploaded: only B travels).
    bool freeze_shared_lora_A = false;

    Index n_experts() const { return static_cast<Index>(roles.size()); }
    Index generalists() const {
        return static_cast<Index>(std::count(roles.begin(), roles.end(), Role::generalist));
    }
    bool collaborates() const { return !std::holds_alternative<NoCollaboration>(collaboration); }
    const AggregationConfig* aggregation() const { return std::get_if<AggregationConfig>(&collaboration); }
    const PersonalisedAveraging* personalised() const { return std::get_if<PersonalisedAveraging>(&collaboration); }

    /// `base` (shapes, rank, LoRA scaling...) with this strategy's experts, roles, top-k and routing.
    MixtureConfig mixture_config(MixtureConfig base) const {
        base.n_experts = n_experts();
        base.roles = roles;
        base.routing = routing;
        base.top_k = std::min(top_k, n_experts());
        return base;
    }

    /// `base` (learning rates, schedule length...) with this strategy's router training and frozen
    /// tensors (FFA-LoRA: the lora_A of generalist experts and of shared adapters).
    TrainerConfig trainer_config(TrainerConfig base) const {
        base.router_training = router_training;
        if (freeze_shared_lora_A) {
            std::vector<Role> r = roles;
            base.frozen = [r](std::string_view, std::string_view tensor) {
                if (!tensor.ends_with("lora_A")) return false;
                const Index e = comigs::expert_of_tensor(tensor);
                if (e < 0) return true;  // a plain shared adapter
                return e < static_cast<Index>(r.size()) && r[static_cast<std::size_t>(e)] == Role::generalist;
            };
        }
        return base;
    }

    /// Options of this strategy's uploads.
    UploadOptions upload_options() const {
        UploadOptions o;
        o.send_lora_A = !freeze_shared_lora_A;
        return o;
    }

    void validate() const {
        require(!name.empty(), "strategy name: must not be empty");
        require(!roles.empty(), "strategy '", name, "' roles: at least one expert is needed");
        require(top_k >= 1, "strategy '", name, "' top_k ", top_k, ": must be >= 1");
        if (const auto* a = aggregation()) {
            a->validate();
            require(generalists() > 0 || share_adapters, "strategy '", name,
                    "': aggregates with ", to_string(a->rule), " but shares nothing (no generalist, no adapters)");
            require(!freeze_shared_lora_A || a->rule == AggregationRule::ffa_lora, "strategy '", name,
                    "': freezing the shared lora_A (FFA-LoRA) needs the ffa_lora rule, not ", to_string(a->rule));
        }
        if (const auto* p = personalised())
            require(std::isfinite(p->temperature) && p->temperature > 0, "strategy '", name, "' PCL temperature ",
                    p->temperature, ": must be finite and > 0");
        require(!freeze_shared_lora_A || aggregation() != nullptr, "strategy '", name,
                "': freeze_shared_lora_A is FFA-LoRA's setting and needs the ffa_lora rule");
    }
};

/// The methods the CoMiGS paper compares. Each returns a complete Strategy; adjust fields for
/// variants (e.g. `auto s = comigs_1g1s(); s.collaboration = AggregationConfig::fedavg(Weighting::tokens);`).
namespace strategies {

/// CoMiGS-1G1S: 2 experts, expert 0 a generalist (uploaded, averaged with uniform FedAvg as the
/// reference), expert 1 a specialist (stays); top-2 router trained alternately on validation data;
/// shared attention adapters averaged with the generalist. Uploads half of what `fedavg` uploads.
inline Strategy comigs_1g1s() {
    Strategy s;
    s.name = "comigs-1g1s";
    return s;
}

/// CoMiGS-1G+nS: one generalist and `specialists` specialists (n >= 1), top-2 router trained
/// alternately; otherwise as comigs_1g1s (same upload size whatever n).
inline Strategy comigs_1gns(Index specialists) {
    require(specialists >= 1, "specialists ", specialists, ": CoMiGS-1G+nS needs n >= 1");
    Strategy s;
    s.name = "comigs-1g" + std::to_string(specialists) + "s";
    s.roles.assign(static_cast<std::size_t>(specialists + 1), Role::specialist);
    s.roles[0] = Role::generalist;
    return s;
}

/// CoMiGS-2G: both experts generalists (both averaged), top-2 router trained alternately on
/// validation data (the router stays on the device).
inline Strategy comigs_2g() {
    Strategy s;
    s.name = "comigs-2g";
    s.roles = {Role::generalist, Role::generalist};
    return s;
}

/// CoMiGS-2S: both experts specialists, top-2 router trained alternately; no collaboration at all
/// (the shared adapters stay local too): a purely local mixture.
inline Strategy comigs_2s() {
    Strategy s;
    s.name = "comigs-2s";
    s.roles = {Role::specialist, Role::specialist};
    s.share_adapters = false;
    s.collaboration = NoCollaboration{};
    return s;
}

/// Local: 2 experts combined by their unweighted mean (no router), trained jointly on the user's own
/// training data, nothing shared.
inline Strategy local() {
    Strategy s;
    s.name = "local";
    s.roles = {Role::specialist, Role::specialist};
    s.routing = Routing::mean;
    s.router_training = RouterTraining::joint;
    s.share_adapters = false;
    s.collaboration = NoCollaboration{};
    return s;
}

/// FedAvg: 2 experts with mean routing (no router), both generalists, trained jointly; every adapter
/// tensor averaged every round (uniform weights by default, as the reference; Weighting::tokens weights
/// by the upload weight). Uploads twice what CoMiGS-1G1S uploads (plus the same shared adapters).
inline Strategy fedavg(Weighting weighting = Weighting::uniform) {
    Strategy s;
    s.name = "fedavg";
    s.roles = {Role::generalist, Role::generalist};
    s.routing = Routing::mean;
    s.router_training = RouterTraining::joint;
    s.collaboration = AggregationConfig::fedavg(weighting);
    return s;
}

/// pFedMoE: CoMiGS-1G1S's experts and sharing, but the router is trained jointly with the experts on
/// training data (one optimiser, one schedule) instead of alternately on validation data.
inline Strategy pfedmoe() {
    Strategy s = comigs_1g1s();
    s.name = "pfedmoe";
    s.router_training = RouterTraining::joint;
    return s;
}

/// PCL: 2 experts with mean routing, both generalists, trained jointly; each user replaces its whole
/// adapter model by its personalised average of all present users' models, weights
/// softmax(-validation perplexity / temperature) computed on its own validation data. Needs a
/// validation-perplexity callback per user.
inline Strategy pcl(double temperature = 1.0) {
    Strategy s = fedavg();
    s.name = "pcl";
    s.collaboration = PersonalisedAveraging{temperature};
    return s;
}

/// HetLoRA: a single generalist expert per user (a plain shared LoRA, no router), ranks may differ
/// between users: factors zero-padded to the largest rank and averaged with weights proportional to
/// each user's update norm ||s B A||_F (the reference's norm weighting); a device of rank r keeps the
/// first r components.
inline Strategy hetlora() {
    Strategy s;
    s.name = "hetlora";
    s.roles = {Role::generalist};
    s.top_k = 1;
    s.router_training = RouterTraining::none;
    s.collaboration = AggregationConfig::hetlora(Weighting::update_norm);
    return s;
}

/// FlexLoRA: a single generalist expert per user, ranks may differ: the full products s B A are
/// averaged with weights proportional to the upload weight (data size), decomposed by SVD, and each
/// device receives the top r_i factors.
inline Strategy flexlora() {
    Strategy s = hetlora();
    s.name = "flexlora";
    s.collaboration = AggregationConfig::flexlora(Weighting::tokens);
    return s;
}

/// FFA-LoRA: a single generalist expert per user; every shared lora_A is frozen at a common random
/// initialisation (the runner broadcasts user 0's before round 0) and only B is trained, uploaded and
/// averaged (uniformly). aggregate.hpp's FFA rule needs equal ranks (A must be identical).
inline Strategy ffa_lora() {
    Strategy s = hetlora();
    s.name = "ffa-lora";
    s.freeze_shared_lora_A = true;
    s.collaboration = AggregationConfig::ffa_lora();
    return s;
}

/// Every preset, in the order above (1G+nS with n = 2).
inline std::vector<Strategy> all() {
    return {comigs_1g1s(), comigs_1gns(2), comigs_2g(), comigs_2s(), local(),   fedavg(),
            pfedmoe(),     pcl(),          hetlora(),   flexlora(),  ffa_lora()};
}

}  // namespace strategies

// ------------------------------------------------------------------------------------------------
// In-process round runner

/// One simulated user: its trainer (which holds its host model) and what the runner needs besides.
template <class Model, class Batch>
struct SimulatedUser {
    UserId id = 0;
    Trainer<Model, Batch>* trainer = nullptr;
    /// Validation perplexity of the user's model as currently loaded (PCL only).
    std::function<double()> validation_perplexity;
    /// Weight of the user's uploads (e.g. its training-set size, for token/data-size weighting);
    /// <= 0: the training tokens of the round's local steps.
    double weight = 0.0;
    /// Roles of this user's experts when they differ from the strategy's (users with more or fewer
    /// experts: E_i may differ between users); empty: the strategy's roles.
    std::vector<Role> roles;
};

/// Settings of a RoundRunner.
struct RunnerConfig {
    Index rounds = 20;       ///< the reference: 20 rounds
    Index local_steps = 10;  ///< expert steps per user per round (the reference: 10)
    /// Zero the optimiser moments of the tensors a download overwrote (the reference keeps them).
    bool reset_moments_on_download = false;
    /// Before round 0, every user downloads the shared tensors of one user (the lowest id among those
    /// with the largest upload), as the reference broadcasts the server's initial model: generalists
    /// start equal everywhere (FFA-LoRA's common A included).
    bool sync_initial = true;
    /// Whether a user takes part in a round; empty: everyone, every round. Absent users neither
    /// download, train nor upload; aggregation renormalises over the present ones.
    std::function<bool(Index round, UserId user)> present;
    /// Process the present users of each round in an order drawn from Rng(seed, round) instead of by
    /// ascending id (results are the same; the option exists to show it).
    std::optional<std::uint64_t> shuffle_seed;
};

/// What happened in one round.
struct RoundReport {
    Index round = 0;
    std::vector<UserId> present;              ///< ascending id
    std::vector<LocalTrainingReport> local;   ///< per present user, same order
    Index upload_floats = 0;                  ///< values sent to the server by all present users
    Index download_floats = 0;                ///< values received by all present users at the round's start
    std::optional<AggregationReport> aggregation;  ///< server rule
    std::vector<std::vector<double>> pcl_weights;  ///< PCL: row i = user present[i]'s weights over present
    std::vector<std::vector<double>> pcl_perplexities;  ///< PCL: [i][j] = ppl on user i's validation data of j's model
    double seconds = 0.0;

    /// Token-weighted mean training objective over the present users.
    double mean_loss() const {
        double w = 0, s = 0;
        for (const auto& l : local) {
            s += l.mean_loss * l.tokens;
            w += l.tokens;
        }
        return w > 0 ? s / w : 0.0;
    }
    double tokens() const {
        double t = 0;
        for (const auto& l : local) t += l.tokens;
        return t;
    }
    double tokens_per_second() const { return seconds > 0 ? tokens() / seconds : 0.0; }
};

/// Callbacks of a run. `index` is the user's position in the runner's user list.
template <class T>
struct RunnerHooks {
    /// The PERSONALISED protocol: called for each present user right after its local steps, before
    /// anything is aggregated or downloaded (what the CoMiGS reference evaluates).
    std::function<void(Index round, UserId user, std::size_t index)> after_local;
    /// Every upload as the server receives it (e.g. to audit what leaves a device).
    std::function<void(Index round, const GeneralistUpload<T>&)> on_upload;
    /// Progress: after each round's aggregation.
    std::function<void(const RoundReport&)> after_round;
    /// The DEPLOYED protocol: called for every user after the final download (what a user keeps).
    std::function<void(UserId user, std::size_t index)> deployed;
};

namespace detail {

/// What RoundRunner and DistributedRoundRunner (distributed_runner.hpp) share: the strategy and schedule,
/// the users in ascending id order with their pending aggregates, and each user's part of a round
/// (download, local steps, upload). The runners differ only in how uploads meet: in-process or as
/// collectives.
template <class Model, class Batch>
class RunnerBase {
public:
    using T = typename Model::scalar_type;
    using User = SimulatedUser<Model, Batch>;

    RunnerBase(const RunnerBase&) = delete;
    RunnerBase& operator=(const RunnerBase&) = delete;

    /// The final download: every user applies its latest aggregate (the deployed model), then the
    /// `deployed` hook runs for every user (ascending id).
    void finish(const RunnerHooks<T>& hooks = {}) {
        for (std::size_t i : order_) apply_pending(i);
        if (hooks.deployed)
            for (std::size_t i : order_) hooks.deployed(users_[i].id, i);
    }

    /// Values one user (user list position `index`) uploads per round under this strategy.
    Index upload_floats(std::size_t index) const {
        if (!strategy_.collaborates()) return 0;
        return build_upload(users_.at(index), 1.0, strategy_.upload_options()).size();
    }

    const Strategy& strategy() const { return strategy_; }
    const RunnerConfig& config() const { return config_; }
    const std::vector<User>& users() const { return users_; }
    Index rounds_done() const { return next_round_; }

    /// The aggregate user list position `index` applies at its next download (the start of its next
    /// round, or finish()), if any: with the user's trainer, what a run checkpoint saves per user.
    const std::optional<SharedAggregate<T>>& pending_download(std::size_t index) const { return pending_.at(index); }

    /// Continues a run from a checkpoint (run_checkpoint.hpp): `rounds_done` rounds are behind and user
    /// list position i applies `pending[i]` at its next download. The users' trainers and models must
    /// already hold their state after those rounds.
    void resume_at(Index rounds_done, std::vector<std::optional<SharedAggregate<T>>> pending) {
        require(rounds_done >= 0 && rounds_done <= config_.rounds, "resume: ", rounds_done,
                " rounds done is outside 0 ..", config_.rounds);
        require(pending.size() == users_.size(), "resume: ", pending.size(), " pending downloads for ", users_.size(),
                " users");
        next_round_ = rounds_done;
        pending_ = std::move(pending);
    }

protected:
    RunnerBase(Strategy strategy, RunnerConfig config, std::vector<User> users)
        : strategy_(std::move(strategy)), config_(std::move(config)), users_(std::move(users)) {
        strategy_.validate();
        require(config_.rounds >= 0, "rounds ", config_.rounds, ": must be >= 0");
        require(config_.local_steps >= 0, "local_steps ", config_.local_steps, ": must be >= 0");
        for (const User& u : users_) {
            require(u.trainer != nullptr, "user ", u.id, ": no trainer");
            require(u.trainer->config().router_training == strategy_.router_training, "user ", u.id,
                    ": trainer trains its router ", to_string(u.trainer->config().router_training), ", strategy '",
                    strategy_.name, "' wants ", to_string(strategy_.router_training));
            check_architecture(u);
        }
        order_.resize(users_.size());
        std::iota(order_.begin(), order_.end(), std::size_t{0});
        std::sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) { return users_[a].id < users_[b].id; });
        pending_.resize(users_.size());
    }
    ~RunnerBase() = default;

    /// The registry restricted to what this strategy shares: without `share_adapters` the plain shared
    /// adapters are left out of uploads and downloads.
    AdapterRegistry<T> shared_registry(const User& u) const {
        AdapterRegistry<T> r = u.trainer->adapters();
        if (!strategy_.share_adapters) r.shared_adapters.clear();
        return r;
    }

    GeneralistUpload<T> build_upload(const User& u, double weight, UploadOptions options) const {
        UploadBuilder<T> b(u.id, weight, options);
        b.add(shared_registry(u));
        return std::move(b).finish();
    }

    /// Downloads user i's pending aggregate, if any; returns the values received.
    Index apply_pending(std::size_t i) {
        if (!pending_[i]) return 0;
        User& u = users_[i];
        const auto rep = download(*pending_[i], u.id, shared_registry(u));
        if (config_.reset_moments_on_download && !rep.written.empty())
            u.trainer->reset_moments([&rep](std::string_view prefix, std::string_view tensor) {
                for (const auto& w : rep.written)
                    if (w.prefix == prefix && w.tensor == tensor) return true;
                return false;
            });
        const Index n = pending_[i]->size();
        pending_[i].reset();
        return n;
    }

    /// This round's present users (indices, ascending id) and the order to process them in: by id, or
    /// drawn from Rng(shuffle_seed, round).
    std::pair<std::vector<std::size_t>, std::vector<std::size_t>> present_users(Index round) const {
        std::vector<std::size_t> present;
        for (std::size_t i : order_)
            if (!config_.present || config_.present(round, users_[i].id)) present.push_back(i);
        std::vector<std::size_t> processing(present.size());
        std::iota(processing.begin(), processing.end(), std::size_t{0});
        if (config_.shuffle_seed) {
            Rng rng(*config_.shuffle_seed, static_cast<std::uint64_t>(round));
            for (std::size_t k = processing.size(); k > 1; --k)
                std::swap(processing[k - 1], processing[static_cast<std::size_t>(rng.below(k))]);
        }
        return {std::move(present), std::move(processing)};
    }

    /// User i's part of a round: its pending download (values received into `downloaded`), its local
    /// steps, then, if the strategy collaborates, its upload (weight: the user's, or the round's tokens).
    LocalTrainingReport local_round(std::size_t i, Index round, const RunnerHooks<T>& hooks,
                                    std::optional<GeneralistUpload<T>>& upload, Index& downloaded) {
        User& u = users_[i];
        downloaded = apply_pending(i);
        LocalTrainingReport local = u.trainer->train_steps(config_.local_steps);
        if (hooks.after_local) hooks.after_local(round, u.id, i);
        if (strategy_.collaborates()) {
            const double w = u.weight > 0 ? u.weight : (local.tokens > 0 ? local.tokens : 1.0);
            upload.emplace(build_upload(u, w, strategy_.upload_options()));
            if (hooks.on_upload) hooks.on_upload(round, *upload);
        }
        return local;
    }

    Strategy strategy_;
    RunnerConfig config_;
    std::vector<User> users_;
    std::vector<std::size_t> order_;  // user indices by ascending id
    std::vector<std::optional<SharedAggregate<T>>> pending_;
    Index next_round_ = 0;

private:
    void check_architecture(const User& u) const {
        const std::vector<Role>& roles = u.roles.empty() ? strategy_.roles : u.roles;
        for (const auto& m : u.trainer->adapters().mixtures) {
            const auto& c = m.layer->config();
            require(c.n_experts == static_cast<Index>(roles.size()) && c.routing == strategy_.routing, "user ", u.id,
                    " layer '", m.prefix, "': ", c.n_experts, " experts with ", to_string(c.routing),
                    " routing, expected ", roles.size(), " with ", to_string(strategy_.routing), " (strategy '",
                    strategy_.name, "'; build the layers with Strategy::mixture_config, or give the user's roles)");
            for (Index e = 0; e < c.n_experts; ++e)
                require(m.layer->role(e) == roles[static_cast<std::size_t>(e)], "user ", u.id, " layer '", m.prefix,
                        "' expert ", e, ": role ", to_string(m.layer->role(e)), ", expected ",
                        to_string(roles[static_cast<std::size_t>(e)]), " (strategy '", strategy_.name, "')");
        }
    }
};

}  // namespace detail

/// Runs a Strategy's rounds over simulated users (see the file comment). Users' trainers and models
/// are not owned and must outlive the runner; trainers must be configured with the strategy's router
/// training (Strategy::trainer_config) and models built with its mixtures (Strategy::mixture_config).
template <class Model, class Batch>
class RoundRunner : public detail::RunnerBase<Model, Batch> {
    using Base = detail::RunnerBase<Model, Batch>;

public:
    using T = typename Model::scalar_type;
    using User = SimulatedUser<Model, Batch>;

    RoundRunner(Strategy strategy, RunnerConfig config, std::vector<User> users)
        : Base(std::move(strategy), std::move(config), std::move(users)) {
        require(!users_.empty(), "users: at least one is needed");
        for (std::size_t i = 0; i < users_.size(); ++i) {
            const User& u = users_[i];
            for (std::size_t j = 0; j < i; ++j)
                require(users_[j].id != u.id, "user ", u.id, ": the id is used twice");
            require(!strategy_.personalised() || static_cast<bool>(u.validation_perplexity), "user ", u.id,
                    ": strategy '", strategy_.name, "' (PCL) needs a validation_perplexity callback");
        }
    }

    /// All rounds, then the final download; returns one report per round.
    std::vector<RoundReport> run(const RunnerHooks<T>& hooks = {}) {
        std::vector<RoundReport> out;
        while (next_round_ < config_.rounds) out.push_back(round(hooks));
        this->finish(hooks);
        return out;
    }

    /// The next round (the initial synchronisation first, before round 0).
    RoundReport round(const RunnerHooks<T>& hooks = {}) {
        require(next_round_ < config_.rounds, "round ", next_round_, ": all ", config_.rounds, " rounds are done");
        if (next_round_ == 0 && config_.sync_initial && strategy_.collaborates()) synchronise();
        const auto t0 = std::chrono::steady_clock::now();
        RoundReport rep;
        rep.round = next_round_;
        const auto [present, processing] = this->present_users(rep.round);
        for (std::size_t i : present) rep.present.push_back(users_[i].id);
        rep.local.resize(present.size());

        std::vector<std::optional<GeneralistUpload<T>>> uploads(present.size());
        for (std::size_t p : processing) {
            Index downloaded = 0;
            rep.local[p] = this->local_round(present[p], rep.round, hooks, uploads[p], downloaded);
            rep.download_floats += downloaded;
            if (uploads[p]) rep.upload_floats += uploads[p]->size();
        }

        if (strategy_.collaborates() && !present.empty()) {
            std::vector<GeneralistUpload<T>> ups;
            ups.reserve(uploads.size());
            for (auto& u : uploads) ups.push_back(std::move(*u));
            if (const AggregationConfig* rule = strategy_.aggregation()) {
                AggregationConfig cfg = *rule;
                cfg.stream = static_cast<std::uint64_t>(rep.round);  // DP noise: independent per round
                auto result = aggregate(ups, cfg, global_ ? &*global_ : nullptr);
                global_ = result.aggregate;
                for (auto& p : pending_) p = result.aggregate;  // absent users get it when they come back
                rep.aggregation = std::move(result.report);
            } else {
                personalised_averages(present, ups, rep);
            }
        }
        rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        ++next_round_;
        if (hooks.after_round) hooks.after_round(rep);
        return rep;
    }

    /// The last server aggregate (aggregate.hpp rules), if any: the reference of the next round's
    /// norm_clip and dp_fedavg.
    const SharedAggregate<T>* global_aggregate() const { return global_ ? &*global_ : nullptr; }
    /// Restores the last server aggregate (resuming from a checkpoint, run_checkpoint.hpp).
    void set_global_aggregate(std::optional<SharedAggregate<T>> global) { global_ = std::move(global); }

private:
    using Base::apply_pending;
    using Base::build_upload;
    using Base::shared_registry;
    using Base::strategy_;
    using Base::config_;
    using Base::users_;
    using Base::order_;
    using Base::pending_;
    using Base::next_round_;

    /// Before round 0: everyone takes the shared tensors of the lowest-id user among those with the
    /// largest upload (with a truncatable rank policy, so users of smaller ranks take its head).
    void synchronise() {
        std::size_t source = order_[0];
        Index best = -1;
        for (std::size_t i : order_) {
            const Index n = build_upload(users_[i], 1.0, UploadOptions{}).size();
            if (n > best) {
                best = n;
                source = i;
            }
        }
        const auto up = build_upload(users_[source], 1.0, UploadOptions{});  // A included (FFA-LoRA's common A)
        if (up.empty()) return;
        std::vector<SharedTensorInfo> infos = up.tensors();
        for (auto& info : infos) info.rank_policy = RankPolicy::truncate;
        const SharedAggregate<T> init(std::move(infos), up.values());
        for (std::size_t i : order_)
            if (i != source) download(init, users_[i].id, shared_registry(users_[i]));
    }

    /// PCL: user i's aggregate = sum_j w_ij upload_j, w_i = softmax(-ppl_i(j) / temperature).
    void personalised_averages(const std::vector<std::size_t>& present, const std::vector<GeneralistUpload<T>>& ups,
                               RoundReport& rep) {
        const double temperature = strategy_.personalised()->temperature;
        const std::size_t n = present.size();
        for (std::size_t j = 1; j < n; ++j)
            require<ShapeError>(ups[j].layout_fingerprint() == ups[0].layout_fingerprint(), "user ", ups[j].user(),
                                ": PCL averages whole models, but its shared tensors differ from user ",
                                ups[0].user(), "'s");
        for (std::size_t j = 0; j < n; ++j)
            if (const auto* bad = ups[j].first_non_finite())
                detail::raise<NumericError>("user ", ups[j].user(), " tensor '", bad->name,
                                            "': NaN or Inf in a PCL upload");
        rep.pcl_weights.assign(n, std::vector<double>(n, 0.0));
        rep.pcl_perplexities.assign(n, std::vector<double>(n, 0.0));
        for (std::size_t a = 0; a < n; ++a) {
            User& u = users_[present[a]];
            const auto reg = shared_registry(u);
            auto& ppl = rep.pcl_perplexities[a];
            for (std::size_t b = 0; b < n; ++b) {
                // User b's shared tensors in user a's model (b == a: its own, written back exactly).
                download(SharedAggregate<T>::with_layout_of(ups[b], ups[b].values()), u.id, reg);
                ppl[b] = u.validation_perplexity();
                require<NumericError>(!std::isnan(ppl[b]), "user ", u.id, ": validation perplexity of user ",
                                      ups[b].user(), "'s model is NaN");
            }
            download(SharedAggregate<T>::with_layout_of(ups[a], ups[a].values()), u.id, reg);  // restore
            // softmax(-ppl / temperature), shifted by the smallest perplexity for stability. With every
            // candidate infinite there is no softmax (0 / 0): refused rather than averaged as NaN.
            const double lo = *std::min_element(ppl.begin(), ppl.end());
            require<NumericError>(std::isfinite(lo), "user ", u.id, ": every candidate model has an infinite ",
                                  "validation perplexity on its data; PCL has no weights to average with");
            double z = 0;
            auto& w = rep.pcl_weights[a];
            for (std::size_t b = 0; b < n; ++b) {
                w[b] = std::isfinite(ppl[b]) ? std::exp(-(ppl[b] - lo) / temperature) : 0.0;
                z += w[b];
            }
            for (double& x : w) x /= z;
            std::vector<T> values(static_cast<std::size_t>(ups[0].size()));
            for (std::size_t e = 0; e < values.size(); ++e) {
                double s = 0;
                for (std::size_t b = 0; b < n; ++b) s += w[b] * static_cast<double>(ups[b].values()[e]);
                values[e] = static_cast<T>(s);
            }
            pending_[present[a]] = SharedAggregate<T>::with_layout_of(ups[0], values);
        }
    }

    std::optional<SharedAggregate<T>> global_;
};

}  // namespace comigs
