#pragma once
// A small fleet for the distributed-round tests, shared by test_distributed.cpp (in-process ranks) and
// mpi/test_mpi_round.cpp (MPI ranks): users whose layers are a deterministic function of (seed, user),
// so every rank can rebuild any user's upload and compare the distributed round with the in-process
// aggregate(). Specialists and routers hold canary values, and a recording communicator keeps every
// buffer a rank hands to a collective, so tests can prove no canary ever travels.
#include <comigs/aggregate.hpp>
#include <comigs/communicator.hpp>
#include <comigs/distributed.hpp>
#include <comigs/upload.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace comigs_test {

using comigs::Index;

/// Written into every specialist and router value: a number no real parameter has.
constexpr double canary = -7777.125;

struct FleetOptions {
    std::uint64_t seed = 42;
    bool heterogeneous_ranks = false;  ///< LoRA rank 2, 3 or 4 by user (for hetlora)
    std::vector<comigs::UserId> nan_users;  ///< these users' generalists hold a NaN
};

/// User u's layers: a GELU mixture "h.0.mlp." (d 6, hidden 10) whose experts are {G, S}, {G, S, S} or
/// {G, G} (2G: expert 1 shared too) by u mod 3, and for even u a shared LoRA adapter "h.0.attn." on a
/// 6 -> 18 projection. So users hold different sets of shared tensors.
template <class T>
struct FleetUser {
    comigs::UserId id = 0;
    double tokens = 0;
    std::unique_ptr<comigs::MixtureOfLoraMlp<T>> mlp;
    std::unique_ptr<comigs::LoraExpert<T>> attn;

    comigs::GeneralistUpload<T> upload() const {
        comigs::UploadBuilder<T> b(id, tokens);
        b.add("h.0.mlp.", *mlp);
        if (attn) b.add_shared_adapter("h.0.attn.", *attn);
        return std::move(b).finish();
    }
};

template <class T>
FleetUser<T> make_user(comigs::UserId u, const FleetOptions& opt) {
    using namespace comigs;
    static const auto base = [] {
        auto b = std::make_shared<FrozenMlp<T>>(MlpForm::gelu, 6, 10);
        Rng rng(7);
        b->randomize(rng);
        return b;
    }();
    FleetUser<T> user;
    user.id = u;
    user.tokens = 100.0 + 17.0 * static_cast<double>(u);
    MixtureConfig cfg;
    cfg.d_model = 6;
    cfg.d_hidden = 10;
    cfg.rank = opt.heterogeneous_ranks ? 2 + static_cast<Index>(u % 3) : 3;
    cfg.alpha = 16;
    switch (u % 3) {
        case 0: cfg.n_experts = 2; break;
        case 1: cfg.n_experts = 3; break;
        default:
            cfg.n_experts = 2;
            cfg.roles = {Role::generalist, Role::generalist};
    }
    user.mlp = std::make_unique<MixtureOfLoraMlp<T>>(cfg, base);
    Rng rng(opt.seed, u);
    auto& p = user.mlp->params();
    for (const auto& spec : p.layout().tensors())
        for (T& v : p.span(spec.name))
            v = user.mlp->shared(spec.name) ? static_cast<T>(rng.uniform(-1.0, 1.0)) : static_cast<T>(canary);
    if (u % 2 == 0) {
        LoraConfig lc;
        lc.in_features = 6;
        lc.out_features = 18;
        lc.rank = cfg.rank;
        user.attn = std::make_unique<LoraExpert<T>>(lc);
        for (T& v : user.attn->params().all()) v = static_cast<T>(rng.uniform(-1.0, 1.0));
    }
    for (auto bad : opt.nan_users)
        if (bad == u) p.span("experts.0.proj.lora_B")[1] = std::numeric_limits<T>::quiet_NaN();
    return user;
}

/// Every user's upload, users 0 .. n-1 (what one process would aggregate).
template <class T>
std::vector<comigs::GeneralistUpload<T>> fleet_uploads(Index n, const FleetOptions& opt) {
    std::vector<comigs::GeneralistUpload<T>> out;
    for (Index u = 0; u < n; ++u) out.push_back(make_user<T>(static_cast<comigs::UserId>(u), opt).upload());
    return out;
}

/// The uploads of the users rank `rank` of `size` holds: users u with u mod size == rank (so with fewer
/// ranks than users a rank holds several, and the ids on one rank are not contiguous).
template <class T>
std::vector<comigs::GeneralistUpload<T>> rank_uploads(Index n, int rank, int size, const FleetOptions& opt) {
    std::vector<comigs::GeneralistUpload<T>> out;
    for (Index u = rank; u < n; u += size) out.push_back(make_user<T>(static_cast<comigs::UserId>(u), opt).upload());
    return out;
}

/// Differences between a distributed and an in-process aggregation, as text (empty: identical).
/// `tolerance` 0 asks for bitwise equality; `subset` allows the distributed aggregate to hold only some
/// of the in-process tensors (Reduction::allreduce gives a rank the tensors its users hold).
template <class T>
std::vector<std::string> compare(const comigs::AggregationResult<T>& got, const comigs::AggregationResult<T>& want,
                                 double tolerance, bool subset) {
    using namespace comigs;
    std::vector<std::string> diffs;
    const auto& g = got.aggregate;
    const auto& w = want.aggregate;
    if (!subset && g.tensors().size() != w.tensors().size())
        diffs.push_back("tensor count " + std::to_string(g.tensors().size()) + " vs " +
                        std::to_string(w.tensors().size()));
    for (const auto& gi : g.tensors()) {
        const SharedTensorInfo* wi = w.find(gi.name);
        if (wi == nullptr) {
            diffs.push_back(gi.name + ": not in the in-process aggregate");
            continue;
        }
        if (gi.rows != wi->rows || gi.cols != wi->cols || gi.rank != wi->rank || gi.scale != wi->scale ||
            gi.alpha != wi->alpha || gi.rank_policy != wi->rank_policy)
            diffs.push_back(gi.name + ": metadata differs");
        const auto a = g.span(gi), b = w.span(*wi);
        if (a.size() != b.size()) continue;
        if (tolerance == 0) {
            if (std::memcmp(a.data(), b.data(), a.size_bytes()) != 0) diffs.push_back(gi.name + ": values differ");
        } else {
            for (std::size_t e = 0; e < a.size(); ++e)
                if (std::abs(static_cast<double>(a[e]) - static_cast<double>(b[e])) >
                    tolerance * std::max(1.0, std::abs(static_cast<double>(b[e])))) {
                    diffs.push_back(gi.name + ": values differ beyond tolerance");
                    break;
                }
        }
    }
    const auto& gr = got.report;
    const auto& wr = want.report;
    if (gr.included != wr.included) diffs.push_back("report: included users differ");
    if (gr.upload_weights != wr.upload_weights) diffs.push_back("report: upload weights differ");
    if (gr.excluded.size() != wr.excluded.size()) {
        diffs.push_back("report: excluded counts differ");
    } else {
        for (std::size_t k = 0; k < gr.excluded.size(); ++k)
            if (gr.excluded[k].user != wr.excluded[k].user || gr.excluded[k].tensor != wr.excluded[k].tensor ||
                gr.excluded[k].reason != wr.excluded[k].reason)
                diffs.push_back("report: excluded user differs");
    }
    if (gr.tensors.size() != wr.tensors.size()) {
        diffs.push_back("report: tensor records differ in number");
    } else {
        for (std::size_t k = 0; k < gr.tensors.size(); ++k) {
            const auto &a = gr.tensors[k], &b = wr.tensors[k];
            if (a.name != b.name || a.users != b.users || a.weights != b.weights || a.rank != b.rank)
                diffs.push_back("report: record of " + a.name + " differs");
        }
    }
    return diffs;
}

/// Forwards to another communicator and keeps a copy of every buffer this rank hands to a collective
/// (what it sends), including through the communicators split() makes.
class RecordingCommunicator final : public comigs::Communicator {
public:
    using Log = std::vector<std::vector<std::byte>>;

    explicit RecordingCommunicator(comigs::Communicator& inner, std::shared_ptr<Log> log = std::make_shared<Log>())
        : inner_(&inner), log_(std::move(log)) {}

    const Log& sent() const { return *log_; }

    int rank() const override { return inner_->rank(); }
    int size() const override { return inner_->size(); }
    void allgather_bytes(std::span<const std::byte> mine, std::vector<std::byte>& all,
                         std::vector<std::size_t>& sizes) override {
        keep(mine);
        inner_->allgather_bytes(mine, all, sizes);
    }
    void allreduce_sum(std::span<float> d) override {
        keep(std::as_bytes(d));
        inner_->allreduce_sum(d);
    }
    void allreduce_sum(std::span<double> d) override {
        keep(std::as_bytes(d));
        inner_->allreduce_sum(d);
    }
    void allreduce_sum(std::span<std::int64_t> d) override {
        keep(std::as_bytes(d));
        inner_->allreduce_sum(d);
    }
    void broadcast_bytes(std::span<std::byte> d, int root) override {
        if (rank() == root) keep(d);
        inner_->broadcast_bytes(d, root);
    }
    std::unique_ptr<comigs::Communicator> split(int color, int key) override {
        auto sub = inner_->split(color, key);
        if (!sub) return nullptr;
        auto rec = std::make_unique<RecordingCommunicator>(*sub, log_);
        rec->owned_ = std::move(sub);
        return rec;
    }
    void barrier() override { inner_->barrier(); }

private:
    void keep(std::span<const std::byte> b) { log_->emplace_back(b.begin(), b.end()); }

    comigs::Communicator* inner_;
    std::unique_ptr<comigs::Communicator> owned_;
    std::shared_ptr<Log> log_;
};

/// True when `bytes` contains the canary as a float or as a double, or the router's tensor name.
inline bool holds_canary(const std::vector<std::byte>& bytes) {
    auto contains = [&bytes](const void* p, std::size_t n) {
        if (bytes.size() < n) return false;
        for (std::size_t i = 0; i + n <= bytes.size(); ++i)
            if (std::memcmp(bytes.data() + i, p, n) == 0) return true;
        return false;
    };
    const float f = static_cast<float>(canary);
    const double d = canary;
    const std::string router = "router.weight";
    return contains(&f, sizeof f) || contains(&d, sizeof d) || contains(router.data(), router.size());
}

}  // namespace comigs_test
