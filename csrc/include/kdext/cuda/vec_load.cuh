// Vectorized row access for the CUDA kernels (framework-free: no torch types).
//
// A row of n entries is cut into "packs" of N consecutive entries, N chosen so
// that each tensor touched by a kernel moves whole 16-byte vectors (N = 16 /
// the smallest element size among them). When every pointer of the row can be
// 16-byte aligned at the same entry `head` (the usual case: contiguous tensors
// of the same dtype, or any V that is a multiple of 8), pack k covers entries
//     [base + k N, base + (k + 1) N),  base = head - N if head > 0 else 0,
// so that every pack lying inside the row is one aligned vector load per
// tensor, and only the first and the last pack (partly outside the row) use
// masked scalar accesses. When no common alignment exists (mixed dtypes whose
// rows start at different offsets, strided views), the same packs are built
// from scalar loads: slower, equally correct. Lanes outside [0, n) read as a
// caller-chosen padding value (-inf for logits: a masked token contributes
// exactly nothing to any sum of the math contract) and are never written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kdext/math.h"

namespace kdext {
namespace cuda {

// Storage dtypes of the tensors the kernels read and write.
enum class DType : int32_t { Float32 = 0, Float16, BFloat16, Float64 };

template <typename X>
struct TypeTag {
  using type = X;
};

inline int dtype_size(DType d) {
  switch (d) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Float64: return 8;
  }
  return 4;
}

// Calls f(TypeTag<X>{}) with X the device type of the dtype.
template <typename F>
auto dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float16: return f(TypeTag<__half>{});
    case DType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
    case DType::Float64: return f(TypeTag<double>{});
  }
  return f(TypeTag<float>{});
}

// Student/teacher dtype pairs: float64 only pairs with float64 (checked by the
// adapters), the three 16/32-bit types pair freely.
template <typename F>
auto dispatch_dtype_pair(DType a, DType b, F&& f) {
  if (a == DType::Float64 || b == DType::Float64) return f(TypeTag<double>{}, TypeTag<double>{});
  return dispatch_dtype(a, [&](auto ta) {
    using A = typename std::decay_t<decltype(ta)>::type;
    return dispatch_dtype(b, [&](auto tb) {
      using B = typename std::decay_t<decltype(tb)>::type;
      if constexpr (std::is_same<A, double>::value || std::is_same<B, double>::value) {
        return f(TypeTag<float>{}, TypeTag<float>{});  // unreachable
      } else {
        return f(TypeTag<A>{}, TypeTag<B>{});
      }
    });
  });
}

// The accumulation type of a storage type: double for double, float otherwise.
template <typename X>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---- scalar conversions ----------------------------------------------------

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float x) { return static_cast<Acc>(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double x) { return static_cast<Acc>(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half x) { return static_cast<Acc>(__half2float(x)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) { return static_cast<Acc>(__bfloat162float(x)); }

// Round-to-nearest-even into the storage type (as c10::Half / c10::BFloat16 do).
template <typename X>
struct FromAcc;
template <>
struct FromAcc<float> {
  template <typename Acc>
  static __device__ __forceinline__ float cvt(Acc v) { return static_cast<float>(v); }
};
template <>
struct FromAcc<double> {
  template <typename Acc>
  static __device__ __forceinline__ double cvt(Acc v) { return static_cast<double>(v); }
};
template <>
struct FromAcc<__half> {
  template <typename Acc>
  static __device__ __forceinline__ __half cvt(Acc v) { return __float2half_rn(static_cast<float>(v)); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  template <typename Acc>
  static __device__ __forceinline__ __nv_bfloat16 cvt(Acc v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

template <typename X, typename Acc>
__device__ __forceinline__ X from_acc(Acc v) { return FromAcc<X>::cvt(v); }

template <typename Acc>
__host__ __device__ __forceinline__ Acc neg_inf() { return -std::numeric_limits<Acc>::infinity(); }
template <typename Acc>
__host__ __device__ __forceinline__ Acc quiet_nan() { return std::numeric_limits<Acc>::quiet_NaN(); }

// ---- packs -----------------------------------------------------------------

// Pack width for tensors of element sizes `a` and `b`: whole 16-byte vectors for both.
constexpr int pack_width(int a, int b) { return 16 / (a < b ? a : b); }

template <typename X, int N>
struct alignas(16) RawPack {
  static_assert((N * sizeof(X)) % 16 == 0, "a pack must be whole 16-byte vectors");
  X v[N];
};

// The packs of one row: pack k starts at entry base + k N; `vec` says whether
// a pack wholly inside the row may use vector accesses.
struct PackLayout {
  int64_t n;      // row length
  int64_t base;   // first entry of pack 0 (in (-N, 0])
  int64_t packs;  // number of packs covering [0, n)
  bool vec;
};

// Entry offset (0 <= h < 16 / esize) at which `p` becomes 16-byte aligned.
__host__ __device__ __forceinline__ int align_head(const void* p, int esize) {
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  return static_cast<int>(((16u - mis) & 15u) / static_cast<unsigned>(esize));
}

__host__ __device__ __forceinline__ bool aligned_at(const void* p, int esize, int64_t head) {
  return ((reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(head * esize)) & 15u) == 0;
}

// Row pointers with their element sizes; null pointers are ignored. The first
// pointer must have the smallest element size (it fixes the head).
struct RowPtrs {
  const void* p[4];
  int esize[4];
  int count;

  // Appends a pointer (null: a tensor not written) of elements of `size` bytes.
  __host__ __device__ __forceinline__ RowPtrs& add(const void* q, int size) {
    p[count] = q;
    esize[count] = size;
    ++count;
    return *this;
  }
};

// The row pointers of a kernel that reads rows a and b: the one with the
// smaller elements first (it fixes the head); outputs are added after.
template <typename A, typename B>
__host__ __device__ __forceinline__ RowPtrs input_ptrs(const A* a, const B* b) {
  RowPtrs p;
  p.count = 0;
  if (sizeof(A) <= sizeof(B)) return p.add(a, sizeof(A)).add(b, sizeof(B));
  return p.add(b, sizeof(B)).add(a, sizeof(A));
}

template <int N>
__host__ __device__ __forceinline__ PackLayout make_layout(int64_t n, const RowPtrs& ptrs) {
  int head = align_head(ptrs.p[0], ptrs.esize[0]);
  bool vec = (reinterpret_cast<uintptr_t>(ptrs.p[0]) % ptrs.esize[0]) == 0;
#pragma unroll
  for (int i = 1; i < 4; ++i) {
    if (i < ptrs.count && ptrs.p[i] != nullptr) vec = vec && aligned_at(ptrs.p[i], ptrs.esize[i], head);
  }
  PackLayout L;
  L.n = n;
  L.vec = vec && head < n;
  L.base = (L.vec && head > 0) ? head - N : 0;
  L.packs = (n - L.base + N - 1) / N;
  return L;
}

__host__ __device__ __forceinline__ bool pack_inside(const PackLayout& L, int64_t start, int N) {
  return start >= 0 && start + N <= L.n;
}

// Loads the raw entries of the pack starting at entry `start` of `row`; lanes
// outside the row are zero bits (callers mask them when converting).
template <typename X, int N>
__device__ __forceinline__ void load_raw(const X* __restrict__ row, const PackLayout& L, int64_t start,
                                         RawPack<X, N>& out) {
  if (L.vec && pack_inside(L, start, N)) {
    const uint4* q = reinterpret_cast<const uint4*>(row + start);
    uint4* o = reinterpret_cast<uint4*>(&out);
#pragma unroll
    for (int w = 0; w < int(sizeof(RawPack<X, N>) / 16); ++w) o[w] = q[w];
  } else {
    uint4* o = reinterpret_cast<uint4*>(&out);
#pragma unroll
    for (int w = 0; w < int(sizeof(RawPack<X, N>) / 16); ++w) o[w] = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int l = 0; l < N; ++l) {
      const int64_t i = start + l;
      if (i >= 0 && i < L.n) out.v[l] = row[i];
    }
  }
}

// x * scale rounded on its own, never fused into a following add (the CPU
// kernels are built with -ffp-contract=off): x/T - max is then exactly 0 at
// the max, whichever expression consumes the product.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Converts a raw pack to Acc times `scale`; lanes outside the row become `pad`.
template <typename Acc, typename X, int N>
__device__ __forceinline__ void convert(const RawPack<X, N>& raw, const PackLayout& L, int64_t start, Acc scale,
                                        Acc pad, Acc (&out)[N]) {
  if (pack_inside(L, start, N)) {
#pragma unroll
    for (int l = 0; l < N; ++l) out[l] = mul_rn(to_acc<Acc>(raw.v[l]), scale);
  } else {
#pragma unroll
    for (int l = 0; l < N; ++l) {
      const int64_t i = start + l;
      out[l] = (i >= 0 && i < L.n) ? mul_rn(to_acc<Acc>(raw.v[l]), scale) : pad;
    }
  }
}

// load_raw + convert.
template <typename Acc, typename X, int N>
__device__ __forceinline__ void load_pack(const X* __restrict__ row, const PackLayout& L, int64_t start, Acc scale,
                                          Acc pad, Acc (&out)[N]) {
  RawPack<X, N> raw;
  load_raw<X, N>(row, L, start, raw);
  convert<Acc, X, N>(raw, L, start, scale, pad, out);
}

// Stores the lanes of a pack that lie inside the row; whole packs go out as
// streaming vector stores (the outputs are not read again by this kernel).
template <typename X, typename Acc, int N>
__device__ __forceinline__ void store_pack(X* __restrict__ row, const PackLayout& L, int64_t start,
                                           const Acc (&v)[N]) {
  if (L.vec && pack_inside(L, start, N)) {
    RawPack<X, N> raw;
#pragma unroll
    for (int l = 0; l < N; ++l) raw.v[l] = from_acc<X>(v[l]);
    uint4* q = reinterpret_cast<uint4*>(row + start);
    const uint4* r = reinterpret_cast<const uint4*>(&raw);
#pragma unroll
    for (int w = 0; w < int(sizeof(RawPack<X, N>) / 16); ++w) __stcs(q + w, r[w]);
  } else {
#pragma unroll
    for (int l = 0; l < N; ++l) {
      const int64_t i = start + l;
      if (i >= 0 && i < L.n) row[i] = from_acc<X>(v[l]);
    }
  }
}

// Fills the entries [start, start + N) ∩ [0, n) with one value.
template <typename X, typename Acc, int N>
__device__ __forceinline__ void fill_pack(X* __restrict__ row, const PackLayout& L, int64_t start, Acc value) {
  Acc v[N];
#pragma unroll
  for (int l = 0; l < N; ++l) v[l] = value;
  store_pack<X, Acc, N>(row, L, start, v);
}

// Pointer to row r of a [rows, *] tensor with row stride `stride` (entries);
// 64-bit offsets throughout.
template <typename X>
__device__ __forceinline__ const X* row_ptr(const void* base, int64_t r, int64_t stride) {
  return static_cast<const X*>(base) + r * stride;
}
template <typename X>
__device__ __forceinline__ X* row_ptr_mut(void* base, int64_t r, int64_t stride) {
  return static_cast<X*>(base) + r * stride;
}

}  // namespace cuda
}  // namespace kdext
