#include <comigs/params.hpp>
#include <doctest/doctest.h>

TEST_CASE("ParamBuffer: named views are aligned, adjacent and typed") {
    comigs::ParamLayout layout;
    layout.add("a", {3, 5});
    layout.add("b", {7});
    comigs::ParamBuffer<float> p(std::move(layout));
    auto a = p.view("a");
    CHECK(a.rows == 3);
    CHECK(a.cols == 5);
    auto b = p.view("b");
    CHECK(b.rows == 1);
    CHECK(b.cols == 7);
    CHECK(reinterpret_cast<std::uintptr_t>(b.data) % 64 == 0);
    CHECK(b.data - a.data == 16);
    a(2, 4) = 3.0f;
    CHECK(p.span("a")[14] == 3.0f);
    comigs::ParamBuffer<float> g(p.layout_ptr());
    CHECK(g.size() == p.size());
    CHECK(g.layout() == p.layout());
}

TEST_CASE("ParamLayout: bad names and shapes are errors naming the tensor") {
    comigs::ParamLayout layout;
    layout.add("w", {2, 2});
    CHECK_THROWS_WITH_AS(layout.add("w", {1}), doctest::Contains("'w'"), comigs::InvalidArgument);
    CHECK_THROWS_AS(layout.add("x", {-1, 2}), comigs::ShapeError);
    CHECK_THROWS_AS(layout.add("y", {1, 2, 3}), comigs::ShapeError);
    CHECK_THROWS_WITH_AS(layout.at("nope"), doctest::Contains("nope"), comigs::InvalidArgument);
}

TEST_CASE("ParamLayout: element counts and offsets are overflow-checked; a refused tensor is not added") {
    const comigs::Index big = comigs::Index{1} << 40;
    comigs::ParamLayout layout;
    CHECK_THROWS_WITH_AS(layout.add("huge", {big, big}), doctest::Contains("'huge'"), comigs::ShapeError);
    layout.add("a", {comigs::Index{1} << 62});
    CHECK_THROWS_WITH_AS(layout.add("b", {comigs::Index{1} << 62}), doctest::Contains("'b'"), comigs::ShapeError);
    CHECK_THROWS_WITH_AS(layout.add("c", {comigs::Index{1} << 62, 2}), doctest::Contains("'c'"), comigs::ShapeError);
    CHECK(layout.tensors().size() == 1);
    CHECK(layout.total() == comigs::Index{1} << 62);
    CHECK(layout.find("b") == nullptr);
}

TEST_CASE("ParamLayout: many tensors are found by name") {
    comigs::ParamLayout layout;
    for (int i = 0; i < 5000; ++i) layout.add("t" + std::to_string(i), {2});
    CHECK(layout.at("t4321").offset == 4321 * 16);
    CHECK(layout.find("t5000") == nullptr);
    comigs::ParamLayout copy = layout;
    CHECK(copy == layout);
    CHECK(copy.at("t17").offset == 17 * 16);
    CHECK_THROWS_WITH_AS(copy.add("t17", {1}), doctest::Contains("'t17'"), comigs::InvalidArgument);
}
