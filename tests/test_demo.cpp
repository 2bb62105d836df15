// comigs-demo end to end in a tiny configuration: the outputs exist, parse, have the keys for
// every method, are well-formed, and training lowers the test perplexity below the host's.
#include <doctest/doctest.h>

#include <demo/cli.hpp>
#include <demo/run.hpp>
#include "temp_dir.hpp"

#include <cctype>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string slurp(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

/// Minimal markup check: every element is closed in order, attribute values are quoted, entities are
/// `&name;` / `&#...;`. `void_elements` (HTML) need no closing tag. Returns an empty string or the
/// first problem found.
std::string markup_problem(const std::string& text, const std::set<std::string>& void_elements) {
    std::vector<std::string> open;
    std::size_t i = 0;
    while (i < text.size()) {
        const char c = text[i];
        if (c == '&') {
            std::size_t j = i + 1;
            if (j < text.size() && text[j] == '#') ++j;
            const std::size_t start = j;
            while (j < text.size() && std::isalnum(static_cast<unsigned char>(text[j]))) ++j;
            if (j == start || j >= text.size() || text[j] != ';') return "bad entity at " + std::to_string(i);
            i = j + 1;
            continue;
        }
        if (c != '<') {
            if (c == '>') return "stray '>' at " + std::to_string(i);
            ++i;
            continue;
        }
        if (text.compare(i, 2, "<!") == 0) {  // doctype or comment
            const std::size_t end = text.find('>', i);
            if (end == std::string::npos) return "unterminated <! at " + std::to_string(i);
            i = end + 1;
            continue;
        }
        const bool closing = i + 1 < text.size() && text[i + 1] == '/';
        std::size_t j = i + (closing ? 2 : 1);
        const std::size_t name_start = j;
        while (j < text.size() && (std::isalnum(static_cast<unsigned char>(text[j])) || text[j] == '-')) ++j;
        const std::string name = text.substr(name_start, j - name_start);
        if (name.empty()) return "empty tag name at " + std::to_string(i);
        // Attributes: skip to '>' honouring quotes.
        char quote = 0;
        bool self_closing = false;
        for (; j < text.size(); ++j) {
            if (quote) {
                if (text[j] == quote) quote = 0;
                else if (text[j] == '<') return "'<' inside an attribute of <" + name + ">";
                continue;
            }
            if (text[j] == '"' || text[j] == '\'') quote = text[j];
            else if (text[j] == '=' && j + 1 < text.size() && text[j + 1] != '"' && text[j + 1] != '\'')
                return "unquoted attribute in <" + name + ">";
            else if (text[j] == '>') break;
        }
        if (j >= text.size()) return "unterminated tag <" + name + ">";
        self_closing = text[j - 1] == '/';
        if (closing) {
            if (open.empty() || open.back() != name)
                return "</" + name + "> closes " + (open.empty() ? std::string("nothing") : "<" + open.back() + ">");
            open.pop_back();
        } else if (!self_closing && !void_elements.count(name)) {
            open.push_back(name);
        }
        i = j + 1;
    }
    if (!open.empty()) return "<" + open.back() + "> never closed";
    return "";
}

}  // namespace

TEST_CASE("markup checker finds what it should") {
    CHECK(markup_problem("<a x=\"1\"><b/>t&amp;</a>", {}).empty());
    CHECK_FALSE(markup_problem("<a><b></a></b>", {}).empty());
    CHECK_FALSE(markup_problem("<a>", {}).empty());
    CHECK_FALSE(markup_problem("<a x=1></a>", {}).empty());
    CHECK_FALSE(markup_problem("<a>&amp</a>", {}).empty());
    CHECK(markup_problem("<p><meta charset=\"utf-8\"></p>", {"meta"}).empty());
}

TEST_CASE("comigs-demo: tiny run end to end") {
    namespace fs = std::filesystem;
    comigs::demo::DemoConfig c;
    c.make_quick();
    c.threads = 1;
    c.progress = false;
    const comigs_test::TempDir tmp("comigs-test-demo");
    c.out = tmp.path().string();
    const auto out = comigs::demo::run_demo(c);

    const auto j = nlohmann::json::parse(slurp(fs::path(c.out) / "results.json"));
    REQUIRE(j.contains("config"));
    REQUIRE(j.contains("methods"));
    CHECK(j["host_mean_ppl"].get<double>() > 1);
    CHECK(j["floor_mean_ppl"].get<double>() > 1);
    const std::vector<std::string> expected{"local",       "fedavg",  "comigs-2g", "comigs-2s",
                                            "comigs-1g1s", "pfedmoe", "pcl"};
    for (const auto& name : expected) {
        CAPTURE(name);
        REQUIRE(j["methods"].contains(name));
        const auto& m = j["methods"][name];
        for (const char* key : {"mean_test_ppl", "mean_test_ppl_personalised", "mean_ood_ppl", "upload_floats_per_round"})
            CHECK(m.contains(key));
        REQUIRE(m["users"].size() == 3);
        for (std::size_t u = 0; u < 3; ++u) {
            const auto& r = m["users"][u];
            CHECK(r["user"].get<int>() == int(u));
            for (const char* key : {"test_ppl", "test_ppl_personalised", "ood_ppl", "floor_ppl", "gap_closed"})
                CHECK(std::isfinite(r[key].get<double>()));
            CHECK(r["generalist_share"].get<double>() >= 0);
            CHECK(r["generalist_share"].get<double>() <= 1.0 + 1e-9);
        }
        // Training lowers the test perplexity below the frozen host's.
        CHECK(m["mean_test_ppl"].get<double>() < j["host_mean_ppl"].get<double>());
    }
    // Upload sizes: nothing for local methods, CoMiGS-1G1S half of FedAvg.
    CHECK(j["methods"]["local"]["upload_floats_per_round"].get<long>() == 0);
    CHECK(j["methods"]["comigs-2s"]["upload_floats_per_round"].get<long>() == 0);
    CHECK(2 * j["methods"]["comigs-1g1s"]["upload_floats_per_round"].get<long>() ==
          j["methods"]["fedavg"]["upload_floats_per_round"].get<long>());
    // Mean routing of two generalists sends everything to generalists; of two specialists, nothing.
    CHECK(j["methods"]["fedavg"]["users"][0]["generalist_share"].get<double>() == doctest::Approx(1.0));
    CHECK(j["methods"]["local"]["users"][0]["generalist_share"].get<double>() == doctest::Approx(0.0));
    // Routing per layer (what routing.html and the claims read): per user and averaged over users; the
    // layers' shares average to the whole model's.
    for (const char* name : {"comigs-1g1s", "pfedmoe"}) {
        CAPTURE(name);
        const auto& m = j["methods"][name];
        REQUIRE(m["routing_by_layer"].size() == 2);
        double mean_share = 0;
        for (const auto& u : m["users"]) {
            REQUIRE(u["routing_by_layer"].size() == 2);
            double layers = 0;
            for (const auto& l : u["routing_by_layer"]) {
                layers += l["generalist_share"].get<double>() / 2;
                CHECK(l["personal_to_specialist"].get<double>() >= 0.0);
                CHECK(l["personal_to_specialist"].get<double>() <= 1.0);
                CHECK(l["shared_to_generalist"].get<double>() >= 0.0);
            }
            CHECK(layers == doctest::Approx(u["generalist_share"].get<double>()));
            mean_share += u["generalist_share"].get<double>() / 3;
        }
        CHECK(m["mean_generalist_share"].get<double>() == doctest::Approx(mean_share));
        CHECK((m["routing_by_layer"][0]["generalist_share"].get<double>() +
               m["routing_by_layer"][1]["generalist_share"].get<double>()) / 2 == doctest::Approx(mean_share));
    }

    // Mean routing decides the per-layer shares (two generalists: all; two specialists: none), and the
    // curve holds every user's perplexity, whose mean is its mean.
    for (const auto& name : expected) {
        CAPTURE(name);
        for (const auto& u : j["methods"][name]["users"]) {
            REQUIRE(u["routing_by_layer"].size() == std::size_t(c.n_layer));
            for (const auto& l : u["routing_by_layer"]) {
                CHECK(l["generalist_share"].get<double>() >= 0);
                CHECK(l["generalist_share"].get<double>() <= 1.0 + 1e-6);  // float gates sum to 1 within rounding
            }
            if (name == "fedavg") CHECK(u["routing_by_layer"][0]["generalist_share"].get<double>() == doctest::Approx(1.0));
            if (name == "local") CHECK(u["routing_by_layer"][1]["generalist_share"].get<double>() == doctest::Approx(0.0));
        }
        // The curve holds every user's perplexity, and its mean is theirs.
        for (const auto& p : j["methods"][name]["curve"]) {
            REQUIRE(p["user_ppl"].size() == 3);
            double m = 0;
            for (const auto& v : p["user_ppl"]) m += v.get<double>() / 3;
            CHECK(m == doctest::Approx(p["mean_ppl"].get<double>()).epsilon(1e-12));
        }
    }

    const std::string svg = slurp(fs::path(c.out) / "curves.svg");
    CHECK(svg.find("<svg") != std::string::npos);
    CHECK(svg.find("<polyline") != std::string::npos);
    CHECK(svg.find(">user 2</text>") != std::string::npos);  // a small plot per user beside the mean
    CHECK(markup_problem(svg, {}) == "");
    const std::string html = slurp(fs::path(c.out) / "routing.html");
    CHECK(html.find("<span") != std::string::npos);
    CHECK(markup_problem(html, {"meta", "br"}) == "");
    // It opens with the methods that have a router and their per-layer summary, before any token.
    const auto summary = html.find("<h2>Per layer</h2>"), tokens = html.find("<h2>Token by token</h2>");
    REQUIRE(summary != std::string::npos);
    REQUIRE(tokens != std::string::npos);
    CHECK(summary < tokens);
    CHECK(html.find("title=\"expert ") > tokens);  // the coloured tokens come after the summary
    CHECK(html.find("<h3 id=\"comigs-1g1s\">") < tokens);
    CHECK(html.find("<h3 id=\"comigs-1g1s\">") < html.find("<h3 id=\"comigs-2g\">"));  // mixed roles first
    CHECK(html.find("<h3 id=\"local\">") == std::string::npos);  // no router: named, not shown
    CHECK(out.methods.size() == expected.size());

    // Different ranks: HetLoRA and FlexLoRA run, FedAvg-style averaging pads to the largest rank.
    {
        comigs::demo::DemoConfig h = c;
        h.ranks = {4, 8, 8};
        h.methods = {"hetlora", "flexlora", "fedavg"};
        const auto het = comigs::demo::run_demo(h);
        REQUIRE(het.methods.size() == 3);
        for (const auto& m : het.methods) {
            CAPTURE(m.name);
            CHECK(m.mean(&comigs::demo::UserResult::test_ppl) < het.host_mean_ppl);
            CHECK(m.upload_floats_per_round > 0);
        }
    }

    // Shared attention LoRA (rank 4 on c_attn [3d, d] and c_proj [d, d] of both blocks) travels with the
    // generalists: it adds exactly its size to the uploads of sharing methods and trains.
    {
        comigs::demo::DemoConfig a = c;
        a.attention_rank = 4;
        a.methods = {"comigs-1g1s", "local"};
        const auto att = comigs::demo::run_demo(a);
        const long d = long(c.d_model), extra = 2 * (4 * d + 3 * d * 4 + 4 * d + d * 4);
        CHECK(att.methods[0].upload_floats_per_round == out.methods[4].upload_floats_per_round + extra);
        CHECK(att.methods[1].upload_floats_per_round == 0);
        CHECK(att.methods[0].mean(&comigs::demo::UserResult::test_ppl) < att.host_mean_ppl);
        CHECK(att.methods[0].mean(&comigs::demo::UserResult::test_ppl) !=
              doctest::Approx(out.methods[4].mean(&comigs::demo::UserResult::test_ppl)).epsilon(1e-9));
    }

    // The second run reuses the saved host and gets the same numbers (same seed, one thread).
    c.methods = {"comigs-1g1s"};
    const auto again = comigs::demo::run_demo(c);
    CHECK(nlohmann::json::parse(slurp(fs::path(c.out) / "results.json"))["config"]["host"]["reused"].get<bool>());
    CHECK(again.methods[0].mean(&comigs::demo::UserResult::test_ppl) ==
          doctest::Approx(out.methods[4].mean(&comigs::demo::UserResult::test_ppl)).epsilon(1e-12));
}

TEST_CASE("comigs-demo pictures: axis ticks are round numbers covering the data") {
    using comigs::demo::nice_ticks;
    struct Case {
        double lo, hi;
        int target;
        double step;
    };
    for (const Case& c : {Case{2.37, 4.18, 6, 0.5}, Case{0, 200, 6, 50}, Case{1.9, 2.45, 3, 0.2},
                          Case{3.0, 17.5, 6, 2}, Case{0, 12, 3, 5}, Case{1e-4, 7e-4, 5, 1e-4}}) {
        CAPTURE(c.lo);
        CAPTURE(c.hi);
        const auto t = nice_ticks(c.lo, c.hi, c.target);
        CHECK(t.step == doctest::Approx(c.step));
        CHECK(t.first <= c.lo);
        CHECK(t.last >= c.hi);
        for (double v : t.values()) {
            const double k = v / t.step;
            CHECK(k == doctest::Approx(std::round(k)).epsilon(1e-9));  // whole multiples of the step
            CHECK(t.label(v).find("e") == std::string::npos);
        }
        CHECK(t.values().size() >= 2);
    }
    CHECK(nice_ticks(2.37, 4.18, 6).label(2.5) == "2.5");
    CHECK(nice_ticks(2.53, 4.18, 6).step == doctest::Approx(0.2));
    CHECK(nice_ticks(0, 200, 6).label(150) == "150");
    // Not widened: the axis is the data's range, the ticks inside it.
    const auto x = nice_ticks(0, 12, 3, false);
    CHECK(x.last == 12);
    CHECK(x.values() == std::vector<double>{0, 5, 10});
    // A flat curve still gets an axis.
    CHECK(nice_ticks(3.0, 3.0, 4).values().size() >= 2);
}

TEST_CASE("comigs-demo command line: --quick is a base configuration the other flags still change") {
    namespace fs = std::filesystem;
    const comigs_test::TempDir tmp("comigs-test-demo-cli");
    const std::string out = tmp.path().string();
    std::vector<std::string> args{"comigs-demo", "--users", "2",       "--quick",   "--top-k", "1",  "--methods",
                                  "local",       "--quiet", "--threads", "1",       "--out",   out,
                                  "--train-tokens", "1500,2000", "--val-tokens", "50%",
                                  "--router-iters", "3", "--schedule", "reference"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    REQUIRE(comigs::demo::demo_main(static_cast<int>(argv.size()), argv.data()) == 0);
    const auto j = nlohmann::json::parse(slurp(fs::path(out) / "results.json"));
    CHECK(j["config"]["users"].get<int>() == 2);  // given before --quick: still wins
    CHECK(j["config"]["top_k"].get<int>() == 1);
    CHECK(j["config"]["host"]["d_model"].get<int>() == 32);  // from --quick
    CHECK(j["config"]["train_tokens"] == nlohmann::json::array({1500, 2000}));
    CHECK(j["config"]["validation_tokens"] == nlohmann::json::array({750, 1000}));  // 50% of each user's training
    CHECK(j["config"]["validation_share"].get<double>() == 0.5);
    CHECK(j["config"]["schedule"] == "reference");  // a preset: applied before the flags, wherever it stands
    CHECK(j["config"]["router_every"].get<int>() == 30);
    CHECK(j["config"]["router_phase"] == "after");
    CHECK(j["config"]["router_iters"].get<int>() == 3);  // given before --schedule: still wins
    CHECK(j["methods"].contains("local"));

    for (const char* share : {"0%", "-5%", "abc%", "50%%", "%"}) {
        std::vector<std::string> bad_share{"comigs-demo", "--quick", "--val-tokens", share, "--quiet", "--out", out};
        std::vector<char*> bad_share_argv;
        for (auto& a : bad_share) bad_share_argv.push_back(a.data());
        CHECK_MESSAGE(comigs::demo::demo_main(static_cast<int>(bad_share_argv.size()), bad_share_argv.data()) == 1,
                      share);
    }

    std::vector<std::string> bad{"comigs-demo", "--quick", "--users", "0", "--quiet", "--out", out};
    std::vector<char*> bad_argv;
    for (auto& a : bad) bad_argv.push_back(a.data());
    CHECK(comigs::demo::demo_main(static_cast<int>(bad_argv.size()), bad_argv.data()) == 1);
}

TEST_CASE("comigs-demo schedules: the default is the reference preset, which resets what the flags change") {
    comigs::demo::DemoConfig c;
    const comigs::demo::DemoConfig defaults = c;
    CHECK(c.schedule == "reference");
    CHECK(c.router_every == 30);  // the paper's: 10 router steps after every 30th expert step
    CHECK(c.router_iters == 10);
    CHECK(c.router_phase == "after");
    c.lr = 3e-3;
    c.router_every = 10;
    c.router_phase = "before";
    c.top_k = 1;
    c.apply_schedule("reference");
    CHECK(c.router_every == defaults.router_every);
    CHECK(c.router_phase == defaults.router_phase);
    CHECK(c.lr == defaults.lr);
    CHECK(c.top_k == defaults.top_k);
    CHECK_THROWS_WITH_AS(c.apply_schedule("paper"), doctest::Contains("known: reference"), comigs::InvalidArgument);
}
