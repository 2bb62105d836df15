// models/lm_head.hpp: the chunked head + loss over every form a FrozenLinear head takes (plain, bf16,
// bf16 with fp32 compute, Q8_0, with a bias) equals the head's own logits (FrozenLinear::forward) fed
// to the plain cross-entropy and its backward (layers.hpp), over many row blocks and vocabulary chunks.
#include <comigs/models/layers.hpp>
#include <comigs/models/lm_head.hpp>
#include <comigs/random.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lm_head_test {
using namespace comigs;
using comigs::Index;

/// Small row blocks and chunks for the scope of a test, so that tails and rescaling run.
struct SmallChunks {
    Index rows = kernels::detail::head_block_rows(), elements = kernels::detail::head_chunk_elements(),
          min_cols = kernels::detail::head_min_chunk_cols();
    SmallChunks() {
        kernels::detail::head_block_rows() = 5;
        kernels::detail::head_chunk_elements() = 5 * 7;
        kernels::detail::head_min_chunk_cols() = 1;
    }
    ~SmallChunks() {
        kernels::detail::head_block_rows() = rows;
        kernels::detail::head_chunk_elements() = elements;
        kernels::detail::head_min_chunk_cols() = min_cols;
    }
};

/// What the head computes through its stored logits: loss sum and dx = dloss/dx (mean loss scale).
double stored_logits_loss(const FrozenLinear<float>& W, std::vector<float>& dx, const std::vector<float>& x,
                          const std::vector<int>& t, Index N, Index d) {
    const Index V = W.out_features();
    std::vector<float> logits(static_cast<std::size_t>(N * V)), dlogits(logits.size()), lse(static_cast<std::size_t>(N));
    W.forward(MatrixView<float>(logits.data(), N, V), ConstMatrixView<float>(x.data(), N, d));
    const double mean = models::crossentropy_forward(lse.data(), ConstMatrixView<float>(logits.data(), N, V), t.data());
    models::crossentropy_backward(MatrixView<float>(dlogits.data(), N, V), ConstMatrixView<float>(logits.data(), N, V),
                                  lse.data(), t.data(), 1.0f);
    dx.assign(static_cast<std::size_t>(N * d), 0.0f);
    W.backward_input(MatrixView<float>(dx.data(), N, d), ConstMatrixView<float>(dlogits.data(), N, V), false);
    return mean * double(N);
}

TEST_CASE("models::frozen_head_cross_entropy: every FrozenLinear head form equals its stored logits' loss") {
    const Index N = 13, d = 64, V = 37;  // d a multiple of 32 for Q8_0
    Rng rng(7);
    std::vector<float> w(static_cast<std::size_t>(V * d)), x(static_cast<std::size_t>(N * d)), bias(static_cast<std::size_t>(V));
    for (float& v : w) v = float(rng.normal(0.0, 0.5));
    for (float& v : x) v = float(rng.normal(0.0, 1.0));
    for (float& v : bias) v = float(rng.normal(0.0, 1.0));
    std::vector<int> t(static_cast<std::size_t>(N));
    for (Index n = 0; n < N; ++n) t[static_cast<std::size_t>(n)] = int((n * 11 + 3) % V);
    std::vector<kernels::bf16> wb(w.size());
    kernels::convert_to_bf16(wb.data(), w.data(), Index(w.size()));
    const std::size_t row_bytes = kernels::quant_row_bytes(kernels::QuantType::q8_0, d);
    std::vector<std::byte> wq(row_bytes * static_cast<std::size_t>(V));
    for (Index v = 0; v < V; ++v)
        kernels::quantize_row(wq.data() + row_bytes * static_cast<std::size_t>(v), kernels::QuantType::q8_0,
                              w.data() + v * d, d);

    struct Form {
        const char* name;
        FrozenLinear<float> W;
        double tol;
    };
    std::vector<Form> forms;
    forms.push_back({"plain", {ConstMatrixView<float>(w.data(), V, d), {}}, 1e-5});
    forms.push_back({"plain + bias", {ConstMatrixView<float>(w.data(), V, d), bias}, 1e-5});
    FrozenLinear<float> b16;
    b16.weight_bf16 = ConstMatrixView<kernels::bf16>(wb.data(), V, d);
    forms.push_back({"bf16", b16, 1e-2});  // x and the chunk probabilities rounded to bf16
    b16.fp32_compute = true;
    forms.push_back({"bf16 fp32 compute", b16, 1e-5});
    FrozenLinear<float> q8;
    q8.weight_quant = kernels::QuantMatrixView(kernels::QuantType::q8_0, wq.data(), V, d);
    forms.push_back({"q8_0 (bf16 products)", q8, 1e-2});  // x, the probabilities and W's values rounded to bf16
    q8.fp32_compute = true;
    forms.push_back({"q8_0 fp32 compute", q8, 1e-5});

    const SmallChunks small;
    for (const auto& f : forms) {
        INFO(f.name);
        std::vector<float> dx_ref;
        const double loss_ref = stored_logits_loss(f.W, dx_ref, x, t, N, d);
        std::vector<float> dx(static_cast<std::size_t>(N * d), 0.5f);  // accumulates onto what is there
        const double loss = models::frozen_head_cross_entropy(f.W, MatrixView<float>(dx.data(), N, d),
                                                              ConstMatrixView<float>(x.data(), N, d), t.data(),
                                                              1.0f / float(N));
        CHECK(loss == doctest::Approx(loss_ref).epsilon(f.tol));
        double worst = 0, mag = 0;
        for (std::size_t i = 0; i < dx.size(); ++i) {
            worst = std::max(worst, std::abs(double(dx[i]) - 0.5 - double(dx_ref[i])));
            mag = std::max(mag, std::abs(double(dx_ref[i])));
        }
        CHECK(mag > 1e-3);
        CHECK(worst <= f.tol * 10 * mag);
        // Without a gradient: the same loss, dx untouched.
        const double loss_only = models::frozen_head_cross_entropy(f.W, MatrixView<float>(),
                                                                   ConstMatrixView<float>(x.data(), N, d), t.data(), 0.0f);
        CHECK(loss_only == doctest::Approx(loss).epsilon(1e-12));
    }
}

}  // namespace lm_head_test
