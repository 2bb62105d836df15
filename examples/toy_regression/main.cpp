// comigs-toy: the smallest end-to-end use of a mixture layer. A frozen random MLP is the "host";
// the targets are what two different LoRA-sized changes of it produce on two kinds of input, so one
// generalist plus one specialist can fit them. Plain SGD on sum((y - target)^2) / N; the loss falls.
#include <comigs/comigs.hpp>

#include <cstdio>
#include <memory>
#include <vector>

int main() {
    using namespace comigs;
    const Index d = 32, h = 128, n = 256;
    Rng rng(2024);

    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, d, h);
    base->randomize(rng, 0.2);

    MixtureConfig cfg;
    cfg.d_model = d;
    cfg.d_hidden = h;
    cfg.n_experts = 2;  // expert 0: generalist, expert 1: specialist
    cfg.top_k = 2;
    cfg.rank = 4;
    MixtureOfLoraMlp<float> layer(cfg, base);
    layer.init(rng);

    // Teacher: the same frozen MLP plus a random rank-4 change whose sign depends on the input's kind.
    MixtureOfLoraMlp<float> teacher(cfg, base);
    teacher.init(rng);
    for (const auto& spec : teacher.params().layout().tensors())
        if (spec.name.ends_with("lora_B") || spec.name == "router.weight")
            for (float& v : teacher.params().span(spec.name))
                v = static_cast<float>(rng.normal(0.0, spec.name == "router.weight" ? 1.0 : 0.05));
    std::vector<float> x(static_cast<std::size_t>(n * d)), target(x.size());
    for (Index t = 0; t < n; ++t)
        for (Index c = 0; c < d; ++c)
            x[static_cast<std::size_t>(t * d + c)] = static_cast<float>(rng.normal((t % 2 ? 1.0 : -1.0) * 0.5, 1.0));
    teacher.forward(MatrixView<float>(target.data(), n, d), ConstMatrixView<float>(x.data(), n, d));

    std::vector<float> y(x.size()), dy(x.size());
    const float lr = 0.002f, lb_weight = 0.01f;
    for (int step = 0; step <= 300; ++step) {
        const double lb = layer.forward(MatrixView<float>(y.data(), n, d), ConstMatrixView<float>(x.data(), n, d), true);
        double mse = 0.0;
        for (std::size_t i = 0; i < y.size(); ++i) {
            const float r = y[i] - target[i];
            mse += static_cast<double>(r) * r;
            dy[i] = 2.0f * r / static_cast<float>(n);
        }
        mse /= static_cast<double>(n);
        layer.zero_grad();
        layer.backward(MatrixView<float>(), ConstMatrixView<float>(dy.data(), n, d), lb_weight);
        auto p = layer.params().all();
        auto g = layer.grads().all();
        for (std::size_t i = 0; i < p.size(); ++i) p[i] -= lr * g[i];
        if (step % 30 == 0) {
            RoutingStats stats;
            stats.add(layer.routing());
            std::printf("step %3d  loss %.5f  balance %.3f  generalist share %.2f\n", step, mse, lb, stats.share(0));
        }
    }
    return 0;
}
