// Host launcher of top_p_sample (framework-free). Included by
// csrc/cuda/top_p_sample.cu. Kernel: top_p_sample_kernels.cuh (one block of
// kBlock threads per row); launch: launch_plan.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kdext/cuda/launch_plan.h"
#include "kdext/cuda/top_p_sample_kernels.cuh"
#include "kdext/cuda/vec_load.cuh"

namespace kdext {
namespace cuda {

// Samples one token per row. p: the rows and the sampler's settings; the
// student (and teacher) logits in `dtype`, float32, float16 or bfloat16 (the
// op's math is float32: the adapter reads float64 logits as float32). A row
// is a block, so rows are at most the device's grid.
inline cudaError_t top_p_sample(const top_p_cuda::Params& p, DType dtype, int64_t rows, const Queue& q) {
  if (rows == 0) return cudaSuccess;
  if (rows > current_device().max_grid) return cudaErrorInvalidConfiguration;
  const Launch l{static_cast<unsigned>(rows), unsigned(top_p_cuda::kBlock)};
  switch (dtype) {
    case DType::Float32: return launch(l, q, top_p_cuda::top_p_sample_kernel<float>, p);
    case DType::Float16: return launch(l, q, top_p_cuda::top_p_sample_kernel<__half>, p);
    case DType::BFloat16: return launch(l, q, top_p_cuda::top_p_sample_kernel<__nv_bfloat16>, p);
    case DType::Float64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdext
