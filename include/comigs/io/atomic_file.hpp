#pragma once
// Crash-safe file replacement. A save writes a temporary file in the target's directory, flushes it to
// disk, renames it over the target and flushes the directory entry. rename() is atomic on POSIX file
// systems, so a reader (or a process restarted after a crash or power cut) sees either the complete
// previous file or the complete new one, never a mixture. After a hard crash a stale temporary named
// ".<target name>.tmp.<...>" (a long name cut short) may remain beside the target; it is never read
// and can be deleted.
//
// POSIX only (Linux, macOS, BSDs).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <span>
#include <string>

#include "../detail/posix_file.hpp"
#include "../error.hpp"

namespace comigs::io {

namespace testing {
/// Test-only fault injection into atomic_write_file (process-wide; not for concurrent use). When
/// `crash_after_bytes` is below the size being written, the writer writes exactly that many bytes of the
/// temporary file and then "crashes": it calls `on_crash` if set (a test in a forked child calls _Exit()
/// there to model a real crash that leaves the half-written temporary behind), otherwise it throws
/// IoError, which takes the ordinary failure path (temporary removed, target untouched).
struct AtomicWriteFault {
    std::uint64_t crash_after_bytes = std::numeric_limits<std::uint64_t>::max();
    void (*on_crash)() = nullptr;
};

inline AtomicWriteFault& atomic_write_fault() noexcept {
    static AtomicWriteFault fault;
    return fault;
}

/// Sets the fault for the lifetime of this object and restores the previous setting afterwards.
class ScopedAtomicWriteFault {
public:
    explicit ScopedAtomicWriteFault(AtomicWriteFault fault) : saved_(atomic_write_fault()) {
        atomic_write_fault() = fault;
    }
    ~ScopedAtomicWriteFault() { atomic_write_fault() = saved_; }
    ScopedAtomicWriteFault(const ScopedAtomicWriteFault&) = delete;
    ScopedAtomicWriteFault& operator=(const ScopedAtomicWriteFault&) = delete;

private:
    AtomicWriteFault saved_;
};
}  // namespace testing

/// The sink that the callback of atomic_write_file() appends to (the temporary file).
class AtomicFileWriter {
public:
    /// Appends `bytes`; throws IoError naming the temporary file on failure.
    void write(std::span<const std::byte> bytes) {
        const testing::AtomicWriteFault& fault = testing::atomic_write_fault();
        if (written_ + bytes.size() > fault.crash_after_bytes) {
            const std::uint64_t keep = fault.crash_after_bytes > written_ ? fault.crash_after_bytes - written_ : 0;
            detail::write_all(fd_, bytes.data(), static_cast<std::size_t>(keep), temp_);
            written_ += keep;
            if (fault.on_crash != nullptr) fault.on_crash();
            detail::raise<IoError>("simulated crash after writing ", written_, " bytes of '", temp_.string(), "'");
        }
        detail::write_all(fd_, bytes.data(), bytes.size(), temp_);
        written_ += bytes.size();
    }
    std::uint64_t bytes_written() const noexcept { return written_; }
    const std::filesystem::path& temp_path() const noexcept { return temp_; }

private:
    AtomicFileWriter(int fd, std::filesystem::path temp) : fd_(fd), temp_(std::move(temp)) {}
    friend void atomic_write_file(const std::filesystem::path&, const std::function<void(AtomicFileWriter&)>&);

    int fd_;
    std::filesystem::path temp_;
    std::uint64_t written_ = 0;
};

}  // namespace comigs::io

namespace comigs::detail {
inline void fsync_or_throw(int fd, const std::filesystem::path& path, const char* what) {
    int rc;
    do {
        rc = ::fsync(fd);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
        const int err = errno;
        detail::raise<IoError>("cannot fsync ", what, " '", path.string(), "': ", detail::errno_text(err));
    }
}

/// Flushes a directory's entries (a rename or a new file in it) to disk. Some file systems cannot fsync
/// a directory (EINVAL, EROFS): the entry is then as durable as that file system makes it, which is not
/// an error of ours. `context` starts the error message, e.g. "wrote 'x' but".
inline void fsync_directory(const std::filesystem::path& dir, const char* context = "") {
    int dfd;
    do {
        dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (dfd < 0 && errno == EINTR);
    if (dfd < 0) {
        const int err = errno;
        detail::raise<IoError>(context, *context ? " " : "", "cannot open the directory '", dir.string(),
                               "' to fsync it: ", detail::errno_text(err));
    }
    detail::UniqueFd dir_fd(dfd);
    if (::fsync(dir_fd.get()) != 0 && errno != EINVAL && errno != EROFS) {
        const int err = errno;
        detail::raise<IoError>(context, *context ? " " : "", "cannot fsync the directory '", dir.string(),
                               "': ", detail::errno_text(err));
    }
}

/// Creates a new file with a name no one else uses, beside the target: the pid, a process-wide counter
/// and the clock make clashes unlikely, O_EXCL makes them harmless. The target's name is cut so that
/// the temporary's stays within NAME_MAX (255 bytes on Linux file systems) for any target name.
inline detail::UniqueFd create_unique_temp(const std::filesystem::path& dir, const std::string& stem,
                                           std::filesystem::path& temp_out) {
    static std::atomic<std::uint64_t> counter{0};
    constexpr std::size_t name_max = 255;
    const auto clock = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    for (int attempt = 0; attempt < 100; ++attempt) {
        const std::uint64_t tag = clock ^ (counter.fetch_add(1) * 0x9E3779B97F4A7C15ull);
        char hex[17];
        for (int i = 0; i < 16; ++i) hex[i] = "0123456789abcdef"[(tag >> (60 - 4 * i)) & 0xF];
        hex[16] = '\0';
        const std::string suffix = ".tmp." + std::to_string(::getpid()) + "." + hex;
        temp_out = dir / ("." + stem.substr(0, name_max - 1 - suffix.size()) + suffix);
        int fd;
        do {
            fd = ::open(temp_out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        } while (fd < 0 && errno == EINTR);
        if (fd >= 0) return detail::UniqueFd(fd);
        const int err = errno;
        if (err != EEXIST)
            detail::raise<IoError>("cannot create temporary file '", temp_out.string(), "': ", detail::errno_text(err));
    }
    detail::raise<IoError>("cannot create a temporary file in '", dir.string(), "': every name tried exists");
}
}  // namespace comigs::detail

namespace comigs::io {

/// Atomically replaces (or creates) `target` with the bytes that `fill` appends to the writer it is given.
/// Steps: unique temporary in the same directory (so rename stays within one file system), `fill`,
/// fsync, close, rename over `target`, fsync of the directory. If `fill` or any step before the rename
/// fails, the temporary is removed, `target` is left as it was, and the exception propagates (system call
/// failures are IoError naming the path and the reason). An existing target's permission bits are kept.
/// A symlink at `target` is replaced by the new file, not followed.
inline void atomic_write_file(const std::filesystem::path& target, const std::function<void(AtomicFileWriter&)>& fill) {
    require(!target.empty() && target.has_filename(), "atomic write target '", target.string(), "': must name a file");
    const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
    std::filesystem::path temp;
    detail::UniqueFd fd = detail::create_unique_temp(dir, target.filename().string(), temp);
    bool temp_exists = true;
    try {
        struct stat st {};  // lstat: a symlink is replaced, so the file it points to lends nothing
        if (::lstat(target.c_str(), &st) == 0 && S_ISREG(st.st_mode))
            (void)::fchmod(fd.get(), st.st_mode & 07777);  // best effort: the content matters more

        AtomicFileWriter writer(fd.get(), temp);
        fill(writer);
        detail::fsync_or_throw(fd.get(), temp, "temporary file");
        if (const int err = fd.close(); err != 0)
            detail::raise<IoError>("cannot close temporary file '", temp.string(), "': ", detail::errno_text(err));
        if (::rename(temp.c_str(), target.c_str()) != 0) {
            const int err = errno;
            detail::raise<IoError>("cannot rename '", temp.string(), "' to '", target.string(),
                                   "': ", detail::errno_text(err));
        }
        temp_exists = false;
    } catch (...) {
        fd.reset();
        if (temp_exists) ::unlink(temp.c_str());
        throw;
    }

    // The rename is done; make it durable.
    detail::fsync_directory(dir, ("wrote '" + target.string() + "' but").c_str());
}

/// Atomically replaces (or creates) `target` with `bytes`; see the overload taking a callback.
inline void atomic_write_file(const std::filesystem::path& target, std::span<const std::byte> bytes) {
    atomic_write_file(target, [bytes](AtomicFileWriter& out) { out.write(bytes); });
}

}  // namespace comigs::io
