// Stop requests (stop_request.hpp): a signal only raises the flag while StopOnSignals is alive, the
// previous handlers come back afterwards, and a second SIGINT/SIGTERM ends the process at once.
#include <comigs/stop_request.hpp>
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

using namespace comigs;

namespace {
volatile std::sig_atomic_t previous_handler_ran = 0;
extern "C" void record_signal(int) { previous_handler_ran = 1; }
}  // namespace

TEST_CASE("stop requests: signals raise the flag, handlers are restored, request_stop does the same") {
    clear_stop_request();
    auto* const before = std::signal(SIGUSR1, record_signal);
    {
        StopOnSignals guard;
        CHECK(stop_requested() == 0);
        std::raise(SIGUSR1);
        CHECK(stop_requested() == SIGUSR1);
        std::raise(SIGUSR1);  // SIGUSR1 twice is still only a request
        CHECK(stop_requested() == SIGUSR1);
        clear_stop_request();
        std::raise(SIGTERM);
        CHECK(stop_requested() == SIGTERM);
        clear_stop_request();
    }
    std::raise(SIGUSR1);
    CHECK(previous_handler_ran == 1);  // ours is gone
    CHECK(stop_requested() == 0);
    std::signal(SIGUSR1, before);

    request_stop(SIGINT);
    CHECK(stop_requested() == SIGINT);
    clear_stop_request();
    CHECK(signal_name(SIGTERM) == "SIGTERM");
    const Interrupted e(SIGTERM, 7, "ckpt/round-000007");
    CHECK(std::string(e.what()) == "SIGTERM: stopped after round 7, checkpoint saved in ckpt/round-000007");
    CHECK(e.rounds_done() == 7);
}

TEST_CASE("stop requests: a second SIGTERM ends the process at once") {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        StopOnSignals guard;
        std::raise(SIGTERM);  // a request
        if (stop_requested() != SIGTERM) ::_exit(3);
        std::raise(SIGTERM);  // the default action
        ::_exit(4);
    }
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGTERM);
}
