// The generic input checks of the adapters, CPU and CUDA: logits, the
// temperature, devices, per-row tensors. Each family's own checks are in its
// csrc/<stem>_args.h. Every message names the offending argument; value
// problems raise ValueError, dtype problems TypeError, everything else
// RuntimeError (the Python wrappers in kdext/ run the same checks first, with
// the same words (kdext/_validate.py), so that fake tensors under
// torch.compile fail the same way).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace kdext {

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

inline void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), name,
                   " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, name, " must have at least one dimension (the vocabulary), got a 0-dim tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0, name, " has an empty vocabulary (last dimension of size 0)");
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a finite number > 0, got ", temperature);
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ", b.device(),
              "; they must be on the same device");
}

// A tensor with one entry per row (upstream gradients, weights, saved
// statistics) on the same device as `like`.
inline void check_per_row(const at::Tensor& t, const char* name, int64_t rows, const at::Tensor& like,
                          const char* like_name) {
  TORCH_CHECK_VALUE(t.numel() == rows, name, " must have one entry per row (", rows, "), got shape ", t.sizes());
  check_same_device(t, name, like, like_name);
}

// One int64/int32 entry per row of `logits`, with its leading shape (token
// ids for logprobs, row ids for top_p_sample).
inline void check_row_integers(const at::Tensor& x, const char* name, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(x.scalar_type() == c10::kLong || x.scalar_type() == c10::kInt, name,
                   " must be int64 or int32, got ", x.scalar_type());
  check_same_device(x, name, logits, "logits");
  std::vector<int64_t> rows = logits.sizes().vec();
  rows.pop_back();
  TORCH_CHECK_VALUE(x.sizes() == c10::IntArrayRef(rows), name, " must have shape ", c10::IntArrayRef(rows),
                    " (the logits' leading dims), got ", x.sizes());
}

}  // namespace kdext
