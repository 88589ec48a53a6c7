// CUDA kernels and launchers of the divergence family (framework-free: raw
// pointers, DType tags, cudaError_t). Included by csrc/cuda/divergence.cu only.
//
// Semantics are those of the CPU kernels (csrc/cpu/divergence.cpp), formula by
// formula: the per-element terms and gradients come from kdext/divergence.h,
// the online softmax state and its exact merge from kdext/online_softmax.h.
//
// Kernels (all 256-thread blocks; see block_reduce.cuh for the row groups):
//   pair_state_kernel   one pass over s and t: the online state of both softmaxes
//                       (plus the reverse-KL sum A). A group per (row, chunk);
//                       with one chunk per row it finishes the row itself.
//   pair_merge_kernel   merges the chunk states of split rows in chunk order.
//   pair_sums_kernel    one pass given both lse: the sums (value, c_s, c_t) of
//                       any divergence; also the whole of divergence_partial.
//   sums_merge_kernel   adds the chunk sums of split rows in chunk order.
//   pair_grad_kernel    one pass given the row statistics: writes dD/ds and/or
//                       dD/dt (the backward; the second half of an unfused loss).
//   pair_onchip_kernel  a row held on chip: a cluster of C blocks (C = 1 on
//                       GPUs without clusters) reads its slice of s and t once
//                       into shared memory, merges the partial states across
//                       the cluster through distributed shared memory, runs the
//                       remaining passes from shared memory and writes the
//                       gradient once: the fused loss in 3 tensor passes.
//
// Passes over [rows, V] tensors (reads + writes):
//   divergence_forward  reverse KL: 2 (read s, t). Others: 2 on chip, 4 when
//                       the row does not fit on chip (lse pass, sums pass).
//   divergence_backward 2 reads + 1 write per gradient asked for.
//   divergence_loss     3 on chip (read s, t once, write the gradient); when a
//                       row does not fit on chip: 5 for reverse KL, 7 otherwise.
//   divergence_partial  2.
#pragma once

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/vec_load.cuh"
#include "kdext/divergence.h"
#include "kdext/online_softmax.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace cuda {

// ---- launcher-facing descriptions ---------------------------------------------

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

// ---- device-side pieces ------------------------------------------------------------

template <typename Acc>
struct PairArgs {
  const void* s;
  const void* t;
  int64_t s_stride, t_stride;
  int64_t rows, V;
  Acc inv_t;        // 1 / T, as the CPU kernels scale
  Acc temperature;  // T, for the gradient's 1/T factor (g / T as on the CPU)
  DivergenceParam<Acc> prm;
  RowGrid grid;
};

// Where a row's results go. Any pointer may be null (not wanted).
template <typename Acc>
struct RowSink {
  Acc* lse_s = nullptr;  // stats column 0 (stride lse_stride)
  Acc* lse_t = nullptr;  // stats column 1
  int64_t lse_stride = 0;
  Acc* value = nullptr;  // the row's value (times weights[r] when weights is set)
  int64_t value_stride = 0;
  Acc* cs = nullptr;  // c_s
  Acc* ct = nullptr;  // c_t
  int64_t c_stride = 0;
  const Acc* weights = nullptr;  // loss mode: rows with weight 0 are skipped
};

template <typename Acc>
struct LseIn {
  const Acc* s;
  const Acc* t;
  int64_t stride;
};

template <typename Acc>
__device__ __forceinline__ bool row_skipped(const RowSink<Acc>& sk, int64_t r) {
  return sk.weights != nullptr && sk.weights[r] == Acc(0);
}

template <typename Acc>
__host__ __device__ __forceinline__ void sink_lse(const RowSink<Acc>& sk, int64_t r, Acc lse_s, Acc lse_t) {
  if (sk.lse_s) sk.lse_s[r * sk.lse_stride] = lse_s;
  if (sk.lse_t) sk.lse_t[r * sk.lse_stride] = lse_t;
}

template <typename Acc>
__host__ __device__ __forceinline__ void sink_sums(const RowSink<Acc>& sk, int64_t r, const DivergenceSums<Acc>& v) {
  if (sk.value) sk.value[r * sk.value_stride] = sk.weights ? sk.weights[r] * v.value : v.value;
  if (sk.cs) sk.cs[r * sk.c_stride] = v.student_c;
  if (sk.ct) sk.ct[r * sk.c_stride] = v.teacher_c;
}

// A row with weight 0 (loss mode): value 0, nothing else is needed.
template <typename Acc>
__device__ __forceinline__ void sink_skipped(const RowSink<Acc>& sk, int64_t r) {
  if (sk.value) sk.value[r * sk.value_stride] = Acc(0);
}

template <typename Acc>
__host__ __device__ __forceinline__ DivergenceSums<Acc> nan_sums() {
  const Acc n = quiet_nan<Acc>();
  return {n, n, n};
}

template <typename Acc>
struct MergeStates {
  __device__ __forceinline__ ReverseKLState<Acc> operator()(const ReverseKLState<Acc>& a,
                                                            const ReverseKLState<Acc>& b) const {
    return merge(a, b);
  }
};

template <typename Acc>
struct AddSums {
  __device__ __forceinline__ DivergenceSums<Acc> operator()(const DivergenceSums<Acc>& a,
                                                            const DivergenceSums<Acc>& b) const {
    return {a.value + b.value, a.student_c + b.student_c, a.teacher_c + b.teacher_c};
  }
};

// Moves the running max of `st` to cover the pack; returns false while every
// entry seen is -inf. `factor` is what the sum was rescaled by (companion sums
// scale by it too). NaN propagates: a NaN max stays NaN and poisons the sum.
template <typename Acc, int N>
__host__ __device__ __forceinline__ bool raise_max(SoftmaxState<Acc>& st, const Acc (&x)[N], Acc* factor) {
  using M = MathOps<Acc>;
  Acc pm = x[0];
#pragma unroll
  for (int l = 1; l < N; ++l) pm = M::maximum(pm, x[l]);
  const Acc m = M::maximum(st.max, pm);
  *factor = Acc(1);
  if (m == neg_inf<Acc>()) return false;
  if (!(m == st.max)) {
    *factor = rescale_factor(st.max, m);
    st.sum = st.sum * *factor;
    st.max = m;
  }
  return true;
}

// The online update of docs/DESIGN.md for one pack of x = s/T and y = t/T: one exp
// per entry per distribution, plus one per pack when a max moves.
template <typename Acc, int N, bool kWeighted>
__host__ __device__ __forceinline__ void accumulate_pair(ReverseKLState<Acc>& st, const Acc (&xs)[N], const Acc (&xt)[N]) {
  using M = MathOps<Acc>;
  Acc f;
  if (raise_max<Acc, N>(st.student, xs, &f)) {
    if (kWeighted) st.weighted = st.weighted * f;
    const Acc m = st.student.max;
#pragma unroll
    for (int l = 0; l < N; ++l) {
      const Acc e = M::exp(xs[l] - m);
      st.student.sum += e;
      if (kWeighted) st.weighted += e > Acc(0) ? e * (xs[l] - xt[l]) : Acc(0);
    }
  }
  if (raise_max<Acc, N>(st.teacher, xt, &f)) {
    const Acc m = st.teacher.max;
#pragma unroll
    for (int l = 0; l < N; ++l) st.teacher.sum += M::exp(xt[l] - m);
  }
}

template <Divergence D, typename Acc, int N>
__host__ __device__ __forceinline__ void accumulate_sums(DivergenceSums<Acc>& acc, const Acc (&xs)[N], const Acc (&xt)[N],
                                                Acc lse_s, Acc lse_t, const DivergenceParam<Acc>& prm) {
#pragma unroll
  for (int l = 0; l < N; ++l) {
    const auto e = DivergenceMath<D>::template terms<Acc>(xs[l] - lse_s, xt[l] - lse_t, prm);
    acc.value += e.value;
    acc.student_c += e.student_c;
    acc.teacher_c += e.teacher_c;
  }
}

// A finished pair state: writes both lse and, for reverse KL, the row's sums.
template <typename Acc, bool kRKL>
__host__ __device__ __forceinline__ void finalize_state(const RowSink<Acc>& sk, int64_t r, const ReverseKLState<Acc>& st) {
  const Acc ls = log_sum_exp(st.student), lt = log_sum_exp(st.teacher);
  sink_lse(sk, r, ls, lt);
  if (kRKL) {
    DivergenceSums<Acc> v = nan_sums<Acc>();
    if (classify_row(ls, lt) == RowKind::Normal) {
      const Acc kl = reverse_kl_value(st);
      v = {kl, kl, Acc(0)};
    }
    sink_sums(sk, r, v);
  }
}

// The row pointers of a pair kernel, smallest element first (it fixes the head).
template <typename S, typename T>
__device__ __forceinline__ RowPtrs pair_ptrs(const S* s, const T* t, const void* gs, const void* gt) {
  RowPtrs p;
  if (sizeof(S) <= sizeof(T)) {
    p.p[0] = s; p.esize[0] = sizeof(S);
    p.p[1] = t; p.esize[1] = sizeof(T);
  } else {
    p.p[0] = t; p.esize[0] = sizeof(T);
    p.p[1] = s; p.esize[1] = sizeof(S);
  }
  p.p[2] = gs; p.esize[2] = sizeof(S);
  p.p[3] = gt; p.esize[3] = sizeof(T);
  p.count = 4;
  return p;
}

// ---- kernels ---------------------------------------------------------------------

template <typename S, typename T, typename Acc, bool kWeighted>
__global__ void __launch_bounds__(kThreads)
    pair_state_kernel(PairArgs<Acc> a, ReverseKLState<Acc>* __restrict__ partial, RowSink<Acc> sink) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  __shared__ ReduceScratch<ReverseKLState<Acc>> scratch;
  const RowGrid g = a.grid;
  const Acc pad = neg_inf<Acc>();
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    ReverseKLState<Acc> st = ReverseKLState<Acc>::empty();
    const bool work = pos.active && !row_skipped(sink, pos.row);
    if (work) {
      const S* s = row_ptr<S>(a.s, pos.row, a.s_stride);
      const T* t = row_ptr<T>(a.t, pos.row, a.t_stride);
      const PackLayout L = make_layout<N>(a.V, pair_ptrs(s, t, nullptr, nullptr));
      int64_t k0, k1;
      chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
      int64_t k = k0 + pos.lane;
      for (; k + g.G < k1; k += 2 * g.G) {  // two packs in flight per thread
        Acc xs0[N], xt0[N], xs1[N], xt1[N];
        load_pack<Acc, S, N>(s, L, L.base + k * N, a.inv_t, pad, xs0);
        load_pack<Acc, T, N>(t, L, L.base + k * N, a.inv_t, pad, xt0);
        load_pack<Acc, S, N>(s, L, L.base + (k + g.G) * N, a.inv_t, pad, xs1);
        load_pack<Acc, T, N>(t, L, L.base + (k + g.G) * N, a.inv_t, pad, xt1);
        accumulate_pair<Acc, N, kWeighted>(st, xs0, xt0);
        accumulate_pair<Acc, N, kWeighted>(st, xs1, xt1);
      }
      if (k < k1) {
        Acc xs[N], xt[N];
        load_pack<Acc, S, N>(s, L, L.base + k * N, a.inv_t, pad, xs);
        load_pack<Acc, T, N>(t, L, L.base + k * N, a.inv_t, pad, xt);
        accumulate_pair<Acc, N, kWeighted>(st, xs, xt);
      }
    }
    st = group_allreduce(st, MergeStates<Acc>{}, g.G, scratch);
    if (pos.active && pos.lane == 0) {
      if (g.chunks > 1) {
        partial[pos.row * g.chunks + pos.chunk] = st;
      } else if (!work) {
        sink_skipped(sink, pos.row);
      } else {
        finalize_state<Acc, kWeighted>(sink, pos.row, st);
      }
    }
  }
}

template <typename Acc, bool kRKL>
__global__ void __launch_bounds__(kThreads)
    pair_merge_kernel(const ReverseKLState<Acc>* __restrict__ partial, int chunks, int64_t rows, RowSink<Acc> sink) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    if (row_skipped(sink, r)) {
      sink_skipped(sink, r);
      continue;
    }
    ReverseKLState<Acc> st = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) st = merge(st, partial[r * chunks + c]);
    finalize_state<Acc, kRKL>(sink, r, st);
  }
}

template <typename S, typename T, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads) pair_sums_kernel(PairArgs<Acc> a, LseIn<Acc> lse,
                                                             DivergenceSums<Acc>* __restrict__ partial,
                                                             RowSink<Acc> sink) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  __shared__ ReduceScratch<DivergenceSums<Acc>> scratch;
  const RowGrid g = a.grid;
  const Acc pad = neg_inf<Acc>();
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
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
      const S* s = row_ptr<S>(a.s, pos.row, a.s_stride);
      const T* t = row_ptr<T>(a.t, pos.row, a.t_stride);
      const PackLayout L = make_layout<N>(a.V, pair_ptrs(s, t, nullptr, nullptr));
      int64_t k0, k1;
      chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
      int64_t k = k0 + pos.lane;
      for (; k + g.G < k1; k += 2 * g.G) {
        Acc xs0[N], xt0[N], xs1[N], xt1[N];
        load_pack<Acc, S, N>(s, L, L.base + k * N, a.inv_t, pad, xs0);
        load_pack<Acc, T, N>(t, L, L.base + k * N, a.inv_t, pad, xt0);
        load_pack<Acc, S, N>(s, L, L.base + (k + g.G) * N, a.inv_t, pad, xs1);
        load_pack<Acc, T, N>(t, L, L.base + (k + g.G) * N, a.inv_t, pad, xt1);
        accumulate_sums<D, Acc, N>(acc, xs0, xt0, ls, lt, a.prm);
        accumulate_sums<D, Acc, N>(acc, xs1, xt1, ls, lt, a.prm);
      }
      if (k < k1) {
        Acc xs[N], xt[N];
        load_pack<Acc, S, N>(s, L, L.base + k * N, a.inv_t, pad, xs);
        load_pack<Acc, T, N>(t, L, L.base + k * N, a.inv_t, pad, xt);
        accumulate_sums<D, Acc, N>(acc, xs, xt, ls, lt, a.prm);
      }
    }
    acc = group_allreduce(acc, AddSums<Acc>{}, g.G, scratch);
    if (pos.active && pos.lane == 0) {
      if (g.chunks > 1) {
        partial[pos.row * g.chunks + pos.chunk] = acc;
      } else if (!live) {
        sink_skipped(sink, pos.row);
      } else {
        sink_sums(sink, pos.row, kind == RowKind::Normal ? acc : nan_sums<Acc>());
      }
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sums_merge_kernel(const DivergenceSums<Acc>* __restrict__ partial, int chunks, int64_t rows, LseIn<Acc> lse,
                      RowSink<Acc> sink) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    if (row_skipped(sink, r)) {
      sink_skipped(sink, r);
      continue;
    }
    if (classify_row(lse.s[r * lse.stride], lse.t[r * lse.stride]) != RowKind::Normal) {
      sink_sums(sink, r, nan_sums<Acc>());
      continue;
    }
    DivergenceSums<Acc> acc = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) acc = AddSums<Acc>{}(acc, partial[r * chunks + c]);
    sink_sums(sink, r, acc);
  }
}

// The gradient pass. Per row: scale = grad_values[r] / T (backward) or
// weights[r] / T (loss; weight 0 writes zeros); constant rows as constant_gradient
// (kdext/row_contract.h).
template <typename S, typename T, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads)
    pair_grad_kernel(PairArgs<Acc> a, const Acc* __restrict__ stats, const Acc* __restrict__ grad_values,
                     const Acc* __restrict__ weights, S* __restrict__ gs, int64_t gs_stride, T* __restrict__ gt,
                     int64_t gt_stride) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  const RowGrid g = a.grid;
  const Acc pad = neg_inf<Acc>();
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    if (!pos.active) continue;  // no block-wide synchronisation in this kernel
    const int64_t r = pos.row;
    const S* s = row_ptr<S>(a.s, r, a.s_stride);
    const T* t = row_ptr<T>(a.t, r, a.t_stride);
    S* gsr = gs ? row_ptr_mut<S>(gs, r, gs_stride) : nullptr;
    T* gtr = gt ? row_ptr_mut<T>(gt, r, gt_stride) : nullptr;
    const PackLayout L = make_layout<N>(a.V, pair_ptrs(s, t, gsr, gtr));
    int64_t k0, k1;
    chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);

    Acc fill = Acc(0);
    bool do_fill = true;
    Acc scale = Acc(0);
    if (weights == nullptr || weights[r] != Acc(0)) {  // weight 0: an ignored row, zeros
      const Acc* st = stats + r * kStatsColumns;
      scale = (weights != nullptr ? weights[r] : grad_values[r]) / a.temperature;
      do_fill = constant_gradient(classify_row(st[0], st[1]), scale, &fill);
    }
    if (do_fill) {
      for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
        if (gsr) fill_pack<S, Acc, N>(gsr, L, L.base + k * N, fill);
        if (gtr) fill_pack<T, Acc, N>(gtr, L, L.base + k * N, fill);
      }
      continue;
    }
    const Acc* st = stats + r * kStatsColumns;
    const Acc lse_s = st[0], lse_t = st[1], cs = st[2], ct = st[3];
    for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
      const int64_t start = L.base + k * N;
      Acc xs[N], xt[N], out[N];
      load_pack<Acc, S, N>(s, L, start, a.inv_t, pad, xs);
      load_pack<Acc, T, N>(t, L, start, a.inv_t, pad, xt);
      if (gsr) {
#pragma unroll
        for (int l = 0; l < N; ++l)
          out[l] = DivergenceMath<D>::template student_grad<Acc>(xs[l] - lse_s, xt[l] - lse_t, a.prm, cs) * scale;
        store_pack<S, Acc, N>(gsr, L, start, out);
      }
      if (gtr) {
#pragma unroll
        for (int l = 0; l < N; ++l)
          out[l] = DivergenceMath<D>::template teacher_grad<Acc>(xs[l] - lse_s, xt[l] - lse_t, a.prm, ct) * scale;
        store_pack<T, Acc, N>(gtr, L, start, out);
      }
    }
  }
}

// ---- the on-chip kernel -------------------------------------------------------------

enum class OnchipMode : int32_t { Forward = 0, Loss = 1 };

template <typename Acc>
struct OnchipArgs {
  int cluster;              // blocks per row (the launch's cluster size; 1 = no cluster)
  int64_t packs_per_block;  // shared-memory capacity, in packs of each tensor
  OnchipMode mode;
  RowSink<Acc> sink;  // forward: lse, value, c_s, c_t; loss: value = weighted row loss
  const Acc* weights;  // loss mode
  void* grad;          // loss mode: dD/ds, dtype of s
  int64_t grad_stride;
};

// Folds a block-uniform value over the blocks of the cluster in rank order, so
// every block gets bitwise the same result. `slot` and `result` are the
// block's shared variables for this fold.
template <typename X, typename Op>
__device__ __forceinline__ X cluster_fold(const X& v, X& slot, X& result, int C, Op op) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#endif
  (void)C;
  __syncthreads();
}

template <typename S, typename T, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads) pair_onchip_kernel(PairArgs<Acc> a, OnchipArgs<Acc> o) {
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  constexpr bool kRKL = D == Divergence::ReverseKL;
  extern __shared__ uint4 onchip_smem[];
  RawPack<S, N>* ss = reinterpret_cast<RawPack<S, N>*>(onchip_smem);
  RawPack<T, N>* ts = reinterpret_cast<RawPack<T, N>*>(ss + o.packs_per_block);
  __shared__ ReduceScratch<ReverseKLState<Acc>> scratch_state;
  __shared__ ReduceScratch<DivergenceSums<Acc>> scratch_sums;
  __shared__ ReverseKLState<Acc> slot_state, result_state;
  __shared__ DivergenceSums<Acc> slot_sums, result_sums;

  const int C = o.cluster;
  const int rank = static_cast<int>(blockIdx.x % C);
  const int64_t clusters = gridDim.x / C;
  const bool loss = o.mode == OnchipMode::Loss;
  const Acc pad = neg_inf<Acc>();
  const int tid = threadIdx.x;

  for (int64_t r = blockIdx.x / C; r < a.rows; r += clusters) {
    const S* s = row_ptr<S>(a.s, r, a.s_stride);
    const T* t = row_ptr<T>(a.t, r, a.t_stride);
    S* g = loss ? row_ptr_mut<S>(o.grad, r, o.grad_stride) : nullptr;
    const PackLayout L = make_layout<N>(a.V, pair_ptrs(s, t, g, nullptr));
    int64_t k0, k1;
    chunk_range(L.packs, rank, C, &k0, &k1);
    const int64_t cnt = k1 - k0;  // <= packs_per_block by construction

    if (loss && o.weights[r] == Acc(0)) {  // an ignored row: zeros, no reads, no cluster traffic
      for (int64_t j = tid; j < cnt; j += kThreads) fill_pack<S, Acc, N>(g, L, L.base + (k0 + j) * N, Acc(0));
      if (rank == 0 && tid == 0) sink_skipped(o.sink, r);
      continue;
    }

    // Pass 1: global -> shared memory, and the online state on the way.
    ReverseKLState<Acc> st = ReverseKLState<Acc>::empty();
    int64_t j = tid;
    for (; j + kThreads < cnt; j += 2 * kThreads) {
      const int64_t st0 = L.base + (k0 + j) * N, st1 = st0 + int64_t(kThreads) * N;
      RawPack<S, N> rs0, rs1;
      RawPack<T, N> rt0, rt1;
      load_raw<S, N>(s, L, st0, rs0);
      load_raw<T, N>(t, L, st0, rt0);
      load_raw<S, N>(s, L, st1, rs1);
      load_raw<T, N>(t, L, st1, rt1);
      ss[j] = rs0;
      ts[j] = rt0;
      ss[j + kThreads] = rs1;
      ts[j + kThreads] = rt1;
      Acc xs[N], xt[N];
      convert<Acc, S, N>(rs0, L, st0, a.inv_t, pad, xs);
      convert<Acc, T, N>(rt0, L, st0, a.inv_t, pad, xt);
      accumulate_pair<Acc, N, kRKL>(st, xs, xt);
      convert<Acc, S, N>(rs1, L, st1, a.inv_t, pad, xs);
      convert<Acc, T, N>(rt1, L, st1, a.inv_t, pad, xt);
      accumulate_pair<Acc, N, kRKL>(st, xs, xt);
    }
    if (j < cnt) {
      const int64_t st0 = L.base + (k0 + j) * N;
      RawPack<S, N> rs;
      RawPack<T, N> rt;
      load_raw<S, N>(s, L, st0, rs);
      load_raw<T, N>(t, L, st0, rt);
      ss[j] = rs;
      ts[j] = rt;
      Acc xs[N], xt[N];
      convert<Acc, S, N>(rs, L, st0, a.inv_t, pad, xs);
      convert<Acc, T, N>(rt, L, st0, a.inv_t, pad, xt);
      accumulate_pair<Acc, N, kRKL>(st, xs, xt);
    }
    // (Each thread reads back only the packs it wrote: no barrier needed for them.)
    st = group_allreduce(st, MergeStates<Acc>{}, kThreads, scratch_state);
    st = cluster_fold(st, slot_state, result_state, C, MergeStates<Acc>{});

    const Acc lse_s = log_sum_exp(st.student), lse_t = log_sum_exp(st.teacher);
    const RowKind kind = classify_row(lse_s, lse_t);
    DivergenceSums<Acc> sums = nan_sums<Acc>();
    if (kind == RowKind::Normal) {  // uniform over the cluster: every block folded the same state
      if (kRKL) {
        const Acc kl = reverse_kl_value(st);
        sums = {kl, kl, Acc(0)};
      } else {
        DivergenceSums<Acc> acc = {Acc(0), Acc(0), Acc(0)};
        for (int64_t jj = tid; jj < cnt; jj += kThreads) {
          const int64_t st0 = L.base + (k0 + jj) * N;
          Acc xs[N], xt[N];
          convert<Acc, S, N>(ss[jj], L, st0, a.inv_t, pad, xs);
          convert<Acc, T, N>(ts[jj], L, st0, a.inv_t, pad, xt);
          accumulate_sums<D, Acc, N>(acc, xs, xt, lse_s, lse_t, a.prm);
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
        for (int64_t jj = tid; jj < cnt; jj += kThreads) {
          const int64_t st0 = L.base + (k0 + jj) * N;
          Acc xs[N], xt[N], out[N];
          convert<Acc, S, N>(ss[jj], L, st0, a.inv_t, pad, xs);
          convert<Acc, T, N>(ts[jj], L, st0, a.inv_t, pad, xt);
#pragma unroll
          for (int l = 0; l < N; ++l)
            out[l] = DivergenceMath<D>::template student_grad<Acc>(xs[l] - lse_s, xt[l] - lse_t, a.prm, sums.student_c) *
                     scale;
          store_pack<S, Acc, N>(g, L, st0, out);
        }
      } else {
        for (int64_t jj = tid; jj < cnt; jj += kThreads) fill_pack<S, Acc, N>(g, L, L.base + (k0 + jj) * N, fill);
      }
    }
    cluster_barrier(C);
  }
}

// ---- host-side planning and launchers ---------------------------------------------

namespace detail {

inline bool env_flag_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0);
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return static_cast<int>(std::strtol(v, nullptr, 10));
}

template <typename Acc>
PairArgs<Acc> pair_args(const PairTensors& in, double param, double temperature) {
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
  return a;
}

inline unsigned rows_grid(int64_t rows) { return grid_size((rows + kThreads - 1) / kThreads); }

}  // namespace detail

// Whether and how a row of V entries is held on chip by pair_onchip_kernel.
struct OnchipPlan {
  bool ok = false;
  int cluster = 1;
  int64_t packs_per_block = 0;
  size_t smem = 0;
};

// Whether a cluster of c blocks with `smem` bytes of dynamic shared memory
// each can be resident (sets the kernel attributes that launch needs).
template <typename K>
bool onchip_resident(K kernel, int c, size_t smem) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (c > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (c == 1) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return blocks >= 1;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(c, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = c;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return clusters >= 1;
}

// Picks the smallest cluster whose per-block slice fits a preferred shared
// memory budget (about three resident blocks per SM, so one block's loads
// overlap another's gradient writes), else the smallest that fits at all,
// taking the first candidate the occupancy API says can be resident (the
// non-portable size 16 may not be).
// KDEXT_CUDA_ONCHIP=0 disables the path; KDEXT_CUDA_CLUSTER=<c> forces c.
template <typename S, typename T, typename Acc, Divergence D>
OnchipPlan plan_onchip(int64_t V) {
  OnchipPlan plan;
  if (detail::env_flag_off("KDEXT_CUDA_ONCHIP")) return plan;
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  const int64_t p_max = (V + N - 1) / N + 1;
  const int forced = detail::env_int("KDEXT_CUDA_CLUSTER", 0);
  if (p_max < kThreads && forced == 0) return plan;  // short rows: the row kernels are better
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return plan;
  int major = 0, optin = 0, cluster_launch = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (major >= 9) cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, dev);
  auto kernel = pair_onchip_kernel<S, T, Acc, D>;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return plan;
  }
  const size_t per_pack = size_t(N) * (sizeof(S) + sizeof(T));
  const size_t budget_max = optin > 0 ? size_t(optin) - attr.sharedSizeBytes - 1024 : 0;
  const size_t budget_pref = 72 * 1024;
  const int max_cluster = cluster_launch ? 16 : 1;
  // Candidates in order of preference: the cluster sizes whose slice fits the
  // preferred budget, then those that fit at all (smallest first).
  int candidates[10];
  int count = 0;
  if (forced > 0) {
    if ((forced & (forced - 1)) == 0 && forced <= max_cluster &&
        size_t((p_max + forced - 1) / forced) * per_pack <= budget_max)
      candidates[count++] = forced;
  } else {
    for (int c = 1; c <= max_cluster; c <<= 1)
      if (size_t((p_max + c - 1) / c) * per_pack <= budget_pref) candidates[count++] = c;
    for (int c = 1; c <= max_cluster; c <<= 1) {
      const size_t bytes = size_t((p_max + c - 1) / c) * per_pack;
      if (bytes > budget_pref && bytes <= budget_max) candidates[count++] = c;
    }
  }
  for (int i = 0; i < count; ++i) {
    const int c = candidates[i];
    const int64_t ppb = (p_max + c - 1) / c;
    const size_t smem = size_t(ppb) * per_pack;
    if (onchip_resident(kernel, c, smem)) {
      plan.cluster = c;
      plan.packs_per_block = ppb;
      plan.smem = smem;
      plan.ok = true;
      return plan;
    }
  }
  return plan;
}

template <typename S, typename T, typename Acc, Divergence D>
cudaError_t launch_onchip(const PairArgs<Acc>& a, OnchipArgs<Acc> o, const OnchipPlan& plan, cudaStream_t stream) {
  auto kernel = pair_onchip_kernel<S, T, Acc, D>;
  o.cluster = plan.cluster;
  o.packs_per_block = plan.packs_per_block;
  const int64_t max_clusters = (int64_t(1) << 30) / plan.cluster;
  const int64_t clusters = a.rows < max_clusters ? a.rows : max_clusters;
  const unsigned grid = static_cast<unsigned>(clusters * plan.cluster);
  if (plan.cluster == 1) {
    kernel<<<grid, kThreads, plan.smem, stream>>>(a, o);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = plan.smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = plan.cluster;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, a, o);
}

// State pass (+ merge) then, for divergences other than reverse KL, the sums
// pass (+ merge), into `sink`. `stats` is where the lse columns live ([rows, 4]).
template <typename S, typename T, typename Acc, Divergence D>
cudaError_t launch_row_passes(PairArgs<Acc> a, const RowSink<Acc>& sink, const Acc* stats, const Workspace& ws,
                              cudaStream_t stream) {
  constexpr bool kRKL = D == Divergence::ReverseKL;
  constexpr int N = pack_width(sizeof(S), sizeof(T));
  a.grid = plan_row_grid(a.rows, (a.V + N - 1) / N + 1);
  const int chunks = a.grid.chunks;
  void* partial = nullptr;
  if (chunks > 1) {
    const size_t per = sizeof(ReverseKLState<Acc>) > sizeof(DivergenceSums<Acc>) ? sizeof(ReverseKLState<Acc>)
                                                                                   : sizeof(DivergenceSums<Acc>);
    partial = ws.get(size_t(a.rows) * chunks * per);
    if (partial == nullptr) return cudaErrorMemoryAllocation;
  }
  // With kRKL the state pass finishes the row; otherwise it only writes the lse.
  RowSink<Acc> state_sink = sink;
  if (!kRKL) {
    state_sink.value = nullptr;
    state_sink.cs = state_sink.ct = nullptr;
    // weighted rows with weight 0 still need their value written: the sums pass does it.
  }
  const unsigned grid = grid_size(a.grid.blocks());
  pair_state_kernel<S, T, Acc, kRKL>
      <<<grid, kThreads, 0, stream>>>(a, static_cast<ReverseKLState<Acc>*>(partial), state_sink);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (chunks > 1) {
    pair_merge_kernel<Acc, kRKL><<<detail::rows_grid(a.rows), kThreads, 0, stream>>>(
        static_cast<const ReverseKLState<Acc>*>(partial), chunks, a.rows, state_sink);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (kRKL) return cudaSuccess;
  const LseIn<Acc> lse{stats, stats + 1, kStatsColumns};
  pair_sums_kernel<S, T, Acc, D>
      <<<grid, kThreads, 0, stream>>>(a, lse, static_cast<DivergenceSums<Acc>*>(partial), sink);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (chunks > 1) {
    sums_merge_kernel<Acc><<<detail::rows_grid(a.rows), kThreads, 0, stream>>>(
        static_cast<const DivergenceSums<Acc>*>(partial), chunks, a.rows, lse, sink);
    err = cudaGetLastError();
  }
  return err;
}

// values [rows], stats [rows, 4] (Acc = double for float64 inputs, else float).
inline cudaError_t divergence_forward(const PairTensors& in, Divergence kind, double param, double temperature,
                                      void* values, void* stats, const Workspace& ws, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype_pair(in.s_dtype, in.t_dtype, [&](auto ts, auto tt) {
    using S = typename decltype(ts)::type;
    using T = typename decltype(tt)::type;
    using Acc = typename AccOf<S>::type;
    return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
      constexpr Divergence D = decltype(tag)::value;
      PairArgs<Acc> a = detail::pair_args<Acc>(in, param, temperature);
      Acc* st = static_cast<Acc*>(stats);
      RowSink<Acc> sink;
      sink.lse_s = st;
      sink.lse_t = st + 1;
      sink.lse_stride = kStatsColumns;
      sink.value = static_cast<Acc*>(values);
      sink.value_stride = 1;
      sink.cs = st + 2;
      sink.ct = st + 3;
      sink.c_stride = kStatsColumns;
      if (D != Divergence::ReverseKL) {  // reverse KL is one pass anyway
        const OnchipPlan plan = plan_onchip<S, T, Acc, D>(in.V);
        if (plan.ok) {
          OnchipArgs<Acc> o = {};
          o.mode = OnchipMode::Forward;
          o.sink = sink;
          return launch_onchip<S, T, Acc, D>(a, o, plan, stream);
        }
      }
      return launch_row_passes<S, T, Acc, D>(a, sink, st, ws, stream);
    });
  });
}

// grad_s / grad_t: [rows, V] contiguous outputs in the dtypes of s / t (either may be null).
inline cudaError_t divergence_backward(const PairTensors& in, Divergence kind, double param, double temperature,
                                       const void* grad_values, const void* stats, void* grad_s, void* grad_t,
                                       cudaStream_t stream) {
  if (in.rows == 0 || (grad_s == nullptr && grad_t == nullptr)) return cudaSuccess;
  return dispatch_dtype_pair(in.s_dtype, in.t_dtype, [&](auto ts, auto tt) {
    using S = typename decltype(ts)::type;
    using T = typename decltype(tt)::type;
    using Acc = typename AccOf<S>::type;
    return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
      constexpr Divergence D = decltype(tag)::value;
      constexpr int N = pack_width(sizeof(S), sizeof(T));
      PairArgs<Acc> a = detail::pair_args<Acc>(in, param, temperature);
      a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
      pair_grad_kernel<S, T, Acc, D><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(
          a, static_cast<const Acc*>(stats), static_cast<const Acc*>(grad_values), nullptr,
          static_cast<S*>(grad_s), in.V, static_cast<T*>(grad_t), in.V);
      return cudaGetLastError();
    });
  });
}

// loss: one Acc; grad_s: [rows, V] contiguous, dtype of s; weights: [rows] Acc.
inline cudaError_t divergence_loss(const PairTensors& in, Divergence kind, double param, double temperature,
                                   const void* weights, void* loss, void* grad_s, const Workspace& ws,
                                   cudaStream_t stream) {
  return dispatch_dtype_pair(in.s_dtype, in.t_dtype, [&](auto ts, auto tt) {
    using S = typename decltype(ts)::type;
    using T = typename decltype(tt)::type;
    using Acc = typename AccOf<S>::type;
    return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
      constexpr Divergence D = decltype(tag)::value;
      constexpr int N = pack_width(sizeof(S), sizeof(T));
      Acc* row_loss = nullptr;
      if (in.rows > 0) {
        row_loss = static_cast<Acc*>(ws.get(size_t(in.rows) * sizeof(Acc)));
        if (row_loss == nullptr) return cudaErrorMemoryAllocation;
        PairArgs<Acc> a = detail::pair_args<Acc>(in, param, temperature);
        const Acc* w = static_cast<const Acc*>(weights);
        const OnchipPlan plan = plan_onchip<S, T, Acc, D>(in.V);
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
          err = launch_onchip<S, T, Acc, D>(a, o, plan, stream);
        } else {
          Acc* stats = static_cast<Acc*>(ws.get(size_t(in.rows) * kStatsColumns * sizeof(Acc)));
          if (stats == nullptr) return cudaErrorMemoryAllocation;
          RowSink<Acc> sink;
          sink.lse_s = stats;
          sink.lse_t = stats + 1;
          sink.lse_stride = kStatsColumns;
          sink.value = row_loss;
          sink.value_stride = 1;
          sink.cs = stats + 2;
          sink.ct = stats + 3;
          sink.c_stride = kStatsColumns;
          sink.weights = w;
          err = launch_row_passes<S, T, Acc, D>(a, sink, stats, ws, stream);
          if (err != cudaSuccess) return err;
          a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
          pair_grad_kernel<S, T, Acc, D><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(
              a, stats, nullptr, w, static_cast<S*>(grad_s), in.V, static_cast<T*>(nullptr), 0);
          err = cudaGetLastError();
        }
        if (err != cudaSuccess) return err;
      }
      return launch_ordered_sum<Acc>(row_loss, in.rows, static_cast<Acc*>(loss), stream);
    });
  });
}

// out: [rows, 3] Acc = (value, c_s, c_t) of the shard given the global lse.
inline cudaError_t divergence_partial(const PairTensors& in, Divergence kind, double param, double temperature,
                                      const void* student_lse, const void* teacher_lse, void* out,
                                      const Workspace& ws, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype_pair(in.s_dtype, in.t_dtype, [&](auto ts, auto tt) {
    using S = typename decltype(ts)::type;
    using T = typename decltype(tt)::type;
    using Acc = typename AccOf<S>::type;
    return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
      constexpr Divergence D = decltype(tag)::value;
      constexpr int N = pack_width(sizeof(S), sizeof(T));
      PairArgs<Acc> a = detail::pair_args<Acc>(in, param, temperature);
      a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
      Acc* o = static_cast<Acc*>(out);
      RowSink<Acc> sink;
      sink.value = o;
      sink.value_stride = 3;
      sink.cs = o + 1;
      sink.ct = o + 2;
      sink.c_stride = 3;
      const LseIn<Acc> lse{static_cast<const Acc*>(student_lse), static_cast<const Acc*>(teacher_lse), 1};
      void* partial = nullptr;
      if (a.grid.chunks > 1) {
        partial = ws.get(size_t(in.rows) * a.grid.chunks * sizeof(DivergenceSums<Acc>));
        if (partial == nullptr) return cudaErrorMemoryAllocation;
      }
      pair_sums_kernel<S, T, Acc, D><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(
          a, lse, static_cast<DivergenceSums<Acc>*>(partial), sink);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess || a.grid.chunks == 1) return err;
      sums_merge_kernel<Acc><<<detail::rows_grid(in.rows), kThreads, 0, stream>>>(
          static_cast<const DivergenceSums<Acc>*>(partial), a.grid.chunks, in.rows, lse, sink);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace kdext
