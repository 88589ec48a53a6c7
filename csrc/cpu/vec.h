// CPU vector lanes for the shared math (csrc/include/kdext/*.h) and the chunked
// row reader/writer every CPU kernel uses.
//
// A row is processed in chunks of kChunk entries: each chunk is converted once
// from its storage dtype (fp32/fp16/bf16/fp64) into an on-stack buffer of the
// accumulation type, already multiplied by 1/T, and padded with -inf up to a
// whole number of vectors. -inf is a masked token in the math contract, so the
// padding contributes exactly nothing and no scalar tail loop is needed. The
// dtype switch happens once per chunk, which keeps the number of template
// instantiations (and the build time) small.
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

template <typename S>
struct VecMathOps {
  using Vec = at::vec::Vectorized<S>;
  using Mask = Vec;
  static Vec splat(S x) { return Vec(x); }
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec log(const Vec& x) { return x.log(); }
  static Vec log1p(const Vec& x) { return x.log1p(); }
  static Vec abs(const Vec& x) { return x.abs(); }
  static Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static Mask gt(const Vec& a, const Vec& b) { return a > b; }
  static Mask lt(const Vec& a, const Vec& b) { return a < b; }
  static Vec select(const Mask& m, const Vec& a, const Vec& b) { return Vec::blendv(b, a, m); }
};

template <>
struct MathOps<at::vec::Vectorized<float>> : VecMathOps<float> {};
template <>
struct MathOps<at::vec::Vectorized<double>> : VecMathOps<double> {};

namespace cpu {

constexpr int64_t kChunk = 512;

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

// A row of a [rows, V] tensor whose last dim has unit stride.
struct RowView {
  const char* base;
  int64_t row_stride_bytes;
  c10::ScalarType dtype;

  const void* row(int64_t r) const { return base + r * row_stride_bytes; }
};

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
