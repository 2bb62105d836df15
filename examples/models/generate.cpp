// comigs-generate: continue a prompt with a Hugging Face model or a GGUF file (and a user's adapters), KV-cached,
// streaming tokens as they come.
//   comigs-generate --model PATH [--adapter FILE] (--prompt TEXT | --ids "...") --max-new-tokens N
//                   [--temperature t] [--top-k k] [--top-p p] [--seed s] [--print-ids]
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "model_cli.hpp"

int main(int argc, char** argv) {
    CLI::App app{"comigs-generate: continue a prompt with a Hugging Face model, KV-cached, streaming"};
    comigs::model_cli::ModelOptions mo;
    mo.add_to(app);
    std::string prompt, ids_text;
    comigs::models::GenerateOptions g;
    g.max_new_tokens = 32;
    bool print_ids = false, ignore_eos = false, bos = false;
    auto* p_opt = app.add_option("--prompt", prompt, "prompt text (cut with the model's tokenizer)");
    auto* i_opt = app.add_option("--ids", ids_text, "prompt token ids, \"i1 i2 ...\"");
    p_opt->excludes(i_opt);
    app.add_option("--max-new-tokens", g.max_new_tokens, "tokens to generate at most")->required();
    app.add_option("--temperature", g.sampling.temperature, "0 (default): greedy; else sample from softmax(logits / t)");
    app.add_option("--top-k", g.sampling.top_k, "sample among the k most likely tokens (0: all)");
    app.add_option("--top-p", g.sampling.top_p, "sample among the most likely tokens whose probability reaches p");
    app.add_option("--seed", g.seed, "seed of the sampler");
    app.add_flag("--print-ids", print_ids, "print token ids (with the text when there is a tokenizer)");
    app.add_flag("--ignore-eos", ignore_eos, "do not stop at the model's eos_token_id");
    app.add_flag("--bos", bos, "put the model's bos_token_id before the prompt");
    CLI11_PARSE(app, argc, argv);
    try {
        comigs::require(!prompt.empty() || !ids_text.empty(), "give --prompt TEXT or --ids \"...\"");
        auto loaded = comigs::model_cli::load(mo);
        auto& m = *loaded.lm.model;
        std::vector<int> ids;
#if COMIGS_MODELS_HAVE_TOKENIZER
        std::optional<comigs::text::BpeTokenizer> tok;
        if (!prompt.empty() || comigs::model_cli::has_tokenizer(loaded))
            tok = comigs::model_cli::tokenizer(loaded, mo.model, m.vocab());
        ids = prompt.empty() ? comigs::model_cli::parse_ids(ids_text, m.vocab()) : tok->encode(prompt);
#else
        comigs::require(prompt.empty(), "--prompt: this build has no tokenizer (include/comigs/text/bpe_tokenizer.hpp); "
                                        "use --ids");
        ids = comigs::model_cli::parse_ids(ids_text, m.vocab());
#endif
        if (bos) {
            comigs::require(loaded.lm.bos_token.has_value(), "--bos: the model has no bos_token_id (config.json, or tokenizer.ggml.bos_token_id in a GGUF file)");
            ids.insert(ids.begin(), *loaded.lm.bos_token);
        }
        if (!ignore_eos) g.stop_tokens = loaded.lm.eos_tokens;
        std::vector<int> shown;  // tokens printed so far (text is decoded from all of them: multi-byte characters)
        std::string printed;
        g.on_token = [&](int t) {
            shown.push_back(t);
#if COMIGS_MODELS_HAVE_TOKENIZER
            if (tok) {
                const std::string text = tok->decode(shown);
                // Print what is new; a character split across tokens appears when complete.
                if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
                    std::fputs(text.c_str() + printed.size(), stdout);
                    printed = text;
                }
                std::fflush(stdout);
                return true;
            }
#endif
            std::printf("%s%d", shown.size() > 1 ? " " : "", t);
            std::fflush(stdout);
            return true;
        };
        const auto t0 = std::chrono::steady_clock::now();
        const auto out = comigs::models::generate(m, ids, g);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("\n");
#if COMIGS_MODELS_HAVE_TOKENIZER
        if (tok && print_ids) {
            std::printf("ids:");
            for (const int t : out) std::printf(" %d", t);
            std::printf("\n");
        }
#endif
        std::fprintf(stderr, "%zu prompt + %zu new tokens in %.2f s (%.1f tokens/s with the prompt, %d threads)%s\n",
                     ids.size(), out.size(), secs, double(ids.size() + out.size()) / secs, omp_get_max_threads(),
                     !out.empty() && !g.stop_tokens.empty() &&
                             std::find(g.stop_tokens.begin(), g.stop_tokens.end(), out.back()) != g.stop_tokens.end()
                         ? ", stopped at EOS"
                         : "");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "comigs-generate: %s\n", e.what());
        return 1;
    }
}
