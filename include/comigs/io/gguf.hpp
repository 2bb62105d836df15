#pragma once
// GGUF files (llama.cpp's model and adapter format, version 3, little-endian): read, validate, build,
// write (atomically).
//
// Layout: "GGUF", uint32 version, uint64 tensor count, uint64 metadata count; the metadata (key: uint64
// length + bytes; uint32 value type; value; an ARRAY is uint32 element type + uint64 count + elements);
// the tensor infos (name; uint32 n_dims; n_dims uint64 dims, ne0 first, so a PyTorch [out, in] weight has
// dims [in, out]; uint32 ggml type; uint64 offset into the data section); padding to the alignment
// (`general.alignment`, default 32); the data section.
//
// The reader takes a byte span (a MappedFile's for files: a model is mapped, not read, and tensors are
// views into it) and treats every byte as hostile: every count is checked against the bytes that remain
// before anything is allocated for it, every size multiplication is overflow-checked, and each violation
// is a FormatError naming the offending value: bad magic, unsupported version, truncation (naming what was
// being read), unknown value types, nested arrays, duplicate keys or tensor names, a bad alignment,
// empty keys or tensor names, more than 4 dimensions, element counts that overflow, tensor types other than F32, F16, BF16, Q8_0,
// Q4_0 (named), block rows not a multiple of 32, offsets that are misaligned, outside the data section,
// or overlapping another tensor.
#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "../detail/float16.hpp"
#include "../detail/quote.hpp"
#include "../error.hpp"
#include "../kernels/quant.hpp"
#include "../view.hpp"
#include "atomic_file.hpp"
#include "mapped_file.hpp"

namespace comigs::io {

/// Metadata value types of GGUF.
enum class GgufType : std::uint32_t {
    uint8 = 0,
    int8 = 1,
    uint16 = 2,
    int16 = 3,
    uint32 = 4,
    int32 = 5,
    float32 = 6,
    boolean = 7,
    string = 8,
    array = 9,
    uint64 = 10,
    int64 = 11,
    float64 = 12,
};

inline const char* to_string(GgufType t) {
    constexpr std::array<const char*, 13> names{"UINT8", "INT8",  "UINT16", "INT16",  "UINT32", "INT32", "FLOAT32",
                                                "BOOL",  "STRING", "ARRAY", "UINT64", "INT64",  "FLOAT64"};
    const auto i = static_cast<std::uint32_t>(t);
    return i < names.size() ? names[i] : "unknown";
}

/// The ggml tensor types comigs reads and writes (GGML's numbers).
enum class GgmlType : std::uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, bf16 = 30 };

/// GGML's name of a tensor type number (every type ggml defines, supported or not), or "".
inline std::string_view ggml_type_name(std::uint32_t t) {
    constexpr std::array<std::string_view, 40> names{
        "F32",     "F16",  "Q4_0",  "Q4_1",   "Q4_2",   "Q4_3",  "Q5_0",  "Q5_1", "Q8_0",  "Q8_1",
        "Q2_K",    "Q3_K", "Q4_K",  "Q5_K",   "Q6_K",   "Q8_K",  "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
        "IQ4_NL",  "IQ3_S", "IQ2_S", "IQ4_XS", "I8",     "I16",   "I32",   "I64",  "F64",   "IQ1_M",
        "BF16",    "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4"};
    return t < names.size() ? names[t] : std::string_view{};
}

inline std::string_view to_string(GgmlType t) { return ggml_type_name(static_cast<std::uint32_t>(t)); }

/// The block type of a quantized ggml type, or nullopt for the float types.
constexpr std::optional<kernels::QuantType> quant_type_of(GgmlType t) {
    if (t == GgmlType::q8_0) return kernels::QuantType::q8_0;
    if (t == GgmlType::q4_0) return kernels::QuantType::q4_0;
    return std::nullopt;
}

/// Bytes of `elements` values of type t (a multiple of 32 for the block types); nullopt on overflow.
inline std::optional<std::uint64_t> ggml_bytes(GgmlType t, std::uint64_t elements) {
    std::uint64_t out = 0;
    switch (t) {
        case GgmlType::f32: return __builtin_mul_overflow(elements, 4u, &out) ? std::nullopt : std::optional(out);
        case GgmlType::f16:
        case GgmlType::bf16: return __builtin_mul_overflow(elements, 2u, &out) ? std::nullopt : std::optional(out);
        case GgmlType::q8_0: return elements / 32 * 34;
        case GgmlType::q4_0: return elements / 32 * 18;
    }
    return std::nullopt;
}

/// One scalar metadata value (the C++ type follows the GGUF type; BOOL is bool, STRING std::string).
using GgufScalar = std::variant<std::uint8_t, std::int8_t, std::uint16_t, std::int16_t, std::uint32_t, std::int32_t,
                                float, bool, std::string, std::uint64_t, std::int64_t, double>;

/// A metadata value: a scalar, or an array of scalars of one type (GGUF arrays of arrays are refused).
struct GgufValue {
    GgufType type = GgufType::uint32;
    GgufScalar scalar{};
    GgufType element_type = GgufType::uint32;  ///< arrays only
    std::vector<GgufScalar> array;              ///< arrays only

    GgufValue() = default;
    template <class T>
        requires(!std::is_same_v<std::decay_t<T>, GgufValue> && !std::is_same_v<std::decay_t<T>, const char*>)
    explicit GgufValue(T v) : type(type_of<T>()), scalar(std::move(v)) {}
    explicit GgufValue(const char* s) : GgufValue(std::string(s)) {}

    /// An array of `element` values (each holding the C++ type of that GGUF type).
    static GgufValue make_array(GgufType element, std::vector<GgufScalar> values) {
        require(element != GgufType::array, "GGUF arrays of arrays are not supported");
        for (const auto& v : values)
            require(v.index() == static_cast<std::size_t>(index_of(element)), "GGUF array of ", to_string(element),
                    ": an element holds another type");
        GgufValue g;
        g.type = GgufType::array;
        g.element_type = element;
        g.array = std::move(values);
        return g;
    }
    static GgufValue strings(const std::vector<std::string>& v) {
        return make_array(GgufType::string, std::vector<GgufScalar>(v.begin(), v.end()));
    }

    bool is_array() const { return type == GgufType::array; }
    bool operator==(const GgufValue&) const = default;

    /// The variant index holding a GGUF type's values.
    static constexpr int index_of(GgufType t) {
        switch (t) {
            case GgufType::uint8: return 0;
            case GgufType::int8: return 1;
            case GgufType::uint16: return 2;
            case GgufType::int16: return 3;
            case GgufType::uint32: return 4;
            case GgufType::int32: return 5;
            case GgufType::float32: return 6;
            case GgufType::boolean: return 7;
            case GgufType::string: return 8;
            case GgufType::uint64: return 9;
            case GgufType::int64: return 10;
            case GgufType::float64: return 11;
            case GgufType::array: return -1;
        }
        return -1;
    }
    template <class T>
    static constexpr GgufType type_of() {
        using U = std::decay_t<T>;
        if constexpr (std::is_same_v<U, std::uint8_t>) return GgufType::uint8;
        else if constexpr (std::is_same_v<U, std::int8_t>) return GgufType::int8;
        else if constexpr (std::is_same_v<U, std::uint16_t>) return GgufType::uint16;
        else if constexpr (std::is_same_v<U, std::int16_t>) return GgufType::int16;
        else if constexpr (std::is_same_v<U, std::uint32_t>) return GgufType::uint32;
        else if constexpr (std::is_same_v<U, std::int32_t>) return GgufType::int32;
        else if constexpr (std::is_same_v<U, float>) return GgufType::float32;
        else if constexpr (std::is_same_v<U, bool>) return GgufType::boolean;
        else if constexpr (std::is_same_v<U, std::string>) return GgufType::string;
        else if constexpr (std::is_same_v<U, std::uint64_t>) return GgufType::uint64;
        else if constexpr (std::is_same_v<U, std::int64_t>) return GgufType::int64;
        else {
            static_assert(std::is_same_v<U, double>, "not a GGUF scalar type");
            return GgufType::float64;
        }
    }
};

/// One tensor: name, dims (ne0 first: the row length), type, offset into the data section, and its bytes
/// (a view into the parsed bytes, or into the builder's own storage).
struct GgufTensor {
    std::string name;
    std::vector<std::uint64_t> dims;
    GgmlType type = GgmlType::f32;
    std::uint64_t offset = 0;
    std::span<const std::byte> bytes;

    std::uint64_t elements() const {
        std::uint64_t n = 1;
        for (auto d : dims) n *= d;  // validated against overflow when parsed or added
        return n;
    }
    /// Rows of the tensor seen as a matrix [rows, ne0] (the product of the dims after the first).
    Index rows() const { return dims.empty() ? 1 : static_cast<Index>(elements() / std::max<std::uint64_t>(dims[0], 1)); }
    Index row_length() const { return dims.empty() ? 1 : static_cast<Index>(dims[0]); }
};

/// The alignment of the data section and of every tensor offset when a file sets none.
inline constexpr std::uint32_t gguf_default_alignment = 32;
inline constexpr std::uint32_t gguf_max_dims = 4;

}  // namespace comigs::io

namespace comigs::detail {

/// A little-endian cursor over hostile bytes: every read checks what remains and names what it reads.
class GgufCursor {
public:
    explicit GgufCursor(std::span<const std::byte> b) : b_(b) {}
    std::size_t pos() const { return pos_; }
    std::size_t remaining() const { return b_.size() - pos_; }

    template <class U>
    U read(const char* what) {
        need(sizeof(U), what);
        U v;
        std::memcpy(&v, b_.data() + pos_, sizeof(U));
        if constexpr (std::endian::native == std::endian::big) v = byteswap(v);
        pos_ += sizeof(U);
        return v;
    }
    std::string read_string(const std::string& what) {
        const auto n = read<std::uint64_t>((what + " length").c_str());
        if (n > remaining())
            raise<FormatError>("GGUF: ", what, " of ", n, " bytes at offset ", pos_ - 8, " runs past the end of the file (",
                               remaining(), " bytes left)");
        std::string s(reinterpret_cast<const char*>(b_.data() + pos_), static_cast<std::size_t>(n));
        pos_ += static_cast<std::size_t>(n);
        return s;
    }
    void need(std::size_t n, const char* what) const {
        if (n > remaining())
            raise<FormatError>("GGUF: truncated file: ", what, " needs ", n, " bytes at offset ", pos_, ", ",
                               remaining(), " left");
    }

private:
    template <class U>
    static U byteswap(U v) {
        std::array<std::byte, sizeof(U)> a;
        std::memcpy(a.data(), &v, sizeof(U));
        std::reverse(a.begin(), a.end());
        std::memcpy(&v, a.data(), sizeof(U));
        return v;
    }
    std::span<const std::byte> b_;
    std::size_t pos_ = 0;
};

/// Smallest encoding of a value of type t (a string is at least its 8-byte length): what a count of
/// such values must leave in the file before anything is allocated for them.
inline std::size_t gguf_min_bytes(io::GgufType t) {
    switch (t) {
        case io::GgufType::uint8:
        case io::GgufType::int8:
        case io::GgufType::boolean: return 1;
        case io::GgufType::uint16:
        case io::GgufType::int16: return 2;
        case io::GgufType::uint32:
        case io::GgufType::int32:
        case io::GgufType::float32: return 4;
        case io::GgufType::array: return 12;
        default: return 8;
    }
}

inline bool gguf_known_type(std::uint32_t t) { return t <= 12; }

inline io::GgufScalar gguf_read_scalar(GgufCursor& c, io::GgufType t, const std::string& what) {
    using io::GgufType;
    switch (t) {
        case GgufType::uint8: return c.read<std::uint8_t>(what.c_str());
        case GgufType::int8: return c.read<std::int8_t>(what.c_str());
        case GgufType::uint16: return c.read<std::uint16_t>(what.c_str());
        case GgufType::int16: return c.read<std::int16_t>(what.c_str());
        case GgufType::uint32: return c.read<std::uint32_t>(what.c_str());
        case GgufType::int32: return c.read<std::int32_t>(what.c_str());
        case GgufType::float32: return c.read<float>(what.c_str());
        case GgufType::boolean: {
            const auto v = c.read<std::uint8_t>(what.c_str());
            if (v > 1) raise<FormatError>("GGUF: ", what, ": BOOL value ", static_cast<int>(v), " is neither 0 nor 1");
            return v == 1;
        }
        case GgufType::string: return c.read_string(what);
        case GgufType::uint64: return c.read<std::uint64_t>(what.c_str());
        case GgufType::int64: return c.read<std::int64_t>(what.c_str());
        case GgufType::float64: return c.read<double>(what.c_str());
        case GgufType::array: break;
    }
    raise<FormatError>("GGUF: ", what, ": not a scalar type");
}

template <class U>
void gguf_put(std::vector<std::byte>& out, U v) {
    std::array<std::byte, sizeof(U)> a;
    std::memcpy(a.data(), &v, sizeof(U));
    if constexpr (std::endian::native == std::endian::big) std::reverse(a.begin(), a.end());
    out.insert(out.end(), a.begin(), a.end());
}
inline void gguf_put_string(std::vector<std::byte>& out, std::string_view s) {
    gguf_put<std::uint64_t>(out, s.size());
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out.insert(out.end(), p, p + s.size());
}
inline void gguf_put_scalar(std::vector<std::byte>& out, const io::GgufScalar& v) {
    std::visit(
        [&](const auto& x) {
            using U = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<U, std::string>)
                gguf_put_string(out, x);
            else if constexpr (std::is_same_v<U, bool>)
                gguf_put<std::uint8_t>(out, x ? 1 : 0);
            else
                gguf_put<U>(out, x);
        },
        v);
}

inline std::uint64_t gguf_align_up(std::uint64_t x, std::uint64_t a, const char* what) {
    std::uint64_t r = 0;
    if (__builtin_add_overflow(x, a - 1, &r)) raise<FormatError>("GGUF: ", what, " ", x, " overflows when aligned");
    return r / a * a;
}

}  // namespace comigs::detail

namespace comigs::io {

/// A GGUF file: metadata in file order, tensor infos in file order with views of their bytes.
///
/// parse() of a span keeps views into the given bytes (the caller keeps them alive); parse() of a moved
/// vector keeps the vector; open() maps the file and keeps the mapping. The builder side (set(), add_tensor()) copies the bytes it is given; serialize()
/// lays tensors out in insertion order at aligned offsets, save() writes atomically.
class GgufFile {
public:
    GgufFile() = default;
    GgufFile(GgufFile&&) noexcept = default;
    GgufFile& operator=(GgufFile&&) noexcept = default;
    GgufFile(const GgufFile&) = delete;
    GgufFile& operator=(const GgufFile&) = delete;

    /// Parses and validates a whole file image (see the header comment for what is refused).
    static GgufFile parse(std::span<const std::byte> bytes) {
        using detail::raise;
        GgufFile f;
        detail::GgufCursor c(bytes);
        const auto magic = c.read<std::uint32_t>("the magic");
        if (magic != 0x46554747u)  // "GGUF" little-endian
            raise<FormatError>("GGUF: not a GGUF file: magic ", detail::quote_bytes(bytes.first(4)), ", expected 'GGUF'");
        f.version_ = c.read<std::uint32_t>("the version");
        if (f.version_ != 2 && f.version_ != 3)
            raise<FormatError>("GGUF: version ", f.version_, " is not supported (2 and 3 are)");
        const auto n_tensors = c.read<std::uint64_t>("the tensor count");
        const auto n_kv = c.read<std::uint64_t>("the metadata count");
        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info at least
        // 8 + 4 + 4 + 8: counts that cannot fit are refused before anything is allocated for them.
        if (n_kv > c.remaining() / 13)
            raise<FormatError>("GGUF: metadata count ", n_kv, " cannot fit in the ", c.remaining(), " bytes left");
        std::set<std::string, std::less<>> seen;  // duplicate checks in log time: counts can be in the millions
        for (std::uint64_t i = 0; i < n_kv; ++i) {
            std::string key = c.read_string("metadata key " + std::to_string(i));
            if (key.empty()) raise<FormatError>("GGUF: metadata key ", i, " is empty");
            if (!seen.insert(key).second) raise<FormatError>("GGUF: duplicate metadata key ", detail::quote_name(key));
            const std::string what = "metadata " + detail::quote_name(key);
            const auto type = c.read<std::uint32_t>((what + " type").c_str());
            if (!detail::gguf_known_type(type))
                raise<FormatError>("GGUF: ", what, " has unknown value type ", type);
            GgufValue v;
            v.type = static_cast<GgufType>(type);
            if (v.type == GgufType::array) {
                const auto et = c.read<std::uint32_t>((what + " array element type").c_str());
                if (!detail::gguf_known_type(et))
                    raise<FormatError>("GGUF: ", what, " is an array of unknown value type ", et);
                if (static_cast<GgufType>(et) == GgufType::array)
                    raise<FormatError>("GGUF: ", what, " is an array of arrays (not supported)");
                v.element_type = static_cast<GgufType>(et);
                const auto n = c.read<std::uint64_t>((what + " array length").c_str());
                if (n > c.remaining() / detail::gguf_min_bytes(v.element_type))
                    raise<FormatError>("GGUF: ", what, " array length ", n, " cannot fit in the ", c.remaining(),
                                       " bytes left");
                v.array.reserve(static_cast<std::size_t>(n));
                for (std::uint64_t j = 0; j < n; ++j)
                    v.array.push_back(detail::gguf_read_scalar(c, v.element_type, what + "[" + std::to_string(j) + "]"));
            } else {
                v.scalar = detail::gguf_read_scalar(c, v.type, what);
            }
            f.metadata_.emplace_back(std::move(key), std::move(v));
        }
        f.alignment_ = gguf_default_alignment;
        if (const GgufValue* a = f.find("general.alignment")) {
            if (a->type != GgufType::uint32)
                raise<FormatError>("GGUF: general.alignment has type ", to_string(a->type), ", expected UINT32");
            const auto al = std::get<std::uint32_t>(a->scalar);
            if (al == 0 || (al & (al - 1)) != 0)
                raise<FormatError>("GGUF: general.alignment ", al, " is not a power of two");
            f.alignment_ = al;
        }
        if (n_tensors > c.remaining() / 24)
            raise<FormatError>("GGUF: tensor count ", n_tensors, " cannot fit in the ", c.remaining(), " bytes left");
        std::vector<std::uint64_t> sizes;
        std::set<std::string, std::less<>> seen_tensors;
        for (std::uint64_t i = 0; i < n_tensors; ++i) {
            GgufTensor t;
            t.name = c.read_string("tensor name " + std::to_string(i));
            if (t.name.empty()) raise<FormatError>("GGUF: tensor ", i, " has an empty name");
            const std::string what = "tensor " + detail::quote_name(t.name);
            if (!seen_tensors.insert(t.name).second) raise<FormatError>("GGUF: duplicate tensor name ", detail::quote_name(t.name));
            const auto nd = c.read<std::uint32_t>((what + " dimension count").c_str());
            if (nd > gguf_max_dims) raise<FormatError>("GGUF: ", what, " has ", nd, " dimensions (at most 4)");
            std::uint64_t elements = 1;
            for (std::uint32_t j = 0; j < nd; ++j) {
                const auto d = c.read<std::uint64_t>((what + " dimension").c_str());
                if (d > static_cast<std::uint64_t>(INT64_MAX) || __builtin_mul_overflow(elements, d, &elements) ||
                    elements > static_cast<std::uint64_t>(INT64_MAX))
                    raise<FormatError>("GGUF: ", what, " element count overflows at dimension ", j, " (", d, ")");
                t.dims.push_back(d);
            }
            const auto type = c.read<std::uint32_t>((what + " type").c_str());
            const auto name = ggml_type_name(type);
            if (type != 0 && type != 1 && type != 2 && type != 8 && type != 30) {
                if (name.empty()) raise<FormatError>("GGUF: ", what, " has unknown ggml type ", type);
                raise<FormatError>("GGUF: ", what, " has type ", name, " (", type,
                                   "), not supported (F32, F16, BF16, Q8_0, Q4_0)");
            }
            t.type = static_cast<GgmlType>(type);
            if (quant_type_of(t.type) && (t.dims.empty() || t.dims[0] % 32 != 0))
                raise<FormatError>("GGUF: ", what, " of type ", name, " has rows of ",
                                   t.dims.empty() ? 1 : t.dims[0], " values, not a multiple of 32");
            t.offset = c.read<std::uint64_t>((what + " offset").c_str());
            if (t.offset % f.alignment_ != 0)
                raise<FormatError>("GGUF: ", what, " offset ", t.offset, " is not a multiple of the alignment ",
                                   f.alignment_);
            const auto size = ggml_bytes(t.type, elements);
            if (!size) raise<FormatError>("GGUF: ", what, " byte size overflows");
            sizes.push_back(*size);
            f.tensors_.push_back(std::move(t));
        }
        const std::uint64_t data_start = detail::gguf_align_up(c.pos(), f.alignment_, "data section start");
        if (data_start > bytes.size())
            raise<FormatError>("GGUF: the data section would start at ", data_start, ", past the end of the file (",
                               bytes.size(), " bytes)");
        const std::uint64_t data_size = bytes.size() - data_start;
        // Every tensor inside the data section, and no two overlapping.
        std::vector<std::size_t> order(f.tensors_.size());
        for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
            return f.tensors_[a].offset < f.tensors_[b].offset;
        });
        std::uint64_t prev_end = 0;
        const GgufTensor* prev = nullptr;
        for (std::size_t i : order) {
            GgufTensor& t = f.tensors_[i];
            std::uint64_t end = 0;
            if (__builtin_add_overflow(t.offset, sizes[i], &end) || end > data_size)
                raise<FormatError>("GGUF: tensor ", detail::quote_name(t.name), " (", sizes[i], " bytes at offset ",
                                   t.offset, ") runs past the end of the data section (", data_size, " bytes)");
            if (prev != nullptr && t.offset < prev_end)
                raise<FormatError>("GGUF: tensor ", detail::quote_name(t.name), " at offset ", t.offset,
                                   " overlaps tensor ", detail::quote_name(prev->name), " (ending at ", prev_end, ")");
            t.bytes = bytes.subspan(static_cast<std::size_t>(data_start + t.offset), static_cast<std::size_t>(sizes[i]));
            if (sizes[i] > 0) {
                prev_end = end;
                prev = &t;
            }
        }
        return f;
    }

    /// Parses bytes it then owns (e.g. a serialize() result): the tensors' views stay valid.
    static GgufFile parse(std::vector<std::byte>&& bytes) {
        auto owned = std::make_shared<std::vector<std::byte>>(std::move(bytes));
        GgufFile f = parse(std::span<const std::byte>(*owned));
        f.owned_.push_back(std::move(owned));
        return f;
    }

    /// Maps the file at `path` and parses it; errors name the path. The mapping lives as long as the file.
    static GgufFile open(const std::filesystem::path& path) {
        auto mapped = std::make_shared<MappedFile>(MappedFile::open(path));
        try {
            GgufFile f = parse(mapped->bytes());
            f.mapping_ = std::move(mapped);
            return f;
        } catch (const FormatError& e) {
            detail::raise<FormatError>("'", path.string(), "': ", e.what());
        }
    }

    std::uint32_t version() const { return version_; }
    std::uint32_t alignment() const { return alignment_; }
    const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
    const std::vector<GgufTensor>& tensors() const { return tensors_; }

    /// The value of `key`, or nullptr.
    const GgufValue* find(std::string_view key) const {
        for (const auto& [k, v] : metadata_)
            if (k == key) return &v;
        return nullptr;
    }
    /// The tensor called `name`, or nullptr.
    const GgufTensor* tensor(std::string_view name) const {
        for (const auto& t : tensors_)
            if (t.name == name) return &t;
        return nullptr;
    }
    /// The tensor called `name`; FormatError naming it when absent.
    const GgufTensor& require_tensor(std::string_view name) const {
        const GgufTensor* t = tensor(name);
        if (t == nullptr) detail::raise<FormatError>("GGUF: no tensor ", detail::quote_name(name));
        return *t;
    }

    /// A scalar of C++ type U (its GGUF type exactly); FormatError naming the key if absent or typed otherwise.
    template <class U>
    U get(std::string_view key) const {
        const GgufValue* v = find(key);
        if (v == nullptr) detail::raise<FormatError>("GGUF: no metadata key ", detail::quote_name(key));
        if (v->type != GgufValue::type_of<U>())
            detail::raise<FormatError>("GGUF: metadata ", detail::quote_name(key), " has type ", to_string(v->type),
                                       ", expected ", to_string(GgufValue::type_of<U>()));
        return std::get<U>(v->scalar);
    }
    /// An integer of any GGUF integer type, as int64; FormatError when absent, not an integer, or too large.
    std::int64_t get_int(std::string_view key) const {
        const GgufValue* v = find(key);
        if (v == nullptr) detail::raise<FormatError>("GGUF: no metadata key ", detail::quote_name(key));
        return std::visit(
            [&](const auto& x) -> std::int64_t {
                using U = std::decay_t<decltype(x)>;
                if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool>) {
                    if constexpr (std::is_same_v<U, std::uint64_t>)
                        if (x > static_cast<std::uint64_t>(INT64_MAX))
                            detail::raise<FormatError>("GGUF: metadata ", detail::quote_name(key), " value ", x, " too large");
                    return static_cast<std::int64_t>(x);
                } else {
                    detail::raise<FormatError>("GGUF: metadata ", detail::quote_name(key), " has type ",
                                               to_string(v->type), ", expected an integer");
                }
            },
            v->is_array() ? GgufScalar{std::string()} : v->scalar);
    }
    /// A float of FLOAT32 or FLOAT64 type, as double.
    double get_float(std::string_view key) const {
        const GgufValue* v = find(key);
        if (v == nullptr) detail::raise<FormatError>("GGUF: no metadata key ", detail::quote_name(key));
        if (v->type == GgufType::float32) return std::get<float>(v->scalar);
        if (v->type == GgufType::float64) return std::get<double>(v->scalar);
        detail::raise<FormatError>("GGUF: metadata ", detail::quote_name(key), " has type ", to_string(v->type),
                                   ", expected FLOAT32 or FLOAT64");
    }
    /// An array of strings.
    std::vector<std::string> get_strings(std::string_view key) const {
        const GgufValue* v = find(key);
        if (v == nullptr) detail::raise<FormatError>("GGUF: no metadata key ", detail::quote_name(key));
        if (!v->is_array() || v->element_type != GgufType::string)
            detail::raise<FormatError>("GGUF: metadata ", detail::quote_name(key), " is not an array of strings");
        std::vector<std::string> out;
        out.reserve(v->array.size());
        for (const auto& s : v->array) out.push_back(std::get<std::string>(s));
        return out;
    }

    /// The values of a tensor as T, row-major with ne0 the row length (F32, F16 and BF16 convert; Q8_0 and
    /// Q4_0 dequantize to the float values q * d).
    template <class T>
    std::vector<T> values(std::string_view name) const {
        const GgufTensor& t = require_tensor(name);
        std::vector<T> out(static_cast<std::size_t>(t.elements()));
        const std::byte* p = t.bytes.data();
        if (const auto q = quant_type_of(t.type)) {
            const Index row = t.row_length();
            const std::size_t rb = kernels::quant_row_bytes(*q, row);
            for (Index r = 0; r < t.rows(); ++r) kernels::dequantize_row(out.data() + r * row, *q, p + r * rb, row);
            return out;
        }
        for (std::size_t i = 0; i < out.size(); ++i) {
            float v = 0.0f;
            if (t.type == GgmlType::f32) {
                std::memcpy(&v, p + 4 * i, 4);
            } else {
                std::uint16_t h;
                std::memcpy(&h, p + 2 * i, 2);
                v = t.type == GgmlType::f16 ? detail::f16_bits_to_float(h) : detail::bf16_bits_to_float(h);
            }
            out[i] = static_cast<T>(v);
        }
        return out;
    }

    /// A Q8_0 / Q4_0 tensor of 2 dimensions as a quantized matrix view [dims[1], dims[0]] (no copy).
    kernels::QuantMatrixView quant_matrix(std::string_view name) const {
        const GgufTensor& t = require_tensor(name);
        const auto q = quant_type_of(t.type);
        if (!q || t.dims.size() != 2)
            detail::raise<FormatError>("GGUF: tensor ", detail::quote_name(name), " (", to_string(t.type), ", ",
                                       t.dims.size(), " dims) is not a Q8_0 / Q4_0 matrix");
        return {*q, t.bytes.data(), static_cast<Index>(t.dims[1]), static_cast<Index>(t.dims[0])};
    }

    // ---- building ----

    /// Sets (or replaces) a metadata value, keeping the first position of the key.
    void set(std::string key, GgufValue v) {
        require(!key.empty(), "GGUF metadata key: must not be empty");
        if (key == "general.alignment") {
            require(v.type == GgufType::uint32, "general.alignment: must be UINT32");
            const auto a = std::get<std::uint32_t>(v.scalar);
            require(a != 0 && (a & (a - 1)) == 0, "general.alignment ", a, ": not a power of two");
            alignment_ = a;
        }
        for (auto& [k, old] : metadata_)
            if (k == key) {
                old = std::move(v);
                return;
            }
        metadata_.emplace_back(std::move(key), std::move(v));
    }

    /// Appends a tensor (its bytes copied): dims ne0 first, bytes exactly ggml_bytes(type, elements).
    void add_tensor(std::string name, std::vector<std::uint64_t> dims, GgmlType type, std::span<const std::byte> bytes) {
        require(!name.empty(), "GGUF tensor name: must not be empty");
        require(tensor(name) == nullptr, "GGUF tensor ", detail::quote_name(name), ": added twice");
        require(dims.size() <= gguf_max_dims, "GGUF tensor ", detail::quote_name(name), ": ", dims.size(),
                " dimensions (at most 4)");
        std::uint64_t n = 1;
        for (auto d : dims)
            require(!__builtin_mul_overflow(n, d, &n) && n <= static_cast<std::uint64_t>(INT64_MAX), "GGUF tensor ",
                    detail::quote_name(name), ": element count overflows");
        if (quant_type_of(type))
            require(!dims.empty() && dims[0] % 32 == 0, "GGUF tensor ", detail::quote_name(name), ": ", to_string(type),
                    " rows must be a multiple of 32 values");
        const auto size = ggml_bytes(type, n);
        require<ShapeError>(size && *size == bytes.size(), "GGUF tensor ", detail::quote_name(name), ": ",
                            bytes.size(), " bytes given, ", size.value_or(0), " expected for ", to_string(type));
        auto store = std::make_shared<std::vector<std::byte>>(bytes.begin(), bytes.end());
        GgufTensor t;
        t.name = std::move(name);
        t.dims = std::move(dims);
        t.type = type;
        t.bytes = {store->data(), store->size()};
        owned_.push_back(std::move(store));
        tensors_.push_back(std::move(t));
    }

    /// A float matrix [rows, cols] (row-major, PyTorch order) as a tensor with dims [cols, rows], stored as
    /// F32, F16, BF16 (rounded to nearest even) or quantized to Q8_0 / Q4_0 (cols a multiple of 32).
    void add_matrix(std::string name, ConstMatrixView<float> m, GgmlType type) {
        std::vector<std::byte> bytes;
        const std::size_t n = static_cast<std::size_t>(m.rows * m.cols);
        if (const auto q = quant_type_of(type)) {
            require(m.cols % 32 == 0, "GGUF tensor ", detail::quote_name(name), ": ", to_string(type),
                    " rows must be a multiple of 32 values, not ", m.cols);
            const std::size_t rb = kernels::quant_row_bytes(*q, m.cols);
            bytes.resize(static_cast<std::size_t>(m.rows) * rb);
            for (Index r = 0; r < m.rows; ++r) kernels::quantize_row(bytes.data() + r * rb, *q, m.row_ptr(r), m.cols);
        } else {
            const std::size_t es = type == GgmlType::f32 ? 4 : 2;
            bytes.resize(n * es);
            std::size_t i = 0;
            for (Index r = 0; r < m.rows; ++r)
                for (Index c = 0; c < m.cols; ++c, ++i) {
                    const float v = m(r, c);
                    if (type == GgmlType::f32) {
                        std::memcpy(bytes.data() + 4 * i, &v, 4);
                    } else {
                        const std::uint16_t h =
                            type == GgmlType::f16 ? detail::float_to_f16_bits(v) : detail::float_to_bf16_bits(v);
                        std::memcpy(bytes.data() + 2 * i, &h, 2);
                    }
                }
        }
        add_tensor(std::move(name), {static_cast<std::uint64_t>(m.cols), static_cast<std::uint64_t>(m.rows)}, type, bytes);
    }

    /// The file image: header, metadata and tensor infos in order, tensors at offsets that are multiples
    /// of the alignment (zero padding), in order.
    std::vector<std::byte> serialize() const {
        std::vector<std::byte> out;
        detail::gguf_put<std::uint32_t>(out, 0x46554747u);
        detail::gguf_put<std::uint32_t>(out, 3);
        detail::gguf_put<std::uint64_t>(out, tensors_.size());
        detail::gguf_put<std::uint64_t>(out, metadata_.size());
        for (const auto& [k, v] : metadata_) {
            detail::gguf_put_string(out, k);
            detail::gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(v.type));
            if (v.is_array()) {
                detail::gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(v.element_type));
                detail::gguf_put<std::uint64_t>(out, v.array.size());
                for (const auto& e : v.array) detail::gguf_put_scalar(out, e);
            } else {
                detail::gguf_put_scalar(out, v.scalar);
            }
        }
        std::uint64_t offset = 0;
        for (const auto& t : tensors_) {
            detail::gguf_put_string(out, t.name);
            detail::gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(t.dims.size()));
            for (auto d : t.dims) detail::gguf_put<std::uint64_t>(out, d);
            detail::gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(t.type));
            detail::gguf_put<std::uint64_t>(out, offset);
            offset = detail::gguf_align_up(offset + t.bytes.size(), alignment_, "tensor end");
        }
        out.resize(static_cast<std::size_t>(detail::gguf_align_up(out.size(), alignment_, "data section start")));
        for (const auto& t : tensors_) {
            out.insert(out.end(), t.bytes.begin(), t.bytes.end());
            out.resize(static_cast<std::size_t>(detail::gguf_align_up(out.size(), alignment_, "tensor end")));
        }
        return out;
    }

    /// Writes serialize() to `path` atomically (a failure leaves the previous file intact).
    void save(const std::filesystem::path& path) const { atomic_write_file(path, serialize()); }

private:
    std::uint32_t version_ = 3;
    std::uint32_t alignment_ = gguf_default_alignment;
    std::vector<std::pair<std::string, GgufValue>> metadata_;
    std::vector<GgufTensor> tensors_;
    std::shared_ptr<MappedFile> mapping_;                      // open(): the mapped bytes
    std::vector<std::shared_ptr<std::vector<std::byte>>> owned_;  // add_tensor(): copies
};

}  // namespace comigs::io
