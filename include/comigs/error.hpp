#pragma once
// One exception hierarchy for the whole library. Every message names the parameter and the bad value,
// e.g. "rank 0: LoRA rank must be >= 1".
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace comigs {

/// Base of every exception comigs throws.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A configuration or argument value is out of range (rank 0, top-k > experts, non-finite scaling...).
class InvalidArgument : public Error {
public:
    using Error::Error;
};

/// Tensor shapes or buffer sizes do not agree.
class ShapeError : public InvalidArgument {
public:
    using InvalidArgument::InvalidArgument;
};

/// A file is malformed (safetensors header, offsets, dtype, metadata...).
class FormatError : public Error {
public:
    using Error::Error;
};

/// The operating system refused a file operation.
class IoError : public Error {
public:
    using Error::Error;
};

/// A computation produced or met non-finite values where that is not allowed.
class NumericError : public Error {
public:
    using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
    std::ostringstream os;
    os.precision(17);
    (os << ... << std::forward<Args>(args));
    return os.str();
}

template <class Exception, class... Args>
[[noreturn]] void raise(Args&&... args) {
    throw Exception(concat(std::forward<Args>(args)...));
}
}  // namespace detail

/// Throws `Exception` with the concatenated message when `cond` is false.
template <class Exception = InvalidArgument, class... Args>
inline void require(bool cond, Args&&... args) {
    if (!cond) detail::raise<Exception>(std::forward<Args>(args)...);
}

}  // namespace comigs
