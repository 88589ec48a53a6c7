// The softmax family's adapter arguments, checked, converted and allocated
// once for both backends (csrc/cpu/softmax.cpp, csrc/cuda/softmax.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "adapter_args.h"
#include "checks.h"

namespace kdext {

// softmax / log_softmax: the logits and a [rows, V] output in their dtype.
struct SoftmaxArgs {
  RowsInput in;
  at::Tensor out;

  SoftmaxArgs(const at::Tensor& logits, double temperature, OutputAllocator alloc) : in(logits, "logits") {
    check_temperature(temperature);
    out = alloc({in.rows, in.V}, logits.options());
  }
};

// softmax_backward's upstream gradient: the output's shape and device.
inline void check_softmax_grad(const at::Tensor& grad_output, const at::Tensor& output) {
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes(), "grad_output has shape ", grad_output.sizes(),
                    " but output has shape ", output.sizes());
  check_same_device(grad_output, "grad_output", output, "output");
}

// softmax_backward: the forward's output, the upstream gradient and the
// [rows, V] input gradient in the output's dtype.
struct SoftmaxBackwardArgs {
  RowsInput output;
  RowsInput grad_output;
  at::Tensor grad;

  SoftmaxBackwardArgs(const at::Tensor& grad_output_in, const at::Tensor& output_in, double temperature,
                      OutputAllocator alloc)
      : output(output_in, "output"), grad_output(grad_output_in, "grad_output") {
    check_temperature(temperature);
    check_softmax_grad(grad_output_in, output_in);
    // float64 pairs only with float64 in the kernels: when exactly one of the
    // two is float64, grad_output takes the output's dtype. That is the value
    // the accumulation dtype (the output's) would round it to anyway.
    const auto out_dtype = output.x.scalar_type();
    if ((grad_output.x.scalar_type() == at::kDouble) != (out_dtype == at::kDouble))
      grad_output.x = grad_output.x.to(out_dtype);
    grad = alloc({output.rows, output.V}, output_in.options());
  }
};

// logsumexp and lse_float64: the logits and one value per row, in the
// accumulation dtype (logsumexp) or in float64 (lse_float64).
struct LseArgs {
  RowsInput in;
  at::Tensor out;  // [rows]

  LseArgs(const at::Tensor& logits, double temperature, c10::ScalarType out_dtype) : in(logits, "logits") {
    check_temperature(temperature);
    out = at::empty({in.rows}, logits.options().dtype(out_dtype));
  }
};

// entropy_forward: per-row entropies (accumulation dtype) and the float64
// log-normaliser, which is a copy of `lse` when one is given (a shard's
// partial entropy against the full vocabulary's lse; outputs never alias
// inputs) and is computed by the kernel otherwise.
struct EntropyForwardArgs {
  RowsInput in;
  at::Tensor entropy;  // [rows]
  at::Tensor lse;      // [rows], float64
  bool lse_given;

  EntropyForwardArgs(const at::Tensor& logits, double temperature, const std::optional<at::Tensor>& lse_in)
      : in(logits, "logits"), lse_given(lse_in.has_value()) {
    check_temperature(temperature);
    entropy = at::empty({in.rows}, logits.options().dtype(acc_dtype(logits)));
    if (lse_given) {
      check_per_row(*lse_in, "lse", in.rows, logits, "logits");
      lse = lse_in->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous().reshape({-1});
    } else {
      lse = at::empty({in.rows}, logits.options().dtype(at::kDouble));
    }
  }
};

// entropy_backward: the upstream gradient and saved entropy (accumulation
// dtype), the saved float64 lse, and the [rows, V] gradient in the logits' dtype.
struct EntropyBackwardArgs {
  RowsInput in;
  at::Tensor grad, entropy, lse;  // [rows]
  at::Tensor out;

  EntropyBackwardArgs(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& entropy_in,
                      const at::Tensor& lse_in, double temperature, OutputAllocator alloc)
      : in(logits, "logits") {
    check_temperature(temperature);
    const auto acc = acc_dtype(logits);
    check_per_row(grad_in, "grad", in.rows, logits, "logits");
    check_per_row(entropy_in, "entropy", in.rows, logits, "logits");
    check_per_row(lse_in, "lse", in.rows, logits, "logits");
    grad = per_row_vector(grad_in, acc);
    entropy = per_row_vector(entropy_in, acc);
    lse = per_row_vector(lse_in, at::kDouble);
    out = alloc({in.rows, in.V}, logits.options());
  }
};

// The family's kernels, which each backend implements and registers through
// register_kernels (see DivergenceKernels, csrc/divergence_args.h).
struct SoftmaxKernels {
  at::Tensor (*softmax)(const at::Tensor&, double);
  at::Tensor (*log_softmax)(const at::Tensor&, double);
  at::Tensor (*softmax_backward)(const at::Tensor&, const at::Tensor&, double, bool);
  at::Tensor (*logsumexp)(const at::Tensor&, double);
  at::Tensor (*lse_float64)(const at::Tensor&, double);
  std::tuple<at::Tensor, at::Tensor> (*entropy_forward)(const at::Tensor&, double, const std::optional<at::Tensor>&);
  at::Tensor (*entropy_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
};

inline void register_kernels(torch::Library& m, const SoftmaxKernels& k) {
  m.impl("softmax", k.softmax);
  m.impl("log_softmax", k.log_softmax);
  m.impl("softmax_backward", k.softmax_backward);
  m.impl("logsumexp", k.logsumexp);
  m.impl("lse_float64", k.lse_float64);
  m.impl("entropy_forward", k.entropy_forward);
  m.impl("entropy_backward", k.entropy_backward);
}

}  // namespace kdext

// The softmax kernels of the backend file that expands it: both backends' adapters
// (csrc/cpu/softmax.cpp, csrc/cuda/softmax.cu) carry the ops' names, so one list serves both.
#define KDEXT_SOFTMAX_KERNELS                                          \
  ::kdext::SoftmaxKernels {                                            \
    .softmax = &softmax, .log_softmax = &log_softmax,                  \
    .softmax_backward = &softmax_backward, .logsumexp = &logsumexp,    \
    .lse_float64 = &lse_float64, .entropy_forward = &entropy_forward,  \
    .entropy_backward = &entropy_backward                              \
  }
