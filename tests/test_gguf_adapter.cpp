#include <comigs/io/gguf_adapter.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace {
using namespace comigs;

/// Writes f to $COMIGS_GGUF_EXPORT_DIR/name when that is set (tools/check-gguf.sh reads them with the
/// npm package @huggingface/gguf, an independent reader).
void export_for_checking(const io::GgufFile& f, const std::string& name) {
    if (const char* dir = std::getenv("COMIGS_GGUF_EXPORT_DIR")) f.save(std::filesystem::path(dir) / name);
}
}  // namespace

TEST_CASE("GGUF LoRA adapter: a generalist and a specialist of a SwiGLU mixture, llama.cpp's names, shapes and alpha") {
    for (LoraScaling scaling : {LoraScaling::sqrt, LoraScaling::linear}) {
        CAPTURE(std::string(to_string(scaling)));
        MixtureConfig cfg;
        cfg.form = MlpForm::swiglu;
        cfg.d_model = 32;
        cfg.d_hidden = 64;
        cfg.n_experts = 2;
        cfg.top_k = 2;
        cfg.rank = 4;
        cfg.alpha = 16;
        cfg.scaling = scaling;
        auto base = std::make_shared<FrozenMlp<float>>(MlpForm::swiglu, 32, 64);
        Rng rng(3);
        base->randomize(rng);
        MixtureOfLoraMlp<float> layer(cfg, base);
        layer.init(rng);
        for (float& v : layer.params().all()) v = static_cast<float>(rng.normal(0.0, 0.3));
        const auto names = [](const std::string& lin) { return "blk.5.ffn_" + lin; };
        for (Index e : {Index(0), Index(1)}) {
            const auto f = io::make_gguf_lora_adapter(io::gguf_lora_modules(layer, e, names), "llama");
            if (e == 0 && scaling == LoraScaling::sqrt) export_for_checking(f, "lora_generalist.gguf");
            const auto back = io::GgufFile::parse(f.serialize());
            CHECK(back.get<std::string>("general.type") == "adapter");
            CHECK(back.get<std::string>("adapter.type") == "lora");
            CHECK(back.get<std::string>("general.architecture") == "llama");
            const auto a = io::read_gguf_lora_adapter(back);
            // llama.cpp's scale alpha / r reproduces comigs' s.
            CHECK(a.alpha / 4.0 == doctest::Approx(layer.scale()).epsilon(1e-6));
            REQUIRE(a.modules.size() == 3);
            for (const auto& m : a.modules) {
                CAPTURE(m.tensor);
                const std::string lin = m.tensor.substr(std::string("blk.5.ffn_").size());
                const auto A = layer.params().view(MixtureOfLoraMlp<float>::tensor_name(e, lin, 'A'));
                const auto B = layer.params().view(MixtureOfLoraMlp<float>::tensor_name(e, lin, 'B'));
                CHECK(m.rank == 4);
                CHECK(m.in == A.cols);
                CHECK(m.out == B.rows);
                // dims: lora_a [in, r], lora_b [r, out] (ne0 first), as llama.cpp requires.
                CHECK(back.tensor(m.tensor + ".weight.lora_a")->dims == std::vector<std::uint64_t>{std::uint64_t(A.cols), 4});
                CHECK(back.tensor(m.tensor + ".weight.lora_b")->dims == std::vector<std::uint64_t>{4, std::uint64_t(B.rows)});
                CHECK(std::equal(m.lora_A.begin(), m.lora_A.end(), A.data));
                CHECK(std::equal(m.lora_B.begin(), m.lora_B.end(), B.data));
            }
        }
    }
}

TEST_CASE("GGUF LoRA adapter: q/k row permutation, one alpha per file, and the errors") {
    // B of attn_q with 2 heads of 4 rows: llama.cpp's order pairs rows i and i + 2 within a head.
    std::vector<float> A(2 * 32, 0.5f), B(8 * 2);
    for (std::size_t i = 0; i < B.size(); ++i) B[i] = static_cast<float>(i / 2);  // row index in both columns
    io::GgufLoraModule<float> q{"blk.0.attn_q", ConstMatrixView<float>(A.data(), 2, 32), ConstMatrixView<float>(B.data(), 8, 2),
                                8.0, 2};
    const auto f = io::make_gguf_lora_adapter(std::vector<io::GgufLoraModule<float>>{q}, "llama");
    const auto a = io::read_gguf_lora_adapter(io::GgufFile::parse(f.serialize()));
    std::vector<float> rows;
    for (Index r = 0; r < 8; ++r) rows.push_back(a.modules[0].lora_B[static_cast<std::size_t>(r * 2)]);
    // w.reshape(2, 2, 2, cols).swapaxes(1, 2): head 0 rows 0, 2, 1, 3; head 1 rows 4, 6, 5, 7.
    CHECK(rows == std::vector<float>{0, 2, 1, 3, 4, 6, 5, 7});
    CHECK(a.alpha == 16.0);

    io::GgufLoraModule<float> other{"blk.0.ffn_up", ConstMatrixView<float>(A.data(), 2, 32),
                                    ConstMatrixView<float>(B.data(), 8, 2), 3.0};
    CHECK_THROWS_WITH_AS(io::make_gguf_lora_adapter(std::vector<io::GgufLoraModule<float>>{q, other}, "llama"),
                         doctest::Contains("one alpha per adapter"), InvalidArgument);
    other.scale = 0.0;
    CHECK_THROWS_WITH_AS(io::make_gguf_lora_adapter(std::vector<io::GgufLoraModule<float>>{other}, "llama"),
                         doctest::Contains("alpha 0"), InvalidArgument);
    q.permute_heads = 3;
    CHECK_THROWS_AS(io::make_gguf_lora_adapter(std::vector<io::GgufLoraModule<float>>{q}, "llama"), ShapeError);
    CHECK_THROWS_AS(io::make_gguf_lora_adapter(std::vector<io::GgufLoraModule<float>>{}, "llama"), InvalidArgument);
}

TEST_CASE("GGUF LoRA adapter: a MixtureOfLoraLinear expert (GPT-2 attention) in F16") {
    MixtureLinearConfig cfg;
    cfg.in_features = 64;
    cfg.out_features = 96;
    cfg.n_experts = 2;
    cfg.top_k = 1;
    cfg.rank = 8;
    std::vector<float> W(96 * 64, 0.0f);
    MixtureOfLoraLinear<float> layer(cfg, FrozenLinear<float>{ConstMatrixView<float>(W.data(), 96, 64), {}});
    Rng rng(4);
    layer.init(rng);
    for (float& v : layer.params().all()) v = static_cast<float>(rng.normal(0.0, 0.3));
    const auto f = io::make_gguf_lora_adapter(std::vector{io::gguf_lora_module(layer, 1, "blk.2.attn_qkv")}, "gpt2",
                                              io::GgmlType::f16);
    export_for_checking(f, "lora_specialist_f16.gguf");
    const auto back = io::GgufFile::parse(f.serialize());
    CHECK(back.tensor("blk.2.attn_qkv.weight.lora_b")->type == io::GgmlType::f16);
    const auto a = io::read_gguf_lora_adapter(back);
    CHECK(a.alpha == doctest::Approx(layer.scale() * 8.0).epsilon(1e-6));
    const auto B = layer.params().view(MixtureOfLoraLinear<float>::tensor_name(1, 'B'));
    for (Index i = 0; i < 96 * 8; ++i)
        CHECK(a.modules[0].lora_B[static_cast<std::size_t>(i)] ==
              detail::f16_bits_to_float(detail::float_to_f16_bits(B.data[i])));
    CHECK_THROWS_WITH_AS(io::gguf_lora_module(layer, 2, "x"), doctest::Contains("expert 2"), InvalidArgument);
}
