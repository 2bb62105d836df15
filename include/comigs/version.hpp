#pragma once
// The single place the version is defined; CMakeLists.txt parses these lines.
#define COMIGS_VERSION_MAJOR 0
#define COMIGS_VERSION_MINOR 1
#define COMIGS_VERSION_PATCH 0

namespace comigs {
inline constexpr int version_major = COMIGS_VERSION_MAJOR;
inline constexpr int version_minor = COMIGS_VERSION_MINOR;
inline constexpr int version_patch = COMIGS_VERSION_PATCH;
}  // namespace comigs
