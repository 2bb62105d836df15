#pragma once
// Optional oneDNN backend (Debian: libdnnl-dev). Built in when CMake finds oneDNN and defines
// COMIGS_HAVE_ONEDNN; otherwise nothing here exists and the callers take their own kernels. oneDNN
// picks its kernel at run time from the CPU (AMX / AVX512-BF16 brgemm here, plain AVX-512 elsewhere),
// which is the runtime check of the bf16 path.
#ifdef COMIGS_HAVE_ONEDNN
#include <dnnl.hpp>

#include <array>
#include <bit>
#include <map>
#include <mutex>
#include <string>

#include "../view.hpp"

namespace comigs::kernels::onednn {

enum class Type { f32, bf16 };

/// A strided 2-D operand as oneDNN sees it: element (i, j) at data[i * row_stride + j * col_stride].
struct Operand {
    const void* data;
    Index rows, cols, row_stride, col_stride;
};

inline dnnl::engine& engine() {
    static dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
}

/// One primitive per problem (shape, strides, type, alpha, accumulate), created on first use and
/// kept: creating a oneDNN primitive costs far more than a small GEMM.
inline dnnl::matmul& primitive(Type t, const Operand& a, const Operand& b, Index ldc, float alpha, bool accumulate,
                               std::string* impl = nullptr) {
    using Key = std::array<Index, 12>;
    struct Entry {
        dnnl::matmul prim;
        std::string impl;
    };
    static std::map<Key, Entry> cache;
    static std::mutex mu;
    const Key key{static_cast<Index>(t), a.rows,         a.cols,
                  a.row_stride,          a.col_stride,   b.cols,
                  b.row_stride,          b.col_stride,   ldc,
                  static_cast<Index>(std::bit_cast<std::uint32_t>(alpha)), accumulate ? 1 : 0, 0};
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it == cache.end()) {
        using md = dnnl::memory::desc;
        const auto dt = t == Type::bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
        const md ad({a.rows, a.cols}, dt, {a.row_stride, a.col_stride});
        const md bd({b.rows, b.cols}, dt, {b.row_stride, b.col_stride});
        const md cd({a.rows, b.cols}, dnnl::memory::data_type::f32, {ldc, 1});
        dnnl::primitive_attr attr;
        if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
        if (accumulate) {
            dnnl::post_ops po;
            po.append_sum(1.0f);
            attr.set_post_ops(po);
        }
        dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(ad, bd, cd), attr, engine());
        it = cache.emplace(key, Entry{dnnl::matmul(pd), pd.impl_info_str()}).first;
    }
    if (impl) *impl = it->second.impl;
    return it->second.prim;
}

/// C[M, N] (f32, row stride ldc) = alpha * A[M, K] B[K, N] (+ C when accumulate); A and B of type t.
inline void matmul(Type t, const Operand& a, const Operand& b, float* c, Index ldc, float alpha, bool accumulate) {
    auto& prim = primitive(t, a, b, ldc, alpha, accumulate);
    const auto dt = t == Type::bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
    using md = dnnl::memory::desc;
    dnnl::memory am(md({a.rows, a.cols}, dt, {a.row_stride, a.col_stride}), engine(), const_cast<void*>(a.data));
    dnnl::memory bm(md({b.rows, b.cols}, dt, {b.row_stride, b.col_stride}), engine(), const_cast<void*>(b.data));
    dnnl::memory cm(md({a.rows, b.cols}, dnnl::memory::data_type::f32, {ldc, 1}), engine(), c);
    dnnl::stream s(engine());
    prim.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    s.wait();
}

/// The oneDNN kernel name for a problem (e.g. "brg:avx512_core_amx_bf16"), for reports.
inline std::string implementation(Type t, const Operand& a, const Operand& b, Index ldc) {
    std::string s;
    primitive(t, a, b, ldc, 1.0f, false, &s);
    return s;
}

}  // namespace comigs::kernels::onednn
#endif
