#pragma once
// XXH64 (Yann Collet's xxHash, 64-bit variant), written from the published algorithm description.
// Streaming, so a file's data section can be hashed while it is read or written piece by piece.
// Used for checksums of saved files: fast (several GB/s), not cryptographic.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace comigs::detail {

class Xxh64 {
public:
    explicit Xxh64(std::uint64_t seed = 0) noexcept : v_{seed + p1 + p2, seed + p2, seed, seed - p1}, seed_(seed) {}

    void update(std::span<const std::byte> data) noexcept {
        const std::byte* p = data.data();
        std::size_t n = data.size();
        total_ += n;
        if (n == 0) return;
        if (buffered_ + n < 32) {
            std::memcpy(buffer_ + buffered_, p, n);
            buffered_ += n;
            return;
        }
        if (buffered_ > 0) {
            const std::size_t fill = 32 - buffered_;
            std::memcpy(buffer_ + buffered_, p, fill);
            stripe(buffer_);
            p += fill;
            n -= fill;
            buffered_ = 0;
        }
        while (n >= 32) {
            stripe(p);
            p += 32;
            n -= 32;
        }
        if (n > 0) std::memcpy(buffer_, p, n);
        buffered_ = n;
    }

    /// The hash of everything passed to update() so far (the state is unchanged, more may follow).
    std::uint64_t digest() const noexcept {
        std::uint64_t h;
        if (total_ >= 32) {
            h = rotl(v_[0], 1) + rotl(v_[1], 7) + rotl(v_[2], 12) + rotl(v_[3], 18);
            for (std::uint64_t v : v_) h = merge(h, v);
        } else {
            h = seed_ + p5;
        }
        h += total_;
        const std::byte* p = buffer_;
        std::size_t n = buffered_;
        while (n >= 8) {
            h ^= round(0, load64(p));
            h = rotl(h, 27) * p1 + p4;
            p += 8;
            n -= 8;
        }
        if (n >= 4) {
            h ^= static_cast<std::uint64_t>(load32(p)) * p1;
            h = rotl(h, 23) * p2 + p3;
            p += 4;
            n -= 4;
        }
        while (n > 0) {
            h ^= static_cast<std::uint64_t>(std::to_integer<unsigned>(*p)) * p5;
            h = rotl(h, 11) * p1;
            ++p;
            --n;
        }
        h ^= h >> 33;
        h *= p2;
        h ^= h >> 29;
        h *= p3;
        h ^= h >> 32;
        return h;
    }

    static std::uint64_t hash(std::span<const std::byte> data, std::uint64_t seed = 0) noexcept {
        Xxh64 x(seed);
        x.update(data);
        return x.digest();
    }

private:
    static constexpr std::uint64_t p1 = 0x9E3779B185EBCA87ull;
    static constexpr std::uint64_t p2 = 0xC2B2AE3D27D4EB4Full;
    static constexpr std::uint64_t p3 = 0x165667B19E3779F9ull;
    static constexpr std::uint64_t p4 = 0x85EBCA77C2B2AE63ull;
    static constexpr std::uint64_t p5 = 0x27D4EB2F165667C5ull;

    static constexpr std::uint64_t rotl(std::uint64_t x, int r) noexcept { return (x << r) | (x >> (64 - r)); }
    static constexpr std::uint64_t round(std::uint64_t acc, std::uint64_t lane) noexcept {
        return rotl(acc + lane * p2, 31) * p1;
    }
    static constexpr std::uint64_t merge(std::uint64_t h, std::uint64_t v) noexcept {
        return (h ^ round(0, v)) * p1 + p4;
    }
    // The algorithm reads lanes as little-endian words whatever the host order.
    static std::uint64_t load64(const std::byte* p) noexcept {
        std::uint64_t x = 0;
        for (int i = 7; i >= 0; --i) x = (x << 8) | std::to_integer<std::uint64_t>(p[i]);
        return x;
    }
    static std::uint32_t load32(const std::byte* p) noexcept {
        std::uint32_t x = 0;
        for (int i = 3; i >= 0; --i) x = (x << 8) | std::to_integer<std::uint32_t>(p[i]);
        return x;
    }
    void stripe(const std::byte* p) noexcept {
        for (int i = 0; i < 4; ++i) v_[i] = round(v_[i], load64(p + 8 * i));
    }

    std::uint64_t v_[4];
    std::uint64_t seed_;
    std::uint64_t total_ = 0;
    std::byte buffer_[32] = {};
    std::size_t buffered_ = 0;
};

}  // namespace comigs::detail
