// comigs-demo --model FILE.gguf (examples/demo/real_model.hpp): a GGUF model file with a Q4_0 base and a
// tokenizer in its metadata is the host; the users' text is cut with that tokenizer, the mixtures train on
// the quantized base (kept Q4_0, shared by every user), and each method ends below the frozen host.
#include <doctest/doctest.h>

#include <demo/run.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace demo_gguf_tests {
/// A user's text in the golden tokenizer's words, with a user-specific bias.
std::string user_text(int u) {
    const char* words[] = {"the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog ", "tokens ", "theory "};
    std::string t;
    comigs::Rng rng(91, std::uint64_t(u));
    for (int i = 0; i < 3000; ++i) t += words[(rng.below(6) + std::uint64_t(u) * 2) % 10];
    return t;
}
}  // namespace demo_gguf_tests

TEST_CASE("comigs-demo --model FILE.gguf: a Q4_0 Llama file, its metadata tokenizer, mixtures on the quantized base") {
    const fs::path gguf = fs::path(COMIGS_GOLDEN_DIR) / "models" / "llama_q4_0_gguf" / "model.gguf";
    // The loaded host: the GGUF tokenizer (not bytes), the MLPs kept in Q4_0.
    auto d = comigs::demo::load_demo_model<float>(gguf.string(), true);
    CHECK(!d.codec.byte_level());
    CHECK(d.codec.description().find("GGUF") != std::string::npos);
    CHECK(d.model().frozen_mlp(0)->precision() == comigs::Precision::q4_0);
    const auto ids = d.codec.encode("the quick brown fox");
    CHECK(ids.size() < 19);  // merged tokens, not bytes
    std::string back;
    for (auto id : ids) back += d.codec.token_text(id);
    CHECK(back == "the quick brown fox");

    const fs::path dir = fs::temp_directory_path() / ("comigs-test-demo-gguf-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::vector<std::string> texts;
    for (int u = 0; u < 3; ++u) {
        const fs::path p = dir / ("user" + std::to_string(u) + ".txt");
        std::ofstream(p) << demo_gguf_tests::user_text(u);
        texts.push_back(p.string());
    }
    comigs::demo::DemoConfig c;
    c.make_quick();
    c.threads = 1;
    c.progress = false;
    c.model = gguf.string();
    c.user_text = texts;
    c.methods = {"local", "fedavg", "comigs-1g1s"};
    c.out = (dir / "out").string();
    const auto out = comigs::demo::run_demo(c);
    REQUIRE(out.methods.size() == 3);
    for (const auto& mr : out.methods) {
        CAPTURE(mr.name);
        CHECK(mr.mean(&comigs::demo::UserResult::test_ppl) < out.host_mean_ppl);
    }
    const auto f = comigs::io::SafetensorsFile::load(dir / "out" / "adapters" / "comigs-1g1s" / "user-1.safetensors");
    CHECK(f.contains("base_model.model.model.layers.1.mlp.moe_gate.weight"));
    CHECK(f.contains("base_model.model.model.layers.0.mlp.down_proj.experts.1.lora_B.weight"));
    fs::remove_all(dir);
}
