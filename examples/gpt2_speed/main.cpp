// Forward+backward throughput of the host model in tokens per second. Not a test: run it by hand,
//   gpt2-speed [d_model] [n_layer] [T] [B] [steps]   (defaults 128 2 64 32 20)
// with OMP_NUM_THREADS set to the thread count to report. Besides wall-clock time it prints the
// process CPU time per step: on a machine shared with other jobs, wall clock overstates the cost.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

#include <comigs/models.hpp>

namespace {
double cpu_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
double wall_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

int main(int argc, char** argv) {
    namespace tg = comigs::models;
    const auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
    tg::Gpt2Config c;
    c.d_model = arg(1, 128);
    c.n_layer = arg(2, 2);
    c.n_ctx = arg(3, 64);
    c.n_head = 4;
    const comigs::Index B = arg(4, 32), T = c.n_ctx;
    const int steps = static_cast<int>(arg(5, 20));

    comigs::Rng rng(1);
    tg::Gpt2<float> model(c);
    model.init_weights(rng);
    std::vector<int> x(static_cast<std::size_t>(B * T)), y(x.size());
    for (auto& v : x) v = static_cast<int>(rng.below(256));
    for (auto& v : y) v = static_cast<int>(rng.below(256));

    const auto run = [&](const char* what) {
        double fwd = 0, wall = 0, cpu = 0;
        for (int s = -2; s < steps; ++s) {  // two warm-up steps
            const double w0 = wall_seconds(), c0 = cpu_seconds();
            model.zero_grad();
            model.forward(x, y, B, T);
            const double w1 = wall_seconds();
            model.backward();
            if (s < 0) continue;
            fwd += w1 - w0;
            wall += wall_seconds() - w0;
            cpu += cpu_seconds() - c0;
        }
        const double tokens = double(B * T) * steps;
        std::printf("%-24s wall %7.2f ms/step (forward %6.2f)  %8.0f tokens/s | CPU %7.2f ms/step  %8.0f tokens/CPU-s\n",
                    what, 1e3 * wall / steps, 1e3 * fwd / steps, tokens / wall, 1e3 * cpu / steps, tokens / cpu);
    };
    std::printf("d=%ld layers=%ld heads=%ld T=%ld B=%ld, float, %d OpenMP threads\n", long(c.d_model),
                long(c.n_layer), long(c.n_head), long(T), long(B), omp_get_max_threads());
    run("full-parameter:");
    model.add_attention_lora({8, 16.0, comigs::LoraScaling::sqrt}, rng);
    model.set_train_mode(tg::TrainMode::frozen_base);
    run("frozen base + LoRA r=8:");
}
