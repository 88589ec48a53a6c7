// CUDA adapters of the sparse family: topk_logprobs, sparse_forward,
// sparse_backward and sparse_loss. Each builds its argument struct
// (csrc/sparse_args.h, the same checks and words as the CPU kernels) and runs a
// framework-free launcher of csrc/include/kdext/cuda/sparse_kernels.cuh through
// run_launcher (device guard, current stream, workspace).
//
// Differences from csrc/cpu/sparse.cpp, by design:
//   - an id outside [-1, V) or repeated makes the CPU raise; here that row is
//     Poisoned, value and gradient NaN (raising would need a device sync);
//   - the loss kernels keep a V-bit bitmap of a row's ids in shared memory, so
//     they take V <= kMaxVocab (2^20; ValueError beyond);
//   - topk_logprobs with k > kSortCap (1024) selects by a stable descending
//     sort of each row (ATen's segmented sort) instead of the radix select:
//     the same ids and values; for k that large a sort is the better tool.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda/adapter_utils.h"
#include "kdext/cuda/sparse_kernels.cuh"
#include "sparse_args.h"

namespace kdext {
namespace cuda_adapter {
namespace {

using kdext::sparse_cuda::kMaxVocab;
using kdext::sparse_cuda::kSortCap;

sparse_cuda::TopkParams topk_params(const TopkLogprobsArgs& a, double temperature) {
  sparse_cuda::TopkParams p;
  p.x = a.in.x.const_data_ptr();
  p.stride = a.in.x.stride(0);
  p.rows = a.in.rows;
  p.V = a.in.V;
  p.k = a.k;
  p.temperature = temperature;
  p.select = true;
  p.ids = a.ids.data_ptr<int32_t>();
  p.logprobs = a.logprobs.data_ptr();
  p.lse = a.lse.data_ptr();
  p.max = nullptr;
  p.logz = nullptr;
  return p;
}

// k > kSortCap: the row statistics from the kernel, the selection from a
// stable descending sort (NaN sorted as -inf, so never selected; -inf entries
// become empty slots), the log-probs as (x/T - max) - log Z in the
// accumulation dtype, as the kernel and the CPU compute them.
void topk_by_sort(const TopkLogprobsArgs& a, double temperature) {
  const auto acc = acc_dtype(a.in.x);
  const at::Tensor mx = at::empty({a.in.rows}, a.in.x.options().dtype(acc));
  const at::Tensor logz = at::empty({a.in.rows}, a.in.x.options().dtype(acc));
  auto p = topk_params(a, temperature);
  p.select = false;
  p.max = mx.data_ptr();
  p.logz = logz.data_ptr();
  run_launcher(a.in.x.device(), [&](const kdext::cuda::Workspace&, cudaStream_t stream) {
    return sparse_cuda::topk_logprobs(to_dtype(a.in.x.scalar_type()), p, stream);
  });
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor x = a.in.x.to(acc);
  const auto sorted = x.masked_fill(x.isnan(), -inf).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
  const at::Tensor values = std::get<0>(sorted).narrow(1, 0, a.k);
  const at::Tensor index = std::get<1>(sorted).narrow(1, 0, a.k);
  const at::Tensor empty = values.eq(-inf);
  // The scalar is rounded to the accumulation dtype first, as the kernels' 1/T.
  const double inv_t = acc == at::kDouble ? 1.0 / temperature : double(float(1.0 / temperature));
  at::Tensor lp = values.mul(inv_t).sub(mx.unsqueeze(1)).sub(logz.unsqueeze(1));
  lp = lp.masked_fill(empty, -inf);
  const at::Tensor poisoned = mx.isnan().logical_or(mx.eq(inf)).unsqueeze(1);
  lp = lp.masked_fill(poisoned, std::numeric_limits<double>::quiet_NaN());
  a.logprobs.view({a.in.rows, a.k}).copy_(lp);
  a.ids.view({a.in.rows, a.k}).copy_(index.masked_fill(empty, -1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logprobs(const at::Tensor& logits, int64_t k,
                                                             double temperature) {
  TopkLogprobsArgs a(logits, k, temperature);
  if (k > kSortCap) {
    topk_by_sort(a, temperature);
  } else {
    run_launcher(logits.device(), [&](const kdext::cuda::Workspace&, cudaStream_t stream) {
      return sparse_cuda::topk_logprobs(to_dtype(a.in.x.scalar_type()), topk_params(a, temperature), stream);
    });
  }
  return {a.ids, a.logprobs, a.lse};
}

// The validated inputs as the launchers take them; the loss kernels' vocabulary limit.
sparse_cuda::SparseTensors sparse_tensors(const SparseInput& in) {
  TORCH_CHECK_VALUE(in.student.V <= kMaxVocab, "student_logits has a vocabulary of ", in.student.V,
                    " entries; the CUDA sparse kernels support at most ", kMaxVocab);
  return {in.student.x.const_data_ptr(), to_dtype(in.student.x.scalar_type()), in.student.x.stride(0),
          in.student.rows, in.student.V, in.k, in.ids.const_data_ptr<int64_t>(),
          in.logprobs.const_data_ptr<double>()};
}

// Runs f(Acc{}) with the student's accumulation type.
template <typename F>
cudaError_t with_acc(const SparseInput& in, F&& f) {
  if (in.student.x.scalar_type() == at::kDouble) return f(double(0));
  return f(float(0));
}

std::tuple<at::Tensor, at::Tensor> sparse_forward(const at::Tensor& student, const at::Tensor& teacher_ids,
                                                  const at::Tensor& teacher_logprobs, c10::string_view name,
                                                  double param, double temperature, c10::string_view tail) {
  SparseForwardArgs a(student, teacher_ids, teacher_logprobs, name, param, temperature, tail);
  const auto in = sparse_tensors(a.in);
  run_launcher(student.device(), [&](const kdext::cuda::Workspace&, cudaStream_t stream) {
    return with_acc(a.in, [&](auto acc_zero) {
      using Acc = decltype(acc_zero);
      return sparse_cuda::sparse_forward<Acc>(in, a.in.kind, param, temperature, a.in.tail,
                                              a.values.data_ptr<Acc>(), a.stats.data_ptr<Acc>(), stream);
    });
  });
  return {a.values, a.stats};
}

at::Tensor sparse_backward(const at::Tensor& grad_values, const at::Tensor& student, const at::Tensor& teacher_ids,
                           const at::Tensor& teacher_logprobs, const at::Tensor& stats, c10::string_view name,
                           double param, double temperature, c10::string_view tail) {
  SparseBackwardArgs a(grad_values, student, teacher_ids, teacher_logprobs, stats, name, param, temperature, tail,
                       &empty_device_output);
  const auto in = sparse_tensors(a.in);
  run_launcher(student.device(), [&](const kdext::cuda::Workspace&, cudaStream_t stream) {
    return with_acc(a.in, [&](auto acc_zero) {
      using Acc = decltype(acc_zero);
      return sparse_cuda::sparse_backward<Acc>(in, a.in.kind, param, temperature, a.in.tail,
                                               a.grad_values.const_data_ptr<Acc>(), a.stats.const_data_ptr<Acc>(),
                                               a.grad.data_ptr(), stream);
    });
  });
  return a.grad.view(student.sizes());
}

std::tuple<at::Tensor, at::Tensor> sparse_loss(const at::Tensor& student, const at::Tensor& teacher_ids,
                                               const at::Tensor& teacher_logprobs, const at::Tensor& row_weights,
                                               c10::string_view name, double param, double temperature,
                                               c10::string_view tail) {
  SparseLossArgs a(student, teacher_ids, teacher_logprobs, row_weights, name, param, temperature, tail,
                   &empty_device_output);
  const auto in = sparse_tensors(a.in);
  at::Tensor loss = at::empty({}, student.options().dtype(acc_dtype(student)));
  run_launcher(student.device(), [&](const kdext::cuda::Workspace& ws, cudaStream_t stream) {
    return with_acc(a.in, [&](auto acc_zero) {
      using Acc = decltype(acc_zero);
      return sparse_cuda::sparse_loss<Acc>(in, a.in.kind, param, temperature, a.in.tail,
                                           a.row_weights.const_data_ptr<Acc>(), loss.data_ptr<Acc>(),
                                           a.grad.data_ptr(), ws, stream);
    });
  });
  return {loss, a.grad.view(student.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  register_kernels(m, {.topk_logprobs = &topk_logprobs,
                       .sparse_forward = &sparse_forward,
                       .sparse_backward = &sparse_backward,
                       .sparse_loss = &sparse_loss});
}

}  // namespace cuda_adapter
}  // namespace kdext
