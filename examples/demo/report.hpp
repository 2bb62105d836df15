#pragma once
// What the demo shows people: the summary table, results.json, curves.svg (test perplexity over steps,
// one line per method) and routing.html (each test token coloured by the expert the router chose, per
// layer: the paper's figure). Every file is written atomically.
#include <comigs/detail/utf8.hpp>
#include <comigs/io/atomic_file.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace comigs::demo {

/// How one mixture layer (or all of them) routed a user's test tokens.
struct LayerRouting {
    double generalist_share = 0;  ///< mean gate weight on generalists per token
    std::optional<double> shared_to_generalist;    ///< embedded corpus: shared-source tokens whose top expert is a generalist
    std::optional<double> personal_to_specialist;  ///< embedded corpus: personal tokens whose top expert is a specialist
};

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
    std::vector<LayerRouting> by_layer;  ///< routing per mixture layer (methods with routers)
};

struct CurvePoint {
    long step = 0;        ///< local steps per user so far
    double mean_ppl = 0;  ///< mean over users of the test perplexity (personalised protocol, cheap subset)
};

struct MethodResult {
    std::string name;
    std::vector<UserResult> users;
    long upload_floats_per_round = 0;
    std::vector<CurvePoint> curve;
    double seconds = 0;

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

/// One user's test text with the expert each token went to, per mixture layer.
struct RoutingSample {
    int user = 0;
    std::vector<unsigned char> text;
    std::vector<std::string> token_text;    ///< per token, when tokens are not bytes (--model with a BPE tokenizer)
    std::vector<std::vector<int>> expert;   ///< [layer][token] top-1 expert
    std::vector<unsigned char> personal;    ///< ground-truth label per token (empty for real text)
    std::vector<bool> expert_is_generalist; ///< per expert index
};

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

/// results.json in the layout; `config` is whatever describes the run.
inline nlohmann::json results_json(const nlohmann::json& config, const std::vector<MethodResult>& methods,
                                   double host_mean_ppl, std::optional<double> floor_mean_ppl) {
    nlohmann::json j;
    j["config"] = config;
    nlohmann::json ms = nlohmann::json::object();
    for (const auto& m : methods) {
        nlohmann::json users = nlohmann::json::array();
        for (const auto& u : m.users)
            users.push_back({{"user", u.user},
                             {"test_ppl", u.test_ppl},
                             {"test_ppl_personalised", u.test_ppl_personalised},
                             {"ood_ppl", u.ood_ppl},
                             {"floor_ppl", to_json(u.floor_ppl)},
                             {"gap_closed", to_json(u.gap_closed)},
                             {"generalist_share", u.generalist_share},
                             {"shared_to_generalist", to_json(u.shared_to_generalist)},
                             {"personal_to_specialist", to_json(u.personal_to_specialist)},
                             {"host_ppl", u.host_ppl},
                             {"dev_ppl", to_json(u.dev_ppl)},
                             {"routing_by_layer", [&] {
                                  nlohmann::json a = nlohmann::json::array();
                                  for (std::size_t l = 0; l < u.by_layer.size(); ++l) a.push_back(to_json(u.by_layer[l], l));
                                  return a;
                              }()}});
        nlohmann::json curve = nlohmann::json::array();
        for (const auto& p : m.curve) curve.push_back({{"step", p.step}, {"mean_ppl", p.mean_ppl}});
        ms[m.name] = {{"users", users},
                      {"mean_test_ppl", m.mean(&UserResult::test_ppl)},
                      {"mean_test_ppl_personalised", m.mean(&UserResult::test_ppl_personalised)},
                      {"mean_ood_ppl", m.mean(&UserResult::ood_ppl)},
                      {"mean_dev_ppl", to_json(m.mean(&UserResult::dev_ppl))},
                      {"mean_generalist_share", m.mean(&UserResult::generalist_share)},
                      {"routing_by_layer", routing_by_layer(m)},
                      {"upload_floats_per_round", m.upload_floats_per_round},
                      {"curve", curve},
                      {"seconds", m.seconds}};
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

/// curves.svg: mean test perplexity over local steps, one polyline per method, log-free linear axes.
inline std::string curves_svg(const std::vector<MethodResult>& methods, std::optional<double> floor_ppl) {
    const double W = 760, H = 420, L = 70, R = 170, T = 30, B = 50;
    double xmax = 1, ymin = 1e300, ymax = -1e300;
    for (const auto& m : methods)
        for (const auto& p : m.curve) {
            xmax = std::max(xmax, static_cast<double>(p.step));
            ymin = std::min(ymin, p.mean_ppl);
            ymax = std::max(ymax, p.mean_ppl);
        }
    if (floor_ppl) ymin = std::min(ymin, *floor_ppl);
    if (!(ymax > ymin)) {
        ymin = 0;
        ymax = 1;
    }
    const double pad = 0.05 * (ymax - ymin);
    ymin -= pad;
    ymax += pad;
    auto X = [&](double s) { return L + (W - L - R) * s / xmax; };
    auto Y = [&](double v) { return T + (H - T - B) * (ymax - v) / (ymax - ymin); };
    std::ostringstream o;
    o.precision(5);
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
      << ' ' << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
    o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    o << "<text x=\"" << W / 2 - 60 << "\" y=\"18\" font-size=\"14\">Test perplexity (mean over users)</text>\n";
    o << "<line x1=\"" << L << "\" y1=\"" << H - B << "\" x2=\"" << W - R << "\" y2=\"" << H - B << "\" stroke=\"black\"/>\n";
    o << "<line x1=\"" << L << "\" y1=\"" << T << "\" x2=\"" << L << "\" y2=\"" << H - B << "\" stroke=\"black\"/>\n";
    for (int i = 0; i <= 4; ++i) {
        const double v = ymin + (ymax - ymin) * i / 4.0, s = xmax * i / 4.0;
        o << "<text x=\"" << L - 8 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">" << v << "</text>\n";
        o << "<line x1=\"" << L << "\" y1=\"" << Y(v) << "\" x2=\"" << W - R << "\" y2=\"" << Y(v)
          << "\" stroke=\"#ddd\"/>\n";
        o << "<text x=\"" << X(s) << "\" y=\"" << H - B + 18 << "\" text-anchor=\"middle\">" << std::lround(s)
          << "</text>\n";
    }
    o << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 10 << "\" text-anchor=\"middle\">local steps per user</text>\n";
    if (floor_ppl)
        o << "<line x1=\"" << L << "\" y1=\"" << Y(*floor_ppl) << "\" x2=\"" << W - R << "\" y2=\"" << Y(*floor_ppl)
          << "\" stroke=\"black\" stroke-dasharray=\"4 4\"/><text x=\"" << W - R + 6 << "\" y=\"" << Y(*floor_ppl) + 4
          << "\">floor</text>\n";
    for (std::size_t i = 0; i < methods.size(); ++i) {
        const auto& m = methods[i];
        if (m.curve.empty()) continue;
        o << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << method_colour(i) << "\" points=\"";
        for (const auto& p : m.curve) o << X(static_cast<double>(p.step)) << ',' << Y(p.mean_ppl) << ' ';
        o << "\"/>\n";
        o << "<text x=\"" << W - R + 6 << "\" y=\"" << T + 16 * (i + 1) << "\" fill=\"" << method_colour(i) << "\">"
          << m.name << "</text>\n";
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

/// routing.html: per method and user, the sample text once per layer with every token coloured by
/// the expert chosen (blue family: generalists, orange family: specialists); underlined tokens come
/// from the user's personal source when ground truth is known.
inline std::string routing_html(const std::vector<std::pair<std::string, std::vector<RoutingSample>>>& by_method) {
    static const char* gen[] = {"#9ecae1", "#4292c6", "#c6dbef"};
    static const char* spec[] = {"#fdae6b", "#e6550d", "#fdd0a2", "#a63603"};
    std::ostringstream o;
    o << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>comigs routing</title><style>"
         "body{font-family:sans-serif;max-width:70em;margin:2em auto}"
         ".t{font-family:monospace;line-height:1.6;word-break:break-all}.t span{padding:1px 0}"
         ".p{text-decoration:underline}.k{display:inline-block;width:1em;height:1em;vertical-align:middle}"
         "</style></head><body>\n<h1>Which expert each token goes to</h1>\n"
         "<p>Every token of a test sample is coloured by the expert its router ranked first, per mixture layer: "
         "<span class=\"k\" style=\"background:#4292c6\"></span> generalist, "
         "<span class=\"k\" style=\"background:#e6550d\"></span> specialist. Underlined tokens were generated by "
         "the user's personal source (embedded corpus only).</p>\n";
    for (const auto& [method, samples] : by_method) {
        o << "<h2>" << method << "</h2>\n";
        for (const auto& s : samples) {
            o << "<h3>user " << s.user << "</h3>\n";
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
