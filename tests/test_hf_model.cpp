// Tests of Hugging Face model folders (include/comigs/models/hf_model.hpp): parity of the GPT-2, Llama and
// Qwen2 hosts with an independent PyTorch implementation (tools/make_model_golden.py: F32, F16 and BF16 files,
// GQA, tied and untied heads, llama3 rope scaling, head_dim != d / heads, a sharded folder) in forward
// and backward with attention LoRA and a mixture of LoRA experts on every MLP; and bad folders, each a
// comigs error naming the file and the value.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <comigs/io/safetensors.hpp>
#include <comigs/mixture.hpp>
#include <comigs/models.hpp>

#include "golden_model_check.hpp"

using comigs::Index;
namespace fs = std::filesystem;
namespace models = comigs::models;
namespace io = comigs::io;

namespace hf_tests {

using comigs::test::golden_models;
std::vector<std::string> cases() { return comigs::test::golden_model_cases("cases.txt"); }

/// Loads a golden case's folder into a model of type T and compares it with the reference.
template <class T>
void check_case(const std::string& name, const models::WeightOptions& options, double tol) {
    auto loaded = models::load_hf_model<T>(golden_models() / name / "model", options);
    comigs::test::check_golden_model<T>(name, *loaded.model, tol);
}

/// A copy of a golden model folder to break (removed at scope exit).
struct ScratchModel {
    fs::path dir;
    explicit ScratchModel(const std::string& golden_case) {
        dir = fs::temp_directory_path() / ("comigs_hf_" + std::to_string(::getpid()) + "_" + golden_case);
        fs::remove_all(dir);
        fs::copy(golden_models() / golden_case / "model", dir, fs::copy_options::recursive);
    }
    ~ScratchModel() { fs::remove_all(dir); }
    std::string read(const std::string& file) const {
        std::ifstream in(dir / file);
        std::stringstream ss;
        ss << in.rdbuf();
        return ss.str();
    }
    void write(const std::string& file, const std::string& text) const { std::ofstream(dir / file) << text; }
    void replace(const std::string& file, const std::string& from, const std::string& to) const {
        std::string s = read(file);
        const auto at = s.find(from);
        REQUIRE(at != std::string::npos);
        write(file, s.replace(at, from.size(), to));
    }
};

}  // namespace hf_tests

TEST_CASE("models::load_hf_model: GPT-2, Llama and Qwen2 match the PyTorch reference (double: exact arithmetic)") {
    const auto all = hf_tests::cases();
    REQUIRE(all.size() >= 6);
    for (const auto& name : all) hf_tests::check_case<double>(name, {}, 1e-9);
}

TEST_CASE("models::load_hf_model: the float hosts match the PyTorch reference (BF16 weights kept, fp32 compute)") {
    for (const auto& name : hf_tests::cases())
        hf_tests::check_case<float>(name, {.keep_bf16 = true, .fp32_compute = true}, 2e-5);
}

TEST_CASE("models::load_hf_model: BF16 products with bf16 activations stay within bf16 tolerance") {
    for (const auto& name : hf_tests::cases())
        if (name.find("bf16") != std::string::npos)
            hf_tests::check_case<float>(name, {.keep_bf16 = true, .fp32_compute = false}, 3e-2);
}

TEST_CASE("models::load_hf_model: a mapped BF16 model is read in place; config fields reach the model") {
    auto loaded = models::load_hf_model<float>(hf_tests::golden_models() / "llama_bf16_tied_sharded" / "model");
    CHECK(loaded.architecture == "LlamaForCausalLM");
    CHECK(loaded.eos_tokens == std::vector<int>{2, 3});
    CHECK(loaded.bos_token == 1);
    auto* llama = dynamic_cast<models::Llama<float>*>(loaded.model.get());
    REQUIRE(llama != nullptr);
    const auto& store = *llama->weights().store;
    CHECK(store.owned_bytes() < store.viewed_bytes() / 10);  // norm vectors only
    CHECK(store.viewed_bytes() + store.owned_bytes() / 2 <= loaded.file_bytes);
    CHECK(llama->weights().head.weight_bf16.data == llama->weights().embed.weight_bf16.data);  // tied
    auto qwen = models::load_hf_model<double>(hf_tests::golden_models() / "qwen2_f32_tied" / "model");
    CHECK(qwen.model->architecture() == "qwen2");
    CHECK(qwen.eos_tokens == std::vector<int>{5});
    CHECK(!qwen.bos_token);
}

TEST_CASE("models::load_hf_model: an F16 file is widened to the host's type once (its values exactly)") {
    const fs::path dir = hf_tests::golden_models() / "llama_f16_gqa" / "model";
    const auto file = io::SafetensorsFile::load(dir / "model.safetensors");
    std::size_t data_bytes = 0;
    for (const auto& t : file.tensors()) {
        CHECK(t.dtype == io::Dtype::F16);
        data_bytes += t.bytes.size();
    }
    auto loaded = models::load_hf_model<float>(dir);
    auto* llama = dynamic_cast<models::Llama<float>*>(loaded.model.get());
    REQUIRE(llama != nullptr);
    const auto& store = *llama->weights().store;
    CHECK(store.viewed_bytes() == 0);
    CHECK(store.owned_bytes() == 2 * data_bytes);  // F16 -> F32: every tensor widened, once
    // The widened weight holds the file's halves exactly: 1 + 10 + 1 bits fit a float.
    const auto& q = llama->weights().layers[0].q.weight;
    const auto want = file.get<float>("model.layers.0.self_attn.q_proj.weight");
    REQUIRE(Index(want.size()) == q.rows * q.cols);
    CHECK(std::equal(want.begin(), want.end(), q.data));
}

TEST_CASE("models::load_hf_model: bad folders are errors naming the file and the value") {
    using hf_tests::ScratchModel;
    SUBCASE("unknown architecture") {
        ScratchModel s("qwen2_f32_tied");
        s.replace("config.json", "Qwen2ForCausalLM", "MistralForCausalLM");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains(("config.json '" + (s.dir / "config.json").string() +
                                                "': architecture 'MistralForCausalLM' is not supported")
                                                   .c_str()),
                             comigs::FormatError);
    }
    SUBCASE("missing shard") {
        ScratchModel s("llama_bf16_tied_sharded");
        fs::remove(s.dir / "model-00002-of-00002.safetensors");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains("shard 'model-00002-of-00002.safetensors' (holding"),
                             comigs::IoError);
    }
    SUBCASE("a shard path out of the folder") {
        ScratchModel s("llama_bf16_tied_sharded");
        s.replace("model.safetensors.index.json", "\"model-00002-of-00002.safetensors\"", "\"../model-00002-of-00002.safetensors\"");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir), doctest::Contains("is not a file name in the folder"),
                             comigs::FormatError);
    }
    SUBCASE("the index puts a tensor in a shard that does not hold it") {
        ScratchModel s("llama_bf16_tied_sharded");
        s.replace("model.safetensors.index.json", "\"model.norm.weight\": \"model-00002-of-00002.safetensors\"",
                  "\"model.norm.weight\": \"model-00001-of-00002.safetensors\"");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains("tensor 'model.norm.weight' is put in this shard"), comigs::FormatError);
    }
    SUBCASE("config disagrees with the tensors") {
        ScratchModel s("qwen2_f32_tied");
        s.replace("config.json", "\"intermediate_size\": 20", "\"intermediate_size\": 32");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains(("tensor 'model.layers.0.mlp.gate_proj.weight' in 'model.safetensors' has "
                                                "shape [20, 16], but config.json '" +
                                                (s.dir / "config.json").string() +
                                                "' (intermediate_size 32, hidden_size 16) expects [32, 16]")
                                                   .c_str()),
                             comigs::ShapeError);
    }
    SUBCASE("config with more layers than the file") {
        ScratchModel s("gpt2_bf16");
        s.replace("config.json", "\"n_layer\": 3", "\"n_layer\": 4");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir), doctest::Contains("no tensor 'transformer.h.3.ln_1.weight'"),
                             comigs::FormatError);
    }
    SUBCASE("a bad config value") {
        ScratchModel s("llama_f32_gqa_llama3_untied");
        s.replace("config.json", "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains("num_key_value_heads 3: must divide num_attention_heads 4"),
                             comigs::FormatError);
        s.replace("config.json", "\"num_key_value_heads\": 3", "\"num_key_value_heads\": \"two\"");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains("\"num_key_value_heads\" is \"two\", not an integer"), comigs::FormatError);
        s.replace("config.json", "\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\"");
        s.replace("config.json", "\"num_key_value_heads\": \"two\"", "\"num_key_value_heads\": 2");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir), doctest::Contains("rope_scaling type 'yarn' is not supported"),
                             comigs::FormatError);
    }
    SUBCASE("no weights, or only pytorch_model.bin") {
        ScratchModel s("qwen2_f32_tied");
        fs::rename(s.dir / "model.safetensors", s.dir / "pytorch_model.bin");
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir), doctest::Contains("pytorch_model.bin is not read"),
                             comigs::IoError);
    }
    SUBCASE("a truncated safetensors file") {
        ScratchModel s("qwen2_f32_tied");
        fs::resize_file(s.dir / "model.safetensors", fs::file_size(s.dir / "model.safetensors") - 10);
        CHECK_THROWS_WITH_AS(models::load_hf_model<float>(s.dir),
                             doctest::Contains(("safetensors file '" + (s.dir / "model.safetensors").string() + "'").c_str()),
                             comigs::FormatError);
    }
    CHECK_THROWS_WITH_AS(models::load_hf_model<float>("/nonexistent/model"), doctest::Contains("no such folder or file"),
                         comigs::IoError);
}
