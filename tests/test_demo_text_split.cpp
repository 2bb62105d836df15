// The demo's real-text splitter (examples/demo/text_split.hpp): every split samples the whole text,
// the splits are disjoint, sizes are exact, and "all" training text is everything left.
#include <doctest/doctest.h>

#include <demo/text_split.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

using comigs::Index;
using comigs::demo::SplitSizes;
using comigs::demo::split_text;

namespace {

/// A text of n chunks of 8 bytes, chunk k spelling its own index ("%07lld|"), so that a split's bytes
/// tell which chunks it took.
std::string numbered_text(Index n, Index tail = 0) {
    std::string t;
    char buf[24];  // room for any long long: GCC's -Wformat-truncation at -O1 cannot see k < n
    for (Index k = 0; k < n; ++k) {
        std::snprintf(buf, sizeof buf, "%07lld|", static_cast<long long>(k));
        t += buf;
    }
    t += std::string(static_cast<std::size_t>(tail), '#');
    return t;
}

/// Chunk indices read back from a stream of numbered chunks (whole chunks only).
std::vector<Index> chunks_in(const comigs::demo::Stream& s) {
    std::vector<Index> out;
    for (std::size_t i = 0; i + 8 <= s.tokens.size(); i += 8) {
        std::string digits(s.tokens.begin() + std::ptrdiff_t(i), s.tokens.begin() + std::ptrdiff_t(i + 7));
        out.push_back(std::stoll(digits));
    }
    return out;
}

/// "Covers the whole text": m chunks of N have their first within the first ceil(N/m) chunks, their
/// last within the last ceil(N/m), and no gap between neighbours wider than 2 ceil(N/m).
void check_covers(const std::vector<Index>& ks, Index N) {
    REQUIRE(!ks.empty());
    const Index m = static_cast<Index>(ks.size()), span = (N + m - 1) / m;
    CHECK(ks.front() < span);
    CHECK(ks.back() >= N - span - 1);
    for (std::size_t i = 1; i < ks.size(); ++i) {
        CHECK(ks[i] > ks[i - 1]);
        CHECK(ks[i] - ks[i - 1] <= 2 * span);
    }
}

}  // namespace

TEST_CASE("text split: every split covers the whole text, disjointly, with exact sizes") {
    const Index N = 1000;
    const std::string text = numbered_text(N);
    SplitSizes z;
    z.chunk = 8;
    z.test = 400;       // 50 chunks
    z.validation = 160;  // 20 chunks
    z.dev = 80;          // 10 chunks
    z.train = -1;
    const auto sp = split_text("numbered", text, z);
    CHECK(sp.chunks == N);
    CHECK(sp.test.size() == 400);
    CHECK(sp.validation.size() == 160);
    CHECK(sp.dev.size() == 80);
    CHECK(sp.train.size() == (N - 80) * 8);
    // The bytes are the chunks the split says it took, in text order.
    CHECK(chunks_in(sp.test) == sp.test_chunks);
    CHECK(chunks_in(sp.validation) == sp.validation_chunks);
    CHECK(chunks_in(sp.dev) == sp.dev_chunks);
    CHECK(chunks_in(sp.train) == sp.train_chunks);
    for (const auto* ks : {&sp.test_chunks, &sp.validation_chunks, &sp.dev_chunks, &sp.train_chunks}) check_covers(*ks, N);
    // Disjoint, and with all training text, together the whole text.
    std::set<Index> all;
    for (const auto* ks : {&sp.test_chunks, &sp.validation_chunks, &sp.dev_chunks, &sp.train_chunks})
        for (Index k : *ks) CHECK(all.insert(k).second);
    CHECK(static_cast<Index>(all.size()) == N);
    CHECK(sp.train.personal == std::vector<std::uint8_t>(sp.train.tokens.size(), 0));
}

TEST_CASE("text split: a smaller training set is an evenly spread subset, cut to the size asked") {
    const Index N = 2000;
    const std::string text = numbered_text(N, 5);  // a short last chunk
    SplitSizes z;
    z.chunk = 8;
    z.test = 800;
    z.validation = 400;
    z.train = 1004;  // 126 chunks, the last one cut to 4 bytes
    const auto sp = split_text("numbered", text, z);
    CHECK(sp.chunks == N + 1);
    CHECK(sp.train.size() == 1004);
    CHECK(sp.train_chunks.size() == 126);
    check_covers(sp.train_chunks, N + 1);
    std::vector<Index> whole = sp.train_chunks;
    whole.pop_back();  // the cut one
    CHECK(chunks_in(sp.train) == whole);
    for (Index k : sp.train_chunks) {
        CHECK(std::find(sp.test_chunks.begin(), sp.test_chunks.end(), k) == sp.test_chunks.end());
        CHECK(std::find(sp.validation_chunks.begin(), sp.validation_chunks.end(), k) == sp.validation_chunks.end());
    }
    CHECK(sp.dev.size() == 0);
    CHECK(sp.dev_chunks.empty());
    // Deterministic, and a different training size changes neither held-out split.
    const auto again = split_text("numbered", text, z);
    CHECK(again.train.tokens == sp.train.tokens);
    z.train = 3000;
    const auto more = split_text("numbered", text, z);
    CHECK(more.test.tokens == sp.test.tokens);
    CHECK(more.validation.tokens == sp.validation.tokens);
}

TEST_CASE("text split: the held-out splits interleave in proportion to their sizes") {
    const std::string text = numbered_text(300);
    SplitSizes z;
    z.chunk = 8;
    z.test = 8 * 20;
    z.validation = 8 * 10;
    z.dev = 8 * 10;
    const auto sp = split_text("numbered", text, z);
    // In any window of held-out positions, each split has about its share: check every prefix.
    std::vector<std::pair<Index, int>> held;
    for (Index k : sp.test_chunks) held.emplace_back(k, 0);
    for (Index k : sp.validation_chunks) held.emplace_back(k, 1);
    for (Index k : sp.dev_chunks) held.emplace_back(k, 2);
    std::sort(held.begin(), held.end());
    const double share[3] = {0.5, 0.25, 0.25};
    int count[3] = {0, 0, 0};
    for (std::size_t i = 0; i < held.size(); ++i) {
        ++count[held[i].second];
        for (int s = 0; s < 3; ++s) CHECK(std::abs(count[s] - share[s] * double(i + 1)) <= 1.0);
    }
}

TEST_CASE("text split: bad sizes are clear errors") {
    const std::string text = numbered_text(100);
    SplitSizes z;
    z.chunk = 8;
    z.test = 8 * 60;
    z.validation = 8 * 40;  // 100 chunks held out: none left for training
    CHECK_THROWS_WITH_AS(split_text("small.txt", text, z),
                         doctest::Contains("text 'small.txt': 800 bytes are 100 whole chunks"), comigs::InvalidArgument);
    z.validation = -1;
    CHECK_THROWS_AS(split_text("small.txt", text, z), comigs::InvalidArgument);
    z.validation = 0;
    z.chunk = 0;
    CHECK_THROWS_AS(split_text("small.txt", text, z), comigs::InvalidArgument);
    z.chunk = 8;
    CHECK_THROWS_AS(split_text("empty.txt", "", SplitSizes{-1, 0, 0, 0, 8}), comigs::InvalidArgument);
    // No held-out split at all: everything is training text.
    const auto sp = split_text("all.txt", text, SplitSizes{-1, 0, 0, 0, 8});
    CHECK(sp.train.size() == 800);
}

TEST_CASE("text split: a validation set that is a share of the training text (--val-tokens P%)") {
    using comigs::demo::validation_for_share;
    // A given training size: round(share x train); 6000 tokens at 50% keep the old default of 3000.
    CHECK(validation_for_share(0.5, 6000, 0, 0, 0) == 3000);
    CHECK(validation_for_share(0.25, 1001, 0, 0, 0) == 250);
    CHECK(validation_for_share(1.5, 1000, 99999, 7, 7) == 1500);  // the text's size does not matter then
    // All of a text: validation and training share what test and dev leave, 1 : 1/share.
    CHECK(validation_for_share(0.5, -1, 12000, 1500, 1500) == 3000);
    CHECK(validation_for_share(0.5, -1, 100, 80, 40) == 0);  // nothing left
    CHECK_THROWS_AS(validation_for_share(0.0, 100, 0, 0, 0), comigs::InvalidArgument);
    CHECK_THROWS_AS(validation_for_share(-0.5, 100, 0, 0, 0), comigs::InvalidArgument);

    // Split with it: the validation set is half the training text, up to the chunks' rounding.
    const Index N = 1000, C = 8;
    const std::string text = numbered_text(N);
    for (double share : {0.5, 0.1, 2.0}) {
        SplitSizes z;
        z.chunk = C;
        z.test = 40 * C;
        z.dev = 20 * C;
        z.validation = validation_for_share(share, -1, Index(text.size()), z.test, z.dev);
        const auto sp = split_text("share.txt", text, z);
        CHECK(std::abs(double(sp.validation.size()) - share * double(sp.train.size())) <= 2.0 * C * (1 + share));
        // Nothing lost but the cut end of the validation set's last chunk.
        CHECK(sp.train.size() + sp.validation.size() + sp.test.size() + sp.dev.size() > text.size() - C);
        check_covers(sp.validation_chunks, N);
    }
}

TEST_CASE("text split: the stop split is disjoint from the others, covers the text, and moves nothing else") {
    const Index N = 2000;
    const std::string text = numbered_text(N, 5);  // a short last chunk, never held out
    SplitSizes z;
    z.chunk = 8;
    z.test = 800;
    z.validation = 400;
    z.dev = 400;
    z.train = 1600;  // 200 of the 1801 chunks the held-out splits leave
    const auto before = split_text("numbered", text, z);
    z.stop = 800;  // 100 chunks
    const auto sp = split_text("numbered", text, z);
    CHECK(sp.stop.size() == 800);
    CHECK(chunks_in(sp.stop) == sp.stop_chunks);
    check_covers(sp.stop_chunks, N + 1);
    // A limited training set leaves room: every other split is the one without a stop split.
    CHECK(sp.train.tokens == before.train.tokens);
    CHECK(sp.validation.tokens == before.validation.tokens);
    CHECK(sp.test.tokens == before.test.tokens);
    CHECK(sp.dev.tokens == before.dev.tokens);
    CHECK(before.stop.size() == 0);
    std::set<Index> all;
    for (const auto* ks : {&sp.test_chunks, &sp.validation_chunks, &sp.dev_chunks, &sp.train_chunks, &sp.stop_chunks})
        for (Index k : *ks) CHECK(all.insert(k).second);
    CHECK(std::find(sp.stop_chunks.begin(), sp.stop_chunks.end(), N) == sp.stop_chunks.end());
    // All of the text for training: the stop split comes out of it, spread over the text again.
    z.train = -1;
    const auto full = split_text("numbered", text, z);
    CHECK(full.stop.size() == 800);
    check_covers(full.stop_chunks, N + 1);
    CHECK(full.test.tokens == before.test.tokens);
    CHECK(full.validation.tokens == before.validation.tokens);
    CHECK(static_cast<Index>(full.train_chunks.size()) == N + 1 - 200 - 100);
    std::set<Index> every;
    for (const auto* ks : {&full.test_chunks, &full.validation_chunks, &full.dev_chunks, &full.train_chunks, &full.stop_chunks})
        for (Index k : *ks) CHECK(every.insert(k).second);
    CHECK(static_cast<Index>(every.size()) == N + 1);
    // More than the text holds is a clear error naming the split.
    z.stop = 8 * 1802;
    CHECK_THROWS_WITH_AS(split_text("numbered", text, z), doctest::Contains("stop split"), comigs::InvalidArgument);
    z.stop = -1;
    CHECK_THROWS_WITH_AS(split_text("numbered", text, z), doctest::Contains("stop -1"), comigs::InvalidArgument);
}
