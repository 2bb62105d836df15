#include <comigs/view.hpp>
#include <doctest/doctest.h>

#include <vector>

TEST_CASE("MatrixView: strides, sub-rows, const conversion and Eigen maps") {
    std::vector<int> buf(4 * 5);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<int>(i);
    comigs::MatrixView<int> m(buf.data(), 4, 3, 5);  // 3 of every 5 columns
    CHECK(m(2, 1) == 11);
    CHECK_FALSE(m.contiguous());
    auto mid = m.middle_rows(1, 2);
    CHECK(mid(0, 0) == 5);
    CHECK(mid.rows == 2);
    comigs::ConstMatrixView<int> c = m;
    CHECK(c.row(3)[2] == 17);
    auto e = comigs::eigen(c);
    CHECK(e(3, 2) == 17);
    CHECK(e.cols() == 3);
    comigs::eigen(m)(0, 0) = -1;
    CHECK(buf[0] == -1);
}

TEST_CASE("MatrixView: bad shapes and null data are errors") {
    int x = 0;
    CHECK_THROWS_WITH_AS(comigs::MatrixView<int>(&x, -1, 2), doctest::Contains("[-1, 2]"), comigs::ShapeError);
    CHECK_THROWS_WITH_AS(comigs::MatrixView<int>(&x, 2, 3, 2), doctest::Contains("stride 2"), comigs::ShapeError);
    CHECK_THROWS_WITH_AS(comigs::MatrixView<int>(nullptr, 2, 3), doctest::Contains("null"), comigs::InvalidArgument);
    CHECK_NOTHROW(comigs::MatrixView<int>(nullptr, 0, 3));
    comigs::MatrixView<int> v(&x, 1, 1);
    CHECK_THROWS_WITH_AS(comigs::require_shape(v, 2, 1, "weight"), doctest::Contains("weight has shape [1, 1], expected [2, 1]"),
                         comigs::ShapeError);
}
