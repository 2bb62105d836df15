#pragma once
// Where the time of a model step goes: the hosts time their phases (embedding, norms, attention
// projections, attention, MLP, LM head and loss) when profiling is switched on, forward and backward
// apart. Off by default; a phase then costs one relaxed atomic load. The totals are process-wide wall
// seconds of the thread that runs the model (each phase's own parallel regions included), for
// benchmarks and tools: comigs-bench's model_phases cases print them per step.
//
//   comigs::profile::enable(true);
//   comigs::profile::reset();
//   model.forward(...); model.backward();
//   for (int p = 0; p < comigs::profile::phase_count; ++p) ... comigs::profile::seconds(Phase(p), pass)
#include <array>
#include <atomic>
#include <chrono>

namespace comigs::profile {

/// The phases a host reports.
enum class Phase : int {
    embed,      ///< token (and position) embeddings
    norm,       ///< LayerNorm / RMSNorm, residual adds, RoPE
    qkv,        ///< the q, k, v projections (GPT-2's c_attn) with their LoRA
    attention,  ///< causal attention itself
    out_proj,   ///< the attention output projection (c_proj, o_proj) with its LoRA
    mlp,        ///< the MLP block (a mixture of LoRA experts, or the frozen MLP)
    head,       ///< LM head and cross-entropy (the training forward computes its input gradient too)
};
inline constexpr int phase_count = 7;

/// forward or backward pass of a step.
enum class Pass : int { forward, backward };

inline const char* to_string(Phase p) {
    constexpr const char* names[phase_count] = {"embed", "norm", "qkv", "attention", "out_proj", "mlp", "head"};
    return names[static_cast<int>(p)];
}

namespace detail {
struct State {
    std::atomic<bool> on{false};
    std::array<std::array<double, phase_count>, 2> seconds{};
    std::array<std::array<long, phase_count>, 2> calls{};
};
inline State& state() {
    static State s;
    return s;
}
}  // namespace detail

/// Switches the timing of phases on or off (off: Scope does nothing).
inline void enable(bool on) { detail::state().on.store(on, std::memory_order_relaxed); }
inline bool enabled() { return detail::state().on.load(std::memory_order_relaxed); }
/// Sets every total to zero.
inline void reset() {
    auto& s = detail::state();
    s.seconds = {};
    s.calls = {};
}
/// Wall seconds spent in phase p of pass `pass` since the last reset, and how many times it ran.
inline double seconds(Phase p, Pass pass) {
    return detail::state().seconds[static_cast<int>(pass)][static_cast<int>(p)];
}
inline long calls(Phase p, Pass pass) { return detail::state().calls[static_cast<int>(pass)][static_cast<int>(p)]; }

/// Times its own lifetime into phase p of pass `pass` when profiling is on. Phases do not nest: the
/// host wraps disjoint stretches of its step. Not for concurrent use from several threads.
class Scope {
public:
    explicit Scope(Phase p, Pass pass = Pass::forward) : p_(p), pass_(pass), on_(enabled()) {
        if (on_) t0_ = std::chrono::steady_clock::now();
    }
    ~Scope() {
        if (!on_) return;
        auto& s = detail::state();
        s.seconds[static_cast<int>(pass_)][static_cast<int>(p_)] +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
        ++s.calls[static_cast<int>(pass_)][static_cast<int>(p_)];
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

private:
    Phase p_;
    Pass pass_;
    bool on_;
    std::chrono::steady_clock::time_point t0_{};
};

}  // namespace comigs::profile
