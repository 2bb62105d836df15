#include <comigs/frozen.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
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
    comigs::FrozenLinear<float> lin{{}, {}, comigs::ConstMatrixView<comigs::kernels::bf16>(wb.data(), out, in), true};
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
