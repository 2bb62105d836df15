#pragma once
// A small portable generator: the same seed gives the same numbers with any compiler and standard
// library (std::*_distribution does not promise that), and its state is four words a checkpoint saves.
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace comigs {

/// xoshiro256** seeded through splitmix64. `Rng(seed, stream)` gives independent streams per user/layer.
class Rng {
public:
    using State = std::array<std::uint64_t, 4>;

    explicit Rng(std::uint64_t seed = 0, std::uint64_t stream = 0) { reseed(seed, stream); }

    void reseed(std::uint64_t seed, std::uint64_t stream = 0) {
        std::uint64_t z = seed ^ (0x9E3779B97F4A7C15ull * (stream + 1));
        for (auto& w : s_) w = splitmix64(z);
    }

    std::uint64_t next_u64() {
        const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
        const std::uint64_t t = s_[1] << 17;
        s_[2] ^= s_[0];
        s_[3] ^= s_[1];
        s_[1] ^= s_[2];
        s_[0] ^= s_[3];
        s_[2] ^= t;
        s_[3] = rotl(s_[3], 45);
        return result;
    }

    /// Uniform double in [0, 1) with 53 random bits.
    double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
    double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

    /// Uniform integer in [0, n) (n >= 1), unbiased by rejection.
    std::uint64_t below(std::uint64_t n) {
        const std::uint64_t limit = UINT64_MAX - UINT64_MAX % n;
        std::uint64_t v;
        do v = next_u64(); while (v >= limit);
        return v % n;
    }

    /// Standard normal (Box-Muller, one value per pair of uniforms so that the four state words are
    /// the whole state: a checkpoint restores the exact sequence).
    double normal() {
        double u1;
        do u1 = uniform(); while (u1 <= 0.0);
        const double u2 = uniform();
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
    }
    double normal(double mean, double stddev) { return mean + stddev * normal(); }

    /// Standard Gumbel: -log(-log(U)).
    double gumbel() {
        double u;
        do u = uniform(); while (u <= 0.0);
        return -std::log(-std::log(u));
    }

    /// Gamma(shape, 1) by Marsaglia-Tsang (for Dirichlet draws).
    double gamma(double shape) {
        if (shape < 1.0) {
            double u;
            do u = uniform(); while (u <= 0.0);
            return gamma(shape + 1.0) * std::pow(u, 1.0 / shape);
        }
        const double d = shape - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
        for (;;) {
            double x, v;
            do {
                x = normal();
                v = 1.0 + c * x;
            } while (v <= 0.0);
            v = v * v * v;
            const double u = uniform();
            if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
            if (u > 0.0 && std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
        }
    }

    /// Full state, for checkpoints.
    State state() const { return s_; }
    void set_state(const State& s) { s_ = s; }

private:
    static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    static std::uint64_t splitmix64(std::uint64_t& x) {
        std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }

    State s_{};
};

}  // namespace comigs
