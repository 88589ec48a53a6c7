// CUDA adapters of the softmax family: softmax, log_softmax, softmax_backward,
// logsumexp, entropy_forward, entropy_backward. Checks (csrc/checks.h), device
// guard, current stream, then the framework-free launchers of
// csrc/include/kdext/cuda/softmax_kernels.cuh. Semantics: csrc/cpu/softmax.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "kdext/cuda/softmax_kernels.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

using kdext::cuda::RowTensor;

// A validated [rows, V] view of one logits-like tensor.
struct RowsInput {
  at::Tensor x;
  int64_t rows, V;

  RowsInput(const at::Tensor& logits, const char* name) {
    check_logits(logits, name);
    x = as_rows(logits);
    rows = x.size(0);
    V = x.size(1);
  }
  RowTensor tensor() const { return {x.const_data_ptr(), to_dtype(x.scalar_type()), x.stride(0), rows, V}; }
};

at::Tensor softmax_impl(const at::Tensor& logits, double temperature, bool log) {
  RowsInput in(logits, "logits");
  check_temperature(temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({in.rows, in.V}, logits.options());
  WorkspaceHolder ws(logits.device());
  C10_CUDA_CHECK(kdext::cuda::softmax_forward(in.tensor(), temperature, log, out.data_ptr(), ws.workspace(),
                                              current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(logits.sizes());
}

at::Tensor softmax(const at::Tensor& logits, double temperature) { return softmax_impl(logits, temperature, false); }
at::Tensor log_softmax(const at::Tensor& logits, double temperature) {
  return softmax_impl(logits, temperature, true);
}

at::Tensor softmax_backward(const at::Tensor& grad_output, const at::Tensor& output, double temperature, bool log) {
  RowsInput y(output, "output");
  check_temperature(temperature);
  check_softmax_grad(grad_output, output);
  const c10::cuda::CUDAGuard guard(output.device());
  // float64 only pairs with float64 in the kernels; converting grad_output to
  // the output's dtype is exactly what the CPU kernel's load into acc does then.
  const bool f64_mix = (grad_output.scalar_type() == at::kDouble) != (output.scalar_type() == at::kDouble);
  RowsInput g(f64_mix && is_supported_float(grad_output.scalar_type()) ? grad_output.to(output.scalar_type())
                                                                        : grad_output,
              "grad_output");
  at::Tensor grad = at::empty({y.rows, y.V}, output.options());
  WorkspaceHolder ws(output.device());
  C10_CUDA_CHECK(kdext::cuda::softmax_backward(g.tensor(), y.tensor(), temperature, log, grad.data_ptr(),
                                               ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad.view(output.sizes());
}

at::Tensor logsumexp(const at::Tensor& logits, double temperature) {
  RowsInput in(logits, "logits");
  check_temperature(temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({in.rows}, logits.options().dtype(acc_dtype(logits)));
  WorkspaceHolder ws(logits.device());
  C10_CUDA_CHECK(kdext::cuda::logsumexp(in.tensor(), temperature, out.data_ptr(), ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(row_shape(logits));
}

std::tuple<at::Tensor, at::Tensor> entropy_forward(const at::Tensor& logits, double temperature,
                                                   const std::optional<at::Tensor>& lse) {
  RowsInput in(logits, "logits");
  check_temperature(temperature);
  const auto acc = acc_dtype(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor ent = at::empty({in.rows}, logits.options().dtype(acc));
  at::Tensor lse_out;
  if (lse.has_value()) {
    check_per_row(*lse, "lse", in.rows, logits, "logits");
    // float64 for every input dtype, and a copy: an output never aliases an input.
    lse_out = lse->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous().reshape({-1});
  } else {
    lse_out = at::empty({in.rows}, logits.options().dtype(at::kDouble));
  }
  WorkspaceHolder ws(logits.device());
  C10_CUDA_CHECK(kdext::cuda::entropy_forward(in.tensor(), temperature,
                                              lse.has_value() ? lse_out.const_data_ptr() : nullptr, ent.data_ptr(),
                                              lse_out.data_ptr(), ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto shape = row_shape(logits);
  return {ent.view(shape), lse_out.view(shape)};
}

at::Tensor entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                            const at::Tensor& lse, double temperature) {
  RowsInput in(logits, "logits");
  check_temperature(temperature);
  const auto acc = acc_dtype(logits);
  check_per_row(grad, "grad", in.rows, logits, "logits");
  check_per_row(entropy, "entropy", in.rows, logits, "logits");
  check_per_row(lse, "lse", in.rows, logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = grad.to(acc).contiguous().reshape({-1});
  const at::Tensor h = entropy.to(acc).contiguous().reshape({-1});
  const at::Tensor l = lse.to(at::kDouble).contiguous().reshape({-1});
  at::Tensor out = at::empty({in.rows, in.V}, logits.options());
  C10_CUDA_CHECK(kdext::cuda::entropy_backward(in.tensor(), temperature, g.const_data_ptr(), h.const_data_ptr(),
                                               l.const_data_ptr(), out.data_ptr(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(logits.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  m.impl("softmax", &softmax);
  m.impl("log_softmax", &log_softmax);
  m.impl("softmax_backward", &softmax_backward);
  m.impl("logsumexp", &logsumexp);
  m.impl("entropy_forward", &entropy_forward);
  m.impl("entropy_backward", &entropy_backward);
}

}  // namespace cuda_adapter
}  // namespace kdext
