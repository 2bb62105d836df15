#pragma once
// The golden model cases of tools/make_model_golden.py (tests/golden/models/<case>/): a loaded model's
// logits, adapted logits, losses and adapter gradients against the PyTorch reference. Shared by the
// Hugging Face folder tests and the GGUF model tests.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <comigs/io/safetensors.hpp>
#include <comigs/mixture.hpp>
#include <comigs/models.hpp>

namespace comigs::test {

inline std::filesystem::path golden_models() { return std::filesystem::path(COMIGS_GOLDEN_DIR) / "models"; }

/// The case names listed in tests/golden/models/<list> (cases.txt: the model folders; gguf_cases.txt: the
/// cases with a model.gguf).
inline std::vector<std::string> golden_model_cases(const char* list = "cases.txt") {
    std::ifstream in(golden_models() / list);
    std::vector<std::string> v;
    for (std::string line; std::getline(in, line);)
        if (!line.empty()) v.push_back(line);
    return v;
}

/// Largest |got - want| relative to the largest |want| (at least 1).
template <class Got>
double rel_err(const Got& got, const std::vector<double>& want) {
    double err = 0, mag = 1;
    for (std::size_t i = 0; i < want.size(); ++i) {
        err = std::max(err, std::abs(double(got[i]) - want[i]));
        mag = std::max(mag, std::abs(want[i]));
    }
    return err / mag;
}

/// Compares a model loaded from golden case `name` with the reference: plain logits, then with the
/// case's attention LoRA and a mixture on every MLP, logits, losses and every adapter gradient.
template <class T>
void check_golden_model(const std::string& name, comigs::models::CausalLm<T>& m, double tol) {
    namespace models = comigs::models;
    namespace io = comigs::io;
    using comigs::Index;
    CAPTURE(name);
    const std::filesystem::path dir = golden_models() / name;
    const auto inputs = io::SafetensorsFile::load(dir / "inputs.safetensors");
    const auto expected = io::SafetensorsFile::load(dir / "expected.safetensors");
    const auto meta = [&](const char* k) { return inputs.metadata().at(k); };
    const auto tokens64 = inputs.get<std::int64_t>("tokens"), targets64 = inputs.get<std::int64_t>("targets");
    const std::vector<int> tokens(tokens64.begin(), tokens64.end()), targets(targets64.begin(), targets64.end());
    const Index B = inputs.shape("tokens")[0], Tn = inputs.shape("tokens")[1];

    // The plain model: what comigs-eval --logits writes.
    m.forward(tokens, {}, B, Tn, false);
    const auto base = expected.get<double>("base.logits");
    REQUIRE(m.logits().size() == Index(base.size()));
    const double e_base = rel_err(m.logits().data, base);
    INFO("base logits rel err " << e_base);
    CHECK(e_base < tol);

    // Attention LoRA and a mixture on every MLP, values from the inputs.
    comigs::Rng rng(1);
    m.add_attention_lora({std::stol(meta("lora_rank")), std::stod(meta("lora_alpha")), comigs::LoraScaling::sqrt}, rng);
    for (const auto& p : m.attention_projections())
        for (const char* f : {"lora_A", "lora_B"}) inputs.get_into<T>(p.prefix + f, m.lora().view(p.prefix + f));
    std::vector<std::shared_ptr<comigs::MixtureOfLoraMlp<T>>> mixtures;
    const double lb_weight = std::stod(meta("lb_weight"));
    for (Index l = 0; l < m.n_layer(); ++l) {
        comigs::MixtureConfig mc;
        mc.form = m.mlp_form();
        mc.d_model = m.d_model();
        mc.d_hidden = m.mlp_hidden();
        mc.n_experts = std::stol(meta("experts"));
        mc.top_k = std::stol(meta("top_k"));
        mc.rank = std::stol(meta("mix_rank"));
        mc.alpha = std::stod(meta("mix_alpha"));
        auto mix = std::make_shared<comigs::MixtureOfLoraMlp<T>>(mc, m.frozen_mlp(l));
        const std::string prefix = m.mlp_prefix(l);
        for (const auto& spec : mix->params().layout().tensors())
            inputs.get_into<T>(prefix + spec.name, mix->params().view(spec.name));
        m.set_mlp(l, std::make_unique<models::MixtureMlp<T>>(mix, lb_weight));
        mixtures.push_back(mix);
    }
    m.zero_grad();
    for (auto& mix : mixtures) mix->zero_grad();
    // The logits from an inference forward: a training forward with targets runs the head and the loss
    // in vocabulary chunks and keeps no logits.
    m.forward(tokens, {}, B, Tn, false);
    const double e_logits = rel_err(m.logits().data, expected.get<double>("logits"));
    INFO("adapted logits rel err " << e_logits);
    CHECK(e_logits < tol);
    m.forward(tokens, targets, B, Tn, true);
    CHECK(m.logits().size() == 0);
    CHECK(double(m.last_ce_loss()) == doctest::Approx(expected.get<double>("ce")[0]).epsilon(tol));
    CHECK(double(m.last_aux_loss()) == doctest::Approx(expected.get<double>("aux")[0]).epsilon(tol));
    m.backward();
    double worst = 0;
    int compared = 0;
    for (const auto& p : m.attention_projections())
        for (const char* f : {"lora_A", "lora_B"}) {
            const auto g = m.lora_grads().span(p.prefix + f);
            worst = std::max(worst, rel_err(g, expected.get<double>(p.prefix + f + ".grad")));
            ++compared;
        }
    for (Index l = 0; l < m.n_layer(); ++l) {
        const std::string prefix = m.mlp_prefix(l);
        const auto& mix = *mixtures[static_cast<std::size_t>(l)];
        for (const auto& spec : mix.params().layout().tensors()) {
            worst = std::max(worst, rel_err(mix.grads().span(spec.name), expected.get<double>(prefix + spec.name + ".grad")));
            ++compared;
        }
    }
    INFO("gradients: worst rel err " << worst << " over " << compared << " tensors");
    MESSAGE(name << (sizeof(T) == 8 ? std::string(" (double)") : std::string(" (float)")) << ": relative errors base logits " << e_base
                 << ", adapted logits " << e_logits << ", gradients " << worst);
    CHECK(compared > 10);
    CHECK(worst < tol * 10);
}

}  // namespace comigs::test
