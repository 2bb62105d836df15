// libFuzzer target for the GGUF reader (build with -DCOMIGS_BUILD_FUZZERS=ON and clang; run with
// tests/fuzz/run.sh). Any input may be rejected with a FormatError; anything else (a crash, a sanitizer
// report, another exception type, a leak, a hang) is a bug. Inputs that parse must also be usable: every
// tensor's values convert (F16/BF16 widen, Q8_0/Q4_0 dequantize), every quantized matrix gives a view,
// and comigs' writer gives a file that parses to the same metadata and tensors, byte-identically on a
// second write. The model-file readers on top (models/gguf_model.hpp: the Llama config and the tokenizer
// from the metadata, the weights under transformers' names with q/k rows un-permuted) may refuse a parsed
// file with a comigs error naming it, nothing else.
#include <comigs/io/gguf.hpp>
#include <comigs/models/gguf_model.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <span>
#include <utility>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_gguf: %s\n", what);
    std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using comigs::io::GgufFile;
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    std::shared_ptr<const GgufFile> shared;
    try {
        shared = std::make_shared<const GgufFile>(GgufFile::parse(bytes));
    } catch (const comigs::FormatError&) {
        return 0;
    }
    const GgufFile& file = *shared;
    for (const auto& t : file.tensors()) {
        if (t.bytes.data() < bytes.data() || t.bytes.data() + t.bytes.size() > bytes.data() + bytes.size())
            fail("tensor bytes outside the input");
        if (file.values<float>(t.name).size() != t.elements()) fail("values() returned the wrong number of elements");
        if (comigs::io::quant_type_of(t.type) && t.dims.size() == 2) {
            const auto q = file.quant_matrix(t.name);
            if (static_cast<std::uint64_t>(q.rows) != t.dims[1]) fail("quant_matrix rows differ from dims[1]");
        }
    }
    try {
        const auto config = comigs::models::gguf_llama_config(file, "fuzz.gguf");
        std::optional<std::pair<comigs::Index, comigs::Index>> qk;
        if (config.model_type == "llama") qk = std::pair<comigs::Index, comigs::Index>{config.n_head, config.kv_heads()};
        auto source = std::make_shared<const comigs::models::GgufSource>(shared, "fuzz.gguf", qk);
        comigs::models::load_llama_weights<float>(source, config, {}, "the GGUF metadata");
    } catch (const comigs::Error&) {
    }
    try {
        const auto tok = comigs::models::gguf_tokenizer(file, "fuzz.gguf");
        const auto ids = tok.encode("the quick brown fox 123 <|endoftext|>", true);
        if (ids.empty()) fail("a tokenizer encoded text to nothing");
    } catch (const comigs::FormatError&) {
    }
    GgufFile copy;
    for (const auto& [k, v] : file.metadata())
        if (k != "general.alignment") copy.set(k, v);
    if (file.find("general.alignment")) copy.set("general.alignment", *file.find("general.alignment"));
    for (const auto& t : file.tensors()) copy.add_tensor(t.name, t.dims, t.type, t.bytes);
    const auto written = copy.serialize();
    const GgufFile reread = GgufFile::parse(written);
    if (reread.tensors().size() != file.tensors().size()) fail("write then read changed the tensor count");
    for (std::size_t i = 0; i < file.tensors().size(); ++i) {
        const auto& a = file.tensors()[i];
        const auto& b = reread.tensors()[i];
        if (a.name != b.name || a.dims != b.dims || a.type != b.type ||
            !std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end()))
            fail("write then read changed a tensor");
    }
    for (const auto& [k, v] : file.metadata()) {
        const auto* w = reread.find(k);
        if (w == nullptr || !(*w == v)) {
            // NaN floats compare unequal to themselves: compare the bytes of a second write instead.
            if (w == nullptr) fail("write then read lost a metadata key");
        }
    }
    GgufFile again;
    for (const auto& [k, v] : reread.metadata()) again.set(k, v);
    for (const auto& t : reread.tensors()) again.add_tensor(t.name, t.dims, t.type, t.bytes);
    if (again.serialize() != written) fail("second write differs from the first");
    return 0;
}
