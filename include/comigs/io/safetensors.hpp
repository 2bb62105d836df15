#pragma once
// safetensors files: read, validate, build, write (atomically).
//
// Format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section. The
// JSON object maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (byte offsets
// relative to the data section) and may hold "__metadata__", an object of string to string. Tensor data
// is row-major and little-endian.
//
// The reader enforces the reference parser's rules and reports each violation as a FormatError that
// names the offending value: header length at most 100,000,000 bytes and inside the file; valid UTF-8;
// a JSON object; no duplicate keys at any level (JSON libraries silently keep one of them, which would
// let two readers of the same file see different tensors); entries with exactly dtype, shape and
// data_offsets; known dtypes; non-negative integer dimensions; shape x dtype size computed with every
// multiplication overflow-checked; offsets that match the size and tile the data section exactly (sorted
// by begin, the first at 0, each starting where the previous ended, the last ending at the end of the
// file); metadata values that are strings. JSON nesting deeper than a safetensors header can have is
// rejected while parsing, so hostile headers cannot exhaust the stack or memory.
//
// Checksums: files written by comigs carry "comigs.checksum" = "xxh64:<16 hex digits>" in the metadata,
// the XXH64 hash of the data section. The reader verifies it when present (files from other writers,
// e.g. PyTorch, have none and load as usual) and removes it from metadata(): it describes the bytes of
// one serialisation, not the content, and the writer recomputes it.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <ranges>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/float16.hpp"
#include "../detail/posix_file.hpp"
#include "../detail/quote.hpp"
#include "../detail/utf8.hpp"
#include "../detail/xxhash64.hpp"
#include "../error.hpp"
#include "../view.hpp"
#include "atomic_file.hpp"

namespace comigs::io {

/// Element types defined by the safetensors format (all of them are accepted when reading; typed access
/// converts between the floating-point ones).
enum class Dtype : std::uint8_t { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2 };

}  // namespace comigs::io

namespace comigs::detail {
struct DtypeInfo {
    io::Dtype dtype;
    std::string_view name;
    std::size_t size;
};
// clang-format off
inline constexpr std::array<DtypeInfo, 15> dtype_table{{
    {io::Dtype::F64, "F64", 8},   {io::Dtype::F32, "F32", 4},   {io::Dtype::F16, "F16", 2}, {io::Dtype::BF16, "BF16", 2},
    {io::Dtype::I64, "I64", 8},   {io::Dtype::I32, "I32", 4},   {io::Dtype::I16, "I16", 2},   {io::Dtype::I8, "I8", 1},
    {io::Dtype::U64, "U64", 8},   {io::Dtype::U32, "U32", 4},   {io::Dtype::U16, "U16", 2},   {io::Dtype::U8, "U8", 1},
    {io::Dtype::BOOL, "BOOL", 1}, {io::Dtype::F8_E4M3, "F8_E4M3", 1}, {io::Dtype::F8_E5M2, "F8_E5M2", 1},
}};
// clang-format on
}  // namespace comigs::detail

namespace comigs::io {

/// The name the format uses, e.g. "BF16".
constexpr std::string_view dtype_name(Dtype d) { return detail::dtype_table[static_cast<std::size_t>(d)].name; }

/// Bytes per element.
constexpr std::size_t dtype_size(Dtype d) { return detail::dtype_table[static_cast<std::size_t>(d)].size; }

/// The dtype of a format name ("F32" -> Dtype::F32); nullopt for names the format does not define.
constexpr std::optional<Dtype> dtype_from_name(std::string_view name) {
    for (const auto& info : detail::dtype_table)
        if (info.name == name) return info.dtype;
    return std::nullopt;
}

/// C++ element types with a native safetensors dtype: float (F32), double (F64) and the fixed-width
/// integers (I8...I64, U8...U64).
template <class T>
concept SafetensorsElement = std::same_as<T, float> || std::same_as<T, double> || std::same_as<T, std::int8_t> ||
    std::same_as<T, std::int16_t> || std::same_as<T, std::int32_t> || std::same_as<T, std::int64_t> ||
    std::same_as<T, std::uint8_t> || std::same_as<T, std::uint16_t> || std::same_as<T, std::uint32_t> ||
    std::same_as<T, std::uint64_t>;

/// The dtype a value of type T is stored as by default.
template <SafetensorsElement T>
constexpr Dtype dtype_of() {
    if constexpr (std::same_as<T, float>)
        return Dtype::F32;
    else if constexpr (std::same_as<T, double>)
        return Dtype::F64;
    else if constexpr (std::same_as<T, std::int8_t>)
        return Dtype::I8;
    else if constexpr (std::same_as<T, std::int16_t>)
        return Dtype::I16;
    else if constexpr (std::same_as<T, std::int32_t>)
        return Dtype::I32;
    else if constexpr (std::same_as<T, std::int64_t>)
        return Dtype::I64;
    else if constexpr (std::same_as<T, std::uint8_t>)
        return Dtype::U8;
    else if constexpr (std::same_as<T, std::uint16_t>)
        return Dtype::U16;
    else if constexpr (std::same_as<T, std::uint32_t>)
        return Dtype::U32;
    else
        return Dtype::U64;
}

/// One tensor: `bytes` holds numel() * dtype_size(dtype) bytes, row-major, little-endian. An empty shape
/// is a scalar (one element); a shape containing 0 has no elements.
struct SafetensorsTensor {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<Index> shape;
    std::vector<std::byte> bytes;

    Index numel() const {
        Index n = 1;
        for (Index d : shape) n *= d;  // validated against overflow when the tensor was added or parsed
        return n;
    }
    bool operator==(const SafetensorsTensor&) const = default;
};

/// The "__metadata__" map (string to string), kept sorted so that writing is deterministic.
using SafetensorsMetadata = std::map<std::string, std::string, std::less<>>;

/// Readers reject headers longer than this (the reference implementation's limit).
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

/// The metadata key holding the data-section checksum of files comigs writes.
inline constexpr std::string_view safetensors_checksum_key = "comigs.checksum";

struct SafetensorsReadOptions {
    /// Verify "comigs.checksum" when the file has one (files without one always load).
    bool verify_checksum = true;
};

struct SafetensorsWriteOptions {
    /// Record "comigs.checksum" (XXH64 of the data section) in the metadata.
    bool checksum = true;
};

}  // namespace comigs::io

namespace comigs::detail {

inline std::string shape_text(std::span<const Index> shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

/// Product of the dimensions times the element size, or nullopt if any step leaves the range of Index
/// (sizes are signed in comigs, so every partial product must fit in 63 bits, even when a later 0 would
/// bring the product back down).
inline std::optional<std::uint64_t> checked_byte_count(std::span<const Index> shape, std::size_t elem_size) {
    Index n = 1;
    for (Index d : shape)
        if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
    if (__builtin_mul_overflow(n, static_cast<Index>(elem_size), &n)) return std::nullopt;
    return static_cast<std::uint64_t>(n);
}

template <class U>
U load_le(const std::byte* p) {
    std::array<std::byte, sizeof(U)> b;
    std::memcpy(b.data(), p, sizeof(U));
    if constexpr (std::endian::native == std::endian::big) std::reverse(b.begin(), b.end());
    return std::bit_cast<U>(b);
}

template <class U>
void store_le(U v, std::byte* p) {
    auto b = std::bit_cast<std::array<std::byte, sizeof(U)>>(v);
    if constexpr (std::endian::native == std::endian::big) std::reverse(b.begin(), b.end());
    std::memcpy(p, b.data(), sizeof(U));
}

inline void put_le64(std::uint64_t v, std::byte* p) { store_le(v, p); }

inline bool is_float_dtype(io::Dtype d) {
    return d == io::Dtype::F32 || d == io::Dtype::F64 || d == io::Dtype::BF16 || d == io::Dtype::F16;
}

/// Converts `n` stored elements of dtype `d` at `src` to T at `dst`. Floating T reads F32/F64/BF16/F16;
/// integer T reads only its own dtype. The caller checked that the conversion exists.
template <io::SafetensorsElement T>
void decode_elements(io::Dtype d, const std::byte* src, std::size_t n, T* dst) {
    if (n == 0) return;
    if (d == io::dtype_of<T>()) {
        if constexpr (std::endian::native == std::endian::little) {
            std::memcpy(dst, src, n * sizeof(T));
        } else {
            for (std::size_t i = 0; i < n; ++i) dst[i] = load_le<T>(src + i * sizeof(T));
        }
        return;
    }
    if constexpr (std::is_floating_point_v<T>) {
        switch (d) {
            case io::Dtype::F32:
                for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<float>(src + 4 * i));
                return;
            case io::Dtype::F64:
                for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<double>(src + 8 * i));
                return;
            case io::Dtype::BF16:
                for (std::size_t i = 0; i < n; ++i)
                    dst[i] = static_cast<T>(bf16_bits_to_float(load_le<std::uint16_t>(src + 2 * i)));
                return;
            case io::Dtype::F16:
                for (std::size_t i = 0; i < n; ++i)
                    dst[i] = static_cast<T>(f16_bits_to_float(load_le<std::uint16_t>(src + 2 * i)));
                return;
            default:
                break;
        }
    }
    raise<InvalidArgument>("internal: no conversion from ", io::dtype_name(d));
}

/// Converts `n` values of T at `src` to dtype `d` at `dst` (double to BF16/F16 rounds through float).
template <io::SafetensorsElement T>
void encode_elements(io::Dtype d, const T* src, std::size_t n, std::byte* dst) {
    if (n == 0) return;
    if (d == io::dtype_of<T>()) {
        if constexpr (std::endian::native == std::endian::little) {
            std::memcpy(dst, src, n * sizeof(T));
        } else {
            for (std::size_t i = 0; i < n; ++i) store_le(src[i], dst + i * sizeof(T));
        }
        return;
    }
    if constexpr (std::is_floating_point_v<T>) {
        switch (d) {
            case io::Dtype::F32:
                for (std::size_t i = 0; i < n; ++i) store_le(static_cast<float>(src[i]), dst + 4 * i);
                return;
            case io::Dtype::F64:
                for (std::size_t i = 0; i < n; ++i) store_le(static_cast<double>(src[i]), dst + 8 * i);
                return;
            case io::Dtype::BF16:
                for (std::size_t i = 0; i < n; ++i)
                    store_le(float_to_bf16_bits(static_cast<float>(src[i])), dst + 2 * i);
                return;
            case io::Dtype::F16:
                for (std::size_t i = 0; i < n; ++i)
                    store_le(float_to_f16_bits(static_cast<float>(src[i])), dst + 2 * i);
                return;
            default:
                break;
        }
    }
    raise<InvalidArgument>("internal: no conversion to ", io::dtype_name(d));
}

template <io::SafetensorsElement T>
bool can_decode(io::Dtype d) {
    if constexpr (std::is_floating_point_v<T>)
        return is_float_dtype(d);
    else
        return d == io::dtype_of<T>();
}

/// One validated header entry.
struct SafetensorsEntry {
    std::string name;
    io::Dtype dtype;
    std::vector<Index> shape;
    std::uint64_t begin;
    std::uint64_t end;
    std::size_t position;  ///< in the header text
};

/// A validated header: entries sorted by data offset (ties in header order), metadata (empty if absent).
struct SafetensorsHeader {
    std::vector<SafetensorsEntry> entries;
    io::SafetensorsMetadata metadata;
};

// A map-based document: nlohmann's ordered_json finds keys by linear search, which a hostile header with
// millions of keys would turn into quadratic time. The header order is recorded separately.
using safetensors_json = nlohmann::json;

/// A JSON value in an error message: scalars as written, containers by kind (they can be huge).
inline std::string describe_json(const safetensors_json& v) {
    switch (v.type()) {
        case safetensors_json::value_t::object:
            return "an object";
        case safetensors_json::value_t::array:
            return "an array";
        case safetensors_json::value_t::string:
            return "the string " + quote_name(v.get_ref<const std::string&>());
        default:
            return v.dump();
    }
}

/// Validates the first 8 bytes of a file of `file_size` bytes and returns the header length.
inline std::uint64_t safetensors_header_length(std::span<const std::byte, 8> prefix, std::uint64_t file_size) {
    const std::uint64_t n = load_le<std::uint64_t>(prefix.data());
    if (n > io::safetensors_max_header_bytes)
        raise<FormatError>("header length ", n, " exceeds the limit of ", io::safetensors_max_header_bytes, " bytes");
    if (n > file_size - 8)
        raise<FormatError>("header length ", n, " reaches beyond the end of the file (", file_size,
                           " bytes, so at most ", file_size - 8, " bytes of header)");
    return n;
}

/// A parsed header document and the position of each top-level key in the text.
struct HeaderJson {
    safetensors_json doc;
    std::map<std::string, std::size_t, std::less<>> position;
};

/// Parses JSON while rejecting duplicate keys and excess nesting (nlohmann would keep the last of two
/// equal keys without a word, and nothing in a valid header is nested deeper than 3).
inline HeaderJson parse_header_json(std::string_view text) {
    struct OpenObject {
        std::set<std::string, std::less<>> keys;
        std::string last_key;
    };
    std::vector<OpenObject> open;
    HeaderJson out;
    auto callback = [&open, &out](int depth, safetensors_json::parse_event_t event, safetensors_json& parsed) {
        using E = safetensors_json::parse_event_t;
        switch (event) {
            case E::object_start:
            case E::array_start:
                if (depth > 3)
                    raise<FormatError>("header JSON nests deeper than a safetensors header can (depth ", depth + 1,
                                       ")");
                if (event == E::object_start) open.emplace_back();
                break;
            case E::object_end:
                if (!open.empty()) open.pop_back();
                break;
            case E::key: {
                if (open.empty()) break;
                const auto& key = parsed.get_ref<const std::string&>();
                OpenObject& obj = open.back();
                if (!obj.keys.insert(key).second) {
                    if (open.size() == 1) raise<FormatError>("duplicate tensor name ", quote_name(key), " in header");
                    raise<FormatError>("duplicate key ", quote_name(key), " inside ",
                                       quote_name(open[open.size() - 2].last_key));
                }
                obj.last_key = key;
                if (depth == 1) out.position.emplace(key, out.position.size());
                break;
            }
            default:
                break;
        }
        return true;
    };
    try {
        out.doc = safetensors_json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                                          /*ignore_comments=*/false);
    } catch (const nlohmann::json::exception& e) {
        raise<FormatError>("header is not valid JSON: ", e.what());
    }
    return out;
}

/// Reads a non-negative integer (shape dimension or data offset) or explains what is wrong with it.
inline std::uint64_t header_uint(const safetensors_json& v, std::string_view tensor, const char* what,
                                 std::uint64_t max) {
    if (v.is_number_unsigned()) {
        const auto x = v.get<std::uint64_t>();
        if (x > max)
            raise<FormatError>("tensor ", quote_name(tensor), ": ", what, " ", x, " is too large (at most ", max, ")");
        return x;
    }
    if (v.is_number_integer()) {
        const auto x = v.get<std::int64_t>();
        if (x < 0) raise<FormatError>("tensor ", quote_name(tensor), ": ", what, " ", x, " is negative");
        return static_cast<std::uint64_t>(x);  // "-0"
    }
    raise<FormatError>("tensor ", quote_name(tensor), ": ", what, " ", describe_json(v), " is not an integer");
}

inline SafetensorsEntry parse_tensor_entry(const std::string& name, const safetensors_json& v) {
    if (!v.is_object())
        raise<FormatError>("tensor ", quote_name(name), ": entry is not an object (found ", describe_json(v), ")");
    for (const auto& item : v.items()) {
        const std::string& k = item.key();
        if (k != "dtype" && k != "shape" && k != "data_offsets")
            raise<FormatError>("tensor ", quote_name(name), ": unexpected key ", quote_name(k),
                               " (an entry has only dtype, shape and data_offsets)");
    }
    SafetensorsEntry e{name, io::Dtype::F32, {}, 0, 0, 0};

    const auto dt = v.find("dtype");
    if (dt == v.end()) raise<FormatError>("tensor ", quote_name(name), ": missing \"dtype\"");
    if (!dt->is_string())
        raise<FormatError>("tensor ", quote_name(name), ": \"dtype\" must be a string, found ", describe_json(*dt));
    const auto dtype = io::dtype_from_name(dt->get_ref<const std::string&>());
    if (!dtype)
        raise<FormatError>("tensor ", quote_name(name), ": unknown dtype ",
                           quote_name(dt->get_ref<const std::string&>()));
    e.dtype = *dtype;

    const auto sh = v.find("shape");
    if (sh == v.end()) raise<FormatError>("tensor ", quote_name(name), ": missing \"shape\"");
    if (!sh->is_array())
        raise<FormatError>("tensor ", quote_name(name), ": \"shape\" must be an array of integers, found ",
                           describe_json(*sh));
    e.shape.reserve(sh->size());
    for (const auto& d : *sh)
        e.shape.push_back(static_cast<Index>(
            header_uint(d, name, "shape dimension", static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))));
    const auto nbytes = checked_byte_count(e.shape, io::dtype_size(e.dtype));
    if (!nbytes)
        raise<FormatError>("tensor ", quote_name(name), ": shape ", shape_text(e.shape), " times the ",
                           io::dtype_size(e.dtype), "-byte size of ", io::dtype_name(e.dtype),
                           " overflows a signed 64-bit size");

    const auto off = v.find("data_offsets");
    if (off == v.end()) raise<FormatError>("tensor ", quote_name(name), ": missing \"data_offsets\"");
    if (!off->is_array() || off->size() != 2)
        raise<FormatError>(
            "tensor ", quote_name(name), ": \"data_offsets\" must be an array [begin, end], found ",
            off->is_array() ? "an array of " + std::to_string(off->size()) + " elements" : describe_json(*off));
    const std::uint64_t u64max = std::numeric_limits<std::uint64_t>::max();
    e.begin = header_uint((*off)[0], name, "data offset", u64max);
    e.end = header_uint((*off)[1], name, "data offset", u64max);
    if (e.end < e.begin)
        raise<FormatError>("tensor ", quote_name(name), ": data_offsets [", e.begin, ", ", e.end,
                           "] end before they begin");
    if (e.end - e.begin != *nbytes)
        raise<FormatError>("tensor ", quote_name(name), ": data_offsets [", e.begin, ", ", e.end, "] hold ",
                           e.end - e.begin, " bytes but dtype ", io::dtype_name(e.dtype), " with shape ",
                           shape_text(e.shape), " needs ", *nbytes);
    return e;
}

/// Validates a header (the JSON text) against a data section of `data_size` bytes.
inline SafetensorsHeader parse_safetensors_header(std::string_view text, std::uint64_t data_size) {
    if (const std::size_t bad = utf8_invalid_offset(text); bad != std::string_view::npos)
        raise<FormatError>("header is not valid UTF-8 (byte ", bad, " of the header)");
    // JSON text never contains a raw NUL, and nlohmann would stop reading at one: the rest of the header
    // (possibly another JSON document another reader sees) would be ignored.
    if (const std::size_t nul = text.find('\0'); nul != std::string_view::npos)
        raise<FormatError>("header contains a NUL byte (byte ", nul, " of the header)");
    const HeaderJson parsed = parse_header_json(text);
    const safetensors_json& j = parsed.doc;
    if (!j.is_object()) raise<FormatError>("header JSON is not an object (found ", describe_json(j), ")");

    SafetensorsHeader h;
    h.entries.reserve(j.size());
    for (const auto& item : j.items()) {
        const std::string& key = item.key();
        const safetensors_json& v = item.value();
        if (key == "__metadata__") {
            if (v.is_null()) continue;  // what the reference parser reads as "no metadata"
            if (!v.is_object())
                raise<FormatError>("__metadata__ must be an object of strings, found ", describe_json(v));
            for (const auto& m : v.items()) {
                if (!m.value().is_string())
                    raise<FormatError>("__metadata__ value of key ", quote_name(m.key()), " is not a string (found ",
                                       describe_json(m.value()), ")");
                h.metadata.emplace(m.key(), m.value().get<std::string>());
            }
            continue;
        }
        h.entries.push_back(parse_tensor_entry(key, v));
        h.entries.back().position = parsed.position.at(key);
    }

    // Zero-byte tensors share offsets with their neighbours: among equal offsets, header order decides.
    std::sort(h.entries.begin(), h.entries.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
        if (a.begin != b.begin) return a.begin < b.begin;
        if (a.end != b.end) return a.end < b.end;
        return a.position < b.position;
    });
    std::uint64_t expected = 0;
    const SafetensorsEntry* prev = nullptr;
    for (const auto& e : h.entries) {
        if (e.begin != expected) {
            if (prev == nullptr)
                raise<FormatError>("gap in data: the first tensor ", quote_name(e.name), " begins at byte ", e.begin,
                                   ", not 0");
            raise<FormatError>(e.begin > expected ? "gap in data: tensor " : "overlap in data: tensor ",
                               quote_name(e.name), " begins at byte ", e.begin, " but the previous tensor ",
                               quote_name(prev->name), " ends at byte ", expected);
        }
        expected = e.end;
        prev = &e;
    }
    if (expected < data_size)
        raise<FormatError>(data_size - expected, " trailing bytes: the tensors end at data byte ", expected,
                           " but the data section has ", data_size, " bytes");
    if (expected > data_size)
        raise<FormatError>("truncated data: the tensors need ", expected, " data bytes but the file has only ",
                           data_size);
    return h;
}

inline std::string checksum_text(std::uint64_t h) {
    std::string s = "xxh64:0000000000000000";
    for (int i = 0; i < 16; ++i) s[6 + static_cast<std::size_t>(i)] = "0123456789abcdef"[(h >> (60 - 4 * i)) & 0xF];
    return s;
}

/// Checks the recorded checksum (if any) against the hash of the data section and removes it from `meta`.
inline void verify_and_strip_checksum(io::SafetensorsMetadata& meta, std::uint64_t data_hash, bool verify) {
    const auto it = meta.find(io::safetensors_checksum_key);
    if (it == meta.end()) return;
    if (verify) {
        const std::string& recorded = it->second;
        const bool well_formed = recorded.size() == 22 && recorded.starts_with("xxh64:") &&
                                 std::all_of(recorded.begin() + 6, recorded.end(), [](char c) {
                                     return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
                                 });
        if (!well_formed)
            raise<FormatError>(io::safetensors_checksum_key, " ", quote_name(recorded),
                               " is not of the form xxh64:<16 hex digits>");
        std::string lower = recorded;
        for (char& c : lower) c = (c >= 'A' && c <= 'F') ? static_cast<char>(c - 'A' + 'a') : c;
        const std::string actual = checksum_text(data_hash);
        if (lower != actual)
            raise<FormatError>("checksum mismatch: ", io::safetensors_checksum_key, " records ", recorded,
                               " but the data section hashes to ", actual, " (the file is corrupted)");
    }
    meta.erase(it);
}

}  // namespace comigs::detail

namespace comigs::io {

/// An in-memory safetensors file: tensors in order (data-offset order when read, insertion order when
/// built; both are the order the writer lays them out in) plus the metadata map.
///
/// Errors: malformed files -> FormatError (naming the offending value; load() adds the path); asking for
/// a tensor that is absent or has a dtype that cannot be converted -> FormatError; a shape that differs
/// from the expected one -> ShapeError; bad arguments to add() -> InvalidArgument / ShapeError; system
/// call failures -> IoError naming the path and the reason.
class SafetensorsFile {
public:
    // ---- reading -------------------------------------------------------------------------------------

    /// Parses a complete file image.
    static SafetensorsFile parse(std::span<const std::byte> bytes, const SafetensorsReadOptions& options = {}) {
        try {
            if (bytes.size() < 8)
                detail::raise<FormatError>("file is ", bytes.size(),
                                           " bytes, shorter than the 8-byte header length field");
            const std::uint64_t n = detail::safetensors_header_length(bytes.first<8>(), bytes.size());
            const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, static_cast<std::size_t>(n));
            const auto data = bytes.subspan(8 + static_cast<std::size_t>(n));
            detail::SafetensorsHeader h = detail::parse_safetensors_header(text, data.size());
            detail::verify_and_strip_checksum(h.metadata, options.verify_checksum ? detail::Xxh64::hash(data) : 0,
                                              options.verify_checksum);
            SafetensorsFile f;
            f.metadata_ = std::move(h.metadata);
            f.tensors_.reserve(h.entries.size());
            for (auto& e : h.entries) {
                const auto src =
                    data.subspan(static_cast<std::size_t>(e.begin), static_cast<std::size_t>(e.end - e.begin));
                f.push_back({std::move(e.name), e.dtype, std::move(e.shape), {src.begin(), src.end()}});
            }
            return f;
        } catch (const FormatError& e) {
            detail::raise<FormatError>("safetensors: ", e.what());
        }
    }

    /// Reads and parses the file at `path` (tensors are read straight into place: peak memory is the
    /// file size plus the header).
    static SafetensorsFile load(const std::filesystem::path& path, const SafetensorsReadOptions& options = {}) {
        try {
            const detail::UniqueFd fd = detail::open_for_reading(path);
            const std::uint64_t size = detail::file_size(fd.get(), path);
            if (size < 8)
                detail::raise<FormatError>("file is ", size, " bytes, shorter than the 8-byte header length field");
            std::array<std::byte, 8> prefix;
            detail::read_exact(fd.get(), 0, prefix.data(), 8, path);
            const std::uint64_t n = detail::safetensors_header_length(prefix, size);
            std::string text(static_cast<std::size_t>(n), '\0');
            detail::read_exact(fd.get(), 8, reinterpret_cast<std::byte*>(text.data()), text.size(), path);
            detail::SafetensorsHeader h = detail::parse_safetensors_header(text, size - 8 - n);

            SafetensorsFile f;
            f.tensors_.reserve(h.entries.size());
            detail::Xxh64 hash;
            for (auto& e : h.entries) {
                std::vector<std::byte> bytes(static_cast<std::size_t>(e.end - e.begin));
                detail::read_exact(fd.get(), 8 + n + e.begin, bytes.data(), bytes.size(), path);
                if (options.verify_checksum) hash.update(bytes);
                f.push_back({std::move(e.name), e.dtype, std::move(e.shape), std::move(bytes)});
            }
            detail::verify_and_strip_checksum(h.metadata, hash.digest(), options.verify_checksum);
            f.metadata_ = std::move(h.metadata);
            return f;
        } catch (const FormatError& e) {
            detail::raise<FormatError>("safetensors file '", path.string(), "': ", e.what());
        }
    }

    // ---- writing -------------------------------------------------------------------------------------

    /// The file image: header `{"__metadata__": {...sorted keys}, "<tensor>": {"dtype", "shape",
    /// "data_offsets"}, ...}` with tensors in order, padded with spaces to a multiple of 8 bytes, then the
    /// tensors' bytes in the same order. "__metadata__" is left out when there is nothing to put in it.
    std::vector<std::byte> serialize(const SafetensorsWriteOptions& options = {}) const {
        const std::string header = header_text(options);
        std::vector<std::byte> out(8 + header.size() + data_bytes());
        detail::put_le64(header.size(), out.data());
        std::memcpy(out.data() + 8, header.data(), header.size());
        std::byte* p = out.data() + 8 + header.size();
        for (const auto& t : tensors_) {
            if (!t.bytes.empty()) std::memcpy(p, t.bytes.data(), t.bytes.size());
            p += t.bytes.size();
        }
        return out;
    }

    /// Writes the file image of serialize() to `path` atomically (see atomic_write_file): on any failure
    /// the previous file at `path`, if any, is left intact.
    void save(const std::filesystem::path& path, const SafetensorsWriteOptions& options = {}) const {
        const std::string header = header_text(options);
        atomic_write_file(path, [&](AtomicFileWriter& out) {
            std::array<std::byte, 8> len;
            detail::put_le64(header.size(), len.data());
            out.write(len);
            out.write(std::as_bytes(std::span(header)));
            for (const auto& t : tensors_) out.write(t.bytes);
        });
    }

    // ---- metadata ------------------------------------------------------------------------------------

    /// "__metadata__" (string to string). The key "comigs.checksum" is reserved: the writer sets or
    /// removes it according to SafetensorsWriteOptions::checksum.
    SafetensorsMetadata& metadata() noexcept { return metadata_; }
    const SafetensorsMetadata& metadata() const noexcept { return metadata_; }

    // ---- tensors -------------------------------------------------------------------------------------

    const std::vector<SafetensorsTensor>& tensors() const noexcept { return tensors_; }
    std::size_t size() const noexcept { return tensors_.size(); }
    bool empty() const noexcept { return tensors_.empty(); }
    bool contains(std::string_view name) const { return by_name_.find(name) != by_name_.end(); }

    /// The tensor called `name`, or nullptr.
    const SafetensorsTensor* find(std::string_view name) const {
        const auto it = by_name_.find(name);
        return it == by_name_.end() ? nullptr : &tensors_[it->second];
    }
    /// The tensor called `name`; FormatError if there is none.
    const SafetensorsTensor& at(std::string_view name) const {
        const SafetensorsTensor* t = find(name);
        if (t == nullptr)
            detail::raise<FormatError>("tensor ", detail::quote_name(name), ": not in the file (it has ",
                                       tensors_.size(), " tensors)");
        return *t;
    }
    /// The shape of tensor `name` (FormatError if absent).
    const std::vector<Index>& shape(std::string_view name) const { return at(name).shape; }

    /// Removes tensor `name`; returns whether it was there.
    bool erase(std::string_view name) {
        const auto it = by_name_.find(name);
        if (it == by_name_.end()) return false;
        tensors_.erase(tensors_.begin() + static_cast<std::ptrdiff_t>(it->second));
        reindex();
        return true;
    }

    /// Appends a tensor from raw little-endian bytes (numel * dtype_size bytes, row-major).
    void add_raw(std::string name, Dtype dtype, std::vector<Index> shape, std::vector<std::byte> bytes) {
        const std::uint64_t n = check_new(name, shape, dtype);
        require<ShapeError>(bytes.size() == n, "tensor ", detail::quote_name(name), ": dtype ", dtype_name(dtype),
                            " with shape ", detail::shape_text(shape), " needs ", n, " bytes, got ", bytes.size());
        push_back({std::move(name), dtype, std::move(shape), std::move(bytes)});
    }

    /// Appends a tensor of `shape` (row-major; [] is a scalar) from a contiguous range of values (e.g. a
    /// std::vector<float> or std::span<const double>). Stored as the values' own dtype (float -> F32,
    /// double -> F64, int32_t -> I32, ...) or, for floating values, as `as` (F32, F64, BF16 or F16;
    /// rounding to nearest even).
    template <std::ranges::contiguous_range R>
    requires SafetensorsElement<std::remove_cv_t<std::ranges::range_value_t<R>>>
    void add(std::string name, std::vector<Index> shape, const R& values, std::optional<Dtype> as = std::nullopt) {
        using T = std::remove_cv_t<std::ranges::range_value_t<R>>;
        const Dtype dtype = target_dtype<T>(name, as);
        const std::uint64_t n = check_new(name, shape, dtype);
        const auto count = static_cast<std::uint64_t>(std::ranges::size(values));
        require<ShapeError>(count * dtype_size(dtype) == n, "tensor ", detail::quote_name(name), ": shape ",
                            detail::shape_text(shape), " holds ", n / dtype_size(dtype), " elements but ", count,
                            " values were given");
        std::vector<std::byte> bytes(static_cast<std::size_t>(n));
        detail::encode_elements<T>(dtype, std::ranges::data(values), static_cast<std::size_t>(count), bytes.data());
        push_back({std::move(name), dtype, std::move(shape), std::move(bytes)});
    }

    /// Appends a matrix view as a tensor of shape [rows, cols] (the view's stride is not stored).
    template <class T>
    requires SafetensorsElement<std::remove_const_t<T>>
    void add(std::string name, MatrixView<T> m, std::optional<Dtype> as = std::nullopt) {
        using U = std::remove_const_t<T>;
        const Dtype dtype = target_dtype<U>(name, as);
        std::vector<Index> shape{m.rows, m.cols};
        const std::uint64_t n = check_new(name, shape, dtype);
        std::vector<std::byte> bytes(static_cast<std::size_t>(n));
        const std::size_t row_bytes = static_cast<std::size_t>(m.cols) * dtype_size(dtype);
        for (Index r = 0; r < m.rows; ++r)
            detail::encode_elements<U>(dtype, m.row_ptr(r), static_cast<std::size_t>(m.cols),
                                       bytes.data() + static_cast<std::size_t>(r) * row_bytes);
        push_back({std::move(name), dtype, std::move(shape), std::move(bytes)});
    }

    /// The elements of tensor `name` as T, row-major. Floating T converts from F32, F64, BF16 and F16;
    /// integer T reads only its own dtype.
    template <SafetensorsElement T>
    std::vector<T> get(std::string_view name) const {
        const SafetensorsTensor& t = readable_as<T>(name);
        std::vector<T> out(static_cast<std::size_t>(t.numel()));
        detail::decode_elements<T>(t.dtype, t.bytes.data(), out.size(), out.data());
        return out;
    }

    /// As get(name), after checking that the tensor has exactly `expected_shape` (ShapeError otherwise).
    template <SafetensorsElement T>
    std::vector<T> get(std::string_view name, const std::vector<Index>& expected_shape) const {
        expect_shape(at(name), expected_shape);
        return get<T>(name);
    }

    /// Copies tensor `name`, which must have shape [out.rows, out.cols], into `out` (any stride).
    template <SafetensorsElement T>
    void get_into(std::string_view name, MatrixView<T> out) const {
        const SafetensorsTensor& t = readable_as<T>(name);
        expect_shape(t, {out.rows, out.cols});
        const std::size_t row_bytes = static_cast<std::size_t>(out.cols) * dtype_size(t.dtype);
        for (Index r = 0; r < out.rows; ++r)
            detail::decode_elements<T>(t.dtype, t.bytes.data() + static_cast<std::size_t>(r) * row_bytes,
                                       static_cast<std::size_t>(out.cols), out.row_ptr(r));
    }

    /// Copies tensor `name`, which must have shape `expected_shape`, into `out` (as many elements).
    template <SafetensorsElement T>
    void get_into(std::string_view name, const std::vector<Index>& expected_shape, std::span<T> out) const {
        const SafetensorsTensor& t = readable_as<T>(name);
        expect_shape(t, expected_shape);
        require<ShapeError>(out.size() == static_cast<std::size_t>(t.numel()), "tensor ", detail::quote_name(name),
                            ": output has ", out.size(), " elements, the tensor ", t.numel());
        detail::decode_elements<T>(t.dtype, t.bytes.data(), out.size(), out.data());
    }

    bool operator==(const SafetensorsFile& o) const { return tensors_ == o.tensors_ && metadata_ == o.metadata_; }

private:
    std::vector<SafetensorsTensor> tensors_;
    std::map<std::string, std::size_t, std::less<>> by_name_;
    SafetensorsMetadata metadata_;

    void push_back(SafetensorsTensor t) {
        by_name_.emplace(t.name, tensors_.size());
        tensors_.push_back(std::move(t));
    }
    void reindex() {
        by_name_.clear();
        for (std::size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
    }

    /// Checks a new tensor's name and shape; returns its byte count.
    std::uint64_t check_new(const std::string& name, const std::vector<Index>& shape, Dtype dtype) const {
        require(name != "__metadata__", "tensor name '__metadata__': reserved for the metadata");
        require(detail::is_valid_utf8(name), "tensor name ", detail::quote_name(name), ": not valid UTF-8");
        require(!contains(name), "tensor ", detail::quote_name(name), ": already in the file");
        for (Index d : shape)
            require<ShapeError>(d >= 0, "tensor ", detail::quote_name(name), ": shape ", detail::shape_text(shape),
                                " has a negative dimension");
        const auto n = detail::checked_byte_count(shape, dtype_size(dtype));
        require<ShapeError>(n.has_value(), "tensor ", detail::quote_name(name), ": shape ", detail::shape_text(shape),
                            " overflows a signed 64-bit size");
        return *n;
    }

    template <SafetensorsElement T>
    static Dtype target_dtype(const std::string& name, std::optional<Dtype> as) {
        if (!as) return dtype_of<T>();
        if constexpr (std::is_floating_point_v<T>) {
            require(detail::is_float_dtype(*as), "tensor ", detail::quote_name(name), ": floating-point values",
                    " can be stored as F32, F64, BF16 or F16, not ", dtype_name(*as));
        } else {
            require(*as == dtype_of<T>(), "tensor ", detail::quote_name(name), ": ", dtype_name(dtype_of<T>()),
                    " values are stored as ", dtype_name(dtype_of<T>()), ", not ", dtype_name(*as));
        }
        return *as;
    }

    template <SafetensorsElement T>
    const SafetensorsTensor& readable_as(std::string_view name) const {
        const SafetensorsTensor& t = at(name);
        if (!detail::can_decode<T>(t.dtype)) {
            if constexpr (std::is_floating_point_v<T>)
                detail::raise<FormatError>("tensor ", detail::quote_name(name), ": dtype ", dtype_name(t.dtype),
                                           " cannot be read as floating point (readable: F32, F64, BF16, F16)");
            else
                detail::raise<FormatError>("tensor ", detail::quote_name(name), ": dtype ", dtype_name(t.dtype),
                                           " cannot be read as ", dtype_name(dtype_of<T>()));
        }
        return t;
    }

    static void expect_shape(const SafetensorsTensor& t, const std::vector<Index>& expected) {
        require<ShapeError>(t.shape == expected, "tensor ", detail::quote_name(t.name), ": shape ",
                            detail::shape_text(t.shape), ", expected ", detail::shape_text(expected));
    }

    std::uint64_t data_bytes() const {
        std::uint64_t n = 0;
        for (const auto& t : tensors_) n += t.bytes.size();
        return n;
    }

    std::string header_text(const SafetensorsWriteOptions& options) const {
        SafetensorsMetadata meta = metadata_;
        meta.erase(std::string(safetensors_checksum_key));
        for (const auto& [k, v] : meta) {
            require(detail::is_valid_utf8(k), "metadata key ", detail::quote_name(k), ": not valid UTF-8");
            require(detail::is_valid_utf8(v), "metadata value of key ", detail::quote_name(k), ": not valid UTF-8");
        }
        if (options.checksum) {
            detail::Xxh64 hash;
            for (const auto& t : tensors_) hash.update(t.bytes);
            meta.emplace(safetensors_checksum_key, detail::checksum_text(hash.digest()));
        }
        // Built by hand (nlohmann only escapes the strings) so that writing is linear in the tensor count.
        const auto json_string = [](const std::string& x) { return detail::safetensors_json(x).dump(); };
        // (Appending piece by piece also keeps GCC 12's -Wrestrict false positive on string + string away.)
        std::string text = "{";
        if (!meta.empty()) {
            text += "\"__metadata__\":{";
            for (const auto& [k, v] : meta) {
                text += json_string(k);
                text += ':';
                text += json_string(v);
                text += ',';
            }
            text.back() = '}';
            text += ',';
        }
        std::uint64_t offset = 0;
        for (const auto& t : tensors_) {
            text += json_string(t.name);
            text += ":{\"dtype\":\"";
            text += dtype_name(t.dtype);
            text += "\",\"shape\":[";
            for (std::size_t i = 0; i < t.shape.size(); ++i) {
                if (i > 0) text += ',';
                text += std::to_string(t.shape[i]);
            }
            text += "],\"data_offsets\":[";
            text += std::to_string(offset);
            text += ',';
            offset += t.bytes.size();
            text += std::to_string(offset);
            text += "]},";
        }
        if (text.size() > 1) text.pop_back();
        text += '}';
        text.append((8 - text.size() % 8) % 8, ' ');
        require(text.size() <= safetensors_max_header_bytes, "safetensors header of ", text.size(),
                " bytes exceeds the ", safetensors_max_header_bytes, "-byte limit of readers");
        return text;
    }
};

}  // namespace comigs::io
