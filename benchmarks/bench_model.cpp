// Whole-model benchmarks: one CoMiGS fine-tuning step of a real-shaped model with random weights, the
// evaluation forward, and the new whole-model kernels against what they replace, in one run.
//
//   model_step/fp32/gpt2_124m    forward, backward, AdamW on the attention LoRA and the mixtures:
//                                batch 8 x 128 tokens, 2 experts (1G1S) top-2 rank 8 on every MLP, LoRA
//                                rank 8 on c_attn and c_proj, cross-entropy over 50257 tokens
//   model_fwd/fp32/gpt2_124m     evaluation forward with the loss (8 x 128)
//   attention_fwd_bwd/{flash,probs}/gpt2_124m   one layer's causal attention, forward + backward
//   lm_head_ce/{chunked,logits}/gpt2_124m       LM head + cross-entropy + its input gradient
// items_per_second = tokens/s. Counter peak_heap_MB: heap bytes of the case (model, activations,
// work space) at their peak, from bench_memory.cpp.
#include "bench_common.hpp"
#include "bench_memory.hpp"

#include <comigs/kernels/attention.hpp>
#include <comigs/kernels/cross_entropy.hpp>
#include <comigs/models.hpp>
#include <comigs/models/mixture_mlp.hpp>
#include <comigs/optim.hpp>

#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace comigs::bench {
namespace {

namespace cm = comigs::models;

/// The shapes of issue 24: batch 8 x 128 tokens; 2 experts top-2 rank 8 (alpha 16, rsLoRA scaling).
struct StepShape {
    static constexpr Index B = 8, T = 128, experts = 2, top_k = 2, rank = 8;
};

cm::Gpt2Config gpt2_124m() {
    cm::Gpt2Config c;
    c.vocab = 50257;
    c.n_ctx = 1024;
    c.d_model = 768;
    c.n_head = 12;
    c.n_layer = 12;
    return c;
}

/// Sets every LoRA B (zero after init) to small random values, so that no work is skipped for zeros.
void randomize_b(ParamBuffer<float>& p, Rng& rng) {
    for (const auto& s : p.layout().tensors())
        if (s.name.find("lora_B") != std::string::npos)
            for (float& v : p.span(s.name)) v = static_cast<float>(rng.normal(0.0, 0.01));
}

/// A GPT-2 CoMiGS model with random weights, its mixtures, an AdamW over every adapter and a batch.
struct Gpt2Mixture {
    std::unique_ptr<cm::Gpt2<float>> model;
    std::vector<std::shared_ptr<MixtureOfLoraMlp<float>>> mixtures;
    std::unique_ptr<AdamW<float>> opt;
    std::vector<int> tokens, targets;

    explicit Gpt2Mixture(const cm::Gpt2Config& c) {
        using S = StepShape;
        Rng rng(24);
        model = std::make_unique<cm::Gpt2<float>>(c);
        model->init_weights(rng);
        model->add_attention_lora({S::rank, 16.0, LoraScaling::sqrt}, rng);
        randomize_b(model->lora(), rng);
        model->set_train_mode(cm::TrainMode::frozen_base);
        std::vector<ParamBinding<float>> bindings{bind("attention", model->lora(), model->lora_grads())};
        for (Index l = 0; l < c.n_layer; ++l) {
            MixtureConfig mc;
            mc.form = MlpForm::gelu;
            mc.d_model = c.d_model;
            mc.d_hidden = c.hidden();
            mc.n_experts = S::experts;
            mc.top_k = S::top_k;
            mc.rank = S::rank;
            auto mix = std::make_shared<MixtureOfLoraMlp<float>>(mc, cm::frozen_mlp(*model, l));
            mix->init(rng);
            randomize_b(mix->params(), rng);
            model->set_mlp(l, std::make_unique<cm::MixtureMlp<float>>(mix, 0.01 / double(c.n_layer)));
            bindings.push_back(bind("mlp" + std::to_string(l), mix->params(), mix->grads()));
            mixtures.push_back(std::move(mix));
        }
        opt = std::make_unique<AdamW<float>>(std::vector<AdamWGroup<float>>{
            {.name = "adapters",
             .bindings = std::move(bindings),
             .lr = LrSchedule::constant(1e-4),
             .options = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.01}}});
        tokens.resize(static_cast<std::size_t>(S::B * S::T));
        targets.resize(tokens.size());
        for (int& t : tokens) t = static_cast<int>(rng.below(static_cast<std::uint64_t>(c.vocab)));
        for (int& t : targets) t = static_cast<int>(rng.below(static_cast<std::uint64_t>(c.vocab)));
    }

    void step() {
        model->zero_grad();
        for (auto& m : mixtures) m->zero_grad();
        model->forward(tokens, targets, StepShape::B, StepShape::T, true);
        model->backward();
        opt->step();
    }
    float eval_forward() { return model->forward(tokens, targets, StepShape::B, StepShape::T, false); }
};

void report_heap(benchmark::State& state, long long start) {
    state.counters["peak_heap_MB"] = double(heap_peak() - start) / double(1 << 20);
}

// Kernel: the whole CoMiGS step (Gpt2 forward + backward with MixtureMlp blocks, AdamW).
void model_step(benchmark::State& state, const cm::Gpt2Config& c) {
    heap_reset_peak();
    const long long start = heap_current();
    Gpt2Mixture m(c);
    m.step();  // warm-up: buffers sized, pages touched
    for (auto _ : state) m.step();
    state.SetItemsProcessed(state.iterations() * StepShape::B * StepShape::T);
    report_heap(state, start);
}

// Kernel: model_step on one thread, set inside the case: with random interleaving its repetitions
// alternate with the all-threads case's in one process (the thread scaling figure).
void model_step_one_thread(benchmark::State& state, const cm::Gpt2Config& c) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    model_step(state, c);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
}

// Kernel: Gpt2::forward in evaluation mode, with the loss.
void model_fwd(benchmark::State& state, const cm::Gpt2Config& c) {
    heap_reset_peak();
    const long long start = heap_current();
    Gpt2Mixture m(c);
    benchmark::DoNotOptimize(m.eval_forward());
    for (auto _ : state) benchmark::DoNotOptimize(m.eval_forward());
    state.SetItemsProcessed(state.iterations() * StepShape::B * StepShape::T);
    report_heap(state, start);
}

// ---------------------------------------------------------------------------------------------------
// The new whole-model kernels against what they replace, at GPT-2-124M shapes (8 x 128 tokens).

/// One layer's attention inputs: packed qkv [N, 3d] as c_attn writes it, and a random output gradient.
struct AttentionSetup {
    static constexpr Index B = StepShape::B, T = StepShape::T, H = 12, hd = 64, d = H * hd, N = B * T;
    std::vector<float> qkv, out, dout, dqkv, lse, probs;
    AttentionSetup() {
        Rng rng(3);
        qkv = random_vector<float>(static_cast<std::size_t>(N * 3 * d), rng);
        dout = random_vector<float>(static_cast<std::size_t>(N * d), rng);
        out.assign(dout.size(), 0.0f);
        dqkv.assign(qkv.size(), 0.0f);
    }
    ConstMatrixView<float> part(int i) const { return {qkv.data() + i * d, N, d, 3 * d}; }
    MatrixView<float> dpart(int i) { return {dqkv.data() + i * d, N, d, 3 * d}; }
};

// Kernel: kernels::attention_forward + attention_backward (flash style: lse kept, probabilities recomputed).
void attention_flash(benchmark::State& state) {
    AttentionSetup s;
    const kernels::AttentionShape shape{s.B, s.T, s.T, s.H, s.H, s.hd};
    s.lse.assign(static_cast<std::size_t>(s.B * s.H * s.T), 0.0f);
    for (auto _ : state) {
        kernels::attention_forward<float>({s.out.data(), s.N, s.d}, s.lse.data(), s.part(0), s.part(1), s.part(2), shape);
        kernels::attention_backward<float>(s.dpart(0), s.dpart(1), s.dpart(2), {s.dout.data(), s.N, s.d}, s.part(0),
                                           s.part(1), s.part(2), {s.out.data(), s.N, s.d}, s.lse.data(), shape);
        benchmark::DoNotOptimize(s.dqkv.data());
    }
    state.SetItemsProcessed(state.iterations() * s.N);
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
    static constexpr Index N = StepShape::B * StepShape::T, d = 768, V = 50257;
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

BENCHMARK_CAPTURE(model_step, fp32/gpt2_124m, gpt2_124m())
    ->Name("model_step/fp32/gpt2_124m")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(model_step_one_thread, fp32/gpt2_124m, gpt2_124m())
    ->Name("model_step/fp32/gpt2_124m/one_thread")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(model_fwd, fp32/gpt2_124m, gpt2_124m())
    ->Name("model_fwd/fp32/gpt2_124m")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(attention_flash)->Name("attention_fwd_bwd/flash/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(attention_probs)->Name("attention_fwd_bwd/probs/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(lm_head_chunked)->Name("lm_head_ce/chunked/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(lm_head_logits)->Name("lm_head_ce/logits/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace comigs::bench
