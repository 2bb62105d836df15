#pragma once
// A tiny HostModel for the trainer and strategy tests: one mixture of LoRA experts over a frozen GELU
// MLP plus an optional plain LoRA "head" adapter on the input (a shared adapter, like the reference's
// attention LoRA), fitted to regression targets by mean squared error:
//   out = mixture(x) + head(x),   loss = mean((out - y)^2) over all N x d elements.
// Batches can carry faults (NaN loss, NaN or huge gradients on experts or routers) to test the
// trainer's step skipping and gradient isolation.
#include <comigs/model.hpp>
#include <comigs/random.hpp>

#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

namespace comigs_test {

using comigs::Index;

enum class Fault {
    none,
    nan_loss,          ///< the reported task loss is NaN (gradients stay finite)
    nan_expert_grads,  ///< every non-router gradient becomes NaN
    nan_router_grads,  ///< every router gradient becomes NaN
    huge_expert_grads, ///< 1e6 added to every non-router gradient
    huge_router_grads, ///< 1e6 added to every router gradient
};

template <class T>
struct RegressionBatch {
    Index n = 0;
    std::vector<T> x, y;  // [n, d] each
    Fault fault = Fault::none;
};

struct TinyHostConfig {
    Index d = 4;
    Index hidden = 8;
    Index n_experts = 2;
    Index top_k = 2;
    Index rank = 2;
    comigs::Routing routing = comigs::Routing::top_k;
    std::vector<comigs::Role> roles;  // empty: generalist, specialist, ...
    Index head_rank = 2;              // 0: no head adapter
    double lb_weight = 0.01;
};

template <class T>
class TinyHost {
public:
    using scalar_type = T;

    TinyHost(const TinyHostConfig& cfg, std::shared_ptr<const comigs::FrozenMlp<T>> base, comigs::Rng& init_rng)
        : cfg_(cfg), mix_(mixture_config(cfg), std::move(base)) {
        mix_.init(init_rng);
        // Random B so that the mixture's experts differ from the start (B = 0 would make every
        // gradient of A zero and routing irrelevant in the first step).
        for (const auto& spec : mix_.params().layout().tensors())
            if (spec.name.ends_with("lora_B"))
                for (T& v : mix_.params().span(spec.name)) v = static_cast<T>(init_rng.normal(0.0, 0.1));
        if (cfg.head_rank > 0) {
            head_.emplace(comigs::LoraConfig{cfg.d, cfg.d, cfg.head_rank});
            head_->init(init_rng);
            for (T& v : head_->params().span("lora_B")) v = static_cast<T>(init_rng.normal(0.0, 0.1));
        }
    }
    TinyHost(const TinyHost&) = delete;
    TinyHost& operator=(const TinyHost&) = delete;

    static comigs::MixtureConfig mixture_config(const TinyHostConfig& c) {
        comigs::MixtureConfig m;
        m.d_model = c.d;
        m.d_hidden = c.hidden;
        m.n_experts = c.n_experts;
        m.top_k = std::min(c.top_k, c.n_experts);
        m.rank = c.rank;
        m.routing = c.routing;
        m.roles = c.roles;
        return m;
    }

    comigs::AdapterRegistry<T> adapters() {
        comigs::AdapterRegistry<T> r;
        r.mixtures.push_back({"layer0.mlp.", &mix_});
        if (head_) r.shared_adapters.push_back({"head.", &*head_});
        return r;
    }

    comigs::LossParts forward_backward(const RegressionBatch<T>& b) {
        const comigs::LossParts lp = run(b, true);
        const Index n = b.n, d = cfg_.d;
        std::vector<T> dy(static_cast<std::size_t>(n * d));
        const T c = T(2) / static_cast<T>(n * d);
        for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = c * (out_[i] - b.y[i]);
        const comigs::ConstMatrixView<T> dyv(dy.data(), n, d);
        mix_.backward(comigs::MatrixView<T>(), dyv, static_cast<T>(cfg_.lb_weight));
        if (head_) head_->backward(comigs::MatrixView<T>(), dyv);
        apply_fault(b.fault);
        comigs::LossParts out = lp;
        if (b.fault == Fault::nan_loss) out.task = std::numeric_limits<double>::quiet_NaN();
        ++backward_calls;
        return out;
    }

    comigs::LossParts evaluate(const RegressionBatch<T>& b) { return run(b, false); }

    comigs::MixtureOfLoraMlp<T>& mixture() { return mix_; }
    comigs::LoraExpert<T>* head() { return head_ ? &*head_ : nullptr; }
    const TinyHostConfig& config() const { return cfg_; }
    Index backward_calls = 0;

private:
    comigs::LossParts run(const RegressionBatch<T>& b, bool training) {
        const Index n = b.n, d = cfg_.d;
        out_.assign(static_cast<std::size_t>(n * d), T(0));
        comigs::MatrixView<T> y(out_.data(), n, d);
        const comigs::ConstMatrixView<T> x(b.x.data(), n, d);
        comigs::LossParts lp;
        lp.balance = mix_.forward(y, x, training);
        if (head_) head_->forward(y, x, training);
        double se = 0;
        for (std::size_t i = 0; i < out_.size(); ++i) {
            const double e = static_cast<double>(out_[i]) - static_cast<double>(b.y[i]);
            se += e * e;
        }
        lp.task = se / static_cast<double>(n * d);
        lp.tokens = static_cast<double>(n);
        return lp;
    }

    void apply_fault(Fault f) {
        const bool experts = f == Fault::nan_expert_grads || f == Fault::huge_expert_grads;
        const bool routers = f == Fault::nan_router_grads || f == Fault::huge_router_grads;
        if (!experts && !routers) return;
        const bool nan = f == Fault::nan_expert_grads || f == Fault::nan_router_grads;
        adapters().for_each_buffer([&](const std::string&, comigs::ParamBuffer<T>&, comigs::ParamBuffer<T>& g) {
            for (const auto& spec : g.layout().tensors()) {
                const bool is_router = spec.name == "router.weight";
                if (is_router != routers) continue;
                for (T& v : g.span(spec.name)) v = nan ? std::numeric_limits<T>::quiet_NaN() : v + T(1e6);
            }
        });
    }

    TinyHostConfig cfg_;
    comigs::MixtureOfLoraMlp<T> mix_;
    std::optional<comigs::LoraExpert<T>> head_;
    std::vector<T> out_;
};

/// A frozen base shared by every user's host (N(0, 0.5) weights so the MLP is far from zero).
template <class T>
std::shared_ptr<const comigs::FrozenMlp<T>> make_base(const TinyHostConfig& c, std::uint64_t seed) {
    auto base = std::make_shared<comigs::FrozenMlp<T>>(comigs::MlpForm::gelu, c.d, c.hidden);
    comigs::Rng rng(seed, 99);
    base->randomize(rng, 0.5);
    return base;
}

/// One user's regression data: y = G x + P_u x + noise with a shared G (common to all users) and a
/// personal P_u; `personal` in [0, 1] scales P_u (data heterogeneity).
template <class T>
struct UserData {
    Index d = 4;
    std::vector<T> train_x, train_y, val_x, val_y, test_x, test_y;
    Index n_train = 0, n_val = 0, n_test = 0;

    static UserData make(Index d, Index user, std::uint64_t seed, Index n_train, Index n_val, Index n_test,
                         double personal = 1.0) {
        UserData u;
        u.d = d;
        comigs::Rng shared_rng(seed, 1000);
        comigs::Rng user_rng(seed, 2000 + static_cast<std::uint64_t>(user));
        std::vector<double> G(static_cast<std::size_t>(d * d)), P(static_cast<std::size_t>(d * d));
        for (auto& v : G) v = shared_rng.normal(0.0, 0.5);
        for (auto& v : P) v = personal * user_rng.normal(0.0, 0.5);
        auto fill = [&](std::vector<T>& xs, std::vector<T>& ys, Index n) {
            xs.resize(static_cast<std::size_t>(n * d));
            ys.resize(xs.size());
            for (auto& v : xs) v = static_cast<T>(user_rng.normal());
            for (Index i = 0; i < n; ++i)
                for (Index r = 0; r < d; ++r) {
                    double s = 0.02 * user_rng.normal();
                    for (Index c = 0; c < d; ++c)
                        s += (G[static_cast<std::size_t>(r * d + c)] + P[static_cast<std::size_t>(r * d + c)]) *
                             static_cast<double>(xs[static_cast<std::size_t>(i * d + c)]);
                    ys[static_cast<std::size_t>(i * d + r)] = static_cast<T>(s);
                }
        };
        fill(u.train_x, u.train_y, n_train);
        fill(u.val_x, u.val_y, n_val);
        fill(u.test_x, u.test_y, n_test);
        u.n_train = n_train;
        u.n_val = n_val;
        u.n_test = n_test;
        return u;
    }

    /// `n` samples drawn with replacement from a split.
    static RegressionBatch<T> draw(const std::vector<T>& xs, const std::vector<T>& ys, Index rows, Index d, Index n,
                                   comigs::Rng& rng) {
        RegressionBatch<T> b;
        b.n = n;
        b.x.resize(static_cast<std::size_t>(n * d));
        b.y.resize(b.x.size());
        for (Index i = 0; i < n; ++i) {
            const auto k = static_cast<Index>(rng.below(static_cast<std::uint64_t>(rows)));
            for (Index c = 0; c < d; ++c) {
                b.x[static_cast<std::size_t>(i * d + c)] = xs[static_cast<std::size_t>(k * d + c)];
                b.y[static_cast<std::size_t>(i * d + c)] = ys[static_cast<std::size_t>(k * d + c)];
            }
        }
        return b;
    }
    RegressionBatch<T> train_batch(Index n, comigs::Rng& rng) const { return draw(train_x, train_y, n_train, d, n, rng); }
    RegressionBatch<T> val_batch(Index n, comigs::Rng& rng) const { return draw(val_x, val_y, n_val, d, n, rng); }
    /// The whole test split as one batch.
    RegressionBatch<T> test_batch() const { return RegressionBatch<T>{n_test, test_x, test_y, Fault::none}; }
};

}  // namespace comigs_test
