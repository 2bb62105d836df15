// libFuzzer target for the safetensors reader (build with -DCOMIGS_BUILD_FUZZERS=ON and clang; run with
// tests/fuzz/run.sh). Any input may be rejected with a comigs exception; anything else (a crash, a
// sanitizer report, another exception type, a leak) is a bug. Inputs that parse must also be usable:
// typed reads of every floating tensor work, and writing the file and reading it back gives the same
// tensors and metadata, byte-identically on a second write.
#include <comigs/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
    std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using comigs::io::SafetensorsFile;
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);

    SafetensorsFile file;
    try {
        file = SafetensorsFile::parse(bytes);
    } catch (const comigs::FormatError&) {
        // The checksum-free path must reject the same inputs, except checksum mismatches.
        try {
            (void)SafetensorsFile::parse(bytes, {.verify_checksum = false});
        } catch (const comigs::FormatError&) {
        }
        return 0;
    }

    for (const auto& t : file.tensors()) {
        if (t.bytes.size() != static_cast<std::size_t>(t.numel()) * comigs::io::dtype_size(t.dtype))
            fail("tensor byte count differs from shape x dtype size");
        if (comigs::detail::is_float_dtype(t.dtype)) {
            if (file.get<float>(t.name, t.shape).size() != static_cast<std::size_t>(t.numel()))
                fail("get<float> returned the wrong number of elements");
            if (file.get<double>(t.name).size() != static_cast<std::size_t>(t.numel()))
                fail("get<double> returned the wrong number of elements");
        }
    }

    const auto written = file.serialize();
    const SafetensorsFile reread = SafetensorsFile::parse(written);
    if (!(reread == file)) fail("write then read changed the file");
    if (reread.serialize() != written) fail("second write differs from the first");
    const SafetensorsFile plain = SafetensorsFile::parse(file.serialize({.checksum = false}));
    if (!(plain == file)) fail("write without checksum then read changed the file");
    return 0;
}
