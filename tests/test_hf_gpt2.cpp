// GPT-2 (and Llama) bases quantized at load (WeightOptions::quantize): GPT-2's Conv1D weights, stored
// [in, out], are quantized transposed into Q8_0 / Q4_0 blocks along their [out, in] rows. The reference
// is the same host in fp32/fp64 over the dequantized values (blocks made here from the transposed
// matrix by kernels::quantize_row, which test_quant checks against ggml's reference functions).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <comigs/models.hpp>
#include <comigs/random.hpp>

#include "gradcheck.hpp"
#include "model_fixtures.hpp"

using namespace comigs;
namespace cm = comigs::models;

namespace {

cm::Gpt2Config small_gpt2(Index d = 64) {
    cm::Gpt2Config c;
    c.vocab = 37;
    c.n_ctx = 16;
    c.d_model = d;
    c.n_head = 4;
    c.n_layer = 2;
    c.mlp_hidden = 128;
    return c;
}

bool conv1d(const std::string& name) {
    return name.ends_with("c_attn.weight") || name.ends_with("c_proj.weight") || name.ends_with("c_fc.weight");
}

/// Every tensor of a GPT-2 config under Hugging Face names, F32 (Conv1D weights [in, out]).
std::shared_ptr<cm::MemorySource> gpt2_source(const cm::Gpt2Config& c, Rng& rng) {
    auto src = std::make_shared<cm::MemorySource>("tiny gpt2");
    const Index d = c.d_model, h = c.hidden();
    const auto add = [&](const std::string& name, std::vector<Index> shape, double mean, double sd) {
        Index n = 1;
        for (Index x : shape) n *= x;
        const auto v = test::random_values(n, rng, mean, sd);
        src->add(name, std::move(shape), std::span<const double>(v), cm::ElementType::f32);
    };
    add("wte.weight", {c.vocab, d}, 0, 0.5);
    add("wpe.weight", {c.n_ctx, d}, 0, 0.1);
    add("ln_f.weight", {d}, 1, 0.1);
    add("ln_f.bias", {d}, 0, 0.1);
    for (Index l = 0; l < c.n_layer; ++l) {
        const auto n = [l](const std::string& t) { return cm::layer_name(l, t); };
        for (const std::string ln : {"ln_1", "ln_2"}) {
            add(n(ln + ".weight"), {d}, 1, 0.1);
            add(n(ln + ".bias"), {d}, 0, 0.1);
        }
        add(n("attn.c_attn.weight"), {d, 3 * d}, 0, 0.15);
        add(n("attn.c_attn.bias"), {3 * d}, 0, 0.1);
        add(n("attn.c_proj.weight"), {d, d}, 0, 0.15);
        add(n("attn.c_proj.bias"), {d}, 0, 0.1);
        add(n("mlp.c_fc.weight"), {d, h}, 0, 0.15);
        add(n("mlp.c_fc.bias"), {h}, 0, 0.1);
        add(n("mlp.c_proj.weight"), {h, d}, 0, 0.15);
        add(n("mlp.c_proj.bias"), {d}, 0, 0.1);
    }
    return src;
}

std::vector<float> floats(const cm::TensorRef& t) {
    REQUIRE(t.type == cm::ElementType::f32);
    std::vector<float> v(static_cast<std::size_t>(t.numel()));
    std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
    return v;
}

/// Row-wise quantize + dequantize of a [rows, cols] float matrix.
std::vector<float> round_trip(const std::vector<float>& m, Index rows, Index cols, kernels::QuantType q,
                              std::vector<std::byte>* blocks = nullptr) {
    const std::size_t rb = kernels::quant_row_bytes(q, cols);
    std::vector<std::byte> b(rb);
    std::vector<float> out(m.size());
    if (blocks) blocks->assign(static_cast<std::size_t>(rows) * rb, std::byte{0});
    for (Index r = 0; r < rows; ++r) {
        kernels::quantize_row(b.data(), q, m.data() + r * cols, cols);
        kernels::dequantize_row(out.data() + r * cols, q, b.data(), cols);
        if (blocks) std::memcpy(blocks->data() + static_cast<std::size_t>(r) * rb, b.data(), rb);
    }
    return out;
}

/// The source with every matrix of a linear replaced by its dequantized Q values: Conv1D weights
/// quantized along their [out, in] rows (transposed here), wte along its rows. F32, so the plain host
/// computes with exactly the values the quantized one holds.
std::shared_ptr<cm::MemorySource> dequantized_gpt2_source(const cm::MemorySource& src, kernels::QuantType q) {
    auto out = std::make_shared<cm::MemorySource>("tiny gpt2, dequantized");
    for (const std::string& name : src.names()) {
        const cm::TensorRef& t = src.at(name);
        std::vector<float> v = floats(t);
        if (conv1d(name)) {
            const Index in = t.rows(), o = t.cols();
            std::vector<float> tr(v.size());
            for (Index i = 0; i < in; ++i)
                for (Index j = 0; j < o; ++j) tr[static_cast<std::size_t>(j * in + i)] = v[static_cast<std::size_t>(i * o + j)];
            const auto dq = round_trip(tr, o, in, q);
            for (Index i = 0; i < in; ++i)
                for (Index j = 0; j < o; ++j) v[static_cast<std::size_t>(i * o + j)] = dq[static_cast<std::size_t>(j * in + i)];
        } else if (name == "wte.weight") {
            v = round_trip(v, t.rows(), t.cols(), q);
        }
        out->add(name, t.shape, std::span<const float>(v), cm::ElementType::f32);
    }
    return out;
}

template <class T>
double max_diff(ConstMatrixView<T> a, ConstMatrixView<T> b) {
    REQUIRE(a.rows == b.rows);
    REQUIRE(a.cols == b.cols);
    double m = 0;
    for (Index i = 0; i < a.rows; ++i)
        for (Index j = 0; j < a.cols; ++j) m = std::max(m, std::abs(double(a(i, j)) - double(b(i, j))));
    return m;
}

template <class T>
double max_diff(std::span<const T> a, std::span<const T> b) {
    REQUIRE(a.size() == b.size());
    double m = 0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
    return m;
}

}  // namespace

TEST_CASE_TEMPLATE("models::load_gpt2 quantize: Q8_0 / Q4_0 GPT-2 equals fp32 GPT-2 on the dequantized weights", T,
                   double, float) {
    // Tolerances: double computes the same values up to summation order; float adds fp32 rounding.
    const double tol = std::is_same_v<T, double> ? 1e-10 : 2e-4;
    for (const kernels::QuantType q : {kernels::QuantType::q8_0, kernels::QuantType::q4_0}) {
        CAPTURE(kernels::to_string(q));
        Rng rng(41);
        const cm::Gpt2Config c = small_gpt2();
        const auto src = gpt2_source(c, rng);
        // Exact products (fp32_compute): the default rounds float operands to bf16 / int8 for speed.
        const auto qm = cm::load_gpt2<T>(src, c, {.fp32_compute = true, .quantize = q});
        const auto ref = cm::load_gpt2<T>(dequantized_gpt2_source(*src, q), c);

        // Every linear is held in blocks, none in T: attention, MLP, and the tied head / embedding.
        const auto& w = *qm->weights_ptr();
        CHECK((w.wte.is_quantized() && w.wte.weight.data == nullptr && w.wte.weight_quant.type == q));
        for (const auto& L : w.layers) {
            CHECK((L.c_attn.is_quantized() && L.c_attn.out_features() == 3 * c.d_model && L.c_attn.in_features() == c.d_model));
            CHECK((L.c_proj.is_quantized() && L.c_proj.weight.data == nullptr));
            CHECK(L.mlp->precision() == (q == kernels::QuantType::q8_0 ? Precision::q8_0 : Precision::q4_0));
            CHECK((L.mlp->linear("fc").is_quantized() && L.mlp->linear("fc").out_features() == c.hidden()));
            CHECK(L.mlp->linear("proj").is_quantized());
        }
        // The blocks are the transposed matrix's rows quantized as ggml does.
        {
            const cm::TensorRef& t = src->at("h.1.mlp.c_fc.weight");
            const auto v = floats(t);
            const Index in = t.rows(), o = t.cols();
            std::vector<float> tr(v.size());
            for (Index i = 0; i < in; ++i)
                for (Index j = 0; j < o; ++j) tr[static_cast<std::size_t>(j * in + i)] = v[static_cast<std::size_t>(i * o + j)];
            std::vector<std::byte> expect;
            round_trip(tr, o, in, q, &expect);
            const auto fc = w.layers[1].mlp->linear("fc").weight_quant;
            CHECK(std::memcmp(fc.data, expect.data(), expect.size()) == 0);
        }

        const Index B = 2, Tn = 7;
        std::vector<int> tokens(B * Tn), targets(B * Tn);
        for (int& x : tokens) x = int(rng.below(37));
        for (int& x : targets) x = int(rng.below(37));

        // Inference logits.
        qm->forward(tokens, {}, B, Tn, false);
        ref->forward(tokens, {}, B, Tn, false);
        CHECK(max_diff<T>(qm->logits(), ref->logits()) < tol);
        double scale = 0;
        for (Index j = 0; j < ref->logits().cols; ++j) scale = std::max(scale, std::abs(double(ref->logits()(0, j))));
        CHECK(scale > 0.1);  // logits far from zero: the comparison means something

        // Fine-tuning: attention LoRA and a mixture on every MLP, same random adapters on both.
        Rng ra(5), rb(5);
        const auto qmix = test::add_random_adapters<T>(*qm, ra);
        const auto rmix = test::add_random_adapters<T>(*ref, rb);
        qm->zero_grad();
        ref->zero_grad();
        for (auto& m : qmix) m->zero_grad();
        for (auto& m : rmix) m->zero_grad();
        const T lq = qm->forward(tokens, targets, B, Tn, true), lr = ref->forward(tokens, targets, B, Tn, true);
        CHECK(std::abs(double(lq) - double(lr)) < tol);
        qm->backward();
        ref->backward();
        CHECK(max_diff<T>(qm->lora_grads().all(), ref->lora_grads().all()) < tol);
        for (std::size_t l = 0; l < qmix.size(); ++l)
            CHECK(max_diff<T>(qmix[l]->grads().all(), rmix[l]->grads().all()) < tol);
        double gmax = 0;
        for (T g : qm->lora_grads().all()) gmax = std::max(gmax, std::abs(double(g)));
        CHECK(gmax > 1e-4);

        // Generation through the key/value cache: the last position's logits of the full forward.
        qm->reset_cache(Tn);
        std::span<const T> dec;
        for (Index t = 0; t < Tn; ++t) dec = qm->decode(std::span<const int>(tokens).subspan(static_cast<std::size_t>(t), 1));
        ref->forward(std::span<const int>(tokens).first(static_cast<std::size_t>(Tn)), {}, 1, Tn, false);
        const auto last = ref->logits();
        for (Index j = 0; j < c.vocab; ++j) CHECK(std::abs(double(dec[static_cast<std::size_t>(j)]) - double(last(Tn - 1, j))) < 10 * tol);
    }
}

TEST_CASE("models::load_gpt2 quantize: gradients of block 0's input side through quantized blocks match finite differences") {
    // The LoRA factors of block 0's c_attn see the loss through every quantized product above them
    // (c_attn, c_proj, the MLP's fc and proj of both blocks: their input gradients dx = dy W run on the
    // blocks), and the reference of a derivative of a quantized base is the dequantized weight's: the
    // finite differences of this same (double) model.
    Rng rng(42);
    const cm::Gpt2Config c = small_gpt2();
    auto m = cm::load_gpt2<double>(gpt2_source(c, rng), c, {.quantize = kernels::QuantType::q4_0});
    m->add_attention_lora({2, 4.0, LoraScaling::sqrt}, rng);
    for (double& v : m->lora().all()) v = rng.normal(0.0, 0.1);
    const Index B = 2, Tn = 5;
    std::vector<int> tokens(B * Tn), targets(B * Tn);
    for (int& x : tokens) x = int(rng.below(37));
    for (int& x : targets) x = int(rng.below(37));
    const auto loss = [&] { return double(m->forward(tokens, targets, B, Tn, true)); };
    m->zero_grad();
    loss();
    m->backward();
    for (const char* name : {"h.0.attn.c_attn.lora_A", "h.0.attn.c_attn.lora_B", "h.0.attn.c_proj.lora_A"}) {
        auto p = m->lora().span(name);
        std::vector<double> g(m->lora_grads().span(name).begin(), m->lora_grads().span(name).end());
        const auto r = test::gradcheck(p, g, loss, name, 1e-6, 1e-7, 1e-5, 3);
        CHECK(r.max_abs_grad > 1e-4);
    }
}

TEST_CASE("models::load_gpt2 quantize: rows that blocks cannot hold, and non-finite weights, are named errors") {
    Rng rng(43);
    {
        const cm::Gpt2Config c = small_gpt2(48);  // c_attn's [out, in] rows have 48 values
        const auto src = gpt2_source(c, rng);
        try {
            cm::load_gpt2<float>(src, c, {.quantize = kernels::QuantType::q8_0});
            FAIL("expected a ShapeError");
        } catch (const ShapeError& e) {
            const std::string what = e.what();
            CHECK(what.find("tensor 'wte.weight'") != std::string::npos);
            CHECK(what.find("48 values, not a multiple of 32") != std::string::npos);
        }
    }
    const cm::Gpt2Config c = small_gpt2();
    const auto src = gpt2_source(c, rng);
    std::vector<float> v = floats(src->at("h.1.attn.c_proj.weight"));
    v[5 * 64 + 9] = std::numeric_limits<float>::quiet_NaN();  // [in 5, out 9]: row 9 of the [out, in] matrix
    src->add("h.1.attn.c_proj.weight", {64, 64}, std::span<const float>(v), cm::ElementType::f32);
    try {
        cm::load_gpt2<float>(src, c, {.quantize = kernels::QuantType::q4_0});
        FAIL("expected a NumericError");
    } catch (const NumericError& e) {
        const std::string what = e.what();
        CHECK(what.find("tensor 'h.1.attn.c_proj.weight' (column 9)") != std::string::npos);
    }
}

TEST_CASE("models::load_llama_weights quantize: a Llama folder quantized at load is the same host as a GGUF-style quantized source") {
    cm::LlamaConfig c = test::tiny_llama_config();
    c.d_model = 32;
    c.head_dim = 8;
    c.mlp_hidden = 64;
    for (const kernels::QuantType q : {kernels::QuantType::q8_0, kernels::QuantType::q4_0}) {
        CAPTURE(kernels::to_string(q));
        Rng rng(44);
        const auto src = test::llama_source(c, rng, cm::ElementType::f32);
        auto blocks = std::make_shared<cm::MemorySource>("pre-quantized");
        for (const std::string& name : src->names()) {
            const cm::TensorRef& t = src->at(name);
            const auto v = floats(t);
            blocks->add(name, t.shape, std::span<const float>(v),
                        t.shape.size() == 2 ? (q == kernels::QuantType::q8_0 ? cm::ElementType::q8_0 : cm::ElementType::q4_0)
                                            : cm::ElementType::f32);
        }
        cm::Llama<float> a(cm::load_llama_weights<float>(src, c, {.quantize = q}));
        cm::Llama<float> b(cm::load_llama_weights<float>(blocks, c));
        std::vector<int> tokens{1, 5, 9, 22, 3, 0, 7};
        a.forward(tokens, {}, 1, 7, false);
        b.forward(tokens, {}, 1, 7, false);
        CHECK(max_diff<float>(a.logits(), b.logits()) == 0.0);  // the same blocks through the same kernels
        const auto fa = a.frozen_mlp(1)->linear("down").weight_quant, fb = b.frozen_mlp(1)->linear("down").weight_quant;
        REQUIRE((fa.data && fb.data));
        CHECK(std::memcmp(fa.data, fb.data, static_cast<std::size_t>(fa.rows) * fa.row_bytes) == 0);
    }
}

TEST_CASE("models::load_gpt2: the Conv1D bytes a host copied are released, never read again; a folder loads quantized") {
    Rng rng(45);
    const cm::Gpt2Config c = small_gpt2();
    const auto keep = gpt2_source(c, rng);
    const std::vector<int> tokens{3, 1, 4, 1, 5, 9, 2, 6};
    for (const std::optional<kernels::QuantType> q :
         {std::optional<kernels::QuantType>{}, std::optional(kernels::QuantType::q8_0), std::optional(kernels::QuantType::q4_0)}) {
        CAPTURE((q ? kernels::to_string(*q) : "plain"));
        // A source that frees what the host releases: the model computes without those bytes.
        auto freeing = std::make_shared<cm::MemorySource>("freeing", true);
        for (const std::string& name : keep->names()) {
            const auto v = floats(keep->at(name));
            freeing->add(name, keep->at(name).shape, std::span<const float>(v), cm::ElementType::f32);
        }
        const auto a = cm::load_gpt2<float>(freeing, c, {.quantize = q});
        const auto b = cm::load_gpt2<float>(keep, c, {.quantize = q});
        for (const std::string& name : freeing->names()) {
            CAPTURE(name);
            const bool copied = conv1d(name) || (q && name == "wte.weight");
            CHECK(freeing->at(name).bytes.empty() == copied);
        }
        CHECK(keep->at("h.0.attn.c_attn.weight").bytes.size() == std::size_t(64 * 192 * 4));  // the default keeps them
        a->forward(tokens, {}, 1, 8, false);
        b->forward(tokens, {}, 1, 8, false);
        CHECK(max_diff<float>(a->logits(), b->logits()) == 0.0);

        // The same model from a Hugging Face folder (mapped; the released pages are dropped).
        char tmpl[] = "/tmp/comigs_test_hf_gpt2_XXXXXX";
        REQUIRE(mkdtemp(tmpl) != nullptr);
        const std::filesystem::path dir(tmpl);
        {
            io::SafetensorsFile f;
            for (const std::string& name : keep->names()) {
                const auto& t = keep->at(name);
                f.add_raw(name, io::Dtype::F32, t.shape, std::vector<std::byte>(t.bytes.begin(), t.bytes.end()));
            }
            f.save(dir / "model.safetensors");
            std::ofstream(dir / "config.json") << R"({"architectures": ["GPT2LMHeadModel"], "vocab_size": 37,
                "n_positions": 16, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128})";
        }
        const auto lm = cm::load_hf_model<float>(dir, {.quantize = q});
        lm.model->forward(tokens, {}, 1, 8, false);
        CHECK(max_diff<float>(lm.model->logits(), b->logits()) == 0.0);
        std::filesystem::remove_all(dir);
    }
}

TEST_CASE("models::quantized_gpt2_weights: a GPT-2 base held in memory, quantized, is the file quantized at load") {
    // A pretrained (here: initialised) trainable host, saved in the Hugging Face layout and loaded with
    // WeightOptions::quantize, gives the same blocks as its in-memory weights quantized: same logits.
    Rng rng(46);
    const cm::Gpt2Config c = small_gpt2();
    cm::Gpt2<float> host(c);
    host.init_weights(rng);
    for (float& v : host.params().all()) v += float(rng.normal(0.0, 0.05));
    char tmpl[] = "/tmp/comigs_test_qgpt2_XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    const std::filesystem::path file = std::filesystem::path(tmpl) / "host.safetensors";
    cm::save_hf_gpt2(host, file);
    const std::vector<int> tokens{2, 7, 1, 8, 2, 8};
    for (const Precision p : {Precision::q8_0, Precision::q4_0}) {
        CAPTURE(to_string(p));
        const auto w = cm::quantized_gpt2_weights<float>(host.weights_ptr(), p);
        cm::Gpt2<float> a(w);
        CHECK(w->wte.is_quantized());
        CHECK(w->layers[1].mlp->precision() == p);
        const auto b = cm::load_hf_model<float>(file, {.quantize = quant_type(p)});
        a.forward(tokens, {}, 1, 6, false);
        b.model->forward(tokens, {}, 1, 6, false);
        CHECK(max_diff<float>(a.logits(), b.model->logits()) == 0.0);
        // Requantizing blocks (q8_0 -> q4_0 from the dequantized values) is allowed; fp32 is not a target.
        CHECK(cm::quantized_gpt2_weights<float>(w, Precision::q4_0)->layers[0].c_attn.weight_quant.type ==
              kernels::QuantType::q4_0);
    }
    CHECK_THROWS_AS(cm::quantized_gpt2_weights<float>(host.weights_ptr(), Precision::fp32), InvalidArgument);
    cm::Gpt2Config odd = small_gpt2(48);
    cm::Gpt2<float> odd_host(odd);
    CHECK_THROWS_WITH_AS(cm::quantized_gpt2_weights<float>(odd_host.weights_ptr(), Precision::q8_0),
                         doctest::Contains("wte has rows of 48 values"), InvalidArgument);
    std::filesystem::remove_all(tmpl);
}
