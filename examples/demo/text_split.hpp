#pragma once
// How comigs-demo splits one user's real text into training, validation, test, dev (tuning) and
// stop (early-stopping) token streams so that every split samples the WHOLE text, whatever the sizes asked for.
//
// The text is cut into chunks of `chunk` bytes (512 by default; the last one may be shorter). The
// held-out splits (test, validation, dev) take whole chunks, spread evenly over the text: their K chunks
// sit at floor((j + 1/2) N / K) among the N full chunks, and those positions are dealt to the splits in
// proportion to their sizes (each position goes to the split furthest behind its quota), so each
// held-out split's chunks are evenly spaced too. Training takes the chunks left over; when fewer
// training tokens are asked for, it takes an evenly spaced subset of them. Each split is the
// concatenation of its chunks in text order, cut to the size asked for.
//
// So a split of m chunks has one within every ~N/m chunks of the text: a test set of 10k tokens of a
// 1.2 MB text samples all of it, not its first 100 kB (what the demo's first splitter did).
//
// The early-stopping split (`stop`, --stop-tokens) is dealt after the others, from the chunks training
// leaves: an evenly spaced subset of the whole chunks neither held out nor taken by training. So asking
// for it moves no other split's chunk when the text has room (a limited training size): runs with and
// without it train, validate and test on the same tokens. Where training takes all that is left (or
// there is no room beside it), the stop split is taken first, evenly spaced over what the held-out
// splits leave, and training gets the rest.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include <comigs/error.hpp>

#include "corpus.hpp"

namespace comigs::demo {

/// Sizes of the five splits of one user's text, in tokens (bytes).
struct SplitSizes {
    Index train = -1;  ///< < 0: everything the held-out splits leave
    Index validation = 3000;
    Index test = 10000;
    Index dev = 0;  ///< tuning split (hyper-parameters are chosen on it, never on test); 0: none
    Index chunk = 512;
    Index stop = 0;  ///< early-stopping split (--keep-best chooses rounds on it; never trained on); 0: none
};

/// The five streams and, for checks, the chunk indices each one took (in text order).
struct TextSplit {
    Stream train, validation, test, dev, stop;
    std::vector<Index> train_chunks, validation_chunks, test_chunks, dev_chunks, stop_chunks;
    Index chunks = 0;  ///< N: chunks of the text (the last one possibly short)
};

namespace detail {
/// m distinct indices of [0, n) spread evenly: floor((j + 1/2) n / m), j < m (needs m <= n; the
/// indices strictly increase because consecutive ones differ by n / m >= 1 before flooring).
inline std::vector<Index> spread_evenly(Index n, Index m) {
    std::vector<Index> out;
    out.reserve(static_cast<std::size_t>(std::max<Index>(m, 0)));
    for (Index j = 0; j < m; ++j) out.push_back(static_cast<Index>((2 * j + 1) * n / (2 * m)));
    return out;
}

inline Index chunks_for(Index tokens, Index chunk) { return tokens <= 0 ? 0 : (tokens + chunk - 1) / chunk; }
}  // namespace detail

/// Validation tokens that are `share` of the training tokens (--val-tokens P%): round(share x train);
/// with all of a text for training (train < 0), validation and training share what test and dev leave
/// of the text's `text_tokens`, validation = share / (1 + share) of it, so that it is again share x
/// training (up to the held-out splits' rounding to whole chunks). A proportional rule: 6000 training
/// tokens at 50% keep 3000, all of a 1.2 MB text gets about 390k.
inline Index validation_for_share(double share, Index train, Index text_tokens, Index test, Index dev) {
    require(std::isfinite(share) && share > 0, "validation share ", share, ": must be finite and > 0");
    if (train >= 0) return static_cast<Index>(std::llround(share * static_cast<double>(train)));
    const Index rest = std::max<Index>(0, text_tokens - test - dev);
    return static_cast<Index>(std::llround(share / (1 + share) * static_cast<double>(rest)));
}

/// Splits `text` (see the file comment). `who` names the text in errors. Throws InvalidArgument when the
/// held-out splits need more whole chunks than the text has (one chunk is always left for training).
inline TextSplit split_text(std::string_view who, std::string_view text, const SplitSizes& sizes) {
    require(sizes.chunk >= 1, "text '", who, "': chunk ", sizes.chunk, ": must be >= 1");
    require(sizes.validation >= 0 && sizes.test >= 0 && sizes.dev >= 0 && sizes.stop >= 0, "text '", who,
            "': split sizes (validation ", sizes.validation, ", test ", sizes.test, ", dev ", sizes.dev, ", stop ",
            sizes.stop, "): must be >= 0");
    const Index bytes = static_cast<Index>(text.size()), C = sizes.chunk;
    TextSplit out;
    out.chunks = (bytes + C - 1) / C;
    const Index full = bytes / C;  // held-out splits take whole chunks only
    // Held-out splits in the order positions are dealt: test, validation, dev.
    const Index need[3] = {detail::chunks_for(sizes.test, C), detail::chunks_for(sizes.validation, C),
                           detail::chunks_for(sizes.dev, C)};
    const Index K = need[0] + need[1] + need[2];
    require(K < full || (K == 0 && bytes > 0), "text '", who, "': ", bytes, " bytes are ", full, " whole chunks of ", C,
            " bytes; test ", sizes.test, ", validation ", sizes.validation, " and dev ", sizes.dev, " tokens need ", K,
            " of them and training at least one more");
    std::vector<Index>* held[3] = {&out.test_chunks, &out.validation_chunks, &out.dev_chunks};
    std::vector<char> taken(static_cast<std::size_t>(out.chunks), 0);
    Index dealt[3] = {0, 0, 0};
    for (Index pos : detail::spread_evenly(full, K)) {
        // The split furthest behind its quota: smallest (dealt + 1/2) / need, ties in split order.
        int best = -1;
        for (int s = 0; s < 3; ++s) {
            if (dealt[s] == need[s]) continue;
            if (best < 0 || (2 * dealt[s] + 1) * need[best] < (2 * dealt[best] + 1) * need[s]) best = s;
        }
        held[best]->push_back(pos);
        ++dealt[best];
        taken[static_cast<std::size_t>(pos)] = 1;
    }
    std::vector<Index> rest;
    for (Index k = 0; k < out.chunks; ++k)
        if (!taken[static_cast<std::size_t>(k)]) rest.push_back(k);
    const Index want = sizes.train < 0 ? static_cast<Index>(rest.size()) : detail::chunks_for(sizes.train, C);
    const Index stop_need = detail::chunks_for(sizes.stop, C);
    // An evenly spaced `m` of `from`'s whole chunks (the short last chunk is never held out).
    auto pick_stop = [&](const std::vector<Index>& from, Index m) {
        std::vector<Index> whole;
        for (Index k : from)
            if (k < full) whole.push_back(k);
        require(m <= static_cast<Index>(whole.size()), "text '", who, "': the stop split's ", sizes.stop,
                " tokens need ", m, " whole chunks of ", C, " bytes; ", whole.size(), " are left");
        std::vector<Index> picked;
        for (Index j : detail::spread_evenly(static_cast<Index>(whole.size()), m))
            picked.push_back(whole[static_cast<std::size_t>(j)]);
        return picked;
    };
    auto without = [](const std::vector<Index>& from, const std::vector<Index>& drop) {  // both sorted
        std::vector<Index> left;
        std::set_difference(from.begin(), from.end(), drop.begin(), drop.end(), std::back_inserter(left));
        return left;
    };
    auto take_training = [&](const std::vector<Index>& from) {
        if (want >= static_cast<Index>(from.size())) {
            out.train_chunks = from;
        } else {
            for (Index j : detail::spread_evenly(static_cast<Index>(from.size()), want))
                out.train_chunks.push_back(from[static_cast<std::size_t>(j)]);
        }
    };
    take_training(rest);
    if (stop_need > 0) {
        const std::vector<Index> left = without(rest, out.train_chunks);
        Index whole_left = 0;
        for (Index k : left) whole_left += k < full ? 1 : 0;
        if (sizes.train >= 0 && whole_left >= stop_need) {  // room beside training: no other split moves
            out.stop_chunks = pick_stop(left, stop_need);
        } else {  // training takes all that is left: the stop split first, training the rest
            out.stop_chunks = pick_stop(rest, stop_need);
            require(static_cast<Index>(rest.size()) > stop_need, "text '", who, "': the stop split's ", sizes.stop,
                    " tokens leave no chunk for training");
            out.train_chunks.clear();
            take_training(without(rest, out.stop_chunks));
        }
    }
    auto gather = [&](Stream& s, const std::vector<Index>& ks, Index limit) {
        for (Index k : ks) {
            const Index begin = k * C, n = std::min(C, bytes - begin);
            append_bytes(s.tokens, text.substr(static_cast<std::size_t>(begin), static_cast<std::size_t>(n)));
        }
        if (limit >= 0 && s.size() > limit) s.tokens.resize(static_cast<std::size_t>(limit));
        s.personal.assign(s.tokens.size(), 0);
    };
    gather(out.train, out.train_chunks, sizes.train);
    gather(out.validation, out.validation_chunks, sizes.validation);
    gather(out.test, out.test_chunks, sizes.test);
    gather(out.dev, out.dev_chunks, sizes.dev);
    gather(out.stop, out.stop_chunks, sizes.stop);
    return out;
}

}  // namespace comigs::demo
