// comigs-model-memory: fine-tuning memory of a real-shaped model with random weights, measured (heap
// bytes counted by bench_memory.cpp's operator new/delete, and the process's peak RSS), in three parts:
//   base         the frozen base as the model holds it: the source tensors in the chosen precision
//                (F32, BF16, or GGML Q8_0 / Q4_0 blocks, what a GGUF file maps) plus anything the host
//                builds from them at load (GPT-2's Conv1D matrices transposed, or quantized from F32;
//                the source's bytes of those are freed, as a mapped file drops their pages)
//   adapters     attention LoRA (rank 8 on q/k/v/o, GPT-2's c_attn/c_proj), a 2-expert top-2 rank-8
//                mixture with its router on every MLP, their gradients and AdamW's two moments
//   activations  the peak above that during one training step (forward, backward, AdamW) on 8 x 128
//                tokens: everything kept between forward and backward, logits and work space
//
//   comigs-model-memory HOST PRECISION [--no-step]
//       HOST: gpt2_124m | smollm2_135m | llama32_1b;  PRECISION: fp32 | bf16 | q8_0 | q4_0
//       --no-step: base and adapters only (the step of a 1B model takes minutes on a small machine)
// Prints one markdown table row. Each run is its own process, so the numbers do not mix.
#include <sys/resource.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_memory.hpp"
#include "random_model.hpp"

namespace {

using namespace comigs::bench;

double mb(long long bytes) { return double(bytes) / 1e6; }
double peak_rss_mb() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_maxrss) * 1024 / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3 && !(argc == 4 && std::strcmp(argv[3], "--no-step") == 0)) {
        std::fprintf(stderr, "usage: comigs-model-memory gpt2_124m|smollm2_135m|llama32_1b fp32|bf16|q8_0|q4_0 [--no-step]\n");
        return 2;
    }
    const bool step = argc == 3;
    const std::string host_name = argv[1], prec = argv[2];
    try {
        const cm::ElementType type = prec == "fp32"   ? cm::ElementType::f32
                                     : prec == "bf16" ? cm::ElementType::bf16
                                     : prec == "q8_0" ? cm::ElementType::q8_0
                                     : prec == "q4_0" ? cm::ElementType::q4_0
                                                      : throw comigs::InvalidArgument("precision '" + prec +
                                                                                      "': not fp32, bf16, q8_0 or q4_0");
        const RandomHost host = host_name == "gpt2_124m"      ? RandomHost::gpt2_124m
                                : host_name == "smollm2_135m" ? RandomHost::smollm2_135m
                                : host_name == "llama32_1b"
                                    ? RandomHost::llama32_1b
                                    : throw comigs::InvalidArgument("host '" + host_name +
                                                                    "': not gpt2_124m, smollm2_135m or llama32_1b");
        const long long h0 = heap_current();
        auto model = random_host(host, type);
        const long long base = heap_current() - h0;

        const long long h1 = heap_current();
        ModelAdapters adapters(*model);
        adapters.opt->step();  // zero gradients: AdamW's moments exist after this
        const long long adapter_bytes = heap_current() - h1;

        if (!step) {
            std::printf("| %s | %s | %.1f | %.1f | (no step) | | %.1f |\n", host_name.c_str(), prec.c_str(), mb(base),
                        mb(adapter_bytes), peak_rss_mb());
            return 0;
        }
        const long long h2 = heap_current();
        heap_reset_peak();
        adapters.step(*model);
        const long long activations = heap_peak() - h2;
        std::printf("| %s | %s | %.1f | %.1f | %.1f | %.1f | %.1f |\n", host_name.c_str(), prec.c_str(), mb(base),
                    mb(adapter_bytes), mb(activations), mb(base + adapter_bytes + activations), peak_rss_mb());
        std::fflush(stdout);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "comigs-model-memory: %s\n", e.what());
        return 1;
    }
    return 0;
}
