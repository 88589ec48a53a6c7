// kdext::top_p_sample's adapter arguments, shared by its CPU and CUDA
// adapters: the checks (kdext/top_p_sample.py runs the same checks first, with the
// same words) and the five per-row outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "adapter_args.h"
#include "checks.h"

namespace kdext {

// top_p_sample: the checks, each row's Philox subsequence and the five
// per-row outputs. The logits themselves are laid out by each backend (the
// CUDA kernel reads student and teacher in one dtype).
struct TopPSampleArgs {
  at::Tensor row_ids;  // [rows] int64, or undefined: the kernels then use the row's index
  at::Tensor tokens;   // the sampled token, int64
  at::Tensor student_logprob, teacher_logprob, sample_logprob, threshold;  // float32

  TopPSampleArgs(const at::Tensor& logits, const std::optional<at::Tensor>& teacher, double top_p, int64_t top_k,
                 double temperature, double alpha, const std::optional<at::Tensor>& row_ids_in) {
    check_logits(logits, "logits");
    TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
    TORCH_CHECK_VALUE(top_k >= 0, "top_k must be in [0, 2**63 - 1] (0 turns top-k off), got ", top_k);
    check_temperature(temperature);
    TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
    TORCH_CHECK_VALUE(alpha == 0.0 || teacher.has_value(), "alpha = ", alpha,
                      " > 0 mixes in the teacher, but teacher_logits is None");
    if (teacher.has_value()) {
      check_logits(*teacher, "teacher_logits");
      check_same_device(logits, "logits", *teacher, "teacher_logits");
      TORCH_CHECK_VALUE(logits.sizes() == teacher->sizes(), "teacher_logits must have the shape of logits ",
                        logits.sizes(), ", got ", teacher->sizes());
    }
    if (row_ids_in.has_value()) {
      check_row_integers(*row_ids_in, "row_ids", logits);
      row_ids = per_row_vector(*row_ids_in, at::kLong);
    }
    // Counts are kept in float32 by the search (exact below 2^24).
    TORCH_CHECK_VALUE(logits.size(-1) < (int64_t(1) << 24), "logits has a vocabulary of ", logits.size(-1),
                      " entries; top_p_sample supports fewer than 2^24");
    const auto shape = row_shape(logits);
    const auto fopts = logits.options().dtype(at::kFloat);
    tokens = at::empty(shape, logits.options().dtype(at::kLong));
    student_logprob = at::empty(shape, fopts);
    teacher_logprob = at::empty(shape, fopts);
    sample_logprob = at::empty(shape, fopts);
    threshold = at::empty(shape, fopts);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {tokens, student_logprob, teacher_logprob, sample_logprob, threshold};
  }
};

}  // namespace kdext
