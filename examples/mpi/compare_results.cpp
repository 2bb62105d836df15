// comigs-compare-results A.json B.json [--tolerance t] [--ignore key]...: exits 0 when two demo
// results.json files hold the same structure and numbers (relative difference <= t, default 0: equal),
// ignoring the given keys at any depth (timings differ between any two runs). Prints every difference.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace {

struct Comparison {
    double tolerance = 0;
    std::vector<std::string> ignore;
    std::vector<std::string> diffs;
    double worst = 0;

    void run(const nlohmann::json& a, const nlohmann::json& b, const std::string& path) {
        if (a.is_number() && b.is_number()) {
            const double x = a.get<double>(), y = b.get<double>();
            if (x == y || (std::isnan(x) && std::isnan(y))) return;
            const double rel = std::fabs(x - y) / std::max(std::fabs(x), std::fabs(y));
            worst = std::max(worst, rel);
            if (!(rel <= tolerance)) diffs.push_back(path + ": " + a.dump() + " vs " + b.dump());
            return;
        }
        if (a.type() != b.type()) {
            diffs.push_back(path + ": " + a.dump() + " vs " + b.dump());
            return;
        }
        if (a.is_object()) {
            for (const auto& [k, v] : a.items()) {
                if (std::find(ignore.begin(), ignore.end(), k) != ignore.end()) continue;
                if (!b.contains(k))
                    diffs.push_back(path + "." + k + ": only in the first file");
                else
                    run(v, b.at(k), path + "." + k);
            }
            for (const auto& [k, v] : b.items())
                if (std::find(ignore.begin(), ignore.end(), k) == ignore.end() && !a.contains(k))
                    diffs.push_back(path + "." + k + ": only in the second file");
            return;
        }
        if (a.is_array()) {
            if (a.size() != b.size()) {
                diffs.push_back(path + ": " + std::to_string(a.size()) + " vs " + std::to_string(b.size()) + " items");
                return;
            }
            for (std::size_t i = 0; i < a.size(); ++i) run(a[i], b[i], path + "[" + std::to_string(i) + "]");
            return;
        }
        if (a != b) diffs.push_back(path + ": " + a.dump() + " vs " + b.dump());
    }
};

nlohmann::json load(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    return nlohmann::json::parse(in);
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"comigs-compare-results: compare two comigs-demo results.json files"};
    std::string a, b;
    Comparison c;
    app.add_option("first", a, "results.json")->required();
    app.add_option("second", b, "results.json")->required();
    app.add_option("--tolerance", c.tolerance, "largest relative difference of numbers")->capture_default_str();
    app.add_option("--ignore", c.ignore, "keys to skip at any depth (repeatable)");
    CLI11_PARSE(app, argc, argv);
    try {
        c.run(load(a), load(b), "");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "comigs-compare-results: %s\n", e.what());
        return 2;
    }
    for (const auto& d : c.diffs) std::printf("%s\n", d.c_str());
    std::printf("%s: %zu differences, largest relative difference of numbers %.3g (tolerance %.3g)\n",
                c.diffs.empty() ? "same" : "DIFFERENT", c.diffs.size(), c.worst, c.tolerance);
    return c.diffs.empty() ? 0 : 1;
}
