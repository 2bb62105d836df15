// Layer benchmarks at GPT-2 MLP shapes: the shared-base mixture against the plain dense MLP and the
// naive per-expert mixture, all on the same GEMM backend, so their ratios are measured in one run.
#include "bench_common.hpp"
#include "bench_memory.hpp"

#include <algorithm>
#include <chrono>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace comigs::bench {
namespace {

/// The plain frozen MLP (no LoRA, no router): fc -> GELU -> proj, with the input gradient.
struct DenseMlp {
    std::shared_ptr<const FrozenMlp<float>> base;
    std::vector<float> h, u, du, dh;

    void forward(MatrixView<float> y, ConstMatrixView<float> x) {
        const Index n = x.rows, hid = base->d_hidden();
        auto H = MatrixView<float>(resize(h, n * hid), n, hid);
        auto U = MatrixView<float>(resize(u, n * hid), n, hid);
        base->linear("fc").forward(H, x);
        kernels::gelu_forward(U.data, H.data, n * hid);
        base->linear("proj").forward(y, U);
    }
    void backward(MatrixView<float> dx, ConstMatrixView<float> dy) {
        const Index n = dy.rows, hid = base->d_hidden();
        auto dU = MatrixView<float>(resize(du, n * hid), n, hid);
        base->linear("proj").backward_input(dU, dy, false);
        kernels::gelu_backward(dU.data, dU.data, h.data(), n * hid);
        base->linear("fc").backward_input(dx, dU, false);
    }
    static float* resize(std::vector<float>& v, Index n) {
        if (v.size() < static_cast<std::size_t>(n)) v.resize(static_cast<std::size_t>(n));
        return v.data();
    }
};

/// Everything one layer benchmark needs: frozen base, mixture with non-zero B, input and output gradient.
struct LayerSetup {
    Index n;
    MixtureConfig cfg;
    std::shared_ptr<FrozenMlp<float>> base;
    std::unique_ptr<MixtureOfLoraMlp<float>> mix;
    std::vector<float> x, y, dy, dx;

    explicit LayerSetup(Index tokens, bool bf16 = false) : n(tokens) {
        using S = Gpt2Shape;
        cfg.form = MlpForm::gelu;
        cfg.d_model = S::d;
        cfg.d_hidden = S::h;
        cfg.n_experts = S::E;
        cfg.top_k = S::k;
        cfg.rank = S::r;
        Rng rng(7);
        base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, S::d, S::h);
        base->randomize(rng, 0.02);
        if (bf16) base->set_precision(Precision::bf16);
        mix = std::make_unique<MixtureOfLoraMlp<float>>(cfg, base);
        mix->init(rng);
        for (const auto& spec : mix->params().layout().tensors())
            if (spec.name.find("lora_B") != std::string::npos)
                for (float& v : mix->params().span(spec.name)) v = static_cast<float>(rng.normal(0.0, 0.01));
        x = random_vector<float>(static_cast<std::size_t>(n * S::d), rng);
        dy = random_vector<float>(x.size(), rng);
        y.assign(x.size(), 0.0f);
        dx.assign(x.size(), 0.0f);
    }
    /// One training step's layer work: forward, then backward with dx (lb_grad 0.01).
    void fwd_bwd() {
        mix->forward(Y(), X());
        mix->backward(DX(), DY(), 0.01f);
    }
    MatrixView<float> Y() { return {y.data(), n, cfg.d_model}; }
    MatrixView<float> DX() { return {dx.data(), n, cfg.d_model}; }
    ConstMatrixView<float> X() const { return {x.data(), n, cfg.d_model}; }
    ConstMatrixView<float> DY() const { return {dy.data(), n, cfg.d_model}; }
};

// Kernel: MixtureOfLoraMlp::forward (base GEMMs once via FrozenLinear, rank-r on routed rows).
void mixture_fwd(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    s.mix->forward(s.Y(), s.X());  // warm-up: first touches of the layer's buffers are not steady state
    for (auto _ : state) {
        s.mix->forward(s.Y(), s.X());
        benchmark::DoNotOptimize(s.y.data());
    }
    set_counters(state, tokens, base_flops_fwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: MixtureOfLoraMlp::forward + backward (4 base GEMMs in total).
void mixture_fwd_bwd(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    s.fwd_bwd();  // warm-up
    for (auto _ : state) {
        s.fwd_bwd();
        benchmark::DoNotOptimize(s.dx.data());
    }
    if (bf16) state.SetLabel(kernels::to_string(kernels::bf16_backend()));
    set_counters(state, tokens, base_flops_fwd_bwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: mixture_fwd_bwd on one thread, set inside the case. With random interleaving its repetitions
// alternate with the all-threads case's in one process, so the scaling ratio compares two medians taken
// over the same stretch of a shared machine's time (two processes half a minute apart did not).
void mixture_fwd_bwd_one_thread(benchmark::State& state, Index tokens, bool bf16) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    mixture_fwd_bwd(state, tokens, bf16);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
}

// Kernel: MixtureOfLoraMlp::backward alone (2 base GEMMs), after one forward outside the timing
// (backward may run again on the same forward; the gradients keep accumulating).
void mixture_bwd(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    s.mix->forward(s.Y(), s.X());
    s.mix->backward(s.DX(), s.DY(), 0.01f);  // warm-up
    for (auto _ : state) {
        s.mix->backward(s.DX(), s.DY(), 0.01f);
        benchmark::DoNotOptimize(s.dx.data());
    }
    if (bf16) state.SetLabel(kernels::to_string(kernels::bf16_backend()));
    set_counters(state, tokens,
                 base_flops_fwd_bwd(tokens, s.cfg.d_model, s.cfg.d_hidden) - base_flops_fwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: MixtureOfLoraMlp::forward + backward with the one-pass row kernels (kernels/fused.hpp)
// switched off: the separate rank-r and activation kernels, for comparison in the same run.
void mixture_fwd_bwd_unfused(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    kernels::detail::fused_rows_enabled() = false;
    s.fwd_bwd();  // warm-up
    for (auto _ : state) {
        s.fwd_bwd();
        benchmark::DoNotOptimize(s.dx.data());
    }
    kernels::detail::fused_rows_enabled() = true;
    set_counters(state, tokens, base_flops_fwd_bwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: the plain dense MLP through FrozenLinear (same GEMM backend as the mixture).
void dense_mlp_fwd(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    DenseMlp mlp{s.base, {}, {}, {}, {}};
    mlp.forward(s.Y(), s.X());  // warm-up
    for (auto _ : state) {
        mlp.forward(s.Y(), s.X());
        benchmark::DoNotOptimize(s.y.data());
    }
    set_counters(state, tokens, base_flops_fwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: the plain dense MLP forward + input gradient.
void dense_mlp_fwd_bwd(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    DenseMlp mlp{s.base, {}, {}, {}, {}};
    mlp.forward(s.Y(), s.X());  // warm-up
    mlp.backward(s.DX(), s.DY());
    for (auto _ : state) {
        mlp.forward(s.Y(), s.X());
        mlp.backward(s.DX(), s.DY());
        benchmark::DoNotOptimize(s.dx.data());
    }
    set_counters(state, tokens, base_flops_fwd_bwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: the reference's algorithm: every selected expert runs the whole MLP (base GEMMs repeated
// k times per token) on the tokens routed to it; here each expert is a one-expert mixture sharing
// the base, so the GEMM backend and the elementwise kernels are the same as the shared-base layer.
void naive_mixture_fwd_bwd(benchmark::State& state, Index tokens) {
    LayerSetup s(tokens);
    const Index d = s.cfg.d_model, E = s.cfg.n_experts;
    MixtureConfig one = s.cfg;
    one.n_experts = 1;
    one.top_k = 1;
    std::vector<std::unique_ptr<MixtureOfLoraMlp<float>>> experts;
    Rng rng(3);
    for (Index e = 0; e < E; ++e) {
        experts.push_back(std::make_unique<MixtureOfLoraMlp<float>>(one, s.base));
        for (float& v : experts.back()->params().all()) v = static_cast<float>(rng.normal(0.0, 0.01));
    }
    RoutingResult<float> route;
    const auto router = s.mix->params().view("router.weight");
    std::vector<float> xe, ye, dye, dxe;
    std::vector<Index> tok;
    std::vector<float> gate;
    for (auto _ : state) {
        router_forward(route, s.X(), ConstMatrixView<float>(router), s.mix->router_config());
        std::fill(s.y.begin(), s.y.end(), 0.0f);
        std::fill(s.dx.begin(), s.dx.end(), 0.0f);
        for (Index e = 0; e < E; ++e) {
            tok.clear();
            gate.clear();
            for (Index t = 0; t < tokens; ++t)
                for (Index j = 0; j < route.slots; ++j)
                    if (route.expert_of(t, j) == e) {
                        tok.push_back(t);
                        gate.push_back(route.gate_of(t, j));
                    }
            const Index ne = static_cast<Index>(tok.size());
            if (ne == 0) continue;
            xe.resize(static_cast<std::size_t>(ne * d));
            ye.resize(xe.size());
            dye.resize(xe.size());
            dxe.assign(xe.size(), 0.0f);
            for (Index i = 0; i < ne; ++i) {
                std::copy_n(s.x.data() + tok[i] * d, d, xe.data() + i * d);
                for (Index c = 0; c < d; ++c) dye[i * d + c] = gate[i] * s.dy[tok[i] * d + c];
            }
            auto& ex = *experts[static_cast<std::size_t>(e)];
            ex.forward(MatrixView<float>(ye.data(), ne, d), ConstMatrixView<float>(xe.data(), ne, d));
            ex.backward(MatrixView<float>(dxe.data(), ne, d), ConstMatrixView<float>(dye.data(), ne, d), 0.0f);
            for (Index i = 0; i < ne; ++i)
                for (Index c = 0; c < d; ++c) {
                    s.y[tok[i] * d + c] += gate[i] * ye[i * d + c];
                    s.dx[tok[i] * d + c] += dxe[i * d + c];
                }
        }
        benchmark::DoNotOptimize(s.dx.data());
    }
    set_counters(state, tokens, base_flops_fwd_bwd(tokens, d, s.cfg.d_hidden));
}

/// The four frozen base GEMMs exactly as the layer issues them (FrozenLinear::forward without bias for
/// fc and proj: the layer adds both biases in its own passes; backward_input for both), at the
/// layer's shapes.
struct BaseGemms {
    LayerSetup& s;
    // Aligned as the layer's own H and m are.
    comigs::detail::aligned_vector<float> hbuf, mbuf;
    FrozenLinear<float> fc, proj;

    explicit BaseGemms(LayerSetup& setup)
        : s(setup),
          hbuf(static_cast<std::size_t>(setup.n * setup.cfg.d_hidden)),
          mbuf(hbuf.size(), 0.01f),
          fc(setup.base->linear("fc")),
          proj(setup.base->linear("proj")) {
        fc.bias = {};
        proj.bias = {};
    }
    void run() {
        const Index n = s.n, h = s.cfg.d_hidden;
        fc.forward(MatrixView<float>(hbuf.data(), n, h), s.X());
        proj.forward(s.Y(), ConstMatrixView<float>(mbuf.data(), n, h));
        proj.backward_input(MatrixView<float>(hbuf.data(), n, h), s.DY(), false);
        fc.backward_input(s.DX(), ConstMatrixView<float>(hbuf.data(), n, h), true);
    }
};

// Kernel: BaseGemms::run, the layer's four base GEMMs alone.
void base_gemms(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    BaseGemms gemms(s);
    gemms.run();  // warm-up
    for (auto _ : state) {
        gemms.run();
        benchmark::DoNotOptimize(s.dx.data());
    }
    set_counters(state, tokens, base_flops_fwd_bwd(tokens, s.cfg.d_model, s.cfg.d_hidden));
}

// Kernel: MixtureOfLoraMlp forward + backward and BaseGemms::run timed pair by pair, in alternating
// order; counter `share` = the median over the pairs of 1 - gemms / layer, the part of the layer's
// time spent outside its base GEMMs (`layer_ms`, `gemms_ms`: medians). A ratio of two cases' medians
// compares stretches of time seconds or minutes apart, and a shared host's speed drifts by 10-30%
// between them; the two halves of a pair run 50-100 ms apart.
void mixture_share(benchmark::State& state, Index tokens, bool bf16) {
    LayerSetup s(tokens, bf16);
    BaseGemms gemms(s);
    const auto seconds = [](auto&& f) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    s.fwd_bwd();  // warm-up
    gemms.run();
    std::vector<double> share, tl, tg;
    bool layer_first = true;
    for (auto _ : state) {
        double a, b;
        if (layer_first) {
            a = seconds([&] { s.fwd_bwd(); });
            b = seconds([&] { gemms.run(); });
        } else {
            b = seconds([&] { gemms.run(); });
            a = seconds([&] { s.fwd_bwd(); });
        }
        layer_first = !layer_first;
        benchmark::DoNotOptimize(s.dx.data());
        share.push_back(1.0 - b / a);
        tl.push_back(a);
        tg.push_back(b);
    }
    const auto median = [](std::vector<double>& v) {
        std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
        return v[v.size() / 2];
    };
    if (share.empty()) return;
    state.counters["share"] = median(share);
    state.counters["layer_ms"] = 1e3 * median(tl);
    state.counters["gemms_ms"] = 1e3 * median(tg);
}

// Kernel: none timed; reports the heap bytes of one layer (frozen base, LoRA and router parameters
// and gradients, everything kept between forward and backward, work space) around one fwd+bwd, and
// the frozen bytes with E = 4 against E = 1 (one shared copy of the base whatever E is).
void memory(benchmark::State& state, bool bf16) {
    using S = Gpt2Shape;
    const Index n = 1024;
    Rng rng(5);
    auto x = random_vector<float>(static_cast<std::size_t>(n * S::d), rng);
    auto dy = random_vector<float>(x.size(), rng);
    std::vector<float> y(x.size()), dx(x.size());
    double peak = 0, frozen = 0, frozen1 = 0;
    for (auto _ : state) {
        const long long before = heap_current();
        heap_reset_peak();
        {
            auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, S::d, S::h);
            base->randomize(rng, 0.02);
            if (bf16) base->set_precision(Precision::bf16);
            // The fp32 load buffer is gone once the base is converted: measure from here.
            const long long start = heap_current();
            heap_reset_peak();
            MixtureConfig cfg;
            cfg.d_model = S::d;
            cfg.d_hidden = S::h;
            cfg.n_experts = S::E;
            cfg.top_k = S::k;
            cfg.rank = S::r;
            MixtureOfLoraMlp<float> mix(cfg, base);
            mix.init(rng);
            mix.forward(MatrixView<float>(y.data(), n, S::d), ConstMatrixView<float>(x.data(), n, S::d));
            mix.backward(MatrixView<float>(dx.data(), n, S::d), ConstMatrixView<float>(dy.data(), n, S::d), 0.01f);
            peak = double(heap_peak() - start) + double(base->weight_bytes());
            frozen = double(base->weight_bytes());
            MixtureConfig one = cfg;
            one.n_experts = 1;
            one.top_k = 1;
            MixtureOfLoraMlp<float> single(one, base);
            frozen1 = double(single.base().weight_bytes());
        }
        benchmark::DoNotOptimize(before);
    }
    state.counters["peak_bytes"] = peak;
    state.counters["frozen_bytes"] = frozen;
    state.counters["frozen_bytes_E1"] = frozen1;
}

constexpr Index kTokens = 1024;

BENCHMARK_CAPTURE(base_gemms, fp32/gpt2, kTokens, false)->Name("base_gemms/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(base_gemms, bf16/gpt2, kTokens, true)->Name("base_gemms/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_share, fp32/gpt2, kTokens, false)->Name("mixture_share/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_share, bf16/gpt2, kTokens, true)->Name("mixture_share/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(memory, fp32/gpt2, false)->Name("memory/fp32/gpt2")->Iterations(1);
BENCHMARK_CAPTURE(memory, bf16/gpt2, true)->Name("memory/bf16/gpt2")->Iterations(1);

BENCHMARK_CAPTURE(mixture_fwd, fp32/gpt2, kTokens, false)->Name("mixture_fwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd_bwd, fp32/gpt2, kTokens, false)->Name("mixture_fwd_bwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd_bwd_one_thread, fp32/gpt2, kTokens, false)
    ->Name("mixture_fwd_bwd/fp32/gpt2/one_thread")
    ->UseRealTime();
BENCHMARK_CAPTURE(mixture_bwd, fp32/gpt2, kTokens, false)->Name("mixture_bwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_bwd, bf16/gpt2, kTokens, true)->Name("mixture_bwd/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_bwd, fp32/decode, 1, false)->Name("mixture_bwd/fp32/decode")->UseRealTime();
BENCHMARK_CAPTURE(dense_mlp_fwd, fp32/gpt2, kTokens, false)->Name("dense_mlp_fwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(dense_mlp_fwd_bwd, fp32/gpt2, kTokens, false)->Name("dense_mlp_fwd_bwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(naive_mixture_fwd_bwd, fp32/gpt2, kTokens)->Name("naive_mixture_fwd_bwd/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd_bwd_unfused, bf16/gpt2, kTokens, true)->Name("mixture_fwd_bwd_unfused/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd, bf16/gpt2, kTokens, true)->Name("mixture_fwd/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd_bwd, bf16/gpt2, kTokens, true)->Name("mixture_fwd_bwd/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(dense_mlp_fwd_bwd, bf16/gpt2, kTokens, true)->Name("dense_mlp_fwd_bwd/bf16/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd, fp32/decode, 1, false)->Name("mixture_fwd/fp32/decode")->UseRealTime();
BENCHMARK_CAPTURE(dense_mlp_fwd, fp32/decode, 1, false)->Name("dense_mlp_fwd/fp32/decode")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd_bwd, fp32/decode, 1, false)->Name("mixture_fwd_bwd/fp32/decode")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd, bf16/decode, 1, true)->Name("mixture_fwd/bf16/decode")->UseRealTime();
BENCHMARK_CAPTURE(mixture_bwd, bf16/decode, 1, true)->Name("mixture_bwd/bf16/decode")->UseRealTime();
BENCHMARK_CAPTURE(mixture_fwd_bwd, bf16/decode, 1, true)->Name("mixture_fwd_bwd/bf16/decode")->UseRealTime();
BENCHMARK_CAPTURE(dense_mlp_fwd, bf16/decode, 1, true)->Name("dense_mlp_fwd/bf16/decode")->UseRealTime();

}  // namespace
}  // namespace comigs::bench
