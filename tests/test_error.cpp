#include <comigs/error.hpp>
#include <comigs/version.hpp>
#include <doctest/doctest.h>

TEST_CASE("errors: one hierarchy, messages assembled from the values") {
    try {
        comigs::require<comigs::ShapeError>(false, "tensor ", "w", " has ", 3, " rows");
        FAIL("require did not throw");
    } catch (const comigs::InvalidArgument& e) {  // ShapeError is an InvalidArgument
        CHECK(std::string(e.what()) == "tensor w has 3 rows");
    }
    CHECK_NOTHROW(comigs::require(true, "never"));
    CHECK_THROWS_AS(comigs::require<comigs::FormatError>(false, "x"), comigs::Error);
    CHECK_THROWS_AS(comigs::require<comigs::IoError>(false, "x"), comigs::Error);
    CHECK_THROWS_AS(comigs::require<comigs::NumericError>(false, "x"), std::runtime_error);
    CHECK(comigs::version_major == COMIGS_VERSION_MAJOR);
    CHECK(comigs::version_minor >= 0);
}
