#pragma once
// Shared fixtures of comigs-bench: GPT-2 MLP shapes, random data, and the baselines measured in the
// same run (the plain dense MLP and the naive per-expert mixture).
#include <benchmark/benchmark.h>

#include <comigs/frozen.hpp>
#include <comigs/kernels/activation.hpp>
#include <comigs/kernels/elementwise.hpp>
#include <comigs/mixture.hpp>

#include <memory>
#include <vector>

namespace comigs::bench {

/// GPT-2 small MLP: d = 768, hidden 3072; E = 4 experts, top-2, rank 8.
struct Gpt2Shape {
    static constexpr Index d = 768, h = 3072, E = 4, k = 2, r = 8;
};

template <class T>
std::vector<T> random_vector(std::size_t n, Rng& rng, double std = 1.0) {
    std::vector<T> v(n);
    for (T& x : v) x = static_cast<T>(rng.normal(0.0, std));
    return v;
}

/// FLOPs of the four frozen base GEMMs of one MLP forward+backward over n tokens (2 forward, 2 input
/// gradients; no weight gradients: the base is frozen).
inline double base_flops_fwd_bwd(Index n, Index d, Index h) { return 4.0 * 2.0 * double(n) * double(d) * double(h); }
inline double base_flops_fwd(Index n, Index d, Index h) { return 2.0 * 2.0 * double(n) * double(d) * double(h); }

inline void set_counters(benchmark::State& state, Index tokens, double flops) {
    state.SetItemsProcessed(state.iterations() * tokens);
    state.counters["GFLOP/s"] =
        benchmark::Counter(flops * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
}

}  // namespace comigs::bench
