// Input validation shared by the CPU and CUDA adapters. Every message names
// the offending argument; value problems raise ValueError, dtype problems
// TypeError, everything else RuntimeError (the Python wrappers in kdext/ run
// the same checks first, with the same words, so that fake tensors under
// torch.compile fail the same way).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

#include "kdext/divergence.h"

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

// Student and teacher logits: same device, same shape, compatible dtypes.
inline void check_logit_pair(const at::Tensor& s, const at::Tensor& t) {
  check_logits(s, "student_logits");
  check_logits(t, "teacher_logits");
  check_same_device(s, "student_logits", t, "teacher_logits");
  TORCH_CHECK_VALUE(s.size(-1) == t.size(-1), "vocabulary size mismatch: student_logits has ", s.size(-1),
                    " entries in its last dimension, teacher_logits has ", t.size(-1));
  TORCH_CHECK_VALUE(s.sizes() == t.sizes(), "row shape mismatch: student_logits has shape ", s.sizes(),
                    " but teacher_logits has shape ", t.sizes());
  TORCH_CHECK_TYPE((s.scalar_type() == c10::kDouble) == (t.scalar_type() == c10::kDouble),
                   "student_logits is ", s.scalar_type(), " and teacher_logits is ", t.scalar_type(),
                   "; float64 cannot be mixed with lower precisions");
}

// Parses the divergence name and checks its parameter; applies the JSD
// convention (beta 0 / 1 are forward / reverse KL).
inline Divergence check_divergence(c10::string_view name, double param) {
  Divergence kind;
  const std::string n(name);
  TORCH_CHECK_VALUE(parse_divergence(n.c_str(), &kind), "unknown divergence '", n,
                    "'; expected one of reverse_kl, forward_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd");
  if (divergence_has_param(kind)) {
    const char* pname = kind == Divergence::JSD ? "beta" : "alpha";
    TORCH_CHECK_VALUE(param >= 0.0 && param <= 1.0, pname, " must be in [0, 1], got ", param);
  }
  return resolve_divergence(kind, param);
}

// A tensor with one entry per row (upstream gradients, weights, saved
// statistics) on the same device as `like`.
inline void check_per_row(const at::Tensor& t, const char* name, int64_t rows, const at::Tensor& like,
                          const char* like_name) {
  TORCH_CHECK_VALUE(t.numel() == rows, name, " must have one entry per row (", rows, "), got shape ", t.sizes());
  check_same_device(t, name, like, like_name);
}

// divergence_forward's statistics, [rows, kStatsColumns].
inline void check_stats(const at::Tensor& stats, int64_t rows, const at::Tensor& like) {
  TORCH_CHECK_VALUE(stats.numel() == rows * kStatsColumns && stats.dim() >= 1 && stats.size(-1) == kStatsColumns,
                    "stats must have shape [rows, ", kStatsColumns, "] as returned by divergence_forward, got ",
                    stats.sizes());
  check_same_device(stats, "stats", like, "student_logits");
}

// scale_'s factor: one element, on self's device.
inline void check_scale_factor(const at::Tensor& factor, const at::Tensor& self) {
  TORCH_CHECK_VALUE(factor.numel() == 1, "factor must have exactly one element, got shape ", factor.sizes());
  check_same_device(factor, "factor", self, "self");
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

inline void check_tokens(const at::Tensor& tokens, const at::Tensor& logits) {
  check_row_integers(tokens, "tokens", logits);
}

// softmax_backward's upstream gradient: the output's shape and device.
inline void check_softmax_grad(const at::Tensor& grad_output, const at::Tensor& output) {
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes(), "grad_output has shape ", grad_output.sizes(),
                    " but output has shape ", output.sizes());
  check_same_device(grad_output, "grad_output", output, "output");
}

// The accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline c10::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// A [rows, V] view (or copy) whose last dimension has unit stride. Views are
// kept whenever the leading dims collapse; otherwise the rows are copied once.
inline at::Tensor as_rows(const at::Tensor& x) {
  const int64_t v = x.size(-1);
  at::Tensor y = x.stride(-1) == 1 ? x : x.contiguous();
  y = y.reshape({-1, v});
  if (y.stride(-1) != 1 || (y.size(0) > 1 && y.stride(0) < v)) y = y.contiguous();
  return y;
}

inline std::vector<int64_t> row_shape(const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  return sizes;
}

}  // namespace kdext
