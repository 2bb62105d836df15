#pragma once
// The layers of a GPT-2 style transformer as plain forward/backward functions (llm.c convention:
// outputs first, inputs const; backward ACCUMULATES into every gradient it is given, the caller zeroes).
// N is the number of tokens (batch x sequence), rows of every activation matrix. Matrices are
// contiguous row-major views; a 1-D parameter is a `const T*` of the length named in the comment.
// A null gradient pointer (or a view with null data) means "not trained": that work is skipped.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <comigs/kernels/gemm.hpp>
#include <comigs/view.hpp>

namespace comigs::models {

namespace detail {
template <class T>
using RowArray = Eigen::Array<T, 1, Eigen::Dynamic>;
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;

template <class T>
auto row_array(T* p, Index n) {
    return Eigen::Map<std::conditional_t<std::is_const_v<T>, const RowArray<std::remove_const_t<T>>,
                                         RowArray<T>>>(p, n);
}
template <class T>
auto row_vector(T* p, Index n) {
    return Eigen::Map<std::conditional_t<std::is_const_v<T>, const RowVector<std::remove_const_t<T>>,
                                         RowVector<T>>>(p, n);
}

/// Whether a loop over `work` elements is worth waking other threads for (small models run serially:
/// a parallel region costs microseconds, much more when the cores are shared).
inline bool worth_threads(Index work) { return work >= (Index(1) << 16); }

/// Elementwise exp: Eigen's vectorised one for float; for double std::exp, because GCC 12 with AVX-512
/// warns (-Wuninitialized, inside its own intrinsics header: GCC bug 105593) on Eigen's double exp,
/// and double is only the precision of the gradient checks.
template <class Expr>
auto exp(const Expr& e) {
    using Scalar = typename Expr::Scalar;
    if constexpr (std::is_same_v<Scalar, float>)
        return e.exp();
    else
        return e.unaryExpr([](Scalar v) { return std::exp(v); });
}
}  // namespace detail

/// A read-only input. Not deduced, so a mutable MatrixView<T> binds to it without a cast.
template <class T>
using CView = std::type_identity_t<ConstMatrixView<T>>;

// ---------------------------------------------------------------------------------------------------
// Token + position embedding.

/// out[B*T, d] = wte[tokens[b, t]] + wpe[t]; wte [vocab, d], wpe [n_ctx, d], tokens [B*T] in [0, vocab).
template <class T>
void encoder_forward(MatrixView<T> out, const int* tokens, CView<T> wte, CView<T> wpe,
                     Index B, Index Tn) {
    for (Index b = 0; b < B; ++b)
        for (Index t = 0; t < Tn; ++t) {
            const Index n = b * Tn + t;
            detail::row_array(out.row_ptr(n), out.cols) =
                detail::row_array(wte.row_ptr(tokens[n]), wte.cols) + detail::row_array(wpe.row_ptr(t), wpe.cols);
        }
}

/// dwte[tokens[n]] += dout[n], dwpe[t] += dout[b*T + t]. Serial: the same token may occur many times.
template <class T>
void encoder_backward(MatrixView<T> dwte, MatrixView<T> dwpe, CView<T> dout, const int* tokens, Index B,
                      Index Tn) {
    for (Index b = 0; b < B; ++b)
        for (Index t = 0; t < Tn; ++t) {
            const Index n = b * Tn + t;
            const auto g = detail::row_array(dout.row_ptr(n), dout.cols);
            if (dwte.data) detail::row_array(dwte.row_ptr(tokens[n]), dwte.cols) += g;
            if (dwpe.data) detail::row_array(dwpe.row_ptr(t), dwpe.cols) += g;
        }
}

// ---------------------------------------------------------------------------------------------------
// LayerNorm over the last dimension (eps 1e-5 as GPT-2).

/// out[N, d] = (x - mean) * rstd * w + b per row; saves mean[N] and rstd[N] for backward. w, b [d].
template <class T>
void layernorm_forward(MatrixView<T> out, T* mean, T* rstd, CView<T> x, const T* w, const T* b) {
    const Index d = x.cols;
    const auto W = detail::row_array(w, d);
    const auto Bias = detail::row_array(b, d);
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        const auto xr = detail::row_array(x.row_ptr(n), d);
        const T m = xr.mean();
        const T var = (xr - m).square().mean();
        const T r = T(1) / std::sqrt(var + T(1e-5));
        mean[n] = m;
        rstd[n] = r;
        detail::row_array(out.row_ptr(n), d) = (xr - m) * r * W + Bias;
    }
}

/// dx[N, d] += d/dx, dw[d] += sum_n dout * xhat, db[d] += sum_n dout (dw, db may be null: frozen).
template <class T>
void layernorm_backward(MatrixView<T> dx, T* dw, T* db, CView<T> dout, CView<T> x, const T* mean,
                        const T* rstd, const T* w) {
    const Index d = x.cols;
    const auto W = detail::row_array(w, d);
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        const auto xhat = (detail::row_array(x.row_ptr(n), d) - mean[n]) * rstd[n];
        const auto g = detail::row_array(dout.row_ptr(n), d) * W;  // gradient w.r.t. xhat
        const T g_mean = g.mean();
        const T gx_mean = (g * xhat).mean();
        detail::row_array(dx.row_ptr(n), d) += rstd[n] * (g - g_mean - xhat * gx_mean);
    }
    if (dw == nullptr && db == nullptr) return;
    // Serial over rows: the parameter gradients are sums over all tokens.
    for (Index n = 0; n < x.rows; ++n) {
        const auto go = detail::row_array(dout.row_ptr(n), d);
        if (dw) detail::row_array(dw, d) += go * ((detail::row_array(x.row_ptr(n), d) - mean[n]) * rstd[n]);
        if (db) detail::row_array(db, d) += go;
    }
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm over the last dimension (Llama, Qwen2): out = x * rsqrt(mean(x^2) + eps) * w.

/// out[N, d] = x * rstd * w per row, rstd[N] = 1 / sqrt(mean(x^2) + eps) saved for backward; w [d].
/// (transformers normalises first and multiplies by w after: the same order here.)
template <class T>
void rmsnorm_forward(MatrixView<T> out, T* rstd, CView<T> x, const T* w, T eps) {
    const Index d = x.cols;
    const auto W = detail::row_array(w, d);
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        const auto xr = detail::row_array(x.row_ptr(n), d);
        const T r = T(1) / std::sqrt(xr.square().mean() + eps);
        if (rstd) rstd[n] = r;
        detail::row_array(out.row_ptr(n), d) = W * (xr * r);
    }
}

/// dx[N, d] += rstd (g - xhat mean(g xhat)) with g = dout * w, xhat = x rstd; dw[d] += sum_n dout * xhat
/// (dw may be null: frozen).
template <class T>
void rmsnorm_backward(MatrixView<T> dx, T* dw, CView<T> dout, CView<T> x, const T* rstd, const T* w) {
    const Index d = x.cols;
    const auto W = detail::row_array(w, d);
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        const auto xhat = detail::row_array(x.row_ptr(n), d) * rstd[n];
        const auto g = detail::row_array(dout.row_ptr(n), d) * W;
        const T gx_mean = (g * xhat).mean();
        detail::row_array(dx.row_ptr(n), d) += rstd[n] * (g - xhat * gx_mean);
    }
    if (dw == nullptr) return;
    for (Index n = 0; n < x.rows; ++n)
        detail::row_array(dw, d) += detail::row_array(dout.row_ptr(n), d) * (detail::row_array(x.row_ptr(n), d) * rstd[n]);
}

// ---------------------------------------------------------------------------------------------------
// Linear layer, weights [out, in] as nn.Linear. Eigen's GEMMs run on all OpenMP threads.

/// y[N, out] = x[N, in] W[out, in]^T + b[out] (b may be null).
template <class T>
void linear_forward(MatrixView<T> y, CView<T> x, CView<T> W, const T* b) {
    auto Y = eigen(y);
    Y.noalias() = eigen(x) * eigen(W).transpose();
    if (b) Y.rowwise() += detail::row_vector(b, W.rows);
}

/// dx[N, in] += dy W; dW[out, in] += dy^T x; db[out] += sum_n dy. Any of dx.data, dW.data, db may be null.
template <class T>
void linear_backward(MatrixView<T> dx, MatrixView<T> dW, T* db, CView<T> dy, CView<T> x,
                     CView<T> W) {
    if (dx.data) eigen(dx).noalias() += eigen(dy) * eigen(W);
    if (dW.data) eigen(dW).noalias() += eigen(dy).transpose() * eigen(x);
    if (db) detail::row_vector(db, W.rows) += eigen(dy).colwise().sum();
}

namespace detail {
/// Rows per chunk of the LoRA passes below: fixed, so the partial sums and their order are the same
/// for any thread count.
inline constexpr Index lora_rows_chunk = 64;

/// One LoRA's dy half for lora_dy_pass: dxa[N, R] = s dy B and dB[out, R] += s dy^T xa.
template <class T>
struct LoraDyJob {
    MatrixView<T> dB, dxa;
    ConstMatrixView<T> dy, xa, B;
};

/// The dy half of LoRA backwards at rank R in one pass over each dy (instead of two products that each
/// read it), several LoRAs in one parallel region: dxa[N, R] = s dy B and dB[out, R] += s dy^T xa, B
/// [out, R], xa [N, R]. Four rows at a time share each load of B's and dB's rows; each chunk of rows
/// sums its part of dy^T xa in `part`, added to dB in chunk order after a barrier.
template <int R, class T>
void lora_dy_pass(std::span<const LoraDyJob<T>> jobs, T s, std::vector<T>& part) {
    const Index nj = static_cast<Index>(jobs.size());
    std::vector<Index> first_chunk(static_cast<std::size_t>(nj + 1), 0), first_part(first_chunk), first_row(first_chunk);
    Index work = 0;
    for (Index j = 0; j < nj; ++j) {
        const auto& J = jobs[static_cast<std::size_t>(j)];
        const Index chunks = (J.dy.rows + lora_rows_chunk - 1) / lora_rows_chunk;
        first_chunk[static_cast<std::size_t>(j + 1)] = first_chunk[static_cast<std::size_t>(j)] + chunks;
        first_part[static_cast<std::size_t>(j + 1)] = first_part[static_cast<std::size_t>(j)] + chunks * J.dy.cols * R;
        first_row[static_cast<std::size_t>(j + 1)] = first_row[static_cast<std::size_t>(j)] + J.dy.cols;
        work += J.dy.size();
    }
    const Index total_chunks = first_chunk.back(), total_rows = first_row.back();
    part.assign(static_cast<std::size_t>(first_part.back()), T(0));
    const auto job_of = [&](const std::vector<Index>& first, Index t) {
        return static_cast<Index>(std::upper_bound(first.begin(), first.end(), t) - first.begin()) - 1;
    };
#pragma omp parallel if (worth_threads(work))
    {
#pragma omp for schedule(dynamic, 1)
        for (Index t = 0; t < total_chunks; ++t) {
            const Index j = job_of(first_chunk, t), c = t - first_chunk[static_cast<std::size_t>(j)];
            const auto& J = jobs[static_cast<std::size_t>(j)];
            const Index N = J.dy.rows, out = J.dy.cols;
            T* pc = part.data() + first_part[static_cast<std::size_t>(j)] + c * out * R;
            const Index n1 = std::min(N, (c + 1) * lora_rows_chunk);
            Index n = c * lora_rows_chunk;
            for (; n + 4 <= n1; n += 4) {
                const T *d0 = J.dy.row_ptr(n), *d1 = J.dy.row_ptr(n + 1), *d2 = J.dy.row_ptr(n + 2), *d3 = J.dy.row_ptr(n + 3);
                T x0[R], x1[R], x2[R], x3[R], a0[R] = {}, a1[R] = {}, a2[R] = {}, a3[R] = {};
                for (int q = 0; q < R; ++q) {
                    x0[q] = J.xa(n, q);
                    x1[q] = J.xa(n + 1, q);
                    x2[q] = J.xa(n + 2, q);
                    x3[q] = J.xa(n + 3, q);
                }
                for (Index o = 0; o < out; ++o) {
                    const T* b = J.B.row_ptr(o);
                    T* p = pc + o * R;
                    const T v0 = d0[o], v1 = d1[o], v2 = d2[o], v3 = d3[o];
#if defined(__GNUC__) && !defined(__clang__)  // GCC vectorises the loop over q only when told;
#pragma omp simd                                // clang's -O1 (CI's sanitizer build) would warn
#endif
                    for (int q = 0; q < R; ++q) {
                        a0[q] += v0 * b[q];
                        a1[q] += v1 * b[q];
                        a2[q] += v2 * b[q];
                        a3[q] += v3 * b[q];
                        p[q] += v0 * x0[q] + v1 * x1[q] + v2 * x2[q] + v3 * x3[q];
                    }
                }
                for (int q = 0; q < R; ++q) {
                    J.dxa(n, q) = s * a0[q];
                    J.dxa(n + 1, q) = s * a1[q];
                    J.dxa(n + 2, q) = s * a2[q];
                    J.dxa(n + 3, q) = s * a3[q];
                }
            }
            for (; n < n1; ++n) {
                const T* d0 = J.dy.row_ptr(n);
                T x0[R], a0[R] = {};
                for (int q = 0; q < R; ++q) x0[q] = J.xa(n, q);
                for (Index o = 0; o < out; ++o) {
                    const T* b = J.B.row_ptr(o);
                    T* p = pc + o * R;
                    const T v0 = d0[o];
#if defined(__GNUC__) && !defined(__clang__)  // GCC vectorises the loop over q only when told;
#pragma omp simd                                // clang's -O1 (CI's sanitizer build) would warn
#endif
                    for (int q = 0; q < R; ++q) {
                        a0[q] += v0 * b[q];
                        p[q] += v0 * x0[q];
                    }
                }
                for (int q = 0; q < R; ++q) J.dxa(n, q) = s * a0[q];
            }
        }
        // (implicit barrier) dB, row by row over every job: the chunks' parts in chunk order.
#pragma omp for schedule(static)
        for (Index t = 0; t < total_rows; ++t) {
            const Index j = job_of(first_row, t), o = t - first_row[static_cast<std::size_t>(j)];
            const auto& J = jobs[static_cast<std::size_t>(j)];
            const Index out = J.dy.cols, chunks = first_chunk[static_cast<std::size_t>(j + 1)] - first_chunk[static_cast<std::size_t>(j)];
            const T* pj = part.data() + first_part[static_cast<std::size_t>(j)];
            T sum[R] = {};
            for (Index c = 0; c < chunks; ++c)
                for (int q = 0; q < R; ++q) sum[q] += pj[(c * out + o) * R + q];
            for (int q = 0; q < R; ++q) J.dB(o, q) += s * sum[q];
        }
    }
}

/// Whether lora_dy_pass has a kernel for rank r.
inline bool lora_dy_pass_rank(Index r) { return r == 4 || r == 8 || r == 16; }

/// lora_dy_pass at the jobs' rank (one of lora_dy_pass_rank's, the same for all).
template <class T>
void lora_dy_pass(std::initializer_list<LoraDyJob<T>> jobs, T s) {
    thread_local std::vector<T> part;
    const std::span<const LoraDyJob<T>> js(jobs.begin(), jobs.size());
    if (js.empty()) return;
    switch (js[0].B.cols) {
        case 4: return lora_dy_pass<4, T>(js, s, part);
        case 8: return lora_dy_pass<8, T>(js, s, part);
        case 16: return lora_dy_pass<16, T>(js, s, part);
        default: return;
    }
}
}  // namespace detail

/// LoRA update of a linear layer: y[N, out] += s (x A^T) B^T with A [r, in], B [out, r];
/// saves xa = x A^T [N, r] for backward. Both products are chunked over the threads
/// (kernels::gemm_chunked: the same bits for any thread count).
template <class T>
void lora_forward(MatrixView<T> y, MatrixView<T> xa, CView<T> x, CView<T> A, CView<T> B, T s) {
    using kernels::Op;
    kernels::gemm_chunked<T>(xa, x, Op::none, A, Op::trans);
    kernels::gemm_chunked<T>(y, CView<T>(xa), Op::none, B, Op::trans, s, T(1));
}

/// dB += s dy^T xa; dA += s (dy B)^T x; dx[N, in] += s (dy B) A. dxa [N, r] is scratch (overwritten).
/// dx.data may be null when nothing below needs the input gradient. dB and dxa = s dy B in one pass
/// over dy (detail::lora_dy_pass; two products in one region at other ranks), then dA and dx
/// (kernels::gemm_chunked). The same bits for any thread count.
template <class T>
void lora_backward(MatrixView<T> dx, MatrixView<T> dA, MatrixView<T> dB, MatrixView<T> dxa, CView<T> dy,
                   CView<T> x, CView<T> xa, CView<T> A, CView<T> B, T s) {
    using P = kernels::GemmProduct<T>;
    using kernels::Op;
    if (detail::lora_dy_pass_rank(B.cols))
        detail::lora_dy_pass<T>({{dB, dxa, dy, xa, B}}, s);
    else
        kernels::gemm_chunked<T>({P{dB, dy, Op::trans, xa, Op::none, s, T(1)}, P{dxa, dy, Op::none, B, Op::none, s}});
    const CView<T> dxa_c = dxa;
    if (dx.data)
        kernels::gemm_chunked<T>({P{dA, dxa_c, Op::trans, x, Op::none, T(1), T(1)},
                                  P{dx, dxa_c, Op::none, A, Op::none, T(1), T(1)}});
    else
        kernels::gemm_chunked<T>(dA, dxa_c, Op::trans, x, Op::none, T(1), T(1));
}

// ---------------------------------------------------------------------------------------------------
// Causal multi-head self-attention on packed q, k, v (the layout of GPT-2's c_attn output).

/// out[B*T, d] = softmax(q k^T / sqrt(hs) + causal mask) v per head, with qkv [B*T, 3d] holding q in
/// columns [0, d), k in [d, 2d), v in [2d, 3d), head h in columns [h*hs, (h+1)*hs) of each.
/// Saves the probabilities probs [B, H, T, T] (zero above the diagonal).
template <class T>
void attention_forward(MatrixView<T> out, T* probs, CView<T> qkv, Index B, Index Tn, Index H) {
    using Mat = EigenRowMajor<T>;
    using Stride = Eigen::OuterStride<>;
    const Index d = out.cols, hs = d / H, C3 = qkv.stride;
    const T scale = T(1) / std::sqrt(T(hs));
#pragma omp parallel for schedule(static) if (detail::worth_threads(B * H * Tn * Tn * hs))
    for (Index bh = 0; bh < B * H; ++bh) {
        const Index b = bh / H, h = bh % H;
        const T* base = qkv.row_ptr(b * Tn) + h * hs;
        Eigen::Map<const Mat, 0, Stride> q(base, Tn, hs, Stride(C3)), k(base + d, Tn, hs, Stride(C3)),
            v(base + 2 * d, Tn, hs, Stride(C3));
        Eigen::Map<Mat> p(probs + bh * Tn * Tn, Tn, Tn);
        p.noalias() = scale * (q * k.transpose());
        for (Index t = 0; t < Tn; ++t) {
            auto row = p.row(t).head(t + 1).array();
            row = detail::exp(row - row.maxCoeff());
            row /= row.sum();
            p.row(t).tail(Tn - t - 1).setZero();
        }
        Eigen::Map<Mat, 0, Stride> o(out.row_ptr(b * Tn) + h * hs, Tn, hs, Stride(out.stride));
        o.noalias() = p.template triangularView<Eigen::Lower>() * v;
    }
}

/// dqkv[B*T, 3d] += gradient of the attention output given dout[B*T, d] and the saved probs.
template <class T>
void attention_backward(MatrixView<T> dqkv, CView<T> dout, CView<T> qkv, const T* probs, Index B,
                        Index Tn, Index H) {
    using Mat = EigenRowMajor<T>;
    using Stride = Eigen::OuterStride<>;
    const Index d = dout.cols, hs = d / H, C3 = qkv.stride;
    const T scale = T(1) / std::sqrt(T(hs));
#pragma omp parallel if (detail::worth_threads(B * H * Tn * Tn * hs))
    {
        Mat dp(Tn, Tn);  // per-thread scratch: gradient w.r.t. the probabilities, then the scores
#pragma omp for schedule(static)
        for (Index bh = 0; bh < B * H; ++bh) {
            const Index b = bh / H, h = bh % H;
            const T* base = qkv.row_ptr(b * Tn) + h * hs;
            T* dbase = dqkv.row_ptr(b * Tn) + h * hs;
            Eigen::Map<const Mat, 0, Stride> q(base, Tn, hs, Stride(C3)), k(base + d, Tn, hs, Stride(C3)),
                v(base + 2 * d, Tn, hs, Stride(C3)), dO(dout.row_ptr(b * Tn) + h * hs, Tn, hs, Stride(dout.stride));
            Eigen::Map<Mat, 0, Stride> dq(dbase, Tn, hs, Stride(dqkv.stride)),
                dk(dbase + d, Tn, hs, Stride(dqkv.stride)), dv(dbase + 2 * d, Tn, hs, Stride(dqkv.stride));
            Eigen::Map<const Mat> p(probs + bh * Tn * Tn, Tn, Tn);
            dv.noalias() += p.transpose() * dO;
            dp.noalias() = dO * v.transpose();
            // softmax backward: ds = p * (dp - sum_j p_j dp_j); p = 0 above the diagonal keeps it causal.
            for (Index t = 0; t < Tn; ++t) {
                const T dot = p.row(t).dot(dp.row(t));
                dp.row(t).array() = p.row(t).array() * (dp.row(t).array() - dot);
            }
            dq.noalias() += scale * (dp * k);
            dk.noalias() += scale * (dp.transpose() * q);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// GELU, tanh approximation (GPT-2's "gelu_new"). 0.5 x (1 + tanh(u)) = x * sigmoid(2u), one exp that Eigen
// vectorises.

namespace detail {
template <class T>
constexpr T gelu_c = T(0.7978845608028654);  // sqrt(2 / pi)
template <class T>
constexpr T gelu_k = T(0.044715);
}  // namespace detail

/// out[N, C] = gelu_tanh(x[N, C]).
template <class T>
void gelu_forward(MatrixView<T> out, CView<T> x) {
    constexpr T c = detail::gelu_c<T>, k = detail::gelu_k<T>;
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        const auto xr = detail::row_array(x.row_ptr(n), x.cols);
        detail::row_array(out.row_ptr(n), x.cols) = xr / (T(1) + detail::exp(T(-2) * c * (xr + k * xr.cube())));
    }
}

/// dx[N, C] += dout * gelu_tanh'(x).
template <class T>
void gelu_backward(MatrixView<T> dx, CView<T> dout, CView<T> x) {
    constexpr T c = detail::gelu_c<T>, k = detail::gelu_k<T>;
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        const auto xr = detail::row_array(x.row_ptr(n), x.cols);
        const detail::RowArray<T> s = T(1) / (T(1) + detail::exp(T(-2) * c * (xr + k * xr.cube())));
        detail::row_array(dx.row_ptr(n), x.cols) +=
            detail::row_array(dout.row_ptr(n), x.cols) *
            (s + T(2) * c * xr * s * (T(1) - s) * (T(1) + T(3) * k * xr.square()));
    }
}

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy over the vocabulary.

/// Returns mean_n (logsumexp(logits[n]) - logits[n, targets[n]]); saves lse[N] = logsumexp per row.
template <class T>
T crossentropy_forward(T* lse, CView<T> logits, const int* targets) {
    double total = 0;
#pragma omp parallel for schedule(static) if (detail::worth_threads(logits.size())) reduction(+ : total)
    for (Index n = 0; n < logits.rows; ++n) {
        const auto l = detail::row_array(logits.row_ptr(n), logits.cols);
        const T m = l.maxCoeff();
        lse[n] = m + std::log(detail::exp(l - m).sum());
        total += double(lse[n] - l(targets[n]));
    }
    return T(total / double(logits.rows));
}

/// dlogits[N, V] += dloss / N * (softmax(logits) - onehot(targets)).
template <class T>
void crossentropy_backward(MatrixView<T> dlogits, CView<T> logits, const T* lse, const int* targets,
                           T dloss) {
    const T w = dloss / T(logits.rows);
#pragma omp parallel for schedule(static) if (detail::worth_threads(logits.size()))
    for (Index n = 0; n < logits.rows; ++n) {
        auto g = detail::row_array(dlogits.row_ptr(n), logits.cols);
        g += w * detail::exp(detail::row_array(logits.row_ptr(n), logits.cols) - lse[n]);
        g(targets[n]) -= w;
    }
}

/// y[N, C] += x[N, C] (residual connection; its backward is the identity). Rows split over the threads.
template <class T>
void residual_forward(MatrixView<T> y, CView<T> x) {
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) detail::row_array(y.row_ptr(n), x.cols) += detail::row_array(x.row_ptr(n), x.cols);
}

/// The residual add and the RMSNorm after it in one pass over the rows: y += x, then out = y * rstd * w
/// (rmsnorm_forward of the new y; rstd [N] saved, may be null). The same bits as residual_forward then
/// rmsnorm_forward (the same per-row operations), one read of y instead of two.
template <class T>
void residual_rmsnorm_forward(MatrixView<T> y, CView<T> x, MatrixView<T> out, T* rstd, const T* w, T eps) {
    const Index d = x.cols;
    const auto W = detail::row_array(w, d);
#pragma omp parallel for schedule(static) if (detail::worth_threads(x.size()))
    for (Index n = 0; n < x.rows; ++n) {
        auto yr = detail::row_array(y.row_ptr(n), d);
        yr += detail::row_array(x.row_ptr(n), d);
        const auto yc = detail::row_array(static_cast<const T*>(y.row_ptr(n)), d);
        const T r = T(1) / std::sqrt(yc.square().mean() + eps);
        if (rstd) rstd[n] = r;
        detail::row_array(out.row_ptr(n), d) = W * (yc * r);
    }
}

/// Every view = 0, in one parallel region (rows split over the threads): gradient buffers of a few MB
/// each, zeroed per layer.
template <class T>
void zero_rows(std::initializer_list<MatrixView<T>> views) {
    Index rows = 0, work = 0;
    for (const auto& v : views) {
        rows += v.rows;
        work += v.size();
    }
#pragma omp parallel for schedule(static) if (detail::worth_threads(work))
    for (Index t = 0; t < rows; ++t) {
        Index i = t;
        for (const auto& v : views) {
            if (i < v.rows) {
                std::fill_n(v.row_ptr(i), v.cols, T(0));
                break;
            }
            i -= v.rows;
        }
    }
}

}  // namespace comigs::models

