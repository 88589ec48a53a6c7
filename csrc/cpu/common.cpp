// CPU kernels of the generic ops (stem: common): scale_, self *= factor, the
// backward of the fused loss (kdext/divergence.py), skipped when factor is 1.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common_args.h"

namespace kdext {
namespace cpu {
namespace {

void scale_(at::Tensor& self, const at::Tensor& factor) {
  const ScaleArgs a(self, factor);
  const double f = a.factor.item<double>();
  if (f != 1.0) self.mul_(f);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CPU, m) { m.impl("scale_", &scale_); }

}  // namespace cpu
}  // namespace kdext
