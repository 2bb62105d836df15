// Whole-model benchmarks: one CoMiGS fine-tuning step of a real-shaped model with random weights, the
// evaluation forward, and the new whole-model kernels against what they replace, in one run.
//
//   model_step/{fp32,bf16}/{gpt2_124m,smollm2_135m}   forward, backward, AdamW on the attention LoRA
//        and the mixtures: batch 8 x 128 tokens, 2 experts (1G1S) top-2 rank 8 on every MLP, LoRA rank 8
//        on the attention projections (GPT-2 c_attn, c_proj; Llama q, k, v, o), cross-entropy over the
//        whole vocabulary; frozen base of random weights in fp32 or bf16 (bf16 products). /one_thread:
//        the fp32 step on one thread (thread scaling)
//   model_fwd/{fp32,bf16}/<host>   evaluation forward with the loss (evaluate_loss, 8 x 128)
//   model_phases/{fp32,bf16}/<host>   the step with the hosts' phase timers: ms per phase and pass
//   model_decode/{mixture,lora}/fp32/<host>   one new token, KV cache holding 512..527 tokens: the
//        mixture model, and the same model with one expert (plain LoRA on the MLPs)
//   attention_fwd_bwd/{flash,probs}/gpt2_124m   one layer's causal attention, forward + backward
//   attention_fwd_bwd/flash/smollm2_135m, attention_fwd/flash/{gpt2_124m,smollm2_135m}   the same at
//        SmolLM2's 9 heads over 3 kv heads, and the forward alone (GFLOP/s counter: the causal products)
//   attention_fwd_bwd/blocked/{gpt2_124m,smollm2_135m}   the kernel's blocked path (per-block GEMM calls,
//        what decode runs) at the same shapes
//   lm_head_ce/{chunked,logits}/gpt2_124m       LM head + cross-entropy + its input gradient
// items_per_second = tokens/s. Counter peak_heap_MB: heap bytes of the case (model, activations,
// work space) at their peak, from bench_memory.cpp.
#include "bench_common.hpp"
#include "bench_memory.hpp"
#include "random_model.hpp"

#include <comigs/kernels/attention.hpp>
#include <comigs/kernels/cross_entropy.hpp>
#include <comigs/models.hpp>
#include <comigs/models/mixture_mlp.hpp>
#include <comigs/optim.hpp>
#include <comigs/profile.hpp>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace comigs::bench {
namespace {

namespace cm = comigs::models;

/// Decode: one new token after `context` cached ones; the cache is refilled every `steps` tokens.
struct DecodeShape {
    static constexpr Index context = 512, steps = 16;
};

/// The frozen host of a step (random_model.hpp): fp32 matrices, or bf16 ones with bf16 products. The
/// fp32 GPT-2 is a trainable model's weights shared by a frozen one (its init, one copy: loading HF's
/// Conv1D tensors would keep the source beside the transposed matrices).
std::unique_ptr<cm::CausalLm<float>> step_host(RandomHost host, bool bf16) {
    if (host == RandomHost::gpt2_124m && !bf16) {
        cm::Gpt2<float> trainable(gpt2_124m_config());
        Rng rng(24);
        trainable.init_weights(rng);
        return trainable.share_base();  // keeps the parameter buffer alive; the gradients go
    }
    return random_host(host, bf16 ? cm::ElementType::bf16 : cm::ElementType::f32);
}

/// A CoMiGS model on a random frozen host (ModelAdapters: attention LoRA, a mixture of LoRA experts on
/// every MLP, AdamW), with tokens for a batch and a decode prompt.
struct CoMiGSModel {
    using S = ModelStepShape;
    std::unique_ptr<cm::CausalLm<float>> model;
    ModelAdapters adapters;

    CoMiGSModel(RandomHost host, bool bf16, Index experts = S::experts, Index top_k = S::top_k)
        : model(step_host(host, bf16)),
          adapters(*model, experts, top_k, DecodeShape::context + DecodeShape::steps) {}

    void step() { adapters.step(*model); }
    double eval_forward() { return model->evaluate_loss(adapters.batch(), adapters.targets, S::B, S::T); }
    /// Empties the cache and fills it with a prompt of `context` tokens.
    void prefill() {
        model->reset_cache(DecodeShape::context + DecodeShape::steps);
        model->decode(std::span<const int>(adapters.tokens.data(), static_cast<std::size_t>(DecodeShape::context)));
    }
};

/// Peak heap of the case above `before` (taken before the model was built): the model's own memory
/// (weights, adapters, optimiser state) and its working memory; the peak is reset after building, so
/// the transient copies of making random weights are not in it.
void report_heap(benchmark::State& state, long long before) {
    state.counters["peak_heap_MB"] = double(heap_peak() - before) / double(1 << 20);
}

// Kernel: one CoMiGS fine-tuning step (forward, backward, AdamW on the LoRA adapters and routers).
void model_step(benchmark::State& state, RandomHost host, bool bf16) {
    const long long before = heap_current();
    CoMiGSModel m(host, bf16);
    heap_reset_peak();
    m.step();  // warm-up: buffers sized, pages touched
    for (auto _ : state) m.step();
    state.SetItemsProcessed(state.iterations() * ModelStepShape::B * ModelStepShape::T);
    report_heap(state, before);
}

// Kernel: model_step on one thread, set inside the case: with random interleaving its repetitions
// alternate with the all-threads case's in one process (the thread scaling figure).
void model_step_one_thread(benchmark::State& state, RandomHost host, bool bf16) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    model_step(state, host, bf16);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
}

// Kernel: the evaluation forward with the loss (CausalLm::evaluate_loss: head in vocabulary chunks).
void model_fwd(benchmark::State& state, RandomHost host, bool bf16) {
    const long long before = heap_current();
    CoMiGSModel m(host, bf16);
    heap_reset_peak();
    benchmark::DoNotOptimize(m.eval_forward());
    for (auto _ : state) benchmark::DoNotOptimize(m.eval_forward());
    state.SetItemsProcessed(state.iterations() * ModelStepShape::B * ModelStepShape::T);
    report_heap(state, before);
}

// Kernel: model_step with the hosts' phase timers on (comigs/profile.hpp): counters <pass>_<phase>_ms
// per step, and other_ms (AdamW, zeroing, what no phase covers). The timers add little; the phase
// table of docs/performance.md comes from here.
void model_phases(benchmark::State& state, RandomHost host, bool bf16) {
    CoMiGSModel m(host, bf16);
    profile_steps(state, [&] { m.step(); });
    state.SetItemsProcessed(state.iterations() * ModelStepShape::B * ModelStepShape::T);
}

// Kernel: one new token with the KV cache holding 512..527 tokens (refilled, untimed, every 16), for the
// mixture model (2 experts, top-2) or the same model with plain LoRA on its MLPs (1 expert).
void model_decode(benchmark::State& state, RandomHost host, Index experts) {
    CoMiGSModel m(host, false, experts, std::min<Index>(experts, ModelStepShape::top_k));
    m.prefill();
    Index next = DecodeShape::context;
    for (auto _ : state) {
        if (next == DecodeShape::context + DecodeShape::steps) {
            state.PauseTiming();
            m.prefill();
            next = DecodeShape::context;
            state.ResumeTiming();
        }
        benchmark::DoNotOptimize(m.model->decode(std::span<const int>(&m.adapters.tokens[static_cast<std::size_t>(next)], 1)).data());
        ++next;
    }
    state.SetItemsProcessed(state.iterations());
}

// ---------------------------------------------------------------------------------------------------
// The new whole-model kernels against what they replace, at GPT-2-124M shapes (8 x 128 tokens).

/// One layer's attention inputs: packed qkv [N, (H + 2 KV) hd] as c_attn (or q, k, v side by side)
/// writes it, and a random output gradient. Default: GPT-2-124M's 12 heads; SmolLM2's 9 over 3.
struct AttentionSetup {
    static constexpr Index B = ModelStepShape::B, T = ModelStepShape::T, hd = 64, N = B * T;
    Index H = 12, KV = 12, d = H * hd, width = (H + 2 * KV) * hd;
    std::vector<float> qkv, out, dout, dqkv, lse, probs;
    explicit AttentionSetup(Index heads = 12, Index kv_heads = 12)
        : H(heads), KV(kv_heads), d(heads * hd), width((heads + 2 * kv_heads) * hd) {
        Rng rng(3);
        qkv = random_vector<float>(static_cast<std::size_t>(N * width), rng);
        dout = random_vector<float>(static_cast<std::size_t>(N * d), rng);
        out.assign(dout.size(), 0.0f);
        dqkv.assign(qkv.size(), 0.0f);
    }
    Index offset(int i) const { return i == 0 ? 0 : d + (i - 1) * KV * hd; }
    Index cols(int i) const { return i == 0 ? d : KV * hd; }
    ConstMatrixView<float> part(int i) const { return {qkv.data() + offset(i), N, cols(i), width}; }
    MatrixView<float> dpart(int i) { return {dqkv.data() + offset(i), N, cols(i), width}; }
    kernels::AttentionShape shape() const { return {B, T, T, H, KV, hd}; }
};

/// Multiply-adds of one causal attention's products at T keys per sequence: QK^T and PV forward, the
/// recomputed QK^T, dO V^T, P^T dO, dS^T Q and dS K backward (each hd T (T + 1) / 2 per head).
double attention_macs(const AttentionSetup& s, int products) {
    return double(products) * double(s.B) * double(s.H) * double(s.hd) * double(s.T) * double(s.T + 1) / 2;
}

// Kernel: kernels::attention_forward + attention_backward (flash style: lse kept, probabilities recomputed).
void attention_flash(benchmark::State& state, Index heads, Index kv_heads, bool tiled) {
    const Index saved = kernels::detail::attention_tiled_min_queries();
    if (!tiled) kernels::detail::attention_tiled_min_queries() = ModelStepShape::T + 1;  // the blocked path
    AttentionSetup s(heads, kv_heads);
    const auto shape = s.shape();
    s.lse.assign(static_cast<std::size_t>(s.B * s.H * s.T), 0.0f);
    for (auto _ : state) {
        kernels::attention_forward<float>({s.out.data(), s.N, s.d}, s.lse.data(), s.part(0), s.part(1), s.part(2), shape);
        kernels::attention_backward<float>(s.dpart(0), s.dpart(1), s.dpart(2), {s.dout.data(), s.N, s.d}, s.part(0),
                                           s.part(1), s.part(2), {s.out.data(), s.N, s.d}, s.lse.data(), shape);
        benchmark::DoNotOptimize(s.dqkv.data());
    }
    state.SetItemsProcessed(state.iterations() * s.N);
    set_counters(state, s.N, 2.0 * attention_macs(s, 7));
    kernels::detail::attention_tiled_min_queries() = saved;
}

// Kernel: kernels::attention_forward alone (with the lse, as in training).
void attention_flash_forward(benchmark::State& state, Index heads, Index kv_heads) {
    AttentionSetup s(heads, kv_heads);
    const auto shape = s.shape();
    s.lse.assign(static_cast<std::size_t>(s.B * s.H * s.T), 0.0f);
    for (auto _ : state) {
        kernels::attention_forward<float>({s.out.data(), s.N, s.d}, s.lse.data(), s.part(0), s.part(1), s.part(2), shape);
        benchmark::DoNotOptimize(s.out.data());
    }
    state.SetItemsProcessed(state.iterations() * s.N);
    set_counters(state, s.N, 2.0 * attention_macs(s, 2));
}

// Kernel: models::attention_forward + attention_backward of the host (every probability kept).
void attention_probs(benchmark::State& state) {
    AttentionSetup s;
    s.probs.assign(static_cast<std::size_t>(s.B * s.H * s.T * s.T), 0.0f);
    const ConstMatrixView<float> qkv(s.qkv.data(), s.N, 3 * s.d);
    for (auto _ : state) {
        cm::attention_forward<float>({s.out.data(), s.N, s.d}, s.probs.data(), qkv, s.B, s.T, s.H);
        cm::attention_backward<float>({s.dqkv.data(), s.N, 3 * s.d}, {s.dout.data(), s.N, s.d}, qkv, s.probs.data(),
                                      s.B, s.T, s.H);
        benchmark::DoNotOptimize(s.dqkv.data());
    }
    state.SetItemsProcessed(state.iterations() * s.N);
}

/// The head's inputs: final hidden states [N, d], the tied embedding [V, d], targets.
struct HeadSetup {
    static constexpr Index N = ModelStepShape::B * ModelStepShape::T, d = 768, V = 50257;
    std::vector<float> x, W, dx, logits, lse;
    std::vector<int> targets;
    HeadSetup() {
        Rng rng(4);
        x = random_vector<float>(static_cast<std::size_t>(N * d), rng);
        W = random_vector<float>(static_cast<std::size_t>(V * d), rng, 0.02);
        dx.assign(x.size(), 0.0f);
        lse.assign(static_cast<std::size_t>(N), 0.0f);
        targets.resize(static_cast<std::size_t>(N));
        for (int& t : targets) t = static_cast<int>(rng.below(V));
    }
};

// Kernel: kernels::lm_head_cross_entropy (chunked head, online softmax, dx beside it).
void lm_head_chunked(benchmark::State& state) {
    heap_reset_peak();
    const long long start = heap_current();
    HeadSetup s;
    for (auto _ : state) {
        benchmark::DoNotOptimize(kernels::lm_head_cross_entropy<float, float>(
            {s.dx.data(), s.N, s.d}, s.lse.data(), nullptr, {s.x.data(), s.N, s.d}, {s.W.data(), s.V, s.d},
            s.targets.data(), 1.0f / float(s.N)));
    }
    state.SetItemsProcessed(state.iterations() * s.N);
    set_counters(state, s.N, 2.0 * 2.0 * double(s.N) * double(s.d) * double(s.V));
    report_heap(state, start);
}

// Kernel: the head as the host ran it: logits [N, V] by one GEMM, cross-entropy forward and backward
// over them, dx = dlogits W (the model's own layers.hpp functions, the GEMMs through kernels::gemm).
void lm_head_logits(benchmark::State& state) {
    heap_reset_peak();
    const long long start = heap_current();
    HeadSetup s;
    s.logits.assign(static_cast<std::size_t>(s.N * s.V), 0.0f);
    std::vector<float> dlogits(s.logits.size(), 0.0f);
    const ConstMatrixView<float> x(s.x.data(), s.N, s.d), W(s.W.data(), s.V, s.d);
    const MatrixView<float> L(s.logits.data(), s.N, s.V), dL(dlogits.data(), s.N, s.V);
    for (auto _ : state) {
        kernels::gemm<float>(L, x, kernels::Op::none, W, kernels::Op::trans);
        benchmark::DoNotOptimize(cm::crossentropy_forward<float>(s.lse.data(), L, s.targets.data()));
        std::fill(dlogits.begin(), dlogits.end(), 0.0f);  // crossentropy_backward accumulates
        cm::crossentropy_backward<float>(dL, L, s.lse.data(), s.targets.data(), 1.0f);
        kernels::gemm<float>({s.dx.data(), s.N, s.d}, dL, kernels::Op::none, W, kernels::Op::none);
    }
    state.SetItemsProcessed(state.iterations() * s.N);
    set_counters(state, s.N, 2.0 * 2.0 * double(s.N) * double(s.d) * double(s.V));
    report_heap(state, start);
}

#define COMIGS_MODEL_CASES(host)                                                                           \
    BENCHMARK_CAPTURE(model_step, fp32_##host, RandomHost::host, false)                                          \
        ->Name("model_step/fp32/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();                   \
    BENCHMARK_CAPTURE(model_step_one_thread, fp32_##host, RandomHost::host, false)                               \
        ->Name("model_step/fp32/" #host "/one_thread")->Unit(benchmark::kMillisecond)->UseRealTime();     \
    BENCHMARK_CAPTURE(model_step, bf16_##host, RandomHost::host, true)                                           \
        ->Name("model_step/bf16/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();                   \
    BENCHMARK_CAPTURE(model_fwd, fp32_##host, RandomHost::host, false)                                           \
        ->Name("model_fwd/fp32/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();                    \
    BENCHMARK_CAPTURE(model_fwd, bf16_##host, RandomHost::host, true)                                            \
        ->Name("model_fwd/bf16/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();                    \
    BENCHMARK_CAPTURE(model_phases, fp32_##host, RandomHost::host, false)                                        \
        ->Name("model_phases/fp32/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();                 \
    BENCHMARK_CAPTURE(model_phases, bf16_##host, RandomHost::host, true)                                         \
        ->Name("model_phases/bf16/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();                 \
    BENCHMARK_CAPTURE(model_decode, mixture_##host, RandomHost::host, ModelStepShape::experts)                       \
        ->Name("model_decode/mixture/fp32/" #host)->Unit(benchmark::kMillisecond)->UseRealTime();         \
    BENCHMARK_CAPTURE(model_decode, lora_##host, RandomHost::host, 1)                                           \
        ->Name("model_decode/lora/fp32/" #host)->Unit(benchmark::kMillisecond)->UseRealTime()

COMIGS_MODEL_CASES(gpt2_124m);
COMIGS_MODEL_CASES(smollm2_135m);
BENCHMARK_CAPTURE(attention_flash, gpt2, 12, 12, true)->Name("attention_fwd_bwd/flash/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_flash, smollm2, 9, 3, true)->Name("attention_fwd_bwd/flash/smollm2_135m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_flash, gpt2_blocked, 12, 12, false)->Name("attention_fwd_bwd/blocked/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_flash, smollm2_blocked, 9, 3, false)->Name("attention_fwd_bwd/blocked/smollm2_135m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_flash_forward, gpt2, 12, 12)->Name("attention_fwd/flash/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_flash_forward, smollm2, 9, 3)->Name("attention_fwd/flash/smollm2_135m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(attention_probs)->Name("attention_fwd_bwd/probs/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(lm_head_chunked)->Name("lm_head_ce/chunked/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(lm_head_logits)->Name("lm_head_ce/logits/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace comigs::bench
