#pragma once
// MPI transport for distributed rounds: link comigs::mpi (built when Open MPI is installed:
// apt-get install libopenmpi-dev openmpi-bin). Only the main thread calls MPI; OpenMP threads inside
// the layers never do, so MPI_THREAD_FUNNELED is enough.
#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "communicator.hpp"
#include "error.hpp"

namespace comigs {

namespace detail {
inline void mpi_check(int code, const char* what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    raise<Error>(what, " failed: ", std::string(text, static_cast<std::size_t>(len)));
}

inline int mpi_count(std::size_t n, const char* what) {
    require<ShapeError>(n <= static_cast<std::size_t>(INT_MAX), what, ": ", n,
                        " elements exceed MPI's int count limit");
    return static_cast<int>(n);
}
}  // namespace detail

/// Initialises MPI (MPI_THREAD_FUNNELED) unless it already is, and finalises it on destruction if it
/// initialised it. Create one in main() before any MpiCommunicator, and let the communicators die first.
class MpiEnvironment {
public:
    MpiEnvironment(int& argc, char**& argv) {
        int initialized = 0;
        MPI_Initialized(&initialized);
        if (initialized) return;
        int provided = 0;
        detail::mpi_check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
        owned_ = true;
    }
    MpiEnvironment(const MpiEnvironment&) = delete;
    MpiEnvironment& operator=(const MpiEnvironment&) = delete;
    ~MpiEnvironment() {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (owned_ && !finalized) MPI_Finalize();
    }

private:
    bool owned_ = false;
};

/// A Communicator over an MPI communicator. The constructor duplicates `comm` (collective over it), so
/// comigs' messages never mix with the application's and errors come back as exceptions
/// (MPI_ERRORS_RETURN on the duplicate) instead of aborting; the duplicate is freed on destruction,
/// which must happen before MPI_Finalize.
class MpiCommunicator final : public Communicator {
public:
    explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) {
        detail::mpi_check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
        init();
    }
    MpiCommunicator(const MpiCommunicator&) = delete;
    MpiCommunicator& operator=(const MpiCommunicator&) = delete;
    ~MpiCommunicator() override {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
    }

    /// The duplicated communicator (for the application's own collectives alongside comigs').
    MPI_Comm native() const { return comm_; }

    int rank() const override { return rank_; }
    int size() const override { return size_; }

    void allgather_bytes(std::span<const std::byte> mine, std::vector<std::byte>& all,
                         std::vector<std::size_t>& sizes) override {
        const std::uint64_t n = mine.size();
        std::vector<std::uint64_t> counts(static_cast<std::size_t>(size_));
        detail::mpi_check(MPI_Allgather(&n, 1, MPI_UINT64_T, counts.data(), 1, MPI_UINT64_T, comm_),
                          "MPI_Allgather (sizes)");
        std::vector<int> icounts(counts.size()), displs(counts.size());
        std::size_t total = 0;
        for (std::size_t r = 0; r < counts.size(); ++r) {
            displs[r] = detail::mpi_count(total, "allgather displacement");
            icounts[r] = detail::mpi_count(static_cast<std::size_t>(counts[r]), "allgather bytes");
            total += static_cast<std::size_t>(counts[r]);
        }
        detail::mpi_count(total, "allgather total bytes");
        sizes.assign(counts.begin(), counts.end());
        all.resize(total);
        // MPI may read from a null pointer of count 0 on some implementations: pass a valid address.
        std::byte dummy{};
        const void* send = mine.empty() ? &dummy : mine.data();
        void* recv = all.empty() ? &dummy : all.data();
        detail::mpi_check(MPI_Allgatherv(send, icounts[static_cast<std::size_t>(rank_)], MPI_BYTE, recv,
                                         icounts.data(), displs.data(), MPI_BYTE, comm_),
                          "MPI_Allgatherv");
    }

    void allreduce_sum(std::span<float> data) override { sum(data.data(), data.size(), MPI_FLOAT); }
    void allreduce_sum(std::span<double> data) override { sum(data.data(), data.size(), MPI_DOUBLE); }
    void allreduce_sum(std::span<std::int64_t> data) override { sum(data.data(), data.size(), MPI_INT64_T); }

    void broadcast_bytes(std::span<std::byte> data, int root) override {
        require(root >= 0 && root < size_, "broadcast root ", root, ": must be in [0, ", size_, ")");
        if (data.empty()) return;
        detail::mpi_check(MPI_Bcast(data.data(), detail::mpi_count(data.size(), "broadcast bytes"), MPI_BYTE,
                                    root, comm_),
                          "MPI_Bcast");
    }

    std::unique_ptr<Communicator> split(int color, int key) override {
        MPI_Comm sub = MPI_COMM_NULL;
        detail::mpi_check(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub), "MPI_Comm_split");
        if (sub == MPI_COMM_NULL) return nullptr;
        return std::unique_ptr<Communicator>(new MpiCommunicator(sub, adopt_tag{}));
    }

    void barrier() override { detail::mpi_check(MPI_Barrier(comm_), "MPI_Barrier"); }

private:
    struct adopt_tag {};
    MpiCommunicator(MPI_Comm owned, adopt_tag) : comm_(owned) { init(); }

    void init() {
        detail::mpi_check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
        detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
        detail::mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    }

    void sum(void* data, std::size_t n, MPI_Datatype type) {
        if (n == 0) return;
        detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, data, detail::mpi_count(n, "allreduce elements"), type,
                                        MPI_SUM, comm_),
                          "MPI_Allreduce");
    }

    MPI_Comm comm_ = MPI_COMM_NULL;
    int rank_ = 0;
    int size_ = 1;
};

}  // namespace comigs
