// The tuning knobs of the CUDA launchers (plain C++: no CUDA API, so that
// csrc/module.cpp can reach them in every build). docs/CUDA.md documents each
// variable: what it does, its default and its range.
//
// The environment is read once per process, at the first launch that asks
// (a function-local static): a knob set later has no effect. Tests switch
// paths in one process with set_tuning (kdext._C._set_cuda_tuning).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kdext {
namespace cuda {

struct Tuning {
  bool onchip = true;  // KDEXT_CUDA_ONCHIP: the on-chip (fused, cluster) divergence kernel may be used
  int cluster = 0;     // KDEXT_CUDA_CLUSTER: 0 = chosen per shape, else the forced cluster size
  int chunks = 0;      // KDEXT_CUDA_CHUNKS: 0 = chosen per shape, else the forced chunks per row
};

// The forced values each knob accepts (0: not forced).
constexpr int kMaxForcedChunks = 4096;
constexpr int kMaxClusterSize = 16;  // 16 is non-portable: only where the device allows it

inline bool valid_cluster(int c) { return c >= 0 && c <= kMaxClusterSize && (c & (c - 1)) == 0; }
inline bool valid_chunks(int n) { return n >= 0 && n <= kMaxForcedChunks; }

namespace detail {

inline void warn_ignored(const char* name, const char* value, const char* expected) {
  std::fprintf(stderr, "kdext: ignoring %s=%s (expected %s)\n", name, value, expected);
}

// Unset or empty: 0 (not forced). Otherwise an integer in [lo, hi] for which
// `ok` holds; anything else is ignored (with a warning), as if unset.
inline int env_int(const char* name, int lo, int hi, bool (*ok)(int), const char* expected) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < lo || x > hi || !ok(static_cast<int>(x))) {
    warn_ignored(name, v, expected);
    return 0;
  }
  return static_cast<int>(x);
}

inline bool env_switch(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  if (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0) return false;
  if (std::strcmp(v, "1") == 0 || std::strcmp(v, "on") == 0) return true;
  warn_ignored(name, v, "0, off, 1 or on");
  return fallback;
}

inline Tuning tuning_from_env() {
  Tuning t;
  t.onchip = env_switch("KDEXT_CUDA_ONCHIP", true);
  t.cluster = env_int("KDEXT_CUDA_CLUSTER", 0, kMaxClusterSize, valid_cluster, "0, 1, 2, 4, 8 or 16");
  t.chunks = env_int("KDEXT_CUDA_CHUNKS", 0, kMaxForcedChunks, valid_chunks, "an integer in [0, 4096]");
  return t;
}

inline Tuning& tuning_slot() {
  static Tuning t = tuning_from_env();
  return t;
}

}  // namespace detail

// The knobs in force (read from the environment on the first call).
inline const Tuning& tuning() { return detail::tuning_slot(); }

// Replaces the knobs in force, for tests (the caller checks valid_cluster and
// valid_chunks). Not synchronised with launches on other host threads: call it
// while no kdext CUDA op is being launched.
inline void set_tuning(const Tuning& t) { detail::tuning_slot() = t; }

}  // namespace cuda
}  // namespace kdext
