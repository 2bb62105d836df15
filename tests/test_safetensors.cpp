#include <doctest/doctest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <comigs/io/atomic_file.hpp>
#include <comigs/io/safetensors.hpp>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using comigs::FormatError;
using comigs::io::Dtype;
using comigs::io::SafetensorsFile;

namespace {

/// A fresh empty directory, removed with its contents at the end of the test.
struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("comigs-st-" + std::to_string(::getpid()) + "-" + std::to_string(counter.fetch_add(1)));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::vector<std::string> entries() const {
        std::vector<std::string> names;
        for (const auto& e : fs::directory_iterator(path)) names.push_back(e.path().filename().string());
        std::sort(names.begin(), names.end());
        return names;
    }
};

std::vector<std::byte> bytes_of(std::string_view s) {
    std::vector<std::byte> b(s.size());
    if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
    return b;
}

void append_le64(std::vector<std::byte>& out, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xFF));
}

/// A file image from header text (used as is, no padding) and data bytes.
std::vector<std::byte> make_file(std::string_view header, std::vector<std::byte> data = {}) {
    std::vector<std::byte> out;
    append_le64(out, header.size());
    const auto h = bytes_of(header);
    out.insert(out.end(), h.begin(), h.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

std::vector<std::byte> zeros(std::size_t n) { return std::vector<std::byte>(n, std::byte{0}); }

std::vector<std::byte> read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> b(c.size());
    if (!c.empty()) std::memcpy(b.data(), c.data(), c.size());
    return b;
}

void write_all(const fs::path& p, const std::vector<std::byte>& b) {
    std::ofstream out(p, std::ios::binary);
    out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

SafetensorsFile parse(const std::vector<std::byte>& b) { return SafetensorsFile::parse(b); }

}  // namespace

TEST_CASE("safetensors dtypes: every name the format defines, with its size") {
    const std::pair<const char*, std::size_t> names[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},  {"I32", 4},     {"I16", 2},    {"I8", 1},
        {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
    for (const auto& [name, size] : names) {
        const auto d = comigs::io::dtype_from_name(name);
        REQUIRE(d.has_value());
        CHECK(comigs::io::dtype_name(*d) == name);
        CHECK(comigs::io::dtype_size(*d) == size);
    }
    CHECK_FALSE(comigs::io::dtype_from_name("f32").has_value());
    CHECK_FALSE(comigs::io::dtype_from_name("F128").has_value());
    CHECK_FALSE(comigs::io::dtype_from_name("").has_value());
}

TEST_CASE("float16 and bfloat16 conversions round to nearest even") {
    using namespace comigs::detail;
    CHECK(float_to_f16_bits(1.0f) == 0x3C00);
    CHECK(float_to_f16_bits(-2.0f) == 0xC000);
    CHECK(float_to_f16_bits(65504.0f) == 0x7BFF);
    CHECK(float_to_f16_bits(65519.0f) == 0x7BFF);
    CHECK(float_to_f16_bits(65520.0f) == 0x7C00);    // the tie rounds up to inf
    CHECK(float_to_f16_bits(0x1p-24f) == 0x0001);    // smallest subnormal
    CHECK(float_to_f16_bits(0x1p-25f) == 0x0000);    // tie between 0 and 2^-24 goes to even (0)
    CHECK(float_to_f16_bits(0x1.8p-24f) == 0x0002);  // tie between 1 and 2 subnormal ulps goes to 2
    CHECK(float_to_f16_bits(0.1f) == 0x2E66);
    CHECK(float_to_f16_bits(1.0f + 0x1p-11f) == 0x3C00);      // tie, even below
    CHECK(float_to_f16_bits(1.0f + 3 * 0x1p-11f) == 0x3C02);  // tie, even above
    CHECK(float_to_f16_bits(std::numeric_limits<float>::infinity()) == 0x7C00);
    CHECK(std::isnan(f16_bits_to_float(float_to_f16_bits(std::numeric_limits<float>::quiet_NaN()))));
    CHECK(f16_bits_to_float(0x3555) == 0.333251953125f);

    CHECK(float_to_bf16_bits(1.0f) == 0x3F80);
    CHECK(float_to_bf16_bits(3.14159265f) == 0x4049);
    CHECK(bf16_bits_to_float(0x4049) == 3.140625f);
    CHECK(float_to_bf16_bits(std::bit_cast<float>(0x3F808000u)) == 0x3F80);  // tie, even below
    CHECK(float_to_bf16_bits(std::bit_cast<float>(0x3F818000u)) == 0x3F82);  // tie, even above
    CHECK(float_to_bf16_bits(std::bit_cast<float>(0x3F808001u)) == 0x3F81);
    CHECK(float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7F80);  // overflow to inf
    CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::bit_cast<float>(0x7F800001u)))));

    // Every non-NaN 16-bit pattern survives the trip through float, in both formats.
    int f16_bad = 0, bf16_bad = 0;
    for (std::uint32_t b = 0; b < 65536; ++b) {
        const auto h = static_cast<std::uint16_t>(b);
        if ((h & 0x7C00) != 0x7C00 || (h & 0x3FF) == 0) f16_bad += float_to_f16_bits(f16_bits_to_float(h)) != h;
        if ((h & 0x7F80) != 0x7F80 || (h & 0x7F) == 0) bf16_bad += float_to_bf16_bits(bf16_bits_to_float(h)) != h;
    }
    CHECK(f16_bad == 0);
    CHECK(bf16_bad == 0);
}

TEST_CASE("XXH64 matches the reference values, in one piece and streamed") {
    using comigs::detail::Xxh64;
    CHECK(Xxh64::hash({}) == 0xef46db3751d8e999ull);
    CHECK(Xxh64::hash(bytes_of("a")) == 0xd24ec4f1a98c6e5bull);
    CHECK(Xxh64::hash(bytes_of("abc")) == 0x44bc2cf5ad770999ull);
    CHECK(Xxh64::hash(bytes_of("0123456789abcdefghijklmnopqrstuvw")) == 0xe97423e605e2f3b4ull);
    std::vector<std::byte> b100(100), b1000(1000);
    for (int i = 0; i < 100; ++i) b100[i] = static_cast<std::byte>(i);
    for (int i = 0; i < 1000; ++i) b1000[i] = static_cast<std::byte>((i * 7 + 3) % 256);
    CHECK(Xxh64::hash(b100) == 0x6ac1e58032166597ull);
    CHECK(Xxh64::hash(b1000) == 0x5f235fa033f1a3fbull);
    for (std::size_t chunk : {1, 3, 7, 31, 32, 33, 64, 999}) {
        Xxh64 h;
        for (std::size_t i = 0; i < b1000.size(); i += chunk)
            h.update(std::span(b1000).subspan(i, std::min(chunk, b1000.size() - i)));
        CHECK(h.digest() == 0x5f235fa033f1a3fbull);
    }
}

TEST_CASE("UTF-8 validation rejects overlongs, surrogates and truncation") {
    using comigs::detail::utf8_invalid_offset;
    constexpr auto ok = std::string_view::npos;
    CHECK(utf8_invalid_offset("plain") == ok);
    CHECK(utf8_invalid_offset("\xC3\xA9t\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80") == ok);
    CHECK(utf8_invalid_offset("ab\xC0\xAF") == 2);        // overlong '/'
    CHECK(utf8_invalid_offset("\xE0\x80\xAF") == 0);      // overlong
    CHECK(utf8_invalid_offset("x\xED\xA0\x80") == 1);     // surrogate U+D800
    CHECK(utf8_invalid_offset("\xF4\x90\x80\x80") == 0);  // above U+10FFFF
    CHECK(utf8_invalid_offset("abc\xE2\x82") == 3);       // truncated
    CHECK(utf8_invalid_offset("\x80") == 0);              // lone continuation
    CHECK(utf8_invalid_offset("\xFF") == 0);
}

TEST_CASE_TEMPLATE("SafetensorsFile: round trip of floating tensors, in memory and through a file", T, float, double) {
    std::vector<T> w(12);
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<T>(0.1) * static_cast<T>(i) - static_cast<T>(0.3);
    const std::vector<T> bias{static_cast<T>(1.5), static_cast<T>(-2.25), static_cast<T>(1e-7)};

    SafetensorsFile f;
    f.add("layer.w", {3, 4}, w);
    f.add("layer.b", {3}, std::span<const T>(bias));
    f.metadata()["format"] = "pt";
    f.metadata()["comigs.note"] = "h\xC3\xA9llo \"quoted\"\n";
    CHECK(f.at("layer.w").dtype == comigs::io::dtype_of<T>());

    const auto bytes = f.serialize();
    const SafetensorsFile g = SafetensorsFile::parse(bytes);
    CHECK(g == f);
    CHECK(g.tensors()[0].name == "layer.w");
    CHECK(g.tensors()[1].name == "layer.b");
    CHECK(g.get<T>("layer.w", {3, 4}) == w);
    CHECK(g.get<T>("layer.b") == bias);
    CHECK(g.metadata().size() == 2);  // the checksum was verified and stripped
    CHECK(g.metadata().at("comigs.note") == "h\xC3\xA9llo \"quoted\"\n");

    TempDir dir;
    const fs::path p = dir.path / "adapter.safetensors";
    f.save(p);
    CHECK(read_all(p) == bytes);
    CHECK(SafetensorsFile::load(p) == f);
    CHECK(dir.entries() == std::vector<std::string>{"adapter.safetensors"});

    // The other precision converts on read.
    using Other = std::conditional_t<std::is_same_v<T, float>, double, float>;
    const auto wo = g.get<Other>("layer.w");
    for (std::size_t i = 0; i < w.size(); ++i) CHECK(wo[i] == static_cast<Other>(w[i]));
}

TEST_CASE_TEMPLATE("SafetensorsFile: matrix views in and out honour strides", T, float, double) {
    std::vector<T> storage(3 * 5);
    for (std::size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<T>(i) + static_cast<T>(0.5);
    comigs::MatrixView<T> padded(storage.data(), 3, 4, 5);  // 3 x 4 inside rows of 5

    SafetensorsFile f;
    f.add("m", padded);
    CHECK(f.shape("m") == std::vector<comigs::Index>{3, 4});
    const auto flat = f.get<T>("m");
    for (comigs::Index r = 0; r < 3; ++r)
        for (comigs::Index c = 0; c < 4; ++c) CHECK(flat[static_cast<std::size_t>(r * 4 + c)] == padded(r, c));

    std::vector<T> out_storage(3 * 6, static_cast<T>(-1));
    comigs::MatrixView<T> out(out_storage.data(), 3, 4, 6);
    SafetensorsFile::parse(f.serialize()).get_into("m", out);
    for (comigs::Index r = 0; r < 3; ++r) {
        for (comigs::Index c = 0; c < 4; ++c) CHECK(out(r, c) == padded(r, c));
        CHECK(out_storage[static_cast<std::size_t>(r * 6 + 4)] == static_cast<T>(-1));  // padding untouched
    }
    comigs::MatrixView<T> wrong(out_storage.data(), 4, 3);
    CHECK_THROWS_WITH_AS(f.get_into("m", wrong), doctest::Contains("shape [3, 4], expected [4, 3]"),
                         comigs::ShapeError);
    std::vector<T> span_out(12);
    f.get_into("m", {3, 4}, std::span<T>(span_out));
    CHECK(span_out == flat);
}

TEST_CASE("SafetensorsFile: BF16 and F16 storage round to nearest even and read back as float or double") {
    const std::vector<float> v{1.0f, 3.14159265f, -0.1f, 65504.0f, 1e-3f, 0.0f};
    SafetensorsFile f;
    f.add("bf", {2, 3}, v, Dtype::BF16);
    f.add("h", {6}, v, Dtype::F16);
    f.add("d_as_bf", {6}, std::vector<double>(v.begin(), v.end()), Dtype::BF16);
    CHECK(f.at("bf").bytes.size() == 12);
    CHECK(f.at("h").bytes.size() == 12);
    const SafetensorsFile g = SafetensorsFile::parse(f.serialize());
    const auto bf = g.get<float>("bf", {2, 3});
    const auto h = g.get<double>("h");
    for (std::size_t i = 0; i < v.size(); ++i) {
        CHECK(bf[i] == comigs::detail::bf16_bits_to_float(comigs::detail::float_to_bf16_bits(v[i])));
        CHECK(std::abs(bf[i] - v[i]) <= std::abs(v[i]) * 0x1p-8f);
        CHECK(h[i] == comigs::detail::f16_bits_to_float(comigs::detail::float_to_f16_bits(v[i])));
    }
    CHECK(bf[1] == 3.140625f);
    CHECK(h[3] == 65504.0);
    CHECK(g.get<float>("d_as_bf") == bf);
    // The stored bytes are little-endian bfloat16 patterns.
    CHECK(f.at("bf").bytes[0] == std::byte{0x80});
    CHECK(f.at("bf").bytes[1] == std::byte{0x3F});
}

TEST_CASE("SafetensorsFile: scalars, empty tensors and integer dtypes round trip") {
    SafetensorsFile f;
    f.add("scalar", {}, std::vector<double>{42.5});
    f.add("empty", {0}, std::vector<float>{});
    f.add("empty2d", {2, 0, 3}, std::vector<float>{});
    f.add("z_empty", {0}, std::vector<double>{});  // zero-byte tensors keep their order, not name order
    f.add("a_empty", {0, 0}, std::vector<double>{});
    f.add("ids", {4}, std::vector<std::int32_t>{1, -2, 3, 2147483647});
    f.add("steps", {1}, std::vector<std::int64_t>{-9000000000LL});
    f.add("mask", {3}, std::vector<std::uint8_t>{0, 1, 255});
    f.add_raw("flags", Dtype::BOOL, {2}, {std::byte{1}, std::byte{0}});
    const SafetensorsFile g = SafetensorsFile::parse(f.serialize());
    CHECK(g == f);
    CHECK(g.shape("scalar").empty());
    CHECK(g.get<double>("scalar") == std::vector<double>{42.5});
    CHECK(g.get<float>("empty", {0}).empty());
    CHECK(g.get<float>("empty2d", {2, 0, 3}).empty());
    CHECK(g.get<std::int32_t>("ids") == std::vector<std::int32_t>{1, -2, 3, 2147483647});
    CHECK(g.get<std::int64_t>("steps") == std::vector<std::int64_t>{-9000000000LL});
    CHECK(g.get<std::uint8_t>("mask") == std::vector<std::uint8_t>{0, 1, 255});
    CHECK(g.at("flags").dtype == Dtype::BOOL);

    CHECK_THROWS_WITH_AS(g.get<float>("ids"), doctest::Contains("dtype I32 cannot be read as floating point"),
                         FormatError);
    CHECK_THROWS_WITH_AS(g.get<std::int64_t>("ids"), doctest::Contains("dtype I32 cannot be read as I64"), FormatError);
    CHECK_THROWS_WITH_AS(g.get<float>("nope"), doctest::Contains("'nope': not in the file"), FormatError);
    CHECK_THROWS_WITH_AS(g.get<double>("scalar", {1}), doctest::Contains("'scalar': shape [], expected [1]"),
                         comigs::ShapeError);

    // A tensor file with no tensors at all is valid too.
    const SafetensorsFile none = SafetensorsFile::parse(SafetensorsFile().serialize());
    CHECK(none.empty());
    CHECK(none.metadata().empty());
}

TEST_CASE("SafetensorsFile: shape checks name the tensor, the found and the expected shape") {
    SafetensorsFile f;
    f.add("base_model.lora_A.weight", {3, 4}, std::vector<float>(12, 1.0f));
    CHECK_THROWS_WITH_AS(f.get<float>("base_model.lora_A.weight", {4, 3}),
                         doctest::Contains("tensor 'base_model.lora_A.weight': shape [3, 4], expected [4, 3]"),
                         comigs::ShapeError);
    CHECK_THROWS_WITH_AS(f.get<float>("base_model.lora_A.weight", {12}), doctest::Contains("expected [12]"),
                         comigs::ShapeError);
}

TEST_CASE("SafetensorsFile: add() rejects bad names, shapes and conversions") {
    SafetensorsFile f;
    f.add("a", {2}, std::vector<float>{1, 2});
    CHECK_THROWS_WITH_AS(f.add("a", {1}, std::vector<float>{1}), doctest::Contains("'a': already in the file"),
                         comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(f.add("__metadata__", {1}, std::vector<float>{1}), doctest::Contains("reserved"),
                         comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(f.add("bad\xFF", {1}, std::vector<float>{1}), doctest::Contains("not valid UTF-8"),
                         comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(f.add("n", {2, -1}, std::vector<float>{}), doctest::Contains("negative dimension"),
                         comigs::ShapeError);
    CHECK_THROWS_WITH_AS(f.add("c", {2, 3}, std::vector<float>(5)),
                         doctest::Contains("shape [2, 3] holds 6 elements but 5 values were given"),
                         comigs::ShapeError);
    CHECK_THROWS_WITH_AS(f.add("big", {1LL << 40, 1LL << 40}, std::vector<float>{}), doctest::Contains("overflows"),
                         comigs::ShapeError);
    CHECK_THROWS_WITH_AS(f.add("i", {1}, std::vector<std::int32_t>{1}, Dtype::F32),
                         doctest::Contains("I32 values are stored as I32, not F32"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(f.add("x", {1}, std::vector<float>{1}, Dtype::I8),
                         doctest::Contains("F32, F64, BF16 or F16, not I8"), comigs::InvalidArgument);
    CHECK_THROWS_WITH_AS(f.add_raw("r", Dtype::F16, {3}, zeros(4)), doctest::Contains("needs 6 bytes, got 4"),
                         comigs::ShapeError);
    CHECK(f.size() == 1);
    CHECK(f.erase("a"));
    CHECK_FALSE(f.erase("a"));
    CHECK(f.empty());
    f.add("a", {1}, std::vector<float>{3});  // the name is free again
    CHECK(f.get<float>("a") == std::vector<float>{3});
}

TEST_CASE("SafetensorsFile: output is byte-exact") {
    SafetensorsFile f;
    f.add("a", {2}, std::vector<float>{1.0f, -2.0f});
    f.metadata()["k"] = "v";
    const std::vector<std::byte> data{std::byte{0x00}, std::byte{0x00}, std::byte{0x80}, std::byte{0x3F},
                                      std::byte{0x00}, std::byte{0x00}, std::byte{0x00}, std::byte{0xC0}};

    SUBCASE("without checksum") {
        // 79 bytes of JSON plus 1 space of padding.
        std::vector<std::byte> expected{std::byte{80}, std::byte{0}, std::byte{0}, std::byte{0},
                                        std::byte{0},  std::byte{0}, std::byte{0}, std::byte{0}};
        const auto header =
            bytes_of(R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )");
        expected.insert(expected.end(), header.begin(), header.end());
        expected.insert(expected.end(), data.begin(), data.end());
        CHECK(f.serialize({.checksum = false}) == expected);
    }
    SUBCASE("with checksum (XXH64 of the 8 data bytes, from the reference xxhsum tool)") {
        // 122 bytes of JSON plus 6 spaces of padding.
        std::vector<std::byte> expected{std::byte{128}, std::byte{0}, std::byte{0}, std::byte{0},
                                        std::byte{0},   std::byte{0}, std::byte{0}, std::byte{0}};
        const auto header = bytes_of(R"({"__metadata__":{"comigs.checksum":"xxh64:54ba68ca061b22ef","k":"v"},)"
                                     R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}      )");
        expected.insert(expected.end(), header.begin(), header.end());
        expected.insert(expected.end(), data.begin(), data.end());
        CHECK(f.serialize() == expected);
    }
    SUBCASE("no metadata, no checksum: no __metadata__ key") {
        f.metadata().clear();
        const auto bytes = f.serialize({.checksum = false});
        REQUIRE(bytes.size() == 8 + 56 + 8);
        CHECK(bytes[0] == std::byte{56});
        const std::string text(reinterpret_cast<const char*>(bytes.data()) + 8, 56);
        CHECK(text == R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  )");  // 54 + 2 spaces
    }
}

TEST_CASE("SafetensorsFile: reads files from Python writers (space padding, format pt, any key order)") {
    // As the Python package lays files out: metadata first, header padded with spaces to a multiple of 8,
    // tensor data not in header order.
    std::string header = R"({"__metadata__":{"format":"pt"},)"
                         R"("model.lora_B.weight":{"dtype":"BF16","shape":[2,1],"data_offsets":[8,12]},)"
                         R"("model.lora_A.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}})";
    header.append((8 - header.size() % 8) % 8, ' ');
    REQUIRE(header.size() % 8 == 0);
    std::vector<std::byte> data(12);
    const float a[2] = {0.5f, -4.0f};
    std::memcpy(data.data(), a, 8);
    const std::uint16_t b[2] = {0x3F80, 0xC040};  // 1.0, -3.0 in bfloat16
    std::memcpy(data.data() + 8, b, 4);

    TempDir dir;
    const fs::path p = dir.path / "adapter_model.safetensors";
    write_all(p, make_file(header, data));
    const SafetensorsFile f = SafetensorsFile::load(p);
    CHECK(f.metadata() == comigs::io::SafetensorsMetadata{{"format", "pt"}});
    REQUIRE(f.size() == 2);
    CHECK(f.tensors()[0].name == "model.lora_A.weight");  // data-offset order
    CHECK(f.get<float>("model.lora_A.weight", {1, 2}) == std::vector<float>{0.5f, -4.0f});
    CHECK(f.get<double>("model.lora_B.weight", {2, 1}) == std::vector<double>{1.0, -3.0});

    // Re-saving adds a checksum but keeps everything else.
    f.save(p);
    const SafetensorsFile g = SafetensorsFile::load(p);
    CHECK(g == f);

    // "__metadata__": null is how the reference parser spells "no metadata".
    const SafetensorsFile n =
        parse(make_file(R"({"__metadata__":null,"x":{"dtype":"U8","shape":[],"data_offsets":[0,1]}})", {std::byte{7}}));
    CHECK(n.metadata().empty());
    CHECK(n.get<std::uint8_t>("x") == std::vector<std::uint8_t>{7});
}

TEST_CASE("SafetensorsFile: each malformed file gets its own error") {
    const std::string f32x2 = R"("dtype":"F32","shape":[2])";
    auto bad = [](std::string_view header, std::size_t data_bytes = 0) { return make_file(header, zeros(data_bytes)); };
    auto check_bad = [](const std::vector<std::byte>& file, const std::string& message) {
        CAPTURE(message);
        CHECK_THROWS_WITH_AS(SafetensorsFile::parse(file), doctest::Contains(message.c_str()), FormatError);
    };

    SUBCASE("file shorter than 8 bytes") {
        check_bad(zeros(5), "file is 5 bytes, shorter than the 8-byte header length field");
        check_bad({}, "file is 0 bytes");
    }
    SUBCASE("header length over 100,000,000") {
        std::vector<std::byte> f;
        append_le64(f, 100'000'001);
        f.resize(64);
        check_bad(f, "header length 100000001 exceeds the limit of 100000000 bytes");
        std::vector<std::byte> g;
        append_le64(g, ~std::uint64_t{0});
        check_bad(g, "header length 18446744073709551615 exceeds the limit");
    }
    SUBCASE("header length beyond the file") {
        auto f = make_file("{}");
        f[0] = std::byte{3};
        check_bad(f, "header length 3 reaches beyond the end of the file (10 bytes, so at most 2 bytes of header)");
    }
    SUBCASE("header not JSON") {
        check_bad(bad(R"({"a":)"), "header is not valid JSON");
        check_bad(bad(""), "header is not valid JSON");
        check_bad(bad("{} x"), "header is not valid JSON");
    }
    SUBCASE("NUL bytes in the header (nlohmann would stop reading there)") {
        check_bad(bad(std::string("{}\0\0\0\0\0\0", 8)), "header contains a NUL byte (byte 2 of the header)");
        check_bad(bad(std::string("{} \0 x", 6)), "header contains a NUL byte (byte 3");
        check_bad(bad("{/*c*/}"), "header is not valid JSON");
    }
    SUBCASE("header not an object") {
        check_bad(bad("[1,2]"), "header JSON is not an object (found an array)");
        check_bad(bad("7"), "header JSON is not an object (found 7)");
    }
    SUBCASE("header not UTF-8") {
        check_bad(bad("{\"a\xFF\":{}}"), "header is not valid UTF-8 (byte 3 of the header)");
        check_bad(bad("{\"\xED\xA0\x80\":1}"), "header is not valid UTF-8 (byte 2");
    }
    SUBCASE("JSON nesting deeper than a header can be") {
        check_bad(bad(R"({"a":{"shape":[[[1]]]}})"), "header JSON nests deeper than a safetensors header can");
        check_bad(bad(std::string(100000, '[') + std::string(100000, ']')), "nests deeper");
    }
    SUBCASE("duplicate keys") {
        check_bad(
            bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 8),
            "duplicate tensor name 'a' in header");
        check_bad(bad(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8),
                  "duplicate key 'dtype' inside 'a'");
        check_bad(bad(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key 'k' inside '__metadata__'");
    }
    SUBCASE("entry not an object") {
        check_bad(bad(R"({"a":[1]})"), "tensor 'a': entry is not an object (found an array)");
        check_bad(bad(R"({"a":"F32"})"), "tensor 'a': entry is not an object (found the string 'F32')");
    }
    SUBCASE("missing keys") {
        check_bad(bad(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "tensor 'a': missing \"dtype\"");
        check_bad(bad(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "tensor 'a': missing \"shape\"");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "tensor 'a': missing \"data_offsets\"");
    }
    SUBCASE("wrong-typed keys") {
        check_bad(bad(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
                  "tensor 'a': \"dtype\" must be a string, found 4");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8),
                  "tensor 'a': \"shape\" must be an array of integers, found 2");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":{"b":0}}})", 8),
                  "tensor 'a': \"data_offsets\" must be an array [begin, end], found an object");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", 8),
                  "\"data_offsets\" must be an array [begin, end], found an array of 3 elements");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", 8),
                  "tensor 'a': data offset the string '8' is not an integer");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
                  "tensor 'a': data offset -8 is negative");
    }
    SUBCASE("unknown dtype") {
        check_bad(bad(R"({"a":{"dtype":"F128","shape":[2],"data_offsets":[0,32]}})", 32),
                  "tensor 'a': unknown dtype 'F128'");
        check_bad(bad(R"({"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'f32'");
    }
    SUBCASE("bad shape dimensions") {
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,8]}})", 8),
                  "tensor 'a': shape dimension -1 is negative");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
                  "tensor 'a': shape dimension 2.0 is not an integer");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[true],"data_offsets":[0,8]}})", 8),
                  "shape dimension true is not an integer");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8),
                  "shape dimension an array is not an integer");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})", 8),
                  "shape dimension 9223372036854775808 is too large");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[99999999999999999999999],"data_offsets":[0,8]}})", 8),
                  "is not an integer");
    }
    SUBCASE("shape x dtype size overflows") {
        // 2^32 * 2^32 overflows before the 0 could make the product 0; 2^62 * 4 bytes overflows at the end.
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})"),
                  "tensor 'a': shape [4294967296, 4294967296, 0] times the 4-byte size of F32 overflows");
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
                  "overflows a signed 64-bit size");
        check_bad(bad(R"({"a":{"dtype":"U8","shape":[3037000500,3037000500],"data_offsets":[0,0]}})"),
                  "overflows a signed 64-bit size");
        // Found by the fuzzer: the partial product 2^32 * 4294067296 fits in 64 unsigned bits but not in
        // a signed size, and the final 0 hid it.
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[4294967296,4294067296,0],"data_offsets":[0,0]}})"),
                  "overflows a signed 64-bit size");
    }
    SUBCASE("data_offsets end before begin") {
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
                  "tensor 'a': data_offsets [8, 0] end before they begin");
    }
    SUBCASE("byte size does not match shape x dtype size") {
        check_bad(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4),
                  "tensor 'a': data_offsets [0, 4] hold 4 bytes but dtype F32 with shape [2] needs 8");
        check_bad(bad(R"({"a":{"dtype":"BF16","shape":[],"data_offsets":[0,4]}})", 4),
                  "hold 4 bytes but dtype BF16 with shape [] needs 2");
    }
    SUBCASE("offsets not contiguous") {
        check_bad(bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[4,12]}})", 12),
                  "gap in data: the first tensor 'a' begins at byte 4, not 0");
        check_bad(
            bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[12,20]}})", 20),
            "gap in data: tensor 'b' begins at byte 12 but the previous tensor 'a' ends at byte 8");
        check_bad(
            bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[4,12]}})", 12),
            "overlap in data: tensor 'b' begins at byte 4 but the previous tensor 'a' ends at byte 8");
        check_bad(
            bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 8),
            "overlap in data: tensor 'b' begins at byte 0 but the previous tensor 'a' ends at byte 8");
    }
    SUBCASE("trailing bytes or truncated data") {
        check_bad(bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 11),
                  "3 trailing bytes: the tensors end at data byte 8 but the data section has 11 bytes");
        check_bad(bad("{}", 1), "1 trailing bytes");
        check_bad(bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 5),
                  "truncated data: the tensors need 8 data bytes but the file has only 5");
    }
    SUBCASE("__metadata__ not an object of strings") {
        check_bad(bad(R"({"__metadata__":["format","pt"]})"),
                  "__metadata__ must be an object of strings, found an array");
        check_bad(bad(R"({"__metadata__":{"format":"pt","step":3}})"),
                  "__metadata__ value of key 'step' is not a string (found 3)");
        check_bad(bad(R"({"__metadata__":{"m":{"x":"y"}}})"), "value of key 'm' is not a string (found an object)");
    }
    SUBCASE("unknown key in a tensor entry") {
        check_bad(bad(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8],"strides":[1]}})", 8),
                  "tensor 'a': unexpected key 'strides' (an entry has only dtype, shape and data_offsets)");
    }
    SUBCASE("checksum mismatch or malformed") {
        SafetensorsFile f;
        f.add("w", {4}, std::vector<float>{1, 2, 3, 4});
        auto bytes = f.serialize();
        bytes.back() ^= std::byte{1};  // one flipped bit in the data
        check_bad(bytes, "checksum mismatch: comigs.checksum records xxh64:");
        CHECK_NOTHROW(SafetensorsFile::parse(bytes, {.verify_checksum = false}));
        check_bad(bad(R"({"__metadata__":{"comigs.checksum":"crc32:1234"}})"),
                  "comigs.checksum 'crc32:1234' is not of the form xxh64:<16 hex digits>");
        // Upper-case hex digits are accepted.
        const auto ok = bad(R"({"__metadata__":{"comigs.checksum":"xxh64:EF46DB3751D8E999"}})");
        CHECK(SafetensorsFile::parse(ok).metadata().empty());
    }
}

TEST_CASE("SafetensorsFile::load: errors name the path") {
    TempDir dir;
    const fs::path p = dir.path / "broken.safetensors";
    write_all(p, make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", zeros(4)));
    const std::string expected = "safetensors file '" + p.string() + "': truncated data";
    CHECK_THROWS_WITH_AS(SafetensorsFile::load(p), doctest::Contains(expected.c_str()), FormatError);
    write_all(p, zeros(3));
    CHECK_THROWS_WITH_AS(SafetensorsFile::load(p), doctest::Contains("file is 3 bytes"), FormatError);
    CHECK_THROWS_WITH_AS(SafetensorsFile::load(dir.path / "missing.safetensors"),
                         doctest::Contains("missing.safetensors' for reading: No such file or directory"),
                         comigs::IoError);
    CHECK_THROWS_WITH_AS(SafetensorsFile::load(dir.path), doctest::Contains("is a directory"), comigs::IoError);

    // Corruption of a saved file is caught by the checksum when loading from disk too.
    SafetensorsFile f;
    f.add("w", {2}, std::vector<double>{1.0, 2.0});
    f.save(p);
    auto bytes = read_all(p);
    bytes[bytes.size() - 3] ^= std::byte{0x10};
    write_all(p, bytes);
    CHECK_THROWS_WITH_AS(SafetensorsFile::load(p), doctest::Contains("checksum mismatch"), FormatError);
}

TEST_CASE("atomic_write_file: a crash mid-save leaves the previous file intact and no temporary") {
    TempDir dir;
    const fs::path p = dir.path / "ckpt.safetensors";
    SafetensorsFile old_file;
    old_file.add("w", {64}, std::vector<float>(64, 1.0f));
    old_file.metadata()["round"] = "1";
    old_file.save(p);
    const auto old_bytes = read_all(p);

    SafetensorsFile new_file;
    new_file.add("w", {64}, std::vector<float>(64, 2.0f));
    new_file.add("v", {64}, std::vector<float>(64, 3.0f));
    new_file.metadata()["round"] = "2";
    const auto new_size = new_file.serialize().size();

    SUBCASE("the save throws: temporary removed") {
        {
            comigs::io::testing::ScopedAtomicWriteFault fault({.crash_after_bytes = new_size / 2});
            CHECK_THROWS_WITH_AS(new_file.save(p), doctest::Contains("simulated crash after writing"), comigs::IoError);
        }
        CHECK(read_all(p) == old_bytes);
        CHECK(SafetensorsFile::load(p) == old_file);
        CHECK(dir.entries() == std::vector<std::string>{"ckpt.safetensors"});
        new_file.save(p);  // the hook is gone again
        CHECK(SafetensorsFile::load(p) == new_file);
    }

    SUBCASE("the process dies: only a stale temporary beside the intact file") {
        const pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            comigs::io::testing::atomic_write_fault() = {.crash_after_bytes = new_size / 2,
                                                         .on_crash = [] { std::_Exit(42); }};
            try {
                new_file.save(p);
            } catch (...) {
            }
            std::_Exit(1);  // the crash hook was not reached
        }
        int status = 0;
        REQUIRE(::waitpid(child, &status, 0) == child);
        REQUIRE(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 42);
        CHECK(SafetensorsFile::load(p) == old_file);
        const auto names = dir.entries();
        REQUIRE(names.size() == 2);
        CHECK(names[0].starts_with(".ckpt.safetensors.tmp."));
        CHECK(fs::file_size(dir.path / names[0]) == new_size / 2);
        new_file.save(p);
        CHECK(SafetensorsFile::load(p) == new_file);
    }
}

TEST_CASE("atomic_write_file: failures are IoErrors naming the path; permissions are kept") {
    TempDir dir;
    const std::vector<std::byte> payload = bytes_of("hello");
    CHECK_THROWS_WITH_AS(comigs::io::atomic_write_file(dir.path / "no" / "such" / "f.bin", payload),
                         doctest::Contains("No such file or directory"), comigs::IoError);

    // Renaming a file over a directory fails after the temporary was written: it must be cleaned up.
    fs::create_directory(dir.path / "sub");
    fs::create_directory(dir.path / "sub" / "inner");
    CHECK_THROWS_WITH_AS(comigs::io::atomic_write_file(dir.path / "sub" / "inner", payload),
                         doctest::Contains("cannot rename"), comigs::IoError);
    CHECK(dir.entries() == std::vector<std::string>{"sub"});
    for (const auto& e : fs::directory_iterator(dir.path / "sub")) CHECK(e.path().filename() == "inner");

    // An exception from the callback propagates unchanged and leaves nothing behind.
    const fs::path p = dir.path / "f.bin";
    comigs::io::atomic_write_file(p, payload);
    CHECK(read_all(p) == payload);
    CHECK_THROWS_AS(comigs::io::atomic_write_file(p,
                                                  [](comigs::io::AtomicFileWriter& w) {
                                                      w.write(bytes_of("partial"));
                                                      throw std::runtime_error("serializer failed");
                                                  }),
                    std::runtime_error);
    CHECK(read_all(p) == payload);

    REQUIRE(::chmod(p.c_str(), 0600) == 0);
    comigs::io::atomic_write_file(p, bytes_of("new content"));
    struct stat st {};
    REQUIRE(::stat(p.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(read_all(p) == bytes_of("new content"));
    CHECK(dir.entries() == std::vector<std::string>{"f.bin", "sub"});

    // An empty target is an argument error, not a system call failure.
    CHECK_THROWS_AS(comigs::io::atomic_write_file("", payload), comigs::InvalidArgument);
}

TEST_CASE("atomic_write_file: a target name of NAME_MAX bytes works; a symlink's target lends no permissions") {
    TempDir dir;
    const long name_max = ::pathconf(dir.path.c_str(), _PC_NAME_MAX);
    const std::string name(static_cast<std::size_t>(name_max > 0 ? std::min(name_max, 255L) : 255L), 'n');
    comigs::io::atomic_write_file(dir.path / name, bytes_of("long name"));
    CHECK(read_all(dir.path / name) == bytes_of("long name"));
    comigs::io::atomic_write_file(dir.path / name, bytes_of("replaced"));
    CHECK(read_all(dir.path / name) == bytes_of("replaced"));
    CHECK(dir.entries() == std::vector<std::string>{name});

    // A symlink at the target is replaced by a new file, not followed: the file it pointed to keeps
    // its content and mode, and does not lend its permission bits to the new file.
    const fs::path real = dir.path / "real", link = dir.path / "link";
    comigs::io::atomic_write_file(real, bytes_of("kept"));
    REQUIRE(::chmod(real.c_str(), 0604) == 0);
    fs::create_symlink(real, link);
    const mode_t saved = ::umask(022);
    comigs::io::atomic_write_file(link, bytes_of("new"));
    ::umask(saved);
    struct stat st {};
    REQUIRE(::lstat(link.c_str(), &st) == 0);
    CHECK(S_ISREG(st.st_mode));
    CHECK((st.st_mode & 0777) == 0644);
    CHECK(read_all(link) == bytes_of("new"));
    CHECK(read_all(real) == bytes_of("kept"));
    REQUIRE(::stat(real.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0604);
}

TEST_CASE("SafetensorsFile: the golden files (pure-Python writer) and the fuzz seed corpus") {
    int golden = 0;
    for (const auto& e : fs::directory_iterator(COMIGS_GOLDEN_DIR)) {
        if (e.path().extension() != ".safetensors") continue;
        CAPTURE(e.path().string());
        const SafetensorsFile f = SafetensorsFile::load(e.path());
        CHECK_FALSE(f.empty());
        // Re-writing and re-reading keeps every tensor exactly.
        CHECK(SafetensorsFile::parse(f.serialize()) == f);
        ++golden;
    }
    CHECK(golden > 0);

    int valid = 0, invalid = 0;
    for (const auto& e : fs::directory_iterator(fs::path(COMIGS_GOLDEN_DIR) / ".." / "fuzz" / "corpus")) {
        const std::string name = e.path().filename().string();
        CAPTURE(name);
        if (name.starts_with("valid_")) {
            CHECK_NOTHROW(SafetensorsFile::load(e.path()));
            ++valid;
        } else {
            CHECK_THROWS_AS(SafetensorsFile::load(e.path()), FormatError);
            ++invalid;
        }
    }
    CHECK(valid >= 3);
    CHECK(invalid >= 3);
}
