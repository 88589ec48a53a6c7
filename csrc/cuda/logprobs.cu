// CUDA adapters for logprobs_forward and logprobs_backward: checks
// (csrc/logprobs_args.h), then the framework-free launchers of
// csrc/include/kdext/cuda/logprobs_launchers.cuh through run_launcher
// (csrc/cuda/adapter_utils.h: device guard, current stream, workspace, errors).
//
// One difference from csrc/cpu/logprobs.cpp, by design: a token outside
// [0, V) makes the CPU forward raise IndexError, while the CUDA forward writes
// NaN for that row (checking would need a device-to-host sync); it never
// reads out of bounds. The backward treats such tokens like the CPU: no
// one-hot term.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "logprobs_args.h"
#include "kdext/cuda/logprobs_launchers.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

// The validated logits as the launchers take them.
kdext::cuda::RowTensor row_tensor(const RowsInput& in) {
  return {in.x.const_data_ptr(), to_dtype(in.x.scalar_type()), in.x.stride(0), in.rows, in.V};
}

std::tuple<at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits, const at::Tensor& tokens,
                                                    double temperature) {
  LogprobsForwardArgs a(logits, tokens, temperature);
  run_launcher(logits.device(), kdext::cuda::logprobs_forward, row_tensor(a.in), a.tokens.const_data_ptr<int64_t>(),
               temperature, a.out.data_ptr(), a.lse.data_ptr());
  const auto shape = row_shape(logits);
  return {a.out.view(shape), a.lse.view(shape)};
}

at::Tensor logprobs_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& tokens,
                             const at::Tensor& lse, double temperature) {
  LogprobsBackwardArgs a(grad, logits, tokens, lse, temperature, &empty_device_output);
  run_launcher(logits.device(), kdext::cuda::logprobs_backward, row_tensor(a.in), a.tokens.const_data_ptr<int64_t>(),
               temperature, a.grad.const_data_ptr(), a.lse.const_data_ptr(), a.out.data_ptr());
  return a.out.view(logits.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  register_kernels(m, {.logprobs_forward = &logprobs_forward, .logprobs_backward = &logprobs_backward});
}

}  // namespace cuda_adapter
}  // namespace kdext
