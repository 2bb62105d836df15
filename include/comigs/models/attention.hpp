#pragma once
// Causal self-attention with grouped-query heads (GQA), per head, over row-major views (llm.c
// convention: outputs first, backward ACCUMULATES into the gradients it is given).
//
// For B sequences, query rows b*n + i (i < n) are the positions L - n + i of a sequence whose keys and
// values for positions 0..L-1 are rows b*L + j of k and v: n = L when the whole sequence is computed at
// once (training, evaluation), n < L when new tokens attend to a KV cache (generation). Query head h
// reads key/value head h / (H / KV) (H = KV: plain multi-head attention, GPT-2). Per query row i:
//   p_ij = softmax_j(scale q_i . k_j),  j <= L - n + i,     out_i = sum_j p_ij v_j
// with q_i, k_j, v_j the head's hd columns. Scores and softmax in T (fp32 for float, as transformers).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <comigs/error.hpp>
#include <comigs/view.hpp>

namespace comigs::models {

/// Head layout of an attention layer: H query heads, KV key/value heads (H divisible by KV), head size hd.
struct AttentionHeads {
    Index heads = 1;
    Index kv_heads = 1;
    Index head_dim = 1;

    Index group() const { return heads / kv_heads; }
    void validate() const {
        require(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, "attention heads ", heads, " / kv heads ",
                kv_heads, ": the query heads must be a positive multiple of the key/value heads");
        require(head_dim >= 1, "head_dim ", head_dim, ": must be >= 1");
    }
};

namespace detail {
template <class T>
using AttnMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using AttnStridedMap = Eigen::Map<AttnMat<T>, 0, Eigen::OuterStride<>>;
template <class T>
using AttnConstStridedMap = Eigen::Map<const AttnMat<T>, 0, Eigen::OuterStride<>>;

template <class T>
AttnConstStridedMap<T> head_block(ConstMatrixView<T> m, Index row0, Index rows, Index col0, Index cols) {
    return {m.row_ptr(row0) + col0, rows, cols, Eigen::OuterStride<>(m.stride)};
}
template <class T>
AttnStridedMap<T> head_block_mut(MatrixView<T> m, Index row0, Index rows, Index col0, Index cols) {
    return {m.row_ptr(row0) + col0, rows, cols, Eigen::OuterStride<>(m.stride)};
}
/// exp on a row: std::exp per element for double (GCC 12's AVX-512 exp path warns; see models/layers.hpp).
template <class Row>
void softmax_row_inplace(Row&& row) {
    using S = typename std::decay_t<Row>::Scalar;
    const S m = row.maxCoeff();
    if constexpr (std::is_same_v<S, float>)
        row = (row.array() - m).exp().matrix();
    else
        row = row.unaryExpr([m](S v) { return std::exp(v - m); });
    row /= row.sum();
}
}  // namespace detail

/// out[B*n, H*hd] = causal attention (file comment) of q[B*n, H*hd] over k, v [B*L, KV*hd].
/// When `probs` is given it receives the probabilities, [B, H, n, L] (zero where masked), for backward.
template <class T>
void causal_attention_forward(MatrixView<T> out, T* probs, std::type_identity_t<ConstMatrixView<T>> q,
                              std::type_identity_t<ConstMatrixView<T>> k, std::type_identity_t<ConstMatrixView<T>> v,
                       Index B, Index n, Index L, const AttentionHeads& a) {
    const Index H = a.heads, hd = a.head_dim, G = a.group();
    require<ShapeError>(n >= 1 && L >= n && q.rows == B * n && out.rows == B * n && k.rows == B * L && v.rows == B * L &&
                            q.cols == H * hd && out.cols == H * hd && k.cols == a.kv_heads * hd && v.cols == k.cols,
                        "attention: q [", q.rows, ", ", q.cols, "], k [", k.rows, ", ", k.cols, "], v [", v.rows, ", ",
                        v.cols, "], out [", out.rows, ", ", out.cols, "] for B ", B, ", n ", n, ", L ", L, ", ", H,
                        " heads of ", hd, " over ", a.kv_heads);
    const T scale = T(1) / std::sqrt(T(hd));
    const Index past = L - n;
#pragma omp parallel if (B * H * n * L * hd >= (Index(1) << 16))
    {
        detail::AttnMat<T> scratch;
#pragma omp for schedule(static)
        for (Index bh = 0; bh < B * H; ++bh) {
            const Index b = bh / H, h = bh % H, kvh = h / G;
            const auto Q = detail::head_block(ConstMatrixView<T>(q), b * n, n, h * hd, hd);
            const auto K = detail::head_block(k, b * L, L, kvh * hd, hd);
            const auto V = detail::head_block(v, b * L, L, kvh * hd, hd);
            T* p_data = probs ? probs + bh * n * L : nullptr;
            if (!p_data) {
                scratch.resize(n, L);
                p_data = scratch.data();
            }
            Eigen::Map<detail::AttnMat<T>> P(p_data, n, L);
            P.noalias() = scale * (Q * K.transpose());
            for (Index i = 0; i < n; ++i) {
                const Index valid = past + i + 1;
                detail::softmax_row_inplace(P.row(i).head(valid));
                P.row(i).tail(L - valid).setZero();
            }
            auto O = detail::head_block_mut(out, b * n, n, h * hd, hd);
            O.noalias() = P * V;
        }
    }
}

/// Backward of causal_attention_forward for n = L (whole sequences): ACCUMULATES into dq [B*n, H*hd] and
/// dk, dv [B*n, KV*hd] given dout and the saved probs. Parallel over (sequence, key/value head): the
/// query heads of a group all add into the same dk, dv columns, so one thread owns them.
template <class T>
void causal_attention_backward(MatrixView<T> dq, MatrixView<T> dk, MatrixView<T> dv,
                               std::type_identity_t<ConstMatrixView<T>> dout, std::type_identity_t<ConstMatrixView<T>> q,
                               std::type_identity_t<ConstMatrixView<T>> k, std::type_identity_t<ConstMatrixView<T>> v,
                               const T* probs, Index B,
                        Index n, const AttentionHeads& a) {
    const Index H = a.heads, KV = a.kv_heads, hd = a.head_dim, G = a.group();
    require<ShapeError>(dq.rows == B * n && dk.rows == B * n && dv.rows == B * n && dout.rows == B * n &&
                            dq.cols == H * hd && dk.cols == KV * hd && dv.cols == KV * hd,
                        "attention backward: dq [", dq.rows, ", ", dq.cols, "], dk [", dk.rows, ", ", dk.cols, "], dv [",
                        dv.rows, ", ", dv.cols, "] for B ", B, ", n ", n);
    require(probs != nullptr, "attention backward: needs the probabilities saved by the forward");
    const T scale = T(1) / std::sqrt(T(hd));
#pragma omp parallel if (B * H * n * n * hd >= (Index(1) << 16))
    {
        detail::AttnMat<T> dp(n, n);
#pragma omp for schedule(static)
        for (Index bk = 0; bk < B * KV; ++bk) {
            const Index b = bk / KV, kvh = bk % KV;
            const auto K = detail::head_block(k, b * n, n, kvh * hd, hd);
            const auto V = detail::head_block(v, b * n, n, kvh * hd, hd);
            auto dK = detail::head_block_mut(dk, b * n, n, kvh * hd, hd);
            auto dV = detail::head_block_mut(dv, b * n, n, kvh * hd, hd);
            for (Index h = kvh * G; h < (kvh + 1) * G; ++h) {
                const auto Q = detail::head_block(q, b * n, n, h * hd, hd);
                const auto dO = detail::head_block(dout, b * n, n, h * hd, hd);
                auto dQ = detail::head_block_mut(dq, b * n, n, h * hd, hd);
                const Eigen::Map<const detail::AttnMat<T>> P(probs + (b * H + h) * n * n, n, n);
                dV.noalias() += P.transpose() * dO;
                dp.noalias() = dO * V.transpose();
                // softmax backward: ds = p (dp - sum_j p_j dp_j); p = 0 where masked keeps it causal.
                for (Index i = 0; i < n; ++i) {
                    const T dot = P.row(i).dot(dp.row(i));
                    dp.row(i).array() = P.row(i).array() * (dp.row(i).array() - dot);
                }
                dQ.noalias() += scale * (dp * K);
                dK.noalias() += scale * (dp.transpose() * Q);
            }
        }
    }
}

}  // namespace comigs::models
