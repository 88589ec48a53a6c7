// CUDA adapters of the sparse family: topk_logprobs, sparse_forward,
// sparse_backward and sparse_loss. Each checks its inputs (csrc/sparse_args.h,
// the same words as the CPU kernels), takes a device guard and the current
// stream, and calls a launcher of csrc/include/kdext/cuda/sparse_kernels.cuh.
//
// Two differences from csrc/cpu/sparse.cpp, by design:
//   - an id outside [-1, V) or repeated makes the CPU raise; here that row's
//     value and gradient are NaN (raising would need a device-to-host sync);
//   - topk_logprobs with k > kSortCap (1024) selects by a stable descending
//     sort of each row (ATen's segmented sort) instead of the radix select:
//     the same ids and values, for k that large a sort is the better tool.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
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

sparse_cuda::TopkParams topk_params(const TopkArgs& a, double temperature) {
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
void topk_by_sort(const TopkArgs& a, double temperature, cudaStream_t stream) {
  const auto acc = acc_dtype(a.in.x);
  const at::Tensor mx = at::empty({a.in.rows}, a.in.x.options().dtype(acc));
  const at::Tensor logz = at::empty({a.in.rows}, a.in.x.options().dtype(acc));
  auto p = topk_params(a, temperature);
  p.select = false;
  p.max = mx.data_ptr();
  p.logz = logz.data_ptr();
  C10_CUDA_CHECK(sparse_cuda::topk_logprobs(to_dtype(a.in.x.scalar_type()), p, stream));
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
  TopkArgs a(logits, k, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (a.in.rows == 0) return {a.ids, a.logprobs, a.lse};
  if (k > kSortCap) {
    topk_by_sort(a, temperature, current_stream());
  } else {
    C10_CUDA_CHECK(sparse_cuda::topk_logprobs(to_dtype(a.in.x.scalar_type()), topk_params(a, temperature),
                                              current_stream()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.ids, a.logprobs, a.lse};
}

void check_cuda_vocab(const SparseInput& in) {
  TORCH_CHECK_VALUE(in.student.V <= kMaxVocab, "student_logits has a vocabulary of ", in.student.V,
                    " entries; the CUDA sparse kernels support at most ", kMaxVocab);
}

template <typename Acc>
sparse_cuda::SparseParams<Acc> sparse_params(const SparseInput& in, double param, double temperature) {
  sparse_cuda::SparseParams<Acc> p;
  p.s = in.student.x.const_data_ptr();
  p.stride = in.student.x.stride(0);
  p.rows = in.student.rows;
  p.V = in.student.V;
  p.k = in.k;
  p.temperature = temperature;
  p.ids = in.ids.const_data_ptr<int64_t>();
  p.logprobs = in.logprobs.const_data_ptr<double>();
  p.tail = in.tail;
  p.prm = DivergenceParam<double>::make(param);
  p.grad_in = nullptr;
  p.weights = nullptr;
  p.stats_in = false;
  p.stats = nullptr;
  p.values = nullptr;
  p.grad = nullptr;
  return p;
}

// Runs f(Acc{}) with the student's accumulation type.
template <typename F>
void with_acc(const SparseInput& in, F&& f) {
  if (in.student.x.scalar_type() == at::kDouble) {
    f(double(0));
  } else {
    f(float(0));
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_forward(const at::Tensor& student, const at::Tensor& teacher_ids,
                                                  const at::Tensor& teacher_logprobs, c10::string_view name,
                                                  double param, double temperature, c10::string_view tail) {
  SparseForwardArgs a(student, teacher_ids, teacher_logprobs, name, param, temperature, tail);
  check_cuda_vocab(a.in);
  const c10::cuda::CUDAGuard guard(student.device());
  with_acc(a.in, [&](auto acc_zero) {
    using Acc = decltype(acc_zero);
    auto p = sparse_params<Acc>(a.in, param, temperature);
    p.stats = a.stats.data_ptr<Acc>();
    p.values = a.values.data_ptr<Acc>();
    C10_CUDA_CHECK(sparse_cuda::launch_sparse<Acc>(to_dtype(student.scalar_type()), a.in.kind, p, nullptr,
                                                   current_stream()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.values, a.stats};
}

at::Tensor sparse_backward(const at::Tensor& grad_values, const at::Tensor& student, const at::Tensor& teacher_ids,
                           const at::Tensor& teacher_logprobs, const at::Tensor& stats, c10::string_view name,
                           double param, double temperature, c10::string_view tail) {
  SparseBackwardArgs a(grad_values, student, teacher_ids, teacher_logprobs, stats, name, param, temperature, tail,
                       &empty_device_output);
  check_cuda_vocab(a.in);
  const c10::cuda::CUDAGuard guard(student.device());
  with_acc(a.in, [&](auto acc_zero) {
    using Acc = decltype(acc_zero);
    auto p = sparse_params<Acc>(a.in, param, temperature);
    p.grad_in = a.grad_values.const_data_ptr<Acc>();
    p.stats_in = true;
    p.stats = const_cast<Acc*>(a.stats.const_data_ptr<Acc>());  // read only (stats_in)
    p.grad = a.grad.data_ptr();
    C10_CUDA_CHECK(sparse_cuda::launch_sparse<Acc>(to_dtype(student.scalar_type()), a.in.kind, p, nullptr,
                                                   current_stream()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.grad.view(student.sizes());
}

std::tuple<at::Tensor, at::Tensor> sparse_loss(const at::Tensor& student, const at::Tensor& teacher_ids,
                                               const at::Tensor& teacher_logprobs, const at::Tensor& row_weights,
                                               c10::string_view name, double param, double temperature,
                                               c10::string_view tail) {
  SparseLossArgs a(student, teacher_ids, teacher_logprobs, row_weights, name, param, temperature, tail,
                   &empty_device_output);
  check_cuda_vocab(a.in);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(acc_dtype(student));
  at::Tensor loss = at::empty({}, opts);
  const at::Tensor values = at::empty({a.in.student.rows}, opts);
  const at::Tensor stats = at::empty({a.in.student.rows, sparse::kStatsColumns}, opts);
  with_acc(a.in, [&](auto acc_zero) {
    using Acc = decltype(acc_zero);
    auto p = sparse_params<Acc>(a.in, param, temperature);
    p.weights = a.row_weights.const_data_ptr<Acc>();
    p.stats = stats.data_ptr<Acc>();
    p.values = values.data_ptr<Acc>();
    p.grad = a.grad.data_ptr();
    C10_CUDA_CHECK(sparse_cuda::launch_sparse<Acc>(to_dtype(student.scalar_type()), a.in.kind, p,
                                                   loss.data_ptr<Acc>(), current_stream()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, a.grad.view(student.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CUDA, m) {
  m.impl("topk_logprobs", &topk_logprobs);
  m.impl("sparse_forward", &sparse_forward);
  m.impl("sparse_backward", &sparse_backward);
  m.impl("sparse_loss", &sparse_loss);
}

}  // namespace cuda_adapter
}  // namespace kdext
