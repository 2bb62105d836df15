// Kernel benchmarks: the GEMM backends at the four base-GEMM shapes of the GPT-2 MLP (the "best GEMM"
// the layers are compared with, measured in the same run) and the elementwise kernels.
#include "bench_common.hpp"

#include <comigs/kernels/elementwise.hpp>
#include <comigs/kernels/gemm_bf16.hpp>

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
    std::vector<float> a, w, c;
    std::vector<kernels::bf16> wb;
    explicit GemmData(Index m) {
        Rng rng(11);
        a = random_vector<float>(static_cast<std::size_t>(m * Gpt2Shape::h), rng);
        w = random_vector<float>(static_cast<std::size_t>(Gpt2Shape::d * Gpt2Shape::h), rng, 0.02);
        c.assign(static_cast<std::size_t>(m * Gpt2Shape::h), 0.0f);
        wb.resize(w.size());
        kernels::convert_to_bf16(wb.data(), w.data(), static_cast<Index>(w.size()));
    }
};

// Kernel: kernels::gemm<float> (Eigen) on the four base-GEMM shapes.
void gemm_eigen_fp32(benchmark::State& state, Index m) {
    GemmData g(m);
    for (auto _ : state)
        for (const auto& b : kBase) {
            const Index wr = b.op == kernels::Op::trans ? b.n : b.k, wc = b.op == kernels::Op::trans ? b.k : b.n;
            kernels::gemm<float>(MatrixView<float>(g.c.data(), m, b.n), ConstMatrixView<float>(g.a.data(), m, b.k),
                                 kernels::Op::none, ConstMatrixView<float>(g.w.data(), wr, wc), b.op);
            benchmark::DoNotOptimize(g.c.data());
        }
    set_counters(state, m, base_flops_fwd_bwd(m, Gpt2Shape::d, Gpt2Shape::h));
}

// Kernel: kernels::gemm_bf16 (oneDNN AMX/AVX512-BF16 when built with it, else the fp32 fallback),
// activations converted to bf16 inside, on the four base-GEMM shapes.
void gemm_bf16(benchmark::State& state, Index m) {
    GemmData g(m);
    for (auto _ : state)
        for (const auto& b : kBase) {
            const Index wr = b.op == kernels::Op::trans ? b.n : b.k, wc = b.op == kernels::Op::trans ? b.k : b.n;
            kernels::gemm_bf16(MatrixView<float>(g.c.data(), m, b.n), ConstMatrixView<float>(g.a.data(), m, b.k),
                               ConstMatrixView<kernels::bf16>(g.wb.data(), wr, wc), b.op);
            benchmark::DoNotOptimize(g.c.data());
        }
    state.SetLabel(kernels::to_string(kernels::bf16_backend()));
    set_counters(state, m, base_flops_fwd_bwd(m, Gpt2Shape::d, Gpt2Shape::h));
}

#ifdef COMIGS_HAVE_ONEDNN
// Kernel: oneDNN's matmul in fp32 (brgemm) on the four base-GEMM shapes: the other fp32 candidate.
void gemm_onednn_fp32(benchmark::State& state, Index m) {
    GemmData g(m);
    for (auto _ : state)
        for (const auto& b : kBase) {
            const kernels::onednn::Operand a{g.a.data(), m, b.k, b.k, 1};
            const kernels::onednn::Operand w = b.op == kernels::Op::none
                                                   ? kernels::onednn::Operand{g.w.data(), b.k, b.n, b.n, 1}
                                                   : kernels::onednn::Operand{g.w.data(), b.k, b.n, 1, b.k};
            kernels::onednn::matmul(kernels::onednn::Type::f32, a, w, g.c.data(), b.n, 1.0f, false);
            benchmark::DoNotOptimize(g.c.data());
        }
    set_counters(state, m, base_flops_fwd_bwd(m, Gpt2Shape::d, Gpt2Shape::h));
}
BENCHMARK_CAPTURE(gemm_onednn_fp32, gpt2, kT)->Name("gemm_onednn/fp32/gpt2")->UseRealTime();
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

BENCHMARK_CAPTURE(gemm_eigen_fp32, gpt2, kT)->Name("gemm_eigen/fp32/gpt2")->UseRealTime();
BENCHMARK_CAPTURE(gemm_bf16, gpt2, kT)->Name("gemm_bf16/bf16/gpt2")->UseRealTime();
BENCHMARK(gelu_fwd)->Name("gelu_fwd/fp32/gpt2")->UseRealTime();
BENCHMARK(gelu_bwd)->Name("gelu_bwd/fp32/gpt2")->UseRealTime();

}  // namespace
}  // namespace comigs::bench
