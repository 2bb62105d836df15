// The program every consumer project under tests/cmake/ builds: a LoRA layer's forward pass checked
// against the formula computed by hand, so that a consumer which compiles and links but gets, say, the
// wrong include directory or a missing OpenMP flag still fails at run time rather than passing silently.
#include <comigs/lora.hpp>
#include <comigs/version.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
    using namespace comigs;
    LoraConfig cfg;
    cfg.in_features = 5;
    cfg.out_features = 3;
    cfg.rank = 2;
    cfg.alpha = 4;  // s = alpha / sqrt(r)
    LoraExpert<double> lora(cfg);
    Rng rng(1);
    lora.init(rng);
    for (Index i = 0; i < cfg.out_features; ++i)  // B starts at zero; give it values so y changes
        for (Index j = 0; j < cfg.rank; ++j)
            lora.B()(i, j) = 0.1 * static_cast<double>(i + 1) - 0.3 * static_cast<double>(j);

    const Index n = 4;
    std::vector<double> x(static_cast<std::size_t>(n * cfg.in_features));
    std::vector<double> y(static_cast<std::size_t>(n * cfg.out_features), 1.0);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<double>(i));
    lora.forward(MatrixView<double>(y.data(), n, cfg.out_features),
                 ConstMatrixView<double>(x.data(), n, cfg.in_features));

    double worst = 0;
    for (Index t = 0; t < n; ++t)
        for (Index o = 0; o < cfg.out_features; ++o) {
            double expect = 1.0;  // forward accumulates into y
            for (Index r = 0; r < cfg.rank; ++r) {
                double ax = 0;
                for (Index i = 0; i < cfg.in_features; ++i)
                    ax += lora.A()(r, i) * x[static_cast<std::size_t>(t * cfg.in_features + i)];
                expect += lora.scale() * lora.B()(o, r) * ax;
            }
            worst = std::fmax(worst, std::fabs(y[static_cast<std::size_t>(t * cfg.out_features + o)] - expect));
        }
    std::printf("comigs %d.%d.%d: LoRA forward max error %.3g\n", version_major, version_minor, version_patch, worst);
    return worst < 1e-12 ? 0 : 1;
}
