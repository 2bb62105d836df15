#pragma once
// Generalist/specialist mixtures of LoRA experts.
//
// MixtureOfLoraMlp replaces a frozen MLP by E experts, each the same frozen MLP adapted by its own LoRA
// pair on every linear, combined per token by a top-k router. The frozen base is identical for every
// expert, so its GEMMs run once per token for all experts (performance.md):
//   H   = W1 x + b1                          (once)
//   h_e = H + s B1e A1e x                    (rank-r, per routed (token, expert))
//   u_e = act(h_e),  m = sum_e g_e u_e
//   y   = W2 m + (sum_e g_e) b2 + sum_e g_e s B2e A2e u_e      (W2 once)
// which equals sum_e g_e expert_e(x) exactly. Routed rows are gathered per expert so that no expert
// work is spent on tokens that did not choose it.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "detail/aligned.hpp"
#include "frozen.hpp"
#include "kernels/activation.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/fused.hpp"
#include "kernels/lowrank.hpp"
#include "lora.hpp"
#include "router.hpp"

namespace comigs {

/// Expert index of a mixture tensor name (`experts.{e}.*`), or -1 (the router, or no expert index a
/// layer could have: names come from files, so an absurdly long number is not an expert either).
inline Index expert_of_tensor(std::string_view tensor) {
    constexpr std::string_view prefix = "experts.";
    constexpr Index too_many = Index{1} << 40;
    if (!tensor.starts_with(prefix)) return -1;
    Index e = 0;
    std::size_t i = prefix.size();
    for (; i < tensor.size() && tensor[i] >= '0' && tensor[i] <= '9'; ++i) {
        e = e * 10 + (tensor[i] - '0');
        if (e >= too_many) return -1;
    }
    return i > prefix.size() && i < tensor.size() && tensor[i] == '.' ? e : -1;
}

/// What every mixture shares whatever it adapts: the experts, their roles and how tokens are routed.
struct MixtureRouting {
    Index n_experts = 2;
    Index top_k = 2;
    Routing routing = Routing::top_k;
    double expert0_importance = -1.0;  ///< generalist target share in the balancing loss; < 0: 1/E
    RouterNoise noise = RouterNoise::none;
    double noise_scale = 1.0;
    double router_init_std = 0.02;  ///< router weight ~ N(0, std^2) at init (the reference's 0.02); 0: all gates equal
    std::vector<Role> roles;  ///< per expert; empty: {generalist, specialist, specialist, ...}

    /// The router of a layer whose input has `d_in` features.
    RouterConfig router_for(Index d_in) const {
        RouterConfig r;
        r.d_model = d_in;
        r.n_experts = n_experts;
        r.top_k = top_k;
        r.routing = routing;
        r.expert0_importance = expert0_importance;
        r.roles = roles;
        r.noise = noise;
        r.noise_scale = noise_scale;
        return r;
    }
    Role role(Index e) const {
        if (!roles.empty()) return roles[static_cast<std::size_t>(e)];
        return e == 0 ? Role::generalist : Role::specialist;
    }
    /// True when `tensor` (a layer tensor name) belongs to a generalist and so may leave the device;
    /// false for specialists and the router, which never do.
    bool shares(std::string_view tensor) const {
        const Index e = expert_of_tensor(tensor);
        return e >= 0 && e < n_experts && role(e) == Role::generalist;
    }
    void validate_routing(Index d_in) const {
        require(roles.empty() || static_cast<Index>(roles.size()) == n_experts, "roles: ", roles.size(),
                " given for ", n_experts, " experts");
        require(std::isfinite(router_init_std) && router_init_std >= 0.0, "router_init_std ", router_init_std,
                ": must be finite and >= 0");
        router_for(d_in).validate();
    }
};

/// Options of a mixture of LoRA experts on an MLP. By default expert 0 is the generalist and the rest
/// are specialists.
struct MixtureConfig : MixtureRouting {
    MlpForm form = MlpForm::gelu;
    Index d_model = 0;
    Index d_hidden = 0;
    Index rank = 8;
    double alpha = 16.0;
    LoraScaling scaling = LoraScaling::sqrt;
    double dropout = 0.0;  ///< LoRA input dropout (training only)

    RouterConfig router() const { return router_for(d_model); }
    double scale() const { return lora_scale(alpha, rank, scaling); }
    void validate() const {
        require(d_model >= 1, "d_model ", d_model, ": must be >= 1");
        require(d_hidden >= 1, "d_hidden ", d_hidden, ": must be >= 1");
        require(rank >= 1, "rank ", rank, ": LoRA rank must be >= 1");
        require(std::isfinite(alpha), "alpha ", alpha, ": LoRA alpha must be finite");
        require(std::isfinite(scale()), "scaling alpha ", alpha, " / rank ", rank, ": not finite");
        require(dropout >= 0.0 && dropout < 1.0, "dropout ", dropout, ": must be in [0, 1)");
        validate_routing(d_model);
    }
};

namespace detail {

/// (token, slot) pairs grouped by expert: rows [offset[e], offset[e+1]) of the per-slot buffers belong
/// to expert e, in increasing token order. `row_of[t * k + j]` is the row of token t's slot j.
struct ExpertGroups {
    std::vector<Index> offset, token, slot, row_of;

    template <class T>
    void build(const RoutingResult<T>& r) {
        const Index n = r.tokens, k = r.slots, E = r.experts;
        offset.assign(static_cast<std::size_t>(E + 1), 0);
        for (Index i = 0; i < n * k; ++i) ++offset[static_cast<std::size_t>(r.expert[static_cast<std::size_t>(i)] + 1)];
        for (Index e = 0; e < E; ++e) offset[static_cast<std::size_t>(e + 1)] += offset[static_cast<std::size_t>(e)];
        std::vector<Index> next(offset.begin(), offset.end() - 1);
        token.resize(static_cast<std::size_t>(n * k));
        slot.resize(token.size());
        row_of.resize(token.size());
        for (Index t = 0; t < n; ++t)
            for (Index j = 0; j < k; ++j) {
                const Index row = next[static_cast<std::size_t>(r.expert[static_cast<std::size_t>(t * k + j)])]++;
                token[static_cast<std::size_t>(row)] = t;
                slot[static_cast<std::size_t>(row)] = j;
                row_of[static_cast<std::size_t>(t * k + j)] = row;
            }
    }
    Index begin(Index e) const { return offset[static_cast<std::size_t>(e)]; }
    Index count(Index e) const { return offset[static_cast<std::size_t>(e + 1)] - offset[static_cast<std::size_t>(e)]; }
};

template <class T, class Alloc>
MatrixView<T> as_view(std::vector<T, Alloc>& v, Index rows, Index cols) {
    if (v.size() < static_cast<std::size_t>(rows * cols)) v.resize(static_cast<std::size_t>(rows * cols));
    return MatrixView<T>(v.data(), rows, cols);
}

/// Columns [e * r, (e + 1) * r) of a [N, E * r] matrix: expert e's block.
template <class T>
MatrixView<T> block(MatrixView<T> m, Index e, Index r) {
    return MatrixView<T>(m.data + e * r, m.rows, r, m.stride);
}

/// Draws an inverted-dropout mask of `n` elements (0 or 1/(1-p)).
template <class T>
void draw_mask(std::vector<T>& mask, std::size_t n, double p, Rng& rng) {
    mask.resize(n);
    const T keep = static_cast<T>(1.0 / (1.0 - p));
    for (auto& m : mask) m = rng.uniform() < p ? T(0) : keep;
}

}  // namespace detail

/// A generalist/specialist mixture of LoRA experts over a frozen MLP (GPT-2 GELU or Llama SwiGLU form).
///
/// Trainable tensors (one contiguous buffer, `params()`; gradients in `grads()`, same layout):
/// `router.weight` [E, d] (top-k routing with E > 1 only), then per expert e, contiguous:
/// `experts.{e}.{fc,proj}.lora_A/lora_B` (gelu) or `experts.{e}.{gate,up,down}.lora_A/lora_B` (swiglu),
/// lora_A [r, in], lora_B [out, r]. The frozen base is shared, never copied per expert.
template <class T>
class MixtureOfLoraMlp {
public:
    MixtureOfLoraMlp(const MixtureConfig& cfg, std::shared_ptr<const FrozenMlp<T>> base)
        : cfg_(cfg), base_(std::move(base)) {
        cfg_.validate();
        require(base_ != nullptr, "base: the frozen MLP must not be null");
        require(base_->form() == cfg_.form, "base form ", to_string(base_->form()), ": the mixture is configured for ",
                to_string(cfg_.form));
        require<ShapeError>(base_->d_model() == cfg_.d_model && base_->d_hidden() == cfg_.d_hidden, "base shape d ",
                            base_->d_model(), " hidden ", base_->d_hidden(), ": the mixture expects d ", cfg_.d_model,
                            " hidden ", cfg_.d_hidden);
        rcfg_ = cfg_.router();
        s_ = static_cast<T>(cfg_.scale());
        first_ = cfg_.form == MlpForm::gelu ? std::vector<std::string>{"fc"} : std::vector<std::string>{"gate", "up"};
        second_ = cfg_.form == MlpForm::gelu ? "proj" : "down";
        ParamLayout l;
        if (rcfg_.has_weight()) l.add("router.weight", {cfg_.n_experts, cfg_.d_model});
        for (Index e = 0; e < cfg_.n_experts; ++e) {
            for (const auto& name : first_) {
                l.add(tensor_name(e, name, 'A'), {cfg_.rank, cfg_.d_model});
                l.add(tensor_name(e, name, 'B'), {cfg_.d_hidden, cfg_.rank});
            }
            l.add(tensor_name(e, second_, 'A'), {cfg_.rank, cfg_.d_hidden});
            l.add(tensor_name(e, second_, 'B'), {cfg_.d_model, cfg_.rank});
        }
        params_ = ParamBuffer<T>(std::move(l));
        grads_ = ParamBuffer<T>(params_.layout_ptr());
    }

    /// Router N(0, router_init_std^2) (0.02); every lora_A Kaiming-uniform; every lora_B zero (the
    /// mixture starts as the base). The router draws come first whatever the std, so the experts'
    /// initial values do not depend on it.
    void init(Rng& rng) {
        if (rcfg_.has_weight())
            for (T& v : params_.span("router.weight"))
                v = static_cast<T>(rng.normal(0.0, 1.0) * cfg_.router_init_std);
        for (Index e = 0; e < cfg_.n_experts; ++e)
            for (const auto& name : linears()) {
                kaiming_uniform(params_.view(tensor_name(e, name, 'A')), rng);
                for (T& v : params_.span(tensor_name(e, name, 'B'))) v = T(0);
            }
    }

    const MixtureConfig& config() const { return cfg_; }
    const RouterConfig& router_config() const { return rcfg_; }
    const FrozenMlp<T>& base() const { return *base_; }
    std::shared_ptr<const FrozenMlp<T>> base_ptr() const { return base_; }
    Role role(Index e) const { return cfg_.role(e); }
    T scale() const { return s_; }
    ParamBuffer<T>& params() { return params_; }
    ParamBuffer<T>& grads() { return grads_; }
    const ParamBuffer<T>& params() const { return params_; }
    const ParamBuffer<T>& grads() const { return grads_; }
    void zero_grad() { grads_.zero(); }
    /// The last forward's routing decision (chosen experts, gates, probabilities, counts).
    const RoutingResult<T>& routing() const { return route_; }

    /// The linears each expert adapts: {fc, proj} or {gate, up, down}.
    std::vector<std::string> linears() const {
        auto v = first_;
        v.push_back(second_);
        return v;
    }
    /// `experts.{e}.{linear}.lora_A` (which = 'A') or `.lora_B` (which = 'B').
    static std::string tensor_name(Index e, const std::string& linear, char which) {
        return "experts." + std::to_string(e) + "." + linear + (which == 'A' ? ".lora_A" : ".lora_B");
    }
    /// Names of all tensors of expert e, in buffer order (a contiguous range of params()).
    std::vector<std::string> expert_tensors(Index e) const {
        require(e >= 0 && e < cfg_.n_experts, "expert ", e, ": out of range [0, ", cfg_.n_experts, ")");
        std::vector<std::string> v;
        for (const auto& name : linears()) {
            v.push_back(tensor_name(e, name, 'A'));
            v.push_back(tensor_name(e, name, 'B'));
        }
        return v;
    }

    /// Expert index of a tensor name, or -1 for the router (see comigs::expert_of_tensor).
    static Index expert_of_tensor(std::string_view tensor) { return comigs::expert_of_tensor(tensor); }
    /// True when the tensor belongs to a generalist (it may leave the device); false for specialists
    /// and the router, which never do.
    bool shared(std::string_view tensor) const { return cfg_.shares(tensor); }

    /// y[N, d] = mixture(x[N, d]) (overwritten); returns the load-balancing loss of this batch.
    /// `training` enables dropout and router noise (drawn from `rng`, required then).
    /// Keeps what backward needs (a copy of x included), so x may change afterwards; with `borrow_x`
    /// it keeps a view of x instead of a copy: the caller promises that x stays valid and unchanged
    /// until backward and that y does not overlap it (a model's MLP block, whose host keeps the block's
    /// input for its own backward: one [N, d] copy less per layer).
    double forward(MatrixView<T> y, ConstMatrixView<T> x, bool training = false, Rng* rng = nullptr,
                   bool borrow_x = false) {
        const Index n = x.rows, d = cfg_.d_model, h = cfg_.d_hidden, E = cfg_.n_experts, r = cfg_.rank;
        require_shape(x, n, d, "mixture input x");
        require_shape(y, n, d, "mixture output y");
        // Checked before anything is overwritten: a refused forward leaves the last one to backward.
        require(rng != nullptr || !training || cfg_.dropout == 0.0, "rng: dropout ", cfg_.dropout,
                " in training needs a generator");
        require(rng != nullptr || !rcfg_.draws_noise(training), "rng: router noise in training needs a generator");
        require(!borrow_x || !overlaps(y, x), "mixture forward borrowing x: the output y overlaps x");
        complete_ = false;  // until the end: a forward that fails midway leaves nothing to differentiate
        n_ = n;
        // The copy of x (none when borrowed) and the view backward reads.
        MatrixView<T> xcopy;
        if (!borrow_x) {
            x_.resize(static_cast<std::size_t>(n * d));
            xcopy = MatrixView<T>(x_.data(), n, d);
        }
        xk_ = borrow_x ? x : ConstMatrixView<T>(xcopy);
        dropped_ = training && cfg_.dropout > 0.0;
        fused_ = fused_path();
        if (fused_) {
            forward_fused(y, x, xcopy, training, rng);  // copies x into xcopy beside its first product
            complete_ = true;
            return route_.lb_loss;
        }
        if (!borrow_x) {
#pragma omp parallel for schedule(static) if (n * d > 65536)
            for (Index t = 0; t < n; ++t) std::copy(x.row_ptr(t), x.row_ptr(t) + d, xcopy.row_ptr(t));
        }
        const ConstMatrixView<T> xs = xk_;
        router_forward(route_, ConstMatrixView<T>(xs), router_weight(), rcfg_, training, rng);
        groups_.build(route_);
        const Index k = route_.slots, rows = n * k;

        // LoRA input of the first stage: x, or x with one dropout mask shared by the experts.
        ConstMatrixView<T> xl = xs;
        if (dropped_) {
            detail::draw_mask(mask1_, static_cast<std::size_t>(n * d), cfg_.dropout, *rng);
            auto xd = detail::as_view(xdrop_, n, d);
            for (Index t = 0; t < n; ++t)
                for (Index c = 0; c < d; ++c) xd(t, c) = xs(t, c) * mask1_[static_cast<std::size_t>(t * d + c)];
            xl = xd;
        }

        // The base GEMMs of the first stage, once per token: H = x W^T + b (kept for backward). The
        // LoRA factors are viewed as [r, *] rows (B transposed once per call) so that every rank-r
        // product below reads them contiguously.
        const Index nf = static_cast<Index>(first_.size());
        pre_.resize(static_cast<std::size_t>(nf));
        z1_.resize(static_cast<std::size_t>(nf));
        for (Index f = 0; f < nf; ++f) {
            const auto& name = first_[static_cast<std::size_t>(f)];
            base_->linear(name).forward(detail::as_view(pre_[static_cast<std::size_t>(f)], n, h), xs);
            detail::as_view(z1_[static_cast<std::size_t>(f)], n, E * r);
        }
        prepare_factors();
        if (dropped_) {
            // The second stage's LoRA input is the dropped-out activation; its mask is drawn up front.
            detail::draw_mask(mask2_, static_cast<std::size_t>(rows * h), cfg_.dropout, *rng);
        }

        // Per token, fused over its k routed rows while they are in cache: z1 = A1e x, the
        // pre-activation p = H[t] + s B1e z1, u = act(p), m[t] = sum_j g_j u_j, z2 = A2e u. u and m are
        // work space (backward rebuilds u from H and z1); what is kept is H, z1, z2 and s g z2.
        Workspace& ws = workspace();
        auto U = detail::as_view(ws.u, rows, h);
        auto Ud = dropped_ ? detail::as_view(ws.udrop, rows, h) : MatrixView<T>();
        auto M = detail::as_view(ws.m, n, h);
        auto Z2 = detail::as_view(z2_, rows, r);
        auto Zs = detail::as_view(z2s_, n, E * r);
#pragma omp parallel for schedule(static) if (rows * h > 65536)
        for (Index t = 0; t < n; ++t) {
            thread_local std::vector<T> scratch;
            scratch.resize(static_cast<std::size_t>(2 * h));
            T* mt = M.row_ptr(t);
            for (Index j = 0; j < k; ++j) {
                const Index i = groups_.row_of[static_cast<std::size_t>(t * k + j)];
                const Index e = route_.expert_of(t, j);
                const T g = route_.gate_of(t, j);
                for (Index f = 0; f < nf; ++f)
                    kernels::lowrank_project(z1_[static_cast<std::size_t>(f)].data() + t * E * r + e * r,
                                             factor(fa1_, f, e), xl.row_ptr(t), r, d);
                T* u = U.row_ptr(i);
                preactivations(scratch.data(), t, e);
                if (cfg_.form == MlpForm::gelu)
                    kernels::gelu_forward_row(u, scratch.data(), h);
                else
                    kernels::swiglu_forward_row(u, scratch.data(), scratch.data() + h, h);
                if (j == 0)
                    kernels::scale_copy(mt, g, u, h);
                else
                    kernels::axpy(mt, g, u, h);
                const T* ul = u;
                if (dropped_) {
                    T* ud = Ud.row_ptr(i);
                    const T* mk = mask2_.data() + i * h;
                    for (Index c = 0; c < h; ++c) ud[c] = u[c] * mk[c];
                    ul = ud;
                }
                T* z = Z2.row_ptr(i);
                kernels::lowrank_project(z, factor(fa2_, 0, e), ul, r, h);
                T* zs = Zs.row_ptr(t) + e * r;
                for (Index c = 0; c < r; ++c) zs[c] = s_ * g * z[c];
            }
        }

        // Second stage: y = W2 m (one base GEMM) + (sum g) b2 + sum_e g s B2e (A2e u_e).
        auto second = base_->linear(second_);
        const auto b2 = second.bias;
        second.bias = {};
        second.forward(y, M);
#pragma omp parallel for schedule(static) if (n * d * E * r > 65536)
        for (Index t = 0; t < n; ++t) {
            T* yt = y.row_ptr(t);
            T gs = T(0);
            for (Index j = 0; j < k; ++j) {
                const Index e = route_.expert_of(t, j);
                gs += route_.gate_of(t, j);
                kernels::lowrank_accumulate(yt, Zs.row_ptr(t) + e * r, factor(fb2t_, 0, e), r, d);
            }
            if (!b2.empty()) kernels::axpy(yt, gs, b2.data(), d);
        }
        complete_ = true;
        return route_.lb_loss;
    }

    /// Backward of the last forward. dy[N, d] is dL/dy and lb_grad = dL/d(load-balancing loss) (e.g. 0.01);
    /// gradients accumulate into grads() and into dx[N, d] (pass an empty view to skip dx).
    void backward(MatrixView<T> dx, ConstMatrixView<T> dy, T lb_grad) {
        const Index n = n_, d = cfg_.d_model, h = cfg_.d_hidden, E = cfg_.n_experts, r = cfg_.rank;
        require(complete_ || (n == 0 && dy.rows == 0), "mixture backward: no completed forward to differentiate");
        require_shape(dy, n, d, "mixture output gradient dy");
        if (!dx.empty()) require_shape(dx, n, d, "mixture input gradient dx");
        if (fused_) {  // uses the factors forward_fused prepared (the parameters do not change in between)
            backward_fused(dx, dy, lb_grad);
            return;
        }
        prepare_factors();
        const Index k = route_.slots, rows = n * k;
        const Index nf = static_cast<Index>(first_.size());
        const ConstMatrixView<T> xs = xk_;
        const ConstMatrixView<T> xl = dropped_ ? ConstMatrixView<T>(xdrop_.data(), n, d) : xs;
        Workspace& ws = workspace();
        // u (and its dropped-out copy) rebuilt from H and z1 in the per-token pass below.
        const auto U = detail::as_view(ws.u, rows, h);
        const auto Ud = dropped_ ? detail::as_view(ws.udrop, rows, h) : MatrixView<T>();
        const ConstMatrixView<T> Ul = dropped_ ? ConstMatrixView<T>(Ud) : ConstMatrixView<T>(U);
        const auto second = base_->linear(second_);

        // dm = dy W2: one base GEMM.
        auto dM = detail::as_view(ws.dm, n, h);
        second.backward_input(dM, dy, false);

        std::vector<T>& dgate = dgate_;
        dgate.assign(static_cast<std::size_t>(rows), T(0));
        auto Qg = detail::as_view(work_r_, rows, r);
        const ConstMatrixView<T> Z2(z2_.data(), rows, r);
        const ConstMatrixView<T> Zs(z2s_.data(), n, E * r);
        auto dXl = detail::as_view(ws.dx, n, d);
        dz_.resize(static_cast<std::size_t>(nf));
        std::vector<MatrixView<T>> dP, dH, DZ;
        for (Index f = 0; f < nf; ++f) {
            dP.push_back(detail::as_view(ws.dp[static_cast<std::size_t>(f)], rows, h));
            dH.push_back(detail::as_view(ws.dh[static_cast<std::size_t>(f)], n, h));
            DZ.push_back(detail::as_view(dz_[static_cast<std::size_t>(f)], n, E * r));
        }

        // Per token, fused over its k routed rows: q = B2e^T dy, the gate gradient, du = g (dm + s A2e^T q),
        // the pre-activation gradients dp (kept for the LoRA gradients), their token sums dH (input of
        // the base input-gradient GEMM), dz1 = s B1e^T dp and its input gradient A1e^T dz1. p is
        // recomputed from H (cheaper than keeping it).
#pragma omp parallel for schedule(static) if (rows * h > 65536)
        for (Index t = 0; t < n; ++t) {
            thread_local std::vector<T> scratch;
            scratch.resize(static_cast<std::size_t>(4 * h + r));
            T* p = scratch.data();
            T* du = scratch.data() + 2 * h;
            T* tmp = scratch.data() + 3 * h;
            T* q = scratch.data() + 4 * h;
            const T* dm = dM.row_ptr(t);
            const T* dyt = dy.row_ptr(t);
            T* dxt = dXl.row_ptr(t);
            std::fill(dxt, dxt + d, T(0));
            const T bias_dot = second.bias.empty() ? T(0) : kernels::dot(second.bias.data(), dyt, d);
            for (Index j = 0; j < k; ++j) {
                const Index i = groups_.row_of[static_cast<std::size_t>(t * k + j)];
                const Index e = route_.expert_of(t, j);
                const T g = route_.gate_of(t, j);
                kernels::lowrank_project(q, factor(fb2t_, 0, e), dyt, r, d);
                T* qg = Qg.row_ptr(i);
                for (Index c = 0; c < r; ++c) qg[c] = g * s_ * q[c];
                // u = act(p) as the forward computed it (same inputs, same kernel: the same bits).
                preactivations(p, t, e);
                T* u = U.row_ptr(i);
                if (cfg_.form == MlpForm::gelu)
                    kernels::gelu_forward_row(u, p, h);
                else
                    kernels::swiglu_forward_row(u, p, p + h, h);
                if (dropped_) {
                    T* ud = Ud.row_ptr(i);
                    const T* mk = mask2_.data() + i * h;
                    for (Index c = 0; c < h; ++c) ud[c] = u[c] * mk[c];
                }
                dgate[static_cast<std::size_t>(t * k + j)] =
                    kernels::dot(u, dm, h) + bias_dot + s_ * kernels::dot(Z2.row_ptr(i), q, r);
                kernels::scale_copy(du, g, dm, h);
                if (!dropped_) {
                    kernels::lowrank_accumulate(du, qg, factor(fa2_, 0, e), r, h);
                } else {
                    // The LoRA path saw the dropped-out activation: its gradient passes through the mask.
                    std::fill(tmp, tmp + h, T(0));
                    kernels::lowrank_accumulate(tmp, qg, factor(fa2_, 0, e), r, h);
                    const T* mk = mask2_.data() + i * h;
                    for (Index c = 0; c < h; ++c) du[c] += tmp[c] * mk[c];
                }
                if (cfg_.form == MlpForm::gelu)
                    kernels::gelu_backward_row(dP[0].row_ptr(i), du, p, h);
                else
                    kernels::swiglu_backward_row(dP[0].row_ptr(i), dP[1].row_ptr(i), du, p, p + h, h);
                for (Index f = 0; f < nf; ++f) {
                    const T* dp = dP[static_cast<std::size_t>(f)].row_ptr(i);
                    T* dht = dH[static_cast<std::size_t>(f)].row_ptr(t);
                    if (j == 0)
                        std::copy(dp, dp + h, dht);
                    else
                        kernels::axpy(dht, T(1), dp, h);
                    T* dz = DZ[static_cast<std::size_t>(f)].row_ptr(t) + e * r;
                    kernels::lowrank_project(dz, factor(fb1t_, f, e), dp, r, h, s_);
                    kernels::lowrank_accumulate(dxt, dz, factor(fa1_, f, e), r, d);
                }
            }
        }

        // LoRA gradients per expert, over its routed rows: rank-r outer products (kernels/lowrank.hpp).
        const Index wide = std::max(h, d);
        work_t_.resize(static_cast<std::size_t>(r * wide));
        for (Index e = 0; e < E; ++e) {
            const Index ne = groups_.count(e), b = groups_.begin(e);
            if (ne == 0) continue;
            const Index* tok = groups_.token.data() + b;
            // dB2 [d, r] += sum_i dy[t_i] zs[t_i, e]^T, accumulated transposed then added.
            std::fill(work_t_.begin(), work_t_.begin() + r * d, T(0));
            const auto zs = gather_block(Zs, e);
            kernels::lowrank_outer(work_t_.data(), d, zs.data, r, dy.data, dy.stride, tok, ne, r, d);
            kernels::add_transposed(grad_B(e, second_), work_t_.data());
            // dA2 [r, h] += sum_i (g s q)_i u_i^T.
            auto gA2 = grad_A(e, second_);
            kernels::lowrank_outer(gA2.data, gA2.stride, Qg.row_ptr(b), r, Ul.row_ptr(b), Ul.stride,
                                   static_cast<const Index*>(nullptr), ne, r, h);
            for (Index f = 0; f < nf; ++f) {
                const auto& name = first_[static_cast<std::size_t>(f)];
                // dB1 [h, r] += s sum_i dp_i z1[t_i, e]^T.
                std::fill(work_t_.begin(), work_t_.begin() + r * h, T(0));
                const auto z1 = gather_block(ConstMatrixView<T>(z1_[static_cast<std::size_t>(f)].data(), n, E * r), e);
                kernels::lowrank_outer(work_t_.data(), h, z1.data, r, dP[static_cast<std::size_t>(f)].row_ptr(b), h,
                                       static_cast<const Index*>(nullptr), ne, r, h);
                kernels::add_transposed(grad_B(e, name), work_t_.data(), s_);
                // dA1 [r, d] += sum_i dz1[t_i, e] xl[t_i]^T.
                const auto dz = gather_block(DZ[static_cast<std::size_t>(f)], e);
                auto gA1 = grad_A(e, name);
                kernels::lowrank_outer(gA1.data, gA1.stride, dz.data, r, xl.data, xl.stride, tok, ne, r, d);
            }
        }

        // The base input gradient once per first-stage linear, then the LoRA part (through the mask).
        if (!dx.empty()) {
            for (Index f = 0; f < nf; ++f)
                base_->linear(first_[static_cast<std::size_t>(f)]).backward_input(dx, dH[static_cast<std::size_t>(f)], true);
            if (dropped_)
                for (Index i = 0; i < n * d; ++i) dXl.data[i] *= mask1_[static_cast<std::size_t>(i)];
            for (Index t = 0; t < n; ++t) kernels::axpy(dx.row_ptr(t), T(1), dXl.row_ptr(t), d);
        }
        if (rcfg_.has_weight())
            router_backward(dx, grads_.view("router.weight"), ConstMatrixView<T>(dgate.data(), n, k), lb_grad, xs,
                            router_weight(), route_, rcfg_);
    }

private:
    // Every buffer a kernel streams over is 64-byte aligned: a plain std::vector of this size comes from
    // mmap 16 bytes past a page, so each 64-byte load of a row would straddle two cache lines (the row
    // passes ran 25-30% slower on such H and dM rows).
    template <class U>
    using Aligned = comigs::detail::aligned_vector<U>;

    /// Whether the memory of two views overlaps (from the first row's start to the last row's end).
    static bool overlaps(ConstMatrixView<T> a, ConstMatrixView<T> b) {
        if (a.empty() || b.empty()) return false;
        const auto lo = [](ConstMatrixView<T> m) { return reinterpret_cast<std::uintptr_t>(m.data); };
        const auto hi = [](ConstMatrixView<T> m) { return reinterpret_cast<std::uintptr_t>(m.row_ptr(m.rows - 1) + m.cols); };
        return lo(a) < hi(b) && lo(b) < hi(a);
    }
    ConstMatrixView<T> router_weight() const {
        return rcfg_.has_weight() ? params_.view("router.weight") : ConstMatrixView<T>();
    }
    ConstMatrixView<T> A(Index e, const std::string& name) const { return params_.view(tensor_name(e, name, 'A')); }
    ConstMatrixView<T> B(Index e, const std::string& name) const { return params_.view(tensor_name(e, name, 'B')); }
    MatrixView<T> grad_A(Index e, const std::string& name) { return grads_.view(tensor_name(e, name, 'A')); }
    MatrixView<T> grad_B(Index e, const std::string& name) { return grads_.view(tensor_name(e, name, 'B')); }

    /// Buffers of [N, hidden] size that live only inside one forward or one backward call, shared by
    /// every mixture on the calling thread: a model of L mixtures holds one set instead of L (SmolLM2
    /// at 8 x 128 tokens: 62 MB instead of 30 x 44). What backward needs stays in the mixture itself.
    /// Taken on the calling thread only (never inside a parallel region: each thread has its own).
    struct Workspace {
        Aligned<T> m;                    ///< forward: m = sum_e g_e u_e, input of the second base GEMM
        Aligned<T> u, udrop;             ///< u of every routed row (general path; backward rebuilds it)
        Aligned<T> dm, dx;               ///< backward: dm = dy W2; the LoRA part of dx (general path)
        Aligned<T> dp[2], dh[2];         ///< backward, per first-stage linear: dp per routed row, dH per token
        Aligned<kernels::bf16> bf16;     ///< m (forward) or dH (backward) in bf16 for a bf16 base GEMM
        Aligned<kernels::bf16> bf16_up;  ///< SwiGLU backward: dH of the up linear in bf16
    };
    static Workspace& workspace() {
        thread_local Workspace ws;
        return ws;
    }

    /// The workspace's bf16 buffer as a [rows, cols] matrix (grown when needed).
    MatrixView<kernels::bf16> bf16_view(Index rows, Index cols, int which = 0) {
        auto& buf = which == 0 ? workspace().bf16 : workspace().bf16_up;
        if (buf.size() < static_cast<std::size_t>(rows * cols)) buf.resize(static_cast<std::size_t>(rows * cols));
        return MatrixView<kernels::bf16>(buf.data(), rows, cols);
    }
    /// The LoRA factors as [r, *] row blocks for the rank-r kernels: A1 and A2 point into params(); B1
    /// and B2 are transposed into fb1t_ / fb2t_ (they are stored [out, r]). Called by forward; the
    /// unfused backward calls it again (cheap: E (h + d) r elements), the fused one uses forward's.
    void prepare_factors() {
        const Index E = cfg_.n_experts, r = cfg_.rank, h = cfg_.d_hidden, d = cfg_.d_model;
        const std::size_t nf = first_.size();
        fa1_.assign(nf * static_cast<std::size_t>(E), nullptr);
        fa2_.assign(static_cast<std::size_t>(E), nullptr);
        fb1t_store_.resize(nf * static_cast<std::size_t>(E * r * h));
        // B2^T of every expert, [E r, d], then the second bias as one more row: the fused path
        // multiplies all of it at once ([s g z2 | sum g] and dy times this matrix).
        fb2t_store_.resize(static_cast<std::size_t>((E * r + 1) * d));
        fb1t_.assign(nf * static_cast<std::size_t>(E), nullptr);
        fb2t_.assign(static_cast<std::size_t>(E), nullptr);
        for (Index e = 0; e < E; ++e) {
            // An expert no token chose is never multiplied with: its transposes are skipped (decode
            // routes one token to k of E experts). Its pointers stay valid for the packing loops.
            const bool used = groups_.count(e) > 0;
            for (std::size_t f = 0; f < nf; ++f) {
                const std::size_t fe = f * static_cast<std::size_t>(E) + static_cast<std::size_t>(e);
                fa1_[fe] = A(e, first_[f]).data;
                T* bt = fb1t_store_.data() + static_cast<Index>(fe) * r * h;
                if (used) kernels::transpose_into(bt, B(e, first_[f]));
                fb1t_[fe] = bt;
            }
            fa2_[static_cast<std::size_t>(e)] = A(e, second_).data;
            T* b2t = fb2t_store_.data() + e * r * d;
            // An unused expert's rows are multiplied by zeros in the fused path's products: zeros, never
            // stale values (0 times inf or NaN would not be 0).
            if (used)
                kernels::transpose_into(b2t, B(e, second_));
            else
                std::fill_n(b2t, r * d, T(0));
            fb2t_[static_cast<std::size_t>(e)] = b2t;
        }
        const auto b2 = base_->linear(second_).bias;
        if (!b2.empty()) std::copy(b2.begin(), b2.end(), fb2t_store_.data() + E * r * d);
    }
    /// Columns of the fused path's small products with x: the router logits (E, when there is a
    /// router), then every expert's r LoRA inputs.
    Index router_cols() const { return rcfg_.has_weight() ? cfg_.n_experts : 0; }
    /// [router weight; scale A1_0; ...; scale A1_{E-1}] as one [E (+ nf E r), d] matrix (wcat_), the
    /// E r rows of each first-stage linear f (GELU fc; SwiGLU gate, then up) after those of f - 1.
    ConstMatrixView<T> stacked_first_inputs(Aligned<T>& buf, T scale) {
        const Index E = cfg_.n_experts, r = cfg_.rank, d = cfg_.d_model, er = router_cols();
        const Index nf = static_cast<Index>(first_.size());
        auto W = detail::as_view(buf, er + nf * E * r, d);
        if (er) {
            const auto wr = router_weight();
            for (Index e = 0; e < E; ++e) std::copy_n(wr.row_ptr(e), d, W.row_ptr(e));
        }
        for (Index f = 0; f < nf; ++f)
            for (Index e = 0; e < E; ++e) {
                const auto a1 = A(e, first_[static_cast<std::size_t>(f)]);
                for (Index q = 0; q < r; ++q) {
                    T* dst = W.row_ptr(er + (f * E + e) * r + q);
                    for (Index c = 0; c < d; ++c) dst[c] = scale * a1(q, c);
                }
            }
        return W;
    }

    /// Forward through the one-pass kernels (kernels/fused.hpp; GELU, or SwiGLU with gate and up side by
    /// side), routing included.
    /// Per routed row i = t k + j (token-major): zs = s A1e x, z2 = A2e u; nothing of size
    /// [rows, hidden] is kept: backward recomputes u from H. The model-width products (router logits,
    /// s A1 x, and y's LoRA part with the second bias) are small GEMMs over every expert's columns:
    /// twice the multiply-adds of k rank-r products per token, in a fraction of their time.
    /// x is the caller's input, copied into xs_out (kept for backward; empty: x is borrowed) in the first
    /// product's region.
    void forward_fused(MatrixView<T> y, ConstMatrixView<T> x, MatrixView<T> xs_out, bool training, Rng* rng) {
        const Index n = x.rows, d = cfg_.d_model, h = cfg_.d_hidden, r = cfg_.rank, E = cfg_.n_experts;
        const Index nf = static_cast<Index>(first_.size()), er = router_cols(), pc = er + nf * E * r;
        const auto P = detail::as_view(pcat_, n, pc);
        // H = x W1^T without the bias: the row passes add it while H is in registers.
        auto fc = base_->linear(first_[0]);
        const auto b1 = fc.bias;
        fc.bias = {};
        pre_.resize(static_cast<std::size_t>(nf));
        const auto H = detail::as_view(pre_[0], n, h);
        using Prod = kernels::GemmProduct<T>;
        const Prod proj{P, x, kernels::Op::none, stacked_first_inputs(wcat_, s_), kernels::Op::trans};
        const auto copy_x = [&](Index t) {
            if (xs_out.data) std::copy(x.row_ptr(t), x.row_ptr(t) + d, xs_out.row_ptr(t));
        };
        // SwiGLU's up linear (Hu = x Wu^T; its bias added by the row passes too).
        auto up = nf > 1 ? base_->linear(first_[1]) : fc;
        const auto bu = up.bias;
        if (nf > 1) up.bias = {};
        // Both first linears in bf16 products: x rounded to bf16 once for the two (the bf16 slot of the
        // backward's dHu is free in the forward).
        bool up_done = false;
        if (!fc.is_plain()) {  // bf16 or quantized: the base product runs through its own kernels
            kernels::gemm_chunked_and<T>({proj}, n, n * d, copy_x);
            if constexpr (std::is_same_v<T, float>) {
                if (nf > 1 && fc.takes_bf16_activations() && up.takes_bf16_activations() && n > 0 && d > 0) {
                    const auto xb = bf16_view(n, d, 1);
                    kernels::convert_rows_to_bf16(xb.data, x);
                    fc.forward(H, ConstMatrixView<kernels::bf16>(xb));
                    up.forward(detail::as_view(pre_[1], n, h), ConstMatrixView<kernels::bf16>(xb));
                    up_done = true;
                }
            }
            if (!up_done) fc.forward(H, xs_out.data ? ConstMatrixView<T>(xs_out) : x);
        } else {  // the small product and the copy on the threads done with their part of H
            kernels::gemm_with<T>({H, x, kernels::Op::none, fc.weight, kernels::Op::trans}, {}, {proj}, n, n * d, copy_x);
        }
        if (nf > 1 && !up_done) up.forward(detail::as_view(pre_[1], n, h), x);
        router_forward_logits(route_, ConstMatrixView<T>(P.data, n, er, pc), rcfg_, training, rng);
        groups_.build(route_);
        const Index k = route_.slots, rows = n * k;
        prepare_factors();
        // zs = s A1 x per routed row and first-stage linear: [nf][rows, r].
        T* zs = detail::as_view(rz1_, nf * rows, r).data;
        for (Index f = 0; f < nf; ++f)
            for (Index i = 0; i < rows; ++i)
                std::copy_n(P.row_ptr(i / k) + er + (f * E + route_.expert[static_cast<std::size_t>(i)]) * r, r,
                            zs + (f * rows + i) * r);
        T* z2 = detail::as_view(rz2_, rows, r).data;
        auto second = base_->linear(second_);
        // With the second weight in bf16 the row pass writes m in bf16 itself (no conversion pass, no
        // fp32 m at all).
        const auto Mb = second.is_bf16() ? bf16_view(n, h) : MatrixView<kernels::bf16>();
        const auto M = Mb.data ? MatrixView<T>() : detail::as_view(workspace().m, n, h);
        if (nf == 1)
            kernels::gelu_mixture_forward(M, z2, ConstMatrixView<T>(H), b1.empty() ? nullptr : b1.data(), k,
                                          route_.expert.data(), route_.gate.data(), zs, fb1t_.data(), fa2_.data(), E, r,
                                          part_, Mb);
        else
            kernels::swiglu_mixture_forward(M, z2, ConstMatrixView<T>(H), ConstMatrixView<T>(pre_[1].data(), n, h),
                                            b1.empty() ? nullptr : b1.data(), bu.empty() ? nullptr : bu.data(), k,
                                            route_.expert.data(), route_.gate.data(), zs, zs + rows * r, fb1t_.data(),
                                            fb1t_.data() + E, fa2_.data(), E, r, part_, Mb);

        // y = W2 m (one base GEMM) + [s g z2 per expert | sum g] [B2^T; b2] (one small GEMM; the
        // unchosen experts' columns are zero). The left factor is kept: backward's dB2 is its
        // transpose times dy.
        const bool bias2 = !second.bias.empty();
        second.bias = {};
        const Index zc = E * r + 1;
        const auto Z = detail::as_view(zfull_, n, zc);
        std::fill_n(Z.data, n * zc, T(0));
        for (Index t = 0; t < n; ++t) {
            T* zt = Z.row_ptr(t);
            for (Index j = 0; j < k; ++j) {
                const Index i = t * k + j;
                const T g = route_.gate[static_cast<std::size_t>(i)];
                T* dst = zt + route_.expert[static_cast<std::size_t>(i)] * r;
                for (Index c = 0; c < r; ++c) dst[c] = s_ * g * z2[i * r + c];
                zt[E * r] += g;
            }
        }
        const Prod lora{y, ConstMatrixView<T>(Z.data, n, bias2 ? zc : E * r, zc), kernels::Op::none,
                        ConstMatrixView<T>(fb2t_store_.data(), bias2 ? zc : E * r, d), kernels::Op::none, T(1), T(1)};
        if (!second.is_plain()) {
            if constexpr (std::is_same_v<T, float>) {
                if (Mb.data) second.forward(y, ConstMatrixView<kernels::bf16>(Mb));
            }
            if (!Mb.data) second.forward(y, ConstMatrixView<T>(M));
            kernels::gemm_chunked<T>({lora});
        } else {  // each thread adds the LoRA part to its rows of y while they are in its cache
            kernels::gemm_with<T>({y, ConstMatrixView<T>(M), kernels::Op::none, second.weight, kernels::Op::trans},
                                  {lora}, {}, 0, 0, [](Index) {});
        }
    }

    /// Backward of forward_fused (with the factors it prepared).
    void backward_fused(MatrixView<T> dx, ConstMatrixView<T> dy, T lb_grad) {
        const Index n = n_, d = cfg_.d_model, h = cfg_.d_hidden, E = cfg_.n_experts, r = cfg_.rank;
        const Index nf = static_cast<Index>(first_.size());
        const Index k = route_.slots, rows = n * k, er = router_cols(), pc = er + nf * E * r, zc = E * r + 1;
        const ConstMatrixView<T> xs = xk_;
        const auto fc = base_->linear(first_[0]);
        const auto up = base_->linear(first_[nf > 1 ? 1 : 0]);  // SwiGLU's up linear (GELU: unused)
        const auto second = base_->linear(second_);
        const T* b1 = fc.bias.empty() ? nullptr : fc.bias.data();
        const bool bias2 = !second.bias.empty();

        Workspace& ws = workspace();
        const auto dM = detail::as_view(ws.dm, n, h);

        // dy [B2^T; b2]^T for every expert (one small GEMM): per routed row q = B2e^T dy and
        // qg = g s q, per token b2 . dy (for the gate gradient).
        const auto Qf = detail::as_view(qfull_, n, zc);
        // b2 . dy as a product of its own: E r + 1 columns in one product cost a whole vector tail
        // (0.25 against 0.21 ms for both in a warm loop).
        using Prod = kernels::GemmProduct<T>;
        const Prod pq{MatrixView<T>(Qf.data, n, E * r, zc), dy, kernels::Op::none,
                      ConstMatrixView<T>(fb2t_store_.data(), E * r, d), kernels::Op::trans};
        const Prod pb{MatrixView<T>(Qf.data + E * r, n, 1, zc), dy, kernels::Op::none,
                      ConstMatrixView<T>(fb2t_store_.data() + E * r * d, 1, d), kernels::Op::trans};
        // dm = dy W2 (one base GEMM), with the small products on the threads done with their part.
        const auto with_dm = [&](std::initializer_list<Prod> small) {
            if (!second.is_plain()) {
                second.backward_input(dM, dy, false);
                kernels::gemm_chunked<T>(small);
            } else {
                kernels::gemm_with<T>({dM, dy, kernels::Op::none, second.weight, kernels::Op::none}, {}, small, 0, 0,
                                      [](Index) {});
            }
        };
        if (bias2)
            with_dm({pq, pb});
        else
            with_dm({pq});
        T* q = detail::as_view(rq_, rows, r).data;
        T* qg = detail::as_view(rqg_, rows, r).data;
        for (Index i = 0; i < rows; ++i) {
            const T* src = Qf.row_ptr(i / k) + route_.expert[static_cast<std::size_t>(i)] * r;
            const T g = route_.gate[static_cast<std::size_t>(i)];
            for (Index c = 0; c < r; ++c) {
                q[i * r + c] = src[c];
                qg[i * r + c] = g * s_ * src[c];
            }
        }

        // The hidden-size pass: dH (input of the base input-gradient GEMM), dz = s B1^T dp, u . dm, and
        // the gradients of A2 (in place) and B1 (transposed in gb1t_).
        // dH in bf16 straight from the row pass when it feeds a bf16 product (then no fp32 dH at all).
        const auto dHb = !dx.empty() && fc.is_bf16() ? bf16_view(n, h) : MatrixView<kernels::bf16>();
        const auto dH = dHb.data ? MatrixView<T>() : detail::as_view(ws.dh[0], n, h);
        // SwiGLU: dHu likewise (its own bf16 buffer).
        const auto dHub = nf > 1 && !dx.empty() && up.is_bf16() ? bf16_view(n, h, 1) : MatrixView<kernels::bf16>();
        const auto dHu = nf > 1 && !dHub.data ? detail::as_view(ws.dh[1], n, h) : MatrixView<T>();
        T* dz = detail::as_view(rdz_, nf * rows, r).data;  // [nf][rows, r]
        T* udm = detail::as_view(rudm_, rows, 1).data;
        detail::as_view(gb1t_, nf * E * r, h);
        gA2_.resize(static_cast<std::size_t>(E));
        gB1_.resize(static_cast<std::size_t>(nf * E));
        Index ldg = h;
        for (Index e = 0; e < E; ++e) {
            const auto ga2 = grad_A(e, second_);
            ldg = ga2.stride;
            gA2_[static_cast<std::size_t>(e)] = ga2.data;
            for (Index f = 0; f < nf; ++f) gB1_[static_cast<std::size_t>(f * E + e)] = gb1t_.data() + (f * E + e) * r * h;
        }
        if (nf == 1)
            kernels::gelu_mixture_backward(dH, dz, udm, ConstMatrixView<T>(dM), ConstMatrixView<T>(pre_[0].data(), n, h),
                                           b1, k, route_.expert.data(), route_.gate.data(), rz1_.data(), qg,
                                           fb1t_.data(), fa2_.data(), gA2_.data(), ldg, gB1_.data(), E, s_, r, part_, dHb);
        else
            kernels::swiglu_mixture_backward(
                dH, dHu, dz, dz + rows * r, udm, ConstMatrixView<T>(dM), ConstMatrixView<T>(pre_[0].data(), n, h),
                ConstMatrixView<T>(pre_[1].data(), n, h), b1, up.bias.empty() ? nullptr : up.bias.data(), k,
                route_.expert.data(), route_.gate.data(), rz1_.data(), rz1_.data() + rows * r, qg, fb1t_.data(),
                fb1t_.data() + E, fa2_.data(), gA2_.data(), ldg, gB1_.data(), gB1_.data() + E, E, s_, r, part_, dHb, dHub);
        for (Index f = 0; f < nf; ++f)
            for (Index e = 0; e < E; ++e)
                kernels::add_transposed(grad_B(e, first_[static_cast<std::size_t>(f)]),
                                        gB1_[static_cast<std::size_t>(f * E + e)]);

        // The gate gradients, then the model width in three small GEMMs over every expert's columns
        // (zero where a token did not choose the expert), with D = [dL/d logits | dz]:
        //   dx += D [router weight; A1],  [dW_router; dA1] += D^T x,  dB2^T += [s g z2]^T dy.
        const T* z2 = rz2_.data();
        std::vector<T>& dgate = dgate_;
        dgate.resize(static_cast<std::size_t>(rows));
        for (Index i = 0; i < rows; ++i)
            dgate[static_cast<std::size_t>(i)] = udm[i] + (bias2 ? Qf(i / k, E * r) : T(0)) +
                                                 s_ * kernels::dot(z2 + i * r, q + i * r, r);
        if (er) router_logit_grad(dlog_, ConstMatrixView<T>(dgate.data(), n, k), lb_grad, route_, rcfg_);
        const auto D = detail::as_view(dfull_, n, pc);
        std::fill_n(D.data, n * pc, T(0));
        for (Index t = 0; t < n; ++t) {
            T* dt = D.row_ptr(t);
            if (er) std::copy_n(dlog_.data() + t * E, E, dt);
            for (Index f = 0; f < nf; ++f)
                for (Index j = 0; j < k; ++j) {
                    const Index i = t * k + j;
                    std::copy_n(dz + (f * rows + i) * r, r, dt + er + (f * E + route_.expert[static_cast<std::size_t>(i)]) * r);
                }
        }
        const auto W = stacked_first_inputs(wcat_, T(1));
        const auto G = detail::as_view(work_t_, pc, d);    // [dW_router; dA1]
        const auto GB = detail::as_view(gbt_, E * r, d);   // dB2^T
        const ConstMatrixView<T> Dc(D), Zc(zfull_.data(), n, E * r, zc);
        const Prod gw{G, Dc, kernels::Op::trans, xs, kernels::Op::none}, gb{GB, Zc, kernels::Op::trans, dy, kernels::Op::none};
        // The base input gradient dx += dH W1 in the same region when W1 is fp32 (dx += D [..] added to
        // each thread's rows after them); with a bf16 W1 after the gradients below.
        const bool dx_here = !dx.empty() && fc.is_plain();
        if (dx.empty())
            kernels::gemm_chunked<T>({gw, gb});
        else if (dx_here)
            kernels::gemm_with<T>({dx, ConstMatrixView<T>(dH), kernels::Op::none, fc.weight, kernels::Op::none, T(1), T(1)},
                                  {Prod{dx, Dc, kernels::Op::none, W, kernels::Op::none, T(1), T(1)}}, {gw, gb}, 0, 0,
                                  [](Index) {});
        else
            kernels::gemm_chunked<T>({gw, gb, Prod{dx, Dc, kernels::Op::none, W, kernels::Op::none, T(1), T(1)}});
        if (er) {
            auto gwr = grads_.view("router.weight");
            for (Index e = 0; e < E; ++e) kernels::axpy(gwr.row_ptr(e), T(1), G.row_ptr(e), d);
        }
        for (Index e = 0; e < E; ++e) {
            for (Index f = 0; f < nf; ++f) {
                auto ga1 = grad_A(e, first_[static_cast<std::size_t>(f)]);
                for (Index q2 = 0; q2 < r; ++q2)
                    kernels::axpy(ga1.row_ptr(q2), T(1), G.row_ptr(er + (f * E + e) * r + q2), d);
            }
            if (groups_.count(e) > 0) kernels::add_transposed(grad_B(e, second_), GB.data + e * r * d);
        }

        // The base input gradient: one GEMM, accumulated into dx.
        if (dHb.data) {
            if constexpr (std::is_same_v<T, float>) fc.backward_input(dx, ConstMatrixView<kernels::bf16>(dHb), true);
        } else if (!dx.empty() && !dx_here) {
            fc.backward_input(dx, ConstMatrixView<T>(dH), true);
        }
        // SwiGLU: the up linear's, likewise.
        if (dHub.data) {
            if constexpr (std::is_same_v<T, float>) up.backward_input(dx, ConstMatrixView<kernels::bf16>(dHub), true);
        } else if (nf > 1 && !dx.empty()) {
            up.backward_input(dx, ConstMatrixView<T>(dHu), true);
        }
    }

    /// Whether the one-pass row kernels (kernels/fused.hpp) apply: no dropout, r <= 8 (GELU or SwiGLU).
    bool fused_path() const {
        // The fused passes round m and dH to bf16 for a bf16 weight: a bf16 base asking for fp32
        // arithmetic on its values takes the general path (a quantized one multiplies through its own
        // kernels either way).
        const auto exact_bf16 = [&](const std::string& name) {
            const auto l = base_->linear(name);
            return l.is_bf16() && l.fp32_compute;
        };
        return kernels::detail::fused_rows_enabled() && !dropped_ && cfg_.rank <= kernels::fused_max_rank &&
               std::none_of(first_.begin(), first_.end(), exact_bf16) && !exact_bf16(second_);
    }
    /// Factor (f, e) of a table filled by prepare_factors().
    const T* factor(const std::vector<const T*>& table, Index f, Index e) const {
        return table[static_cast<std::size_t>(f * cfg_.n_experts + e)];
    }

    /// p[f * h + c] = H_f[t, c] + s z1_f[t, e] B_fe^T (the first-stage pre-activations of token t
    /// routed to expert e), for every first-stage linear f.
    void preactivations(T* p, Index t, Index e) const {
        const Index h = cfg_.d_hidden, r = cfg_.rank, E = cfg_.n_experts;
        for (std::size_t f = 0; f < first_.size(); ++f) {
            kernels::lowrank_add(p + static_cast<Index>(f) * h, pre_[f].data() + t * h, z1_[f].data() + t * E * r + e * r,
                                 factor(fb1t_, static_cast<Index>(f), e), r, h, s_);
        }
    }

    /// Expert e's block of a [N, E * r] matrix, gathered at e's routed tokens: [n_e, r].
    MatrixView<T> gather_block(ConstMatrixView<T> m, Index e) {
        const Index r = cfg_.rank, ne = groups_.count(e), b = groups_.begin(e);
        auto out = detail::as_view(work_gather_, ne, r);
        for (Index i = 0; i < ne; ++i) {
            const T* s = m.row_ptr(groups_.token[static_cast<std::size_t>(b + i)]) + e * r;
            std::copy(s, s + r, out.row_ptr(i));
        }
        return out;
    }

    MixtureConfig cfg_;
    RouterConfig rcfg_;
    std::shared_ptr<const FrozenMlp<T>> base_;
    T s_{};
    std::vector<std::string> first_;
    std::string second_;
    ParamBuffer<T> params_, grads_;

    // Saved by forward for backward.
    Index n_ = 0;
    bool complete_ = false;  // the last forward ran to its end: what follows is consistent
    bool dropped_ = false;
    bool fused_ = false;  // forward took forward_fused: backward takes backward_fused
    // Per routed row (token-major, fused path): zs = s A1 x, z2 = A2 u, s g z2; backward's q, g s q,
    // dz and u . dm; dB1 transposed per expert; the chunk partial sums of the fused kernels.
    std::vector<T> rz1_, rz2_, rq_, rqg_, rdz_, rudm_, gb1t_, part_;
    std::vector<T*> gA2_, gB1_;
    RoutingResult<T> route_;
    detail::ExpertGroups groups_;
    // Every buffer a kernel streams over is Aligned (below).
    Aligned<T> x_, xdrop_;  // the copy of x (unless borrowed), x with dropout
    ConstMatrixView<T> xk_;  // x as backward reads it: x_ or the caller's borrowed x
    std::vector<T> mask1_, mask2_, z2_, z2s_;
    std::vector<Aligned<T>> pre_;  // per first-stage linear: H [N, h]
    std::vector<std::vector<T>> z1_;  // per first-stage linear: z1 [N, E r]
    // LoRA factors as [r, *] rows (prepare_factors).
    std::vector<const T*> fa1_, fa2_, fb1t_, fb2t_;
    Aligned<T> fb1t_store_, fb2t_store_;
    // Small work space reused between calls (the [N, hidden] ones are in workspace()).
    Aligned<T> work_t_;
    // The fused path's small products: stacked [router weight; A1], x times it, [s g z2 | sum g],
    // dy [B2^T; b2]^T and [dL/d logits | dz].
    Aligned<T> wcat_, pcat_, zfull_, qfull_, dfull_, gbt_;
    std::vector<T> work_r_, work_gather_, dgate_, dlog_;
    std::vector<std::vector<T>> dz_;
};

}  // namespace comigs
