#pragma once
// A read-only memory mapping of a whole file. Model files (safetensors, GGUF) are mapped rather than
// read so that a 1 GB base is held once, by the page cache, and only the pages a run touches are read.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include "../detail/posix_file.hpp"
#include "../error.hpp"

namespace comigs::io {

/// The bytes of a file, mapped read-only and private (the file may not change under a reader that
/// trusts what it validated: writers replace files by rename, so a mapping keeps the old inode).
/// Move-only; an empty file maps to an empty span. Errors: IoError naming the path and the reason.
class MappedFile {
public:
    MappedFile() = default;

    static MappedFile open(const std::filesystem::path& path) {
        detail::UniqueFd fd = detail::open_for_reading(path);
        const std::uint64_t size = detail::file_size(fd.get(), path);
        MappedFile m;
        m.path_ = path;
        if (size == 0) return m;
        if (size > static_cast<std::uint64_t>(SIZE_MAX))
            detail::raise<IoError>("cannot map '", path.string(), "': ", size, " bytes exceed the address space");
        void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, fd.get(), 0);
        if (p == MAP_FAILED) {
            const int err = errno;
            detail::raise<IoError>("cannot map '", path.string(), "' (", size, " bytes): ", detail::errno_text(err));
        }
        m.data_ = static_cast<const std::byte*>(p);
        m.size_ = static_cast<std::size_t>(size);
        return m;  // the descriptor closes here; the mapping stays valid
    }

    MappedFile(MappedFile&& o) noexcept
        : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), path_(std::move(o.path_)) {}
    MappedFile& operator=(MappedFile&& o) noexcept {
        if (this != &o) {
            unmap();
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
            path_ = std::move(o.path_);
        }
        return *this;
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile() { unmap(); }

    std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
    std::size_t size() const noexcept { return size_; }
    const std::filesystem::path& path() const noexcept { return path_; }

    /// Tells the kernel a range will be read soon (or, with `sequential`, front to back); a hint only.
    void advise(std::size_t offset, std::size_t length, bool sequential = false) const noexcept {
        if (!data_ || offset >= size_) return;
        const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
        const std::size_t begin = offset / page * page;
        const std::size_t end = length > size_ - offset ? size_ : offset + length;
        ::madvise(const_cast<std::byte*>(data_) + begin, end - begin, sequential ? MADV_SEQUENTIAL : MADV_WILLNEED);
    }

    /// Drops the resident pages that lie wholly inside [offset, offset + length) (MADV_DONTNEED): a
    /// range that was read once (copied, transposed, quantized) and will not be read again stops counting
    /// towards the process's memory. The mapping is private and read-only, so reading the range again
    /// is still correct: the pages come back from the file.
    void release(std::size_t offset, std::size_t length) const noexcept {
        if (!data_ || offset >= size_) return;
        const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
        const auto base = reinterpret_cast<std::uintptr_t>(data_);  // page-aligned (mmap)
        const std::size_t end = length > size_ - offset ? size_ : offset + length;
        const std::size_t first = (base + offset + page - 1) / page * page - base, last = (base + end) / page * page - base;
        if (first < last) ::madvise(const_cast<std::byte*>(data_) + first, last - first, MADV_DONTNEED);
    }

private:
    void unmap() noexcept {
        if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
        data_ = nullptr;
        size_ = 0;
    }

    const std::byte* data_ = nullptr;
    std::size_t size_ = 0;
    std::filesystem::path path_;
};

}  // namespace comigs::io
