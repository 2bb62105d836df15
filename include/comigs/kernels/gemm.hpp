#pragma once
// Matrix products over row-major views. Every GEMM of the layers goes through here, so that the
// backend can be swapped or specialised (bf16 frozen weights) in one place. Backends: Eigen for
// everything; for large fp32 products oneDNN's sgemm when comigs is built with oneDNN.
#include <algorithm>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef COMIGS_HAVE_ONEDNN
#include <dnnl.h>
#endif

#include "../view.hpp"

namespace comigs::kernels {

/// Whether an operand enters the product as is or transposed.
enum class Op { none, trans };

namespace detail {

/// Test switch: splits of a GEMM between threads are rounded to this many rows/columns; a test sets
/// it to 1 to get uneven splits on small shapes.
inline Index& gemm_split_quantum() {
    static Index q = 16;
    return q;
}
/// Below this many multiply-adds a GEMM runs on the calling thread (Eigen 3.4 keeps products under
/// 2 x 50000 multiply-adds on one thread too, so Eigen never starts its own threads from here).
inline Index& gemm_parallel_min() {
    static Index m = 100000;
    return m;
}

/// fp32 products of at least this many multiply-adds (per thread's part) go to oneDNN's sgemm when
/// comigs is built with oneDNN. Measured at the GPT-2 MLP shapes on AVX-512 (2 threads, each part a
/// single-threaded call): 57 ms for the four base GEMMs against Eigen's 70 ms. Smaller products stay
/// with Eigen, whose numbers the examples' published results were produced with. A test sets it to 0.
inline Index& gemm_onednn_min() {
    static Index m = Index(1) << 26;
    return m;
}

/// gemm_chunked's fp32 products of at least this many multiply-adds in all go to oneDNN's sgemm (chunk
/// by chunk) when comigs is built with it: its small-dimension kernels beat Eigen's on the layers' [N,
/// a few dozen] x [a few dozen, d] products (0.14-0.17 against 0.20-0.26 ms at N = 1024, d = 768, 36
/// columns, 2 threads). The examples' small models stay below it, on Eigen.
inline Index& gemm_onednn_small_min() {
    static Index m = Index(1) << 23;
    return m;
}

#ifdef COMIGS_HAVE_ONEDNN
/// C = alpha op(A) op(B) + beta C through oneDNN's row-major sgemm, on the calling thread when called
/// inside a parallel region (which is how gemm() calls it for large products).
inline void gemm_onednn(MatrixView<float> C, ConstMatrixView<float> A, Op opa, ConstMatrixView<float> B, Op opb,
                        float alpha, float beta) {
    const Index m = C.rows, n = C.cols, k = opa == Op::none ? A.cols : A.rows;
    // Views guarantee stride >= cols; sgemm also wants leading dimensions of at least 1.
    const auto ld = [](Index stride) { return std::max<Index>(stride, 1); };
    const dnnl_status_t st = dnnl_sgemm(opa == Op::none ? 'N' : 'T', opb == Op::none ? 'N' : 'T', m, n, k, alpha,
                                        A.data, ld(A.stride), B.data, ld(B.stride), beta, C.data, ld(C.stride));
    require(st == dnnl_success, "gemm: oneDNN sgemm failed with status ", static_cast<int>(st), " on [", m, ", ", k,
            "] x [", k, ", ", n, "]");
}
#endif

/// The serial product on Eigen maps (four static cases so that Eigen sees the transposes), or oneDNN's
/// sgemm for large fp32 products.
/// fp32 products of at least onednn_min multiply-adds take oneDNN.
template <class T>
void gemm_serial(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T alpha, T beta,
                 Index onednn_min = gemm_onednn_min()) {
#ifdef COMIGS_HAVE_ONEDNN
    if constexpr (std::is_same_v<T, float>) {
        const Index k = opa == Op::none ? A.cols : A.rows;
        if (C.rows * C.cols * k >= onednn_min) {
            gemm_onednn(C, A, opa, B, opb, alpha, beta);
            return;
        }
    }
#else
    (void)onednn_min;  // builds without oneDNN (e.g. aarch64) have only Eigen
#endif
    auto c = eigen(C);
    auto a = eigen(A);
    auto b = eigen(B);
    auto run = [&](const auto& lhs, const auto& rhs) {
        if (beta == T(0))
            c.noalias() = alpha * (lhs * rhs);
        else
            c.noalias() += alpha * (lhs * rhs);
    };
    if (opa == Op::none && opb == Op::none) run(a, b);
    else if (opa == Op::none) run(a, b.transpose());
    else if (opb == Op::none) run(a.transpose(), b);
    else run(a.transpose(), b.transpose());
}

/// Rows [first, first + count) of op(X) as a view of X.
template <class T>
ConstMatrixView<T> op_rows(ConstMatrixView<T> X, Op op, Index first, Index count) {
    return op == Op::none ? X.middle_rows(first, count) : ConstMatrixView<T>(X.data + first, X.rows, count, X.stride);
}
/// Columns [first, first + count) of op(X) as a view of X.
template <class T>
ConstMatrixView<T> op_cols(ConstMatrixView<T> X, Op op, Index first, Index count) {
    return op == Op::none ? ConstMatrixView<T>(X.data + first, X.rows, count, X.stride) : X.middle_rows(first, count);
}

}  // namespace detail

namespace detail {
/// Checks the shapes of C = alpha op(A) op(B) + beta C; false when there is nothing to multiply (C is
/// then already what the product gives).
template <class T>
bool gemm_prologue(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T beta) {
    const Index m = opa == Op::none ? A.rows : A.cols;
    const Index ka = opa == Op::none ? A.cols : A.rows;
    const Index kb = opb == Op::none ? B.rows : B.cols;
    const Index n = opb == Op::none ? B.cols : B.rows;
    require<ShapeError>(ka == kb && C.rows == m && C.cols == n, "gemm: op(A) [", m, ", ", ka, "] x op(B) [", kb,
                        ", ", n, "] -> C [", C.rows, ", ", C.cols, "] do not agree");
    require(beta == T(0) || beta == T(1), "gemm beta ", beta, ": only 0 or 1 supported");
    if (m == 0 || n == 0) return false;
    if (ka == 0) {
        if (beta == T(0))
            for (Index i = 0; i < m; ++i) std::fill(C.row_ptr(i), C.row_ptr(i) + n, T(0));
        return false;
    }
    return true;
}
/// Part [lo, lo + cnt) of the rows (split_rows) or columns of C as a serial product.
template <class T>
void gemm_part(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T alpha, T beta,
               bool split_rows, Index lo, Index cnt, Index onednn_min = gemm_onednn_min()) {
    if (split_rows)
        gemm_serial(C.middle_rows(lo, cnt), op_rows(A, opa, lo, cnt), opa, B, opb, alpha, beta, onednn_min);
    else
        gemm_serial(MatrixView<T>(C.data + lo, C.rows, cnt, C.stride), A, opa, op_cols(B, opb, lo, cnt), opb, alpha,
                    beta, onednn_min);
}
}  // namespace detail

/// C = alpha * op(A) * op(B) + beta * C, with beta either 0 (overwrite) or 1 (accumulate).
/// Shapes: op(A) [M, K], op(B) [K, N], C [M, N]. Checked; a mismatch is a ShapeError.
/// Large products are split between the OpenMP threads along the longer side of C, each part a
/// serial Eigen product (Eigen's own threading busy-waits, which collapses on a shared machine);
/// every element is summed by one thread, so a fixed thread count gives identical results.
template <class T>
void gemm(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T alpha = T(1),
          T beta = T(0)) {
    if (!detail::gemm_prologue(C, A, opa, B, opb, beta)) return;
    const Index m = C.rows, n = C.cols, ka = opa == Op::none ? A.cols : A.rows;
    int threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel() && m * n * ka >= detail::gemm_parallel_min()) threads = omp_get_max_threads();
#endif
    const Index q = std::max<Index>(1, detail::gemm_split_quantum());
    const bool split_rows = m >= n;
    const Index len = split_rows ? m : n;
    const Index parts = std::min<Index>(threads, len);
    if (parts <= 1) {
        detail::gemm_serial(C, A, opa, B, opb, alpha, beta);
        return;
    }
    // Near-equal parts, each a multiple of q (when the side is long enough) except the last.
    const Index per = len >= parts * q ? (len + parts * q - 1) / (parts * q) * q : (len + parts - 1) / parts;
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(parts))
    for (Index p = 0; p < parts; ++p) {
        const Index lo = std::min(len, p * per), cnt = std::min(len, lo + per) - lo;
        if (cnt > 0) detail::gemm_part(C, A, opa, B, opb, alpha, beta, split_rows, lo, cnt);
    }
}

/// One product C = alpha op(A) op(B) + beta C of a gemm_chunked batch.
template <class T>
struct GemmProduct {
    MatrixView<T> C;
    ConstMatrixView<T> A;
    Op opa = Op::none;
    ConstMatrixView<T> B;
    Op opb = Op::none;
    T alpha = T(1);
    T beta = T(0);
};

namespace detail {

/// Products cut into fixed chunks of `chunk` rows or columns (along the longer side of each C),
/// numbered in order across the list: what a chunk computes does not depend on the thread running it.
template <class T>
struct ChunkedProducts {
    struct Plan {
        GemmProduct<T> p;
        bool split_rows, onednn;
        Index len, first;  // first: number of its first chunk
    };
    std::vector<Plan> plans;
    Index chunk, chunks = 0, work = 0;  // work: multiply-adds of all the products

    ChunkedProducts(std::initializer_list<GemmProduct<T>> products, Index chunk_) : chunk(chunk_) {
        require(chunk >= 1, "chunk size ", chunk, " of a chunked product: must be >= 1");
        plans.reserve(products.size());
        for (const auto& p : products) {
            if (!gemm_prologue(p.C, p.A, p.opa, p.B, p.opb, p.beta)) continue;
            const Index m = p.C.rows, n = p.C.cols, ka = p.opa == Op::none ? p.A.cols : p.A.rows;
            bool onednn = false;
#ifdef COMIGS_HAVE_ONEDNN
            if constexpr (std::is_same_v<T, float>)
                onednn = m * n * ka >= std::min(gemm_onednn_small_min(), gemm_onednn_min());
#endif
            const bool split_rows = m >= n;
            const Index len = split_rows ? m : n;
            plans.push_back({p, split_rows, onednn, len, chunks});
            chunks += (len + chunk - 1) / chunk;
            work += m * n * ka;
        }
    }
    /// Computes chunk c < chunks of the batch.
    void run(Index c) const {
        std::size_t j = 0;
        while (j + 1 < plans.size() && plans[j + 1].first <= c) ++j;
        run(plans[j], c - plans[j].first);
    }
    /// Computes chunk c of the product planned in pl.
    void run(const Plan& pl, Index c) const {
        const GemmProduct<T>& p = pl.p;
        const Index lo = c * chunk, cnt = std::min(chunk, pl.len - lo);
        // The backend is chosen for the whole product (a chunk alone may be below the threshold).
        gemm_part(p.C, p.A, p.opa, p.B, p.opb, p.alpha, p.beta, pl.split_rows, lo, cnt,
                  pl.onednn ? Index(0) : std::numeric_limits<Index>::max());
    }
};

}  // namespace detail

/// One parallel region for a layer's large product and the small products around it (a region costs
/// a wake-up of the sleeping threads, and a thread done with its part of one product would otherwise
/// wait at the end of the region for the other):
///   - `base` is split between the threads along the longer side of C, as gemm() splits it (identical
///     results for a fixed thread count);
///   - each product of `after` accumulates into base.C (the same view) and runs, chunk by chunk of
///     `chunk` rows, on the thread that computed those rows of base, after its part (when base is
///     split by rows: C has at least as many rows as columns);
///   - the products of `others` are independent of base and of each other, cut into chunks as
///     gemm_chunked cuts them and handed out one at a time to the threads done with their part;
///   - side(i), i < side_count, is independent work (side_work elements in all), shared statically.
/// `after` and `others` give what gemm_chunked gives for them (the same chunks, identical for any
/// thread count). Otherwise, or when base's split does not fall on chunk boundaries, `after` runs
/// after the region.
template <class T, class Side>
void gemm_with(GemmProduct<T> base, std::initializer_list<GemmProduct<T>> after,
               std::initializer_list<GemmProduct<T>> others, Index side_count, Index side_work, Side&& side,
               Index chunk = 128) {
    const detail::ChunkedProducts<T> post(after, chunk), rest(others, chunk);
    const bool has_base = detail::gemm_prologue(base.C, base.A, base.opa, base.B, base.opb, base.beta);
    const Index m = base.C.rows, n = base.C.cols, ka = base.opa == Op::none ? base.A.cols : base.A.rows;
    const bool split_rows = m >= n;
    const Index len = split_rows ? m : n;
    for (const auto& pl : post.plans)
        require<ShapeError>(pl.p.C.data == base.C.data && pl.p.C.rows == m && pl.p.C.cols == n &&
                                pl.p.C.stride == base.C.stride,
                            "gemm_with: a product after the base must accumulate into the base's C");
    int threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel()) threads = omp_get_max_threads();
#endif
    const Index parts = has_base ? std::min<Index>(m * n * ka >= detail::gemm_parallel_min() ? threads : 1, len) : 0;
    // The base split as gemm() makes it, in multiples of `chunk` when `after` goes with it.
    const Index q = post.chunks == 0 ? std::max<Index>(1, detail::gemm_split_quantum()) : chunk;
    const Index per = parts == 0 ? 0
                      : len >= parts * q ? (len + parts * q - 1) / (parts * q) * q
                                         : (len + parts - 1) / parts;
    const bool fuse_after = has_base && split_rows && (parts <= 1 || per % chunk == 0);
    bool parallel = false;
#ifdef _OPENMP
    parallel = threads > 1 && (parts > 1 || (rest.chunks > 1 && rest.work >= detail::gemm_parallel_min()) ||
                               (side_count > 1 && side_work > 65536));
#endif
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static) nowait
        for (Index i = 0; i < side_count; ++i) side(i);
#pragma omp for schedule(static, 1) nowait
        for (Index p = 0; p < parts; ++p) {
            const Index lo = std::min(len, p * per), cnt = std::min(len, lo + per) - lo;
            if (cnt <= 0) continue;
            detail::gemm_part(base.C, base.A, base.opa, base.B, base.opb, base.alpha, base.beta, split_rows, lo, cnt);
            if (fuse_after)
                for (const auto& pl : post.plans)
                    for (Index c = lo / chunk; c * chunk < lo + cnt; ++c) post.run(pl, c);
        }
#pragma omp for schedule(dynamic, 1) nowait
        for (Index c = 0; c < rest.chunks; ++c) rest.run(c);
    }
    if (!fuse_after && post.chunks > 0) {
        // Its own region only when it is worth a wake-up (as gemm_chunked decides): at T = 1 it is not.
        const bool par_after = threads > 1 && post.chunks > 1 && post.work >= detail::gemm_parallel_min();
#pragma omp parallel for schedule(dynamic, 1) if (par_after)
        for (Index c = 0; c < post.chunks; ++c) post.run(c);
    }
}

/// gemm with the longer side of C cut into fixed chunks of `chunk` rows or columns, which the threads
/// share: every element comes from the same serial product whatever the thread count, so results
/// are identical for any number of threads (gemm promises that for a fixed count only). For the
/// small products of a layer (a few dozen rows or columns against the model width). A batch of
/// independent products (none writes what another reads) runs in one parallel region: a region
/// costs a wake-up of the sleeping threads (20-80 us under OMP_WAIT_POLICY=PASSIVE here).
///
/// gemm_chunked_and also runs side(i) for i < side_count (work independent of the products, side_work
/// elements in all) on the same threads in the same region: one wake-up instead of two.
template <class T, class Side>
void gemm_chunked_and(std::initializer_list<GemmProduct<T>> products, Index side_count, Index side_work, Side&& side,
                      Index chunk = 128) {
    gemm_with<T>(GemmProduct<T>{}, {}, products, side_count, side_work, std::forward<Side>(side), chunk);  // no base
}

template <class T>
void gemm_chunked(std::initializer_list<GemmProduct<T>> products, Index chunk = 128) {
    gemm_chunked_and<T>(products, 0, 0, [](Index) {}, chunk);
}

/// gemm_chunked of one product.
template <class T>
void gemm_chunked(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T alpha = T(1),
                  T beta = T(0), Index chunk = 128) {
    gemm_chunked<T>({GemmProduct<T>{C, A, opa, B, opb, alpha, beta}}, chunk);
}

}  // namespace comigs::kernels
