#pragma once
// The frozen base of a host block, held once and shared (by pointer) by every expert, every layer
// object and every simulated user that adapts it. Nothing here is ever trained.
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/gemm.hpp"
#include "kernels/gemm_bf16.hpp"
#include "kernels/quant.hpp"
#include "params.hpp"
#include "random.hpp"

namespace comigs {

/// A frozen linear map y = x W^T + b over views; W is [out, in] (nn.Linear convention), b is [out] or empty.
/// W is held in exactly one of three ways:
///   - `weight` in T (plain);
///   - `weight_bf16` (float only): the products convert the activations to bf16 and accumulate in fp32
///     (kernels/gemm_bf16.hpp), unless `fp32_compute` asks for fp32 arithmetic on the weight's exact
///     values (widened a panel at a time: what a framework computes on the model cast to fp32, without
///     an fp32 copy of the weight);
///   - `weight_quant` in GGML's Q8_0 or Q4_0 blocks along each row (kernels/quant.hpp): as for bf16,
///     float products with many rows use bf16 dot products where the CPU has them (activations and the
///     dequantized panels rounded to bf16, kernels::gemm_quant_rounded) unless `fp32_compute`, which asks
///     for fp32 arithmetic on the dequantized values (kernels::gemm_quant; always so for double, for
///     decode's few rows and on CPUs without bf16 products). No fp32 copy of W either way.
template <class T>
struct FrozenLinear {
    ConstMatrixView<T> weight;                      ///< [out, in] (empty unless held plain)
    std::span<const T> bias;                        ///< [out] or empty
    ConstMatrixView<kernels::bf16> weight_bf16{};   ///< [out, in] when held in bf16, else empty
    kernels::QuantMatrixView weight_quant{};        ///< [out, in] when held quantized, else empty
    bool fp32_compute = false;                      ///< bf16/quantized weight: fp32 products, nothing rounded

    bool is_bf16() const { return weight_bf16.data != nullptr; }
    bool is_quantized() const { return weight_quant.data != nullptr; }
    /// True when W is a plain T matrix (`weight`), the form the fused GEMM regions of the layers need.
    bool is_plain() const { return !is_bf16() && !is_quantized(); }
    /// True when products with W round the activations to bf16 and can take them already rounded
    /// (the bf16-activation forward and backward_input below): a bf16 weight without fp32_compute.
    bool takes_bf16_activations() const { return is_bf16() && !fp32_compute; }
    Index in_features() const {
        return is_bf16() ? weight_bf16.cols : is_quantized() ? weight_quant.cols : weight.cols;
    }
    Index out_features() const {
        return is_bf16() ? weight_bf16.rows : is_quantized() ? weight_quant.rows : weight.rows;
    }

    /// out[in] = row i of W as float: exact for bf16 and quantized storage (widened / dequantized),
    /// rounded to float from a double matrix. The one way to read a frozen weight's values back
    /// (changing a base's precision converts from these).
    void row_as_float(Index i, float* out) const {
        const Index cols = in_features();
        if (is_quantized()) {
            kernels::dequantize_row(out, weight_quant.type, weight_quant.row_ptr(i), cols);
        } else if (is_bf16()) {
            kernels::convert_to_float(out, weight_bf16.row_ptr(i), cols);
        } else {
            const T* src = weight.row_ptr(i);
            for (Index j = 0; j < cols; ++j) out[j] = static_cast<float>(src[j]);
        }
    }

    /// y[N, out] = x[N, in] W^T + b (overwrites y, or adds to it when `accumulate`).
    void forward(MatrixView<T> y, ConstMatrixView<T> x, bool accumulate = false) const {
        const T beta = accumulate ? T(1) : T(0);
        if (is_quantized()) {
            quant_product(y, x, kernels::Op::trans, beta);
        } else if constexpr (std::is_same_v<T, float>) {
            if (is_bf16() && fp32_compute)
                kernels::gemm_bf16_widened(y, x, weight_bf16, kernels::Op::trans, 1.0f, beta);
            else if (is_bf16())
                kernels::gemm_bf16(y, x, weight_bf16, kernels::Op::trans, 1.0f, beta);
            else
                kernels::gemm<T>(y, x, kernels::Op::none, weight, kernels::Op::trans, T(1), beta);
        } else {
            kernels::gemm<T>(y, x, kernels::Op::none, weight, kernels::Op::trans, T(1), beta);
        }
        add_bias(y);
    }

    /// y[i] += b for every row (nothing without a bias).
    void add_bias(MatrixView<T> y) const {
        if (bias.empty()) return;
        const Index n = y.rows, m = y.cols;
#pragma omp parallel for schedule(static) if (n * m > 32768)
        for (Index i = 0; i < n; ++i) {
            T* yi = y.row_ptr(i);
            for (Index j = 0; j < m; ++j) yi[j] += bias[static_cast<std::size_t>(j)];
        }
    }

    /// y[N, out] = x W^T + b for activations already in bf16 (a bf16-held weight only; float only).
    void forward(MatrixView<float> y, ConstMatrixView<kernels::bf16> xb, bool accumulate = false) const
        requires std::is_same_v<T, float>
    {
        require(is_bf16(), "FrozenLinear: bf16 activations need a weight held in bf16");
        kernels::gemm_bf16_from(y, xb, weight_bf16, kernels::Op::trans, 1.0f, accumulate ? 1.0f : 0.0f);
        add_bias(y);
    }

    /// dx[N, in] (+)= dy W for gradients already in bf16 (a bf16-held weight only; float only).
    void backward_input(MatrixView<float> dx, ConstMatrixView<kernels::bf16> dyb, bool accumulate = true) const
        requires std::is_same_v<T, float>
    {
        require(is_bf16(), "FrozenLinear: bf16 gradients need a weight held in bf16");
        kernels::gemm_bf16_from(dx, dyb, weight_bf16, kernels::Op::none, 1.0f, accumulate ? 1.0f : 0.0f);
    }

    /// dx[N, in] (+)= dy[N, out] W.
    void backward_input(MatrixView<T> dx, ConstMatrixView<T> dy, bool accumulate = true) const {
        const T beta = accumulate ? T(1) : T(0);
        if (is_quantized()) {
            quant_product(dx, dy, kernels::Op::none, beta);
            return;
        }
        if constexpr (std::is_same_v<T, float>) {
            if (is_bf16()) {
                if (fp32_compute)
                    kernels::gemm_bf16_widened(dx, dy, weight_bf16, kernels::Op::none, 1.0f, beta);
                else
                    kernels::gemm_bf16(dx, dy, weight_bf16, kernels::Op::none, 1.0f, beta);
                return;
            }
        }
        kernels::gemm<T>(dx, dy, kernels::Op::none, weight, kernels::Op::none, T(1), beta);
    }

private:
    /// A product with the quantized weight: bf16 products unless fp32_compute (float only; as the bf16
    /// weight does), else the dequantized values in T.
    void quant_product(MatrixView<T> c, ConstMatrixView<T> a, kernels::Op op, T beta) const {
        if constexpr (std::is_same_v<T, float>)
            if (!fp32_compute) return kernels::gemm_quant_rounded(c, a, weight_quant, op, 1.0f, beta);
        kernels::gemm_quant<T>(c, a, weight_quant, op, T(1), beta);
    }
};

/// Which MLP the mixture adapts: GPT-2 (d -> hidden with bias, GELU-tanh, hidden -> d with bias) or
/// Llama (SwiGLU: down(silu(gate x) * up x), no biases).
enum class MlpForm { gelu, swiglu };

inline const char* to_string(MlpForm f) { return f == MlpForm::gelu ? "gelu" : "swiglu"; }

/// How a frozen MLP holds its weight matrices: fp32 (the default, and the fallback everywhere), bf16
/// (half the bytes; products convert activations to bf16 and accumulate in fp32), or GGML's Q8_0 /
/// Q4_0 blocks (1.0625 / 0.5625 bytes a weight; products compute with the dequantized values).
enum class Precision { fp32, bf16, q8_0, q4_0 };

inline const char* to_string(Precision p) {
    switch (p) {
        case Precision::fp32: return "fp32";
        case Precision::bf16: return "bf16";
        case Precision::q8_0: return "q8_0";
        default: return "q4_0";
    }
}

/// True for the block-quantized precisions.
constexpr bool is_quantized(Precision p) { return p == Precision::q8_0 || p == Precision::q4_0; }

/// The block format of a quantized precision.
constexpr kernels::QuantType quant_type(Precision p) {
    return p == Precision::q4_0 ? kernels::QuantType::q4_0 : kernels::QuantType::q8_0;
}

/// Frozen MLP weights in one buffer. Tensor names: gelu: `fc.weight` [h, d], `fc.bias` [h],
/// `proj.weight` [d, h], `proj.bias` [d]; swiglu: `gate.weight` [h, d], `up.weight` [h, d],
/// `down.weight` [d, h]. One copy serves every expert, layer object and user that adapts it.
template <class T>
class FrozenMlp {
public:
    FrozenMlp(MlpForm form, Index d_model, Index d_hidden) : FrozenMlp(form, d_model, d_hidden, Layout{}) {
        weights_ = ParamBuffer<T>(full_layout_);
    }

private:
    struct Layout {};
    /// Shapes only: the owning constructor allocates the weights, the borrowing one never does.
    FrozenMlp(MlpForm form, Index d_model, Index d_hidden, Layout) : form_(form), d_(d_model), h_(d_hidden) {
        require(d_model >= 1, "d_model ", d_model, ": must be >= 1");
        require(d_hidden >= 1, "d_hidden ", d_hidden, ": must be >= 1");
        ParamLayout l;
        if (form == MlpForm::gelu) {
            l.add("fc.weight", {h_, d_});
            l.add("fc.bias", {h_});
            l.add("proj.weight", {d_, h_});
            l.add("proj.bias", {d_});
        } else {
            l.add("gate.weight", {h_, d_});
            l.add("up.weight", {h_, d_});
            l.add("down.weight", {d_, h_});
        }
        full_layout_ = std::make_shared<const ParamLayout>(std::move(l));
    }

public:

    /// An MLP over weights held elsewhere (e.g. a memory-mapped model file, read in place): `linears`
    /// gives every linear of the form by name (`fc`, `proj` or `gate`, `up`, `down`), each [out, in]
    /// with the shapes of the form; `owner` keeps their memory alive as long as the MLP lives. Nothing
    /// is copied. weights() is then empty and set_precision() refuses: the source decides the storage.
    FrozenMlp(MlpForm form, Index d_model, Index d_hidden, std::map<std::string, FrozenLinear<T>> linears,
              std::shared_ptr<const void> owner)
        : FrozenMlp(form, d_model, d_hidden, Layout{}) {
        for (const auto& spec : full_layout_->tensors()) {
            if (!spec.name.ends_with(".weight")) continue;
            const std::string name = spec.name.substr(0, spec.name.size() - 7);
            const auto it = linears.find(name);
            require(it != linears.end(), "borrowed ", to_string(form), " MLP: no linear '", name, "'");
            const FrozenLinear<T>& f = it->second;
            require<ShapeError>(f.out_features() == spec.rows() && f.in_features() == spec.cols(), "borrowed MLP linear '",
                                name, "': weight [", f.out_features(), ", ", f.in_features(), "], expected [",
                                spec.rows(), ", ", spec.cols(), "]");
            const auto bias = full_layout_->find(name + ".bias");
            require<ShapeError>(f.bias.empty() || (bias && static_cast<Index>(f.bias.size()) == bias->size),
                                "borrowed MLP linear '", name, "': bias of ", f.bias.size(), " values, expected ",
                                bias ? bias->size : 0);
            borrowed_.emplace(name, f);
        }
        require(borrowed_.size() == linears.size(), "borrowed ", to_string(form), " MLP: ", linears.size(),
                " linears given, the form has ", borrowed_.size());
        owner_ = std::move(owner);
        const FrozenLinear<T>& first = borrowed_.begin()->second;
        precision_ = first.is_bf16()        ? Precision::bf16
                     : !first.is_quantized() ? Precision::fp32
                     : first.weight_quant.type == kernels::QuantType::q4_0 ? Precision::q4_0
                                                                           : Precision::q8_0;
    }

    MlpForm form() const { return form_; }
    Index d_model() const { return d_; }
    Index d_hidden() const { return h_; }

    /// Mutable access for loading the host's weights before the layer is shared. In any precision but
    /// fp32 it holds the biases only (the matrices are in bf16_weight() or quant_weight()).
    ParamBuffer<T>& weights() { return weights_; }
    const ParamBuffer<T>& weights() const { return weights_; }

    Precision precision() const { return precision_; }

    /// Products against the bf16 or quantized matrices in fp32 arithmetic on their exact (widened or
    /// dequantized) values, activations not rounded: FrozenLinear::fp32_compute of every linear() (the
    /// default, off, lets them use bf16 dot products where the CPU has them). No effect in fp32 or on
    /// a borrowed MLP (its linears carry their own choice).
    void set_fp32_compute(bool on) { fp32_compute_ = on; }
    bool fp32_compute() const { return fp32_compute_; }

    /// Stores the weight matrices in `p`, converting the current values once: fp32 -> bf16 rounds to
    /// nearest even, -> Q8_0 / Q4_0 quantizes rows as ggml does (from the float values; a quantized base
    /// converted to another quantized precision is requantized from its dequantized values); back to
    /// fp32 is exact (the bf16 or dequantized values). bf16 needs T = float; the quantized precisions
    /// need row lengths (d_model and d_hidden) that are multiples of 32 and finite weights. Biases
    /// always stay in T. Call it after loading the weights and before sharing the base: views taken
    /// earlier become invalid.
    void set_precision(Precision p) {
        if (p == precision_) return;
        require(!is_borrowed(), "precision ", to_string(p), ": a borrowed MLP keeps the storage of its source");
        if (p == Precision::bf16)
            require(std::is_same_v<T, float>, "precision bf16: only FrozenMlp<float> can hold bf16 weights");
        std::vector<Matrix> mats;
        ParamLayout biases;
        Index bf16_total = 0;
        std::size_t quant_total = 0;
        for (const auto& spec : full_layout_->tensors()) {
            if (spec.shape.size() != 2) {
                biases.add(spec.name, spec.shape);
                continue;
            }
            Matrix m{spec.name, 0, spec.rows(), spec.cols()};
            if (p == Precision::bf16) {
                m.offset = static_cast<std::size_t>(bf16_total);
                bf16_total += (m.rows * m.cols + 31) / 32 * 32;  // 64-byte aligned starts
            } else if (is_quantized(p)) {
                require(m.cols % kernels::quant_block_size == 0, "precision ", to_string(p), ": '", m.name,
                        "' has rows of ", m.cols, " values, not a multiple of 32 (GGML blocks)");
                m.offset = quant_total;
                quant_total += (static_cast<std::size_t>(m.rows) * kernels::quant_row_bytes(quant_type(p), m.cols) + 63) / 64 * 64;
            }
            mats.push_back(m);
        }
        ParamBuffer<T> next(p == Precision::fp32 ? ParamBuffer<T>(full_layout_) : ParamBuffer<T>(std::move(biases)));
        comigs::detail::aligned_vector<kernels::bf16> bf16(static_cast<std::size_t>(bf16_total));
        comigs::detail::aligned_vector<std::byte> quant(quant_total);
        std::vector<float> row;
        for (const auto& m : mats) {
            row.resize(static_cast<std::size_t>(m.cols));
            const FrozenLinear<T> source = linear(m.name.substr(0, m.name.size() - 7));  // drop ".weight"
            for (Index i = 0; i < m.rows; ++i) {
                source.row_as_float(i, row.data());
                if (p == Precision::fp32) {
                    T* dst = next.view(m.name).row_ptr(i);
                    for (Index j = 0; j < m.cols; ++j) dst[j] = static_cast<T>(row[static_cast<std::size_t>(j)]);
                } else if (p == Precision::bf16) {
                    kernels::convert_to_bf16(bf16.data() + m.offset + i * m.cols, row.data(), m.cols);
                } else {
                    const std::size_t rb = kernels::quant_row_bytes(quant_type(p), m.cols);
                    try {
                        kernels::quantize_row(quant.data() + m.offset + static_cast<std::size_t>(i) * rb, quant_type(p),
                                              row.data(), m.cols);
                    } catch (const NumericError& e) {
                        detail::raise<NumericError>("precision ", to_string(p), ": '", m.name, "' row ", i, ": ",
                                                    e.what());
                    }
                }
            }
        }
        for (const auto& spec : next.layout().tensors())
            if (spec.shape.size() != 2) {
                auto src = weights_.span(spec.name);
                std::copy(src.begin(), src.end(), next.span(spec.name).begin());
            }
        weights_ = std::move(next);
        bf16_ = std::move(bf16);
        quant_ = std::move(quant);
        matrices_ = p == Precision::fp32 ? std::vector<Matrix>{} : std::move(mats);
        precision_ = p;
    }

    /// A weight matrix held in bf16 (`fc.weight`, ...); empty in any other precision.
    ConstMatrixView<kernels::bf16> bf16_weight(const std::string& name) const {
        if (is_borrowed() && name.ends_with(".weight")) {
            const auto it = borrowed_.find(name.substr(0, name.size() - 7));
            return it == borrowed_.end() ? ConstMatrixView<kernels::bf16>() : it->second.weight_bf16;
        }
        if (precision_ != Precision::bf16) return {};
        for (const auto& m : matrices_)
            if (m.name == name) return {bf16_.data() + m.offset, m.rows, m.cols};
        return {};
    }

    /// A weight matrix held in Q8_0 or Q4_0 blocks (`fc.weight`, ...); empty in any other precision.
    kernels::QuantMatrixView quant_weight(const std::string& name) const {
        if (is_borrowed() && name.ends_with(".weight")) {
            const auto it = borrowed_.find(name.substr(0, name.size() - 7));
            return it == borrowed_.end() ? kernels::QuantMatrixView{} : it->second.weight_quant;
        }
        if (!is_quantized(precision_)) return {};
        for (const auto& m : matrices_)
            if (m.name == name) return {quant_type(precision_), quant_.data() + m.offset, m.rows, m.cols};
        return {};
    }

    /// The blocks of a quantized weight matrix, writable, for loading blocks that come already
    /// quantized (a GGUF file) after set_precision(q8_0 / q4_0): rows() x quant_row_bytes(cols) bytes,
    /// row after row. InvalidArgument when the precision is not quantized or there is no such matrix.
    std::span<std::byte> quant_weight_bytes(const std::string& name) {
        require(is_quantized(precision_) && !is_borrowed(), "quant_weight_bytes '", name, "': the precision is ",
                to_string(precision_), is_borrowed() ? " of a borrowed MLP" : ", not quantized");
        for (const auto& m : matrices_)
            if (m.name == name)
                return {quant_.data() + m.offset,
                        static_cast<std::size_t>(m.rows) * kernels::quant_row_bytes(quant_type(precision_), m.cols)};
        detail::raise<InvalidArgument>("quant_weight_bytes '", name, "': no such weight matrix in this MLP");
    }

    /// Bytes held for the frozen weights (matrices and biases), whatever the number of experts (0 when
    /// borrowed: the owner holds them).
    std::size_t weight_bytes() const {
        return static_cast<std::size_t>(weights_.size()) * sizeof(T) + bf16_.size() * sizeof(kernels::bf16) +
               quant_.size();
    }

    /// Whether the weights are held elsewhere (the borrowing constructor).
    bool is_borrowed() const { return !borrowed_.empty(); }

    /// A linear map by name: `fc`, `proj` (gelu) or `gate`, `up`, `down` (swiglu).
    FrozenLinear<T> linear(const std::string& name) const {
        if (is_borrowed()) {
            const auto it = borrowed_.find(name);
            require(it != borrowed_.end(), "linear '", name, "': not in this MLP (no '", name, ".weight')");
            return it->second;
        }
        FrozenLinear<T> f;
        if (precision_ == Precision::bf16) {
            f.weight_bf16 = bf16_weight(name + ".weight");
            require(f.weight_bf16.data != nullptr, "linear '", name, "': not in this MLP");
            f.fp32_compute = fp32_compute_;
        } else if (is_quantized(precision_)) {
            f.weight_quant = quant_weight(name + ".weight");
            require(f.weight_quant.data != nullptr, "linear '", name, "': not in this MLP");
            f.fp32_compute = fp32_compute_;
        } else {
            f.weight = weights_.view(name + ".weight");
        }
        if (weights_.contains(name + ".bias")) f.bias = weights_.span(name + ".bias");
        return f;
    }

    /// Fills every weight and bias with N(0, std) draws (tests and toy examples; fp32 precision).
    void randomize(Rng& rng, double std = 0.02) {
        require(precision_ == Precision::fp32 && !is_borrowed(), "randomize: call it before set_precision(",
                to_string(precision_), "), on an owned MLP");
        for (const auto& spec : weights_.layout().tensors())
            for (T& w : weights_.span(spec.name)) w = static_cast<T>(rng.normal(0.0, std));
    }

private:
    /// A matrix held outside weights_: its offset in bf16_ (elements) or quant_ (bytes).
    struct Matrix {
        std::string name;
        std::size_t offset;
        Index rows, cols;
    };

    /// Row i of matrix `name` in the current precision, as floats (the values the products use).
    MlpForm form_;
    Index d_, h_;
    Precision precision_ = Precision::fp32;
    bool fp32_compute_ = false;
    std::shared_ptr<const ParamLayout> full_layout_;
    ParamBuffer<T> weights_;
    comigs::detail::aligned_vector<kernels::bf16> bf16_;
    comigs::detail::aligned_vector<std::byte> quant_;
    std::vector<Matrix> matrices_;
    std::map<std::string, FrozenLinear<T>> borrowed_;  // the borrowing constructor's linears
    std::shared_ptr<const void> owner_;                // keeps their memory alive
};

}  // namespace comigs
