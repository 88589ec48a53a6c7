// CUDA adapters of the generic ops (stem: common): scale_, self *= factor,
// skipped when factor is 1. The factor is read on the device, inside the
// kernel of csrc/include/kdext/cuda/common_kernels.cuh, so that no host
// synchronisation happens. Semantics: csrc/cpu/common.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common_args.h"
#include "cuda/adapter_utils.h"
#include "kdext/cuda/common_kernels.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

void scale_(at::Tensor& self, const at::Tensor& factor) {
  const ScaleArgs a(self, factor);
  if (self.numel() == 0) return;
  const bool fast = self.is_contiguous() && is_supported_float(self.scalar_type());
  if (!fast) {  // still no sync; x * 1 == x, so skipping is only an optimisation
    self.mul_(factor.reshape({}));
    return;
  }
  const at::Tensor f = is_supported_float(factor.scalar_type()) ? factor : factor.to(at::kDouble);
  run_launcher(self.device(), kdext::cuda::scale_inplace, self.data_ptr(), to_dtype(self.scalar_type()), self.numel(),
               f.const_data_ptr(), to_dtype(f.scalar_type()), 1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) { m.impl("scale_", &scale_); }

}  // namespace cuda_adapter
}  // namespace kdext
