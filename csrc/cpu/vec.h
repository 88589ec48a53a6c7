// CPU vector lanes for the shared math (csrc/include/kdext/*.h) and the chunked
// row reader/writer every CPU kernel uses.
//
// A row is processed in chunks of kChunk entries, each padded with -inf up to
// a whole number of vectors: -inf is a masked token in the math contract, so
// the padding contributes exactly nothing and no scalar tail loop is needed.
// chunk_view reads a chunk in place when it already is in the accumulation
// type and whole vectors, and otherwise converts it once from its storage
// dtype (fp32/fp16/bf16/fp64) into an on-stack buffer; either way the values
// are not scaled, and its callers multiply by 1/T in registers. load_chunk
// always converts, multiplied by a given scale (1/T, or 1). The dtype switch
// happens once per chunk, which keeps the number of template instantiations
// (and the build time) small.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "kdext/math.h"

namespace kdext {

// exp for vector lanes. Sleef's exp (what Vectorized::exp calls) is an
// out-of-line call; on AVX2 / AVX-512 this inline Cephes-style version (Cody-Waite range
// reduction, degree-6 polynomial, ~1 ulp) is about twice as fast. Unlike
// Vectorized::exp_u20 it keeps NaN, -inf -> 0 and +inf -> +inf; results below
// ~1e-38 flush to 0, which is far below float epsilon of every sum kdext
// forms (all exponents are taken relative to a row max, so sums are >= 1).
template <typename S>
inline at::vec::Vectorized<S> fast_exp(const at::vec::Vectorized<S>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline at::vec::Vectorized<float> fast_exp<float>(const at::vec::Vectorized<float>& xv) {
  const __m256 x = xv;
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  const __m256 too_large = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283f), _CMP_GT_OQ);
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.72283f)), _mm256_set1_ps(-87.33654f));
  // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in two for an exact product.
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n as 2^(n-1) * 2, so that n = 128 (x near the overflow bound) stays finite.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), too_small);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), too_large);
  return _mm256_blendv_ps(y, x, is_nan);
}
#endif

#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
// The same algorithm, sixteen lanes at a time, with mask registers.
template <>
inline at::vec::Vectorized<float> fast_exp<float>(const at::vec::Vectorized<float>& xv) {
  const __m512 x = xv;
  const __mmask16 too_small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
  const __mmask16 too_large = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72283f), _CMP_GT_OQ);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512 xc = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72283f)), _mm512_set1_ps(-87.33654f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(126)), 23);
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_castsi512_ps(e)), _mm512_set1_ps(2.0f));
  y = _mm512_mask_blend_ps(too_small, y, _mm512_setzero_ps());
  y = _mm512_mask_blend_ps(too_large, y, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  return _mm512_mask_blend_ps(is_nan, y, x);
}
#endif

template <typename S>
struct VecMathOps {
  using Vec = at::vec::Vectorized<S>;
  using Mask = Vec;
  static Vec splat(S x) { return Vec(x); }
  static Vec exp(const Vec& x) { return fast_exp(x); }
  static Vec log(const Vec& x) { return x.log(); }
  // log1p as x log(u) / (u - 1), u = 1 + x (Goldberg's correction of 1 + x's rounding, a
  // few ulp): one log. Sleef's AVX-512 log1p is 2.4x slower than its log on Zen 4 and made
  // the JSD and skew KLs 2.5x slower than the AVX2 build.
  static Vec log1p(const Vec& x) {
    const Vec one(S(1));
    const Vec u = one + x;
    return Vec::blendv(x * (u.log() / (u - one)), x, u == one);
  }
  static Vec abs(const Vec& x) { return x.abs(); }
  static Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static Mask gt(const Vec& a, const Vec& b) { return a > b; }
  static Mask lt(const Vec& a, const Vec& b) { return a < b; }
  // Whether any lane of a comparison mask is set (set lanes are all-ones bits, never zero).
  static bool any(const Mask& m) { return m.zero_mask() != (1 << Vec::size()) - 1; }
  static Vec select(const Mask& m, const Vec& a, const Vec& b) { return Vec::blendv(b, a, m); }
};

template <>
struct MathOps<at::vec::Vectorized<float>> : VecMathOps<float> {};
template <>
struct MathOps<at::vec::Vectorized<double>> : VecMathOps<double> {};

namespace cpu {

constexpr int64_t kChunk = 512;

// The SIMD lanes of the accumulation type.
template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Entry i of a row, as acc_t, unscaled (the conversion of load_chunk).
template <typename acc_t>
acc_t load_value(const void* row, c10::ScalarType dtype, int64_t i) {
  switch (dtype) {
    case c10::ScalarType::Float: return static_cast<acc_t>(static_cast<const float*>(row)[i]);
    case c10::ScalarType::Double: return static_cast<acc_t>(static_cast<const double*>(row)[i]);
    case c10::ScalarType::BFloat16: return static_cast<acc_t>(static_cast<const c10::BFloat16*>(row)[i]);
    case c10::ScalarType::Half: return static_cast<acc_t>(static_cast<const c10::Half*>(row)[i]);
    default: return acc_t(0);  // unreachable: dtypes are checked by the adapters
  }
}

template <typename acc_t, typename src_t>
inline void convert_scaled(const src_t* p, int64_t n, acc_t scale, acc_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i]) * scale;
}

// Converts n <= kChunk entries of a row (any supported dtype) to acc_t,
// multiplied by `scale`, padded with -inf to a multiple of the vector width.
// Returns the padded length.
template <typename acc_t>
int64_t load_chunk(const void* row, c10::ScalarType dtype, int64_t begin, int64_t n, acc_t scale, acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  switch (dtype) {
    case c10::ScalarType::Float:
      convert_scaled(static_cast<const float*>(row) + begin, n, scale, out);
      break;
    case c10::ScalarType::Double:
      convert_scaled(static_cast<const double*>(row) + begin, n, scale, out);
      break;
    case c10::ScalarType::BFloat16:
      convert_scaled(static_cast<const c10::BFloat16*>(row) + begin, n, scale, out);
      break;
    case c10::ScalarType::Half:
      convert_scaled(static_cast<const c10::Half*>(row) + begin, n, scale, out);
      break;
    default:
      break;  // unreachable: dtypes are checked by the adapters
  }
  const int64_t padded = (n + Vec::size() - 1) / Vec::size() * Vec::size();
  for (int64_t i = n; i < padded; ++i) out[i] = -std::numeric_limits<acc_t>::infinity();
  return padded;
}

// A chunk of a row as acc_t values, unscaled, padded with -inf to whole
// vectors: the row's own memory when it is already acc_t and the chunk is a
// whole number of vectors (no copy), else `buf` after conversion. Callers
// multiply by 1/T in registers.
template <typename acc_t>
const acc_t* chunk_view(const void* row, c10::ScalarType dtype, int64_t begin, int64_t n, acc_t* buf,
                        int64_t* padded) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (dtype == c10::CppTypeToScalarType<acc_t>::value && n % Vec::size() == 0) {
    *padded = n;
    return static_cast<const acc_t*>(row) + begin;
  }
  *padded = load_chunk(row, dtype, begin, n, acc_t(1), buf);
  return buf;
}

// Writes n entries of an acc_t buffer to a row of the given dtype.
template <typename acc_t>
void store_chunk(const acc_t* in, int64_t n, c10::ScalarType dtype, void* row, int64_t begin) {
  switch (dtype) {
    case c10::ScalarType::Float: {
      float* p = static_cast<float*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(in[i]);
      break;
    }
    case c10::ScalarType::Double: {
      double* p = static_cast<double*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<double>(in[i]);
      break;
    }
    case c10::ScalarType::BFloat16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(static_cast<float>(in[i]));
      break;
    }
    case c10::ScalarType::Half: {
      c10::Half* p = static_cast<c10::Half*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(static_cast<float>(in[i]));
      break;
    }
    default:
      break;
  }
}

// Where a kernel writes chunk [begin, begin + n) of an output row: straight
// into the row when it is acc_t and the chunk is whole vectors, else into
// `buf`, which finish_chunk then converts into the row.
template <typename acc_t>
acc_t* chunk_out(void* row, c10::ScalarType dtype, int64_t begin, int64_t n, acc_t* buf) {
  if (dtype == c10::CppTypeToScalarType<acc_t>::value && n % at::vec::Vectorized<acc_t>::size() == 0)
    return static_cast<acc_t*>(row) + begin;
  return buf;
}

template <typename acc_t>
void finish_chunk(const acc_t* out, const acc_t* buf, int64_t n, c10::ScalarType dtype, void* row, int64_t begin) {
  if (out == buf) store_chunk(buf, n, dtype, row, begin);
}

template <typename acc_t>
acc_t reduce_max(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
acc_t reduce_sum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return a + b; }, v);
}

}  // namespace cpu
}  // namespace kdext
