#pragma once
// Thin POSIX file helpers that turn every failed system call into an IoError naming the path and the
// operating system's reason. POSIX calls (not iostreams) because atomic replacement needs fsync on both
// the file and its directory, and iostreams cannot report why an operation failed.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>

#include "../error.hpp"

namespace comigs::detail {

/// The operating system's text for an errno value (thread-safe, unlike strerror).
inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

/// Owns a file descriptor; closes it (ignoring errors) on destruction. Use close() to see errors.
class UniqueFd {
public:
    UniqueFd() = default;
    explicit UniqueFd(int fd) noexcept : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    ~UniqueFd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    void reset() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }
    /// Closes and returns 0, or the errno of a failed close (which can report deferred write errors).
    int close() noexcept {
        if (fd_ < 0) return 0;
        const int rc = ::close(std::exchange(fd_, -1));
        return rc == 0 ? 0 : errno;
    }

private:
    int fd_ = -1;
};

/// Opens `path` read-only or throws IoError.
inline UniqueFd open_for_reading(const std::filesystem::path& path) {
    int fd;
    do {
        fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        const int err = errno;
        raise<IoError>("cannot open '", path.string(), "' for reading: ", errno_text(err));
    }
    return UniqueFd(fd);
}

/// Size in bytes of an open regular file, or throws IoError.
inline std::uint64_t file_size(int fd, const std::filesystem::path& path) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        raise<IoError>("cannot stat '", path.string(), "': ", errno_text(err));
    }
    if (S_ISDIR(st.st_mode)) raise<IoError>("cannot read '", path.string(), "': it is a directory");
    return static_cast<std::uint64_t>(st.st_size);
}

/// Reads exactly `n` bytes at `offset`; running out of file is an IoError (the file shrank under us).
inline void read_exact(int fd, std::uint64_t offset, std::byte* dst, std::size_t n, const std::filesystem::path& path) {
    while (n > 0) {
        const std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
        const ssize_t got = ::pread(fd, dst, chunk, static_cast<off_t>(offset));
        if (got < 0) {
            if (errno == EINTR) continue;
            const int err = errno;
            raise<IoError>("cannot read '", path.string(), "' at byte ", offset, ": ", errno_text(err));
        }
        if (got == 0) raise<IoError>("cannot read '", path.string(), "': unexpected end of file at byte ", offset);
        dst += got;
        n -= static_cast<std::size_t>(got);
        offset += static_cast<std::uint64_t>(got);
    }
}

/// Writes all `n` bytes or throws IoError (ENOSPC, EIO...).
inline void write_all(int fd, const std::byte* src, std::size_t n, const std::filesystem::path& path) {
    while (n > 0) {
        const std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
        const ssize_t put = ::write(fd, src, chunk);
        if (put < 0) {
            if (errno == EINTR) continue;
            const int err = errno;
            raise<IoError>("cannot write '", path.string(), "': ", errno_text(err));
        }
        src += put;
        n -= static_cast<std::size_t>(put);
    }
}

}  // namespace comigs::detail
