// Quantized frozen bases (kernels/quant.hpp) against the fp32 base, at GPT-2 MLP shapes: the mixture
// layer's training step (T = 1024: bf16 panels by default, fp32 panels in the `_exact` cases) and
// decode (T = 1: int8 products for Q4_0 by default, the exact fused kernels in `_exact`). The `pair`
// cases time the fp32 layer and the quantized one back to back, alternating which goes first, and
// report the median over pairs of t(fp32) / t(quantized): on a shared machine a ratio of two cases'
// medians compares stretches of time far apart, the two halves of a pair run milliseconds apart.
#include "bench_common.hpp"
#include "random_model.hpp"

#include <comigs/kernels/quant.hpp>
#include <comigs/profile.hpp>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>

namespace comigs::bench {
namespace {

/// The MLP a benchmark adapts: GPT-2's (GELU, 768 -> 3072) or Llama-3.2-1B's (SwiGLU, 2048 -> 8192,
/// 201 MB of fp32 weights: beyond every cache but this host's 480 MB L3).
enum class QuantShape { gpt2, llama1b };

/// A mixture (E = 4, top-2, rank 8, non-zero B) on a base held in `p`, with its data.
struct QuantLayer {
    Index n;
    MixtureConfig cfg;
    std::shared_ptr<FrozenMlp<float>> base;
    std::unique_ptr<MixtureOfLoraMlp<float>> mix;
    std::vector<float> x, y, dy, dx;

    QuantLayer(Index tokens, Precision p, QuantShape shape = QuantShape::gpt2, bool fp32_compute = false) : n(tokens) {
        using S = Gpt2Shape;
        const bool llama = shape == QuantShape::llama1b;
        cfg.form = llama ? MlpForm::swiglu : MlpForm::gelu;
        cfg.d_model = llama ? 2048 : S::d;
        cfg.d_hidden = llama ? 8192 : S::h;
        cfg.n_experts = S::E;
        cfg.top_k = S::k;
        cfg.rank = S::r;
        Rng rng(7);
        base = std::make_shared<FrozenMlp<float>>(cfg.form, cfg.d_model, cfg.d_hidden);
        base->randomize(rng, 0.02);
        base->set_precision(p);
        base->set_fp32_compute(fp32_compute);
        mix = std::make_unique<MixtureOfLoraMlp<float>>(cfg, base);
        mix->init(rng);
        for (const auto& spec : mix->params().layout().tensors())
            if (spec.name.find("lora_B") != std::string::npos)
                for (float& v : mix->params().span(spec.name)) v = static_cast<float>(rng.normal(0.0, 0.01));
        x = random_vector<float>(static_cast<std::size_t>(n * cfg.d_model), rng);
        dy = random_vector<float>(x.size(), rng);
        y.assign(x.size(), 0.0f);
        dx.assign(x.size(), 0.0f);
    }
    void fwd() { mix->forward({y.data(), n, cfg.d_model}, ConstMatrixView<float>(x.data(), n, cfg.d_model)); }
    void fwd_bwd() {
        fwd();
        mix->backward({dx.data(), n, cfg.d_model}, ConstMatrixView<float>(dy.data(), n, cfg.d_model), 0.01f);
    }
};

// Kernel: MixtureOfLoraMlp forward + backward on a base held in p (4 base GEMMs through gemm_quant's
// panels when quantized).
void quant_fwd_bwd(benchmark::State& state, Index tokens, Precision p) {
    QuantLayer s(tokens, p);
    s.fwd_bwd();  // warm-up
    for (auto _ : state) {
        s.fwd_bwd();
        benchmark::DoNotOptimize(s.dx.data());
    }
    state.counters["frozen_MB"] = double(s.base->weight_bytes()) / 1e6;
    set_counters(state, tokens, base_flops_fwd_bwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: MixtureOfLoraMlp forward on a base held in p (decode: gemm_quant's fused kernels).
void quant_fwd(benchmark::State& state, Index tokens, Precision p) {
    QuantLayer s(tokens, p);
    s.fwd();
    for (auto _ : state) {
        s.fwd();
        benchmark::DoNotOptimize(s.y.data());
    }
    state.counters["frozen_MB"] = double(s.base->weight_bytes()) / 1e6;
    set_counters(state, tokens, base_flops_fwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

/// Times `a` and `b` back to back once per iteration, alternating which goes first; counters
/// `speed_ratio` = median over pairs of t(a) / t(b), `<a_name>_ms` and `<b_name>_ms` the medians.
template <class A, class Bf>
void time_pairs(benchmark::State& state, const char* a_name, A&& a, const char* b_name, Bf&& b) {
    const auto seconds = [](auto& f) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    seconds(a);  // warm-up
    seconds(b);
    std::vector<double> ratio, ta, tb;
    bool a_first = true;
    for (auto _ : state) {
        double x, y;
        if (a_first) {
            x = seconds(a);
            y = seconds(b);
        } else {
            y = seconds(b);
            x = seconds(a);
        }
        a_first = !a_first;
        ratio.push_back(x / y);
        ta.push_back(x);
        tb.push_back(y);
    }
    const auto median = [](std::vector<double>& v) {
        std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
        return v[v.size() / 2];
    };
    if (ratio.empty()) return;
    state.counters["speed_ratio"] = median(ratio);
    state.counters[std::string(a_name) + "_ms"] = 1e3 * median(ta);
    state.counters[std::string(b_name) + "_ms"] = 1e3 * median(tb);
}

// Kernel: the fp32 layer and the layer on a base held in p, timed pair by pair (forward + backward, or
// forward only for decode); counter `speed_ratio` = median over pairs of t(fp32) / t(p), `fp32_ms` and
// `quant_ms` the medians. `exact`: the quantized base computes in fp32 on its dequantized values
// (fp32_compute) instead of its default rounded products.
void quant_pair(benchmark::State& state, Index tokens, Precision p, bool backward,
                QuantShape shape = QuantShape::gpt2, bool exact = false) {
    QuantLayer f(tokens, Precision::fp32, shape), q(tokens, p, shape, exact);
    const auto seconds = [&](QuantLayer& l) {
        const auto t0 = std::chrono::steady_clock::now();
        if (backward)
            l.fwd_bwd();
        else
            l.fwd();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    seconds(f);  // warm-up
    seconds(q);
    std::vector<double> ratio, tf, tq;
    bool fp32_first = true;
    for (auto _ : state) {
        double a, b;
        if (fp32_first) {
            a = seconds(f);
            b = seconds(q);
        } else {
            b = seconds(q);
            a = seconds(f);
        }
        fp32_first = !fp32_first;
        ratio.push_back(a / b);
        tf.push_back(a);
        tq.push_back(b);
    }
    const auto median = [](std::vector<double>& v) {
        std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
        return v[v.size() / 2];
    };
    if (ratio.empty()) return;
    state.counters["speed_ratio"] = median(ratio);
    state.counters["fp32_ms"] = 1e3 * median(tf);
    state.counters["quant_ms"] = 1e3 * median(tq);
}

// Kernel: one CoMiGS fine-tuning step of the whole SmolLM2-135M-shaped model (random_model.hpp: 8 x 128
// tokens, attention LoRA, a 2-expert mixture on every MLP, AdamW) on a bf16 base (bf16 products) and on
// a Q4_0 base, pair by pair: speed_ratio = t(bf16) / t(q4_0).
void model_step_pair(benchmark::State& state) {
    auto bf = random_host(RandomHost::smollm2_135m, models::ElementType::bf16);
    auto q4 = random_host(RandomHost::smollm2_135m, models::ElementType::q4_0);
    ModelAdapters abf(*bf), aq4(*q4);
    time_pairs(state, "bf16", [&] { abf.step(*bf); }, "q4_0", [&] { aq4.step(*q4); });
    state.SetItemsProcessed(state.iterations() * ModelStepShape::B * ModelStepShape::T);
}

// Kernel: the SmolLM2-135M-shaped step of model_step_pair on one base (bf16 or q4_0) with the hosts'
// phase timers (comigs/profile.hpp): counters <pass>_<phase>_ms per step and other_ms (AdamW, zeroing,
// what no phase covers), as bench_model's model_phases.
void model_step_phases(benchmark::State& state, models::ElementType type) {
    auto host = random_host(RandomHost::smollm2_135m, type);
    ModelAdapters a(*host);
    profile_steps(state, [&] { a.step(*host); });
}

// Kernel: decode (T = 1) of the whole Llama-3.2-1B-shaped model with its mixtures, KV cache holding
// 64..79 tokens (refilled, untimed, every 16): the fp32 base (4.9 GB) against the Q4_0 base (0.7 GB),
// pair by pair: speed_ratio = t(fp32) / t(q4_0). Both bases exceed the last-level cache, so every
// token streams the whole base from memory: this is where decode is memory-bound.
void model_decode_pair(benchmark::State& state) {
    constexpr Index context = 64, steps = 16;
    auto f32 = random_host(RandomHost::llama32_1b, models::ElementType::f32);
    auto q4 = random_host(RandomHost::llama32_1b, models::ElementType::q4_0);
    ModelAdapters af(*f32), aq(*q4);
    struct Decoder {
        models::CausalLm<float>& m;
        const std::vector<int>& tokens;
        Index next = context + steps;
        void operator()() {
            if (next == context + steps) {
                m.reset_cache(context + steps);
                m.decode(std::span<const int>(tokens.data(), static_cast<std::size_t>(context)));
                next = context;
            }
            benchmark::DoNotOptimize(m.decode(std::span<const int>(&tokens[static_cast<std::size_t>(next)], 1)).data());
            ++next;
        }
    };
    Decoder df{*f32, af.tokens}, dq{*q4, aq.tokens};
    // The refill is timed inside a pair once every 16 tokens for both halves alike; the median ignores it.
    time_pairs(state, "fp32", df, "q4_0", dq);
    state.SetItemsProcessed(state.iterations());
}

// Kernel: gemm_quant alone, y[T, 3072] = x[T, 768] W^T (the fc GEMM) with W held in p; fp32 through gemm.
void quant_gemm(benchmark::State& state, Index tokens, Precision p) {
    using S = Gpt2Shape;
    Rng rng(3);
    FrozenMlp<float> mlp(MlpForm::gelu, S::d, S::h);
    mlp.randomize(rng, 0.02);
    mlp.set_precision(p);
    auto lin = mlp.linear("fc");
    lin.bias = {};
    auto x = random_vector<float>(static_cast<std::size_t>(tokens * S::d), rng);
    std::vector<float> y(static_cast<std::size_t>(tokens * S::h));
    lin.forward({y.data(), tokens, S::h}, ConstMatrixView<float>(x.data(), tokens, S::d));
    for (auto _ : state) {
        lin.forward({y.data(), tokens, S::h}, ConstMatrixView<float>(x.data(), tokens, S::d));
        benchmark::DoNotOptimize(y.data());
    }
    set_counters(state, tokens, 2.0 * double(tokens) * S::d * S::h);
}

constexpr Index kTok = 1024;

BENCHMARK_CAPTURE(quant_pair, q8_0/gpt2, kTok, Precision::q8_0, true)->Name("quant_pair/q8_0/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(quant_pair, q4_0/gpt2, kTok, Precision::q4_0, true)->Name("quant_pair/q4_0/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(quant_pair, q4_0/decode, 1, Precision::q4_0, false)->Name("quant_pair/q4_0/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_pair, q8_0/decode, 1, Precision::q8_0, false)->Name("quant_pair/q8_0/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_pair, q4_0/decode_llama1b, 1, Precision::q4_0, false, QuantShape::llama1b)
    ->Name("quant_pair/q4_0/decode_llama1b")
    ->UseRealTime();
BENCHMARK_CAPTURE(quant_pair, q8_0/gpt2_exact, kTok, Precision::q8_0, true, QuantShape::gpt2, true)
    ->Name("quant_pair/q8_0/gpt2_exact")
    ->UseRealTime();
BENCHMARK_CAPTURE(quant_pair, q4_0/decode_exact, 1, Precision::q4_0, false, QuantShape::gpt2, true)
    ->Name("quant_pair/q4_0/decode_exact")
    ->UseRealTime();
BENCHMARK(model_step_pair)->Name("quant_model_pair/q4_0_vs_bf16/step/smollm2_135m")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(model_step_phases, bf16, models::ElementType::bf16)
    ->Name("quant_model_phases/bf16/step/smollm2_135m")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(model_step_phases, q4_0, models::ElementType::q4_0)
    ->Name("quant_model_phases/q4_0/step/smollm2_135m")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(model_decode_pair)->Name("quant_model_pair/q4_0_vs_fp32/decode/llama32_1b")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(quant_fwd_bwd, fp32/gpt2, kTok, Precision::fp32)->Name("quant_fwd_bwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(quant_fwd_bwd, q8_0/gpt2, kTok, Precision::q8_0)->Name("quant_fwd_bwd/q8_0/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(quant_fwd_bwd, q4_0/gpt2, kTok, Precision::q4_0)->Name("quant_fwd_bwd/q4_0/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(quant_fwd, fp32/decode, 1, Precision::fp32)->Name("quant_fwd/fp32/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_fwd, bf16/decode, 1, Precision::bf16)->Name("quant_fwd/bf16/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_fwd, q8_0/decode, 1, Precision::q8_0)->Name("quant_fwd/q8_0/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_fwd, q4_0/decode, 1, Precision::q4_0)->Name("quant_fwd/q4_0/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, fp32/decode, 1, Precision::fp32)->Name("quant_gemm/fp32/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, q8_0/decode, 1, Precision::q8_0)->Name("quant_gemm/q8_0/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, q4_0/decode, 1, Precision::q4_0)->Name("quant_gemm/q4_0/decode")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, fp32/t4, 4, Precision::fp32)->Name("quant_gemm/fp32/t4")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, q4_0/t4, 4, Precision::q4_0)->Name("quant_gemm/q4_0/t4")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, fp32/t16, 16, Precision::fp32)->Name("quant_gemm/fp32/t16")->UseRealTime();
BENCHMARK_CAPTURE(quant_gemm, q4_0/t16, 16, Precision::q4_0)->Name("quant_gemm/q4_0/t16")->UseRealTime();

}  // namespace
}  // namespace comigs::bench
