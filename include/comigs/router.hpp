#pragma once
// Per-token top-k router: logits = x Wr^T (Wr [E, d], no bias), gate weights for the chosen experts,
// the load-balancing loss with a generalist target share, and routing statistics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/gemm.hpp"
#include "params.hpp"
#include "random.hpp"

namespace comigs {

/// Generalists are averaged across users every round; specialists never leave the device. (Declared
/// with the router because the balancing loss gives the generalists their target share.)
enum class Role { generalist, specialist };

inline const char* to_string(Role r) { return r == Role::generalist ? "generalist" : "specialist"; }

/// How experts are combined: a learned top-k router, or the plain mean of all experts (baselines).
enum class Routing { top_k, mean };
/// Exploration noise added to the logits at training time only.
enum class RouterNoise { none, gumbel, gaussian };

inline const char* to_string(Routing r) { return r == Routing::top_k ? "topk" : "mean"; }

/// Router options. Semantics per token (CoMiGS reference):
/// - E = 1: the only expert with weight 1 (no router parameters).
/// - mean: every expert with weight 1/E (no router parameters).
/// - k >= 2: softmax over the k largest logits (weights sum to 1).
/// - k = 1: softmax over all E logits, the largest kept unnormalised (Switch style, weight < 1).
struct RouterConfig {
    /// More experts than any mixture-of-experts model in use (Switch-C has 2048); a count from a file
    /// or a command line beyond it is a mistake, refused before anything is allocated for it.
    static constexpr Index max_experts = Index{1} << 16;

    Index d_model = 0;
    Index n_experts = 2;
    Index top_k = 2;
    Routing routing = Routing::top_k;
    /// Target share of the generalists in the load-balancing loss (the reference's name: there expert 0
    /// is the generalist), split equally among them; the specialists share the rest equally. Needs
    /// both kinds of experts. A negative value means uniform, 1/E for every expert.
    double expert0_importance = -1.0;
    /// Role per expert, for the target shares; empty: expert 0 is the generalist, the rest specialists.
    std::vector<Role> roles;
    RouterNoise noise = RouterNoise::none;
    double noise_scale = 1.0;  ///< Gaussian std or Gumbel scale

    bool has_weight() const { return routing == Routing::top_k && n_experts > 1; }
    /// Whether a forward in this mode draws noise (and so needs a generator).
    bool draws_noise(bool training) const {
        return training && has_weight() && noise != RouterNoise::none && noise_scale > 0.0;
    }
    /// Experts each token goes to.
    Index slots() const { return routing == Routing::mean ? n_experts : (n_experts == 1 ? 1 : top_k); }
    Role role(Index e) const {
        if (!roles.empty()) return roles[static_cast<std::size_t>(e)];
        return e == 0 ? Role::generalist : Role::specialist;
    }
    Index generalists() const {
        return roles.empty() ? 1 : static_cast<Index>(std::count(roles.begin(), roles.end(), Role::generalist));
    }
    /// t_e of the balancing loss: expert0_importance / G for each of the G generalists, the rest split
    /// equally among the specialists; 1/E each without a target.
    double target_share(Index e) const {
        if (expert0_importance < 0.0) return 1.0 / static_cast<double>(n_experts);
        const Index g = generalists();
        return role(e) == Role::generalist ? expert0_importance / static_cast<double>(g)
                                           : (1.0 - expert0_importance) / static_cast<double>(n_experts - g);
    }
    void validate() const {
        require(d_model >= 1, "d_model ", d_model, ": must be >= 1");
        require(n_experts >= 1 && n_experts <= max_experts, "experts ", n_experts, ": must be in [1, ", max_experts,
                "]");
        require(roles.empty() || static_cast<Index>(roles.size()) == n_experts, "roles: ", roles.size(),
                " given for ", n_experts, " experts");
        if (routing == Routing::top_k && n_experts > 1) {
            require(top_k >= 1 && top_k <= n_experts, "top_k ", top_k, ": must be in [1, experts = ", n_experts, "]");
            if (expert0_importance >= 0.0) {
                require(expert0_importance > 0.0 && expert0_importance < 1.0, "expert0_importance ",
                        expert0_importance, ": must be in (0, 1) with more than one expert");
                require(generalists() >= 1 && generalists() < n_experts, "expert0_importance ", expert0_importance,
                        ": a target share for the generalists needs both generalists and specialists, but ",
                        generalists(), " of the ", n_experts, " experts are generalists");
            }
        }
        require(std::isfinite(expert0_importance), "expert0_importance ", expert0_importance, ": must be finite");
        require(std::isfinite(noise_scale) && noise_scale >= 0.0, "noise_scale ", noise_scale,
                ": must be finite and >= 0");
    }
};

/// What one router forward decided, kept for backward and for statistics. Slots of a token are in
/// descending order of logit.
template <class T>
struct RoutingResult {
    Index tokens = 0, slots = 0, experts = 0;
    std::vector<std::int32_t> expert;  ///< [tokens * slots] chosen expert per slot
    std::vector<T> gate;               ///< [tokens * slots] its gate weight
    std::vector<T> logits;             ///< [tokens * experts] logits used for selection (noise included)
    std::vector<T> probs;              ///< [tokens * experts] softmax of the clean logits (load balancing)
    std::vector<T> select_probs;       ///< [tokens * experts] softmax of the selection logits (k = 1 gates)
    std::vector<std::int64_t> counts;  ///< [experts] (token, slot) assignments per expert
    std::vector<double> mean_prob;     ///< [experts] P_e, mean router probability
    double lb_loss = 0.0;              ///< sum_e P_e f_e / t_e (0 without a router)

    std::int32_t expert_of(Index t, Index j) const { return expert[static_cast<std::size_t>(t * slots + j)]; }
    T gate_of(Index t, Index j) const { return gate[static_cast<std::size_t>(t * slots + j)]; }
};

namespace detail {
template <class T>
void softmax_row(const T* in, T* out, Index n) {
    T mx = in[0];
    for (Index i = 1; i < n; ++i) mx = std::max(mx, in[i]);
    double sum = 0.0;
    for (Index i = 0; i < n; ++i) {
        out[i] = std::exp(in[i] - mx);
        sum += static_cast<double>(out[i]);
    }
    const T inv = static_cast<T>(1.0 / sum);
    for (Index i = 0; i < n; ++i) out[i] *= inv;
}
}  // namespace detail

namespace detail {
/// router_forward after its product: r.logits [n, E] already hold x W^T when the config has a router.
template <class T>
void route_tokens(RoutingResult<T>& r, Index n, const RouterConfig& cfg, bool training, Rng* rng) {
    const Index E = cfg.n_experts, k = cfg.slots();
    r.tokens = n;
    r.slots = k;
    r.experts = E;
    r.expert.assign(static_cast<std::size_t>(n * k), 0);
    r.gate.assign(static_cast<std::size_t>(n * k), T(0));
    r.counts.assign(static_cast<std::size_t>(E), 0);
    r.mean_prob.assign(static_cast<std::size_t>(E), 0.0);
    r.lb_loss = 0.0;
    if (!cfg.has_weight()) {
        r.logits.clear();
        r.probs.clear();
        r.select_probs.clear();
        const T g = T(1) / static_cast<T>(k);
        for (Index t = 0; t < n; ++t)
            for (Index j = 0; j < k; ++j) {
                r.expert[static_cast<std::size_t>(t * k + j)] = static_cast<std::int32_t>(j);
                r.gate[static_cast<std::size_t>(t * k + j)] = g;
            }
        for (Index e = 0; e < E; ++e) r.counts[static_cast<std::size_t>(e)] = n;
        return;
    }
    r.probs.assign(static_cast<std::size_t>(n * E), T(0));
    MatrixView<T> logits(r.logits.data(), n, E);
#pragma omp parallel for schedule(static) if (n * E > 65536)
    for (Index t = 0; t < n; ++t) detail::softmax_row(logits.row_ptr(t), r.probs.data() + t * E, E);

    if (cfg.draws_noise(training)) {
        require(rng != nullptr, "rng: router noise in training needs a generator");
        for (T& l : r.logits)  // sequential: the draw order must not depend on the thread count
            l += static_cast<T>(cfg.noise_scale * (cfg.noise == RouterNoise::gumbel ? rng->gumbel() : rng->normal()));
        r.select_probs.assign(r.logits.size(), T(0));
        for (Index t = 0; t < n; ++t) detail::softmax_row(logits.row_ptr(t), r.select_probs.data() + t * E, E);
    } else {
        r.select_probs = r.probs;
    }

#pragma omp parallel for schedule(static) if (n > 4096)
    for (Index t = 0; t < n; ++t) {
        const T* l = logits.row_ptr(t);
        std::int32_t* sel = r.expert.data() + t * k;
        // Partial selection sort: E is small; ties go to the lower Index.
        std::int32_t order[64];
        std::vector<std::int32_t> big;
        std::int32_t* ord = order;
        if (E > 64) {
            big.resize(static_cast<std::size_t>(E));
            ord = big.data();
        }
        for (Index e = 0; e < E; ++e) ord[e] = static_cast<std::int32_t>(e);
        std::partial_sort(ord, ord + k, ord + E, [l](std::int32_t a, std::int32_t b) {
            return l[a] > l[b] || (l[a] == l[b] && a < b);
        });
        std::copy(ord, ord + k, sel);
        T* g = r.gate.data() + t * k;
        if (k == 1) {
            g[0] = r.select_probs[static_cast<std::size_t>(t * E + sel[0])];
        } else {
            const T mx = l[sel[0]];
            double sum = 0.0;
            for (Index j = 0; j < k; ++j) {
                g[j] = std::exp(l[sel[j]] - mx);
                sum += static_cast<double>(g[j]);
            }
            for (Index j = 0; j < k; ++j) g[j] = static_cast<T>(static_cast<double>(g[j]) / sum);
        }
    }

    for (Index i = 0; i < n * k; ++i) ++r.counts[static_cast<std::size_t>(r.expert[static_cast<std::size_t>(i)])];
    for (Index t = 0; t < n; ++t)
        for (Index e = 0; e < E; ++e)
            r.mean_prob[static_cast<std::size_t>(e)] += static_cast<double>(r.probs[static_cast<std::size_t>(t * E + e)]);
    double lb = 0.0;
    for (Index e = 0; e < E; ++e) {
        auto& P = r.mean_prob[static_cast<std::size_t>(e)];
        P = n > 0 ? P / static_cast<double>(n) : 0.0;
        const double f = n > 0 ? static_cast<double>(r.counts[static_cast<std::size_t>(e)]) / static_cast<double>(n * k) : 0.0;
        lb += P * f / cfg.target_share(e);
    }
    r.lb_loss = lb;
}
}  // namespace detail

/// Routes the N tokens of x[N, d] with router weight W[E, d] (empty without a router). `training`
/// enables the configured noise, drawn from `rng` (required then).
template <class T>
void router_forward(RoutingResult<T>& r, ConstMatrixView<T> x, ConstMatrixView<T> W, const RouterConfig& cfg,
                    bool training = false, Rng* rng = nullptr) {
    const Index n = x.rows, E = cfg.n_experts;
    require_shape(x, n, cfg.d_model, "router input x");
    if (cfg.has_weight()) {
        require_shape(W, E, cfg.d_model, "router.weight");
        r.logits.assign(static_cast<std::size_t>(n * E), T(0));
        kernels::gemm<T>(MatrixView<T>(r.logits.data(), n, E), x, kernels::Op::none, W, kernels::Op::trans);
    }
    detail::route_tokens(r, n, cfg, training, rng);
}

/// router_forward from logits [N, E] = x W^T computed by the caller (a layer that multiplies x by the
/// router weight together with other matrices in one product). Without a router the logits are not read.
template <class T>
void router_forward_logits(RoutingResult<T>& r, ConstMatrixView<T> logits, const RouterConfig& cfg,
                           bool training = false, Rng* rng = nullptr) {
    const Index n = logits.rows, E = cfg.n_experts;
    if (cfg.has_weight()) {
        require_shape(logits, n, E, "router logits");
        r.logits.resize(static_cast<std::size_t>(n * E));
        for (Index t = 0; t < n; ++t) std::copy_n(logits.row_ptr(t), E, r.logits.data() + t * E);
    }
    detail::route_tokens(r, n, cfg, training, rng);
}

/// dL/d logits [N, E] of the router (into dlog, resized) given dgate[N, slots] (dL/d gate weight of
/// each slot) and lb_grad (dL/d lb_loss): the part of router_backward before its two products, for
/// callers that fuse those into their own passes over x.
template <class T>
void router_logit_grad(std::vector<T>& dlog, ConstMatrixView<T> dgate, T lb_grad, const RoutingResult<T>& r,
                       const RouterConfig& cfg) {
    const Index n = r.tokens, E = r.experts, k = r.slots;
    require_shape(dgate, n, k, "router gate gradient");
    dlog.assign(static_cast<std::size_t>(n * E), T(0));
    std::vector<double> c(static_cast<std::size_t>(E));
    for (Index e = 0; e < E; ++e)
        c[static_cast<std::size_t>(e)] = n > 0 ? static_cast<double>(r.counts[static_cast<std::size_t>(e)]) /
                                                     static_cast<double>(n * k) / cfg.target_share(e)
                                               : 0.0;
    const double lb_scale = static_cast<double>(lb_grad) / static_cast<double>(std::max<Index>(n, 1));
#pragma omp parallel for schedule(static) if (n > 4096)
    for (Index t = 0; t < n; ++t) {
        T* dl = dlog.data() + t * E;
        const T* dg = dgate.row_ptr(t);
        const std::int32_t* sel = r.expert.data() + t * k;
        const T* g = r.gate.data() + t * k;
        if (k == 1) {
            // g = p_m with p = softmax over all logits: dl_j = g (delta_jm - p_j) dg.
            const T* p = r.select_probs.data() + t * E;
            for (Index e = 0; e < E; ++e) dl[e] -= g[0] * p[e] * dg[0];
            dl[sel[0]] += g[0] * dg[0];
        } else {
            // g = softmax over the selected logits: dl_j = g_j (dg_j - sum_i g_i dg_i).
            double dot = 0.0;
            for (Index j = 0; j < k; ++j) dot += static_cast<double>(g[j]) * static_cast<double>(dg[j]);
            for (Index j = 0; j < k; ++j) dl[sel[j]] += g[j] * (dg[j] - static_cast<T>(dot));
        }
        if (lb_grad != T(0)) {
            // LB = sum_e c_e P_e, P_e = mean_t p_te (clean softmax): dl_tj = p_tj (c_j - sum_e c_e p_te) / N.
            const T* p = r.probs.data() + t * E;
            double cp = 0.0;
            for (Index e = 0; e < E; ++e) cp += c[static_cast<std::size_t>(e)] * static_cast<double>(p[e]);
            for (Index e = 0; e < E; ++e)
                dl[e] += static_cast<T>(lb_scale * static_cast<double>(p[e]) * (c[static_cast<std::size_t>(e)] - cp));
        }
    }
}

/// Backward of the router: given dgate[N, slots] (dL/d gate weight of each slot) and lb_grad
/// (dL/d lb_loss), accumulates dW[E, d] += dlogits^T x and dx[N, d] += dlogits W (dx may be empty).
/// A no-op without a router.
template <class T>
void router_backward(MatrixView<T> dx, MatrixView<T> dW, ConstMatrixView<T> dgate, T lb_grad, ConstMatrixView<T> x,
                     ConstMatrixView<T> W, const RoutingResult<T>& r, const RouterConfig& cfg) {
    if (!cfg.has_weight()) return;
    const Index n = r.tokens, E = r.experts;
    require_shape(x, n, cfg.d_model, "router input x");
    require_shape(dW, E, cfg.d_model, "router.weight gradient");
    std::vector<T> dlog;
    router_logit_grad(dlog, dgate, lb_grad, r, cfg);
    ConstMatrixView<T> dlogits(dlog.data(), n, E);
    kernels::gemm<T>(dW, dlogits, kernels::Op::trans, x, kernels::Op::none, T(1), T(1));
    if (!dx.empty()) {
        require_shape(dx, n, cfg.d_model, "router input gradient dx");
        kernels::gemm<T>(dx, dlogits, kernels::Op::none, W, kernels::Op::none, T(1), T(1));
    }
}

/// A router owning its weight `router.weight` [E, d] (initialised N(0, 0.02)) and gradient.
template <class T>
class TopKRouter {
public:
    explicit TopKRouter(const RouterConfig& cfg) : cfg_(cfg) {
        cfg_.validate();
        ParamLayout l;
        if (cfg_.has_weight()) l.add("router.weight", {cfg_.n_experts, cfg_.d_model});
        params_ = ParamBuffer<T>(std::move(l));
        grads_ = ParamBuffer<T>(params_.layout_ptr());
    }

    void init(Rng& rng, double std = 0.02) {
        if (!cfg_.has_weight()) return;
        for (T& v : params_.span("router.weight")) v = static_cast<T>(rng.normal(0.0, std));
    }

    const RouterConfig& config() const { return cfg_; }
    ParamBuffer<T>& params() { return params_; }
    ParamBuffer<T>& grads() { return grads_; }
    const ParamBuffer<T>& params() const { return params_; }
    const RoutingResult<T>& result() const { return result_; }
    void zero_grad() { grads_.zero(); }

    /// Routes x[N, d]; the decision is kept in result() for backward and statistics.
    const RoutingResult<T>& forward(ConstMatrixView<T> x, bool training = false, Rng* rng = nullptr) {
        x_ = x;
        router_forward(result_, x, weight(), cfg_, training, rng);
        return result_;
    }

    /// dgate[N, slots], lb_grad = dL/d lb_loss; accumulates the weight gradient and dx[N, d] (x must
    /// still be alive: the router keeps a view of it).
    void backward(MatrixView<T> dx, ConstMatrixView<T> dgate, T lb_grad) {
        if (!cfg_.has_weight()) return;
        router_backward(dx, grads_.view("router.weight"), dgate, lb_grad, x_, weight(), result_, cfg_);
    }

private:
    ConstMatrixView<T> weight() const {
        return cfg_.has_weight() ? params_.view("router.weight") : ConstMatrixView<T>();
    }

    RouterConfig cfg_;
    ParamBuffer<T> params_, grads_;
    RoutingResult<T> result_;
    ConstMatrixView<T> x_;
};

/// Routing statistics accumulated over batches: share of (token, slot) assignments and mean router
/// probability per expert.
struct RoutingStats {
    std::vector<std::int64_t> counts;
    std::vector<double> prob_sum;
    std::int64_t tokens = 0, assignments = 0;

    template <class T>
    void add(const RoutingResult<T>& r) {
        if (counts.empty()) {
            counts.assign(static_cast<std::size_t>(r.experts), 0);
            prob_sum.assign(static_cast<std::size_t>(r.experts), 0.0);
        }
        require<ShapeError>(static_cast<Index>(counts.size()) == r.experts, "routing stats: ", r.experts,
                            " experts, expected ", counts.size());
        for (Index e = 0; e < r.experts; ++e) {
            counts[static_cast<std::size_t>(e)] += r.counts[static_cast<std::size_t>(e)];
            prob_sum[static_cast<std::size_t>(e)] += r.mean_prob[static_cast<std::size_t>(e)] * static_cast<double>(r.tokens);
        }
        tokens += r.tokens;
        assignments += r.tokens * r.slots;
    }
    /// Fraction of assignments that went to expert e.
    double share(Index e) const {
        return assignments ? static_cast<double>(counts[static_cast<std::size_t>(e)]) / static_cast<double>(assignments) : 0.0;
    }
    double mean_prob(Index e) const {
        return tokens ? prob_sum[static_cast<std::size_t>(e)] / static_cast<double>(tokens) : 0.0;
    }
};

}  // namespace comigs
