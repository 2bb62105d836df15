// libFuzzer target for what comigs reads of a Hugging Face model folder besides the safetensors files
// (those have fuzz_safetensors): config.json into a GPT-2 or Llama/Qwen2 configuration, and
// model.safetensors.index.json's weight_map. The first byte picks the reader, the rest is the text.
// Any input may be rejected with a comigs exception; anything else is a bug, and so is an accepted
// config that does not validate or an index that names a path outside the folder.
#include <comigs/models/hf_model.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_hf_config: %s\n", what);
    std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
    namespace models = comigs::models;
    try {
        if (data[0] % 2 == 0) {
            const auto h = models::HfConfig::parse(text, "fuzz config.json");
            if (h.architecture == "GPT2LMHeadModel" || h.architecture == "GPT2Model") {
                const auto c = models::gpt2_config(h);
                c.validate();
                if (c.head_size() * c.n_head != c.d_model) fail("gpt2 config: heads do not divide d");
            } else {
                const auto c = models::llama_config(h);
                c.validate();
                (void)models::rope_inv_freq(c.hd(), c.rope_theta, c.rope_scaling);
                (void)h.token_ids("eos_token_id");
            }
        } else {
            const auto shards = models::parse_index(text, "fuzz index");
            for (const auto& [file, names] : shards) {
                if (file.empty() || file.find('/') != std::string::npos || file == ".." || names.empty())
                    fail("index accepted a bad shard name");
            }
        }
    } catch (const comigs::Error&) {
    }
    return 0;
}
