// Kernel benchmarks: the GEMM backends at the four base-GEMM shapes of the GPT-2 MLP (the "best GEMM"
// the layers are compared with, measured in the same run) and the elementwise kernels.
#include "bench_common.hpp"

#include <comigs/kernels/elementwise.hpp>
#include <comigs/kernels/fused.hpp>
#include <comigs/kernels/gemm_bf16.hpp>
#include <comigs/kernels/lowrank.hpp>

#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace comigs::bench {
namespace {

constexpr Index kT = 1024;

/// The four base GEMMs of one MLP forward+backward: (M, N, K, op of the weight).
struct BaseGemm {
    Index n, k;  // output columns, reduction length
    kernels::Op op;
};
constexpr BaseGemm kBase[4] = {{Gpt2Shape::h, Gpt2Shape::d, kernels::Op::trans},   // fc forward
                               {Gpt2Shape::d, Gpt2Shape::h, kernels::Op::trans},   // proj forward
                               {Gpt2Shape::h, Gpt2Shape::d, kernels::Op::none},    // proj input gradient
                               {Gpt2Shape::d, Gpt2Shape::h, kernels::Op::none}};   // fc input gradient

struct GemmData {
    // 64-byte aligned, as the layer's buffers are (a plain vector of this size is 16 bytes past a page).
    comigs::detail::aligned_vector<float> a, w, c;
    comigs::detail::aligned_vector<kernels::bf16> wb;
    explicit GemmData(Index m) {
        Rng rng(11);
        const auto av = random_vector<float>(static_cast<std::size_t>(m * Gpt2Shape::h), rng);
        const auto wv = random_vector<float>(static_cast<std::size_t>(Gpt2Shape::d * Gpt2Shape::h), rng, 0.02);
        a.assign(av.begin(), av.end());
        w.assign(wv.begin(), wv.end());
        c.assign(static_cast<std::size_t>(m * Gpt2Shape::h), 0.0f);
        wb.resize(w.size());
        kernels::convert_to_bf16(wb.data(), w.data(), static_cast<Index>(w.size()));
    }
};

// The four base-GEMM shapes through kernels::gemm<float> with products of at least `onednn_min`
// multiply-adds on oneDNN's sgemm (the rest on Eigen).
void gemm_fp32_cases(benchmark::State& state, Index m, Index onednn_min) {
    GemmData g(m);
    const Index saved = kernels::detail::gemm_onednn_min();
    kernels::detail::gemm_onednn_min() = onednn_min;
    auto run = [&] {
        for (const auto& b : kBase) {
            const Index wr = b.op == kernels::Op::trans ? b.n : b.k, wc = b.op == kernels::Op::trans ? b.k : b.n;
            kernels::gemm<float>(MatrixView<float>(g.c.data(), m, b.n), ConstMatrixView<float>(g.a.data(), m, b.k),
                                 kernels::Op::none, ConstMatrixView<float>(g.w.data(), wr, wc), b.op);
            benchmark::DoNotOptimize(g.c.data());
        }
    };
    run();  // warm-up (first touches, JIT)
    for (auto _ : state) run();
    kernels::detail::gemm_onednn_min() = saved;
    set_counters(state, m, base_flops_fwd_bwd(m, Gpt2Shape::d, Gpt2Shape::h));
}

// Kernel: kernels::gemm<float> on Eigen alone (each thread's part a serial Eigen product).
void gemm_eigen_fp32(benchmark::State& state, Index m) {
    gemm_fp32_cases(state, m, std::numeric_limits<Index>::max());
}

#ifdef COMIGS_HAVE_ONEDNN
// Kernel: kernels::gemm<float> with every part on oneDNN's sgemm (what the layers use at these sizes).
void gemm_sgemm_fp32(benchmark::State& state, Index m) { gemm_fp32_cases(state, m, 0); }
BENCHMARK_CAPTURE(gemm_sgemm_fp32, gpt2, kT)->Name("gemm_onednn_sgemm/fp32/gpt2")->UseRealTime();
#endif

// Kernel: kernels::gemm_bf16 (oneDNN AMX/AVX512-BF16 when built with it, else the fp32 fallback),
// activations converted to bf16 inside, on the four base-GEMM shapes.
void gemm_bf16(benchmark::State& state, Index m) {
    GemmData g(m);
    auto run = [&] {
        for (const auto& b : kBase) {
            const Index wr = b.op == kernels::Op::trans ? b.n : b.k, wc = b.op == kernels::Op::trans ? b.k : b.n;
            kernels::gemm_bf16(MatrixView<float>(g.c.data(), m, b.n), ConstMatrixView<float>(g.a.data(), m, b.k),
                               ConstMatrixView<kernels::bf16>(g.wb.data(), wr, wc), b.op);
            benchmark::DoNotOptimize(g.c.data());
        }
    };
    run();  // warm-up
    for (auto _ : state) run();
    state.SetLabel(kernels::to_string(kernels::bf16_backend()));
    set_counters(state, m, base_flops_fwd_bwd(m, Gpt2Shape::d, Gpt2Shape::h));
}

#ifdef COMIGS_HAVE_ONEDNN
// Kernel: oneDNN's matmul primitive in fp32 (its own threading; brgemm) on the four base-GEMM shapes:
// another fp32 candidate.
void gemm_onednn_fp32(benchmark::State& state, Index m) {
    GemmData g(m);
    auto run = [&] {
        for (const auto& b : kBase) {
            const kernels::onednn::Operand a{g.a.data(), m, b.k, b.k, 1};
            const kernels::onednn::Operand w = b.op == kernels::Op::none
                                                   ? kernels::onednn::Operand{g.w.data(), b.k, b.n, b.n, 1}
                                                   : kernels::onednn::Operand{g.w.data(), b.k, b.n, 1, b.k};
            kernels::onednn::matmul(kernels::onednn::Type::f32, a, w, g.c.data(), b.n, 1.0f, false);
            benchmark::DoNotOptimize(g.c.data());
        }
    };
    run();  // warm-up
    for (auto _ : state) run();
    set_counters(state, m, base_flops_fwd_bwd(m, Gpt2Shape::d, Gpt2Shape::h));
}
BENCHMARK_CAPTURE(gemm_onednn_fp32, gpt2, kT)->Name("gemm_onednn_matmul/fp32/gpt2")->UseRealTime();
#endif

// Kernel: kernels::gelu_forward (xsimd) over T * k * hidden elements.
void gelu_fwd(benchmark::State& state) {
    const Index n = kT * Gpt2Shape::k * Gpt2Shape::h;
    Rng rng(1);
    auto h = random_vector<float>(static_cast<std::size_t>(n), rng);
    std::vector<float> u(h.size());
    for (auto _ : state) {
        kernels::gelu_forward(u.data(), h.data(), n);
        benchmark::DoNotOptimize(u.data());
    }
    state.SetItemsProcessed(state.iterations() * n);
}

// Kernel: kernels::gelu_backward (xsimd) over T * k * hidden elements.
void gelu_bwd(benchmark::State& state) {
    const Index n = kT * Gpt2Shape::k * Gpt2Shape::h;
    Rng rng(1);
    auto h = random_vector<float>(static_cast<std::size_t>(n), rng);
    auto du = random_vector<float>(static_cast<std::size_t>(n), rng);
    std::vector<float> dh(h.size());
    for (auto _ : state) {
        kernels::gelu_backward(dh.data(), du.data(), h.data(), n);
        benchmark::DoNotOptimize(dh.data());
    }
    state.SetItemsProcessed(state.iterations() * n);
}

// Kernel: kernels::lowrank_outer, one expert's dA2 = (g s q)^T U over its routed rows (T k / E rows of
// the hidden size): the LoRA-gradient outer products of the backward pass.
void lowrank_outer_bench(benchmark::State& state) {
    const Index rows = kT * Gpt2Shape::k / Gpt2Shape::E, r = Gpt2Shape::r, h = Gpt2Shape::h;
    Rng rng(2);
    auto x = random_vector<float>(static_cast<std::size_t>(rows * r), rng);
    auto y = random_vector<float>(static_cast<std::size_t>(rows * h), rng);
    std::vector<float> c(static_cast<std::size_t>(r * h));
    for (auto _ : state) {
        kernels::lowrank_outer(c.data(), h, x.data(), r, y.data(), h, static_cast<const Index*>(nullptr), rows, r, h);
        benchmark::DoNotOptimize(c.data());
    }
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(rows * r * h) * 1e-9 * double(state.iterations()),
                                                   benchmark::Counter::kIsRate);
}

// Kernel: kernels::lowrank_add + lowrank_project on every routed row (the per-row rank-r work of
// the forward pass: pre-activation p = H + s B z and z2 = A u), T k rows of the hidden size.
void lowrank_rows_bench(benchmark::State& state) {
    const Index rows = kT * Gpt2Shape::k, r = Gpt2Shape::r, h = Gpt2Shape::h;
    Rng rng(3);
    auto H = random_vector<float>(static_cast<std::size_t>(kT * h), rng);
    auto V = random_vector<float>(static_cast<std::size_t>(r * h), rng);
    auto z = random_vector<float>(static_cast<std::size_t>(rows * r), rng);
    std::vector<float> p(static_cast<std::size_t>(rows * h)), out(static_cast<std::size_t>(rows * r));
    for (auto _ : state) {
#pragma omp parallel for schedule(static)
        for (Index i = 0; i < rows; ++i) {
            kernels::lowrank_add(p.data() + i * h, H.data() + (i / 2) * h, z.data() + i * r, V.data(), r, h, 0.5f);
            kernels::lowrank_project(out.data() + i * r, V.data(), p.data() + i * h, r, h);
        }
        benchmark::DoNotOptimize(out.data());
    }
    state.counters["GFLOP/s"] = benchmark::Counter(4.0 * double(rows * r * h) * 1e-9 * double(state.iterations()),
                                                   benchmark::Counter::kIsRate);
}

/// Random top-2 routing of n tokens over E >= 2 experts for the row fixtures: two distinct experts per
/// token (expert[2 t], expert[2 t + 1]) with gates g and 1 - g, g in [0.5, 1).
void random_top2(Rng& rng, Index n, Index E, std::vector<std::int32_t>& expert, std::vector<float>& gate) {
    for (Index t = 0; t < n; ++t) {
        const auto e0 = static_cast<std::int32_t>(rng.uniform() * E) % E;
        const auto e1 = static_cast<std::int32_t>((e0 + 1 + static_cast<std::int32_t>(rng.uniform() * (E - 1))) % E);
        expert.push_back(e0);
        expert.push_back(e1);
        const float g = static_cast<float>(0.5 + 0.5 * rng.uniform());
        gate.push_back(g);
        gate.push_back(1.0f - g);
    }
}

/// Pointers to the E [r, h] blocks of one factor array (one block per expert).
template <class P>
std::vector<P> per_expert(P base, Index E, Index block) {
    std::vector<P> out;
    for (Index e = 0; e < E; ++e) out.push_back(base + e * block);
    return out;
}

/// Routed rows of the GPT-2 mixture for the fused-pass benchmarks: random top-2 routing over E experts.
struct FusedRows {
    static constexpr Index n = kT, h = Gpt2Shape::h, r = Gpt2Shape::r, E = Gpt2Shape::E, k = Gpt2Shape::k;
    std::vector<float> H, b1, M, dM, dH, zs, qg, z2, dz, udm, fb, fa, ga, gb, part;
    std::vector<std::int32_t> expert;
    std::vector<float> gate;
    std::vector<const float*> B1T, A2;
    std::vector<float*> gA2, gB1T;
    FusedRows() {
        Rng rng(4);
        H = random_vector<float>(static_cast<std::size_t>(n * h), rng);
        dM = random_vector<float>(H.size(), rng);
        b1 = random_vector<float>(static_cast<std::size_t>(h), rng, 0.02);
        M.assign(H.size(), 0.0f);
        dH.assign(H.size(), 0.0f);
        zs = random_vector<float>(static_cast<std::size_t>(n * k * r), rng, 0.1);
        qg = random_vector<float>(zs.size(), rng, 0.1);
        z2.assign(zs.size(), 0.0f);
        dz.assign(zs.size(), 0.0f);
        udm.assign(static_cast<std::size_t>(n * k), 0.0f);
        fb = random_vector<float>(static_cast<std::size_t>(E * r * h), rng, 0.01);
        fa = random_vector<float>(fb.size(), rng, 0.01);
        ga.assign(fb.size(), 0.0f);
        gb.assign(fb.size(), 0.0f);
        random_top2(rng, n, E, expert, gate);
        B1T = per_expert<const float*>(fb.data(), E, r * h);
        A2 = per_expert<const float*>(fa.data(), E, r * h);
        gA2 = per_expert(ga.data(), E, r * h);
        gB1T = per_expert(gb.data(), E, r * h);
    }
};

// Kernel: kernels::gelu_mixture_forward, the one-pass forward of the 2048 routed rows (rank-r update,
// bias, GELU, gate mix into m, A2 projection) at GPT-2 shapes.
void mixture_rows_fwd(benchmark::State& state) {
    FusedRows f;
    for (auto _ : state) {
        kernels::gelu_mixture_forward(MatrixView<float>(f.M.data(), f.n, f.h), f.z2.data(),
                                      ConstMatrixView<float>(f.H.data(), f.n, f.h), f.b1.data(), f.k, f.expert.data(),
                                      f.gate.data(), f.zs.data(), f.B1T.data(), f.A2.data(), f.E, f.r, f.part);
        benchmark::DoNotOptimize(f.M.data());
    }
    state.SetItemsProcessed(state.iterations() * f.n);
}

// Kernel: kernels::gelu_mixture_backward, the one-pass backward of the routed rows (dH, dz, u . dm and
// the dA2 / dB1 gradients) at GPT-2 shapes.
void mixture_rows_bwd(benchmark::State& state) {
    FusedRows f;
    for (auto _ : state) {
        kernels::gelu_mixture_backward(MatrixView<float>(f.dH.data(), f.n, f.h), f.dz.data(), f.udm.data(),
                                       ConstMatrixView<float>(f.dM.data(), f.n, f.h),
                                       ConstMatrixView<float>(f.H.data(), f.n, f.h), f.b1.data(), f.k,
                                       f.expert.data(), f.gate.data(), f.zs.data(), f.qg.data(), f.B1T.data(),
                                       f.A2.data(), f.gA2.data(), f.h, f.gB1T.data(), f.E, 0.5f, f.r, f.part);
        benchmark::DoNotOptimize(f.dH.data());
    }
    state.SetItemsProcessed(state.iterations() * f.n);
}

/// Routed rows of the SwiGLU mixture at SmolLM2-135M MLP shapes (h 1536, 2 experts top-2, rank 8), with the
/// outputs in bf16 as a bf16 base takes them (m forward; dH of gate and up backward), no biases (as Llama).
struct SwigluRows {
    static constexpr Index n = kT, h = 1536, r = 8, E = 2, k = 2;
    std::vector<float> Hg, Hu, dM, zsg, zsu, qg, z2, dzg, dzu, udm, fg, fu, fa, ga, gbg, gbu, part;
    std::vector<kernels::bf16> Mb, dHgb, dHub;
    std::vector<std::int32_t> expert;
    std::vector<float> gate;
    std::vector<const float*> BgT, BuT, A2;
    std::vector<float*> gA2, gBgT, gBuT;
    const float* none = nullptr;  // no biases
    SwigluRows() {
        Rng rng(5);
        Hg = random_vector<float>(static_cast<std::size_t>(n * h), rng);
        Hu = random_vector<float>(Hg.size(), rng);
        dM = random_vector<float>(Hg.size(), rng);
        Mb.resize(Hg.size());
        dHgb.resize(Hg.size());
        dHub.resize(Hg.size());
        zsg = random_vector<float>(static_cast<std::size_t>(n * k * r), rng, 0.1);
        zsu = random_vector<float>(zsg.size(), rng, 0.1);
        qg = random_vector<float>(zsg.size(), rng, 0.1);
        z2.assign(zsg.size(), 0.0f);
        dzg.assign(zsg.size(), 0.0f);
        dzu.assign(zsg.size(), 0.0f);
        udm.assign(static_cast<std::size_t>(n * k), 0.0f);
        fg = random_vector<float>(static_cast<std::size_t>(E * r * h), rng, 0.01);
        fu = random_vector<float>(fg.size(), rng, 0.01);
        fa = random_vector<float>(fg.size(), rng, 0.01);
        ga.assign(fg.size(), 0.0f);
        gbg.assign(fg.size(), 0.0f);
        gbu.assign(fg.size(), 0.0f);
        random_top2(rng, n, E, expert, gate);  // top-2 of 2 experts: every token visits both
        BgT = per_expert<const float*>(fg.data(), E, r * h);
        BuT = per_expert<const float*>(fu.data(), E, r * h);
        A2 = per_expert<const float*>(fa.data(), E, r * h);
        gA2 = per_expert(ga.data(), E, r * h);
        gBgT = per_expert(gbg.data(), E, r * h);
        gBuT = per_expert(gbu.data(), E, r * h);
    }
    ConstMatrixView<float> view(const std::vector<float>& v) const { return {v.data(), n, h}; }
    MatrixView<kernels::bf16> view(std::vector<kernels::bf16>& v) const { return {v.data(), n, h}; }
};

// Kernel: kernels::swiglu_mixture_forward, the one-pass forward of the 2048 routed rows (gate and up rank-r
// updates, silu(g) u, gate mix into m written in bf16, A2 projection) at SmolLM2-135M shapes.
void swiglu_rows_fwd(benchmark::State& state) {
    SwigluRows f;
    for (auto _ : state) {
        kernels::swiglu_mixture_forward(MatrixView<float>(), f.z2.data(), f.view(f.Hg), f.view(f.Hu), f.none,
                                        f.none, f.k, f.expert.data(), f.gate.data(), f.zsg.data(), f.zsu.data(),
                                        f.BgT.data(), f.BuT.data(), f.A2.data(), f.E, f.r, f.part, f.view(f.Mb));
        benchmark::DoNotOptimize(f.Mb.data());
    }
    state.SetItemsProcessed(state.iterations() * f.n);
}

// Kernel: kernels::swiglu_mixture_backward, the one-pass backward of the routed rows (dHg and dHu in bf16,
// dz of both linears, a . dm, dA2, dBg, dBu) at SmolLM2-135M shapes.
void swiglu_rows_bwd(benchmark::State& state) {
    SwigluRows f;
    for (auto _ : state) {
        kernels::swiglu_mixture_backward(MatrixView<float>(), MatrixView<float>(), f.dzg.data(), f.dzu.data(),
                                         f.udm.data(), f.view(f.dM), f.view(f.Hg), f.view(f.Hu), f.none, f.none,
                                         f.k, f.expert.data(), f.gate.data(), f.zsg.data(), f.zsu.data(), f.qg.data(),
                                         f.BgT.data(), f.BuT.data(), f.A2.data(), f.gA2.data(), f.h, f.gBgT.data(),
                                         f.gBuT.data(), f.E, 0.5f, f.r, f.part, f.view(f.dHgb), f.view(f.dHub));
        benchmark::DoNotOptimize(f.dHgb.data());
    }
    state.SetItemsProcessed(state.iterations() * f.n);
}

// Not a comigs kernel: the host's vector FMA throughput per thread, on one thread and on all. On a
// shared VM another tenant on a core's sibling lowers the clock and the 1 -> n thread ceiling that the
// layer's thread scaling is held against; tools/bench_compare.py prints both beside each round.
void host_fma(benchmark::State& state, bool all_threads) {
    using B = kernels::simd::batch<float>;
    constexpr long kSteps = 1L << 18;
    constexpr int kChains = 12;  // independent FMAs in flight: more than latency x issue width
    int threads = 1;
#ifdef _OPENMP
    if (all_threads) threads = omp_get_max_threads();
#endif
    float sink = 0;
    for (auto _ : state) {
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        {
            // Values the compiler cannot see, or it folds the whole loop (volatile reads: GCC 12 turned
            // benchmark::DoNotOptimize'd floats into denormals here, and denormal FMAs take assists).
            volatile float mvv = 0.9999999f, cvv = 1e-7f, avv = 1.0f;
            const float mv = mvv, cv = cvv, av = avv;
            const B m = kernels::simd::splat(mv), c = kernels::simd::splat(cv);
            B acc[kChains];
            for (int j = 0; j < kChains; ++j) acc[j] = kernels::simd::splat(av + float(j) * cv);
            for (long i = 0; i < kSteps; ++i)
                for (int j = 0; j < kChains; ++j) acc[j] = xsimd::fma(acc[j], m, c);
            for (int j = 1; j < kChains; ++j) acc[0] += acc[j];
            sink += kernels::simd::reduce_add(acc[0]);
        }
        benchmark::DoNotOptimize(sink);
    }
    state.counters["threads"] = threads;
    // Vector FMAs per second on each thread (G = 1e9 with the default 1000 divisor).
    state.counters["vector_fma_per_thread"] =
        benchmark::Counter(double(kSteps) * kChains * double(state.iterations()), benchmark::Counter::kIsRate);
    state.SetLabel(std::to_string(B::size) + " floats per vector");
}

#if defined(COMIGS_HAVE_ONEDNN) && defined(_OPENMP)
// Not a comigs kernel either: the host's ceiling for the thread scaling of large fp32 products. Every
// thread runs its own single-threaded sgemm (oneDNN) on private buffers, C[1024, n] = A[1024, k] W[k, n],
// with no work shared and nothing to wait for: on a host whose cores share nothing, GFLOP/s per thread
// on all threads equals one thread's. /one_thread runs one such product alone. Shapes: SmolLM2's gate or
// up product (n 1536, k 576) and down (576, 1536), its k/v products (192, 576), GPT-2's fc (3072, 768)
// and c_proj (768, 3072), and a product that fits one core's L2 (192 x 192 x 192).
void host_sgemm(benchmark::State& state, Index m, Index n, Index k, bool all_threads) {
    const int threads = all_threads ? omp_get_max_threads() : 1;
    struct Buffers {
        comigs::detail::aligned_vector<float> a, w, c;
    };
    std::vector<Buffers> buf(static_cast<std::size_t>(threads));
    Rng rng(5);
    for (auto& b : buf) {
        const auto av = random_vector<float>(static_cast<std::size_t>(m * k), rng);
        const auto wv = random_vector<float>(static_cast<std::size_t>(k * n), rng, 0.02);
        b.a.assign(av.begin(), av.end());
        b.w.assign(wv.begin(), wv.end());
        b.c.assign(static_cast<std::size_t>(m * n), 0.0f);
    }
    auto product = [&](Buffers& b) {
        kernels::detail::gemm_onednn(MatrixView<float>(b.c.data(), m, n), ConstMatrixView<float>(b.a.data(), m, k),
                                     kernels::Op::none, ConstMatrixView<float>(b.w.data(), k, n), kernels::Op::none,
                                     1.0f, 0.0f);
        benchmark::DoNotOptimize(b.c.data());
    };
    // Inside a parallel region oneDNN's sgemm runs on the calling thread; a team of one thread is not
    // an active region, so the one-thread case caps the thread count instead.
    const int saved = omp_get_max_threads();
    if (threads == 1) omp_set_num_threads(1);
    auto run = [&] {
#pragma omp parallel num_threads(threads) if (threads > 1)
        product(buf[static_cast<std::size_t>(omp_get_thread_num())]);
    };
    run();  // warm-up (first touches, oneDNN's kernel generation)
    for (auto _ : state) run();
    omp_set_num_threads(saved);
    state.counters["threads"] = threads;
    // Multiply-adds x 2 per second on each thread (G = 1e9).
    state.counters["flops_per_thread"] =
        benchmark::Counter(2.0 * double(m) * double(n) * double(k) * double(state.iterations()),
                           benchmark::Counter::kIsRate);
}
#define COMIGS_HOST_SGEMM(shape, m, n, k)                                                                       \
    BENCHMARK_CAPTURE(host_sgemm, shape##_one, m, n, k, false)                                                \
        ->Name("host_sgemm/" #shape "/one_thread")->UseRealTime();                                            \
    BENCHMARK_CAPTURE(host_sgemm, shape##_all, m, n, k, true)->Name("host_sgemm/" #shape "/all_threads")->UseRealTime();
COMIGS_HOST_SGEMM(smollm2_gate, kT, 1536, 576)
COMIGS_HOST_SGEMM(smollm2_down, kT, 576, 1536)
COMIGS_HOST_SGEMM(smollm2_kv, kT, 192, 576)
COMIGS_HOST_SGEMM(gpt2_fc, kT, 3072, 768)
COMIGS_HOST_SGEMM(gpt2_proj, kT, 768, 3072)
COMIGS_HOST_SGEMM(in_l2, 192, 192, 192)
#undef COMIGS_HOST_SGEMM
#endif

BENCHMARK_CAPTURE(host_fma, one_thread, false)->Name("host_fma/one_thread")->UseRealTime();
BENCHMARK_CAPTURE(host_fma, all_threads, true)->Name("host_fma/all_threads")->UseRealTime();
BENCHMARK(mixture_rows_fwd)->Name("mixture_rows_fwd/fp32/gpt2")->UseRealTime();
BENCHMARK(mixture_rows_bwd)->Name("mixture_rows_bwd/fp32/gpt2")->UseRealTime();
BENCHMARK(swiglu_rows_fwd)->Name("mixture_rows_fwd/swiglu_bf16out/smollm2")->UseRealTime();
BENCHMARK(swiglu_rows_bwd)->Name("mixture_rows_bwd/swiglu_bf16out/smollm2")->UseRealTime();
BENCHMARK(lowrank_outer_bench)->Name("lowrank_outer/fp32/gpt2")->UseRealTime();
BENCHMARK(lowrank_rows_bench)->Name("lowrank_rows/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(gemm_eigen_fp32, gpt2, kT)->Name("gemm_eigen/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(gemm_bf16, gpt2, kT)->Name("gemm_bf16/bf16/gpt2")->UseRealTime();
BENCHMARK(gelu_fwd)->Name("gelu_fwd/fp32/gpt2")->UseRealTime();
BENCHMARK(gelu_bwd)->Name("gelu_bwd/fp32/gpt2")->UseRealTime();

}  // namespace
}  // namespace comigs::bench
