// One user per MPI rank: each rank holds a CoMiGS mixture (a generalist and a specialist), and every
// round averages the generalists over MPI with comigs::DistributedAggregator; the specialist and the
// router never leave the rank. Run: mpirun -np 4 ./comigs-fedavg-mpi
// The training steps are left out (see examples/toy_regression and the demo): the point is the round.
#include <comigs/comigs.hpp>
#include <comigs/distributed.hpp>
#include <comigs/mpi.hpp>

#include <cstdio>
#include <memory>
#include <span>
#include <utility>
#include <vector>

int main(int argc, char** argv) {
    comigs::MpiEnvironment mpi(argc, argv);
    comigs::MpiCommunicator world;  // a private duplicate of MPI_COMM_WORLD
    const comigs::UserId me = static_cast<comigs::UserId>(world.rank());  // one user per rank

    // This user's mixture: expert 0 the generalist, expert 1 its specialist.
    comigs::Rng base_rng(7);  // the same frozen host on every rank
    auto base = std::make_shared<comigs::FrozenMlp<float>>(comigs::MlpForm::gelu, 64, 256);
    base->randomize(base_rng);
    comigs::MixtureConfig cfg;
    cfg.d_model = 64;
    cfg.d_hidden = 256;
    comigs::MixtureOfLoraMlp<float> mlp(cfg, base);
    comigs::Rng rng(1234, me);
    mlp.init(rng);

    // Every rank makes one aggregator for the whole run: it keeps the sub-communicators between rounds.
    comigs::DistributedAggregator<float> fedavg(world, comigs::AggregationConfig::fedavg());
    for (int round = 0; round < 3; ++round) {
        // ... local training steps on this user's data ...
        comigs::UploadBuilder<float> upload(me, /*weight=*/1.0);  // copies the generalist's tensors only
        upload.add("h.0.mlp.", mlp);
        std::vector<comigs::GeneralistUpload<float>> uploads;
        uploads.push_back(std::move(upload).finish());
        const auto result = fedavg(uploads);  // collective: every rank calls it
        comigs::Downloader<float>(result.aggregate, me).add("h.0.mlp.", mlp).apply();
        if (world.rank() == 0) std::printf("round %d: %s\n", round, result.report.summary().c_str());
    }
    // Every rank now holds the same generalist, and its own specialist.
    const auto g = mlp.params().span("experts.0.fc.lora_A");
    const auto all = comigs::allgather<float>(world, std::span<const float>(g.data(), g.size()));
    for (const auto& other : all)
        if (other != all[0]) return 1;
    if (world.rank() == 0) std::printf("the generalist is identical on all %d ranks\n", world.size());
    return 0;
}
