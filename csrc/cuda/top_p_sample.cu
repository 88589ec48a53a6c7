// CUDA adapter of kdext::top_p_sample: checks the inputs (csrc/top_p_sample_args.h),
// lays them out as [rows, V] with unit stride and runs the framework-free
// launcher of csrc/include/kdext/cuda/top_p_sample_launchers.cuh through
// run_launcher (csrc/cuda/adapter_utils.h: device guard, current stream, errors).
//
// Student and teacher are read in one dtype: when they differ, both are
// converted to the promoted type once (fp16 + bf16 -> fp32); float64 logits are
// read as float32 (all of the op's math is float32, as on the CPU).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "kdext/cuda/top_p_sample_launchers.cuh"
#include "top_p_sample_args.h"

namespace kdext {
namespace cuda_adapter {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_p_sample(
    const at::Tensor& logits, const std::optional<at::Tensor>& teacher_logits, double top_p, int64_t top_k,
    double temperature, double alpha, int64_t seed, int64_t offset, const std::optional<at::Tensor>& row_ids) {
  const TopPSampleArgs a(logits, teacher_logits, top_p, top_k, temperature, alpha, row_ids);
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor here, got one on ", logits.device());

  c10::ScalarType dtype = logits.scalar_type();
  if (teacher_logits.has_value()) dtype = c10::promoteTypes(dtype, teacher_logits->scalar_type());
  if (dtype == c10::kDouble) dtype = c10::kFloat;
  const at::Tensor s = as_rows(logits.scalar_type() == dtype ? logits : logits.to(dtype));
  at::Tensor t;
  if (teacher_logits.has_value())
    t = as_rows(teacher_logits->scalar_type() == dtype ? *teacher_logits : teacher_logits->to(dtype));
  const int64_t rows = s.size(0), V = s.size(1);
  TORCH_CHECK(rows <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()), "top_p_sample: too many rows (",
              rows, ") for one launch");

  if (rows == 0) return a.outputs();

  top_p_cuda::Params p;
  p.s = s.const_data_ptr();
  p.t = t.defined() ? t.const_data_ptr() : nullptr;
  p.s_row_stride = s.stride(0);
  p.t_row_stride = t.defined() ? t.stride(0) : 0;
  p.V = V;
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.alpha = static_cast<float>(alpha);
  p.top_p = top_p;
  p.top_k = top_k;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.row_ids = a.row_ids.defined() ? a.row_ids.const_data_ptr<int64_t>() : nullptr;
  p.tokens = a.tokens.data_ptr<int64_t>();
  p.student_logprob = a.student_logprob.data_ptr<float>();
  p.teacher_logprob = a.teacher_logprob.data_ptr<float>();
  p.sample_logprob = a.sample_logprob.data_ptr<float>();
  p.threshold = a.threshold.data_ptr<float>();

  run_launcher(logits.device(), kdext::cuda::top_p_sample, p, to_dtype(dtype), rows);
  return a.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) { m.impl("top_p_sample", &top_p_sample); }

}  // namespace cuda_adapter
}  // namespace kdext
