#pragma once
// A federated round over a Communicator: every rank holds the uploads of its own users (one user per
// rank, or several), and every rank gets the aggregate back, without a server process. The transport
// is any Communicator (comigs/communicator.hpp: in-process threads; comigs/mpi.hpp: MPI), so this
// header does not need MPI.
//
// What travels: GeneralistUploads only (built on the device by UploadBuilder, so specialists and
// routers never enter a collective), first their table of tensors (names, shapes, LoRA metadata,
// user id, weight, whether the values are finite), then their values.
//
// Two reductions, same rules and same report as the in-process aggregate() (aggregate.hpp):
// - Reduction::fixed_order (default): one allgather of every user's values, then every rank sums in
//   ascending user id with exactly the operations of aggregate(): the result is BITWISE equal to the
//   in-process aggregate of the same uploads, whatever the number of ranks and whichever rank holds
//   which user. Costs every rank the memory of all uploads, small at LoRA sizes (a rank-8 adapter on
//   a 768-wide MLP is 2 x 8 x (768 + 3072) values).
// - Reduction::allreduce: the users holding a tensor form a group; per group, one in-place all-reduce
//   (sum) of ONE contiguous double buffer holding sum(w_u c_u x_u) of the rank's users followed by
//   sum(w_u), the weights, on a sub-communicator of the ranks holding the group's users (cached across
//   rounds). Bandwidth does not grow with the number of users; the sum order is MPI's, so results
//   agree with aggregate() to double rounding (about 1e-16 relative before the cast to T), reproducible
//   for a fixed layout and rank count but not bitwise across them. A rank gets the tensors its own users
//   hold (what it downloads).
//
// Rules: fedavg and hetlora (heterogeneous LoRA ranks: factors zero-padded to the largest rank of the
// adapter's holders, then averaged), weighting uniform or tokens. Users holding different sets of
// shared tensors are aggregated per tensor over their holders, weights renormalised, as in-process.
// Uploads with a NaN or Inf are excluded on every rank and listed in the report.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "aggregate.hpp"
#include "communicator.hpp"
#include "upload.hpp"

namespace comigs {

/// How a distributed round sums (see the top of distributed.hpp).
enum class Reduction {
    fixed_order,  ///< allgather, then the in-process sum on every rank: bitwise equal to aggregate()
    allreduce,    ///< per group of holders, one in-place all-reduce of a contiguous buffer plus weights
};

inline const char* to_string(Reduction r) { return r == Reduction::fixed_order ? "fixed_order" : "allreduce"; }

namespace detail {

class ByteWriter {
public:
    template <class V>
    void put(const V& v) {
        static_assert(std::is_trivially_copyable_v<V>);
        const auto* p = reinterpret_cast<const std::byte*>(&v);
        bytes.insert(bytes.end(), p, p + sizeof(V));
    }
    void put_string(const std::string& s) {
        put(static_cast<std::uint64_t>(s.size()));
        const auto* p = reinterpret_cast<const std::byte*>(s.data());
        bytes.insert(bytes.end(), p, p + s.size());
    }
    std::vector<std::byte> bytes;
};

class ByteReader {
public:
    ByteReader(std::span<const std::byte> b, int rank) : b_(b), rank_(rank) {}
    template <class V>
    V get() {
        need(sizeof(V));
        V v;
        std::memcpy(&v, b_.data() + at_, sizeof(V));
        at_ += sizeof(V);
        return v;
    }
    std::string get_string() {
        const auto n = get<std::uint64_t>();
        need(n);
        std::string s(reinterpret_cast<const char*>(b_.data() + at_), static_cast<std::size_t>(n));
        at_ += static_cast<std::size_t>(n);
        return s;
    }
    bool done() const { return at_ == b_.size(); }
    std::size_t remaining() const { return b_.size() - at_; }

private:
    void need(std::uint64_t n) const {
        require<FormatError>(n <= b_.size() - at_, "distributed round: the upload table from rank ", rank_,
                             " is truncated");
    }
    std::span<const std::byte> b_;
    std::size_t at_ = 0;
    int rank_;
};

/// One user's upload as every rank sees it after the table exchange (values arrive later, or never).
struct RemoteUpload {
    UserId user = 0;
    double weight = 1.0;
    bool sends_lora_A = true;
    std::string non_finite;  ///< the first tensor holding a NaN or Inf; empty when all values are finite
    int owner = 0;           ///< the rank holding it
    std::vector<SharedTensorInfo> tensors;  ///< sorted by name, offsets into the user's values
    Index size = 0;

    const SharedTensorInfo* find(const std::string& name) const {
        auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                                   [](const SharedTensorInfo& i, const std::string& n) { return i.name < n; });
        return it != tensors.end() && it->name == name ? &*it : nullptr;
    }
};

template <class T>
void encode_table(ByteWriter& w, const std::vector<const GeneralistUpload<T>*>& local) {
    w.put(static_cast<std::uint64_t>(local.size()));
    for (const auto* u : local) {
        w.put(static_cast<std::uint64_t>(u->user()));
        w.put(u->weight());
        w.put(static_cast<std::uint8_t>(u->sends_lora_A()));
        const SharedTensorInfo* bad = u->first_non_finite();
        w.put_string(bad != nullptr ? bad->name : std::string());
        w.put(static_cast<std::uint64_t>(u->tensors().size()));
        for (const auto& i : u->tensors()) {
            w.put_string(i.name);
            w.put(static_cast<std::int64_t>(i.rows));
            w.put(static_cast<std::int64_t>(i.cols));
            w.put(static_cast<std::int64_t>(i.rank));
            w.put(i.alpha);
            w.put(static_cast<std::uint8_t>(i.scaling));
            w.put(i.scale);
        }
    }
}

inline void decode_table(ByteReader& r, int owner, std::vector<RemoteUpload>& out) {
    const auto n = r.get<std::uint64_t>();
    for (std::uint64_t k = 0; k < n; ++k) {
        RemoteUpload u;
        u.owner = owner;
        u.user = static_cast<UserId>(r.get<std::uint64_t>());
        u.weight = r.get<double>();
        u.sends_lora_A = r.get<std::uint8_t>() != 0;
        u.non_finite = r.get_string();
        const auto m = r.get<std::uint64_t>();
        for (std::uint64_t t = 0; t < m; ++t) {
            SharedTensorInfo i;
            i.name = r.get_string();
            require<FormatError>(split_lora_name(i.name, i.pair, i.factor), "distributed round: rank ", owner,
                                 " user ", u.user, " sent tensor '", i.name, "', not a LoRA factor");
            i.rows = static_cast<Index>(r.get<std::int64_t>());
            i.cols = static_cast<Index>(r.get<std::int64_t>());
            i.rank = static_cast<Index>(r.get<std::int64_t>());
            i.alpha = r.get<double>();
            i.scaling = static_cast<LoraScaling>(r.get<std::uint8_t>());
            i.scale = r.get<double>();
            require<FormatError>(i.rows >= 1 && i.cols >= 1 && i.rows <= (Index(1) << 31) &&
                                     i.cols <= (Index(1) << 31),
                                 "distributed round: rank ", owner, " user ", u.user, " tensor '", i.name,
                                 "': shape [", i.rows, ", ", i.cols, "]");
            i.offset = u.size;
            u.size += i.size();
            u.tensors.push_back(std::move(i));
        }
        out.push_back(std::move(u));
    }
}

/// One upload as bytes (its table, then its values): what a rank sends when others need exactly it.
template <class T>
std::vector<std::byte> encode_upload(const GeneralistUpload<T>& u) {
    ByteWriter w;
    encode_table(w, std::vector<const GeneralistUpload<T>*>{&u});
    const auto v = std::as_bytes(u.values());
    w.bytes.insert(w.bytes.end(), v.begin(), v.end());
    return std::move(w.bytes);
}

/// The tensors and values of an encode_upload() message from rank `owner`, every tensor given `policy`.
template <class T>
SharedAggregate<T> decode_upload_as_aggregate(std::span<const std::byte> bytes, int owner, RankPolicy policy) {
    ByteReader r(bytes, owner);
    std::vector<RemoteUpload> one;
    decode_table(r, owner, one);
    require<FormatError>(one.size() == 1, "distributed round: rank ", owner, " sent ", one.size(),
                         " uploads, expected 1");
    const std::size_t n = static_cast<std::size_t>(one[0].size);
    const std::size_t header = bytes.size() - r.remaining();
    require<FormatError>(r.remaining() == n * sizeof(T), "distributed round: rank ", owner, " sent ",
                         r.remaining(), " value bytes for ", n, " values");
    std::vector<T> values(n);
    if (n > 0) std::memcpy(values.data(), bytes.data() + header, n * sizeof(T));
    for (auto& i : one[0].tensors) i.rank_policy = policy;
    return SharedAggregate<T>(std::move(one[0].tensors), std::span<const T>(values));
}

/// The checks of aggregate()'s preparation, on the exchanged tables (same errors, same wording).
inline void check_tables(const std::vector<RemoteUpload>& all, const AggregationConfig& cfg) {
    const char* rule = to_string(cfg.rule);
    for (std::size_t k = 1; k < all.size(); ++k)
        require(all[k - 1].user != all[k].user, "user ", all[k].user, ": two uploads with this user id");
    struct Seen {
        UserId user;
        const SharedTensorInfo* info;
    };
    std::map<std::string, Seen, std::less<>> first;
    for (const auto& u : all) {
        require(std::isfinite(u.weight) && u.weight > 0, "user ", u.user, " weight ", u.weight,
                ": must be finite and > 0");
        require(u.sends_lora_A || u.tensors.empty(), "user ", u.user,
                ": upload built without lora_A (FFA-LoRA), but rule ", rule, " needs both factors");
        for (const auto& i : u.tensors) {
            if (cfg.pairwise()) {
                const std::string other = i.pair + (i.factor == LoraFactor::A ? ".lora_B" : ".lora_A");
                require(u.find(other) != nullptr, "user ", u.user, " tensor '", other, "': missing, rule ", rule,
                        " needs both factors of '", i.pair, "'");
            }
            auto [it, fresh] = first.try_emplace(i.name, Seen{u.user, &i});
            if (fresh) continue;
            const SharedTensorInfo& f = *it->second.info;
            const UserId fu = it->second.user;
            require<ShapeError>(i.features() == f.features(), "user ", u.user, " tensor '", i.name, "': shape ",
                                shape_str(i), ", user ", fu, " has ", shape_str(f));
            if (!cfg.heterogeneous_ranks()) {
                require<ShapeError>(i.rank == f.rank, "user ", u.user, " tensor '", i.name, "': rank ", i.rank,
                                    ", user ", fu, " has rank ", f.rank, " (rule ", rule,
                                    " averages factors of equal rank; use hetlora, flexlora or stacking)");
                require(i.alpha == f.alpha && i.scaling == f.scaling, "user ", u.user, " tensor '", i.name,
                        "': alpha ", i.alpha, " ", to_string(i.scaling), " scaling, user ", fu, " has alpha ",
                        f.alpha, " ", to_string(f.scaling),
                        " (averaging factors needs one LoRA scale; use flexlora or stacking)");
            }
        }
    }
}

/// One output tensor: its holders (indices into the included users, ascending id), their infos, the
/// output info, and what multiplies each holder's values (c_h = w_h, or w_h sqrt(s_h / S) for hetlora
/// users of another scale). Rows/cols of a holder may be smaller than the output's (zero-padding).
struct OutputSlot {
    SharedTensorInfo out;
    std::vector<std::size_t> holders;
    std::vector<const SharedTensorInfo*> infos;
    std::vector<double> coeff;
    std::vector<double> weight;  // the holders' plain weights: W is their sum
    double W = 0.0;
    bool plus_zero = true;  // fedavg writes 0 + acc / W (its reference-free update form), hetlora acc / W
    std::vector<std::size_t> group_key;  // = holders; slots with the same key share a reduction
};

/// Plans every output tensor of the round as aggregate() would form it (fedavg: per tensor; hetlora:
/// per LoRA pair, padded to the largest holder rank), and fills the report's tensor records.
inline std::vector<OutputSlot> plan_outputs(const std::vector<const RemoteUpload*>& users,
                                            const std::vector<double>& base_weight, const AggregationConfig& cfg,
                                            AggregationReport& rep) {
    struct Slot {
        std::string name;
        std::vector<std::size_t> holders;
        std::vector<const SharedTensorInfo*> infos;
    };
    std::map<std::string, Slot, std::less<>> by_name;
    for (std::size_t k = 0; k < users.size(); ++k)
        for (const auto& i : users[k]->tensors) {
            auto& s = by_name[i.name];
            s.name = i.name;
            s.holders.push_back(k);
            s.infos.push_back(&i);
        }
    std::vector<Slot> slots;
    for (auto& [name, s] : by_name) {
        if (cfg.require_all_tensors && s.holders.size() != users.size())
            for (std::size_t k = 0, h = 0; k < users.size(); ++k) {
                if (h < s.holders.size() && s.holders[h] == k) {
                    ++h;
                    continue;
                }
                raise<InvalidArgument>("user ", users[k]->user, " tensor '", name,
                                       "': missing (require_all_tensors: every user must hold every shared tensor)");
            }
        slots.push_back(std::move(s));
    }

    std::vector<OutputSlot> outs;
    auto record = [&](const OutputSlot& o) {
        TensorAggregation ta;
        ta.name = o.out.name;
        ta.rank = o.out.rank;
        for (std::size_t k : o.holders) ta.users.push_back(users[k]->user);
        for (std::size_t k : o.holders) ta.weights.push_back(base_weight[k] / o.W);
        rep.tensors.push_back(std::move(ta));
    };
    if (cfg.rule == AggregationRule::fedavg) {
        for (auto& s : slots) {
            OutputSlot o;
            o.out = *s.infos[0];
            o.out.rank_policy = RankPolicy::exact;
            o.holders = s.holders;
            o.infos = s.infos;
            for (std::size_t k : s.holders) o.W += base_weight[k];
            for (std::size_t k : s.holders) o.weight.push_back(base_weight[k]);
            o.coeff = o.weight;
            o.group_key = o.holders;
            record(o);
            outs.push_back(std::move(o));
        }
        return outs;
    }
    // hetlora: A and B of a pair are neighbours in name order.
    for (std::size_t a = 0; a < slots.size(); ++a) {
        const auto& sa = slots[a];
        require(a + 1 < slots.size() && sa.infos[0]->factor == LoraFactor::A &&
                    slots[a + 1].infos[0]->factor == LoraFactor::B &&
                    slots[a + 1].infos[0]->pair == sa.infos[0]->pair,
                "tensor '", sa.name, "': its LoRA pair is incomplete");
        const auto& sb = slots[++a];
        require(sa.holders == sb.holders, "tensor '", sa.name, "': A and B held by different users");
        Index R = 0;
        std::size_t ref = 0;
        for (std::size_t h = 0; h < sa.holders.size(); ++h)
            if (sa.infos[h]->rank > R) {
                R = sa.infos[h]->rank;
                ref = h;
            }
        const double S = sa.infos[ref]->scale;
        for (const Slot* s : {&sa, &sb}) {
            OutputSlot o;
            o.out = *s->infos[ref];
            o.out.rank_policy = RankPolicy::truncate;
            o.plus_zero = false;
            o.holders = s->holders;
            o.infos = s->infos;
            for (std::size_t k : s->holders) o.W += base_weight[k];
            for (std::size_t k : s->holders) o.weight.push_back(base_weight[k]);
            for (std::size_t h = 0; h < s->holders.size(); ++h) {
                const double w = base_weight[s->holders[h]], sh = sa.infos[h]->scale;
                o.coeff.push_back(sh == S ? w : w * std::sqrt(sh / S));
            }
            o.group_key = o.holders;
            record(o);
            outs.push_back(std::move(o));
        }
    }
    return outs;
}

/// acc[out layout] += c * x[holder layout], zero-padding the rank dimension (x may have fewer rows of
/// A or fewer columns of B than the output).
template <class T>
void accumulate_padded(double* acc, const SharedTensorInfo& out, const T* x, const SharedTensorInfo& in, double c) {
    for (Index i = 0; i < in.rows; ++i)
        for (Index j = 0; j < in.cols; ++j) acc[i * out.cols + j] += c * static_cast<double>(x[i * in.cols + j]);
}

}  // namespace detail

/// Aggregates the uploads of all ranks' users over `comm`, one call per round on every rank (a
/// collective). Keeps the sub-communicators of Reduction::allreduce between rounds, so make one per
/// federation and reuse it. `comm` must outlive it.
template <class T>
class DistributedAggregator {
public:
    DistributedAggregator(Communicator& comm, AggregationConfig cfg, Reduction reduction = Reduction::fixed_order)
        : comm_(&comm), cfg_(cfg), reduction_(reduction) {
        cfg_.validate();
        require(cfg_.rule == AggregationRule::fedavg || cfg_.rule == AggregationRule::hetlora, "rule ",
                to_string(cfg_.rule), ": distributed rounds support fedavg and hetlora (aggregate the uploads ",
                "in one process for the other rules)");
        require(cfg_.weighting == Weighting::uniform || cfg_.weighting == Weighting::tokens, "weighting ",
                to_string(cfg_.weighting), ": distributed rounds weight uniformly or by tokens");
    }

    const AggregationConfig& config() const { return cfg_; }
    Reduction reduction() const { return reduction_; }
    /// Sub-communicators made so far (Reduction::allreduce; groups of all ranks use `comm` itself).
    std::size_t subcommunicators() const { return groups_.size(); }

    /// `local`: the uploads of this rank's users (may be empty). Returns the aggregate and the report of
    /// the whole round (every user of every rank). fixed_order: the aggregate holds every tensor, as
    /// aggregate() would; allreduce: the tensors held by this rank's included users.
    AggregationResult<T> operator()(const std::vector<GeneralistUpload<T>>& local) {
        std::vector<const GeneralistUpload<T>*> mine;
        for (const auto& u : local) mine.push_back(&u);
        std::sort(mine.begin(), mine.end(), [](const auto* a, const auto* b) { return a->user() < b->user(); });

        // 1. The tables: who holds what, with which weight, and whether it is finite.
        detail::ByteWriter w;
        detail::encode_table(w, mine);
        std::vector<std::byte> all_bytes;
        std::vector<std::size_t> sizes;
        comm_->allgather_bytes(w.bytes, all_bytes, sizes);
        std::vector<detail::RemoteUpload> all;
        std::size_t at = 0;
        for (int r = 0; r < comm_->size(); ++r) {
            const std::size_t n = sizes[static_cast<std::size_t>(r)];
            detail::ByteReader reader(std::span<const std::byte>(all_bytes.data() + at, n), r);
            detail::decode_table(reader, r, all);
            require<FormatError>(reader.done(), "distributed round: the upload table from rank ", r,
                                 " has trailing bytes");
            at += n;
        }
        require(!all.empty(), "uploads: none given");
        std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.user < b.user; });
        detail::check_tables(all, cfg_);

        // 2. Included users (ascending id) and the report's header, as aggregate() makes them.
        AggregationReport rep;
        rep.config = cfg_;
        std::vector<const detail::RemoteUpload*> users;
        std::vector<double> base_weight;
        for (const auto& u : all) {
            if (!u.non_finite.empty()) {
                rep.excluded.push_back({u.user, u.non_finite, "non-finite value (NaN or Inf)"});
                continue;
            }
            users.push_back(&u);
            base_weight.push_back(cfg_.weighting == Weighting::tokens ? u.weight : 1.0);
            rep.included.push_back(u.user);
            rep.upload_weights.push_back(u.weight);
        }
        require<NumericError>(!users.empty(), "aggregation: no upload left after excluding ", rep.excluded.size(),
                              " with non-finite values");
        auto outs = detail::plan_outputs(users, base_weight, cfg_, rep);

        // Included local uploads by user index.
        std::map<std::size_t, const GeneralistUpload<T>*> local_of;
        for (std::size_t k = 0, m = 0; k < users.size(); ++k)
            if (users[k]->owner == comm_->rank()) {
                while (m < mine.size() && mine[m]->user() != users[k]->user) ++m;
                require(m < mine.size(), "distributed round: user ", users[k]->user, " is listed for rank ",
                        comm_->rank(), " but not among its uploads");
                local_of[k] = mine[m];
            }

        std::vector<SharedTensorInfo> infos;
        std::vector<T> values;
        if (reduction_ == Reduction::fixed_order)
            reduce_fixed_order(users, local_of, outs, infos, values);
        else
            reduce_allreduce(users, local_of, outs, infos, values);
        return {SharedAggregate<T>(std::move(infos), std::span<const T>(values)), std::move(rep)};
    }

private:
    // Every included user's values to every rank, then aggregate()'s sums in ascending user id.
    void reduce_fixed_order(const std::vector<const detail::RemoteUpload*>& users,
                            const std::map<std::size_t, const GeneralistUpload<T>*>& local_of,
                            const std::vector<detail::OutputSlot>& outs, std::vector<SharedTensorInfo>& infos,
                            std::vector<T>& values) {
        std::vector<T> send;
        for (const auto& [k, u] : local_of) send.insert(send.end(), u->values().begin(), u->values().end());
        const auto per_rank = allgather<T>(*comm_, std::span<const T>(send));
        // Where each included user's values start: ranks send their users in ascending id order.
        std::vector<const T*> base(users.size(), nullptr);
        std::vector<std::size_t> cursor(per_rank.size(), 0);
        for (std::size_t k = 0; k < users.size(); ++k) {
            const auto r = static_cast<std::size_t>(users[k]->owner);
            require<FormatError>(cursor[r] + static_cast<std::size_t>(users[k]->size) <= per_rank[r].size(),
                                 "distributed round: rank ", r, " sent fewer values than its upload table lists");
            base[k] = per_rank[r].data() + cursor[r];
            cursor[r] += static_cast<std::size_t>(users[k]->size);
        }
        std::vector<double> acc;
        for (const auto& o : outs) {
            acc.assign(static_cast<std::size_t>(o.out.size()), 0.0);
            for (std::size_t h = 0; h < o.holders.size(); ++h)
                detail::accumulate_padded(acc.data(), o.out, base[o.holders[h]] + o.infos[h]->offset, *o.infos[h],
                                          o.coeff[h]);
            emit(o, acc, o.W, infos, values);
        }
    }

    // Per group of holders: one in-place sum of [sum_local c x ..., sum_local w] on the group's ranks.
    void reduce_allreduce(const std::vector<const detail::RemoteUpload*>& users,
                          const std::map<std::size_t, const GeneralistUpload<T>*>& local_of,
                          const std::vector<detail::OutputSlot>& outs, std::vector<SharedTensorInfo>& infos,
                          std::vector<T>& values) {
        std::map<std::vector<std::size_t>, std::vector<std::size_t>> groups;  // holders -> output slots
        for (std::size_t s = 0; s < outs.size(); ++s) groups[outs[s].group_key].push_back(s);
        std::vector<std::pair<std::size_t, std::vector<double>>> results;  // output slot -> sums
        for (const auto& [holders, slots] : groups) {  // same order on every rank: keys are global
            std::vector<int> members;
            for (std::size_t k : holders) members.push_back(users[k]->owner);
            std::sort(members.begin(), members.end());
            members.erase(std::unique(members.begin(), members.end()), members.end());
            Communicator* group = group_comm(members);
            if (group == nullptr) continue;  // none of this rank's users holds these tensors
            std::size_t total = 0;
            for (std::size_t s : slots) total += static_cast<std::size_t>(outs[s].out.size());
            std::vector<double> buf(total + 1, 0.0);
            std::size_t at = 0;
            for (std::size_t s : slots) {
                const auto& o = outs[s];
                for (std::size_t h = 0; h < o.holders.size(); ++h) {
                    auto it = local_of.find(o.holders[h]);
                    if (it == local_of.end()) continue;
                    const GeneralistUpload<T>& u = *it->second;
                    detail::accumulate_padded(buf.data() + at, o.out, u.span(o.infos[h]->name).data(), *o.infos[h],
                                              o.coeff[h]);
                }
                at += static_cast<std::size_t>(o.out.size());
            }
            const auto& first = outs[slots[0]];  // every slot of the group has the same holders
            for (std::size_t h = 0; h < holders.size(); ++h)
                if (local_of.count(holders[h])) buf[total] += first.weight[h];
            group->allreduce_sum(std::span<double>(buf));
            at = 0;
            for (std::size_t s : slots) {
                const auto n = static_cast<std::size_t>(outs[s].out.size());
                std::vector<double> part(buf.begin() + static_cast<std::ptrdiff_t>(at),
                                         buf.begin() + static_cast<std::ptrdiff_t>(at + n));
                part.push_back(buf[total]);
                results.emplace_back(s, std::move(part));
                at += n;
            }
        }
        std::sort(results.begin(), results.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
        for (auto& [s, part] : results) {
            const double W = part.back();
            part.pop_back();
            emit(outs[s], part, W, infos, values);
        }
    }

    // The communicator of the ranks `members` (ascending), nullptr when this rank is not one of them.
    // Every rank calls this for every group in the same order, so the splits match.
    Communicator* group_comm(const std::vector<int>& members) {
        const bool in = std::binary_search(members.begin(), members.end(), comm_->rank());
        if (static_cast<int>(members.size()) == comm_->size()) return comm_;
        auto it = groups_.find(members);
        if (it == groups_.end()) {
            auto sub = comm_->split(in ? 0 : -1, comm_->rank());
            it = groups_.emplace(members, std::move(sub)).first;
        }
        return in ? it->second.get() : nullptr;
    }

    // The exact final operations of aggregate(): T(0 + acc / W) for fedavg, T(acc / W) for hetlora.
    static void emit(const detail::OutputSlot& o, const std::vector<double>& acc, double W,
                     std::vector<SharedTensorInfo>& infos, std::vector<T>& values) {
        infos.push_back(o.out);
        if (o.plus_zero)
            for (double a : acc) values.push_back(static_cast<T>(0.0 + a / W));
        else
            for (double a : acc) values.push_back(static_cast<T>(a / W));
    }

    Communicator* comm_;
    AggregationConfig cfg_;
    Reduction reduction_;
    std::map<std::vector<int>, std::unique_ptr<Communicator>> groups_;
};

/// One distributed round with a fresh aggregator (see DistributedAggregator).
template <class T>
AggregationResult<T> aggregate_distributed(Communicator& comm, const std::vector<GeneralistUpload<T>>& local,
                                           const AggregationConfig& cfg, Reduction reduction = Reduction::fixed_order) {
    DistributedAggregator<T> agg(comm, cfg, reduction);
    return agg(local);
}

}  // namespace comigs
