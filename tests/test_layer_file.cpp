#include <comigs/io/layer_file.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

namespace {
std::vector<std::string> golden_cases() {
    std::ifstream in(std::string(COMIGS_GOLDEN_DIR) + "/cases.txt");
    std::vector<std::string> cases;
    for (std::string line; std::getline(in, line);)
        if (!line.empty()) cases.push_back(line);
    return cases;
}
std::string golden(const std::string& name) { return std::string(COMIGS_GOLDEN_DIR) + "/" + name; }
}  // namespace

TEST_CASE("layer files: every golden case matches the PyTorch reference semantics") {
    const auto cases = golden_cases();
    REQUIRE(cases.size() >= 12);
    for (const auto& name : cases) {
        CAPTURE(name);
        const auto in = comigs::io::SafetensorsFile::load(golden(name + ".safetensors"));
        const auto want = comigs::io::SafetensorsFile::load(golden(name + ".expected.safetensors"));
        const auto got = comigs::io::run_layer_file(in);
        const bool f64 = in.at("x").dtype == comigs::io::Dtype::F64;
        // float32: the reference is float64 rounded at the end; our float32 sums over at most
        // hidden = 12 terms per output, so a few ulps of the largest value bound the difference.
        const double rtol = f64 ? 1e-10 : 2e-5;
        CHECK(got.size() == want.size());
        for (const auto& t : want.tensors()) {
            CAPTURE(t.name);
            const auto g = got.get<double>(t.name, t.shape);
            const auto w = want.get<double>(t.name);
            double err = 0, scale = 0;
            for (std::size_t i = 0; i < w.size(); ++i) {
                err = std::max(err, std::abs(g[i] - w[i]));
                scale = std::max(scale, std::abs(w[i]));
            }
            if (t.name != "lb_loss") CHECK(scale > 1e-6);  // nothing vacuous: every gradient is nonzero
            CHECK(err <= rtol * std::max(scale, 1e-12));
        }
    }
}

TEST_CASE("layer files: bad metadata and tensors are errors naming the value") {
    const auto good = comigs::io::SafetensorsFile::load(golden("gelu_e4_k2_r3_f64.safetensors"));
    auto with_meta = [&](const char* key, const char* value) {
        auto f = good;
        f.metadata()[key] = value;
        return f;
    };
    using comigs::io::run_layer_file;
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("form", "relu")), doctest::Contains("form 'relu'"), comigs::FormatError);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("scaling", "log")), doctest::Contains("scaling 'log'"),
                         comigs::FormatError);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("routing", "soft")), doctest::Contains("routing 'soft'"),
                         comigs::FormatError);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("top_k", "2x")), doctest::Contains("top_k '2x'"), comigs::FormatError);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("top_k", "5")), doctest::Contains("top_k 5"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("rank", "0")), doctest::Contains("rank 0"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("alpha", "inf")), doctest::Contains("alpha inf"),
                         comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("rank", "4")), doctest::Contains("experts.0.fc.lora_A"),
                         comigs::ShapeError);
    auto missing = good;
    missing.metadata().erase("experts");
    CHECK_THROWS_WITH_AS(run_layer_file(missing), doctest::Contains("'experts': missing"), comigs::FormatError);
    auto extra = good;
    extra.add("expert.0.fc.lora_A", {1}, std::vector<double>{1.0});
    CHECK_THROWS_WITH_AS(run_layer_file(extra), doctest::Contains("'expert.0.fc.lora_A'"), comigs::FormatError);
    auto no_router = good;
    no_router.erase("router.weight");
    CHECK_THROWS_WITH_AS(run_layer_file(no_router), doctest::Contains("router.weight"), comigs::FormatError);
}

TEST_CASE("layer files: sizes are checked against the file's tensors before anything is built") {
    const auto good = comigs::io::SafetensorsFile::load(golden("gelu_e4_k2_r3_f64.safetensors"));
    auto with_meta = [&](const char* key, const char* value) {
        auto f = good;
        f.metadata()[key] = value;
        return f;
    };
    using comigs::io::run_layer_file;
    // Refused at once (it used to build a layout of 4 * 10^9 tensors for minutes).
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("experts", "1000000000")), doctest::Contains("experts 1000000000"),
                         comigs::InvalidArgument);
    // More experts than the file holds: the first missing tensor is named.
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("experts", "4000")), doctest::Contains("experts.4.fc.lora_A"),
                         comigs::FormatError);
    // A rank the tensors do not have: named by the first tensor that disagrees, nothing allocated for it.
    CHECK_THROWS_WITH_AS(run_layer_file(with_meta("rank", "1000000000")), doctest::Contains("experts.0.fc.lora_A"),
                         comigs::ShapeError);
    // Base weights whose shapes disagree with x and with each other.
    auto bad_base = good;
    const auto fc = bad_base.shape("fc.weight");
    bad_base.erase("proj.weight");
    bad_base.add("proj.weight", {fc[1], fc[0] + 1}, std::vector<double>(static_cast<std::size_t>(fc[1] * (fc[0] + 1))));
    CHECK_THROWS_WITH_AS(run_layer_file(bad_base), doctest::Contains("proj.weight"), comigs::ShapeError);
}

TEST_CASE("layer files: a router.weight is accepted and left unused where the layer has no router") {
    // Files exported from the reference code always carry the router, also for one expert or mean routing.
    for (const char* name : {"gelu_e1_r3_f64", "gelu_e3_mean_r1_f64"}) {
        CAPTURE(name);
        const auto in = comigs::io::SafetensorsFile::load(golden(std::string(name) + ".safetensors"));
        const auto want = comigs::io::run_layer_file(in);
        REQUIRE_FALSE(in.contains("router.weight"));
        const auto E = static_cast<comigs::Index>(std::stoll(in.metadata().at("experts")));
        const comigs::Index d = in.shape("x")[1];
        std::vector<double> router(static_cast<std::size_t>(E * d));
        for (std::size_t i = 0; i < router.size(); ++i) router[i] = 0.25 * static_cast<double>(i % 7) - 0.5;
        auto with_router = in;
        with_router.add("router.weight", {E, d}, router);
        const auto got = comigs::io::run_layer_file(with_router);
        for (const auto& t : want.tensors()) {
            CAPTURE(t.name);
            CHECK(got.get<double>(t.name, t.shape) == want.get<double>(t.name, t.shape));
        }
        REQUIRE(got.contains("router.weight.grad"));
        CHECK(got.shape("router.weight.grad") == std::vector<comigs::Index>{E, d});
        for (double g : got.get<double>("router.weight.grad")) CHECK(g == 0.0);
        CHECK(got.size() == want.size() + 1);
        // Its shape is still checked.
        auto wrong = in;
        wrong.add("router.weight", {E + 1, d}, std::vector<double>(static_cast<std::size_t>((E + 1) * d)));
        CHECK_THROWS_WITH_AS(comigs::io::run_layer_file(wrong), doctest::Contains("router.weight"), comigs::ShapeError);
    }
}
