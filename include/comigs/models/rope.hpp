#pragma once
// Rotary position embedding as Hugging Face's Llama and Qwen2 compute it ("rotate half"): head vectors
// of size hd are split in halves [x1, x2] and rotated by angles pos * inv_freq_j, j < hd / 2:
//   x' = [x1 cos - x2 sin, x2 cos + x1 sin]
// with inv_freq_j = theta^(-2j / hd), optionally rescaled by the "llama3" rule (Llama 3.1 / 3.2).
//
// The angles are computed as transformers computes them, in fp32 whatever the model's precision:
// inv_freq rounded to fp32, pos * inv_freq as an fp32 product, cos and sin rounded to fp32. At long
// positions these roundings move angles by up to ~1e-3 rad, so matching them is what makes comigs'
// logits agree with the user's framework, not only with exact arithmetic.
#include <cmath>
#include <numbers>
#include <optional>
#include <vector>

#include <comigs/error.hpp>
#include <comigs/view.hpp>

namespace comigs::models {

/// The `rope_scaling` of a Llama config with `rope_type` "llama3" (factor 8, 1, 4, 8192 for Llama 3.2).
struct Llama3RopeScaling {
    double factor = 8.0;
    double low_freq_factor = 1.0;
    double high_freq_factor = 4.0;
    double original_max_position_embeddings = 8192.0;

    void validate() const {
        require(std::isfinite(factor) && factor > 0, "rope_scaling.factor ", factor, ": must be > 0");
        require(std::isfinite(low_freq_factor) && low_freq_factor > 0, "rope_scaling.low_freq_factor ", low_freq_factor,
                ": must be > 0");
        require(std::isfinite(high_freq_factor) && high_freq_factor > low_freq_factor, "rope_scaling.high_freq_factor ",
                high_freq_factor, ": must be > low_freq_factor ", low_freq_factor);
        require(std::isfinite(original_max_position_embeddings) && original_max_position_embeddings > 0,
                "rope_scaling.original_max_position_embeddings ", original_max_position_embeddings, ": must be > 0");
    }
};

/// inv_freq [hd / 2] in fp32 as transformers computes it: 1 / theta^(float(2j) / hd), then the llama3
/// rescaling (long wavelengths divided by factor, short kept, a smooth blend between).
inline std::vector<float> rope_inv_freq(Index head_dim, double theta, const std::optional<Llama3RopeScaling>& scaling) {
    require(head_dim >= 2 && head_dim % 2 == 0, "head_dim ", head_dim, ": RoPE needs an even head size >= 2");
    require(std::isfinite(theta) && theta > 1, "rope_theta ", theta, ": must be > 1");
    const Index half = head_dim / 2;
    std::vector<float> inv(static_cast<std::size_t>(half));
    for (Index j = 0; j < half; ++j) {
        const float exponent = static_cast<float>(2 * j) / static_cast<float>(head_dim);
        const float power = static_cast<float>(std::pow(static_cast<double>(static_cast<float>(theta)), double(exponent)));
        inv[static_cast<std::size_t>(j)] = 1.0f / power;
    }
    if (scaling) {
        scaling->validate();
        const float factor = static_cast<float>(scaling->factor), lo = static_cast<float>(scaling->low_freq_factor),
                    hi = static_cast<float>(scaling->high_freq_factor),
                    old = static_cast<float>(scaling->original_max_position_embeddings);
        const float low_freq_wavelen = old / lo, high_freq_wavelen = old / hi;
        // Each fp32 operation rounded on its own, as transformers' tensor ops do it (a fused multiply-add,
        // which -ffp-contract may form, would move a blended frequency by an ulp), and a scalar divided by
        // a tensor as PyTorch computes it: the tensor's reciprocal times the scalar.
        const auto r = [](float x) {
            volatile float v = x;
            return static_cast<float>(v);
        };
        const auto scalar_over = [&r](float scalar, float t) { return r(r(1.0f / t) * scalar); };
        for (float& f : inv) {
            const float wavelen = scalar_over(2.0f * std::numbers::pi_v<float>, f);
            float scaled = wavelen > low_freq_wavelen ? f / factor : f;
            if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
                const float smooth = r(scalar_over(old, wavelen) - lo) / (hi - lo);
                scaled = r(r(r(1.0f - smooth) * scaled) / factor) + r(smooth * scaled);
            }
            f = scaled;
        }
    }
    return inv;
}

/// cos and sin of the angles of positions [first, first + count): rows of hd / 2 values each.
template <class T>
struct RopeTable {
    std::vector<T> cos, sin;
    Index half = 0;

    void build(const std::vector<float>& inv_freq, Index first, Index count) {
        half = static_cast<Index>(inv_freq.size());
        cos.resize(static_cast<std::size_t>(count * half));
        sin.resize(cos.size());
        for (Index p = 0; p < count; ++p)
            for (Index j = 0; j < half; ++j) {
                const float angle = static_cast<float>(first + p) * inv_freq[static_cast<std::size_t>(j)];
                cos[static_cast<std::size_t>(p * half + j)] = static_cast<T>(static_cast<float>(std::cos(double(angle))));
                sin[static_cast<std::size_t>(p * half + j)] = static_cast<T>(static_cast<float>(std::sin(double(angle))));
            }
    }
    const T* cos_row(Index p) const { return cos.data() + p * half; }
    const T* sin_row(Index p) const { return sin.data() + p * half; }
};

/// Rotates the heads of x[N, heads * hd] in place: row i at table row pos_row(i), every head alike.
/// `inverse` rotates by the negative angle: the backward of the rotation (its transpose).
template <class T, class PosRow>
void rope_apply(MatrixView<T> x, Index heads, Index head_dim, const RopeTable<T>& table, PosRow pos_row,
                bool inverse = false) {
    const Index half = head_dim / 2;
    require<ShapeError>(x.cols == heads * head_dim && table.half == half, "rope: x has ", x.cols, " columns for ",
                        heads, " heads of ", head_dim, " (table of ", table.half, " frequencies)");
    const T sign = inverse ? T(-1) : T(1);
#pragma omp parallel for schedule(static) if (x.size() >= (Index(1) << 16))
    for (Index i = 0; i < x.rows; ++i) {
        const Index p = pos_row(i);
        const T* c = table.cos_row(p);
        const T* s = table.sin_row(p);
        for (Index h = 0; h < heads; ++h) {
            T* v = x.row_ptr(i) + h * head_dim;
            for (Index j = 0; j < half; ++j) {
                const T a = v[j], b = v[j + half], sj = sign * s[j];
                v[j] = a * c[j] - b * sj;
                v[j + half] = b * c[j] + a * sj;
            }
        }
    }
}

}  // namespace comigs::models
