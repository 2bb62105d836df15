// comigs-demo with checkpoints (examples/demo/resume.hpp), in process so that the sanitizer build runs
// it too: a run stopped (as by SIGTERM) after its first round and resumed, twice, ends with the
// results of a run that never stopped; finished methods are read back; other settings are refused
// naming the first difference. The results' field lists (fields.hpp) round-trip exactly.
#include <comigs/io/safetensors.hpp>
#include <comigs/stop_request.hpp>
#include <doctest/doctest.h>

#include <demo/run.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>

#include "temp_dir.hpp"

namespace fs = std::filesystem;
using namespace comigs::demo;

namespace demo_resume_test {

DemoConfig tiny(const fs::path& root, const std::string& out) {
    DemoConfig c;
    c.make_quick();
    c.threads = 1;
    c.progress = false;
    c.users = 2;
    c.rounds = 3;
    c.methods = {"comigs-1g1s", "pcl"};
    c.host_cache = (root / "host.safetensors").string();
    c.out = (root / out).string();
    return c;
}

/// results.json without its timings.
nlohmann::json without_timings(nlohmann::json j) {
    j.erase("seconds");
    j["config"]["host"].erase("reused");
    for (auto& [name, m] : j["methods"].items()) m.erase("seconds");
    return j;
}

}  // namespace demo_resume_test

using namespace demo_resume_test;

TEST_CASE("demo results: the field lists round-trip exactly and make results.json") {
    MethodResult m;
    m.name = "comigs-1g1s";
    UserResult u;
    u.user = 1;
    u.test_ppl = 1.0 / 3.0;
    u.test_ppl_personalised = std::numeric_limits<double>::quiet_NaN();
    u.floor_ppl = 2.5;
    u.shared_to_generalist = std::nullopt;
    u.kept_round = 7;
    m.users = {u, UserResult{}};
    m.curve = {{4, 12.25, {12.0, 12.5}}, {8, 11.0, {10.5, 11.5}}};
    m.upload_floats_per_round = 5120;
    m.routed = true;
    RoutingSample s;
    s.user = 1;
    s.text = {'a', 'b'};
    s.token_text = {"a", "b"};
    s.expert = {{0, 1}, {1, 1}};
    s.expert_is_generalist = {true, false};

    comigs::detail::ByteWriter w;
    put_fields(w, m);
    put_member(w, std::vector<RoutingSample>{s});
    comigs::detail::ByteReader r(w.bytes, 0);
    MethodResult back;
    std::vector<RoutingSample> samples;
    get_fields(r, back);
    get_member(r, samples);
    CHECK(r.done());
    CHECK(back.name == m.name);
    REQUIRE(back.users.size() == 2);
    CHECK(back.users[0].test_ppl == m.users[0].test_ppl);
    CHECK(std::isnan(back.users[0].test_ppl_personalised));
    CHECK(back.users[0].floor_ppl == 2.5);
    CHECK(!back.users[0].shared_to_generalist);
    CHECK(back.curve.size() == 2);
    CHECK(back.curve[1].mean_ppl == 11.0);
    CHECK(back.curve[1].user_ppl == m.curve[1].user_ppl);
    CHECK(back.upload_floats_per_round == 5120);
    CHECK(back.routed);
    CHECK(back.users[0].kept_round == 7);
    CHECK(!back.users[1].kept_round);
    REQUIRE(samples.size() == 1);
    CHECK(samples[0].token_text == s.token_text);
    CHECK(samples[0].expert == s.expert);
    CHECK(samples[0].expert_is_generalist == s.expert_is_generalist);
    // Cut short: a clear error, not a read past the end.
    comigs::detail::ByteReader cut(std::span<const std::byte>(w.bytes.data(), w.bytes.size() / 2), 0);
    MethodResult partial;
    CHECK_THROWS_AS(get_fields(cut, partial), comigs::FormatError);

    const auto j = results_json(nlohmann::json::object(), {m}, 20.0, std::nullopt);
    const auto& mj = j["methods"]["comigs-1g1s"];
    CHECK(mj["users"][0]["test_ppl"].get<double>() == m.users[0].test_ppl);
    CHECK(mj["users"][0]["test_ppl_personalised"].dump() == "null");  // NaN, written as null
    CHECK(mj["users"][0]["shared_to_generalist"].is_null());
    CHECK(mj["curve"][0]["step"].get<long>() == 4);
    CHECK(!mj.contains("name"));  // the method's key
    CHECK(mj.contains("mean_test_ppl"));
}

TEST_CASE("comigs-demo: stopped after a round and resumed twice, the results are the uninterrupted run's") {
    const comigs_test::TempDir tmp("comigs-test-demo-resume");
    const fs::path root = tmp.path();
    const auto reference = run_demo(tiny(root, "reference"));

    DemoConfig c = tiny(root, "resumed");
    c.checkpoint_dir = (root / "checkpoints").string();
    comigs::request_stop(SIGTERM);  // stops at the end of the first round
    CHECK_THROWS_WITH_AS(run_demo(c), doctest::Contains("stopped after round 1"), comigs::Interrupted);
    c.resume = true;
    comigs::request_stop(SIGINT);  // one more round of comigs-1g1s
    CHECK_THROWS_WITH_AS(run_demo(c), doctest::Contains("comigs-1g1s/round-000002"), comigs::Interrupted);
    comigs::clear_stop_request();
    const auto resumed = run_demo(c);
    CHECK(without_timings(resumed.results) == without_timings(reference.results));
    CHECK(fs::exists(root / "checkpoints" / "pcl" / "result.safetensors"));

    // A resume once everything is done reads the results back.
    const auto again = run_demo(c);
    CHECK(without_timings(again.results) == without_timings(reference.results));
    // A finished method's file with a damaged header (other settings in it) is not used: the method is
    // resumed from its last generation, to the same results.
    {
        const fs::path result = root / "checkpoints" / "pcl" / "result.safetensors";
        auto f = comigs::io::SafetensorsFile::load(result);
        std::string& settings = f.metadata().at("settings");
        const std::string entry = R"(["method","pcl"])";
        const auto at = settings.find(entry);
        REQUIRE(at != std::string::npos);
        settings.replace(at, entry.size(), R"(["method","pcX"])");
        f.save(result);
        const auto rerun = run_demo(c);
        CHECK(without_timings(rerun.results) == without_timings(reference.results));
        CHECK(comigs::io::SafetensorsFile::load(result).metadata().at("settings").find("pcX") == std::string::npos);
    }
    // Other settings are refused, naming the first difference.
    DemoConfig other = c;
    other.seed = 5;
    CHECK_THROWS_WITH_AS(run_demo(other), doctest::Contains("'seed' is 0 in the checkpoint but 5 in this run"),
                         comigs::InvalidArgument);
    other = c;
    other.methods = {"comigs-1g1s"};
    CHECK_THROWS_WITH_AS(run_demo(other), doctest::Contains("'methods'"), comigs::InvalidArgument);
    other = c;
    other.users = 3;
    CHECK_THROWS_WITH_AS(run_demo(other), doctest::Contains("in the checkpoint but"), comigs::InvalidArgument);
    other = c;
    other.d_model = 48;  // another host model
    CHECK_THROWS_WITH_AS(run_demo(other), doctest::Contains("'host.d_model' is 32 in the checkpoint but 48 in this run"),
                         comigs::InvalidArgument);
    // Without --resume the folder is not overwritten.
    DemoConfig fresh = c;
    fresh.resume = false;
    CHECK_THROWS_WITH_AS(run_demo(fresh), doctest::Contains("holds a run"), comigs::InvalidArgument);
}
