// Tests of the Llama-family host (include/comigs/models/llama.hpp) and its layers: RMSNorm, RoPE and
// grouped-query attention backward against central finite differences in double, LoRA on q/k/v/o and a
// SwiGLU mixture through the whole model, the KV cache against full recomputation, causality, and
// loading errors that name the tensor and the config value.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numbers>
#include <span>
#include <utility>
#include <vector>

#include <comigs/mixture.hpp>
#include <comigs/models.hpp>

#include "gradcheck.hpp"
#include "model_fixtures.hpp"

using comigs::ConstMatrixView;
using comigs::Index;
using comigs::MatrixView;
using comigs::Rng;
namespace models = comigs::models;
using comigs::test::gradcheck;
using comigs::test::random_values;

namespace llama_tests {

double vdot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

std::vector<int> token_draw(Index n, Index vocab, Rng& rng) {
    std::vector<int> t(static_cast<std::size_t>(n));
    for (auto& x : t) x = static_cast<int>(rng.below(static_cast<std::uint64_t>(vocab)));
    return t;
}

}  // namespace llama_tests
using llama_tests::vdot;
using llama_tests::token_draw;

TEST_CASE("models::rmsnorm backward (input and weight) matches finite differences") {
    Rng rng(1);
    const Index N = 3, d = 7;
    auto x = random_values(N * d, rng, 0, 1), w = random_values(d, rng, 1, 0.3), c = random_values(N * d, rng, 0, 1);
    std::vector<double> y(x.size()), rstd(N);
    const auto loss = [&] {
        models::rmsnorm_forward(MatrixView<double>(y.data(), N, d), rstd.data(), ConstMatrixView<double>(x.data(), N, d),
                                w.data(), 1e-5);
        return vdot(y, c);
    };
    loss();
    std::vector<double> dx(x.size(), 0.0), dw(w.size(), 0.0);
    models::rmsnorm_backward(MatrixView<double>(dx.data(), N, d), dw.data(), ConstMatrixView<double>(c.data(), N, d),
                             ConstMatrixView<double>(x.data(), N, d), rstd.data(), w.data());
    gradcheck(x, dx, loss, "rmsnorm dx");
    gradcheck(w, dw, loss, "rmsnorm dw");
    // transformers' definition: x * rsqrt(mean(x^2) + eps) * w.
    loss();
    double ms = 0;
    for (Index j = 0; j < d; ++j) ms += x[static_cast<std::size_t>(j)] * x[static_cast<std::size_t>(j)];
    ms /= double(d);
    CHECK(y[2] == doctest::Approx(x[2] / std::sqrt(ms + 1e-5) * w[2]).epsilon(1e-14));
}

TEST_CASE("models::residual_rmsnorm_forward: the residual add then RMSNorm in one pass, bit for bit; zero_rows") {
    // 160 x 520 rows: above the threshold at which the row loops run on the threads.
    Rng rng(11);
    const Index N = 160, d = 520;
    const auto x = random_values(N * d, rng, 0, 1), w = random_values(d, rng, 1, 0.3);
    auto y0 = random_values(N * d, rng, 0, 1);
    std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), ya(y0.begin(), y0.end()), yb = ya;
    std::vector<float> outa(xf.size()), outb(xf.size(), -1.0f), ra(N), rb(N);
    models::residual_forward(MatrixView<float>(ya.data(), N, d), ConstMatrixView<float>(xf.data(), N, d));
    models::rmsnorm_forward(MatrixView<float>(outa.data(), N, d), ra.data(), ConstMatrixView<float>(ya.data(), N, d),
                            wf.data(), 1e-5f);
    models::residual_rmsnorm_forward(MatrixView<float>(yb.data(), N, d), ConstMatrixView<float>(xf.data(), N, d),
                                     MatrixView<float>(outb.data(), N, d), rb.data(), wf.data(), 1e-5f);
    CHECK(ya == yb);
    CHECK(outa == outb);
    CHECK(ra == rb);
    // The sum is the sum, and the norm is transformers' (checked against a double computation).
    CHECK(yb[7] == doctest::Approx(y0[7] + x[7]).epsilon(1e-6));
    double ms = 0;
    for (Index j = 0; j < d; ++j) ms += double(yb[static_cast<std::size_t>(j)]) * yb[static_cast<std::size_t>(j)];
    CHECK(outb[3] == doctest::Approx(yb[3] / std::sqrt(ms / double(d) + 1e-5) * w[3]).epsilon(1e-5));
    // zero_rows zeroes exactly the view's columns of a strided view.
    std::vector<float> other(5, 1.0f);
    models::zero_rows<float>({MatrixView<float>(outb.data(), N, d / 2, d), MatrixView<float>(other.data(), 2, 2)});
    CHECK(other == std::vector<float>{0, 0, 0, 0, 1});
    CHECK(std::all_of(outb.begin(), outb.begin() + d / 2, [](float v) { return v == 0.0f; }));
    CHECK(outb[static_cast<std::size_t>(d / 2)] == outa[static_cast<std::size_t>(d / 2)]);
    CHECK(outb[static_cast<std::size_t>((N - 1) * d + d / 2 - 1)] == 0.0f);
    CHECK(outb.back() == outa.back());
}

TEST_CASE("models::rope: transformers' frequencies, llama3 scaling, and the rotation's backward") {
    const auto plain = models::rope_inv_freq(8, 10000.0, std::nullopt);
    REQUIRE(plain.size() == 4);
    for (int j = 0; j < 4; ++j) CHECK(plain[static_cast<std::size_t>(j)] == doctest::Approx(std::pow(10000.0, -2.0 * j / 8)));
    // llama3: wavelengths below high_freq_wavelen kept, above low_freq_wavelen divided by factor, blended between.
    const models::Llama3RopeScaling s{4.0, 1.0, 2.0, 64.0};
    const auto inv = models::rope_inv_freq(6, 500.0, s), base = models::rope_inv_freq(6, 500.0, std::nullopt);
    const auto wl = [](float f) { return 2 * std::numbers::pi / f; };
    REQUIRE(wl(base[0]) < 32);
    CHECK(inv[0] == base[0]);
    REQUIRE(wl(base[1]) > 32);
    REQUIRE(wl(base[1]) < 64);
    const double smooth = (64.0 / wl(base[1]) - 1.0) / (2.0 - 1.0);
    CHECK(inv[1] == doctest::Approx((1 - smooth) * base[1] / 4 + smooth * base[1]).epsilon(1e-6));
    REQUIRE(wl(base[2]) > 64);
    CHECK(inv[2] == doctest::Approx(base[2] / 4).epsilon(1e-7));

    Rng rng(2);
    const Index N = 5, heads = 3, hd = 6;
    models::RopeTable<double> table;
    table.build(inv, 7, N);  // positions 7..11
    auto x = random_values(N * heads * hd, rng, 0, 1), c = random_values(N * heads * hd, rng, 0, 1);
    const auto pos = [](Index i) { return i; };
    const auto loss = [&] {
        auto y = x;
        models::rope_apply(MatrixView<double>(y.data(), N, heads * hd), heads, hd, table, pos);
        return vdot(y, c);
    };
    auto g = c;  // d/dx sum(c * R x) = R^T c: the inverse rotation of c
    models::rope_apply(MatrixView<double>(g.data(), N, heads * hd), heads, hd, table, pos, true);
    gradcheck(x, g, loss, "rope dx");
    // Rotate-half: element j pairs with j + hd / 2.
    auto y = x;
    models::rope_apply(MatrixView<double>(y.data(), N, heads * hd), heads, hd, table, pos);
    const double angle = double(float(7) * inv[1]);
    CHECK(y[1] == doctest::Approx(x[1] * std::cos(angle) - x[4] * std::sin(angle)).epsilon(1e-6));
    CHECK(y[4] == doctest::Approx(x[4] * std::cos(angle) + x[1] * std::sin(angle)).epsilon(1e-6));
}

TEST_CASE("models::causal_attention with grouped-query heads: backward matches finite differences") {
    Rng rng(3);
    const models::AttentionHeads a{4, 2, 3};
    const Index B = 2, n = 5, qw = a.heads * a.head_dim, kvw = a.kv_heads * a.head_dim;
    auto q = random_values(B * n * qw, rng, 0, 1), k = random_values(B * n * kvw, rng, 0, 1),
         v = random_values(B * n * kvw, rng, 0, 1), c = random_values(B * n * qw, rng, 0, 1);
    std::vector<double> out(B * n * qw), probs(B * a.heads * n * n);
    const auto loss = [&] {
        models::causal_attention_forward(MatrixView<double>(out.data(), B * n, qw), probs.data(),
                                         ConstMatrixView<double>(q.data(), B * n, qw),
                                         ConstMatrixView<double>(k.data(), B * n, kvw),
                                         ConstMatrixView<double>(v.data(), B * n, kvw), B, n, n, a);
        return vdot(out, c);
    };
    loss();
    std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
    models::causal_attention_backward(MatrixView<double>(dq.data(), B * n, qw), MatrixView<double>(dk.data(), B * n, kvw),
                                      MatrixView<double>(dv.data(), B * n, kvw), ConstMatrixView<double>(c.data(), B * n, qw),
                                      ConstMatrixView<double>(q.data(), B * n, qw),
                                      ConstMatrixView<double>(k.data(), B * n, kvw),
                                      ConstMatrixView<double>(v.data(), B * n, kvw), probs.data(), B, n, a);
    gradcheck(q, dq, loss, "attention dq");
    gradcheck(k, dk, loss, "attention dk");
    gradcheck(v, dv, loss, "attention dv");
    // Query head 3 reads key/value head 1 (3 / (4 / 2)): the first row attends to position 0 only.
    loss();
    for (Index j = 0; j < a.head_dim; ++j)
        CHECK(out[static_cast<std::size_t>(3 * a.head_dim + j)] ==
              doctest::Approx(v[static_cast<std::size_t>(1 * a.head_dim + j)]).epsilon(1e-12));
}

TEST_CASE("models::causal_attention over a KV cache equals the rows of the full computation") {
    Rng rng(4);
    const models::AttentionHeads a{6, 3, 4};
    const Index L = 7, qw = a.heads * a.head_dim, kvw = a.kv_heads * a.head_dim;
    auto q = random_values(L * qw, rng, 0, 1), k = random_values(L * kvw, rng, 0, 1), v = random_values(L * kvw, rng, 0, 1);
    std::vector<double> full(L * qw), part(3 * qw);
    models::causal_attention_forward(MatrixView<double>(full.data(), L, qw), static_cast<double*>(nullptr),
                                     ConstMatrixView<double>(q.data(), L, qw), ConstMatrixView<double>(k.data(), L, kvw),
                                     ConstMatrixView<double>(v.data(), L, kvw), 1, L, L, a);
    // The last 3 positions as new rows against all 7 keys.
    models::causal_attention_forward(MatrixView<double>(part.data(), 3, qw), static_cast<double*>(nullptr),
                                     ConstMatrixView<double>(q.data() + 4 * qw, 3, qw),
                                     ConstMatrixView<double>(k.data(), L, kvw), ConstMatrixView<double>(v.data(), L, kvw),
                                     1, 3, L, a);
    for (Index i = 0; i < 3 * qw; ++i)
        CHECK(part[static_cast<std::size_t>(i)] == doctest::Approx(full[static_cast<std::size_t>(4 * qw + i)]).epsilon(1e-12));
}

namespace llama_tests {

/// A tiny double Llama with attention LoRA (B random) and a SwiGLU mixture (top-2 of 2) on block 1.
struct TinyLlama {
    models::LlamaConfig config;
    std::unique_ptr<models::Llama<double>> model;
    std::shared_ptr<comigs::MixtureOfLoraMlp<double>> mixture;

    /// attention_rank: 3 takes the two-product LoRA backward, 4 the one-pass kernel (models::lora_backward).
    explicit TinyLlama(bool qwen, std::uint64_t seed = 5, Index attention_rank = 3)
        : config(comigs::test::tiny_llama_config(qwen)) {
        Rng rng(seed);
        auto src = comigs::test::llama_source(config, rng);
        model = std::make_unique<models::Llama<double>>(models::load_llama_weights<double>(src, config));
        model->add_attention_lora({attention_rank, 16.0, comigs::LoraScaling::sqrt}, rng);
        for (double& x : model->lora().all()) x = rng.normal(0.0, 0.1);
        comigs::MixtureConfig mc;
        mc.form = comigs::MlpForm::swiglu;
        mc.d_model = config.d_model;
        mc.d_hidden = config.mlp_hidden;
        mc.n_experts = 2;
        mc.top_k = 2;
        mc.rank = 2;
        mixture = std::make_shared<comigs::MixtureOfLoraMlp<double>>(mc, model->frozen_mlp(1));
        mixture->init(rng);
        for (double& x : mixture->params().all()) x = rng.normal(0.0, 0.2);
        model->set_mlp(1, std::make_unique<models::MixtureMlp<double>>(mixture, 0.01 / 2));
    }
};

}  // namespace llama_tests
using llama_tests::TinyLlama;

TEST_CASE("models::Llama: LoRA on q/k/v/o and a SwiGLU mixture get exact gradients through the model") {
    for (const auto& variant : {std::pair{false, Index(3)}, std::pair{true, Index(3)}, std::pair{false, Index(4)}}) {
        const bool qwen = variant.first;
        const Index rank = variant.second;  // 4: the one-pass LoRA backward kernel
        CAPTURE(qwen);
        CAPTURE(rank);
        TinyLlama t(qwen, 5, rank);
        Rng rng(6);
        const Index B = 2, T = 5;
        const auto tokens = token_draw(B * T, t.config.vocab, rng), targets = token_draw(B * T, t.config.vocab, rng);
        const auto loss = [&] { return double(t.model->forward(tokens, targets, B, T, true)); };
        t.model->zero_grad();
        t.mixture->zero_grad();
        const double l0 = loss();
        CHECK(std::isfinite(l0));
        CHECK(t.model->last_aux_loss() > 0);
        t.model->backward();
        const auto lora_grads = std::vector<double>(t.model->lora_grads().all().begin(), t.model->lora_grads().all().end());
        const auto mix_grads = std::vector<double>(t.mixture->grads().all().begin(), t.mixture->grads().all().end());
        double norm = 0;
        for (double g : lora_grads) norm += g * g;
        CHECK(norm > 1e-6);  // not vacuous
        for (const auto& p : t.model->attention_projections()) {
            for (const char* f : {"lora_A", "lora_B"}) {
                auto param = t.model->lora().span(p.prefix + f);
                const auto g = t.model->lora_grads().span(p.prefix + f);
                gradcheck(param, std::vector<double>(g.begin(), g.end()), loss, p.prefix + f, 1e-6, 1e-7, 1e-5);
            }
        }
        gradcheck(t.mixture->params().all(), mix_grads, loss, "mixture (router, experts)", 1e-6, 1e-7, 1e-5);
    }
}

TEST_CASE("models::Llama: the KV cache gives the logits of a full recomputation at every position") {
    TinyLlama t(false);
    Rng rng(7);
    const Index T = 9;
    const auto tokens = token_draw(T, t.config.vocab, rng);
    t.model->forward(tokens, {}, 1, T, false);
    const auto full = t.model->logits();
    std::vector<double> ref(full.data, full.data + full.size());
    t.model->reset_cache(16);
    // A prompt of 4 at once, then one token at a time.
    Index done = 0;
    for (const Index step : {Index(4), Index(1), Index(1), Index(2), Index(1)}) {
        const auto logits = t.model->decode(std::span<const int>(tokens).subspan(static_cast<std::size_t>(done),
                                                                                 static_cast<std::size_t>(step)));
        done += step;
        CHECK(t.model->cached_tokens() == done);
        for (Index v = 0; v < t.config.vocab; ++v)
            REQUIRE(logits[static_cast<std::size_t>(v)] ==
                    doctest::Approx(ref[static_cast<std::size_t>((done - 1) * t.config.vocab + v)]).epsilon(1e-11));
    }
    CHECK_THROWS_WITH_AS(t.model->decode(std::vector<int>(8, 1)), doctest::Contains("exceed the cache capacity 16"),
                         comigs::InvalidArgument);
}

TEST_CASE("models::Llama: causal, evaluate_loss equals forward, share_base shares weights not adapters") {
    TinyLlama t(true);
    Rng rng(8);
    const Index B = 2, T = 6;
    auto tokens = token_draw(B * T, t.config.vocab, rng);
    const auto targets = token_draw(B * T, t.config.vocab, rng);
    const double f = t.model->forward(tokens, targets, B, T, false);
    const double ce = t.model->last_ce_loss();
    CHECK(f == doctest::Approx(ce + t.model->last_aux_loss()));
    CHECK(t.model->evaluate_loss(tokens, targets, B, T) == doctest::Approx(ce).epsilon(1e-13));
    t.model->forward(tokens, {}, B, T, false);
    const std::vector<double> before(t.model->logits().data, t.model->logits().data + t.model->logits().size());
    tokens[4] = (tokens[4] + 1) % int(t.config.vocab);  // sequence 0, position 4
    t.model->forward(tokens, {}, B, T, false);
    const auto after = t.model->logits();
    for (Index n = 0; n < B * T; ++n) {
        double diff = 0;
        for (Index v = 0; v < t.config.vocab; ++v)
            diff = std::max(diff, std::abs(after(n, v) - before[static_cast<std::size_t>(n * t.config.vocab + v)]));
        if (n < 4 || n >= T)
            CHECK(diff == 0.0);  // earlier positions and the other sequence
        else
            CHECK(diff > 1e-6);
    }
    auto other = t.model->share_base();
    CHECK(!other->has_lora());
    auto* shared = dynamic_cast<models::Llama<double>*>(other.get());
    REQUIRE(shared != nullptr);
    CHECK(&shared->weights() == &t.model->weights());
}

TEST_CASE("models::load_llama_weights: a config that disagrees with the tensors is an error naming both") {
    auto c = comigs::test::tiny_llama_config(false);
    Rng rng(9);
    auto src = comigs::test::llama_source(c, rng);
    auto wrong = c;
    wrong.head_dim = 4;
    CHECK_THROWS_WITH_AS(models::load_llama_weights<double>(src, wrong, {}, "config.json"),
                         doctest::Contains("tensor 'model.layers.0.self_attn.q_proj.weight' in 'tiny llama' has shape "
                                           "[24, 12], but config.json (num_attention_heads 4 x head_dim 4, hidden_size "
                                           "12) expects [16, 12]"),
                         comigs::ShapeError);
    auto fewer = c;
    fewer.n_layer = 1;
    CHECK_THROWS_WITH_AS(models::load_llama_weights<double>(src, fewer, {}, "config.json"),
                         doctest::Contains("'model.layers.1."), comigs::FormatError);
    auto more = c;
    more.n_layer = 3;
    CHECK_THROWS_WITH_AS(models::load_llama_weights<double>(src, more, {}, "config.json"),
                         doctest::Contains("no tensor 'model.layers.2.input_layernorm.weight'"), comigs::FormatError);
    auto qwen = c;
    qwen.model_type = "qwen2";
    qwen.qkv_bias = true;
    CHECK_THROWS_WITH_AS(models::load_llama_weights<double>(src, qwen, {}, "config.json"),
                         doctest::Contains("q_proj.bias"), comigs::FormatError);
    // A tied model's file has no head: a config saying untied is refused.
    auto tied = c;
    tied.tie_word_embeddings = true;
    auto tied_src = comigs::test::llama_source(tied, rng);
    CHECK_THROWS_WITH_AS(models::load_llama_weights<double>(tied_src, c, {}, "config.json"),
                         doctest::Contains("no tensor 'lm_head.weight', and config.json says tie_word_embeddings false"),
                         comigs::FormatError);
    // A stored copy of the tied head is allowed (some files have one); the embedding is the head.
    const auto w = models::load_llama_weights<double>(src, tied, {}, "config.json");
    CHECK(w->head.weight.data == w->embed.weight.data);
}

TEST_CASE("models::Llama<float> over BF16 tensors: read in place, fp32 compute equals the widened model") {
    auto c = comigs::test::tiny_llama_config(false);
    c.d_model = 64;
    c.head_dim = 16;
    c.mlp_hidden = 96;
    Rng rng(10);
    auto bf = comigs::test::llama_source(c, rng, models::ElementType::bf16, 0.1);
    auto exact = models::load_llama_weights<float>(bf, c, {.keep_bf16 = true, .fp32_compute = true});
    auto widened = models::load_llama_weights<float>(bf, c, {.keep_bf16 = false});
    auto rounded = models::load_llama_weights<float>(bf, c, {.keep_bf16 = true, .fp32_compute = false});
    // Every matrix stays in the source; only the norm vectors are widened.
    CHECK(exact->store->owned_bytes() == std::size_t(4 * c.d_model * (2 * c.n_layer + 1)));
    CHECK(exact->store->viewed_bytes() > 100 * exact->store->owned_bytes());
    CHECK(widened->store->viewed_bytes() == 0);
    models::Llama<float> a(exact), b(widened), r(rounded);
    const Index T = 7;
    const auto tokens = token_draw(T, c.vocab, rng);
    a.forward(tokens, {}, 1, T, false);
    b.forward(tokens, {}, 1, T, false);
    r.forward(tokens, {}, 1, T, false);
    double d_exact = 0, d_rounded = 0, mag = 0;
    for (Index n = 0; n < T; ++n)
        for (Index v = 0; v < c.vocab; ++v) {
            d_exact = std::max(d_exact, double(std::abs(a.logits()(n, v) - b.logits()(n, v))));
            d_rounded = std::max(d_rounded, double(std::abs(r.logits()(n, v) - b.logits()(n, v))));
            mag = std::max(mag, double(std::abs(b.logits()(n, v))));
        }
    CHECK(mag > 0.1);
    CHECK(d_exact < 1e-5 * mag);
    CHECK(d_rounded > 3 * d_exact);  // rounding activations to bf16 shows: fp32_compute is what makes them equal
}
