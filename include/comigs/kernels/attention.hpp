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
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/aligned.hpp"
#include "../error.hpp"
#include "../view.hpp"
#include "elementwise.hpp"
#include "gemm.hpp"
#include "simd.hpp"
#include "transpose.hpp"

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

// ---------------------------------------------------------------------------------------------------
// The tiled path (whole sequences and prefills: n >= attention_tiled_min_queries(), hd a multiple of
// the vector width). Per (sequence, head) and chunk of at most attention_chunk_rows() query rows, the
// chunk's [rows, L] score block lives in a per-thread buffer (64 KB at T = 128), and every product is
// one register-blocked micro-kernel, C[R, NV w] = epilogue(sum_k A(r, k) B[k, :]), that skips what the
// causal mask hides: key vectors right of a row block's last visible key (scores), keys a row block
// cannot see (P V, dS K), query rows that cannot see a key block (P^T dO, dS^T Q). The epilogues do the
// elementwise work where the products leave it in registers: the backward's P = exp(z - lse) and
// dS = P (dP - D), the forward's division by the row sums. K and V are packed transposed ([hd, L],
// zero-padded) once per (sequence, kv head) for all G query heads of a group (GQA without copies of q);
// the B operands are copied to contiguous rows. Softmax and its statistics stay in T; the backward
// recomputes P from the forward's lse. Each head is computed by one thread in a fixed order: the same
// bits for any thread count.
namespace detail {

/// The tiled path runs for at least this many query rows per sequence (packing K^T costs a product's
/// worth for one row; decode keeps the blocked path). Tests lower it to 1 to run the tiled tails.
inline Index& attention_tiled_min_queries() {
    static Index rows = 16;
    return rows;
}
/// Query rows per score buffer of the tiled path ([rows, L] scores; 64 KB at T = 128, one chunk per head
/// at the training shapes). Tests shrink it to run chunk tails.
inline Index& attention_chunk_rows() {
    static Index rows = 128;
    return rows;
}

template <class T>
bool attention_tiled(const AttentionShape& s) {
    return s.head_dim % static_cast<Index>(simd::width<T>) == 0 && s.queries >= attention_tiled_min_queries();
}

/// Micro-kernel: acc[r, :] = sum over k < kc of A(r, k) B[k, :] for r < R and NV vectors of columns,
/// A(r, k) = a[r rs + k cs], B's rows ldb apart (kc may be 0); then store(p, acc, row0 + r, col0 + v w)
/// for each vector, p = c + r ldc + v w: the store is the product's epilogue (scale, accumulate, exp).
template <class T, int R, int NV, class Store>
inline void attn_tile(T* c, Index ldc, const T* a, Index rs, Index cs, const T* b, Index ldb, Index kc,
                      const Store& store, Index row0, Index col0) {
    using V = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    V acc[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = V(T(0));
    for (Index k = 0; k < kc; ++k, a += cs, b += ldb) {
        V bv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) bv[v] = simd::load(b + v * w);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const V ar(a[r * rs]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[r][v] = xsimd::fma(ar, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) store(c + r * ldc + v * w, acc[r][v], row0 + r, col0 + v * w);
}

template <class T, int R, int NV, class Store>
inline void attn_tile_nv(int nv, T* c, Index ldc, const T* a, Index rs, Index cs, const T* b, Index ldb, Index kc,
                         const Store& store, Index row0, Index col0) {
    if constexpr (NV > 1) {
        if (nv < NV) return attn_tile_nv<T, R, NV - 1>(nv, c, ldc, a, rs, cs, b, ldb, kc, store, row0, col0);
    }
    attn_tile<T, R, NV>(c, ldc, a, rs, cs, b, ldb, kc, store, row0, col0);
}

template <class T, int R, int NV, class Store>
inline void attn_tile_rows(int rows, int nv, T* c, Index ldc, const T* a, Index rs, Index cs, const T* b, Index ldb,
                           Index kc, const Store& store, Index row0, Index col0) {
    if constexpr (R > 1) {
        if (rows < R) return attn_tile_rows<T, R - 1, NV>(rows, nv, c, ldc, a, rs, cs, b, ldb, kc, store, row0, col0);
    }
    attn_tile_nv<T, R, NV>(nv, c, ldc, a, rs, cs, b, ldb, kc, store, row0, col0);
}

/// C[m, cols(r0, rows)] = store(A B) by row blocks of R rows and column tiles of NV vectors: row block
/// [r0, r0 + rows) takes k in krange(r0, rows) = {k0, k1} and columns [0, cols(r0, rows)) (a multiple of
/// the vector width). A(r, k) = a[r rs + k cs]; B row k at b + k ldb. Row blocks with no k are skipped
/// when the store accumulates (else stored from zeros).
template <class T, int R, int NV, class KRange, class Cols, class Store>
void attn_rows(T* c, Index ldc, Index m, const T* a, Index rs, Index cs, const T* b, Index ldb, KRange krange,
               Cols cols, const Store& store, bool accumulates) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    for (Index r0 = 0; r0 < m; r0 += R) {
        const Index rows = std::min<Index>(R, m - r0), ncols = cols(r0, rows);
        const auto [k0, k1] = krange(r0, rows);
        if (k1 <= k0 && accumulates) continue;
        for (Index c0 = 0; c0 < ncols; c0 += NV * w) {
            const int nv = static_cast<int>(std::min<Index>(NV, (ncols - c0) / w));
            attn_tile_rows<T, R, NV>(static_cast<int>(rows), nv, c + r0 * ldc + c0, ldc, a + r0 * rs + k0 * cs, rs,
                                     cs, b + k0 * ldb + c0, ldb, std::max<Index>(k1 - k0, 0), store, r0, c0);
        }
    }
}

/// Epilogues. p = alpha acc.
template <class T>
struct AttnScaled {
    T alpha;
    void operator()(T* p, const simd::batch<T>& acc, Index, Index) const { simd::store(p, acc * simd::batch<T>(alpha)); }
};
/// p += alpha acc.
template <class T>
struct AttnAccumulate {
    T alpha;
    void operator()(T* p, const simd::batch<T>& acc, Index, Index) const {
        simd::store(p, simd::batch<T>(xsimd::fma(simd::batch<T>(alpha), acc, simd::load(p))));
    }
};
/// p = acc scale[row] (the forward's P V with unnormalised P: 1 / sum exp per row).
template <class T>
struct AttnRowScaled {
    const T* scale;
    void operator()(T* p, const simd::batch<T>& acc, Index row, Index) const {
        simd::store(p, acc * simd::batch<T>(scale[row]));
    }
};
/// Lanes at columns >= valid set to zero.
template <class T>
simd::batch<T> attn_mask_from(const simd::batch<T>& x, Index col, Index valid) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    if (col + w <= valid) return x;
    if (col >= valid) return simd::batch<T>(T(0));
    alignas(64) T lane[simd::width<T>];
    for (Index i = 0; i < w; ++i) lane[i] = T(i);
    return xsimd::select(simd::load(static_cast<const T*>(lane)) < simd::batch<T>(T(valid - col)), x,
                         simd::batch<T>(T(0)));
}
/// The backward's probabilities: p = exp(scale acc - lse[row]) where row (position first + row) sees
/// the column, else 0.
template <class T>
struct AttnProbs {
    T scale;
    const T* lse;
    Index first;
    void operator()(T* p, const simd::batch<T>& acc, Index row, Index col) const {
        using V = simd::batch<T>;
        const V e = simd::exp(V(xsimd::fma(acc, V(scale), V(-lse[row]))));
        simd::store(p, attn_mask_from(e, col, first + row + 1));
    }
};
/// dS = P (acc - D[row]) with acc = dO V^T, P at the same place of the probabilities' buffer (zero where
/// masked, so dS is too).
template <class T>
struct AttnSoftmaxGrad {
    std::ptrdiff_t to_probs;  // P's place minus dS's, in elements of the one buffer holding both
    const T* D;
    void operator()(T* p, const simd::batch<T>& acc, Index row, Index) const {
        using V = simd::batch<T>;
        simd::store(p, simd::load(p + to_probs) * (acc - V(D[row])));
    }
};

// Blocking: every product in 6 x 64 tiles (fp32 AVX-512: 24 accumulators, 10 loads per 24 FMAs). The
// score-like products (N = keys) end each row block at its last visible key rounded to one vector;
// 12 x 32 score tiles measured 3% slower at T = 128.
inline constexpr int attn_score_rows = 6, attn_score_vectors = 4, attn_hd_rows = 6, attn_hd_vectors = 4;

template <class T>
Index attn_padded_keys(Index L) {
    const Index t = attn_score_vectors * static_cast<Index>(simd::width<T>);
    return (L + t - 1) / t * t;
}

/// dst[hd, Lp] = src rows [L, hd] transposed (zeros in columns L .. Lp).
template <class T>
void attn_pack_transposed(T* dst, Index Lp, ConstMatrixView<T> src) {
    for (Index d = 0; d < src.cols; ++d) std::fill(dst + d * Lp + src.rows, dst + (d + 1) * Lp, T(0));
    transpose_into(dst, Lp, src);
}

/// dst [rows, cols] contiguous = src (the products' B operands: rows of q, k, v or dout are thousands of
/// bytes apart in the packed activations, and at GPT-2's stride (9216 B) 128 of them share a quarter of
/// the L1's sets).
template <class T>
ConstMatrixView<T> attn_pack_rows(T* dst, ConstMatrixView<T> src) {
    for (Index r = 0; r < src.rows; ++r) std::copy(src.row_ptr(r), src.row_ptr(r) + src.cols, dst + r * src.cols);
    return {dst, src.rows, src.cols, src.cols};
}

/// S[rows, Lp] = store(Q K^T) for query rows at positions first .. first + rows - 1: their visible keys
/// and the rest of the last vector (Kt packed [hd, Lp]).
template <class T, class Store>
void attn_scores(T* S, Index Lp, ConstMatrixView<T> Q, const T* Kt, Index first, const Store& store) {
    // Columns up to the block's last visible key rounded to one vector (the diagonal tile narrower).
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index hd = Q.cols;
    attn_rows<T, attn_score_rows, attn_score_vectors>(
        S, Lp, Q.rows, Q.data, Q.stride, 1, Kt, Lp, [hd](Index, Index) { return std::pair<Index, Index>{0, hd}; },
        [first](Index r0, Index rows) { return (first + r0 + rows + w - 1) / w * w; }, store, false);
}

/// out[rows, hd] = store(P X) for P's rows [rows, Lp] at positions first .. (each sees keys 0 .. its
/// position) and X [L, hd] (V, or K for dQ).
template <class T, class Store>
void attn_rows_times_keys(MatrixView<T> out, const T* P, Index Lp, Index first, ConstMatrixView<T> X,
                          const Store& store, bool accumulates) {
    const Index hd = out.cols;
    attn_rows<T, attn_hd_rows, attn_hd_vectors>(
        out.data, out.stride, out.rows, P, Lp, 1, X.data, X.stride,
        [first](Index r0, Index rows) { return std::pair<Index, Index>{0, first + r0 + rows}; },
        [hd](Index, Index) { return hd; }, store, accumulates);
}

/// dX[0 .. kend, hd] += alpha P^T Y for P's rows [rows, Lp] at positions first .. first + rows - 1
/// (query row i sees key j when j <= first + i; P zero where it does not) and Y [rows, hd] (dO, or Q
/// for dK).
template <class T>
void attn_keys_times_rows(MatrixView<T> dX, const T* P, Index Lp, Index first, ConstMatrixView<T> Y, T alpha) {
    const Index hd = dX.cols, rows = Y.rows;
    attn_rows<T, attn_hd_rows, attn_hd_vectors>(
        dX.data, dX.stride, dX.rows, P, 1, Lp, Y.data, Y.stride,
        [first, rows](Index j0, Index) { return std::pair<Index, Index>{std::clamp<Index>(j0 - first, 0, rows), rows}; },
        [hd](Index, Index) { return hd; }, AttnAccumulate<T>{alpha}, true);
}

/// Tiled forward (see attention_forward).
template <class T>
void attention_forward_tiled(MatrixView<T> out, T* lse, ConstMatrixView<T> q, ConstMatrixView<T> k,
                             ConstMatrixView<T> v, const AttentionShape& s) {
    const Index n = s.queries, L = s.keys, H = s.heads, hd = s.head_dim, G = s.group(), past = L - n;
    const Index chunk = std::max<Index>(1, attention_chunk_rows()), Lp = attn_padded_keys<T>(L);
    const Index tasks = s.batch * H;
    const T scale = T(1) / std::sqrt(T(hd));
    const bool parallel = tasks > 1 && s.batch * H * n * L * hd >= (Index(1) << 15);
#pragma omp parallel if (parallel)
    {
        comigs::detail::aligned_vector<T> kt(static_cast<std::size_t>(hd * Lp)), vr(static_cast<std::size_t>(L * hd)),
            scores(static_cast<std::size_t>(std::min(chunk, n) * Lp));
        std::vector<T> inv_sum(static_cast<std::size_t>(std::min(chunk, n)));
        Index packed = -1;  // the (sequence, kv head) in kt, vr
        ConstMatrixView<T> V;
#pragma omp for schedule(static)
        for (Index bh = 0; bh < tasks; ++bh) {
            const Index b = bh / H, h = bh % H, g = h / G;
            if (packed != b * s.kv_heads + g) {
                attn_pack_transposed(kt.data(), Lp, attn_view(k, b * L, L, g * hd, hd));
                V = attn_pack_rows(vr.data(), attn_view(v, b * L, L, g * hd, hd));
                packed = b * s.kv_heads + g;
            }
            for (Index c0 = 0; c0 < n; c0 += chunk) {
                const Index rows = std::min(chunk, n - c0), first = past + c0, kend = first + rows;
                T* S = scores.data();
                attn_scores<T>(S, Lp, attn_view(q, b * n + c0, rows, h * hd, hd), kt.data(), first,
                               AttnScaled<T>{scale});
                // exp(z - max) in place; out = (exp V) / sum exp, the division in P V's epilogue.
                for (Index r = 0; r < rows; ++r) {
                    T* row = S + r * Lp;
                    const Index valid = first + r + 1;
                    const T m = max_of(row, valid);
                    const T l = exp_shifted_sum(row, valid, m);
                    inv_sum[static_cast<std::size_t>(r)] = T(1) / l;
                    std::fill(row + valid, row + kend, T(0));
                    if (lse) lse[bh * n + c0 + r] = m + std::log(l);
                }
                attn_rows_times_keys<T>(attn_view(out, b * n + c0, rows, h * hd, hd), S, Lp, first, V,
                                        AttnRowScaled<T>{inv_sum.data()}, false);
            }
        }
    }
}

/// Tiled backward (see attention_backward).
template <class T>
void attention_backward_tiled(MatrixView<T> dq, MatrixView<T> dk, MatrixView<T> dv, ConstMatrixView<T> dout,
                              ConstMatrixView<T> q, ConstMatrixView<T> k, ConstMatrixView<T> v, ConstMatrixView<T> out,
                              const T* lse, const AttentionShape& s) {
    const Index n = s.queries, L = s.keys, H = s.heads, KV = s.kv_heads, hd = s.head_dim, G = s.group(),
                past = L - n;
    const Index chunk = std::max<Index>(1, attention_chunk_rows()), Lp = attn_padded_keys<T>(L);
    const Index tasks = s.batch * KV;
    const T scale = T(1) / std::sqrt(T(hd));
    const bool parallel = tasks > 1 && s.batch * H * n * L * hd >= (Index(1) << 14);
#pragma omp parallel if (parallel)
    {
        const auto buf = static_cast<std::size_t>(std::min(chunk, n) * Lp);
        const auto rows_buf = static_cast<std::size_t>(std::min(chunk, n) * hd);
        comigs::detail::aligned_vector<T> kt(static_cast<std::size_t>(hd * Lp)), vt(kt.size()), pds(2 * buf),
            kr(static_cast<std::size_t>(L * hd)), qc(rows_buf), doc(rows_buf);
        std::vector<T> dsum(static_cast<std::size_t>(std::min(chunk, n)));
        constexpr Index w = static_cast<Index>(simd::width<T>);
#pragma omp for schedule(dynamic, 1)
        for (Index task = 0; task < tasks; ++task) {
            const Index b = task / KV, g = task % KV;
            attn_pack_transposed(kt.data(), Lp, attn_view(k, b * L, L, g * hd, hd));
            const auto K = attn_pack_rows(kr.data(), attn_view(k, b * L, L, g * hd, hd));
            attn_pack_transposed(vt.data(), Lp, attn_view(v, b * L, L, g * hd, hd));
            for (Index h = g * G; h < (g + 1) * G; ++h) {
                const T* lse_h = lse + (b * H + h) * n;
                for (Index c0 = 0; c0 < n; c0 += chunk) {
                    const Index rows = std::min(chunk, n - c0), first = past + c0, kend = first + rows;
                    const auto Q = attn_pack_rows(qc.data(), attn_view(q, b * n + c0, rows, h * hd, hd));
                    const auto dO = attn_pack_rows(doc.data(), attn_view(dout, b * n + c0, rows, h * hd, hd));
                    const auto O = attn_view(out, b * n + c0, rows, h * hd, hd);
                    T *P = pds.data(), *dS = P + buf;  // one buffer: the epilogue of dS reads P at a fixed offset
                    for (Index r = 0; r < rows; ++r)  // D_i = dout_i . out_i (= sum_j P_ij dP_ij)
                        dsum[static_cast<std::size_t>(r)] = dot(dO.row_ptr(r), O.row_ptr(r), hd);
                    // P = exp(z - lse) and dS = P (dO V^T - D) in the products' epilogues, zero where masked;
                    // zeros after each row's last computed vector up to kend (the dV, dK products read them).
                    attn_scores<T>(P, Lp, Q, kt.data(), first, AttnProbs<T>{scale, lse_h + c0, first});
                    attn_scores<T>(dS, Lp, dO, vt.data(), first, AttnSoftmaxGrad<T>{-static_cast<std::ptrdiff_t>(buf), dsum.data()});
                    for (Index r = 0; r < rows; ++r) {
                        const Index computed = std::min(kend, (first + r + w) / w * w);
                        std::fill(P + r * Lp + computed, P + r * Lp + kend, T(0));
                        std::fill(dS + r * Lp + computed, dS + r * Lp + kend, T(0));
                    }
                    attn_keys_times_rows<T>(attn_view(dv, b * L, kend, g * hd, hd), P, Lp, first, dO, T(1));
                    attn_keys_times_rows<T>(attn_view(dk, b * L, kend, g * hd, hd), dS, Lp, first, Q, scale);
                    attn_rows_times_keys<T>(attn_view(dq, b * n + c0, rows, h * hd, hd), dS, Lp, first, K,
                                            AttnAccumulate<T>{scale}, true);
                }
            }
        }
    }
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
    if (detail::attention_tiled<T>(s)) return detail::attention_forward_tiled<T>(out, lse, q, k, v, s);
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
    if (detail::attention_tiled<T>(s)) return detail::attention_backward_tiled<T>(dq, dk, dv, dout, q, k, v, out, lse, s);
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
