#pragma once
// The embedded synthetic corpus of comigs-demo (design: data.md): users whose text switches between a
// shared source and a personal one, generated from a seed, with a known best achievable loss.
//
// Every source is an order-2 character Markov chain over a small alphabet emitted as ASCII bytes
// (vocabulary 256). A base chain (what the host is pretrained on) is hierarchical: for each last
// character b a parent row P_b ~ Dirichlet(parent_alpha), and each order-2 row (a, b) is drawn
// around it, child ~ Dirichlet(child_concentration * P_b), then mixed with uniform_mix of uniform
// mass so every chain is ergodic. Derived sources are log-linear "tilts" of the base:
//
//   source(c | a, b)  ∝  base(c | a, b) * exp(beta * W[b][c] + boost * [c is a signature letter])
//
// with W an A x A matrix of independent N(0, 1). The tilt depends on the *last* character b only (the
// "current character j" of data.md), not on a: it is one bigram-level log-correction applied to every
// order-2 context ending in b, i.e. A*A numbers, the low-complexity change a small adapter can learn.
// The shared source G uses beta_shared and no signatures; user u's personal source S_u uses its own W,
// beta_personal, and signatures_per_user signature letters boosted by e^signature_log_boost.
//
// A user's text is a two-state hidden Markov chain z_t in {0 = shared, 1 = personal}: z_0 is drawn
// from the stationary law (1 - h, h); for t >= 1, z_t follows the switching matrix; x_t is drawn from
// G or S_u given the last two characters, whichever source emitted them (the order-2 state runs on
// across switches). Every stream starts from the context (start, start), start being the space when
// the alphabet has one; the floor conditions on that same start.
//
// Reproducibility: each source, user and split has its own Rng stream. The transition tables are
// quantised to integer multiples of 2^-24 and sampled with integer arithmetic, so last-bit differences
// between math libraries (exp, log, pow in the draws) almost never change a single table entry and
// never change how an entry is sampled: the same seed gives the same bytes on any machine (a pinned
// hash in tests/test_demo_corpus.cpp checks it across compilers and flags).
//
// Signature letters are boosted only in rows whose context does NOT end in a signature letter
// (CorpusConfig::boost_after_signature = false, the default). Boosting them in every row, on top of a
// beta = 3 tilt, traps personal chains in near-deterministic loops of their own signature letters
// ("lblblb", "ffff"): with the boost everywhere, 5 of the 40 personal sources of seeds 0-9 had an
// entropy-rate perplexity below 1.2 (1 of 40 without signatures), and such a user's floor says
// nothing about collaboration. A signature letter then marks the personal source without being able
// to follow itself, which is what a signature should do. Markov2::entropy_rate() flags loops.
#include <comigs/error.hpp>
#include <comigs/random.hpp>
#include <comigs/view.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace comigs::demo {

/// The symbols a source emits, each one an ASCII byte (token id = byte value, vocabulary 256).
class Alphabet {
public:
    /// `symbols`: distinct bytes, at least 2 of them. Symbol i is emitted as byte `symbols[i]`.
    explicit Alphabet(std::string symbols = "abcdefghijklmnopqrstuvwx ") : symbols_(std::move(symbols)) {
        require(symbols_.size() >= 2 && symbols_.size() <= 255, "alphabet size ", symbols_.size(),
                ": must be in [2, 255]");
        symbol_of_.fill(-1);
        for (std::size_t i = 0; i < symbols_.size(); ++i) {
            const auto b = static_cast<unsigned char>(symbols_[i]);
            require(symbol_of_[b] < 0, "alphabet \"", symbols_, "\": byte ", int(b), " appears twice");
            symbol_of_[b] = static_cast<int>(i);
        }
        start_ = symbol_of_[static_cast<unsigned char>(' ')] >= 0 ? symbol_of_[static_cast<unsigned char>(' ')] : 0;
    }

    int size() const { return static_cast<int>(symbols_.size()); }
    const std::string& symbols() const { return symbols_; }
    std::uint8_t byte(int symbol) const {
        return static_cast<std::uint8_t>(symbols_[static_cast<std::size_t>(symbol)]);
    }
    /// Symbol index of a byte; throws InvalidArgument for a byte outside the alphabet.
    int symbol(std::uint8_t byte) const {
        const int s = symbol_of_[byte];
        require(s >= 0, "byte ", int(byte), ": not in the alphabet \"", symbols_, "\"");
        return s;
    }
    bool contains(std::uint8_t byte) const { return symbol_of_[byte] >= 0; }
    /// The context every stream starts from: the space (a word boundary) if present, else symbol 0.
    int start_symbol() const { return start_; }
    /// Signature characters are letters: every symbol except the space.
    bool is_letter(int symbol) const { return byte(symbol) != ' '; }

private:
    std::string symbols_;
    std::array<int, 256> symbol_of_{};
    int start_ = 0;
};

/// Order-2 Markov chain over A symbols: P(c | a, b) for the context (a = second-to-last, b = last).
/// Probabilities are integer multiples of 2^-24 (`kScale`), at least one unit each, summing to exactly 1
/// per row: strictly positive rows, exact in double, and portable integer sampling.
class Markov2 {
public:
    static constexpr int kBits = 24;
    static constexpr std::uint32_t kScale = 1u << kBits;

    Markov2() = default;

    /// Quantises `rows` (A*A rows of A positive finite weights, row (a, b) at offset (a*A + b)*A; any
    /// positive scale, each row is normalised) to the 2^-24 grid: every entry is rounded down, kept at
    /// least one unit, and the largest entry (lowest index on ties) absorbs the remainder.
    static Markov2 from_weights(int symbols, std::span<const double> rows) {
        require(symbols >= 2 && symbols <= 255, "symbols ", symbols, ": must be in [2, 255]");
        const auto A = static_cast<std::size_t>(symbols);
        require<ShapeError>(rows.size() == A * A * A, "Markov2 weights have ", rows.size(), " entries, expected ",
                            A * A * A);
        Markov2 m;
        m.symbols_ = symbols;
        m.prob_.resize(A * A * A);
        m.cumulative_.resize(A * A * A);
        std::vector<std::int64_t> units(A);
        for (std::size_t r = 0; r < A * A; ++r) {
            const double* w = rows.data() + r * A;
            double total = 0.0;
            for (std::size_t c = 0; c < A; ++c) {
                require<NumericError>(std::isfinite(w[c]) && w[c] > 0.0, "Markov2 row ", r, " entry ", c, " = ", w[c],
                                      ": weights must be positive and finite");
                total += w[c];
            }
            require<NumericError>(std::isfinite(total), "Markov2 row ", r, ": weight sum overflows");
            std::int64_t sum = 0;
            std::size_t largest = 0;
            for (std::size_t c = 0; c < A; ++c) {
                const double scaled = std::floor(w[c] / total * double(kScale));
                units[c] = std::max<std::int64_t>(1, static_cast<std::int64_t>(scaled));
                sum += units[c];
                if (units[c] > units[largest]) largest = c;
            }
            // |remainder| <= A units and the largest entry holds >= 2^24 / A units, so it stays >= 1.
            units[largest] += std::int64_t(kScale) - sum;
            std::uint32_t running = 0;
            for (std::size_t c = 0; c < A; ++c) {
                running += static_cast<std::uint32_t>(units[c]);
                m.prob_[r * A + c] = double(units[c]) / double(kScale);
                m.cumulative_[r * A + c] = running;
            }
        }
        return m;
    }

    int symbols() const { return symbols_; }
    /// P(c | a, b).
    double prob(int a, int b, int c) const { return prob_[offset(a, b) + static_cast<std::size_t>(c)]; }
    /// Row (a, b): A probabilities over the next symbol.
    std::span<const double> row(int a, int b) const {
        return {prob_.data() + offset(a, b), static_cast<std::size_t>(symbols_)};
    }
    /// All A*A*A probabilities, row (a, b) at offset (a*A + b)*A.
    const std::vector<double>& table() const { return prob_; }

    /// Draws the next symbol after context (a, b) with one 64-bit draw and integer comparisons only.
    int sample(int a, int b, Rng& rng) const {
        const auto u = static_cast<std::uint32_t>(rng.next_u64() >> (64 - kBits));
        const std::uint32_t* cum = cumulative_.data() + offset(a, b);
        int c = 0;
        while (cum[c] <= u) ++c;
        return c;
    }

    /// Stationary law of the context pair (A*A entries, pair (a, b) at a*A + b) of the chain
    /// (a, b) -> (b, c), by power iteration: the uniform mixing makes the chain ergodic and aperiodic.
    std::vector<double> stationary_pairs() const {
        const auto A = static_cast<std::size_t>(symbols_);
        std::vector<double> pair(A * A, 1.0 / double(A * A)), next(A * A);
        for (int it = 0; it < 20000; ++it) {
            std::fill(next.begin(), next.end(), 0.0);
            for (std::size_t ab = 0; ab < A * A; ++ab) {
                const double mass = pair[ab];
                const double* p = prob_.data() + ab * A;
                double* to = next.data() + (ab % A) * A;  // (a, b) -> (b, c)
                for (std::size_t c = 0; c < A; ++c) to[c] += mass * p[c];
            }
            double change = 0.0;
            for (std::size_t i = 0; i < A * A; ++i) change += std::abs(next[i] - pair[i]);
            pair.swap(next);
            if (change < 1e-14) break;
        }
        return pair;
    }

    /// Stationary distribution of the symbols (A entries).
    std::vector<double> stationary_symbols() const {
        const auto A = static_cast<std::size_t>(symbols_);
        const std::vector<double> pair = stationary_pairs();
        std::vector<double> marginal(A, 0.0);
        for (std::size_t ab = 0; ab < A * A; ++ab) marginal[ab % A] += pair[ab];
        return marginal;
    }

    /// Entropy rate in nats/symbol: the best log-loss on long text of this chain alone. exp of it is
    /// the chain's own perplexity floor; a value near 0 flags a chain trapped in a near-deterministic loop.
    double entropy_rate() const {
        const auto A = static_cast<std::size_t>(symbols_);
        const std::vector<double> pair = stationary_pairs();
        double h = 0.0;
        for (std::size_t ab = 0; ab < A * A; ++ab)
            for (std::size_t c = 0; c < A; ++c) {
                const double p = prob_[ab * A + c];
                h -= pair[ab] * p * std::log(p);
            }
        return h;
    }

private:
    std::size_t offset(int a, int b) const {
        return (static_cast<std::size_t>(a) * static_cast<std::size_t>(symbols_) + static_cast<std::size_t>(b)) *
               static_cast<std::size_t>(symbols_);
    }

    int symbols_ = 0;
    std::vector<double> prob_;
    std::vector<std::uint32_t> cumulative_;
};

/// The two-state hidden chain that switches a user's text between the shared source (state 0) and
/// the personal one (state 1).
struct Switching {
    double to_personal = 0.0;  ///< P(z_t = 1 | z_{t-1} = 0)
    double to_shared = 0.0;    ///< P(z_t = 0 | z_{t-1} = 1)

    /// Switching with long-run personal share h and minority segments of mean length L (tokens).
    /// Segment lengths are geometric: a personal segment lasts 1 / to_shared tokens on average, a
    /// shared one 1 / to_personal, and the stationary personal share is to_personal / (to_personal +
    /// to_shared). Fixing the minority's mean at L and the share at h gives
    ///   h <= 1/2 (personal is the minority): to_shared = 1/L,  to_personal = h / ((1 - h) L)
    ///   h >  1/2 (shared is the minority):   to_personal = 1/L, to_shared = (1 - h) / (h L)
    /// so the majority segments last L (1 - h) / h or L h / (1 - h) on average; h = 0 never leaves the
    /// shared source and h = 1 never leaves the personal one.
    static Switching from_heterogeneity(double h, double L) {
        require(h >= 0.0 && h <= 1.0, "heterogeneity ", h, ": must be in [0, 1]");
        require(std::isfinite(L) && L >= 1.0, "minority segment length ", L, ": must be finite and >= 1");
        if (h <= 0.5) return {h / ((1.0 - h) * L), 1.0 / L};
        return {1.0 / L, (1.0 - h) / (h * L)};
    }

    /// Stationary probability of the personal state.
    double personal_share() const {
        validate();
        return to_personal / (to_personal + to_shared);
    }

    void validate() const {
        require(to_personal >= 0.0 && to_personal <= 1.0, "switching to_personal ", to_personal, ": must be in [0, 1]");
        require(to_shared >= 0.0 && to_shared <= 1.0, "switching to_shared ", to_shared, ": must be in [0, 1]");
        require(to_personal + to_shared > 0.0,
                "switching to_personal = to_shared = 0: the stationary share is undefined");
    }
};

/// A stream of tokens with the ground-truth source of each one. Token ids are bytes for the embedded
/// corpus and byte-level hosts, and a model's vocabulary ids (up to ~150k) with --model: int32.
struct Stream {
    std::vector<std::int32_t> tokens;    ///< n token ids
    std::vector<std::uint8_t> personal;  ///< n labels: 1 = emitted by the personal source, 0 = shared
    index size() const { return static_cast<index>(tokens.size()); }
};

/// Appends the bytes of `text` as byte tokens (0-255: through unsigned char, never a negative id).
inline void append_bytes(std::vector<std::int32_t>& tokens, std::string_view text) {
    for (const char c : text) tokens.push_back(static_cast<unsigned char>(c));
}

/// Samples n tokens of the switching process (see the file comment). With a switching that never
/// leaves state 0 this is plain sampling from `shared`.
inline Stream sample_stream(const Alphabet& alphabet, const Markov2& shared, const Markov2& personal,
                            const Switching& switching, index n, Rng& rng) {
    require(n >= 0, "stream length ", n, ": must be >= 0");
    require(shared.symbols() == alphabet.size() && personal.symbols() == alphabet.size(), "sources have ",
            shared.symbols(), " and ", personal.symbols(), " symbols, the alphabet ", alphabet.size());
    const double h = switching.personal_share();
    Stream s;
    s.tokens.resize(static_cast<std::size_t>(n));
    s.personal.resize(static_cast<std::size_t>(n));
    int a = alphabet.start_symbol(), b = alphabet.start_symbol();
    int z = 0;
    for (index t = 0; t < n; ++t) {
        // uniform() < p with p an exact IEEE quotient: the same decision on every machine.
        if (t == 0)
            z = rng.uniform() < h ? 1 : 0;
        else if (z == 0)
            z = rng.uniform() < switching.to_personal ? 1 : 0;
        else
            z = rng.uniform() < switching.to_shared ? 0 : 1;
        const int c = (z == 1 ? personal : shared).sample(a, b, rng);
        s.tokens[static_cast<std::size_t>(t)] = alphabet.byte(c);
        s.personal[static_cast<std::size_t>(t)] = static_cast<std::uint8_t>(z);
        a = b;
        b = c;
    }
    return s;
}

/// Per-token output of the forward algorithm.
struct ForwardResult {
    std::vector<double> nll;                 ///< n values: -ln P(x_t | x_<t), nats
    std::vector<double> posterior_personal;  ///< n values: P(z_t = personal | x_<=t), the exact filter
    double mean_nll() const {
        require(!nll.empty(), "forward result is empty: the stream has no tokens");
        return std::accumulate(nll.begin(), nll.end(), 0.0) / double(nll.size());
    }
};

/// Exact Bayes-optimal next-token log-loss of a stream under the switching process with known sources
/// (forward algorithm over the two hidden states, normalised at every step so it never underflows).
inline ForwardResult forward_filter(const Alphabet& alphabet, const Markov2& shared, const Markov2& personal,
                                    const Switching& switching, const Stream& stream) {
    require(shared.symbols() == alphabet.size() && personal.symbols() == alphabet.size(), "sources have ",
            shared.symbols(), " and ", personal.symbols(), " symbols, the alphabet ", alphabet.size());
    const double h = switching.personal_share();
    const auto n = stream.tokens.size();
    ForwardResult out;
    out.nll.resize(n);
    out.posterior_personal.resize(n);
    // post = P(z_{t-1} | x_<t); at t = 0 the prior is the stationary law itself.
    double post0 = 1.0 - h, post1 = h;
    int a = alphabet.start_symbol(), b = alphabet.start_symbol();
    for (std::size_t t = 0; t < n; ++t) {
        const int c = alphabet.symbol(stream.tokens[t]);
        double prior0 = post0, prior1 = post1;
        if (t > 0) {
            prior0 = post0 * (1.0 - switching.to_personal) + post1 * switching.to_shared;
            prior1 = post0 * switching.to_personal + post1 * (1.0 - switching.to_shared);
        }
        const double joint0 = prior0 * shared.prob(a, b, c);
        const double joint1 = prior1 * personal.prob(a, b, c);
        const double p = joint0 + joint1;
        out.nll[t] = -std::log(p);
        post0 = joint0 / p;
        post1 = joint1 / p;
        out.posterior_personal[t] = post1;
        a = b;
        b = c;
    }
    return out;
}

/// Mean log-loss (nats/token) of a stream under one source alone, from the same start context.
inline double source_nll(const Alphabet& alphabet, const Markov2& source, const Stream& stream) {
    require(source.symbols() == alphabet.size(), "source has ", source.symbols(), " symbols, the alphabet ",
            alphabet.size());
    require(!stream.tokens.empty(), "source_nll: the stream has no tokens");
    int a = alphabet.start_symbol(), b = alphabet.start_symbol();
    double total = 0.0;
    for (const std::uint8_t byte : stream.tokens) {
        const int c = alphabet.symbol(byte);
        total -= std::log(source.prob(a, b, c));
        a = b;
        b = c;
    }
    return total / double(stream.tokens.size());
}

/// Best achievable loss on a stream.
struct Floor {
    double nll = 0.0;         ///< mean Bayes-optimal log-loss, nats/token
    double perplexity = 0.0;  ///< exp(nll)
    index tokens = 0;
};

/// Everything the corpus is made from. Every constant of data.md is a field; defaults are its values.
struct CorpusConfig {
    std::uint64_t seed = 0;
    std::string alphabet = "abcdefghijklmnopqrstuvwx ";  ///< 24 letters and the space
    double parent_alpha = 0.5;                           ///< order-1 parent rows ~ Dirichlet(parent_alpha)
    double child_concentration = 2.0;                    ///< order-2 rows ~ Dirichlet(child_concentration * parent)
    double uniform_mix = 0.02;                           ///< eps: share of uniform mass in every base row
    double beta_shared = 1.5;                            ///< tilt strength of the shared source G
    double beta_personal = 3.0;                          ///< tilt strength of each personal source S_u
    int signatures_per_user = 3;                         ///< signature letters per personal source
    double signature_log_boost = 4.0;                    ///< signature probabilities times e^this
    /// Boost signatures also after a signature letter (data.md's literal reading; makes loops, see the
    /// file comment). Default false: no boost in rows whose context ends in a signature letter.
    bool boost_after_signature = false;
    double heterogeneity = 0.9;                          ///< h: long-run share of personal text
    double minority_segment_length = 64.0;               ///< L: mean length of the minority segments
    int num_users = 4;
    index train_chars = 6000;                 ///< per user, unless train_chars_per_user is given
    std::vector<index> train_chars_per_user;  ///< empty, or num_users sizes (data-quantity heterogeneity)
    index validation_chars = 3000;            ///< per user, unless validation_chars_per_user is given
    index test_chars = 10000;                 ///< per user, unless test_chars_per_user is given
    std::vector<index> validation_chars_per_user, test_chars_per_user;  ///< empty, or num_users sizes
    index dev_chars = 0;                      ///< per user: a tuning split (hyper-parameters are chosen on it)
    std::vector<index> stop_chars_per_user;   ///< empty (none), or one size, or num_users: an early-stopping split
    index base_chars = 300000;                ///< host pretraining stream from the base source
    index base_validation_chars = 10000;      ///< held-out base stream (host evaluation)

    void validate() const {
        const Alphabet letters(alphabet);  // validates the alphabet
        require(parent_alpha > 0.0 && std::isfinite(parent_alpha), "parent_alpha ", parent_alpha, ": must be > 0");
        require(child_concentration > 0.0 && std::isfinite(child_concentration), "child_concentration ",
                child_concentration, ": must be > 0");
        require(uniform_mix > 0.0 && uniform_mix <= 1.0, "uniform_mix ", uniform_mix,
                ": must be in (0, 1] (it keeps every chain ergodic)");
        require(std::isfinite(beta_shared) && std::isfinite(beta_personal), "beta_shared ", beta_shared,
                ", beta_personal ", beta_personal, ": must be finite");
        require(std::isfinite(signature_log_boost), "signature_log_boost ", signature_log_boost, ": must be finite");
        int n_letters = 0;
        for (int s = 0; s < letters.size(); ++s) n_letters += letters.is_letter(s) ? 1 : 0;
        require(signatures_per_user >= 0 && signatures_per_user <= n_letters, "signatures_per_user ",
                signatures_per_user, ": must be in [0, ", n_letters, "] (the letters of the alphabet)");
        (void)Switching::from_heterogeneity(heterogeneity, minority_segment_length);
        require(num_users >= 1, "num_users ", num_users, ": must be >= 1");
        require(train_chars_per_user.empty() || train_chars_per_user.size() == static_cast<std::size_t>(num_users),
                "train_chars_per_user has ", train_chars_per_user.size(),
                " sizes, expected 0 or num_users = ", num_users);
        for (std::size_t u = 0; u < train_chars_per_user.size(); ++u)
            require(train_chars_per_user[u] >= 0, "train_chars_per_user[", u, "] ", train_chars_per_user[u],
                    ": must be >= 0");
        for (const auto* sizes : {&validation_chars_per_user, &test_chars_per_user}) {
            require(sizes->empty() || sizes->size() == static_cast<std::size_t>(num_users), "per-user ",
                    sizes == &test_chars_per_user ? "test" : "validation", " sizes: ", sizes->size(),
                    " given, expected 0 or num_users = ", num_users);
            for (index v : *sizes) require(v >= 0, "per-user split size ", v, ": must be >= 0");
        }
        require(dev_chars >= 0, "dev_chars ", dev_chars, ": must be >= 0");
        require(stop_chars_per_user.size() <= 1 || stop_chars_per_user.size() == static_cast<std::size_t>(num_users),
                "stop_chars_per_user has ", stop_chars_per_user.size(), " sizes, expected 0, 1 or num_users = ", num_users);
        for (index v : stop_chars_per_user) require(v >= 0, "stop_chars_per_user entry ", v, ": must be >= 0");
        require(train_chars >= 0, "train_chars ", train_chars, ": must be >= 0");
        require(validation_chars >= 0, "validation_chars ", validation_chars, ": must be >= 0");
        require(test_chars >= 0, "test_chars ", test_chars, ": must be >= 0");
        require(base_chars >= 0, "base_chars ", base_chars, ": must be >= 0");
        require(base_validation_chars >= 0, "base_validation_chars ", base_validation_chars, ": must be >= 0");
    }

    index train_chars_of(int user) const {
        return train_chars_per_user.empty() ? train_chars : train_chars_per_user[static_cast<std::size_t>(user)];
    }
    index validation_chars_of(int user) const {
        return validation_chars_per_user.empty() ? validation_chars
                                                 : validation_chars_per_user[static_cast<std::size_t>(user)];
    }
    index stop_chars_of(int user) const {
        if (stop_chars_per_user.empty()) return 0;
        return stop_chars_per_user.size() == 1 ? stop_chars_per_user[0] : stop_chars_per_user[static_cast<std::size_t>(user)];
    }
    index test_chars_of(int user) const {
        return test_chars_per_user.empty() ? test_chars : test_chars_per_user[static_cast<std::size_t>(user)];
    }
};

enum class Split { train, validation, test };

/// One user's personal source and data.
struct UserCorpus {
    Markov2 personal;            ///< S_u
    std::vector<int> signature;  ///< symbol indices of S_u's signature letters
    Stream train, validation, test;
    Stream dev;  ///< tuning split (CorpusConfig::dev_chars; Rng stream 3, so it changes no other split)
    Stream stop;  ///< early-stopping split (CorpusConfig::stop_chars_per_user; Rng stream 4, likewise)

    const Stream& split(Split s) const {
        return s == Split::train ? train : s == Split::validation ? validation : test;
    }
};

/// The whole embedded corpus: a pure function of its config (see make_corpus).
struct Corpus {
    CorpusConfig config;
    Alphabet alphabet;
    Switching switching;  ///< the same for every user
    Markov2 base;         ///< host pretraining source
    Markov2 shared;       ///< G
    Stream base_train, base_validation;
    std::vector<UserCorpus> users;
};

namespace detail {

/// Rng stream ids: one per (purpose, user, split), so that changing one size or adding a user leaves
/// every other table and stream unchanged.
enum class StreamKind : std::uint64_t { base_tables = 1, shared_tilt, personal_tilt, base_text, user_text };

inline Rng make_rng(std::uint64_t seed, StreamKind kind, std::uint64_t user = 0, std::uint64_t split = 0) {
    return Rng(seed, (static_cast<std::uint64_t>(kind) << 40) | (user << 8) | split);
}

/// One Dirichlet(alpha) draw into `out` via normalised Gamma variates. Tiny shapes give exact zeros,
/// which the uniform mixing later lifts; alpha is floored so no shape is zero.
inline void dirichlet(std::span<double> out, std::span<const double> alpha, Rng& rng) {
    double total = 0.0;
    for (std::size_t i = 0; i < out.size(); ++i) {
        out[i] = rng.gamma(std::max(alpha[i], 1e-12));
        total += out[i];
    }
    require<NumericError>(total > 0.0 && std::isfinite(total), "Dirichlet draw sums to ", total);
    for (double& v : out) v /= total;
}

inline Markov2 make_base(const CorpusConfig& cfg, int A) {
    Rng rng = make_rng(cfg.seed, StreamKind::base_tables);
    const auto n = static_cast<std::size_t>(A);
    std::vector<double> parents(n * n), alpha(n, cfg.parent_alpha);
    for (std::size_t b = 0; b < n; ++b) dirichlet({parents.data() + b * n, n}, alpha, rng);
    std::vector<double> rows(n * n * n);
    for (std::size_t a = 0; a < n; ++a)
        for (std::size_t b = 0; b < n; ++b) {
            for (std::size_t c = 0; c < n; ++c) alpha[c] = cfg.child_concentration * parents[b * n + c];
            const std::span<double> row(rows.data() + (a * n + b) * n, n);
            dirichlet(row, alpha, rng);
            for (double& v : row) v = (1.0 - cfg.uniform_mix) * v + cfg.uniform_mix / double(n);
        }
    return Markov2::from_weights(A, rows);
}

/// base(c | a, b) * exp(beta * W[b][c] + boost * [c in signature]), W ~ N(0, 1) of shape A x A.
/// Without `boost_after_signature`, rows whose last character b is itself a signature letter get no boost.
inline Markov2 tilt(const Markov2& base, double beta, std::span<const int> signature, double boost, Rng& rng,
                    bool boost_after_signature = true) {
    const auto n = static_cast<std::size_t>(base.symbols());
    std::vector<double> log_tilt(n * n);
    for (double& w : log_tilt) w = beta * rng.normal();
    const auto is_signature = [&](std::size_t b) {
        return std::find(signature.begin(), signature.end(), static_cast<int>(b)) != signature.end();
    };
    for (const int s : signature)
        for (std::size_t b = 0; b < n; ++b)
            if (boost_after_signature || !is_signature(b)) log_tilt[b * n + static_cast<std::size_t>(s)] += boost;
    std::vector<double> rows(n * n * n);
    for (std::size_t a = 0; a < n; ++a)
        for (std::size_t b = 0; b < n; ++b) {
            const double* p = base.table().data() + (a * n + b) * n;
            double* out = rows.data() + (a * n + b) * n;
            // Subtracting the row's largest log-weight keeps exp in range for any beta.
            double top = -INFINITY;
            for (std::size_t c = 0; c < n; ++c) top = std::max(top, std::log(p[c]) + log_tilt[b * n + c]);
            for (std::size_t c = 0; c < n; ++c) out[c] = std::exp(std::log(p[c]) + log_tilt[b * n + c] - top);
        }
    return Markov2::from_weights(base.symbols(), rows);
}

}  // namespace detail

/// Letters of the alphabet from rarest to most frequent under `source`'s stationary distribution
/// (ties by symbol index).
inline std::vector<int> letters_by_rarity(const Alphabet& alphabet, const Markov2& source) {
    const std::vector<double> freq = source.stationary_symbols();
    std::vector<int> letters;
    for (int s = 0; s < alphabet.size(); ++s)
        if (alphabet.is_letter(s)) letters.push_back(s);
    std::stable_sort(letters.begin(), letters.end(), [&](int x, int y) {
        return freq[static_cast<std::size_t>(x)] < freq[static_cast<std::size_t>(y)];
    });
    return letters;
}

/// Signature letters of user u: positions [k u, k u + k) of the rarity ranking, wrapping around.
/// Users get disjoint sets while k * num_users <= number of letters (12 of 24 by default); beyond that
/// the sets repeat cyclically. Independent of num_users, so adding users never changes earlier ones.
inline std::vector<int> signature_letters(std::span<const int> rarity, int user, int per_user) {
    std::vector<int> sig;
    if (rarity.empty()) return sig;
    for (int k = 0; k < per_user; ++k)
        sig.push_back(rarity[static_cast<std::size_t>(user * per_user + k) % rarity.size()]);
    return sig;
}

/// Builds the corpus. Same config (seed included) => same bytes and labels on any machine.
inline Corpus make_corpus(const CorpusConfig& config) {
    config.validate();
    Corpus c;
    c.config = config;
    c.alphabet = Alphabet(config.alphabet);
    const int A = c.alphabet.size();
    c.switching = Switching::from_heterogeneity(config.heterogeneity, config.minority_segment_length);
    c.base = detail::make_base(config, A);
    {
        Rng rng = detail::make_rng(config.seed, detail::StreamKind::shared_tilt);
        c.shared = detail::tilt(c.base, config.beta_shared, {}, 0.0, rng);
    }
    {
        const Switching base_only{0.0, 1.0};  // never leaves state 0
        Rng rng = detail::make_rng(config.seed, detail::StreamKind::base_text, 0, 0);
        c.base_train = sample_stream(c.alphabet, c.base, c.base, base_only, config.base_chars, rng);
        Rng rng_val = detail::make_rng(config.seed, detail::StreamKind::base_text, 0, 1);
        c.base_validation = sample_stream(c.alphabet, c.base, c.base, base_only, config.base_validation_chars, rng_val);
    }
    const std::vector<int> rarity = letters_by_rarity(c.alphabet, c.shared);
    c.users.resize(static_cast<std::size_t>(config.num_users));
    for (int u = 0; u < config.num_users; ++u) {
        UserCorpus& user = c.users[static_cast<std::size_t>(u)];
        const auto uid = static_cast<std::uint64_t>(u);
        user.signature = signature_letters(rarity, u, config.signatures_per_user);
        Rng tilt_rng = detail::make_rng(config.seed, detail::StreamKind::personal_tilt, uid);
        user.personal =
            detail::tilt(c.base, config.beta_personal, user.signature, config.signature_log_boost, tilt_rng,
                         config.boost_after_signature);
        const std::array<std::pair<Stream*, index>, 5> splits{{{&user.train, config.train_chars_of(u)},
                                                               {&user.validation, config.validation_chars_of(u)},
                                                               {&user.test, config.test_chars_of(u)},
                                                               {&user.dev, config.dev_chars},
                                                               {&user.stop, config.stop_chars_of(u)}}};
        for (std::uint64_t s = 0; s < splits.size(); ++s) {
            Rng rng = detail::make_rng(config.seed, detail::StreamKind::user_text, uid, s);
            *splits[s].first = sample_stream(c.alphabet, c.shared, user.personal, c.switching, splits[s].second, rng);
        }
    }
    return c;
}

/// Exact forward-algorithm result for a stream of user u (e.g. to compare a router with the exact filter).
inline ForwardResult user_forward(const Corpus& corpus, int user, const Stream& stream) {
    require(user >= 0 && user < static_cast<int>(corpus.users.size()), "user ", user, ": must be in [0, ",
            corpus.users.size(), ")");
    return forward_filter(corpus.alphabet, corpus.shared, corpus.users[static_cast<std::size_t>(user)].personal,
                          corpus.switching, stream);
}

/// Floor of user u on one of its splits (test by default): mean Bayes-optimal NLL and exp of it.
/// It conditions on the whole history from the stream's start context, so a model that sees only
/// windows of the stream (and not the start context) is bounded by it slightly more loosely.
inline Floor user_floor(const Corpus& corpus, int user, Split split = Split::test) {
    require(user >= 0 && user < static_cast<int>(corpus.users.size()), "user ", user, ": must be in [0, ",
            corpus.users.size(), ")");
    const Stream& s = corpus.users[static_cast<std::size_t>(user)].split(split);
    const double nll = user_forward(corpus, user, s).mean_nll();
    return {nll, std::exp(nll), s.size()};
}

/// Floor of a stream from the base source: a single known chain, no hidden state.
inline Floor base_floor(const Corpus& corpus, const Stream& stream) {
    const double nll = source_nll(corpus.alphabet, corpus.base, stream);
    return {nll, std::exp(nll), stream.size()};
}

/// Floor of the held-out base stream (what the pretrained host is compared with).
inline Floor base_floor(const Corpus& corpus) { return base_floor(corpus, corpus.base_validation); }

/// `batch` windows of `seq_len + 1` consecutive tokens (inputs = columns [0, seq_len), targets =
/// columns [1, seq_len]) with their labels, row-major.
struct Windows {
    index batch = 0;
    index width = 0;                     ///< seq_len + 1
    std::vector<std::int32_t> tokens;    ///< batch x width token ids
    std::vector<std::uint8_t> personal;  ///< batch x width labels (1 = personal)
    std::vector<index> starts;           ///< batch offsets of the windows in the stream

    ConstMatrixView<std::int32_t> token_view() const { return {tokens.data(), batch, width}; }
    ConstMatrixView<std::uint8_t> label_view() const { return {personal.data(), batch, width}; }
};

namespace detail {
inline void fill_window(Windows& w, index row, const Stream& s, index start) {
    w.starts[static_cast<std::size_t>(row)] = start;
    for (index j = 0; j < w.width; ++j) {
        const auto dst = static_cast<std::size_t>(row * w.width + j);
        const auto src = static_cast<std::size_t>(start + j);
        w.tokens[dst] = s.tokens[src];
        w.personal[dst] = s.personal[src];
    }
}
inline Windows allocate_windows(index batch, index width) {
    Windows w;
    w.batch = batch;
    w.width = width;
    w.tokens.resize(static_cast<std::size_t>(batch * width));
    w.personal.resize(static_cast<std::size_t>(batch * width));
    w.starts.resize(static_cast<std::size_t>(batch));
    return w;
}
}  // namespace detail

/// Random training windows: each start uniform over [0, n - seq_len - 1], drawn from `rng`.
inline Windows sample_windows(const Stream& stream, index batch, index seq_len, Rng& rng) {
    require(batch >= 1, "batch ", batch, ": must be >= 1");
    require(seq_len >= 1, "seq_len ", seq_len, ": must be >= 1");
    require(stream.size() >= seq_len + 1, "stream of ", stream.size(),
            " tokens: too short for windows of seq_len + 1 = ", seq_len + 1);
    Windows w = detail::allocate_windows(batch, seq_len + 1);
    const auto choices = static_cast<std::uint64_t>(stream.size() - seq_len);
    for (index i = 0; i < batch; ++i) detail::fill_window(w, i, stream, static_cast<index>(rng.below(choices)));
    return w;
}

/// Consecutive evaluation windows with stride seq_len, so every token after the first is a target
/// exactly once (a tail shorter than a window is dropped): floor((n - 1) / seq_len) windows.
inline Windows evaluation_windows(const Stream& stream, index seq_len) {
    require(seq_len >= 1, "seq_len ", seq_len, ": must be >= 1");
    const index count = stream.size() >= 1 ? (stream.size() - 1) / seq_len : 0;
    Windows w = detail::allocate_windows(count, seq_len + 1);
    for (index i = 0; i < count; ++i) detail::fill_window(w, i, stream, i * seq_len);
    return w;
}

}  // namespace comigs::demo
