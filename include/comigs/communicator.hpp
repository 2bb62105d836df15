#pragma once
// A group of ranks that exchange contiguous buffers: the transport under a distributed round. The
// interface is small on purpose (allgather, sum, broadcast, split, barrier) so that an MPI communicator
// (comigs/mpi.hpp, target comigs::mpi) and the in-process one below are interchangeable, and the round
// logic above them is tested without MPI. The core library never needs MPI.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.hpp"

namespace comigs {

/// Every rank of a communicator must call its collectives in the same order with agreeing arguments
/// (as in MPI). Sizes are in elements; ranks are numbered 0 .. size()-1.
class Communicator {
public:
    virtual ~Communicator() = default;

    virtual int rank() const = 0;
    virtual int size() const = 0;

    /// Concatenates every rank's `mine` in rank order into `all`; `sizes[r]` is rank r's byte count.
    /// Ranks may contribute different sizes (including 0).
    virtual void allgather_bytes(std::span<const std::byte> mine, std::vector<std::byte>& all,
                                 std::vector<std::size_t>& sizes) = 0;

    /// In place: every rank's `data` becomes the elementwise sum over ranks (all ranks pass the same
    /// length). The order of the additions is the implementation's: the in-process communicator adds in
    /// rank order, MPI chooses its own algorithm, so sums of floating-point values may differ in the
    /// last bits between implementations and rank counts. Use `allgather` and a fixed-order sum where
    /// bitwise reproducibility matters.
    virtual void allreduce_sum(std::span<float> data) = 0;
    virtual void allreduce_sum(std::span<double> data) = 0;
    virtual void allreduce_sum(std::span<std::int64_t> data) = 0;

    /// Rank `root`'s `data` is copied into every rank's `data` (all ranks pass the same length).
    virtual void broadcast_bytes(std::span<std::byte> data, int root) = 0;

    /// Collective: ranks passing the same `color` >= 0 form a new communicator, numbered by
    /// (key, rank in this communicator). A rank passing a negative color joins none and gets nullptr.
    virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

    virtual void barrier() = 0;
};

/// Every rank's values of a trivially copyable type, one vector per rank (rank order).
template <class T>
std::vector<std::vector<T>> allgather(Communicator& comm, std::span<const T> mine) {
    static_assert(std::is_trivially_copyable_v<T>, "allgather: T must be trivially copyable");
    std::vector<std::byte> all;
    std::vector<std::size_t> sizes;
    comm.allgather_bytes(std::as_bytes(mine), all, sizes);
    std::vector<std::vector<T>> out(sizes.size());
    std::size_t at = 0;
    for (std::size_t r = 0; r < sizes.size(); ++r) {
        require<ShapeError>(sizes[r] % sizeof(T) == 0, "allgather: rank ", r, " sent ", sizes[r],
                            " bytes, not a multiple of the element size ", sizeof(T));
        out[r].resize(sizes[r] / sizeof(T));
        if (sizes[r] > 0) std::memcpy(out[r].data(), all.data() + at, sizes[r]);
        at += sizes[r];
    }
    return out;
}

/// One value per rank (rank order).
template <class T>
std::vector<T> allgather_value(Communicator& comm, const T& mine) {
    const auto per_rank = allgather<T>(comm, std::span<const T>(&mine, 1));
    std::vector<T> out;
    out.reserve(per_rank.size());
    for (std::size_t r = 0; r < per_rank.size(); ++r) {
        require<ShapeError>(per_rank[r].size() == 1, "allgather_value: rank ", r, " sent ", per_rank[r].size(),
                            " values, expected 1");
        out.push_back(per_rank[r][0]);
    }
    return out;
}

namespace detail {

/// Thrown in the ranks of an in-process group when another rank has failed, so that they leave their
/// collectives instead of waiting forever; run_in_process rethrows the original failure instead.
class PeerFailed : public Error {
public:
    using Error::Error;
};

/// State of one in-process group (the whole group, or a group made by split). All ranks of the root
/// group share one failure flag, so a failure anywhere releases waiters in every subgroup.
struct InProcessShared {
    struct Slot {
        int op = 0;
        const void* data = nullptr;
        std::size_t bytes = 0;
        std::int64_t arg = 0;
    };
    struct Failure {
        std::atomic<bool> failed{false};
    };

    explicit InProcessShared(int n, std::shared_ptr<Failure> f)
        : size(n), slots(static_cast<std::size_t>(n)), children(static_cast<std::size_t>(n)),
          failure(std::move(f)) {}

    // A reusable barrier that gives up (throws PeerFailed) once any rank of the root group has failed.
    // Waiters poll the failure flag because the failing rank may belong to another subgroup.
    void arrive_and_wait() {
        std::unique_lock lock(mutex);
        const std::uint64_t gen = generation;
        if (++arrived == size) {
            arrived = 0;
            ++generation;
            cv.notify_all();
            return;
        }
        while (generation == gen) {
            if (failure->failed.load()) throw PeerFailed("in-process communicator: another rank failed");
            cv.wait_for(lock, std::chrono::milliseconds(10));
        }
    }

    const int size;
    std::vector<Slot> slots;
    std::vector<std::shared_ptr<InProcessShared>> children;  // split results, published by group leaders
    std::shared_ptr<Failure> failure;
    std::mutex mutex;
    std::condition_variable cv;
    int arrived = 0;
    std::uint64_t generation = 0;
};

}  // namespace detail

/// One rank of a group of threads in this process (made by `run_in_process`). Collectives meet at a
/// barrier and copy from each other's buffers directly; sums add in rank order, so they are
/// reproducible. A mismatch between the ranks' collectives (different operations or lengths) is an
/// InvalidArgument on every rank.
class InProcessCommunicator final : public Communicator {
public:
    InProcessCommunicator(std::shared_ptr<detail::InProcessShared> shared, int rank)
        : shared_(std::move(shared)), rank_(rank) {}

    int rank() const override { return rank_; }
    int size() const override { return shared_->size; }

    void allgather_bytes(std::span<const std::byte> mine, std::vector<std::byte>& all,
                         std::vector<std::size_t>& sizes) override {
        publish(op_allgather, mine.data(), mine.size(), 0, /*same_bytes=*/false);
        sizes.assign(static_cast<std::size_t>(size()), 0);
        std::size_t total = 0;
        for (int r = 0; r < size(); ++r) total += sizes[static_cast<std::size_t>(r)] = slot(r).bytes;
        all.resize(total);
        std::size_t at = 0;
        for (int r = 0; r < size(); ++r) {
            if (slot(r).bytes > 0) std::memcpy(all.data() + at, slot(r).data, slot(r).bytes);
            at += slot(r).bytes;
        }
        shared_->arrive_and_wait();  // the sources stay valid until everyone has copied
    }

    void allreduce_sum(std::span<float> data) override { sum(data, op_sum_f32); }
    void allreduce_sum(std::span<double> data) override { sum(data, op_sum_f64); }
    void allreduce_sum(std::span<std::int64_t> data) override { sum(data, op_sum_i64); }

    void broadcast_bytes(std::span<std::byte> data, int root) override {
        require(root >= 0 && root < size(), "broadcast root ", root, ": must be in [0, ", size(), ")");
        publish(op_broadcast, data.data(), data.size(), root, /*same_bytes=*/true);
        if (rank_ != root && !data.empty()) std::memcpy(data.data(), slot(root).data, data.size());
        shared_->arrive_and_wait();
    }

    std::unique_ptr<Communicator> split(int color, int key) override {
        const std::int64_t mine[2] = {color, key};
        const auto all = allgather<std::int64_t>(*this, std::span<const std::int64_t>(mine, 2));
        // Members of my color ordered by (key, rank); the first one creates the group's shared state.
        std::vector<std::pair<std::int64_t, int>> members;
        for (int r = 0; r < size(); ++r) {
            const auto& theirs = all[static_cast<std::size_t>(r)];
            if (theirs[0] == color) members.emplace_back(theirs[1], r);
        }
        std::sort(members.begin(), members.end());
        if (color >= 0 && members.front().second == rank_)
            shared_->children[static_cast<std::size_t>(rank_)] = std::make_shared<detail::InProcessShared>(
                static_cast<int>(members.size()), shared_->failure);
        shared_->arrive_and_wait();
        std::unique_ptr<Communicator> out;
        if (color >= 0) {
            const int leader = members.front().second;
            const auto me =
                std::find_if(members.begin(), members.end(), [&](const auto& m) { return m.second == rank_; });
            out = std::make_unique<InProcessCommunicator>(shared_->children[static_cast<std::size_t>(leader)],
                                                          static_cast<int>(me - members.begin()));
        }
        shared_->arrive_and_wait();  // everyone holds its group before the leaders' slots are cleared
        shared_->children[static_cast<std::size_t>(rank_)].reset();
        return out;
    }

    void barrier() override {
        publish(op_barrier, nullptr, 0, 0, /*same_bytes=*/true);
        shared_->arrive_and_wait();
    }

private:
    enum Op : int { op_allgather = 1, op_sum_f32, op_sum_f64, op_sum_i64, op_broadcast, op_barrier };

    const detail::InProcessShared::Slot& slot(int r) const {
        return shared_->slots[static_cast<std::size_t>(r)];
    }

    // Writes this rank's slot, waits for all, and checks every rank called the same collective.
    void publish(int op, const void* data, std::size_t bytes, std::int64_t arg, bool same_bytes) {
        shared_->slots[static_cast<std::size_t>(rank_)] = {op, data, bytes, arg};
        shared_->arrive_and_wait();
        for (int r = 0; r < size(); ++r) {
            const auto& s = slot(r);
            if (s.op != op || s.arg != arg || (same_bytes && s.bytes != bytes)) {
                shared_->arrive_and_wait();  // all ranks see the mismatch before anyone leaves
                detail::raise<InvalidArgument>("in-process communicator: rank ", r, " called collective ", s.op,
                                               " (", s.bytes, " bytes, argument ", s.arg, "), rank ", rank_,
                                               " called ", op, " (", bytes, " bytes, argument ", arg, ")");
            }
        }
    }

    template <class T>
    void sum(std::span<T> data, int op) {
        publish(op, data.data(), data.size_bytes(), 0, /*same_bytes=*/true);
        std::vector<T> acc(data.size(), T(0));
        for (int r = 0; r < size(); ++r) {
            const T* src = static_cast<const T*>(slot(r).data);
            for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += src[i];
        }
        shared_->arrive_and_wait();  // nobody overwrites its buffer while another rank still reads it
        std::copy(acc.begin(), acc.end(), data.begin());
    }

    std::shared_ptr<detail::InProcessShared> shared_;
    int rank_;
};

/// Runs `body(Communicator&)` on `n_ranks` threads forming one in-process group and waits for all.
/// If a rank throws, the others are released from their collectives and the first exception is
/// rethrown here. For tests and for simulating a fleet in one process.
template <class F>
void run_in_process(int n_ranks, F&& body) {
    require(n_ranks >= 1, "n_ranks ", n_ranks, ": must be >= 1");
    auto failure = std::make_shared<detail::InProcessShared::Failure>();
    auto shared = std::make_shared<detail::InProcessShared>(n_ranks, failure);
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n_ranks));
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(n_ranks));
    for (int r = 0; r < n_ranks; ++r)
        threads.emplace_back([&, r] {
            try {
                InProcessCommunicator comm(shared, r);
                body(static_cast<Communicator&>(comm));
            } catch (...) {
                errors[static_cast<std::size_t>(r)] = std::current_exception();
                failure->failed.store(true);
            }
        });
    for (auto& t : threads) t.join();
    std::exception_ptr peer;
    for (auto& e : errors) {
        if (!e) continue;
        try {
            std::rethrow_exception(e);
        } catch (const detail::PeerFailed&) {
            peer = e;
        } catch (...) {
            throw;  // the original failure
        }
    }
    if (peer) std::rethrow_exception(peer);
}

}  // namespace comigs
