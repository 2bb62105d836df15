#include <comigs/train.hpp>
#include <doctest/doctest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tiny_host.hpp"

using namespace comigs;
using comigs_test::Fault;
using comigs_test::RegressionBatch;
using comigs_test::TinyHost;
using comigs_test::TinyHostConfig;
using comigs_test::UserData;

namespace {

constexpr Index kBatch = 8;

template <class T>
struct Fixture {
    TinyHostConfig cfg;
    std::shared_ptr<const FrozenMlp<T>> base;
    UserData<T> data;
    explicit Fixture(TinyHostConfig c = {}) : cfg(c), base(comigs_test::make_base<T>(c, 7)) {
        data = UserData<T>::make(c.d, 0, 11, 64, 32, 32);
    }
    std::unique_ptr<TinyHost<T>> host(std::uint64_t init_seed = 5) const {
        Rng rng(init_seed);
        return std::make_unique<TinyHost<T>>(cfg, base, rng);
    }
    std::function<RegressionBatch<T>(Rng&)> train(Fault f = Fault::none) const {
        return [this, f](Rng& r) {
            auto b = data.train_batch(kBatch, r);
            b.fault = f;
            return b;
        };
    }
    std::function<RegressionBatch<T>(Rng&)> val(Fault f = Fault::none) const {
        return [this, f](Rng& r) {
            auto b = data.val_batch(kBatch, r);
            b.fault = f;
            return b;
        };
    }
};

template <class T>
bool same_params(const AdapterRegistry<T>& a, const AdapterRegistry<T>& b) {
    const auto pa = adapter_parameters(a), pb = adapter_parameters(b);
    if (pa.size() != pb.size()) return false;
    for (std::size_t i = 0; i < pa.size(); ++i) {
        if (pa[i].name != pb[i].name || pa[i].data.size() != pb[i].data.size()) return false;
        if (std::memcmp(pa[i].data.data(), pb[i].data.data(), pa[i].data.size() * sizeof(T)) != 0) return false;
    }
    return true;
}

template <class T>
bool same_state(const TrainerState<T>& a, const TrainerState<T>& b) {
    if (a.tensors.size() != b.tensors.size() || a.scalars.size() != b.scalars.size()) return false;
    for (std::size_t i = 0; i < a.tensors.size(); ++i)
        if (a.tensors[i].name != b.tensors[i].name ||
            std::memcmp(a.tensors[i].data.data(), b.tensors[i].data.data(), a.tensors[i].data.size() * sizeof(T)) != 0)
            return false;
    for (std::size_t i = 0; i < a.scalars.size(); ++i)
        if (a.scalars[i].name != b.scalars[i].name || a.scalars[i].value != b.scalars[i].value) return false;
    return a.train_rng == b.train_rng && a.validation_rng == b.validation_rng;
}

TrainerConfig small_config() {
    TrainerConfig c;
    c.router_every = 3;
    c.router_iters = 2;
    c.total_expert_steps = 12;
    c.expert_lr = 1e-2;
    c.expert_lr_min = 1e-3;
    c.router_lr = 1e-2;
    return c;
}

template <class T>
std::vector<std::string> names_where(const ParamBuffer<T>& p, bool router) {
    std::vector<std::string> out;
    for (const auto& s : p.layout().tensors())
        if ((s.name == "router.weight") == router) out.push_back(s.name);
    return out;
}

}  // namespace

TEST_CASE_TEMPLATE("Trainer: the alternating schedule equals a hand-written loop of the same steps, bitwise", T, float,
                   double) {
    Fixture<T> fx;
    TrainerConfig cfg = small_config();
    Index micro = 1, steps = 12;
    SUBCASE("short schedule: router every 3 expert steps for 2 iterations") {}
    SUBCASE("the reference's numbers: router every 30 expert steps for 10 iterations") {
        cfg.router_every = 30;
        cfg.router_iters = 10;
        steps = 65;
        cfg.total_expert_steps = steps;
    }
    SUBCASE("router phases before the expert steps (at steps 0, 3, 6, ...)") { cfg.router_phase = RouterPhase::before; }
    SUBCASE("with clipping") { cfg.clip_norm = 0.05; }
    SUBCASE("with two micro-batches") { micro = 2; }
    cfg.micro_batches = micro;

    auto a = fx.host();
    Trainer<TinyHost<T>, RegressionBatch<T>> trainer(*a, cfg, fx.train(), fx.val(), 42);
    // Two calls, as two rounds: the router counter runs on across them.
    trainer.train_steps(steps / 2);
    trainer.train_steps(steps - steps / 2);
    CHECK(trainer.expert_steps() == steps);
    const bool before = cfg.router_phase == RouterPhase::before;
    const Index phases = before ? (steps + cfg.router_every - 1) / cfg.router_every : steps / cfg.router_every;
    CHECK(trainer.router_steps() == phases * cfg.router_iters);

    // The same steps written out: two AdamW optimisers, all gradients zeroed before each step.
    auto b = fx.host();
    auto& mix = b->mixture();
    auto& head = *b->head();
    AdamW<T> experts({AdamWGroup<T>{"experts",
                                    {bind("layer0.mlp", mix.params(), mix.grads(),
                                          TensorSelector::names(names_where(mix.params(), false))),
                                     bind("head", head.params(), head.grads(), TensorSelector::names({"lora_A", "lora_B"}))},
                                    LrSchedule::cosine(1e-2, 1e-3, steps),
                                    AdamWOptions{0.9, 0.95, 1e-8, 0.01}}});
    AdamW<T> router({AdamWGroup<T>{"router",
                                   {bind("layer0.mlp", mix.params(), mix.grads(), TensorSelector::names({"router.weight"}))},
                                   LrSchedule::constant(1e-2),
                                   AdamWOptions{0.9, 0.95, 1e-8, 0.01}}});
    Rng train_rng(42, 0), val_rng(42, 1);
    auto zero_all = [&] {
        mix.grads().zero();
        head.grads().zero();
    };
    auto grads_of = [&](auto draw, Rng& rng) {
        zero_all();
        double loss = 0;
        for (Index m = 0; m < micro; ++m) loss += b->forward_backward(draw(rng)).total(0.01);
        if (micro > 1)
            for (auto* g : {&mix.grads(), &head.grads()})
                for (T& v : g->all()) v *= static_cast<T>(1.0 / static_cast<double>(micro));
        return loss / static_cast<double>(micro);
    };
    auto router_phase = [&] {
        for (Index i = 0; i < cfg.router_iters; ++i) {
            const double vloss = grads_of([&](Rng& r) { return fx.data.val_batch(kBatch, r); }, val_rng);
            if (cfg.clip_norm > 0) router.clip_grad_norm(cfg.clip_norm);
            router.step(vloss);
        }
    };
    for (Index step = 1; step <= steps; ++step) {
        if (before && (step - 1) % cfg.router_every == 0) router_phase();
        const double loss = grads_of([&](Rng& r) { return fx.data.train_batch(kBatch, r); }, train_rng);
        if (cfg.clip_norm > 0) experts.clip_grad_norm(cfg.clip_norm);
        experts.step(loss);
        if (!before && step % cfg.router_every == 0) router_phase();
    }
    CHECK(experts.steps_taken() == steps);
    CHECK(router.steps_taken() == trainer.router_steps());
    CHECK(router.steps_taken() > 0);
    CHECK(same_params(a->adapters(), b->adapters()));
    // Both moved away from the initial parameters (the comparison is not between two untouched models).
    auto c = fx.host();
    CHECK_FALSE(same_params(a->adapters(), c->adapters()));
    CHECK(std::memcmp(a->mixture().params().span("router.weight").data(),
                      c->mixture().params().span("router.weight").data(), sizeof(T) * 8) != 0);
}

TEST_CASE_TEMPLATE("Trainer: specialist_lr_scale steps specialists at the scaled rate, nothing else", T, float, double) {
    // After one AdamW step every update is lr * (g / (|g| + eps) + weight_decay * p): halving the
    // specialists' rate halves their updates and leaves the generalist's, the head's and the router's as
    // they were (same init, same batch, so the same gradients).
    Fixture<T> fx;
    TrainerConfig cfg = small_config();
    cfg.router_iters = 0;
    auto before = fx.host();
    auto one_step = [&](double scale) {
        cfg.specialist_lr_scale = scale;
        auto h = fx.host();
        Trainer<TinyHost<T>, RegressionBatch<T>> trainer(*h, cfg, fx.train(), fx.val(), 42);
        trainer.expert_step();
        return adapter_parameters(h->adapters());
    };
    const auto p0 = adapter_parameters(before->adapters()), full = one_step(1.0), half = one_step(0.5);
    REQUIRE(p0.size() == full.size());
    int specialist_tensors = 0, other_tensors = 0;
    for (std::size_t i = 0; i < p0.size(); ++i) {
        CAPTURE(p0[i].name);
        const bool specialist = p0[i].name.find("experts.1.") != std::string::npos;
        specialist ? ++specialist_tensors : ++other_tensors;
        double moved = 0;
        for (std::size_t k = 0; k < p0[i].data.size(); ++k) {
            const double d_full = double(full[i].data[k]) - double(p0[i].data[k]);
            const double d_half = double(half[i].data[k]) - double(p0[i].data[k]);
            moved += std::abs(d_full);
            if (specialist) CHECK(d_half == doctest::Approx(0.5 * d_full).epsilon(1e-3).scale(1e-6));
            else CHECK(half[i].data[k] == full[i].data[k]);
        }
        if (p0[i].name.find("lora_B") != std::string::npos || p0[i].name.find("lora_A") != std::string::npos)
            CHECK(moved > 0);  // the comparison is between tensors that did move
    }
    CHECK(specialist_tensors == 4);  // fc and proj, A and B
    CHECK(other_tensors > 4);
    cfg.specialist_lr_scale = 0;
    CHECK_THROWS_AS(cfg.validate(), InvalidArgument);
}

TEST_CASE_TEMPLATE("Trainer: gradients of one optimiser never reach the other's step", T, float, double) {
    Fixture<T> fx;
    const TrainerConfig cfg = small_config();
    auto clean = fx.host();
    Trainer<TinyHost<T>, RegressionBatch<T>> ref(*clean, cfg, fx.train(), fx.val(), 3);
    ref.train_steps(12);
    REQUIRE(ref.skipped() == 0);

    SUBCASE("validation batches poison the expert gradients: expert steps are unaffected") {
        for (Fault f : {Fault::nan_expert_grads, Fault::huge_expert_grads}) {
            auto h = fx.host();
            Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, fx.train(), fx.val(f), 3);
            t.train_steps(3);
            t.train_steps(9);
            CHECK(t.skipped() == 0);
            CHECK(same_params(h->adapters(), clean->adapters()));

            // Router steps move the router and nothing else.
            auto u = fx.host();
            Trainer<TinyHost<T>, RegressionBatch<T>> v(*u, cfg, fx.train(), fx.val(f), 3);
            v.train_steps(2);
            const auto not_router = [](std::string_view, std::string_view n) { return n != "router.weight"; };
            const auto experts_before = adapter_parameters<T>(u->adapters(), not_router);
            const auto router_before = adapter_parameters<T>(u->adapters(), [](auto, auto n) { return n == "router.weight"; });
            for (int i = 0; i < 3; ++i) CHECK(v.router_step().status == StepStatus::stepped);
            CHECK(experts_before == adapter_parameters<T>(u->adapters(), not_router));
            CHECK_FALSE(router_before == adapter_parameters<T>(u->adapters(), [](auto, auto n) { return n == "router.weight"; }));
        }
    }
    SUBCASE("training batches poison the router gradients: router steps are unaffected") {
        for (Fault f : {Fault::nan_router_grads, Fault::huge_router_grads}) {
            auto h = fx.host();
            Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, fx.train(f), fx.val(), 3);
            t.train_steps(12);
            CHECK(t.skipped() == 0);
            CHECK(same_params(h->adapters(), clean->adapters()));
        }
    }
    SUBCASE("the test can fail: the reference's zeroing (own gradients only) lets them leak") {
        auto h = fx.host();
        auto& mix = h->mixture();
        auto& head = *h->head();
        AdamW<T> experts({AdamWGroup<T>{"experts",
                                        {bind("layer0.mlp", mix.params(), mix.grads(),
                                              TensorSelector::names(names_where(mix.params(), false))),
                                         bind("head", head.params(), head.grads())},
                                        LrSchedule::cosine(1e-2, 1e-3, 12),
                                        AdamWOptions{0.9, 0.95, 1e-8, 0.01}}});
        AdamW<T> router({AdamWGroup<T>{"router",
                                       {bind("layer0.mlp", mix.params(), mix.grads(),
                                             TensorSelector::names({"router.weight"}))},
                                       LrSchedule::constant(1e-2),
                                       AdamWOptions{0.9, 0.95, 1e-8, 0.01}}});
        Rng tr(3, 0), va(3, 1);
        mix.grads().zero();
        head.grads().zero();
        for (Index step = 1; step <= 12; ++step) {
            auto tb = fx.data.train_batch(kBatch, tr);
            experts.step(h->forward_backward(tb).total(0.01));
            experts.zero_grad();
            if (step % 3 == 0)
                for (int i = 0; i < 2; ++i) {
                    auto vb = fx.data.val_batch(kBatch, va);
                    vb.fault = Fault::huge_expert_grads;
                    router.step(h->forward_backward(vb).total(0.01));
                    router.zero_grad();
                }
        }
        CHECK_FALSE(same_params(h->adapters(), clean->adapters()));
    }
}

TEST_CASE_TEMPLATE("Trainer: a non-finite loss or gradient skips the step, counted, parameters and moments untouched", T,
                   float, double) {
    Fixture<T> fx;
    TrainerConfig cfg = small_config();
    auto h = fx.host();
    Fault fault = Fault::none;
    auto train = [&](Rng& r) {
        auto b = fx.data.train_batch(kBatch, r);
        b.fault = fault;
        return b;
    };
    Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, train, fx.val(), 9);
    t.train_steps(6);  // the faulty steps 7 and 8 are not followed by a router phase (after 9)
    for (Fault f : {Fault::nan_loss, Fault::nan_expert_grads}) {
        CAPTURE(static_cast<int>(f));
        const auto params = adapter_parameters(h->adapters());
        const auto state = t.state();
        const Index skipped = t.expert_skipped();
        fault = f;
        const StepReport r = t.expert_step();
        fault = Fault::none;
        CHECK(r.status == StepStatus::skipped);
        CHECK(t.expert_skipped() == skipped + 1);
        const auto after = adapter_parameters(h->adapters());
        for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i].data == after[i].data);
        const auto s2 = t.state();
        for (std::size_t i = 0; i < state.tensors.size(); ++i) CHECK(state.tensors[i].data == s2.tensors[i].data);
    }
    // The schedule counts the skipped steps (it follows the data, not the fault history).
    CHECK(t.expert_steps() == 8);
    CHECK(t.expert_optimizer().iteration() == 8);
    CHECK(t.expert_optimizer().steps_taken() == 6);
    const StepReport ok = t.expert_step();
    CHECK(ok.status == StepStatus::stepped);

    SUBCASE("too many in a row is an error") {
        cfg.optimizer.max_consecutive_skips = 2;
        auto h2 = fx.host();
        Trainer<TinyHost<T>, RegressionBatch<T>> bad(*h2, cfg, fx.train(Fault::nan_loss), fx.val(), 9);
        bad.expert_step();
        bad.expert_step();
        CHECK_THROWS_AS(bad.expert_step(), NumericError);
    }
}

TEST_CASE_TEMPLATE("Trainer: resuming from saved state equals an uninterrupted run, bitwise", T, float, double) {
    Fixture<T> fx;
    TrainerConfig cfg = small_config();
    cfg.total_expert_steps = 14;
    auto full = fx.host();
    Trainer<TinyHost<T>, RegressionBatch<T>> uninterrupted(*full, cfg, fx.train(), fx.val(), 21);
    uninterrupted.train_steps(7);
    uninterrupted.train_steps(7);

    auto first = fx.host();
    Trainer<TinyHost<T>, RegressionBatch<T>> part1(*first, cfg, fx.train(), fx.val(), 21);
    part1.train_steps(7);  // stops between router phases (after 6, before 9)
    const auto params = adapter_parameters(first->adapters());
    const TrainerState<T> state = part1.state();

    // A fresh process: a host initialised differently and a trainer with another seed; restoring
    // overwrites all of it.
    auto second = fx.host(99);
    Trainer<TinyHost<T>, RegressionBatch<T>> part2(*second, cfg, fx.train(), fx.val(), 1234);
    load_adapter_parameters<T>(second->adapters(), params);
    part2.load_state(state);
    CHECK(same_state(part2.state(), state));
    part2.train_steps(7);
    CHECK(part2.expert_steps() == 14);
    CHECK(part2.router_steps() == uninterrupted.router_steps());
    CHECK(same_params(second->adapters(), full->adapters()));
    CHECK(same_state(part2.state(), uninterrupted.state()));

    SUBCASE("a state that does not fit is rejected and changes nothing") {
        TrainerState<T> broken = state;
        broken.tensors.back().data.pop_back();
        const auto before = part2.state();
        CHECK_THROWS_AS(part2.load_state(broken), ShapeError);
        CHECK(same_state(part2.state(), before));
        TrainerState<T> extra = state;
        extra.scalars.push_back({"trainer.unknown", 1});
        CHECK_THROWS_AS(part2.load_state(extra), ShapeError);
        TrainerState<T> bad_router = state;
        for (auto& t : bad_router.tensors)
            if (t.name.starts_with("router_optimizer.") && t.name.ends_with("exp_avg_sq")) t.data[0] = T(-1);
        CHECK_THROWS_AS(part2.load_state(bad_router), NumericError);
        CHECK(same_state(part2.state(), before));  // the expert optimiser's half-applied load was undone
    }
}

TEST_CASE_TEMPLATE("Trainer: joint and router-free training", T, float, double) {
    Fixture<T> fx;
    TrainerConfig cfg = small_config();
    auto router_of = [](TinyHost<T>& h) {
        auto s = h.mixture().params().span("router.weight");
        return std::vector<T>(s.begin(), s.end());
    };
    SUBCASE("joint: one optimiser updates experts and router on training batches") {
        cfg.router_training = RouterTraining::joint;
        auto h = fx.host();
        const auto r0 = router_of(*h);
        Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, fx.train(), {}, 1);
        CHECK(t.router_optimizer() == nullptr);
        CHECK(t.expert_optimizer().owns(h->mixture().params(), "router.weight"));
        CHECK(t.expert_optimizer().num_groups() == 2);
        const StepReport r = t.expert_step();
        CHECK(r.kind == StepReport::Kind::joint);
        CHECK(router_of(*h) != r0);
        t.train_steps(5);
        CHECK(t.router_steps() == 0);
        CHECK(h->backward_calls == 6);  // no validation passes
    }
    SUBCASE("none: routers stay put") {
        cfg.router_training = RouterTraining::none;
        auto h = fx.host();
        const auto r0 = router_of(*h);
        Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, fx.train(), {}, 1);
        t.train_steps(6);
        CHECK(router_of(*h) == r0);
        CHECK(t.router_steps() == 0);
        CHECK_THROWS_AS(t.router_step(), InvalidArgument);
    }
    SUBCASE("alternating over a model without routers (mean routing) has no router phases") {
        TinyHostConfig mc;
        mc.routing = Routing::mean;
        Fixture<T> fm(mc);
        auto h = fm.host();
        Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, fm.train(), {}, 1);
        CHECK(t.router_optimizer() == nullptr);
        t.train_steps(6);
        CHECK(t.router_steps() == 0);
    }
    SUBCASE("frozen tensors (FFA-LoRA's lora_A) are never updated") {
        cfg.frozen = [](std::string_view, std::string_view tensor) { return tensor.ends_with("lora_A"); };
        auto h = fx.host();
        const auto a0 = adapter_parameters<T>(h->adapters(), [](auto, auto n) { return n.ends_with("lora_A"); });
        Trainer<TinyHost<T>, RegressionBatch<T>> t(*h, cfg, fx.train(), fx.val(), 1);
        t.train_steps(6);
        const auto a1 = adapter_parameters<T>(h->adapters(), [](auto, auto n) { return n.ends_with("lora_A"); });
        REQUIRE(a0.size() == 5);  // 2 experts x 2 linears + head
        for (std::size_t i = 0; i < a0.size(); ++i) CHECK(a0[i].data == a1[i].data);
        for (const auto& n : t.expert_optimizer().tensor_names()) CHECK_FALSE(n.ends_with("lora_A"));
    }
}

TEST_CASE("Trainer: configuration errors name the setting") {
    Fixture<double> fx;
    auto h = fx.host();
    using Tr = Trainer<TinyHost<double>, RegressionBatch<double>>;
    TrainerConfig cfg = small_config();
    cfg.router_every = 0;
    CHECK_THROWS_WITH_AS(Tr(*h, cfg, fx.train(), fx.val()), doctest::Contains("router_every 0"), InvalidArgument);
    cfg = small_config();
    CHECK_THROWS_WITH_AS(Tr(*h, cfg, fx.train(), {}), doctest::Contains("validation"), InvalidArgument);
    cfg.micro_batches = 0;
    CHECK_THROWS_WITH_AS(Tr(*h, cfg, fx.train(), fx.val()), doctest::Contains("micro_batches 0"), InvalidArgument);
    cfg = small_config();
    cfg.expert_lr_min = 1.0;
    CHECK_THROWS_WITH_AS(Tr(*h, cfg, fx.train(), fx.val()), doctest::Contains("lr_min"), InvalidArgument);
}

TEST_CASE("Trainer: reset_moments clears exactly the selected tensors' optimiser state") {
    Fixture<double> fx;
    auto h = fx.host();
    Trainer<TinyHost<double>, RegressionBatch<double>> t(*h, small_config(), fx.train(), fx.val(), 2);
    t.train_steps(6);
    const auto generalist = [](std::string_view prefix, std::string_view tensor) {
        return prefix == "layer0.mlp." && tensor.starts_with("experts.0.");
    };
    CHECK(t.reset_moments(generalist) == 4);
    const auto s = t.state();
    for (const auto& x : s.tensors) {
        const bool reset = x.name.starts_with("expert_optimizer.layer0.mlp.experts.0.");
        bool all_zero = true;
        for (double v : x.data) all_zero = all_zero && v == 0.0;
        CHECK(all_zero == reset);
    }
    for (const auto& x : s.scalars)
        if (x.name.ends_with(".step")) CHECK((x.value == 0) == x.name.starts_with("expert_optimizer.layer0.mlp.experts.0."));
    CHECK(t.expert_optimizer().iteration() == 6);
    t.train_steps(1);  // the reset tensors restart their bias correction without error
}

TEST_CASE("adapter_parameters / load_adapter_parameters: names, filters and checks") {
    Fixture<float> fx;
    auto a = fx.host(1), b = fx.host(2);
    const auto pa = adapter_parameters(a->adapters());
    REQUIRE(pa.size() == 1 + 8 + 2);
    CHECK(pa[0].name == "layer0.mlp.router.weight");
    CHECK(pa.back().name == "head.lora_B");
    CHECK_FALSE(same_params(a->adapters(), b->adapters()));
    load_adapter_parameters<float>(b->adapters(), pa);
    CHECK(same_params(a->adapters(), b->adapters()));

    auto partial = pa;
    partial.pop_back();
    CHECK_THROWS_WITH_AS(load_adapter_parameters<float>(b->adapters(), partial), doctest::Contains("head.lora_B"),
                         ShapeError);
    load_adapter_parameters<float>(b->adapters(), partial, false);
    auto wrong = pa;
    wrong[1].shape = {1, 1};
    CHECK_THROWS_AS(load_adapter_parameters<float>(b->adapters(), wrong), ShapeError);
    auto unknown = pa;
    unknown.push_back({"nope", {1}, {0.f}});
    CHECK_THROWS_WITH_AS(load_adapter_parameters<float>(b->adapters(), unknown), doctest::Contains("'nope'"),
                         ShapeError);
}
