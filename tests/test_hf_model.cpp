// Tests of Hugging Face model folders (include/comigs/models/hf_model.hpp): parity of the GPT-2, Llama and
// Qwen2 hosts with an independent PyTorch implementation (tools/make_model_golden.py: F32 and BF16 files,
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

using comigs::Index;
namespace fs = std::filesystem;
namespace models = comigs::models;
namespace io = comigs::io;

namespace hf_tests {

fs::path golden_models() { return fs::path(COMIGS_GOLDEN_DIR) / "models"; }

std::vector<std::string> cases() {
    std::ifstream in(golden_models() / "cases.txt");
    std::vector<std::string> v;
    for (std::string line; std::getline(in, line);)
        if (!line.empty()) v.push_back(line);
    return v;
}

/// Largest |got - want| relative to the largest |want| (at least 1).
template <class Got>
double rel_err(const Got& got, const std::vector<double>& want) {
    double err = 0, mag = 1;
    for (std::size_t i = 0; i < want.size(); ++i) {
        err = std::max(err, std::abs(double(got[i]) - want[i]));
        mag = std::max(mag, std::abs(want[i]));
    }
    return err / mag;
}

/// Loads a golden case into a model of type T, adds its adapters, and compares everything.
template <class T>
void check_case(const std::string& name, const models::WeightOptions& options, double tol) {
    CAPTURE(name);
    const fs::path dir = golden_models() / name;
    const auto inputs = io::SafetensorsFile::load(dir / "inputs.safetensors");
    const auto expected = io::SafetensorsFile::load(dir / "expected.safetensors");
    const auto meta = [&](const char* k) { return inputs.metadata().at(k); };
    const auto tokens64 = inputs.get<std::int64_t>("tokens"), targets64 = inputs.get<std::int64_t>("targets");
    const std::vector<int> tokens(tokens64.begin(), tokens64.end()), targets(targets64.begin(), targets64.end());
    const Index B = inputs.shape("tokens")[0], Tn = inputs.shape("tokens")[1];

    auto loaded = models::load_hf_model<T>(dir / "model", options);
    models::CausalLm<T>& m = *loaded.model;

    // The plain model: what comigs-eval --logits writes.
    m.forward(tokens, {}, B, Tn, false);
    const auto base = expected.get<double>("base.logits");
    REQUIRE(m.logits().size() == Index(base.size()));
    const double e_base = rel_err(m.logits().data, base);
    INFO("base logits rel err " << e_base);
    CHECK(e_base < tol);

    // Attention LoRA and a mixture on every MLP, values from the inputs.
    comigs::Rng rng(1);
    m.add_attention_lora({std::stol(meta("lora_rank")), std::stod(meta("lora_alpha")), comigs::LoraScaling::sqrt}, rng);
    for (const auto& p : m.attention_projections())
        for (const char* f : {"lora_A", "lora_B"}) inputs.get_into<T>(p.prefix + f, m.lora().view(p.prefix + f));
    std::vector<std::shared_ptr<comigs::MixtureOfLoraMlp<T>>> mixtures;
    const double lb_weight = std::stod(meta("lb_weight"));
    for (Index l = 0; l < m.n_layer(); ++l) {
        comigs::MixtureConfig mc;
        mc.form = m.mlp_form();
        mc.d_model = m.d_model();
        mc.d_hidden = m.mlp_hidden();
        mc.n_experts = std::stol(meta("experts"));
        mc.top_k = std::stol(meta("top_k"));
        mc.rank = std::stol(meta("mix_rank"));
        mc.alpha = std::stod(meta("mix_alpha"));
        auto mix = std::make_shared<comigs::MixtureOfLoraMlp<T>>(mc, m.frozen_mlp(l));
        const std::string prefix = m.mlp_prefix(l);
        for (const auto& spec : mix->params().layout().tensors())
            inputs.get_into<T>(prefix + spec.name, mix->params().view(spec.name));
        m.set_mlp(l, std::make_unique<models::MixtureMlp<T>>(mix, lb_weight));
        mixtures.push_back(mix);
    }
    m.zero_grad();
    for (auto& mix : mixtures) mix->zero_grad();
    m.forward(tokens, targets, B, Tn, true);
    const double e_logits = rel_err(m.logits().data, expected.get<double>("logits"));
    INFO("adapted logits rel err " << e_logits);
    CHECK(e_logits < tol);
    CHECK(double(m.last_ce_loss()) == doctest::Approx(expected.get<double>("ce")[0]).epsilon(tol));
    CHECK(double(m.last_aux_loss()) == doctest::Approx(expected.get<double>("aux")[0]).epsilon(tol));
    m.backward();
    double worst = 0;
    int compared = 0;
    for (const auto& p : m.attention_projections())
        for (const char* f : {"lora_A", "lora_B"}) {
            const auto g = m.lora_grads().span(p.prefix + f);
            worst = std::max(worst, rel_err(g, expected.get<double>(p.prefix + f + ".grad")));
            ++compared;
        }
    for (Index l = 0; l < m.n_layer(); ++l) {
        const std::string prefix = m.mlp_prefix(l);
        const auto& mix = *mixtures[static_cast<std::size_t>(l)];
        for (const auto& spec : mix.params().layout().tensors()) {
            worst = std::max(worst, rel_err(mix.grads().span(spec.name), expected.get<double>(prefix + spec.name + ".grad")));
            ++compared;
        }
    }
    INFO("gradients: worst rel err " << worst << " over " << compared << " tensors");
    MESSAGE(name << (sizeof(T) == 8 ? std::string(" (double)") : std::string(" (float)")) << ": relative errors base logits " << e_base
                 << ", adapted logits " << e_logits << ", gradients " << worst);
    CHECK(compared > 10);
    CHECK(worst < tol * 10);
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
