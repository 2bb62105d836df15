#pragma once
// What the demo shows people: the summary table, results.json, curves.svg (test perplexity over steps,
// one line per method, the mean over users and one small plot per user) and routing.html (per layer,
// where each user's tokens went; then each test token coloured by the expert the router chose, per
// layer: the paper's figure). Every file is written atomically.
#include <comigs/detail/utf8.hpp>
#include <comigs/io/atomic_file.hpp>

#include "fields.hpp"

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace comigs::demo {

/// How one mixture layer (or all of them) routed a user's test tokens.
struct LayerRouting {
    double generalist_share = 0;  ///< mean gate weight on generalists per token
    std::optional<double> shared_to_generalist;    ///< embedded corpus: shared-source tokens whose top expert is a generalist
    std::optional<double> personal_to_specialist;  ///< embedded corpus: personal tokens whose top expert is a specialist
};

template <class Self, class F>
    requires std::same_as<std::remove_const_t<Self>, LayerRouting>
void fields(Self& r, F&& f) {
    f("generalist_share", r.generalist_share);
    f("shared_to_generalist", r.shared_to_generalist);
    f("personal_to_specialist", r.personal_to_specialist);
}

struct UserResult {
    int user = 0;
    double test_ppl = 0;               ///< deployed protocol: after the final aggregation and download
    double test_ppl_personalised = 0;  ///< right after the user's own last local steps
    double ood_ppl = 0;                ///< deployed model on the uniform mixture of all users' test data
    std::optional<double> floor_ppl;   ///< Bayes-optimal (embedded corpus only)
    std::optional<double> gap_closed;  ///< (ln host - ln method) / (ln host - ln floor)
    double generalist_share = 0;       ///< mean gate weight on generalists per token, test data, all layers
    std::optional<double> shared_to_generalist;   ///< embedded corpus: shared-source tokens -> generalist
    std::optional<double> personal_to_specialist;  ///< embedded corpus: personal tokens -> specialists
    double host_ppl = 0;               ///< the frozen host alone on this user's test data
    std::optional<double> dev_ppl;     ///< deployed model on the tuning split (--dev-tokens)
    std::optional<long> kept_round;    ///< --keep-best: the round whose model the user kept (rounds: the final one)
    std::vector<LayerRouting> by_layer;  ///< routing per mixture layer (methods with routers)
};

/// Every field of a UserResult under its results.json key: the one list results.json, the MPI gather
/// and run checkpoints use (fields.hpp).
template <class Self, class F>
    requires std::same_as<std::remove_const_t<Self>, UserResult>
void fields(Self& u, F&& f) {
    f("user", u.user);
    f("test_ppl", u.test_ppl);
    f("test_ppl_personalised", u.test_ppl_personalised);
    f("ood_ppl", u.ood_ppl);
    f("floor_ppl", u.floor_ppl);
    f("gap_closed", u.gap_closed);
    f("generalist_share", u.generalist_share);
    f("shared_to_generalist", u.shared_to_generalist);
    f("personal_to_specialist", u.personal_to_specialist);
    f("host_ppl", u.host_ppl);
    f("dev_ppl", u.dev_ppl);
    f("kept_round", u.kept_round);
    f("routing_by_layer", u.by_layer);
}

struct CurvePoint {
    long step = 0;        ///< local steps per user so far
    double mean_ppl = 0;  ///< mean over users of the test perplexity (personalised protocol, cheap subset)
    std::vector<double> user_ppl;  ///< the same per user
};

struct MethodResult {
    std::string name;
    std::vector<UserResult> users;
    long upload_floats_per_round = 0;
    std::vector<CurvePoint> curve;
    double seconds = 0;
    bool routed = false;  ///< some user's mixtures have a learned router (not mean routing, not one expert)

    double mean(double UserResult::*field) const {
        double s = 0;
        for (const auto& u : users) s += u.*field;
        return users.empty() ? 0 : s / static_cast<double>(users.size());
    }
    /// Mean over users of an optional field; empty when a user lacks it.
    std::optional<double> mean(std::optional<double> UserResult::*field) const {
        double s = 0;
        for (const auto& u : users) {
            if (!(u.*field)) return std::nullopt;
            s += *(u.*field);
        }
        if (users.empty()) return std::nullopt;
        return s / static_cast<double>(users.size());
    }
};

template <class Self, class F>
    requires std::same_as<std::remove_const_t<Self>, CurvePoint>
void fields(Self& p, F&& f) {
    f("step", p.step);
    f("mean_ppl", p.mean_ppl);
    f("user_ppl", p.user_ppl);
}

/// Every field of a MethodResult (results.json adds the means over users).
template <class Self, class F>
    requires std::same_as<std::remove_const_t<Self>, MethodResult>
void fields(Self& m, F&& f) {
    f("name", m.name);
    f("users", m.users);
    f("upload_floats_per_round", m.upload_floats_per_round);
    f("curve", m.curve);
    f("seconds", m.seconds);
    f("routed", m.routed);
}

/// One user's test text with the expert each token went to, per mixture layer.
struct RoutingSample {
    int user = 0;
    std::vector<unsigned char> text;
    std::vector<std::string> token_text;    ///< per token, when tokens are not bytes (--model with a BPE tokenizer)
    std::vector<std::vector<int>> expert;   ///< [layer][token] top-1 expert
    std::vector<unsigned char> personal;    ///< ground-truth label per token (empty for real text)
    std::vector<bool> expert_is_generalist; ///< per expert index
};

template <class Self, class F>
    requires std::same_as<std::remove_const_t<Self>, RoutingSample>
void fields(Self& s, F&& f) {
    f("user", s.user);
    f("text", s.text);
    f("token_text", s.token_text);
    f("expert", s.expert);
    f("personal", s.personal);
    f("expert_is_generalist", s.expert_is_generalist);
}

inline nlohmann::json to_json(const std::optional<double>& v) { return v ? nlohmann::json(*v) : nlohmann::json(); }

inline nlohmann::json to_json(const LayerRouting& r, std::size_t layer) {
    return {{"layer", layer},
            {"generalist_share", r.generalist_share},
            {"shared_to_generalist", to_json(r.shared_to_generalist)},
            {"personal_to_specialist", to_json(r.personal_to_specialist)}};
}

/// Per layer, the mean over users of each routing share (null where a user has none).
inline nlohmann::json routing_by_layer(const MethodResult& m) {
    nlohmann::json out = nlohmann::json::array();
    const std::size_t layers = m.users.empty() ? 0 : m.users.front().by_layer.size();
    for (std::size_t l = 0; l < layers; ++l) {
        LayerRouting mean;
        std::optional<double> sg = 0.0, ps = 0.0;
        for (const auto& u : m.users) {
            if (u.by_layer.size() != layers) return nlohmann::json::array();
            const auto& r = u.by_layer[l];
            mean.generalist_share += r.generalist_share / static_cast<double>(m.users.size());
            sg = sg && r.shared_to_generalist ? std::optional(*sg + *r.shared_to_generalist / double(m.users.size())) : std::nullopt;
            ps = ps && r.personal_to_specialist ? std::optional(*ps + *r.personal_to_specialist / double(m.users.size())) : std::nullopt;
        }
        mean.shared_to_generalist = sg;
        mean.personal_to_specialist = ps;
        out.push_back(to_json(mean, l));
    }
    return out;
}

/// results.json in the issue's layout; `config` is whatever describes the run.
inline nlohmann::json results_json(const nlohmann::json& config, const std::vector<MethodResult>& methods,
                                   double host_mean_ppl, std::optional<double> floor_mean_ppl) {
    nlohmann::json j;
    j["config"] = config;
    nlohmann::json ms = nlohmann::json::object();
    for (const auto& m : methods) {
        nlohmann::json mj = to_json_fields(m);
        mj.erase("name");  // the key
        for (auto& u : mj["users"])  // each layer's entry names its layer
            for (std::size_t l = 0; l < u["routing_by_layer"].size(); ++l) u["routing_by_layer"][l]["layer"] = l;
        mj["mean_test_ppl"] = m.mean(&UserResult::test_ppl);
        mj["mean_test_ppl_personalised"] = m.mean(&UserResult::test_ppl_personalised);
        mj["mean_ood_ppl"] = m.mean(&UserResult::ood_ppl);
        mj["mean_dev_ppl"] = to_json(m.mean(&UserResult::dev_ppl));
        mj["mean_generalist_share"] = m.mean(&UserResult::generalist_share);
        mj["routing_by_layer"] = routing_by_layer(m);
        ms[m.name] = std::move(mj);
    }
    j["methods"] = ms;
    j["host_mean_ppl"] = host_mean_ppl;
    j["floor_mean_ppl"] = to_json(floor_mean_ppl);
    return j;
}

inline void write_text(const std::filesystem::path& path, const std::string& text) {
    io::atomic_write_file(path, std::as_bytes(std::span(text.data(), text.size())));
}

inline const char* method_colour(std::size_t i) {
    static const char* palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                                    "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22"};
    return palette[i % 10];
}

/// Round tick values for an axis over [lo, hi]: about `target` steps of 1, 2 or 5 times a power of
/// ten. The axis runs from `first` to `last`: widened to whole steps, or (`widen` false) the data's
/// own range with the ticks inside it.
struct AxisTicks {
    double first = 0, last = 1, step = 1;
    int decimals = 0;

    std::vector<double> values() const {
        std::vector<double> v;
        for (double t = std::ceil(first / step - 1e-9) * step; t <= last + 1e-9 * step; t += step) v.push_back(t);
        return v;
    }
    std::string label(double v) const {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.*f", decimals, std::abs(v) < 1e-9 * step ? 0.0 : v);
        return buf;
    }
};

inline AxisTicks nice_ticks(double lo, double hi, int target, bool widen = true) {
    if (!(hi > lo)) hi = lo + (lo != 0 ? std::abs(lo) * 0.1 : 1.0);
    const double raw = (hi - lo) / std::max(target, 1);
    const double mag = std::pow(10.0, std::floor(std::log10(raw)));
    const double norm = raw / mag;
    AxisTicks t;
    t.step = (norm < 1.5 ? 1.0 : norm < 3.0 ? 2.0 : norm < 7.0 ? 5.0 : 10.0) * mag;
    t.first = widen ? std::floor(lo / t.step + 1e-9) * t.step : lo;
    t.last = widen ? std::ceil(hi / t.step - 1e-9) * t.step : hi;
    t.decimals = std::max(0, -static_cast<int>(std::floor(std::log10(t.step) + 1e-9)));
    return t;
}

/// One line of a plot: a method's points (step, perplexity).
struct PlotSeries {
    const char* colour = "black";
    std::vector<std::pair<double, double>> points;
};

/// A plot with round ticks and grid lines in the box (x, y, w, h) of an SVG: `series` as polylines, a
/// dashed line at `floor` when known.
inline void svg_plot(std::ostringstream& o, double x, double y, double w, double h, const std::string& title,
                     const std::vector<PlotSeries>& series, std::optional<double> floor, double xmax, bool main) {
    const double L = main ? 52 : 40, R = 8, T = main ? 26 : 20, B = main ? 40 : 22;
    double ymin = 1e300, ymax = -1e300;
    for (const auto& s : series)
        for (const auto& [sx, sy] : s.points) {
            ymin = std::min(ymin, sy);
            ymax = std::max(ymax, sy);
        }
    if (floor) {
        ymin = std::min(ymin, *floor);
        ymax = std::max(ymax, *floor);
    }
    if (ymin > ymax) ymin = 0, ymax = 1;
    const AxisTicks xt = nice_ticks(0, xmax, main ? 6 : 3, false), yt = nice_ticks(ymin, ymax, main ? 6 : 3);
    const double px0 = x + L, px1 = x + w - R, py0 = y + T, py1 = y + h - B;
    auto X = [&](double v) { return px0 + (px1 - px0) * (v - xt.first) / (xt.last - xt.first); };
    auto Y = [&](double v) { return py1 - (py1 - py0) * (v - yt.first) / (yt.last - yt.first); };
    const int fs = main ? 12 : 10;
    o << "<g font-size=\"" << fs << "\">\n";
    o << "<text x=\"" << (px0 + px1) / 2 << "\" y=\"" << y + T - 8 << "\" text-anchor=\"middle\" font-size=\""
      << fs + 2 << "\" font-weight=\"bold\">" << title << "</text>\n";
    for (double v : yt.values()) {
        o << "<line x1=\"" << px0 << "\" y1=\"" << Y(v) << "\" x2=\"" << px1 << "\" y2=\"" << Y(v)
          << "\" stroke=\"#e4e4e4\"/>";
        o << "<text x=\"" << px0 - 5 << "\" y=\"" << Y(v) + fs / 3.0 << "\" text-anchor=\"end\">" << yt.label(v)
          << "</text>\n";
    }
    for (double v : xt.values()) {
        o << "<line x1=\"" << X(v) << "\" y1=\"" << py1 << "\" x2=\"" << X(v) << "\" y2=\"" << py1 + 4
          << "\" stroke=\"black\"/>";
        o << "<text x=\"" << X(v) << "\" y=\"" << py1 + 4 + fs << "\" text-anchor=\"middle\">" << xt.label(v)
          << "</text>\n";
    }
    o << "<polyline fill=\"none\" stroke=\"black\" points=\"" << px0 << ',' << py0 << ' ' << px0 << ',' << py1 << ' '
      << px1 << ',' << py1 << "\"/>\n";
    if (main) {
        o << "<text x=\"" << (px0 + px1) / 2 << "\" y=\"" << y + h - 6 << "\" text-anchor=\"middle\">local steps per user</text>\n";
        o << "<text transform=\"translate(" << x + 12 << ' ' << (py0 + py1) / 2
          << ") rotate(-90)\" text-anchor=\"middle\">test perplexity</text>\n";
    }
    if (floor)
        o << "<line x1=\"" << px0 << "\" y1=\"" << Y(*floor) << "\" x2=\"" << px1 << "\" y2=\"" << Y(*floor)
          << "\" stroke=\"#555\" stroke-dasharray=\"4 3\"/><text x=\"" << px1 - 2 << "\" y=\"" << Y(*floor) - 3
          << "\" text-anchor=\"end\" fill=\"#555\">floor</text>\n";
    for (const auto& s : series) {
        if (s.points.empty()) continue;
        o << "<polyline fill=\"none\" stroke-width=\"" << (main ? 2 : 1.5) << "\" stroke=\"" << s.colour
          << "\" points=\"";
        for (const auto& [sx, sy] : s.points) o << X(sx) << ',' << Y(sy) << ' ';
        o << "\"/>\n";
    }
    o << "</g>\n";
}

/// curves.svg: test perplexity over local steps, one line per method: the mean over users large on the
/// left with the legend under it, and a small plot per user beside it (each on its own scale, with
/// that user's floor when known). `user_floor[u]` may be empty.
inline std::string curves_svg(const std::vector<MethodResult>& methods, std::optional<double> floor_ppl,
                              const std::vector<std::optional<double>>& user_floor = {}) {
    std::size_t users = 0;
    double xmax = 1;
    for (const auto& m : methods)
        for (const auto& p : m.curve) {
            users = std::max(users, p.user_ppl.size());
            xmax = std::max(xmax, static_cast<double>(p.step));
        }
    const std::size_t cols = users <= 4 ? 2 : 3, rows = (users + cols - 1) / cols;
    const double main_w = 540, main_h = 380, top = 36, small_w = 250, small_h = 190;
    const double legend_h = 18.0 * static_cast<double>((methods.size() + 1) / 2) + 10;
    const double W = main_w + 20 + (users ? static_cast<double>(cols) * small_w : 0) + 10;
    const double H = std::max(top + main_h + legend_h + 10, top + static_cast<double>(rows) * small_h + 10);
    std::ostringstream o;
    o.precision(5);
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
      << ' ' << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
    o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    o << "<text x=\"10\" y=\"22\" font-size=\"16\">Test perplexity during training (each user's model after its "
         "local steps, on part of its test data)</text>\n";
    std::vector<PlotSeries> mean;
    for (std::size_t i = 0; i < methods.size(); ++i) {
        PlotSeries s{method_colour(i), {}};
        for (const auto& p : methods[i].curve) s.points.emplace_back(static_cast<double>(p.step), p.mean_ppl);
        mean.push_back(std::move(s));
    }
    svg_plot(o, 0, top, main_w, main_h, "mean over users", mean, floor_ppl, xmax, true);
    for (std::size_t i = 0; i < methods.size(); ++i) {
        const double lx = 52 + static_cast<double>(i % 2) * 240, ly = top + main_h + 14 + 18.0 * static_cast<double>(i / 2);
        o << "<line x1=\"" << lx << "\" y1=\"" << ly - 4 << "\" x2=\"" << lx + 22 << "\" y2=\"" << ly - 4
          << "\" stroke-width=\"3\" stroke=\"" << method_colour(i) << "\"/><text x=\"" << lx + 28 << "\" y=\"" << ly
          << "\">" << methods[i].name << "</text>\n";
    }
    for (std::size_t u = 0; u < users; ++u) {
        std::vector<PlotSeries> per;
        for (std::size_t i = 0; i < methods.size(); ++i) {
            PlotSeries s{method_colour(i), {}};
            for (const auto& p : methods[i].curve)
                if (u < p.user_ppl.size()) s.points.emplace_back(static_cast<double>(p.step), p.user_ppl[u]);
            per.push_back(std::move(s));
        }
        const double x = main_w + 20 + static_cast<double>(u % cols) * small_w;
        const double y = top + static_cast<double>(u / cols) * small_h;
        svg_plot(o, x, y, small_w, small_h, "user " + std::to_string(u), per,
                 u < user_floor.size() ? user_floor[u] : std::nullopt, xmax, false);
    }
    o << "</svg>\n";
    return o.str();
}

inline std::string html_escape(unsigned char c) {
    switch (c) {
        case '<': return "&lt;";
        case '>': return "&gt;";
        case '&': return "&amp;";
        case '"': return "&quot;";
        case ' ': return "&nbsp;";
        case '\n': return "&#x23CE;";
        default: break;
    }
    if (c < 32 || c >= 127) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "&#x%X;", 0x2400 + (c < 32 ? c : 0x21));
        return buf;
    }
    return std::string(1, static_cast<char>(c));
}

/// A token's text for routing.html: UTF-8 kept, markup and whitespace escaped as for bytes; a token
/// that is part of a character (invalid UTF-8 on its own) shows its bytes in hex.
inline std::string html_escape_token(const std::string& text) {
    if (!comigs::detail::is_valid_utf8(text)) {
        std::string out;
        char buf[8];
        for (const char c : text) {
            std::snprintf(buf, sizeof buf, "\\x%02X", static_cast<unsigned char>(c));
            out += buf;
        }
        return out;
    }
    std::string out;
    for (const char c : text)
        out += static_cast<unsigned char>(c) >= 0x80 ? std::string(1, c) : html_escape(static_cast<unsigned char>(c));
    return out;
}

/// A share as a small horizontal bar and its percentage (an empty cell when unknown).
inline std::string share_cell(std::optional<double> v, const char* colour) {
    if (!v) return "<td class=\"na\">-</td>";
    const double pct = 100.0 * std::clamp(*v, 0.0, 1.0);
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "<td><span class=\"bar\"><span style=\"width:%.1f%%;background:%s\"></span></span> %.0f%%</td>",
                  pct, colour, pct);
    return buf;
}

/// routing.html: first, for every method with a learned router, a table per user and mixture layer of
/// where the deployed model sends the user's test tokens (gate weight on generalists; with the embedded
/// corpus, personal-source tokens whose top expert is a specialist and shared-source tokens whose top
/// expert is a generalist); then a sample of each user's test text with every token coloured by the
/// expert ranked first (blue family: generalists, orange family: specialists; underlined: personal
/// source). Methods without a router (mean of the experts) are only named.
inline std::string routing_html(const std::vector<MethodResult>& methods,
                                const std::vector<std::pair<std::string, std::vector<RoutingSample>>>& by_method) {
    static const char* gen[] = {"#4292c6", "#9ecae1", "#c6dbef"};
    static const char* spec[] = {"#e6550d", "#fdae6b", "#a63603", "#fdd0a2"};
    const char* gen_bar = "#4292c6";
    const char* spec_bar = "#e6550d";
    // Methods whose routers weigh generalists against specialists first: there the shares say the most.
    auto kinds = [&](const std::string& name) {
        bool g = false, s = false;
        for (const auto& [method, samples] : by_method)
            if (method == name)
                for (const auto& smp : samples)
                    for (bool is_g : smp.expert_is_generalist) (is_g ? g : s) = true;
        return std::pair{g, s};
    };
    std::vector<const MethodResult*> routed, unrouted;
    for (const auto& m : methods) (m.routed ? routed : unrouted).push_back(&m);
    std::stable_partition(routed.begin(), routed.end(), [&](const MethodResult* m) {
        const auto [g, s] = kinds(m->name);
        return g && s;
    });
    std::ostringstream o;
    o << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>comigs routing</title><style>"
         "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{padding:3px 10px;text-align:left;"
         "font-size:90%}th{background:#f2f2f2;font-weight:normal}tr.mean td{border-top:1px solid #999}"
         "td.na{color:#999}.bar{display:inline-block;width:5em;height:.8em;background:#eee;vertical-align:middle}"
         ".bar span{display:block;height:100%}"
         ".t{font-family:monospace;line-height:1.6;word-break:break-all}.t span{padding:1px 0}"
         ".p{text-decoration:underline}.k{display:inline-block;width:1em;height:1em;vertical-align:middle}"
         "</style></head><body>\n<h1>Where the routers send each user's tokens</h1>\n";
    o << "<p>The deployed model of every user (after the last aggregation and download), on the user's own "
         "test data. Methods with a learned router: ";
    for (std::size_t i = 0; i < routed.size(); ++i)
        o << (i ? ", " : "") << "<a href=\"#" << routed[i]->name << "\">" << routed[i]->name << "</a>";
    if (routed.empty()) o << "none in this run";
    o << ".";
    if (!unrouted.empty()) {
        o << " Without a router (every token goes to every expert with equal weight): ";
        for (std::size_t i = 0; i < unrouted.size(); ++i) o << (i ? ", " : "") << unrouted[i]->name;
        o << ".";
    }
    o << "</p>\n";

    bool any_labels = false;
    for (const auto* m : routed)
        for (const auto& u : m->users)
            for (const auto& l : u.by_layer) any_labels |= l.personal_to_specialist.has_value() || l.shared_to_generalist.has_value();
    o << "<h2>Per layer</h2>\n<p><b>to generalists</b>: the gate weight on generalist experts, mean over tokens";
    if (any_labels)
        o << "; <b>personal &#x2192; specialist</b>: tokens of the user's personal source whose top expert is a "
             "specialist; <b>shared &#x2192; generalist</b>: tokens of the shared source whose top expert is a "
             "generalist (the embedded corpus knows each token's source)";
    o << ".</p>\n";
    for (const auto* m : routed) {
        std::size_t layers = 0;
        for (const auto& u : m->users) layers = std::max(layers, u.by_layer.size());
        const int per_layer = any_labels ? 3 : 1;
        o << "<h3 id=\"" << m->name << "\">" << m->name << "</h3>\n";
        if (const auto [g, s] = kinds(m->name); !(g && s)) {
            o << "<p>Every expert is a " << (g ? "generalist" : "specialist") << ": all gate weight goes to "
              << (g ? "generalists" : "specialists") << ", and the router only chooses among them (see the "
              << "token colours below).</p>\n";
            continue;
        }
        o << "<table><tr><th rowspan=\"2\">user</th>";
        for (std::size_t l = 0; l < layers; ++l) o << "<th colspan=\"" << per_layer << "\">layer " << l << "</th>";
        o << "</tr><tr>";
        for (std::size_t l = 0; l < layers; ++l)
            o << "<th>to generalists</th>"
              << (any_labels ? "<th>personal &#x2192; specialist</th><th>shared &#x2192; generalist</th>" : "");
        o << "</tr>\n";
        std::vector<LayerRouting> sum(layers);
        std::vector<int> n_personal(layers), n_shared(layers);
        for (const auto& u : m->users) {
            o << "<tr><td>" << u.user << "</td>";
            for (std::size_t l = 0; l < layers; ++l) {
                const LayerRouting lr = l < u.by_layer.size() ? u.by_layer[l] : LayerRouting{};
                o << share_cell(lr.generalist_share, gen_bar);
                if (any_labels)
                    o << share_cell(lr.personal_to_specialist, spec_bar) << share_cell(lr.shared_to_generalist, gen_bar);
                sum[l].generalist_share += lr.generalist_share / static_cast<double>(m->users.size());
                if (lr.personal_to_specialist) {
                    sum[l].personal_to_specialist = sum[l].personal_to_specialist.value_or(0) + *lr.personal_to_specialist;
                    ++n_personal[l];
                }
                if (lr.shared_to_generalist) {
                    sum[l].shared_to_generalist = sum[l].shared_to_generalist.value_or(0) + *lr.shared_to_generalist;
                    ++n_shared[l];
                }
            }
            o << "</tr>\n";
        }
        o << "<tr class=\"mean\"><td>mean</td>";
        for (std::size_t l = 0; l < layers; ++l) {
            if (n_personal[l]) *sum[l].personal_to_specialist /= n_personal[l];
            if (n_shared[l]) *sum[l].shared_to_generalist /= n_shared[l];
            o << share_cell(sum[l].generalist_share, gen_bar);
            if (any_labels)
                o << share_cell(sum[l].personal_to_specialist, spec_bar) << share_cell(sum[l].shared_to_generalist, gen_bar);
        }
        o << "</tr>\n</table>\n";
    }

    o << "<h2>Token by token</h2>\n<p>Every token of a test sample coloured by the expert its router ranked "
         "first, per mixture layer: <span class=\"k\" style=\"background:#4292c6\"></span> generalist, "
         "<span class=\"k\" style=\"background:#e6550d\"></span> specialist (lighter and darker shades tell "
         "experts of the same kind apart; hover for the expert's number). Underlined tokens come from the "
         "user's personal source (embedded corpus only).</p>\n";
    for (const auto* m : routed) {
        const auto it = std::find_if(by_method.begin(), by_method.end(), [&](const auto& p) { return p.first == m->name; });
        if (it == by_method.end()) continue;
        o << "<h3>" << m->name << "</h3>\n";
        for (const auto& s : it->second) {
            o << "<h4>user " << s.user << "</h4>\n";
            for (std::size_t layer = 0; layer < s.expert.size(); ++layer) {
                o << "<p><b>layer " << layer << "</b></p><div class=\"t\">";
                int ng = 0, ns = 0;
                std::vector<int> slot(s.expert_is_generalist.size());
                for (std::size_t e = 0; e < slot.size(); ++e) slot[e] = s.expert_is_generalist[e] ? ng++ : ns++;
                for (std::size_t t = 0; t < s.text.size() && t < s.expert[layer].size(); ++t) {
                    const int e = s.expert[layer][t];
                    const bool g = e >= 0 && static_cast<std::size_t>(e) < s.expert_is_generalist.size() &&
                                   s.expert_is_generalist[static_cast<std::size_t>(e)];
                    const char* colour = e < 0 ? "#eee" : g ? gen[slot[static_cast<std::size_t>(e)] % 3]
                                                            : spec[slot[static_cast<std::size_t>(e)] % 4];
                    const bool personal = t < s.personal.size() && s.personal[t];
                    o << "<span" << (personal ? " class=\"p\"" : "") << " style=\"background:" << colour
                      << "\" title=\"expert " << e << "\">"
                      << (t < s.token_text.size() ? html_escape_token(s.token_text[t]) : html_escape(s.text[t]))
                      << "</span>";
                }
                o << "</div>\n";
            }
        }
    }
    o << "</body></html>\n";
    return o.str();
}

/// The end-of-run table: one row per method and user, then the mean.
inline void print_table(std::FILE* out, const std::vector<MethodResult>& methods) {
    std::fprintf(out, "%-12s %5s %9s %9s %9s %7s %7s %7s %7s %7s\n", "method", "user", "test_ppl", "personal",
                 "ood_ppl", "floor", "gap", "gen", "sh->G", "pe->S");
    auto opt = [](const std::optional<double>& v, char* buf) {
        if (v)
            std::snprintf(buf, 16, "%7.3f", *v);
        else
            std::snprintf(buf, 16, "%7s", "-");
        return buf;
    };
    for (const auto& m : methods) {
        for (const auto& u : m.users) {
            char a[16], b[16], c[16], d[16];
            std::fprintf(out, "%-12s %5d %9.3f %9.3f %9.3f %s %s %7.2f %s %s\n", m.name.c_str(), u.user, u.test_ppl,
                         u.test_ppl_personalised, u.ood_ppl, opt(u.floor_ppl, a), opt(u.gap_closed, b),
                         u.generalist_share, opt(u.shared_to_generalist, c), opt(u.personal_to_specialist, d));
        }
        std::fprintf(out, "%-12s %5s %9.3f %9.3f %9.3f   upload %ld floats/round, %.1f s\n", m.name.c_str(), "mean",
                     m.mean(&UserResult::test_ppl), m.mean(&UserResult::test_ppl_personalised),
                     m.mean(&UserResult::ood_ppl), m.upload_floats_per_round, m.seconds);
    }
}

}  // namespace comigs::demo
