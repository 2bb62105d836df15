#pragma once
// Unicode Normalization Form C (UAX #15), which Qwen2's tokenizer.json applies before pre-tokenizing:
// canonical decomposition, canonical ordering of combining marks, canonical composition. Tables:
// detail/normalization_tables.hpp, generated from Debian's Unicode Character Database by
// tools/gen_unicode_tables.py. Bytes that are not well-formed UTF-8 pass through unchanged, as
// characters that neither decompose nor compose. Most text is already in NFC: nfc() checks that first
// (the NFC_QC property and the order of combining classes) and copies nothing then.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "detail/normalization_tables.hpp"
#include "unicode.hpp"

namespace comigs::text {

/// Canonical combining class of `cp` (0 for starters and for anything above U+10FFFF).
inline std::uint8_t combining_class(char32_t cp) noexcept {
    if (cp >= 0x110000u) return 0;
    return detail::ccc_blocks[unsigned(detail::ccc_block_index[cp >> 7]) * 128u + (cp & 127u)];
}

namespace detail {

inline std::uint8_t nfc_quick_check(char32_t cp) noexcept {  // 0 yes, 1 no, 2 maybe
    if (cp >= 0x110000u) return 0;
    return nfc_qc_blocks[unsigned(nfc_qc_block_index[cp >> 7]) * 128u + (cp & 127u)];
}

// Hangul syllables decompose and compose by arithmetic (Unicode 15.0, section 3.12).
inline constexpr char32_t hangul_s = 0xAC00, hangul_l = 0x1100, hangul_v = 0x1161, hangul_t = 0x11A7;
inline constexpr char32_t hangul_l_count = 19, hangul_v_count = 21, hangul_t_count = 28;
inline constexpr char32_t hangul_n_count = hangul_v_count * hangul_t_count, hangul_s_count = hangul_l_count * hangul_n_count;

/// Ill-formed bytes ride through the algorithm as these values (above any code point).
inline constexpr char32_t raw_byte_base = 0x110000u;

inline void decompose_into(char32_t cp, std::vector<char32_t>& out) {
    if (cp >= hangul_s && cp < hangul_s + hangul_s_count) {
        const char32_t s = cp - hangul_s;
        out.push_back(hangul_l + s / hangul_n_count);
        out.push_back(hangul_v + (s % hangul_n_count) / hangul_t_count);
        if (s % hangul_t_count) out.push_back(hangul_t + s % hangul_t_count);
        return;
    }
    const auto* begin = std::begin(decomposed_code_points);
    const auto* end = std::end(decomposed_code_points);
    const auto* it = std::lower_bound(begin, end, static_cast<std::uint32_t>(cp));
    if (it == end || *it != cp) {
        out.push_back(cp);
        return;
    }
    const auto i = static_cast<std::size_t>(it - begin);
    for (unsigned k = decomposition_offsets[i]; k < decomposition_offsets[i + 1]; ++k) out.push_back(decomposition_pool[k]);
}

/// The primary composite of (first, second), or 0.
inline char32_t compose_pair(char32_t first, char32_t second) noexcept {
    if (first >= hangul_l && first < hangul_l + hangul_l_count && second >= hangul_v && second < hangul_v + hangul_v_count)
        return hangul_s + ((first - hangul_l) * hangul_v_count + (second - hangul_v)) * hangul_t_count;
    if (first >= hangul_s && first < hangul_s + hangul_s_count && (first - hangul_s) % hangul_t_count == 0 &&
        second > hangul_t && second < hangul_t + hangul_t_count)
        return first + (second - hangul_t);
    if (first >= 0x110000u || second >= 0x110000u) return 0;
    const std::uint64_t key = std::uint64_t(first) << 21 | second;
    const auto* begin = std::begin(composition_pairs);
    const auto* end = std::end(composition_pairs);
    const auto* it = std::lower_bound(begin, end, key);
    return it != end && *it == key ? composition_results[it - begin] : 0;
}

}  // namespace detail

/// True if `text` is certainly in NFC (quick check: no NFC_QC=No/Maybe character, combining classes in
/// order); false means "maybe not" and nfc() must run.
inline bool is_nfc_quick(std::string_view text) noexcept {
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const unsigned char* end = p + text.size();
    std::uint8_t last = 0;
    while (p < end) {
        if (*p < 0x80u) {  // ASCII: a starter with NFC_QC=Yes
            last = 0;
            ++p;
            continue;
        }
        const Utf8Unit u = decode_utf8(p, end);
        p += u.size;
        if (!u.valid) {
            last = 0;
            continue;
        }
        const std::uint8_t ccc = combining_class(u.cp);
        if (ccc != 0 && last > ccc) return false;
        if (detail::nfc_quick_check(u.cp) != 0) return false;
        last = ccc;
    }
    return true;
}

/// `text` in Normalization Form C.
inline std::string nfc(std::string_view text) {
    if (is_nfc_quick(text)) return std::string(text);
    using namespace detail;
    // 1. Full canonical decomposition.
    std::vector<char32_t> d;
    d.reserve(text.size() + 8);
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const unsigned char* end = p + text.size();
    while (p < end) {
        const Utf8Unit u = decode_utf8(p, end);
        if (u.valid) decompose_into(u.cp, d);
        else d.push_back(raw_byte_base + *p);
        p += u.size;
    }
    // 2. Canonical ordering: each run of non-starters sorted by combining class, stably.
    for (std::size_t i = 0; i < d.size();) {
        if (combining_class(d[i]) == 0) {
            ++i;
            continue;
        }
        std::size_t j = i;
        while (j < d.size() && combining_class(d[j]) != 0) ++j;
        std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i), d.begin() + static_cast<std::ptrdiff_t>(j),
                         [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
        i = j;
    }
    // 3. Canonical composition: a character joins the last starter unless a character between them
    // blocks it (a starter, or one of the same or a higher combining class).
    std::vector<char32_t> c;
    c.reserve(d.size());
    std::size_t starter = SIZE_MAX;
    int last_ccc = -1;  // combining class of the last character after the starter; -1: none
    for (char32_t ch : d) {
        const int ccc = combining_class(ch);
        if (starter != SIZE_MAX && (last_ccc == -1 || (last_ccc != 0 && last_ccc < ccc))) {
            if (const char32_t composite = compose_pair(c[starter], ch)) {
                c[starter] = composite;
                continue;
            }
        }
        if (ccc == 0) {
            starter = c.size();
            last_ccc = -1;
        } else {
            last_ccc = ccc;
        }
        c.push_back(ch);
    }
    std::string out;
    out.reserve(text.size());
    for (char32_t ch : c) {
        if (ch >= raw_byte_base) out.push_back(static_cast<char>(ch - raw_byte_base));
        else append_utf8(out, ch);
    }
    return out;
}

}  // namespace comigs::text
