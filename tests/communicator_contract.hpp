#pragma once
// What every Communicator must do, checked the same way on the in-process one (test_communicator.cpp)
// and on MPI (mpi/test_mpi_communicator.cpp). Collective: every rank calls it; it returns this rank's
// failures instead of asserting, so that no rank leaves a collective early.
#include <comigs/communicator.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace comigs_test {

// Values whose double sum depends on the order of additions once there are 3 ranks or more:
// (1 + 1e16) - 1e16 = 0 but (-1e16 + 1e16) + 1 = 1.
inline double order_sensitive(int rank, std::size_t i) {
    switch (rank % 3) {
    case 0: return 1.0 + static_cast<double>(i);
    case 1: return 1e16;
    default: return -1e16;
    }
}

/// `exact_sum_order`: the implementation promises sums in rank order (the in-process one does).
inline std::vector<std::string> communicator_contract_failures(comigs::Communicator& comm, bool exact_sum_order) {
    using namespace comigs;
    std::vector<std::string> failures;
    auto fail = [&](const std::string& what) {
        failures.push_back("rank " + std::to_string(comm.rank()) + ": " + what);
    };
    const int n = comm.size(), r = comm.rank();
    if (r < 0 || r >= n) fail("rank out of range");

    // allgather: rank q contributes q + 1 values, so sizes differ; the result is in rank order.
    std::vector<std::int64_t> mine(static_cast<std::size_t>(r + 1));
    for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = 100 * r + static_cast<std::int64_t>(i);
    const auto all = allgather<std::int64_t>(comm, mine);
    if (static_cast<int>(all.size()) != n) fail("allgather: wrong number of ranks");
    for (int q = 0; q < std::min(n, static_cast<int>(all.size())); ++q) {
        const auto& v = all[static_cast<std::size_t>(q)];
        if (static_cast<int>(v.size()) != q + 1) fail("allgather: wrong size from rank " + std::to_string(q));
        for (std::size_t i = 0; i < v.size(); ++i)
            if (v[i] != 100 * q + static_cast<std::int64_t>(i)) fail("allgather: wrong value");
    }
    for (const auto& v : allgather<double>(comm, std::span<const double>()))
        if (!v.empty()) fail("allgather: empty contributions are not empty");

    // Sums.
    std::vector<double> x(7);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = order_sensitive(r, i);
    comm.allreduce_sum(std::span<double>(x));
    for (std::size_t i = 0; i < x.size(); ++i) {
        double s = 0;
        for (int q = 0; q < n; ++q) s += order_sensitive(q, i);
        if (exact_sum_order ? x[i] != s : std::abs(x[i] - s) > 1e3) fail("allreduce_sum (double)");
    }
    std::vector<float> xf(5, static_cast<float>(r) + 0.25f);
    comm.allreduce_sum(std::span<float>(xf));
    for (float v : xf)
        if (v != static_cast<float>(n * (n - 1) / 2) + 0.25f * static_cast<float>(n)) fail("allreduce_sum (float)");
    std::vector<std::int64_t> xi{r, 1, -3};
    comm.allreduce_sum(std::span<std::int64_t>(xi));
    if (xi != std::vector<std::int64_t>{n * (n - 1) / 2, n, -3 * n}) fail("allreduce_sum (int64)");

    // Broadcast from the last rank.
    std::vector<std::byte> b(3, std::byte(r));
    comm.broadcast_bytes(b, n - 1);
    for (auto v : b)
        if (v != std::byte(n - 1)) fail("broadcast");

    // Split: parity classes numbered in reverse rank order (key = -rank); with 3 or more ranks, rank 1
    // opts out (negative colour) and gets no communicator.
    const bool opt_out = n >= 3 && r == 1;
    auto sub = comm.split(opt_out ? -1 : r % 2, -r);
    std::vector<int> members;  // expected, in sub-communicator order
    for (int q = n - 1; q >= 0; --q)
        if (q % 2 == r % 2 && !(n >= 3 && q == 1)) members.push_back(q);
    if (opt_out) {
        if (sub) fail("split: a negative colour got a communicator");
    } else if (!sub) {
        fail("split: no communicator");
    } else {
        const auto pos = std::find(members.begin(), members.end(), r) - members.begin();
        if (sub->size() != static_cast<int>(members.size())) fail("split: size");
        if (sub->rank() != pos) fail("split: rank (key order)");
        if (allgather_value<int>(*sub, r) != members) fail("split: members");
        std::vector<double> one{1.0};
        sub->allreduce_sum(std::span<double>(one));
        if (one[0] != static_cast<double>(members.size())) fail("split: sum stays inside the group");
    }
    // A second split of the same communicator.
    auto again = comm.split(0, r);
    if (!again || again->size() != n || again->rank() != r) fail("split: second split");
    comm.barrier();
    return failures;
}

}  // namespace comigs_test
