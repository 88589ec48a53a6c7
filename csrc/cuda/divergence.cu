// CUDA adapters of the divergence family: divergence_forward,
// divergence_backward, divergence_loss, divergence_loss_out and
// divergence_partial.
//
// Each adapter checks its inputs (csrc/divergence_args.h, the same words as the
// CPU kernels) and runs a framework-free launcher of
// csrc/include/kdext/cuda/divergence_launchers.cuh through run_launcher
// (csrc/cuda/adapter_utils.h: device guard, current stream, workspace, errors).
// Outputs and semantics are those of csrc/cpu/divergence.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "divergence_args.h"
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
  run_launcher(student.device(), kdext::cuda::divergence_forward, pair_tensors(a.in), a.in.kind, param, temperature,
               a.values.data_ptr(), a.stats.data_ptr());
  return {a.values, a.stats};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward(const at::Tensor& grad_values, const at::Tensor& student,
                                                       const at::Tensor& teacher, const at::Tensor& stats,
                                                       c10::string_view name, double param, double temperature,
                                                       bool student_grad, bool teacher_grad) {
  DivergenceBackwardArgs a(grad_values, student, teacher, stats, name, param, temperature, student_grad,
                           teacher_grad, &empty_device_output);
  run_launcher(student.device(), kdext::cuda::divergence_backward, pair_tensors(a.in), a.in.kind, param, temperature,
               a.grad_values.const_data_ptr(), a.stats.const_data_ptr(),
               student_grad ? a.student_grad.data_ptr() : nullptr, teacher_grad ? a.teacher_grad.data_ptr() : nullptr);
  return a.outputs(student, teacher);
}

// The fused loss on prepared arguments: writes the gradient into a.grad and
// returns the loss (a device scalar; no host synchronisation).
at::Tensor run_divergence_loss(const DivergenceLossArgs& a, const at::Tensor& student, double param,
                               double temperature) {
  at::Tensor loss = at::empty({}, student.options().dtype(acc_dtype(student)));
  run_launcher(student.device(), kdext::cuda::divergence_loss, pair_tensors(a.in), a.in.kind, param, temperature,
               a.row_weights.const_data_ptr(), loss.data_ptr(), a.grad.data_ptr());
  return loss;
}

std::tuple<at::Tensor, at::Tensor> divergence_loss(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& row_weights, c10::string_view name,
                                                   double param, double temperature) {
  const DivergenceLossArgs a(student, teacher, row_weights, name, param, temperature, &empty_device_output);
  at::Tensor loss = run_divergence_loss(a, student, param, temperature);
  return {loss, a.grad.view(student.sizes())};
}

at::Tensor divergence_loss_out(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weights,
                               c10::string_view name, double param, double temperature, at::Tensor& grad_student) {
  const DivergenceLossArgs a(student, teacher, row_weights, name, param, temperature, grad_student);
  return run_divergence_loss(a, student, param, temperature);
}

at::Tensor divergence_partial(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_lse,
                              const at::Tensor& teacher_lse, c10::string_view name, double param,
                              double temperature) {
  DivergencePartialArgs a(student, teacher, student_lse, teacher_lse, name, param, temperature);
  run_launcher(student.device(), kdext::cuda::divergence_partial, pair_tensors(a.in), a.in.kind, param, temperature,
               a.student_lse.const_data_ptr(), a.teacher_lse.const_data_ptr(), a.out.data_ptr());
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  register_kernels(m, {.divergence_forward = &divergence_forward,
                       .divergence_backward = &divergence_backward,
                       .divergence_loss = &divergence_loss,
                       .divergence_loss_out = &divergence_loss_out,
                       .divergence_partial = &divergence_partial});
}

}  // namespace cuda_adapter
}  // namespace kdext
