#include <comigs/frozen.hpp>
#include <doctest/doctest.h>

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
