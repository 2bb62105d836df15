// Tests of adapter files (include/comigs/models/adapter_file.hpp): a user's attention LoRA and mixtures
// written with PEFT-style keys and read back into another model over the same base give the same
// logits; files that do not fit the model are errors naming the file.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include <comigs/io/safetensors.hpp>
#include <comigs/models.hpp>

#include "model_fixtures.hpp"

namespace fs = std::filesystem;
namespace models = comigs::models;
using comigs::Index;

namespace adapter_tests {
struct TempFile {
    fs::path path;
    explicit TempFile(const std::string& name)
        : path(fs::temp_directory_path() / ("comigs_adapters_" + std::to_string(::getpid()) + "_" + name)) {}
    ~TempFile() { fs::remove(path); }
};
}  // namespace adapter_tests

TEST_CASE("models::save_adapters / load_adapters: PEFT-style keys, and the same model back") {
    for (const char* name : {"gpt2_f32", "llama_f32_gqa_llama3_untied"}) {
        CAPTURE(name);
        auto loaded = models::load_hf_model<float>(comigs::test::golden_model(name));
        auto& m = *loaded.model;
        comigs::Rng rng(31);
        const auto mixtures = comigs::test::add_random_adapters(m, rng, 3, 2);
        adapter_tests::TempFile file(std::string(name) + ".safetensors");
        models::save_adapters(file.path, m, mixtures, {{"comigs.user", "2"}});

        const auto f = comigs::io::SafetensorsFile::load(file.path);
        CHECK(f.metadata().at("format") == "pt");
        CHECK(f.metadata().at("comigs.user") == "2");
        CHECK(f.metadata().at("comigs.architecture") == m.architecture());
        if (m.architecture() == "gpt2") {
            CHECK(f.contains("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"));
            CHECK(f.contains("base_model.model.transformer.h.0.mlp.moe_gate.weight"));
            CHECK(f.contains("base_model.model.transformer.h.0.mlp.c_fc.experts.2.lora_B.weight"));
        } else {
            CHECK(f.contains("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"));
            CHECK(f.shape("base_model.model.model.layers.0.mlp.moe_gate.weight") == std::vector<Index>{3, 16});
            CHECK(f.shape("base_model.model.model.layers.0.mlp.down_proj.experts.1.lora_A.weight") ==
                  std::vector<Index>{2, 24});
        }

        auto other = m.share_base();
        const auto back = models::load_adapters(file.path, *other);
        REQUIRE(back.size() == mixtures.size());
        CHECK(back[0]->config().n_experts == 3);
        CHECK(back[0]->role(0) == comigs::Role::generalist);
        const std::vector<int> tokens = {1, 5, 2, 7, 3, 6};
        m.forward(tokens, {}, 1, 6, false);
        other->forward(tokens, {}, 1, 6, false);
        for (Index i = 0; i < m.logits().size(); ++i) REQUIRE(other->logits().data[i] == m.logits().data[i]);
    }
}

TEST_CASE("models::load_adapters: adapters that do not fit the model are errors naming the file") {
    auto gpt2 = models::load_hf_model<float>(comigs::test::golden_model("gpt2_f32"));
    auto llama = models::load_hf_model<float>(comigs::test::golden_model("llama_f32_gqa_llama3_untied"));
    auto qwen = models::load_hf_model<float>(comigs::test::golden_model("qwen2_f32_tied"));
    comigs::Rng rng(32);
    const auto mixtures = comigs::test::add_random_adapters(*llama.model, rng);
    adapter_tests::TempFile file("llama.safetensors");
    models::save_adapters(file.path, *llama.model, mixtures);
    CHECK_THROWS_WITH_AS(models::load_adapters(file.path, *gpt2.model->share_base()),
                         doctest::Contains("adapters of a 'llama' model, this model is 'gpt2'"), comigs::FormatError);
    // Another Llama with other shapes: the first tensor that differs is named.
    auto other = llama.model->share_base();
    auto f = comigs::io::SafetensorsFile::load(file.path);
    f.erase("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight");
    f.save(file.path);
    CHECK_THROWS_WITH_AS(models::load_adapters(file.path, *other),
                         doctest::Contains("no tensor 'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight'"),
                         comigs::FormatError);
    f.add("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", {2, 15}, std::vector<float>(30, 0.f));
    f.save(file.path);
    CHECK_THROWS_WITH_AS(models::load_adapters(file.path, *llama.model->share_base()),
                         doctest::Contains("shape [2, 15], expected [2, 16]"), comigs::ShapeError);
    f.erase("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight");
    f.add("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", {2, 16}, std::vector<float>(32, 0.f));
    f.add("base_model.model.model.layers.7.mlp.moe_gate.weight", {2, 16}, std::vector<float>(32, 0.f));
    f.save(file.path);
    CHECK_THROWS_WITH_AS(models::load_adapters(file.path, *llama.model->share_base()),
                         doctest::Contains("'base_model.model.model.layers.7.mlp.moe_gate.weight' is not an adapter"),
                         comigs::FormatError);
    CHECK(qwen.model->architecture() == "qwen2");
}
