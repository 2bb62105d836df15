// Tests of the GPT-2 host (include/comigs/models/gpt2.hpp and its layers): every backward against central finite
// differences in double, causality, float/double agreement, training that really learns, and the
// pluggable MLP and LoRA paths.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <unistd.h>

#include <filesystem>
#include <comigs/models.hpp>

using comigs::Index;
using comigs::MatrixView;
using comigs::Rng;
namespace tg = comigs::models;

namespace {

std::vector<double> randn(Index n, Rng& rng, double sd = 1.0) {
    std::vector<double> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = rng.normal(0.0, sd);
    return v;
}

MatrixView<double> mv(std::vector<double>& v, Index rows, Index cols) { return {v.data(), rows, cols}; }

double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

/// Largest error of an analytic gradient against central differences of f over the given entries of p,
/// relative to max(1, |numerical|).
struct GradCheck {
    double max_err = 0;
    int checked = 0;
    std::string worst;

    void entry(double* p, double analytic, const std::function<double()>& f, const std::string& what) {
        const double eps = 1e-6, old = *p;
        *p = old + eps;
        const double fp = f();
        *p = old - eps;
        const double fm = f();
        *p = old;
        const double num = (fp - fm) / (2 * eps);
        const double err = std::abs(num - analytic) / std::max(1.0, std::abs(num));
        ++checked;
        if (err > max_err) {
            max_err = err;
            worst = what + ": analytic " + std::to_string(analytic) + " numerical " + std::to_string(num);
        }
    }
    void all(std::vector<double>& p, const std::vector<double>& analytic, const std::function<double()>& f,
             const std::string& what) {
        for (std::size_t i = 0; i < p.size(); ++i) entry(&p[i], analytic[i], f, what + "[" + std::to_string(i) + "]");
    }
};

#define CHECK_GRADS(gc)                \
    do {                               \
        INFO((gc).worst);              \
        CHECK((gc).checked > 0);       \
        CHECK((gc).max_err < 1e-6);    \
    } while (0)

}  // namespace

TEST_CASE("models::gpt2 kernels: layernorm backward matches finite differences") {
    Rng rng(1);
    const Index N = 4, d = 7;
    auto x = randn(N * d, rng, 2.0), w = randn(d, rng), b = randn(d, rng), R = randn(N * d, rng);
    std::vector<double> out(N * d), mean(N), rstd(N);
    const auto f = [&] {
        tg::layernorm_forward(mv(out, N, d), mean.data(), rstd.data(), mv(x, N, d), w.data(), b.data());
        return dot(out, R);
    };
    f();
    for (Index n = 0; n < N; ++n) {  // normalised rows: (out - b) / w has mean 0 and variance ~1
        double m = 0, v = 0;
        for (Index j = 0; j < d; ++j) m += (out[n * d + j] - b[j]) / w[j] / d;
        for (Index j = 0; j < d; ++j) v += std::pow((out[n * d + j] - b[j]) / w[j] - m, 2) / d;
        CHECK(m == doctest::Approx(0.0).epsilon(1e-9));
        CHECK(v == doctest::Approx(1.0).epsilon(1e-4));
    }
    std::vector<double> dx(N * d, 0.5), dw(d, 0.0), db(d, 0.0);  // dx starts non-zero: backward accumulates
    tg::layernorm_backward(mv(dx, N, d), dw.data(), db.data(), mv(R, N, d), mv(x, N, d), mean.data(), rstd.data(),
                           w.data());
    for (auto& v : dx) v -= 0.5;
    GradCheck gc;
    gc.all(x, dx, f, "x");
    gc.all(w, dw, f, "w");
    gc.all(b, db, f, "b");
    CHECK_GRADS(gc);
}

TEST_CASE("models::gpt2 kernels: causal multi-head attention backward matches finite differences") {
    Rng rng(2);
    const Index B = 2, T = 5, H = 2, d = 8, N = B * T;
    auto qkv = randn(N * 3 * d, rng), R = randn(N * d, rng);
    std::vector<double> out(N * d), probs(B * H * T * T);
    const auto f = [&] {
        tg::attention_forward(mv(out, N, d), probs.data(), mv(qkv, N, 3 * d), B, T, H);
        return dot(out, R);
    };
    f();
    for (Index bh = 0; bh < B * H; ++bh)
        for (Index t = 0; t < T; ++t) {
            double s = 0;
            for (Index u = 0; u < T; ++u) {
                const double p = probs[(bh * T + t) * T + u];
                if (u > t) CHECK(p == 0.0);
                s += p;
            }
            CHECK(s == doctest::Approx(1.0));
        }
    // Position 0 attends only to itself: its output is its own value vector.
    for (Index j = 0; j < d; ++j) CHECK(out[j] == doctest::Approx(qkv[2 * d + j]));
    std::vector<double> dqkv(N * 3 * d, 0.0);
    tg::attention_backward(mv(dqkv, N, 3 * d), mv(R, N, d), mv(qkv, N, 3 * d), probs.data(), B, T, H);
    GradCheck gc;
    gc.all(qkv, dqkv, f, "qkv");
    CHECK_GRADS(gc);
}

TEST_CASE("models::gpt2 kernels: token + position embedding backward matches finite differences") {
    Rng rng(3);
    const Index V = 5, ctx = 6, d = 3, B = 2, T = 4, N = B * T;
    auto wte = randn(V * d, rng), wpe = randn(ctx * d, rng), R = randn(N * d, rng);
    const std::vector<int> tokens = {1, 3, 1, 0, 4, 4, 1, 2};  // repeats: gradients must add up
    std::vector<double> out(N * d);
    const auto f = [&] {
        tg::encoder_forward(mv(out, N, d), tokens.data(), mv(wte, V, d), mv(wpe, ctx, d), B, T);
        return dot(out, R);
    };
    f();
    CHECK(out[5 * d + 2] == doctest::Approx(wte[4 * d + 2] + wpe[1 * d + 2]));
    std::vector<double> dwte(V * d, 0.0), dwpe(ctx * d, 0.0);
    tg::encoder_backward(mv(dwte, V, d), mv(dwpe, ctx, d), mv(R, N, d), tokens.data(), B, T);
    GradCheck gc;
    gc.all(wte, dwte, f, "wte");
    gc.all(wpe, dwpe, f, "wpe");
    CHECK_GRADS(gc);
}

TEST_CASE("models::gpt2 kernels: cross-entropy value and backward") {
    Rng rng(4);
    const Index N = 6, V = 7;
    auto logits = randn(N * V, rng, 3.0);
    const std::vector<int> targets = {0, 6, 3, 3, 1, 5};
    std::vector<double> lse(N);
    const auto f = [&] { return tg::crossentropy_forward(lse.data(), mv(logits, N, V), targets.data()); };
    double expected = 0;
    for (Index n = 0; n < N; ++n) {
        double z = 0;
        for (Index v = 0; v < V; ++v) z += std::exp(logits[n * V + v]);
        expected += (std::log(z) - logits[n * V + targets[n]]) / N;
    }
    CHECK(f() == doctest::Approx(expected).epsilon(1e-12));
    std::vector<double> dlogits(N * V, 0.0);
    tg::crossentropy_backward(mv(dlogits, N, V), mv(logits, N, V), lse.data(), targets.data(), 1.0);
    GradCheck gc;
    gc.all(logits, dlogits, f, "logits");
    CHECK_GRADS(gc);
}

TEST_CASE("models::gpt2 kernels: gelu_tanh value and backward") {
    Rng rng(5);
    const Index N = 3, C = 9;
    auto x = randn(N * C, rng, 3.0), R = randn(N * C, rng);
    x[0] = -30;  // saturated tails stay finite
    x[1] = 30;
    std::vector<double> out(N * C);
    const auto f = [&] {
        tg::gelu_forward(mv(out, N, C), mv(x, N, C));
        return dot(out, R);
    };
    f();
    for (Index i = 0; i < N * C; ++i) {
        const double u = std::sqrt(2 / M_PI) * (x[i] + 0.044715 * x[i] * x[i] * x[i]);
        CHECK(out[i] == doctest::Approx(0.5 * x[i] * (1 + std::tanh(u))).epsilon(1e-12));
    }
    std::vector<double> dx(N * C, 0.0);
    tg::gelu_backward(mv(dx, N, C), mv(R, N, C), mv(x, N, C));
    GradCheck gc;
    gc.all(x, dx, f, "x");
    CHECK_GRADS(gc);
}

TEST_CASE("models::gpt2 kernels: linear + LoRA backward matches finite differences") {
    Rng rng(6);
    const Index N = 5, in = 4, out = 6, r = 2;
    const double s = 0.7;
    auto x = randn(N * in, rng), W = randn(out * in, rng), b = randn(out, rng), A = randn(r * in, rng),
         Bm = randn(out * r, rng), R = randn(N * out, rng);
    std::vector<double> y(N * out), xa(N * r);
    const auto f = [&] {
        tg::linear_forward(mv(y, N, out), mv(x, N, in), mv(W, out, in), b.data());
        tg::lora_forward(mv(y, N, out), mv(xa, N, r), mv(x, N, in), mv(A, r, in), mv(Bm, out, r), s);
        return dot(y, R);
    };
    f();
    std::vector<double> dx(N * in, 0.0), dW(out * in, 0.0), db(out, 0.0), dA(r * in, 0.0), dB(out * r, 0.0),
        dxa(N * r);
    tg::linear_backward(mv(dx, N, in), mv(dW, out, in), db.data(), mv(R, N, out), mv(x, N, in), mv(W, out, in));
    tg::lora_backward(mv(dx, N, in), mv(dA, r, in), mv(dB, out, r), mv(dxa, N, r), mv(R, N, out), mv(x, N, in),
                      mv(xa, N, r), mv(A, r, in), mv(Bm, out, r), s);
    GradCheck gc;
    gc.all(x, dx, f, "x");
    gc.all(W, dW, f, "W");
    gc.all(b, db, f, "b");
    gc.all(A, dA, f, "A");
    gc.all(Bm, dB, f, "B");
    CHECK_GRADS(gc);
}

TEST_CASE("models::lora_backward: the one-pass dy kernel (ranks 4, 8, 16) matches finite differences") {
    // 7 rows: a block of four rows and a tail of three; dxa starts as garbage (it is overwritten).
    for (const Index r : {Index(4), Index(8), Index(16)}) {
        CAPTURE(r);
        Rng rng(static_cast<std::uint64_t>(20 + r));
        const Index N = 7, in = 5, out = 6;
        const double s = 0.7;
        auto x = randn(N * in, rng), A = randn(r * in, rng), Bm = randn(out * r, rng), R = randn(N * out, rng);
        std::vector<double> y(N * out), xa(N * r);
        const auto f = [&] {
            std::fill(y.begin(), y.end(), 0.0);
            tg::lora_forward(mv(y, N, out), mv(xa, N, r), mv(x, N, in), mv(A, r, in), mv(Bm, out, r), s);
            return dot(y, R);
        };
        f();
        std::vector<double> dx(N * in, 0.0), dA(r * in, 0.0), dB(out * r, 0.5), dxa(N * r, 9.0);
        const std::vector<double> dB0 = dB;
        tg::lora_backward(mv(dx, N, in), mv(dA, r, in), mv(dB, out, r), mv(dxa, N, r), mv(R, N, out), mv(x, N, in),
                          mv(xa, N, r), mv(A, r, in), mv(Bm, out, r), s);
        for (std::size_t i = 0; i < dB.size(); ++i) dB[i] -= dB0[i];  // it accumulates into dB
        GradCheck gc;
        gc.all(x, dx, f, "x");
        gc.all(A, dA, f, "A");
        gc.all(Bm, dB, f, "B");
        CHECK_GRADS(gc);
    }
}

namespace {

tg::Gpt2Config tiny_config() {
    tg::Gpt2Config c;
    c.vocab = 11;
    c.n_ctx = 8;
    c.d_model = 8;
    c.n_head = 2;
    c.n_layer = 2;
    return c;
}

/// GPT-2 init plus noise on everything, so LayerNorm weights are not 1 and biases not 0.
template <class T>
void randomise(comigs::ParamBuffer<T>& p, Rng& rng, double sd) {
    for (auto& v : p.all()) v += T(rng.normal(0.0, sd));
}

std::vector<int> random_tokens(Index n, Index vocab, Rng& rng) {
    std::vector<int> t(static_cast<std::size_t>(n));
    for (auto& v : t) v = static_cast<int>(rng.below(static_cast<std::uint64_t>(vocab)));
    return t;
}

/// Checks grads of every element of the named tensors and of `n_random` random elements of buffer p.
void check_buffer(GradCheck& gc, comigs::ParamBuffer<double>& p, const comigs::ParamBuffer<double>& g,
                  const std::vector<std::string>& whole, int n_random, Rng& rng, const std::function<double()>& f) {
    for (const auto& name : whole) {
        auto pv = p.span(name);
        auto gv = g.span(name);
        for (std::size_t i = 0; i < pv.size(); ++i) gc.entry(&pv[i], gv[i], f, name + "[" + std::to_string(i) + "]");
    }
    const auto& specs = p.layout().tensors();
    for (int k = 0; k < n_random; ++k) {
        const auto& s = specs[rng.below(specs.size())];
        const Index i = static_cast<Index>(rng.below(static_cast<std::uint64_t>(s.size)));
        gc.entry(p.data() + s.offset + i, g.data()[s.offset + i], f, s.name + "[" + std::to_string(i) + "]");
    }
}

/// A stand-in for a mixture-of-experts plug-in: y = gain * base_mlp(x) over the frozen base MLP, with a
/// trainable per-channel gain and an aux loss c * sum(y^2) / N that depends on x and on the gain.
class GainMlp final : public tg::MlpBlock<double> {
public:
    GainMlp(tg::Gpt2<double>& model, Index layer, Rng& rng)
        : base_(model.params(), model.grads(), tg::layer_name(layer, "mlp.")),
          gain(static_cast<std::size_t>(model.config().d_model)),
          dgain(gain.size(), 0.0) {
        base_.set_base_trainable(false);
        for (auto& g : gain) g = 1.0 + rng.normal(0.0, 0.3);
    }
    void forward(MatrixView<double> y, comigs::ConstMatrixView<double> x, bool training) override {
        base_out_.resize(static_cast<std::size_t>(y.size()));
        MatrixView<double> bo(base_out_.data(), y.rows, y.cols);
        base_.forward(bo, x, training);
        aux_ = 0;
        for (Index n = 0; n < y.rows; ++n)
            for (Index j = 0; j < y.cols; ++j) {
                y(n, j) = gain[j] * bo(n, j);
                aux_ += c * y(n, j) * y(n, j) / double(y.rows);
            }
    }
    void backward(MatrixView<double> dx, comigs::ConstMatrixView<double> dy, comigs::ConstMatrixView<double> x) override {
        std::vector<double> dbo(base_out_.size());
        const Index d = dy.cols;
        for (Index n = 0; n < dy.rows; ++n)
            for (Index j = 0; j < d; ++j) {
                const double bo = base_out_[n * d + j], y = gain[j] * bo;
                const double dyt = dy(n, j) + 2 * c * y / double(dy.rows);
                dgain[j] += dyt * bo;
                dbo[n * d + j] = dyt * gain[j];
            }
        base_.backward(dx, comigs::ConstMatrixView<double>(dbo.data(), dy.rows, d), x);
    }
    double aux_loss() const override { return aux_; }

    static constexpr double c = 0.05;
    tg::DenseMlp<double> base_;
    std::vector<double> gain, dgain, base_out_;
    double aux_ = 0;
};

}  // namespace

TEST_CASE("models::gpt2 model: full-parameter backward matches finite differences") {
    Rng rng(7);
    tg::Gpt2<double> model(tiny_config());
    model.init_weights(rng);
    randomise(model.params(), rng, 0.2);
    const Index B = 2, T = 5;
    const auto tokens = random_tokens(B * T, 11, rng), targets = random_tokens(B * T, 11, rng);
    const auto f = [&] { return model.forward(tokens, targets, B, T); };

    SUBCASE("plain") {
        model.zero_grad();
        const double loss = f();
        CHECK(std::isfinite(loss));
        model.backward();
        GradCheck gc;
        check_buffer(gc, model.params(), model.grads(),
                     {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.1.attn.c_proj.bias",
                      "h.1.mlp.c_fc.weight", "ln_f.bias"},
                     150, rng, f);
        CHECK_GRADS(gc);
    }
    SUBCASE("with LoRA: base and adapters both train") {
        model.add_attention_lora({3, 4.0, comigs::LoraScaling::sqrt}, rng);
        randomise(model.lora(), rng, 0.3);  // B = 0 after init would hide half of the gradient paths
        model.zero_grad();
        f();
        model.backward();
        GradCheck gc;
        check_buffer(gc, model.params(), model.grads(), {"h.1.attn.c_attn.weight", "h.0.ln_2.bias"}, 80, rng, f);
        check_buffer(gc, model.lora(), model.lora_grads(), {"h.0.attn.c_attn.lora_A", "h.1.attn.c_proj.lora_B"}, 40,
                     rng, f);
        CHECK_GRADS(gc);
    }
}

TEST_CASE("models::gpt2 model: frozen-base fine-tuning trains only LoRA and plug-ins, gradients exact") {
    Rng rng(8);
    tg::Gpt2<double> model(tiny_config());
    model.init_weights(rng);
    randomise(model.params(), rng, 0.2);
    model.add_attention_lora({2, 16.0, comigs::LoraScaling::linear}, rng);
    CHECK(model.lora_config().scale() == 8.0);
    randomise(model.lora(), rng, 0.2);
    model.set_train_mode(tg::TrainMode::frozen_base);
    const Index B = 2, T = 5;
    const auto tokens = random_tokens(B * T, 11, rng), targets = random_tokens(B * T, 11, rng);
    const auto f = [&] { return model.forward(tokens, targets, B, T); };

    SUBCASE("dense MLPs") {
        model.zero_grad();
        f();
        model.backward();
        for (double g : model.grads().all()) REQUIRE(g == 0.0);
        GradCheck gc;
        check_buffer(gc, model.lora(), model.lora_grads(),
                     {"h.0.attn.c_attn.lora_A", "h.0.attn.c_attn.lora_B", "h.0.attn.c_proj.lora_A",
                      "h.0.attn.c_proj.lora_B", "h.1.attn.c_attn.lora_B"},
                     60, rng, f);
        CHECK_GRADS(gc);
    }
    SUBCASE("a plug-in MLP with an aux loss") {
        auto plug = std::make_unique<GainMlp>(model, 1, rng);
        GainMlp& g = *plug;
        model.set_mlp(1, std::move(plug));
        model.zero_grad();
        const double loss = f();
        CHECK(model.last_aux_loss() > 0);
        CHECK(loss == doctest::Approx(model.last_ce_loss() + model.last_aux_loss()).epsilon(1e-14));
        model.backward();
        for (double v : model.grads().all()) REQUIRE(v == 0.0);
        GradCheck gc;
        gc.all(g.gain, g.dgain, f, "gain");
        check_buffer(gc, model.lora(), model.lora_grads(), {"h.0.attn.c_proj.lora_A", "h.1.attn.c_attn.lora_A"}, 40,
                     rng, f);
        CHECK_GRADS(gc);
    }
}

TEST_CASE("models::gpt2 model: a future token never changes earlier logits") {
    Rng rng(9);
    tg::Gpt2Config c = tiny_config();
    tg::Gpt2<double> model(c);
    model.init_weights(rng);
    randomise(model.params(), rng, 0.3);
    const Index B = 2, T = 8;
    auto tokens = random_tokens(B * T, c.vocab, rng);
    model.forward(tokens, {}, B, T, false);
    const auto l0 = model.logits();
    const std::vector<double> before(l0.data, l0.data + l0.size());
    const Index changed = 5;  // position in sequence 0
    tokens[changed] = (tokens[changed] + 3) % static_cast<int>(c.vocab);
    model.forward(tokens, {}, B, T, false);
    const auto l1 = model.logits();
    for (Index n = 0; n < B * T; ++n) {
        double diff = 0;
        for (Index v = 0; v < c.vocab; ++v) diff = std::max(diff, std::abs(l1(n, v) - before[n * c.vocab + v]));
        const bool affected = n >= changed && n < T;
        INFO("row ", n);
        if (affected)
            CHECK(diff > 1e-6);
        else
            CHECK(diff < 1e-13);
    }
}

TEST_CASE("models::gpt2 model: float and double forward agree") {
    Rng rng(10);
    tg::Gpt2Config c = tiny_config();
    c.vocab = 256;
    c.d_model = 32;
    c.n_head = 4;
    c.n_ctx = 16;
    tg::Gpt2<double> md(c);
    md.init_weights(rng);
    randomise(md.params(), rng, 0.05);
    md.add_attention_lora({4, 16.0, comigs::LoraScaling::sqrt}, rng);
    randomise(md.lora(), rng, 0.05);
    tg::Gpt2<float> mf(c);
    Rng unused(0);
    mf.add_attention_lora(md.lora_config(), unused);
    std::transform(md.params().all().begin(), md.params().all().end(), mf.params().all().begin(),
                   [](double v) { return float(v); });
    std::transform(md.lora().all().begin(), md.lora().all().end(), mf.lora().all().begin(),
                   [](double v) { return float(v); });
    const Index B = 3, T = 16;
    const auto tokens = random_tokens(B * T, c.vocab, rng), targets = random_tokens(B * T, c.vocab, rng);
    const double ld = md.forward(tokens, targets, B, T);
    const float lf = mf.forward(tokens, targets, B, T);
    CHECK(lf == doctest::Approx(ld).epsilon(1e-5));
    double max_diff = 0;
    for (Index n = 0; n < B * T; ++n)
        for (Index v = 0; v < c.vocab; ++v)
            max_diff = std::max(max_diff, std::abs(double(mf.logits()(n, v)) - md.logits()(n, v)));
    CHECK(max_diff < 1e-4);
}

namespace {

/// Adam without weight decay, enough to show the gradients train the model.
template <class T>
struct TestAdam {
    std::vector<double> m, v;
    int t = 0;
    void step(std::span<T> p, std::span<const T> g, double lr) {
        if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
        ++t;
        const double b1 = 0.9, b2 = 0.99, c1 = 1 - std::pow(b1, t), c2 = 1 - std::pow(b2, t);
        for (std::size_t i = 0; i < p.size(); ++i) {
            m[i] = b1 * m[i] + (1 - b1) * g[i];
            v[i] = b2 * v[i] + (1 - b2) * double(g[i]) * g[i];
            p[i] -= T(lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-8));
        }
    }
};

/// B windows of T + 1 bytes of a periodic text at offsets spread over the period.
void batch_of(const std::string& text, Index B, Index T, int step, std::vector<int>& x, std::vector<int>& y) {
    x.resize(static_cast<std::size_t>(B * T));
    y.resize(x.size());
    const Index period = static_cast<Index>(text.size());
    for (Index b = 0; b < B; ++b)
        for (Index t = 0; t < T; ++t) {
            const Index pos = (b * 7 + step * 5 + t) % period;
            x[b * T + t] = static_cast<unsigned char>(text[pos]);
            y[b * T + t] = static_cast<unsigned char>(text[(pos + 1) % period]);
        }
}

template <class T>
double train(tg::Gpt2<T>& model, const std::string& text, int steps, double lr, bool lora_only) {
    const Index B = 8, Tn = 16;
    TestAdam<T> opt;
    std::vector<int> x, y;
    double loss = 0;
    for (int s = 0; s < steps; ++s) {
        batch_of(text, B, Tn, s, x, y);
        model.zero_grad();
        loss = model.forward(x, y, B, Tn);
        model.backward();
        if (lora_only)
            opt.step(model.lora().all(), model.lora_grads().all(), lr);
        else
            opt.step(model.params().all(), model.grads().all(), lr);
    }
    return loss;
}

}  // namespace

TEST_CASE_TEMPLATE("models::gpt2 model: Adam pretraining learns a repeated text, LoRA fine-tuning adapts it", T, float,
                   double) {
    tg::Gpt2Config c;
    c.vocab = 256;
    c.n_ctx = 16;
    c.d_model = 32;
    c.n_head = 4;
    c.n_layer = 2;
    tg::Gpt2<T> model(c);
    Rng rng(11);
    model.init_weights(rng);
    const std::string text = "the cat sat on the mat. ";
    std::vector<int> x, y;
    batch_of(text, 8, 16, 0, x, y);
    const double initial = model.forward(x, y, 8, 16);
    CHECK(initial == doctest::Approx(std::log(256.0)).epsilon(0.05));
    const double final_loss = train(model, text, 300, 3e-3, false);
    INFO("initial ", initial, " final ", final_loss);
    CHECK(final_loss < 0.25);

    // Greedy sampling continues the text.
    Rng sampler(12);
    CHECK(tg::generate_text(model, "the cat sat on t", 16, 0.0, sampler) == "he mat. the cat ");

    SUBCASE("frozen base + LoRA learns a new text; the base is untouched") {
        const std::string other = "a dog ran to a log. ";
        model.add_attention_lora({8, 16.0, comigs::LoraScaling::sqrt}, rng);
        model.set_train_mode(tg::TrainMode::frozen_base);
        const std::vector<T> base(model.params().all().begin(), model.params().all().end());
        batch_of(other, 8, 16, 0, x, y);
        const double before = model.forward(x, y, 8, 16);
        const double after = train(model, other, 80, 1e-2, true);
        INFO("before ", before, " after ", after);
        CHECK(after < 0.5 * before);
        CHECK(std::equal(base.begin(), base.end(), model.params().all().begin()));
    }
}

TEST_CASE("models::gpt2 model: bad inputs are errors naming the value") {
    tg::Gpt2<float> model(tiny_config());
    const std::vector<int> ok = {1, 2, 3}, bad = {1, 11, 3};
    CHECK_THROWS_WITH_AS(model.forward(bad, {}, 1, 3), doctest::Contains("tokens[1] = 11"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(model.forward(ok, bad, 1, 3), doctest::Contains("targets[1] = 11"), comigs::InvalidArgument);
    CHECK_THROWS_AS(model.forward(ok, {}, 1, 2), comigs::ShapeError);
    const std::vector<int> long_seq(9, 0);
    CHECK_THROWS_WITH_AS(model.forward(long_seq, {}, 1, 9), doctest::Contains("T 9"), comigs::InvalidArgument);
    model.forward(ok, {}, 1, 3);
    CHECK_THROWS_AS(model.backward(), comigs::InvalidArgument);
    tg::Gpt2Config c = tiny_config();
    c.n_head = 3;
    CHECK_THROWS_WITH_AS(tg::Gpt2<float>{c}, doctest::Contains("n_head 3"), comigs::InvalidArgument);
}

TEST_CASE("models::gpt2 hf_gpt2: loads Hugging Face GPT-2 safetensors (Conv1D [in, out]) and saves them back") {
    namespace fs = std::filesystem;
    Rng rng(13);
    tg::Gpt2Config c = tiny_config();
    c.mlp_hidden = 12;  // not 4d, so the config must come from the file
    tg::Gpt2<float> src(c);
    src.init_weights(rng);
    randomise(src.params(), rng, 0.3);

    // The file as transformers writes it for GPT2LMHeadModel: prefixed keys, Conv1D weights stored
    // [in, out], the causal-mask buffers and the tied lm_head alongside.
    comigs::io::SafetensorsFile f;
    for (const auto& s : src.params().layout().tensors()) {
        const auto v = src.params().view(s.name);
        const bool conv1d = s.name.ends_with("c_attn.weight") || s.name.ends_with("c_proj.weight") ||
                            s.name.ends_with("c_fc.weight");
        if (conv1d) {
            std::vector<float> t(static_cast<std::size_t>(v.size()));
            for (Index o = 0; o < v.rows; ++o)
                for (Index i = 0; i < v.cols; ++i) t[i * v.rows + o] = v(o, i);
            f.add("transformer." + s.name, {v.cols, v.rows}, t);
        } else {
            f.add("transformer." + s.name, s.shape, src.params().span(s.name));
        }
    }
    for (Index l = 0; l < c.n_layer; ++l)
        f.add("transformer." + tg::layer_name(l, "attn.bias"), {1, 1, c.n_ctx, c.n_ctx},
              std::vector<float>(static_cast<std::size_t>(c.n_ctx * c.n_ctx), 1.0f));
    f.add("lm_head.weight", src.params().view("wte.weight"));
    const fs::path dir = fs::temp_directory_path() / ("comigs_gpt2_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    f.save(dir / "model.safetensors");

    const tg::Gpt2Config got = tg::hf_gpt2_config(comigs::io::SafetensorsFile::load(dir / "model.safetensors"), 2);
    CHECK(got.vocab == c.vocab);
    CHECK(got.n_ctx == c.n_ctx);
    CHECK(got.d_model == c.d_model);
    CHECK(got.n_layer == c.n_layer);
    CHECK(got.hidden() == 12);
    CHECK_THROWS_WITH_AS(tg::hf_gpt2_config(f), doctest::Contains("n_head"), comigs::InvalidArgument);

    tg::Gpt2<float> model = tg::load_hf_gpt2<float>(dir / "model.safetensors", 2);
    for (const auto& s : src.params().layout().tensors()) {
        const auto a = src.params().span(s.name), b = model.params().span(s.name);
        INFO(s.name);
        CHECK(std::equal(a.begin(), a.end(), b.begin()));
    }
    const auto w = model.params().view("h.1.attn.c_attn.weight");  // [3d, d] here, [d, 3d] in the file
    CHECK(w(17, 3) == f.get<float>("transformer.h.1.attn.c_attn.weight")[3 * 24 + 17]);
    const auto tokens = random_tokens(2 * 6, c.vocab, rng);
    src.forward(tokens, {}, 2, 6, false);
    model.forward(tokens, {}, 2, 6, false);
    for (Index n = 0; n < 12; ++n)
        for (Index v = 0; v < c.vocab; ++v) REQUIRE(model.logits()(n, v) == src.logits()(n, v));

    SUBCASE("save_hf_gpt2 writes the same layout and needs no head count to load") {
        tg::save_hf_gpt2(model, dir / "saved.safetensors");
        const auto saved = comigs::io::SafetensorsFile::load(dir / "saved.safetensors");
        CHECK(saved.shape("h.0.mlp.c_fc.weight") == std::vector<Index>{8, 12});
        CHECK(saved.get<float>("h.0.mlp.c_fc.weight") == f.get<float>("transformer.h.0.mlp.c_fc.weight"));
        tg::Gpt2<double> again = tg::load_hf_gpt2<double>(dir / "saved.safetensors");
        CHECK(again.config().n_head == 2);
        for (std::size_t i = 0; i < again.params().all().size(); ++i)
            REQUIRE(again.params().all()[i] == double(model.params().all()[i]));
    }
    SUBCASE("a model of another shape is a ShapeError naming the tensor") {
        tg::Gpt2Config other = c;
        other.mlp_hidden = 16;
        tg::Gpt2<float> wrong(other);
        CHECK_THROWS_WITH_AS(tg::load_hf_gpt2(wrong, f), doctest::Contains("c_fc"), comigs::ShapeError);
    }
    fs::remove_all(dir);
}

TEST_CASE("models::gpt2 mixture_mlp: comigs' MixtureOfLoraMlp plugs in as the MLP; exact gradients through the model") {
    Rng rng(14);
    tg::Gpt2<double> model(tiny_config());
    model.init_weights(rng);
    randomise(model.params(), rng, 0.2);
    const Index B = 2, T = 5;
    const auto tokens = random_tokens(B * T, 11, rng), targets = random_tokens(B * T, 11, rng);
    const double dense_loss = model.forward(tokens, targets, B, T);

    comigs::MixtureConfig mc;
    mc.d_model = 8;
    mc.d_hidden = 32;
    mc.n_experts = 2;
    mc.top_k = 2;
    mc.rank = 2;
    std::vector<tg::MixtureMlp<double>*> plugs;
    for (Index l = 0; l < 2; ++l) {
        auto mix = std::make_shared<comigs::MixtureOfLoraMlp<double>>(mc, tg::frozen_mlp(model, l));
        mix->init(rng);
        auto plug = std::make_unique<tg::MixtureMlp<double>>(mix, 0.01 / 2);
        plugs.push_back(plug.get());
        model.set_mlp(l, std::move(plug));
    }
    model.set_train_mode(tg::TrainMode::frozen_base);
    const auto f = [&] { return model.forward(tokens, targets, B, T); };

    // Freshly initialised experts (lora_B = 0) are the base MLP: only the balancing term is added.
    const double loss = f();
    CHECK(model.last_ce_loss() == doctest::Approx(dense_loss).epsilon(1e-12));
    CHECK(model.last_aux_loss() > 0);
    CHECK(loss == doctest::Approx(dense_loss + 0.005 * (plugs[0]->balance_loss() + plugs[1]->balance_loss())));

    for (auto* p : plugs) randomise(p->mixture().params(), rng, 0.3);
    model.zero_grad();
    for (auto* p : plugs) p->mixture().grads().zero();
    f();
    model.backward();
    for (double v : model.grads().all()) REQUIRE(v == 0.0);
    GradCheck gc;
    check_buffer(gc, plugs[0]->mixture().params(), plugs[0]->mixture().grads(), {"router.weight"}, 40, rng, f);
    check_buffer(gc, plugs[1]->mixture().params(), plugs[1]->mixture().grads(), {"router.weight"}, 40, rng, f);
    CHECK_GRADS(gc);
}
