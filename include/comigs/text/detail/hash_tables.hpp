#pragma once
// Open-addressing hash tables for the BPE tokenizer's hot paths (std::unordered_map allocates a node
// per entry and chases a pointer per probe): token pair -> merge, bytes -> token id, piece -> cached ids.
// Linear probing over a power-of-two array, at most half full.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

namespace comigs::text::detail {

/// A fast hash of a short byte string (pre-tokens are a few bytes long): 8 bytes at a time, then a
/// multiply-xorshift finish. Not for hostile inputs that want collisions (probing stays correct, only
/// slower).
inline std::uint64_t hash_bytes(std::string_view s) noexcept {
    constexpr std::uint64_t m = 0x9E3779B97F4A7C15ull;
    std::uint64_t h = 0x243F6A8885A308D3ull ^ (s.size() * m);
    const char* p = s.data();
    std::size_t n = s.size();
    while (n >= 8) {
        std::uint64_t w;
        std::memcpy(&w, p, 8);
        h = (h ^ w) * m;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n > 0) {
        std::uint64_t w = 0;
        std::memcpy(&w, p, n);
        h = (h ^ w) * m;
        h ^= h >> 29;
    }
    h *= 0xBF58476D1CE4E5B9ull;
    return h ^ (h >> 31);
}

inline std::size_t table_capacity_for(std::size_t entries) {
    return std::bit_ceil(entries * 2 + 16);
}

/// (left token, right token) -> (rank, merged token). Keys are packed as left << 32 | right; key and
/// value share a 16-byte slot, so a probe costs one cache line.
class PairTable {
public:
    struct Merge {
        std::uint32_t rank;
        std::int32_t merged;
    };
    static constexpr std::uint32_t no_rank = 0xFFFFFFFFu;

    /// Up to 70% full: Llama-3's 280k merges fit 8 MB instead of 16.
    void reserve(std::size_t entries) {
        slots_.assign(std::bit_ceil(entries + entries / 2 + 16), Slot{});
        mask_ = slots_.size() - 1;
        shift_ = 64 - std::countr_zero(slots_.size());
        size_ = 0;
    }

    /// Inserts or overwrites (a later merge of the same pair replaces an earlier one, as in Hugging Face).
    void put(std::int32_t left, std::int32_t right, Merge m) {
        if ((size_ + 1) * 10 > slots_.size() * 7) grow();
        const std::uint64_t key = pack(left, right);
        std::size_t i = slot(key);
        while (slots_[i].key != empty_key && slots_[i].key != key) i = (i + 1) & mask_;
        if (slots_[i].key == empty_key) ++size_;
        slots_[i] = Slot{key, m};
    }

    /// The merge of (left, right), or {no_rank, -1}.
    Merge find(std::int32_t left, std::int32_t right) const noexcept {
        const std::uint64_t key = pack(left, right);
        std::size_t i = slot(key);
        while (true) {
            const Slot& s = slots_[i];
            if (s.key == key) return s.merge;
            if (s.key == empty_key) return Merge{no_rank, -1};
            i = (i + 1) & mask_;
        }
    }

    std::size_t size() const noexcept { return size_; }

private:
    static constexpr std::uint64_t empty_key = ~0ull;
    struct Slot {
        std::uint64_t key = empty_key;
        Merge merge{no_rank, -1};
    };
    static std::uint64_t pack(std::int32_t l, std::int32_t r) noexcept {
        return (std::uint64_t(std::uint32_t(l)) << 32) | std::uint32_t(r);
    }
    // Multiplicative hashing keeps the product's top bits: they depend on every bit of both ids.
    std::size_t slot(std::uint64_t key) const noexcept {
        return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
    }
    void grow() {
        std::vector<Slot> old = std::move(slots_);
        reserve(old.size());
        for (const Slot& s : old)
            if (s.key != empty_key) put(std::int32_t(s.key >> 32), std::int32_t(s.key & 0xFFFFFFFFu), s.merge);
    }

    std::vector<Slot> slots_ = std::vector<Slot>(16);
    std::size_t mask_ = 15;
    int shift_ = 60;
    std::size_t size_ = 0;
};

/// Bytes -> token id, for a set of ids whose bytes a caller-supplied function returns (the table holds
/// ids only; the bytes live once, in the tokenizer's pool).
class BytesIndex {
public:
    template <class BytesOf>
    void build(const std::vector<std::int32_t>& ids, BytesOf&& bytes_of) {
        const std::size_t cap = table_capacity_for(ids.size());
        slots_.assign(cap, -1);
        tags_.assign(cap, 0);
        mask_ = cap - 1;
        for (std::int32_t id : ids) {
            const std::string_view b = bytes_of(id);
            const std::uint64_t h = hash_bytes(b);
            std::size_t i = h & mask_;
            bool duplicate = false;
            while (slots_[i] >= 0) {
                if (tags_[i] == tag_of(h) && bytes_of(slots_[i]) == b) {
                    duplicate = true;  // the first id of the same bytes wins
                    break;
                }
                i = (i + 1) & mask_;
            }
            if (duplicate) continue;
            slots_[i] = id;
            tags_[i] = tag_of(h);
        }
    }

    template <class BytesOf>
    std::int32_t find(std::string_view b, std::uint64_t h, BytesOf&& bytes_of) const noexcept {
        std::size_t i = h & mask_;
        const std::uint32_t tag = tag_of(h);
        while (true) {
            const std::int32_t id = slots_[i];
            if (id < 0) return -1;
            if (tags_[i] == tag && bytes_of(id) == b) return id;
            i = (i + 1) & mask_;
        }
    }

private:
    static std::uint32_t tag_of(std::uint64_t h) noexcept { return std::uint32_t(h >> 32); }
    std::vector<std::int32_t> slots_ = std::vector<std::int32_t>(1, -1);
    std::vector<std::uint32_t> tags_ = std::vector<std::uint32_t>(1, 0);
    std::size_t mask_ = 0;
};

/// Piece -> ids, for one encode call. Pieces of up to 8 bytes (most words) live in a table of 16-byte
/// entries holding the piece's bytes and, for a one-token piece, the id itself: a hit costs one cache
/// line. Longer pieces are keyed by a view into the text being encoded. Values of several ids live in
/// a pool. Each table stops inserting (but keeps answering) once it holds `max_entries`.
class PieceCache {
public:
    explicit PieceCache(std::size_t max_entries = std::size_t(1) << 20) : max_entries_(max_entries) {}

    /// The cached ids of `piece` as [first, last), or false.
    bool find(std::string_view piece, std::uint64_t h, const std::int32_t*& first, const std::int32_t*& last) const noexcept {
        if (piece.size() <= 8) {
            if (short_.empty()) return false;
            const std::uint64_t word = load_word(piece);
            std::size_t i = h & short_mask_;
            while (true) {
                const Short& e = short_[i];
                if (is_empty(e)) return false;
                if (e.word == word && e.size == piece.size()) {
                    if (e.count == 1) {
                        first = &e.value;
                        last = first + 1;
                    } else {
                        first = pool_.data() + e.value;
                        last = first + e.count;
                    }
                    return true;
                }
                i = (i + 1) & short_mask_;
            }
        }
        if (long_.empty()) return false;
        std::size_t i = h & long_mask_;
        while (true) {
            const Long& e = long_[i];
            if (e.size == empty) return false;
            if (e.hash == h && e.size == piece.size() && std::memcmp(e.data, piece.data(), piece.size()) == 0) {
                first = pool_.data() + e.begin;
                last = first + e.count;
                return true;
            }
            i = (i + 1) & long_mask_;
        }
    }

    void put(std::string_view piece, std::uint64_t h, std::span<const std::int32_t> ids) {
        if (piece.size() <= 8) {
            if (short_size_ >= max_entries_) return;
            if ((short_size_ + 1) * 2 > short_.size()) grow(short_, short_mask_, [](const Short& e) {
                return hash_bytes(std::string_view(reinterpret_cast<const char*>(&e.word), e.size));
            });
            std::size_t i = h & short_mask_;
            while (!is_empty(short_[i])) i = (i + 1) & short_mask_;
            Short e;
            e.word = load_word(piece);
            e.size = static_cast<std::uint8_t>(piece.size());
            if (ids.size() == 1) {
                e.count = 1;
                e.value = ids[0];
            } else {
                e.count = static_cast<std::uint16_t>(ids.size());
                e.value = static_cast<std::int32_t>(pool_.size());
                pool_.insert(pool_.end(), ids.begin(), ids.end());
            }
            short_[i] = e;
            ++short_size_;
            return;
        }
        if (long_size_ >= max_entries_ || piece.size() >= empty) return;
        if ((long_size_ + 1) * 2 > long_.size()) grow(long_, long_mask_, [](const Long& e) { return e.hash; });
        std::size_t i = h & long_mask_;
        while (long_[i].size != empty) i = (i + 1) & long_mask_;
        long_[i] = Long{piece.data(), h, static_cast<std::uint32_t>(piece.size()), static_cast<std::uint32_t>(ids.size()), pool_.size()};
        pool_.insert(pool_.end(), ids.begin(), ids.end());
        ++long_size_;
    }

private:
    static constexpr std::uint32_t empty = 0xFFFFFFFFu;
    struct Short {
        std::uint64_t word = 0;       // the piece's bytes, zero-padded
        std::uint8_t size = 0xFF;     // 0xFF: empty slot
        std::uint8_t pad = 0;
        std::uint16_t count = 0;      // ids; 1: value is the id, else value indexes the pool
        std::int32_t value = 0;
    };
    struct Long {
        const char* data = nullptr;
        std::uint64_t hash = 0;
        std::uint32_t size = empty;
        std::uint32_t count = 0;
        std::size_t begin = 0;
    };
    static std::uint64_t load_word(std::string_view piece) noexcept {
        std::uint64_t w = 0;
        std::memcpy(&w, piece.data(), piece.size());
        return w;
    }
    template <class Entry, class HashOf>
    static void grow(std::vector<Entry>& table, std::size_t& mask, HashOf hash_of) {
        std::vector<Entry> old = std::move(table);
        const std::size_t cap = old.empty() ? 1024 : old.size() * 2;
        table.assign(cap, Entry{});
        mask = cap - 1;
        for (const Entry& e : old) {
            if (is_empty(e)) continue;
            std::size_t i = hash_of(e) & mask;
            while (!is_empty(table[i])) i = (i + 1) & mask;
            table[i] = e;
        }
    }
    static bool is_empty(const Short& e) noexcept { return e.size == 0xFF; }
    static bool is_empty(const Long& e) noexcept { return e.size == empty; }

    static_assert(sizeof(Short) == 16);
    std::vector<Short> short_;
    std::vector<Long> long_;
    std::vector<std::int32_t> pool_;
    std::size_t short_mask_ = 0, long_mask_ = 0;
    std::size_t short_size_ = 0, long_size_ = 0;
    std::size_t max_entries_;
};

}  // namespace comigs::text::detail
