// libFuzzer target for comigs-demo's text extractors (examples/demo/text_extract.hpp; build with
// -DCOMIGS_BUILD_FUZZERS=ON and clang; run with tests/fuzz/run.sh). The first byte picks the format:
// HTML, troff, or a dictd index and data (split at the first NUL byte). Every extractor must accept any
// bytes (the dictd index may be rejected with comigs::FormatError); anything else (a crash, a sanitizer
// report, another exception, a hang) is a bug. Checked besides:
// - every output is empty or ends with a newline;
// - HTML without '<' and '&' is its own text with whitespace runs collapsed (an exact oracle);
// - dictd output is never longer than the data plus one newline per index line.
#include <demo/text_extract.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {
[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_text_extract: %s\n", what);
    std::abort();
}

void check_ending(const std::string& out) {
    if (!out.empty() && out.back() != '\n') fail("output does not end with a newline");
}

bool ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string collapsed(std::string_view s) {
    std::string out;
    bool pending = false;
    for (char c : s) {
        if (ws(c)) {
            pending = true;
            continue;
        }
        if (pending && !out.empty()) out += ' ';
        pending = false;
        out += c;
    }
    if (!out.empty()) out += '\n';
    return out;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const std::string_view in(reinterpret_cast<const char*>(data) + 1, size - 1);
    switch (data[0] % 3) {
        case 0: {
            const std::string out = comigs::demo::html_to_text(in);
            check_ending(out);
            if (in.find('<') == std::string_view::npos && in.find('&') == std::string_view::npos &&
                out != collapsed(in))
                fail("HTML without markup is not its own collapsed text");
            break;
        }
        case 1:
            check_ending(comigs::demo::troff_to_text(in));
            break;
        default: {
            const std::size_t nul = in.find('\0');
            const std::string_view index = in.substr(0, nul), dict = nul == std::string_view::npos ? "" : in.substr(nul + 1);
            try {
                const std::string out = comigs::demo::dictd_to_text(index, dict);
                check_ending(out);
                std::size_t lines = 1;
                for (char c : index) lines += c == '\n';
                if (out.size() > dict.size() + lines) fail("dictd output longer than its data");
            } catch (const comigs::FormatError&) {
            }
        }
    }
    return 0;
}
