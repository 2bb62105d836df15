#pragma once
// RoundRunner's rounds (strategy.hpp) with the users spread over the ranks of a Communicator: each rank
// holds and trains its own users (one per rank, or several), and the cross-user steps are collectives:
// the initial synchronisation (the source user's shared tensors go to everyone) and the aggregation
// (DistributedAggregator). Everything else is RoundRunner's sequence, user by user: download the
// pending aggregate, local steps, upload; after the last round the final download. With
// Reduction::fixed_order every aggregate is bitwise the in-process one, so a run gives every user
// bitwise the parameters RoundRunner gives it, whatever the number of ranks (tests check this).
//
// Strategies: those aggregating with fedavg or hetlora, and those that do not collaborate. PCL's
// personalised averages (every user evaluates every other user's model) are not distributed.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "communicator.hpp"
#include "distributed.hpp"
#include "strategy.hpp"

namespace comigs {

/// Runs a Strategy's rounds over the users of all ranks; every rank constructs one with its own users
/// and calls run() (or round() and finish()) together: these are collectives.
template <class Model, class Batch>
class DistributedRoundRunner : public detail::RunnerBase<Model, Batch> {
    using Base = detail::RunnerBase<Model, Batch>;

public:
    using T = typename Model::scalar_type;
    using User = SimulatedUser<Model, Batch>;

    /// `local`: this rank's users (may be empty); ids must be unique over all ranks. Users' trainers
    /// and models must outlive the runner, as must `comm`.
    DistributedRoundRunner(Communicator& comm, Strategy strategy, RunnerConfig config, std::vector<User> local,
                           Reduction reduction = Reduction::fixed_order)
        : Base(std::move(strategy), std::move(config), std::move(local)), comm_(&comm), reduction_(reduction) {
        require(strategy_.personalised() == nullptr, "strategy '", strategy_.name,
                "': personalised averaging (PCL) is not distributed; run it with RoundRunner");
        std::vector<std::uint64_t> ids;
        for (const auto& u : users_) ids.push_back(u.id);
        std::vector<std::uint64_t> all;
        for (const auto& r : allgather<std::uint64_t>(*comm_, ids)) all.insert(all.end(), r.begin(), r.end());
        std::sort(all.begin(), all.end());
        require(!all.empty(), "users: at least one is needed (on any rank)");
        for (std::size_t k = 1; k < all.size(); ++k)
            require(all[k - 1] != all[k], "user ", all[k], ": the id is used twice");
        if (const AggregationConfig* a = strategy_.aggregation()) aggregator_.emplace(*comm_, *a, reduction);
    }

    /// All rounds, then the final download; one report per round (of every rank's users).
    std::vector<RoundReport> run(const RunnerHooks<T>& hooks = {}) {
        std::vector<RoundReport> out;
        while (next_round_ < config_.rounds) out.push_back(round(hooks));
        this->finish(hooks);
        return out;
    }

    /// The next round. Hooks run for this rank's users; `after_round` gets the report of all users
    /// (present ids, local training reports and traffic gathered from every rank; seconds: this rank's).
    RoundReport round(const RunnerHooks<T>& hooks = {}) {
        require(next_round_ < config_.rounds, "round ", next_round_, ": all ", config_.rounds, " rounds are done");
        if (next_round_ == 0 && config_.sync_initial && strategy_.collaborates()) synchronise();
        const auto t0 = std::chrono::steady_clock::now();
        RoundReport rep;
        rep.round = next_round_;
        const auto [present, processing] = this->present_users(rep.round);  // local indices

        std::vector<UserRecord> mine(present.size());
        std::vector<std::optional<GeneralistUpload<T>>> uploads(present.size());
        for (std::size_t p : processing) {
            UserRecord& r = mine[p];
            r.id = users_[present[p]].id;
            r.local = this->local_round(present[p], rep.round, hooks, uploads[p], r.download_floats);
            if (uploads[p]) r.upload_floats = uploads[p]->size();
        }

        // Everyone's records, in ascending id: the same report on every rank.
        std::vector<UserRecord> everyone;
        for (const auto& r : allgather<UserRecord>(*comm_, mine)) everyone.insert(everyone.end(), r.begin(), r.end());
        std::sort(everyone.begin(), everyone.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
        for (const auto& r : everyone) {
            rep.present.push_back(r.id);
            rep.local.push_back(r.local);
            rep.upload_floats += r.upload_floats;
            rep.download_floats += r.download_floats;
        }

        if (aggregator_ && !everyone.empty()) {
            std::vector<GeneralistUpload<T>> ups;
            ups.reserve(uploads.size());
            for (auto& u : uploads) ups.push_back(std::move(*u));
            auto result = (*aggregator_)(ups);
            for (auto& p : pending_) p = result.aggregate;  // absent users get it when they come back
            rep.aggregation = std::move(result.report);
        }
        rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        ++next_round_;
        if (hooks.after_round) hooks.after_round(rep);
        return rep;
    }

    /// The ranks this runner spans.
    Communicator& communicator() const { return *comm_; }
    Reduction reduction() const { return reduction_; }

private:
    // One user's round, as every rank sees it (trivially copyable: it travels as bytes).
    struct UserRecord {
        UserId id = 0;
        LocalTrainingReport local;
        Index upload_floats = 0, download_floats = 0;
    };
    static_assert(std::is_trivially_copyable_v<UserRecord>, "UserRecord travels as bytes");

    using Base::build_upload;
    using Base::shared_registry;
    using Base::strategy_;
    using Base::config_;
    using Base::users_;
    using Base::order_;
    using Base::pending_;
    using Base::next_round_;

    // Before round 0, as RoundRunner: everyone takes the shared tensors (rank policy truncate) of the
    // lowest-id user among those with the largest upload, wherever that user lives.
    void synchronise() {
        struct Candidate {
            Index size;
            UserId id;
        };
        std::vector<Candidate> mine;
        for (std::size_t i : order_)
            mine.push_back({build_upload(users_[i], 1.0, UploadOptions{}).size(), users_[i].id});
        Candidate best{-1, 0};
        for (const auto& r : allgather<Candidate>(*comm_, mine))
            for (const auto& c : r)
                if (c.size > best.size || (c.size == best.size && c.id < best.id)) best = c;
        std::vector<std::byte> msg;
        std::optional<std::size_t> source;
        for (std::size_t i : order_)
            if (users_[i].id == best.id) {
                source = i;
                msg = detail::encode_upload(build_upload(users_[i], 1.0, UploadOptions{}));
            }
        std::vector<std::byte> all;
        std::vector<std::size_t> sizes;
        comm_->allgather_bytes(msg, all, sizes);
        if (best.size <= 0) return;  // nothing shared anywhere
        int owner = 0;
        while (static_cast<std::size_t>(owner) < sizes.size() && sizes[static_cast<std::size_t>(owner)] == 0) ++owner;
        const auto init = detail::decode_upload_as_aggregate<T>(all, owner, RankPolicy::truncate);
        for (std::size_t i : order_)
            if (!source || i != *source) download(init, users_[i].id, shared_registry(users_[i]));
    }

    Communicator* comm_;
    Reduction reduction_;
    std::optional<DistributedAggregator<T>> aggregator_;
};

}  // namespace comigs
