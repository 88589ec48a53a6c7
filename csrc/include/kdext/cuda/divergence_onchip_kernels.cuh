// The on-chip divergence kernel: a row held in shared memory by one block or,
// on sm_90 and later, by a thread-block cluster of C blocks (the fused loss in
// 3 tensor passes, the forward in 2).
//
// Each block of a row's cluster reads its slice of s and t once into shared
// memory, accumulating the online state on the way; the blocks merge their
// states across the cluster through distributed shared memory (in rank order:
// every block gets bitwise the same row state), run the remaining passes from
// shared memory and write the gradient once. The host planner
// (launch_plan.h, plan_onchip) picks C and the slice size, or rejects the path.
#pragma once

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/device.cuh"
#include "kdext/cuda/divergence_rows.cuh"

namespace kdext {
namespace cuda {

enum class OnchipMode : int32_t { Forward = 0, Loss = 1 };

template <typename Acc>
struct OnchipArgs {
  int cluster;              // blocks per row (the launch's cluster size; 1 = no cluster)
  int64_t packs_per_block;  // shared-memory capacity, in packs of each tensor
  OnchipMode mode;
  RowSink<Acc> sink;   // forward: lse, value, c_s, c_t; loss: value = weighted row loss
  const Acc* weights;  // loss mode
  void* grad;          // loss mode: dD/ds, dtype of s
  int64_t grad_stride;
};

// Folds a block-uniform value over the blocks of the cluster in rank order, so
// every block gets bitwise the same result. `slot` and `result` are the
// block's shared variables for this fold. Reached by every thread of the
// cluster; warp 0 alone reads the other blocks' slots and folds.
template <typename X, typename Op>
__device__ __forceinline__ X cluster_fold(const X& v, X& slot, X& result, int C, Op op) {
#if KDEXT_DEVICE_CLUSTERS
  if (C > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    if (threadIdx.x == 0) slot = v;
    cl.sync();
    if (threadIdx.x < 32) {  // lane q reads rank q's slot (one round trip), lane 0 folds in rank order
      const int lane = threadIdx.x;
      X mine = v;
      if (lane < C) mine = *cl.map_shared_rank(&slot, lane);
      X acc = shfl_pod(mine, 0);
      for (int q = 1; q < C; ++q) acc = op(acc, shfl_pod(mine, q));
      if (lane == 0) result = acc;
    }
    __syncthreads();
    return result;
  }
#endif
  (void)slot;
  (void)result;
  (void)C;
  (void)op;
  return v;
}

// The end of a row: no block of the cluster may overwrite its slots (next row)
// or exit while another still reads them.
__device__ __forceinline__ void cluster_barrier(int C) {
#if KDEXT_DEVICE_CLUSTERS
  if (C > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#endif
  (void)C;
  __syncthreads();
}

// The raw entries of one pack of s and t as read from global memory, and
// where the pack starts in the row.
template <typename S, typename T, int N>
struct RawPair {
  RawPack<S, N> s;
  RawPack<T, N> t;
  int64_t start;
};

template <typename S, typename T, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads) pair_onchip_kernel(PairArgs<Acc> a, OnchipArgs<Acc> o) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  constexpr bool kRKL = D == Divergence::ReverseKL;
  using Raw = RawPair<S, T, N>;
  KDEXT_DYNAMIC_SHARED(ss, RawPack<S, N>);
  RawPack<T, N>* ts = reinterpret_cast<RawPack<T, N>*>(ss + o.packs_per_block);
  KDEXT_SHARED(scratch_state, ReduceScratch<ReverseKLState<Acc>>);
  KDEXT_SHARED(scratch_sums, ReduceScratch<DivergenceSums<Acc>>);
  KDEXT_SHARED(slot_state, ReverseKLState<Acc>);
  KDEXT_SHARED(result_state, ReverseKLState<Acc>);
  KDEXT_SHARED(slot_sums, DivergenceSums<Acc>);
  KDEXT_SHARED(result_sums, DivergenceSums<Acc>);

  const int C = o.cluster;
  const int rank = static_cast<int>(blockIdx.x % C);
  const int64_t clusters = gridDim.x / C;
  const bool loss = o.mode == OnchipMode::Loss;
  const int tid = threadIdx.x;

  for (int64_t r = blockIdx.x / C; r < a.rows; r += clusters) {
    S* g = loss ? row_ptr_mut<S>(o.grad, r, o.grad_stride) : nullptr;
    const PairRow<S, T, Acc, N> row(a, r, g);
    const PackLayout& L = row.L;
    int64_t k0, k1;
    row.chunk(rank, C, &k0, &k1);
    const int64_t cnt = k1 - k0;  // <= packs_per_block by construction
    // Pack j of this block's slice, from shared memory (only its writer reads it back).
    auto held = [&](int64_t j, PairPack<Acc, N>& p) {
      const int64_t start = row.start(k0 + j);
      convert<Acc, S, N>(ss[j], L, start, a.inv_t, neg_inf<Acc>(), p.s);
      convert<Acc, T, N>(ts[j], L, start, a.inv_t, neg_inf<Acc>(), p.t);
    };

    if (loss && o.weights[r] == Acc(0)) {  // an ignored row: zeros, no reads, no cluster traffic
      for (int64_t j = tid; j < cnt; j += kThreads) fill_pack<S, Acc, N>(g, L, row.start(k0 + j), Acc(0));
      if (rank == 0 && tid == 0) sink_skipped(o.sink, r);
      continue;
    }

    // Pass 1: global -> shared memory, and the online state on the way.
    ReverseKLState<Acc> st = ReverseKLState<Acc>::empty();
    for_packs_in_flight<Raw>(
        0, cnt, tid, kThreads,
        [&](int64_t j, Raw& p) {
          p.start = row.start(k0 + j);
          load_raw<S, N>(row.s, L, p.start, p.s);
          load_raw<T, N>(row.t, L, p.start, p.t);
          ss[j] = p.s;
          ts[j] = p.t;
        },
        [&](const Raw& p) {
          PairPack<Acc, N> x;
          convert<Acc, S, N>(p.s, L, p.start, a.inv_t, neg_inf<Acc>(), x.s);
          convert<Acc, T, N>(p.t, L, p.start, a.inv_t, neg_inf<Acc>(), x.t);
          accumulate_pair<Acc, N, kRKL>(st, x);
        });
    // (Each thread reads back only the packs it wrote: no barrier needed for them.)
    st = group_allreduce(st, MergeOp{}, kThreads, scratch_state);
    st = cluster_fold(st, slot_state, result_state, C, MergeOp{});

    const Acc lse_s = log_sum_exp(st.student), lse_t = log_sum_exp(st.teacher);
    const RowKind kind = classify_row(lse_s, lse_t);
    DivergenceSums<Acc> sums = nan_sums<Acc>();
    if (kind == RowKind::Normal) {  // uniform over the cluster: every block folded the same state
      if (kRKL) {
        const Acc kl = reverse_kl_value(st);
        sums = {kl, kl, Acc(0)};
      } else {  // Pass 2: the sums, from shared memory.
        DivergenceSums<Acc> acc = {Acc(0), Acc(0), Acc(0)};
        for (int64_t j = tid; j < cnt; j += kThreads) {
          PairPack<Acc, N> p;
          held(j, p);
          accumulate_sums<D, Acc, N>(acc, p, lse_s, lse_t, a.prm);
        }
        acc = group_allreduce(acc, AddSums<Acc>{}, kThreads, scratch_sums);
        sums = cluster_fold(acc, slot_sums, result_sums, C, AddSums<Acc>{});
      }
    }
    if (rank == 0 && tid == 0) {
      sink_lse(o.sink, r, lse_s, lse_t);
      sink_sums(o.sink, r, sums);
    }

    if (loss) {  // Pass 3: the gradient, from shared memory to global memory.
      const Acc scale = o.weights[r] / a.temperature;
      Acc fill;
      if (!constant_gradient(kind, scale, &fill)) {
        for (int64_t j = tid; j < cnt; j += kThreads) {
          PairPack<Acc, N> p;
          held(j, p);
          Acc out[N];
#pragma unroll
          for (int l = 0; l < N; ++l)
            out[l] = DivergenceMath<D>::template student_grad<Acc>(p.s[l] - lse_s, p.t[l] - lse_t, a.prm,
                                                                   sums.student_c) *
                     scale;
          store_pack<S, Acc, N>(g, L, row.start(k0 + j), out);
        }
      } else {
        for (int64_t j = tid; j < cnt; j += kThreads) fill_pack<S, Acc, N>(g, L, row.start(k0 + j), fill);
      }
    }
    cluster_barrier(C);
  }
}

}  // namespace cuda
}  // namespace kdext
