#pragma once
// comigs-demo's command line, run by main.cpp and by examples/mpi/demo_mpi.cpp (comigs-demo-mpi).
// comigs-demo: the collaborative-training demo (the README's main job). Pretrains a tiny GPT-2 style
// host on the embedded corpus's base source (or reuses the saved one), then trains every method on
// the same users, data, steps and batch, and writes results.json, curves.svg and routing.html.
// See run.hpp for the methods and the protocols.
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <sstream>
#include <string_view>

#include "demo_main.hpp"
#include "placement.hpp"
#include "run.hpp"

namespace comigs::demo {
namespace cli_detail {
template <class V>
std::vector<V> parse_list(const std::string& s, const char* flag) {
    std::vector<V> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
        if (item.empty()) continue;
        std::istringstream is(item);
        V v{};
        is >> v;
        comigs::require(!is.fail() && is.eof(), flag, " entry '", item, "': not a number");
        out.push_back(v);
    }
    return out;
}
inline std::vector<std::string> split_names(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) if (!item.empty()) out.push_back(item);
    return out;
}
}  // namespace cli_detail

#ifdef COMIGS_DEMO_IMPLEMENTATION
// Compiled once with run_demo, in demo.cpp (the comigs_demo library); declared in demo_main.hpp.
int demo_main(int argc, char** argv) { return demo_main(argc, argv, Placement{}); }

int demo_main(int argc, char** argv, Placement place) {
    using namespace cli_detail;
    comigs::demo::DemoConfig c;
    CLI::App app{
        "comigs-demo: collaborative training of a tiny GPT host with mixtures of LoRA generalists and "
        "specialists (CoMiGS) against Local, FedAvg, CoMiGS-2G/2S, pFedMoE, PCL (and HetLoRA/FlexLoRA for "
        "different ranks).\n\n"
        "Methods (same host, data, steps, batch, learning rates):\n"
        "  local        2 experts, mean routing (no router), nothing shared\n"
        "  fedavg       2 experts, mean routing, everything averaged every round\n"
        "  comigs-2g    2 generalists (both averaged), top-k router local, trained on validation data\n"
        "  comigs-2s    2 specialists (nothing averaged), router on validation data\n"
        "  comigs-1g1s  expert 0 generalist (averaged), expert 1 specialist, router on validation data\n"
        "  pfedmoe      1G1S with the router trained jointly with the experts on training data\n"
        "  pcl          whole adapter models averaged per user, weights softmax(-validation perplexity)\n"
        "  hetlora, flexlora  one shared expert per user with per-user ranks (--ranks)\n"
        "Reported: deployed test perplexity (after the final aggregation and download), personalised (right "
        "after the user's last local steps), OOD (uniform mixture of all users' test data), the floor and the "
        "share of the host-to-floor gap closed (embedded corpus), routing shares.\n"
        "Attention LoRA (--attention-lora R) is off by default: only the MLPs carry adapters; with it, every "
        "method that shares anything also shares the attention adapters (local and comigs-2s keep them)."};
    std::string experts, ranks, train_tokens, val_tokens, test_tokens, stop_tokens, methods;
    bool quick = false;
    app.add_option("--users", c.users, "number of users")->capture_default_str();
    app.add_option("--experts", experts, "experts per user, comma list (default 2 each; 1 = a single generalist)");
    app.add_option("--ranks", ranks, "LoRA rank per user, comma list (default 8 each)");
    app.add_option("--top-k", c.top_k, "experts per token")->capture_default_str();
    app.add_option("--alpha", c.alpha, "LoRA alpha (scaling alpha/sqrt(r))")->capture_default_str();
    app.add_option("--generalist-target", c.generalist_target,
                   "the generalists' target share in the balancing loss (<0: 1/E; used where a layer has "
                   "both generalists and specialists)")
        ->capture_default_str();
    app.add_option("--rounds", c.rounds, "communication rounds")->capture_default_str();
    app.add_option("--local-steps", c.local_steps, "expert steps per user per round")->capture_default_str();
    app.add_option("--router-every", c.router_every, "expert steps between router phases")->capture_default_str();
    app.add_option("--router-iters", c.router_iters, "router steps per phase")->capture_default_str();
    app.add_option("--router-phase", c.router_phase,
                   "router phases 'after' the expert step that reaches a multiple of --router-every (the "
                   "reference), or 'before' the next one: with --router-every = --local-steps, at the start of "
                   "every round, on the generalist just downloaded")
        ->capture_default_str();
    app.add_option("--batch", c.batch, "sequences per batch")->capture_default_str();
    app.add_option("--seq-len", c.seq_len, "tokens per sequence (also the host context)")->capture_default_str();
    app.add_option("--lr", c.lr, "expert learning rate (cosine to --lr-min)")->capture_default_str();
    app.add_option("--lr-min", c.lr_min, "final expert learning rate")->capture_default_str();
    app.add_option("--router-lr", c.router_lr, "router learning rate (constant)")->capture_default_str();
    app.add_option("--lb-weight", c.lb_weight, "weight of the balancing loss (averaged over layers)")
        ->capture_default_str();
    app.add_option("--weight-decay", c.weight_decay, "AdamW weight decay of experts and routers")->capture_default_str();
    app.add_option("--router-init-std", c.router_init_std, "router weights start N(0, std^2); 0: all gates equal")
        ->capture_default_str();
    app.add_option("--specialist-lr-scale", c.specialist_lr_scale,
                   "specialists' learning rates times this, where a user has generalists and specialists")
        ->capture_default_str();
    app.add_flag("--keep-best", c.keep_best,
                 "every user keeps its model of the round with the best validation perplexity (early stopping), "
                 "if it beats the final download; with --stop-tokens, the best perplexity on its stop split");
    app.add_option("--recalibrate", c.recalibrate,
                   "router-only steps on validation data after the final download (CoMiGS methods)")
        ->capture_default_str();
    app.add_option("--attention-lora", c.attention_rank,
                   "rank of LoRA on attention c_attn/c_proj, shared like a generalist (0: none)")
        ->capture_default_str();
    app.add_option("--pcl-temperature", c.pcl_temperature, "PCL softmax temperature")->capture_default_str();
    app.add_option("--heterogeneity", c.heterogeneity, "h: share of personal text (embedded corpus)")
        ->capture_default_str();
    app.add_option("--train-tokens", train_tokens,
                   "training tokens per user: one value for everyone or a comma list (default 6000 each; real text: all)");
    app.add_option("--val-tokens", val_tokens,
                   "validation tokens per user: one value or a comma list (default 3000), or a share of each user's "
                   "training tokens, e.g. 50% (all of a real text: validation and training split what test and dev "
                   "leave 1:2)");
    app.add_option("--test-tokens", test_tokens, "test tokens per user: one value or a comma list (default 10000)");
    app.add_option("--stop-tokens", stop_tokens,
                   "early-stopping tokens per user: one value or a comma list (default 0): held out from training "
                   "and validation; --keep-best chooses every method's round on them (0: on validation, which "
                   "routers train on)");
    app.add_option("--dev-tokens", c.dev_tokens,
                   "tokens per user of a tuning split, held out like test and evaluated (dev_ppl): choose "
                   "settings on it, never on test")->capture_default_str();
    app.add_option("--base-tokens", c.base_tokens, "host pretraining text (embedded corpus)")->capture_default_str();
    app.add_option("--beta-personal", c.beta_personal, "tilt strength of the personal sources")->capture_default_str();
    app.add_option("--signature-boost", c.signature_boost, "log boost of signature letters")->capture_default_str();
    app.add_option("--d-model", c.d_model, "host width")->capture_default_str();
    app.add_option("--layers", c.n_layer, "host blocks")->capture_default_str();
    app.add_option("--heads", c.n_head, "host attention heads")->capture_default_str();
    app.add_option("--host-steps", c.host_steps, "host pretraining steps")->capture_default_str();
    app.add_option("--host-batch", c.host_batch, "host pretraining batch")->capture_default_str();
    app.add_option("--host-lr", c.host_lr, "host pretraining peak learning rate")->capture_default_str();
    app.add_option("--host-cache", c.host_cache, "pretrained host file (default <out>/host-<key>.safetensors)");
    app.add_option("--host-text", c.host_text, "text to pretrain the host on with --user-text (repeatable; "
                                               "default: the users' training text)");
    app.add_option("--seed", c.seed, "seed of the corpus, the host and the training")->capture_default_str();
    app.add_option("--threads", c.threads, "OpenMP threads")->capture_default_str();
    app.add_option("--methods", methods, "comma list (default: all that apply)");
    app.add_option("--out", c.out, "output folder")->capture_default_str();
    app.add_option("--user-text", c.user_text, "a file or folder of one user's text (repeat once per user); "
                                               "split deterministically into train/validation/test/dev chunks "
                                               "spread over the whole text");
    app.add_option("--setting", c.setting,
                   "real text from Debian packages (tools/install-deps.sh --real-text): multilingual (the Debian "
                   "handbook in de/fr/it/nl, host on en) or domains (handbook, man pages, GCIDE dictionary, glibc "
                   "headers; host on fortunes)");
    app.add_option("--text-root", c.text_root, "where --setting finds the installed packages")->capture_default_str();
    app.add_option("--text-cap", c.text_cap, "bytes of each --setting user's text kept, evenly spaced pieces (0: all)")
        ->capture_default_str();
    app.add_option("--model", c.model,
                   "a Hugging Face model folder (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM) as the host "
                   "instead of the tiny GPT; the users' text is cut with its tokenizer and the split sizes count its "
                   "tokens. Each user's adapters are saved to <out>/adapters/<method>/user-<u>.safetensors");
    app.add_flag("--model-fp32-compute", c.model_fp32_compute,
                 "with --model: fp32 products on its BF16 / Q8_0 / Q4_0 weights (exact values; default: bf16 "
                 "products, int8 activations for Q4_0 decode)");
    app.add_option("--checkpoint-dir", c.checkpoint_dir,
                   "checkpoint every method's rounds here (SIGINT/SIGTERM: stop at the round's end with a checkpoint)");
    app.add_option("--checkpoint-every", c.checkpoint_every, "rounds between checkpoints")->capture_default_str();
    app.add_flag("--resume", c.resume, "continue the run checkpointed in --checkpoint-dir (same settings)");
    app.add_flag("--quick", quick, "a seconds-long configuration (tests)");
    std::string schedule;
    app.add_option("--schedule", schedule,
                   "schedule preset, applied before the other flags (reference: the paper's router schedule as "
                   "the demo ran it before the router study, docs/real-text.md)");
    bool quiet = false;
    app.add_flag("--quiet", quiet, "no progress output");
    // --quick is a base configuration: applied first, so the flags given with it still count.
    for (int i = 1; i < argc; ++i)
        if (std::string_view(argv[i]) == "--quick") c.make_quick();
    // --schedule likewise: a preset the other flags change.
    for (int i = 1; i < argc; ++i) {
        const std::string_view a(argv[i]);
        try {
            if (a == "--schedule" && i + 1 < argc) c.apply_schedule(argv[i + 1]);
            else if (a.starts_with("--schedule=")) c.apply_schedule(std::string(a.substr(11)));
        } catch (const std::exception& e) {
            std::fprintf(stderr, "comigs-demo: %s\n", e.what());
            return 1;
        }
    }
    CLI11_PARSE(app, argc, argv);
    try {
        comigs::require(!c.resume || !c.checkpoint_dir.empty(), "--resume: needs --checkpoint-dir");
        if (!c.user_text.empty() && app.count("--users") == 0) c.users = int(c.user_text.size());
        if (!c.setting.empty() && app.count("--users") == 0) c.users = int(comigs::demo::text_setting(c.setting).users.size());
        if (!experts.empty()) c.experts = parse_list<comigs::Index>(experts, "--experts");
        if (!ranks.empty()) c.ranks = parse_list<comigs::Index>(ranks, "--ranks");
        if (!train_tokens.empty()) c.train_tokens = parse_list<comigs::Index>(train_tokens, "--train-tokens");
        if (!val_tokens.empty() && val_tokens.back() == '%') {
            std::istringstream is(val_tokens.substr(0, val_tokens.size() - 1));
            double percent = 0;
            is >> percent;
            comigs::require(!is.fail() && is.eof() && std::isfinite(percent) && percent > 0, "--val-tokens '",
                            val_tokens, "': a share must be one number > 0 followed by %");
            c.validation_share = percent / 100;
        } else if (!val_tokens.empty()) {
            c.validation_per_user = parse_list<comigs::Index>(val_tokens, "--val-tokens");
        }
        if (!test_tokens.empty()) c.test_per_user = parse_list<comigs::Index>(test_tokens, "--test-tokens");
        if (!stop_tokens.empty()) c.stop_per_user = parse_list<comigs::Index>(stop_tokens, "--stop-tokens");
        c.methods = split_names(methods);
        c.progress = !quiet && place.leader();
        const auto out = comigs::demo::run_demo(c, place);
        if (!place.leader()) return 0;
        std::printf("host mean test perplexity %.3f", out.host_mean_ppl);
        if (out.floor_mean_ppl) std::printf(", floor %.3f", *out.floor_mean_ppl);
        std::printf("\n");
        comigs::demo::print_table(stdout, out.methods);
        std::printf("wrote %s/results.json, curves.svg, routing.html (%.1f s)\n", c.out.c_str(), out.seconds);
    } catch (const comigs::Interrupted& e) {
        if (place.leader()) std::fprintf(stderr, "\ncomigs-demo: %s; continue with --resume\n", e.what());
        return 128 + e.signal();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "comigs-demo: %s\n", e.what());
        return 1;
    }
    return 0;
}
#endif  // COMIGS_DEMO_IMPLEMENTATION

}  // namespace comigs::demo
