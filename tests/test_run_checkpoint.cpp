// Run checkpoints (io/run_checkpoint.hpp): a run stopped after any round and resumed, in one process or
// on another number of ranks, ends with every user's parameters bitwise those of a run that never
// stopped, and the caller's accounting too; damaged generations fall back to the previous one; other
// settings are refused naming the first difference.
#include <comigs/io/run_checkpoint.hpp>
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "federation_fixture.hpp"

using namespace comigs;
using comigs_test::FederationUsers;
using comigs_test::same_bits;

namespace {

struct RunDir {
    std::filesystem::path path;
    RunDir() {
        static int counter = 0;
        path = std::filesystem::temp_directory_path() /
               ("comigs-run-checkpoint-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
        std::filesystem::remove_all(path);
    }
    ~RunDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

using Fed = FederationUsers<double>;
using Runner = RoundRunner<Fed::Host, Fed::Batch>;
using DRunner = DistributedRoundRunner<Fed::Host, Fed::Batch>;

constexpr Index rounds = 5, local_steps = 3;

/// A federation of users 0..3 (ranks 2, 3, 4, 2 for the heterogeneous-rank rules) with a validation
/// perplexity for PCL.
std::unique_ptr<Fed> federation(const Strategy& s, const std::vector<Index>& ids = {0, 1, 2, 3}) {
    std::vector<Index> ranks;
    if (s.aggregation() && s.aggregation()->heterogeneous_ranks()) ranks = {2, 3, 4, 2};
    auto f = std::make_unique<Fed>(s, ids, rounds, local_steps, ranks);
    for (std::size_t i = 0; i < f->users.size(); ++i) {
        auto* host = f->hosts[i].get();
        const auto* d = f->data[i].get();
        f->users[i].validation_perplexity = [host, d] {
            comigs_test::RegressionBatch<double> b{d->n_val, d->val_x, d->val_y, comigs_test::Fault::none};
            return std::exp(host->evaluate(b).task);
        };
    }
    return f;
}

RunnerConfig config() {
    RunnerConfig rc;
    rc.rounds = rounds;
    rc.local_steps = local_steps;
    return rc;
}

/// The accounting of the tests: every round's mean loss, as a caller would keep for its results.
struct Losses {
    std::vector<double> values;
    RunnerHooks<double> hooks() {
        RunnerHooks<double> h;
        h.after_round = [this](const RoundReport& r) { values.push_back(r.mean_loss()); };
        return h;
    }
    void attach(io::RunCheckpointOptions& o) {
        o.save_accounting = [this] {
            const auto b = std::as_bytes(std::span(values));
            return std::vector<std::byte>(b.begin(), b.end());
        };
        o.load_accounting = [this](std::span<const std::byte> b) {
            values.resize(b.size() / sizeof(double));
            std::memcpy(values.data(), b.data(), b.size());
        };
    }
};

/// Every user's final parameters of an uninterrupted in-process run, and its accounting.
struct Reference {
    std::vector<std::vector<NamedTensor<double>>> params;
    std::vector<double> losses;
};

Reference reference(const Strategy& s) {
    auto f = federation(s);
    Runner runner(s, config(), f->users);
    Losses l;
    runner.run(l.hooks());
    Reference r;
    for (std::size_t i = 0; i < f->users.size(); ++i) r.params.push_back(f->params(i));
    r.losses = l.values;
    return r;
}

/// Trains every user of `f` a little so that a resume has something to overwrite.
void disturb(Fed& f) {
    for (auto& t : f.trainers) t->train_steps(2);
}

/// Runs `s` in process with checkpoints, stopping (as on SIGTERM) after `stop_after` rounds.
void run_until_stopped(const Strategy& s, const io::RunCheckpointOptions& base, Index stop_after) {
    auto f = federation(s);
    Runner runner(s, config(), f->users);
    Losses l;
    io::RunCheckpointOptions o = base;
    l.attach(o);
    auto hooks = l.hooks();
    const auto record = hooks.after_round;
    hooks.after_round = [&](const RoundReport& r) {
        record(r);
        if (r.round + 1 == stop_after) request_stop(SIGTERM);
    };
    try {
        io::run_checkpointed(runner, o, hooks);
        FAIL("the run did not stop");
    } catch (const Interrupted& e) {
        CHECK(e.signal() == SIGTERM);
        CHECK(e.rounds_done() == stop_after);
        CHECK(std::string(e.what()).find("round-00000" + std::to_string(stop_after)) != std::string::npos);
    }
    clear_stop_request();
}

/// Resumes in process from `o.dir` with freshly built (and disturbed) users; checks against `ref`.
void resume_and_check(const Strategy& s, io::RunCheckpointOptions o, const Reference& ref,
                      std::vector<std::string>* log = nullptr) {
    auto f = federation(s);
    disturb(*f);
    Runner runner(s, config(), f->users);
    Losses l;
    o.resume = true;
    l.attach(o);
    if (log) o.log = [log](const std::string& m) { log->push_back(m); };
    io::run_checkpointed(runner, o, l.hooks());
    for (std::size_t i = 0; i < f->users.size(); ++i) CHECK(same_bits(f->params(i), ref.params[i]));
    CHECK(l.values == ref.losses);
}

Strategy dp_fedavg() {
    Strategy s = strategies::fedavg();
    s.name = "dp-fedavg";
    s.collaboration = AggregationConfig::dp_fedavg(0.5, 0.3, 11);
    return s;
}

void flip_byte(const std::filesystem::path& p, std::uintmax_t from_end) {
    std::fstream io(p, std::ios::in | std::ios::out | std::ios::binary);
    const auto size = std::filesystem::file_size(p);
    io.seekg(static_cast<std::streamoff>(size - from_end));
    char c = 0;
    io.read(&c, 1);
    c = static_cast<char>(c ^ 0x20);
    io.seekp(static_cast<std::streamoff>(size - from_end));
    io.write(&c, 1);
}

}  // namespace

TEST_CASE("run checkpoints: a stopped run resumes bitwise to the uninterrupted result, for every kind of rule") {
    // CoMiGS (router on validation data), FedAvg, HetLoRA (heterogeneous ranks, norm weights), PCL
    // (personalised pending downloads), FFA-LoRA (the common A), DP-FedAvg (the server's reference
    // and per-round noise), local (nothing pending).
    for (const Strategy& s : {strategies::comigs_1g1s(), strategies::fedavg(), strategies::hetlora(), strategies::pcl(),
                              strategies::ffa_lora(), dp_fedavg(), strategies::local()}) {
        CAPTURE(s.name);
        const Reference ref = reference(s);
        for (Index stop_after : {1, 3}) {
            CAPTURE(stop_after);
            RunDir dir;
            io::RunCheckpointOptions o;
            o.dir = dir.path;
            o.every = 2;  // the stop still saves (round 1 and 3 are not multiples of 2)
            run_until_stopped(s, o, stop_after);
            CHECK(std::filesystem::exists(dir.path / ("round-00000" + std::to_string(stop_after)) / "manifest.json"));
            resume_and_check(s, o, ref);
        }
    }
}

TEST_CASE("run checkpoints: the generation holds one file per user and the server's, and the previous one is kept") {
    const Strategy s = strategies::comigs_1g1s();
    RunDir dir;
    io::RunCheckpointOptions o;
    o.dir = dir.path;
    run_until_stopped(s, o, 3);
    io::CheckpointStore store(dir.path);
    CHECK(store.rounds() == std::vector<std::int64_t>{3, 2});
    const auto g = store.verify(3);
    std::vector<std::string> names;
    for (const auto& f : g.files) names.push_back(f.name);
    CHECK(names == std::vector<std::string>{"server.safetensors", "user-100.safetensors", "user-101.safetensors",
                                            "user-102.safetensors", "user-103.safetensors"});
    const auto user = io::SafetensorsFile::load(g.path / "user-101.safetensors");
    CHECK(user.metadata().at("comigs.run.user") == "101");
    CHECK(user.metadata().at("comigs.run.pending") == "1");
    CHECK(user.contains("pending/layer0.mlp.experts.0.fc.lora_A"));
    CHECK(user.contains("param/layer0.mlp.router.weight"));
    CHECK(user.get<std::int64_t>("round", {})[0] == 3);
    // Specialists and routers are in the user's own file only, never in what it downloads.
    for (const auto& t : user.tensors())
        if (t.name.starts_with("pending/")) CHECK(t.name.find("experts.1.") == std::string::npos);
    CHECK(io::SafetensorsFile::load(g.path / "server.safetensors").get<std::int64_t>("round", {})[0] == 3);
}

TEST_CASE("run checkpoints: distributed runs resume on another number of ranks, or in one process") {
    const Strategy s = strategies::comigs_1g1s();
    const Reference ref = reference(s);
    RunDir dir;
    io::RunCheckpointOptions o;
    o.dir = dir.path;
    // Two ranks: users {0, 2} and {1, 3}; stopped after round 2.
    run_in_process(2, [&](Communicator& comm) {
        std::vector<Index> mine;
        for (Index u = comm.rank(); u < 4; u += 2) mine.push_back(u);
        auto f = federation(s, mine);
        DRunner runner(comm, s, config(), f->users);
        Losses l;
        io::RunCheckpointOptions ro = o;
        l.attach(ro);
        auto hooks = l.hooks();
        hooks.after_round = [&, record = hooks.after_round](const RoundReport& r) {
            record(r);
            if (r.round == 1 && comm.rank() == 1) request_stop(SIGINT);  // one rank's signal stops all
        };
        CHECK_THROWS_AS(io::run_checkpointed(runner, ro, hooks), Interrupted);
    });
    clear_stop_request();
    SUBCASE("three ranks") {
        std::vector<std::vector<std::vector<NamedTensor<double>>>> got(3);
        std::vector<std::vector<double>> losses(3);
        run_in_process(3, [&](Communicator& comm) {
            std::vector<Index> mine;
            for (Index u = comm.rank(); u < 4; u += 3) mine.push_back(u);
            auto f = federation(s, mine);
            disturb(*f);
            DRunner runner(comm, s, config(), f->users);
            Losses l;
            io::RunCheckpointOptions ro = o;
            ro.resume = true;
            l.attach(ro);
            io::run_checkpointed(runner, ro, l.hooks());
            for (std::size_t i = 0; i < mine.size(); ++i) got[std::size_t(comm.rank())].push_back(f->params(i));
            losses[std::size_t(comm.rank())] = l.values;
        });
        for (int r = 0; r < 3; ++r) {
            CHECK(losses[std::size_t(r)] == ref.losses);
            for (std::size_t i = 0; i < got[std::size_t(r)].size(); ++i)
                CHECK(same_bits(got[std::size_t(r)][i], ref.params[std::size_t(r) + 3 * i]));
        }
    }
    SUBCASE("one process") { resume_and_check(s, o, ref); }
}

TEST_CASE("run checkpoints: a damaged or truncated newest generation falls back to the previous one") {
    const Strategy s = strategies::fedavg();
    const Reference ref = reference(s);
    RunDir dir;
    io::RunCheckpointOptions o;
    o.dir = dir.path;
    run_until_stopped(s, o, 3);
    const auto gen3 = dir.path / "round-000003";
    SUBCASE("a flipped byte in a user's file") { flip_byte(gen3 / "user-102.safetensors", 9); }
    SUBCASE("a truncated user file") {
        std::filesystem::resize_file(gen3 / "user-100.safetensors",
                                     std::filesystem::file_size(gen3 / "user-100.safetensors") / 2);
    }
    SUBCASE("a damaged manifest") { flip_byte(gen3 / "manifest.json", 30); }
    SUBCASE("a missing server file") { std::filesystem::remove(gen3 / "server.safetensors"); }
    std::vector<std::string> log;
    resume_and_check(s, o, ref, &log);
    REQUIRE(log.size() == 2);
    CHECK(log[0].find("round-000003 is unusable") != std::string::npos);
    CHECK(log[0].find("falling back") != std::string::npos);
    CHECK(log[1].find("round-000002") != std::string::npos);
    // The resumed run wrote its own generations (round 3 replaced the damaged one) and kept the last two.
    CHECK(io::CheckpointStore(dir.path).rounds() == std::vector<std::int64_t>{5, 4});
}

TEST_CASE("run checkpoints: a save that fails half way leaves the previous generation to resume from") {
    const Strategy s = strategies::comigs_1g1s();
    const Reference ref = reference(s);
    RunDir dir;
    io::RunCheckpointOptions o;
    o.dir = dir.path;
    {
        auto f = federation(s);
        Runner runner(s, config(), f->users);
        Losses l;
        io::RunCheckpointOptions ro = o;
        l.attach(ro);
        auto hooks = l.hooks();
        std::optional<io::testing::ScopedAtomicWriteFault> fault;
        hooks.after_round = [&, record = hooks.after_round](const RoundReport& r) {
            record(r);
            if (r.round == 2) fault.emplace(io::testing::AtomicWriteFault{.crash_after_bytes = 200});
        };
        CHECK_THROWS_AS(io::run_checkpointed(runner, ro, hooks), IoError);
    }
    CHECK(std::filesystem::exists(dir.path / ".partial-round-000003"));
    io::CheckpointStore store(dir.path);
    CHECK(store.rounds() == std::vector<std::int64_t>{2, 1});
    resume_and_check(s, o, ref);
    CHECK(!std::filesystem::exists(dir.path / ".partial-round-000003"));  // removed by the next commit
}

TEST_CASE("run checkpoints: other settings are refused naming the first difference; no silent overwrite") {
    const Strategy s = strategies::comigs_1g1s();
    RunDir dir;
    io::RunCheckpointOptions o;
    o.dir = dir.path;
    o.settings = {{"seed", "3"}, {"model", "tiny"}};
    run_until_stopped(s, o, 2);
    auto f = federation(s);
    SUBCASE("the caller's settings, in their order") {
        Runner runner(s, config(), f->users);
        io::RunCheckpointOptions r = o;
        r.resume = true;
        r.settings = {{"seed", "4"}, {"model", "other"}};
        CHECK_THROWS_WITH_AS(io::run_checkpointed(runner, r),
                             doctest::Contains("'seed' is 3 in the checkpoint but 4 in this run"), InvalidArgument);
    }
    SUBCASE("the runner's: the schedule") {
        RunnerConfig rc = config();
        rc.rounds = rounds + 1;
        Runner runner(s, rc, f->users);
        io::RunCheckpointOptions r = o;
        r.resume = true;
        CHECK_THROWS_WITH_AS(io::run_checkpointed(runner, r),
                             doctest::Contains("'runner.rounds' is 5 in the checkpoint but 6 in this run"), InvalidArgument);
    }
    SUBCASE("the runner's: the users") {
        auto users = f->users;
        users.pop_back();
        Runner runner(s, config(), users);
        io::RunCheckpointOptions r = o;
        r.resume = true;
        CHECK_THROWS_WITH_AS(io::run_checkpointed(runner, r), doctest::Contains("'runner.users'"), InvalidArgument);
    }
    SUBCASE("the strategy") {
        Strategy other = s;
        other.collaboration = AggregationConfig::fedavg(Weighting::tokens);
        Runner runner(other, config(), f->users);
        io::RunCheckpointOptions r = o;
        r.resume = true;
        CHECK_THROWS_WITH_AS(io::run_checkpointed(runner, r), doctest::Contains("'runner.strategy'"), InvalidArgument);
    }
    SUBCASE("without resume, a folder holding a run is not overwritten") {
        Runner runner(s, config(), f->users);
        CHECK_THROWS_WITH_AS(io::run_checkpointed(runner, o), doctest::Contains("holds a checkpoint"), InvalidArgument);
        CHECK(io::CheckpointStore(dir.path).rounds() == std::vector<std::int64_t>{2, 1});
    }
    SUBCASE("resume with nothing saved yet starts at round 0") {
        RunDir empty;
        Runner runner(s, config(), f->users);
        io::RunCheckpointOptions r;
        r.dir = empty.path;
        r.resume = true;
        std::vector<std::string> log;
        r.log = [&](const std::string& m) { log.push_back(m); };
        CHECK(io::run_checkpointed(runner, r).size() == std::size_t(rounds));
        REQUIRE(log.size() == 1);
        CHECK(log[0].find("starting at round 0") != std::string::npos);
    }
    SUBCASE("bad options") {
        Runner runner(s, config(), f->users);
        io::RunCheckpointOptions r = o;
        r.every = 0;
        CHECK_THROWS_WITH_AS(io::run_checkpointed(runner, r), doctest::Contains("every 0"), InvalidArgument);
    }
}
