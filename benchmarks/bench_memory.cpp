// Counts the bytes the benchmark binary holds on the heap (global operator new/delete replaced), so
// that memory/* cases can report the peak bytes of one layer: frozen base, parameters, gradients and
// the buffers kept between forward and backward.
#include <malloc.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

#include "bench_memory.hpp"

namespace {
std::atomic<long long> g_current{0}, g_peak{0};

void note_alloc(void* p) {
    if (!p) return;
    const long long now = g_current.fetch_add(static_cast<long long>(malloc_usable_size(p))) +
                          static_cast<long long>(malloc_usable_size(p));
    long long peak = g_peak.load();
    while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
    }
}
void note_free(void* p) {
    if (p) g_current.fetch_sub(static_cast<long long>(malloc_usable_size(p)));
}
void* alloc(std::size_t n, std::size_t align) {
    void* p = nullptr;
    if (align <= alignof(std::max_align_t))
        p = std::malloc(n ? n : 1);
    else if (posix_memalign(&p, align, n ? n : 1) != 0)
        p = nullptr;
    if (!p) throw std::bad_alloc();
    note_alloc(p);
    return p;
}
void release(void* p) {
    note_free(p);
    std::free(p);
}
}  // namespace

namespace comigs::bench {
long long heap_current() { return g_current.load(); }
long long heap_peak() { return g_peak.load(); }
void heap_reset_peak() { g_peak.store(g_current.load()); }
}  // namespace comigs::bench

void* operator new(std::size_t n) { return alloc(n, 0); }
void* operator new[](std::size_t n) { return alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return alloc(n, static_cast<std::size_t>(a)); }
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }
