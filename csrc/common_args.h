// The adapter arguments of the generic ops (stem: common), checked once for
// both backends (csrc/cpu/common.cpp, csrc/cuda/common.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace kdext {

// scale_: self and its factor, one element on self's device.
struct ScaleArgs {
  at::Tensor self, factor;

  ScaleArgs(const at::Tensor& self_in, const at::Tensor& factor_in) : self(self_in), factor(factor_in) {
    TORCH_CHECK_VALUE(factor.numel() == 1, "factor must have exactly one element, got shape ", factor.sizes());
    check_same_device(factor, "factor", self, "self");
  }
};

}  // namespace kdext
