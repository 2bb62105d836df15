#pragma once
// Stopping a long run cleanly: SIGINT, SIGTERM (and SIGUSR1, which mpirun forwards to every rank
// without killing the job) only raise a flag, and the run checks it at its next safe point (the end of
// a round for checkpointed round runners, run_checkpoint.hpp), saves a checkpoint and leaves by throwing
// Interrupted. A second SIGINT or SIGTERM while the flag is up ends the process at once (the default
// action), for a user who does not want to wait for the round to finish.
//
// The handler only stores to a lock-free atomic and, the second time, resets the default action and
// re-raises: both async-signal-safe. Process-wide; StopOnSignals restores the previous handlers.
#include <atomic>
#include <csignal>
#include <cstdint>
#include <string>
#include <utility>

#include "error.hpp"

namespace comigs {

namespace detail {
inline std::atomic<int>& stop_signal() noexcept {
    static std::atomic<int> sig{0};
    static_assert(std::atomic<int>::is_always_lock_free, "a signal handler may only touch lock-free atomics");
    return sig;
}

extern "C" inline void comigs_stop_handler(int sig) {
    if (stop_signal().exchange(sig) != 0 && sig != SIGUSR1) {
        std::signal(sig, SIG_DFL);
        std::raise(sig);
    }
}
}  // namespace detail

/// The signal that asked the run to stop (SIGINT, SIGTERM, SIGUSR1), or 0.
inline int stop_requested() noexcept { return detail::stop_signal().load(); }

/// Asks the run to stop at its next safe point, as a signal would (tests, GUIs, watchdogs).
inline void request_stop(int sig = SIGTERM) noexcept { detail::stop_signal().store(sig); }

/// Forgets a stop request (e.g. before a new run in the same process).
inline void clear_stop_request() noexcept { detail::stop_signal().store(0); }

/// "SIGTERM", "SIGINT", ... for messages.
inline std::string signal_name(int sig) {
    switch (sig) {
        case SIGINT: return "SIGINT";
        case SIGTERM: return "SIGTERM";
        case SIGUSR1: return "SIGUSR1";
        default: return "signal " + std::to_string(sig);
    }
}

/// While alive, SIGINT, SIGTERM and SIGUSR1 request a stop instead of ending the process.
class StopOnSignals {
public:
    StopOnSignals() {
        for (std::size_t k = 0; k < 3; ++k) previous_[k] = std::signal(signals_[k], detail::comigs_stop_handler);
    }
    ~StopOnSignals() {
        for (std::size_t k = 0; k < 3; ++k)
            if (previous_[k] != SIG_ERR) std::signal(signals_[k], previous_[k]);
    }
    StopOnSignals(const StopOnSignals&) = delete;
    StopOnSignals& operator=(const StopOnSignals&) = delete;

private:
    static constexpr int signals_[3] = {SIGINT, SIGTERM, SIGUSR1};
    using Handler = void (*)(int);
    Handler previous_[3]{};
};

/// Thrown by a run that stopped on request after saving its checkpoint.
class Interrupted : public Error {
public:
    Interrupted(int signal, std::int64_t rounds_done, std::string checkpoint)
        : Error(signal_name(signal) + ": stopped after round " + std::to_string(rounds_done) + ", checkpoint saved in " +
                checkpoint),
          signal_(signal),
          rounds_done_(rounds_done),
          checkpoint_(std::move(checkpoint)) {}
    int signal() const noexcept { return signal_; }
    std::int64_t rounds_done() const noexcept { return rounds_done_; }
    const std::string& checkpoint() const noexcept { return checkpoint_; }

private:
    int signal_;
    std::int64_t rounds_done_;
    std::string checkpoint_;
};

}  // namespace comigs
