#pragma once
// Causal self-attention, flash style: the probabilities of a head are never stored. The forward keeps
// one log-sum-exp per query row and head; the backward recomputes the probabilities of a block of query
// rows from it. Working memory is one block of scores per thread ([block, L]), against [B, H, n, L]
// for the whole batch when the probabilities are kept (48 MB a GPT-2 layer at T = 1024).
//
// Shapes. B sequences; per sequence n query rows at positions L - n .. L - 1 (n = L for a whole
// sequence, n < L when new tokens attend to a KV cache) over L key/value rows at positions 0 .. L - 1.
// Query row i of sequence b is row b*n + i of q and out; key/value row j is row b*L + j of k and v.
// H query heads and KV key/value heads of hd columns each (H a multiple of KV); query head h reads
// key/value head h / (H / KV) (grouped-query attention; KV = H is plain multi-head attention). Head h
// is columns [h hd, (h + 1) hd) of q and out, kv head g columns [g hd, (g + 1) hd) of k and v. Views may
// be strided (q, k, v as column blocks of one packed qkv matrix).
//
// Per query row i, head h, with s = 1 / sqrt(hd) and p = L - n (the cached positions):
//   z_ij = s q_i . k_j,  j <= p + i;   lse_i = log sum_j exp(z_ij);   P_ij = exp(z_ij - lse_i)
//   out_i = sum_j P_ij v_j
// Backward, given dout (D_i = dout_i . out_i):
//   dv_j += sum_i P_ij dout_i;   dP_ij = dout_i . v_j;   dz_ij = P_ij (dP_ij - D_i)
//   dq_i += s sum_j dz_ij k_j;   dk_j += s sum_i dz_ij q_i
// Scores, softmax and sums in T (fp32 for float, as transformers computes them).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../detail/aligned.hpp"
#include "../error.hpp"
#include "../view.hpp"
#include "elementwise.hpp"
#include "gemm.hpp"

namespace comigs::kernels {

/// Shape of a batched causal attention (see the file comment).
struct AttentionShape {
    Index batch = 1;     ///< B sequences
    Index queries = 1;   ///< n query rows per sequence (its last n positions)
    Index keys = 1;      ///< L key/value rows per sequence (positions 0 .. L - 1)
    Index heads = 1;     ///< H query heads
    Index kv_heads = 1;  ///< KV key/value heads (H a multiple of KV)
    Index head_dim = 1;  ///< hd columns per head

    Index group() const { return heads / kv_heads; }
    Index q_width() const { return heads * head_dim; }
    Index kv_width() const { return kv_heads * head_dim; }

    void validate() const {
        require(batch >= 1, "attention batch ", batch, ": must be >= 1");
        require(queries >= 1 && keys >= queries, "attention queries ", queries, ", keys ", keys,
                ": need 1 <= queries <= keys (queries are the last positions of the keys)");
        require(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, "attention heads ", heads, " / kv heads ",
                kv_heads, ": the query heads must be a positive multiple of the key/value heads");
        require(head_dim >= 1, "attention head_dim ", head_dim, ": must be >= 1");
    }
};

namespace detail {

/// Query rows per block (tests shrink it to run many blocks and tails on small inputs).
inline Index& attention_block_rows() {
    static Index rows = 64;
    return rows;
}

/// rows x cols block of a view starting at (row0, col0).
template <class T>
ConstMatrixView<T> attn_view(ConstMatrixView<T> m, Index row0, Index rows, Index col0, Index cols) {
    return {m.row_ptr(row0) + col0, rows, cols, m.stride};
}
template <class T>
MatrixView<T> attn_view(MatrixView<T> m, Index row0, Index rows, Index col0, Index cols) {
    return {m.row_ptr(row0) + col0, rows, cols, m.stride};
}

/// C = alpha op(A) op(B) + beta C on the calling thread: oneDNN's sgemm for float where comigs has it
/// (its small-shape kernels beat Eigen's packing at [64, 64] x [64, 128]), else Eigen.
template <class T>
void attn_product(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T alpha, T beta) {
    gemm_serial<T>(C, A, opa, B, opb, alpha, beta, /*onednn_min=*/0);
}

/// Shape checks shared by forward and backward.
template <class T>
void check_attention_views(const AttentionShape& s, const char* what, ConstMatrixView<T> q, ConstMatrixView<T> k,
                           ConstMatrixView<T> v) {
    s.validate();
    const Index nq = s.batch * s.queries, nk = s.batch * s.keys;
    require<ShapeError>(q.rows == nq && q.cols == s.q_width(), what, ": q is [", q.rows, ", ", q.cols, "], expected [",
                        nq, ", ", s.q_width(), "] (B ", s.batch, " x n ", s.queries, ", ", s.heads, " heads of ",
                        s.head_dim, ")");
    require<ShapeError>(k.rows == nk && k.cols == s.kv_width(), what, ": k is [", k.rows, ", ", k.cols,
                        "], expected [", nk, ", ", s.kv_width(), "] (B ", s.batch, " x L ", s.keys, ", ", s.kv_heads,
                        " kv heads of ", s.head_dim, ")");
    require<ShapeError>(v.rows == nk && v.cols == s.kv_width(), what, ": v is [", v.rows, ", ", v.cols,
                        "], expected [", nk, ", ", s.kv_width(), "]");
}

}  // namespace detail

/// out[B*n, H*hd] = causal attention of q over k, v (file comment); lse[B, H, n] receives the
/// log-sum-exp of each query row's scores (what the backward needs; null in inference).
/// Parallel over (sequence, head, block of query rows); every row is computed the same way whatever
/// the thread count.
template <class T>
void attention_forward(MatrixView<T> out, T* lse, std::type_identity_t<ConstMatrixView<T>> q,
                       std::type_identity_t<ConstMatrixView<T>> k, std::type_identity_t<ConstMatrixView<T>> v,
                       const AttentionShape& s) {
    detail::check_attention_views<T>(s, "attention forward", q, k, v);
    require<ShapeError>(out.rows == q.rows && out.cols == q.cols, "attention forward: out is [", out.rows, ", ",
                        out.cols, "], expected [", q.rows, ", ", q.cols, "]");
    const Index n = s.queries, L = s.keys, H = s.heads, hd = s.head_dim, G = s.group(), past = L - n;
    const Index br = std::max<Index>(1, detail::attention_block_rows());
    const Index blocks = (n + br - 1) / br, tasks = s.batch * H * blocks;
    const T scale = T(1) / std::sqrt(T(hd));
    // Work of the biggest task times the task count: threads only when there is enough of it.
    const bool parallel = tasks > 1 && s.batch * H * n * L * hd >= (Index(1) << 15);
#pragma omp parallel if (parallel)
    {
        comigs::detail::aligned_vector<T> scores;
#pragma omp for schedule(dynamic, 1)
        for (Index task = 0; task < tasks; ++task) {
            const Index blk = task % blocks, bh = task / blocks, b = bh / H, h = bh % H, g = h / G;
            const Index i0 = blk * br, rows = std::min(br, n - i0), kend = past + i0 + rows;
            if (static_cast<Index>(scores.size()) < rows * kend) scores.resize(static_cast<std::size_t>(rows * kend));
            const MatrixView<T> S(scores.data(), rows, kend);
            const auto Q = detail::attn_view(q, b * n + i0, rows, h * hd, hd);
            const auto K = detail::attn_view(k, b * L, kend, g * hd, hd);
            const auto V = detail::attn_view(v, b * L, kend, g * hd, hd);
            detail::attn_product(S, Q, Op::none, K, Op::trans, scale, T(0));
            for (Index r = 0; r < rows; ++r) {
                T* row = scores.data() + r * kend;
                const Index valid = past + i0 + r + 1;
                const T m = max_of(row, valid);
                const T l = exp_shifted_sum(row, valid, m);
                const T inv = T(1) / l;
                for (Index j = 0; j < valid; ++j) row[j] *= inv;
                std::fill(row + valid, row + kend, T(0));
                if (lse) lse[bh * n + i0 + r] = m + std::log(l);
            }
            detail::attn_product(detail::attn_view(out, b * n + i0, rows, h * hd, hd), ConstMatrixView<T>(S), Op::none,
                                 V, Op::none, T(1), T(0));
        }
    }
}

/// Backward of attention_forward: ACCUMULATES into dq [B*n, H*hd] and dk, dv [B*L, KV*hd] given
/// dout [B*n, H*hd], the forward's inputs, its output `out` and its `lse`. Parallel over (sequence,
/// key/value head): the query heads of a group all add into the same dk, dv columns, so one thread
/// owns them, and every sum is taken in the same order whatever the thread count.
template <class T>
void attention_backward(MatrixView<T> dq, MatrixView<T> dk, MatrixView<T> dv,
                        std::type_identity_t<ConstMatrixView<T>> dout, std::type_identity_t<ConstMatrixView<T>> q,
                        std::type_identity_t<ConstMatrixView<T>> k, std::type_identity_t<ConstMatrixView<T>> v,
                        std::type_identity_t<ConstMatrixView<T>> out, const T* lse, const AttentionShape& s) {
    detail::check_attention_views<T>(s, "attention backward", q, k, v);
    const auto same = [](const auto& a, const auto& b) { return a.rows == b.rows && a.cols == b.cols; };
    require<ShapeError>(same(dq, q) && same(dout, q) && same(out, q) && same(dk, k) && same(dv, v),
                        "attention backward: dq [", dq.rows, ", ", dq.cols, "], dout [", dout.rows, ", ", dout.cols,
                        "], out [", out.rows, ", ", out.cols, "] must match q [", q.rows, ", ", q.cols, "]; dk [",
                        dk.rows, ", ", dk.cols, "], dv [", dv.rows, ", ", dv.cols, "] must match k [", k.rows, ", ",
                        k.cols, "]");
    require(lse != nullptr, "attention backward: needs the log-sum-exp rows saved by the forward");
    const Index n = s.queries, L = s.keys, H = s.heads, KV = s.kv_heads, hd = s.head_dim, G = s.group(),
                past = L - n;
    const Index br = std::max<Index>(1, detail::attention_block_rows());
    const Index tasks = s.batch * KV;
    const T scale = T(1) / std::sqrt(T(hd));
    const bool parallel = tasks > 1 && s.batch * H * n * L * hd >= (Index(1) << 14);
#pragma omp parallel if (parallel)
    {
        comigs::detail::aligned_vector<T> pbuf, dpbuf;
        std::vector<T> dsum;
#pragma omp for schedule(dynamic, 1)
        for (Index task = 0; task < tasks; ++task) {
            const Index b = task / KV, g = task % KV;
            for (Index h = g * G; h < (g + 1) * G; ++h) {
                const T* lse_h = lse + (b * H + h) * n;
                for (Index i0 = 0; i0 < n; i0 += br) {
                    const Index rows = std::min(br, n - i0), kend = past + i0 + rows;
                    if (static_cast<Index>(pbuf.size()) < rows * kend) {
                        pbuf.resize(static_cast<std::size_t>(rows * kend));
                        dpbuf.resize(static_cast<std::size_t>(rows * kend));
                    }
                    const MatrixView<T> P(pbuf.data(), rows, kend), dP(dpbuf.data(), rows, kend);
                    const auto Q = detail::attn_view(q, b * n + i0, rows, h * hd, hd);
                    const auto dO = detail::attn_view(dout, b * n + i0, rows, h * hd, hd);
                    const auto O = detail::attn_view(out, b * n + i0, rows, h * hd, hd);
                    const auto K = detail::attn_view(k, b * L, kend, g * hd, hd);
                    const auto V = detail::attn_view(v, b * L, kend, g * hd, hd);
                    // D_i = dout_i . out_i (= sum_j P_ij dP_ij)
                    dsum.resize(static_cast<std::size_t>(rows));
                    for (Index r = 0; r < rows; ++r) {
                        T D = 0;
                        const T *dor = dO.row_ptr(r), *orow = O.row_ptr(r);
                        for (Index c = 0; c < hd; ++c) D += dor[c] * orow[c];
                        dsum[static_cast<std::size_t>(r)] = D;
                    }
                    detail::attn_product(P, Q, Op::none, K, Op::trans, scale, T(0));
                    for (Index r = 0; r < rows; ++r) {
                        T* row = pbuf.data() + r * kend;
                        const Index valid = past + i0 + r + 1;
                        exp_shifted_sum(row, valid, lse_h[i0 + r]);
                        std::fill(row + valid, row + kend, T(0));
                    }
                    const auto dV = detail::attn_view(dv, b * L, kend, g * hd, hd);
                    detail::attn_product(dV, ConstMatrixView<T>(P), Op::trans, dO, Op::none, T(1), T(1));
                    detail::attn_product(dP, dO, Op::none, V, Op::trans, T(1), T(0));
                    // dz = P (dP - D); P = 0 where masked keeps it causal.
                    for (Index r = 0; r < rows; ++r) {
                        T* pr = pbuf.data() + r * kend;
                        const T* dpr = dpbuf.data() + r * kend;
                        const T D = dsum[static_cast<std::size_t>(r)];
                        const Index valid = past + i0 + r + 1;
                        for (Index j = 0; j < valid; ++j) pr[j] *= dpr[j] - D;
                    }
                    detail::attn_product(detail::attn_view(dq, b * n + i0, rows, h * hd, hd), ConstMatrixView<T>(P),
                                         Op::none, K, Op::none, scale, T(1));
                    detail::attn_product(detail::attn_view(dk, b * L, kend, g * hd, hd), ConstMatrixView<T>(P),
                                         Op::trans, Q, Op::none, scale, T(1));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Plain references: the formulas of the file comment as loops, every probability materialised (tests
// only; also the definition the optimised kernels are checked against).

/// Reference of attention_forward (lse may be null).
template <class T>
void attention_forward_reference(MatrixView<T> out, T* lse, std::type_identity_t<ConstMatrixView<T>> q,
                                 std::type_identity_t<ConstMatrixView<T>> k,
                                 std::type_identity_t<ConstMatrixView<T>> v, const AttentionShape& s) {
    detail::check_attention_views<T>(s, "attention forward", q, k, v);
    const Index n = s.queries, L = s.keys, H = s.heads, hd = s.head_dim, G = s.group(), past = L - n;
    const T scale = T(1) / std::sqrt(T(hd));
    std::vector<T> z(static_cast<std::size_t>(L));
    for (Index b = 0; b < s.batch; ++b)
        for (Index h = 0; h < H; ++h)
            for (Index i = 0; i < n; ++i) {
                const T* qi = q.row_ptr(b * n + i) + h * hd;
                const Index valid = past + i + 1;
                T m = -std::numeric_limits<T>::infinity();
                for (Index j = 0; j < valid; ++j) {
                    const T* kj = k.row_ptr(b * L + j) + (h / G) * hd;
                    T dot = 0;
                    for (Index c = 0; c < hd; ++c) dot += qi[c] * kj[c];
                    z[static_cast<std::size_t>(j)] = scale * dot;
                    m = std::max(m, z[static_cast<std::size_t>(j)]);
                }
                T l = 0;
                for (Index j = 0; j < valid; ++j) l += std::exp(z[static_cast<std::size_t>(j)] - m);
                T* o = out.row_ptr(b * n + i) + h * hd;
                std::fill(o, o + hd, T(0));
                for (Index j = 0; j < valid; ++j) {
                    const T p = std::exp(z[static_cast<std::size_t>(j)] - m) / l;
                    const T* vj = v.row_ptr(b * L + j) + (h / G) * hd;
                    for (Index c = 0; c < hd; ++c) o[c] += p * vj[c];
                }
                if (lse) lse[(b * H + h) * n + i] = m + std::log(l);
            }
}

/// Reference of attention_backward (accumulates; recomputes everything from q, k, v).
template <class T>
void attention_backward_reference(MatrixView<T> dq, MatrixView<T> dk, MatrixView<T> dv,
                                  std::type_identity_t<ConstMatrixView<T>> dout,
                                  std::type_identity_t<ConstMatrixView<T>> q, std::type_identity_t<ConstMatrixView<T>> k,
                                  std::type_identity_t<ConstMatrixView<T>> v, const AttentionShape& s) {
    detail::check_attention_views<T>(s, "attention backward", q, k, v);
    const Index n = s.queries, L = s.keys, H = s.heads, hd = s.head_dim, G = s.group(), past = L - n;
    const T scale = T(1) / std::sqrt(T(hd));
    std::vector<T> p(static_cast<std::size_t>(L)), dp(static_cast<std::size_t>(L));
    for (Index b = 0; b < s.batch; ++b)
        for (Index h = 0; h < H; ++h)
            for (Index i = 0; i < n; ++i) {
                const T* qi = q.row_ptr(b * n + i) + h * hd;
                const T* doi = dout.row_ptr(b * n + i) + h * hd;
                const Index valid = past + i + 1, kv = (h / G) * hd;
                T m = -std::numeric_limits<T>::infinity();
                for (Index j = 0; j < valid; ++j) {
                    T dot = 0;
                    for (Index c = 0; c < hd; ++c) dot += qi[c] * k.row_ptr(b * L + j)[kv + c];
                    p[static_cast<std::size_t>(j)] = scale * dot;
                    m = std::max(m, p[static_cast<std::size_t>(j)]);
                }
                T l = 0;
                for (Index j = 0; j < valid; ++j) l += (p[static_cast<std::size_t>(j)] = std::exp(p[static_cast<std::size_t>(j)] - m));
                T D = 0;  // sum_j P_ij dP_ij
                for (Index j = 0; j < valid; ++j) {
                    p[static_cast<std::size_t>(j)] /= l;
                    T dot = 0;
                    for (Index c = 0; c < hd; ++c) dot += doi[c] * v.row_ptr(b * L + j)[kv + c];
                    dp[static_cast<std::size_t>(j)] = dot;
                    D += p[static_cast<std::size_t>(j)] * dot;
                }
                T* dqi = dq.row_ptr(b * n + i) + h * hd;
                for (Index j = 0; j < valid; ++j) {
                    const T pj = p[static_cast<std::size_t>(j)], dz = pj * (dp[static_cast<std::size_t>(j)] - D);
                    const T* kj = k.row_ptr(b * L + j) + kv;
                    T* dkj = dk.row_ptr(b * L + j) + kv;
                    T* dvj = dv.row_ptr(b * L + j) + kv;
                    for (Index c = 0; c < hd; ++c) {
                        dvj[c] += pj * doi[c];
                        dqi[c] += scale * dz * kj[c];
                        dkj[c] += scale * dz * qi[c];
                    }
                }
            }
}

}  // namespace comigs::kernels
