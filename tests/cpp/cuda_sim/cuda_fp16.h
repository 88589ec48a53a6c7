// Simulator stand-in (see cuda_sim.h): __half as raw bits, converted exactly
// (to float) and with round-to-nearest-even (from float), as on the device.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  const uint32_t sign = (h.bits >> 15) & 1, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}
inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00)};  // NaN
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00)};  // rounds to inf (or is inf)
  if (ax < 0x38800000u) {  // a half subnormal (or zero): units of 2^-24, scaled exactly
    float a;
    std::memcpy(&a, &ax, 4);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24))))};
  }
  uint32_t h = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent, as it should
  return {static_cast<uint16_t>(sign | h)};
}
