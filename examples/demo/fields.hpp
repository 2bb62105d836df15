#pragma once
// The demo's results as serialisable objects: each result struct lists its fields once, in a
// `fields(self, f)` function beside it (report.hpp), calling f(key, member) for every member. From that
// one list come results.json (to_json_fields), the bytes the MPI ranks exchange (placement.hpp) and the
// accounting a run checkpoint keeps (resume.hpp): a field added to the list is reported, gathered and
// checkpointed, with nothing else to change.
//
// Members may be bool, integers, double, std::string, std::optional of a number, std::vector of those, or
// structs with their own fields(). Bytes are exact (a double travels as its 8 bytes).
#include <comigs/distributed.hpp>

#include <concepts>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

namespace comigs::demo {

namespace fields_detail {
template <class V>
struct is_vector : std::false_type {};
template <class V>
struct is_vector<std::vector<V>> : std::true_type {};
template <class V>
struct is_optional : std::false_type {};
template <class V>
struct is_optional<std::optional<V>> : std::true_type {};

struct NoOp {
    template <class V>
    void operator()(const char*, V&) const {}
};
}  // namespace fields_detail

/// A struct with a field list.
template <class S>
concept HasFields = requires(S& s) { fields(s, fields_detail::NoOp{}); };

template <class V>
nlohmann::json to_json_fields(const V& v);

/// One member as JSON (std::nullopt and non-finite numbers become null, as nlohmann writes them).
template <class V>
nlohmann::json member_json(const V& v) {
    if constexpr (HasFields<const V>) {
        return to_json_fields(v);
    } else if constexpr (fields_detail::is_vector<V>::value) {
        nlohmann::json a = nlohmann::json::array();
        for (const auto& x : v) a.push_back(member_json<typename V::value_type>(x));
        return a;
    } else if constexpr (fields_detail::is_optional<V>::value) {
        return v ? nlohmann::json(*v) : nlohmann::json();
    } else {
        return nlohmann::json(v);
    }
}

/// A struct as a JSON object, one key per field.
template <class V>
nlohmann::json to_json_fields(const V& v) {
    nlohmann::json j = nlohmann::json::object();
    fields(v, [&j](const char* key, const auto& m) { j[key] = member_json(m); });
    return j;
}

/// Appends a struct's fields to `w` (exact bytes).
template <class V>
void put_fields(comigs::detail::ByteWriter& w, const V& v);

template <class V>
void put_member(comigs::detail::ByteWriter& w, const V& v) {
    if constexpr (HasFields<const V>) {
        put_fields(w, v);
    } else if constexpr (fields_detail::is_vector<V>::value) {
        w.put(static_cast<std::uint64_t>(v.size()));
        for (const auto& x : v) put_member<typename V::value_type>(w, x);
    } else if constexpr (fields_detail::is_optional<V>::value) {
        static_assert(std::is_arithmetic_v<typename V::value_type>, "an optional field must hold a number");
        w.put(static_cast<std::uint8_t>(v.has_value()));
        w.put(v.value_or(typename V::value_type{}));
    } else if constexpr (std::same_as<V, std::string>) {
        w.put_string(v);
    } else if constexpr (std::same_as<V, bool>) {
        w.put(static_cast<std::uint8_t>(v));
    } else {
        static_assert(std::is_arithmetic_v<V>, "a field must be a number, string, optional number, vector or struct");
        w.put(v);
    }
}

template <class V>
void put_fields(comigs::detail::ByteWriter& w, const V& v) {
    fields(v, [&w](const char*, const auto& m) { put_member(w, m); });
}

/// Reads back what put_fields() wrote (FormatError when the bytes run out).
template <class V>
void get_fields(comigs::detail::ByteReader& r, V& v);

template <class V>
void get_member(comigs::detail::ByteReader& r, V& v) {
    if constexpr (HasFields<V>) {
        get_fields(r, v);
    } else if constexpr (fields_detail::is_vector<V>::value) {
        const auto n = r.get<std::uint64_t>();
        require<FormatError>(n <= r.remaining(), "demo results: a list of ", n, " items in ", r.remaining(), " bytes");
        v.clear();
        for (std::uint64_t k = 0; k < n; ++k) {
            typename V::value_type x{};
            get_member(r, x);
            v.push_back(std::move(x));
        }
    } else if constexpr (fields_detail::is_optional<V>::value) {
        const bool has = r.get<std::uint8_t>() != 0;
        const auto x = r.get<typename V::value_type>();
        v = has ? V(x) : std::nullopt;
    } else if constexpr (std::same_as<V, std::string>) {
        v = r.get_string();
    } else if constexpr (std::same_as<V, bool>) {
        v = r.get<std::uint8_t>() != 0;
    } else {
        v = r.get<V>();
    }
}

template <class V>
void get_fields(comigs::detail::ByteReader& r, V& v) {
    fields(v, [&r](const char*, auto& m) { get_member(r, m); });
}

}  // namespace comigs::demo
