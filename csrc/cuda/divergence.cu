// CUDA adapters of the divergence family: divergence_forward,
// divergence_backward, divergence_loss, divergence_partial and scale_.
//
// Each adapter checks its inputs (csrc/checks.h, the same words as the CPU
// kernels), takes a device guard and the current stream, and calls a
// framework-free launcher from csrc/include/kdext/cuda/divergence_launchers.cuh (scale_: common_kernels.cuh).
// Outputs and semantics are those of csrc/cpu/divergence.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "divergence_args.h"
#include "kdext/cuda/common_kernels.cuh"
#include "kdext/cuda/divergence_launchers.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

using kdext::cuda::PairTensors;

// Both validated inputs as the launchers take them.
PairTensors pair_tensors(const PairInput& in) {
  return {in.s.const_data_ptr(), to_dtype(in.s.scalar_type()), in.s.stride(0),
          in.t.const_data_ptr(), to_dtype(in.t.scalar_type()), in.t.stride(0),
          in.rows,               in.V};
}

std::tuple<at::Tensor, at::Tensor> divergence_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                      c10::string_view name, double param, double temperature) {
  DivergenceForwardArgs a(student, teacher, name, param, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  WorkspaceHolder ws(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_forward(pair_tensors(a.in), a.in.kind, param, temperature,
                                                 a.values.data_ptr(), a.stats.data_ptr(), ws.workspace(),
                                                 current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.values, a.stats};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward(const at::Tensor& grad_values, const at::Tensor& student,
                                                       const at::Tensor& teacher, const at::Tensor& stats,
                                                       c10::string_view name, double param, double temperature,
                                                       bool student_grad, bool teacher_grad) {
  DivergenceBackwardArgs a(grad_values, student, teacher, stats, name, param, temperature, student_grad,
                           teacher_grad, &empty_device_output);
  const c10::cuda::CUDAGuard guard(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_backward(
      pair_tensors(a.in), a.in.kind, param, temperature, a.grad_values.const_data_ptr(), a.stats.const_data_ptr(),
      student_grad ? a.student_grad.data_ptr() : nullptr, teacher_grad ? a.teacher_grad.data_ptr() : nullptr,
      current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.outputs(student, teacher);
}

std::tuple<at::Tensor, at::Tensor> divergence_loss(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& row_weights, c10::string_view name,
                                                   double param, double temperature) {
  DivergenceLossArgs a(student, teacher, row_weights, name, param, temperature, &empty_device_output);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({}, student.options().dtype(acc_dtype(student)));
  WorkspaceHolder ws(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_loss(pair_tensors(a.in), a.in.kind, param, temperature,
                                              a.row_weights.const_data_ptr(), loss.data_ptr(), a.grad.data_ptr(),
                                              ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, a.grad.view(student.sizes())};
}

at::Tensor divergence_partial(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_lse,
                              const at::Tensor& teacher_lse, c10::string_view name, double param,
                              double temperature) {
  DivergencePartialArgs a(student, teacher, student_lse, teacher_lse, name, param, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  WorkspaceHolder ws(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_partial(pair_tensors(a.in), a.in.kind, param, temperature,
                                                 a.student_lse.const_data_ptr(), a.teacher_lse.const_data_ptr(),
                                                 a.out.data_ptr(), ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
}

// self *= factor, skipped when factor == 1. The factor is read on the device,
// inside the kernel, so that no host synchronisation happens.
void scale_(at::Tensor& self, const at::Tensor& factor) {
  check_scale_factor(factor, self);
  if (self.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(self.device());
  const bool fast = self.is_contiguous() && is_supported_float(self.scalar_type());
  if (!fast) {  // still no sync; x * 1 == x, so skipping is only an optimisation
    self.mul_(factor.reshape({}));
    return;
  }
  const at::Tensor f = is_supported_float(factor.scalar_type()) ? factor : factor.to(at::kDouble);
  C10_CUDA_CHECK(kdext::cuda::scale_inplace(self.data_ptr(), to_dtype(self.scalar_type()), self.numel(),
                                            f.const_data_ptr(), to_dtype(f.scalar_type()), 1.0, current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  m.impl("divergence_forward", &divergence_forward);
  m.impl("divergence_backward", &divergence_backward);
  m.impl("divergence_loss", &divergence_loss);
  m.impl("divergence_partial", &divergence_partial);
  m.impl("scale_", &scale_);
}

}  // namespace cuda_adapter
}  // namespace kdext
