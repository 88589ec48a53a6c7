// The divergence family's adapter arguments, checked, converted and allocated
// once for both backends (csrc/cpu/divergence.cpp, csrc/cuda/divergence.cu):
// a backend only runs its kernels on them, so both raise the same errors and
// return the same shapes and dtypes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "adapter_args.h"
#include "checks.h"
#include "kdext/divergence.h"

namespace kdext {

// Student and teacher logits: same device, same shape, compatible dtypes.
inline void check_logit_pair(const at::Tensor& s, const at::Tensor& t) {
  check_logits(s, "student_logits");
  check_logits(t, "teacher_logits");
  check_same_device(s, "student_logits", t, "teacher_logits");
  TORCH_CHECK_VALUE(s.size(-1) == t.size(-1), "vocabulary size mismatch: student_logits has ", s.size(-1),
                    " entries in its last dimension, teacher_logits has ", t.size(-1));
  TORCH_CHECK_VALUE(s.sizes() == t.sizes(), "row shape mismatch: student_logits has shape ", s.sizes(),
                    " but teacher_logits has shape ", t.sizes());
  TORCH_CHECK_TYPE((s.scalar_type() == c10::kDouble) == (t.scalar_type() == c10::kDouble),
                   "student_logits is ", s.scalar_type(), " and teacher_logits is ", t.scalar_type(),
                   "; float64 cannot be mixed with lower precisions");
}

// "reverse_kl, forward_kl, ...": the known names, for error messages.
inline std::string divergence_names() {
  std::string out;
  for (const auto& e : kDivergenceNames) out += (out.empty() ? "" : ", ") + std::string(e.name);
  return out;
}

// Parses the divergence name and checks its parameter; applies the JSD
// convention (beta 0 / 1 are forward / reverse KL).
inline Divergence check_divergence(c10::string_view name, double param) {
  Divergence kind;
  const std::string n(name);
  TORCH_CHECK_VALUE(parse_divergence(n.c_str(), &kind), "unknown divergence '", n, "'; expected one of ",
                    divergence_names());
  if (const char* pname = divergence_param_name(kind)) {
    TORCH_CHECK_VALUE(param >= 0.0 && param <= 1.0, pname, " must be in [0, 1], got ", param);
  }
  return resolve_divergence(kind, param);
}

// divergence_forward's statistics, [rows, kStatsColumns].
inline void check_stats(const at::Tensor& stats, int64_t rows, const at::Tensor& like) {
  TORCH_CHECK_VALUE(stats.numel() == rows * kStatsColumns && stats.dim() >= 1 && stats.size(-1) == kStatsColumns,
                    "stats must have shape [rows, ", kStatsColumns, "] as returned by divergence_forward, got ",
                    stats.sizes());
  check_same_device(stats, "stats", like, "student_logits");
}

// Validated [rows, V] views of both logits and the parsed divergence.
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
};

// divergence_forward: per-row values and the statistics the backward reuses,
// both in the accumulation dtype.
struct DivergenceForwardArgs {
  PairInput in;
  at::Tensor values;  // [rows...]
  at::Tensor stats;   // [rows..., kStatsColumns]: lse_s, lse_t, c_s, c_t

  DivergenceForwardArgs(const at::Tensor& student, const at::Tensor& teacher, c10::string_view name, double param,
                        double temperature)
      : in(student, teacher, name, param, temperature) {
    auto rows_shape = row_shape(student);
    auto stats_shape = rows_shape;
    stats_shape.push_back(kStatsColumns);
    const auto opts = student.options().dtype(acc_dtype(student));
    values = at::empty(rows_shape, opts);
    stats = at::empty(stats_shape, opts);
  }
};

// divergence_backward: the upstream gradient and saved statistics as flat
// accumulation-dtype vectors, and the gradients asked for ([rows, V] in each
// input's dtype; an empty tensor where a gradient is not wanted).
struct DivergenceBackwardArgs {
  PairInput in;
  at::Tensor grad_values;  // [rows]
  at::Tensor stats;        // [rows, kStatsColumns]
  at::Tensor student_grad, teacher_grad;
  bool want_student_grad, want_teacher_grad;

  DivergenceBackwardArgs(const at::Tensor& grad_values_in, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& stats_in, c10::string_view name, double param, double temperature,
                         bool want_student, bool want_teacher, OutputAllocator alloc)
      : in(student, teacher, name, param, temperature), want_student_grad(want_student),
        want_teacher_grad(want_teacher) {
    const auto acc = acc_dtype(student);
    check_per_row(grad_values_in, "grad_values", in.rows, student, "student_logits");
    check_stats(stats_in, in.rows, student);
    grad_values = per_row_vector(grad_values_in, acc);
    stats = stats_in.to(acc).contiguous().reshape({-1, kStatsColumns});
    student_grad = want_student_grad ? alloc({in.rows, in.V}, student.options()) : at::empty({0}, student.options());
    teacher_grad = want_teacher_grad ? alloc({in.rows, in.V}, teacher.options()) : at::empty({0}, teacher.options());
  }

  // The gradients shaped like the inputs; a gradient not asked for stays the
  // zero-element tensor the schema returns for it.
  std::tuple<at::Tensor, at::Tensor> outputs(const at::Tensor& student, const at::Tensor& teacher) const {
    return {want_student_grad ? student_grad.view(student.sizes()) : student_grad,
            want_teacher_grad ? teacher_grad.view(teacher.sizes()) : teacher_grad};
  }
};

// divergence_loss: the row weights as a flat accumulation-dtype vector and the
// student's gradient, [rows, V] in the student's dtype.
struct DivergenceLossArgs {
  PairInput in;
  at::Tensor row_weights;  // [rows]
  at::Tensor grad;         // [rows, V]

  DivergenceLossArgs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weights_in,
                     c10::string_view name, double param, double temperature, OutputAllocator alloc)
      : in(student, teacher, name, param, temperature) {
    check_per_row(row_weights_in, "row_weights", in.rows, student, "student_logits");
    row_weights = per_row_vector(row_weights_in, acc_dtype(student));
    grad = alloc({in.rows, in.V}, student.options());
  }

  // divergence_loss_out: the gradient goes to the caller's buffer (the fused
  // LM-head losses reuse one per chunk of rows), which must be a contiguous
  // tensor of the student's shape and dtype that shares no storage with an input.
  DivergenceLossArgs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weights_in,
                     c10::string_view name, double param, double temperature, const at::Tensor& grad_out)
      : in(student, teacher, name, param, temperature) {
    check_per_row(row_weights_in, "row_weights", in.rows, student, "student_logits");
    check_same_device(grad_out, "grad_student", student, "student_logits");
    TORCH_CHECK_VALUE(grad_out.sizes() == student.sizes(), "grad_student must have the shape of student_logits ",
                      student.sizes(), ", got ", grad_out.sizes());
    TORCH_CHECK_TYPE(grad_out.scalar_type() == student.scalar_type(), "grad_student must have the dtype of "
                     "student_logits (", student.scalar_type(), "), got ", grad_out.scalar_type());
    TORCH_CHECK_VALUE(grad_out.is_contiguous(), "grad_student must be contiguous");
    for (const at::Tensor* x : {&student, &teacher, &row_weights_in}) {
      TORCH_CHECK(!grad_out.is_alias_of(*x), "grad_student must not share memory (a storage) with the inputs of "
                  "divergence_loss_out");
    }
    row_weights = per_row_vector(row_weights_in, acc_dtype(student));
    grad = grad_out.view({in.rows, in.V});
  }
};

// divergence_partial: both full-vocabulary log-normalisers as flat
// accumulation-dtype vectors and the [rows..., 3] partial sums.
struct DivergencePartialArgs {
  PairInput in;
  at::Tensor student_lse, teacher_lse;  // [rows]
  at::Tensor out;                       // [rows..., 3]: value, c_s, c_t

  DivergencePartialArgs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_lse_in,
                        const at::Tensor& teacher_lse_in, c10::string_view name, double param, double temperature)
      : in(student, teacher, name, param, temperature) {
    const auto acc = acc_dtype(student);
    check_per_row(student_lse_in, "student_lse", in.rows, student, "student_logits");
    check_per_row(teacher_lse_in, "teacher_lse", in.rows, student, "student_logits");
    student_lse = per_row_vector(student_lse_in, acc);
    teacher_lse = per_row_vector(teacher_lse_in, acc);
    auto shape = row_shape(student);
    shape.push_back(3);
    out = at::empty(shape, student.options().dtype(acc));
  }
};

// divergence_loss (the gradient in a new tensor, from the backend's allocator) and
// divergence_loss_out (into the caller's) of a backend, around its Run: the fused loss
// on prepared arguments, which writes the gradient into a.grad and returns the loss.
template <at::Tensor (*Run)(const DivergenceLossArgs&, const at::Tensor&, double, double), OutputAllocator Alloc>
struct DivergenceLossAdapters {
  static std::tuple<at::Tensor, at::Tensor> loss(const at::Tensor& student, const at::Tensor& teacher,
                                                 const at::Tensor& row_weights, c10::string_view name, double param,
                                                 double temperature) {
    const DivergenceLossArgs a(student, teacher, row_weights, name, param, temperature, Alloc);
    at::Tensor loss = Run(a, student, param, temperature);
    return {loss, a.grad.view(student.sizes())};
  }

  static at::Tensor loss_out(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weights,
                             c10::string_view name, double param, double temperature, at::Tensor& grad_student) {
    const DivergenceLossArgs a(student, teacher, row_weights, name, param, temperature, grad_student);
    return Run(a, student, param, temperature);
  }
};

// The family's kernels, which each backend implements and registers through
// register_kernels: both register the same ops, under the schema names of
// csrc/ops.cpp, with the same signatures.
struct DivergenceKernels {
  std::tuple<at::Tensor, at::Tensor> (*divergence_forward)(const at::Tensor&, const at::Tensor&, c10::string_view,
                                                           double, double);
  std::tuple<at::Tensor, at::Tensor> (*divergence_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, c10::string_view, double, double,
                                                            bool, bool);
  std::tuple<at::Tensor, at::Tensor> (*divergence_loss)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        c10::string_view, double, double);
  at::Tensor (*divergence_loss_out)(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double,
                                    double, at::Tensor&);
  at::Tensor (*divergence_partial)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   c10::string_view, double, double);
};

inline void register_kernels(torch::Library& m, const DivergenceKernels& k) {
  m.impl("divergence_forward", k.divergence_forward);
  m.impl("divergence_backward", k.divergence_backward);
  m.impl("divergence_loss", k.divergence_loss);
  m.impl("divergence_loss_out", k.divergence_loss_out);
  m.impl("divergence_partial", k.divergence_partial);
}

}  // namespace kdext

// The divergence kernels of the backend file that expands it: both backends' adapters
// (csrc/cpu/divergence.cpp, csrc/cuda/divergence.cu) carry the ops' names, so one list serves both.
#define KDEXT_DIVERGENCE_KERNELS                                                             \
  ::kdext::DivergenceKernels {                                                               \
    .divergence_forward = &divergence_forward, .divergence_backward = &divergence_backward,  \
    .divergence_loss = &divergence_loss, .divergence_loss_out = &divergence_loss_out,        \
    .divergence_partial = &divergence_partial                                                \
  }
