// Tests of GGUF model files (include/comigs/models/gguf_model.hpp): the golden cases of
// tools/make_model_golden.py written as llama.cpp's converter lays them out (q/k rows permuted, llama3
// scaling as rope_freqs, F32 / BF16 / Q8_0 / Q4_0 matrices) load into the Llama host and match the
// PyTorch reference in forward and backward with attention LoRA and a mixture on every MLP; the tokenizer
// in the metadata gives the ids of the same tokenizer as tokenizer.json (and of Llama-3's real vocabulary);
// bad files are errors naming the file and the key or tensor.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include <comigs/io/gguf.hpp>
#include <comigs/models.hpp>

#include "golden_model_check.hpp"
#include "tokenizer_files.hpp"

namespace gguf_model_tests {

namespace fs = std::filesystem;
namespace models = comigs::models;
namespace io = comigs::io;
using comigs::Index;
using comigs::test::golden_models;

fs::path gguf_of(const std::string& name) { return golden_models() / name / "model.gguf"; }

/// A copy of a golden GGUF file with changes, saved under a temporary name (removed at scope exit).
struct EditedGguf {
    fs::path path;
    io::GgufFile source;
    io::GgufFile out;
    explicit EditedGguf(const std::string& golden_case)
        : path(fs::temp_directory_path() / ("comigs_gguf_model_" + std::to_string(::getpid()) + "_" + golden_case + ".gguf")),
          source(io::GgufFile::open(gguf_of(golden_case))) {}
    ~EditedGguf() { fs::remove(path); }
    /// Copies the metadata (but `skip_key`, with `set` applied after) and the tensors (but `skip_tensor`;
    /// each tensor named first in `copy_as` is added once more under the second name), then saves.
    void write(const std::string& skip_key = "", const std::string& skip_tensor = "",
               const std::vector<std::pair<std::string, io::GgufValue>>& set = {},
               const std::vector<std::pair<std::string, std::string>>& copy_as = {}) {
        out = io::GgufFile();
        for (const auto& [k, v] : source.metadata())
            if (k != skip_key) out.set(k, v);
        for (const auto& [k, v] : set) out.set(k, v);
        for (const auto& t : source.tensors()) {
            if (t.name == skip_tensor) continue;
            out.add_tensor(t.name, t.dims, t.type, t.bytes);
            for (const auto& [from, to] : copy_as)
                if (t.name == from) out.add_tensor(to, t.dims, t.type, t.bytes);
        }
        out.save(path);
    }
};

}  // namespace gguf_model_tests

TEST_CASE("models::load_gguf_model: llama.cpp-layout files match the PyTorch reference (double)") {
    using namespace gguf_model_tests;
    const auto all = comigs::test::golden_model_cases("gguf_cases.txt");
    REQUIRE(all.size() >= 6);
    for (const auto& name : all) {
        auto loaded = models::load_gguf_model<double>(gguf_of(name));
        // rope_freqs divides inv_freq in fp32 where transformers blends the llama3 frequencies in fp32:
        // an ulp apart in the medium band. Everything else is the same arithmetic.
        const bool rope_freqs = !dynamic_cast<models::Llama<double>&>(*loaded.model).config().rope_freq_divisors.empty();
        CHECK(rope_freqs == (loaded.gguf->tensor("rope_freqs.weight") != nullptr));
        comigs::test::check_golden_model<double>(name, *loaded.model, rope_freqs ? 1e-6 : 1e-9);
    }
}

TEST_CASE("models::load_gguf_model: the float host on F32, BF16, Q8_0 and Q4_0 files") {
    using namespace gguf_model_tests;
    for (const auto& name : comigs::test::golden_model_cases("gguf_cases.txt")) {
        auto loaded = models::load_gguf_model<float>(gguf_of(name), {.keep_bf16 = true, .fp32_compute = true});
        comigs::test::check_golden_model<float>(name, *loaded.model, 2e-5);
    }
}

TEST_CASE("models::load_gguf_model: a GGUF file and the folder it came from are the same model") {
    using namespace gguf_model_tests;
    for (const char* name : {"llama_f32_gqa_llama3_untied", "llama_bf16_tied_sharded", "qwen2_bf16_untied"}) {
        CAPTURE(name);
        auto g = models::load_gguf_model<float>(gguf_of(name));
        auto h = models::load_hf_model<float>(golden_models() / name / "model");
        const auto& gc = dynamic_cast<models::Llama<float>&>(*g.model).config();
        const auto& hc = dynamic_cast<models::Llama<float>&>(*h.model).config();
        CHECK(gc.model_type == hc.model_type);
        CHECK(gc.vocab == hc.vocab);
        CHECK(gc.d_model == hc.d_model);
        CHECK(gc.n_layer == hc.n_layer);
        CHECK(gc.n_head == hc.n_head);
        CHECK(gc.kv_heads() == hc.kv_heads());
        CHECK(gc.hd() == hc.hd());
        CHECK(gc.mlp_hidden == hc.mlp_hidden);
        CHECK(gc.max_positions == hc.max_positions);
        CHECK(gc.rms_eps == doctest::Approx(hc.rms_eps).epsilon(1e-6));  // stored as F32
        CHECK(gc.tie_word_embeddings == hc.tie_word_embeddings);
        CHECK(gc.has_qkv_bias() == hc.has_qkv_bias());
        CHECK(gc.rope_freq_divisors.empty() == !hc.rope_scaling.has_value());
        // The q/k rows are back in transformers' order: the matrices are equal.
        const auto& gw = dynamic_cast<models::Llama<float>&>(*g.model).weights();
        const auto& hw = dynamic_cast<models::Llama<float>&>(*h.model).weights();
        for (std::size_t l = 0; l < gw.layers.size(); ++l)
            for (auto pick : {&models::LlamaWeights<float>::Layer::q, &models::LlamaWeights<float>::Layer::k}) {
                const auto& a = gw.layers[l].*pick;
                const auto& b = hw.layers[l].*pick;
                REQUIRE(a.out_features() == b.out_features());
                for (Index i = 0; i < a.out_features(); ++i)
                    for (Index j = 0; j < a.in_features(); ++j) {
                        const float x = a.is_bf16() ? comigs::kernels::to_float(a.weight_bf16(i, j)) : a.weight(i, j);
                        const float y = b.is_bf16() ? comigs::kernels::to_float(b.weight_bf16(i, j)) : b.weight(i, j);
                        REQUIRE(x == y);
                    }
            }
        const std::vector<int> ids{3, 1, 4, 1, 5, 9, 2, 6};
        g.model->forward(ids, {}, 1, 8, false);
        h.model->forward(ids, {}, 1, 8, false);
        const auto lg = g.model->logits(), lh = h.model->logits();
        double worst = 0;
        for (Index i = 0; i < lg.rows; ++i)
            for (Index j = 0; j < lg.cols; ++j) worst = std::max(worst, double(std::abs(lg(i, j) - lh(i, j))));
        CHECK(worst < 1e-4);
    }
}

TEST_CASE("models::load_gguf_model: quantized matrices are used in place; metadata reaches the model") {
    using namespace gguf_model_tests;
    auto q4 = models::load_gguf_model<float>(gguf_of("llama_q4_0_gguf"));
    CHECK(q4.architecture == "LlamaForCausalLM (GGUF)");
    CHECK(q4.bos_token == 296);
    CHECK(q4.eos_tokens == std::vector<int>{297});
    REQUIRE(q4.gguf != nullptr);
    const auto& llama = dynamic_cast<models::Llama<float>&>(*q4.model);
    const auto& w = llama.weights();
    CHECK(w.embed.weight_quant.type == comigs::kernels::QuantType::q4_0);
    CHECK(w.head.weight_quant.type == comigs::kernels::QuantType::q8_0);  // the file's mixed types kept
    CHECK(w.layers[0].o.weight_quant.type == comigs::kernels::QuantType::q4_0);
    CHECK(w.layers[0].mlp->precision() == comigs::Precision::q4_0);
    // Every matrix but q/k points into the mapped file; only norms are converted (none: F32 in place).
    const auto* file = &q4.gguf->require_tensor("blk.1.ffn_down.weight");
    CHECK(w.layers[1].mlp->quant_weight("down.weight").data == file->bytes.data());
    CHECK(w.layers[1].v.weight_quant.data == q4.gguf->require_tensor("blk.1.attn_v.weight").bytes.data());
    CHECK(w.layers[1].q.weight_quant.data != q4.gguf->require_tensor("blk.1.attn_q.weight").bytes.data());
    CHECK(w.store->owned_bytes() == 0);
    CHECK(w.store->viewed_bytes() > q4.file_bytes / 2);

    auto q8 = models::load_gguf_model<float>(gguf_of("smollm_q8_0_gguf"));
    const auto& w8 = dynamic_cast<models::Llama<float>&>(*q8.model).weights();
    CHECK(w8.head.weight_quant.data == w8.embed.weight_quant.data);  // tied: one matrix
    CHECK(w8.embed.weight_quant.type == comigs::kernels::QuantType::q8_0);

    // llama3 scaling arrives as rope_freqs: inv_freq divided per frequency.
    auto l3 = models::load_gguf_model<float>(gguf_of("llama_f32_gqa_llama3_untied"));
    const auto& c3 = dynamic_cast<models::Llama<float>&>(*l3.model).config();
    REQUIRE(c3.rope_freq_divisors.size() == 3);
    CHECK(c3.rope_freq_divisors[0] == 1.0f);
    CHECK(c3.rope_freq_divisors[2] == 4.0f);
    CHECK(c3.head_dim == 6);

    // load_model: a GGUF file or a folder, by what the path holds.
    CHECK(models::is_gguf_file(gguf_of("qwen2_f32_tied")));
    CHECK(!models::is_gguf_file(golden_models() / "qwen2_f32_tied" / "model" / "model.safetensors"));
    CHECK(models::load_model<float>(gguf_of("qwen2_f32_tied")).gguf != nullptr);
    CHECK(models::load_model<float>(golden_models() / "qwen2_f32_tied" / "model").gguf == nullptr);
}

TEST_CASE("models::unpermute_rows: llama.cpp's q/k permutation undone") {
    using namespace gguf_model_tests;
    // Two heads of 4 rows: transformers' (h, half j, i) is the file's row h*4 + 2i + j.
    CHECK(models::unpermute_rows(8, 2) == std::vector<Index>{0, 2, 1, 3, 4, 6, 5, 7});
    // The converter's reshape(heads, 2, rows/heads/2, in).swapaxes(1, 2), applied to row indices, then undone.
    for (const auto& [rows, heads] : {std::pair<Index, Index>{24, 4}, {12, 1}, {64, 8}}) {
        const Index half = rows / heads / 2;
        std::vector<Index> permuted(static_cast<std::size_t>(rows));
        for (Index h = 0; h < heads; ++h)
            for (Index i = 0; i < half; ++i)
                for (Index j = 0; j < 2; ++j) permuted[static_cast<std::size_t>(h * 2 * half + i * 2 + j)] = h * 2 * half + j * half + i;
        const auto from = models::unpermute_rows(rows, heads);
        for (Index r = 0; r < rows; ++r) CHECK(permuted[static_cast<std::size_t>(from[static_cast<std::size_t>(r)])] == r);
    }
    CHECK_THROWS_AS(models::unpermute_rows(6, 2), comigs::FormatError);
}

TEST_CASE("models::gguf_tokenizer: the metadata's tokenizer gives tokenizer.json's ids") {
    using namespace gguf_model_tests;
    const std::vector<std::string> texts = {
        "the quick brown fox jumps over the lazy dog",
        "There, then: 2024 tokens (1234567) and THE OTHER mother's weather!\n\n  indented\ttabs",
        "<|im_start|>user\nhello<|im_end|> <tool>call</tool> <|endoftext|>",
        "caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80 bytes \xff\xfe ill-formed",
    };
    for (const char* name : {"smollm_q8_0_gguf", "llama_q4_0_gguf"}) {
        CAPTURE(name);
        const auto file = io::GgufFile::open(gguf_of(name));
        const auto g = models::gguf_tokenizer(file, gguf_of(name).string());
        const auto j = comigs::text::BpeTokenizer::load(golden_models() / name / "tokenizer.json");
        CHECK(g.vocab_size() == j.vocab_size());
        CHECK(g.merge_count() == 40);
        CHECK(g.ignore_merges() == (std::string(name) == "llama_q4_0_gguf"));
        CHECK(g.added_tokens().size() == 4);
        for (const auto& t : texts)
            for (bool special : {false, true}) {
                CAPTURE(t);
                CAPTURE(special);
                const auto ids = g.encode(t, special);
                CHECK(ids == j.encode(t, special));
                CHECK(g.decode(ids) == t);
            }
        // Special tokens are matched only when asked; the ordinary added token always.
        const auto tool = *g.token_id("<tool>");
        const auto eot = *g.token_id("<|endoftext|>");
        const auto plain = g.encode("<tool><|endoftext|>");
        CHECK(plain.front() == tool);
        CHECK(std::count(plain.begin(), plain.end(), eot) == 0);
        CHECK(g.encode("<|endoftext|>", true) == std::vector<std::int32_t>{eot});
    }
}

TEST_CASE("models::gguf_tokenizer: Llama-3's vocabulary as llama.cpp's converter records it") {
    if (!tokenizer_files::available(tokenizer_files::llama3_json())) return;
    using namespace gguf_model_tests;
    // Built from tokenizer.json the way convert_hf_to_gguf.py does: every id's spelling, CONTROL for the
    // special added tokens, the merges as "left right", pre "llama-bpe".
    const auto& j = tokenizer_files::llama3_json_value();
    const auto& vocab = j["model"]["vocab"];
    std::vector<std::string> tokens(vocab.size());
    for (const auto& [spelling, id] : vocab.items()) tokens.at(id.get<std::size_t>()) = spelling;
    std::vector<std::int32_t> types(tokens.size(), 1);
    for (const auto& a : j["added_tokens"]) {
        const auto id = a["id"].get<std::size_t>();
        if (id >= tokens.size()) {
            tokens.resize(id + 1);
            types.resize(id + 1, 1);
        }
        tokens[id] = a["content"].get<std::string>();
        types[id] = a["special"].get<bool>() ? 3 : 4;
    }
    std::vector<std::string> merges;
    for (const auto& m : j["model"]["merges"])
        merges.push_back(m.is_string() ? m.get<std::string>() : m[0].get<std::string>() + " " + m[1].get<std::string>());
    io::GgufFile f;
    f.set("tokenizer.ggml.model", io::GgufValue("gpt2"));
    f.set("tokenizer.ggml.pre", io::GgufValue("llama-bpe"));
    f.set("tokenizer.ggml.tokens", io::GgufValue::strings(tokens));
    f.set("tokenizer.ggml.token_type",
          io::GgufValue::make_array(io::GgufType::int32, std::vector<io::GgufScalar>(types.begin(), types.end())));
    f.set("tokenizer.ggml.merges", io::GgufValue::strings(merges));
    const auto parsed = io::GgufFile::parse(f.serialize());
    const auto g = models::gguf_tokenizer(parsed, "llama3.gguf");
    const auto& ref = tokenizer_files::llama3();
    CHECK(g.vocab_size() == ref.vocab_size());
    const std::string text = tokenizer_files::read_text(fs::path(COMIGS_GOLDEN_DIR) / ".." / "test_bpe_tokenizer.cpp");
    REQUIRE(text.size() > 1000);
    CHECK(g.encode(text) == ref.encode(text));
    CHECK(g.encode(text, true) == ref.encode(text, true));
    const std::string specials = "<|begin_of_text|>Hi<|eot_id|> 12345 don't";
    CHECK(g.encode(specials, true) == ref.encode(specials, true));
}

TEST_CASE("models::load_gguf_model: bad files are errors naming the file and the key or tensor") {
    using namespace gguf_model_tests;
    const auto throws = [](const EditedGguf& e, const std::string& what) {
        CAPTURE(what);
        CHECK_THROWS_WITH_AS(models::load_gguf_model<float>(e.path), doctest::Contains(what.c_str()), comigs::FormatError);
        try {
            models::load_gguf_model<float>(e.path);
        } catch (const comigs::FormatError& err) {
            CHECK(std::string(err.what()).find(e.path.string()) != std::string::npos);
        }
    };
    SUBCASE("another architecture") {
        EditedGguf e("qwen2_f32_tied");
        e.write("", "", {{"general.architecture", io::GgufValue("gemma")}});
        throws(e, "general.architecture 'gemma' is not supported");
    }
    SUBCASE("an adapter, not a model") {
        EditedGguf e("qwen2_f32_tied");
        e.write("", "", {{"general.type", io::GgufValue("adapter")}});
        throws(e, "general.type 'adapter': not a model");
    }
    SUBCASE("a required key missing") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("llama.block_count");
        throws(e, "no metadata key 'llama.block_count'");
    }
    SUBCASE("a key of the wrong type") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("", "", {{"llama.embedding_length", io::GgufValue("64")}});
        throws(e, "llama.embedding_length");
    }
    SUBCASE("partial rotary embeddings") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("", "", {{"llama.rope.dimension_count", io::GgufValue(std::uint32_t(8))}});
        throws(e, "partial rotary embeddings are not supported");
    }
    SUBCASE("a rope scaling comigs does not do") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("", "", {{"llama.rope.scaling.type", io::GgufValue("yarn")}});
        throws(e, "'llama.rope.scaling.type' is 'yarn'");
    }
    SUBCASE("rope_freqs of the wrong size") {
        EditedGguf e("llama_f32_gqa_llama3_untied");
        e.write("", "", {{"llama.attention.key_length", io::GgufValue(std::uint32_t(4))},
                         {"llama.attention.value_length", io::GgufValue(std::uint32_t(4))},
                         {"llama.rope.dimension_count", io::GgufValue(std::uint32_t(4))}});
        throws(e, "rope_freqs.weight");
    }
    SUBCASE("a missing tensor") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("", "blk.1.ffn_up.weight");
        throws(e, "no tensor 'model.layers.1.mlp.up_proj.weight'");
    }
    SUBCASE("a tensor the model does not have") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("", "", {}, {{"blk.1.ffn_up.weight", "blk.1.ffn_up_exps.weight"}});
        throws(e, "blk.1.ffn_up_exps.weight");
    }
    SUBCASE("a head count that does not split the q rows") {
        EditedGguf e("llama_q4_0_gguf");
        e.write("", "", {{"llama.attention.head_count", io::GgufValue(std::uint32_t(3))},
                         {"llama.attention.head_count_kv", io::GgufValue(std::uint32_t(1))},
                         {"llama.attention.key_length", io::GgufValue(std::uint32_t(16))},
                         {"llama.attention.value_length", io::GgufValue(std::uint32_t(16))}});
        throws(e, "blk.0.attn_q.weight");
    }
    SUBCASE("a tokenizer that is not byte-level BPE") {
        EditedGguf e("smollm_q8_0_gguf");
        e.write("", "", {{"tokenizer.ggml.model", io::GgufValue("llama")}});
        const auto f = io::GgufFile::open(e.path);
        CHECK_THROWS_WITH_AS(models::gguf_tokenizer(f, e.path.string()),
                             doctest::Contains("tokenizer.ggml.model 'llama' is not supported"), comigs::FormatError);
    }
    SUBCASE("a pre-tokenizer comigs does not know") {
        EditedGguf e("smollm_q8_0_gguf");
        e.write("", "", {{"tokenizer.ggml.pre", io::GgufValue("deepseek-coder")}});
        const auto f = io::GgufFile::open(e.path);
        CHECK_THROWS_WITH_AS(models::gguf_tokenizer(f, e.path.string()), doctest::Contains("'deepseek-coder'"),
                             comigs::FormatError);
    }
    SUBCASE("a merge of tokens not in the list") {
        EditedGguf e("smollm_q8_0_gguf");
        e.write("", "", {{"tokenizer.ggml.merges", io::GgufValue::strings({"zz q"})}});
        const auto f = io::GgufFile::open(e.path);
        CHECK_THROWS_WITH_AS(models::gguf_tokenizer(f, e.path.string()), doctest::Contains("merge 0 ('zz q')"),
                             comigs::FormatError);
    }
}

TEST_CASE("models::load_gguf_model: q/k tensors with a zero dimension are refused, never reordered (fuzz findings)") {
    namespace fs = std::filesystem;
    namespace models = comigs::models;
    // Both found by fuzz_gguf in CI and kept in its seed corpus: a q/k matrix with no bytes once passed
    // null pointers to memcpy; one with 3 x 10^16 rows of no columns asked for a 2 x 10^17-byte row map.
    const fs::path corpus = fs::path(COMIGS_GOLDEN_DIR).parent_path() / "fuzz" / "gguf_corpus";
    for (const char* name : {"zero-size-reordered-tensor.gguf", "huge-rows-zero-columns-reordered.gguf"}) {
        CAPTURE(name);
        const fs::path path = corpus / name;
        REQUIRE(fs::exists(path));
        CHECK_THROWS_AS(models::load_gguf_model<float>(path), comigs::Error);
    }
}
