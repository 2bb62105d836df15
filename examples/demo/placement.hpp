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
    static void put_user(comigs::detail::ByteWriter& w, const UserResult& u) { put_fields(w, u); }
    static UserResult get_user(comigs::detail::ByteReader& r) {
        UserResult u;
        get_fields(r, u);
        return u;
    }
    static void put_sample(comigs::detail::ByteWriter& w, const RoutingSample& s) { put_fields(w, s); }
    static RoutingSample get_sample(comigs::detail::ByteReader& r) {
        RoutingSample s;
        get_fields(r, s);
        return s;
    }
};

}  // namespace comigs::demo
