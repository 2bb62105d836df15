#include <comigs/random.hpp>
#include <doctest/doctest.h>

#include <cmath>

TEST_CASE("Rng: same seed and stream give the same sequence; streams differ") {
    comigs::Rng a(42, 0), b(42, 0), c(42, 1);
    bool differs = false;
    for (int i = 0; i < 100; ++i) {
        const auto x = a.next_u64();
        CHECK(x == b.next_u64());
        differs |= x != c.next_u64();
    }
    CHECK(differs);
}

TEST_CASE("Rng: state round-trips exactly, including normals") {
    comigs::Rng a(7);
    a.normal();
    const auto st = a.state();
    const double n1 = a.normal(), n2 = a.normal();
    comigs::Rng b(0);
    b.set_state(st);
    CHECK(b.normal() == n1);
    CHECK(b.normal() == n2);
}

TEST_CASE("Rng: moments of uniform, normal, gumbel and gamma") {
    comigs::Rng r(1);
    const int n = 200000;
    double su = 0, sn = 0, sn2 = 0, sg = 0, sga = 0;
    for (int i = 0; i < n; ++i) {
        const double u = r.uniform();
        CHECK((u >= 0.0 && u < 1.0));
        su += u;
        const double z = r.normal();
        sn += z;
        sn2 += z * z;
        sg += r.gumbel();
        sga += r.gamma(0.5);
    }
    CHECK(su / n == doctest::Approx(0.5).epsilon(0.01));
    CHECK(std::abs(sn / n) < 0.01);
    CHECK(sn2 / n == doctest::Approx(1.0).epsilon(0.02));
    CHECK(sg / n == doctest::Approx(0.5772156649).epsilon(0.02));  // Euler-Mascheroni
    CHECK(sga / n == doctest::Approx(0.5).epsilon(0.02));
    for (int i = 0; i < 1000; ++i) CHECK(r.below(7) < 7u);
}
