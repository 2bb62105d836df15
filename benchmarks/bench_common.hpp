#pragma once
// Shared fixtures of comigs-bench: GPT-2 MLP shapes, random data, and the baselines measured in the
// same run (the plain dense MLP and the naive per-expert mixture).
#include <benchmark/benchmark.h>

#include <comigs/frozen.hpp>
#include <comigs/kernels/activation.hpp>
#include <comigs/kernels/elementwise.hpp>
#include <comigs/mixture.hpp>
#include <comigs/profile.hpp>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
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

/// Times `step` (one training step) once per benchmark iteration, after one untimed step, with the hosts'
/// phase timers on (comigs/profile.hpp), and reports ms per step of every phase and pass
/// (`fwd_<phase>_ms`, `bwd_<phase>_ms`) and of what no phase covers (`other_ms`: AdamW, zeroing).
template <class Step>
void profile_steps(benchmark::State& state, Step&& step) {
    step();
    profile::reset();
    profile::enable(true);
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) step();
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    profile::enable(false);
    const double steps = double(std::max<benchmark::IterationCount>(state.iterations(), 1));
    double covered = 0;
    for (int p = 0; p < profile::phase_count; ++p)
        for (const auto pass : {profile::Pass::forward, profile::Pass::backward}) {
            const double sec = profile::seconds(profile::Phase(p), pass);
            covered += sec;
            if (sec > 0)
                state.counters[std::string(pass == profile::Pass::forward ? "fwd_" : "bwd_") +
                               profile::to_string(profile::Phase(p)) + "_ms"] = sec / steps * 1e3;
        }
    state.counters["other_ms"] = (total - covered) / steps * 1e3;
}

}  // namespace comigs::bench
