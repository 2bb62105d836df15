#pragma once
// Where the demo's users run: all in this process (the default), or spread over the ranks of a
// Communicator, user u on rank u mod size (examples/mpi: comigs-demo-mpi, one user per rank). The
// methods' code is the same either way; the few steps that need every user's numbers (the curve's
// mean perplexity, the per-user results, the routing samples) gather them here, in user order, so the
// numbers, and the order in which they are added, are the in-process ones.
#include <comigs/communicator.hpp>
#include <comigs/distributed.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "report.hpp"

namespace comigs::demo {

struct Placement {
    Communicator* comm = nullptr;  ///< nullptr: every user in this process

    bool distributed() const { return comm != nullptr; }
    int rank() const { return comm != nullptr ? comm->rank() : 0; }
    int size() const { return comm != nullptr ? comm->size() : 1; }
    /// The rank that pretrains the host, prints and writes the outputs.
    bool leader() const { return rank() == 0; }
    /// Whether user u is trained and evaluated by this process.
    bool holds(int u) const { return u % size() == rank(); }
    void barrier() const {
        if (comm != nullptr) comm->barrier();
    }

    /// values[u] for every user from the ranks holding them (`mine`: (user, value) pairs of this rank).
    std::vector<double> by_user(const std::vector<std::pair<int, double>>& mine, int users) const {
        std::vector<double> out(static_cast<std::size_t>(users), 0.0);
        if (comm == nullptr) {
            for (const auto& [u, v] : mine) out[static_cast<std::size_t>(u)] = v;
            return out;
        }
        struct Item {
            std::int64_t user;
            double value;
        };
        std::vector<Item> items;
        for (const auto& [u, v] : mine) items.push_back({u, v});
        for (const auto& r : allgather<Item>(*comm, items))
            for (const auto& it : r) out[static_cast<std::size_t>(it.user)] = it.value;
        return out;
    }

    /// Completes `result.users` (entries of users held elsewhere) and `samples` (all users', in user
    /// order) from every rank. In-process: sorts the samples by user.
    void gather(MethodResult& result, std::vector<RoutingSample>& samples, int users) const {
        if (comm != nullptr) {
            comigs::detail::ByteWriter w;
            std::uint64_t held = 0;
            for (int u = 0; u < users; ++u) held += holds(u) ? 1 : 0;
            w.put(held);
            for (int u = 0; u < users; ++u)
                if (holds(u)) put_user(w, result.users[static_cast<std::size_t>(u)]);
            w.put(static_cast<std::uint64_t>(samples.size()));
            for (const auto& s : samples) put_sample(w, s);
            std::vector<std::byte> all;
            std::vector<std::size_t> sizes;
            comm->allgather_bytes(w.bytes, all, sizes);
            samples.clear();
            std::size_t at = 0;
            for (int r = 0; r < size(); ++r) {
                comigs::detail::ByteReader rd(std::span<const std::byte>(all.data() + at, sizes[std::size_t(r)]), r);
                at += sizes[std::size_t(r)];
                const auto n = rd.get<std::uint64_t>();
                for (std::uint64_t k = 0; k < n; ++k) {
                    UserResult ur = get_user(rd);
                    result.users.at(static_cast<std::size_t>(ur.user)) = ur;
                }
                const auto m = rd.get<std::uint64_t>();
                for (std::uint64_t k = 0; k < m; ++k) samples.push_back(get_sample(rd));
            }
        }
        std::stable_sort(samples.begin(), samples.end(), [](const auto& a, const auto& b) { return a.user < b.user; });
    }

private:
    static void put_opt(comigs::detail::ByteWriter& w, const std::optional<double>& v) {
        w.put(static_cast<std::uint8_t>(v.has_value()));
        w.put(v.value_or(0.0));
    }
    static std::optional<double> get_opt(comigs::detail::ByteReader& r) {
        const bool has = r.get<std::uint8_t>() != 0;
        const double v = r.get<double>();
        return has ? std::optional<double>(v) : std::nullopt;
    }
    static void put_user(comigs::detail::ByteWriter& w, const UserResult& u) {
        w.put(static_cast<std::int64_t>(u.user));
        for (double v : {u.test_ppl, u.test_ppl_personalised, u.ood_ppl, u.generalist_share, u.host_ppl}) w.put(v);
        for (const auto* o : {&u.floor_ppl, &u.gap_closed, &u.shared_to_generalist, &u.personal_to_specialist, &u.dev_ppl})
            put_opt(w, *o);
        w.put(static_cast<std::uint64_t>(u.by_layer.size()));
        for (const LayerRouting& l : u.by_layer) {
            w.put(l.generalist_share);
            put_opt(w, l.shared_to_generalist);
            put_opt(w, l.personal_to_specialist);
        }
    }
    static UserResult get_user(comigs::detail::ByteReader& r) {
        UserResult u;
        u.user = static_cast<int>(r.get<std::int64_t>());
        for (double* v : {&u.test_ppl, &u.test_ppl_personalised, &u.ood_ppl, &u.generalist_share, &u.host_ppl})
            *v = r.get<double>();
        for (auto* o : {&u.floor_ppl, &u.gap_closed, &u.shared_to_generalist, &u.personal_to_specialist, &u.dev_ppl})
            *o = get_opt(r);
        const auto layers = r.get<std::uint64_t>();
        comigs::require(layers <= 4096, "routing of ", layers, " layers in a user's result: corrupt message");
        u.by_layer.resize(static_cast<std::size_t>(layers));
        for (LayerRouting& l : u.by_layer) {
            l.generalist_share = r.get<double>();
            l.shared_to_generalist = get_opt(r);
            l.personal_to_specialist = get_opt(r);
        }
        return u;
    }
    template <class V>
    static void put_vec(comigs::detail::ByteWriter& w, const std::vector<V>& v) {
        w.put(static_cast<std::uint64_t>(v.size()));
        for (const V& x : v) w.put(x);
    }
    template <class V>
    static std::vector<V> get_vec(comigs::detail::ByteReader& r) {
        std::vector<V> v(static_cast<std::size_t>(r.get<std::uint64_t>()));
        for (V& x : v) x = r.get<V>();
        return v;
    }
    static void put_sample(comigs::detail::ByteWriter& w, const RoutingSample& s) {
        w.put(static_cast<std::int64_t>(s.user));
        put_vec(w, s.text);
        w.put(static_cast<std::uint64_t>(s.expert.size()));
        for (const auto& layer : s.expert) put_vec(w, layer);
        put_vec(w, s.personal);
        w.put(static_cast<std::uint64_t>(s.expert_is_generalist.size()));
        for (bool g : s.expert_is_generalist) w.put(static_cast<std::uint8_t>(g));
    }
    static RoutingSample get_sample(comigs::detail::ByteReader& r) {
        RoutingSample s;
        s.user = static_cast<int>(r.get<std::int64_t>());
        s.text = get_vec<unsigned char>(r);
        s.expert.resize(static_cast<std::size_t>(r.get<std::uint64_t>()));
        for (auto& layer : s.expert) layer = get_vec<int>(r);
        s.personal = get_vec<unsigned char>(r);
        const auto n = r.get<std::uint64_t>();
        for (std::uint64_t k = 0; k < n; ++k) s.expert_is_generalist.push_back(r.get<std::uint8_t>() != 0);
        return s;
    }
};

}  // namespace comigs::demo
