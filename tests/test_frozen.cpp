#include <comigs/frozen.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

TEST_CASE("FrozenLinear: y = x W^T + b, accumulate, and input gradient") {
    std::vector<double> W = {1, 2, 3, 4, 5, 6}, b = {10, 20};  // W [2, 3]
    comigs::FrozenLinear<double> lin{comigs::ConstMatrixView<double>(W.data(), 2, 3), std::span<const double>(b)};
    std::vector<double> x = {1, 0, -1}, y(2, 100.0);
    lin.forward(comigs::MatrixView<double>(y.data(), 1, 2), comigs::ConstMatrixView<double>(x.data(), 1, 3));
    CHECK(y[0] == 10 + 1 - 3);
    CHECK(y[1] == 20 + 4 - 6);
    lin.forward(comigs::MatrixView<double>(y.data(), 1, 2), comigs::ConstMatrixView<double>(x.data(), 1, 3), true);
    CHECK(y[0] == 2 * 8);
    std::vector<double> dy = {1, -1}, dx(3, 1.0);
    lin.backward_input(comigs::MatrixView<double>(dx.data(), 1, 3), comigs::ConstMatrixView<double>(dy.data(), 1, 2));
    CHECK(dx == std::vector<double>{1 - 3, 1 - 3, 1 - 3});
}

TEST_CASE("FrozenMlp: named weights per form, held once") {
    comigs::FrozenMlp<float> g(comigs::MlpForm::gelu, 4, 16), s(comigs::MlpForm::swiglu, 4, 16);
    CHECK(g.weights().view("fc.weight").rows == 16);
    CHECK(g.linear("proj").bias.size() == 4);
    CHECK(s.linear("down").weight.cols == 16);
    CHECK(s.linear("gate").bias.empty());
    CHECK_THROWS_WITH_AS(s.linear("fc"), doctest::Contains("fc.weight"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(comigs::FrozenMlp<float>(comigs::MlpForm::gelu, 0, 4), doctest::Contains("d_model 0"),
                         comigs::InvalidArgument);
    comigs::Rng rng(1);
    g.randomize(rng, 1.0);
    double sum2 = 0;
    for (float v : g.weights().span("fc.weight")) sum2 += v * v;
    CHECK(sum2 / 64 == doctest::Approx(1.0).epsilon(0.5));
}

TEST_CASE_TEMPLATE("FrozenMlp precision q8_0/q4_0: GGML blocks, the dequantized values, bytes, conversions", T, float,
                   double) {
    using namespace comigs;
    for (MlpForm form : {MlpForm::gelu, MlpForm::swiglu})
        for (Precision p : {Precision::q8_0, Precision::q4_0}) {
            CAPTURE(std::string(to_string(form)));
            CAPTURE(std::string(to_string(p)));
            FrozenMlp<T> mlp(form, 64, 96);
            mlp.set_fp32_compute(true);  // the products in fp32 on the dequantized values (no rounding)
            Rng rng(4);
            mlp.randomize(rng, 0.5);
            const auto fp32_bytes = mlp.weight_bytes();
            std::vector<std::string> names;
            std::vector<std::vector<T>> before;
            for (const auto& spec : mlp.weights().layout().tensors()) {
                names.push_back(spec.name);
                auto s = mlp.weights().span(spec.name);
                before.emplace_back(s.begin(), s.end());
            }
            mlp.set_precision(p);
            CHECK(mlp.precision() == p);
            const double per_weight = p == Precision::q8_0 ? 34.0 / 32 : 18.0 / 32;
            const double matrix_weights = form == MlpForm::gelu ? 2.0 * 64 * 96 : 3.0 * 64 * 96;
            const double bias_bytes = form == MlpForm::gelu ? (64.0 + 96.0) * sizeof(T) : 0.0;
            CHECK(static_cast<double>(mlp.weight_bytes()) <= matrix_weights * per_weight + bias_bytes + 3 * 64);
            CHECK(mlp.weight_bytes() < fp32_bytes / (sizeof(T) == 4 ? 3 : 6));
            const auto first = mlp.linear(form == MlpForm::gelu ? "fc" : "gate");
            CHECK(first.is_quantized());
            CHECK_FALSE(first.is_plain());
            CHECK(first.in_features() == 64);
            CHECK(first.out_features() == 96);
            CHECK(first.weight_quant.type == quant_type(p));
            CHECK(mlp.bf16_weight(names[0]).data == nullptr);
            // Each matrix holds exactly the blocks ggml makes of the fp32 rows (rounded to float).
            for (std::size_t i = 0; i < names.size(); ++i) {
                const auto q = mlp.quant_weight(names[i]);
                if (q.data == nullptr) {  // a bias: kept in T
                    auto s = mlp.weights().span(names[i]);
                    CHECK(std::vector<T>(s.begin(), s.end()) == before[i]);
                    continue;
                }
                std::vector<float> row(static_cast<std::size_t>(q.cols));
                std::vector<std::byte> blocks(kernels::quant_row_bytes(q.type, q.cols));
                for (Index r = 0; r < q.rows; ++r) {
                    for (Index c = 0; c < q.cols; ++c) row[static_cast<std::size_t>(c)] = static_cast<float>(before[i][static_cast<std::size_t>(r * q.cols + c)]);
                    kernels::quantize_row(blocks.data(), q.type, row.data(), q.cols);
                    REQUIRE(std::memcmp(blocks.data(), q.row_ptr(r), blocks.size()) == 0);
                }
            }
            // Back to fp32: the dequantized values exactly; the products used them all along.
            const auto q0 = mlp.quant_weight(names[0]);
            std::vector<T> deq(static_cast<std::size_t>(q0.rows * q0.cols));
            for (Index r = 0; r < q0.rows; ++r) kernels::dequantize_row(deq.data() + r * q0.cols, q0.type, q0.row_ptr(r), q0.cols);
            std::vector<T> x(3 * 64), y(3 * 96), yref(3 * 96);
            for (auto& v : x) v = static_cast<T>(rng.normal());
            first.forward(MatrixView<T>(y.data(), 3, 96), ConstMatrixView<T>(x.data(), 3, 64));
            mlp.set_precision(Precision::fp32);
            auto w = mlp.weights().span(names[0]);
            CHECK(std::vector<T>(w.begin(), w.end()) == deq);
            CHECK(std::vector<T>(w.begin(), w.end()) != before[0]);  // really went through the blocks
            mlp.linear(form == MlpForm::gelu ? "fc" : "gate")
                .forward(MatrixView<T>(yref.data(), 3, 96), ConstMatrixView<T>(x.data(), 3, 64));
            for (std::size_t i = 0; i < y.size(); ++i) CHECK(static_cast<double>(y[i]) == doctest::Approx(static_cast<double>(yref[i])).epsilon(1e-5));
        }
}

TEST_CASE("FrozenMlp precision: bf16 -> q4_0 -> q8_0 conversions, loading blocks, and the errors") {
    using namespace comigs;
    FrozenMlp<float> mlp(MlpForm::gelu, 32, 64);
    Rng rng(6);
    mlp.randomize(rng, 1.0);
    mlp.set_precision(Precision::bf16);
    std::vector<float> from_bf16(64 * 32);
    const auto wb = mlp.bf16_weight("fc.weight");
    for (Index r = 0; r < 64; ++r) kernels::convert_to_float(from_bf16.data() + r * 32, wb.row_ptr(r), 32);
    std::vector<float> read(32);
    mlp.linear("fc").row_as_float(5, read.data());  // a frozen weight's values read back: exact widening
    CHECK(std::equal(read.begin(), read.end(), from_bf16.begin() + 5 * 32));
    mlp.set_precision(Precision::q4_0);  // from the bf16 values
    std::vector<std::byte> expect(kernels::quant_row_bytes(kernels::QuantType::q4_0, 32) * 64);
    for (Index r = 0; r < 64; ++r)
        kernels::quantize_row(expect.data() + r * 18, kernels::QuantType::q4_0, from_bf16.data() + r * 32, 32);
    const auto q = mlp.quant_weight("fc.weight");
    CHECK(std::memcmp(q.data, expect.data(), expect.size()) == 0);
    std::vector<float> deq(32);
    kernels::dequantize_row(deq.data(), q.type, q.row_ptr(7), 32);
    mlp.linear("fc").row_as_float(7, read.data());
    CHECK(read == deq);
    CHECK(read != std::vector<float>(from_bf16.begin() + 7 * 32, from_bf16.begin() + 8 * 32));  // really Q4_0
    CHECK(mlp.linear("proj").bias.size() == 32);
    // Loading blocks that come already quantized (a GGUF file): written in place.
    auto bytes = mlp.quant_weight_bytes("proj.weight");
    CHECK(bytes.size() == 32u * 2 * 18);
    std::fill(bytes.begin(), bytes.end(), std::byte{0});
    const auto proj = mlp.quant_weight("proj.weight");
    std::vector<float> row(64);
    kernels::dequantize_row(row.data(), proj.type, proj.row_ptr(3), 64);
    for (float v : row) CHECK(v == 0.0f);
    CHECK_THROWS_WITH_AS(mlp.quant_weight_bytes("fc.bias"), doctest::Contains("no such weight matrix"), InvalidArgument);
    mlp.set_precision(Precision::q8_0);  // requantized from the Q4_0 values
    CHECK(mlp.linear("fc").weight_quant.type == kernels::QuantType::q8_0);
    CHECK_THROWS_WITH_AS(mlp.randomize(rng), doctest::Contains("q8_0"), InvalidArgument);

    FrozenMlp<float> odd(MlpForm::swiglu, 40, 64);
    CHECK_THROWS_WITH_AS(odd.set_precision(Precision::q8_0), doctest::Contains("'gate.weight' has rows of 40"),
                         InvalidArgument);
    CHECK(odd.precision() == Precision::fp32);
    FrozenMlp<float> bad(MlpForm::swiglu, 32, 64);
    bad.weights().span("up.weight")[70] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(bad.set_precision(Precision::q4_0), doctest::Contains("'up.weight' row 2"), NumericError);
    CHECK(bad.precision() == Precision::fp32);  // unchanged on error
    FrozenMlp<float> fp(MlpForm::gelu, 32, 32);
    CHECK_THROWS_WITH_AS(fp.quant_weight_bytes("fc.weight"), doctest::Contains("fp32"), InvalidArgument);
}

TEST_CASE("FrozenMlp: a borrowed MLP reads weights held elsewhere, in place") {
    using comigs::FrozenLinear;
    comigs::Rng rng(2);
    auto owned = std::make_shared<comigs::FrozenMlp<double>>(comigs::MlpForm::swiglu, 3, 5);
    owned->randomize(rng, 1.0);
    auto store = std::make_shared<std::vector<double>>(owned->weights().all().begin(), owned->weights().all().end());
    std::map<std::string, FrozenLinear<double>> lin;
    for (const std::string name : {"gate", "up", "down"}) {
        const auto& spec = owned->weights().layout().at(name + ".weight");
        lin[name] = {comigs::ConstMatrixView<double>(store->data() + spec.offset, spec.rows(), spec.cols()), {}};
    }
    comigs::FrozenMlp<double> borrowed(comigs::MlpForm::swiglu, 3, 5, lin, store);
    CHECK(borrowed.is_borrowed());
    CHECK(borrowed.weight_bytes() == 0);
    CHECK(borrowed.linear("up").weight.data == lin["up"].weight.data);  // no copy
    std::vector<double> x = {0.5, -1, 2}, y1(5), y2(5);
    owned->linear("gate").forward(comigs::MatrixView<double>(y1.data(), 1, 5), comigs::ConstMatrixView<double>(x.data(), 1, 3));
    borrowed.linear("gate").forward(comigs::MatrixView<double>(y2.data(), 1, 5), comigs::ConstMatrixView<double>(x.data(), 1, 3));
    CHECK(y1 == y2);
    CHECK_THROWS_WITH_AS(borrowed.set_precision(comigs::Precision::bf16), doctest::Contains("borrowed"),
                         comigs::InvalidArgument);
    auto missing = lin;
    missing.erase("down");
    CHECK_THROWS_WITH_AS(comigs::FrozenMlp<double>(comigs::MlpForm::swiglu, 3, 5, missing, store),
                         doctest::Contains("no linear 'down'"), comigs::InvalidArgument);
    auto wrong = lin;
    wrong["up"].weight = comigs::ConstMatrixView<double>(store->data(), 3, 5);
    CHECK_THROWS_WITH_AS(comigs::FrozenMlp<double>(comigs::MlpForm::swiglu, 3, 5, wrong, store),
                         doctest::Contains("linear 'up': weight [3, 5], expected [5, 3]"), comigs::ShapeError);
}

TEST_CASE("FrozenLinear: a bf16 weight with fp32_compute multiplies unrounded activations by its exact values") {
    comigs::Rng rng(3);
    const comigs::Index out = 6, in = 40;
    std::vector<float> wf(out * in), x(2 * in);
    for (auto& v : wf) v = static_cast<float>(rng.normal(0.0, 1.0));
    for (auto& v : x) v = static_cast<float>(rng.normal(0.0, 1.0)) * (1.0f + 1.0f / 1024);  // bits below bf16's
    std::vector<comigs::kernels::bf16> wb(wf.size());
    comigs::kernels::convert_to_bf16(wb.data(), wf.data(), out * in);
    std::vector<float> widened(wf.size());
    comigs::kernels::convert_to_float(widened.data(), wb.data(), out * in);
    comigs::FrozenLinear<float> exact{comigs::ConstMatrixView<float>(widened.data(), out, in), {}};
    comigs::FrozenLinear<float> lin;
    lin.weight_bf16 = comigs::ConstMatrixView<comigs::kernels::bf16>(wb.data(), out, in);
    lin.fp32_compute = true;
    std::vector<float> y1(2 * out), y2(2 * out), y3(2 * out);
    const comigs::ConstMatrixView<float> X(x.data(), 2, in);
    exact.forward(comigs::MatrixView<float>(y1.data(), 2, out), X);
    lin.forward(comigs::MatrixView<float>(y2.data(), 2, out), X);
    lin.fp32_compute = false;
    lin.forward(comigs::MatrixView<float>(y3.data(), 2, out), X);
    double d_exact = 0, d_rounded = 0;
    for (std::size_t i = 0; i < y1.size(); ++i) {
        d_exact = std::max(d_exact, double(std::abs(y1[i] - y2[i])));
        d_rounded = std::max(d_rounded, double(std::abs(y1[i] - y3[i])));
    }
    CHECK(d_exact < 1e-5);
    CHECK(d_rounded > 10 * d_exact);  // rounding the activations to bf16 is visible: the flag matters
    std::vector<float> dy(2 * out, 0.5f), dx1(2 * in, 0.0f), dx2(2 * in, 0.0f);
    exact.backward_input(comigs::MatrixView<float>(dx1.data(), 2, in), comigs::ConstMatrixView<float>(dy.data(), 2, out));
    lin.fp32_compute = true;
    lin.backward_input(comigs::MatrixView<float>(dx2.data(), 2, in), comigs::ConstMatrixView<float>(dy.data(), 2, out));
    for (std::size_t i = 0; i < dx1.size(); ++i) CHECK(dx1[i] == doctest::Approx(dx2[i]).epsilon(1e-6));
}
