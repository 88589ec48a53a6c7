// The log-prob ops' adapter arguments, checked, converted and allocated once
// for both backends (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "adapter_args.h"
#include "checks.h"

namespace kdext {

// The tokens (checked: one int64/int32 per row of logits) as a flat int64 vector.
inline at::Tensor token_vector(const at::Tensor& tokens, const at::Tensor& logits) {
  check_row_integers(tokens, "tokens", logits);
  return per_row_vector(tokens, at::kLong);
}

// logprobs_forward: the log-probs and per-row lse, in the accumulation dtype.
struct LogprobsForwardArgs {
  RowsInput in;
  at::Tensor tokens;    // [rows], int64
  at::Tensor out, lse;  // [rows]

  LogprobsForwardArgs(const at::Tensor& logits, const at::Tensor& tokens_in, double temperature)
      : in(logits, "logits") {
    check_temperature(temperature);
    tokens = token_vector(tokens_in, logits);
    const auto opts = logits.options().dtype(acc_dtype(logits));
    out = at::empty({in.rows}, opts);
    lse = at::empty({in.rows}, opts);
  }
};

// logprobs_backward: the upstream gradient and saved lse (accumulation dtype)
// and the [rows, V] gradient in the logits' dtype.
struct LogprobsBackwardArgs {
  RowsInput in;
  at::Tensor tokens;     // [rows], int64
  at::Tensor grad, lse;  // [rows]
  at::Tensor out;

  LogprobsBackwardArgs(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& tokens_in,
                       const at::Tensor& lse_in, double temperature, OutputAllocator alloc)
      : in(logits, "logits") {
    check_temperature(temperature);
    tokens = token_vector(tokens_in, logits);
    const auto acc = acc_dtype(logits);
    check_per_row(grad_in, "grad", in.rows, logits, "logits");
    check_per_row(lse_in, "lse", in.rows, logits, "logits");
    grad = per_row_vector(grad_in, acc);
    lse = per_row_vector(lse_in, acc);
    out = alloc({in.rows, in.V}, logits.options());
  }
};

// The family's kernels, which each backend implements and registers through
// register_kernels (see DivergenceKernels, csrc/divergence_args.h).
struct LogprobsKernels {
  std::tuple<at::Tensor, at::Tensor> (*logprobs_forward)(const at::Tensor&, const at::Tensor&, double);
  at::Tensor (*logprobs_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
};

inline void register_kernels(torch::Library& m, const LogprobsKernels& k) {
  m.impl("logprobs_forward", k.logprobs_forward);
  m.impl("logprobs_backward", k.logprobs_backward);
}

}  // namespace kdext
