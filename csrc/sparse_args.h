// The sparse family's adapter arguments (topk_logprobs, sparse_forward,
// sparse_backward, sparse_loss), checked, converted and allocated once for
// both backends (csrc/cpu/sparse.cpp, csrc/cuda/sparse.cu): one <Op>Args
// struct per op over the shared validated inputs (RowsInput, SparseInput).
// kdext/sparse.py runs the same checks first, with the same words, for fake
// tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "adapter_args.h"
#include "checks.h"
#include "divergence_args.h"
#include "kdext/sparse.h"

namespace kdext {

inline sparse::Tail check_tail(c10::string_view tail) {
  sparse::Tail t;
  const std::string n(tail);
  TORCH_CHECK_VALUE(sparse::parse_tail(n.c_str(), &t), "tail must be 'bucket' or 'renormalize', got '", n, "'");
  return t;
}

// Ids are int32: the vocabulary must fit.
inline void check_int32_vocab(int64_t V, const char* name) {
  TORCH_CHECK_VALUE(V <= std::numeric_limits<int32_t>::max(), name, " has a vocabulary of ", V,
                    " entries; int32 ids need at most 2^31 - 1");
}

inline void check_topk_k(int64_t k, int64_t V) {
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= V, "k = ", k, " exceeds the vocabulary size ", V, " (the logits' last dimension)");
}

// "[2, 3, k]" for leading dims [2, 3].
inline std::string slots_shape(const std::vector<int64_t>& rows) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < rows.size(); ++i) s << rows[i] << ", ";
  s << "k]";
  return s.str();
}

// teacher_ids [rows..., k] (int64 / int32) and teacher_logprobs of the same
// shape (any float dtype), on the student's device.
inline void check_teacher(const at::Tensor& ids, const at::Tensor& logprobs, const at::Tensor& student) {
  TORCH_CHECK_TYPE(ids.scalar_type() == c10::kLong || ids.scalar_type() == c10::kInt,
                   "teacher_ids must be int64 or int32, got ", ids.scalar_type());
  check_same_device(ids, "teacher_ids", student, "student_logits");
  const auto rows = row_shape(student);
  const bool leading_ok =
      ids.dim() == student.dim() && ids.sizes().slice(0, ids.dim() - 1) == c10::IntArrayRef(rows);
  TORCH_CHECK_VALUE(leading_ok, "teacher_ids must have shape ", slots_shape(rows),
                    " (the student_logits' leading dims, then k slots), got ", ids.sizes());
  TORCH_CHECK_VALUE(ids.size(-1) > 0, "teacher_ids has no slots (last dimension of size 0)");
  TORCH_CHECK_TYPE(is_supported_float(logprobs.scalar_type()),
                   "teacher_logprobs must be float32, float16, bfloat16 or float64, got ", logprobs.scalar_type());
  check_same_device(logprobs, "teacher_logprobs", student, "student_logits");
  TORCH_CHECK_VALUE(logprobs.sizes() == ids.sizes(), "teacher_logprobs must have the shape of teacher_ids ",
                    ids.sizes(), ", got ", logprobs.sizes());
}

// ---- topk_logprobs ---------------------------------------------------------------

// topk_logprobs: the logits; int32 ids and log-probs (accumulation dtype)
// [rows..., k]; lse [rows...].
struct TopkLogprobsArgs {
  RowsInput in;
  int64_t k;
  at::Tensor ids, logprobs, lse;

  TopkLogprobsArgs(const at::Tensor& logits, int64_t k_in, double temperature) : in(logits, "logits"), k(k_in) {
    check_topk_k(k, in.V);
    check_temperature(temperature);
    check_int32_vocab(in.V, "logits");
    auto shape = row_shape(logits);
    const auto acc = logits.options().dtype(acc_dtype(logits));
    lse = at::empty(shape, acc);
    shape.push_back(k);
    ids = at::empty(shape, logits.options().dtype(at::kInt));
    logprobs = at::empty(shape, acc);
  }
};

// ---- the sparse loss -----------------------------------------------------------------

// Validated [rows, V] student logits, the teacher's ids as [rows, k] int64 and
// log-probs as [rows, k] float64 (exact for every stored dtype; k is small),
// the parsed divergence and tail mode.
struct SparseInput {
  RowsInput student;
  at::Tensor ids;       // [rows, k] int64, contiguous
  at::Tensor logprobs;  // [rows, k] float64, contiguous
  int64_t k;
  Divergence kind;
  sparse::Tail tail;

  SparseInput(const at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
              c10::string_view name, double param, double temperature, c10::string_view tail_name)
      : student(student_logits, "student_logits") {
    check_teacher(teacher_ids, teacher_logprobs, student_logits);
    check_temperature(temperature);
    kind = check_divergence(name, param);
    tail = check_tail(tail_name);
    k = teacher_ids.size(-1);
    ids = teacher_ids.to(at::kLong).contiguous().reshape({student.rows, k});
    logprobs = teacher_logprobs.to(at::kDouble).contiguous().reshape({student.rows, k});
  }
};

// sparse_forward: per-row values and the statistics of the backward, both in
// the accumulation dtype.
struct SparseForwardArgs {
  SparseInput in;
  at::Tensor values;  // [rows...]
  at::Tensor stats;   // [rows..., kStatsColumns]

  SparseForwardArgs(const at::Tensor& s, const at::Tensor& ids, const at::Tensor& lp, c10::string_view name,
                    double param, double temperature, c10::string_view tail)
      : in(s, ids, lp, name, param, temperature, tail) {
    auto shape = row_shape(s);
    const auto opts = s.options().dtype(acc_dtype(s));
    values = at::empty(shape, opts);
    shape.push_back(sparse::kStatsColumns);
    stats = at::empty(shape, opts);
  }
};

inline void check_sparse_stats(const at::Tensor& stats, int64_t rows, const at::Tensor& like) {
  constexpr int64_t C = sparse::kStatsColumns;
  TORCH_CHECK_VALUE(stats.numel() == rows * C && stats.dim() >= 1 && stats.size(-1) == C,
                    "stats must have shape [rows, ", C, "] as returned by sparse_forward, got ", stats.sizes());
  check_same_device(stats, "stats", like, "student_logits");
}

// sparse_backward: the upstream gradient and the saved statistics as
// accumulation-dtype vectors, and the [rows, V] student gradient in its dtype.
struct SparseBackwardArgs {
  SparseInput in;
  at::Tensor grad_values;  // [rows]
  at::Tensor stats;        // [rows, kStatsColumns]
  at::Tensor grad;         // [rows, V]

  SparseBackwardArgs(const at::Tensor& grad_values_in, const at::Tensor& s, const at::Tensor& ids,
                     const at::Tensor& lp, const at::Tensor& stats_in, c10::string_view name, double param,
                     double temperature, c10::string_view tail, OutputAllocator alloc)
      : in(s, ids, lp, name, param, temperature, tail) {
    const auto acc = acc_dtype(s);
    check_per_row(grad_values_in, "grad_values", in.student.rows, s, "student_logits");
    check_sparse_stats(stats_in, in.student.rows, s);
    grad_values = per_row_vector(grad_values_in, acc);
    stats = stats_in.to(acc).contiguous().reshape({-1, sparse::kStatsColumns});
    grad = alloc({in.student.rows, in.student.V}, s.options());
  }
};

// sparse_loss: the row weights as an accumulation-dtype vector and the
// [rows, V] student gradient in its dtype.
struct SparseLossArgs {
  SparseInput in;
  at::Tensor row_weights;  // [rows]
  at::Tensor grad;         // [rows, V]

  SparseLossArgs(const at::Tensor& s, const at::Tensor& ids, const at::Tensor& lp, const at::Tensor& row_weights_in,
                 c10::string_view name, double param, double temperature, c10::string_view tail,
                 OutputAllocator alloc)
      : in(s, ids, lp, name, param, temperature, tail) {
    check_per_row(row_weights_in, "row_weights", in.student.rows, s, "student_logits");
    row_weights = per_row_vector(row_weights_in, acc_dtype(s));
    grad = alloc({in.student.rows, in.student.V}, s.options());
  }
};

// The family's kernels, which each backend implements and registers through
// register_kernels (see DivergenceKernels, csrc/divergence_args.h).
struct SparseKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*topk_logprobs)(const at::Tensor&, int64_t, double);
  std::tuple<at::Tensor, at::Tensor> (*sparse_forward)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       c10::string_view, double, double, c10::string_view);
  at::Tensor (*sparse_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, c10::string_view, double, double, c10::string_view);
  std::tuple<at::Tensor, at::Tensor> (*sparse_loss)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::string_view, double, double,
                                                    c10::string_view);
};

inline void register_kernels(torch::Library& m, const SparseKernels& k) {
  m.impl("topk_logprobs", k.topk_logprobs);
  m.impl("sparse_forward", k.sparse_forward);
  m.impl("sparse_backward", k.sparse_backward);
  m.impl("sparse_loss", k.sparse_loss);
}

}  // namespace kdext
