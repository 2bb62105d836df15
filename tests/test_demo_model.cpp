// comigs-demo on a model loaded through --model (examples/demo/real_model.hpp): the demo's own saved
// host, loaded as a model file, reproduces the pretrained-host run exactly; a Llama-family host (byte
// vocabulary, random weights) runs every method with SwiGLU mixtures and attention LoRA on q/k/v/o;
// each user's adapters are saved with PEFT-style keys and load back into the model.
#include <doctest/doctest.h>

#include <demo/run.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "model_fixtures.hpp"

namespace fs = std::filesystem;

namespace demo_model_tests {
std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}
/// A user's text: words with a user-specific bias, enough for the quick splits.
std::string user_text(int u) {
    const char* words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat ", "dog ", "ran ", "to ", "log "};
    std::string t;
    comigs::Rng rng(77, std::uint64_t(u));
    for (int i = 0; i < 2500; ++i) t += words[(rng.below(6) + std::uint64_t(u) * 2) % 10];
    return t;
}
}  // namespace demo_model_tests

TEST_CASE("comigs-demo --model: the saved tiny host as a model file gives the pretrained-host run exactly") {
    comigs::demo::DemoConfig c;
    c.make_quick();
    c.threads = 1;
    c.progress = false;
    c.methods = {"comigs-1g1s", "fedavg"};
    c.out = (fs::temp_directory_path() / ("comigs-test-demo-model-" + std::to_string(::getpid()))).string();
    fs::remove_all(c.out);
    const auto first = comigs::demo::run_demo(c);
    std::string host;
    for (const auto& e : fs::directory_iterator(c.out))
        if (e.path().filename().string().starts_with("host-")) host = e.path().string();
    REQUIRE(!host.empty());
    comigs::demo::DemoConfig m = c;
    m.model = host;
    const auto second = comigs::demo::run_demo(m);
    REQUIRE(second.methods.size() == first.methods.size());
    CHECK(second.host_mean_ppl == first.host_mean_ppl);
    for (std::size_t k = 0; k < first.methods.size(); ++k)
        for (std::size_t u = 0; u < first.methods[k].users.size(); ++u)
            CHECK(second.methods[k].users[u].test_ppl == first.methods[k].users[u].test_ppl);
    const auto j = nlohmann::json::parse(demo_model_tests::read_all(fs::path(m.out) / "results.json"));
    CHECK(j["config"]["host"]["model"] == host);
    CHECK(j["config"]["host"]["tokenizer"] == "bytes (a byte-level model)");

    // Every user's adapters, loadable into the model they were trained on: the deployed test perplexity
    // comes back from the file.
    const fs::path adapter = fs::path(m.out) / "adapters" / "comigs-1g1s" / "user-1.safetensors";
    REQUIRE(fs::exists(adapter));
    auto loaded = comigs::models::load_hf_model<float>(host);
    const auto mixtures = comigs::models::load_adapters(adapter, *loaded.model);
    CHECK(mixtures.size() == 2);
    CHECK(mixtures[0]->role(0) == comigs::Role::generalist);
    CHECK(mixtures[0]->role(1) == comigs::Role::specialist);
    fs::remove_all(c.out);
}

TEST_CASE("comigs-demo --model: a Llama-family host with SwiGLU mixtures and attention LoRA on q/k/v/o") {
    const fs::path dir = fs::temp_directory_path() / ("comigs-test-demo-llama-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    auto lc = comigs::test::tiny_llama_config(false);
    lc.vocab = 256;  // byte-level: no tokenizer files needed
    lc.d_model = 32;
    lc.head_dim = 8;
    lc.mlp_hidden = 48;
    comigs::Rng rng(5);
    comigs::test::write_llama_folder(dir / "model", lc, rng);
    std::vector<std::string> texts;
    for (int u = 0; u < 3; ++u) {
        const fs::path p = dir / ("user" + std::to_string(u) + ".txt");
        std::ofstream(p) << demo_model_tests::user_text(u);
        texts.push_back(p.string());
    }
    comigs::demo::DemoConfig c;
    c.make_quick();
    c.threads = 1;
    c.progress = false;
    c.model = (dir / "model").string();
    c.user_text = texts;
    c.attention_rank = 2;
    c.methods = {"local", "fedavg", "comigs-1g1s"};
    c.out = (dir / "out").string();
    const auto out = comigs::demo::run_demo(c);
    REQUIRE(out.methods.size() == 3);
    for (const auto& mr : out.methods) {
        CAPTURE(mr.name);
        // Trains: every method ends below the frozen host on the users' own text.
        CHECK(mr.mean(&comigs::demo::UserResult::test_ppl) < out.host_mean_ppl);
    }
    // CoMiGS-1G1S uploads the generalist's gate/up/down LoRA and the attention LoRA: half of FedAvg's
    // expert share plus the same attention share.
    const long d = lc.d_model, h = lc.mlp_hidden, r = 8, L = lc.n_layer, qw = lc.n_head * lc.hd(),
               kvw = lc.kv_heads() * lc.hd(), a = 2;
    const long expert = L * r * (d + h + d + h + h + d), attention = L * a * ((d + qw) + 2 * (d + kvw) + (qw + d));
    CHECK(out.methods[1].upload_floats_per_round == 2 * expert + attention);
    CHECK(out.methods[2].upload_floats_per_round == expert + attention);
    // The saved adapters carry the Llama module names.
    const auto f = comigs::io::SafetensorsFile::load(dir / "out" / "adapters" / "comigs-1g1s" / "user-2.safetensors");
    CHECK(f.contains("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"));
    CHECK(f.contains("base_model.model.model.layers.0.mlp.moe_gate.weight"));
    CHECK(f.contains("base_model.model.model.layers.0.mlp.up_proj.experts.1.lora_A.weight"));
    const auto html = demo_model_tests::read_all(dir / "out" / "routing.html");
    CHECK(html.find("<span") != std::string::npos);
    fs::remove_all(dir);
}
