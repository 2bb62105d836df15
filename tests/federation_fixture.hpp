#pragma once
// Users of the tiny regression host (tiny_host.hpp) for the distributed-runner tests: any subset of a
// federation can be built on its own (user u's host, data and trainer depend only on (seed, u)), so a
// rank builds just its users and the test compares with RoundRunner over all of them.
#include <comigs/strategy.hpp>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tiny_host.hpp"

namespace comigs_test {

template <class T>
struct FederationUsers {
    using Host = TinyHost<T>;
    using Batch = RegressionBatch<T>;
    using Tr = comigs::Trainer<Host, Batch>;

    /// Users `ids` of a federation of `n_users` under `strategy`: `ranks` (per user, empty: 2) and
    /// `experts` (per user, empty: the strategy's) make users differ.
    FederationUsers(const comigs::Strategy& strategy, const std::vector<Index>& ids, Index rounds, Index local_steps,
                    std::vector<Index> ranks = {}, std::vector<Index> experts = {}, std::uint64_t seed = 3) {
        using namespace comigs;
        TinyHostConfig hc;
        hc.n_experts = strategy.n_experts();
        hc.top_k = strategy.top_k;
        hc.routing = strategy.routing;
        hc.roles = strategy.roles;
        base = make_base<T>(hc, seed);
        TrainerConfig tc;
        tc.router_every = 3;
        tc.router_iters = 2;
        tc.expert_lr = 2e-2;
        tc.expert_lr_min = 2e-3;
        tc.router_lr = 1e-2;
        tc.total_expert_steps = rounds * local_steps;
        tc = strategy.trainer_config(tc);
        for (Index u : ids) {
            data.push_back(std::make_unique<UserData<T>>(UserData<T>::make(hc.d, u, seed, 48, 32, 64)));
            TinyHostConfig c = hc;
            if (!ranks.empty()) c.rank = ranks[static_cast<std::size_t>(u)];
            if (!experts.empty()) {
                c.n_experts = experts[static_cast<std::size_t>(u)];
                c.roles.assign(static_cast<std::size_t>(c.n_experts), Role::specialist);
                c.roles[0] = Role::generalist;
            }
            Rng init(seed * 1000 + static_cast<std::uint64_t>(u));
            hosts.push_back(std::make_unique<Host>(c, base, init));
            const UserData<T>* d = data.back().get();
            trainers.push_back(std::make_unique<Tr>(
                *hosts.back(), tc, [d](Rng& r) { return d->train_batch(8, r); },
                [d](Rng& r) { return d->val_batch(8, r); }, seed * 7919 + static_cast<std::uint64_t>(u)));
            SimulatedUser<Host, Batch> su;
            su.id = 100 + static_cast<comigs::UserId>(u);
            su.trainer = trainers.back().get();
            su.roles = hosts.back()->config().roles;
            users.push_back(std::move(su));
        }
    }
    FederationUsers(const FederationUsers&) = delete;

    /// User list position i's adapter parameters (names and values).
    std::vector<comigs::NamedTensor<T>> params(std::size_t i) const {
        return comigs::adapter_parameters(hosts[i]->adapters());
    }

    std::shared_ptr<const comigs::FrozenMlp<T>> base;
    std::vector<std::unique_ptr<UserData<T>>> data;
    std::vector<std::unique_ptr<Host>> hosts;
    std::vector<std::unique_ptr<Tr>> trainers;
    std::vector<comigs::SimulatedUser<Host, Batch>> users;
};

template <class T>
bool same_bits(const std::vector<comigs::NamedTensor<T>>& a, const std::vector<comigs::NamedTensor<T>>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].name != b[i].name || a[i].data.size() != b[i].data.size() ||
            std::memcmp(a[i].data.data(), b[i].data.data(), a[i].data.size() * sizeof(T)) != 0)
            return false;
    return true;
}

}  // namespace comigs_test
