#include <comigs/comigs.hpp>

#include <cstdio>
#include <memory>
#include <vector>

int main() {
    using namespace comigs;
    const Index d = 64, hidden = 256, tokens = 8;
    Rng rng(7);

    // The host's frozen MLP, held once and shared by every expert (and every user of the same host).
    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, d, hidden);
    base->randomize(rng);  // or copy the host's weights into base->weights().view("fc.weight") etc.

    // One generalist (expert 0) and one specialist, rank-8 LoRA on both linears, top-2 routing.
    MixtureConfig cfg;
    cfg.d_model = d;
    cfg.d_hidden = hidden;
    cfg.n_experts = 2;
    cfg.top_k = 2;
    cfg.rank = 8;
    cfg.alpha = 16;  // scale alpha / sqrt(r), as CoMiGS (LoraScaling::linear for alpha / r)
    MixtureOfLoraMlp<float> mlp(cfg, base);
    mlp.init(rng);

    std::vector<float> x(tokens * d, 0.5f), y(tokens * d), dy(tokens * d, 1.0f), dx(tokens * d, 0.0f);
    const double balance = mlp.forward(MatrixView<float>(y.data(), tokens, d),
                                       ConstMatrixView<float>(x.data(), tokens, d), /*training=*/true);
    mlp.zero_grad();
    mlp.backward(MatrixView<float>(dx.data(), tokens, d), ConstMatrixView<float>(dy.data(), tokens, d),
                 /*lb_grad=*/0.01f);

    // Every trainable tensor is a named view into one buffer: generalists travel, specialists stay.
    for (const auto& name : mlp.expert_tensors(0))
        std::printf("%-26s %s\n", name.c_str(), to_string(mlp.role(0)));
    std::printf("balance loss %.3f, token 0 -> expert %d\n", balance, mlp.routing().expert_of(0, 0));
}
