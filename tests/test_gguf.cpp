#include <unistd.h>
#include <comigs/io/gguf.hpp>
#include <comigs/io/safetensors.hpp>
#include <comigs/random.hpp>
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "temp_dir.hpp"

namespace {
using namespace comigs;
using io::GgmlType;
using io::GgufFile;
using io::GgufType;
using io::GgufValue;

std::vector<std::byte> read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> b(c.size());
    std::memcpy(b.data(), c.data(), c.size());
    return b;
}

std::string golden(const std::string& name) { return std::string(COMIGS_GOLDEN_DIR) + "/" + name; }

/// Raw GGUF bytes for hostile files: every field written as told, nothing checked.
struct Raw {
    std::vector<std::byte> b;
    Raw& u32(std::uint32_t v) { return put(&v, 4); }
    Raw& u64(std::uint64_t v) { return put(&v, 8); }
    Raw& u8(std::uint8_t v) { return put(&v, 1); }
    Raw& str(const std::string& s) {
        u64(s.size());
        return put(s.data(), s.size());
    }
    Raw& header(std::uint64_t tensors, std::uint64_t kv, std::uint32_t version = 3) {
        put("GGUF", 4);
        u32(version);
        u64(tensors);
        return u64(kv);
    }
    /// A tensor info.
    Raw& info(const std::string& name, std::vector<std::uint64_t> dims, std::uint32_t type, std::uint64_t offset) {
        str(name);
        u32(static_cast<std::uint32_t>(dims.size()));
        for (auto d : dims) u64(d);
        u32(type);
        return u64(offset);
    }
    Raw& pad(std::size_t align = 32) {
        while (b.size() % align) b.push_back(std::byte{0});
        return *this;
    }
    Raw& zeros(std::size_t n) {
        b.insert(b.end(), n, std::byte{0});
        return *this;
    }
    Raw& put(const void* p, std::size_t n) {
        const auto* c = static_cast<const std::byte*>(p);
        b.insert(b.end(), c, c + n);
        return *this;
    }
};

void refused(const std::vector<std::byte>& bytes, const std::string& message) {
    CAPTURE(message);
    CHECK_THROWS_WITH_AS(GgufFile::parse(bytes), doctest::Contains(message.c_str()), FormatError);
}
}  // namespace

TEST_CASE("GGUF: golden files of an independent writer (tools/gguf_golden.py) read back equal, and write back byte for byte") {
    const auto expected = io::SafetensorsFile::load(golden("gguf_expected.safetensors"));
    for (const char* name : {"gguf_types.gguf", "gguf_align64.gguf"}) {
        CAPTURE(name);
        const GgufFile f = GgufFile::open(golden(name));
        CHECK(f.version() == 3);
        CHECK(f.alignment() == (std::string(name) == "gguf_align64.gguf" ? 64u : 32u));
        CHECK(f.get<std::string>("general.architecture") == "llama");
        CHECK(f.get<std::string>("general.name") == "comigs golden \xc3\xa9\xc3\xa8 \xe4\xb8\xad");
        CHECK(f.get<std::uint8_t>("test.u8") == 200);
        CHECK(f.get<std::int8_t>("test.i8") == -100);
        CHECK(f.get<std::uint16_t>("test.u16") == 60000);
        CHECK(f.get<std::int16_t>("test.i16") == -30000);
        CHECK(f.get<std::uint32_t>("test.u32") == 4000000000u);
        CHECK(f.get<std::int32_t>("test.i32") == -2000000000);
        CHECK(f.get<float>("test.f32") == 0.1f);
        CHECK(f.get<bool>("test.bool"));
        CHECK(f.get<std::uint64_t>("test.u64") == (std::uint64_t{1} << 63) + 5);
        CHECK(f.get<std::int64_t>("test.i64") == -(std::int64_t{1} << 62));
        CHECK(f.get<double>("test.f64") == -1.0e300);
        CHECK(f.get_int("test.i16") == -30000);
        CHECK(f.get_float("test.f32") == doctest::Approx(0.1));
        CHECK(f.get_strings("test.strings") == std::vector<std::string>{"a", "", "\xc4\xa0the", "<|endoftext|>"});
        const GgufValue* ints = f.find("test.ints");
        REQUIRE(ints != nullptr);
        CHECK(ints->element_type == GgufType::int32);
        CHECK(ints->array == std::vector<io::GgufScalar>{std::int32_t{1}, std::int32_t{-2}, std::int32_t{3}});
        CHECK(f.find("test.empty")->array.empty());
        CHECK_THROWS_WITH_AS(f.get<std::int32_t>("test.u32"), doctest::Contains("has type UINT32, expected INT32"),
                             FormatError);
        CHECK_THROWS_WITH_AS(f.get_int("test.f64"), doctest::Contains("expected an integer"), FormatError);
        CHECK_THROWS_WITH_AS(f.get<float>("absent.key"), doctest::Contains("no metadata key 'absent.key'"), FormatError);

        REQUIRE(f.tensors().size() == 6);
        CHECK(f.tensor("bf16.cube")->dims == std::vector<std::uint64_t>{4, 3, 2});
        CHECK(f.tensor("q8_0.matrix")->type == GgmlType::q8_0);
        for (const auto& t : f.tensors()) {
            CAPTURE(t.name);
            const auto want = expected.get<float>(t.name);
            const auto got = f.values<float>(t.name);
            REQUIRE(got.size() == want.size());
            CHECK(std::memcmp(got.data(), want.data(), got.size() * 4) == 0);
        }
        const auto q = f.quant_matrix("q4_0.matrix");
        CHECK(q.rows == 5);
        CHECK(q.cols == 32);
        CHECK_THROWS_AS(f.quant_matrix("f32.matrix"), FormatError);
        // comigs' writer lays out the same content in the same bytes.
        GgufFile copy;
        for (const auto& [k, v] : f.metadata()) copy.set(k, v);
        for (const auto& t : f.tensors()) copy.add_tensor(t.name, t.dims, t.type, t.bytes);
        CHECK(copy.serialize() == read_all(golden(name)));
    }
}

TEST_CASE("GGUF: files comigs builds read back equal; saved atomically") {
    GgufFile f;
    f.set("general.architecture", GgufValue("llama"));
    f.set("llama.block_count", GgufValue(std::uint32_t{2}));
    f.set("adapter.lora.alpha", GgufValue(16.0f));
    f.set("tokenizer.ggml.tokens", GgufValue::strings({"a", "b", "\xe2\x96\x81hello"}));
    f.set("llama.block_count", GgufValue(std::uint32_t{3}));  // replaced in place
    std::vector<float> m(4 * 64);
    Rng rng(2);
    for (auto& v : m) v = static_cast<float>(rng.normal());
    for (GgmlType t : {GgmlType::f32, GgmlType::f16, GgmlType::bf16, GgmlType::q8_0, GgmlType::q4_0})
        f.add_matrix(std::string("w.") + std::string(io::to_string(t)), ConstMatrixView<float>(m.data(), 4, 64), t);
    const auto bytes = f.serialize();
    const GgufFile g = GgufFile::parse(bytes);
    CHECK(g.metadata() == f.metadata());
    CHECK(g.get<std::uint32_t>("llama.block_count") == 3);
    CHECK(g.metadata().size() == 4);
    for (const auto& t : f.tensors()) {
        const auto* u = g.tensor(t.name);
        REQUIRE(u != nullptr);
        CHECK(u->dims == std::vector<std::uint64_t>{64, 4});
        CHECK(u->offset % 32 == 0);
        CHECK(std::equal(u->bytes.begin(), u->bytes.end(), t.bytes.begin(), t.bytes.end()));
    }
    CHECK(g.values<float>("w.F32") == m);
    const auto q8 = g.values<float>("w.Q8_0");
    for (std::size_t i = 0; i < m.size(); ++i) CHECK(std::abs(q8[i] - m[i]) < 0.03f);

    const comigs_test::TempDir tmp("comigs-test-gguf");
    const auto dir = tmp.path();
    f.save(dir / "out.gguf");
    const GgufFile h = GgufFile::open(dir / "out.gguf");
    CHECK(h.metadata() == f.metadata());
    CHECK(h.values<float>("w.Q4_0") == g.values<float>("w.Q4_0"));

    CHECK_THROWS_WITH_AS(f.add_matrix("odd", ConstMatrixView<float>(m.data(), 2, 40), GgmlType::q4_0),
                         doctest::Contains("multiple of 32"), InvalidArgument);
    CHECK_THROWS_WITH_AS(f.add_tensor("w.F32", {1}, GgmlType::f32, std::span<const std::byte>()),
                         doctest::Contains("added twice"), InvalidArgument);
    CHECK_THROWS_AS(f.add_tensor("short", {3}, GgmlType::f32, std::span<const std::byte>()), ShapeError);
    CHECK_THROWS_AS(f.set("general.alignment", GgufValue(std::uint32_t{24})), InvalidArgument);
}

TEST_CASE("GGUF: hostile files are refused, each with its own error") {
    // A valid file to start from: one key, one F32 tensor [2] at offset 0.
    const auto valid = [] {
        Raw r;
        r.header(1, 1).str("general.architecture").u32(8).str("llama");
        r.info("t", {2}, 0, 0).pad().zeros(32);
        return r.b;
    };
    CHECK_NOTHROW(GgufFile::parse(valid()));

    // Every truncation of a valid file is refused as truncated or as a tensor past the end.
    const auto full = valid();
    for (std::size_t n = 0; n + 32 < full.size(); ++n) {
        CAPTURE(n);
        CHECK_THROWS_AS(GgufFile::parse(std::span<const std::byte>(full.data(), n)), FormatError);
    }
    refused(std::vector<std::byte>(full.begin(), full.begin() + 54), "truncated file: metadata 'general.architecture' type needs 4 bytes");

    refused(Raw().put("GGUL", 4).u32(3).u64(0).u64(0).b, "not a GGUF file: magic 'GGUL'");
    refused(Raw().header(0, 0, 1).b, "version 1 is not supported");
    refused(Raw().header(0, std::uint64_t{1} << 60).b, "metadata count 1152921504606846976 cannot fit");
    refused(Raw().header(std::uint64_t{1} << 61, 0).b, "tensor count 2305843009213693952 cannot fit");
    refused(Raw().header(0, 1).str("k").u32(9).u32(4).u64(std::uint64_t{1} << 40).b, "array length 1099511627776 cannot fit");
    refused(Raw().header(0, 1).u64(std::uint64_t{1} << 50).zeros(16).b, "metadata key 0 of 1125899906842624 bytes");
    refused(Raw().header(0, 1).str("k").u32(13).u32(0).b, "unknown value type 13");
    refused(Raw().header(0, 1).str("").u32(4).u32(0).b, "metadata key 0 is empty");
    refused(Raw().header(1, 0).info("", {2}, 0, 0).pad().zeros(32).b, "tensor 0 has an empty name");
    refused(Raw().header(0, 1).str("k").u32(9).u32(77).u64(0).b, "array of unknown value type 77");
    refused(Raw().header(0, 1).str("k").u32(9).u32(9).u64(0).b, "array of arrays");
    refused(Raw().header(0, 1).str("k").u32(7).u8(2).b, "BOOL value 2");
    refused(Raw().header(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2).b, "duplicate metadata key 'k'");
    refused(Raw().header(0, 1).str("general.alignment").u32(4).u32(48).b, "general.alignment 48 is not a power of two");
    refused(Raw().header(0, 1).str("general.alignment").u32(10).u64(64).b, "general.alignment has type UINT64");
    refused(Raw().header(1, 0).info("t", {2, 2, 2, 2, 2}, 0, 0).b, "tensor 't' has 5 dimensions");
    refused(Raw().header(1, 0).info("t", {std::uint64_t{1} << 40, std::uint64_t{1} << 40}, 0, 0).b, "element count overflows");
    refused(Raw().header(1, 0).info("t", {32}, 99, 0).b, "tensor 't' has unknown ggml type 99");
    refused(Raw().header(1, 0).info("t", {256}, 14, 0).b, "tensor 't' has type Q6_K (14), not supported");
    refused(Raw().header(1, 0).info("t", {48}, 2, 0).b, "of type Q4_0 has rows of 48 values, not a multiple of 32");
    refused(Raw().header(1, 0).info("t", {2}, 0, 16).b, "tensor 't' offset 16 is not a multiple of the alignment 32");
    refused(Raw().header(2, 0).info("t", {2}, 0, 0).info("t", {2}, 0, 32).pad().zeros(64).b, "duplicate tensor name 't'");
    refused(Raw().header(1, 0).info("t", {16}, 0, 32).pad().zeros(64).b, "runs past the end of the data section");
    refused(Raw().header(2, 0).info("a", {16}, 0, 0).info("b", {8}, 0, 32).pad().zeros(96).b,
            "tensor 'b' at offset 32 overlaps tensor 'a'");
    refused(Raw().header(1, 0).info("t", {2}, 0, std::uint64_t(-32)).pad().zeros(32).b, "runs past the end");
    // Names from files are quoted without control bytes.
    refused(Raw().header(1, 0).info("a\nb", {32}, 14, 0).b, "'a\\x0ab'");
    // A missing file names the path.
    CHECK_THROWS_WITH_AS(GgufFile::open("/nonexistent/model.gguf"), doctest::Contains("/nonexistent/model.gguf"), IoError);
}
