#include <comigs/model.hpp>
#include <doctest/doctest.h>

#include <memory>

TEST_CASE("AdapterRegistry: visits every adapter buffer and zeroes every gradient") {
    using namespace comigs;
    auto base = std::make_shared<FrozenMlp<float>>(MlpForm::gelu, 4, 8);
    MixtureConfig cfg;
    cfg.d_model = 4;
    cfg.d_hidden = 8;
    cfg.rank = 2;
    MixtureOfLoraMlp<float> m0(cfg, base), m1(cfg, base);
    LoraExpert<float> attn(LoraConfig{4, 12, 2});
    AdapterRegistry<float> reg;
    reg.mixtures = {{"h.0.mlp.", &m0}, {"h.1.mlp.", &m1}};
    reg.shared_adapters = {{"h.0.attn.c_attn.", &attn}};
    for (auto* g : {&m0.grads(), &m1.grads(), &attn.grads()})
        for (float& v : g->all()) v = 1.0f;
    std::vector<std::string> seen;
    reg.for_each_buffer([&](const std::string& prefix, ParamBuffer<float>& p, ParamBuffer<float>& g) {
        seen.push_back(prefix);
        CHECK(p.layout() == g.layout());
    });
    CHECK(seen == std::vector<std::string>{"h.0.mlp.", "h.1.mlp.", "h.0.attn.c_attn."});
    reg.zero_grad();
    for (auto* g : {&m0.grads(), &m1.grads(), &attn.grads()})
        for (float v : g->all()) CHECK(v == 0.0f);
    LossParts lp{2.0, 1.5, 10};
    CHECK(lp.total(0.01) == doctest::Approx(2.015));
}
