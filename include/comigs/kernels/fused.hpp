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
/// per batch of their GELU sweep for the rows they visit next: spread out like that, the next rows
/// arrive while the arithmetic runs. (The whole next row at once, 16-32 prefetches in a burst, took
/// every L1 miss buffer and stalled the core until memory answered: the passes then ran at the
/// speed of memory plus the speed of the arithmetic instead of the slower of the two.)
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

/// One routed row as the row kernels see it (pointers at the group's first column).
template <int Q, class T>
struct MixRow {
    T* out;                // where the row's sum goes: the token's row of m (forward) or dH (backward)
                           // on its last visit, else its row of the block's partial sums
    const T* prev;         // the token's partial sums so far (not read on its first visit)
    const T* H;            // the token's pre-activation without bias
    const T* dm;           // backward: dL/dm of the token
    const Coef<Q, T>* zs;  // s A1 x of the row
    const Coef<Q, T>* qg;  // backward: g s B2^T dy of the row
    T g;                   // gate weight
    bool first;            // first visit of the token: store instead of add
    T* part;               // the row's partial sums over the group's columns
    bf16* outb;            // when set, the last visit writes the finished row here (bf16), not to out
    bool last;             // last visit of the token
    bool stream;           // the finished row takes streaming stores (fp32 out 64-, bf16 outb 32-byte aligned)
    const T* next_h;       // the H (and, backward, dM) columns of the row visited two rows later,
    const T* next_dm;      // prefetched a line per batch during the GELU sweep; null: none
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

/// Writes the row value v of m or dH at column c: to the bf16 row on the token's last visit when the
/// caller asked for bf16 output, else to the fp32 row.
template <int Q, class T, class B>
inline void put_row(const MixRow<Q, T>& row, Index c, const B& v) {
    if constexpr (std::is_same_v<T, float>) {
        if (row.outb && row.last) {
            store_bf16(row.outb + c, v, row.stream);
            return;
        }
    }
    if (row.stream)
        simd::store_stream(row.out + c, v);
    else
        simd::store(row.out + c, v);
}
template <int Q, class T>
inline void put_row_scalar(const MixRow<Q, T>& row, Index c, T v) {
    if constexpr (std::is_same_v<T, float>) {
        if (row.outb && row.last) {
            row.outb[c] = to_bf16(v);
            return;
        }
    }
    row.out[c] = v;
}

/// Points a row at its sums: it adds to the token's row of the block's partial sums (`partial`, in a
/// per-thread buffer) and writes there until its last visit, which writes `dst` (its row of m or dH)
/// instead, with streaming stores when dst (or the bf16 row) holds whole aligned batches: the
/// finished rows are read next by a GEMM, not by this pass, and streaming them saves reading each
/// line in first (bf16 rows: 7-11% slower passes without it, 2 threads).
template <int Q, class T>
inline void point_sums(MixRow<Q, T>& row, T* dst, T* partial, Index nc) {
    constexpr std::size_t bytes = simd::width<T> * sizeof(T);
    row.prev = partial;
    row.out = row.last && dst ? dst : partial;  // no dst: the last visit writes the bf16 row alone
    // A bf16 row streams 32 bytes per batch: it needs 32-byte alignment (its own row, not dst's).
    const auto aligned = row.outb ? reinterpret_cast<std::uintptr_t>(row.outb) % (bytes / 2) == 0
                                  : reinterpret_cast<std::uintptr_t>(dst) % bytes == 0;
    row.stream = row.last && nc % static_cast<Index>(simd::width<T>) == 0 && aligned;
}
/// The visit-dependent fields of a row (visit i of the order): its first/last flags, its slot of the
/// group's per-row sums, and where its m or dH sums go (point_sums; dst null when the caller passed
/// no fp32 output, dstb its bf16 row or null).
template <int Q, class T>
inline void set_visit(MixRow<Q, T>& row, const MixOrder& order, Index i, T* part, T* dst, bf16* dstb, T* partial,
                      Index nc) {
    row.first = order.first[static_cast<std::size_t>(i)] != 0;
    row.last = order.last[static_cast<std::size_t>(i)] != 0;
    row.part = part;
    row.outb = dstb;
    point_sums(row, dst, partial, nc);
}
/// Points a row at what its GELU sweep prefetches: the H (and, when dM has data, dM) columns from
/// c0 of the token visited at position `pos` of the order; nothing past the order's end.
template <int Q, class T>
inline void point_next(MixRow<Q, T>& row, const MixOrder& order, Index pos, Index k, ConstMatrixView<T> H,
                       ConstMatrixView<T> dM, Index c0) {
    const bool any = pos < static_cast<Index>(order.rows.size());
    const Index t = any ? order.rows[static_cast<std::size_t>(pos)] / k : 0;
    row.next_h = any ? H.row_ptr(t) + c0 : nullptr;
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

/// Forward of R routed rows of one expert on nc columns (fb, fa its packed B1^T and A2 columns, row
/// stride ld; b1 at the first column or null): u = gelu(H + b1 + zs^T B1T), m (= when first, else +=)
/// g u, and part[q] = the partial sum of A2 u over these columns, q < Q. Three sweeps over the
/// columns, the rows side by side in each (they share the factor loads and give the core independent
/// chains): p into su[x] (kept in L1), then u = gelu(p) in place with the gate mix into m, then the A2
/// projection of u. One sweep doing the rank-r update and the GELU together holds 2 Q broadcast
/// coefficients beside the GELU's constants and spills; it ran 10-15% slower.
template <int Q, int R, class T>
inline void mix_forward_rows(const MixRow<Q, T>* rows, const T* b1, const T* fb, const T* fa, T* const* su, Index ld,
                             Index nc) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index cv = nc / w * w;
    B acc[R][Q];
    for (int x = 0; x < R; ++x)
        for (int q = 0; q < Q; ++q) acc[x][q] = B(T(0));
    T zs[R][Q], g[R];
    for (int x = 0; x < R; ++x) {
        for (int q = 0; q < Q; ++q) zs[x][q] = rows[x].zs->v[q];
        g[x] = rows[x].g;
    }
    rank_sweep<Q, R>(su, zs, fb, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = simd::load(rows[x].H + c);
        a1 = b1 ? simd::load(b1 + c) : B(T(0));
    });
    for (Index c = 0; c < cv; c += w) {
        for (int x = 0; x < R; ++x) {
            if (rows[x].next_h) prefetch_line(rows[x].next_h + c);
            const B p = simd::load(su[x] + c);
            const B u = p * gelu_sigmoid(p);
            put_row(rows[x], c, rows[x].first ? B(g[x]) * u : simd::fma(B(g[x]), u, simd::load(rows[x].prev + c)));
            simd::store(su[x] + c, u);
        }
    }
    project_rows<Q, R>(acc, su, fa, ld, cv);
    for (int x = 0; x < R; ++x) {
        T* out = rows[x].part;
        if (cv > 0)
            simd::reduce_add_rows<Q>(acc[x], out);
        else
            for (int q = 0; q < Q; ++q) out[q] = T(0);
        for (Index c = cv; c < nc; ++c) {
            T p0 = rows[x].H[c], p1 = b1 ? b1[c] : T(0);
            for (int q = 0; q < Q; q += 2) {
                p0 += zs[x][q] * fb[q * ld + c];
                p1 += zs[x][q + 1] * fb[(q + 1) * ld + c];
            }
            const T p = p0 + p1;
            const T u = p * gelu_sigmoid_scalar(p);
            put_row_scalar(rows[x], c, rows[x].first ? g[x] * u : rows[x].prev[c] + g[x] * u);
            for (int q = 0; q < Q; ++q) out[q] += fa[q * ld + c] * u;
        }
    }
}

/// Backward of R routed rows of one expert on nc columns (layout as mix_forward_rows), with dm = dL/dm
/// of each row's token and qg = g s B2^T dy: du = g dm + qg^T A2, p recomputed, u = gelu(p),
/// dp = du * gelu'(p); dH (= when first, else +=) dp, part[q] = the partial sum of B1T dp (q < Q) and
/// part[Q] of u . dm; u and dp go to the rows su[x], sd[x] for the gradient sweep (mix_grad_span).
/// The B1T dp sums are a second sweep over sd, as the A2 projection in mix_forward_rows.
template <int Q, int R, class T>
inline void mix_backward_rows(const MixRow<Q, T>* rows, const T* b1, const T* fb, const T* fa, T* const* su,
                              T* const* sd, Index ld, Index nc) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index cv = nc / w * w;
    B acc[R][Q], dot[R];
    T zs[R][Q], qg[R][Q], g[R];
    for (int x = 0; x < R; ++x) {
        dot[x] = B(T(0));
        for (int q = 0; q < Q; ++q) {
            acc[x][q] = B(T(0));
            zs[x][q] = rows[x].zs->v[q];
            qg[x][q] = rows[x].qg->v[q];
        }
        g[x] = rows[x].g;
    }
    // Three sweeps over the columns, each holding few coefficients and short chains (one sweep doing
    // all of it keeps 4 Q broadcast coefficients, spills, and ran ~10% slower): p into su, du into
    // sd, then row by row u = gelu(p) and dp = du gelu'(p) in place with u . dm and the dH sums.
    rank_sweep<Q, R>(su, zs, fb, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = simd::load(rows[x].H + c);
        a1 = b1 ? simd::load(b1 + c) : B(T(0));
    });
    rank_sweep<Q, R>(sd, qg, fa, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = B(g[x]) * simd::load(rows[x].dm + c);
        a1 = B(T(0));
    });
    // The R rows side by side: each element is one long dependency chain (GELU and its derivative),
    // and R independent chains per column batch give the core more to overlap.
    for (Index c = 0; c < cv; c += w) {
        for (int x = 0; x < R; ++x) {
            const MixRow<Q, T>& row = rows[x];
            if (row.next_h) prefetch_line(row.next_h + c);
            if (row.next_dm) prefetch_line(row.next_dm + c);
            const B p = simd::load(su[x] + c);
            B oms;
            const B s = gelu_sigmoid(p, &oms);
            const B u = p * s;
            const B dp = simd::load(sd[x] + c) * gelu_grad_from(p, s, oms);
            dot[x] = simd::fma(u, simd::load(row.dm + c), dot[x]);
            put_row(row, c, row.first ? dp : simd::load(row.prev + c) + dp);
            simd::store(su[x] + c, u);
            simd::store(sd[x] + c, dp);
        }
    }
    project_rows<Q, R>(acc, sd, fb, ld, cv);
    for (int x = 0; x < R; ++x) {
        T* out = rows[x].part;
        if (cv > 0) {
            simd::reduce_add_rows<Q>(acc[x], out);
            out[Q] = simd::reduce_add(dot[x]);
        } else {
            for (int q = 0; q <= Q; ++q) out[q] = T(0);
        }
    }
    for (Index c = cv; c < nc; ++c)
        for (int x = 0; x < R; ++x) {
            const T dmv = rows[x].dm[c];
            T du0 = g[x] * dmv, du1 = T(0), p0 = rows[x].H[c], p1 = b1 ? b1[c] : T(0);
            for (int q = 0; q < Q; q += 2) {
                du0 += qg[x][q] * fa[q * ld + c];
                du1 += qg[x][q + 1] * fa[(q + 1) * ld + c];
                p0 += zs[x][q] * fb[q * ld + c];
                p1 += zs[x][q + 1] * fb[(q + 1) * ld + c];
            }
            const T p = p0 + p1;
            T oms;
            const T s = gelu_sigmoid_scalar(p, &oms);
            const T u = p * s;
            const T dp = (du0 + du1) * gelu_grad_from_scalar(p, s, oms);
            T* out = rows[x].part;
            out[Q] += u * dmv;
            put_row_scalar(rows[x], c, rows[x].first ? dp : rows[x].prev[c] + dp);
            su[x][c] = u;
            sd[x][c] = dp;
            for (int q = 0; q < Q; ++q) out[q] += fb[q * ld + c] * dp;
        }
}

/// The gradient sweep of one span (rows of one expert): ga[q][c] += sum_x qg_x[q] su[x][c] and
/// gb[q][c] += sum_x zs_x[q] sd[x][c] over the span's `count` rows, ga and gb packed [Q, nc], xq and
/// xz the rows' coefficients [count, Q]: register-blocked rank-Q outer products (lowrank.hpp).
template <int Q, class T>
inline void mix_grad_span(T* ga, T* gb, Index nc, Index ld, const T* xq, const T* xz, const T* su, const T* sd,
                          Index count) {
    constexpr Index cb = 2 * static_cast<Index>(simd::width<T>);
    const Index cv = nc / cb * cb;
    if (cv > 0) {
        lowrank_outer_cols<Q>(ga, ld, xq, Q, su, ld, static_cast<const Index*>(nullptr), count, 0, cv, T(1));
        lowrank_outer_cols<Q>(gb, ld, xz, Q, sd, ld, static_cast<const Index*>(nullptr), count, 0, cv, T(1));
    }
    for (Index q = 0; q < Q; ++q)
        for (Index c = cv; c < nc; ++c) {
            T a = T(0), b = T(0);
            for (Index x = 0; x < count; ++x) {
                a += xq[x * Q + q] * su[x * ld + c];
                b += xz[x * Q + q] * sd[x * ld + c];
            }
            ga[q * ld + c] += a;
            gb[q * ld + c] += b;
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

template <int Q, class T>
void mixture_forward_q(MatrixView<T> M, T* z2, ConstMatrixView<T> H, const T* b1, Index k, const std::int32_t* expert,
                       const T* gate, const T* zs, const T* const* B1T, const T* const* A2, Index experts, Index r,
                       std::vector<T>& part, MatrixView<bf16> Mb) {
    const Index n = H.rows, h = H.cols, rows = n * k;
    const Index W = std::max<Index>(1, mix_group_cols()), groups = (h + W - 1) / W;
    const Index tb = std::max<Index>(1, mix_token_block());
    MixOrder order;
    order.build(n, k, experts, expert, tb);
    std::vector<Coef<Q, T>> zc;
    zc.reserve(static_cast<std::size_t>(rows));
    for (Index i = 0; i < rows; ++i) zc.emplace_back(zs + i * r, r);
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
        auto& buf = fused_scratch<T>();
        buf.resize(static_cast<std::size_t>(2 * fsize));
        T* fb = buf.data();
        T* fa = fb + fsize;
        if (!direct) {
            pack_factor_cols<Q>(fb, B1T, experts, r, h, c0, nc, ncp);
            pack_factor_cols<Q>(fa, A2, experts, r, h, c0, nc, ncp);
        }
        const Index ld = direct ? h : ncp;
        auto& rowbuf = fused_rows_scratch<T>();
        rowbuf.resize(static_cast<std::size_t>(2 * ncp));
        T* const su[2] = {rowbuf.data(), rowbuf.data() + ncp};
        auto& partial = fused_partial_scratch<T>();
        partial.resize(static_cast<std::size_t>(tb * ncp));
        T* pg = part.data() + grp * rows * Q;
        const T* bias = b1 ? b1 + c0 : nullptr;
        // Span sp = (block, expert) of the visiting order: expert sp % experts.
        for (Index sp = sp0; sp < sp1; ++sp) {
            const Index e = sp % experts;
            const T* fbe = direct ? B1T[e] + c0 : fb + e * Q * ncp;
            const T* fae = direct ? A2[e] + c0 : fa + e * Q * ncp;
            const Index x0 = order.span[static_cast<std::size_t>(sp)], x1 = order.span[static_cast<std::size_t>(sp + 1)];
            for (Index x = x0; x < x1; x += 2) {
                const int R = x + 1 < x1 ? 2 : 1;
                MixRow<Q, T> rw[2];
                for (int y = 0; y < R; ++y) {
                    const Index i = order.rows[static_cast<std::size_t>(x + y)], t = i / k;
                    MixRow<Q, T>& row = rw[y];
                    row.H = H.row_ptr(t) + c0;
                    row.dm = nullptr;
                    row.zs = &zc[static_cast<std::size_t>(i)];
                    row.qg = nullptr;
                    row.g = gate[i];
                    set_visit(row, order, i, pg + i * Q, M.data ? M.row_ptr(t) + c0 : nullptr,
                              Mb.data ? Mb.row_ptr(t) + c0 : nullptr, partial.data() + (t % tb) * ncp, nc);
                    point_next(row, order, x + y + 2, k, H, ConstMatrixView<T>(), c0);
                }
                if (R == 2)
                    mix_forward_rows<Q, 2>(rw, bias, fbe, fae, su, ld, nc);
                else
                    mix_forward_rows<Q, 1>(rw, bias, fbe, fae, su, ld, nc);
            }
        }
        simd::stream_fence();
    }, [&] { sum_groups_part(r == Q ? z2 : full.data(), part.data(), groups, rows * Q); });
    if (r != Q)
        for (Index i = 0; i < rows; ++i)
            for (Index q = 0; q < r; ++q) z2[i * r + q] = full[static_cast<std::size_t>(i * Q + q)];
}

template <int Q, class T>
void mixture_backward_q(MatrixView<T> dH, T* dz, T* udm, ConstMatrixView<T> dM, ConstMatrixView<T> H, const T* b1,
                        Index k, const std::int32_t* expert, const T* gate, const T* zs, const T* qg,
                        const T* const* B1T, const T* const* A2, T* const* gA2, Index ldg, T* const* gB1T,
                        Index experts, T s, Index r, std::vector<T>& part, MatrixView<bf16> dHb) {
    const Index n = H.rows, h = H.cols, rows = n * k;
    const Index W = std::max<Index>(1, mix_group_cols()), groups = (h + W - 1) / W;
    constexpr Index P = Q + 1;
    const Index tb = std::max<Index>(1, mix_token_block());
    MixOrder order;
    order.build(n, k, experts, expert, tb);
    std::vector<Coef<Q, T>> zc, qc;
    zc.reserve(static_cast<std::size_t>(rows));
    qc.reserve(static_cast<std::size_t>(rows));
    for (Index i = 0; i < rows; ++i) {
        zc.emplace_back(zs + i * r, r);
        qc.emplace_back(qg + i * r, r);
    }
    part.resize(static_cast<std::size_t>(groups * rows * P));
    Index longest = 0;
    for (std::size_t sp = 0; sp + 1 < order.span.size(); ++sp) longest = std::max(longest, order.span[sp + 1] - order.span[sp]);
    const bool par = rows * h >= mix_parallel_min();
    std::vector<T> sums(static_cast<std::size_t>(rows * P));
    const Index spans = static_cast<Index>(order.span.size()) - 1;
    // Each unit's dA2 and dB1^T parts ([experts Q, ncp] each); the parts are added in finish.
    const Index ustride = 2 * experts * Q * padded_cols<T>(std::min(W, h));
    auto& ugrads = fused_unit_grads<T>();
    ugrads.resize(static_cast<std::size_t>(groups * mix_token_parts * ustride));
    for_groups(h, par, [&](Index c0, Index c1, Index grp, Index tp) {
        const Index nc = c1 - c0, ncp = padded_cols<T>(nc), fsize = experts * Q * ncp;
        T* ga = ugrads.data() + (grp * mix_token_parts + tp) * ustride;  // dA2 of the unit, from zero
        T* gb = ga + fsize;                                                // dB1^T of the unit, from zero
        std::fill(ga, ga + 2 * fsize, T(0));
        Index sp0, sp1;
        part_spans(spans, experts, tp, sp0, sp1);
        if (sp0 == sp1) return;
        auto& buf = fused_scratch<T>();
        buf.resize(static_cast<std::size_t>(2 * fsize));
        T* fb = buf.data();
        T* fa = fb + fsize;
        pack_factor_cols<Q>(fb, B1T, experts, r, h, c0, nc, ncp);
        pack_factor_cols<Q>(fa, A2, experts, r, h, c0, nc, ncp);
        T* pg = part.data() + grp * rows * P;
        const T* bias = b1 ? b1 + c0 : nullptr;
        // Per span: u and dp rows, and the rows' coefficients, for the gradient sweep.
        auto& rowbuf = fused_rows_scratch<T>();
        rowbuf.resize(static_cast<std::size_t>(longest * (2 * ncp + 2 * Q)));
        T* su = rowbuf.data();
        T* sd = su + longest * ncp;
        T* xq = sd + longest * ncp;
        T* xz = xq + longest * Q;
        auto& partial = fused_partial_scratch<T>();
        partial.resize(static_cast<std::size_t>(tb * ncp));
        for (Index sp = sp0; sp < sp1; ++sp) {
            const Index e = sp % experts, off = e * Q * ncp;
            const Index x0 = order.span[static_cast<std::size_t>(sp)], x1 = order.span[static_cast<std::size_t>(sp + 1)];
            if (x1 == x0) continue;
            for (Index x = x0; x < x1; x += 2) {
                const int R = x + 1 < x1 ? 2 : 1;
                MixRow<Q, T> rw[2];
                T* sur[2];
                T* sdr[2];
                for (int y = 0; y < R; ++y) {
                    const Index i = order.rows[static_cast<std::size_t>(x + y)], t = i / k;
                    MixRow<Q, T>& row = rw[y];
                    row.H = H.row_ptr(t) + c0;
                    row.dm = dM.row_ptr(t) + c0;
                    row.zs = &zc[static_cast<std::size_t>(i)];
                    row.qg = &qc[static_cast<std::size_t>(i)];
                    row.g = gate[i];
                    set_visit(row, order, i, pg + i * P, dH.data ? dH.row_ptr(t) + c0 : nullptr,
                              dHb.data ? dHb.row_ptr(t) + c0 : nullptr, partial.data() + (t % tb) * ncp, nc);
                    sur[y] = su + (x + y - x0) * ncp;
                    sdr[y] = sd + (x + y - x0) * ncp;
                    std::copy_n(qc[static_cast<std::size_t>(i)].v, Q, xq + (x + y - x0) * Q);
                    std::copy_n(zc[static_cast<std::size_t>(i)].v, Q, xz + (x + y - x0) * Q);
                    point_next(row, order, x + y + 2, k, H, dM, c0);
                }
                if (R == 2)
                    mix_backward_rows<Q, 2>(rw, bias, fb + off, fa + off, sur, sdr, ncp, nc);
                else
                    mix_backward_rows<Q, 1>(rw, bias, fb + off, fa + off, sur, sdr, ncp, nc);
            }
            mix_grad_span<Q>(ga + off, gb + off, nc, ncp, xq, xz, su, sd, x1 - x0);
        }
        simd::stream_fence();
    }, [&] {
        sum_groups_part(sums.data(), part.data(), groups, rows * P);
        // The calling thread's groups: dA2 += the parts' sums, dB1^T = the parts' sums, added in part order.
        Index g0, g1;
        thread_range(groups, g0, g1);
        for (Index g = g0; g < g1; ++g) {
            const Index c0 = g * W, nc = std::min(h, c0 + W) - c0, ncp = padded_cols<T>(nc), fsize = experts * Q * ncp;
            const T* u0 = ugrads.data() + g * mix_token_parts * ustride;
            for (Index e = 0; e < experts; ++e)
                for (Index q = 0; q < r; ++q) {
                    const Index o = (e * Q + q) * ncp;
                    T* da = gA2[e] + q * ldg + c0;
                    T* db = gB1T[e] + q * h + c0;
                    for (Index c = 0; c < nc; ++c) {
                        T a = u0[o + c], b = u0[fsize + o + c];
                        for (Index pt = 1; pt < mix_token_parts; ++pt) {
                            a += u0[pt * ustride + o + c];
                            b += u0[pt * ustride + fsize + o + c];
                        }
                        da[c] += a;
                        db[c] = b;
                    }
                }
        }
    });
    for (Index i = 0; i < rows; ++i) {
        for (Index q = 0; q < r; ++q) dz[i * r + q] = s * sums[static_cast<std::size_t>(i * P + q)];
        udm[i] = sums[static_cast<std::size_t>(i * P + Q)];
    }
}

// ---- SwiGLU: the same passes with two first-stage linears (gate g, up u) -------------------------------
// Per routed row: pg = Hg + bg + zg^T BgT, pu = Hu + bu + zu^T BuT, a = silu(pg) pu; m and z2 = A2 a as
// for GELU. Backward, with da = g dm + qg^T A2: dpg = da pu silu'(pg), dpu = da silu(pg), both summed
// per token (dHg, dHu), dzg = s BgT dpg, dzu = s BuT dpu, and dA2, dBg^T, dBu^T accumulated in the
// same pass. The row of the gate linear (MixRow) carries m / dHg and the row's sums; a second MixRow
// per routed row carries the up linear's H, zs and (backward) its dHu output.

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

/// Forward of R routed rows of one expert on nc columns: gate rows `rows` (H = Hg, zs = zg, the m
/// output and the z2 sums) and up rows `ups` (H = Hu, zs = zu); fg, fu, fa the packed BgT, BuT and A2
/// columns (row stride ld); bg, bu at the first column or null. Three sweeps as mix_forward_rows: pg
/// into sg[x] and pu into sv[x], then a = silu(pg) pu (into sg) with the gate mix into m, then A2 a.
template <int Q, int R, class T>
inline void swiglu_forward_rows(const MixRow<Q, T>* rows, const MixRow<Q, T>* ups, const T* bg, const T* bu,
                                const T* fg, const T* fu, const T* fa, T* const* sg, T* const* sv, Index ld, Index nc) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index cv = nc / w * w;
    T zg[R][Q], zu[R][Q], g[R];
    for (int x = 0; x < R; ++x) {
        for (int q = 0; q < Q; ++q) {
            zg[x][q] = rows[x].zs->v[q];
            zu[x][q] = ups[x].zs->v[q];
        }
        g[x] = rows[x].g;
    }
    rank_sweep<Q, R>(sg, zg, fg, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = simd::load(rows[x].H + c);
        a1 = bg ? simd::load(bg + c) : B(T(0));
    });
    rank_sweep<Q, R>(sv, zu, fu, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = simd::load(ups[x].H + c);
        a1 = bu ? simd::load(bu + c) : B(T(0));
    });
    for (Index c = 0; c < cv; c += w) {
        for (int x = 0; x < R; ++x) {
            if (rows[x].next_h) prefetch_line(rows[x].next_h + c);
            if (ups[x].next_h) prefetch_line(ups[x].next_h + c);
            const B pg = simd::load(sg[x] + c);
            B oms;
            const B a = pg * silu_sigmoid(pg, oms) * simd::load(sv[x] + c);
            put_row(rows[x], c, rows[x].first ? B(g[x]) * a : simd::fma(B(g[x]), a, simd::load(rows[x].prev + c)));
            simd::store(sg[x] + c, a);
        }
    }
    B acc[R][Q];
    for (int x = 0; x < R; ++x)
        for (int q = 0; q < Q; ++q) acc[x][q] = B(T(0));
    project_rows<Q, R>(acc, sg, fa, ld, cv);
    for (int x = 0; x < R; ++x) {
        T* out = rows[x].part;
        if (cv > 0)
            simd::reduce_add_rows<Q>(acc[x], out);
        else
            for (int q = 0; q < Q; ++q) out[q] = T(0);
        for (Index c = cv; c < nc; ++c) {
            T g0 = rows[x].H[c] + (bg ? bg[c] : T(0)), u0 = ups[x].H[c] + (bu ? bu[c] : T(0)), g1 = T(0), u1 = T(0);
            for (int q = 0; q < Q; q += 2) {
                g0 += zg[x][q] * fg[q * ld + c];
                g1 += zg[x][q + 1] * fg[(q + 1) * ld + c];
                u0 += zu[x][q] * fu[q * ld + c];
                u1 += zu[x][q + 1] * fu[(q + 1) * ld + c];
            }
            const T pg = g0 + g1;
            T oms;
            const T a = pg * silu_sigmoid_scalar(pg, oms) * (u0 + u1);
            put_row_scalar(rows[x], c, rows[x].first ? g[x] * a : rows[x].prev[c] + g[x] * a);
            for (int q = 0; q < Q; ++q) out[q] += fa[q * ld + c] * a;
        }
    }
}

/// Backward of R routed rows (layout as swiglu_forward_rows; the gate rows carry dm, qg and the dHg
/// output, the up rows the dHu output): da = g dm + qg^T A2, pg and pu recomputed, a = silu(pg) pu,
/// dpg = da pu silu'(pg), dpu = da silu(pg); dHg and dHu (= when first, else +=); part[q] = the partial
/// sums of BgT dpg, part[Q + q] of BuT dpu (q < Q), part[2 Q] of a . dm. a, dpg and dpu go to su[x],
/// sd[x] and sv[x] for the gradient sweep.
template <int Q, int R, class T>
inline void swiglu_backward_rows(const MixRow<Q, T>* rows, const MixRow<Q, T>* ups, const T* bg, const T* bu,
                                 const T* fg, const T* fu, const T* fa, T* const* su, T* const* sd, T* const* sv,
                                 Index ld, Index nc) {
    using B = simd::batch<T>;
    constexpr Index w = static_cast<Index>(simd::width<T>);
    const Index cv = nc / w * w;
    B dot[R];
    T zg[R][Q], zu[R][Q], qg[R][Q], g[R];
    for (int x = 0; x < R; ++x) {
        dot[x] = B(T(0));
        for (int q = 0; q < Q; ++q) {
            zg[x][q] = rows[x].zs->v[q];
            zu[x][q] = ups[x].zs->v[q];
            qg[x][q] = rows[x].qg->v[q];
        }
        g[x] = rows[x].g;
    }
    rank_sweep<Q, R>(su, zg, fg, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = simd::load(rows[x].H + c);
        a1 = bg ? simd::load(bg + c) : B(T(0));
    });
    rank_sweep<Q, R>(sv, zu, fu, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = simd::load(ups[x].H + c);
        a1 = bu ? simd::load(bu + c) : B(T(0));
    });
    rank_sweep<Q, R>(sd, qg, fa, ld, cv, [&](int x, Index c, B& a0, B& a1) {
        a0 = B(g[x]) * simd::load(rows[x].dm + c);
        a1 = B(T(0));
    });
    for (Index c = 0; c < cv; c += w) {
        for (int x = 0; x < R; ++x) {
            const MixRow<Q, T>& row = rows[x];
            if (row.next_h) prefetch_line(row.next_h + c);
            if (ups[x].next_h) prefetch_line(ups[x].next_h + c);
            if (row.next_dm) prefetch_line(row.next_dm + c);
            const B pg = simd::load(su[x] + c), pu = simd::load(sv[x] + c), da = simd::load(sd[x] + c);
            B oms;
            const B s = silu_sigmoid(pg, oms);
            const B silu = pg * s;
            const B a = silu * pu;
            dot[x] = simd::fma(a, simd::load(row.dm + c), dot[x]);
            const B dpg = da * pu * simd::fma(silu, oms, s);
            const B dpu = da * silu;
            put_row(row, c, row.first ? dpg : simd::load(row.prev + c) + dpg);
            put_row(ups[x], c, row.first ? dpu : simd::load(ups[x].prev + c) + dpu);
            simd::store(su[x] + c, a);
            simd::store(sd[x] + c, dpg);
            simd::store(sv[x] + c, dpu);
        }
    }
    {
        B acc[R][Q];
        for (int x = 0; x < R; ++x)
            for (int q = 0; q < Q; ++q) acc[x][q] = B(T(0));
        project_rows<Q, R>(acc, sd, fg, ld, cv);
        for (int x = 0; x < R; ++x) {
            T* out = rows[x].part;
            if (cv > 0) {
                simd::reduce_add_rows<Q>(acc[x], out);
                out[2 * Q] = simd::reduce_add(dot[x]);
            } else {
                for (int q = 0; q < Q; ++q) out[q] = T(0);
                out[2 * Q] = T(0);
            }
        }
    }
    {
        B acc[R][Q];
        for (int x = 0; x < R; ++x)
            for (int q = 0; q < Q; ++q) acc[x][q] = B(T(0));
        project_rows<Q, R>(acc, sv, fu, ld, cv);
        for (int x = 0; x < R; ++x) {
            T* out = rows[x].part + Q;
            if (cv > 0)
                simd::reduce_add_rows<Q>(acc[x], out);
            else
                for (int q = 0; q < Q; ++q) out[q] = T(0);
        }
    }
    for (Index c = cv; c < nc; ++c)
        for (int x = 0; x < R; ++x) {
            const T dmv = rows[x].dm[c];
            T da0 = g[x] * dmv, da1 = T(0), g0 = rows[x].H[c] + (bg ? bg[c] : T(0)), g1 = T(0),
              u0 = ups[x].H[c] + (bu ? bu[c] : T(0)), u1 = T(0);
            for (int q = 0; q < Q; q += 2) {
                da0 += qg[x][q] * fa[q * ld + c];
                da1 += qg[x][q + 1] * fa[(q + 1) * ld + c];
                g0 += zg[x][q] * fg[q * ld + c];
                g1 += zg[x][q + 1] * fg[(q + 1) * ld + c];
                u0 += zu[x][q] * fu[q * ld + c];
                u1 += zu[x][q + 1] * fu[(q + 1) * ld + c];
            }
            const T pg = g0 + g1, pu = u0 + u1, da = da0 + da1;
            T oms;
            const T s = silu_sigmoid_scalar(pg, oms);
            const T silu = pg * s, a = silu * pu;
            const T dpg = da * pu * (silu * oms + s), dpu = da * silu;
            T* out = rows[x].part;
            out[2 * Q] += a * dmv;
            const bool first = rows[x].first;
            put_row_scalar(rows[x], c, first ? dpg : rows[x].prev[c] + dpg);
            put_row_scalar(ups[x], c, first ? dpu : ups[x].prev[c] + dpu);
            su[x][c] = a;
            sd[x][c] = dpg;
            sv[x][c] = dpu;
            for (int q = 0; q < Q; ++q) {
                out[q] += fg[q * ld + c] * dpg;
                out[Q + q] += fu[q * ld + c] * dpu;
            }
        }
}

/// gb[q][c] += sum_x xz_x[q] sd[x][c] over a span's rows (mix_grad_span's second half alone).
template <int Q, class T>
inline void mix_grad_one(T* gb, Index nc, Index ld, const T* xz, const T* sd, Index count) {
    constexpr Index cb = 2 * static_cast<Index>(simd::width<T>);
    const Index cv = nc / cb * cb;
    if (cv > 0) lowrank_outer_cols<Q>(gb, ld, xz, Q, sd, ld, static_cast<const Index*>(nullptr), count, 0, cv, T(1));
    for (Index q = 0; q < Q; ++q)
        for (Index c = cv; c < nc; ++c) {
            T b = T(0);
            for (Index x = 0; x < count; ++x) b += xz[x * Q + q] * sd[x * ld + c];
            gb[q * ld + c] += b;
        }
}

/// The SwiGLU forward driver (mixture_forward_q with the up linear beside the gate).
template <int Q, class T>
void swiglu_forward_q(MatrixView<T> M, T* z2, ConstMatrixView<T> Hg, ConstMatrixView<T> Hu, const T* bg, const T* bu,
                      Index k, const std::int32_t* expert, const T* gate, const T* zsg, const T* zsu,
                      const T* const* BgT, const T* const* BuT, const T* const* A2, Index experts, Index r,
                      std::vector<T>& part, MatrixView<bf16> Mb) {
    const Index n = Hg.rows, h = Hg.cols, rows = n * k;
    const Index W = std::max<Index>(1, mix_group_cols()), groups = (h + W - 1) / W;
    const Index tb = std::max<Index>(1, mix_token_block());
    MixOrder order;
    order.build(n, k, experts, expert, tb);
    std::vector<Coef<Q, T>> zcg, zcu;
    zcg.reserve(static_cast<std::size_t>(rows));
    zcu.reserve(static_cast<std::size_t>(rows));
    for (Index i = 0; i < rows; ++i) {
        zcg.emplace_back(zsg + i * r, r);
        zcu.emplace_back(zsu + i * r, r);
    }
    part.resize(static_cast<std::size_t>(groups * rows * Q));
    const bool par = rows * h >= mix_parallel_min();
    const bool direct = r == Q && rows < 4 * experts;  // decode: the factors read in place
    std::vector<T> full(r == Q ? 0 : static_cast<std::size_t>(rows * Q));
    const Index spans = static_cast<Index>(order.span.size()) - 1;
    for_groups(h, par, [&](Index c0, Index c1, Index grp, Index tp) {
        Index sp0, sp1;
        part_spans(spans, experts, tp, sp0, sp1);
        if (sp0 == sp1) return;
        const Index nc = c1 - c0, ncp = padded_cols<T>(nc), fsize = direct ? 0 : experts * Q * ncp;
        auto& buf = fused_scratch<T>();
        buf.resize(static_cast<std::size_t>(3 * fsize));
        T* fg = buf.data();
        T* fu = fg + fsize;
        T* fa = fu + fsize;
        if (!direct) {
            pack_factor_cols<Q>(fg, BgT, experts, r, h, c0, nc, ncp);
            pack_factor_cols<Q>(fu, BuT, experts, r, h, c0, nc, ncp);
            pack_factor_cols<Q>(fa, A2, experts, r, h, c0, nc, ncp);
        }
        const Index ld = direct ? h : ncp;
        auto& rowbuf = fused_rows_scratch<T>();
        rowbuf.resize(static_cast<std::size_t>(4 * ncp));
        T* const sg[2] = {rowbuf.data(), rowbuf.data() + ncp};
        T* const sv[2] = {rowbuf.data() + 2 * ncp, rowbuf.data() + 3 * ncp};
        auto& partial = fused_partial_scratch<T>();
        partial.resize(static_cast<std::size_t>(tb * ncp));
        T* pg = part.data() + grp * rows * Q;
        const T* biasg = bg ? bg + c0 : nullptr;
        const T* biasu = bu ? bu + c0 : nullptr;
        for (Index sp = sp0; sp < sp1; ++sp) {
            const Index e = sp % experts;
            const T* fge = direct ? BgT[e] + c0 : fg + e * Q * ncp;
            const T* fue = direct ? BuT[e] + c0 : fu + e * Q * ncp;
            const T* fae = direct ? A2[e] + c0 : fa + e * Q * ncp;
            const Index x0 = order.span[static_cast<std::size_t>(sp)], x1 = order.span[static_cast<std::size_t>(sp + 1)];
            for (Index x = x0; x < x1; x += 2) {
                const int R = x + 1 < x1 ? 2 : 1;
                MixRow<Q, T> rw[2], up[2];
                for (int y = 0; y < R; ++y) {
                    const Index i = order.rows[static_cast<std::size_t>(x + y)], t = i / k;
                    MixRow<Q, T>& row = rw[y];
                    row.H = Hg.row_ptr(t) + c0;
                    row.dm = nullptr;
                    row.zs = &zcg[static_cast<std::size_t>(i)];
                    row.qg = nullptr;
                    row.g = gate[i];
                    set_visit(row, order, i, pg + i * Q, M.data ? M.row_ptr(t) + c0 : nullptr,
                              Mb.data ? Mb.row_ptr(t) + c0 : nullptr, partial.data() + (t % tb) * ncp, nc);
                    point_next(row, order, x + y + 2, k, Hg, ConstMatrixView<T>(), c0);
                    MixRow<Q, T>& u = up[y];
                    u = MixRow<Q, T>{};
                    u.H = Hu.row_ptr(t) + c0;
                    u.zs = &zcu[static_cast<std::size_t>(i)];
                    point_next(u, order, x + y + 2, k, Hu, ConstMatrixView<T>(), c0);
                }
                if (R == 2)
                    swiglu_forward_rows<Q, 2>(rw, up, biasg, biasu, fge, fue, fae, sg, sv, ld, nc);
                else
                    swiglu_forward_rows<Q, 1>(rw, up, biasg, biasu, fge, fue, fae, sg, sv, ld, nc);
            }
        }
        simd::stream_fence();
    }, [&] { sum_groups_part(r == Q ? z2 : full.data(), part.data(), groups, rows * Q); });
    if (r != Q)
        for (Index i = 0; i < rows; ++i)
            for (Index q = 0; q < r; ++q) z2[i * r + q] = full[static_cast<std::size_t>(i * Q + q)];
}

/// The SwiGLU backward driver (mixture_backward_q with the up linear beside the gate).
template <int Q, class T>
void swiglu_backward_q(MatrixView<T> dHg, MatrixView<T> dHu, T* dzg, T* dzu, T* udm, ConstMatrixView<T> dM,
                       ConstMatrixView<T> Hg, ConstMatrixView<T> Hu, const T* bg, const T* bu, Index k,
                       const std::int32_t* expert, const T* gate, const T* zsg, const T* zsu, const T* qg,
                       const T* const* BgT, const T* const* BuT, const T* const* A2, T* const* gA2, Index ldg,
                       T* const* gBgT, T* const* gBuT, Index experts, T s, Index r, std::vector<T>& part,
                       MatrixView<bf16> dHgb, MatrixView<bf16> dHub) {
    const Index n = Hg.rows, h = Hg.cols, rows = n * k;
    const Index W = std::max<Index>(1, mix_group_cols()), groups = (h + W - 1) / W;
    constexpr Index P = 2 * Q + 1;
    const Index tb = std::max<Index>(1, mix_token_block());
    MixOrder order;
    order.build(n, k, experts, expert, tb);
    std::vector<Coef<Q, T>> zcg, zcu, qc;
    zcg.reserve(static_cast<std::size_t>(rows));
    zcu.reserve(static_cast<std::size_t>(rows));
    qc.reserve(static_cast<std::size_t>(rows));
    for (Index i = 0; i < rows; ++i) {
        zcg.emplace_back(zsg + i * r, r);
        zcu.emplace_back(zsu + i * r, r);
        qc.emplace_back(qg + i * r, r);
    }
    part.resize(static_cast<std::size_t>(groups * rows * P));
    Index longest = 0;
    for (std::size_t sp = 0; sp + 1 < order.span.size(); ++sp) longest = std::max(longest, order.span[sp + 1] - order.span[sp]);
    const bool par = rows * h >= mix_parallel_min();
    std::vector<T> sums(static_cast<std::size_t>(rows * P));
    const Index spans = static_cast<Index>(order.span.size()) - 1;
    // Each unit's dA2, dBg^T and dBu^T parts ([experts Q, ncp] each); the parts are added in finish.
    const Index ustride = 3 * experts * Q * padded_cols<T>(std::min(W, h));
    auto& ugrads = fused_unit_grads<T>();
    ugrads.resize(static_cast<std::size_t>(groups * mix_token_parts * ustride));
    for_groups(h, par, [&](Index c0, Index c1, Index grp, Index tp) {
        const Index nc = c1 - c0, ncp = padded_cols<T>(nc), fsize = experts * Q * ncp;
        T* ga = ugrads.data() + (grp * mix_token_parts + tp) * ustride;
        T* gbg = ga + fsize;
        T* gbu = gbg + fsize;
        std::fill(ga, ga + 3 * fsize, T(0));
        Index sp0, sp1;
        part_spans(spans, experts, tp, sp0, sp1);
        if (sp0 == sp1) return;
        auto& buf = fused_scratch<T>();
        buf.resize(static_cast<std::size_t>(3 * fsize));
        T* fg = buf.data();
        T* fu = fg + fsize;
        T* fa = fu + fsize;
        pack_factor_cols<Q>(fg, BgT, experts, r, h, c0, nc, ncp);
        pack_factor_cols<Q>(fu, BuT, experts, r, h, c0, nc, ncp);
        pack_factor_cols<Q>(fa, A2, experts, r, h, c0, nc, ncp);
        T* pg = part.data() + grp * rows * P;
        const T* biasg = bg ? bg + c0 : nullptr;
        const T* biasu = bu ? bu + c0 : nullptr;
        auto& rowbuf = fused_rows_scratch<T>();
        rowbuf.resize(static_cast<std::size_t>(longest * (3 * ncp + 3 * Q)));
        T* su = rowbuf.data();
        T* sd = su + longest * ncp;
        T* sv = sd + longest * ncp;
        T* xq = sv + longest * ncp;
        T* xzg = xq + longest * Q;
        T* xzu = xzg + longest * Q;
        auto& partial = fused_partial_scratch<T>();
        partial.resize(static_cast<std::size_t>(2 * tb * ncp));
        T* partial_u = partial.data() + tb * ncp;
        for (Index sp = sp0; sp < sp1; ++sp) {
            const Index e = sp % experts, off = e * Q * ncp;
            const Index x0 = order.span[static_cast<std::size_t>(sp)], x1 = order.span[static_cast<std::size_t>(sp + 1)];
            if (x1 == x0) continue;
            for (Index x = x0; x < x1; x += 2) {
                const int R = x + 1 < x1 ? 2 : 1;
                MixRow<Q, T> rw[2], up[2];
                T* sur[2];
                T* sdr[2];
                T* svr[2];
                for (int y = 0; y < R; ++y) {
                    const Index i = order.rows[static_cast<std::size_t>(x + y)], t = i / k, slot = x + y - x0;
                    MixRow<Q, T>& row = rw[y];
                    row.H = Hg.row_ptr(t) + c0;
                    row.dm = dM.row_ptr(t) + c0;
                    row.zs = &zcg[static_cast<std::size_t>(i)];
                    row.qg = &qc[static_cast<std::size_t>(i)];
                    row.g = gate[i];
                    set_visit(row, order, i, pg + i * P, dHg.data ? dHg.row_ptr(t) + c0 : nullptr,
                              dHgb.data ? dHgb.row_ptr(t) + c0 : nullptr, partial.data() + (t % tb) * ncp, nc);
                    point_next(row, order, x + y + 2, k, Hg, dM, c0);
                    MixRow<Q, T>& u = up[y];
                    u = MixRow<Q, T>{};
                    u.H = Hu.row_ptr(t) + c0;
                    u.zs = &zcu[static_cast<std::size_t>(i)];
                    set_visit(u, order, i, static_cast<T*>(nullptr), dHu.data ? dHu.row_ptr(t) + c0 : nullptr,
                              dHub.data ? dHub.row_ptr(t) + c0 : nullptr, partial_u + (t % tb) * ncp, nc);
                    point_next(u, order, x + y + 2, k, Hu, ConstMatrixView<T>(), c0);
                    sur[y] = su + slot * ncp;
                    sdr[y] = sd + slot * ncp;
                    svr[y] = sv + slot * ncp;
                    std::copy_n(qc[static_cast<std::size_t>(i)].v, Q, xq + slot * Q);
                    std::copy_n(zcg[static_cast<std::size_t>(i)].v, Q, xzg + slot * Q);
                    std::copy_n(zcu[static_cast<std::size_t>(i)].v, Q, xzu + slot * Q);
                }
                if (R == 2)
                    swiglu_backward_rows<Q, 2>(rw, up, biasg, biasu, fg + off, fu + off, fa + off, sur, sdr, svr, ncp, nc);
                else
                    swiglu_backward_rows<Q, 1>(rw, up, biasg, biasu, fg + off, fu + off, fa + off, sur, sdr, svr, ncp, nc);
            }
            mix_grad_span<Q>(ga + off, gbg + off, nc, ncp, xq, xzg, su, sd, x1 - x0);
            mix_grad_one<Q>(gbu + off, nc, ncp, xzu, sv, x1 - x0);
        }
        simd::stream_fence();
    }, [&] {
        sum_groups_part(sums.data(), part.data(), groups, rows * P);
        // The calling thread's groups: dA2 += the parts' sums, dBg^T and dBu^T = the parts' sums, in part order.
        Index g0, g1;
        thread_range(groups, g0, g1);
        for (Index g = g0; g < g1; ++g) {
            const Index c0 = g * W, nc = std::min(h, c0 + W) - c0, ncp = padded_cols<T>(nc), fsize = experts * Q * ncp;
            const T* u0 = ugrads.data() + g * mix_token_parts * ustride;
            for (Index e = 0; e < experts; ++e)
                for (Index q = 0; q < r; ++q) {
                    const Index o = (e * Q + q) * ncp;
                    T* da = gA2[e] + q * ldg + c0;
                    T* dbg = gBgT[e] + q * h + c0;
                    T* dbu = gBuT[e] + q * h + c0;
                    for (Index c = 0; c < nc; ++c) {
                        T a = u0[o + c], b = u0[fsize + o + c], v = u0[2 * fsize + o + c];
                        for (Index pt = 1; pt < mix_token_parts; ++pt) {
                            a += u0[pt * ustride + o + c];
                            b += u0[pt * ustride + fsize + o + c];
                            v += u0[pt * ustride + 2 * fsize + o + c];
                        }
                        da[c] += a;
                        dbg[c] = b;
                        dbu[c] = v;
                    }
                }
        }
    });
    for (Index i = 0; i < rows; ++i) {
        for (Index q = 0; q < r; ++q) {
            dzg[i * r + q] = s * sums[static_cast<std::size_t>(i * P + q)];
            dzu[i * r + q] = s * sums[static_cast<std::size_t>(i * P + Q + q)];
        }
        udm[i] = sums[static_cast<std::size_t>(i * P + 2 * Q)];
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
    if (detail::padded_rank(r) == 4)
        detail::mixture_forward_q<4>(M, z2, H, b1, k, expert, gate, zs, B1T, A2, experts, r, part, Mb);
    else
        detail::mixture_forward_q<8>(M, z2, H, b1, k, expert, gate, zs, B1T, A2, experts, r, part, Mb);
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
    if (detail::padded_rank(r) == 4)
        detail::mixture_backward_q<4>(dH, dz, udm, dM, H, b1, k, expert, gate, zs, qg, B1T, A2, gA2, ldg, gB1T, experts,
                                      s, r, part, dHb);
    else
        detail::mixture_backward_q<8>(dH, dz, udm, dM, H, b1, k, expert, gate, zs, qg, B1T, A2, gA2, ldg, gB1T, experts,
                                      s, r, part, dHb);
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
    if (detail::padded_rank(r) == 4)
        detail::swiglu_forward_q<4>(M, z2, Hg, Hu, bg, bu, k, expert, gate, zsg, zsu, BgT, BuT, A2, experts, r, part, Mb);
    else
        detail::swiglu_forward_q<8>(M, z2, Hg, Hu, bg, bu, k, expert, gate, zsg, zsu, BgT, BuT, A2, experts, r, part, Mb);
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
    if (detail::padded_rank(r) == 4)
        detail::swiglu_backward_q<4>(dHg, dHu, dzg, dzu, udm, dM, Hg, Hu, bg, bu, k, expert, gate, zsg, zsu, qg, BgT, BuT,
                                     A2, gA2, ldg, gBgT, gBuT, experts, s, r, part, dHgb, dHub);
    else
        detail::swiglu_backward_q<8>(dHg, dHu, dzg, dzu, udm, dM, Hg, Hu, bg, bu, k, expert, gate, zsg, zsu, qg, BgT, BuT,
                                     A2, gA2, ldg, gBgT, gBuT, experts, s, r, part, dHgb, dHub);
}

}  // namespace comigs::kernels
