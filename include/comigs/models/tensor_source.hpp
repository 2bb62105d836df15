#pragma once
// Where a host's frozen weights come from, and how they are held.
//
// A TensorSource is a set of named tensors under their Hugging Face names ("model.layers.0.mlp.up_proj.weight",
// "h.0.attn.c_attn.weight", ...): a safetensors model folder (hf_model.hpp), tensors in memory (tests),
// or another file format that maps its own names onto these. Bytes stay where the source keeps them
// (a mapped file stays mapped) for as long as the source lives.
//
// A WeightStore turns tensors of a source into what the hosts compute with: comigs::FrozenLinear views and
// plain vectors. A tensor whose bytes can be used in place (the host's element type, aligned; or BF16
// for a float host that keeps BF16) is viewed, not copied; anything else is converted once into storage
// the store owns. The store keeps its source alive, so every view it hands out stays valid while any
// model (or copy of a model) holding the store lives.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <comigs/detail/aligned.hpp>
#include <comigs/detail/float16.hpp>
#include <comigs/error.hpp>
#include <comigs/frozen.hpp>
#include <comigs/io/safetensors.hpp>
#include <comigs/kernels/bf16.hpp>
#include <comigs/kernels/quant.hpp>

namespace comigs::models {

/// Element types of source tensors (little-endian, row-major). q8_0 / q4_0 are GGML's blocks of 32
/// values along each row (a GGUF file's quantized matrices; kernels/quant.hpp).
enum class ElementType { f32, f64, f16, bf16, q8_0, q4_0 };

inline const char* to_string(ElementType t) {
    switch (t) {
        case ElementType::f32: return "F32";
        case ElementType::f64: return "F64";
        case ElementType::f16: return "F16";
        case ElementType::bf16: return "BF16";
        case ElementType::q8_0: return "Q8_0";
        case ElementType::q4_0: return "Q4_0";
    }
    return "?";
}
inline bool is_quantized(ElementType t) { return t == ElementType::q8_0 || t == ElementType::q4_0; }
inline kernels::QuantType quant_type_of(ElementType t) {
    return t == ElementType::q4_0 ? kernels::QuantType::q4_0 : kernels::QuantType::q8_0;
}
/// Bytes of one value of a float type (the block types have no per-value size: see tensor_bytes).
inline std::size_t element_size(ElementType t) {
    return t == ElementType::f32 ? 4 : t == ElementType::f64 ? 8 : 2;
}
/// Bytes of a tensor of `shape` (row-major, the last dimension the row) in type t; the block types need
/// rows whose length is a multiple of 32. ShapeError naming `what` otherwise, or on overflow.
inline std::size_t tensor_bytes(ElementType t, std::span<const Index> shape, std::string_view what) {
    std::size_t n = 1;
    for (Index s : shape) {
        require<ShapeError>(s >= 0, what, ": negative dimension ", s);
        require<ShapeError>(!__builtin_mul_overflow(n, static_cast<std::size_t>(s), &n), what, ": too many values");
    }
    if (!is_quantized(t)) {
        require<ShapeError>(!__builtin_mul_overflow(n, element_size(t), &n), what, ": too many bytes");
        return n;
    }
    const Index row = shape.empty() ? 1 : shape.back();
    require<ShapeError>(row % kernels::quant_block_size == 0, what, ": ", to_string(t), " rows of ", row,
                        " values, not a multiple of 32");
    return n / kernels::quant_block_size * kernels::quant_block_bytes(quant_type_of(t));
}
/// The element type of a safetensors dtype; FormatError naming `what` for dtypes a model cannot hold.
inline ElementType element_type_of(io::Dtype d, std::string_view what) {
    switch (d) {
        case io::Dtype::F32: return ElementType::f32;
        case io::Dtype::F64: return ElementType::f64;
        case io::Dtype::F16: return ElementType::f16;
        case io::Dtype::BF16: return ElementType::bf16;
        default: break;
    }
    comigs::detail::raise<FormatError>(what, ": dtype ", io::dtype_name(d),
                                       " is not a model weight type (F32, F64, F16 or BF16)");
}

/// One tensor of a source: its bytes stay valid while the source lives.
struct TensorRef {
    std::string name;
    ElementType type = ElementType::f32;
    std::vector<Index> shape;
    std::span<const std::byte> bytes;
    std::string file;  ///< the file holding it (error messages), or a description of where it came from

    Index numel() const {
        Index n = 1;
        for (Index s : shape) n *= s;
        return n;
    }
    Index rows() const { return shape.size() >= 2 ? shape[0] : 1; }
    Index cols() const { return shape.empty() ? 1 : shape.back(); }
};

inline std::string shape_text(std::span<const Index> shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

/// Named tensors a host is built from (Hugging Face names).
class TensorSource {
public:
    virtual ~TensorSource() = default;

    /// The tensor called `name`, or nullptr.
    virtual const TensorRef* find(std::string_view name) const = 0;
    /// Every tensor name, sorted.
    virtual std::vector<std::string> names() const = 0;
    /// What the source is, for error messages: "model folder '/models/smollm2'".
    virtual std::string description() const = 0;

    bool contains(std::string_view name) const { return find(name) != nullptr; }

    /// A hint from a host that has copied a tensor into a form of its own (transposed, quantized) and
    /// will not read its bytes again: a mapped file drops its pages (they come back if read). By default
    /// nothing happens; the TensorRef stays valid either way.
    virtual void release(const TensorRef&) const {}

    /// The tensor called `name`; FormatError naming the source when it is absent.
    const TensorRef& at(std::string_view name) const {
        const TensorRef* t = find(name);
        if (t == nullptr) comigs::detail::raise<FormatError>(description(), ": no tensor '", name, "'");
        return *t;
    }

    /// The tensor called `name` after checking its shape against the one the configuration implies;
    /// ShapeError naming the file, the tensor, both shapes and `why` (the configuration values).
    const TensorRef& expect(std::string_view name, const std::vector<Index>& shape, std::string_view why) const {
        const TensorRef& t = at(name);
        require<ShapeError>(t.shape == shape, description(), ": tensor '", name, "' in '", t.file, "' has shape ",
                            shape_text(t.shape), ", but ", why, " expects ", shape_text(shape));
        return t;
    }
};

/// Tensors held in memory (tests, programs that build models from other formats).
class MemorySource final : public TensorSource {
public:
    /// `free_released`: release() frees a tensor's bytes (its TensorRef then holds none), the way a
    /// mapped file drops its pages; for measuring what a host keeps (comigs-model-memory). Off: release()
    /// does nothing.
    explicit MemorySource(std::string what = "tensors in memory", bool free_released = false)
        : what_(std::move(what)), free_released_(free_released) {}

    /// Adds (or replaces) a tensor from raw little-endian bytes (GGML blocks for q8_0 / q4_0).
    void add_bytes(std::string name, ElementType type, std::vector<Index> shape, std::vector<std::byte> bytes) {
        const std::size_t need = tensor_bytes(type, shape, "tensor '" + name + "' " + shape_text(shape));
        require<ShapeError>(need == bytes.size(), "tensor '", name, "': ", shape_text(shape), " of ", to_string(type),
                            " needs ", need, " bytes, got ", bytes.size());
        auto stored = std::make_unique<Stored>();
        stored->bytes.assign(bytes.begin(), bytes.end());
        stored->ref = {name, type, std::move(shape), {stored->bytes.data(), stored->bytes.size()}, what_};
        tensors_[std::move(name)] = std::move(stored);
    }

    /// Adds a tensor of float or double values, stored as `type` (F32, F64, BF16 or F16, rounding to
    /// nearest even; Q8_0 or Q4_0, quantized row by row as ggml does).
    template <class V>
    void add(std::string name, std::vector<Index> shape, std::span<const V> values, ElementType type) {
        static_assert(std::is_floating_point_v<V>);
        if (is_quantized(type)) {
            const Index row = shape.empty() ? 1 : shape.back();
            std::vector<std::byte> bytes(tensor_bytes(type, shape, "tensor '" + name + "'"));
            require<ShapeError>(values.size() % static_cast<std::size_t>(std::max<Index>(row, 1)) == 0, "tensor '", name,
                                "': ", values.size(), " values for rows of ", row);
            const std::size_t rb = kernels::quant_row_bytes(quant_type_of(type), row);
            std::vector<float> f(static_cast<std::size_t>(row));
            for (std::size_t r = 0; r * rb < bytes.size(); ++r) {
                for (std::size_t j = 0; j < f.size(); ++j) f[j] = static_cast<float>(values[r * f.size() + j]);
                kernels::quantize_row(bytes.data() + r * rb, quant_type_of(type), f.data(), row);
            }
            add_bytes(std::move(name), type, std::move(shape), std::move(bytes));
            return;
        }
        std::vector<std::byte> bytes(values.size() * element_size(type));
        for (std::size_t i = 0; i < values.size(); ++i) {
            std::byte* p = bytes.data() + i * element_size(type);
            switch (type) {
                case ElementType::f32: {
                    const float f = static_cast<float>(values[i]);
                    std::memcpy(p, &f, 4);
                    break;
                }
                case ElementType::f64: {
                    const double f = static_cast<double>(values[i]);
                    std::memcpy(p, &f, 8);
                    break;
                }
                case ElementType::bf16: {
                    const std::uint16_t b = comigs::detail::float_to_bf16_bits(static_cast<float>(values[i]));
                    std::memcpy(p, &b, 2);
                    break;
                }
                case ElementType::f16: {
                    const std::uint16_t b = comigs::detail::float_to_f16_bits(static_cast<float>(values[i]));
                    std::memcpy(p, &b, 2);
                    break;
                }
                default: break;
            }
        }
        add_bytes(std::move(name), type, std::move(shape), std::move(bytes));
    }

    bool erase(std::string_view name) {
        const auto it = tensors_.find(name);
        if (it == tensors_.end()) return false;
        tensors_.erase(it);
        return true;
    }

    const TensorRef* find(std::string_view name) const override {
        const auto it = tensors_.find(name);
        return it == tensors_.end() ? nullptr : &it->second->ref;
    }
    std::vector<std::string> names() const override {
        std::vector<std::string> v;
        for (const auto& [k, _] : tensors_) v.push_back(k);
        return v;
    }
    std::string description() const override { return what_; }

    void release(const TensorRef& t) const override {
        if (!free_released_) return;
        const auto it = tensors_.find(t.name);
        if (it == tensors_.end() || &it->second->ref != &t) return;
        it->second->ref.bytes = {};
        comigs::detail::aligned_vector<std::byte>().swap(it->second->bytes);
    }

private:
    struct Stored {
        comigs::detail::aligned_vector<std::byte> bytes;
        TensorRef ref;
    };
    std::string what_;
    bool free_released_ = false;
    std::map<std::string, std::unique_ptr<Stored>, std::less<>> tensors_;
};

/// How a host holds the frozen weights of a source.
struct WeightOptions {
    /// Keep BF16 matrices in BF16 (float hosts; no fp32 copy). Off: every matrix is widened to the
    /// host's type once, at load (twice the memory of a BF16 file, and the fp32 GEMMs).
    bool keep_bf16 = true;
    /// Products against BF16 and Q8_0/Q4_0 matrices in fp32 arithmetic on their exact (widened or
    /// dequantized) values, a panel at a time inside the GEMM, activations not rounded: the numbers of
    /// the model cast to fp32, without the copy. Off: activations (and dequantized panels) are rounded
    /// to bf16 for bf16 dot products where the CPU has them (faster, ~3 digits).
    bool fp32_compute = false;
    /// Quantize the matrices of every frozen linear (attention, MLP, the head and the embedding it may
    /// be tied to) at load into GGML's blocks along each [out, in] row, from their float values as
    /// llama.cpp's quantize_row_*_ref does; GPT-2's Conv1D weights ([in, out] in the file) are quantized
    /// transposed, so no fp32 copy of them is ever made. Rows must be multiples of 32 values. Matrices
    /// that come already quantized (a GGUF file) stay as they are; vectors (norms, biases, GPT-2's
    /// position table) keep their type. Empty: matrices are held as the file has them.
    std::optional<kernels::QuantType> quantize = std::nullopt;
};

/// Frozen tensors of a source, in the forms the hosts compute with (see the file comment).
template <class T>
class WeightStore {
public:
    WeightStore(std::shared_ptr<const TensorSource> source, WeightOptions options)
        : source_(std::move(source)), options_(options) {
        require(source_ != nullptr, "weight store: null tensor source");
    }

    const TensorSource& source() const { return *source_; }
    const WeightOptions& options() const { return options_; }

    /// The matrix `name` ([out, in]) and optional bias as a frozen linear map.
    FrozenLinear<T> linear(const TensorRef& weight, const TensorRef* bias = nullptr) {
        require<ShapeError>(weight.shape.size() == 2, source_->description(), ": tensor '", weight.name,
                            "' has shape ", shape_text(weight.shape), ", a linear weight has 2 dimensions");
        FrozenLinear<T> f;
        if (is_quantized(weight.type)) {
            f.weight_quant = quant_matrix(weight);
            f.fp32_compute = options_.fp32_compute;
        } else if (options_.quantize) {
            f.weight_quant = quantized(weight, false);
            f.fp32_compute = options_.fp32_compute;
        } else if constexpr (std::is_same_v<T, float>) {
            if (weight.type == ElementType::bf16 && options_.keep_bf16) {
                f.weight_bf16 = bf16_matrix(weight);
                f.fp32_compute = options_.fp32_compute;
            } else {
                f.weight = matrix(weight);
            }
        } else {
            f.weight = matrix(weight);
        }
        if (bias) {
            require<ShapeError>(bias->numel() == weight.rows(), source_->description(), ": bias '", bias->name,
                                "' has shape ", shape_text(bias->shape), " for weight '", weight.name, "' of ",
                                weight.rows(), " rows");
            f.bias = vector(*bias);
        }
        return f;
    }

    /// A linear map from a weight stored [in, out] (GPT-2's Conv1D): transposed once into storage of the
    /// store's own ([out, in]; BF16 stays BF16 when kept; with `quantize`, straight into blocks along the
    /// [out, in] rows), so that every frozen linear has one layout.
    FrozenLinear<T> linear_transposed(const TensorRef& weight, const TensorRef* bias = nullptr) {
        require<ShapeError>(weight.shape.size() == 2, source_->description(), ": tensor '", weight.name,
                            "' has shape ", shape_text(weight.shape), ", a linear weight has 2 dimensions");
        require<FormatError>(!is_quantized(weight.type), source_->description(), ": tensor '", weight.name, "' is ",
                             to_string(weight.type), ", and a transposed ([in, out]) weight cannot be held in blocks");
        const Index in = weight.rows(), out = weight.cols();
        FrozenLinear<T> f;
        bool done = false;
        if (options_.quantize) {
            f.weight_quant = quantized(weight, true);
            f.fp32_compute = options_.fp32_compute;
            done = true;
        }
        if constexpr (std::is_same_v<T, float>) {
            if (!done && weight.type == ElementType::bf16 && options_.keep_bf16) {
                require<FormatError>(weight.bytes.size() == tensor_bytes(weight.type, weight.shape, weight.name),
                                     source_->description(), ": tensor '", weight.name, "' holds ", weight.bytes.size(),
                                     " bytes for a BF16 ", shape_text(weight.shape));
                auto& buf = owned_bf16_.emplace_back(static_cast<std::size_t>(in * out));
                for (Index i = 0; i < in; ++i)
                    for (Index o = 0; o < out; ++o)
                        std::memcpy(&buf[static_cast<std::size_t>(o * in + i)],
                                    weight.bytes.data() + static_cast<std::size_t>(i * out + o) * 2, 2);
                owned_bytes_ += buf.size() * sizeof(kernels::bf16);
                f.weight_bf16 = ConstMatrixView<kernels::bf16>(buf.data(), out, in);
                f.fp32_compute = options_.fp32_compute;
                done = true;
            }
        }
        if (!done) {  // read value by value from the source's bytes: no converted copy in between
            require<FormatError>(weight.bytes.size() == tensor_bytes(weight.type, weight.shape, weight.name),
                                 source_->description(), ": tensor '", weight.name, "' holds ", weight.bytes.size(),
                                 " bytes, not the ", tensor_bytes(weight.type, weight.shape, weight.name), " of ",
                                 to_string(weight.type), " ", shape_text(weight.shape));
            auto& buf = owned_.emplace_back(static_cast<std::size_t>(in * out));
            const std::size_t es = element_size(weight.type);
            for (Index i = 0; i < in; ++i)
                for (Index o = 0; o < out; ++o)
                    buf[static_cast<std::size_t>(o * in + i)] =
                        static_cast<T>(value_at(weight, static_cast<std::size_t>(i * out + o) * es));
            owned_bytes_ += buf.size() * sizeof(T);
            f.weight = ConstMatrixView<T>(buf.data(), out, in);
        }
        source_->release(weight);  // every form above is a copy: the file's [in, out] bytes are not read again
        if (bias) {
            require<ShapeError>(bias->numel() == out, source_->description(), ": bias '", bias->name, "' has shape ",
                                shape_text(bias->shape), " for weight '", weight.name, "' of ", out, " outputs");
            f.bias = vector(*bias);
        }
        return f;
    }

    /// A matrix in the host's type: in place when the source holds it so, else a converted copy.
    ConstMatrixView<T> matrix(const TensorRef& t) {
        require<ShapeError>(t.shape.size() == 2, source_->description(), ": tensor '", t.name, "' has shape ",
                            shape_text(t.shape), ", expected a matrix");
        return {converted(t), t.rows(), t.cols()};
    }

    /// A BF16 matrix in place (or copied to an aligned buffer when the source's bytes are not 2-aligned).
    ConstMatrixView<kernels::bf16> bf16_matrix(const TensorRef& t) {
        require(t.type == ElementType::bf16, "tensor '", t.name, "': ", to_string(t.type), ", not BF16");
        const auto* p = reinterpret_cast<const kernels::bf16*>(t.bytes.data());
        if (reinterpret_cast<std::uintptr_t>(p) % alignof(kernels::bf16) != 0) {
            auto& buf = owned_bf16_.emplace_back(static_cast<std::size_t>(t.numel()));
            std::memcpy(buf.data(), t.bytes.data(), t.bytes.size());
            owned_bytes_ += t.bytes.size();
            p = buf.data();
        } else {
            viewed_bytes_ += t.bytes.size();
        }
        return {p, t.rows(), t.cols()};
    }

    /// A Q8_0 / Q4_0 matrix in place (blocks need no alignment).
    kernels::QuantMatrixView quant_matrix(const TensorRef& t) {
        require(is_quantized(t.type), "tensor '", t.name, "': ", to_string(t.type), ", not Q8_0 / Q4_0");
        require<ShapeError>(t.shape.size() == 2, source_->description(), ": tensor '", t.name, "' has shape ",
                            shape_text(t.shape), ", expected a matrix");
        require<FormatError>(t.bytes.size() == tensor_bytes(t.type, t.shape, t.name), source_->description(),
                             ": tensor '", t.name, "' holds ", t.bytes.size(), " bytes, not the ",
                             tensor_bytes(t.type, t.shape, t.name), " of ", to_string(t.type), " ", shape_text(t.shape));
        viewed_bytes_ += t.bytes.size();
        return {quant_type_of(t.type), t.bytes.data(), t.rows(), t.cols()};
    }

    /// A float matrix (F32, F64, F16, BF16) quantized into owned blocks of options().quantize along the
    /// rows of its [out, in] form: the tensor itself, or with `transposed` the transpose of an [in, out]
    /// tensor. Values go through float (quantize_row's input). ShapeError naming the tensor when a row is
    /// not a multiple of 32 values; NumericError naming the tensor and row for a non-finite value.
    kernels::QuantMatrixView quantized(const TensorRef& t, bool transposed) {
        require(options_.quantize.has_value(), "tensor '", t.name, "': quantized() without options().quantize");
        require<ShapeError>(t.shape.size() == 2, source_->description(), ": tensor '", t.name, "' has shape ",
                            shape_text(t.shape), ", expected a matrix");
        require<FormatError>(!is_quantized(t.type) && t.bytes.size() == tensor_bytes(t.type, t.shape, t.name),
                             source_->description(), ": tensor '", t.name, "' holds ", t.bytes.size(), " bytes, not the ",
                             tensor_bytes(t.type, t.shape, t.name), " of ", to_string(t.type), " ", shape_text(t.shape));
        const kernels::QuantType q = *options_.quantize;
        const Index rows = transposed ? t.cols() : t.rows(), cols = transposed ? t.rows() : t.cols();
        require<ShapeError>(cols % kernels::quant_block_size == 0, source_->description(), ": tensor '", t.name, "' ",
                            shape_text(t.shape), ": its [out, in] rows have ", cols, " values, not a multiple of 32, so ",
                            kernels::to_string(q), " blocks cannot hold them");
        const std::size_t rb = kernels::quant_row_bytes(q, cols);
        auto& buf = owned_quant_.emplace_back(static_cast<std::size_t>(rows) * rb);
        owned_bytes_ += buf.size();
        // A panel of output rows at a time: the transposed case reads the source row by row (cache lines
        // in order) and gathers `panel` columns of it.
        constexpr Index panel = 64;
        std::vector<float> tile(static_cast<std::size_t>(panel * cols));
        const std::size_t es = element_size(t.type);
        for (Index r0 = 0; r0 < rows; r0 += panel) {
            const Index nr = std::min(panel, rows - r0);
            if (transposed) {
                for (Index i = 0; i < cols; ++i)  // source row i: values (i, r0 .. r0 + nr)
                    for (Index r = 0; r < nr; ++r)
                        tile[static_cast<std::size_t>(r * cols + i)] = static_cast<float>(
                            value_at(t, (static_cast<std::size_t>(i) * static_cast<std::size_t>(rows) + static_cast<std::size_t>(r0 + r)) * es));
            } else {
                for (Index r = 0; r < nr; ++r)
                    for (Index i = 0; i < cols; ++i)
                        tile[static_cast<std::size_t>(r * cols + i)] = static_cast<float>(
                            value_at(t, (static_cast<std::size_t>(r0 + r) * static_cast<std::size_t>(cols) + static_cast<std::size_t>(i)) * es));
            }
            for (Index r = 0; r < nr; ++r) {
                try {
                    kernels::quantize_row(buf.data() + static_cast<std::size_t>(r0 + r) * rb, q,
                                          tile.data() + r * cols, cols);
                } catch (const NumericError& e) {
                    comigs::detail::raise<NumericError>(source_->description(), ": tensor '", t.name, "' (",
                                                        transposed ? "column " : "row ", r0 + r, "): ", e.what());
                }
            }
        }
        source_->release(t);  // the blocks are the only form the host reads
        return {q, buf.data(), rows, cols};
    }

    /// Any tensor as a flat vector in the host's type (norm weights, biases, embeddings).
    std::span<const T> vector(const TensorRef& t) { return {converted(t), static_cast<std::size_t>(t.numel())}; }

    /// Bytes of the source used in place, and bytes converted into storage of the store's own.
    std::size_t viewed_bytes() const { return viewed_bytes_; }
    std::size_t owned_bytes() const { return owned_bytes_; }

private:
    static constexpr ElementType host_type = std::is_same_v<T, float> ? ElementType::f32 : ElementType::f64;

    /// The value at byte offset `at` of a float tensor (F32, F64, F16, BF16), exactly.
    static double value_at(const TensorRef& t, std::size_t at) {
        const std::byte* p = t.bytes.data() + at;
        switch (t.type) {
            case ElementType::f32: {
                float f;
                std::memcpy(&f, p, 4);
                return f;
            }
            case ElementType::f64: {
                double f;
                std::memcpy(&f, p, 8);
                return f;
            }
            default: {
                std::uint16_t b;
                std::memcpy(&b, p, 2);
                return t.type == ElementType::bf16 ? comigs::detail::bf16_bits_to_float(b)
                                                   : comigs::detail::f16_bits_to_float(b);
            }
        }
    }

    const T* converted(const TensorRef& t) {
        if (const auto it = converted_.find(t.name); it != converted_.end()) return it->second;
        const T* p = convert(t);
        converted_.emplace(t.name, p);
        return p;
    }
    const T* convert(const TensorRef& t) {
        const std::size_t n = static_cast<std::size_t>(t.numel());
        require<FormatError>(t.bytes.size() == tensor_bytes(t.type, t.shape, t.name), source_->description(),
                             ": tensor '", t.name, "' holds ", t.bytes.size(), " bytes for ", n, " ",
                             to_string(t.type), " values");
        if (t.type == host_type && reinterpret_cast<std::uintptr_t>(t.bytes.data()) % alignof(T) == 0) {
            viewed_bytes_ += t.bytes.size();
            return reinterpret_cast<const T*>(t.bytes.data());
        }
        auto& buf = owned_.emplace_back(n);
        const std::byte* src = t.bytes.data();
        if (is_quantized(t.type)) {  // dequantized once (a quantized norm or embedding read as values)
            const Index row = t.cols();
            const std::size_t rb = kernels::quant_row_bytes(quant_type_of(t.type), row);
            for (std::size_t r = 0; r * static_cast<std::size_t>(row) < n; ++r)
                kernels::dequantize_row(buf.data() + r * static_cast<std::size_t>(row), quant_type_of(t.type), src + r * rb, row);
            owned_bytes_ += n * sizeof(T);
            return buf.data();
        }
        for (std::size_t i = 0; i < n; ++i) {
            switch (t.type) {
                case ElementType::f32: {
                    float f;
                    std::memcpy(&f, src + 4 * i, 4);
                    buf[i] = static_cast<T>(f);
                    break;
                }
                case ElementType::f64: {
                    double f;
                    std::memcpy(&f, src + 8 * i, 8);
                    buf[i] = static_cast<T>(f);
                    break;
                }
                case ElementType::bf16: {
                    std::uint16_t b;
                    std::memcpy(&b, src + 2 * i, 2);
                    buf[i] = static_cast<T>(comigs::detail::bf16_bits_to_float(b));
                    break;
                }
                case ElementType::f16: {
                    std::uint16_t b;
                    std::memcpy(&b, src + 2 * i, 2);
                    buf[i] = static_cast<T>(comigs::detail::f16_bits_to_float(b));
                    break;
                }
                default: break;  // the block types are dequantized above
            }
        }
        owned_bytes_ += n * sizeof(T);
        return buf.data();
    }

    std::shared_ptr<const TensorSource> source_;
    WeightOptions options_;
    std::vector<comigs::detail::aligned_vector<T>> owned_;  // never resized after creation: views stay valid
    std::vector<comigs::detail::aligned_vector<kernels::bf16>> owned_bf16_;
    std::vector<comigs::detail::aligned_vector<std::byte>> owned_quant_;  // blocks quantized at load
    std::map<std::string, const T*, std::less<>> converted_;  // a tensor used twice (tied head) converts once
    std::size_t viewed_bytes_ = 0, owned_bytes_ = 0;
};

}  // namespace comigs::models
