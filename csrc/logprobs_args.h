// The log-prob ops' adapter arguments, checked, converted and allocated once
// for both backends (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "adapter_args.h"
#include "checks.h"

namespace kdext {

// The logits, and the tokens as a flat int64 vector, one per row.
struct TokenRowsInput {
  RowsInput in;
  at::Tensor tokens;  // [rows], int64

  TokenRowsInput(const at::Tensor& logits, const at::Tensor& tokens_in, double temperature)
      : in(logits, "logits") {
    check_temperature(temperature);
    check_tokens(tokens_in, logits);
    tokens = per_row_vector(tokens_in, at::kLong);
  }
};

// logprobs_forward: the log-probs and per-row lse, in the accumulation dtype.
struct LogprobsForwardArgs : TokenRowsInput {
  at::Tensor out, lse;  // [rows]

  LogprobsForwardArgs(const at::Tensor& logits, const at::Tensor& tokens_in, double temperature)
      : TokenRowsInput(logits, tokens_in, temperature) {
    const auto opts = logits.options().dtype(acc_dtype(logits));
    out = at::empty({in.rows}, opts);
    lse = at::empty({in.rows}, opts);
  }
};

// logprobs_backward: the upstream gradient and saved lse (accumulation dtype)
// and the [rows, V] gradient in the logits' dtype.
struct LogprobsBackwardArgs : TokenRowsInput {
  at::Tensor grad, lse;  // [rows]
  at::Tensor out;

  LogprobsBackwardArgs(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& tokens_in,
                       const at::Tensor& lse_in, double temperature, OutputAllocator alloc)
      : TokenRowsInput(logits, tokens_in, temperature) {
    const auto acc = acc_dtype(logits);
    check_per_row(grad_in, "grad", in.rows, logits, "logits");
    check_per_row(lse_in, "lse", in.rows, logits, "logits");
    grad = per_row_vector(grad_in, acc);
    lse = per_row_vector(lse_in, acc);
    out = alloc({in.rows, in.V}, logits.options());
  }
};

}  // namespace kdext
