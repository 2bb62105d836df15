// comigs-eval: perplexity of a text under a model (cut with the model's own tokenizer), or the logits of
// given token ids written to a safetensors file: how a user checks comigs against their own framework.
//   comigs-eval --model PATH [--adapter FILE] (--text FILE | --ids "i1 i2 ...") [--logits OUT]
// Computes in fp32 (BF16 weights used at their exact values, widened a panel at a time inside each
// product: the numbers of the model cast to fp32, without holding an fp32 copy), unless --bf16-compute.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <comigs/io/safetensors.hpp>

#include "model_cli.hpp"

namespace {

/// Mean cross-entropy (nats) of predicting ids[1..] from their prefixes, in windows of `ctx` tokens
/// (each window predicts its own next tokens: no overlap, as a fixed-context evaluation).
double mean_nll(comigs::models::CausalLm<float>& m, const std::vector<int>& ids, comigs::Index ctx, long& predicted) {
    double total = 0;
    predicted = 0;
    for (std::size_t start = 0; start + 1 < ids.size(); start += static_cast<std::size_t>(ctx)) {
        const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(ctx), ids.size() - 1 - start);
        const std::vector<int> in(ids.begin() + static_cast<std::ptrdiff_t>(start),
                                  ids.begin() + static_cast<std::ptrdiff_t>(start + len));
        const std::vector<int> tg(ids.begin() + static_cast<std::ptrdiff_t>(start + 1),
                                  ids.begin() + static_cast<std::ptrdiff_t>(start + 1 + len));
        total += m.evaluate_loss(in, tg, 1, static_cast<comigs::Index>(len)) * double(len);
        predicted += static_cast<long>(len);
    }
    return total / double(std::max<long>(predicted, 1));
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"comigs-eval: perplexity of a text, or the logits of token ids, under a Hugging Face model"};
    comigs::model_cli::ModelOptions mo;
    mo.add_to(app);
    std::string text_file, ids_text, logits_out;
    long ctx = 0;
    bool bos = false;
    auto* text_opt = app.add_option("--text", text_file, "text file to score (cut with the model's tokenizer)")
                         ->check(CLI::ExistingFile);
    auto* ids_opt = app.add_option("--ids", ids_text, "token ids, \"i1 i2 ...\" or \"i1,i2,...\"");
    text_opt->excludes(ids_opt);
    app.add_option("--logits", logits_out, "with --ids: write the logits [T, vocab] (F32, key \"logits\") to this "
                                           "safetensors file");
    app.add_option("--ctx", ctx, "tokens per evaluation window (default: the model's context, at most 1024)");
    app.add_flag("--bos", bos, "put the model's bos_token_id before the text's tokens");
    CLI11_PARSE(app, argc, argv);
    try {
        comigs::require(!text_file.empty() || !ids_text.empty(), "give --text FILE or --ids \"...\"");
        comigs::require(logits_out.empty() || !ids_text.empty(), "--logits needs --ids");
        auto loaded = comigs::model_cli::load(mo);
        auto& m = *loaded.lm.model;
        std::vector<int> ids;
        std::size_t text_bytes = 0;
        if (!ids_text.empty()) {
            ids = comigs::model_cli::parse_ids(ids_text, m.vocab());
        } else {
#if COMIGS_MODELS_HAVE_TOKENIZER
            std::ifstream in(text_file, std::ios::binary);
            std::stringstream ss;
            ss << in.rdbuf();
            const std::string text = ss.str();
            text_bytes = text.size();
            ids = comigs::model_cli::tokenizer(loaded, mo.model, m.vocab()).encode(text);
#else
            comigs::require(false, "--text: this build has no tokenizer (include/comigs/text/bpe_tokenizer.hpp); "
                                   "use --ids");
#endif
        }
        if (bos) {
            comigs::require(loaded.lm.bos_token.has_value(), "--bos: the model has no bos_token_id (config.json, or tokenizer.ggml.bos_token_id in a GGUF file)");
            ids.insert(ids.begin(), *loaded.lm.bos_token);
        }
        if (ctx <= 0) ctx = std::min<long>(long(m.max_positions()), 1024);
        comigs::require(ctx <= m.max_positions(), "--ctx ", ctx, ": more than the model's context of ", m.max_positions());

        if (!logits_out.empty()) {
            comigs::require(static_cast<comigs::Index>(ids.size()) <= m.max_positions(), "--ids: ", ids.size(),
                            " tokens, more than the model's context of ", m.max_positions());
            const auto T = static_cast<comigs::Index>(ids.size());
            m.forward(ids, {}, 1, T, false);
            comigs::io::SafetensorsFile f;
            f.metadata()["format"] = "pt";
            f.add("logits", m.logits());
            std::vector<std::int64_t> id64(ids.begin(), ids.end());
            f.add("ids", {T}, id64);
            f.save(logits_out);
            std::printf("logits [%ld, %ld] written to %s\n", long(T), long(m.vocab()), logits_out.c_str());
        }
        if (ids.size() >= 2) {
            const auto t0 = std::chrono::steady_clock::now();
            long predicted = 0;
            const double nll = mean_nll(m, ids, ctx, predicted);
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            std::printf("tokens %zu, predicted %ld (windows of %ld), mean cross-entropy %.6f nats, perplexity %.4f",
                        ids.size(), predicted, ctx, nll, std::exp(nll));
            if (text_bytes > 0) std::printf(", %.4f bits per byte", nll * double(predicted) / std::log(2.0) / double(text_bytes));
            std::printf(" (%.1f tokens/s, %d threads)\n", double(predicted) / secs, omp_get_max_threads());
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "comigs-eval: %s\n", e.what());
        return 1;
    }
}
