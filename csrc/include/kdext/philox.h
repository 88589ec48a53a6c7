// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), framework-free and usable on the host and in CUDA device code.
//
// A counter-based generator: the output is a pure function of a 64-bit key
// (the seed) and a 128-bit counter, so any thread can draw its numbers without
// shared state, and a number depends only on where it is in the stream.
//
// kdext's stream mapping (the same on CPU and CUDA):
//   key     = seed (low word, high word)
//   counter = (offset low, offset high, subsequence low, subsequence high)
// where a sampling op uses subsequence = row index and offset = the counter
// block it was handed. This is the mapping of PyTorch's at::Philox4_32(seed,
// subsequence, offset) and of curand_init(seed, subsequence, 4 * offset): the
// first word of philox4x32_10(counter, key) equals the first number either of
// them returns. PyTorch's CUDA generators keep their offset in 32-bit words
// (always a multiple of 4), so a generator offset g corresponds to the counter
// block g / 4 here.
#pragma once

#include <cstdint>

#include "kdext/math.h"

namespace kdext {

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

KDEXT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

KDEXT_HD Philox4x32 philox_round(Philox4x32 c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo(kM0, c.v[0], &hi0);
  const uint32_t lo1 = mulhilo(kM1, c.v[2], &hi1);
  return {{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
}

}  // namespace philox_detail

// The ten-round Philox4x32 bijection of `counter` under `key`.
KDEXT_HD Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  Philox4x32 c = counter;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 9; ++i) {
    c = philox_detail::philox_round(c, key0, key1);
    key0 += philox_detail::kW0;
    key1 += philox_detail::kW1;
  }
  return philox_detail::philox_round(c, key0, key1);
}

// The four words at (seed, subsequence, offset) in kdext's stream mapping.
KDEXT_HD Philox4x32 philox_block(uint64_t seed, uint64_t subsequence, uint64_t offset) {
  const Philox4x32 counter = {{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                               static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)}};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A float uniform in the open interval (0, 1): the top 23 bits b of `word`
// give (2b + 1) / 2^24, an odd multiple of 2^-24 (spacing 2^-23).
// Every such value is exact in float32, the smallest is 2^-24 and the largest
// 1 - 2^-24, so neither 0 nor 1 can come out and the values are symmetric
// about 1/2.
KDEXT_HD float uniform_open01(uint32_t word) {
  return static_cast<float>(((word >> 9) << 1) | 1u) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace kdext
