#pragma once
// Heap accounting of comigs-bench (bench_memory.cpp replaces the global operator new/delete).
namespace comigs::bench {
long long heap_current();
long long heap_peak();
void heap_reset_peak();
}  // namespace comigs::bench
