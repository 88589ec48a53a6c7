// CUDA adapters of the divergence family: divergence_forward,
// divergence_backward, divergence_loss, divergence_partial and scale_.
//
// Each adapter checks its inputs (csrc/checks.h, the same words as the CPU
// kernels), takes a device guard and the current stream, and calls a
// framework-free launcher from csrc/include/kdext/cuda/divergence_kernels.cuh.
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
#include "kdext/cuda/divergence_kernels.cuh"

namespace kdext {
namespace cuda_adapter {
namespace {

using kdext::cuda::PairTensors;

struct PairInput {
  at::Tensor s, t;  // [rows, V], unit stride in V
  int64_t rows, V;
  Divergence kind;

  PairInput(const at::Tensor& student, const at::Tensor& teacher, c10::string_view name, double param,
            double temperature) {
    check_logit_pair(student, teacher);
    check_temperature(temperature);
    kind = check_divergence(name, param);
    s = as_rows(student);
    t = as_rows(teacher);
    rows = s.size(0);
    V = s.size(1);
  }

  PairTensors tensors() const {
    return {s.const_data_ptr(), to_dtype(s.scalar_type()), s.stride(0),
            t.const_data_ptr(), to_dtype(t.scalar_type()), t.stride(0),
            rows,               V};
  }
};

std::tuple<at::Tensor, at::Tensor> divergence_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                      c10::string_view name, double param, double temperature) {
  PairInput in(student, teacher, name, param, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  auto rows_shape = row_shape(student);
  auto stats_shape = rows_shape;
  stats_shape.push_back(kStatsColumns);
  const auto opts = student.options().dtype(acc_dtype(student));
  at::Tensor values = at::empty(rows_shape, opts);
  at::Tensor stats = at::empty(stats_shape, opts);
  WorkspaceHolder ws(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_forward(in.tensors(), in.kind, param, temperature, values.data_ptr(),
                                                 stats.data_ptr(), ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, stats};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward(const at::Tensor& grad_values, const at::Tensor& student,
                                                       const at::Tensor& teacher, const at::Tensor& stats,
                                                       c10::string_view name, double param, double temperature,
                                                       bool student_grad, bool teacher_grad) {
  PairInput in(student, teacher, name, param, temperature);
  const auto acc = acc_dtype(student);
  check_per_row(grad_values, "grad_values", in.rows, student, "student_logits");
  check_stats(stats, in.rows, student);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor g = grad_values.to(acc).contiguous().reshape({-1});
  const at::Tensor st = stats.to(acc).contiguous().reshape({-1, kStatsColumns});
  at::Tensor gs = student_grad ? at::empty({in.rows, in.V}, student.options()) : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? at::empty({in.rows, in.V}, teacher.options()) : at::empty({0}, teacher.options());
  C10_CUDA_CHECK(kdext::cuda::divergence_backward(
      in.tensors(), in.kind, param, temperature, g.const_data_ptr(), st.const_data_ptr(),
      student_grad ? gs.data_ptr() : nullptr, teacher_grad ? gt.data_ptr() : nullptr, current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (student_grad) gs = gs.view(student.sizes());
  if (teacher_grad) gt = gt.view(teacher.sizes());
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor> divergence_loss(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& row_weights, c10::string_view name,
                                                   double param, double temperature) {
  PairInput in(student, teacher, name, param, temperature);
  const auto acc = acc_dtype(student);
  check_per_row(row_weights, "row_weights", in.rows, student, "student_logits");
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor w = row_weights.to(acc).contiguous().reshape({-1});
  at::Tensor grad = at::empty({in.rows, in.V}, student.options());
  at::Tensor loss = at::empty({}, student.options().dtype(acc));
  WorkspaceHolder ws(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_loss(in.tensors(), in.kind, param, temperature, w.const_data_ptr(),
                                              loss.data_ptr(), grad.data_ptr(), ws.workspace(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad.view(student.sizes())};
}

at::Tensor divergence_partial(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_lse,
                              const at::Tensor& teacher_lse, c10::string_view name, double param,
                              double temperature) {
  PairInput in(student, teacher, name, param, temperature);
  const auto acc = acc_dtype(student);
  check_per_row(student_lse, "student_lse", in.rows, student, "student_logits");
  check_per_row(teacher_lse, "teacher_lse", in.rows, student, "student_logits");
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor ls = student_lse.to(acc).contiguous().reshape({-1});
  const at::Tensor lt = teacher_lse.to(acc).contiguous().reshape({-1});
  auto shape = row_shape(student);
  shape.push_back(3);
  at::Tensor out = at::empty(shape, student.options().dtype(acc));
  WorkspaceHolder ws(student.device());
  C10_CUDA_CHECK(kdext::cuda::divergence_partial(in.tensors(), in.kind, param, temperature, ls.const_data_ptr(),
                                                 lt.const_data_ptr(), out.data_ptr(), ws.workspace(),
                                                 current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
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
