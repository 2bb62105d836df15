#include <comigs/mixture.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gradcheck.hpp"

namespace {
using namespace comigs;



struct Case {
    MlpForm form;
    Index experts, top_k;
    Routing routing = Routing::top_k;
    double dropout = 0.0;
    RouterNoise noise = RouterNoise::none;
    double importance = -1.0;
    LoraScaling scaling = LoraScaling::sqrt;
    std::vector<Role> roles = {};
    Precision precision = Precision::fp32;  // of the frozen base (quantized: d and h multiples of 32)
};

// A small double mixture with random base, random B (never zero: a zero B makes the test vacuous),
// and an input whose top-k decisions have a clear margin.
struct Fixture {
    MixtureConfig cfg;
    std::shared_ptr<FrozenMlp<double>> base;
    std::unique_ptr<MixtureOfLoraMlp<double>> layer;
    std::vector<double> x, dy;
    Index n = 6;

    explicit Fixture(const Case& c, std::uint64_t seed = 1) {
        cfg.form = c.form;
        const bool quant = is_quantized(c.precision);
        cfg.d_model = quant ? 32 : 5;
        cfg.d_hidden = quant ? 64 : 7;
        cfg.n_experts = c.experts;
        cfg.top_k = c.top_k;
        cfg.rank = 3;
        cfg.alpha = 2.0;
        cfg.scaling = c.scaling;
        cfg.routing = c.routing;
        cfg.dropout = c.dropout;
        cfg.noise = c.noise;
        cfg.expert0_importance = c.importance;
        cfg.roles = c.roles;
        Rng rng(seed);
        base = std::make_shared<FrozenMlp<double>>(c.form, cfg.d_model, cfg.d_hidden);
        base->randomize(rng, 0.5);
        base->set_precision(c.precision);
        layer = std::make_unique<MixtureOfLoraMlp<double>>(cfg, base);
        layer->init(rng);
        for (const auto& spec : layer->params().layout().tensors())
            for (double& v : layer->params().span(spec.name)) v = rng.normal(0.0, 0.5);
        dy.resize(static_cast<std::size_t>(n * cfg.d_model));
        for (double& v : dy) v = rng.normal();
        // Redraw x until every token's k-th and (k+1)-th logits are well apart.
        for (int attempt = 0;; ++attempt) {
            REQUIRE(attempt < 1000);
            x.resize(static_cast<std::size_t>(n * cfg.d_model));
            for (double& v : x) v = rng.normal();
            if (margin() > 0.05) break;
        }
    }

    double margin() {
        const auto& rc = layer->router_config();
        if (!rc.has_weight() || rc.slots() == rc.n_experts) return 1.0;
        const auto W = layer->params().view("router.weight");
        double worst = 1e9;
        for (Index t = 0; t < n; ++t) {
            std::vector<double> l(static_cast<std::size_t>(cfg.n_experts));
            for (Index e = 0; e < cfg.n_experts; ++e)
                for (Index c = 0; c < cfg.d_model; ++c) l[static_cast<std::size_t>(e)] += W(e, c) * x[static_cast<std::size_t>(t * cfg.d_model + c)];
            std::sort(l.rbegin(), l.rend());
            worst = std::min(worst, l[static_cast<std::size_t>(rc.slots() - 1)] - l[static_cast<std::size_t>(rc.slots())]);
        }
        return worst;
    }

    // loss = sum(y * dy) + lb_w * lb; training-mode randomness re-seeded identically on every call.
    double loss(double lb_w, bool training) {
        std::vector<double> y(x.size());
        Rng rng(99);
        const double lb = layer->forward(MatrixView<double>(y.data(), n, cfg.d_model),
                                         ConstMatrixView<double>(x.data(), n, cfg.d_model), training, &rng);
        double s = lb_w * lb;
        for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
        return s;
    }

    void check_gradients(double lb_w, bool training = false) {
        layer->zero_grad();
        loss(lb_w, training);
        std::vector<double> dx(x.size(), 0.0);
        layer->backward(MatrixView<double>(dx.data(), n, cfg.d_model), ConstMatrixView<double>(dy.data(), n, cfg.d_model),
                        lb_w);
        auto f = [&] { return loss(lb_w, training); };
        double total_grad = 0.0;
        for (const auto& spec : layer->params().layout().tensors()) {
            auto p = layer->params().span(spec.name);
            auto g = layer->grads().span(spec.name);
            const auto r = test::gradcheck(p, std::span<const double>(g.data(), g.size()), f, spec.name);
            total_grad += r.max_abs_grad;
        }
        CHECK(total_grad > 1e-3);  // the loss really depends on the parameters
        test::gradcheck(std::span<double>(x), std::span<const double>(dx), f, "x");
    }
};

}  // namespace

TEST_CASE("MixtureOfLoraMlp: gradients match finite differences in double") {
    using namespace comigs;
        const std::vector<std::pair<const char*, Case>> cases = {
        {"gelu E=4 k=2", {MlpForm::gelu, 4, 2}},
        {"gelu E=4 k=1", {MlpForm::gelu, 4, 1}},
        {"gelu E=4 k=4", {MlpForm::gelu, 4, 4}},
        {"gelu E=1", {MlpForm::gelu, 1, 1}},
        {"gelu mean E=3", {MlpForm::gelu, 3, 3, Routing::mean}},
        {"gelu E=3 k=2 linear importance 0.6", {MlpForm::gelu, 3, 2, Routing::top_k, 0.0, RouterNoise::none, 0.6, LoraScaling::linear}},
        {"gelu E=3 k=2 generalist 1 of S,G,S importance 0.6",
         {MlpForm::gelu, 3, 2, Routing::top_k, 0.0, RouterNoise::none, 0.6, LoraScaling::sqrt,
          {Role::specialist, Role::generalist, Role::specialist}}},
        {"swiglu E=4 k=2", {MlpForm::swiglu, 4, 2}},
        {"swiglu E=2 k=1", {MlpForm::swiglu, 2, 1}},
        {"swiglu mean E=2", {MlpForm::swiglu, 2, 2, Routing::mean}},
    };
    for (const auto& [name, c] : cases) {
        SUBCASE(name) {
            Fixture fx(c);
            fx.check_gradients(0.0);
            fx.check_gradients(0.7);  // with the load-balancing loss
        }
    }
}

TEST_CASE("MixtureOfLoraMlp: gradients with dropout and router noise (fixed draws)") {
    using namespace comigs;
        SUBCASE("gelu dropout") {
        Fixture fx({MlpForm::gelu, 4, 2, Routing::top_k, 0.3});
        fx.check_gradients(0.5, true);
    }
    SUBCASE("swiglu dropout") {
        Fixture fx({MlpForm::swiglu, 3, 2, Routing::top_k, 0.25});
        fx.check_gradients(0.5, true);
    }
    SUBCASE("gaussian noise") {
        Fixture fx({MlpForm::gelu, 4, 2, Routing::top_k, 0.0, RouterNoise::gaussian});
        fx.check_gradients(0.5, true);
    }
}

namespace {
// The reference semantics written out directly: every chosen expert runs the whole MLP with its LoRA.
std::vector<double> naive_mixture(MixtureOfLoraMlp<double>& layer, const std::vector<double>& x, Index n) {
    const auto& cfg = layer.config();
    const Index d = cfg.d_model, h = cfg.d_hidden;
    std::vector<double> ydummy(x.size());
    layer.forward(MatrixView<double>(ydummy.data(), n, d), ConstMatrixView<double>(x.data(), n, d));
    const auto& route = layer.routing();
    const auto& P = layer.params();
    const auto& W = layer.base().weights();
    const double s = layer.scale();
    auto lin = [&](const std::string& name, Index e, const std::vector<double>& in, Index din, Index dout, bool bias) {
        std::vector<double> out(static_cast<std::size_t>(dout), 0.0);
        const auto Wt = W.view(name + ".weight");
        const auto A = P.view(MixtureOfLoraMlp<double>::tensor_name(e, name, 'A'));
        const auto B = P.view(MixtureOfLoraMlp<double>::tensor_name(e, name, 'B'));
        std::vector<double> z(static_cast<std::size_t>(cfg.rank), 0.0);
        for (Index a = 0; a < cfg.rank; ++a)
            for (Index c = 0; c < din; ++c) z[static_cast<std::size_t>(a)] += A(a, c) * in[static_cast<std::size_t>(c)];
        for (Index o = 0; o < dout; ++o) {
            double v = bias ? W.span(name + ".bias")[static_cast<std::size_t>(o)] : 0.0;
            for (Index c = 0; c < din; ++c) v += Wt(o, c) * in[static_cast<std::size_t>(c)];
            for (Index a = 0; a < cfg.rank; ++a) v += s * B(o, a) * z[static_cast<std::size_t>(a)];
            out[static_cast<std::size_t>(o)] = v;
        }
        return out;
    };
    std::vector<double> y(x.size(), 0.0);
    for (Index t = 0; t < n; ++t) {
        std::vector<double> xt(x.begin() + t * d, x.begin() + (t + 1) * d);
        for (Index j = 0; j < route.slots; ++j) {
            const Index e = route.expert_of(t, j);
            std::vector<double> out;
            if (cfg.form == MlpForm::gelu) {
                auto hh = lin("fc", e, xt, d, h, true);
                for (auto& v : hh) v = kernels::gelu_tanh(v);
                out = lin("proj", e, hh, h, d, true);
            } else {
                auto g = lin("gate", e, xt, d, h, false);
                auto u = lin("up", e, xt, d, h, false);
                for (Index c = 0; c < h; ++c) g[static_cast<std::size_t>(c)] = kernels::silu(g[static_cast<std::size_t>(c)]) * u[static_cast<std::size_t>(c)];
                out = lin("down", e, g, h, d, false);
            }
            for (Index c = 0; c < d; ++c) y[static_cast<std::size_t>(t * d + c)] += route.gate_of(t, j) * out[static_cast<std::size_t>(c)];
        }
    }
    return y;
}
}  // namespace

TEST_CASE("MixtureOfLoraMlp: shared-base forward equals running every chosen expert's full MLP") {
    using namespace comigs;
        for (auto form : {MlpForm::gelu, MlpForm::swiglu})
        for (Index k : {1, 2, 3}) {
            Fixture fx({form, 3, k});
            std::vector<double> y(fx.x.size());
            fx.layer->forward(MatrixView<double>(y.data(), fx.n, 5), ConstMatrixView<double>(fx.x.data(), fx.n, 5));
            const auto ref = naive_mixture(*fx.layer, fx.x, fx.n);
            double scale = 0.0;
            for (std::size_t i = 0; i < y.size(); ++i) {
                CHECK(y[i] == doctest::Approx(ref[i]).epsilon(1e-12).scale(1.0));
                scale = std::max(scale, std::abs(ref[i]));
            }
            CHECK(scale > 0.1);
        }
}

TEST_CASE("MixtureOfLoraMlp: initialised mixture equals the frozen MLP scaled by the gate sum") {
    using namespace comigs;
        Fixture fx({MlpForm::gelu, 4, 2});
    Rng rng(3);
    fx.layer->init(rng);  // B = 0: every expert is the base MLP; k >= 2 gates sum to 1
    std::vector<double> y(fx.x.size()), h(7), ref(fx.x.size());
    fx.layer->forward(MatrixView<double>(y.data(), fx.n, 5), ConstMatrixView<double>(fx.x.data(), fx.n, 5));
    fx.base->linear("fc").forward(MatrixView<double>(h.data(), 1, 7), ConstMatrixView<double>(fx.x.data(), 1, 5));
    for (auto& v : h) v = kernels::gelu_tanh(v);
    fx.base->linear("proj").forward(MatrixView<double>(ref.data(), 1, 5), ConstMatrixView<double>(h.data(), 1, 7));
    for (Index c = 0; c < 5; ++c) CHECK(y[static_cast<std::size_t>(c)] == doctest::Approx(ref[static_cast<std::size_t>(c)]).epsilon(1e-12));
}

TEST_CASE("MixtureOfLoraMlp: bad input raises comigs errors naming the value") {
    using namespace comigs;
    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, 4, 6);
    MixtureConfig cfg;
    cfg.d_model = 4;
    cfg.d_hidden = 6;
    cfg.n_experts = 3;
    cfg.top_k = 2;
    cfg.rank = 2;
    auto with = [&](auto change) {
        MixtureConfig c = cfg;
        change(c);
        return c;
    };
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(with([](auto& c) { c.rank = 0; }), base), doctest::Contains("rank 0"),
                         InvalidArgument);
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(with([](auto& c) { c.top_k = 4; }), base), doctest::Contains("top_k 4"),
                         InvalidArgument);
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(with([](auto& c) { c.alpha = INFINITY; }), base),
                         doctest::Contains("alpha inf"), InvalidArgument);
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(with([](auto& c) { c.d_hidden = 7; }), base),
                         doctest::Contains("hidden 6"), ShapeError);
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(with([](auto& c) { c.form = MlpForm::swiglu; }), base),
                         doctest::Contains("base form gelu"), InvalidArgument);
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(cfg, nullptr), doctest::Contains("base"), InvalidArgument);
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(with([](auto& c) { c.roles = {Role::generalist}; }), base),
                         doctest::Contains("roles: 1 given for 3"), InvalidArgument);
    MixtureOfLoraMlp<float> layer(cfg, base);
    std::vector<float> x(8), y(8), y_bad(10);
    CHECK_THROWS_WITH_AS(layer.forward(MatrixView<float>(y_bad.data(), 2, 5), ConstMatrixView<float>(x.data(), 2, 4)),
                         doctest::Contains("mixture output y has shape [2, 5]"), ShapeError);
    CHECK_THROWS_WITH_AS(layer.forward(MatrixView<float>(y.data(), 2, 4), ConstMatrixView<float>(nullptr, 2, 4)),
                         doctest::Contains("null"), InvalidArgument);
    layer.forward(MatrixView<float>(y.data(), 2, 4), ConstMatrixView<float>(x.data(), 2, 4));
    std::vector<float> dy(12), dx(8);
    CHECK_THROWS_WITH_AS(layer.backward(MatrixView<float>(dx.data(), 2, 4), ConstMatrixView<float>(dy.data(), 3, 4), 0.f),
                         doctest::Contains("dy"), ShapeError);
}

TEST_CASE("MixtureOfLoraMlp: float matches double; results bitwise stable across runs and thread counts") {
    using namespace comigs;
    // Both fp32 GEMM backends: Eigen (the default at these sizes) and oneDNN's sgemm for every product.
    Index onednn_min = kernels::detail::gemm_onednn_min();
#ifdef COMIGS_HAVE_ONEDNN
    SUBCASE("Eigen GEMMs") {}
    SUBCASE("oneDNN GEMMs") { onednn_min = 0; }
#endif
    struct Restore {
        Index saved = kernels::detail::gemm_onednn_min();
        ~Restore() { kernels::detail::gemm_onednn_min() = saved; }
    } restore;
    kernels::detail::gemm_onednn_min() = onednn_min;
    const Index d = 48, h = 96, n = 67;
    MixtureConfig cfg;
    cfg.d_model = d;
    cfg.d_hidden = h;
    cfg.n_experts = 4;
    cfg.top_k = 2;
    cfg.rank = 8;
    Rng rng(5);
    auto based = std::make_shared<FrozenMlp<double>>(MlpForm::gelu, d, h);
    based->randomize(rng, 0.1);
    auto basef = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, d, h);
    for (const auto& s : based->weights().layout().tensors()) {
        auto src = based->weights().span(s.name);
        auto dst = basef->weights().span(s.name);
        for (std::size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<float>(src[i]);
    }
    MixtureOfLoraMlp<double> ld(cfg, based);
    MixtureOfLoraMlp<float> lf(cfg, basef);
    ld.init(rng);
    for (const auto& s : ld.params().layout().tensors())
        for (auto& v : ld.params().span(s.name)) v = rng.normal(0.0, 0.2);
    for (const auto& s : ld.params().layout().tensors()) {
        auto src = ld.params().span(s.name);
        auto dst = lf.params().span(s.name);
        for (std::size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<float>(src[i]);
    }
    std::vector<double> xd(static_cast<std::size_t>(n * d)), dyd(xd.size());
    for (auto& v : xd) v = rng.normal();
    for (auto& v : dyd) v = rng.normal();
    std::vector<float> xf(xd.begin(), xd.end()), dyf(dyd.begin(), dyd.end());
    std::vector<double> yd(xd.size()), dxd(xd.size(), 0.0);
    ld.forward(MatrixView<double>(yd.data(), n, d), ConstMatrixView<double>(xd.data(), n, d));
    ld.backward(MatrixView<double>(dxd.data(), n, d), ConstMatrixView<double>(dyd.data(), n, d), 0.01);
    auto run_float = [&] {
        std::vector<float> y(xf.size()), dx(xf.size(), 0.f);
        lf.zero_grad();
        lf.forward(MatrixView<float>(y.data(), n, d), ConstMatrixView<float>(xf.data(), n, d));
        lf.backward(MatrixView<float>(dx.data(), n, d), ConstMatrixView<float>(dyf.data(), n, d), 0.01f);
        std::vector<float> all(y);
        all.insert(all.end(), dx.begin(), dx.end());
        all.insert(all.end(), lf.grads().all().begin(), lf.grads().all().end());
        return all;
    };
    const auto first = run_float();
    // Tolerance grows with the reduction length (here the hidden size h).
    const double tol = 8.0 * h * 6e-8;
    std::size_t i = 0;
    for (; i < yd.size(); ++i) CHECK(first[i] == doctest::Approx(yd[i]).epsilon(tol).scale(1.0));
    for (std::size_t j = 0; j < dxd.size(); ++j, ++i) CHECK(first[i] == doctest::Approx(dxd[j]).epsilon(tol).scale(1.0));
    // The parameter gradients sum over the n tokens as well: per tensor, the largest difference
    // against the largest double gradient, with the reduction length n h in the bound.
    const double tol_grad = 8.0 * static_cast<double>(n * h) * 6e-8;
    for (const auto& spec : ld.grads().layout().tensors()) {
        CAPTURE(spec.name);
        const auto gd = ld.grads().span(spec.name);
        double err = 0, scale = 0;
        for (std::size_t j = 0; j < gd.size(); ++j) {
            const float gf = first[yd.size() + dxd.size() + static_cast<std::size_t>(spec.offset) + j];
            err = std::max(err, std::abs(static_cast<double>(gf) - gd[j]));
            scale = std::max(scale, std::abs(gd[j]));
        }
        CHECK(scale > 1e-3);  // every tensor has a gradient to compare
        CHECK(err <= tol_grad * scale);
    }
    const auto again = run_float();
    CHECK(again == first);
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const auto one = run_float();
    omp_set_num_threads(threads);
    CHECK(one == first);
#endif
}

TEST_CASE("MixtureOfLoraMlp: only generalist tensors are shared; the router never is") {
    using namespace comigs;
    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::swiglu, 4, 6);
    MixtureConfig cfg;
    cfg.form = MlpForm::swiglu;
    cfg.d_model = 4;
    cfg.d_hidden = 6;
    cfg.n_experts = 12;
    cfg.top_k = 2;
    cfg.rank = 2;
    cfg.roles.assign(12, Role::specialist);
    cfg.roles[0] = Role::generalist;
    cfg.roles[10] = Role::generalist;
    MixtureOfLoraMlp<float> layer(cfg, base);
    int shared = 0;
    for (const auto& spec : layer.params().layout().tensors()) {
        const Index e = MixtureOfLoraMlp<float>::expert_of_tensor(spec.name);
        CHECK(layer.shared(spec.name) == (e == 0 || e == 10));
        shared += layer.shared(spec.name);
    }
    CHECK(shared == 12);  // 2 generalists x 3 linears x (A, B)
    CHECK_FALSE(layer.shared("router.weight"));
    CHECK(MixtureOfLoraMlp<float>::expert_of_tensor("experts.10.up.lora_B") == 10);
    // Names come from files: malformed or absurd indices are no expert (and no signed overflow).
    CHECK(expert_of_tensor("experts.99999999999999999999999.up.lora_B") == -1);
    CHECK(expert_of_tensor("experts..up.lora_B") == -1);
    CHECK(expert_of_tensor("experts.3") == -1);
    CHECK_FALSE(layer.shared("experts.99999999999999999999999.up.lora_B"));
}

TEST_CASE("MixtureOfLoraMlp on a Q8_0 / Q4_0 base: gradients match finite differences in double") {
    using namespace comigs;
    for (Precision p : {Precision::q8_0, Precision::q4_0}) {
        CAPTURE(std::string(to_string(p)));
        for (MlpForm form : {MlpForm::gelu, MlpForm::swiglu}) {
            CAPTURE(std::string(to_string(form)));
            Case c{form, 3, 2};
            c.precision = p;
            Fixture fx(c);
            REQUIRE(fx.base->precision() == p);
            fx.check_gradients(0.3);
        }
    }
}

TEST_CASE_TEMPLATE("MixtureOfLoraMlp on a Q8_0 / Q4_0 base equals the layer on the dequantized fp32 base", T, float,
                   double) {
    using namespace comigs;
    const double exact_tol = std::is_same_v<T, float> ? 2e-5 : 1e-11;
    for (Precision p : {Precision::q8_0, Precision::q4_0})
        for (MlpForm form : {MlpForm::gelu, MlpForm::swiglu})
            for (Index n : {Index(1), Index(3), Index(45)}) {  // the fused decode kernels and the panels
                CAPTURE(std::string(to_string(p)));
                CAPTURE(std::string(to_string(form)));
                CAPTURE(n);
                Rng rng(12);
                MixtureConfig cfg;
                cfg.form = form;
                cfg.d_model = 64;
                cfg.d_hidden = 96;
                cfg.n_experts = 3;
                cfg.top_k = 2;
                cfg.rank = 4;
                auto quant = std::make_shared<FrozenMlp<T>>(form, cfg.d_model, cfg.d_hidden);
                quant->randomize(rng, 0.2);
                quant->set_precision(p);
                quant->set_fp32_compute(true);  // fp32 products on the dequantized values
                auto dequant = std::make_shared<FrozenMlp<T>>(*quant);
                dequant->set_precision(Precision::fp32);
                MixtureOfLoraMlp<T> a(cfg, quant), b(cfg, dequant);
                a.init(rng);
                for (T& v : a.params().all()) v = static_cast<T>(rng.normal(0.0, 0.2));
                std::copy(a.params().all().begin(), a.params().all().end(), b.params().all().begin());
                std::vector<T> x(static_cast<std::size_t>(n * cfg.d_model)), dy(x.size());
                for (T& v : x) v = static_cast<T>(rng.normal());
                for (T& v : dy) v = static_cast<T>(rng.normal());
                auto run = [&](MixtureOfLoraMlp<T>& m, std::vector<T>& y, std::vector<T>& dx) {
                    y.assign(x.size(), T(0));
                    dx.assign(x.size(), T(0));
                    m.zero_grad();
                    m.forward(MatrixView<T>(y.data(), n, cfg.d_model), ConstMatrixView<T>(x.data(), n, cfg.d_model));
                    m.backward(MatrixView<T>(dx.data(), n, cfg.d_model), ConstMatrixView<T>(dy.data(), n, cfg.d_model),
                               T(0.01));
                };
                std::vector<T> ya, dxa, yb, dxb;
                run(a, ya, dxa);
                run(b, yb, dxb);
                double tol = exact_tol;
                auto close = [&](const auto& u, const auto& v, const char* what) {
                    double worst = 0, scale = 0;
                    for (std::size_t i = 0; i < u.size(); ++i) {
                        worst = std::max(worst, std::abs(static_cast<double>(u[i]) - static_cast<double>(v[i])));
                        scale = std::max(scale, std::abs(static_cast<double>(v[i])));
                    }
                    INFO(what << ": worst " << worst << " of " << scale);
                    CHECK(scale > 0);
                    CHECK(worst <= tol * scale);
                };
                close(ya, yb, "y");
                close(dxa, dxb, "dx");
                close(a.grads().all(), b.grads().all(), "grads");
                if constexpr (std::is_same_v<T, float>) {
                    // The default products (bf16 panels, int8 decode rows where the CPU has them) stay
                    // within their rounding of the dequantized base.
                    auto rounded = std::make_shared<FrozenMlp<T>>(*quant);
                    rounded->set_fp32_compute(false);
                    MixtureOfLoraMlp<T> c(cfg, rounded);
                    std::copy(a.params().all().begin(), a.params().all().end(), c.params().all().begin());
                    std::vector<T> yc, dxc;
                    run(c, yc, dxc);
                    tol = 3e-2;
                    close(yc, yb, "y (rounded products)");
                    close(dxc, dxb, "dx (rounded products)");
                }
            }
}

TEST_CASE_TEMPLATE("MixtureOfLoraMlp: a forward refused for a missing generator leaves the last forward intact", T,
                   float, double) {
    using namespace comigs;
    struct Variant {
        const char* name;
        MlpForm form;
        double dropout;
        RouterNoise noise;
    };
    for (const Variant& v : {Variant{"gelu dropout", MlpForm::gelu, 0.3, RouterNoise::none},
                             Variant{"gelu noise", MlpForm::gelu, 0.0, RouterNoise::gaussian},
                             Variant{"swiglu dropout", MlpForm::swiglu, 0.2, RouterNoise::none},
                             Variant{"swiglu noise", MlpForm::swiglu, 0.0, RouterNoise::gumbel}}) {
        CAPTURE(v.name);
        const Index d = 6, h = 10;
        MixtureConfig cfg;
        cfg.form = v.form;
        cfg.d_model = d;
        cfg.d_hidden = h;
        cfg.n_experts = 3;
        cfg.top_k = 2;
        cfg.rank = 2;
        cfg.dropout = v.dropout;
        cfg.noise = v.noise;
        Rng rng(4);
        auto base = std::make_shared<FrozenMlp<T>>(v.form, d, h);
        base->randomize(rng, 0.3);
        MixtureOfLoraMlp<T> layer(cfg, base);
        layer.init(rng);
        for (T& p : layer.params().all()) p = static_cast<T>(rng.normal(0.0, 0.3));
        auto vec = [&](Index rows) {
            std::vector<T> out(static_cast<std::size_t>(rows * d));
            for (T& e : out) e = static_cast<T>(rng.normal());
            return out;
        };
        const auto x2 = vec(2), dy2 = vec(2), x7 = vec(7), dy7 = vec(7);
        std::vector<T> y2(x2.size()), y7(x7.size()), dx2(x2.size(), T(0)), dx7(x7.size(), T(0));
        layer.forward(MatrixView<T>(y2.data(), 2, d), ConstMatrixView<T>(x2.data(), 2, d), false);
        layer.zero_grad();
        layer.backward(MatrixView<T>(dx2.data(), 2, d), ConstMatrixView<T>(dy2.data(), 2, d), T(0.01));
        const std::vector<T> g(layer.grads().all().begin(), layer.grads().all().end());

        CHECK_THROWS_WITH_AS(
            layer.forward(MatrixView<T>(y7.data(), 7, d), ConstMatrixView<T>(x7.data(), 7, d), true, nullptr),
            doctest::Contains("rng"), InvalidArgument);
        // The 7-token batch never ran: backward refuses it (instead of reading past the 2-token state)...
        CHECK_THROWS_AS(layer.backward(MatrixView<T>(dx7.data(), 7, d), ConstMatrixView<T>(dy7.data(), 7, d), T(0.01)),
                        ShapeError);
        // ...and still differentiates the forward that did run, exactly as before.
        layer.zero_grad();
        std::vector<T> again(x2.size(), T(0));
        layer.backward(MatrixView<T>(again.data(), 2, d), ConstMatrixView<T>(dy2.data(), 2, d), T(0.01));
        CHECK(again == dx2);
        CHECK(std::vector<T>(layer.grads().all().begin(), layer.grads().all().end()) == g);
    }
}

TEST_CASE("MixtureOfLoraMlp: inverted dropout masks hold 0 or exactly 1/(1-p)") {
    using namespace comigs;
    for (double p : {0.1, 0.3, 0.5}) {
        CAPTURE(p);
        std::vector<double> mask;
        Rng rng(12);
        detail::draw_mask(mask, 4000, p, rng);
        REQUIRE(mask.size() == 4000);
        double kept = 0;
        for (double m : mask) {
            CHECK((m == 0.0 || m == 1.0 / (1.0 - p)));
            kept += m != 0.0;
        }
        // Bernoulli(1 - p) over 4000 draws: 4 standard deviations is at most 0.032.
        CHECK(std::abs(kept / 4000.0 - (1.0 - p)) < 0.032);
    }
}

TEST_CASE("MixtureOfLoraMlp: the balancing loss gives the target share to the generalist by role") {
    using namespace comigs;
    const Index d = 5, h = 7, n = 40;
    auto base = std::make_shared<FrozenMlp<double>>(MlpForm::gelu, d, h);
    Rng rng(6);
    base->randomize(rng, 0.5);
    MixtureConfig cfg;
    cfg.d_model = d;
    cfg.d_hidden = h;
    cfg.n_experts = 3;
    cfg.top_k = 1;
    cfg.rank = 2;
    cfg.expert0_importance = 0.8;
    cfg.roles = {Role::specialist, Role::generalist, Role::specialist};
    MixtureOfLoraMlp<double> layer(cfg, base);
    layer.init(rng);
    for (double& v : layer.params().span("router.weight")) v = rng.normal();
    const auto& rc = layer.router_config();
    CHECK(rc.target_share(1) == doctest::Approx(0.8));
    CHECK(rc.target_share(0) == doctest::Approx(0.1));
    CHECK(rc.target_share(2) == doctest::Approx(0.1));
    std::vector<double> x(static_cast<std::size_t>(n * d)), y(x.size());
    for (double& v : x) v = rng.normal();
    const double lb = layer.forward(MatrixView<double>(y.data(), n, d), ConstMatrixView<double>(x.data(), n, d));
    const auto& r = layer.routing();
    const double t[3] = {0.1, 0.8, 0.1};
    double want = 0;
    for (Index e = 0; e < 3; ++e)
        want += r.mean_prob[static_cast<std::size_t>(e)] * static_cast<double>(r.counts[static_cast<std::size_t>(e)]) /
                static_cast<double>(n) / t[e];
    CHECK(lb == doctest::Approx(want).epsilon(1e-12));
    // A target share for generalists means nothing in a layer without both kinds of experts.
    cfg.roles = {Role::generalist, Role::generalist, Role::generalist};
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<double>(cfg, base), doctest::Contains("expert0_importance 0.8"),
                         InvalidArgument);
    cfg.roles = {Role::specialist, Role::specialist, Role::specialist};
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<double>(cfg, base), doctest::Contains("expert0_importance 0.8"),
                         InvalidArgument);
}

TEST_CASE("MixtureOfLoraMlp: absurd expert counts are refused before anything is built") {
    using namespace comigs;
    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, 4, 6);
    MixtureConfig cfg;
    cfg.d_model = 4;
    cfg.d_hidden = 6;
    cfg.n_experts = 1000000000;
    cfg.top_k = 2;
    cfg.rank = 2;
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(cfg, base), doctest::Contains("experts 1000000000"), InvalidArgument);
    cfg.routing = Routing::mean;
    CHECK_THROWS_WITH_AS(MixtureOfLoraMlp<float>(cfg, base), doctest::Contains("experts 1000000000"), InvalidArgument);
}

TEST_CASE("MixtureOfLoraMlp: a borrowed x gives the bits of a copied one; an overlapping y is refused") {
    using namespace comigs;
    for (const Case& c : {Case{MlpForm::gelu, 3, 2}, Case{MlpForm::swiglu, 3, 2},
                          Case{MlpForm::gelu, 2, 2, Routing::top_k, 0.25}, Case{MlpForm::swiglu, 2, 1, Routing::top_k, 0.25}}) {
        CAPTURE(to_string(c.form));
        CAPTURE(c.dropout);
        Fixture fx(c);
        const Index n = fx.n, d = fx.cfg.d_model, ld = d + 3;  // x borrowed with a row stride > d
        // One forward + backward (training, fixed draws): y, dx and every gradient.
        const auto run = [&](bool borrow) {
            std::vector<double> xs(static_cast<std::size_t>(n * ld), -7.0);
            for (Index t = 0; t < n; ++t)
                for (Index j = 0; j < d; ++j) xs[static_cast<std::size_t>(t * ld + j)] = fx.x[static_cast<std::size_t>(t * d + j)];
            std::vector<double> y(fx.x.size()), dx(fx.x.size(), 0.0);
            Rng rng(99);
            fx.layer->zero_grad();
            fx.layer->forward(MatrixView<double>(y.data(), n, d), ConstMatrixView<double>(xs.data(), n, d, ld), true, &rng,
                              borrow);
            fx.layer->backward(MatrixView<double>(dx.data(), n, d), ConstMatrixView<double>(fx.dy.data(), n, d), 0.01);
            std::vector<double> all(y);
            all.insert(all.end(), dx.begin(), dx.end());
            all.insert(all.end(), fx.layer->grads().all().begin(), fx.layer->grads().all().end());
            return all;
        };
        const auto copied = run(false), borrowed = run(true);
        CHECK(borrowed == copied);
        // The backward really reads the borrowed x: changed after the forward, the gradients change.
        std::vector<double> y(fx.x.size()), dx(fx.x.size(), 0.0), xb(fx.x);
        Rng rng(99);
        fx.layer->zero_grad();
        fx.layer->forward(MatrixView<double>(y.data(), n, d), ConstMatrixView<double>(xb.data(), n, d), true, &rng, true);
        for (double& v : xb) v += 1.0;
        fx.layer->backward(MatrixView<double>(dx.data(), n, d), ConstMatrixView<double>(fx.dy.data(), n, d), 0.01);
        const auto g = fx.layer->grads().all();
        CHECK(std::vector<double>(g.begin(), g.end()) !=
              std::vector<double>(copied.begin() + static_cast<std::ptrdiff_t>(2 * fx.x.size()), copied.end()));
    }
    Fixture fx({MlpForm::gelu, 2, 2});
    const Index n = fx.n, d = fx.cfg.d_model;
    std::vector<double> buf(static_cast<std::size_t>((n + 1) * d));
    CHECK_THROWS_WITH_AS(fx.layer->forward(MatrixView<double>(buf.data() + d, n, d), ConstMatrixView<double>(buf.data(), n, d),
                                           false, nullptr, true),
                         doctest::Contains("overlaps x"), InvalidArgument);
    // Copied, y may overlap x.
    CHECK_NOTHROW(fx.layer->forward(MatrixView<double>(buf.data() + d, n, d), ConstMatrixView<double>(buf.data(), n, d)));
}
