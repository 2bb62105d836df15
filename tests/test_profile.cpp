// profile.hpp: phase timers are off by default, add up wall time per phase and pass when on, and reset.
#include <comigs/profile.hpp>
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>

TEST_CASE("profile: scopes time their phase and pass only when profiling is on") {
    namespace pr = comigs::profile;
    const bool was = pr::enabled();
    pr::reset();
    pr::enable(false);
    {
        pr::Scope s(pr::Phase::attention);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    CHECK(pr::seconds(pr::Phase::attention, pr::Pass::forward) == 0.0);
    CHECK(pr::calls(pr::Phase::attention, pr::Pass::forward) == 0);

    pr::enable(true);
    for (int i = 0; i < 2; ++i) {
        pr::Scope s(pr::Phase::mlp, pr::Pass::backward);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    CHECK(pr::seconds(pr::Phase::mlp, pr::Pass::backward) >= 0.004);  // a lower bound: sleeps last at least that
    CHECK(pr::calls(pr::Phase::mlp, pr::Pass::backward) == 2);
    CHECK(pr::seconds(pr::Phase::mlp, pr::Pass::forward) == 0.0);  // the other pass is apart
    CHECK(pr::seconds(pr::Phase::head, pr::Pass::backward) == 0.0);

    pr::reset();
    CHECK(pr::seconds(pr::Phase::mlp, pr::Pass::backward) == 0.0);
    CHECK(pr::calls(pr::Phase::mlp, pr::Pass::backward) == 0);
    CHECK(std::string(pr::to_string(pr::Phase::embed)) == "embed");
    CHECK(std::string(pr::to_string(pr::Phase::head)) == "head");
    pr::enable(was);
}
