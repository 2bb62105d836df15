// The program of the comigs::mpi consumer: every rank trains nothing but holds a LoRA adapter whose
// A depends on its rank; one sum over the communicator must give every rank the same averaged A.
#include <comigs/lora.hpp>
#include <comigs/mpi.hpp>

#include <cmath>
#include <cstdio>

int main(int argc, char** argv) {
    using namespace comigs;
    MpiEnvironment env(argc, argv);
    int failed = 0;
    {
        MpiCommunicator comm;
        LoraConfig cfg;
        cfg.in_features = 6;
        cfg.out_features = 4;
        cfg.rank = 2;
        LoraExpert<double> lora(cfg);
        for (Index i = 0; i < cfg.rank; ++i)
            for (Index j = 0; j < cfg.in_features; ++j) lora.A()(i, j) = comm.rank() + 0.5 * static_cast<double>(j);
        auto a = lora.params().span("lora_A");
        comm.allreduce_sum(a);
        const double n = comm.size();
        for (Index i = 0; i < cfg.rank; ++i)
            for (Index j = 0; j < cfg.in_features; ++j) {
                const double mean = lora.A()(i, j) / n, expect = (n - 1) / 2 + 0.5 * static_cast<double>(j);
                if (std::fabs(mean - expect) > 1e-12) failed = 1;
            }
        if (comm.rank() == 0) std::printf("comigs::mpi on %d ranks: %s\n", comm.size(), failed ? "FAILED" : "ok");
    }
    return failed;
}
