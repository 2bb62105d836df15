#pragma once
// GEMMs against frozen weights stored in bf16: the activations are converted to bf16, the products
// accumulate in fp32. Backends, chosen at run time:
//   - oneDNN's matmul (AMX or AVX512-BF16 brgemm kernels) when comigs was built with it and the CPU
//     has bf16 dot products;
//   - otherwise the fp32 path: the weights are widened to fp32 a panel at a time and multiplied with
//     the fp32 GEMM (the same numbers up to summation order, at fp32 speed).
#include <algorithm>
#include <vector>

#include "../detail/aligned.hpp"
#include "bf16.hpp"
#include "cpu.hpp"
#include "gemm.hpp"
#include "onednn.hpp"

namespace comigs::kernels {

enum class Bf16Backend { onednn, fp32_fallback };

inline const char* to_string(Bf16Backend b) { return b == Bf16Backend::onednn ? "onednn" : "fp32-fallback"; }

namespace detail {
/// Test and benchmark switch: force the fp32 fallback even where oneDNN would run.
inline bool& force_bf16_fallback() {
    static bool force = false;
    return force;
}
/// Columns of W widened to fp32 at a time by the fallback (a test can shrink it to hit the tails).
inline Index& bf16_fallback_panel() {
    static Index panel = 256;
    return panel;
}
/// Elements of W gemm_bf16_widened widens at a time (4 MB of fp32: a whole projection of a small model,
/// a few panels of a large one; a test can shrink it to hit the tails).
inline Index& bf16_widen_panel_elements() {
    static Index elements = Index(1) << 20;
    return elements;
}
}  // namespace detail

/// The backend gemm_bf16 uses on this machine and build.
inline Bf16Backend bf16_backend() {
#ifdef COMIGS_HAVE_ONEDNN
    if (!detail::force_bf16_fallback() && (cpu().avx512_bf16 || cpu().amx_bf16)) return Bf16Backend::onednn;
#endif
    return Bf16Backend::fp32_fallback;
}

namespace detail {
/// C = alpha A op(W) + beta C with W widened to fp32 a panel of columns at a time (exact: bf16 -> fp32
/// loses nothing) and multiplied by the fp32 GEMM; A is used as given. Shapes checked by the callers.
inline void gemm_widened_panels(MatrixView<float> C, ConstMatrixView<float> Af, ConstMatrixView<bf16> W, Op opw,
                                float alpha, float beta, Index panel) {
    const Index m = Af.rows, k = Af.cols, n = C.cols;
    thread_local std::vector<float> wf;
    panel = std::max<Index>(1, panel);
    for (Index j0 = 0; j0 < n; j0 += panel) {
        const Index nb = std::min(panel, n - j0);
        wf.resize(static_cast<std::size_t>(nb * k));
        if (opw == Op::trans) {
            for (Index j = 0; j < nb; ++j) convert_to_float(wf.data() + j * k, W.row_ptr(j0 + j), k);
            gemm<float>(MatrixView<float>(C.data + j0, m, nb, C.stride), Af, Op::none, ConstMatrixView<float>(wf.data(), nb, k), Op::trans, alpha,
                        beta);
        } else {
            for (Index i = 0; i < k; ++i) convert_to_float(wf.data() + i * nb, W.row_ptr(i) + j0, nb);
            gemm<float>(MatrixView<float>(C.data + j0, m, nb, C.stride), Af, Op::none, ConstMatrixView<float>(wf.data(), k, nb), Op::none, alpha,
                        beta);
        }
    }
}
}  // namespace detail

/// C[M, N] = alpha * A[M, K] op(W) + beta * C (beta 0 or 1) with the activations already in bf16
/// (e.g. written so by the fused row passes), W bf16 as for gemm_bf16. Accumulation in fp32.
inline void gemm_bf16_from(MatrixView<float> C, ConstMatrixView<bf16> A, ConstMatrixView<bf16> W, Op opw,
                           float alpha = 1.0f, float beta = 0.0f) {
    const Index m = A.rows, k = A.cols;
    const Index kw = opw == Op::none ? W.rows : W.cols;
    const Index n = opw == Op::none ? W.cols : W.rows;
    require<ShapeError>(k == kw && C.rows == m && C.cols == n, "gemm_bf16: A [", m, ", ", k, "] x op(W) [", kw,
                        ", ", n, "] -> C [", C.rows, ", ", C.cols, "] do not agree");
    require(beta == 0.0f || beta == 1.0f, "gemm_bf16 beta ", beta, ": only 0 or 1 supported");
    if (m == 0 || n == 0) return;
    if (k == 0) {
        if (beta == 0.0f)
            for (Index i = 0; i < m; ++i) std::fill(C.row_ptr(i), C.row_ptr(i) + n, 0.0f);
        return;
    }
#ifdef COMIGS_HAVE_ONEDNN
    if (bf16_backend() == Bf16Backend::onednn) {
        const onednn::Operand a{A.data, m, k, A.stride, 1};
        const onednn::Operand b = opw == Op::none ? onednn::Operand{W.data, k, n, W.stride, 1}
                                                  : onednn::Operand{W.data, k, n, 1, W.stride};
        onednn::matmul(onednn::Type::bf16, a, b, C.data, C.stride, alpha, beta != 0.0f);
        return;
    }
#endif
    // fp32 fallback: the activations and a panel of widened weights through the fp32 GEMM.
    thread_local std::vector<float> af;
    af.resize(static_cast<std::size_t>(m * k));
    for (Index i = 0; i < m; ++i) convert_to_float(af.data() + i * k, A.row_ptr(i), k);
    detail::gemm_widened_panels(C, ConstMatrixView<float>(af.data(), m, k), W, opw, alpha, beta,
                                detail::bf16_fallback_panel());
}

/// C[M, N] = alpha * A[M, K] op(W) + beta * C (beta 0 or 1), A fp32 (rounded to bf16 on the way in),
/// W bf16: op = trans means W is [N, K] (y = x W^T, nn.Linear forward), none means W is [K, N]
/// (dx = dy W, the input gradient). Accumulation in fp32.
inline void gemm_bf16(MatrixView<float> C, ConstMatrixView<float> A, ConstMatrixView<bf16> W, Op opw,
                      float alpha = 1.0f, float beta = 0.0f) {
    const Index m = A.rows, k = A.cols;
    // The activations in bf16, contiguous; the buffer is kept between calls.
    thread_local comigs::detail::aligned_vector<bf16> abuf;
    if (abuf.size() < static_cast<std::size_t>(m * k)) abuf.resize(static_cast<std::size_t>(m * k));
    if (m > 0 && k > 0) convert_rows_to_bf16(abuf.data(), A);
    gemm_bf16_from(C, ConstMatrixView<bf16>(abuf.data(), m, k), W, opw, alpha, beta);
}

/// C[M, N] = alpha * A[M, K] op(W) + beta * C (beta 0 or 1) computed in fp32: the fp32 activations as
/// they are, W widened to fp32 a panel at a time (never whole). The product of fp32 arithmetic on the
/// bf16 weight's exact values: what a framework computes after casting a bf16 model to fp32, without
/// the fp32 copy of the weight. Slower than gemm_bf16 where bf16 dot products exist.
inline void gemm_bf16_widened(MatrixView<float> C, ConstMatrixView<float> A, ConstMatrixView<bf16> W, Op opw,
                              float alpha = 1.0f, float beta = 0.0f) {
    const Index m = A.rows, k = A.cols;
    const Index kw = opw == Op::none ? W.rows : W.cols;
    const Index n = opw == Op::none ? W.cols : W.rows;
    require<ShapeError>(k == kw && C.rows == m && C.cols == n, "gemm_bf16_widened: A [", m, ", ", k, "] x op(W) [",
                        kw, ", ", n, "] -> C [", C.rows, ", ", C.cols, "] do not agree");
    require(beta == 0.0f || beta == 1.0f, "gemm_bf16_widened beta ", beta, ": only 0 or 1 supported");
    if (m == 0 || n == 0) return;
    if (k == 0) {
        if (beta == 0.0f)
            for (Index i = 0; i < m; ++i) std::fill(C.row_ptr(i), C.row_ptr(i) + n, 0.0f);
        return;
    }
    detail::gemm_widened_panels(C, A, W, opw, alpha, beta, detail::bf16_widen_panel_elements() / k);
}

}  // namespace comigs::kernels
