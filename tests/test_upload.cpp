#include <comigs/aggregate.hpp>
#include <comigs/upload.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace {
using namespace comigs;

constexpr double kCanary = 1234.5;

template <class E, class F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
    bool thrown = false;
    try {
        f();
    } catch (const E& e) {
        thrown = true;
        const std::string msg = e.what();
        for (const char* p : parts) {
            INFO("message: " << msg << " / expected to contain: " << p);
            CHECK(msg.find(p) != std::string::npos);
        }
    }
    CHECK(thrown);
}

/// Occurrences of the canary in a buffer: as a value, and as a byte pattern at any byte offset.
template <class T>
int canary_hits(std::span<const T> values) {
    int hits = 0;
    for (T v : values) hits += v == static_cast<T>(kCanary);
    const T c = static_cast<T>(kCanary);
    const auto* bytes = reinterpret_cast<const unsigned char*>(values.data());
    const std::size_t n = values.size() * sizeof(T);
    for (std::size_t off = 0; off + sizeof(T) <= n; ++off)
        if (off % sizeof(T) != 0 && std::memcmp(bytes + off, &c, sizeof(T)) == 0) ++hits;
    return hits;
}

struct RoleCase {
    const char* name;
    std::vector<Role> roles;
};

std::vector<RoleCase> role_cases() {
    const Role G = Role::generalist, S = Role::specialist;
    return {{"1G1S", {G, S}}, {"2G", {G, G}}, {"2S", {S, S}}, {"1G+3S", {G, S, S, S}}, {"E=1", {G}}};
}

/// Specialists and router get the canary, shared tensors distinct random values.
template <class Layer>
void plant(Layer& layer, Rng& rng) {
    using T = std::remove_reference_t<decltype(*layer.params().data())>;
    for (const auto& spec : layer.params().layout().tensors())
        for (T& v : layer.params().span(spec.name))
            v = layer.shared(spec.name) ? static_cast<T>(rng.normal(0.0, 0.5)) : static_cast<T>(kCanary);
}

/// One device: an MLP mixture (GELU or SwiGLU), a linear mixture and a shared attention adapter.
template <class T>
struct Device {
    std::shared_ptr<FrozenMlp<T>> base;
    std::vector<T> w_lin;
    std::unique_ptr<MixtureOfLoraMlp<T>> mlp;
    std::unique_ptr<MixtureOfLoraLinear<T>> lin;
    std::unique_ptr<LoraExpert<T>> attn;

    Device(MlpForm form, const std::vector<Role>& roles, std::uint64_t seed, Index rank = 2, Index d = 4) {
        Rng rng(seed);
        const Index E = static_cast<Index>(roles.size());
        MixtureConfig mc;
        mc.form = form;
        mc.d_model = d;
        mc.d_hidden = 6;
        mc.n_experts = E;
        mc.top_k = E == 1 ? 1 : 2;
        mc.rank = rank;
        mc.roles = roles;
        base = std::make_shared<FrozenMlp<T>>(form, d, 6);
        base->randomize(rng, 0.5);
        mlp = std::make_unique<MixtureOfLoraMlp<T>>(mc, base);
        plant(*mlp, rng);
        MixtureLinearConfig lc;
        lc.in_features = d;
        lc.out_features = 3;
        lc.n_experts = E;
        lc.top_k = E == 1 ? 1 : 2;
        lc.rank = rank;
        lc.roles = roles;
        w_lin.assign(static_cast<std::size_t>(3 * d), T(0.1));
        lin = std::make_unique<MixtureOfLoraLinear<T>>(lc, FrozenLinear<T>{ConstMatrixView<T>(w_lin.data(), 3, d), {}});
        plant(*lin, rng);
        LoraConfig ac;
        ac.in_features = d;
        ac.out_features = d;
        ac.rank = rank;
        attn = std::make_unique<LoraExpert<T>>(ac);
        for (T& v : attn->params().all()) v = static_cast<T>(rng.normal());
    }

    AdapterRegistry<T> registry() {
        AdapterRegistry<T> r;
        r.mixtures.push_back({"h.0.mlp.", mlp.get()});
        r.mixture_linears.push_back({"h.0.lm.", lin.get()});
        r.shared_adapters.push_back({"h.0.attn.c_attn.", attn.get()});
        return r;
    }
    GeneralistUpload<T> upload(UserId user, double weight = 1.0) {
        UploadBuilder<T> b(user, weight);
        b.add(registry());
        return std::move(b).finish();
    }
};

/// Every shared tensor of a layer appears in the upload with its exact bytes; returns their count.
template <class T, class Layer>
std::size_t check_shared_present(const GeneralistUpload<T>& up, const Layer& layer, const std::string& prefix,
                                 Index& elements) {
    std::size_t n = 0;
    for (const auto& spec : layer.params().layout().tensors()) {
        const std::string name = prefix + spec.name;
        bool shared = true;  // a plain shared adapter: every tensor
        if constexpr (requires { layer.shared(spec.name); }) shared = layer.shared(spec.name);
        if (!shared) {
            CHECK_FALSE(up.contains(name));
            continue;
        }
        REQUIRE(up.contains(name));
        const auto a = up.span(name), b = layer.params().span(spec.name);
        REQUIRE(a.size() == b.size());
        CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
        elements += static_cast<Index>(a.size());
        ++n;
    }
    return n;
}

template <class T>
std::vector<AggregationConfig> every_rule() {
    return {AggregationConfig::fedavg(),
            AggregationConfig::fedavg(Weighting::tokens),
            AggregationConfig::hetlora(),
            AggregationConfig::hetlora(Weighting::update_norm),
            AggregationConfig::flexlora(),
            AggregationConfig::ffa_lora(),
            AggregationConfig::stacking(),
            AggregationConfig::norm_clip(0.5),
            AggregationConfig::median(),
            AggregationConfig::trimmed_mean(1),
            AggregationConfig::krum(0),
            AggregationConfig::dp_fedavg(0.5, 1.0, 7)};
}

}  // namespace

TEST_CASE_TEMPLATE("upload: canaries in specialists and routers never leave the device", T, float, double) {
    for (const auto& rc : role_cases())
        for (MlpForm form : {MlpForm::gelu, MlpForm::swiglu}) {
            INFO("roles " << std::string(rc.name) << ", form " << std::string(to_string(form)));
            Device<T> dev(form, rc.roles, 11);
            const auto up = dev.upload(3, 100.0);
            CHECK(canary_hits(up.values()) == 0);
            Index elements = 0;
            std::size_t tensors = check_shared_present(up, *dev.mlp, "h.0.mlp.", elements);
            tensors += check_shared_present(up, *dev.lin, "h.0.lm.", elements);
            tensors += check_shared_present(up, *dev.attn, "h.0.attn.c_attn.", elements);
            CHECK(up.tensors().size() == tensors);
            CHECK(up.size() == elements);  // nothing else in the buffer
            CHECK_FALSE(up.contains("h.0.mlp.router.weight"));
            Index generalists = 0;
            for (Role r : rc.roles) generalists += r == Role::generalist;
            // Per generalist: 2 MLP linears (gelu) or 3 (swiglu), one linear-mixture pair; plus attention.
            const Index per = form == MlpForm::gelu ? 2 : 3;
            CHECK(static_cast<Index>(up.tensors().size()) == 2 * generalists * (per + 1) + 2);

            // The canaries are really there on the device (the test is not vacuous); E = 1 has no
            // specialist and no router, so nothing to plant.
            if (rc.roles.size() > 1) CHECK(canary_hits(std::span<const T>(dev.mlp->params().all())) > 0);
        }
}

TEST_CASE_TEMPLATE("upload: no aggregate of any rule contains a canary, and download leaves them in place", T, float,
                   double) {
    for (const auto& rc : role_cases()) {
        INFO("roles " << std::string(rc.name));
        std::vector<std::unique_ptr<Device<T>>> devs;
        for (std::uint64_t s = 0; s < 3; ++s)
            devs.push_back(std::make_unique<Device<T>>(MlpForm::gelu, rc.roles, 20 + s));
        for (const auto& cfg : every_rule<T>()) {
            INFO("rule " << std::string(to_string(cfg.rule)));
            if (cfg.rule == AggregationRule::ffa_lora)
                for (auto& d : devs) ffa_init_lora_A(d->registry(), 99);
            std::vector<GeneralistUpload<T>> ups;
            for (std::size_t k = 0; k < devs.size(); ++k) ups.push_back(devs[k]->upload(k + 1, 10.0 * (k + 1)));
            for (const auto& u : ups) CHECK(canary_hits(u.values()) == 0);
            const auto res = aggregate(ups, cfg);
            CHECK(canary_hits(res.aggregate.values()) == 0);
            if (cfg.rule == AggregationRule::stacking) continue;  // rank 3r: not for these rank-r layers

            // Download into device 0: shared tensors take the aggregate, everything else keeps its bytes.
            auto& d = *devs[0];
            const std::vector<T> mlp_before(d.mlp->params().all().begin(), d.mlp->params().all().end());
            const std::vector<T> lin_before(d.lin->params().all().begin(), d.lin->params().all().end());
            const auto rep = download(res.aggregate, 1, d.registry());
            CHECK(rep.kept.empty());
            std::size_t shared = 0;
            for (const auto& spec : d.mlp->params().layout().tensors()) {
                const auto now = d.mlp->params().span(spec.name);
                const T* before = mlp_before.data() + spec.offset;
                if (!d.mlp->shared(spec.name)) {
                    CHECK(std::memcmp(now.data(), before, now.size() * sizeof(T)) == 0);
                } else {
                    ++shared;
                    const auto agg = res.aggregate.view("h.0.mlp." + spec.name);
                    const auto mine = d.mlp->params().view(spec.name);
                    // Same rank here, same scale unless the rule folds scale 1 in (flexlora).
                    const double c = std::sqrt(res.aggregate.at("h.0.mlp." + spec.name).scale /
                                               static_cast<double>(d.mlp->scale()));
                    for (Index i = 0; i < mine.rows; ++i)
                        for (Index j = 0; j < mine.cols; ++j)
                            CHECK(static_cast<double>(mine(i, j)) ==
                                  doctest::Approx(c * static_cast<double>(agg(i, j))).epsilon(1e-6));
                }
            }
            for (const auto& spec : d.lin->params().layout().tensors())
                if (!d.lin->shared(spec.name)) {
                    const auto now = d.lin->params().span(spec.name);
                    CHECK(std::memcmp(now.data(), lin_before.data() + spec.offset, now.size() * sizeof(T)) == 0);
                }
            if (rc.roles.size() > 1) CHECK(canary_hits(std::span<const T>(d.mlp->params().all())) > 0);
            // Every written tensor is shared: per generalist 4 in the MLP, 2 in the linear mixture; + attn 2.
            CHECK(rep.written.size() == 3 * shared / 2 + 2);
        }
    }
}

TEST_CASE_TEMPLATE("upload: one packed buffer sorted by name with LoRA metadata", T, float, double) {
    Device<T> dev(MlpForm::swiglu, {Role::generalist, Role::specialist, Role::generalist}, 5, 3);
    const auto up = dev.upload(42, 256.0);
    CHECK(up.user() == 42);
    CHECK(up.weight() == 256.0);
    CHECK(up.sends_lora_A());
    Index offset = 0;
    for (std::size_t k = 0; k < up.tensors().size(); ++k) {
        const auto& i = up.tensors()[k];
        if (k > 0) CHECK(up.tensors()[k - 1].name < i.name);
        CHECK(i.offset == offset);  // packed: no padding, so MPI can reduce values() as is
        offset += i.size();
        CHECK(i.rank == 3);
        CHECK(i.alpha == 16.0);
        CHECK(i.scaling == LoraScaling::sqrt);
        CHECK(i.scale == doctest::Approx(16.0 / std::sqrt(3.0)).epsilon(1e-15));
        CHECK(i.rank_policy == RankPolicy::exact);
        CHECK(i.name == i.pair + (i.factor == LoraFactor::A ? ".lora_A" : ".lora_B"));
        CHECK((i.factor == LoraFactor::A ? i.rows : i.cols) == 3);
    }
    CHECK(offset == up.size());
    const auto& a = up.at("h.0.mlp.experts.2.gate.lora_A");
    CHECK(a.rows == 3);
    CHECK(a.cols == 4);
    CHECK(a.pair == "h.0.mlp.experts.2.gate");
    const auto& b = up.at("h.0.mlp.experts.2.down.lora_B");
    CHECK(b.rows == 4);
    CHECK(b.cols == 3);
    CHECK(up.contains("h.0.attn.c_attn.lora_A"));
    CHECK(up.contains("h.0.lm.experts.2.lora_B"));
    CHECK_FALSE(up.contains("h.0.lm.experts.1.lora_B"));
    CHECK(up.first_non_finite() == nullptr);

    // Values are copied when the layer is added: later training does not change the upload.
    UploadBuilder<T> bld(1, 1.0);
    bld.add("h.0.mlp.", *dev.mlp);
    const auto before = dev.mlp->params().span("experts.0.up.lora_A")[0];
    dev.mlp->params().span("experts.0.up.lora_A")[0] = T(-77);
    const auto up2 = std::move(bld).finish();
    CHECK(up2.span("h.0.mlp.experts.0.up.lora_A")[0] == before);

    // Same structure, other values: same fingerprint; another rank: another one.
    Device<T> other(MlpForm::swiglu, {Role::generalist, Role::specialist, Role::generalist}, 6, 3);
    Device<T> rank2(MlpForm::swiglu, {Role::generalist, Role::specialist, Role::generalist}, 6, 2);
    CHECK(other.upload(7).layout_fingerprint() == up.layout_fingerprint());
    CHECK(rank2.upload(7).layout_fingerprint() != up.layout_fingerprint());

    // FFA-LoRA devices may send only B.
    UploadBuilder<T> ffa(9, 1.0, UploadOptions{.send_lora_A = false});
    const auto upb = std::move(ffa.add(dev.registry())).finish();
    CHECK_FALSE(upb.sends_lora_A());
    for (const auto& i : upb.tensors()) CHECK(i.factor == LoraFactor::B);
    CHECK(upb.tensors().size() == up.tensors().size() / 2);
}

TEST_CASE("upload: bad weights, reused prefixes and null layers are errors naming the user") {
    for (double w : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()})
        expect_error<InvalidArgument>([&] { UploadBuilder<float> b(42, w); }, {"user 42", "weight"});
    Device<float> dev(MlpForm::gelu, {Role::generalist, Role::specialist}, 1);
    UploadBuilder<float> b(8, 1.0);
    b.add("h.0.mlp.", *dev.mlp);
    expect_error<InvalidArgument>([&] { b.add("h.0.mlp.", *dev.mlp); },
                                  {"user 8", "h.0.mlp.experts.0.fc.lora_A", "added twice"});
    AdapterRegistry<float> reg;
    reg.mixtures.push_back({"x.", nullptr});
    expect_error<InvalidArgument>([&] { UploadBuilder<float>(1, 1.0).add(reg); }, {"'x.'", "null layer"});
}

TEST_CASE("shared aggregate: the public constructor validates what it is given") {
    auto info = [](std::string name, Index rows, Index cols, Index rank) {
        SharedTensorInfo i;
        i.name = std::move(name);
        REQUIRE(split_lora_name(i.name, i.pair, i.factor));
        i.rows = rows;
        i.cols = cols;
        i.rank = rank;
        i.alpha = static_cast<double>(rank);
        i.scaling = LoraScaling::linear;
        i.scale = 1.0;
        return i;
    };
    std::vector<double> v(6, 0.5);
    const SharedAggregate<double> ok({info("a.lora_A", 1, 3, 1), info("a.lora_B", 3, 1, 1)}, v);
    CHECK(ok.at("a.lora_B").offset == 3);
    expect_error<InvalidArgument>(
        [&] { SharedAggregate<double>({info("a.lora_B", 3, 1, 1), info("a.lora_A", 1, 3, 1)}, v); },
        {"a.lora_A", "sorted"});
    expect_error<ShapeError>([&] { SharedAggregate<double>({info("a.lora_A", 1, 3, 1)}, v); }, {"values", "6"});
    auto router = info("a.lora_A", 1, 6, 1);
    router.name = "router.weight";
    expect_error<InvalidArgument>([&] { SharedAggregate<double>({router}, v); }, {"router.weight", "LoRA factor"});
    auto bad_scale = info("a.lora_A", 2, 3, 2);
    bad_scale.scale = 2.0;
    expect_error<InvalidArgument>([&] { SharedAggregate<double>({bad_scale}, v); }, {"a.lora_A", "scale"});
    expect_error<ShapeError>([&] { SharedAggregate<double>({info("a.lora_A", 2, 3, 1)}, v); }, {"a.lora_A", "rank"});
}

TEST_CASE_TEMPLATE("download: mismatches are errors naming user and tensor, and nothing is written", T, float,
                   double) {
    Device<T> src(MlpForm::gelu, {Role::generalist, Role::specialist}, 1);
    const auto agg = aggregate(std::vector{src.upload(1)}, AggregationConfig::fedavg()).aggregate;

    SUBCASE("other width") {
        Device<T> dev(MlpForm::gelu, {Role::generalist, Role::specialist}, 2, 2, 5);
        expect_error<ShapeError>([&] { download(agg, 9, dev.registry()); },
                                 {"user 9", "tensor 'h.0.mlp.experts.0.fc.lora_A'", "shape [2, 5]"});
    }
    SUBCASE("other rank, aggregate not truncatable") {
        Device<T> dev(MlpForm::gelu, {Role::generalist, Role::specialist}, 2, 3);
        expect_error<ShapeError>([&] { download(agg, 9, dev.registry()); }, {"user 9", "device rank 3"});
    }
    SUBCASE("device rank above a truncatable aggregate's") {
        const auto het = aggregate(std::vector{src.upload(1)}, AggregationConfig::hetlora()).aggregate;
        Device<T> dev(MlpForm::gelu, {Role::generalist, Role::specialist}, 2, 3);
        expect_error<ShapeError>([&] { download(het, 9, dev.registry()); }, {"user 9", "exceeds"});
        Device<T> low(MlpForm::gelu, {Role::generalist, Role::specialist}, 2, 1);
        CHECK(download(het, 9, low.registry()).written.size() == 8);
    }
    SUBCASE("device shares a tensor the aggregate lacks") {
        Device<T> dev(MlpForm::gelu, {Role::generalist, Role::generalist}, 2);
        const std::vector<T> before(dev.mlp->params().all().begin(), dev.mlp->params().all().end());
        expect_error<InvalidArgument>([&] { download(agg, 9, dev.registry()); },
                                      {"user 9", "h.0.mlp.experts.1.fc.lora_A", "not in the aggregate"});
        // The check ran before any write.
        CHECK(std::memcmp(before.data(), dev.mlp->params().data(), before.size() * sizeof(T)) == 0);
        const auto rep = download(agg, 9, dev.registry(), DownloadOptions{.require_all = false});
        CHECK(rep.kept.size() == 6);  // experts.1: fc, proj (A, B) and the linear mixture's pair
        CHECK(rep.written.size() == 8);
    }
    SUBCASE("a bad layer after a good one leaves the good one untouched") {
        Device<T> good(MlpForm::gelu, {Role::generalist, Role::specialist}, 3);
        Device<T> bad(MlpForm::gelu, {Role::generalist, Role::specialist}, 3, 2, 5);
        const std::vector<T> before(good.attn->params().all().begin(), good.attn->params().all().end());
        Downloader<T> d(agg, 4);
        d.add_shared_adapter("h.0.attn.c_attn.", *good.attn);
        CHECK_THROWS_AS(d.add("h.0.mlp.", *bad.mlp), ShapeError);
        CHECK(std::memcmp(before.data(), good.attn->params().data(), before.size() * sizeof(T)) == 0);
        CHECK(std::memcmp(before.data(), agg.span("h.0.attn.c_attn.lora_A").data(), 8 * sizeof(T)) != 0);
    }
    SUBCASE("non-finite aggregate") {
        std::vector<T> v(agg.values().begin(), agg.values().end());
        v[3] = std::numeric_limits<T>::quiet_NaN();
        const auto nan = SharedAggregate<T>::with_layout_of(agg, v);
        Device<T> dev(MlpForm::gelu, {Role::generalist, Role::specialist}, 2);
        expect_error<NumericError>([&] { download(nan, 9, dev.registry()); }, {"user 9", "NaN"});
    }
}

TEST_CASE_TEMPLATE("download: the optimiser keeps its moments unless the caller resets the downloaded tensors", T,
                   float, double) {
    Device<T> dev(MlpForm::gelu, {Role::generalist, Role::specialist}, 1);
    AdamW<T> opt({{.name = "all", .bindings = {bind("mlp", dev.mlp->params(), dev.mlp->grads())}}});
    for (T& g : dev.mlp->grads().all()) g = T(1);
    REQUIRE(opt.step() == StepStatus::stepped);
    Device<T> other(MlpForm::gelu, {Role::generalist, Role::specialist}, 2);
    const auto agg = aggregate(std::vector{other.upload(1), dev.upload(2)}, AggregationConfig::fedavg()).aggregate;
    auto moment = [&](const std::string& name) {
        for (const auto& s : opt.state_tensors())
            if (s.name == "mlp." + name + ".exp_avg") return static_cast<double>(s.data[0]);
        FAIL("no state " << name);
        return 0.0;
    };
    Downloader<T> d(agg, 2);
    d.add("h.0.mlp.", *dev.mlp);
    const auto rep = d.apply();
    CHECK(rep.user == 2);
    CHECK(rep.written.size() == 4);
    CHECK(moment("experts.0.fc.lora_A") != 0.0);  // kept (the CoMiGS reference behaviour)
    CHECK(opt.reset_state(rep.selector()) == 4);
    CHECK(moment("experts.0.fc.lora_A") == 0.0);
    CHECK(moment("experts.0.proj.lora_B") == 0.0);
    CHECK(moment("experts.1.fc.lora_A") != 0.0);  // specialist moments untouched
    CHECK(moment("router.weight") != 0.0);
}

TEST_CASE_TEMPLATE("download: an MPI-style reduced buffer becomes an aggregate with the uploads' layout", T, float,
                   double) {
    Device<T> d1(MlpForm::gelu, {Role::generalist, Role::specialist}, 1);
    Device<T> d2(MlpForm::gelu, {Role::generalist, Role::specialist}, 2);
    const auto u1 = d1.upload(1, 3.0), u2 = d2.upload(2, 1.0);
    REQUIRE(u1.layout_fingerprint() == u2.layout_fingerprint());
    // What an all-reduce of weight-premultiplied buffers followed by division by the weight sum gives.
    std::vector<T> sum(static_cast<std::size_t>(u1.size()));
    for (std::size_t e = 0; e < sum.size(); ++e)
        sum[e] = static_cast<T>((3.0 * static_cast<double>(u1.values()[e]) + 1.0 * static_cast<double>(u2.values()[e])) /
                                4.0);
    const auto reduced = SharedAggregate<T>::with_layout_of(u1, sum);
    const auto server = aggregate(std::vector{u2, u1}, AggregationConfig::fedavg(Weighting::tokens)).aggregate;
    REQUIRE(reduced.size() == server.size());
    CHECK(reduced.layout_fingerprint() == server.layout_fingerprint());
    // Equal up to rounding (the compiler may fuse the multiply-adds differently in the two places).
    for (std::size_t e = 0; e < sum.size(); ++e)
        CHECK(static_cast<double>(reduced.values()[e]) ==
              doctest::Approx(static_cast<double>(server.values()[e])).epsilon(1e-6));
    CHECK(download(reduced, 1, d1.registry()).written.size() == 8);
    CHECK(std::memcmp(d1.mlp->params().span("experts.0.proj.lora_B").data(),
                      reduced.span("h.0.mlp.experts.0.proj.lora_B").data(),
                      reduced.span("h.0.mlp.experts.0.proj.lora_B").size() * sizeof(T)) == 0);
}

TEST_CASE("upload: nothing can be assigned into an upload through its base class") {
    // static_cast<SharedTensors<T>&>(upload) = SharedAggregate<T>(...) would put tensors of the
    // caller's choosing into a GeneralistUpload: the base class can be neither assigned nor copied.
    CHECK_FALSE(std::is_copy_assignable_v<SharedTensors<float>>);
    CHECK_FALSE(std::is_move_assignable_v<SharedTensors<float>>);
    CHECK_FALSE(std::is_assignable_v<SharedTensors<float>&, SharedAggregate<float>>);
    CHECK_FALSE(std::is_assignable_v<SharedTensors<float>&, const SharedAggregate<float>&>);
    CHECK_FALSE(std::is_assignable_v<GeneralistUpload<float>&, SharedAggregate<float>>);
    CHECK_FALSE(std::is_constructible_v<SharedTensors<double>, const SharedAggregate<double>&>);
    // Uploads and aggregates themselves still copy and move (containers hold them).
    CHECK(std::is_copy_constructible_v<GeneralistUpload<float>>);
    CHECK(std::is_move_assignable_v<GeneralistUpload<float>>);
    CHECK(std::is_copy_assignable_v<SharedAggregate<float>>);
    CHECK(std::is_move_assignable_v<SharedAggregate<float>>);
}
