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
