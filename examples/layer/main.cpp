// comigs-layer: runs a mixture-of-LoRA-experts layer described by a safetensors file (configuration in
// its metadata, tensors by name; see include/comigs/io/layer_file.hpp) and writes y, dx, lb_loss and
// the gradient of every trainable tensor for loss = sum(y * dy) + lb_loss. Export the same tensors
// from your framework, run both, compare: that checks an integration end to end.
#include <comigs/io/layer_file.hpp>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>

// Largest |got - want| over the tensor, relative to the largest |want| (or 1 if that is tiny).
static double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
    double err = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        err = std::max(err, std::abs(got[i] - want[i]));
        scale = std::max(scale, std::abs(want[i]));
    }
    return err / std::max(scale, 1e-30);
}

int main(int argc, char** argv) {
    CLI::App app{"Run a comigs mixture layer on tensors from a safetensors file"};
    std::string input, output;
    app.add_option("input", input, "layer file: metadata form/experts/top_k/rank/alpha/scaling/"
                                   "expert0_importance/routing, tensors x, dy, base weights, LoRA, router (unused without one)")
        ->required()
        ->check(CLI::ExistingFile);
    app.add_option("output", output, "where to write y, dx, lb_loss and <name>.grad")->required();
    std::string expect;
    double rtol = -1;
    app.add_option("--expect", expect, "compare every output tensor with this file's (exit 2 on mismatch)")
        ->check(CLI::ExistingFile);
    app.add_option("--rtol", rtol, "max error relative to the tensor's largest value (default 1e-9 for F64, 2e-5 for F32)");
    CLI11_PARSE(app, argc, argv);
    try {
        const auto in = comigs::io::SafetensorsFile::load(input);
        const auto out = comigs::io::run_layer_file(in);
        out.save(output);
        std::printf("%s: %zu tensors written (lb_loss %.9g)\n", output.c_str(), out.size(),
                    out.get<double>("lb_loss")[0]);
        if (!expect.empty()) {
            const auto want = comigs::io::SafetensorsFile::load(expect);
            if (rtol < 0) rtol = in.at("x").dtype == comigs::io::Dtype::F64 ? 1e-9 : 2e-5;
            int bad = 0;
            for (const auto& t : want.tensors()) {
                const double e = relative_error(out.get<double>(t.name, t.shape), want.get<double>(t.name));
                if (e > rtol) {
                    std::fprintf(stderr, "mismatch %-28s relative error %.3g > %.3g\n", t.name.c_str(), e, rtol);
                    ++bad;
                }
            }
            std::printf("compared %zu tensors with %s: %d mismatches\n", want.size(), expect.c_str(), bad);
            if (bad) return 2;
        }
    } catch (const comigs::Error& e) {
        std::fprintf(stderr, "comigs-layer: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {  // e.g. out of memory: still a message and an exit code
        std::fprintf(stderr, "comigs-layer: %s: %s\n", input.c_str(), e.what());
        return 1;
    }
    return 0;
}
