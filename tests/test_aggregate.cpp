#include <comigs/aggregate.hpp>
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gradcheck.hpp"

namespace {
using namespace comigs;

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

/// One shared LoRA adapter of a user, values row-major: A [rank, in], B [out, rank].
/// By default alpha = rank with linear scaling, so s = 1 and hand computations stay simple.
struct Ad {
    std::string prefix;
    Index in = 1, out = 1, rank = 1;
    std::vector<double> A, B;
    double alpha = -1.0;
    LoraScaling scaling = LoraScaling::linear;

    LoraConfig config() const {
        LoraConfig c;
        c.in_features = in;
        c.out_features = out;
        c.rank = rank;
        c.alpha = alpha < 0 ? static_cast<double>(rank) : alpha;
        c.scaling = scaling;
        return c;
    }
    double scale() const { return config().scale(); }
};

Ad random_ad(std::string prefix, Index in, Index out, Index rank, Rng& rng, double alpha = -1.0,
             LoraScaling scaling = LoraScaling::linear) {
    Ad a{std::move(prefix), in, out, rank, {}, {}, alpha, scaling};
    for (Index i = 0; i < rank * in; ++i) a.A.push_back(rng.normal());
    for (Index i = 0; i < out * rank; ++i) a.B.push_back(rng.normal());
    return a;
}

template <class T>
void fill(LoraExpert<T>& e, const Ad& a) {
    REQUIRE(static_cast<Index>(a.A.size()) == a.rank * a.in);
    REQUIRE(static_cast<Index>(a.B.size()) == a.out * a.rank);
    for (std::size_t k = 0; k < a.A.size(); ++k) e.params().span("lora_A")[k] = static_cast<T>(a.A[k]);
    for (std::size_t k = 0; k < a.B.size(); ++k) e.params().span("lora_B")[k] = static_cast<T>(a.B[k]);
}

template <class T>
GeneralistUpload<T> up(UserId user, double weight, const std::vector<Ad>& ads, UploadOptions opt = {}) {
    UploadBuilder<T> b(user, weight, opt);
    for (const auto& a : ads) {
        LoraExpert<T> e(a.config());
        fill(e, a);
        b.add_shared_adapter(a.prefix, e);
    }
    return std::move(b).finish();
}

template <class T>
double tol() {
    return std::is_same_v<T, float> ? 1e-6 : 1e-13;
}

template <class T>
void check_values(std::span<const T> got, const std::vector<double>& want, double eps = tol<T>()) {
    REQUIRE(got.size() == want.size());
    for (std::size_t k = 0; k < want.size(); ++k) {
        INFO("element " << k);
        CHECK(static_cast<double>(got[k]) == doctest::Approx(want[k]).epsilon(eps));
    }
}

template <class T>
bool same(const SharedAggregate<T>& a, const SharedAggregate<T>& b) {
    if (a.tensors().size() != b.tensors().size() || a.size() != b.size()) return false;
    for (std::size_t k = 0; k < a.tensors().size(); ++k) {
        const auto &x = a.tensors()[k], &y = b.tensors()[k];
        if (x.name != y.name || x.rows != y.rows || x.cols != y.cols || x.rank != y.rank || x.alpha != y.alpha ||
            x.scaling != y.scaling || x.scale != y.scale || x.rank_policy != y.rank_policy || x.offset != y.offset)
            return false;
    }
    return std::memcmp(a.values().data(), b.values().data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0;
}

/// The device-side product s B A after downloading `agg` into an adapter configured like `like`.
template <class T>
Eigen::MatrixXd device_product(const SharedAggregate<T>& agg, const Ad& like, UserId user = 1) {
    LoraExpert<T> e(like.config());
    Downloader<T> d(agg, user);
    d.add_shared_adapter(like.prefix, e);
    const auto rep = d.apply();
    REQUIRE(rep.written.size() == 2);
    return static_cast<double>(e.scale()) * eigen(e.B()).template cast<double>() * eigen(e.A()).template cast<double>();
}

Eigen::MatrixXd product(const Ad& a) {
    Eigen::MatrixXd A(a.rank, a.in), B(a.out, a.rank);
    for (Index i = 0; i < a.rank; ++i)
        for (Index j = 0; j < a.in; ++j) A(i, j) = a.A[static_cast<std::size_t>(i * a.in + j)];
    for (Index i = 0; i < a.out; ++i)
        for (Index j = 0; j < a.rank; ++j) B(i, j) = a.B[static_cast<std::size_t>(i * a.rank + j)];
    return a.scale() * B * A;
}

std::vector<UserId> ids(const std::vector<ExcludedUpload>& e) {
    std::vector<UserId> v;
    for (const auto& x : e) v.push_back(x.user);
    return v;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Linear rules by hand

TEST_CASE_TEMPLATE("aggregate: FedAvg uniform and token-weighted, by hand", T, float, double) {
    const std::vector<GeneralistUpload<T>> ups = {up<T>(1, 1.0, {{"attn.", 2, 2, 1, {1, 2}, {3, 4}}}),
                                                  up<T>(2, 3.0, {{"attn.", 2, 2, 1, {3, 6}, {5, 0}}})};
    const auto uni = aggregate(ups, AggregationConfig::fedavg());
    check_values<T>(uni.aggregate.span("attn.lora_A"), {2, 4});
    check_values<T>(uni.aggregate.span("attn.lora_B"), {4, 2});
    const auto& ia = uni.aggregate.at("attn.lora_A");
    CHECK(ia.rank == 1);
    CHECK(ia.scale == 1.0);
    CHECK(ia.rank_policy == RankPolicy::exact);
    CHECK(uni.report.included == std::vector<UserId>{1, 2});
    CHECK(uni.report.upload_weights == std::vector<double>{1.0, 3.0});
    CHECK(uni.report.tensor("attn.lora_B")->weights == std::vector<double>{0.5, 0.5});
    CHECK(uni.report.excluded.empty());

    // Weighted by training tokens 1 : 3: A = (1 [1, 2] + 3 [3, 6]) / 4, B = ([3, 4] + 3 [5, 0]) / 4.
    const auto tok = aggregate(ups, AggregationConfig::fedavg(Weighting::tokens));
    check_values<T>(tok.aggregate.span("attn.lora_A"), {2.5, 5});
    check_values<T>(tok.aggregate.span("attn.lora_B"), {4.5, 1});
    CHECK(tok.report.tensor("attn.lora_A")->weights == std::vector<double>{0.25, 0.75});
    CHECK(tok.report.summary().find("fedavg (tokens): 2 users") != std::string::npos);
}

TEST_CASE_TEMPLATE("aggregate: each tensor over the users holding it, weights renormalised", T, float, double) {
    // User 1 holds a. and b., user 2 only a., user 3 only b. (heterogeneous expert sets).
    const std::vector<GeneralistUpload<T>> ups = {
        up<T>(3, 3.0, {{"b.", 1, 1, 1, {6}, {60}}}),
        up<T>(1, 1.0, {{"a.", 1, 1, 1, {1}, {10}}, {"b.", 1, 1, 1, {2}, {20}}}),
        up<T>(2, 2.0, {{"a.", 1, 1, 1, {4}, {40}}}),
    };
    const auto r = aggregate(ups, AggregationConfig::fedavg(Weighting::tokens));
    check_values<T>(r.aggregate.span("a.lora_A"), {(1 * 1 + 2 * 4) / 3.0});
    check_values<T>(r.aggregate.span("a.lora_B"), {(1 * 10 + 2 * 40) / 3.0});
    check_values<T>(r.aggregate.span("b.lora_A"), {(1 * 2 + 3 * 6) / 4.0});
    check_values<T>(r.aggregate.span("b.lora_B"), {(1 * 20 + 3 * 60) / 4.0});
    CHECK(r.report.tensor("a.lora_A")->users == std::vector<UserId>{1, 2});
    CHECK(r.report.tensor("b.lora_B")->users == std::vector<UserId>{1, 3});
    CHECK(r.report.tensor("b.lora_B")->weights == std::vector<double>{0.25, 0.75});

    auto strict = AggregationConfig::fedavg();
    strict.require_all_tensors = true;
    expect_error<InvalidArgument>([&] { aggregate(ups, strict); }, {"user 3", "tensor 'a.lora_A'", "missing"});
}

TEST_CASE_TEMPLATE("aggregate: HetLoRA zero-padding, scale folding and norm weighting, by hand", T, float, double) {
    const Ad u1{"x.", 2, 2, 1, {1, 1}, {2, 0}};
    Ad u2{"x.", 2, 2, 2, {3, 1, 1, -1}, {0, 2, 4, 0}};
    SUBCASE("equal scales, uniform") {
        const auto r = aggregate(std::vector{up<T>(1, 1.0, {u1}), up<T>(2, 1.0, {u2})}, AggregationConfig::hetlora());
        // A1 padded to [[1, 1], [0, 0]], B1 to [[2, 0], [0, 0]]; halves of the sums.
        check_values<T>(r.aggregate.span("x.lora_A"), {2, 1, 0.5, -0.5});
        check_values<T>(r.aggregate.span("x.lora_B"), {1, 1, 2, 0});
        CHECK(r.aggregate.at("x.lora_A").rank == 2);
        CHECK(r.aggregate.at("x.lora_A").rank_policy == RankPolicy::truncate);
        // User 1 truncates back to rank 1.
        LoraExpert<T> dev(u1.config());
        Downloader<T> d(r.aggregate, 1);
        d.add_shared_adapter("x.", dev).apply();
        check_values<T>(dev.params().span("lora_A"), {2, 1});
        check_values<T>(dev.params().span("lora_B"), {1, 2});
    }
    SUBCASE("different scales are folded to the largest rank's scale") {
        u2.alpha = 8.0;  // linear, rank 2: s2 = 4; s1 = 1, so user 1's factors are scaled by sqrt(1/4)
        const auto r = aggregate(std::vector{up<T>(1, 1.0, {u1}), up<T>(2, 1.0, {u2})}, AggregationConfig::hetlora());
        check_values<T>(r.aggregate.span("x.lora_A"), {1.75, 0.75, 0.5, -0.5});
        check_values<T>(r.aggregate.span("x.lora_B"), {0.5, 1, 2, 0});
        CHECK(r.aggregate.at("x.lora_B").scale == 4.0);
        CHECK(r.aggregate.at("x.lora_B").alpha == 8.0);
        // User 1 (s = 1) gets both factors times sqrt(4 / 1) = 2.
        LoraExpert<T> dev(u1.config());
        Downloader<T> d(r.aggregate, 1);
        const auto rep = d.add_shared_adapter("x.", dev).apply();
        CHECK(rep.written[0].factor == 2.0);
        check_values<T>(dev.params().span("lora_A"), {3.5, 1.5});
        check_values<T>(dev.params().span("lora_B"), {1, 4});
    }
    SUBCASE("norm-weighted: weights proportional to ||s B A||_F") {
        // B1 A1 = [[2, 2], [0, 0]]: norm 2 sqrt(2). B2 A2 = [[2, -2], [12, 4]]: norm sqrt(168) = 2 sqrt(42).
        const double w1 = 1.0 / (1.0 + std::sqrt(21.0)), w2 = 1.0 - w1;
        const auto r = aggregate(std::vector{up<T>(1, 1.0, {u1}), up<T>(2, 1.0, {u2})},
                                 AggregationConfig::hetlora(Weighting::update_norm));
        check_values<T>(r.aggregate.span("x.lora_A"), {w1 + 3 * w2, w1 + w2, w2, -w2}, 1e-6);
        check_values<T>(r.aggregate.span("x.lora_B"), {2 * w1, 2 * w2, 4 * w2, 0}, 1e-6);
        const auto& wts = r.report.tensor("x.lora_A")->weights;
        REQUIRE(wts.size() == 2);
        CHECK(wts[0] == doctest::Approx(w1).epsilon(1e-12));
        CHECK(wts[1] == doctest::Approx(w2).epsilon(1e-12));
    }
    SUBCASE("norm-weighted with every update zero falls back to uniform") {
        Ad z1 = u1, z2 = u2;
        z1.B = {0, 0};
        z2.B = {0, 0, 0, 0};
        const auto r = aggregate(std::vector{up<T>(1, 1.0, {z1}), up<T>(2, 1.0, {z2})},
                                 AggregationConfig::hetlora(Weighting::update_norm));
        check_values<T>(r.aggregate.span("x.lora_A"), {2, 1, 0.5, -0.5});
        CHECK(r.report.notes.size() == 1);
    }
}

TEST_CASE_TEMPLATE("aggregate: HetLoRA pad then truncate is the identity; equal ranks give FedAvg bitwise", T, float,
                   double) {
    Rng rng(3);
    const Ad a = random_ad("x.", 5, 3, 2, rng);
    LoraExpert<T> e(a.config());
    fill(e, a);
    const auto pa = pad_rank<T>(e.A(), LoraFactor::A, 4);
    const auto pb = pad_rank<T>(e.B(), LoraFactor::B, 4);
    for (Index j = 0; j < 5; ++j) CHECK(pa[static_cast<std::size_t>(2 * 5 + j)] == T(0));
    for (Index i = 0; i < 3; ++i) CHECK(pb[static_cast<std::size_t>(i * 4 + 3)] == T(0));
    const auto ta = truncate_rank<T>(ConstMatrixView<T>(pa.data(), 4, 5), LoraFactor::A, 2);
    const auto tb = truncate_rank<T>(ConstMatrixView<T>(pb.data(), 3, 4), LoraFactor::B, 2);
    CHECK(std::memcmp(ta.data(), e.A().data, ta.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(tb.data(), e.B().data, tb.size() * sizeof(T)) == 0);
    CHECK_THROWS_AS(pad_rank<T>(e.A(), LoraFactor::A, 1), ShapeError);

    // One user: aggregate then download gives back its own factors, bit for bit.
    const auto one = aggregate(std::vector{up<T>(4, 2.0, {a})}, AggregationConfig::hetlora());
    LoraExpert<T> back(a.config());
    Downloader<T> d(one.aggregate, 4);
    d.add_shared_adapter("x.", back).apply();
    CHECK(std::memcmp(back.A().data, e.A().data, 10 * sizeof(T)) == 0);
    CHECK(std::memcmp(back.B().data, e.B().data, 6 * sizeof(T)) == 0);

    // Equal ranks and scales: HetLoRA is FedAvg.
    std::vector<GeneralistUpload<T>> ups;
    for (UserId u = 1; u <= 4; ++u)
        ups.push_back(up<T>(u, static_cast<double>(u), {random_ad("x.", 5, 3, 2, rng, 16.0, LoraScaling::sqrt)}));
    for (Weighting w : {Weighting::uniform, Weighting::tokens}) {
        const auto h = aggregate(ups, AggregationConfig::hetlora(w)).aggregate;
        const auto f = aggregate(ups, AggregationConfig::fedavg(w)).aggregate;
        REQUIRE(h.size() == f.size());
        CHECK(std::memcmp(h.values().data(), f.values().data(), static_cast<std::size_t>(h.size()) * sizeof(T)) == 0);
    }
}

TEST_CASE_TEMPLATE("aggregate: FlexLoRA by hand", T, float, double) {
    // M = 1/2 [[1, 0], [0, 0]] + 1/2 [[0, 0], [0, 2]] = diag(0.5, 1): singular values 1 and 0.5.
    const Ad u1{"x.", 2, 2, 1, {1, 0}, {1, 0}};
    const Ad u2{"x.", 2, 2, 1, {0, 1}, {0, 2}};
    const std::vector<GeneralistUpload<T>> ups = {up<T>(1, 3.0, {u1}), up<T>(2, 1.0, {u2})};
    const auto r = aggregate(ups, AggregationConfig::flexlora(Weighting::uniform));
    REQUIRE(r.report.spectra.size() == 1);
    const auto& sp = r.report.spectra[0];
    CHECK(sp.pair == "x");
    REQUIRE(sp.singular_values.size() == 2);
    CHECK(sp.singular_values[0] == doctest::Approx(1.0).epsilon(1e-12));
    CHECK(sp.singular_values[1] == doctest::Approx(0.5).epsilon(1e-12));
    CHECK(sp.kept_rank == 1);
    CHECK(sp.discarded_energy == doctest::Approx(0.25).epsilon(1e-12));
    const auto& info = r.aggregate.at("x.lora_A");
    CHECK(info.scale == 1.0);
    CHECK(info.rank_policy == RankPolicy::truncate);
    // Rank-1 truncation: [[0, 0], [0, 1]], at the device's own scale (1, then 4).
    Eigen::MatrixXd want(2, 2);
    want << 0, 0, 0, 1;
    CHECK((device_product(r.aggregate, u1) - want).norm() < 10 * tol<T>());
    Ad s4 = u1;
    s4.alpha = 4.0;
    CHECK((device_product(r.aggregate, s4) - want).norm() < 10 * tol<T>());

    // Weighted by data size 3 : 1: M = diag(0.75, 0.5), the top component flips.
    const auto t = aggregate(ups, AggregationConfig::flexlora());
    want << 0.75, 0, 0, 0;
    CHECK((device_product(t.aggregate, u1) - want).norm() < 10 * tol<T>());
}

TEST_CASE("aggregate: FlexLoRA gives each user the rank-r_j truncation of the averaged product") {
    Rng rng(17);
    // CoMiGS scaling alpha / sqrt(r) with alpha = 16, ranks 2, 3, 4 (scales 11.3, 9.2, 8).
    std::vector<Ad> ads;
    std::vector<GeneralistUpload<double>> ups;
    const double weights[3] = {100, 300, 200};
    for (Index k = 0; k < 3; ++k) {
        ads.push_back(random_ad("x.", 7, 6, k + 2, rng, 16.0, LoraScaling::sqrt));
        ups.push_back(up<double>(static_cast<UserId>(k + 1), weights[k], {ads.back()}));
    }
    Eigen::MatrixXd M = Eigen::MatrixXd::Zero(6, 7);
    for (int k = 0; k < 3; ++k) M += weights[k] / 600.0 * product(ads[static_cast<std::size_t>(k)]);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(M, Eigen::ComputeFullU | Eigen::ComputeFullV);
    const Eigen::VectorXd sv = svd.singularValues();

    const auto r = aggregate(ups, AggregationConfig::flexlora());
    CHECK(r.aggregate.at("x.lora_A").rank == 4);
    for (std::size_t k = 0; k < 6; ++k)
        CHECK(r.report.spectra[0].singular_values[k] == doctest::Approx(sv(static_cast<Index>(k))).epsilon(1e-10));
    for (const Ad& a : ads) {
        const Index rj = a.rank;
        const Eigen::MatrixXd P = device_product(r.aggregate, a);
        double tail = 0.0;
        for (Index k = rj; k < sv.size(); ++k) tail += sv(k) * sv(k);
        INFO("rank " << rj);
        CHECK((M - P).squaredNorm() == doctest::Approx(tail).epsilon(1e-9));
        const Eigen::MatrixXd best = svd.matrixU().leftCols(rj) * sv.head(rj).asDiagonal() *
                                     svd.matrixV().leftCols(rj).transpose();
        CHECK((P - best).norm() < 1e-10 * M.norm());
    }

    // Reference bug 1: the server kept only the last user's update. Ours is not that.
    const Eigen::MatrixXd P4 = device_product(r.aggregate, ads[2]);
    CHECK((P4 - product(ads[2])).norm() > 0.1 * P4.norm());
    // Reference bug 2: 16 / r where the forward uses 16 / sqrt(r). With 16 / r the product would be
    // that of M_bad; ours matches M (checked above) and is far from M_bad's truncation.
    Eigen::MatrixXd Mbad = Eigen::MatrixXd::Zero(6, 7);
    for (int k = 0; k < 3; ++k) {
        const Ad& a = ads[static_cast<std::size_t>(k)];
        Mbad += weights[k] / 600.0 * (16.0 / static_cast<double>(a.rank)) / a.scale() * product(a);
    }
    Eigen::JacobiSVD<Eigen::MatrixXd> bad(Mbad, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::MatrixXd Pbad =
        bad.matrixU().leftCols(4) * bad.singularValues().head(4).asDiagonal() * bad.matrixV().leftCols(4).transpose();
    CHECK((P4 - Pbad).norm() > 0.1 * P4.norm());

    // When the average has rank <= r (all users identical), every user reconstructs it.
    std::vector<GeneralistUpload<double>> same_ups;
    for (UserId u = 1; u <= 3; ++u) same_ups.push_back(up<double>(u, 10.0 * static_cast<double>(u), {ads[1]}));
    const auto s = aggregate(same_ups, AggregationConfig::flexlora());
    const Eigen::MatrixXd Ps = device_product(s.aggregate, ads[1]);
    CHECK((Ps - product(ads[1])).norm() < 1e-12 * product(ads[1]).norm());
    CHECK(s.report.spectra[0].discarded_energy < 1e-20 * product(ads[1]).squaredNorm());
}

TEST_CASE_TEMPLATE("aggregate: FFA-LoRA: A from one seed on every device, only B averaged", T, float, double) {
    LoraConfig c;
    c.in_features = 2;
    c.out_features = 2;
    c.rank = 1;
    c.alpha = 1.0;
    c.scaling = LoraScaling::linear;
    LoraExpert<T> d1(c), d2(c), d3(c);
    ffa_init_lora_A(d1, "attn.", 5);
    ffa_init_lora_A(d2, "attn.", 5);
    ffa_init_lora_A(d3, "attn.", 6);
    CHECK(std::memcmp(d1.A().data, d2.A().data, 2 * sizeof(T)) == 0);
    CHECK(std::memcmp(d1.A().data, d3.A().data, 2 * sizeof(T)) != 0);
    CHECK(d1.A()(0, 0) != T(0));
    LoraExpert<T> d4(c);
    ffa_init_lora_A(d4, "mlp.", 5);
    CHECK(std::memcmp(d1.A().data, d4.A().data, 2 * sizeof(T)) != 0);  // the stream depends on the name

    auto upload = [](UserId u, LoraExpert<T>& e, std::vector<T> B, bool send_a = true) {
        std::copy(B.begin(), B.end(), e.B().data);
        UploadBuilder<T> b(u, 1.0, UploadOptions{.send_lora_A = send_a});
        b.add_shared_adapter("attn.", e);
        return std::move(b).finish();
    };
    const auto r = aggregate(std::vector{upload(1, d1, {1, 2}), upload(2, d2, {3, 8})}, AggregationConfig::ffa_lora());
    CHECK(std::memcmp(r.aggregate.span("attn.lora_A").data(), d1.A().data, 2 * sizeof(T)) == 0);
    check_values<T>(r.aggregate.span("attn.lora_B"), {2, 5});

    expect_error<InvalidArgument>(
        [&] { aggregate(std::vector{upload(1, d1, {1, 2}), upload(7, d3, {3, 8})}, AggregationConfig::ffa_lora()); },
        {"user 7", "tensor 'attn.lora_A'", "differs"});

    // Devices may send only B; the aggregate then has no A and a download keeps the frozen A.
    const auto bonly = aggregate(std::vector{upload(1, d1, {1, 2}, false), upload(2, d2, {3, 8}, false)},
                                 AggregationConfig::ffa_lora());
    CHECK_FALSE(bonly.aggregate.contains("attn.lora_A"));
    check_values<T>(bonly.aggregate.span("attn.lora_B"), {2, 5});
    const std::vector<T> a_before(d1.A().data, d1.A().data + 2);
    Downloader<T> dl(bonly.aggregate, 1);
    const auto rep = dl.add_shared_adapter("attn.", d1).apply();
    CHECK(rep.kept == std::vector<std::string>{"attn.lora_A"});
    CHECK(std::memcmp(a_before.data(), d1.A().data, 2 * sizeof(T)) == 0);
    check_values<T>(std::span<const T>(d1.B().data, 2), {2, 5});
    // A mixed fleet: A from those who sent it.
    const auto mixed = aggregate(std::vector{upload(1, d1, {1, 2}, false), upload(2, d2, {3, 8})},
                                 AggregationConfig::ffa_lora());
    CHECK(mixed.aggregate.contains("attn.lora_A"));
    // Only FFA-LoRA accepts B-only uploads.
    expect_error<InvalidArgument>(
        [&] { aggregate(std::vector{upload(3, d1, {1, 2}, false)}, AggregationConfig::fedavg()); },
        {"user 3", "without lora_A"});
}

TEST_CASE_TEMPLATE("aggregate: stacking is exact, by hand", T, float, double) {
    const Ad u1{"x.", 2, 2, 1, {1, 2}, {1, 1}};
    const Ad u2{"x.", 2, 2, 1, {0, 1}, {3, 0}, 2.0};  // s = 2
    const std::vector<GeneralistUpload<T>> ups = {up<T>(2, 3.0, {u2}), up<T>(1, 1.0, {u1})};
    const auto r = aggregate(ups, AggregationConfig::stacking());
    // B = [w1 s1 B1 | w2 s2 B2] = [[0.5, 3], [0.5, 0]], A = [A1; A2].
    check_values<T>(r.aggregate.span("x.lora_B"), {0.5, 3, 0.5, 0});
    check_values<T>(r.aggregate.span("x.lora_A"), {1, 2, 0, 1});
    const auto& i = r.aggregate.at("x.lora_B");
    CHECK(i.rank == 2);
    CHECK(i.scale == 1.0);
    CHECK(i.alpha == 2.0);
    CHECK(i.scaling == LoraScaling::linear);
    CHECK(i.rank_policy == RankPolicy::exact);
    // B A = sum_i w_i s_i B_i A_i = [[0.5, 4], [0.5, 1]], also after download into a rank-2 adapter
    // with another scale.
    Eigen::MatrixXd want(2, 2);
    want << 0.5, 4, 0.5, 1;
    CHECK((0.5 * product(u1) + 0.5 * product(u2) - want).norm() == 0.0);
    Ad dev{"x.", 2, 2, 2, {0, 0, 0, 0}, {0, 0, 0, 0}, 4.0};  // s = 2
    CHECK((device_product(r.aggregate, dev) - want).norm() < 10 * tol<T>());
    expect_error<ShapeError>([&] { device_product(r.aggregate, u1, 5); }, {"user 5", "x.lora_A", "rank"});

    const auto t = aggregate(ups, AggregationConfig::stacking(Weighting::tokens));
    check_values<T>(t.aggregate.span("x.lora_B"), {0.25, 4.5, 0.25, 0});
}

// ------------------------------------------------------------------------------------------------
// Robust rules

TEST_CASE_TEMPLATE("aggregate: norm clipping of the update, by hand", T, float, double) {
    // Reference (previous global) A = 1, B = 1. User 1's update (3, 4) has norm 5 and is clipped to
    // C = 1: (0.6, 0.8). User 2's (0.3, 0.4) has norm 0.5 and is kept.
    const auto ref = aggregate(std::vector{up<T>(9, 1.0, {{"x.", 1, 1, 1, {1}, {1}}})}, AggregationConfig::fedavg());
    const std::vector<GeneralistUpload<T>> ups = {up<T>(1, 1.0, {{"x.", 1, 1, 1, {4}, {5}}}),
                                                  up<T>(2, 1.0, {{"x.", 1, 1, 1, {1.3}, {1.4}}})};
    const auto r = aggregate(ups, AggregationConfig::norm_clip(1.0), &ref.aggregate);
    CHECK(r.report.reference_used);
    check_values<T>(r.aggregate.span("x.lora_A"), {1.45}, 1e-6);
    check_values<T>(r.aggregate.span("x.lora_B"), {1.6}, 1e-6);
    REQUIRE(r.report.clipping.size() == 2);
    CHECK(r.report.clipping[0].norm == doctest::Approx(5.0).epsilon(1e-6));
    CHECK(r.report.clipping[0].factor == doctest::Approx(0.2).epsilon(1e-6));
    CHECK(r.report.clipping[1].factor == 1.0);

    // Without a reference the values themselves are clipped: (4, 5) to norm 1, (1.3, 1.4) too.
    const auto v = aggregate(ups, AggregationConfig::norm_clip(1.0));
    CHECK_FALSE(v.report.reference_used);
    const double n1 = std::sqrt(41.0), n2 = std::sqrt(1.3 * 1.3 + 1.4 * 1.4);
    check_values<T>(v.aggregate.span("x.lora_A"), {(4 / n1 + 1.3 / n2) / 2}, 1e-6);
    check_values<T>(v.aggregate.span("x.lora_B"), {(5 / n1 + 1.4 / n2) / 2}, 1e-6);

    // The reference must hold the users' tensors with their shapes.
    const auto other = aggregate(std::vector{up<T>(9, 1.0, {{"y.", 1, 1, 1, {1}, {1}}})}, AggregationConfig::fedavg());
    expect_error<InvalidArgument>([&] { aggregate(ups, AggregationConfig::norm_clip(1.0), &other.aggregate); },
                                  {"user 1", "tensor 'x.lora_A'", "reference"});
    const auto wide = aggregate(std::vector{up<T>(9, 1.0, {{"x.", 2, 1, 1, {1, 1}, {1}}})}, AggregationConfig::fedavg());
    expect_error<ShapeError>([&] { aggregate(ups, AggregationConfig::norm_clip(1.0), &wide.aggregate); },
                             {"user 1", "tensor 'x.lora_A'", "reference"});
}

TEST_CASE("aggregate: clipping bounds each user's influence by w C") {
    Rng rng(5);
    const Ad ref_ad = random_ad("x.", 3, 4, 2, rng);
    const auto ref = aggregate(std::vector{up<double>(99, 1.0, {ref_ad})}, AggregationConfig::fedavg());
    std::vector<Ad> honest;
    for (int k = 0; k < 5; ++k) {
        Ad a = ref_ad;
        for (auto& v : a.A) v += 0.1 * rng.normal();
        for (auto& v : a.B) v += 0.1 * rng.normal();
        honest.push_back(a);
    }
    auto attack = [&](double factor) {
        Ad a = honest[0];
        for (std::size_t k = 0; k < a.A.size(); ++k) a.A[k] = ref_ad.A[k] + factor * (a.A[k] - ref_ad.A[k]);
        for (std::size_t k = 0; k < a.B.size(); ++k) a.B[k] = ref_ad.B[k] + factor * (a.B[k] - ref_ad.B[k]);
        return a;
    };
    const double C = 0.05;
    for (Weighting w : {Weighting::uniform, Weighting::tokens})
        for (double factor : {1e6, -1.0, -1e6}) {
            std::vector<GeneralistUpload<double>> with, without;
            for (std::size_t k = 0; k < honest.size(); ++k) {
                with.push_back(up<double>(k + 1, 10.0, {honest[k]}));
                without.push_back(up<double>(k + 1, 10.0, {honest[k]}));
            }
            with.push_back(up<double>(50, 30.0, {attack(factor)}));
            without.push_back(up<double>(50, 30.0, {ref_ad}));  // the same user with a zero update
            const auto a = aggregate(with, AggregationConfig::norm_clip(C, w), &ref.aggregate).aggregate;
            const auto b = aggregate(without, AggregationConfig::norm_clip(C, w), &ref.aggregate).aggregate;
            double d = 0.0;
            for (Index e = 0; e < a.size(); ++e) d += std::pow(a.values()[static_cast<std::size_t>(e)] - b.values()[static_cast<std::size_t>(e)], 2);
            const double share = w == Weighting::uniform ? 1.0 / 6.0 : 30.0 / 80.0;
            INFO("factor " << factor << " weighting " << std::string(to_string(w)));
            CHECK(std::sqrt(d) <= share * C * (1 + 1e-12));
            if (std::abs(factor) > 1) CHECK(std::sqrt(d) >= 0.99 * share * C);  // clipped to exactly C
        }
}

TEST_CASE_TEMPLATE("aggregate: median, trimmed mean and Krum, by hand", T, float, double) {
    auto scalar_users = [](std::vector<double> a, std::vector<double> b) {
        std::vector<GeneralistUpload<T>> ups;
        for (std::size_t k = 0; k < a.size(); ++k) ups.push_back(up<T>(k + 1, 1.0, {{"x.", 1, 1, 1, {a[k]}, {b[k]}}}));
        return ups;
    };
    const auto m3 = aggregate(scalar_users({1, 2, 100}, {5, -3, 0}), AggregationConfig::median());
    check_values<T>(m3.aggregate.span("x.lora_A"), {2});
    check_values<T>(m3.aggregate.span("x.lora_B"), {0});
    CHECK(m3.report.tensor("x.lora_A")->weights.empty());
    const auto m4 = aggregate(scalar_users({1, 2, 3, 100}, {0, 0, 0, 0}), AggregationConfig::median());
    check_values<T>(m4.aggregate.span("x.lora_A"), {2.5});

    const auto t5 = aggregate(scalar_users({1, 2, 3, 4, 100}, {-50, 1, 1, 1, 2}), AggregationConfig::trimmed_mean(1));
    check_values<T>(t5.aggregate.span("x.lora_A"), {3});
    check_values<T>(t5.aggregate.span("x.lora_B"), {1});
    const auto t0 = aggregate(scalar_users({1, 2, 3, 4, 100}, {0, 0, 0, 0, 0}), AggregationConfig::trimmed_mean(0));
    check_values<T>(t0.aggregate.span("x.lora_A"), {22});
    expect_error<InvalidArgument>(
        [&] { aggregate(scalar_users({1, 2, 3, 4}, {0, 0, 0, 0}), AggregationConfig::trimmed_mean(2)); },
        {"trim f = 2", "2f < n", "x.lora_A", "n = 4"});

    // Krum, f = 1, n = 5: each user's score is its 2 smallest squared distances. Scores: user 1
    // 0.0025 + 0.01, user 2 0.0025 + 0.01, user 3 0.01 + 0.0225, user 4 0.0025 + 0.0025, user 5 huge.
    const auto k = aggregate(scalar_users({1.0, 1.1, 0.9, 1.05, 50}, {0, 0, 0, 0, 0}), AggregationConfig::krum(1));
    REQUIRE(k.report.krum_selected.has_value());
    CHECK(*k.report.krum_selected == 4);
    check_values<T>(k.aggregate.span("x.lora_A"), {1.05});
    expect_error<InvalidArgument>(
        [&] { aggregate(scalar_users({1, 2, 3, 4}, {0, 0, 0, 0}), AggregationConfig::krum(1)); },
        {"krum", "n > 2f + 2"});
}

TEST_CASE_TEMPLATE("aggregate: median and trimmed mean stay within the honest range under f < n/2 attackers", T,
                   float, double) {
    // Bound: with at most f < n/2 arbitrary uploads, every coordinate of the median, and of the
    // trimmed mean trimming at least f per side, lies in [min, max] of the honest users' values.
    Rng rng(8);
    std::vector<Ad> honest;
    for (int k = 0; k < 4; ++k) honest.push_back(random_ad("x.", 3, 4, 2, rng));
    std::vector<Ad> attackers = {honest[0], honest[1], honest[2]};
    for (auto& v : attackers[0].A) v = -v;  // sign flip
    for (auto& v : attackers[0].B) v = -v;
    for (auto& v : attackers[1].A) v *= 1e6;  // scaling
    for (auto& v : attackers[1].B) v *= 1e6;
    for (auto& v : attackers[2].A) v *= -1e6;
    for (auto& v : attackers[2].B) v *= -1e6;
    std::vector<GeneralistUpload<T>> ups;
    for (std::size_t k = 0; k < 4; ++k) ups.push_back(up<T>(k + 1, 1.0, {honest[k]}));
    for (std::size_t k = 0; k < 3; ++k) ups.push_back(up<T>(k + 10, 1.0, {attackers[k]}));
    const std::vector<GeneralistUpload<T>> honest_ups(ups.begin(), ups.begin() + 4);

    auto within = [&](const SharedAggregate<T>& agg) {
        int outside = 0;
        for (const auto& i : agg.tensors())
            for (Index e = 0; e < i.size(); ++e) {
                double lo = INFINITY, hi = -INFINITY;
                for (const auto& u : honest_ups) {
                    const double v = static_cast<double>(u.span(i.name)[static_cast<std::size_t>(e)]);
                    lo = std::min(lo, v);
                    hi = std::max(hi, v);
                }
                const double x = static_cast<double>(agg.span(i)[static_cast<std::size_t>(e)]);
                outside += x < lo - 1e-6 * std::abs(lo) || x > hi + 1e-6 * std::abs(hi);
            }
        return outside;
    };
    CHECK(within(aggregate(ups, AggregationConfig::median()).aggregate) == 0);
    CHECK(within(aggregate(ups, AggregationConfig::trimmed_mean(3)).aggregate) == 0);
    CHECK(within(aggregate(ups, AggregationConfig::fedavg()).aggregate) > 0);  // the attack is real
}

TEST_CASE("aggregate: DP-FedAvg clips, adds seeded Gaussian noise and reports its settings") {
    // Without noise it is the uniform clipped mean (same numbers as the clipping case by hand).
    const auto ref = aggregate(std::vector{up<double>(9, 1.0, {{"x.", 1, 1, 1, {1}, {1}}})}, AggregationConfig::fedavg());
    const std::vector<GeneralistUpload<double>> two = {up<double>(1, 5.0, {{"x.", 1, 1, 1, {4}, {5}}}),
                                                       up<double>(2, 1.0, {{"x.", 1, 1, 1, {1.3}, {1.4}}})};
    const auto z0 = aggregate(two, AggregationConfig::dp_fedavg(1.0, 0.0, 3), &ref.aggregate);
    check_values<double>(z0.aggregate.span("x.lora_A"), {1.45}, 1e-12);
    check_values<double>(z0.aggregate.span("x.lora_B"), {1.6}, 1e-12);

    // Noise: 4 users whose update is zero, so n (x - ref) is the noise itself, N(0, (z C)^2).
    Rng rng(2);
    const Ad base = random_ad("x.", 40, 40, 8, rng);
    const auto ref2 = aggregate(std::vector{up<double>(9, 1.0, {base})}, AggregationConfig::fedavg());
    std::vector<GeneralistUpload<double>> ups;
    for (UserId u = 1; u <= 4; ++u) ups.push_back(up<double>(u, 1.0, {base}));
    const double C = 2.0, z = 0.7;
    const auto r = aggregate(ups, AggregationConfig::dp_fedavg(C, z, 1234, 5), &ref2.aggregate);
    REQUIRE(r.report.dp.has_value());
    CHECK(r.report.dp->clip_norm == C);
    CHECK(r.report.dp->noise_multiplier == z);
    CHECK(r.report.dp->noise_stddev == doctest::Approx(z * C));
    CHECK(r.report.dp->users == 4);
    CHECK(r.report.dp->seed == 1234);
    CHECK(r.report.dp->stream == 5);
    CHECK(r.report.summary().find("DP C=2 z=0.7 n=4") != std::string::npos);
    double sum = 0.0, sq = 0.0;
    const auto x = r.aggregate.values(), x0 = ref2.aggregate.values();
    for (std::size_t e = 0; e < x.size(); ++e) {
        const double noise = 4.0 * (x[e] - x0[e]);
        sum += noise;
        sq += noise * noise;
    }
    const double n = static_cast<double>(x.size()), mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
    CHECK(n == 640);
    CHECK(std::abs(mean) < 4 * z * C / std::sqrt(n));
    CHECK(sd == doctest::Approx(z * C).epsilon(0.1));

    // Reproducible from (seed, stream); another stream draws other noise.
    CHECK(same(r.aggregate, aggregate(ups, AggregationConfig::dp_fedavg(C, z, 1234, 5), &ref2.aggregate).aggregate));
    CHECK_FALSE(same(r.aggregate, aggregate(ups, AggregationConfig::dp_fedavg(C, z, 1234, 6), &ref2.aggregate).aggregate));
    CHECK_FALSE(same(r.aggregate, aggregate(ups, AggregationConfig::dp_fedavg(C, z, 1235, 5), &ref2.aggregate).aggregate));
}

// ------------------------------------------------------------------------------------------------
// Properties over every rule

namespace {

struct RuleCase {
    AggregationConfig cfg;
    bool hetero_ranks;
};

std::vector<RuleCase> rule_cases() {
    return {{AggregationConfig::fedavg(), false},
            {AggregationConfig::fedavg(Weighting::tokens), false},
            {AggregationConfig::hetlora(), true},
            {AggregationConfig::hetlora(Weighting::update_norm), true},
            {AggregationConfig::flexlora(), true},
            {AggregationConfig::ffa_lora(), false},
            {AggregationConfig::stacking(Weighting::tokens), true},
            {AggregationConfig::norm_clip(1.0, Weighting::tokens), false},
            {AggregationConfig::median(), false},
            {AggregationConfig::trimmed_mean(1), false},
            {AggregationConfig::krum(1), false},
            {AggregationConfig::dp_fedavg(1.0, 0.5, 77, 3), false}};
}

/// Six users with two adapters (the last one without b., except for Krum), random values; ranks
/// 1..3 and CoMiGS scaling for the heterogeneous-rank rules; one shared A for FFA-LoRA.
template <class T>
std::vector<GeneralistUpload<T>> fleet(const RuleCase& rc, std::uint64_t seed, std::vector<Ad>* reference = nullptr) {
    Rng rng(seed);
    std::vector<GeneralistUpload<T>> ups;
    const Ad a0 = random_ad("a.", 3, 4, 2, rng, 16.0, LoraScaling::sqrt);
    const Ad b0 = random_ad("b.", 4, 2, 2, rng, 16.0, LoraScaling::sqrt);
    for (UserId u = 1; u <= 6; ++u) {
        const Index r = rc.hetero_ranks ? static_cast<Index>(u % 3 + 1) : 2;
        std::vector<Ad> ads = {random_ad("a.", 3, 4, r, rng, 16.0, LoraScaling::sqrt),
                               random_ad("b.", 4, 2, r, rng, 16.0, LoraScaling::sqrt)};
        if (rc.cfg.rule == AggregationRule::ffa_lora) {
            ads[0].A = a0.A;
            ads[1].A = b0.A;
        }
        if (u == 6 && rc.cfg.rule != AggregationRule::krum) ads.pop_back();
        ups.push_back(up<T>(u * 10, static_cast<double>(u) * 100.0, ads));
    }
    if (reference) *reference = {random_ad("a.", 3, 4, 2, rng, 16.0, LoraScaling::sqrt),
                                 random_ad("b.", 4, 2, 2, rng, 16.0, LoraScaling::sqrt)};
    return ups;
}

template <class T>
AggregationResult<T> run(const std::vector<GeneralistUpload<T>>& ups, const RuleCase& rc,
                         const SharedAggregate<T>* ref) {
    return aggregate(ups, rc.cfg, rc.cfg.uses_reference() ? ref : nullptr);
}

}  // namespace

TEST_CASE_TEMPLATE("aggregate: every rule is invariant to upload order and deterministic, bit for bit", T, float,
                   double) {
    for (const auto& rc : rule_cases()) {
        INFO("rule " << std::string(to_string(rc.cfg.rule)) << " weighting " << std::string(to_string(rc.cfg.weighting)));
        std::vector<Ad> ref_ads;
        auto ups = fleet<T>(rc, 42, &ref_ads);
        const auto ref = aggregate(std::vector{up<T>(1, 1.0, ref_ads)}, AggregationConfig::fedavg()).aggregate;
        const auto base = run(ups, rc, &ref);
        CHECK(base.report.included.size() == 6);
        CHECK(same(base.aggregate, run(ups, rc, &ref).aggregate));
        Rng rng(7);
        for (int t = 0; t < 5; ++t) {
            for (std::size_t i = ups.size() - 1; i > 0; --i) std::swap(ups[i], ups[rng.below(i + 1)]);
            const auto shuffled = run(ups, rc, &ref);
            CHECK(same(base.aggregate, shuffled.aggregate));
            CHECK(shuffled.report.included == base.report.included);
        }
    }
}

TEST_CASE_TEMPLATE("aggregate: NaN and Inf uploads are excluded and counted, the rest aggregated as without them", T,
                   float, double) {
    for (const auto& rc : rule_cases()) {
        INFO("rule " << std::string(to_string(rc.cfg.rule)));
        std::vector<Ad> ref_ads;
        const auto good = fleet<T>(rc, 9, &ref_ads);
        const auto ref = aggregate(std::vector{up<T>(1, 1.0, ref_ads)}, AggregationConfig::fedavg()).aggregate;
        Rng rng(1);
        std::vector<Ad> nan_ads = {random_ad("a.", 3, 4, 2, rng, 16.0, LoraScaling::sqrt),
                                   random_ad("b.", 4, 2, 2, rng, 16.0, LoraScaling::sqrt)};
        std::vector<Ad> inf_ads = nan_ads;
        nan_ads[1].B[3] = std::numeric_limits<double>::quiet_NaN();
        inf_ads[0].A[0] = -std::numeric_limits<double>::infinity();
        auto all = good;
        all.insert(all.begin() + 2, up<T>(7, 1.0, nan_ads));
        all.push_back(up<T>(3, 1.0, inf_ads));
        const auto with = run(all, rc, &ref);
        const auto without = run(good, rc, &ref);
        CHECK(same(with.aggregate, without.aggregate));
        CHECK(with.report.excluded_count() == 2);
        CHECK(ids(with.report.excluded) == std::vector<UserId>{3, 7});
        CHECK(with.report.excluded[0].tensor == "a.lora_A");
        CHECK(with.report.excluded[1].tensor == "b.lora_B");
        CHECK(with.report.included == without.report.included);
    }
    // Nothing left: an error, never an empty or NaN aggregate.
    Ad bad{"x.", 1, 1, 1, {std::nan("")}, {1}};
    expect_error<NumericError>([&] { aggregate(std::vector{up<T>(1, 1.0, {bad})}, AggregationConfig::fedavg()); },
                               {"no upload left", "1"});
}

TEST_CASE_TEMPLATE("aggregate: malformed rounds are errors naming user and tensor", T, float, double) {
    const Ad a{"attn.", 2, 3, 2, {1, 2, 3, 4}, {1, 2, 3, 4, 5, 6}};
    SUBCASE("duplicate users") {
        expect_error<InvalidArgument>(
            [&] { aggregate(std::vector{up<T>(5, 1.0, {a}), up<T>(2, 1.0, {a}), up<T>(5, 2.0, {a})}, AggregationConfig::fedavg()); },
            {"user 5", "two uploads"});
    }
    SUBCASE("no uploads") {
        expect_error<InvalidArgument>([&] { aggregate(std::vector<GeneralistUpload<T>>{}, AggregationConfig::fedavg()); },
                                      {"none"});
    }
    SUBCASE("bad weights never make an upload") {
        for (double w : {0.0, -2.0, std::nan(""), -std::numeric_limits<double>::infinity()})
            expect_error<InvalidArgument>([&] { up<T>(6, w, {a}); }, {"user 6", "weight"});
    }
    SUBCASE("wrong shape") {
        Ad wide{"attn.", 3, 3, 2, {1, 2, 3, 4, 5, 6}, {1, 2, 3, 4, 5, 6}};
        expect_error<ShapeError>([&] { aggregate(std::vector{up<T>(1, 1.0, {a}), up<T>(8, 1.0, {wide})}, AggregationConfig::fedavg()); },
                                 {"user 8", "tensor 'attn.lora_A'", "[2, 3]", "[2, 2]"});
        // Also with rules that accept other ranks: the feature dimension must agree.
        expect_error<ShapeError>([&] { aggregate(std::vector{up<T>(1, 1.0, {a}), up<T>(8, 1.0, {wide})}, AggregationConfig::flexlora()); },
                                 {"user 8", "tensor 'attn.lora_A'"});
    }
    SUBCASE("other rank where factors are averaged") {
        Ad r1{"attn.", 2, 3, 1, {1, 2}, {1, 2, 3}};
        for (const auto& cfg : {AggregationConfig::fedavg(), AggregationConfig::median(), AggregationConfig::ffa_lora()})
            expect_error<ShapeError>([&] { aggregate(std::vector{up<T>(1, 1.0, {a}), up<T>(4, 1.0, {r1})}, cfg); },
                                     {"user 4", "tensor 'attn.lora_A'", "rank 1", "hetlora"});
        CHECK_NOTHROW(aggregate(std::vector{up<T>(1, 1.0, {a}), up<T>(4, 1.0, {r1})}, AggregationConfig::hetlora()));
    }
    SUBCASE("other LoRA scale where factors are averaged") {
        Ad s{"attn.", 2, 3, 2, {1, 2, 3, 4}, {1, 2, 3, 4, 5, 6}, 16.0, LoraScaling::sqrt};
        expect_error<InvalidArgument>([&] { aggregate(std::vector{up<T>(1, 1.0, {a}), up<T>(4, 1.0, {s})}, AggregationConfig::fedavg()); },
                                      {"user 4", "tensor 'attn.lora_A'", "alpha 16"});
    }
    SUBCASE("pairwise rules need both factors") {
        UploadBuilder<T> b(3, 1.0, UploadOptions{.send_lora_A = false});
        LoraExpert<T> e(a.config());
        b.add_shared_adapter("attn.", e);
        const auto bonly = std::move(b).finish();
        for (const auto& cfg : {AggregationConfig::hetlora(), AggregationConfig::flexlora(), AggregationConfig::stacking()})
            expect_error<InvalidArgument>([&] { aggregate(std::vector{bonly}, cfg); }, {"user 3", "lora_A"});
    }
    SUBCASE("bad configurations") {
        const std::vector ups = {up<T>(1, 1.0, {a})};
        expect_error<InvalidArgument>([&] { aggregate(ups, AggregationConfig::fedavg(Weighting::update_norm)); },
                                      {"update_norm", "HetLoRA"});
        expect_error<InvalidArgument>([&] { aggregate(ups, AggregationConfig::norm_clip(0.0)); }, {"clip_norm 0"});
        expect_error<InvalidArgument>([&] { aggregate(ups, AggregationConfig::dp_fedavg(1.0, std::nan(""), 1)); },
                                      {"noise_multiplier"});
        auto med = AggregationConfig::median();
        med.weighting = Weighting::tokens;
        expect_error<InvalidArgument>([&] { aggregate(ups, med); }, {"median", "unweighted"});
        expect_error<InvalidArgument>([&] { aggregate(ups, AggregationConfig::trimmed_mean(-1)); }, {"trim -1"});
    }
}

// ------------------------------------------------------------------------------------------------
// HetLoRA rank self-pruning

TEST_CASE("HetLoRA tail regulariser and pruning rule, by hand") {
    // A [3, 2], B [2, 3], keep 1: tail A rows 1..2 = [[3, 4], [0, 0]] (norm 5), tail B columns 1..2 =
    // [[0, 0], [6, 8]] (norm 10). value = 0.1 * 10 * 5 = 5; dA_t = 0.1 * 10 / 5 * A_t, dB_t = 0.1 * 5 / 10 * B_t.
    std::vector<double> A = {1, 0, 3, 4, 0, 0}, B = {9, 0, 0, 9, 6, 8};
    std::vector<double> dA(6, 0.0), dB(6, 0.0);
    const double v = hetlora_tail_regulariser<double>(MatrixView<double>(dA.data(), 3, 2), MatrixView<double>(dB.data(), 2, 3),
                                                      ConstMatrixView<double>(A.data(), 3, 2),
                                                      ConstMatrixView<double>(B.data(), 2, 3), 1, 0.1);
    CHECK(v == doctest::Approx(5.0).epsilon(1e-15));
    const std::vector<double> wantA = {0, 0, 0.6, 0.8, 0, 0}, wantB = {0, 0, 0, 0, 0.3, 0.4};
    for (std::size_t k = 0; k < 6; ++k) {
        CHECK(dA[k] == doctest::Approx(wantA[k]).epsilon(1e-15));
        CHECK(dB[k] == doctest::Approx(wantB[k]).epsilon(1e-15));
    }
    // rho = 50 / (sqrt(26) sqrt(262)) = 0.6058...
    const ConstMatrixView<double> Av(A.data(), 3, 2), Bv(B.data(), 2, 3);
    CHECK(hetlora_pruned_rank(Av, Bv, 1, 0.60) == 3);
    CHECK(hetlora_pruned_rank(Av, Bv, 1, 0.61) == 1);
    std::vector<double> Z(6, 0.0);
    CHECK(hetlora_pruned_rank(Av, ConstMatrixView<double>(Z.data(), 2, 3), 1, 0.99) == 3);  // B = 0: never pruned
    zero_rank_tail(MatrixView<double>(A.data(), 3, 2), MatrixView<double>(B.data(), 2, 3), 1);
    CHECK(A == std::vector<double>{1, 0, 0, 0, 0, 0});
    CHECK(B == std::vector<double>{9, 0, 0, 9, 0, 0});
    CHECK(hetlora_pruned_rank(ConstMatrixView<double>(A.data(), 3, 2), ConstMatrixView<double>(B.data(), 2, 3), 1, 1e-9) == 1);
}

TEST_CASE("HetLoRA tail regulariser gradient matches finite differences") {
    Rng rng(4);
    std::vector<double> A(4 * 5), B(3 * 4);
    for (auto& v : A) v = rng.normal();
    for (auto& v : B) v = rng.normal();
    std::vector<double> dA(A.size(), 0.0), dB(B.size(), 0.0);
    auto f = [&] {
        std::vector<double> ga(A.size()), gb(B.size());
        return hetlora_tail_regulariser<double>(MatrixView<double>(ga.data(), 4, 5), MatrixView<double>(gb.data(), 3, 4),
                                                ConstMatrixView<double>(A.data(), 4, 5),
                                                ConstMatrixView<double>(B.data(), 3, 4), 2, 0.3);
    };
    hetlora_tail_regulariser<double>(MatrixView<double>(dA.data(), 4, 5), MatrixView<double>(dB.data(), 3, 4),
                                     ConstMatrixView<double>(A.data(), 4, 5), ConstMatrixView<double>(B.data(), 3, 4), 2,
                                     0.3);
    const auto ra = test::gradcheck(A, dA, f, "dA");
    const auto rb = test::gradcheck(B, dB, f, "dB");
    CHECK(ra.max_abs_grad > 0.01);
    CHECK(rb.max_abs_grad > 0.01);
    // The head receives no gradient.
    for (std::size_t k = 0; k < 10; ++k) CHECK(dA[k] == 0.0);
}
