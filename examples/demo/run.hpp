#pragma once
// comigs-demo as a library: the whole run (data, host pretraining or reuse, every method, evaluation,
// outputs) behind run_demo(DemoConfig), so that main.cpp is only the command line and the tests can
// run a tiny configuration in-process.
//
// Methods (same host, data, steps, batch and learning rates for all; see strategy.hpp's presets):
//   local        2 experts, mean routing (no router), nothing shared, trained on own training data
//   fedavg       2 experts, mean routing, everything averaged every round
//   comigs-2g    2 generalists (both averaged), top-k router kept local, trained on validation data
//   comigs-2s    2 specialists (nothing averaged), router on validation data
//   comigs-1g1s  expert 0 generalist (averaged), expert 1 specialist, router local on validation data
//   pfedmoe      1G1S with the router trained jointly with the experts on training data
//   pcl          whole adapter models averaged per user with weights softmax(-validation perplexity)
//   hetlora / flexlora (users with different ranks) one shared expert per user, heterogeneous ranks
// Protocols: deployed (after the final aggregation and download) and personalised (right after the
// user's own last local steps). OOD = the same number of test tokens drawn equally from every user.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <comigs/detail/xxhash64.hpp>
#include <comigs/io/safetensors.hpp>
#include <comigs/optim.hpp>
#include <comigs/distributed_runner.hpp>
#include <comigs/strategy.hpp>
#include <comigs/train.hpp>
#include <nlohmann/json.hpp>
#include <comigs/models.hpp>

#include "corpus.hpp"
#include "host.hpp"
#include "placement.hpp"
#include "real_model.hpp"
#include "report.hpp"
#include "resume.hpp"
#include "text_sources.hpp"
#include "text_split.hpp"

namespace comigs::demo {

namespace tg = comigs::models;
using Real = float;

/// Every knob of the demo. Defaults are the documented default run (under 5 minutes on 2 cores).
struct DemoConfig {
    // Users and their adapters.
    int users = 4;
    std::vector<Index> experts;  ///< per user (empty: 2 for everyone); 1 = a single generalist
    std::vector<Index> ranks;    ///< per user (empty: 8 for everyone)
    Index top_k = 2;
    double alpha = 16;
    double generalist_target = -1;  ///< expert0_importance of the balancing loss; < 0: 1/E
    // Collaboration schedule.
    Index rounds = 20;
    Index local_steps = 10;
    Index router_every = 30;
    Index router_iters = 10;
    std::string router_phase = "after";  ///< "after" the expert step (reference) or "before" it (at a round's start)
    Index batch = 16;
    Index seq_len = 64;
    double lr = 1e-2;
    double lr_min = 1e-3;
    double router_lr = 1e-2;
    double lb_weight = 0.01;          ///< weight of the layer-averaged balancing loss
    double weight_decay = 0.01;       ///< AdamW decoupled weight decay of the experts (and the router)
    double router_init_std = 0.02;    ///< router weight init N(0, std^2)
    double specialist_lr_scale = 1;   ///< specialists' rates times this, in methods that mix generalists and specialists
    bool keep_best = false;           ///< each user keeps its model of the round with the best validation perplexity
                                      ///< (with stop tokens: the best perplexity on its stop split)
    double pcl_temperature = 1.0;
    Index recalibrate = 0;  ///< router-only steps on validation data after the final download
    Index attention_rank = 0;  ///< > 0: shared LoRA of this rank on c_attn and c_proj (as the reference)
    // Embedded corpus.
    double heterogeneity = 0.9;
    /// Per user, or one value for everyone (empty: default_train_tokens each; with real text, all of it).
    std::vector<Index> train_tokens;
    Index default_train_tokens = 6000;
    bool quick = false;  ///< make_quick() was applied (text users then also train on default_train_tokens)
    Index validation_tokens = 3000;
    Index test_tokens = 10000;
    std::vector<Index> validation_per_user, test_per_user;  ///< per user or one value (empty: the above)
    /// > 0: every user's validation tokens are this share of its training tokens (--val-tokens P%;
    /// text_split.hpp's validation_for_share), instead of validation_tokens / validation_per_user.
    double validation_share = -1;
    Index dev_tokens = 0;  ///< per user: a tuning split, evaluated but never trained on (0: none)
    /// Per user or one value (empty: 0): an early-stopping split --keep-best chooses rounds on instead of
    /// validation, which a router trains on; held out from every method's training (--stop-tokens).
    std::vector<Index> stop_per_user;
    Index base_tokens = 300000;
    double beta_personal = 3.0;
    double signature_boost = 4.0;
    // Host.
    Index d_model = 64;
    Index n_layer = 2;
    Index n_head = 4;
    Index host_steps = 800;
    Index host_batch = 32;
    double host_lr = 3e-3;
    std::string host_cache;  ///< file of the pretrained host; empty: <out>/host-<key>.safetensors
    std::vector<std::string> host_text;  ///< real text to pretrain the host on (with --user-text)
    // Run.
    std::uint64_t seed = 0;
    int threads = 1;  // at d = 64 kernel threads cost more than they give (and on a busy machine far more)
    std::vector<std::string> methods;  ///< empty: all that apply
    std::string out = "comigs-demo-out";
    std::vector<std::string> user_text;  ///< one file or folder per user: real text instead of the corpus
    std::string setting;                 ///< a real-text setting of text_sources.hpp (multilingual, domains)
    std::string text_root = "/";         ///< where the setting's Debian packages are installed
    Index text_cap = 1200000;            ///< bytes of a setting user's text kept (evenly spaced pieces); <= 0: all
    std::string model;  ///< a Hugging Face model folder (real_model.hpp) as the host instead of the tiny GPT
    bool model_fp32_compute = false;  ///< with --model: fp32 products on BF16/Q8_0/Q4_0 weights (default: rounded)
    Index curve_tokens = 2048;           ///< test tokens per user for the curve points
    Index sample_tokens = 256;           ///< test tokens per user shown in routing.html
    bool progress = true;
    // Checkpoints (resume.hpp).
    std::string checkpoint_dir;  ///< empty: none
    Index checkpoint_every = 1;  ///< rounds between checkpoints
    bool resume = false;         ///< continue the run checkpointed in checkpoint_dir

    /// Schedule presets (--schedule NAME), applied before the other flags so that those still change them:
    ///   reference  the demo's schedule before the router study of docs/real-text.md: the paper's router
    ///              schedule (10 router steps every 30 expert steps), rates scaled to the tiny host
    ///              (expert 1e-2 cosine to 1e-3, router 1e-2, data.md), balancing target 1/E.
    std::string schedule = "reference";
    void apply_schedule(const std::string& name) {
        require(name == "reference", "--schedule '", name, "': unknown (known: reference)");
        schedule = name;
        router_every = 30;
        router_iters = 10;
        router_phase = "after";
        lr = 1e-2;
        lr_min = 1e-3;
        router_lr = 1e-2;
        generalist_target = -1;
        top_k = 2;
        recalibrate = 0;
    }

    /// The seconds-long configuration the tests use. comigs-demo applies it before reading the other
    /// flags, so `--quick --users 5 --top-k 1` changes just those.
    void make_quick() {
        users = std::min(users, 3);
        rounds = 3;
        local_steps = 4;
        router_every = 4;
        router_iters = 2;
        batch = 4;
        seq_len = 32;
        validation_tokens = 600;
        test_tokens = 1000;
        default_train_tokens = 1500;
        quick = true;
        base_tokens = 20000;
        d_model = 32;
        n_layer = 2;
        n_head = 2;
        host_steps = 60;
        host_batch = 8;
        curve_tokens = 256;
        sample_tokens = 64;
    }

    bool real_text() const { return !user_text.empty() || !setting.empty(); }
    /// Entry u of a per-user list that may also be a single value for everyone.
    static Index per_user(const std::vector<Index>& v, int u, Index fallback) {
        if (v.empty()) return fallback;
        return v.size() == 1 ? v[0] : v[static_cast<std::size_t>(u)];
    }
    /// Validation tokens of user u; with validation_share, -1 where the training text is all of a real text
    /// (the split resolves it from the text's size: validation_for_share).
    Index validation_of(int u) const {
        if (validation_share > 0) {
            const Index t = train_of(u);
            return t < 0 ? Index{-1} : validation_for_share(validation_share, t, 0, 0, 0);
        }
        return per_user(validation_per_user, u, validation_tokens);
    }
    Index test_of(int u) const { return per_user(test_per_user, u, test_tokens); }
    Index stop_of(int u) const { return per_user(stop_per_user, u, 0); }
    /// Training tokens of user u; < 0: all of a real text.
    Index train_of(int u) const {
        return per_user(train_tokens, u, real_text() && !quick ? Index{-1} : default_train_tokens);
    }
    Index experts_of(int u) const { return experts.empty() ? 2 : experts[static_cast<std::size_t>(u)]; }
    Index rank_of(int u) const { return ranks.empty() ? 8 : ranks[static_cast<std::size_t>(u)]; }
    bool ranks_differ() const {
        for (int u = 1; u < users; ++u)
            if (rank_of(u) != rank_of(0)) return true;
        return false;
    }
    bool experts_differ() const {
        for (int u = 1; u < users; ++u)
            if (experts_of(u) != experts_of(0)) return true;
        return false;
    }

    void validate() const {
        require(users >= 1, "--users ", users, ": must be >= 1");
        require(experts.empty() || experts.size() == std::size_t(users), "--experts has ", experts.size(),
                " entries, expected one per user (", users, ")");
        require(ranks.empty() || ranks.size() == std::size_t(users), "--ranks has ", ranks.size(),
                " entries, expected one per user (", users, ")");
        for (const auto& [list, flag] : {std::pair{&train_tokens, "--train-tokens"}, {&validation_per_user, "--val-tokens"},
                                         {&test_per_user, "--test-tokens"}, {&stop_per_user, "--stop-tokens"}}) {
            require(list->size() <= 1 || list->size() == std::size_t(users), flag, " has ", list->size(),
                    " entries, expected one, or one per user (", users, ")");
            for (Index v : *list) require(v >= 0, flag, " entry ", v, ": must be >= 0");
        }
        require(dev_tokens >= 0, "--dev-tokens ", dev_tokens, ": must be >= 0");
        require(validation_share < 0 || (std::isfinite(validation_share) && validation_share > 0),
                "--val-tokens share ", validation_share * 100, "%: must be finite and > 0");
        require(user_text.empty() || setting.empty(), "--user-text and --setting: give one or the other");
        for (Index e : experts) require(e >= 1, "--experts entry ", e, ": must be >= 1");
        for (Index r : ranks) require(r >= 1, "--ranks entry ", r, ": must be >= 1");
        require(top_k >= 1, "--top-k ", top_k, ": must be >= 1");
        require(rounds >= 1 && local_steps >= 1, "--rounds ", rounds, " --local-steps ", local_steps, ": must be >= 1");
        require(batch >= 1 && seq_len >= 2, "--batch ", batch, " --seq-len ", seq_len, ": must be >= 1 and >= 2");
        require(d_model % n_head == 0, "--d-model ", d_model, ": must be divisible by --heads ", n_head);
        require(threads >= 1, "--threads ", threads, ": must be >= 1");
        require(router_phase == "after" || router_phase == "before", "--router-phase '", router_phase,
                "': must be 'after' or 'before'");
        require(user_text.empty() || user_text.size() == std::size_t(users), "--user-text given ", user_text.size(),
                " times, expected once per user (", users, ")");
        if (!setting.empty())
            require(text_setting(setting).users.size() == std::size_t(users), "--setting ", setting, " has ",
                    text_setting(setting).users.size(), " users, --users asks for ", users);
    }
};

/// One user's data: four token streams (labels only for the embedded corpus) and the floor.
struct UserData {
    std::string name;
    Stream train, validation, test;
    Stream dev;  ///< tuning split (--dev-tokens): evaluated, never trained on
    Stream stop;  ///< early-stopping split (--stop-tokens): --keep-best's rounds are chosen on it
    std::optional<double> floor_ppl;
    bool labelled = false;
};

// ------------------------------------------------------------------------------------------------
// Real text

/// Bytes of a file, or of every regular file under a folder (sorted paths, so the order is fixed).
inline std::string read_text(const std::filesystem::path& p) {
    namespace fs = std::filesystem;
    require<IoError>(fs::exists(p), "--user-text '", p.string(), "': no such file or folder");
    std::vector<fs::path> files;
    if (fs::is_directory(p)) {
        for (const auto& e : fs::recursive_directory_iterator(p))
            if (e.is_regular_file()) files.push_back(e.path());
        std::sort(files.begin(), files.end());
    } else {
        files.push_back(p);
    }
    std::string all;
    for (const auto& f : files) {
        std::ifstream in(f, std::ios::binary);
        std::ostringstream s;
        s << in.rdbuf();
        all += s.str();
        all += '\n';
    }
    return all;
}

/// One real-text user: its text split into the four streams (text_split.hpp).
inline UserData text_user(const std::string& name, std::string_view text, const SplitSizes& sizes) {
    TextSplit sp = split_text(name, text, sizes);
    UserData u;
    u.name = name;
    u.train = std::move(sp.train);
    u.validation = std::move(sp.validation);
    u.test = std::move(sp.test);
    u.dev = std::move(sp.dev);
    u.stop = std::move(sp.stop);
    return u;
}

// ------------------------------------------------------------------------------------------------
// Batches and evaluation

inline TokenBatch to_batch(const Windows& w) {
    TokenBatch b;
    b.B = w.batch;
    b.T = w.width - 1;
    b.inputs.resize(std::size_t(b.B * b.T));
    b.targets.resize(b.inputs.size());
    for (Index i = 0; i < b.B; ++i)
        for (Index t = 0; t < b.T; ++t) {
            b.inputs[std::size_t(i * b.T + t)] = w.tokens[std::size_t(i * w.width + t)];
            b.targets[std::size_t(i * b.T + t)] = w.tokens[std::size_t(i * w.width + t + 1)];
        }
    return b;
}

/// Evaluation windows of a stream, at most `max_tokens` targets (0: all).
inline Windows eval_windows(const Stream& s, Index seq_len, Index max_tokens = 0) {
    Windows w = evaluation_windows(s, seq_len);
    if (max_tokens > 0 && w.batch * seq_len > max_tokens) {
        const Index keep = std::max<Index>(1, max_tokens / seq_len);
        w.batch = keep;
        w.tokens.resize(std::size_t(keep * w.width));
        w.personal.resize(std::size_t(keep * w.width));
        w.starts.resize(std::size_t(keep));
    }
    return w;
}

/// Concatenation of windows (same width).
inline Windows concat(const std::vector<Windows>& parts) {
    Windows w;
    for (const auto& p : parts) {
        if (p.batch == 0) continue;
        w.width = p.width;
        w.batch += p.batch;
        w.tokens.insert(w.tokens.end(), p.tokens.begin(), p.tokens.end());
        w.personal.insert(w.personal.end(), p.personal.begin(), p.personal.end());
        w.starts.insert(w.starts.end(), p.starts.begin(), p.starts.end());
    }
    return w;
}

/// Rows [first, first + n) of windows as a batch.
inline TokenBatch slice_batch(const Windows& w, Index first, Index n) {
    Windows s;
    s.batch = n;
    s.width = w.width;
    s.tokens.assign(w.tokens.begin() + std::ptrdiff_t(first * w.width),
                    w.tokens.begin() + std::ptrdiff_t((first + n) * w.width));
    return to_batch(s);
}

/// Routing tallies over evaluated tokens (all mixture layers).
struct RoutingTally {
    double gen_weight = 0, tokens = 0;             // gate mass on generalists
    double shared_tok = 0, shared_to_gen = 0;      // top-1 expert of shared-source tokens
    double personal_tok = 0, personal_to_spec = 0; // top-1 expert of personal tokens
};

struct EvalResult {
    double ppl = 0;
    RoutingTally routing;                ///< all mixture layers
    std::vector<RoutingTally> by_layer;  ///< per mixture layer
};

/// exp(mean cross-entropy) of a model over windows, 32 windows per forward; with `tally`, the routing
/// of every evaluated (input) token is counted per layer.
template <class Model>
EvalResult evaluate_windows(Model& m, const Windows& w, bool tally, const std::vector<Role>* roles = nullptr) {
    EvalResult r;
    double nll = 0, n = 0;
    const Index chunk = 32, T = w.width - 1;
    for (Index first = 0; first < w.batch; first += chunk) {
        const Index b = std::min(chunk, w.batch - first);
        const TokenBatch batch = slice_batch(w, first, b);
        const LossParts lp = m.evaluate(batch);
        nll += lp.task * lp.tokens;
        n += lp.tokens;
        if (!tally || roles == nullptr) continue;
        r.by_layer.resize(std::size_t(m.layers()));
        for (Index l = 0; l < m.layers(); ++l) {
            RoutingTally& layer = r.by_layer[std::size_t(l)];
            const auto& rt = m.mixture(l).routing();
            const Index N = b * T;
            const Index slots = Index(rt.expert.size()) / N;
            for (Index t = 0; t < N; ++t) {
                const Index row = first + t / T, col = t % T;
                const bool personal = w.personal.empty() ? false : w.personal[std::size_t(row * w.width + col)] != 0;
                double g = 0;
                for (Index s = 0; s < slots; ++s) {
                    const auto e = rt.expert[std::size_t(t * slots + s)];
                    if ((*roles)[std::size_t(e)] == Role::generalist) g += double(rt.gate[std::size_t(t * slots + s)]);
                }
                const bool top_gen = (*roles)[std::size_t(rt.expert[std::size_t(t * slots)])] == Role::generalist;
                for (RoutingTally* tl : {&r.routing, &layer}) {
                    tl->gen_weight += g;
                    tl->tokens += 1;
                    if (personal) {
                        tl->personal_tok += 1;
                        tl->personal_to_spec += top_gen ? 0 : 1;
                    } else {
                        tl->shared_tok += 1;
                        tl->shared_to_gen += top_gen ? 1 : 0;
                    }
                }
            }
        }
    }
    r.ppl = n > 0 ? std::exp(nll / n) : std::nan("");
    return r;
}

/// Perplexity of the bare host (dense MLPs) over windows.
inline double host_perplexity(models::CausalLm<Real>& host, const Windows& w) {
    double nll = 0, n = 0;
    const Index chunk = 32;
    for (Index first = 0; first < w.batch; first += chunk) {
        const Index b = std::min(chunk, w.batch - first);
        const TokenBatch batch = slice_batch(w, first, b);
        nll += double(host.forward(batch.inputs, batch.targets, batch.B, batch.T, false)) * double(b * batch.T);
        n += double(b * batch.T);
    }
    return std::exp(nll / n);
}

// ------------------------------------------------------------------------------------------------
// Progress

class Progress {
public:
    explicit Progress(bool on) : on_(on) {}
    void update(const std::string& what, double frac, double loss, double tok_s) {
        if (!on_) return;
        const int width = 24, fill = int(std::lround(frac * width));
        std::fprintf(stderr, "\r%-14s [%s%s] %3.0f%%  loss %6.3f  %7.0f tok/s   ", what.c_str(),
                     std::string(std::size_t(fill), '#').c_str(), std::string(std::size_t(width - fill), ' ').c_str(),
                     100 * frac, loss, tok_s);
        std::fflush(stderr);
    }
    void done() {
        if (on_) std::fprintf(stderr, "\n");
    }
    void note(const std::string& s) {
        if (on_) std::fprintf(stderr, "%s\n", s.c_str());
    }

private:
    bool on_;
};

// ------------------------------------------------------------------------------------------------
// Host pretraining

/// Pretrains (full-parameter) on `stream`, or loads the cached host when `cache` exists.
inline tg::Gpt2<Real> pretrained_host(const DemoConfig& c, const Stream& stream, const std::filesystem::path& cache,
                                         Progress& progress, bool& loaded) {
    loaded = false;
    if (std::filesystem::exists(cache)) {
        loaded = true;
        return tg::load_hf_gpt2<Real>(cache);
    }
    tg::Gpt2Config hc;
    hc.d_model = c.d_model;
    hc.n_layer = c.n_layer;
    hc.n_head = c.n_head;
    hc.n_ctx = c.seq_len;
    tg::Gpt2<Real> host(hc);
    Rng init(c.seed, 101);
    host.init_weights(init);
    const Index warmup = std::max<Index>(1, c.host_steps / 20);
    AdamW<Real> opt({AdamWGroup<Real>{"host", {bind(std::string(), host.params(), host.grads())},
                                      LrSchedule::cosine(c.host_lr, c.host_lr / 10, c.host_steps, warmup),
                                      AdamWOptions{0.9, 0.95, 1e-8, 0.0}}});
    Rng rng(c.seed, 102);
    const auto t0 = std::chrono::steady_clock::now();
    double ema = 0;
    for (Index s = 0; s < c.host_steps; ++s) {
        const TokenBatch b = to_batch(sample_windows(stream, c.host_batch, c.seq_len, rng));
        host.zero_grad();
        const double loss = double(host.forward(b.inputs, b.targets, b.B, b.T, true));
        host.backward();
        opt.clip_grad_norm(1.0);
        opt.step(loss);
        ema = s == 0 ? loss : 0.95 * ema + 0.05 * loss;
        if (s % 10 == 9 || s + 1 == c.host_steps) {
            const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            progress.update("pretrain host", double(s + 1) / double(c.host_steps), ema,
                            double((s + 1) * b.B * b.T) / std::max(sec, 1e-9));
        }
    }
    progress.done();
    std::filesystem::create_directories(cache.parent_path().empty() ? "." : cache.parent_path());
    tg::save_hf_gpt2(host, cache);
    return host;
}

// ------------------------------------------------------------------------------------------------
// Methods

inline std::vector<std::string> all_method_names() {
    return {"local", "fedavg", "comigs-2g", "comigs-2s", "comigs-1g1s", "pfedmoe", "pcl", "hetlora", "flexlora"};
}

/// The strategy of a method name (strategy.hpp presets). Attention LoRA is not used by the demo, so
/// share_adapters is irrelevant.
inline Strategy strategy_of(const std::string& name, const DemoConfig& c) {
    Strategy s;
    if (name == "local") s = strategies::local();
    else if (name == "fedavg") s = strategies::fedavg();
    else if (name == "comigs-2g") s = strategies::comigs_2g();
    else if (name == "comigs-2s") s = strategies::comigs_2s();
    else if (name == "comigs-1g1s") s = strategies::comigs_1g1s();
    else if (name == "pfedmoe") s = strategies::pfedmoe();
    else if (name == "pcl") s = strategies::pcl(c.pcl_temperature);
    else if (name == "hetlora") s = strategies::hetlora();
    else if (name == "flexlora") s = strategies::flexlora();
    else comigs::detail::raise<InvalidArgument>("--methods: unknown method '", name, "' (known: local, fedavg, comigs-2g, ",
                                        "comigs-2s, comigs-1g1s, pfedmoe, pcl, hetlora, flexlora)");
    s.top_k = c.top_k;
    // Users of different ranks: averaging factors needs equal ranks, so FedAvg-style rules zero-pad
    // to the largest rank (HetLoRA's padding with FedAvg's uniform weights).
    if (const auto* a = s.aggregation(); a && a->rule == AggregationRule::fedavg && c.ranks_differ())
        s.collaboration = AggregationConfig::hetlora(a->weighting);
    require(!(s.personalised() && c.ranks_differ()), "--methods pcl: PCL averages whole models and needs equal ranks");
    return s;
}

/// Everything shared by the methods of one run.
struct RunContext {
    const DemoConfig* cfg = nullptr;
    models::CausalLm<Real>* host = nullptr;  ///< the pretrained tiny GPT, or --model
    const TextCodec* codec = nullptr;         ///< --model: how token ids read as text (routing.html)
    std::vector<std::shared_ptr<const FrozenMlp<Real>>> bases;
    std::vector<UserData> users;
    std::vector<Windows> test, validation, dev, curve, sample;
    std::vector<Windows> stop;  ///< --keep-best's choice data per user: the stop split, or validation without one
    Windows ood;
    std::vector<double> host_ppl;
    Placement place;  ///< which users this process trains (all, or those of its MPI rank)
    const DemoCheckpoint* checkpoint = nullptr;  ///< --checkpoint-dir
};

/// Roles of user u's experts under a strategy: the strategy's roles cut (or extended with
/// specialists) to the user's expert count; a single expert is the generalist when the strategy
/// shares generalists, else a specialist.
inline std::vector<Role> user_roles(const Strategy& s, Index experts) {
    if (s.roles.size() == 1) return s.roles;  // single-expert methods (HetLoRA, FlexLoRA)
    std::vector<Role> r(std::size_t(experts), Role::specialist);
    for (std::size_t e = 0; e < r.size(); ++e) r[e] = e < s.roles.size() ? s.roles[e] : Role::specialist;
    return r;
}

inline MethodResult run_method(const std::string& name, RunContext& ctx, Progress& progress,
                               std::vector<RoutingSample>& samples) {
    const DemoConfig& c = *ctx.cfg;
    const Strategy strategy = strategy_of(name, c);
    auto t_start = std::chrono::steady_clock::now();  // moved back by the seconds of a resumed run
    const int U = c.users;
    MethodResult result;
    result.name = name;

    std::vector<std::unique_ptr<MixtureHost<Real>>> models;
    std::vector<std::unique_ptr<Trainer<MixtureHost<Real>, TokenBatch>>> trainers;
    std::vector<std::vector<Role>> roles;
    std::vector<SimulatedUser<MixtureHost<Real>, TokenBatch>> sim;
    for (int u = 0; u < U; ++u) {
        MixtureConfig mc;
        mc.form = ctx.host->mlp_form();
        mc.d_model = ctx.host->d_model();
        mc.d_hidden = ctx.host->mlp_hidden();
        mc.rank = c.rank_of(u);
        mc.alpha = c.alpha;
        mc.scaling = LoraScaling::sqrt;
        mc.expert0_importance = c.generalist_target;
        mc.router_init_std = c.router_init_std;
        mc = strategy.mixture_config(mc);
        roles.push_back(user_roles(strategy, strategy.roles.size() == 1 ? 1 : c.experts_of(u)));
        mc.n_experts = Index(roles.back().size());
        mc.roles = roles.back();
        mc.top_k = std::min(c.top_k, mc.n_experts);
        result.routed = result.routed || mc.router().has_weight();
        // The generalists' target share applies where a router weighs generalists against specialists.
        const auto gens = std::count(mc.roles.begin(), mc.roles.end(), Role::generalist);
        if (mc.expert0_importance >= 0 && (!mc.router().has_weight() || gens == 0 || gens == mc.n_experts))
            mc.expert0_importance = -1;
        if (!ctx.place.holds(u)) {  // trained by another rank
            models.push_back(nullptr);
            trainers.push_back(nullptr);
            continue;
        }
        // Same initialisation stream per user for every method: differences come from the method.
        Rng init(c.seed, 1000 + std::uint64_t(u));
        models.push_back(
            std::make_unique<MixtureHost<Real>>(*ctx.host, ctx.bases, mc, init, c.attention_rank, c.alpha, c.lb_weight));
        TrainerConfig tc;
        tc.router_every = c.router_every;
        tc.router_phase = c.router_phase == "before" ? RouterPhase::before : RouterPhase::after;
        tc.router_iters = c.router_iters;
        tc.expert_lr = c.lr;
        tc.expert_lr_min = c.lr_min;
        tc.router_lr = c.router_lr;
        tc.total_expert_steps = c.rounds * c.local_steps;
        tc.lb_weight = c.lb_weight;
        tc.expert_adamw.weight_decay = c.weight_decay;
        tc.router_adamw.weight_decay = c.weight_decay;
        // The specialists' scale is relative to generalists: it applies where a user has both.
        const auto& ur = roles.back();
        if (std::count(ur.begin(), ur.end(), Role::generalist) > 0 && std::count(ur.begin(), ur.end(), Role::specialist) > 0)
            tc.specialist_lr_scale = c.specialist_lr_scale;
        tc = strategy.trainer_config(tc);
        const Stream* tr = &ctx.users[std::size_t(u)].train;
        const Stream* va = &ctx.users[std::size_t(u)].validation;
        const Index B = c.batch, T = c.seq_len;
        auto train_src = [tr, B, T](Rng& r) { return to_batch(sample_windows(*tr, B, T, r)); };
        auto val_src = [va, B, T](Rng& r) { return to_batch(sample_windows(*va, B, T, r)); };
        trainers.push_back(std::make_unique<Trainer<MixtureHost<Real>, TokenBatch>>(
            *models.back(), tc, train_src, val_src, c.seed * 7919 + std::uint64_t(u)));
        SimulatedUser<MixtureHost<Real>, TokenBatch> su;
        su.id = UserId(u);
        su.trainer = trainers.back().get();
        MixtureHost<Real>* m = models.back().get();
        const Windows* vw = &ctx.validation[std::size_t(u)];
        su.validation_perplexity = [m, vw]() { return evaluate_windows(*m, *vw, false).ppl; };
        su.roles = roles.back();  // per-user expert counts (--experts)
        sim.push_back(std::move(su));
    }

    RunnerConfig rc;
    rc.rounds = c.rounds;
    rc.local_steps = c.local_steps;

    // Hooks find a user's model by its id (= u): with users on several ranks, the runner's index is
    // the position among this rank's users.
    result.users.resize(std::size_t(U));
    RunnerHooks<Real> hooks;
    // --keep-best: every user snapshots its adapters whenever its perplexity on ctx.stop (the stop split,
    // or validation without one) right after its local steps is its best so far, and deploys that snapshot
    // if it beats the final download.
    std::vector<double> best_val(std::size_t(U), std::numeric_limits<double>::infinity());
    std::vector<Index> best_round(std::size_t(U), -1);
    std::vector<std::vector<NamedTensor<Real>>> best_params(static_cast<std::size_t>(U));
    hooks.after_local = [&](Index round, UserId user, std::size_t) {
        const std::size_t i = std::size_t(user);
        if (c.keep_best) {
            const double v = evaluate_windows(*models[i], ctx.stop[i], false).ppl;
            if (v < best_val[i]) {
                best_val[i] = v;
                best_round[i] = round;
                best_params[i] = adapter_parameters(models[i]->adapters());
            }
        }
        if (round + 1 != c.rounds) return;
        result.users[i].test_ppl_personalised = evaluate_windows(*models[i], ctx.test[i], false).ppl;
    };
    double loss_sum = 0, tok_sum = 0, sec_sum = 0;
    hooks.after_round = [&](const RoundReport& rep) {
        tok_sum += rep.tokens();
        sec_sum += rep.seconds;
        loss_sum = rep.mean_loss();
        std::vector<std::pair<int, double>> mine;
        for (int u = 0; u < U; ++u)
            if (ctx.place.holds(u))
                mine.emplace_back(u, evaluate_windows(*models[std::size_t(u)], ctx.curve[std::size_t(u)], false).ppl);
        double mean = 0;
        const std::vector<double> user_ppl = ctx.place.by_user(mine, U);
        for (double p : user_ppl) mean += p;  // in user order, wherever they ran
        result.curve.push_back({long((rep.round + 1) * c.local_steps), mean / U, user_ppl});
        progress.update(name, double(rep.round + 1) / double(c.rounds), loss_sum, tok_sum / std::max(sec_sum, 1e-9));
    };
    hooks.deployed = [&](UserId user, std::size_t) {
        const std::size_t i = std::size_t(user);
        // Router recalibration: the downloaded generalist is new to the router, which may take a few
        // steps on validation data before the model is deployed (routers trained alternately only).
        if (trainers[i]->router_optimizer() != nullptr)
            for (Index k = 0; k < c.recalibrate; ++k) trainers[i]->router_step();
        UserResult& ur = result.users[i];
        if (c.keep_best) {
            ur.kept_round = c.rounds;  // the final download
            if (best_val[i] < evaluate_windows(*models[i], ctx.stop[i], false).ppl) {
                load_adapter_parameters(models[i]->adapters(), std::span<const NamedTensor<Real>>(best_params[i]));
                ur.kept_round = best_round[i];
            }
        }
        ur.user = int(i);
        const EvalResult ev = evaluate_windows(*models[i], ctx.test[i], true, &roles[i]);
        ur.test_ppl = ev.ppl;
        ur.ood_ppl = evaluate_windows(*models[i], ctx.ood, false).ppl;
        ur.host_ppl = ctx.host_ppl[i];
        ur.floor_ppl = ctx.users[i].floor_ppl;
        if (ur.floor_ppl && std::log(ur.host_ppl) > std::log(*ur.floor_ppl))
            ur.gap_closed = (std::log(ur.host_ppl) - std::log(ur.test_ppl)) /
                            (std::log(ur.host_ppl) - std::log(*ur.floor_ppl));
        if (ctx.dev[i].batch > 0) ur.dev_ppl = evaluate_windows(*models[i], ctx.dev[i], false).ppl;
        auto shares = [&](const RoutingTally& rt) {
            LayerRouting lr;
            lr.generalist_share = rt.tokens > 0 ? rt.gen_weight / rt.tokens : 0;
            if (ctx.users[i].labelled) {
                if (rt.shared_tok > 0) lr.shared_to_generalist = rt.shared_to_gen / rt.shared_tok;
                if (rt.personal_tok > 0) lr.personal_to_specialist = rt.personal_to_spec / rt.personal_tok;
            }
            return lr;
        };
        const LayerRouting all = shares(ev.routing);
        ur.generalist_share = all.generalist_share;
        ur.shared_to_generalist = all.shared_to_generalist;
        ur.personal_to_specialist = all.personal_to_specialist;
        for (const auto& rt : ev.by_layer) ur.by_layer.push_back(shares(rt));
        // routing.html sample: top-1 expert of every input token, per layer.
        RoutingSample s;
        s.user = int(i);
        const Windows& w = ctx.sample[i];
        const Index T = w.width - 1;
        for (Index b = 0; b < w.batch; ++b)
            for (Index t = 0; t < T; ++t) {
                const std::int32_t token = w.tokens[std::size_t(b * w.width + t)];
                s.text.push_back(static_cast<unsigned char>(token));
                if (ctx.codec && !ctx.codec->byte_level()) s.token_text.push_back(ctx.codec->token_text(token));
                if (ctx.users[i].labelled) s.personal.push_back(w.personal[std::size_t(b * w.width + t)]);
            }
        const TokenBatch batch = slice_batch(w, 0, w.batch);
        models[i]->evaluate(batch);
        for (Index l = 0; l < models[i]->layers(); ++l) {
            const auto& rt2 = models[i]->mixture(l).routing();
            const Index N = batch.B * batch.T, slots = Index(rt2.expert.size()) / N;
            std::vector<int> top(static_cast<std::size_t>(N));
            for (Index t = 0; t < N; ++t) top[std::size_t(t)] = rt2.expert[std::size_t(t * slots)];
            s.expert.push_back(std::move(top));
        }
        for (Role r : roles[i]) s.expert_is_generalist.push_back(r == Role::generalist);
        samples.push_back(std::move(s));
        // The user's adapters as deployed, PEFT-style keys: comigs-eval / comigs-generate --adapter.
        const std::filesystem::path dir = std::filesystem::path(c.out) / "adapters" / name;
        std::filesystem::create_directories(dir);
        models[i]->save_adapters(dir / ("user-" + std::to_string(i) + ".safetensors"),
                                 {{"comigs.method", name}, {"comigs.user", std::to_string(i)}});
    };
    std::vector<std::pair<int, double>> uploads;  // per user: values uploaded per round
    auto drive = [&](auto& runner) {
        if (ctx.checkpoint)
            io::run_checkpointed(runner, ctx.checkpoint->options(name, result, U, t_start), hooks);
        else
            runner.run(hooks);
        for (std::size_t k = 0; k < runner.users().size(); ++k)
            uploads.emplace_back(int(runner.users()[k].id), double(runner.upload_floats(k)));
    };
    if (ctx.place.distributed()) {
        DistributedRoundRunner<MixtureHost<Real>, TokenBatch> runner(*ctx.place.comm, strategy, rc, std::move(sim));
        drive(runner);
    } else {
        RoundRunner<MixtureHost<Real>, TokenBatch> runner(strategy, rc, std::move(sim));
        drive(runner);
    }
    progress.done();
    ctx.place.gather(result, samples, U);
    long up = 0;
    for (double v : ctx.place.by_user(uploads, U)) up += long(v);
    result.upload_floats_per_round = up / U;
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    return result;
}

// ------------------------------------------------------------------------------------------------
// The run

struct DemoOutput {
    std::vector<MethodResult> methods;
    double host_mean_ppl = 0;
    std::optional<double> floor_mean_ppl;
    nlohmann::json results;
    double seconds = 0;
};

inline std::string hex64(std::uint64_t v) {
    char b[17];
    std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
    return b;
}

/// The whole run. With `place` over MPI ranks (comigs-demo-mpi), every rank calls it: rank 0 pretrains
/// the host (the others load it from the cache file), each rank trains its users, and rank 0 writes
/// the outputs; every rank returns the same numbers.
DemoOutput run_demo(DemoConfig c, Placement place = {});

#ifdef COMIGS_DEMO_IMPLEMENTATION
// Compiled once, in demo.cpp (the comigs_demo library): the run instantiates most of the library
// and took a minute and a half to compile in each of comigs-demo, comigs-demo-mpi and the tests.
DemoOutput run_demo(DemoConfig c, Placement place) {
    c.validate();
    const auto t0 = std::chrono::steady_clock::now();
    omp_set_num_threads(c.threads);
    Progress progress(c.progress);
    namespace fs = std::filesystem;
    fs::create_directories(c.out);

    RunContext ctx;
    ctx.cfg = &c;
    ctx.place = place;
    Stream host_stream;
    std::string host_key = "d" + std::to_string(c.d_model) + "l" + std::to_string(c.n_layer) + "h" +
                           std::to_string(c.n_head) + "t" + std::to_string(c.seq_len) + "s" +
                           std::to_string(c.host_steps) + "b" + std::to_string(c.host_batch) + "lr" +
                           std::to_string(c.host_lr) + "seed" + std::to_string(c.seed);
    Floor base_fl{};
    bool embedded = !c.real_text();
    std::optional<DemoModel<Real>> real;  // --model: the host and its tokenizer
    if (!c.model.empty()) {
        real.emplace(load_demo_model<Real>(c.model, c.model_fp32_compute));
        require(!embedded || real->codec.byte_level(), "--model '", c.model, "': its tokenizer needs real text: give ",
                "--user-text (the embedded corpus is for byte-level hosts)");
        require(c.seq_len <= real->model().max_positions(), "--seq-len ", c.seq_len, ": more than --model's context of ",
                real->model().max_positions());
        ctx.codec = &real->codec;
    }
    std::optional<Corpus> corpus;
    if (embedded) {
        CorpusConfig cc;
        cc.seed = c.seed;
        cc.heterogeneity = c.heterogeneity;
        cc.num_users = c.users;
        cc.train_chars = c.default_train_tokens;
        for (int u = 0; u < c.users; ++u) {
            cc.train_chars_per_user.push_back(c.train_of(u));
            cc.validation_chars_per_user.push_back(c.validation_of(u));
            cc.test_chars_per_user.push_back(c.test_of(u));
        }
        cc.dev_chars = c.dev_tokens;
        for (int u = 0; u < c.users; ++u) cc.stop_chars_per_user.push_back(c.stop_of(u));
        cc.base_chars = c.base_tokens;
        cc.beta_personal = c.beta_personal;
        cc.signature_log_boost = c.signature_boost;
        corpus = make_corpus(cc);
        for (int u = 0; u < c.users; ++u) {
            UserData d;
            const auto& uc = corpus->users[std::size_t(u)];
            d.name = "user " + std::to_string(u);
            d.train = uc.train;
            d.validation = uc.validation;
            d.test = uc.test;
            d.dev = uc.dev;
            d.stop = uc.stop;
            d.labelled = true;
            ctx.users.push_back(std::move(d));
        }
        host_stream = corpus->base_train;
        base_fl = base_floor(*corpus);
        host_key += "base" + std::to_string(c.base_tokens);
    } else {
        // Real text: --user-text files, or a setting's Debian-package sources (text_sources.hpp).
        std::vector<std::pair<std::string, std::string>> texts;  // (user name, text)
        std::string setting_host;
        if (!c.setting.empty()) {
            const TextSetting st = text_setting(c.setting);
            for (const auto& src : st.users)
                texts.emplace_back(src.name, cap_text(source_text(c.text_root, src), c.text_cap));
            if (c.host_text.empty()) {
                setting_host = source_text(c.text_root, st.host);
                host_key += "|setting:" + st.name + ":" + st.host.name;
            }
        } else {
            for (const auto& p : c.user_text) texts.emplace_back(p, read_text(p));
        }
        for (int u = 0; u < c.users; ++u) {
            const auto& [name, text] = texts[std::size_t(u)];
            SplitSizes want{c.train_of(u), c.validation_of(u), c.test_of(u), c.dev_tokens};
            want.stop = c.stop_of(u);
            if (want.validation < 0) {  // a share of all of the text: count the text in the tokens asked for
                const double bpt = real ? bytes_per_token(real->codec, text) : 1.0;
                want.validation = validation_for_share(c.validation_share, -1,
                                                       static_cast<Index>(double(text.size()) / bpt), want.test, want.dev);
            }
            if (!real) {
                ctx.users.push_back(text_user(name, text, want));
                continue;
            }
            // With --model the sizes count the model's tokens: split by bytes in proportion, then cut.
            const double bpt = bytes_per_token(real->codec, text);
            ctx.users.push_back(text_user(name, text,
                                          SplitSizes{byte_budget(want.train, bpt), byte_budget(want.validation, bpt),
                                                     byte_budget(want.test, bpt), byte_budget(want.dev, bpt), 512,
                                                     byte_budget(want.stop, bpt)}));
            UserData& d = ctx.users.back();
            tokenize_stream(d.train, real->codec, want.train);
            tokenize_stream(d.validation, real->codec, want.validation);
            tokenize_stream(d.test, real->codec, want.test);
            tokenize_stream(d.dev, real->codec, want.dev);
            tokenize_stream(d.stop, real->codec, want.stop);
        }
        if (!setting_host.empty()) {
            append_bytes(host_stream.tokens, setting_host);
        } else if (!c.host_text.empty()) {
            for (const auto& p : c.host_text) {
                const std::string t = read_text(p);
                append_bytes(host_stream.tokens, t);
                host_key += "|" + p;
            }
        } else {
            for (const auto& u : ctx.users)
                host_stream.tokens.insert(host_stream.tokens.end(), u.train.tokens.begin(), u.train.tokens.end());
            for (const auto& p : c.user_text) host_key += "|" + p;
        }
        host_stream.personal.assign(host_stream.tokens.size(), 0);
        host_key += "n" + std::to_string(host_stream.size());
    }
    for (int u = 0; u < c.users; ++u) {
        const UserData& d = ctx.users[std::size_t(u)];
        for (const Stream* s : {&d.train, &d.validation, &d.test, &d.dev, &d.stop})
            require(s->size() > c.seq_len + 1 || (s == &d.dev && c.dev_tokens == 0) || (s == &d.stop && c.stop_of(u) == 0),
                    "user '", d.name, "': the ",
                    s == &d.train        ? "training"
                    : s == &d.validation ? "validation"
                    : s == &d.test       ? "test"
                    : s == &d.dev        ? "dev"
                                         : "stop",
                    " split has ", s->size(), " tokens, fewer than --seq-len + 2 = ", c.seq_len + 2);
    }

    comigs::detail::Xxh64 hasher;
    hasher.update(std::as_bytes(std::span(host_key.data(), host_key.size())));
    const std::uint64_t key = hasher.digest();
    const fs::path cache = c.host_cache.empty() ? fs::path(c.out) / ("host-" + hex64(key) + ".safetensors")
                                                : fs::path(c.host_cache);
    std::vector<std::string> methods = c.methods;
    if (methods.empty()) {
        methods = {"local", "fedavg", "comigs-2g", "comigs-2s", "comigs-1g1s", "pfedmoe"};
        if (c.ranks_differ())
            methods.insert(methods.end(), {"hetlora", "flexlora"});  // PCL needs equal ranks
        else
            methods.push_back("pcl");
    }
    if (place.distributed() && c.methods.empty())  // what distributed rounds do not offer runs in one process
        std::erase_if(methods, [](const std::string& m) { return m == "pcl" || m == "hetlora" || m == "flexlora"; });
    // Sizes of the streams each user actually got (real text: what the text gave, "all" resolved).
    auto split_sizes = [&](Stream UserData::*split) {
        std::vector<Index> n;
        for (const auto& u : ctx.users) n.push_back((u.*split).size());
        return n;
    };
    nlohmann::json config = {
        {"users", c.users},
        {"experts", c.experts.empty() ? std::vector<Index>(std::size_t(c.users), 2) : c.experts},
        {"ranks", c.ranks.empty() ? std::vector<Index>(std::size_t(c.users), 8) : c.ranks},
        {"top_k", c.top_k},
        {"alpha", c.alpha},
        {"rounds", c.rounds},
        {"local_steps", c.local_steps},
        {"router_every", c.router_every},
        {"router_phase", c.router_phase},
        {"router_iters", c.router_iters},
        {"batch", c.batch},
        {"seq_len", c.seq_len},
        {"lr", c.lr},
        {"lr_min", c.lr_min},
        {"router_lr", c.router_lr},
        {"generalist_target", c.generalist_target},
        {"recalibrate", c.recalibrate},
        {"lb_weight", c.lb_weight},
        {"weight_decay", c.weight_decay},
        {"router_init_std", c.router_init_std},
        {"specialist_lr_scale", c.specialist_lr_scale},
        {"keep_best", c.keep_best},
        {"schedule", c.schedule},
        {"attention_rank", c.attention_rank},
        {"heterogeneity", embedded ? nlohmann::json(c.heterogeneity) : nlohmann::json()},
        {"train_tokens", split_sizes(&UserData::train)},
        {"validation_tokens", split_sizes(&UserData::validation)},
        {"validation_share", c.validation_share > 0 ? nlohmann::json(c.validation_share) : nlohmann::json()},
        {"test_tokens", split_sizes(&UserData::test)},
        {"dev_tokens", split_sizes(&UserData::dev)},
        {"stop_tokens", split_sizes(&UserData::stop)},
        {"user_names", [&] {
             std::vector<std::string> n;
             for (const auto& u : ctx.users) n.push_back(u.name);
             return n;
         }()},
        {"setting", c.setting.empty() ? nlohmann::json() : nlohmann::json(c.setting)},
        {"text_cap", c.setting.empty() ? nlohmann::json() : nlohmann::json(c.text_cap)},
        {"seed", c.seed},
        {"threads", c.threads},
        {"methods", methods},
        {"user_text", c.user_text},
        {"pcl_temperature", c.pcl_temperature},
        {"base_tokens", embedded ? nlohmann::json(c.base_tokens) : nlohmann::json()},
        {"beta_personal", embedded ? nlohmann::json(c.beta_personal) : nlohmann::json()},
        {"signature_boost", embedded ? nlohmann::json(c.signature_boost) : nlohmann::json()},
        {"curve_tokens", c.curve_tokens},
        {"sample_tokens", c.sample_tokens},
        {"host", {{"d_model", c.d_model}, {"layers", c.n_layer}, {"heads", c.n_head}, {"steps", c.host_steps},
                  {"batch", c.host_batch}, {"lr", c.host_lr}, {"text", c.host_text},
                  {"cache", cache.string()}, {"reused", false}}},  // reused: set once the host is there
    };
    if (real)
        config["host"] = {{"model", c.model}, {"architecture", real->loaded.architecture},
                          {"layers", real->model().n_layer()}, {"d_model", real->model().d_model()},
                          {"vocabulary", real->model().vocab()}, {"tokenizer", real->codec.description()},
                          {"fp32_compute", c.model_fp32_compute}};
    std::optional<DemoCheckpoint> checkpoint;  // refuses a resume with other settings before any work
    if (!c.checkpoint_dir.empty()) {
        // The snapshot --keep-best holds between rounds is not part of a run checkpoint: a resumed run
        // would deploy other adapters than an uninterrupted one.
        require(!c.keep_best, "--keep-best with --checkpoint-dir '", c.checkpoint_dir,
                "': the best round's adapters are not checkpointed, so a resumed run could differ; use one or the other");
        comigs::detail::Xxh64 data;
        for (const auto& u : ctx.users)
            for (const Stream* st : {&u.train, &u.validation, &u.test, &u.dev, &u.stop})
                data.update(std::as_bytes(std::span(st->tokens)));
        checkpoint.emplace(c.checkpoint_dir, c.checkpoint_every, c.resume, place, config, data.digest());
        ctx.checkpoint = &*checkpoint;
    }

    std::optional<tg::Gpt2<Real>> tiny;  // the pretrained tiny host (without --model)
    if (real) {
        ctx.host = &real->model();
        progress.note("host: " + c.model + " (" + real->loaded.architecture + ", " +
                      std::to_string(ctx.host->n_layer()) + " blocks, d " + std::to_string(ctx.host->d_model()) +
                      "), text cut by " + real->codec.description());
        // The frozen MLPs in place (views of the mapped weights), shared by every user. A resume is bound
        // to the model by its path, architecture and shapes in the config.
        for (Index l = 0; l < ctx.host->n_layer(); ++l)
            ctx.bases.push_back(ctx.host->frozen_mlp(l));
    } else {
        bool loaded = false;
        if (!place.leader()) place.barrier();  // the leader pretrains and saves the host first
        tiny.emplace(pretrained_host(c, host_stream, cache, progress, loaded));
        if (place.leader()) place.barrier();
        const tg::Gpt2<Real>& host = *tiny;
        require(host.config().d_model == c.d_model && host.config().n_layer == c.n_layer &&
                    host.config().n_ctx >= c.seq_len,
                "host '", cache.string(), "': shape differs from --d-model/--layers/--seq-len");
        progress.note(std::string(loaded ? "host: reused " : "host: pretrained and saved to ") + cache.string());
        ctx.host = &*tiny;
        config["host"]["reused"] = loaded;
        if (checkpoint) checkpoint->bind_host(host.params().all());
        for (Index l = 0; l < c.n_layer; ++l) ctx.bases.push_back(tg::frozen_mlp(host, l));
    }

    // Evaluation sets.
    const Index per_user_ood = std::max<Index>(c.seq_len, c.test_tokens / c.users);
    std::vector<Windows> ood_parts;
    double floor_sum = 0;
    for (int u = 0; u < c.users; ++u) {
        const UserData& d = ctx.users[std::size_t(u)];
        ctx.test.push_back(eval_windows(d.test, c.seq_len));
        ctx.validation.push_back(eval_windows(d.validation, c.seq_len));
        ctx.dev.push_back(eval_windows(d.dev, c.seq_len));
        ctx.stop.push_back(c.stop_of(u) > 0 ? eval_windows(d.stop, c.seq_len) : ctx.validation.back());
        ctx.curve.push_back(eval_windows(d.test, c.seq_len, c.curve_tokens));
        ctx.sample.push_back(eval_windows(d.test, c.seq_len, c.sample_tokens));
        ood_parts.push_back(eval_windows(d.test, c.seq_len, per_user_ood));
        ctx.host_ppl.push_back(host_perplexity(*ctx.host, ctx.test.back()));
        if (embedded) {
            ctx.users[std::size_t(u)].floor_ppl = user_floor(*corpus, u, Split::test).perplexity;
            floor_sum += *ctx.users[std::size_t(u)].floor_ppl;
        }
    }
    ctx.ood = concat(ood_parts);
    DemoOutput out;
    for (double p : ctx.host_ppl) out.host_mean_ppl += p / c.users;
    if (embedded) out.floor_mean_ppl = floor_sum / c.users;
    {
        char buf[256];
        std::snprintf(buf, sizeof buf, "host: mean test perplexity %.3f%s", out.host_mean_ppl,
                      embedded ? (" (floor " + std::to_string(*out.floor_mean_ppl) + ", host on base text " +
                                  std::to_string(host_perplexity(*ctx.host, eval_windows(corpus->base_validation, c.seq_len))) +
                                  " vs base floor " + std::to_string(base_fl.perplexity) + ")")
                                     .c_str()
                               : "");
        progress.note(buf);
    }

    std::vector<std::pair<std::string, std::vector<RoutingSample>>> routing;
    for (const auto& m : methods) {
        if (checkpoint)
            if (auto done = checkpoint->finished(m)) {
                out.methods.push_back(std::move(done->first));
                routing.emplace_back(m, std::move(done->second));
                continue;
            }
        std::vector<RoutingSample> samples;
        out.methods.push_back(run_method(m, ctx, progress, samples));
        if (checkpoint) checkpoint->save_finished(m, out.methods.back(), samples);
        routing.emplace_back(m, std::move(samples));
    }

    out.results = results_json(config, out.methods, out.host_mean_ppl, out.floor_mean_ppl);
    out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    out.results["seconds"] = out.seconds;
    if (place.leader()) {
        write_text(fs::path(c.out) / "results.json", out.results.dump(2) + "\n");
        std::vector<std::optional<double>> floors;
        for (const auto& u : ctx.users) floors.push_back(u.floor_ppl);
        write_text(fs::path(c.out) / "curves.svg", curves_svg(out.methods, out.floor_mean_ppl, floors));
        write_text(fs::path(c.out) / "routing.html", routing_html(out.methods, routing));
    }
    return out;
}
#endif  // COMIGS_DEMO_IMPLEMENTATION

}  // namespace comigs::demo
