// CUDA adapters of the softmax family: softmax, log_softmax, softmax_backward,
// logsumexp, lse_float64, entropy_forward, entropy_backward. Checks
// (csrc/softmax_args.h), then the framework-free launchers of
// csrc/include/kdext/cuda/softmax_launchers.cuh through run_launcher
// (csrc/cuda/adapter_utils.h: device guard, current stream, workspace,
// errors). Semantics: csrc/cpu/softmax.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "softmax_args.h"
#include "kdext/cuda/softmax_launchers.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

using kdext::cuda::RowTensor;

// One validated input as the launchers take it.
RowTensor row_tensor(const RowsInput& in) {
  return {in.x.const_data_ptr(), to_dtype(in.x.scalar_type()), in.x.stride(0), in.rows, in.V};
}

at::Tensor softmax_impl(const at::Tensor& logits, double temperature, bool log) {
  SoftmaxArgs a(logits, temperature, &empty_device_output);
  run_launcher(logits.device(), kdext::cuda::softmax_forward, row_tensor(a.in), temperature, log, a.out.data_ptr());
  return a.out.view(logits.sizes());
}

at::Tensor softmax(const at::Tensor& logits, double temperature) { return softmax_impl(logits, temperature, false); }
at::Tensor log_softmax(const at::Tensor& logits, double temperature) {
  return softmax_impl(logits, temperature, true);
}

at::Tensor softmax_backward(const at::Tensor& grad_output, const at::Tensor& output, double temperature, bool log) {
  SoftmaxBackwardArgs a(grad_output, output, temperature, &empty_device_output);
  run_launcher(output.device(), kdext::cuda::softmax_backward, row_tensor(a.grad_output), row_tensor(a.output),
               temperature, log, a.grad.data_ptr());
  return a.grad.view(output.sizes());
}

at::Tensor logsumexp(const at::Tensor& logits, double temperature) {
  LseArgs a(logits, temperature, acc_dtype(logits));
  run_launcher(logits.device(), kdext::cuda::logsumexp, row_tensor(a.in), temperature, a.out.data_ptr());
  return a.out.view(row_shape(logits));
}

at::Tensor lse_float64(const at::Tensor& logits, double temperature) {
  LseArgs a(logits, temperature, at::kDouble);
  run_launcher(logits.device(), kdext::cuda::lse_float64, row_tensor(a.in), temperature, a.out.data_ptr());
  return a.out.view(row_shape(logits));
}

std::tuple<at::Tensor, at::Tensor> entropy_forward(const at::Tensor& logits, double temperature,
                                                   const std::optional<at::Tensor>& lse) {
  EntropyForwardArgs a(logits, temperature, lse);
  run_launcher(logits.device(), kdext::cuda::entropy_forward, row_tensor(a.in), temperature,
               a.lse_given ? a.lse.const_data_ptr() : nullptr, a.entropy.data_ptr(), a.lse.data_ptr());
  const auto shape = row_shape(logits);
  return {a.entropy.view(shape), a.lse.view(shape)};
}

at::Tensor entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                            const at::Tensor& lse, double temperature) {
  EntropyBackwardArgs a(grad, logits, entropy, lse, temperature, &empty_device_output);
  run_launcher(logits.device(), kdext::cuda::entropy_backward, row_tensor(a.in), temperature, a.grad.const_data_ptr(),
               a.entropy.const_data_ptr(), a.lse.const_data_ptr(), a.out.data_ptr());
  return a.out.view(logits.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  register_kernels(m, {.softmax = &softmax,
                       .log_softmax = &log_softmax,
                       .softmax_backward = &softmax_backward,
                       .logsumexp = &logsumexp,
                       .lse_float64 = &lse_float64,
                       .entropy_forward = &entropy_forward,
                       .entropy_backward = &entropy_backward});
}

}  // namespace cuda_adapter
}  // namespace kdext
