// The fused LM-head family's arguments (stem: fused_linear), checked and
// converted once for both backends: the driver (csrc/fused_linear.cpp) is
// registered for the CPU and for CUDA and runs on these structs only, so both
// raise the same errors, before any work, and return the same shapes.
//
// One LM head is (hidden [..., H], weight [V, H], bias [V] or none, logit
// scale, softcap or none); its logits are
//   z = logit_scale * (hidden @ weight^T + bias),  then softcap * tanh(z / softcap)
// (docs/DESIGN.md §2.11). Student and teacher heads may differ in H, V and dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "adapter_args.h"
#include "checks.h"
#include "divergence_args.h"

namespace kdext {

// The schema names of one head's arguments, for error messages.
struct HeadNames {
  const char* hidden;
  const char* weight;
  const char* bias;
  const char* logit_scale;
  const char* softcap;
};
inline constexpr HeadNames kStudentHead{"student_hidden", "student_weight", "student_bias", "student_logit_scale",
                                        "student_softcap"};
inline constexpr HeadNames kTeacherHead{"teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logit_scale",
                                        "teacher_softcap"};
inline constexpr HeadNames kSingleHead{"hidden", "weight", "bias", "logit_scale", "softcap"};

inline void check_float_tensor(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), name, " must be float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
}

// The leading shape of a [..., H] tensor.
inline std::vector<int64_t> leading_shape(const at::Tensor& x) {
  auto s = x.sizes().vec();
  s.pop_back();
  return s;
}

// One validated LM head.
struct LinearHead {
  at::Tensor hidden;  // [rows, H], unit stride in H
  at::Tensor weight;  // [V, H]
  std::optional<at::Tensor> bias;  // [V]
  double logit_scale;
  std::optional<double> softcap;
  int64_t rows, H, V;
  std::vector<int64_t> hidden_sizes;  // the caller's shape, for grad_hidden

  LinearHead(const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
             double scale, std::optional<double> cap, const HeadNames& n)
      : weight(weight_in), bias(bias_in), logit_scale(scale), softcap(cap) {
    check_float_tensor(hidden_in, n.hidden);
    TORCH_CHECK_VALUE(hidden_in.dim() >= 1, n.hidden,
                      " must have at least one dimension (the hidden width), got a 0-dim tensor");
    check_float_tensor(weight_in, n.weight);
    TORCH_CHECK_VALUE(weight_in.dim() == 2, n.weight, " must be a 2-D [V, H] tensor (as nn.Linear stores it), got shape ",
                      weight_in.sizes());
    TORCH_CHECK_VALUE(weight_in.size(0) > 0, n.weight, " has no rows (an empty vocabulary)");
    TORCH_CHECK_VALUE(hidden_in.size(-1) == weight_in.size(1), "width mismatch: ", n.hidden, " has ",
                      hidden_in.size(-1), " entries in its last dimension but ", n.weight, " has shape ",
                      weight_in.sizes(), " ([V, H])");
    TORCH_CHECK_VALUE(hidden_in.size(-1) > 0, n.hidden, " has an empty hidden width (last dimension of size 0)");
    check_same_device(weight_in, n.weight, hidden_in, n.hidden);
    const bool dbl = hidden_in.scalar_type() == c10::kDouble;
    TORCH_CHECK_TYPE((weight_in.scalar_type() == c10::kDouble) == dbl, n.hidden, " is ", hidden_in.scalar_type(),
                     " and ", n.weight, " is ", weight_in.scalar_type(),
                     "; float64 cannot be mixed with lower precisions");
    if (bias_in) {
      check_float_tensor(*bias_in, n.bias);
      TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == weight_in.size(0), n.bias, " must have shape [",
                        weight_in.size(0), "] (one entry per row of ", n.weight, "), got ", bias_in->sizes());
      check_same_device(*bias_in, n.bias, hidden_in, n.hidden);
      TORCH_CHECK_TYPE((bias_in->scalar_type() == c10::kDouble) == dbl, n.hidden, " is ", hidden_in.scalar_type(),
                       " and ", n.bias, " is ", bias_in->scalar_type(),
                       "; float64 cannot be mixed with lower precisions");
    }
    TORCH_CHECK_VALUE(std::isfinite(scale), n.logit_scale, " must be a finite number, got ", scale);
    if (cap) {
      TORCH_CHECK_VALUE(std::isfinite(*cap) && *cap > 0.0, n.softcap, " must be a finite number > 0 (or None), got ",
                        *cap);
    }
    hidden_sizes = hidden_in.sizes().vec();
    H = hidden_in.size(-1);
    hidden = as_rows(hidden_in);
    rows = hidden.size(0);
    V = weight_in.size(0);
  }

  c10::ScalarType acc() const { return acc_dtype(hidden); }
};

// Which gradients a call computes (a bias gradient only for a head with a bias).
struct GradRequest {
  bool hidden, weight, bias;
  bool any() const { return hidden || weight || bias; }
};

// The row budget of one chunk. A positive `requested` is taken as given
// (capped at the rows); 0 picks the rows whose buffers fit the memory budget
// KDEXT_FUSED_LINEAR_MB (default 224 MiB on the CPU, 1024 MiB on CUDA), at
// least 1, balanced so that the chunks have nearly equal sizes. The CPU
// default leaves room for a call's other temporaries: with 256 the peak of a
// loss call measured 250.7 MiB, just over a quarter of a [8192, 32000] fp32
// logits buffer (250 MiB; bench/bench_fused_linear.py).
inline int64_t fused_linear_budget_bytes(bool cuda) {
  const char* env = std::getenv("KDEXT_FUSED_LINEAR_MB");
  int64_t mb = cuda ? 1024 : 224;
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && v > 0,
                      "KDEXT_FUSED_LINEAR_MB must be a positive integer (megabytes), got '", env, "'");
    mb = v;
  }
  return mb << 20;
}

inline int64_t chunk_rows(int64_t requested, int64_t rows, int64_t bytes_per_row, bool cuda) {
  const int64_t all = std::max<int64_t>(rows, 1);
  if (requested > 0) return std::min(requested, all);
  const int64_t fit = std::max<int64_t>(1, fused_linear_budget_bytes(cuda) / std::max<int64_t>(bytes_per_row, 1));
  if (fit >= all) return all;
  const int64_t chunks = (all + fit - 1) / fit;
  return (all + chunks - 1) / chunks;
}

inline void check_chunk_size(int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be >= 1 (or 0 / None: rows from the memory budget), got ",
                    chunk_size);
}

// Student and teacher heads of a fused divergence, with its settings.
struct HeadPairArgs {
  LinearHead s, t;
  Divergence kind;
  double param, temperature;
  int64_t chunk_size;
  int64_t V;  // the common vocabulary: the wider head; the narrower one's extra ids are -inf

  HeadPairArgs(const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb, const at::Tensor& th,
               const at::Tensor& tw, const std::optional<at::Tensor>& tb, c10::string_view name, double param_in,
               double temperature_in, double s_scale, double t_scale, std::optional<double> s_cap,
               std::optional<double> t_cap, int64_t chunk)
      : s(sh, sw, sb, s_scale, s_cap, kStudentHead),
        t(th, tw, tb, t_scale, t_cap, kTeacherHead),
        param(param_in),
        temperature(temperature_in),
        chunk_size(chunk) {
    check_same_device(th, "teacher_hidden", sh, "student_hidden");
    TORCH_CHECK_VALUE(leading_shape(sh) == leading_shape(th), "row shape mismatch: student_hidden has leading shape ",
                      c10::IntArrayRef(leading_shape(sh)), " but teacher_hidden has ",
                      c10::IntArrayRef(leading_shape(th)), " (one row per token on both sides)");
    TORCH_CHECK_TYPE((sh.scalar_type() == c10::kDouble) == (th.scalar_type() == c10::kDouble), "student_hidden is ",
                     sh.scalar_type(), " and teacher_hidden is ", th.scalar_type(),
                     "; float64 cannot be mixed with lower precisions");
    check_temperature(temperature);
    kind = check_divergence(name, param);
    check_chunk_size(chunk);
    V = std::max(s.V, t.V);
  }

  int64_t rows() const { return s.rows; }
  std::vector<int64_t> row_sizes() const { return leading_shape_of(s.hidden_sizes); }
  static std::vector<int64_t> leading_shape_of(std::vector<int64_t> sizes) {
    sizes.pop_back();
    return sizes;
  }
};

// The tokens of fused_linear_logprobs: int64/int32 with hidden's leading shape,
// as a flat int64 vector; on the CPU every token is range-checked here, before
// any work (on CUDA that would need a sync: such a row's log-prob is NaN).
inline at::Tensor fused_token_vector(const at::Tensor& tokens, const LinearHead& head) {
  TORCH_CHECK_TYPE(tokens.scalar_type() == c10::kLong || tokens.scalar_type() == c10::kInt,
                   "tokens must be int64 or int32, got ", tokens.scalar_type());
  check_same_device(tokens, "tokens", head.hidden, "hidden");
  const auto rows = HeadPairArgs::leading_shape_of(head.hidden_sizes);
  TORCH_CHECK_VALUE(tokens.sizes() == c10::IntArrayRef(rows), "tokens must have shape ", c10::IntArrayRef(rows),
                    " (the leading dims of hidden), got ", tokens.sizes());
  at::Tensor flat = per_row_vector(tokens, at::kLong);
  if (flat.device().is_cpu()) {
    const int64_t* p = flat.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < flat.numel(); ++r) {
      TORCH_CHECK_INDEX(p[r] >= 0 && p[r] < head.V, "tokens[", r, "] = ", p[r], " is outside the vocabulary [0, ",
                        head.V, ")");
    }
  }
  return flat;
}

// The family's kernels: one driver, registered for both backends with the
// signatures of csrc/ops.cpp.
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
struct FusedLinearKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*fused_linear_divergence_loss)(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, c10::string_view, double, double, double, double, std::optional<double>,
      std::optional<double>, int64_t, const at::Tensor&, bool, bool, bool);
  std::tuple<at::Tensor, at::Tensor> (*fused_linear_divergence_forward)(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, c10::string_view, double, double, double, double, std::optional<double>,
      std::optional<double>, int64_t);
  Grads3 (*fused_linear_divergence_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                             const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                                             double, double, double, double, std::optional<double>,
                                             std::optional<double>, int64_t, bool, bool, bool);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*fused_linear_logprobs_forward)(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double, double,
      std::optional<double>, int64_t, bool);
  Grads3 (*fused_linear_logprobs_backward)(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const at::Tensor&, double, double,
                                           std::optional<double>, int64_t, bool, bool, bool);
};

inline void register_kernels(torch::Library& m, const FusedLinearKernels& k) {
  m.impl("fused_linear_divergence_loss", k.fused_linear_divergence_loss);
  m.impl("fused_linear_divergence_forward", k.fused_linear_divergence_forward);
  m.impl("fused_linear_divergence_backward", k.fused_linear_divergence_backward);
  m.impl("fused_linear_logprobs_forward", k.fused_linear_logprobs_forward);
  m.impl("fused_linear_logprobs_backward", k.fused_linear_logprobs_backward);
}

}  // namespace kdext
