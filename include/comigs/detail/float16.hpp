#pragma once
// bfloat16 and IEEE binary16 conversions on raw 16-bit patterns. Rounding is to nearest, ties to even
// (what PyTorch's .to(torch.bfloat16) / .half() do); NaN stays NaN (made quiet); overflow gives inf.
#include <bit>
#include <cstdint>

namespace comigs::detail {

inline float bf16_bits_to_float(std::uint16_t b) noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

inline std::uint16_t float_to_bf16_bits(float f) noexcept {
    const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
    const std::uint32_t rounding = 0x7FFFu + ((x >> 16) & 1u);
    return static_cast<std::uint16_t>((x + rounding) >> 16);
}

inline float f16_bits_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1Fu;
    const std::uint32_t mant = h & 0x3FFu;
    if (exp == 0) {
        // Zero or subnormal: mant * 2^-24 is exact in float.
        const float mag = static_cast<float>(mant) * 0x1p-24f;
        return sign ? -mag : mag;
    }
    if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline std::uint16_t float_to_f16_bits(float f) noexcept {
    std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u)  // NaN: keep the top payload bits, force quiet
        return static_cast<std::uint16_t>(sign | 0x7E00u | ((x >> 13) & 0x3FFu));
    if (x >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
    if (x >= 0x38800000u) {                                                   // normal half (>= 2^-14)
        x += 0xFFFu + ((x >> 13) & 1u);
        return static_cast<std::uint16_t>(sign | ((x - (112u << 23)) >> 13));
    }
    // Subnormal half: round(|f| * 2^24) to nearest even, from the float's integer significand.
    const std::uint32_t e = x >> 23;
    if (e < 102) return sign;  // below 2^-25: rounds to zero (includes float subnormals)
    const std::uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // 14..24
    std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
}

}  // namespace comigs::detail
