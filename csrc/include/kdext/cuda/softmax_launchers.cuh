// Host launchers of the softmax family (framework-free): softmax_forward,
// softmax_backward, logsumexp, lse_float64, entropy_forward, entropy_backward, and the
// row-state pass that logprobs_launchers.cuh shares. Included by
// csrc/cuda/softmax.cu. Kernels: softmax_kernels.cuh; plans: launch_plan.h.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/launch_plan.h"
#include "kdext/cuda/softmax_kernels.cuh"

namespace kdext {
namespace cuda {

namespace detail {

template <typename Acc>
RowArgs<Acc> row_args(const RowTensor& in, double temperature, int N) {
  RowArgs<Acc> a;
  a.x = in.x;
  a.stride = in.stride;
  a.rows = in.rows;
  a.V = in.V;
  a.inv_t = Acc(1.0 / temperature);
  a.grid = plan_row_grid(in.rows, packs_bound(in.V, N));
  return a;
}

// f(TypeTag<X>{}, args) for the storage type X of `in`, with the kernel
// arguments and the row grid planned: the prologue of the one-tensor launchers.
template <typename F>
cudaError_t with_row_kernel(const RowTensor& in, double temperature, F&& f) {
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    return f(tx, row_args<typename AccOf<X>::type>(in, temperature, SingleRow<X, typename AccOf<X>::type>::N));
  });
}

// Adds the chunk partials of split rows into out[rows].
template <typename Acc>
cudaError_t launch_sum_chunks(const Acc* partial, const RowGrid& g, Acc* out, const Queue& q) {
  return launch({per_row_grid(g.rows)}, q, sum_chunks_kernel<Acc>, partial, g.chunks, g.rows, out);
}

}  // namespace detail

// The row state (lse; entropy with kEntropy; a token's log-prob) into `sink`.
template <typename X, typename Acc, bool kEntropy>
cudaError_t launch_row_state(const RowArgs<Acc>& a, const StateSink<Acc>& sink, const Queue& q) {
  EntropyState<Acc>* partial;
  if (!chunk_partials(q.ws, a.grid, &partial)) return cudaErrorMemoryAllocation;
  cudaError_t err = launch({grid_size(a.grid.blocks())}, q, row_state_kernel<X, Acc, kEntropy>, a, partial, sink);
  if (err != cudaSuccess || a.grid.chunks == 1) return err;
  return launch({per_row_grid(a.rows)}, q, row_state_merge_kernel<X, Acc, kEntropy>, a, partial, sink);
}

// out: [rows, V] contiguous, dtype of the logits.
inline cudaError_t softmax_forward(const RowTensor& in, double temperature, bool log, void* out, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_row_kernel(in, temperature, [&](auto tx, const auto& a) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    const Acc* mx = nullptr;
    const Acc* logz = nullptr;
    if (a.grid.chunks > 1) {  // split rows: the state first (partials + merge), then the write
      Acc* m = static_cast<Acc*>(q.ws.get(size_t(in.rows) * sizeof(Acc)));
      Acc* z = static_cast<Acc*>(q.ws.get(size_t(in.rows) * sizeof(Acc)));
      if (m == nullptr || z == nullptr) return cudaErrorMemoryAllocation;
      StateSink<Acc> sink;
      sink.max = m;
      sink.logz = z;
      const cudaError_t err = launch_row_state<X, Acc, false>(a, sink, q);
      if (err != cudaSuccess) return err;
      mx = m;
      logz = z;
    }
    const Launch l{grid_size(a.grid.blocks())};
    X* o = static_cast<X*>(out);
    return log ? launch(l, q, softmax_kernel<X, Acc, true>, a, mx, logz, o)
               : launch(l, q, softmax_kernel<X, Acc, false>, a, mx, logz, o);
  });
}

// grad_output `g` and output `y` as [rows, V]; out: [rows, V] contiguous, dtype of y.
// float64 pairs only with float64 (the adapter converts g to y's dtype otherwise).
inline cudaError_t softmax_backward(const RowTensor& g, const RowTensor& y, double temperature, bool log, void* out,
                                    const Queue& q) {
  if (y.rows == 0) return cudaSuccess;
  return dispatch_dtype_pair(g.dtype, y.dtype, [&](auto tg, auto ty) -> cudaError_t {
    using G = typename decltype(tg)::type;
    using Y = typename decltype(ty)::type;
    using Acc = typename AccOf<Y>::type;
    BwdArgs<Acc> a;
    a.g = g.x;
    a.g_stride = g.stride;
    a.y = y.x;
    a.y_stride = y.stride;
    a.rows = y.rows;
    a.V = y.V;
    a.inv_t = Acc(1.0 / temperature);
    a.grid = plan_row_grid(y.rows, packs_bound(y.V, pack_width(sizeof(G), sizeof(Y))));
    auto pass = [&](BwdMode mode, Acc* dots) {
      const Launch l{grid_size(a.grid.blocks())};
      Y* o = static_cast<Y*>(out);
      return log ? launch(l, q, softmax_bwd_kernel<G, Y, Acc, true>, a, mode, dots, o)
                 : launch(l, q, softmax_bwd_kernel<G, Y, Acc, false>, a, mode, dots, o);
    };
    if (a.grid.chunks == 1) return pass(BwdMode::Full, nullptr);
    Acc* partial;
    Acc* dots = static_cast<Acc*>(q.ws.get(size_t(y.rows) * sizeof(Acc)));
    if (!chunk_partials(q.ws, a.grid, &partial) || dots == nullptr) return cudaErrorMemoryAllocation;
    cudaError_t err = pass(BwdMode::PartialDot, partial);
    if (err == cudaSuccess) err = detail::launch_sum_chunks(partial, a.grid, dots, q);
    if (err == cudaSuccess) err = pass(BwdMode::WriteOnly, dots);
    return err;
  });
}

namespace detail {

// The lse of each row into out[rows]: in the accumulation dtype, or in
// float64 from the same state (log_sum_exp_float64, kdext/online_softmax.h).
inline cudaError_t row_lse(const RowTensor& in, double temperature, bool float64, void* out, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return with_row_kernel(in, temperature, [&](auto tx, const auto& a) {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    StateSink<Acc> sink;
    if (float64) {
      sink.lse64 = static_cast<double*>(out);
    } else {
      sink.lse = static_cast<Acc*>(out);
    }
    return launch_row_state<X, Acc, false>(a, sink, q);
  });
}

}  // namespace detail

// out: [rows] accumulation dtype.
inline cudaError_t logsumexp(const RowTensor& in, double temperature, void* out, const Queue& q) {
  return detail::row_lse(in, temperature, false, out, q);
}

// out: [rows] float64, the lse of the same state in float64 (entropy_forward's).
inline cudaError_t lse_float64(const RowTensor& in, double temperature, void* out, const Queue& q) {
  return detail::row_lse(in, temperature, true, out, q);
}

// Without `lse_in`: entropy and lse of each row (one pass). With `lse_in` (the
// global lse of a vocab shard's rows): the shard's partial entropy; lse_out is
// then not written (the adapter returns a copy of lse_in). lse_in and lse_out
// are float64 [rows] for every input dtype (as the CPU kernel).
inline cudaError_t entropy_forward(const RowTensor& in, double temperature, const void* lse_in, void* entropy,
                                   void* lse_out, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_row_kernel(in, temperature, [&](auto tx, const auto& a) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    if (lse_in == nullptr) {
      StateSink<Acc> sink;
      sink.lse64 = static_cast<double*>(lse_out);
      sink.entropy = static_cast<Acc*>(entropy);
      return launch_row_state<X, Acc, true>(a, sink, q);
    }
    Acc* partial;
    if (!chunk_partials(q.ws, a.grid, &partial)) return cudaErrorMemoryAllocation;
    Acc* h = static_cast<Acc*>(entropy);
    cudaError_t err = launch({grid_size(a.grid.blocks())}, q, entropy_partial_kernel<X, Acc>, a,
                             static_cast<const double*>(lse_in), partial, h);
    if (err != cudaSuccess || a.grid.chunks == 1) return err;
    return detail::launch_sum_chunks(static_cast<const Acc*>(partial), a.grid, h, q);
  });
}

// grad, entropy: [rows] accumulation dtype; lse: [rows] float64; out: [rows, V] contiguous, dtype of the logits.
inline cudaError_t entropy_backward(const RowTensor& in, double temperature, const void* grad, const void* entropy,
                                    const void* lse, void* out, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_row_kernel(in, temperature, [&](auto tx, const auto& a) {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    const EntropyGrad<Acc> map{static_cast<const Acc*>(grad), static_cast<const Acc*>(entropy),
                               static_cast<const double*>(lse), a.inv_t};
    return launch({grid_size(a.grid.blocks())}, q, row_map_kernel<X, Acc, EntropyGrad<Acc>>, a, map,
                  static_cast<X*>(out));
  });
}

}  // namespace cuda
}  // namespace kdext
