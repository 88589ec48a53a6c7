// Host launchers of the divergence family (framework-free: raw pointers,
// DType tags, cudaError_t). Included by csrc/cuda/divergence.cu.
//
// Kernels: divergence_row_kernels.cuh (per-row state, sums and gradient
// passes), divergence_split_kernels.cuh (the merges of split rows),
// divergence_onchip_kernels.cuh (a row held on chip: the fused loss), and
// block_reduce.cuh's ordered sum (the loss). Plans: launch_plan.h.
//
// Passes over [rows, V] tensors (reads + writes):
//   divergence_forward  reverse KL: 2 (read s, t). Others: 2 on chip, 4 when
//                       the row does not fit on chip (lse pass, sums pass).
//   divergence_backward 2 reads + 1 write per gradient asked for.
//   divergence_loss     3 on chip (read s, t once, write the gradient); when a
//                       row does not fit on chip: 5 for reverse KL, 7 otherwise.
//   divergence_partial  2.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/divergence_onchip_kernels.cuh"
#include "kdext/cuda/divergence_row_kernels.cuh"
#include "kdext/cuda/divergence_split_kernels.cuh"
#include "kdext/cuda/launch_plan.h"

namespace kdext {
namespace cuda {

// Student and teacher logits as [rows, V] with unit stride along V.
struct PairTensors {
  const void* s;
  DType s_dtype;
  int64_t s_stride;  // row stride, in entries
  const void* t;
  DType t_dtype;
  int64_t t_stride;
  int64_t rows;
  int64_t V;
};

// The compile-time side of a launch: storage types, divergence, pack width.
template <typename S_, typename T_, Divergence D_>
struct PairKernel {
  using S = S_;
  using T = T_;
  using Acc = typename AccOf<S>::type;
  static constexpr Divergence D = D_;
  static constexpr int N = pack_width(sizeof(S), sizeof(T));
};

namespace detail {

template <typename Acc>
PairArgs<Acc> pair_args(const PairTensors& in, double param, double temperature, int N) {
  PairArgs<Acc> a;
  a.s = in.s;
  a.t = in.t;
  a.s_stride = in.s_stride;
  a.t_stride = in.t_stride;
  a.rows = in.rows;
  a.V = in.V;
  a.inv_t = Acc(1.0 / temperature);
  a.temperature = Acc(temperature);
  a.prm = DivergenceParam<Acc>::make(param);
  a.grid = plan_row_grid(in.rows, packs_bound(in.V, N));
  return a;
}

// f(PairKernel<S, T, D>{}, args) for the dtypes of `in` and `kind`, with the
// kernel arguments and the row grid planned: the prologue of every launcher.
template <typename F>
cudaError_t with_pair_kernel(const PairTensors& in, Divergence kind, double param, double temperature, F&& f) {
  return dispatch_dtype_pair(in.s_dtype, in.t_dtype, [&](auto ts, auto tt) {
    using S = typename decltype(ts)::type;
    using T = typename decltype(tt)::type;
    return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
      using K = PairKernel<S, T, decltype(tag)::value>;
      return f(K{}, pair_args<typename K::Acc>(in, param, temperature, K::N));
    });
  });
}

// The sink of a [rows, 4] stats tensor (lse_s, lse_t, c_s, c_t) and the values.
template <typename Acc>
RowSink<Acc> stats_sink(Acc* stats, Acc* values) {
  RowSink<Acc> sink;
  sink.lse_s = stats;
  sink.lse_t = stats + 1;
  sink.lse_stride = kStatsColumns;
  sink.value = values;
  sink.value_stride = 1;
  sink.cs = stats + 2;
  sink.ct = stats + 3;
  sink.c_stride = kStatsColumns;
  return sink;
}

// The on-chip plan of the divergence kernel K for rows of V entries.
template <typename K>
OnchipPlan onchip_plan(int64_t V) {
  return plan_onchip(pair_onchip_kernel<typename K::S, typename K::T, typename K::Acc, K::D>,
                     packs_bound(V, K::N), size_t(K::N) * (sizeof(typename K::S) + sizeof(typename K::T)));
}

template <typename K>
cudaError_t launch_onchip(const PairArgs<typename K::Acc>& a, OnchipArgs<typename K::Acc> o, const OnchipPlan& plan,
                          const Queue& q) {
  o.cluster = plan.cluster;
  o.packs_per_block = plan.packs_per_block;
  return launch(plan.launch(a.rows), q, pair_onchip_kernel<typename K::S, typename K::T, typename K::Acc, K::D>,
                a, o);
}

// State pass (+ merge) then, for divergences other than reverse KL, the sums
// pass (+ merge), into `sink`. `stats` is where the lse columns live ([rows, 4]).
template <typename K>
cudaError_t launch_row_passes(const PairArgs<typename K::Acc>& a, const RowSink<typename K::Acc>& sink,
                              const typename K::Acc* stats, const Queue& q) {
  using Acc = typename K::Acc;
  constexpr bool kRKL = K::D == Divergence::ReverseKL;
  // One workspace serves both passes' partials.
  union Partial {
    ReverseKLState<Acc> state;
    DivergenceSums<Acc> sums;
  };
  Partial* partial;
  if (!chunk_partials(q.ws, a.grid, &partial)) return cudaErrorMemoryAllocation;
  auto* states = reinterpret_cast<ReverseKLState<Acc>*>(partial);
  auto* sums = reinterpret_cast<DivergenceSums<Acc>*>(partial);
  // With kRKL the state pass finishes the row; otherwise it only writes the
  // lse, and the sums pass writes the rest (also the value of weight-0 rows).
  RowSink<Acc> state_sink = sink;
  if (!kRKL) {
    state_sink.value = nullptr;
    state_sink.cs = state_sink.ct = nullptr;
  }
  const Launch rows_launch{grid_size(a.grid.blocks())};
  const Launch merge_launch{per_row_grid(a.rows)};
  const int chunks = a.grid.chunks;
  cudaError_t err = launch(rows_launch, q, pair_state_kernel<typename K::S, typename K::T, Acc, kRKL>, a,
                           states, state_sink);
  if (err == cudaSuccess && chunks > 1)
    err = launch(merge_launch, q, pair_merge_kernel<Acc, kRKL>, states, chunks, a.rows, state_sink);
  if (err != cudaSuccess || kRKL) return err;
  const LseIn<Acc> lse{stats, stats + 1, kStatsColumns};
  err = launch(rows_launch, q, pair_sums_kernel<typename K::S, typename K::T, Acc, K::D>, a, lse, sums, sink);
  if (err == cudaSuccess && chunks > 1)
    err = launch(merge_launch, q, sums_merge_kernel<Acc>, sums, chunks, a.rows, lse, sink);
  return err;
}

template <typename K>
cudaError_t launch_grad(const PairArgs<typename K::Acc>& a, const typename K::Acc* stats,
                        const typename K::Acc* grad_values, const typename K::Acc* weights, void* grad_s,
                        void* grad_t, const Queue& q) {
  using S = typename K::S;
  using T = typename K::T;
  return launch({grid_size(a.grid.blocks())}, q, pair_grad_kernel<S, T, typename K::Acc, K::D>, a, stats,
                grad_values, weights, static_cast<S*>(grad_s), a.V, static_cast<T*>(grad_t), a.V);
}

}  // namespace detail

// values [rows], stats [rows, 4] (Acc = double for float64 inputs, else float).
inline cudaError_t divergence_forward(const PairTensors& in, Divergence kind, double param, double temperature,
                                      void* values, void* stats, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_pair_kernel(in, kind, param, temperature, [&](auto k, const auto& a) -> cudaError_t {
    using K = decltype(k);
    using Acc = typename K::Acc;
    const RowSink<Acc> sink = detail::stats_sink(static_cast<Acc*>(stats), static_cast<Acc*>(values));
    if (K::D != Divergence::ReverseKL) {  // reverse KL is one pass anyway
      const OnchipPlan plan = detail::onchip_plan<K>(in.V);
      if (plan.ok) {
        OnchipArgs<Acc> o = {};
        o.mode = OnchipMode::Forward;
        o.sink = sink;
        return detail::launch_onchip<K>(a, o, plan, q);
      }
    }
    return detail::launch_row_passes<K>(a, sink, static_cast<const Acc*>(stats), q);
  });
}

// grad_s / grad_t: [rows, V] contiguous outputs in the dtypes of s / t (either may be null).
inline cudaError_t divergence_backward(const PairTensors& in, Divergence kind, double param, double temperature,
                                       const void* grad_values, const void* stats, void* grad_s, void* grad_t,
                                       const Queue& q) {
  if (in.rows == 0 || (grad_s == nullptr && grad_t == nullptr)) return cudaSuccess;
  return detail::with_pair_kernel(in, kind, param, temperature, [&](auto k, const auto& a) {
    using Acc = typename decltype(k)::Acc;
    return detail::launch_grad<decltype(k)>(a, static_cast<const Acc*>(stats), static_cast<const Acc*>(grad_values),
                                            nullptr, grad_s, grad_t, q);
  });
}

// loss: one Acc; grad_s: [rows, V] contiguous, dtype of s; weights: [rows] Acc.
inline cudaError_t divergence_loss(const PairTensors& in, Divergence kind, double param, double temperature,
                                   const void* weights, void* loss, void* grad_s, const Queue& q) {
  return detail::with_pair_kernel(in, kind, param, temperature, [&](auto k, const auto& a) -> cudaError_t {
    using K = decltype(k);
    using Acc = typename K::Acc;
    Acc* row_loss = nullptr;
    if (in.rows > 0) {
      row_loss = static_cast<Acc*>(q.ws.get(size_t(in.rows) * sizeof(Acc)));
      if (row_loss == nullptr) return cudaErrorMemoryAllocation;
      const Acc* w = static_cast<const Acc*>(weights);
      const OnchipPlan plan = detail::onchip_plan<K>(in.V);
      cudaError_t err;
      if (plan.ok) {
        OnchipArgs<Acc> o = {};
        o.mode = OnchipMode::Loss;
        o.sink.value = row_loss;
        o.sink.value_stride = 1;
        o.sink.weights = w;
        o.weights = w;
        o.grad = grad_s;
        o.grad_stride = in.V;
        err = detail::launch_onchip<K>(a, o, plan, q);
      } else {
        Acc* stats = static_cast<Acc*>(q.ws.get(size_t(in.rows) * kStatsColumns * sizeof(Acc)));
        if (stats == nullptr) return cudaErrorMemoryAllocation;
        RowSink<Acc> sink = detail::stats_sink(stats, row_loss);
        sink.weights = w;
        err = detail::launch_row_passes<K>(a, sink, stats, q);
        if (err == cudaSuccess) err = detail::launch_grad<K>(a, stats, nullptr, w, grad_s, nullptr, q);
      }
      if (err != cudaSuccess) return err;
    }
    return launch({1, kOrderedSumThreads}, q, ordered_sum_kernel<Acc>, row_loss, in.rows,
                  static_cast<Acc*>(loss));
  });
}

// out: [rows, 3] Acc = (value, c_s, c_t) of the shard given the global lse.
inline cudaError_t divergence_partial(const PairTensors& in, Divergence kind, double param, double temperature,
                                      const void* student_lse, const void* teacher_lse, void* out,
                                      const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_pair_kernel(in, kind, param, temperature, [&](auto k, const auto& a) -> cudaError_t {
    using K = decltype(k);
    using Acc = typename K::Acc;
    Acc* o = static_cast<Acc*>(out);
    RowSink<Acc> sink;
    sink.value = o;
    sink.value_stride = 3;
    sink.cs = o + 1;
    sink.ct = o + 2;
    sink.c_stride = 3;
    const LseIn<Acc> lse{static_cast<const Acc*>(student_lse), static_cast<const Acc*>(teacher_lse), 1};
    DivergenceSums<Acc>* partial;
    if (!chunk_partials(q.ws, a.grid, &partial)) return cudaErrorMemoryAllocation;
    cudaError_t err = launch({grid_size(a.grid.blocks())}, q,
                             pair_sums_kernel<typename K::S, typename K::T, Acc, K::D>, a, lse, partial, sink);
    if (err != cudaSuccess || a.grid.chunks == 1) return err;
    return launch({per_row_grid(in.rows)}, q, sums_merge_kernel<Acc>, partial, a.grid.chunks, in.rows, lse,
                  sink);
  });
}

}  // namespace cuda
}  // namespace kdext
