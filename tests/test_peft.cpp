#include <comigs/io/peft.hpp>
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <memory>

namespace {
std::filesystem::path temp_dir(const char* name) {
    auto p = std::filesystem::temp_directory_path() / ("comigs-test-peft-" + std::to_string(::getpid()) + "-" + name);
    std::filesystem::remove_all(p);
    return p;
}

std::string module_of(const std::string& linear) { return "transformer.h.0.mlp.c_" + linear; }

comigs::MixtureOfLoraMlp<float> make_layer(comigs::LoraScaling scaling, comigs::Index rank, std::uint64_t seed) {
    using namespace comigs;
    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, 6, 10);
    MixtureConfig cfg;
    cfg.d_model = 6;
    cfg.d_hidden = 10;
    cfg.rank = rank;
    cfg.scaling = scaling;
    MixtureOfLoraMlp<float> layer(cfg, base);
    Rng rng(seed);
    layer.init(rng);
    for (const auto& s : layer.params().layout().tensors())
        for (float& v : layer.params().span(s.name)) v = static_cast<float>(rng.normal());
    return layer;
}

// s * B A for one linear of expert e, as a dense matrix.
std::vector<double> delta(const comigs::MixtureOfLoraMlp<float>& l, comigs::Index e, const std::string& lin) {
    const auto A = l.params().view(comigs::MixtureOfLoraMlp<float>::tensor_name(e, lin, 'A'));
    const auto B = l.params().view(comigs::MixtureOfLoraMlp<float>::tensor_name(e, lin, 'B'));
    std::vector<double> d(static_cast<std::size_t>(B.rows * A.cols), 0.0);
    for (comigs::Index o = 0; o < B.rows; ++o)
        for (comigs::Index i = 0; i < A.cols; ++i)
            for (comigs::Index k = 0; k < A.rows; ++k)
                d[static_cast<std::size_t>(o * A.cols + i)] += static_cast<double>(l.scale()) * B(o, k) * A(k, i);
    return d;
}
}  // namespace

TEST_CASE("PEFT: export of one expert writes PEFT's keys, shapes and rsLoRA flag") {
    auto layer = make_layer(comigs::LoraScaling::sqrt, 4, 1);
    const auto dir = temp_dir("export");
    comigs::io::save_peft_expert(dir, layer, 0, module_of, {.base_model = "gpt2", .fold_rslora_into_alpha = false, .fan_in_fan_out = true});
    const auto file = comigs::io::SafetensorsFile::load(dir / "adapter_model.safetensors");
    CHECK(file.metadata().at("format") == "pt");
    CHECK(file.shape("base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight") == std::vector<comigs::Index>{4, 6});
    CHECK(file.shape("base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight") == std::vector<comigs::Index>{10, 4});
    CHECK(file.shape("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight") == std::vector<comigs::Index>{4, 10});
    std::ifstream in(dir / "adapter_config.json");
    const auto cfg = nlohmann::json::parse(in);
    CHECK(cfg.at("peft_type") == "LORA");
    CHECK(cfg.at("r") == 4);
    CHECK(cfg.at("lora_alpha") == 16.0);
    CHECK(cfg.at("use_rslora") == true);
    CHECK(cfg.at("fan_in_fan_out") == true);
    CHECK(cfg.at("comigs").at("role") == "generalist");
    std::filesystem::remove_all(dir);
}

TEST_CASE("PEFT: round trip, and conventions converted so that s B A is preserved") {
    auto src = make_layer(comigs::LoraScaling::sqrt, 4, 2);
    for (bool fold : {false, true}) {
        CAPTURE(fold);
        const auto dir = temp_dir(fold ? "fold" : "plain");
        comigs::io::save_peft_expert(dir, src, 1, module_of, {.base_model = "", .fold_rslora_into_alpha = fold});
        const auto adapter = comigs::io::load_peft_adapter(dir);
        CHECK(adapter.scaling == (fold ? comigs::LoraScaling::linear : comigs::LoraScaling::sqrt));
        CHECK(adapter.scale() == doctest::Approx(src.scale()));  // folding keeps the scale
        // Into a target with the other convention (alpha/r): B is rescaled, the product is kept.
        auto dst = make_layer(comigs::LoraScaling::linear, 4, 3);
        const double factor = comigs::io::load_peft_expert(adapter, dst, 0, module_of);
        CHECK(factor == doctest::Approx(src.scale() / dst.scale()));
        for (const std::string lin : {"fc", "proj"}) {
            const auto a = delta(src, 1, lin), b = delta(dst, 0, lin);
            for (std::size_t i = 0; i < a.size(); ++i) CHECK(b[i] == doctest::Approx(a[i]).epsilon(1e-5));
        }
        std::filesystem::remove_all(dir);
    }
}

TEST_CASE("PEFT: a wrong rank, a missing module or a broken config is a named error") {
    auto src = make_layer(comigs::LoraScaling::sqrt, 4, 4);
    const auto dir = temp_dir("errors");
    comigs::io::save_peft_expert(dir, src, 0, module_of);
    const auto adapter = comigs::io::load_peft_adapter(dir);
    auto rank2 = make_layer(comigs::LoraScaling::sqrt, 2, 5);
    CHECK_THROWS_WITH_AS(comigs::io::load_peft_expert(adapter, rank2, 0, module_of), doctest::Contains("adapter rank 4"),
                         comigs::ShapeError);
    auto other = [](const std::string& lin) { return "model.layers.0.mlp." + lin; };
    CHECK_THROWS_WITH_AS(comigs::io::load_peft_expert(adapter, src, 0, other), doctest::Contains("model.layers.0.mlp.fc"),
                         comigs::FormatError);
    {
        std::ofstream out(dir / "adapter_config.json");
        out << R"({"peft_type": "IA3", "r": 4, "lora_alpha": 16})";
    }
    CHECK_THROWS_WITH_AS(comigs::io::load_peft_adapter(dir), doctest::Contains("IA3"), comigs::FormatError);
    {
        std::ofstream out(dir / "adapter_config.json");
        out << R"({"peft_type": "LORA", "r": 0, "lora_alpha": 16})";
    }
    CHECK_THROWS_WITH_AS(comigs::io::load_peft_adapter(dir), doctest::Contains("rank 0"), comigs::InvalidArgument);
    std::filesystem::remove_all(dir);
}
