// libFuzzer target for what resuming a run reads besides the safetensors container (fuzz_safetensors
// covers that): generation manifests (io/checkpoint_store.hpp), a user's file as the runner takes it
// apart (its pending aggregate, then its trainer checkpoint) and the demo's results as a finished
// method keeps them (examples/demo/fields.hpp). The first byte picks which. Any input may be rejected
// with a comigs exception; anything else (a crash, a sanitizer report, another exception, a hang) is a
// bug. Inputs that are accepted must be usable: a parsed manifest's settings round-trip, an aggregate
// is a valid SharedAggregate, results serialise back to the same bytes.
#include <comigs/io/checkpoint.hpp>
#include <comigs/io/checkpoint_store.hpp>
#include <comigs/io/run_checkpoint.hpp>
#include <comigs/io/safetensors.hpp>

#include <demo/fields.hpp>
#include <demo/report.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string_view>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_run_checkpoint: %s\n", what);
    std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const auto mode = data[0] % 3;
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data + 1), size - 1);
    try {
        if (mode == 0) {
            const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
            const bool verify = (data[0] / 3) % 2 == 0;  // and without the checksum, to get past it
            const auto g = comigs::io::CheckpointStore::parse_manifest(text, 3, "fuzz/manifest.json", verify);
            if (g.round != 3) fail("a manifest of another round was accepted");
            for (const auto& f : g.files)
                if (f.name.empty() || f.name.find('/') != std::string::npos) fail("a bad file name was accepted");
        } else if (mode == 1) {
            auto f = comigs::io::SafetensorsFile::parse(bytes, {.verify_checksum = false});
            const auto a = comigs::detail::take_aggregate<float>(f, "pending/");
            for (const auto& i : a.tensors())
                if (static_cast<std::size_t>(i.offset + i.size()) > a.values().size()) fail("aggregate out of range");
            (void)comigs::io::from_safetensors<float>(f);
        } else {
            comigs::detail::ByteReader r(bytes, 0);
            comigs::demo::MethodResult m;
            std::vector<comigs::demo::RoutingSample> samples;
            comigs::demo::get_fields(r, m);
            comigs::demo::get_member(r, samples);
            comigs::detail::ByteWriter w;
            comigs::demo::put_fields(w, m);
            comigs::demo::put_member(w, samples);
            const std::size_t used = bytes.size() - r.remaining();
            // Flags read back as 0/1: the re-encoding has the input's length and is a fixed point.
            comigs::detail::ByteReader r2(w.bytes, 0);
            comigs::demo::MethodResult m2;
            std::vector<comigs::demo::RoutingSample> s2;
            comigs::demo::get_fields(r2, m2);
            comigs::demo::get_member(r2, s2);
            comigs::detail::ByteWriter w2;
            comigs::demo::put_fields(w2, m2);
            comigs::demo::put_member(w2, s2);
            if (w2.bytes != w.bytes || !r2.done() || w.bytes.size() != used) fail("results do not round-trip");
        }
    } catch (const comigs::Error&) {
    }
    return 0;
}
