// The per-row kernels of the divergence family (forward and backward), all
// kThreads-thread blocks over the row groups of geometry.h:
//   pair_state_kernel  one pass over s and t: the online state of both softmaxes
//                      (plus the reverse-KL sum A). A group per (row, chunk);
//                      with one chunk per row it finishes the row itself.
//   pair_sums_kernel   one pass given both lse: the sums (value, c_s, c_t) of
//                      any divergence; also the whole of divergence_partial.
//   pair_grad_kernel   one pass given the row statistics: writes dD/ds and/or
//                      dD/dt (the backward; the second half of an unfused loss).
// Chunks of split rows are merged by divergence_split_kernels.cuh.
#pragma once

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/divergence_rows.cuh"
#include "kdext/cuda/rows.cuh"

namespace kdext {
namespace cuda {

// Writes a group's reduced result: the chunk's partial when rows are split,
// else through `finish` (or as skipped, for a row that did no work).
template <typename Partial, typename Acc, typename Finish>
__device__ __forceinline__ void group_result(const RowGrid& g, const GroupPos& pos, bool work, const Partial& v,
                                             Partial* partial, const RowSink<Acc>& sink, Finish finish) {
  if (!pos.active || pos.lane != 0) return;
  if (g.chunks > 1) {
    partial[pos.row * g.chunks + pos.chunk] = v;
  } else if (!work) {
    sink_skipped(sink, pos.row);
  } else {
    finish(v);
  }
}

template <typename S, typename T, typename Acc, bool kWeighted>
__global__ void __launch_bounds__(kThreads)
    pair_state_kernel(PairArgs<Acc> a, ReverseKLState<Acc>* __restrict__ partial, RowSink<Acc> sink) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  using Pack = PairPack<Acc, N>;
  KDEXT_SHARED(scratch, ReduceScratch<ReverseKLState<Acc>>);
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    ReverseKLState<Acc> st = ReverseKLState<Acc>::empty();
    const bool work = pos.active && !row_skipped(sink, pos.row);
    if (work) {
      const PairRow<S, T, Acc, N> row(a, pos.row);
      int64_t k0, k1;
      row.chunk(pos.chunk, g.chunks, &k0, &k1);
      for_packs_in_flight<Pack>(
          k0, k1, pos.lane, g.G, [&](int64_t k, Pack& p) { row.load(k, p); },
          [&](const Pack& p) { accumulate_pair<Acc, N, kWeighted>(st, p); });
    }
    st = group_allreduce(st, MergeOp{}, g.G, scratch);
    group_result(g, pos, work, st, partial, sink,
                 [&](const ReverseKLState<Acc>& v) { finalize_state<Acc, kWeighted>(sink, pos.row, v); });
  });
}

template <typename S, typename T, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads) pair_sums_kernel(PairArgs<Acc> a, LseIn<Acc> lse,
                                                             DivergenceSums<Acc>* __restrict__ partial,
                                                             RowSink<Acc> sink) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  using Pack = PairPack<Acc, N>;
  KDEXT_SHARED(scratch, ReduceScratch<DivergenceSums<Acc>>);
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    DivergenceSums<Acc> acc = {Acc(0), Acc(0), Acc(0)};
    const bool live = pos.active && !row_skipped(sink, pos.row);
    Acc ls = Acc(0), lt = Acc(0);
    RowKind kind = RowKind::Empty;
    if (live) {
      ls = lse.s[pos.row * lse.stride];
      lt = lse.t[pos.row * lse.stride];
      kind = classify_row(ls, lt);
    }
    if (live && kind == RowKind::Normal) {
      const PairRow<S, T, Acc, N> row(a, pos.row);
      int64_t k0, k1;
      row.chunk(pos.chunk, g.chunks, &k0, &k1);
      for_packs_in_flight<Pack>(
          k0, k1, pos.lane, g.G, [&](int64_t k, Pack& p) { row.load(k, p); },
          [&](const Pack& p) { accumulate_sums<D, Acc, N>(acc, p, ls, lt, a.prm); });
    }
    acc = group_allreduce(acc, AddSums<Acc>{}, g.G, scratch);
    group_result(g, pos, live, acc, partial, sink, [&](const DivergenceSums<Acc>& v) {
      sink_sums(sink, pos.row, kind == RowKind::Normal ? v : nan_sums<Acc>());
    });
  });
}

// The gradient pass. Per row: scale = grad_values[r] / T (backward) or
// weights[r] / T (loss; weight 0 writes zeros); constant rows as constant_gradient
// (kdext/row_contract.h).
// No block-wide synchronisation: inactive groups return at once.
template <typename S, typename T, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads)
    pair_grad_kernel(PairArgs<Acc> a, const Acc* __restrict__ stats, const Acc* __restrict__ grad_values,
                     const Acc* __restrict__ weights, S* __restrict__ gs, int64_t gs_stride, T* __restrict__ gt,
                     int64_t gt_stride) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    if (!pos.active) return;
    const int64_t r = pos.row;
    S* gsr = gs ? row_ptr_mut<S>(gs, r, gs_stride) : nullptr;
    T* gtr = gt ? row_ptr_mut<T>(gt, r, gt_stride) : nullptr;
    const PairRow<S, T, Acc, N> row(a, r, gsr, gtr);
    int64_t k0, k1;
    row.chunk(pos.chunk, g.chunks, &k0, &k1);

    const Acc* st = stats + r * kStatsColumns;
    Acc fill = Acc(0);
    bool do_fill = true;
    Acc scale = Acc(0);
    if (weights == nullptr || weights[r] != Acc(0)) {  // weight 0: an ignored row, zeros
      scale = (weights != nullptr ? weights[r] : grad_values[r]) / a.temperature;
      do_fill = constant_gradient(classify_row(st[0], st[1]), scale, &fill);
    }
    if (do_fill) {
      for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
        if (gsr) fill_pack<S, Acc, N>(gsr, row.L, row.start(k), fill);
        if (gtr) fill_pack<T, Acc, N>(gtr, row.L, row.start(k), fill);
      }
      return;
    }
    const Acc lse_s = st[0], lse_t = st[1], cs = st[2], ct = st[3];
    for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
      PairPack<Acc, N> p;
      row.load(k, p);
      Acc out[N];
      if (gsr) {
#pragma unroll
        for (int l = 0; l < N; ++l)
          out[l] = DivergenceMath<D>::template student_grad<Acc>(p.s[l] - lse_s, p.t[l] - lse_t, a.prm, cs) * scale;
        store_pack<S, Acc, N>(gsr, row.L, row.start(k), out);
      }
      if (gtr) {
#pragma unroll
        for (int l = 0; l < N; ++l)
          out[l] = DivergenceMath<D>::template teacher_grad<Acc>(p.s[l] - lse_s, p.t[l] - lse_t, a.prm, ct) * scale;
        store_pack<T, Acc, N>(gtr, row.L, row.start(k), out);
      }
    }
  });
}

}  // namespace cuda
}  // namespace kdext
