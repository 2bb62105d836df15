#pragma once
// A mixture of LoRA experts on a single frozen linear map (attention projections, LM heads...):
//   expert_e(x) = W x + b + s B_e A_e x,   y = sum over chosen e of g_e expert_e(x)
//              = (sum g) (W x + b) + sum_e g_e s B_e A_e x
// with the same router and roles as MixtureOfLoraMlp. The frozen W is a view: it stays where the host
// keeps it (one copy), and must outlive the layer.
#include <string>
#include <string_view>
#include <vector>

#include "frozen.hpp"
#include "lora.hpp"
#include "mixture.hpp"
#include "router.hpp"

namespace comigs {

/// Options of a MixtureOfLoraLinear; the router sees the layer input (d_model = in_features).
struct MixtureLinearConfig : MixtureRouting {
    Index in_features = 0;
    Index out_features = 0;
    Index rank = 8;
    double alpha = 16.0;
    LoraScaling scaling = LoraScaling::sqrt;

    RouterConfig router() const { return router_for(in_features); }
    void validate() const {
        require(in_features >= 1, "in_features ", in_features, ": must be >= 1");
        require(out_features >= 1, "out_features ", out_features, ": must be >= 1");
        require(rank >= 1, "rank ", rank, ": LoRA rank must be >= 1");
        require(std::isfinite(lora_scale(alpha, rank, scaling)), "alpha ", alpha, ": LoRA scale not finite");
        validate_routing(in_features);
    }
};

/// Mixture of LoRA experts over one frozen linear map. Trainable tensors: `router.weight` [E, in] (top-k
/// with E > 1), then per expert `experts.{e}.lora_A` [r, in] and `experts.{e}.lora_B` [out, r].
template <class T>
class MixtureOfLoraLinear {
public:
    MixtureOfLoraLinear(const MixtureLinearConfig& cfg, FrozenLinear<T> base) : cfg_(cfg), base_(base) {
        cfg_.validate();
        require<ShapeError>(base_.out_features() == cfg_.out_features && base_.in_features() == cfg_.in_features,
                            "frozen weight has shape [", base_.out_features(), ", ", base_.in_features(),
                            "], expected [", cfg_.out_features, ", ", cfg_.in_features, "]");
        require<ShapeError>(base_.bias.empty() || static_cast<Index>(base_.bias.size()) == cfg_.out_features,
                            "frozen bias has ", base_.bias.size(), " elements, expected ", cfg_.out_features);
        rcfg_ = cfg_.router();
        s_ = static_cast<T>(lora_scale(cfg_.alpha, cfg_.rank, cfg_.scaling));
        ParamLayout l;
        if (rcfg_.has_weight()) l.add("router.weight", {cfg_.n_experts, cfg_.in_features});
        for (Index e = 0; e < cfg_.n_experts; ++e) {
            l.add(tensor_name(e, 'A'), {cfg_.rank, cfg_.in_features});
            l.add(tensor_name(e, 'B'), {cfg_.out_features, cfg_.rank});
        }
        params_ = ParamBuffer<T>(std::move(l));
        grads_ = ParamBuffer<T>(params_.layout_ptr());
    }

    static std::string tensor_name(Index e, char which) {
        return "experts." + std::to_string(e) + (which == 'A' ? ".lora_A" : ".lora_B");
    }

    /// Router N(0, 0.02), A Kaiming-uniform, B zero.
    void init(Rng& rng) {
        if (rcfg_.has_weight())
            for (T& v : params_.span("router.weight")) v = static_cast<T>(rng.normal(0.0, 0.02));
        for (Index e = 0; e < cfg_.n_experts; ++e) {
            kaiming_uniform(params_.view(tensor_name(e, 'A')), rng);
            for (T& v : params_.span(tensor_name(e, 'B'))) v = T(0);
        }
    }

    const MixtureLinearConfig& config() const { return cfg_; }
    Role role(Index e) const { return cfg_.role(e); }
    T scale() const { return s_; }
    ParamBuffer<T>& params() { return params_; }
    ParamBuffer<T>& grads() { return grads_; }
    const ParamBuffer<T>& params() const { return params_; }
    const ParamBuffer<T>& grads() const { return grads_; }
    void zero_grad() { grads_.zero(); }
    const RoutingResult<T>& routing() const { return route_; }

    static Index expert_of_tensor(std::string_view tensor) { return comigs::expert_of_tensor(tensor); }
    /// True when the tensor belongs to a generalist (it may leave the device); false for specialists
    /// and the router, which never do.
    bool shared(std::string_view tensor) const { return cfg_.shares(tensor); }

    /// y[N, out] = mixture(x[N, in]) (overwritten); returns the load-balancing loss. Keeps a copy of x.
    double forward(MatrixView<T> y, ConstMatrixView<T> x, bool training = false, Rng* rng = nullptr) {
        const Index n = x.rows, din = cfg_.in_features, dout = cfg_.out_features, E = cfg_.n_experts, r = cfg_.rank;
        require_shape(x, n, din, "mixture input x");
        require_shape(y, n, dout, "mixture output y");
        // Checked before anything is overwritten: a refused forward leaves the last one to backward.
        require(rng != nullptr || !rcfg_.draws_noise(training), "rng: router noise in training needs a generator");
        complete_ = false;
        n_ = n;
        x_.resize(static_cast<std::size_t>(n * din));
        MatrixView<T> xs(x_.data(), n, din);
        for (Index t = 0; t < n; ++t) std::copy(x.row_ptr(t), x.row_ptr(t) + din, xs.row_ptr(t));
        router_forward(route_, ConstMatrixView<T>(xs), router_weight(), rcfg_, training, rng);
        const Index k = route_.slots;
        auto Y0 = detail::as_view(y0_, n, dout);
        base_.forward(Y0, xs);
        auto Z = detail::as_view(z_, n, E * r);
        auto Zs = detail::as_view(zs_, n, E * r);
        for (Index e = 0; e < E; ++e)
            kernels::gemm<T>(detail::block(Z, e, r), xs, kernels::Op::none, A(e), kernels::Op::trans);
        std::fill(Zs.data, Zs.data + n * E * r, T(0));
        for (Index t = 0; t < n; ++t) {
            T gsum = T(0);
            for (Index j = 0; j < k; ++j) {
                const Index e = route_.expert_of(t, j);
                const T g = route_.gate_of(t, j);
                gsum += g;
                for (Index c = 0; c < r; ++c) Zs(t, e * r + c) = g * s_ * Z(t, e * r + c);
            }
            for (Index c = 0; c < dout; ++c) y(t, c) = gsum * Y0(t, c);
        }
        for (Index e = 0; e < E; ++e)
            kernels::gemm<T>(y, detail::block(Zs, e, r), kernels::Op::none, B(e), kernels::Op::trans, T(1), T(1));
        complete_ = true;
        return route_.lb_loss;
    }

    /// Accumulates parameter gradients and dx[N, in] (empty view: skipped) from dy[N, out].
    void backward(MatrixView<T> dx, ConstMatrixView<T> dy, T lb_grad) {
        const Index n = n_, din = cfg_.in_features, dout = cfg_.out_features, E = cfg_.n_experts, r = cfg_.rank;
        require(complete_ || (n == 0 && dy.rows == 0), "mixture backward: no completed forward to differentiate");
        require_shape(dy, n, dout, "mixture output gradient dy");
        if (!dx.empty()) require_shape(dx, n, din, "mixture input gradient dx");
        const Index k = route_.slots;
        const ConstMatrixView<T> xs(x_.data(), n, din), Y0(y0_.data(), n, dout), Z(z_.data(), n, E * r),
            Zs(zs_.data(), n, E * r);
        auto Q = detail::as_view(q_, n, E * r);
        for (Index e = 0; e < E; ++e)
            kernels::gemm<T>(detail::block(Q, e, r), dy, kernels::Op::none, B(e), kernels::Op::none);
        auto dZ = detail::as_view(dz_, n, E * r);
        std::fill(dZ.data, dZ.data + n * E * r, T(0));
        auto dY0 = detail::as_view(dy0_, n, dout);
        dgate_.assign(static_cast<std::size_t>(n * k), T(0));
        for (Index t = 0; t < n; ++t) {
            T gsum = T(0);
            double base_dot = 0.0;
            for (Index c = 0; c < dout; ++c) base_dot += static_cast<double>(Y0(t, c)) * static_cast<double>(dy(t, c));
            for (Index j = 0; j < k; ++j) {
                const Index e = route_.expert_of(t, j);
                const T g = route_.gate_of(t, j);
                gsum += g;
                double zq = 0.0;
                for (Index c = 0; c < r; ++c) {
                    zq += static_cast<double>(Z(t, e * r + c)) * static_cast<double>(Q(t, e * r + c));
                    dZ(t, e * r + c) = g * s_ * Q(t, e * r + c);
                }
                dgate_[static_cast<std::size_t>(t * k + j)] = static_cast<T>(base_dot + static_cast<double>(s_) * zq);
            }
            for (Index c = 0; c < dout; ++c) dY0(t, c) = gsum * dy(t, c);
        }
        for (Index e = 0; e < E; ++e) {
            kernels::gemm<T>(grads_.view(tensor_name(e, 'B')), dy, kernels::Op::trans, detail::block(Zs, e, r),
                             kernels::Op::none, T(1), T(1));
            kernels::gemm<T>(grads_.view(tensor_name(e, 'A')), detail::block(dZ, e, r), kernels::Op::trans, xs,
                             kernels::Op::none, T(1), T(1));
            if (!dx.empty())
                kernels::gemm<T>(dx, detail::block(dZ, e, r), kernels::Op::none, A(e), kernels::Op::none, T(1), T(1));
        }
        if (!dx.empty()) base_.backward_input(dx, dY0, true);
        if (rcfg_.has_weight())
            router_backward(dx, grads_.view("router.weight"), ConstMatrixView<T>(dgate_.data(), n, k), lb_grad, xs,
                            router_weight(), route_, rcfg_);
    }

private:
    ConstMatrixView<T> router_weight() const {
        return rcfg_.has_weight() ? params_.view("router.weight") : ConstMatrixView<T>();
    }
    ConstMatrixView<T> A(Index e) const { return params_.view(tensor_name(e, 'A')); }
    ConstMatrixView<T> B(Index e) const { return params_.view(tensor_name(e, 'B')); }

    MixtureLinearConfig cfg_;
    RouterConfig rcfg_;
    FrozenLinear<T> base_;
    T s_{};
    ParamBuffer<T> params_, grads_;
    Index n_ = 0;
    bool complete_ = false;  // the last forward ran to its end
    RoutingResult<T> route_;
    std::vector<T> x_, y0_, z_, zs_, q_, dz_, dy0_, dgate_;
};

}  // namespace comigs
