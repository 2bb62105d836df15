// The demo's real-text settings (examples/demo/text_sources.hpp) on a fake Debian root: the files of a
// package come from dpkg's list, filtered and sorted; a missing package is an error naming it; capping
// keeps evenly spaced pieces; and comigs-demo --setting runs end to end on it.
#include <doctest/doctest.h>

#include <demo/cli.hpp>
#include <demo/text_sources.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "temp_dir.hpp"

namespace fs = std::filesystem;
using namespace comigs::demo;

namespace {

/// Writes `files` (absolute package paths -> contents) under `root` and dpkg's list of them.
void fake_package(const fs::path& root, const std::string& package,
                  const std::vector<std::pair<std::string, std::string>>& files) {
    fs::create_directories(root / "var/lib/dpkg/info");
    std::ofstream list(root / "var/lib/dpkg/info" / (package + ".list"), std::ios::app);
    for (const auto& [path, text] : files) {
        const fs::path p = root / fs::path(path).relative_path();
        fs::create_directories(p.parent_path());
        std::ofstream(p, std::ios::binary) << text;
        list << fs::path(path).parent_path().string() << "\n" << path << "\n";
    }
}

std::string words(const std::string& seed_word, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += seed_word + std::to_string(i % 97) + (i % 13 == 12 ? ".\n" : " ");
    return s;
}

}  // namespace

TEST_CASE("text sources: package files from dpkg's list, filtered, sorted, extracted") {
    const comigs_test::TempDir tmp("comigs-test-text-sources");
    const fs::path root = tmp.path();
    const std::string base = "/usr/share/doc/debian-handbook/html/";
    fake_package(root, "debian-handbook",
                 {{base + "de-DE/b.html", "<html><head><title>x</title></head><body><p>zwei</p></body></html>"},
                  {base + "de-DE/a.html", "<p>eins &amp; drei</p>"},
                  {base + "de-DE/Common_Content/css/default.css", "p { }"},
                  {base + "fr-FR/a.html", "<p>un</p>"}});
    TextSource de{"handbook-de", "debian-handbook", base + "de-DE/", ".html", TextFormat::html, {}, false};
    const auto files = source_files(root, de);
    REQUIRE(files.size() == 2);
    CHECK(files[0].filename() == "a.html");
    CHECK(files[1].filename() == "b.html");
    CHECK(source_text(root, de) == "eins & drei\nzwei\n");

    TextSource missing{"c-headers", "libc6-dev", "/usr/include/", ".h", TextFormat::plain, {}, false};
    CHECK_THROWS_WITH_AS(source_files(root, missing), doctest::Contains("package 'libc6-dev' is not installed"),
                         comigs::IoError);
    // An architecture-qualified list (libc6-dev:amd64.list) is found too.
    fake_package(root, "libc6-dev:amd64", {{"/usr/include/stdio.h", "int printf(const char*, ...);\n"},
                                           {"/usr/include/readme.txt", "not a header"}});
    CHECK(source_text(root, missing) == "int printf(const char*, ...);\n");
    // A foreign architecture's list beside it (a cross-build's libc6-dev:arm64) changes nothing: the
    // native one is read (dpkg's arch file), and without that file the first in name order.
    fake_package(root, "libc6-dev:arm64", {{"/usr/include/aarch64.h", "int arm;\n"}});
    fake_package(root, "libc6-dev:zz", {{"/usr/include/zz.h", "int zz;\n"}});
    CHECK(source_text(root, missing) == "int printf(const char*, ...);\n");
    std::ofstream(root / "var/lib/dpkg/arch") << "arm64\namd64\n";
    CHECK(source_text(root, missing) == "int arm;\n");
    fs::remove(root / "var/lib/dpkg/arch");
    // Filters: excluded paths and names with an extension.
    fake_package(root, "fortunes", {{"/usr/share/games/fortunes/wisdom", "Be kind.\n%\n"},
                                    {"/usr/share/games/fortunes/wisdom.dat", "binary"},
                                    {"/usr/share/games/fortunes/off/rude", "no"}});
    const TextSetting domains = text_setting("domains");
    CHECK(source_text(root, domains.host) == "Be kind.\n%\n");
    TextSource none{"nothing", "fortunes", "/usr/share/games/fortunes/", ".txt", TextFormat::plain, {}, false};
    CHECK_THROWS_WITH_AS(source_files(root, none), doctest::Contains("has no files under"), comigs::InvalidArgument);
    CHECK_THROWS_AS(text_setting("klingon"), comigs::InvalidArgument);
}

TEST_CASE("cap_text: evenly spaced pieces of the text, at most the cap") {
    std::string text;
    for (int k = 0; k < 100; ++k) text += std::string(10, static_cast<char>('A' + k % 26));  // 100 pieces of 10
    CHECK(cap_text(text, 0) == text);
    CHECK(cap_text(text, 5000) == text);
    const std::string capped = cap_text(text, 200, 10);  // 20 of the 100 pieces: every fifth, from the third
    REQUIRE(capped.size() == 200);
    for (int j = 0; j < 20; ++j) CHECK(capped[std::size_t(j * 10)] == static_cast<char>('A' + (5 * j + 2) % 26));
    CHECK(cap_text(text, 15, 10).size() == 10);
}

TEST_CASE("comigs-demo --setting multilingual on a fake Debian root, with dev and stop splits") {
    const comigs_test::TempDir tmp("comigs-test-demo-setting");
    const fs::path root = tmp.path();
    const std::string base = "/usr/share/doc/debian-handbook/html/";
    std::vector<std::pair<std::string, std::string>> files;
    for (const char* lang : {"de-DE", "fr-FR", "it-IT", "nl-NL", "en-US"})
        files.push_back({base + lang + "/index.html", "<html><body><p>" + words(lang, 1200) + "</p></body></html>"});
    fake_package(root, "debian-handbook", files);
    const std::string out = (root / "out").string();
    std::vector<std::string> args{"comigs-demo", "--quick", "--setting", "multilingual", "--text-root", root.string(),
                                  "--methods", "local,comigs-1g1s", "--dev-tokens", "700", "--val-tokens",
                                  "600,700,600,600", "--keep-best", "--stop-tokens", "500", "--quiet", "--out", out};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    REQUIRE(demo_main(static_cast<int>(argv.size()), argv.data()) == 0);
    std::ifstream in(fs::path(out) / "results.json");
    const auto j = nlohmann::json::parse(in);
    CHECK(j["config"]["setting"] == "multilingual");
    CHECK(j["config"]["user_names"] == nlohmann::json::array({"handbook-de", "handbook-fr", "handbook-it", "handbook-nl"}));
    CHECK(j["config"]["train_tokens"] == nlohmann::json::array({1500, 1500, 1500, 1500}));
    CHECK(j["config"]["validation_tokens"] == nlohmann::json::array({600, 700, 600, 600}));
    CHECK(j["config"]["dev_tokens"] == nlohmann::json::array({700, 700, 700, 700}));
    CHECK(j["config"]["stop_tokens"] == nlohmann::json::array({500, 500, 500, 500}));
    CHECK(j["config"]["keep_best"] == true);
    for (const char* m : {"local", "comigs-1g1s"}) {
        const auto& r = j["methods"][m];
        CHECK(r["mean_dev_ppl"].get<double>() > 1.0);
        CHECK(r["users"][0]["dev_ppl"].get<double>() > 1.0);
        for (const auto& u : r["users"]) CHECK(u["kept_round"].get<long>() >= 0);
        CHECK(r["routing_by_layer"].size() == 2);
    }
    const auto& layer0 = j["methods"]["comigs-1g1s"]["routing_by_layer"][0];
    CHECK(layer0["generalist_share"].get<double>() > 0.0);
    CHECK(layer0["generalist_share"].get<double>() < 1.0);
    CHECK(layer0["personal_to_specialist"].is_null());  // real text has no source labels
    // A setting whose packages are missing is a clear error, not a crash.
    std::vector<std::string> bad{"comigs-demo", "--quick", "--setting", "domains", "--text-root", root.string(),
                                 "--quiet", "--out", out};
    std::vector<char*> bad_argv;
    for (auto& a : bad) bad_argv.push_back(a.data());
    CHECK(demo_main(static_cast<int>(bad_argv.size()), bad_argv.data()) == 1);
}
