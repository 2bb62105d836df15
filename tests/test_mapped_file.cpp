#include <comigs/io/mapped_file.hpp>
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

using comigs::io::MappedFile;

namespace {
std::filesystem::path temp_path(const char* name) {
    return std::filesystem::temp_directory_path() / (std::string("comigs-mapped-") + std::to_string(::getpid()) + "-" + name);
}
}  // namespace

TEST_CASE("MappedFile maps a whole file read-only") {
    const auto path = temp_path("bytes");
    std::string text(10000, '\0');
    for (std::size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>(i * 7 + 3);
    { std::ofstream(path, std::ios::binary) << text; }
    {
        MappedFile m = MappedFile::open(path);
        REQUIRE(m.size() == text.size());
        CHECK(std::memcmp(m.bytes().data(), text.data(), text.size()) == 0);
        m.advise(4000, 100000);  // past the end: clamped, no fault
        MappedFile moved = std::move(m);
        CHECK(m.size() == 0);
        CHECK(moved.bytes().size() == text.size());
        CHECK(static_cast<char>(moved.bytes()[9999]) == text[9999]);
        // Replacing the file by rename (as comigs' writers do) leaves the mapping's bytes as they were.
        const auto other = temp_path("other");
        { std::ofstream(other, std::ios::binary) << "different"; }
        std::filesystem::rename(other, path);
        CHECK(std::memcmp(moved.bytes().data(), text.data(), text.size()) == 0);
    }
    std::filesystem::remove(path);
}

TEST_CASE("MappedFile: empty files, missing files and directories") {
    const auto path = temp_path("empty");
    { std::ofstream(path, std::ios::binary); }
    CHECK(MappedFile::open(path).bytes().empty());
    std::filesystem::remove(path);
    CHECK_THROWS_WITH_AS(MappedFile::open(path), doctest::Contains("cannot open"), comigs::IoError);
    CHECK_THROWS_WITH_AS(MappedFile::open(std::filesystem::temp_directory_path()), doctest::Contains("directory"),
                         comigs::IoError);
}
