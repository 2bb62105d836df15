#pragma once
// One-pass kernels for the routed rows of the GELU and SwiGLU mixtures (rank r <= 8, no dropout).
//
// Work is split over the hidden size: it is cut into fixed groups of columns (mix_group_cols), each
// thread starts on a contiguous range of groups (GroupQueue: a thread done early takes the others'
// last groups), and inside a group it walks the tokens
// a block at a time (mix_token_block), expert by expert. So:
//   - an expert's factor columns for the group (B1^T and A2: 2 r rows, packed contiguously) stay in
//     L1 while that expert's rows of the block go through, instead of being streamed from L2 per row;
//   - the LoRA gradients dA2 and dB1 accumulate in the owner thread inside the same pass, so neither
//     the activations u nor their gradients dp are ever written to memory (u is recomputed from the
//     pre-activation in backward);
//   - the per-row reductions over the hidden size (z2 = A2 u, dz = B1^T dp, u . dm) are summed per
//     group, and the group sums are added in group order afterwards.
// One implementation serves both MLPs: the row kernels and their drivers take the activation as a
// template parameter (GeluAct: one first linear, a = gelu(p); SwigluAct: gate and up, a = silu(pg) pu),
// and hold per first linear f its pre-activation, rank-r update, dH output and dB_f accumulator.
// The group grid depends on the shapes alone, so every result is the same for any thread count. The
// mixture falls back to the separate kernels (lowrank.hpp, elementwise.hpp) when these do not apply;
// both give the same values up to rounding.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../detail/aligned.hpp"
#include "../view.hpp"
#include "bf16.hpp"
#include "elementwise.hpp"
#include "lowrank.hpp"
#include "simd.hpp"

namespace comigs::kernels {

/// Largest rank the fused kernels take.
inline constexpr Index fused_max_rank = 8;

namespace detail {

/// Test and benchmark switch: false makes the mixture take the separate kernels instead.
inline bool& fused_rows_enabled() {
    static bool on = true;
    return on;
}
/// Hidden-size columns per group of the fused passes: the unit of work a thread owns and of the
/// per-row partial sums. Any value >= 1 works (tests shrink it to get many groups and tails).
inline Index& mix_group_cols() {
    static Index cols = 256;
    return cols;
}
/// Tokens per block: the rows of a block are taken expert by expert.
inline Index& mix_token_block() {
    static Index tb = 64;
    return tb;
}
/// Below this many routed-row elements (rows x hidden) the fused passes run on the calling thread.
inline Index& mix_parallel_min() {
    static Index m = 32768;
    return m;
}

template <class T>
inline T gelu_sigmoid_scalar(T x, T* oms = nullptr) {
    const T two_a = x * (T(2) * GeluConst<T>::c * GeluConst<T>::a * x * x + T(2) * GeluConst<T>::c);
    const T e = std::exp(-two_a), s = T(1) / (T(1) + e);
    if (oms) *oms = s < T(0.5) ? T(1) - s : e * s;  // e may be inf where s = 0
    return s;
}
/// s = sigmoid(2a(x)) (gelu(x) = x s) and 1 - s, the latter without cancellation.
template <class B, class T = typename B::value_type>
inline B gelu_sigmoid(const B& x, B* oms = nullptr) {
    if constexpr (std::is_same_v<T, float>) {
        // sigmoid(2a) = 1 / (1 + 2^t), t = -2a / ln 2: the 1 / ln 2 folded into a's coefficients.
        constexpr double k = -2.0 * GeluConst<double>::c * 1.4426950408889634;
        const B t = x * simd::fma(B(static_cast<T>(k * GeluConst<double>::a)), x * x, B(static_cast<T>(k)));
        B s, c;
        simd::sigmoid_pow2(t, s, c);  // a few ulp; the exact division costs more than the rest
        if (oms) *oms = c;
        return s;
    } else {
        const B two_a = x * simd::fma(B(T(2) * GeluConst<T>::c * GeluConst<T>::a), x * x, B(T(2) * GeluConst<T>::c));
        const B e = simd::exp(-two_a), s = B(T(1)) / (B(T(1)) + e);
        if (oms) *oms = simd::select(s < B(T(0.5)), B(T(1)) - s, e * s);  // e may be inf where s = 0
        return s;
    }
}
/// gelu'(x) from x, s = sigmoid(2a(x)) and oms = 1 - s: s + x s (1 - s) 2a'(x).
template <class B, class T = typename B::value_type>
inline B gelu_grad_from(const B& x, const B& s, const B& oms) {
    const B two_da = simd::fma(B(T(6) * GeluConst<T>::c * GeluConst<T>::a), x * x, B(T(2) * GeluConst<T>::c));
    return simd::fma(x * s * oms, two_da, s);
}
template <class T>
inline T gelu_grad_from_scalar(T x, T s, T oms) {
    const T two_da = T(6) * GeluConst<T>::c * GeluConst<T>::a * x * x + T(2) * GeluConst<T>::c;
    return x * s * oms * two_da + s;
}

/// Contiguous range [lo, hi) of `count` items for the calling thread (all of it outside a parallel region).
inline void thread_range(Index count, Index& lo, Index& hi) {
#ifdef _OPENMP
    const Index tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const Index tid = 0, nth = 1;
#endif
    lo = count * tid / nth;
    hi = count * (tid + 1) / nth;
}

/// Asks for the cache line holding p in L2, for a read a little later. The row kernels issue one
/// per batch of their activation sweep (GELU or SwiGLU) for the rows they visit next: spread out
/// like that, the next rows arrive while the arithmetic runs. (The whole next row at once, 16-32
/// prefetches in a burst, took every L1 miss buffer and stalled the core until memory answered: the
/// passes then ran at the speed of memory plus the speed of the arithmetic instead of the slower of
/// the two.)
template <class T>
inline void prefetch_line(const T* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 2);
#else
    (void)p;
#endif
}

/// The factor rows the kernels run with: the rank padded to 4 or 8 (zero rows and coefficients add
/// exactly nothing), so that two instantiations serve every rank.
inline constexpr int padded_rank(Index r) { return r <= 4 ? 4 : 8; }

/// Columns [c0, c0 + nc) of the r rows of each expert's [r, h] factor (row stride h) packed into
/// dst[e][q][0 .. nc), q < Q (rows r .. Q zero), rows ld apart: contiguous, so that the rows share no
/// L1 sets (rows h apart would, for h a multiple of 1024).
template <int Q, class T>
inline void pack_factor_cols(T* dst, const T* const* src, Index experts, Index r, Index h, Index c0, Index nc,
                             Index ld) {
    for (Index e = 0; e < experts; ++e)
        for (Index q = 0; q < Q; ++q) {
            T* d = dst + (e * Q + q) * ld;
            if (q < r)
                std::copy_n(src[e] + q * h + c0, nc, d);
            else
                std::fill(d, d + nc, T(0));
        }
}

/// Row coefficients padded to Q (zeros past r).
template <int Q, class T>
struct Coef {
    T v[Q];
    Coef(const T* src, Index r) {
        for (Index q = 0; q < Q; ++q) v[q] = q < r ? src[q] : T(0);
    }
};

/// The order the fused passes visit the routed rows in: token blocks in order, inside a block expert
/// by expert, inside an expert in token order. Also whether each row is its token's first visit (its
/// expert is the smallest of the token's), which stores m and dH instead of adding to them, and its
/// last (the largest expert), which may write the finished m or dH row in bf16 instead.
struct MixOrder {
    std::vector<Index> rows;          ///< row ids i = t k + j, in visiting order
    std::vector<Index> span;          ///< [blocks * experts + 1] offsets into rows
    std::vector<unsigned char> first;  ///< per row id
    std::vector<unsigned char> last;   ///< per row id

    void build(Index n, Index k, Index experts, const std::int32_t* expert, Index tb) {
        const Index blocks = (n + tb - 1) / tb;
        rows.resize(static_cast<std::size_t>(n * k));
        span.assign(static_cast<std::size_t>(blocks * experts + 1), 0);
        first.assign(static_cast<std::size_t>(n * k), 0);
        last.assign(static_cast<std::size_t>(n * k), 0);
        for (Index t = 0; t < n; ++t) {
            Index lowest = 0, highest = 0;
            for (Index j = 1; j < k; ++j) {
                if (expert[t * k + j] < expert[t * k + lowest]) lowest = j;
                if (expert[t * k + j] > expert[t * k + highest]) highest = j;
            }
            first[static_cast<std::size_t>(t * k + lowest)] = 1;
            last[static_cast<std::size_t>(t * k + highest)] = 1;
        }
        Index pos = 0;
        for (Index b = 0; b < blocks; ++b) {
            const Index i0 = b * tb * k, i1 = std::min(n, (b + 1) * tb) * k;
            for (Index e = 0; e < experts; ++e) {
                span[static_cast<std::size_t>(b * experts + e)] = pos;
                for (Index i = i0; i < i1; ++i)
                    if (expert[i] == e) rows[static_cast<std::size_t>(pos++)] = i;
            }
        }
        span.back() = pos;
    }
};

/// Per-thread work space of the fused passes (packed factor columns and gradient accumulators).
/// Every work buffer is 64-byte aligned and its rows start on whole batches (padded_cols): a batch
/// load that straddles two cache lines costs two, and the rank-r loops are bound by their loads (a
/// plain std::vector of this size is 16-byte aligned; the loops ran twice as long on one).
template <class T>
inline comigs::detail::aligned_vector<T>& fused_scratch() {
    thread_local comigs::detail::aligned_vector<T> buf;
    return buf;
}
/// Per-thread work space of the backward's gradient sweep (a span's u and dp rows).
template <class T>
inline comigs::detail::aligned_vector<T>& fused_rows_scratch() {
    thread_local comigs::detail::aligned_vector<T> buf;
    return buf;
}
/// The backward's dA2 and dB1^T sums of every unit of work (group, token part), on the calling thread.
template <class T>
inline comigs::detail::aligned_vector<T>& fused_unit_grads() {
    thread_local comigs::detail::aligned_vector<T> buf;
    return buf;
}
/// Token parts of a pass: the unit of work is a column group on one part of the token blocks, so
/// that a thread done early can take part of a group from a slower one. Fixed (not the thread count):
/// the backward sums the parts' gradient sums in order, the same for any number of threads. (4 parts
/// measured no faster than 2: each unit packs its factor columns again.)
inline constexpr Index mix_token_parts = 2;
/// Spans [first, last) of the token blocks of token part `part` (of mix_token_parts) in a MixOrder of
/// `spans` spans.
inline void part_spans(Index spans, Index experts, Index part, Index& first, Index& last) {
    const Index blocks = spans / experts;
    first = blocks * part / mix_token_parts * experts;
    last = blocks * (part + 1) / mix_token_parts * experts;
}
/// nc rounded up to whole batches: the row stride of the work buffers.
template <class T>
inline Index padded_cols(Index nc) {
    constexpr Index w = static_cast<Index>(simd::width<T>);
    return (nc + w - 1) / w * w;
}

/// One routed row as the row kernels see it (pointers at the group's first column), for an MLP with L
/// first-stage linears (GELU: fc; SwiGLU: gate, then up). Per linear f: its pre-activation H[f], its
/// rank-r input zs[f] and, backward, where its dH row goes; forward, linear 0's fields carry m.
template <int Q, class T, int L>
struct MixRow {
    T* out[L];               // where the row's sum goes: the token's row of m (forward, f = 0) or dH_f
                             // (backward) on its last visit, else its row of the block's partial sums
    const T* prev[L];        // the token's partial sums so far (not read on its first visit)
    bf16* outb[L];           // when set, the last visit writes the finished row here (bf16), not to out
    bool stream[L];          // the finished row takes streaming stores (fp32 out 64-, bf16 outb 32-byte aligned)
    const T* H[L];           // the token's pre-activation without bias
    const Coef<Q, T>* zs[L]; // s A_f x of the row
    const T* next_h[L];      // the H columns of the row visited two rows later, prefetched a line per
                             // batch during the activation sweep; null: none
    const T* dm;             // backward: dL/dm of the token
    const Coef<Q, T>* qg;    // backward: g s B2^T dy of the row
    const T* next_dm;        // backward: dM columns of the row visited two rows later (as next_h)
    T g;                     // gate weight
    bool first;              // first visit of the token: store instead of add
    bool last;               // last visit of the token
    T* part;                 // the row's partial sums over the group's columns
};

/// Stores the lanes of v as bf16, rounded as convert_to_bf16 rounds; with `stream` (dst 32-byte
/// aligned) bypassing the caches, as simd::store_stream does for fp32 rows.
template <class B>
inline void store_bf16(bf16* dst, const B& v, bool stream = false) {
    static_assert(std::is_same_v<typename B::value_type, float>);
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if constexpr (B::size == 16) {
        const __m256bh h = _mm512_cvtneps_pbh(v);
        if (stream)
            _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<const __m256i&>(h));
        else
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<const __m256i&>(h));
        return;
    }
#endif
    (void)stream;
    alignas(64) float tmp[B::size];
    v.store_aligned(tmp);
    convert_to_bf16(dst, tmp, static_cast<Index>(B::size));
}

/// Writes the row value v of m or dH_f at column c: to the bf16 row on the token's last visit when the
/// caller asked for bf16 output, else to the fp32 row.
template <int Q, class T, int L, class B>
inline void put_row(const MixRow<Q, T, L>& row, int f, Index c, const B& v) {
    if constexpr (std::is_same_v<T, float>) {
        if (row.outb[f] && row.last) {
            store_bf16(row.outb[f] + c, v, row.stream[f]);
            return;
        }
    }
    if (row.stream[f])
        simd::store_stream(row.out[f] + c, v);
    else
        simd::store(row.out[f] + c, v);
}
template <int Q, class T, int L>
inline void put_row_scalar(const MixRow<Q, T, L>& row, int f, Index c, T v) {
    if constexpr (std::is_same_v<T, float>) {
        if (row.outb[f] && row.last) {
            row.outb[f][c] = to_bf16(v);
            return;
        }
    }
    row.out[f][c] = v;
}

/// Points linear f of a row at its sums: it adds to the token's row of the block's partial sums
/// (`partial`, in a per-thread buffer) and writes there until its last visit, which writes `dst` (its
/// row of m or dH_f) instead, or its bf16 row `dstb` when set, with streaming stores when that row holds
/// whole aligned batches: the finished rows are read next by a GEMM, not by this pass, and streaming
/// them saves reading each line in first (bf16 rows: 7-11% slower passes without it, 2 threads).
/// Needs row.last set.
template <int Q, class T, int L>
inline void point_sums(MixRow<Q, T, L>& row, int f, T* dst, bf16* dstb, T* partial, Index nc) {
    constexpr std::size_t bytes = simd::width<T> * sizeof(T);
    row.prev[f] = partial;
    row.out[f] = row.last && dst ? dst : partial;  // no dst: the last visit writes the bf16 row alone
    row.outb[f] = dstb;
    // A bf16 row streams 32 bytes per batch: it needs 32-byte alignment (its own row, not dst's).
    const auto aligned = dstb ? reinterpret_cast<std::uintptr_t>(dstb) % (bytes / 2) == 0
                              : reinterpret_cast<std::uintptr_t>(dst) % bytes == 0;
    row.stream[f] = row.last && nc % static_cast<Index>(simd::width<T>) == 0 && aligned;
}
/// The visit-dependent fields of a row (visit i of the order): its first/last flags and its slot of
/// the group's per-row sums.
template <int Q, class T, int L>
inline void set_visit(MixRow<Q, T, L>& row, const MixOrder& order, Index i, T* part) {
    row.first = order.first[static_cast<std::size_t>(i)] != 0;
    row.last = order.last[static_cast<std::size_t>(i)] != 0;
    row.part = part;
}
/// Points a row at what its activation sweep prefetches: the H_f (and, when dM has data, dM) columns
/// from c0 of the token visited at position `pos` of the order; nothing past the order's end.
template <int Q, class T, int L>
inline void point_next(MixRow<Q, T, L>& row, const MixOrder& order, Index pos, Index k, const ConstMatrixView<T>* H,
                       ConstMatrixView<T> dM, Index c0) {
    const bool any = pos < static_cast<Index>(order.rows.size());
    const Index t = any ? order.rows[static_cast<std::size_t>(pos)] / k : 0;
    for (int f = 0; f < L; ++f) row.next_h[f] = any ? H[f].row_ptr(t) + c0 : nullptr;
    row.next_dm = any && dM.data ? dM.row_ptr(t) + c0 : nullptr;
}

/// Per-thread partial sums of the fused passes: one row of the group's columns per token of a block.
template <class T>
inline comigs::detail::aligned_vector<T>& fused_partial_scratch() {
    thread_local comigs::detail::aligned_vector<T> buf;
    return buf;
}

/// acc[x][q] += f[q] * v[x] lane by lane over columns [0, cv) (whole batches), x < R, q < Q: the
/// last sweep of the row kernels, projecting rows kept in L1 onto Q packed factor rows (stride ld).
template <int Q, int R, class T>
inline void project_rows(simd::batch<T> (&acc)[R][Q], T* const* v, const T* f, Index ld, Index cv) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    for (Index c = 0; c < cv; c += w) {
        B vc[R];
        for (int x = 0; x < R; ++x) vc[x] = simd::load(v[x] + c);
        for (int q = 0; q < Q; ++q) {
            const B fq = simd::load(f + q * ld + c);
            for (int x = 0; x < R; ++x) acc[x][q] = simd::fma(fq, vc[x], acc[x][q]);
        }
    }
}

/// out[x][c] = a0 + a1 + sum_q coef[x][q] f[q * ld + c] over columns [0, cv) (whole batches), x < R,
/// with init(x, c, a0, a1) giving the two starting terms: even q go to a0 and odd q to a1, two chains
/// per row (half the latency of one) sharing each load of f among the R rows.
template <int Q, int R, class T, class Init>
inline void rank_sweep(T* const* out, const T (&coef)[R][Q], const T* f, Index ld, Index cv, Init init) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    for (Index c = 0; c < cv; c += w) {
        B a0[R], a1[R];
        for (int x = 0; x < R; ++x) init(x, c, a0[x], a1[x]);
        for (int q = 0; q < Q; q += 2) {
            const B f0 = simd::load(f + q * ld + c), f1 = simd::load(f + (q + 1) * ld + c);
            for (int x = 0; x < R; ++x) {
                a0[x] = simd::fma(B(coef[x][q]), f0, a0[x]);
                a1[x] = simd::fma(B(coef[x][q + 1]), f1, a1[x]);
            }
        }
        for (int x = 0; x < R; ++x) simd::store(out[x] + c, a0[x] + a1[x]);
    }
}


/// s = sigmoid(x) and 1 - s without cancellation (silu(x) = x s, silu'(x) = s + x s (1 - s)).
template <class B, class T = typename B::value_type>
inline B silu_sigmoid(const B& x, B& oms) {
    if constexpr (std::is_same_v<T, float>) {
        B s;
        simd::sigmoid_pow2(x * B(T(-1.4426950408889634)), s, oms);  // 1 / (1 + 2^(-x / ln 2))
        return s;
    } else {
        const B e = simd::exp(-x), s = B(T(1)) / (B(T(1)) + e);
        oms = simd::select(s < B(T(0.5)), B(T(1)) - s, e * s);  // e may be inf where s = 0
        return s;
    }
}
template <class T>
inline T silu_sigmoid_scalar(T x, T& oms) {
    const T e = std::exp(-x), s = T(1) / (T(1) + e);
    oms = s < T(0.5) ? T(1) - s : e * s;
    return s;
}

/// The activations of the row kernels, from the pre-activations p[f] of the L first-stage linears
/// (vectors V = simd::batch<T>, or scalars for the column tails): a = act(p), and backward, given
/// da = dL/da, dp[f] = da d a / d p_f.
/// GELU (L = 1): a = gelu(p) = p sigmoid(2 a(p)).
struct GeluAct {
    static constexpr int linears = 1;
    template <class V>
    static V forward(const V* p) {
        if constexpr (std::is_arithmetic_v<V>)
            return p[0] * gelu_sigmoid_scalar(p[0]);
        else
            return p[0] * gelu_sigmoid(p[0]);
    }
    template <class V>
    static V backward(const V* p, const V& da, V* dp) {
        V oms;
        if constexpr (std::is_arithmetic_v<V>) {
            const V s = gelu_sigmoid_scalar(p[0], &oms);
            dp[0] = da * gelu_grad_from_scalar(p[0], s, oms);
            return p[0] * s;
        } else {
            const V s = gelu_sigmoid(p[0], &oms);
            dp[0] = da * gelu_grad_from(p[0], s, oms);
            return p[0] * s;
        }
    }
};
/// SwiGLU (L = 2, gate then up): a = silu(pg) pu; dpg = da pu silu'(pg), dpu = da silu(pg).
struct SwigluAct {
    static constexpr int linears = 2;
    template <class V>
    static V forward(const V* p) {
        V oms;
        if constexpr (std::is_arithmetic_v<V>)
            return p[0] * silu_sigmoid_scalar(p[0], oms) * p[1];
        else
            return p[0] * silu_sigmoid(p[0], oms) * p[1];
    }
    template <class V>
    static V backward(const V* p, const V& da, V* dp) {
        V oms;
        if constexpr (std::is_arithmetic_v<V>) {
            const V s = silu_sigmoid_scalar(p[0], oms), silu = p[0] * s;
            dp[0] = da * p[1] * (silu * oms + s);
            dp[1] = da * silu;
            return silu * p[1];
        } else {
            const V s = silu_sigmoid(p[0], oms), silu = p[0] * s;
            dp[0] = da * p[1] * simd::fma(silu, oms, s);
            dp[1] = da * silu;
            return silu * p[1];
        }
    }
};

/// Forward of R routed rows of one expert on nc columns: p_f = H_f + b_f + zs_f^T F_f for each first
/// linear f < L (F[f] its packed B_f^T columns, row stride ld; b[f] at the first column or null),
/// a = Act(p), m (= when first, else +=) g a, and part[q] = the partial sum of A2 a over these columns,
/// q < Q (fa the packed A2 columns). Three sweeps over the columns, the rows side by side in each (they
/// share the factor loads and give the core independent chains): p_f into sp[f][x] (kept in L1), then
/// a = Act(p) into sp[0][x] with the gate mix into m, then the A2 projection of a. One sweep doing the
/// rank-r update and the activation together holds 2 Q broadcast coefficients beside the activation's
/// constants and spills; it ran 10-15% slower (GELU).
template <class Act, int Q, int R, class T, int L = Act::linears>
inline void mix_forward_rows(const MixRow<Q, T, L>* rows, const T* const* b, const T* const* F, const T* fa,
                             T* (*sp)[2], Index ld, Index nc) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index cv = nc / w * w;
    T zs[L][R][Q], g[R];
    for (int x = 0; x < R; ++x) {
        for (int f = 0; f < L; ++f)
            for (int q = 0; q < Q; ++q) zs[f][x][q] = rows[x].zs[f]->v[q];
        g[x] = rows[x].g;
    }
    for (int f = 0; f < L; ++f)
        rank_sweep<Q, R>(sp[f], zs[f], F[f], ld, cv, [&](int x, Index c, B& a0, B& a1) {
            a0 = simd::load(rows[x].H[f] + c);
            a1 = b[f] ? simd::load(b[f] + c) : B(T(0));
        });
    for (Index c = 0; c < cv; c += w) {
        for (int x = 0; x < R; ++x) {
            B p[L];
            for (int f = 0; f < L; ++f) {
                if (rows[x].next_h[f]) prefetch_line(rows[x].next_h[f] + c);
                p[f] = simd::load(sp[f][x] + c);
            }
            const B a = Act::forward(p);
            put_row(rows[x], 0, c, rows[x].first ? B(g[x]) * a : simd::fma(B(g[x]), a, simd::load(rows[x].prev[0] + c)));
            simd::store(sp[0][x] + c, a);
        }
    }
    B acc[R][Q];
    for (int x = 0; x < R; ++x)
        for (int q = 0; q < Q; ++q) acc[x][q] = B(T(0));
    project_rows<Q, R>(acc, sp[0], fa, ld, cv);
    for (int x = 0; x < R; ++x) {
        T* out = rows[x].part;
        if (cv > 0)
            simd::reduce_add_rows<Q>(acc[x], out);
        else
            for (int q = 0; q < Q; ++q) out[q] = T(0);
        for (Index c = cv; c < nc; ++c) {
            T p[L];
            for (int f = 0; f < L; ++f) {
                T p0 = rows[x].H[f][c], p1 = b[f] ? b[f][c] : T(0);
                for (int q = 0; q < Q; q += 2) {
                    p0 += zs[f][x][q] * F[f][q * ld + c];
                    p1 += zs[f][x][q + 1] * F[f][(q + 1) * ld + c];
                }
                p[f] = p0 + p1;
            }
            const T a = Act::forward(p);
            put_row_scalar(rows[x], 0, c, rows[x].first ? g[x] * a : rows[x].prev[0][c] + g[x] * a);
            for (int q = 0; q < Q; ++q) out[q] += fa[q * ld + c] * a;
        }
    }
}

/// Backward of R routed rows of one expert on nc columns (layout as mix_forward_rows), with dm = dL/dm
/// of each row's token and qg = g s B2^T dy: da = g dm + qg^T A2, p_f recomputed, a = Act(p) and
/// dp_f = da d a / d p_f; dH_f (= when first, else +=) dp_f; part[f Q + q] = the partial sum of
/// F_f dp_f (q < Q) and part[L Q] of a . dm. For the gradient sweep (mix_grad_one) a goes to sp[0][x],
/// dp_0 to sd[x] and dp_f to sp[f][x] (f >= 1). The F_f dp_f sums are sweeps over those rows, as the A2
/// projection in mix_forward_rows.
template <class Act, int Q, int R, class T, int L = Act::linears>
inline void mix_backward_rows(const MixRow<Q, T, L>* rows, const T* const* b, const T* const* F, const T* fa,
                              T* (*sp)[2], T* const* sd, Index ld, Index nc) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index cv = nc / w * w;
    B dot[R];
    T zs[L][R][Q], qg[R][Q], g[R];
    for (int x = 0; x < R; ++x) {
        dot[x] = B(T(0));
        for (int q = 0; q < Q; ++q) {
            for (int f = 0; f < L; ++f) zs[f][x][q] = rows[x].zs[f]->v[q];
            qg[x][q] = rows[x].qg->v[q];
        }
        g[x] = rows[x].g;
    }
    // Sweeps over the columns, each holding few coefficients and short chains (one sweep doing all of
    // it keeps 4 Q broadcast coefficients, spills, and ran ~10% slower): p_f into sp[f], da into sd,
    // then the rows side by side through the activation and its derivative in place, with a . dm and
    // the dH sums: each element is one long dependency chain, and R independent chains per column
    // batch give the core more to overlap.
    for (int f = 0; f < L; ++f)
        rank_sweep<Q, R>(sp[f], zs[f], F[f], ld, cv, [&](int x, Index c, B& a0, B& a1) {
            a0 = simd::load(rows[x].H[f] + c);
            a1 = b[f] ? simd::load(b[f] + c) : B(T(0));
        });
    rank_sweep<Q, R>(sd, qg, fa, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = B(g[x]) * simd::load(rows[x].dm + c);
        a1 = B(T(0));
    });
    for (Index c = 0; c < cv; c += w) {
        for (int x = 0; x < R; ++x) {
            const MixRow<Q, T, L>& row = rows[x];
            B p[L], dp[L];
            for (int f = 0; f < L; ++f) {
                if (row.next_h[f]) prefetch_line(row.next_h[f] + c);
                p[f] = simd::load(sp[f][x] + c);
            }
            if (row.next_dm) prefetch_line(row.next_dm + c);
            const B a = Act::backward(p, simd::load(sd[x] + c), dp);
            dot[x] = simd::fma(a, simd::load(row.dm + c), dot[x]);
            for (int f = 0; f < L; ++f) put_row(row, f, c, row.first ? dp[f] : simd::load(row.prev[f] + c) + dp[f]);
            simd::store(sp[0][x] + c, a);
            simd::store(sd[x] + c, dp[0]);
            for (int f = 1; f < L; ++f) simd::store(sp[f][x] + c, dp[f]);
        }
    }
    for (int f = 0; f < L; ++f) {
        B acc[R][Q];
        for (int x = 0; x < R; ++x)
            for (int q = 0; q < Q; ++q) acc[x][q] = B(T(0));
        project_rows<Q, R>(acc, f == 0 ? sd : sp[f], F[f], ld, cv);
        for (int x = 0; x < R; ++x) {
            T* out = rows[x].part + f * Q;
            if (cv > 0)
                simd::reduce_add_rows<Q>(acc[x], out);
            else
                for (int q = 0; q < Q; ++q) out[q] = T(0);
        }
    }
    for (int x = 0; x < R; ++x) rows[x].part[L * Q] = cv > 0 ? simd::reduce_add(dot[x]) : T(0);
    for (Index c = cv; c < nc; ++c)
        for (int x = 0; x < R; ++x) {
            const MixRow<Q, T, L>& row = rows[x];
            const T dmv = row.dm[c];
            T da0 = g[x] * dmv, da1 = T(0), p[L], dp[L];
            for (int q = 0; q < Q; q += 2) {
                da0 += qg[x][q] * fa[q * ld + c];
                da1 += qg[x][q + 1] * fa[(q + 1) * ld + c];
            }
            for (int f = 0; f < L; ++f) {
                T p0 = row.H[f][c], p1 = b[f] ? b[f][c] : T(0);
                for (int q = 0; q < Q; q += 2) {
                    p0 += zs[f][x][q] * F[f][q * ld + c];
                    p1 += zs[f][x][q + 1] * F[f][(q + 1) * ld + c];
                }
                p[f] = p0 + p1;
            }
            const T a = Act::backward(p, da0 + da1, dp);
            T* out = row.part;
            out[L * Q] += a * dmv;
            for (int f = 0; f < L; ++f) put_row_scalar(row, f, c, row.first ? dp[f] : row.prev[f][c] + dp[f]);
            sp[0][x][c] = a;
            sd[x][c] = dp[0];
            for (int f = 1; f < L; ++f) sp[f][x][c] = dp[f];
            for (int f = 0; f < L; ++f)
                for (int q = 0; q < Q; ++q) out[f * Q + q] += F[f][q * ld + c] * dp[f];
        }
}

/// The gradient sweep of one span (rows of one expert) for one factor: gb[q][c] += sum_x xz_x[q] sd[x][c]
/// over the span's `count` rows, gb packed [Q, nc] (row stride ld), xz the rows' coefficients [count, Q]:
/// a register-blocked rank-Q outer product (lowrank.hpp).
template <int Q, class T>
inline void mix_grad_one(T* gb, Index nc, Index ld, const T* xz, const T* sd, Index count) {
    constexpr Index cb = 2 * static_cast<Index>(simd::width<T>);
    const Index cv = nc / cb * cb;
    if (cv > 0) lowrank_outer_cols<Q>(gb, ld, xz, Q, sd, ld, static_cast<const Index*>(nullptr), count, 0, cv, T(1));
    for (Index q = 0; q < Q; ++q)
        for (Index c = cv; c < nc; ++c) {
            T s = T(0);
            for (Index x = 0; x < count; ++x) s += xz[x * Q + q] * sd[x * ld + c];
            gb[q * ld + c] += s;
        }
}

/// The groups of one pass: slot s starts as the contiguous range [groups s / S, groups (s + 1) / S)
/// of S slots. Thread s takes its own slot from the front; a thread whose slot is empty takes from
/// the back of the next slots. A thread that runs slower (this machine's vCPU 0 takes the host's
/// interrupts and runs 8-10% slower) gives up its last groups instead of keeping the others waiting
/// at the barrier, and each thread still walks adjacent groups. Which thread runs a group does not
/// change any result: a group's outputs are its own.
class GroupQueue {
public:
    GroupQueue(Index groups, Index slots) : slots_(static_cast<std::size_t>(std::max<Index>(1, slots))) {
        const Index S = static_cast<Index>(slots_.size());
        for (Index s = 0; s < S; ++s)
            slots_[static_cast<std::size_t>(s)].range.store(pack(groups * s / S, groups * (s + 1) / S),
                                                             std::memory_order_relaxed);
    }
    /// The next group for thread `tid`, or -1 once every slot is empty.
    Index next(Index tid) {
        const Index S = static_cast<Index>(slots_.size());
        if (tid < S) {
            const Index g = take(slots_[static_cast<std::size_t>(tid)], true);
            if (g >= 0) return g;
        }
        for (Index j = 1; j <= S; ++j) {
            const Index g = take(slots_[static_cast<std::size_t>((tid + j) % S)], false);
            if (g >= 0) return g;
        }
        return -1;
    }

private:
    struct alignas(64) Slot {
        std::atomic<std::uint64_t> range{0};  // front in the low half, end in the high half
    };
    static std::uint64_t pack(Index front, Index end) {
        return static_cast<std::uint64_t>(front) | (static_cast<std::uint64_t>(end) << 32);
    }
    static Index take(Slot& slot, bool front) {
        std::uint64_t v = slot.range.load(std::memory_order_relaxed);
        for (;;) {
            const Index f = static_cast<Index>(v & 0xffffffffu), e = static_cast<Index>(v >> 32);
            if (f >= e) return -1;
            const std::uint64_t w = front ? pack(f + 1, e) : pack(f, e - 1);
            if (slot.range.compare_exchange_weak(v, w, std::memory_order_relaxed)) return front ? f : e - 1;
        }
    }
    std::vector<Slot> slots_;
};

/// Runs body(c0, c1, group, tp) for every column group of [0, h) and token part tp (units handed out
/// by a GroupQueue, a group's parts adjacent), then finish() on every thread once all are done: one
/// parallel region for both (a region costs a wake-up of the sleeping threads, 20-80 us under
/// OMP_WAIT_POLICY=PASSIVE here).
template <class F, class G>
void for_groups(Index h, bool parallel, F body, G finish) {
    const Index W = std::max<Index>(1, mix_group_cols());
    const Index groups = (h + W - 1) / W, units = groups * mix_token_parts;
    const bool par = parallel && units > 1;
#ifdef _OPENMP
    GroupQueue queue(units, par ? omp_get_max_threads() : 1);
#else
    GroupQueue queue(units, 1);
#endif
#pragma omp parallel if (par)
    {
#ifdef _OPENMP
        const Index tid = omp_get_thread_num();
#else
        const Index tid = 0;
#endif
        for (Index u = queue.next(tid); u >= 0; u = queue.next(tid)) {
            const Index g = u / mix_token_parts;
            body(g * W, std::min(h, g * W + W), g, u % mix_token_parts);
        }
#pragma omp barrier
        finish();
    }
}

/// The calling thread's fixed range of dst[x] = sum over groups g (in order) of part[g * len + x],
/// x < len (all of it outside a parallel region).
template <class T>
void sum_groups_part(T* dst, const T* part, Index groups, Index len) {
    Index lo, hi;
    thread_range(len, lo, hi);
    std::copy(part + lo, part + hi, dst + lo);
    for (Index g = 1; g < groups; ++g) {
        const T* pg = part + g * len;
        for (Index x = lo; x < hi; ++x) dst[x] += pg[x];
    }
}

/// The forward pass of the routed rows for activation Act over its L first-stage linears: H[f], b[f],
/// zs[f] and F[f] (the experts' B_f^T factors) per linear f; see gelu_mixture_forward.
template <class Act, int Q, class T, int L = Act::linears>
void rows_forward_q(MatrixView<T> M, T* z2, const ConstMatrixView<T>* H, const T* const* b, Index k,
                    const std::int32_t* expert, const T* gate, const T* const* zs, const T* const* const* F,
                    const T* const* A2, Index experts, Index r, std::vector<T>& part, MatrixView<bf16> Mb) {
    const Index n = H[0].rows, h = H[0].cols, rows = n * k;
    const Index W = std::max<Index>(1, mix_group_cols()), groups = (h + W - 1) / W;
    const Index tb = std::max<Index>(1, mix_token_block());
    MixOrder order;
    order.build(n, k, experts, expert, tb);
    std::vector<Coef<Q, T>> zc[L];
    for (int f = 0; f < L; ++f) {
        zc[f].reserve(static_cast<std::size_t>(rows));
        for (Index i = 0; i < rows; ++i) zc[f].emplace_back(zs[f] + i * r, r);
    }
    part.resize(static_cast<std::size_t>(groups * rows * Q));
    const bool par = rows * h >= mix_parallel_min();
    // With few rows (decode) packing all experts' columns would cost more than the rows: read the
    // factors in place (possible when no padding rows are needed; same values, same order).
    const bool direct = r == Q && rows < 4 * experts;
    std::vector<T> full(r == Q ? 0 : static_cast<std::size_t>(rows * Q));
    const Index spans = static_cast<Index>(order.span.size()) - 1;
    for_groups(h, par, [&](Index c0, Index c1, Index grp, Index tp) {
        Index sp0, sp1;
        part_spans(spans, experts, tp, sp0, sp1);
        if (sp0 == sp1) return;
        const Index nc = c1 - c0, ncp = padded_cols<T>(nc), fsize = direct ? 0 : experts * Q * ncp;
        // Packed columns: B_f^T of every expert for each linear f, then A2.
        auto& buf = fused_scratch<T>();
        buf.resize(static_cast<std::size_t>((L + 1) * fsize));
        T* const fa = buf.data() + L * fsize;
        if (!direct) {
            for (int f = 0; f < L; ++f) pack_factor_cols<Q>(buf.data() + f * fsize, F[f], experts, r, h, c0, nc, ncp);
            pack_factor_cols<Q>(fa, A2, experts, r, h, c0, nc, ncp);
        }
        const Index ld = direct ? h : ncp;
        auto& rowbuf = fused_rows_scratch<T>();
        rowbuf.resize(static_cast<std::size_t>(2 * L * ncp));
        T* sp[L][2];
        for (int f = 0; f < L; ++f)
            for (int x = 0; x < 2; ++x) sp[f][x] = rowbuf.data() + (2 * f + x) * ncp;
        auto& partial = fused_partial_scratch<T>();
        partial.resize(static_cast<std::size_t>(tb * ncp));
        T* pg = part.data() + grp * rows * Q;
        const T* bias[L];
        for (int f = 0; f < L; ++f) bias[f] = b[f] ? b[f] + c0 : nullptr;
        // Span sp = (block, expert) of the visiting order: expert sp % experts.
        for (Index span = sp0; span < sp1; ++span) {
            const Index e = span % experts;
            const T* fe[L];
            for (int f = 0; f < L; ++f) fe[f] = direct ? F[f][e] + c0 : buf.data() + f * fsize + e * Q * ncp;
            const T* fae = direct ? A2[e] + c0 : fa + e * Q * ncp;
            const Index x0 = order.span[static_cast<std::size_t>(span)], x1 = order.span[static_cast<std::size_t>(span + 1)];
            for (Index x = x0; x < x1; x += 2) {
                const int R = x + 1 < x1 ? 2 : 1;
                MixRow<Q, T, L> rw[2];
                for (int y = 0; y < R; ++y) {
                    const Index i = order.rows[static_cast<std::size_t>(x + y)], t = i / k;
                    MixRow<Q, T, L>& row = rw[y];
                    row = MixRow<Q, T, L>{};
                    for (int f = 0; f < L; ++f) {
                        row.H[f] = H[f].row_ptr(t) + c0;
                        row.zs[f] = &zc[f][static_cast<std::size_t>(i)];
                    }
                    row.g = gate[i];
                    set_visit(row, order, i, pg + i * Q);
                    point_sums(row, 0, M.data ? M.row_ptr(t) + c0 : nullptr, Mb.data ? Mb.row_ptr(t) + c0 : nullptr,
                               partial.data() + (t % tb) * ncp, nc);
                    point_next(row, order, x + y + 2, k, H, ConstMatrixView<T>(), c0);
                }
                if (R == 2)
                    mix_forward_rows<Act, Q, 2>(rw, bias, fe, fae, sp, ld, nc);
                else
                    mix_forward_rows<Act, Q, 1>(rw, bias, fe, fae, sp, ld, nc);
            }
        }
        simd::stream_fence();
    }, [&] { sum_groups_part(r == Q ? z2 : full.data(), part.data(), groups, rows * Q); });
    if (r != Q)
        for (Index i = 0; i < rows; ++i)
            for (Index q = 0; q < r; ++q) z2[i * r + q] = full[static_cast<std::size_t>(i * Q + q)];
}

/// The backward pass of the routed rows for activation Act (layout as rows_forward_q; dH[f], dHb[f],
/// dz[f] and gBT[f] per first linear f); see gelu_mixture_backward.
template <class Act, int Q, class T, int L = Act::linears>
void rows_backward_q(const MatrixView<T>* dH, T* const* dz, T* udm, ConstMatrixView<T> dM, const ConstMatrixView<T>* H,
                     const T* const* b, Index k, const std::int32_t* expert, const T* gate, const T* const* zs,
                     const T* qg, const T* const* const* F, const T* const* A2, T* const* gA2, Index ldg,
                     T* const* const* gBT, Index experts, T s, Index r, std::vector<T>& part,
                     const MatrixView<bf16>* dHb) {
    const Index n = H[0].rows, h = H[0].cols, rows = n * k;
    const Index W = std::max<Index>(1, mix_group_cols()), groups = (h + W - 1) / W;
    constexpr Index P = L * Q + 1;
    const Index tb = std::max<Index>(1, mix_token_block());
    MixOrder order;
    order.build(n, k, experts, expert, tb);
    std::vector<Coef<Q, T>> zc[L], qc;
    for (int f = 0; f < L; ++f) {
        zc[f].reserve(static_cast<std::size_t>(rows));
        for (Index i = 0; i < rows; ++i) zc[f].emplace_back(zs[f] + i * r, r);
    }
    qc.reserve(static_cast<std::size_t>(rows));
    for (Index i = 0; i < rows; ++i) qc.emplace_back(qg + i * r, r);
    part.resize(static_cast<std::size_t>(groups * rows * P));
    Index longest = 0;
    for (std::size_t sp = 0; sp + 1 < order.span.size(); ++sp) longest = std::max(longest, order.span[sp + 1] - order.span[sp]);
    const bool par = rows * h >= mix_parallel_min();
    std::vector<T> sums(static_cast<std::size_t>(rows * P));
    const Index spans = static_cast<Index>(order.span.size()) - 1;
    // Each unit's dA2 and dB_f^T parts ([experts Q, ncp] each, f < L); the parts are added in finish.
    const Index ustride = (L + 1) * experts * Q * padded_cols<T>(std::min(W, h));
    auto& ugrads = fused_unit_grads<T>();
    ugrads.resize(static_cast<std::size_t>(groups * mix_token_parts * ustride));
    for_groups(h, par, [&](Index c0, Index c1, Index grp, Index tp) {
        const Index nc = c1 - c0, ncp = padded_cols<T>(nc), fsize = experts * Q * ncp;
        T* ga = ugrads.data() + (grp * mix_token_parts + tp) * ustride;  // dA2 of the unit, from zero
        T* gb = ga + fsize;                                                // dB_f^T of the unit (f fsize on)
        std::fill(ga, ga + (L + 1) * fsize, T(0));
        Index sp0, sp1;
        part_spans(spans, experts, tp, sp0, sp1);
        if (sp0 == sp1) return;
        // Packed columns: B_f^T of every expert for each linear f, then A2.
        auto& buf = fused_scratch<T>();
        buf.resize(static_cast<std::size_t>((L + 1) * fsize));
        T* const fa = buf.data() + L * fsize;
        for (int f = 0; f < L; ++f) pack_factor_cols<Q>(buf.data() + f * fsize, F[f], experts, r, h, c0, nc, ncp);
        pack_factor_cols<Q>(fa, A2, experts, r, h, c0, nc, ncp);
        T* pg = part.data() + grp * rows * P;
        const T* bias[L];
        for (int f = 0; f < L; ++f) bias[f] = b[f] ? b[f] + c0 : nullptr;
        // Per span, for the gradient sweep: the rows sp[f] (a, then dp_f for f >= 1) and sd (dp_0), and the
        // rows' coefficients qg (xq) and zs_f (xz[f]).
        auto& rowbuf = fused_rows_scratch<T>();
        rowbuf.resize(static_cast<std::size_t>(longest * (L + 1) * (ncp + Q)));
        T* const sd = rowbuf.data() + L * longest * ncp;
        T* const xq = rowbuf.data() + (L + 1) * longest * ncp;
        auto& partial = fused_partial_scratch<T>();
        partial.resize(static_cast<std::size_t>(L * tb * ncp));
        for (Index span = sp0; span < sp1; ++span) {
            const Index e = span % experts, off = e * Q * ncp;
            const Index x0 = order.span[static_cast<std::size_t>(span)], x1 = order.span[static_cast<std::size_t>(span + 1)];
            if (x1 == x0) continue;
            const T* fe[L];
            for (int f = 0; f < L; ++f) fe[f] = buf.data() + f * fsize + off;
            for (Index x = x0; x < x1; x += 2) {
                const int R = x + 1 < x1 ? 2 : 1;
                MixRow<Q, T, L> rw[2];
                T* spr[L][2];
                T* sdr[2];
                for (int y = 0; y < R; ++y) {
                    const Index i = order.rows[static_cast<std::size_t>(x + y)], t = i / k, slot = x + y - x0;
                    MixRow<Q, T, L>& row = rw[y];
                    row = MixRow<Q, T, L>{};
                    row.dm = dM.row_ptr(t) + c0;
                    row.qg = &qc[static_cast<std::size_t>(i)];
                    row.g = gate[i];
                    set_visit(row, order, i, pg + i * P);
                    for (int f = 0; f < L; ++f) {
                        row.H[f] = H[f].row_ptr(t) + c0;
                        row.zs[f] = &zc[f][static_cast<std::size_t>(i)];
                        point_sums(row, f, dH[f].data ? dH[f].row_ptr(t) + c0 : nullptr,
                                   dHb[f].data ? dHb[f].row_ptr(t) + c0 : nullptr,
                                   partial.data() + (f * tb + t % tb) * ncp, nc);
                        spr[f][y] = rowbuf.data() + (f * longest + slot) * ncp;
                        std::copy_n(zc[f][static_cast<std::size_t>(i)].v, Q, xq + ((f + 1) * longest + slot) * Q);
                    }
                    point_next(row, order, x + y + 2, k, H, dM, c0);
                    sdr[y] = sd + slot * ncp;
                    std::copy_n(qc[static_cast<std::size_t>(i)].v, Q, xq + slot * Q);
                }
                if (R == 2)
                    mix_backward_rows<Act, Q, 2>(rw, bias, fe, fa + off, spr, sdr, ncp, nc);
                else
                    mix_backward_rows<Act, Q, 1>(rw, bias, fe, fa + off, spr, sdr, ncp, nc);
            }
            const Index count = x1 - x0;
            mix_grad_one<Q>(ga + off, nc, ncp, xq, rowbuf.data(), count);
            for (int f = 0; f < L; ++f)
                mix_grad_one<Q>(gb + f * fsize + off, nc, ncp, xq + (f + 1) * longest * Q,
                                f == 0 ? sd : rowbuf.data() + f * longest * ncp, count);
        }
        simd::stream_fence();
    }, [&] {
        sum_groups_part(sums.data(), part.data(), groups, rows * P);
        // The calling thread's groups: dA2 += the parts' sums, dB_f^T = the parts' sums, added in part order.
        Index g0, g1;
        thread_range(groups, g0, g1);
        for (Index g = g0; g < g1; ++g) {
            const Index c0 = g * W, nc = std::min(h, c0 + W) - c0, ncp = padded_cols<T>(nc), fsize = experts * Q * ncp;
            const T* u0 = ugrads.data() + g * mix_token_parts * ustride;
            for (Index e = 0; e < experts; ++e)
                for (Index q = 0; q < r; ++q) {
                    const Index o = (e * Q + q) * ncp;
                    T* da = gA2[e] + q * ldg + c0;
                    for (Index c = 0; c < nc; ++c) {
                        T a = u0[o + c];
                        for (Index pt = 1; pt < mix_token_parts; ++pt) a += u0[pt * ustride + o + c];
                        da[c] += a;
                    }
                    for (int f = 0; f < L; ++f) {
                        T* db = gBT[f][e] + q * h + c0;
                        const Index of = (f + 1) * fsize + o;
                        for (Index c = 0; c < nc; ++c) {
                            T v = u0[of + c];
                            for (Index pt = 1; pt < mix_token_parts; ++pt) v += u0[pt * ustride + of + c];
                            db[c] = v;
                        }
                    }
                }
        }
    });
    for (Index i = 0; i < rows; ++i) {
        for (int f = 0; f < L; ++f)
            for (Index q = 0; q < r; ++q) dz[f][i * r + q] = s * sums[static_cast<std::size_t>(i * P + f * Q + q)];
        udm[i] = sums[static_cast<std::size_t>(i * P + L * Q)];
    }
}

}  // namespace detail

/// Forward of the routed rows of a GELU mixture, one pass over the hidden size for all of them.
/// Token t's slot j is row i = t k + j, routed to expert[i] (distinct within a token) with gate
/// weight gate[i]; zs [n k, r] is s A1 x per row (the scaled rank-r input of the first linear).
/// B1T[e] and A2[e] are expert e's factors as [r, h] rows (row stride h), e < experts. With
/// p = H[t] + b1 + zs_i^T B1T (b1 may be null):
///   M[t] = sum_j gate[i] gelu(p_i)   and   z2[i] = A2 gelu(p_i)   (z2 [n k, r]).
/// `part` is work space. Results do not depend on the thread count.
/// With Mb set (float only, the shape of H), the finished rows go to Mb in bf16 (as convert_to_bf16
/// would round them; the input of a bf16 GEMM) instead of to M, which is not written and may be empty.
template <class T>
void gelu_mixture_forward(MatrixView<T> M, T* z2, ConstMatrixView<T> H, const T* b1, Index k,
                          const std::int32_t* expert, const T* gate, const T* zs, const T* const* B1T,
                          const T* const* A2, Index experts, Index r, std::vector<T>& part,
                          MatrixView<bf16> Mb = {}) {
    require<ShapeError>((M.rows == H.rows && M.cols == H.cols) || (Mb.data && !M.data), "gelu_mixture_forward: M [",
                        M.rows, ", ", M.cols, "] and H [", H.rows, ", ", H.cols, "] differ");
    require<ShapeError>(Mb.data == nullptr || (std::is_same_v<T, float> && Mb.rows == H.rows && Mb.cols == H.cols),
                        "gelu_mixture_forward: bf16 output [", Mb.rows, ", ", Mb.cols, "] must be float and match H");
    require(r >= 1 && r <= fused_max_rank, "gelu_mixture_forward rank ", r, ": the fused kernel takes 1..",
            fused_max_rank);
    const ConstMatrixView<T> Hs[1] = {H};
    const T* const bs[1] = {b1};
    const T* const zss[1] = {zs};
    const T* const* const Fs[1] = {B1T};
    if (detail::padded_rank(r) == 4)
        detail::rows_forward_q<detail::GeluAct, 4>(M, z2, Hs, bs, k, expert, gate, zss, Fs, A2, experts, r, part, Mb);
    else
        detail::rows_forward_q<detail::GeluAct, 8>(M, z2, Hs, bs, k, expert, gate, zss, Fs, A2, experts, r, part, Mb);
}

/// Backward of gelu_mixture_forward, given dM = dL/dM [n, h] and qg [n k, r] = gate s B2^T dy per row:
///   dp_i = (gate[i] dM[t] + qg_i^T A2) * gelu'(p_i),   dH[t] = sum_j dp_i (overwritten),
///   dz[i] = s B1T dp_i,   udm[i] = gelu(p_i) . dM[t],
///   gA2[e] ([r, h], row stride ldg) += sum over e's rows of qg_i gelu(p_i)^T,
///   gB1T[e] ([r, h], row stride h) = sum over e's rows of zs_i dp_i^T (overwritten: dB1 transposed).
/// Results do not depend on the thread count. With dHb set, as Mb in gelu_mixture_forward for dH (dH
/// then not written; it may be empty).
template <class T>
void gelu_mixture_backward(MatrixView<T> dH, T* dz, T* udm, ConstMatrixView<T> dM, ConstMatrixView<T> H, const T* b1,
                           Index k, const std::int32_t* expert, const T* gate, const T* zs, const T* qg,
                           const T* const* B1T, const T* const* A2, T* const* gA2, Index ldg, T* const* gB1T,
                           Index experts, T s, Index r, std::vector<T>& part, MatrixView<bf16> dHb = {}) {
    require<ShapeError>(((dH.rows == H.rows && dH.cols == H.cols) || (dHb.data && !dH.data)) && dM.rows == H.rows &&
                            dM.cols == H.cols,
                        "gelu_mixture_backward: dH, dM and H must have the same shape");
    require<ShapeError>(dHb.data == nullptr || (std::is_same_v<T, float> && dHb.rows == H.rows && dHb.cols == H.cols),
                        "gelu_mixture_backward: bf16 output [", dHb.rows, ", ", dHb.cols, "] must be float and match H");
    require(r >= 1 && r <= fused_max_rank, "gelu_mixture_backward rank ", r, ": the fused kernel takes 1..",
            fused_max_rank);
    const MatrixView<T> dHs[1] = {dH};
    const MatrixView<bf16> dHbs[1] = {dHb};
    T* const dzs[1] = {dz};
    const ConstMatrixView<T> Hs[1] = {H};
    const T* const bs[1] = {b1};
    const T* const zss[1] = {zs};
    const T* const* const Fs[1] = {B1T};
    T* const* const gBs[1] = {gB1T};
    if (detail::padded_rank(r) == 4)
        detail::rows_backward_q<detail::GeluAct, 4>(dHs, dzs, udm, dM, Hs, bs, k, expert, gate, zss, qg, Fs, A2, gA2, ldg,
                                                    gBs, experts, s, r, part, dHbs);
    else
        detail::rows_backward_q<detail::GeluAct, 8>(dHs, dzs, udm, dM, Hs, bs, k, expert, gate, zss, qg, Fs, A2, gA2, ldg,
                                                    gBs, experts, s, r, part, dHbs);
}

/// Forward of the routed rows of a SwiGLU mixture, one pass over the hidden size for all of them (as
/// gelu_mixture_forward, with the up linear beside the gate): zsg and zsu [n k, r] are s Ag x and
/// s Au x per row, BgT[e], BuT[e] and A2[e] expert e's factors as [r, h] rows. With
/// pg = Hg[t] + bg + zsg_i^T BgT, pu = Hu[t] + bu + zsu_i^T BuT (bg, bu may be null), a_i = silu(pg) pu:
///   M[t] = sum_j gate[i] a_i   and   z2[i] = A2 a_i.
/// Mb as in gelu_mixture_forward. Results do not depend on the thread count.
template <class T>
void swiglu_mixture_forward(MatrixView<T> M, T* z2, ConstMatrixView<T> Hg, ConstMatrixView<T> Hu, const T* bg,
                            const T* bu, Index k, const std::int32_t* expert, const T* gate, const T* zsg,
                            const T* zsu, const T* const* BgT, const T* const* BuT, const T* const* A2, Index experts,
                            Index r, std::vector<T>& part, MatrixView<bf16> Mb = {}) {
    require<ShapeError>(Hu.rows == Hg.rows && Hu.cols == Hg.cols, "swiglu_mixture_forward: Hg [", Hg.rows, ", ",
                        Hg.cols, "] and Hu [", Hu.rows, ", ", Hu.cols, "] differ");
    require<ShapeError>((M.rows == Hg.rows && M.cols == Hg.cols) || (Mb.data && !M.data), "swiglu_mixture_forward: M [",
                        M.rows, ", ", M.cols, "] and H [", Hg.rows, ", ", Hg.cols, "] differ");
    require<ShapeError>(Mb.data == nullptr || (std::is_same_v<T, float> && Mb.rows == Hg.rows && Mb.cols == Hg.cols),
                        "swiglu_mixture_forward: bf16 output [", Mb.rows, ", ", Mb.cols, "] must be float and match H");
    require(r >= 1 && r <= fused_max_rank, "swiglu_mixture_forward rank ", r, ": the fused kernel takes 1..",
            fused_max_rank);
    const ConstMatrixView<T> Hs[2] = {Hg, Hu};
    const T* const bs[2] = {bg, bu};
    const T* const zss[2] = {zsg, zsu};
    const T* const* const Fs[2] = {BgT, BuT};
    if (detail::padded_rank(r) == 4)
        detail::rows_forward_q<detail::SwigluAct, 4>(M, z2, Hs, bs, k, expert, gate, zss, Fs, A2, experts, r, part, Mb);
    else
        detail::rows_forward_q<detail::SwigluAct, 8>(M, z2, Hs, bs, k, expert, gate, zss, Fs, A2, experts, r, part, Mb);
}

/// Backward of swiglu_mixture_forward, given dM = dL/dM [n, h] and qg [n k, r] = gate s B2^T dy per row;
/// with da_i = gate[i] dM[t] + qg_i^T A2:
///   dpg_i = da_i pu silu'(pg),  dpu_i = da_i silu(pg),  dHg[t] = sum_j dpg_i,  dHu[t] = sum_j dpu_i,
///   dzg[i] = s BgT dpg_i,  dzu[i] = s BuT dpu_i,  udm[i] = a_i . dM[t],
///   gA2[e] ([r, h], row stride ldg) += sum over e's rows of qg_i a_i^T,
///   gBgT[e], gBuT[e] ([r, h]) = sum over e's rows of zsg_i dpg_i^T, zsu_i dpu_i^T (overwritten).
/// dHgb / dHub as dHb in gelu_mixture_backward, each for its own output. Results do not depend on the
/// thread count.
template <class T>
void swiglu_mixture_backward(MatrixView<T> dHg, MatrixView<T> dHu, T* dzg, T* dzu, T* udm, ConstMatrixView<T> dM,
                             ConstMatrixView<T> Hg, ConstMatrixView<T> Hu, const T* bg, const T* bu, Index k,
                             const std::int32_t* expert, const T* gate, const T* zsg, const T* zsu, const T* qg,
                             const T* const* BgT, const T* const* BuT, const T* const* A2, T* const* gA2, Index ldg,
                             T* const* gBgT, T* const* gBuT, Index experts, T s, Index r, std::vector<T>& part,
                             MatrixView<bf16> dHgb = {}, MatrixView<bf16> dHub = {}) {
    const auto same = [&](auto m) { return m.rows == Hg.rows && m.cols == Hg.cols; };
    require<ShapeError>(same(Hu) && same(dM) && (same(dHg) || (dHgb.data && !dHg.data)) &&
                            (same(dHu) || (dHub.data && !dHu.data)),
                        "swiglu_mixture_backward: dHg, dHu, dM, Hg and Hu must have the same shape");
    require<ShapeError>((dHgb.data == nullptr || (std::is_same_v<T, float> && same(dHgb))) &&
                            (dHub.data == nullptr || (std::is_same_v<T, float> && same(dHub))),
                        "swiglu_mixture_backward: bf16 outputs must be float and match H");
    require(r >= 1 && r <= fused_max_rank, "swiglu_mixture_backward rank ", r, ": the fused kernel takes 1..",
            fused_max_rank);
    const MatrixView<T> dHs[2] = {dHg, dHu};
    const MatrixView<bf16> dHbs[2] = {dHgb, dHub};
    T* const dzs[2] = {dzg, dzu};
    const ConstMatrixView<T> Hs[2] = {Hg, Hu};
    const T* const bs[2] = {bg, bu};
    const T* const zss[2] = {zsg, zsu};
    const T* const* const Fs[2] = {BgT, BuT};
    T* const* const gBs[2] = {gBgT, gBuT};
    if (detail::padded_rank(r) == 4)
        detail::rows_backward_q<detail::SwigluAct, 4>(dHs, dzs, udm, dM, Hs, bs, k, expert, gate, zss, qg, Fs, A2, gA2,
                                                      ldg, gBs, experts, s, r, part, dHbs);
    else
        detail::rows_backward_q<detail::SwigluAct, 8>(dHs, dzs, udm, dM, Hs, bs, k, expert, gate, zss, qg, Fs, A2, gA2,
                                                      ldg, gBs, experts, s, r, part, dHbs);
}

}  // namespace comigs::kernels
