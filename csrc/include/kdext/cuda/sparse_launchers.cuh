// Host launchers of the sparse family (framework-free: raw pointers, DType
// tags, cudaError_t). Included by csrc/cuda/sparse.cu. Kernels:
// sparse_kernels.cuh (one kThreads-thread block per row, a grid-stride loop
// over rows) and block_reduce.cuh's ordered sum (the loss); every kernel goes
// through launch() (launch_plan.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/launch_plan.h"
#include "kdext/cuda/sparse_kernels.cuh"

namespace kdext {
namespace sparse_cuda {

// Launches topk_kernel (p.select and k <= kSortCap, or p.select false).
inline cudaError_t topk_logprobs(DType dtype, const TopkParams& p, const cuda::Queue& q) {
  if (p.rows == 0) return cudaSuccess;
  if (p.select && p.k > kSortCap) return cudaErrorInvalidValue;
  return cuda::dispatch_dtype(dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename cuda::AccOf<X>::type;
    return cuda::launch({cuda::grid_size(p.rows)}, q, topk_kernel<X, Acc>, p);
  });
}

// ---- the sparse loss ----------------------------------------------------------------

// The inputs of a sparse op as the launchers take them.
struct SparseTensors {
  const void* s;  // the student's [rows, V] logits, unit stride in V
  DType dtype;
  int64_t stride;  // row stride of the student, in entries
  int64_t rows, V, k;
  const int64_t* ids;      // [rows, k]
  const double* logprobs;  // [rows, k]
};

namespace detail {

template <typename Acc>
SparseParams<Acc> sparse_params(const SparseTensors& in, Divergence, double param, double temperature,
                                sparse::Tail tail) {
  SparseParams<Acc> p;
  p.s = in.s;
  p.stride = in.stride;
  p.rows = in.rows;
  p.V = in.V;
  p.k = in.k;
  p.temperature = temperature;
  p.ids = in.ids;
  p.logprobs = in.logprobs;
  p.tail = tail;
  p.prm = DivergenceParam<double>::make(param);
  return p;
}

// Launches sparse_kernel for the student's dtype X (whose accumulation type
// must be Acc) and the divergence.
template <typename Acc>
cudaError_t launch_sparse_kernel(DType dtype, Divergence kind, const SparseParams<Acc>& p, const cuda::Queue& q) {
  if (p.rows == 0) return cudaSuccess;
  if (p.V > kMaxVocab) return cudaErrorInvalidValue;
  const size_t smem = size_t((p.V + 31) / 32) * sizeof(uint32_t);
  return cuda::dispatch_dtype(dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    if constexpr (!std::is_same<typename cuda::AccOf<X>::type, Acc>::value) {
      return cudaErrorInvalidValue;  // unreachable: the adapter picks Acc from the dtype
    } else {
      return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
        constexpr Divergence D = decltype(tag)::value;
        auto kernel = sparse_kernel<X, Acc, D>;
        if (smem > 48 * 1024) {
          const cudaError_t e =
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
          if (e != cudaSuccess) return e;
        }
        return cuda::launch({cuda::grid_size(p.rows), unsigned(kThreads), smem}, q, kernel, p);
      });
    }
  });
}
}  // namespace detail

// sparse_forward: values [rows] and stats [rows, kStatsColumns], accumulation dtype.
template <typename Acc>
cudaError_t sparse_forward(const SparseTensors& in, Divergence kind, double param, double temperature,
                           sparse::Tail tail, Acc* values, Acc* stats, const cuda::Queue& q) {
  auto p = detail::sparse_params<Acc>(in, kind, param, temperature, tail);
  p.values = values;
  p.stats = stats;
  return detail::launch_sparse_kernel<Acc>(in.dtype, kind, p, q);
}

// sparse_backward: the [rows, V] student gradient (student's dtype, contiguous)
// from the upstream gradient and the forward's stats.
template <typename Acc>
cudaError_t sparse_backward(const SparseTensors& in, Divergence kind, double param, double temperature,
                            sparse::Tail tail, const Acc* grad_values, const Acc* stats, void* grad,
                            const cuda::Queue& q) {
  auto p = detail::sparse_params<Acc>(in, kind, param, temperature, tail);
  p.grad_in = grad_values;
  p.stats_in = true;
  p.stats = const_cast<Acc*>(stats);  // read only (stats_in)
  p.grad = grad;
  return detail::launch_sparse_kernel<Acc>(in.dtype, kind, p, q);
}

// sparse_loss: *loss = the ordered sum of w_r value_r, and the [rows, V]
// student gradient w_r dvalue_r/ds_r; the per-row values and stats live in
// workspace.
template <typename Acc>
cudaError_t sparse_loss(const SparseTensors& in, Divergence kind, double param, double temperature,
                        sparse::Tail tail, const Acc* weights, Acc* loss, void* grad, const cuda::Queue& q) {
  if (in.rows == 0) return cudaMemsetAsync(loss, 0, sizeof(Acc), q.stream);
  auto p = detail::sparse_params<Acc>(in, kind, param, temperature, tail);
  p.weights = weights;
  p.values = static_cast<Acc*>(q.ws.get(size_t(in.rows) * sizeof(Acc)));
  p.stats = static_cast<Acc*>(q.ws.get(size_t(in.rows) * sparse::kStatsColumns * sizeof(Acc)));
  if (p.values == nullptr || p.stats == nullptr) return cudaErrorMemoryAllocation;
  p.grad = grad;
  const cudaError_t err = detail::launch_sparse_kernel<Acc>(in.dtype, kind, p, q);
  if (err != cudaSuccess) return err;
  return cuda::launch({1, cuda::kOrderedSumThreads}, q, cuda::ordered_sum_kernel<Acc>, p.values, in.rows, loss);
}
}  // namespace sparse_cuda
}  // namespace kdext
