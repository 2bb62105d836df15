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

/// (left token, right token) -> (rank, merged token). Keys are packed as left << 32 | right.
class PairTable {
public:
    struct Merge {
        std::uint32_t rank;
        std::int32_t merged;
    };
    static constexpr std::uint32_t no_rank = 0xFFFFFFFFu;

    void reserve(std::size_t entries) {
        const std::size_t cap = table_capacity_for(entries);
        keys_.assign(cap, empty_key);
        values_.assign(cap, Merge{no_rank, -1});
        mask_ = cap - 1;
        size_ = 0;
    }

    /// Inserts or overwrites (a later merge of the same pair replaces an earlier one, as in Hugging Face).
    void put(std::int32_t left, std::int32_t right, Merge m) {
        if ((size_ + 1) * 2 > keys_.size()) grow();
        const std::uint64_t key = pack(left, right);
        std::size_t i = slot(key);
        while (keys_[i] != empty_key && keys_[i] != key) i = (i + 1) & mask_;
        if (keys_[i] == empty_key) ++size_;
        keys_[i] = key;
        values_[i] = m;
    }

    /// The merge of (left, right), or {no_rank, -1}.
    Merge find(std::int32_t left, std::int32_t right) const noexcept {
        const std::uint64_t key = pack(left, right);
        std::size_t i = slot(key);
        while (true) {
            const std::uint64_t k = keys_[i];
            if (k == key) return values_[i];
            if (k == empty_key) return Merge{no_rank, -1};
            i = (i + 1) & mask_;
        }
    }

    std::size_t size() const noexcept { return size_; }

private:
    static constexpr std::uint64_t empty_key = ~0ull;
    static std::uint64_t pack(std::int32_t l, std::int32_t r) noexcept {
        return (std::uint64_t(std::uint32_t(l)) << 32) | std::uint32_t(r);
    }
    std::size_t slot(std::uint64_t key) const noexcept {
        return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> 17) & mask_;
    }
    void grow() {
        std::vector<std::uint64_t> keys = std::move(keys_);
        std::vector<Merge> values = std::move(values_);
        reserve(keys.empty() ? 16 : keys.size());
        for (std::size_t i = 0; i < keys.size(); ++i)
            if (keys[i] != empty_key) put(std::int32_t(keys[i] >> 32), std::int32_t(keys[i] & 0xFFFFFFFFu), values[i]);
    }

    std::vector<std::uint64_t> keys_ = std::vector<std::uint64_t>(16, empty_key);
    std::vector<Merge> values_ = std::vector<Merge>(16, Merge{no_rank, -1});
    std::size_t mask_ = 15;
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

/// Piece -> ids, for one encode call: keys are views into the text being encoded, values ranges of
/// an id pool. Stops inserting (but keeps answering) once `max_entries` are held.
class PieceCache {
public:
    explicit PieceCache(std::size_t max_entries = std::size_t(1) << 20) : max_entries_(max_entries) {}

    /// The cached ids of `piece`, or false.
    bool find(std::string_view piece, std::uint64_t h, std::size_t& begin, std::size_t& count) const noexcept {
        if (entries_.empty()) return false;
        std::size_t i = h & mask_;
        while (true) {
            const Entry& e = entries_[i];
            if (e.size == empty) return false;
            if (e.hash == h && e.size == piece.size() && std::memcmp(e.data, piece.data(), piece.size()) == 0) {
                begin = e.begin;
                count = e.count;
                return true;
            }
            i = (i + 1) & mask_;
        }
    }

    void put(std::string_view piece, std::uint64_t h, std::span<const std::int32_t> ids) {
        if (size_ >= max_entries_ || piece.size() >= empty) return;
        if ((size_ + 1) * 2 > entries_.size()) grow();
        std::size_t i = h & mask_;
        while (entries_[i].size != empty) i = (i + 1) & mask_;
        entries_[i] = Entry{piece.data(), h, static_cast<std::uint32_t>(piece.size()), static_cast<std::uint32_t>(ids.size()),
                            pool_.size()};
        pool_.insert(pool_.end(), ids.begin(), ids.end());
        ++size_;
    }

    const std::int32_t* pool() const noexcept { return pool_.data(); }

private:
    static constexpr std::uint32_t empty = 0xFFFFFFFFu;
    struct Entry {
        const char* data = nullptr;
        std::uint64_t hash = 0;
        std::uint32_t size = empty;
        std::uint32_t count = 0;
        std::size_t begin = 0;
    };
    void grow() {
        std::vector<Entry> old = std::move(entries_);
        const std::size_t cap = old.empty() ? 1024 : old.size() * 2;
        entries_.assign(cap, Entry{});
        mask_ = cap - 1;
        for (const Entry& e : old) {
            if (e.size == empty) continue;
            std::size_t i = e.hash & mask_;
            while (entries_[i].size != empty) i = (i + 1) & mask_;
            entries_[i] = e;
        }
    }

    std::vector<Entry> entries_;
    std::vector<std::int32_t> pool_;
    std::size_t mask_ = 0;
    std::size_t size_ = 0;
    std::size_t max_entries_;
};

}  // namespace comigs::text::detail
