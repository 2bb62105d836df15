// The folder of checkpoint generations (io/checkpoint_store.hpp): commit makes a generation appear at
// once, keeps the newest ones, removes leftovers; verification catches every kind of damage and the
// newest good generation wins; settings differences are named.
#include <comigs/io/checkpoint_store.hpp>
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

using namespace comigs;
using io::CheckpointStore;
using io::GenerationFile;
using io::RunSettings;

namespace {

struct StoreDir {
    std::filesystem::path path;
    StoreDir() {
        static int counter = 0;
        path = std::filesystem::temp_directory_path() /
               ("comigs-store-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
        std::filesystem::remove_all(path);
    }
    ~StoreDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

std::vector<std::byte> bytes_of(const std::string& s) {
    const auto b = std::as_bytes(std::span(s.data(), s.size()));
    return {b.begin(), b.end()};
}

/// A generation of `round` with two files whose content names the round.
void write_generation(const CheckpointStore& store, std::int64_t round, const RunSettings& settings = {{"seed", "1"}}) {
    const auto partial = store.begin(round);
    std::vector<GenerationFile> files;
    files.push_back(CheckpointStore::write_file(partial, "a.bin", bytes_of("first file of round " + std::to_string(round))));
    files.push_back(CheckpointStore::write_file(partial, "b.bin", bytes_of(std::string(1000, char('a' + round % 26)))));
    store.commit(round, settings, files);
}

std::string slurp(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

}  // namespace

TEST_CASE("checkpoint store: first_difference names the first differing setting") {
    const RunSettings a{{"users", "4"}, {"seed", "1"}, {"model", "m"}};
    CHECK(io::first_difference(a, a).empty());
    CHECK(io::first_difference(a, {{"users", "4"}, {"seed", "2"}, {"model", "n"}}) ==
          "'seed' is 1 in the checkpoint but 2 in this run");
    CHECK(io::first_difference(a, {{"users", "4"}, {"seed", "1"}}) ==
          "'model' is m in the checkpoint but not set in this run");
    CHECK(io::first_difference({{"users", "4"}}, {{"users", "4"}, {"threads", "2"}}) ==
          "'threads' is 2 in this run but not recorded in the checkpoint");
}

TEST_CASE("checkpoint store: committed generations verify, the newest `keep` stay, leftovers go") {
    StoreDir dir;
    CheckpointStore store(dir.path, 2);
    CHECK(store.rounds().empty());
    CHECK(!store.latest());
    write_generation(store, 1);
    write_generation(store, 2);
    CHECK(store.rounds() == std::vector<std::int64_t>{2, 1});
    // A generation being written is invisible until commit.
    const auto partial = store.begin(3);
    CheckpointStore::write_file(partial, "a.bin", bytes_of("half"));
    CHECK(store.rounds() == std::vector<std::int64_t>{2, 1});
    CHECK(store.latest()->round == 2);
    write_generation(store, 3);  // begin() again: the leftover partial folder is replaced
    CHECK(store.rounds() == std::vector<std::int64_t>{3, 2});
    const auto g = store.latest();
    REQUIRE(g);
    CHECK(g->round == 3);
    CHECK(g->path == dir.path / "round-000003");
    CHECK(g->settings == RunSettings{{"seed", "1"}});
    REQUIRE(g->files.size() == 2);
    CHECK(g->files[0].name == "a.bin");
    CHECK(g->files[0].bytes == std::string("first file of round 3").size());
    CHECK(g->has("b.bin"));
    CHECK(slurp(g->path / "a.bin") == "first file of round 3");
    // The manifest says what it checks.
    const std::string manifest = slurp(g->path / "manifest.json");
    for (const char* key : {"\"format\"", "\"round\"", "\"settings\"", "\"xxh64\"", "\"checksum\""})
        CHECK(manifest.find(key) != std::string::npos);

    // Leftovers: an abandoned partial folder of another round, and a generation numbered above the one
    // committed (left from before a fall-back) are removed by the next commit.
    std::filesystem::create_directories(dir.path / ".partial-round-000009");
    std::filesystem::create_directories(dir.path / "round-000007");
    write_generation(store, 4);
    CHECK(store.rounds() == std::vector<std::int64_t>{4, 3});
    CHECK(!std::filesystem::exists(dir.path / ".partial-round-000009"));
    // Large round numbers keep their order.
    write_generation(store, 1234567);
    CHECK(store.rounds() == std::vector<std::int64_t>{1234567, 4});
}

TEST_CASE("checkpoint store: every kind of damage is caught and the previous generation is used") {
    StoreDir dir;
    CheckpointStore store(dir.path, 3);
    write_generation(store, 1);
    write_generation(store, 2);
    const auto g2 = dir.path / "round-000002";
    std::string expect;
    SUBCASE("a flipped byte in a file") {
        std::string s = slurp(g2 / "b.bin");
        s[500] ^= 1;
        std::ofstream(g2 / "b.bin", std::ios::binary | std::ios::trunc) << s;
        expect = "checksum";
    }
    SUBCASE("a truncated file") {
        std::filesystem::resize_file(g2 / "a.bin", 3);
        expect = "truncated";
    }
    SUBCASE("a missing file") {
        std::filesystem::remove(g2 / "a.bin");
        expect = "missing";
    }
    SUBCASE("a missing manifest") {
        std::filesystem::remove(g2 / "manifest.json");
        expect = "missing";
    }
    SUBCASE("a truncated manifest") {
        std::filesystem::resize_file(g2 / "manifest.json", 40);
        expect = "not a JSON object";
    }
    SUBCASE("an edited manifest (valid JSON, wrong checksum)") {
        std::string m = slurp(g2 / "manifest.json");
        const auto at = m.find("\"seed\"");
        REQUIRE(at != std::string::npos);
        m.replace(at, 6, "\"seeD\"");
        std::ofstream(g2 / "manifest.json", std::ios::binary | std::ios::trunc) << m;
        expect = "checksum mismatch";
    }
    SUBCASE("a generation copied under another name") {
        std::filesystem::remove_all(g2);
        std::filesystem::copy(dir.path / "round-000001", g2, std::filesystem::copy_options::recursive);
        expect = "round 1 in a folder named round-000002";
    }
    CHECK_THROWS_WITH_AS(store.verify(2), doctest::Contains(expect.c_str()), FormatError);
    std::vector<std::string> rejected;
    const auto g = store.latest(&rejected);
    REQUIRE(g);
    CHECK(g->round == 1);
    REQUIRE(rejected.size() == 1);
    CHECK(rejected[0].find("round-000002 is unusable") != std::string::npos);
    CHECK(rejected[0].find(expect) != std::string::npos);
    // Once every generation is damaged there is none.
    std::filesystem::resize_file(dir.path / "round-000001" / "b.bin", 0);
    rejected.clear();
    CHECK(!store.latest(&rejected));
    CHECK(rejected.size() == 2);
}

TEST_CASE("checkpoint store: argument errors") {
    StoreDir dir;
    CHECK_THROWS_AS(CheckpointStore("", 2), InvalidArgument);
    CHECK_THROWS_WITH_AS(CheckpointStore(dir.path, 0), doctest::Contains("keep 0"), InvalidArgument);
    CheckpointStore store(dir.path);
    const auto p = store.begin(1);
    CHECK_THROWS_AS(CheckpointStore::write_file(p, "manifest.json", bytes_of("x")), InvalidArgument);
    CHECK_THROWS_AS(CheckpointStore::write_file(p, "../x", bytes_of("x")), InvalidArgument);
    CHECK_THROWS_AS(CheckpointStore::write_file(p, ".hidden", bytes_of("x")), InvalidArgument);
    CHECK_THROWS_WITH_AS(store.commit(1, {}, {{"absent.bin", 3, 0}}), doctest::Contains("absent.bin"), IoError);
    const auto f = CheckpointStore::write_file(p, "x.bin", bytes_of("abc"));
    CHECK_THROWS_WITH_AS(store.commit(1, {}, {f, f}), doctest::Contains("listed twice"), InvalidArgument);
    CHECK(store.rounds().empty());
}
