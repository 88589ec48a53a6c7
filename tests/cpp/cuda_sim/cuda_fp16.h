// Simulator stand-in (see cuda_sim.h): __half as raw bits, converted exactly.
#pragma once
#include <cmath>
#include <cstdint>
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
