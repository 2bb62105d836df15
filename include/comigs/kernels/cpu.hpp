#pragma once
// Runtime CPU feature checks (cpuid), so that a binary built for one x86-64 machine takes the bf16
// paths only where the hardware has them.
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace comigs::kernels {

struct CpuFeatures {
    bool avx512f = false;
    bool avx512_bf16 = false;  ///< vdpbf16ps / vcvtne2ps2bf16
    bool amx_bf16 = false;     ///< AMX tiles with bf16 dot products
};

inline CpuFeatures detect_cpu() {
    CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx512f = (b >> 16) & 1u;
        f.amx_bf16 = (d >> 22) & 1u;
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1u;
#endif
    return f;
}

/// The features of this machine, detected once.
inline const CpuFeatures& cpu() {
    static const CpuFeatures f = detect_cpu();
    return f;
}

}  // namespace comigs::kernels
