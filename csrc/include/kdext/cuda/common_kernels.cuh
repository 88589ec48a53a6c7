// CUDA kernel and launcher of the `common` stem (framework-free): scale_,
// x *= factor in place with the factor read on the device, so that a
// backward's upstream gradient never needs a device-to-host sync, and nothing
// written when it is 1. Included by csrc/cuda/common.cu.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/launch_plan.h"
#include "kdext/cuda/vec_load.cuh"

namespace kdext {
namespace cuda {

// x[0, n) *= f, f = *factor (of factor_dtype) or host_factor when factor is
// null. Returns at once when f is 1 (nothing is read or written).
template <typename X, typename Acc>
__global__ void __launch_bounds__(kThreads) scale_kernel(X* __restrict__ x, int64_t n, const void* factor,
                                                         DType factor_dtype, Acc host_factor) {
  Acc f = host_factor;
  if (factor != nullptr) {
    switch (factor_dtype) {
      case DType::Float32: f = static_cast<Acc>(*static_cast<const float*>(factor)); break;
      case DType::Float64: f = static_cast<Acc>(*static_cast<const double*>(factor)); break;
      case DType::Float16: f = to_acc<Acc>(*static_cast<const __half*>(factor)); break;
      case DType::BFloat16: f = to_acc<Acc>(*static_cast<const __nv_bfloat16*>(factor)); break;
    }
  }
  if (f == Acc(1)) return;
  constexpr int N = 16 / sizeof(X);
  RowPtrs p;
  p.count = 0;
  const PackLayout L = make_layout<N>(n, p.add(x, sizeof(X)));
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < L.packs; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t start = L.base + k * N;
    Acc v[N];
    load_pack<Acc, X, N>(x, L, start, Acc(1), Acc(0), v);
#pragma unroll
    for (int l = 0; l < N; ++l) v[l] = v[l] * f;
    store_pack<X, Acc, N>(x, L, start, v);
  }
}

// x[0, n) *= factor, x contiguous. `factor` is a device pointer (read inside
// the kernel: no host sync; nothing is written when it is 1) or null, in which
// case `host_factor` is used.
inline cudaError_t scale_inplace(void* x, DType dtype, int64_t n, const void* factor, DType factor_dtype,
                                 double host_factor, const Queue& q) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tx) {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    constexpr int N = 16 / sizeof(X);
    return launch({elementwise_grid(packs_bound(n, N))}, q, scale_kernel<X, Acc>, static_cast<X*>(x), n,
                  factor, factor_dtype, Acc(host_factor));
  });
}

}  // namespace cuda
}  // namespace kdext
