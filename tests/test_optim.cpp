// Tests of include/comigs/optim.hpp: update rules against an independent double-precision loop and
// against PyTorch (golden values), schedules, clipping, non-finite guarding, isolation between
// optimisers over the same buffers, state save/restore, and thread-count independence.
#include <comigs/optim.hpp>
#include <comigs/random.hpp>
#include <doctest/doctest.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstring>
#include <numbers>
#include <type_traits>
#include <vector>

namespace {

using Idx = std::ptrdiff_t;  // comigs::index (a plain `index` would clash with POSIX index())

// ---- Golden values: printed by tools/golden_optim.py (torch.optim.AdamW / SGD, foreach=False, and
// CosineAnnealingLR(T_max=3, eta_min=0.01) from lr 0.1 for the scheduled cases). Do not edit by hand.
constexpr double golden_adamw_f64_params[3][6] = {
    {0.395990099009901, -1.137997512437811, 0.6825, 2.0244444444444443, -0.3966677740863787, -0.09990009990009992},
    {0.3723843378588686, -1.0568438606111357, 0.6279533285014416, 2.02760040925701, -0.3965440673458748, -0.17182840900760082},
    {0.35024578530671435, -1.034896233607516, 0.6164264831542385, 2.0221642652550504, -0.40138741594508615, -0.1686321774400132},
};
constexpr double golden_adamw_f64_exp_avg[6] = {0.023599999999999996, -0.0202, 0.00020149999999999996, -1.4799999999999999e-05, 0.011799999999999996, -0.023999999999999994};
constexpr double golden_adamw_f64_exp_avg_sq[6] = {0.0025700000000000024, 0.0024050000000000018, 3.415312500000003e-07, 4.138000000000004e-08, 0.007530000000000006, 0.16950000000000015};
constexpr double golden_adamw_f32_params[3][6] = {
    {0.3959901034832001, -1.1379975080490112, 0.6825000047683716, 2.024444580078125, -0.39666780829429626, -0.09990009665489197},
    {0.37238433957099915, -1.056843876838684, 0.6279533505439758, 2.0276005268096924, -0.39654409885406494, -0.17182841897010803},
    {0.35024580359458923, -1.0348962545394897, 0.6164264678955078, 2.0221643447875977, -0.40138745307922363, -0.16863219439983368},
};
constexpr double golden_adamw_f32_exp_avg[6] = {0.023600000888109207, -0.02019999921321869, 0.00020149999181739986, -1.4799988093727734e-05, 0.011800000444054604, -0.024000000208616257};
constexpr double golden_adamw_f32_exp_avg_sq[6] = {0.0025700002443045378, 0.00240500015206635, 3.415312903598533e-07, 4.138000164743971e-08, 0.007530000526458025, 0.16949999332427979};
constexpr double golden_sgd_momentum_f64_params[3][6] = {
    {0.485, -1.2175, 0.74235, 1.98008, -0.327, -0.1},
    {0.47163499999999997, -1.1682925, 0.7286038499999999, 1.94433128, -0.325857, -0.2341},
    {0.43736178499999995, -1.1179911175, 0.70976488035, 1.89461345048, -0.330895587, -0.21768310000000002},
};
constexpr double golden_sgd_momentum_f64_momentum_buffer[6] = {0.34273215000000007, -0.503013825, 0.18838969649999998, 0.49717829520000006, 0.05038586999999996, -0.1641689999999999};
constexpr double golden_sgd_momentum_f32_params[3][6] = {
    {0.48499998450279236, -1.2174999713897705, 0.7423499822616577, 1.980080008506775, -0.3270000219345093, -0.10000000149011612},
    {0.47163498401641846, -1.16829252243042, 0.7286038398742676, 1.9443312883377075, -0.325857013463974, -0.23409999907016754},
    {0.43736177682876587, -1.1179910898208618, 0.7097648978233337, 1.89461350440979, -0.3308956027030945, -0.2176830917596817},
};
constexpr double golden_sgd_momentum_f32_momentum_buffer[6] = {0.34273216128349304, -0.5030138492584229, 0.18838967382907867, 0.4971782863140106, 0.05038587376475334, -0.164169043302536};
constexpr double golden_sgd_nesterov_f64_params[3][6] = {
    {0.4715, -1.18825, 0.735465, 1.962152, -0.3513, -0.19},
    {0.4625034125, -1.13562614375, 0.7195384903750001, 1.9207545317999999, -0.3262638575, -0.32360225},
    {0.44381860517781246, -1.1182405216873437, 0.7113558523344344, 1.898978086426135, -0.32931510592993746, -0.26533383110625},
};
constexpr double golden_sgd_nesterov_f64_momentum_buffer[6] = {0.36518534125, -0.5237551143750001, 0.2009106990375, 0.53052113318, 0.029456614249999978, -0.2894602249999998};
constexpr double golden_sgd_nesterov_f32_params[3][6] = {
    {0.4715000092983246, -1.188249945640564, 0.7354649901390076, 1.9621520042419434, -0.3513000011444092, -0.1899999976158142},
    {0.46250343322753906, -1.1356260776519775, 0.7195385098457336, 1.9207545518875122, -0.3262638449668884, -0.32360225915908813},
    {0.4438186287879944, -1.118240475654602, 0.7113558650016785, 1.8989781141281128, -0.32931509613990784, -0.2653338313102722},
};
constexpr double golden_sgd_nesterov_f32_momentum_buffer[6] = {0.36518535017967224, -0.5237551331520081, 0.20091068744659424, 0.5305211544036865, 0.029456626623868942, -0.2894601821899414};
constexpr double golden_sgd_plain_f64_params[3][6] = {
    {0.485, -1.2175, 0.74235, 1.98008, -0.327, -0.1},
    {0.48514999999999997, -1.195325, 0.7347265, 1.9602792, -0.29873, -0.149},
    {0.46029849999999994, -1.18837175, 0.727479235, 1.940626408, -0.3057427, 0.002490000000000006},
};
constexpr double golden_sgd_plain_f32_params[3][6] = {
    {0.48499998450279236, -1.2174999713897705, 0.7423499822616577, 1.980080008506775, -0.3270000219345093, -0.10000000149011612},
    {0.48514997959136963, -1.1953250169754028, 0.7347264885902405, 1.9602792263031006, -0.2987300157546997, -0.14900000393390656},
    {0.46029847860336304, -1.1883717775344849, 0.7274792194366455, 1.9406263828277588, -0.30574271082878113, 0.0024899952113628387},
};

// Same inputs as tools/golden_optim.py.
constexpr double kP0[6] = {0.5, -1.25, 0.75, 2.0, -0.3, 0.0};
constexpr double kGrads[3][6] = {
    {0.1, -0.2, 0.0015, -0.0008, 0.3, 1.0},
    {-0.05, -0.1, 0.002, 0.0, -0.25, 0.5},
    {0.2, 0.05, -0.001, 0.0005, 0.1, -1.5},
};

// CosineAnnealingLR(T_max 3, eta_min 0.01) from 0.1, written out independently of LrSchedule.
double cosine_lr_reference(int t) { return 0.01 + 0.5 * (0.1 - 0.01) * (1.0 + std::cos(std::numbers::pi * t / 3.0)); }

template <class T>
struct OneTensor {
    comigs::ParamBuffer<T> p, g;
    OneTensor() : p(layout()), g(p.layout_ptr()) {
        for (int i = 0; i < 6; ++i) p.span("w")[i] = static_cast<T>(kP0[i]);
    }
    static comigs::ParamLayout layout() {
        comigs::ParamLayout l;
        l.add("w", {2, 3});
        return l;
    }
    void set_grad(int step) {
        for (int i = 0; i < 6; ++i) g.span("w")[i] = static_cast<T>(kGrads[step][i]);
    }
};

// |actual - expected| <= atol + rtol |expected| elementwise.
template <class T>
void check_close(std::span<const T> actual, const double* expected, double rtol, double atol, const char* what) {
    REQUIRE(actual.size() == 6);
    for (std::size_t i = 0; i < 6; ++i) {
        INFO(std::string(what), " element ", i, ": ", static_cast<double>(actual[i]), " vs ", expected[i]);
        CHECK(std::abs(static_cast<double>(actual[i]) - expected[i]) <= atol + rtol * std::abs(expected[i]));
    }
}

template <class T>
std::span<const T> state_of(const std::vector<comigs::StateTensor<const T>>& st, const std::string& name) {
    for (const auto& s : st)
        if (s.name == name) return s.data;
    FAIL("no state tensor ", name);
    return {};
}

// Tolerances: against the double loop (different association of the same formula) and against
// PyTorch in the same precision (same formula; FMA contraction may differ, and the momentum terms
// cancel, so the absolute part is a couple of ulps of the operands' magnitude, about 1).
template <class T>
constexpr double kRtolRef = std::is_same_v<T, double> ? 1e-13 : 2e-6;
template <class T>
constexpr double kAtolRef = std::is_same_v<T, double> ? 1e-15 : 1e-6;
template <class T>
constexpr double kRtolTorch = std::is_same_v<T, double> ? 4e-16 : 4e-7;
template <class T>
constexpr double kAtolTorch = std::is_same_v<T, double> ? 4.5e-16 : 2.4e-7;

template <class T>
bool bitwise_equal(std::span<const T> a, std::span<const T> b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
void fill_random(std::span<T> x, comigs::Rng& rng, double scale = 1.0) {
    for (auto& v : x) v = static_cast<T>(scale * rng.normal());
}

// A "mixture layer" buffer: experts and a router in one layout.
comigs::ParamLayout mixture_layout() {
    comigs::ParamLayout l;
    l.add("experts.0.A", {2, 5});
    l.add("experts.0.B", {5, 2});
    l.add("experts.1.A", {2, 5});
    l.add("experts.1.B", {5, 2});
    l.add("router.W", {3, 5});
    l.add("router.b", {3});
    return l;
}

template <class T>
struct Layer {
    comigs::ParamBuffer<T> p, g;
    explicit Layer(std::uint64_t seed) : p(mixture_layout()), g(p.layout_ptr()) {
        comigs::Rng rng(seed);
        fill_random(p.all(), rng);
        fill_random(g.all(), rng, 0.1);
    }
};

}  // namespace

TEST_CASE("LrSchedule: constant, cosine endpoints and midpoint, warm-up") {
    SUBCASE("constant") {
        const auto s = comigs::LrSchedule::constant(2e-3);
        CHECK(s.at(0) == 2e-3);
        CHECK(s.at(123456) == 2e-3);
        CHECK(s.is_constant());
    }
    SUBCASE("cosine without warm-up (the CoMiGS expert schedule)") {
        const auto s = comigs::LrSchedule::cosine(2e-3, 2e-4, 200);
        CHECK(s.at(0) == 2e-3);
        CHECK(s.at(100) == doctest::Approx(1.1e-3).epsilon(1e-14));
        CHECK(s.at(50) == doctest::Approx(2e-4 + 0.5 * 1.8e-3 * (1 + std::sqrt(0.5))).epsilon(1e-14));
        CHECK(s.at(200) == doctest::Approx(2e-4).epsilon(1e-15));
        CHECK(s.at(10000) == 2e-4);
        for (Idx t = 1; t <= 200; ++t) CHECK(s.at(t) <= s.at(t - 1));
        // Same values as the golden script's CosineAnnealingLR(T_max 3, eta_min 0.01).
        const auto g = comigs::LrSchedule::cosine(0.1, 0.01, 3);
        for (int t = 0; t < 3; ++t) CHECK(g.at(t) == doctest::Approx(cosine_lr_reference(t)).epsilon(1e-15));
    }
    SUBCASE("linear warm-up then cosine") {
        const auto s = comigs::LrSchedule::cosine(1.0, 0.1, 110, 10);
        CHECK(s.at(0) == doctest::Approx(0.1));
        CHECK(s.at(4) == doctest::Approx(0.5));
        CHECK(s.at(9) == 1.0);
        CHECK(s.at(10) == 1.0);
        CHECK(s.at(60) == doctest::Approx(0.55).epsilon(1e-14));
        CHECK(s.at(110) == doctest::Approx(0.1).epsilon(1e-14));
        for (Idx t = 1; t < 10; ++t) CHECK(s.at(t) > s.at(t - 1));
    }
    SUBCASE("invalid arguments name the parameter") {
        using S = comigs::LrSchedule;
        CHECK_THROWS_WITH_AS(S::cosine(1e-3, 2e-3, 10), doctest::Contains("lr_min"), comigs::InvalidArgument);
        CHECK_THROWS_WITH_AS(S::cosine(1e-3, 1e-4, 0), doctest::Contains("total_steps"), comigs::InvalidArgument);
        CHECK_THROWS_WITH_AS(S::cosine(1e-3, 1e-4, 10, 10), doctest::Contains("warmup_steps"),
                             comigs::InvalidArgument);
        CHECK_THROWS_AS(S::constant(std::nan("")), comigs::InvalidArgument);
        CHECK_THROWS_AS(S::constant(-1.0), comigs::InvalidArgument);
        CHECK_THROWS_AS(S::constant(1.0).at(-1), comigs::InvalidArgument);
    }
}

TEST_CASE_TEMPLATE("AdamW: three steps match a double-precision loop and PyTorch", T, float, double) {
    OneTensor<T> x;
    comigs::AdamW<T> opt({{.name = "w",
                           .bindings = {comigs::bind("", x.p, x.g)},
                           .lr = comigs::LrSchedule::cosine(0.1, 0.01, 3),
                           .options = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-3, .weight_decay = 0.1}}});

    // Textbook AdamW (Loshchilov & Hutter with PyTorch's eps placement), in double.
    double p[6], m[6] = {}, v[6] = {};
    std::copy(kP0, kP0 + 6, p);
    const double* golden_params = std::is_same_v<T, double> ? &golden_adamw_f64_params[0][0]
                                                            : &golden_adamw_f32_params[0][0];
    for (int t = 0; t < 3; ++t) {
        const double lr = cosine_lr_reference(t);
        CHECK(opt.lr() == doctest::Approx(lr).epsilon(1e-15));
        for (int i = 0; i < 6; ++i) {
            const double g = kGrads[t][i];
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.95 * v[i] + 0.05 * g * g;
            const double m_hat = m[i] / (1 - std::pow(0.9, t + 1));
            const double v_hat = v[i] / (1 - std::pow(0.95, t + 1));
            p[i] = p[i] - lr * 0.1 * p[i] - lr * m_hat / (std::sqrt(v_hat) + 1e-3);
        }
        x.set_grad(t);
        CHECK(opt.step() == comigs::StepStatus::stepped);
        check_close<T>(x.p.span("w"), p, kRtolRef<T>, kAtolRef<T>, "params vs double loop");
        check_close<T>(x.p.span("w"), golden_params + 6 * t, kRtolTorch<T>, kAtolTorch<T>, "params vs torch");
    }
    const auto st = opt.state_tensors();
    REQUIRE(st.size() == 2);
    CHECK(st[0].name == "w.exp_avg");
    CHECK(st[1].name == "w.exp_avg_sq");
    CHECK(st[0].shape == std::vector<Idx>{2, 3});
    check_close<T>(st[0].data, m, kRtolRef<T>, kAtolRef<T>, "exp_avg vs double loop");
    check_close<T>(st[1].data, v, kRtolRef<T>, kAtolRef<T>, "exp_avg_sq vs double loop");
    if constexpr (std::is_same_v<T, double>) {
        check_close<T>(st[0].data, golden_adamw_f64_exp_avg, kRtolTorch<T>, kAtolTorch<T>, "exp_avg vs torch");
        check_close<T>(st[1].data, golden_adamw_f64_exp_avg_sq, kRtolTorch<T>, kAtolTorch<T>, "exp_avg_sq vs torch");
    } else {
        check_close<T>(st[0].data, golden_adamw_f32_exp_avg, kRtolTorch<T>, kAtolTorch<T>, "exp_avg vs torch");
        check_close<T>(st[1].data, golden_adamw_f32_exp_avg_sq, kRtolTorch<T>, kAtolTorch<T>, "exp_avg_sq vs torch");
    }
    CHECK(opt.steps_taken() == 3);
    CHECK(opt.iteration() == 3);
}

TEST_CASE_TEMPLATE("AdamW SIMD kernel matches the plain reference on odd sizes and unaligned pointers", T, float,
                   double) {
    using Rule = comigs::detail::AdamWRule;
    const comigs::AdamWOptions o{.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.01};
    comigs::Rng rng(123);
    for (Idx n : {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 67, 131}) {
        for (Idx offset : {0, 1, 3}) {
            CAPTURE(n);
            CAPTURE(offset);
            std::vector<T> p(n + offset), g(n + offset), m(n + offset), v(n + offset);
            fill_random(std::span<T>(p), rng);
            fill_random(std::span<T>(g), rng, 0.1);
            fill_random(std::span<T>(m), rng, 0.01);
            for (auto& x : v) x = static_cast<T>(1e-3 * rng.uniform());
            auto p2 = p, m2 = m, v2 = v;
            const auto s = Rule::scalars<T>(o, 1e-2, 5);
            Rule::update(p.data() + offset, g.data() + offset, m.data() + offset, v.data() + offset, n, s, false);
            Rule::update_reference(p2.data() + offset, g.data() + offset, m2.data() + offset, v2.data() + offset, n,
                                   s);
            // The two may contract multiply-adds differently: a few ulps, relative to the operands.
            const double tol = 8 * std::numeric_limits<T>::epsilon();
            for (Idx i = 0; i < n + offset; ++i) {
                CHECK(std::abs(double(p[i]) - double(p2[i])) <= tol * (1 + std::abs(double(p2[i]))));
                CHECK(std::abs(double(m[i]) - double(m2[i])) <= tol * 0.1);
                CHECK(std::abs(double(v[i]) - double(v2[i])) <= tol * 1e-3);
            }
        }
    }
}

TEST_CASE_TEMPLATE("SGD: momentum, dampening, Nesterov and coupled weight decay match a loop and PyTorch", T, float,
                   double) {
    struct Case {
        const char* name;
        comigs::SgdOptions options;
        bool cosine;
        const double (*golden_f64)[6];
        const double (*golden_f32)[6];
        const double* buf_f64;
        const double* buf_f32;
    };
    const Case cases[] = {
        {"momentum+dampening", {.momentum = 0.9, .dampening = 0.1, .weight_decay = 0.1}, false,
         golden_sgd_momentum_f64_params, golden_sgd_momentum_f32_params, golden_sgd_momentum_f64_momentum_buffer,
         golden_sgd_momentum_f32_momentum_buffer},
        {"nesterov", {.momentum = 0.9, .weight_decay = 0.1, .nesterov = true}, true, golden_sgd_nesterov_f64_params,
         golden_sgd_nesterov_f32_params, golden_sgd_nesterov_f64_momentum_buffer,
         golden_sgd_nesterov_f32_momentum_buffer},
        {"plain", {.weight_decay = 0.1}, false, golden_sgd_plain_f64_params, golden_sgd_plain_f32_params, nullptr,
         nullptr},
    };
    for (const Case& c : cases) {
        INFO(std::string(c.name));
        OneTensor<T> x;
        comigs::Sgd<T> opt({{.name = "w",
                             .bindings = {comigs::bind("", x.p, x.g)},
                             .lr = c.cosine ? comigs::LrSchedule::cosine(0.1, 0.01, 3)
                                            : comigs::LrSchedule::constant(0.1),
                             .options = c.options}});
        double p[6], buf[6] = {};
        std::copy(kP0, kP0 + 6, p);
        const double mu = c.options.momentum, damp = c.options.dampening, wd = c.options.weight_decay;
        for (int t = 0; t < 3; ++t) {
            const double lr = c.cosine ? cosine_lr_reference(t) : 0.1;
            for (int i = 0; i < 6; ++i) {
                double d = kGrads[t][i] + wd * p[i];
                if (mu != 0) {
                    buf[i] = t == 0 ? d : mu * buf[i] + (1 - damp) * d;
                    d = c.options.nesterov ? d + mu * buf[i] : buf[i];
                }
                p[i] -= lr * d;
            }
            x.set_grad(t);
            CHECK(opt.step() == comigs::StepStatus::stepped);
            check_close<T>(x.p.span("w"), p, kRtolRef<T>, kAtolRef<T>, "params vs double loop");
            check_close<T>(x.p.span("w"), std::is_same_v<T, double> ? c.golden_f64[t] : c.golden_f32[t],
                           kRtolTorch<T>, kAtolTorch<T>, "params vs torch");
        }
        const auto st = opt.state_tensors();
        if (mu == 0) {
            CHECK(st.empty());
        } else {
            REQUIRE(st.size() == 1);
            CHECK(st[0].name == "w.momentum_buffer");
            check_close<T>(st[0].data, buf, kRtolRef<T>, kAtolRef<T>, "momentum_buffer vs double loop");
            check_close<T>(st[0].data, std::is_same_v<T, double> ? c.buf_f64 : c.buf_f32, kRtolTorch<T>,
                           kAtolTorch<T>, "momentum_buffer vs torch");
        }
    }
    OneTensor<T> x;
    CHECK_THROWS_WITH_AS(comigs::Sgd<T>({{.name = "bad",
                                          .bindings = {comigs::bind("", x.p, x.g)},
                                          .options = {.momentum = 0.0, .nesterov = true}}}),
                         doctest::Contains("nesterov"), comigs::InvalidArgument);
}

TEST_CASE_TEMPLATE("clip_grad_norm: global norm over the owned tensors, scaling only above the threshold", T, float,
                   double) {
    comigs::ParamLayout l;
    l.add("a", {2});
    l.add("b", {1});
    l.add("c", {1});
    comigs::ParamBuffer<T> p(std::move(l));
    comigs::ParamBuffer<T> g(p.layout_ptr());
    g.span("a")[0] = 3;
    g.span("a")[1] = 4;
    g.span("b")[0] = 12;
    g.span("c")[0] = 100;  // not owned: excluded from the norm and never scaled
    comigs::Sgd<T> opt({{.name = "ab", .bindings = {comigs::bind("", p, g, comigs::TensorSelector::names({"a", "b"}))}}});

    CHECK(opt.grad_norm() == 13.0);  // sqrt(9 + 16 + 144), exact in double
    const std::vector<T> before(g.all().begin(), g.all().end());
    CHECK(opt.clip_grad_norm(26.0) == 13.0);
    CHECK(bitwise_equal<T>(g.all(), before));
    CHECK(opt.clip_grad_norm(13.0) == 13.0);  // not above the threshold: untouched
    CHECK(bitwise_equal<T>(g.all(), before));

    CHECK(opt.clip_grad_norm(6.5) == 13.0);
    const T coef = static_cast<T>(6.5 / (13.0 + 1e-6));
    CHECK(g.span("a")[0] == T(3) * coef);
    CHECK(g.span("a")[1] == T(4) * coef);
    CHECK(g.span("b")[0] == T(12) * coef);
    CHECK(g.span("c")[0] == T(100));
    CHECK(opt.grad_norm() == doctest::Approx(6.5).epsilon(1e-6));

    g.span("b")[0] = std::numeric_limits<T>::infinity();
    const std::vector<T> before_inf(g.all().begin(), g.all().end());
    CHECK(std::isinf(opt.clip_grad_norm(1.0)));
    CHECK(bitwise_equal<T>(g.all(), before_inf));
    CHECK_THROWS_AS(opt.clip_grad_norm(0.0), comigs::InvalidArgument);
}

TEST_CASE_TEMPLATE("Non-finite gradients skip the step without touching parameters or moments", T, float, double) {
    Layer<T> a(1), b(2);
    const auto experts = comigs::TensorSelector::prefix("experts.");
    comigs::AdamW<T> opt({{.name = "experts",
                           .bindings = {comigs::bind("layer0", a.p, a.g, experts), comigs::bind("layer1", b.p, b.g, experts)},
                           .lr = comigs::LrSchedule::constant(1e-2)}},
                         {.max_consecutive_skips = 2});
    REQUIRE(opt.step() == comigs::StepStatus::stepped);
    REQUIRE(opt.step() == comigs::StepStatus::stepped);

    auto snapshot_state = [&] {
        std::vector<std::vector<T>> out;
        for (const auto& s : opt.state_tensors()) out.emplace_back(s.data.begin(), s.data.end());
        return out;
    };
    const std::vector<T> pa(a.p.all().begin(), a.p.all().end()), pb(b.p.all().begin(), b.p.all().end());
    const auto state0 = snapshot_state();
    auto unchanged = [&] {
        CHECK(bitwise_equal<T>(a.p.all(), pa));
        CHECK(bitwise_equal<T>(b.p.all(), pb));
        const auto now = snapshot_state();
        REQUIRE(now.size() == state0.size());
        for (std::size_t i = 0; i < now.size(); ++i) CHECK(now[i] == state0[i]);
    };

    b.g.span("experts.1.B")[7] = std::numeric_limits<T>::quiet_NaN();
    CHECK(opt.step() == comigs::StepStatus::skipped);
    unchanged();
    CHECK(opt.skipped() == 1);
    CHECK(opt.consecutive_skipped() == 1);
    CHECK(opt.steps_taken() == 2);
    CHECK(opt.iteration() == 3);
    CHECK(opt.last_skip_reason().find("layer1.experts.1.B") != std::string::npos);
    CHECK_FALSE(opt.grads_finite());

    b.g.span("experts.1.B")[7] = T(0.5);
    a.g.span("experts.0.A")[0] = -std::numeric_limits<T>::infinity();
    CHECK(opt.step() == comigs::StepStatus::skipped);
    unchanged();
    CHECK(opt.consecutive_skipped() == 2);
    // A third consecutive skip exceeds max_consecutive_skips = 2; still nothing is touched.
    CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("consecutive"), comigs::NumericError);
    unchanged();
    CHECK(opt.skipped() == 3);

    a.g.span("experts.0.A")[0] = T(0.25);
    CHECK(opt.step(1.5) == comigs::StepStatus::stepped);
    CHECK(opt.consecutive_skipped() == 0);
    CHECK(opt.skipped() == 3);
    CHECK(opt.steps_taken() == 3);
    CHECK(opt.iteration() == 6);
    CHECK_FALSE(bitwise_equal<T>(a.p.all(), pa));

    // A non-finite loss skips even with finite gradients.
    const std::vector<T> pa2(a.p.all().begin(), a.p.all().end());
    CHECK(opt.step(std::nan("")) == comigs::StepStatus::skipped);
    CHECK(bitwise_equal<T>(a.p.all(), pa2));
    CHECK(opt.skipped() == 4);
    CHECK(opt.consecutive_skipped() == 1);
    CHECK(opt.last_skip_reason().find("loss") != std::string::npos);

    // Non-finite gradients of tensors the optimiser does not own are none of its business.
    a.g.span("router.W")[3] = std::numeric_limits<T>::quiet_NaN();
    CHECK(opt.grads_finite());
    CHECK(opt.step() == comigs::StepStatus::stepped);

    // Default limit: 10 consecutive skips are tolerated, the 11th is an error.
    comigs::AdamW<T> defaults({{.name = "experts", .bindings = {comigs::bind("layer0", a.p, a.g, experts)}}});
    a.g.span("experts.0.B")[0] = std::numeric_limits<T>::quiet_NaN();
    for (int i = 0; i < 10; ++i) CHECK(defaults.step() == comigs::StepStatus::skipped);
    CHECK_THROWS_AS(defaults.step(), comigs::NumericError);
    CHECK(defaults.consecutive_skipped() == 11);
}

TEST_CASE_TEMPLATE("Isolation: two optimisers over different tensors of the same buffers never touch each other", T,
                   float, double) {
    Layer<T> l0(10), l1(11);
    const auto experts = comigs::TensorSelector::prefix("experts.");
    const auto router = comigs::TensorSelector::prefix("router.");
    comigs::AdamW<T> expert_opt({{.name = "experts",
                                  .bindings = {comigs::bind("layer0", l0.p, l0.g, experts),
                                               comigs::bind("layer1", l1.p, l1.g, experts)},
                                  .lr = comigs::LrSchedule::cosine(2e-3, 2e-4, 100),
                                  .options = {.beta2 = 0.95, .weight_decay = 0.01}}});
    comigs::AdamW<T> router_opt({{.name = "router",
                                  .bindings = {comigs::bind("layer0", l0.p, l0.g, router),
                                               comigs::bind("layer1", l1.p, l1.g, router)},
                                  .lr = comigs::LrSchedule::constant(2e-3),
                                  .options = {.beta2 = 0.95, .weight_decay = 0.01}}});
    CHECK(expert_opt.tensor_names().size() == 8);
    CHECK(router_opt.tensor_names().size() == 4);
    CHECK(expert_opt.owns(l1.p, "experts.1.B"));
    CHECK_FALSE(expert_opt.owns(l1.p, "router.W"));
    CHECK(router_opt.num_elements() == 2 * (15 + 3));

    auto copy = [](const comigs::ParamBuffer<T>& b, const char* name) {
        const auto s = b.span(name);
        return std::vector<T>(s.begin(), s.end());
    };
    const char* router_names[] = {"router.W", "router.b"};
    const char* expert_names[] = {"experts.0.A", "experts.0.B", "experts.1.A", "experts.1.B"};
    for (auto* l : {&l0, &l1})
        for (auto& v : l->g.all()) REQUIRE(v != T(0));  // every gradient nonzero

    SUBCASE("expert step leaves router parameters and gradients bitwise unchanged") {
        std::vector<std::vector<T>> rp, rg, ep;
        for (auto* l : {&l0, &l1})
            for (auto* n : router_names) rp.push_back(copy(l->p, n)), rg.push_back(copy(l->g, n));
        for (auto* l : {&l0, &l1})
            for (auto* n : expert_names) ep.push_back(copy(l->p, n));
        REQUIRE(expert_opt.step() == comigs::StepStatus::stepped);
        std::size_t k = 0;
        for (auto* l : {&l0, &l1})
            for (auto* n : router_names) {
                CHECK(copy(l->p, n) == rp[k]);
                CHECK(copy(l->g, n) == rg[k]);
                ++k;
            }
        k = 0;
        for (auto* l : {&l0, &l1})
            for (auto* n : expert_names) {
                const auto now = copy(l->p, n);
                for (std::size_t i = 0; i < now.size(); ++i) CHECK(now[i] != ep[k][i]);
                ++k;
            }
    }
    SUBCASE("router gradients never influence an expert step (no cross-talk), even NaN ones") {
        Layer<T> c0(10), c1(11);  // identical copies, but with zero router gradients
        for (auto* c : {&c0, &c1})
            for (auto* n : router_names) std::fill(c->g.span(n).begin(), c->g.span(n).end(), T(0));
        comigs::AdamW<T> clean_opt({{.name = "experts",
                                     .bindings = {comigs::bind("layer0", c0.p, c0.g, experts),
                                                  comigs::bind("layer1", c1.p, c1.g, experts)},
                                     .lr = comigs::LrSchedule::cosine(2e-3, 2e-4, 100),
                                     .options = {.beta2 = 0.95, .weight_decay = 0.01}}});
        l0.g.span("router.b")[1] = std::numeric_limits<T>::quiet_NaN();
        REQUIRE(expert_opt.step() == comigs::StepStatus::stepped);
        REQUIRE(clean_opt.step() == comigs::StepStatus::stepped);
        for (auto* n : expert_names) {
            CHECK(copy(l0.p, n) == copy(c0.p, n));
            CHECK(copy(l1.p, n) == copy(c1.p, n));
        }
    }
    SUBCASE("zero_grad of one optimiser zeroes exactly its own gradients") {
        // Fill padding too: zero_grad must not write outside the owned tensors.
        std::fill(l0.g.all().begin(), l0.g.all().end(), T(7));
        router_opt.zero_grad();
        for (auto* n : router_names)
            for (T v : l0.g.span(n)) CHECK(v == T(0));
        for (auto* n : router_names)
            for (T v : l1.g.span(n)) CHECK(v == T(0));
        Idx sevens = 0;
        for (T v : l0.g.all()) sevens += v == T(7);
        CHECK(sevens == l0.g.size() - 18);
        for (auto* n : expert_names)
            for (T v : l1.g.span(n)) CHECK(v != T(0));
    }
    SUBCASE("construction rejects overlaps, empty selections and mismatched buffers") {
        CHECK_THROWS_WITH_AS(comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("x", l0.p, l0.g, experts)}},
                                               {.name = "b", .bindings = {comigs::bind("y", l0.p, l0.g)}}}),
                             doctest::Contains("already owned"), comigs::InvalidArgument);
        CHECK_THROWS_WITH_AS(
            comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("x", l0.p, l0.g,
                                                                      comigs::TensorSelector::prefix("expert_"))}}}),
            doctest::Contains("matches no tensor"), comigs::InvalidArgument);
        CHECK_THROWS_WITH_AS(
            comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("x", l0.p, l0.g,
                                                                      comigs::TensorSelector::names({"router.V"}))}}}),
            doctest::Contains("'router.V'"), comigs::InvalidArgument);
        CHECK_THROWS_WITH_AS(comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("x", l0.p, l0.g, router),
                                                                          comigs::bind("y", l1.p, l0.p, router)}}}),
                             doctest::Contains("as gradients"), comigs::InvalidArgument);
        CHECK_THROWS_AS(comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("x", l0.p, l0.p)}}}),
                        comigs::InvalidArgument);
        CHECK_THROWS_WITH_AS(comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("", l0.p, l0.g, router),
                                                                          comigs::bind("", l1.p, l1.g, router)}}}),
                             doctest::Contains("distinct labels"), comigs::InvalidArgument);
        comigs::ParamLayout other;
        other.add("x", {3});
        comigs::ParamBuffer<T> wrong(std::move(other));
        CHECK_THROWS_AS(comigs::AdamW<T>({{.name = "a", .bindings = {comigs::bind("x", l0.p, wrong)}}}),
                        comigs::ShapeError);
    }
    SUBCASE("a buffer whose layout changed after binding is reported") {
        comigs::ParamLayout other;
        other.add("experts.0.A", {3, 5});
        l1.g = comigs::ParamBuffer<T>(std::move(other));
        CHECK_THROWS_WITH_AS(expert_opt.step(), doctest::Contains("layer1"), comigs::ShapeError);
        CHECK_THROWS_AS(expert_opt.zero_grad(), comigs::ShapeError);
    }
}

TEST_CASE_TEMPLATE("State save/restore gives a bitwise-identical continuation", T, float, double) {
    using Opt = comigs::AdamW<T>;
    auto make = [](Layer<T>& a, Layer<T>& b) {
        return Opt({{.name = "experts",
                     .bindings = {comigs::bind("layer0", a.p, a.g, comigs::TensorSelector::prefix("experts.")),
                                  comigs::bind("layer1", b.p, b.g, comigs::TensorSelector::prefix("experts."))},
                     .lr = comigs::LrSchedule::cosine(1e-2, 1e-3, 12, 2),
                     .options = {.beta2 = 0.95, .weight_decay = 0.01}},
                    {.name = "router",
                     .bindings = {comigs::bind("layer0", a.p, a.g, comigs::TensorSelector::prefix("router.")),
                                  comigs::bind("layer1", b.p, b.g, comigs::TensorSelector::prefix("router."))},
                     .lr = comigs::LrSchedule::constant(2e-3)}});
    };
    comigs::Rng grad_rng(77);
    std::vector<std::vector<T>> grads;  // gradients of 8 steps, both layers concatenated
    Layer<T> a(3), b(4);
    for (int s = 0; s < 8; ++s) {
        std::vector<T> g(static_cast<std::size_t>(a.g.size() + b.g.size()));
        fill_random(std::span<T>(g), grad_rng, 0.1);
        if (s == 2) g[5] = std::numeric_limits<T>::quiet_NaN();  // one skipped step before the snapshot
        grads.push_back(std::move(g));
    }
    auto load_grads = [&](Layer<T>& x, Layer<T>& y, int s) {
        std::copy(grads[s].begin(), grads[s].begin() + x.g.size(), x.g.all().begin());
        std::copy(grads[s].begin() + x.g.size(), grads[s].end(), y.g.all().begin());
    };

    Opt opt = make(a, b);
    for (int s = 0; s < 4; ++s) {
        load_grads(a, b, s);
        opt.step();
    }
    REQUIRE(opt.skipped() == 1);
    // Snapshot as a checkpoint writer would: copies of the named state and of the parameters.
    std::vector<std::string> names;
    std::vector<std::vector<Idx>> shapes;
    std::vector<std::vector<T>> saved;
    for (const auto& s : opt.state_tensors()) {
        names.push_back(s.name);
        shapes.push_back(s.shape);
        saved.emplace_back(s.data.begin(), s.data.end());
    }
    const auto scalars = opt.state_scalars();
    CHECK(names[0] == "layer0.experts.0.A.exp_avg");
    CHECK(names[1] == "layer0.experts.0.A.exp_avg_sq");
    CHECK(scalars[0].name == "iteration");
    CHECK(scalars[0].value == 4);
    Layer<T> a2(0), b2(0);
    std::copy(a.p.all().begin(), a.p.all().end(), a2.p.all().begin());
    std::copy(b.p.all().begin(), b.p.all().end(), b2.p.all().begin());

    for (int s = 4; s < 8; ++s) {
        load_grads(a, b, s);
        CHECK(opt.step() == comigs::StepStatus::stepped);
    }

    Opt resumed = make(a2, b2);
    std::vector<comigs::StateTensor<const T>> views;
    // Hand them over in reverse order: matching is by name.
    for (std::size_t i = names.size(); i-- > 0;) views.push_back({names[i], shapes[i], std::span<const T>(saved[i])});
    resumed.load_state(views, scalars);
    CHECK(resumed.lr(1) == opt.lr(1));
    for (int s = 4; s < 8; ++s) {
        load_grads(a2, b2, s);
        CHECK(resumed.step() == comigs::StepStatus::stepped);
    }
    CHECK(bitwise_equal<T>(a.p.all(), a2.p.all()));
    CHECK(bitwise_equal<T>(b.p.all(), b2.p.all()));
    const auto st1 = opt.state_tensors(), st2 = resumed.state_tensors();
    REQUIRE(st1.size() == st2.size());
    for (std::size_t i = 0; i < st1.size(); ++i) CHECK(bitwise_equal<T>(st1[i].data, st2[i].data));
    const auto sc1 = opt.state_scalars(), sc2 = resumed.state_scalars();
    for (std::size_t i = 0; i < sc1.size(); ++i) CHECK(sc1[i].value == sc2[i].value);

    SUBCASE("bad state is rejected and leaves the optimiser unchanged") {
        const auto before = resumed.state_scalars();
        auto bad = views;
        bad.pop_back();
        CHECK_THROWS_AS(resumed.load_state(bad, scalars), comigs::ShapeError);
        bad = views;
        bad[0].shape = {99};
        CHECK_THROWS_WITH_AS(resumed.load_state(bad, scalars), doctest::Contains(bad[0].name.c_str()), comigs::ShapeError);
        bad = views;
        bad[0].name = "layer9.experts.0.A.exp_avg";
        CHECK_THROWS_WITH_AS(resumed.load_state(bad, scalars), doctest::Contains("layer9"), comigs::ShapeError);
        std::vector<T> nan_data(saved[0]);
        nan_data[0] = std::numeric_limits<T>::quiet_NaN();
        bad = views;
        for (auto& v : bad)
            if (v.name == names[0]) v.data = nan_data;
        CHECK_THROWS_AS(resumed.load_state(bad, scalars), comigs::NumericError);
        auto bad_scalars = scalars;
        bad_scalars[0].value = 99;  // iteration != steps_taken + skipped
        CHECK_THROWS_WITH_AS(resumed.load_state(views, bad_scalars), doctest::Contains("iteration"),
                             comigs::InvalidArgument);
        const auto after = resumed.state_scalars();
        for (std::size_t i = 0; i < after.size(); ++i) CHECK(after[i].value == before[i].value);
        const auto st3 = resumed.state_tensors();
        for (std::size_t i = 0; i < st3.size(); ++i) CHECK(bitwise_equal<T>(st3[i].data, st2[i].data));
    }
}

TEST_CASE_TEMPLATE("reset_state restarts the moments of chosen tensors only (e.g. an overwritten generalist)", T,
                   float, double) {
    Layer<T> a(5), b(6);
    const auto experts = comigs::TensorSelector::prefix("experts.");
    comigs::AdamW<T> opt({{.name = "experts",
                           .bindings = {comigs::bind("layer0", a.p, a.g, experts),
                                        comigs::bind("layer1", b.p, b.g, experts)},
                           .lr = comigs::LrSchedule::constant(1e-2)}});
    for (int s = 0; s < 3; ++s) opt.step();
    const auto before = opt.state_tensors();
    std::vector<std::vector<T>> copies;
    for (const auto& s : before) copies.emplace_back(s.data.begin(), s.data.end());

    CHECK(opt.reset_state(comigs::TensorSelector::prefix("experts.0.")) == 4);  // A and B in two layers
    const auto after = opt.state_tensors();
    for (std::size_t i = 0; i < after.size(); ++i) {
        CAPTURE(after[i].name);
        if (after[i].name.find("experts.0.") != std::string::npos) {
            for (T v : after[i].data) CHECK(v == T(0));
        } else {
            CHECK(std::vector<T>(after[i].data.begin(), after[i].data.end()) == copies[i]);
        }
    }
    for (const auto& s : opt.state_scalars())
        if (s.name.ends_with(".step")) CHECK(s.value == (s.name.find("experts.0.") != std::string::npos ? 0 : 3));

    // The next step of a reset tensor is the first step of a fresh optimiser (bias correction restarts).
    Layer<T> c(5);
    std::copy(a.p.all().begin(), a.p.all().end(), c.p.all().begin());
    comigs::AdamW<T> fresh({{.name = "experts",
                             .bindings = {comigs::bind("layer0", c.p, c.g, comigs::TensorSelector::prefix("experts.0."))},
                             .lr = comigs::LrSchedule::constant(1e-2)}});
    opt.step();
    fresh.step();
    CHECK(bitwise_equal<T>(a.p.span("experts.0.A"), c.p.span("experts.0.A")));
    CHECK(bitwise_equal<T>(a.p.span("experts.0.B"), c.p.span("experts.0.B")));
}

TEST_CASE_TEMPLATE("Results are bitwise identical with 1 and 2 OpenMP threads", T, float, double) {
    // Sizes straddle the chunk size and are odd; the large one crosses the default parallel threshold.
    comigs::ParamLayout l;
    l.add("big", {1001, 97});
    l.add("odd", {8193});
    l.add("tiny", {3});
    l.add("frozen", {5000});
    const auto layout = std::make_shared<const comigs::ParamLayout>(std::move(l));
    struct Run {
        std::vector<T> params;
        std::vector<double> norms;
    };
    auto run = [&](int threads, comigs::OptimizerConfig config) {
#ifdef _OPENMP
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
#endif
        comigs::ParamBuffer<T> p(layout), g(layout);
        comigs::Rng rng(42);
        fill_random(p.all(), rng);
        comigs::AdamW<T> opt({{.name = "all",
                               .bindings = {comigs::bind("m", p, g, comigs::TensorSelector::where(
                                                                        [](std::string_view n) { return n != "frozen"; },
                                                                        "not frozen"))},
                               .lr = comigs::LrSchedule::cosine(1e-2, 1e-3, 5)}},
                             config);
        Run r;
        for (int s = 0; s < 3; ++s) {
            fill_random(g.all(), rng, 0.5);
            r.norms.push_back(opt.clip_grad_norm(100.0));  // the norm is above 100: clipping runs
            opt.step();
        }
        r.params.assign(p.all().begin(), p.all().end());
#ifdef _OPENMP
        omp_set_num_threads(saved);
#else
        (void)threads;
#endif
        return r;
    };
    for (const comigs::OptimizerConfig config :
         {comigs::OptimizerConfig{}, comigs::OptimizerConfig{.chunk_elements = 61, .min_parallel_elements = 0}}) {
        CAPTURE(config.chunk_elements);
        const Run one = run(1, config), two = run(2, config);
        CHECK(one.norms[0] > 100.0);
        CHECK(one.norms == two.norms);
        CHECK(bitwise_equal<T>(one.params, two.params));
    }
    // The norm agrees with a plain double sum to rounding.
    comigs::ParamBuffer<T> p(layout), g(layout);
    comigs::Rng rng(9);
    fill_random(g.all(), rng);
    comigs::Sgd<T> opt({{.name = "all", .bindings = {comigs::bind("", p, g, comigs::TensorSelector::names({"big", "odd", "tiny"}))}}},
                       {.chunk_elements = 100});
    double ss = 0;
    for (const char* n : {"big", "odd", "tiny"})
        for (T v : g.span(n)) ss += static_cast<double>(v) * static_cast<double>(v);
    CHECK(opt.grad_norm() == doctest::Approx(std::sqrt(ss)).epsilon(1e-12));
}
