#pragma once
// The LM head and softmax cross-entropy in one pass over the vocabulary, in chunks, so that the
// [tokens, vocab] logits never exist (206 MB at 1024 tokens and GPT-2's 50257 tokens; the training
// step kept them and their gradient: 412 MB).
//
// For rows x_n [N, d] of the final hidden states, head weight W [V, d] (row v: token v's output
// embedding; tied heads pass the token embedding) and targets t_n:
//   z_nv = x_n . W_v;   lse_n = log sum_v exp(z_nv);   nll_n = lse_n - z_{n t_n}
//   dnll_n / dx_n = sum_v softmax(z_n)_v W_v - W_{t_n}
// The vocabulary is swept in chunks of C columns with a running maximum m_n and sum s_n of exp(z - m_n)
// (online softmax), and the gradient is accumulated beside them, rescaled whenever m_n grows:
//   acc_n = sum_v exp(z_nv - m_n) W_v,   dx_n += g (acc_n / s_n - W_{t_n})   (g the loss's weight)
// so the head runs as two GEMMs per chunk (Z = X W_c^T, acc += P W_c) and nothing of size [N, V] is
// kept: one [R, C] chunk (R rows at a time) and acc [R, d]. The training forward computes the input
// gradient of the loss at once: the backward then starts from dx, and the head's GEMMs run twice in
// all, as with stored logits.
//
// The chunk products go through the weight's own products (lm_head_cross_entropy_with): for a view,
// kernels::gemm (fp32, double) or, for a weight held in bf16 (float only), the bf16 GEMMs with x and
// the chunk's probabilities rounded to bf16 (accumulation in fp32); hosts pass their frozen linears.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
#include <type_traits>
#include <vector>

#include "../detail/aligned.hpp"
#include "../error.hpp"
#include "../view.hpp"
#include "bf16.hpp"
#include "gemm.hpp"
#include "gemm_bf16.hpp"
#include "elementwise.hpp"

namespace comigs::kernels {

namespace detail {

/// Rows of x taken at a time (tests shrink it to run many blocks and tails).
inline Index& head_block_rows() {
    static Index rows = 1024;
    return rows;
}
/// Elements of one [rows, C] chunk of logits: C = this / rows (at least head_min_chunk_cols). 2^21
/// floats = 8 MB: 2048 columns at 1024 rows, small enough to stay in the last-level cache between
/// the GEMM that writes it, the softmax pass and the GEMM that reads it.
inline Index& head_chunk_elements() {
    static Index elements = Index(1) << 21;
    return elements;
}
inline Index& head_min_chunk_cols() {
    static Index cols = 256;
    return cols;
}

/// Element c of a weight row, widened to float when held in bf16.
template <class W>
auto weight_at(const W* row, Index c) {
    if constexpr (std::is_same_v<W, bf16>)
        return to_float(row[c]);
    else
        return row[c];
}

/// Working memory of one call, kept per thread between calls (a fresh 8 MB chunk every step would be
/// paid again in page faults).
template <class T>
struct HeadLossBuffers {
    comigs::detail::aligned_vector<T> z, acc, m, s, zt;
};
template <class T>
HeadLossBuffers<T>& head_loss_buffers() {
    thread_local HeadLossBuffers<T> b;
    return b;
}

template <class V>
void grow(V& v, Index n) {
    if (static_cast<Index>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
}

/// Whether a head weight takes the chunk's probabilities in bf16 (probabilities(rows, cols) gives the
/// [rows, cols] buffer, accumulate_rounded(acc, v0, add) multiplies it): the softmax pass then rounds
/// each row while it is in cache, instead of the product converting the whole chunk again.
template <class Weight>
concept TakesBf16Probabilities = requires(Weight& w, MatrixView<float> acc) {
    { w.probabilities(Index(1), Index(1)) } -> std::same_as<MatrixView<bf16>>;
    w.accumulate_rounded(acc, Index(0), true);
};

}  // namespace detail

/// The head weight W [V, d] as a view (T, or bf16 when T is float), in the form
/// lm_head_cross_entropy_with reads any head weight:
///   rows()/cols()                     V and d;
///   begin_block(x)                    once per block of rows of x, before its products;
///   logits(Z, x, v0)                  Z [R, C] = x W[v0 .. v0 + C)^T;
///   accumulate(acc, P, v0, add)       acc [R, d] (+)= P [R, C] W[v0 .. v0 + C);
///   row(out, v)                       out[d] = W_v (widened).
/// A bf16 weight takes x and P rounded to bf16 (one conversion of x per block), accumulating in fp32.
template <class T, class W>
class HeadWeightView {
    static_assert(std::is_same_v<W, T> || (std::is_same_v<W, bf16> && std::is_same_v<T, float>),
                  "HeadWeightView: the weight is T, or bf16 with T = float");

public:
    explicit HeadWeightView(ConstMatrixView<W> w) : w_(w) {}
    Index rows() const { return w_.rows; }
    Index cols() const { return w_.cols; }
    void begin_block(ConstMatrixView<T> x) {
        if constexpr (std::is_same_v<W, bf16>) {
            detail::grow(xb_, x.rows * x.cols);
            convert_rows_to_bf16(xb_.data(), x);
            xrows_ = x.rows;
        }
    }
    void logits(MatrixView<T> z, ConstMatrixView<T> x, Index v0) {
        const auto wc = w_.middle_rows(v0, z.cols);
        if constexpr (std::is_same_v<W, bf16>)
            gemm_bf16_from(z, ConstMatrixView<bf16>(xb_.data(), xrows_, x.cols), wc, Op::trans, 1.0f, 0.0f);
        else
            gemm<T>(z, x, Op::none, wc, Op::trans, T(1), T(0));
    }
    void accumulate(MatrixView<T> acc, ConstMatrixView<T> p, Index v0, bool add) {
        const auto wc = w_.middle_rows(v0, p.cols);
        if constexpr (std::is_same_v<W, bf16>)
            gemm_bf16(acc, p, wc, Op::none, 1.0f, add ? 1.0f : 0.0f);
        else
            gemm<T>(acc, p, Op::none, wc, Op::none, T(1), add ? T(1) : T(0));
    }
    void row(T* out, Index v) const {
        const W* src = w_.row_ptr(v);
        for (Index c = 0; c < w_.cols; ++c) out[c] = T(detail::weight_at(src, c));
    }
    /// A bf16 weight: the [rows, cols] buffer the softmax pass writes the chunk's probabilities into,
    /// rounded as gemm_bf16 rounds them (detail::TakesBf16Probabilities), and acc [R, d] (+)= P W_c.
    MatrixView<bf16> probabilities(Index rows, Index cols)
        requires std::is_same_v<W, bf16>
    {
        detail::grow(pb_, rows * cols);
        return pview_ = MatrixView<bf16>(pb_.data(), rows, cols);
    }
    void accumulate_rounded(MatrixView<T> acc, Index v0, bool add)
        requires std::is_same_v<W, bf16>
    {
        gemm_bf16_from(acc, ConstMatrixView<bf16>(pview_), w_.middle_rows(v0, pview_.cols), Op::none, 1.0f,
                       add ? 1.0f : 0.0f);
    }

private:
    ConstMatrixView<W> w_;
    comigs::detail::aligned_vector<bf16> xb_, pb_;
    MatrixView<bf16> pview_{};
    Index xrows_ = 0;
};

/// Mean-free softmax cross-entropy of an LM head given as a head weight (HeadWeightView's interface):
/// returns sum_n nll_n (summed in row order in double). x [N, d], targets [N] in [0, V). Optional
/// outputs: lse [N] and nll [N] (null: not written); when dx is not empty ([N, d]) it ACCUMULATES
/// grad_scale * dnll_n/dx_n into each row (grad_scale = 1/N for the mean loss).
template <class T, class Weight>
double lm_head_cross_entropy_with(MatrixView<T> dx, T* lse, T* nll, std::type_identity_t<ConstMatrixView<T>> x,
                                  Weight& weight, const int* targets, std::type_identity_t<T> grad_scale) {
    const Index N = x.rows, d = x.cols, V = weight.rows();
    require<ShapeError>(weight.cols() == d, "lm head: weight is [", weight.rows(), ", ", weight.cols(),
                        "], its rows must have the hidden size ", d, " of x [", N, ", ", d, "]");
    require(V >= 1, "lm head: the vocabulary (weight rows) is empty");
    const bool grad = !dx.empty();
    if (grad)
        require<ShapeError>(dx.rows == N && dx.cols == d, "lm head: dx is [", dx.rows, ", ", dx.cols,
                            "], expected [", N, ", ", d, "]");
    require(targets != nullptr || N == 0, "lm head: null targets");
    for (Index n = 0; n < N; ++n)
        require(targets[n] >= 0 && targets[n] < V, "lm head: target[", n, "] = ", targets[n], " outside [0, vocab = ",
                V, ")");
    if (N == 0) return 0.0;

    auto& buf = detail::head_loss_buffers<T>();
    const Index R = std::min(N, std::max<Index>(1, detail::head_block_rows()));
    const Index C = std::min(V, std::max(detail::head_min_chunk_cols(), detail::head_chunk_elements() / R));
    detail::grow(buf.z, R * C);
    detail::grow(buf.m, R);
    detail::grow(buf.s, R);
    detail::grow(buf.zt, R);
    if (grad) detail::grow(buf.acc, R * d + d);  // + one row: W_t widened, per row, at the end
    double total = 0.0;
    for (Index r0 = 0; r0 < N; r0 += R) {
        const Index rows = std::min(R, N - r0);
        const ConstMatrixView<T> xr = x.middle_rows(r0, rows);
        const MatrixView<T> acc(buf.acc.data(), grad ? rows : 0, d);
        T *m = buf.m.data(), *s = buf.s.data(), *zt = buf.zt.data();
        std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
        std::fill(s, s + rows, T(0));
        weight.begin_block(xr);
        for (Index v0 = 0; v0 < V; v0 += C) {
            const Index cols = std::min(C, V - v0);
            const MatrixView<T> Z(buf.z.data(), rows, cols);
            weight.logits(Z, xr, v0);
            // Online softmax over this chunk: z -> exp(z - m_new), s and acc rescaled to the new maximum.
            // A weight that takes bf16 probabilities gets each row rounded here, while it is in cache.
            const bool first = v0 == 0;
            MatrixView<bf16> Pb;
            if constexpr (detail::TakesBf16Probabilities<Weight>)
                if (grad) Pb = weight.probabilities(rows, cols);
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
            for (Index r = 0; r < rows; ++r) {
                T* zr = Z.row_ptr(r);
                const Index t = targets[r0 + r];
                if (t >= v0 && t < v0 + cols) zt[r] = zr[t - v0];
                const T mnew = std::max(m[r], max_of(zr, cols));
                const T rescale = first ? T(0) : std::exp(m[r] - mnew);
                s[r] = s[r] * rescale + exp_shifted_sum(zr, cols, mnew);
                m[r] = mnew;
                if constexpr (detail::TakesBf16Probabilities<Weight>)
                    if (Pb.data) convert_to_bf16(Pb.row_ptr(r), zr, cols);
                if (grad && !first && rescale != T(1)) {
                    T* ar = acc.row_ptr(r);
                    for (Index c = 0; c < d; ++c) ar[c] *= rescale;
                }
            }
            if (grad) {
                if constexpr (detail::TakesBf16Probabilities<Weight>)
                    weight.accumulate_rounded(acc, v0, !first);
                else
                    weight.accumulate(acc, ConstMatrixView<T>(Z), v0, !first);
            }
        }
        // Finish the rows: lse, nll, and dx += g (acc / s - W_t).
        T* wt = buf.acc.data() + R * d;
        for (Index r = 0; r < rows; ++r) {
            const T l = m[r] + std::log(s[r]);
            if (lse) lse[r0 + r] = l;
            if (nll) nll[r0 + r] = l - zt[r];
            total += double(l - zt[r]);
            if (!grad) continue;
            weight.row(wt, targets[r0 + r]);
            T* dr = dx.row_ptr(r0 + r);
            const T* ar = acc.row_ptr(r);
            const T a = grad_scale / s[r];
            for (Index c = 0; c < d; ++c) dr[c] += a * ar[c] - grad_scale * wt[c];
        }
    }
    return total;
}

/// lm_head_cross_entropy_with for a head weight held as a view [V, d] (T, or bf16 when T is float).
template <class T, class W>
double lm_head_cross_entropy(MatrixView<T> dx, T* lse, T* nll, std::type_identity_t<ConstMatrixView<T>> x,
                             ConstMatrixView<W> weight, const int* targets, std::type_identity_t<T> grad_scale) {
    HeadWeightView<T, W> w(weight);
    return lm_head_cross_entropy_with<T>(dx, lse, nll, x, w, targets, grad_scale);
}

/// Plain reference of lm_head_cross_entropy: every logit materialised, two passes per row (tests).
template <class T, class W>
double lm_head_cross_entropy_reference(MatrixView<T> dx, T* lse, T* nll, std::type_identity_t<ConstMatrixView<T>> x,
                                       ConstMatrixView<W> weight, const int* targets,
                                       std::type_identity_t<T> grad_scale) {
    const Index N = x.rows, d = x.cols, V = weight.rows;
    require<ShapeError>(weight.cols == d, "lm head: weight columns ", weight.cols, " != hidden size ", d);
    std::vector<T> z(static_cast<std::size_t>(V));
    double total = 0.0;
    for (Index n = 0; n < N; ++n) {
        const Index t = targets[n];
        require(t >= 0 && t < V, "lm head: target[", n, "] = ", t, " outside [0, vocab = ", V, ")");
        T mx = -std::numeric_limits<T>::infinity();
        for (Index v = 0; v < V; ++v) {
            T dot = 0;
            for (Index c = 0; c < d; ++c) dot += x(n, c) * T(detail::weight_at(weight.row_ptr(v), c));
            z[static_cast<std::size_t>(v)] = dot;
            mx = std::max(mx, dot);
        }
        T sum = 0;
        for (Index v = 0; v < V; ++v) sum += std::exp(z[static_cast<std::size_t>(v)] - mx);
        const T l = mx + std::log(sum);
        if (lse) lse[n] = l;
        if (nll) nll[n] = l - z[static_cast<std::size_t>(t)];
        total += double(l - z[static_cast<std::size_t>(t)]);
        if (dx.empty()) continue;
        for (Index v = 0; v < V; ++v) {
            const T g = grad_scale * (std::exp(z[static_cast<std::size_t>(v)] - l) - (v == t ? T(1) : T(0)));
            for (Index c = 0; c < d; ++c) dx(n, c) += g * T(detail::weight_at(weight.row_ptr(v), c));
        }
    }
    return total;
}

}  // namespace comigs::kernels
