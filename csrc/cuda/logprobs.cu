// CUDA adapters for logprobs_forward and logprobs_backward: checks
// (csrc/checks.h), device guard, current stream, then the framework-free
// launchers of csrc/include/kdext/cuda/logprobs_kernels.cuh.
//
// One difference from csrc/cpu/logprobs.cpp, by design: a token outside
// [0, V) makes the CPU forward raise IndexError, while the CUDA forward writes
// NaN for that row (checking would need a device-to-host sync); it never
// reads out of bounds. The backward treats such tokens like the CPU: no
// one-hot term.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "kdext/cuda/logprobs_kernels.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

kdext::cuda::RowTensor row_tensor(const at::Tensor& x) {
  return {x.const_data_ptr(), to_dtype(x.scalar_type()), x.stride(0), x.size(0), x.size(1)};
}

std::tuple<at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits, const at::Tensor& tokens,
                                                    double temperature) {
  check_logits(logits, "logits");
  check_temperature(temperature);
  check_tokens(tokens, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = as_rows(logits);
  const int64_t rows = x.size(0);
  const at::Tensor tok = tokens.to(at::kLong).contiguous().reshape({-1});
  const auto acc = acc_dtype(logits);
  at::Tensor out = at::empty({rows}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(acc));
  WorkspaceHolder ws(logits.device());
  C10_CUDA_CHECK(kdext::cuda::logprobs_forward(row_tensor(x), tok.const_data_ptr<int64_t>(), temperature,
                                               out.data_ptr(), lse.data_ptr(), ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto shape = row_shape(logits);
  return {out.view(shape), lse.view(shape)};
}

at::Tensor logprobs_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& tokens,
                             const at::Tensor& lse, double temperature) {
  check_logits(logits, "logits");
  check_temperature(temperature);
  check_tokens(tokens, logits);
  const at::Tensor x = as_rows(logits);
  const int64_t rows = x.size(0), V = x.size(1);
  check_per_row(grad, "grad", rows, logits, "logits");
  check_per_row(lse, "lse", rows, logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_dtype(logits);
  const at::Tensor tok = tokens.to(at::kLong).contiguous().reshape({-1});
  const at::Tensor g = grad.to(acc).contiguous().reshape({-1});
  const at::Tensor l = lse.to(acc).contiguous().reshape({-1});
  at::Tensor out = at::empty({rows, V}, logits.options());
  C10_CUDA_CHECK(kdext::cuda::logprobs_backward(row_tensor(x), tok.const_data_ptr<int64_t>(), temperature,
                                                g.const_data_ptr(), l.const_data_ptr(), out.data_ptr(),
                                                current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(logits.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}

}  // namespace cuda_adapter
}  // namespace kdext
