// Framework-free scalar math shared by the CPU and CUDA kernels.
//
// Every per-element formula in kdext is written once, as a template over a
// "lane" type V, and reaches its arithmetic through MathOps<V>. This header
// defines the scalar lanes (float, double) used by CUDA threads and by scalar
// CPU code; csrc/cpu/vec.h specialises MathOps for at::vec::Vectorized, so the
// CPU kernels evaluate the very same formulas a whole vector of lanes at a time.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDEXT_HD __host__ __device__ __forceinline__
#else
#define KDEXT_HD inline
#endif

namespace kdext {

template <typename V>
struct MathOps;

template <typename S>
struct ScalarMathOps {
  using Mask = bool;
  static KDEXT_HD S splat(S x) { return x; }
  static KDEXT_HD S exp(S x) { return ::exp(x); }
  static KDEXT_HD S log(S x) { return ::log(x); }
  static KDEXT_HD S log1p(S x) { return ::log1p(x); }
  static KDEXT_HD S abs(S x) { return x < S(0) ? -x : x; }
  static KDEXT_HD bool isnan(S x) { return x != x; }
  // IEEE maximum: NaN in either argument gives NaN, so a NaN logit poisons its
  // row's running max (and from there the row's value) instead of vanishing.
  static KDEXT_HD S maximum(S a, S b) { return (a != a || a > b) ? a : b; }
  static KDEXT_HD bool gt(S a, S b) { return a > b; }
  static KDEXT_HD bool lt(S a, S b) { return a < b; }
  static KDEXT_HD bool any(bool m) { return m; }  // any lane of a mask (one lane here)
  static KDEXT_HD S select(bool m, S a, S b) { return m ? a : b; }
};

template <>
struct MathOps<float> : ScalarMathOps<float> {
  static KDEXT_HD float exp(float x) { return ::expf(x); }
  static KDEXT_HD float log(float x) { return ::logf(x); }
  static KDEXT_HD float log1p(float x) { return ::log1pf(x); }
};

template <>
struct MathOps<double> : ScalarMathOps<double> {};

// log(e^a + e^b) without overflow; -inf when both are -inf.
template <typename V, typename M = MathOps<V>>
KDEXT_HD V log_add_exp(V a, V b) {
  V hi = M::maximum(a, b);
  V diff = M::abs(a - b);
  // Both -inf makes diff NaN; the sum is then exactly -inf.
  V tail = M::log1p(M::exp(-diff));
  // (A NaN operand fails the comparison and propagates through hi + tail.)
  V neg_inf = M::splat(-std::numeric_limits<float>::infinity());
  return M::select(M::lt(hi, M::splat(std::numeric_limits<float>::lowest())), neg_inf, hi + tail);
}

// sign(x) in {-1, 0, +1}; the subgradient of |x| at 0 is taken as 0, as torch.abs does.
template <typename V, typename M = MathOps<V>>
KDEXT_HD V sign(V x) {
  V zero = M::splat(0), one = M::splat(1);
  return M::select(M::gt(x, zero), one, M::select(M::lt(x, zero), -one, zero));
}

}  // namespace kdext
