// The floor of a CoMiGS fine-tuning step: the frozen base's GEMMs of one step and nothing else.
//
//   model_floor/{fp32,bf16}/gpt2_124m   GPT-2-124M, 8 x 128 tokens (N = 1024): per block the forward
//        products of c_attn [3d, d], c_proj [d, d], the MLP's fc [h, d] and proj [d, h], and their input
//        gradients (dx = dy W; c_attn's skipped in block 0, as the host does: the embeddings are frozen);
//        the tied LM head [V, d] in the vocabulary chunks the chunked cross-entropy uses (logits Z = X W_c^T
//        and the input gradient's accumulation acc += P W_c per chunk). The weights are a random host's
//        (random_model.hpp), the products go through the backends comigs' step uses (kernels::gemm:
//        oneDNN sgemm split between the threads; bf16: kernels::gemm_bf16_from, oneDNN brgemm on AMX /
//        AVX512-BF16) with activations already in the products' input type. No adapters, no biases, no
//        norms, attention, softmax, conversions or AdamW: a step can be no faster than this.
// items_per_second = tokens/s; GFLOP/s counts 2 flops per multiply-add of the products above
// (floor_flops: 2 N x the parameters the tokens pass through, forward and backward).
#include "bench_common.hpp"
#include "random_model.hpp"

#include <comigs/kernels/cross_entropy.hpp>
#include <comigs/kernels/gemm.hpp>
#include <comigs/kernels/gemm_bf16.hpp>
#include <comigs/models.hpp>

#include <algorithm>
#include <iterator>
#include <memory>
#include <vector>

namespace comigs::bench {
namespace {

namespace cm = comigs::models;

/// One product of the floor: C [M, N] (+)= A [M, K] op(W) with W a frozen weight of the host.
struct FloorProduct {
    Index rows, cols, inner;           // M, N, K
    const float* w32;                  // W in fp32 (or null)
    const kernels::bf16* w16;          // W in bf16 (or null)
    Index w_rows, w_cols;              // W's storage shape
    kernels::Op op;                    // trans: y = x W^T (forward); none: dx = dy W (input gradient)
    bool accumulate;
};

/// The frozen-base products of one GPT-2 step, in the order the step runs them.
std::vector<FloorProduct> gpt2_floor_products(const cm::Gpt2Weights<float>& w, Index N) {
    const Index d = w.config.d_model, h = w.config.hidden(), V = w.config.vocab;
    std::vector<FloorProduct> p;
    const auto add = [&](const FrozenLinear<float>& f, Index row0, Index count, kernels::Op op, bool acc) {
        const Index out = count, in = f.in_features();
        const float* w32 = f.is_plain() ? f.weight.row_ptr(row0) : nullptr;
        const kernels::bf16* w16 = f.is_bf16() ? f.weight_bf16.row_ptr(row0) : nullptr;
        if (op == kernels::Op::trans)
            p.push_back({N, out, in, w32, w16, out, in, op, acc});
        else
            p.push_back({N, in, out, w32, w16, out, in, op, acc});
    };
    for (const auto& L : w.layers) {
        add(L.c_attn, 0, 3 * d, kernels::Op::trans, false);
        add(L.c_proj, 0, d, kernels::Op::trans, false);
        add(L.mlp->linear("fc"), 0, h, kernels::Op::trans, false);
        add(L.mlp->linear("proj"), 0, d, kernels::Op::trans, false);
    }
    // The head as lm_head_cross_entropy_with runs it: [R, C] chunks of logits and the input gradient
    // accumulated chunk by chunk.
    const Index R = std::min(N, kernels::detail::head_block_rows());
    const Index C = std::min(V, std::max(kernels::detail::head_min_chunk_cols(), kernels::detail::head_chunk_elements() / R));
    for (Index r0 = 0; r0 < N; r0 += R)
        for (Index v0 = 0; v0 < V; v0 += C) {
            const Index cols = std::min(C, V - v0), rows = std::min(R, N - r0);
            add(w.wte, v0, cols, kernels::Op::trans, false);
            p.back().rows = rows;
            add(w.wte, v0, cols, kernels::Op::none, v0 > 0);
            p.back().rows = rows;
        }
    for (auto L = w.layers.rbegin(); L != w.layers.rend(); ++L) {
        add(L->mlp->linear("proj"), 0, d, kernels::Op::none, false);
        add(L->mlp->linear("fc"), 0, h, kernels::Op::none, true);
        add(L->c_proj, 0, d, kernels::Op::none, true);
        if (L != std::prev(w.layers.rend())) add(L->c_attn, 0, 3 * d, kernels::Op::none, true);
    }
    return p;
}

/// Multiply-adds x 2 of the products.
double floor_flops(const std::vector<FloorProduct>& products) {
    double f = 0;
    for (const auto& p : products) f += 2.0 * double(p.rows) * double(p.cols) * double(p.inner);
    return f;
}

// Kernel: the frozen base's GEMMs of one GPT-2-124M step (see the file's head), fp32 or bf16 weights.
void model_floor(benchmark::State& state, bool bf16) {
    using S = ModelStepShape;
    const Index N = S::B * S::T;
    const auto host = random_host(RandomHost::gpt2_124m, bf16 ? cm::ElementType::bf16 : cm::ElementType::f32);
    const auto weights = dynamic_cast<cm::Gpt2<float>&>(*host).weights_ptr();
    const auto products = gpt2_floor_products(*weights, N);
    Index in_max = 0, out_max = 0;
    for (const auto& p : products) {
        in_max = std::max(in_max, p.rows * p.inner);
        out_max = std::max(out_max, p.rows * p.cols);
    }
    Rng rng(27);
    const std::vector<float> values = random_vector<float>(static_cast<std::size_t>(in_max), rng, 0.5);
    const comigs::detail::aligned_vector<float> a32(values.begin(), values.end());
    comigs::detail::aligned_vector<kernels::bf16> a16(a32.size());
    kernels::convert_to_bf16(a16.data(), a32.data(), static_cast<Index>(a32.size()));
    comigs::detail::aligned_vector<float> c(static_cast<std::size_t>(out_max), 0.0f);
    const auto run = [&] {
        for (const auto& p : products) {
            const MatrixView<float> C(c.data(), p.rows, p.cols);
            const float beta = p.accumulate ? 1.0f : 0.0f;
            if (bf16)
                kernels::gemm_bf16_from(C, ConstMatrixView<kernels::bf16>(a16.data(), p.rows, p.inner),
                                        ConstMatrixView<kernels::bf16>(p.w16, p.w_rows, p.w_cols), p.op, 1.0f, beta);
            else
                kernels::gemm<float>(C, ConstMatrixView<float>(a32.data(), p.rows, p.inner), kernels::Op::none,
                                     ConstMatrixView<float>(p.w32, p.w_rows, p.w_cols), p.op, 1.0f, beta);
        }
        benchmark::DoNotOptimize(c.data());
    };
    run();  // warm-up: oneDNN primitives created, pages touched
    for (auto _ : state) run();
    set_counters(state, N, floor_flops(products));
}

BENCHMARK_CAPTURE(model_floor, fp32, false)->Name("model_floor/fp32/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(model_floor, bf16, true)->Name("model_floor/bf16/gpt2_124m")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace comigs::bench
