// kernels/attention.hpp: the flash-style causal attention against its plain reference (odd shapes,
// grouped-query heads, KV-cache offsets, block tails, strided and unaligned views), finite differences
// in double, causality, thread-count independence and shape errors.
#include <comigs/kernels/attention.hpp>
#include <comigs/random.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gradcheck.hpp"

namespace attention_test {
using namespace comigs;
using comigs::Index;
using kernels::AttentionShape;

/// Sets the blocked path's block and the tiled path's chunk to r query rows.
struct BlockRows {
    Index saved, saved_chunk;
    explicit BlockRows(Index r)
        : saved(kernels::detail::attention_block_rows()), saved_chunk(kernels::detail::attention_chunk_rows()) {
        kernels::detail::attention_block_rows() = r;
        kernels::detail::attention_chunk_rows() = r;
    }
    ~BlockRows() {
        kernels::detail::attention_block_rows() = saved;
        kernels::detail::attention_chunk_rows() = saved_chunk;
    }
};

/// The tiled path from `rows` query rows on (1: every shape whose head size fits the vectors).
struct TiledFrom {
    Index saved;
    explicit TiledFrom(Index rows) : saved(kernels::detail::attention_tiled_min_queries()) {
        kernels::detail::attention_tiled_min_queries() = rows;
    }
    ~TiledFrom() { kernels::detail::attention_tiled_min_queries() = saved; }
};

template <class F>
void with_threads(int n, F f) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(n);
    f();
    omp_set_num_threads(saved);
#else
    (void)n;
    f();
#endif
}

/// q, k, v as column blocks of one packed matrix per row (as GPT-2's c_attn output), with `pad` extra
/// columns and the whole buffer starting `offset` elements past an aligned start: strided, unaligned.
template <class T>
struct Packed {
    AttentionShape s;
    Index stride_q, stride_kv;
    std::vector<T> qbuf, kvbuf;
    Index offset;

    Packed(const AttentionShape& shape, Rng& rng, Index pad, Index off) : s(shape), offset(off) {
        stride_q = s.q_width() + pad;
        stride_kv = 2 * s.kv_width() + pad;
        qbuf.resize(static_cast<std::size_t>(off + s.batch * s.queries * stride_q));
        kvbuf.resize(static_cast<std::size_t>(off + s.batch * s.keys * stride_kv));
        for (T& x : qbuf) x = T(rng.normal(0.0, 1.0));
        for (T& x : kvbuf) x = T(rng.normal(0.0, 1.0));
    }
    ConstMatrixView<T> q() const { return {qbuf.data() + offset, s.batch * s.queries, s.q_width(), stride_q}; }
    ConstMatrixView<T> k() const { return {kvbuf.data() + offset, s.batch * s.keys, s.kv_width(), stride_kv}; }
    ConstMatrixView<T> v() const {
        return {kvbuf.data() + offset + s.kv_width(), s.batch * s.keys, s.kv_width(), stride_kv};
    }
};

template <class T>
std::vector<T> randn(std::size_t n, Rng& rng) {
    std::vector<T> v(n);
    for (T& x : v) x = T(rng.normal(0.0, 1.0));
    return v;
}

template <class T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
    double m = 0;
    for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
    return m;
}

const AttentionShape kShapes[] = {
    {1, 1, 1, 1, 1, 1},    // one token
    {2, 5, 5, 3, 3, 7},    // multi-head, odd head size
    {2, 3, 11, 4, 2, 5},   // KV cache: 3 new rows over 11 positions, 2 query heads per kv head
    {1, 17, 17, 6, 2, 16}, // GQA, a prime length
    {3, 1, 9, 2, 1, 4},    // decode: one new row per sequence, multi-query
    {1, 70, 70, 2, 2, 8},  // more rows than a default block (64): a full block and a tail
    // Head sizes of whole vectors (the tiled path): row-block, key-tile and chunk tails, GQA groups.
    {1, 1, 1, 2, 1, 16},      // one token
    {2, 13, 13, 3, 1, 32},    // 13 rows: a 12-row score block and a tail; three heads on one kv head
    {1, 37, 40, 4, 2, 16},    // KV cache of 3 positions, 40 keys: a partial key tile
    {1, 130, 130, 2, 1, 32},  // more rows than a default chunk (128)
};

TEST_CASE_TEMPLATE("kernels::attention_forward/backward equal the plain reference: odd shapes, GQA, KV cache, "
                   "block tails, strided and unaligned views",
                   T, float, double) {
    const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
    for (const Index block : {Index(64), Index(3), Index(1)})
      for (const Index tiled_from : {Index(1), Index(1) << 30}) {
        BlockRows br(block);
        TiledFrom tf(tiled_from);
        for (const auto& s : kShapes) {
            CAPTURE(block);
            CAPTURE(tiled_from);
            CAPTURE(s.batch);
            CAPTURE(s.queries);
            CAPTURE(s.keys);
            CAPTURE(s.heads);
            CAPTURE(s.kv_heads);
            CAPTURE(s.head_dim);
            Rng rng(11 + s.keys);
            const Packed<T> p(s, rng, /*pad=*/3, /*offset=*/1);
            const Index nq = s.batch * s.queries, nk = s.batch * s.keys, w = s.q_width(), kw = s.kv_width();
            std::vector<T> out(static_cast<std::size_t>(nq * w)), out_ref(out.size());
            std::vector<T> lse(static_cast<std::size_t>(s.batch * s.heads * s.queries)), lse_ref(lse.size());
            kernels::attention_forward<T>({out.data(), nq, w}, lse.data(), p.q(), p.k(), p.v(), s);
            kernels::attention_forward_reference<T>({out_ref.data(), nq, w}, lse_ref.data(), p.q(), p.k(), p.v(), s);
            CHECK(max_abs_diff(out, out_ref) < tol);
            CHECK(max_abs_diff(lse, lse_ref) < tol * 10);

            // Backward accumulates: start every gradient from the same random values.
            const auto dout = randn<T>(out.size(), rng);
            const auto dq0 = randn<T>(out.size(), rng), dk0 = randn<T>(static_cast<std::size_t>(nk * kw), rng),
                       dv0 = randn<T>(dk0.size(), rng);
            auto dq = dq0, dk = dk0, dv = dv0, dq_ref = dq0, dk_ref = dk0, dv_ref = dv0;
            kernels::attention_backward<T>({dq.data(), nq, w}, {dk.data(), nk, kw}, {dv.data(), nk, kw},
                                           {dout.data(), nq, w}, p.q(), p.k(), p.v(), {out.data(), nq, w},
                                           lse.data(), s);
            kernels::attention_backward_reference<T>({dq_ref.data(), nq, w}, {dk_ref.data(), nk, kw},
                                                     {dv_ref.data(), nk, kw}, {dout.data(), nq, w}, p.q(), p.k(),
                                                     p.v(), s);
            CHECK(max_abs_diff(dq, dq_ref) < tol * 10);
            CHECK(max_abs_diff(dk, dk_ref) < tol * 10);
            CHECK(max_abs_diff(dv, dv_ref) < tol * 10);
            // The gradients did move (not a vacuous comparison of untouched buffers).
            // (A row with one visible key has a constant softmax: dq is zero only when every row is so.)
            if (s.keys > 1) CHECK(max_abs_diff(dq, dq0) > 1e-3);
            CHECK(max_abs_diff(dv, dv0) > 1e-3);
        }
      }
}

TEST_CASE("kernels::attention_backward: finite differences in double (q, k, v; GQA and a KV-cache offset)") {
    // (the third: head size 8, on the tiled path from one row: vectors of 8 or 4 doubles)
    for (const AttentionShape s :
         {AttentionShape{2, 4, 4, 2, 1, 3}, AttentionShape{1, 2, 5, 2, 2, 4}, AttentionShape{1, 5, 7, 2, 1, 8}}) {
        BlockRows br(3);  // two blocks per sequence, one a tail
        TiledFrom tf(1);
        Rng rng(5);
        const Index nq = s.batch * s.queries, nk = s.batch * s.keys, w = s.q_width(), kw = s.kv_width();
        auto q = randn<double>(static_cast<std::size_t>(nq * w), rng);
        auto k = randn<double>(static_cast<std::size_t>(nk * kw), rng);
        auto v = randn<double>(k.size(), rng);
        const auto R = randn<double>(q.size(), rng);  // loss = sum(out * R), so dout = R
        std::vector<double> out(q.size()), lse(static_cast<std::size_t>(s.batch * s.heads * s.queries));
        const auto loss = [&] {
            kernels::attention_forward<double>({out.data(), nq, w}, nullptr, {q.data(), nq, w}, {k.data(), nk, kw},
                                               {v.data(), nk, kw}, s);
            double l = 0;
            for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * R[i];
            return l;
        };
        kernels::attention_forward<double>({out.data(), nq, w}, lse.data(), {q.data(), nq, w}, {k.data(), nk, kw},
                                           {v.data(), nk, kw}, s);
        std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
        kernels::attention_backward<double>({dq.data(), nq, w}, {dk.data(), nk, kw}, {dv.data(), nk, kw},
                                            {R.data(), nq, w}, {q.data(), nq, w}, {k.data(), nk, kw},
                                            {v.data(), nk, kw}, {out.data(), nq, w}, lse.data(), s);
        comigs::test::gradcheck(q, dq, loss, "dq");
        comigs::test::gradcheck(k, dk, loss, "dk");
        comigs::test::gradcheck(v, dv, loss, "dv");
    }
}

TEST_CASE("kernels::attention_forward: causal (later keys never change an earlier row) and the KV-cache rows "
          "equal the same rows of a whole-sequence pass") {
    const AttentionShape whole{1, 9, 9, 4, 2, 8};
    Rng rng(3);
    auto q = randn<float>(static_cast<std::size_t>(9 * 32), rng);
    auto k = randn<float>(static_cast<std::size_t>(9 * 16), rng);
    auto v = randn<float>(k.size(), rng);
    std::vector<float> out(q.size()), out2(q.size());
    kernels::attention_forward<float>({out.data(), 9, 32}, nullptr, {q.data(), 9, 32}, {k.data(), 9, 16},
                                      {v.data(), 9, 16}, whole);
    // The last key and value change: rows 0..7 stay the same, row 8 moves.
    for (Index c = 0; c < 16; ++c) {
        k[static_cast<std::size_t>(8 * 16 + c)] += 1.0f;
        v[static_cast<std::size_t>(8 * 16 + c)] -= 2.0f;
    }
    kernels::attention_forward<float>({out2.data(), 9, 32}, nullptr, {q.data(), 9, 32}, {k.data(), 9, 16},
                                      {v.data(), 9, 16}, whole);
    CHECK(std::equal(out.begin(), out.begin() + 8 * 32, out2.begin()));
    CHECK(max_abs_diff(std::vector<float>(out.begin() + 8 * 32, out.end()),
                       std::vector<float>(out2.begin() + 8 * 32, out2.end())) > 1e-2);
    // The last 3 rows as new queries over a 9-position cache give the whole pass's last 3 rows.
    const AttentionShape cached{1, 3, 9, 4, 2, 8};
    std::vector<float> tail(3 * 32);
    kernels::attention_forward<float>({tail.data(), 3, 32}, nullptr, {q.data() + 6 * 32, 3, 32}, {k.data(), 9, 16},
                                      {v.data(), 9, 16}, cached);
    CHECK(max_abs_diff(tail, std::vector<float>(out2.begin() + 6 * 32, out2.end())) < 1e-6);
}

TEST_CASE("kernels::attention: bitwise identical for 1, 2 and 3 threads and from run to run") {
    const AttentionShape s{3, 40, 40, 6, 3, 16};
    BlockRows br(16);
    Rng rng(9);
    const Index nq = 120, w = 96, kw = 48;
    const auto q = randn<float>(static_cast<std::size_t>(nq * w), rng);
    const auto k = randn<float>(static_cast<std::size_t>(nq * kw), rng);
    const auto v = randn<float>(k.size(), rng);
    const auto dout = randn<float>(q.size(), rng);
    std::vector<std::vector<float>> results;
    for (const int threads : {1, 2, 3, 2}) {
        with_threads(threads, [&] {
            std::vector<float> out(q.size()), lse(static_cast<std::size_t>(3 * 6 * 40)), dq(q.size()), dk(k.size()),
                dv(k.size());
            kernels::attention_forward<float>({out.data(), nq, w}, lse.data(), {q.data(), nq, w}, {k.data(), nq, kw},
                                              {v.data(), nq, kw}, s);
            kernels::attention_backward<float>({dq.data(), nq, w}, {dk.data(), nq, kw}, {dv.data(), nq, kw},
                                               {dout.data(), nq, w}, {q.data(), nq, w}, {k.data(), nq, kw},
                                               {v.data(), nq, kw}, {out.data(), nq, w}, lse.data(), s);
            std::vector<float> all = out;
            for (const auto* part : {&lse, &dq, &dk, &dv}) all.insert(all.end(), part->begin(), part->end());
            results.push_back(std::move(all));
        });
    }
    for (std::size_t i = 1; i < results.size(); ++i) CHECK(results[i] == results[0]);
}

TEST_CASE("kernels::attention: bad shapes and missing inputs are named errors") {
    std::vector<float> buf(64, 0.0f);
    const ConstMatrixView<float> q(buf.data(), 2, 8), k(buf.data(), 2, 4);
    const MatrixView<float> out(buf.data(), 2, 8);
    CHECK_THROWS_AS(kernels::attention_forward<float>(out, nullptr, q, k, k, {1, 2, 2, 3, 2, 4}),
                    comigs::InvalidArgument);  // 3 heads over 2 kv heads
    CHECK_THROWS_AS(kernels::attention_forward<float>(out, nullptr, q, k, k, {1, 3, 2, 2, 1, 4}),
                    comigs::InvalidArgument);  // more queries than keys
    CHECK_THROWS_AS(kernels::attention_forward<float>(out, nullptr, q, k, k, {1, 2, 2, 2, 2, 4}),
                    comigs::ShapeError);  // k has 1 kv head's columns, the shape says 2
    CHECK_THROWS_WITH_AS(kernels::attention_forward<float>(out, nullptr, q, k, k, {2, 2, 2, 2, 1, 4}),
                         doctest::Contains("expected [4, 8]"), comigs::ShapeError);
    const MatrixView<float> dq(buf.data(), 2, 8), dk(buf.data(), 2, 4);
    CHECK_THROWS_WITH_AS(kernels::attention_backward<float>(dq, dk, dk, q, q, k, k, q, nullptr, {1, 2, 2, 2, 1, 4}),
                         doctest::Contains("log-sum-exp"), comigs::InvalidArgument);
}

}  // namespace attention_test
