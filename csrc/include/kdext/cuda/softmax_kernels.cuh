// CUDA kernels and launchers of the softmax family (framework-free): softmax
// and log_softmax with temperature, their backward, logsumexp, lse_float64 and
// entropy (forward, vocab-shard partial, backward). Included by csrc/cuda/softmax.cu
// (and, for the row-state kernel, by logprobs.cu).
//
// Semantics are those of csrc/cpu/softmax.cpp formula by formula; the online
// softmax state and its merge come from kdext/online_softmax.h, the entropy's
// centred sum is the CPU's (H = log Z - B / Z, B = sum e^{x-m} (x - m)).
//
// Kernels (256-thread blocks, row groups of block_reduce.cuh):
//   row_state_kernel      one pass: softmax (and entropy) state of a row or of a
//                         chunk of it; finishes the row (lse, entropy, the
//                         log-prob of a token) when the row is not split.
//   row_state_merge_kernel merges the chunk states of split rows in order.
//   softmax_kernel        softmax / log_softmax as (x/T - max) - log Z: with one
//                         chunk per row the group computes the state and then
//                         writes the row (a second read of the row); with
//                         split rows it writes from the merged state.
//   softmax_bwd_kernel    the same shape for the backward: a dot product per
//                         row, then the elementwise write.
//   entropy_partial_kernel  -sum q log q of a vocab shard given the global lse.
//   entropy_bwd_kernel    dH/dx, one elementwise pass.
//   sum_chunks_kernel     adds per-chunk partial sums in chunk order.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/vec_load.cuh"
#include "kdext/online_softmax.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace cuda {

// One logits-like tensor as [rows, V] with unit stride along V.
struct RowTensor {
  const void* x;
  DType dtype;
  int64_t stride;  // row stride, in entries
  int64_t rows;
  int64_t V;
};

template <typename Acc>
struct RowArgs {
  const void* x;
  int64_t stride;
  int64_t rows, V;
  Acc inv_t;
  RowGrid grid;
};

template <typename Acc>
RowArgs<Acc> row_args(const RowTensor& in, double temperature) {
  RowArgs<Acc> a;
  a.x = in.x;
  a.stride = in.stride;
  a.rows = in.rows;
  a.V = in.V;
  a.inv_t = Acc(1.0 / temperature);
  return a;
}

template <typename X>
__device__ __forceinline__ RowPtrs single_ptrs(const void* x, const void* out) {
  RowPtrs p;
  p.p[0] = x;
  p.esize[0] = sizeof(X);
  p.p[1] = out;
  p.esize[1] = sizeof(X);
  p.count = 2;
  return p;
}

// ---- the entropy state ---------------------------------------------------------------

// SoftmaxState plus the centred sum B = sum_i e^{x_i - m} (x_i - m) of the
// CPU's row_entropy. When the max moves from m to m', B' = e^{m-m'} (B + (m - m') Z).
template <typename Acc>
struct EntropyState {
  SoftmaxState<Acc> sm;
  Acc centred;

  static __host__ __device__ EntropyState empty() { return {SoftmaxState<Acc>::empty(), Acc(0)}; }
};

template <typename Acc>
__host__ __device__ __forceinline__ Acc centred_shift(Acc from, Acc to) {
  return from == neg_inf<Acc>() ? Acc(0) : from - to;
}

template <typename Acc>
__host__ __device__ __forceinline__ EntropyState<Acc> merge(const EntropyState<Acc>& a, const EntropyState<Acc>& b) {
  const Acc m = MathOps<Acc>::maximum(a.sm.max, b.sm.max);
  if (m == neg_inf<Acc>()) return EntropyState<Acc>::empty();
  const Acc fa = rescale_factor(a.sm.max, m), fb = rescale_factor(b.sm.max, m);
  EntropyState<Acc> out;
  out.sm.max = m;
  out.sm.sum = a.sm.sum * fa + b.sm.sum * fb;
  out.centred = fa * (a.centred + centred_shift(a.sm.max, m) * a.sm.sum) +
                fb * (b.centred + centred_shift(b.sm.max, m) * b.sm.sum);
  return out;
}

template <typename Acc>
struct MergeEntropy {
  __device__ __forceinline__ EntropyState<Acc> operator()(const EntropyState<Acc>& a,
                                                          const EntropyState<Acc>& b) const {
    return merge(a, b);
  }
};

template <typename Acc>
struct AddAcc {
  __device__ __forceinline__ Acc operator()(Acc a, Acc b) const { return a + b; }
};

// The online update for one pack; with kEntropy also the centred sum.
template <typename Acc, int N, bool kEntropy>
__host__ __device__ __forceinline__ void accumulate_row(EntropyState<Acc>& st, const Acc (&x)[N]) {
  using M = MathOps<Acc>;
  Acc pm = x[0];
#pragma unroll
  for (int l = 1; l < N; ++l) pm = M::maximum(pm, x[l]);
  const Acc m = M::maximum(st.sm.max, pm);
  if (m == neg_inf<Acc>()) return;
  if (!(m == st.sm.max)) {
    const Acc f = rescale_factor(st.sm.max, m);
    if (kEntropy) st.centred = f * (st.centred + centred_shift(st.sm.max, m) * st.sm.sum);
    st.sm.sum = st.sm.sum * f;
    st.sm.max = m;
  }
#pragma unroll
  for (int l = 0; l < N; ++l) {
    const Acc d = x[l] - m;
    const Acc e = M::exp(d);
    st.sm.sum += e;
    if (kEntropy) st.centred += e > Acc(0) ? e * d : Acc(0);
  }
}

// Where a finished row state goes (null pointers: not wanted).
template <typename Acc>
struct StateSink {
  Acc* lse = nullptr;      // logsumexp, logprobs_forward
  Acc* max = nullptr;      // softmax of split rows: the row max ...
  Acc* logz = nullptr;     // ... and log Z (sum relative to the max)
  double* lse64 = nullptr;  // entropy_forward, lse_float64: the lse in float64 (as the CPU kernels)
  Acc* entropy = nullptr;
  const int64_t* tokens = nullptr;  // logprobs_forward: the token of each row
  Acc* logprob = nullptr;
};

// log Z of a state relative to its max (-inf for the empty state).
template <typename Acc>
__host__ __device__ __forceinline__ Acc log_z(const SoftmaxState<Acc>& st) {
  return st.max == neg_inf<Acc>() ? st.max : MathOps<Acc>::log(st.sum);
}

template <typename X, typename Acc, bool kEntropy>
__device__ __forceinline__ void finalize_row_state(const StateSink<Acc>& sk, const RowArgs<Acc>& a, int64_t r,
                                                   const EntropyState<Acc>& st) {
  if (sk.lse) sk.lse[r] = log_sum_exp(st.sm);
  if (sk.max) sk.max[r] = st.sm.max;
  if (sk.logz) sk.logz[r] = log_z(st.sm);
  if (sk.lse64) sk.lse64[r] = log_sum_exp_float64(st.sm);
  if (kEntropy) {
    const double lse = log_sum_exp_float64(st.sm);
    if (sk.entropy) {
      sk.entropy[r] = classify_row(lse) != RowKind::Normal
                          ? quiet_nan<Acc>()
                          : MathOps<Acc>::log(st.sm.sum) - st.centred / st.sm.sum;
    }
  }
  if (sk.logprob) {
    // (x/T - max) - log Z, exact in the difference (csrc/cpu/logprobs.cpp). A
    // token outside [0, V) is never read: its log-prob is NaN (the CPU raises).
    const int64_t tok = sk.tokens[r];
    const X* row = row_ptr<X>(a.x, r, a.stride);
    sk.logprob[r] = (tok >= 0 && tok < a.V) ? (mul_rn(to_acc<Acc>(row[tok]), a.inv_t) - st.sm.max) - log_z(st.sm)
                                            : quiet_nan<Acc>();
  }
}

// Accumulates packs [k0, k1) of a row, `G` threads apart starting at k0 + lane.
template <typename X, typename Acc, int N, bool kEntropy>
__device__ __forceinline__ void accumulate_range(EntropyState<Acc>& st, const X* row, const PackLayout& L, int64_t k0,
                                                 int64_t k1, int lane, int G, Acc inv_t) {
  const Acc pad = neg_inf<Acc>();
  int64_t k = k0 + lane;
  for (; k + G < k1; k += 2 * G) {  // two packs in flight per thread
    Acc x0[N], x1[N];
    load_pack<Acc, X, N>(row, L, L.base + k * N, inv_t, pad, x0);
    load_pack<Acc, X, N>(row, L, L.base + (k + G) * N, inv_t, pad, x1);
    accumulate_row<Acc, N, kEntropy>(st, x0);
    accumulate_row<Acc, N, kEntropy>(st, x1);
  }
  if (k < k1) {
    Acc x0[N];
    load_pack<Acc, X, N>(row, L, L.base + k * N, inv_t, pad, x0);
    accumulate_row<Acc, N, kEntropy>(st, x0);
  }
}

// ---- kernels ---------------------------------------------------------------------

template <typename X, typename Acc, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    row_state_kernel(RowArgs<Acc> a, EntropyState<Acc>* __restrict__ partial, StateSink<Acc> sink) {
  constexpr int N = 16 / sizeof(X);
  __shared__ ReduceScratch<EntropyState<Acc>> scratch;
  const RowGrid g = a.grid;
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    EntropyState<Acc> st = EntropyState<Acc>::empty();
    if (pos.active) {
      const X* row = row_ptr<X>(a.x, pos.row, a.stride);
      const PackLayout L = make_layout<N>(a.V, single_ptrs<X>(row, nullptr));
      int64_t k0, k1;
      chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
      accumulate_range<X, Acc, N, kEntropy>(st, row, L, k0, k1, pos.lane, g.G, a.inv_t);
    }
    st = group_allreduce(st, MergeEntropy<Acc>{}, g.G, scratch);
    if (pos.active && pos.lane == 0) {
      if (g.chunks > 1) {
        partial[pos.row * g.chunks + pos.chunk] = st;
      } else {
        finalize_row_state<X, Acc, kEntropy>(sink, a, pos.row, st);
      }
    }
  }
}

template <typename X, typename Acc, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    row_state_merge_kernel(RowArgs<Acc> a, const EntropyState<Acc>* __restrict__ partial, StateSink<Acc> sink) {
  const int chunks = a.grid.chunks;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.rows; r += int64_t(gridDim.x) * blockDim.x) {
    EntropyState<Acc> st = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) st = merge(st, partial[r * chunks + c]);
    finalize_row_state<X, Acc, kEntropy>(sink, a, r, st);
  }
}

// softmax(x/T) (kLog false) or log_softmax(x/T) into out ([rows, V] contiguous),
// as (x/T - max) - log Z (csrc/cpu/softmax.cpp). max_in/logz_in null: the row is
// not split, the group computes its state first.
template <typename X, typename Acc, bool kLog>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(RowArgs<Acc> a, const Acc* __restrict__ max_in, const Acc* __restrict__ logz_in,
                   X* __restrict__ out) {
  constexpr int N = 16 / sizeof(X);
  __shared__ ReduceScratch<EntropyState<Acc>> scratch;
  const RowGrid g = a.grid;
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    const X* row = pos.active ? row_ptr<X>(a.x, pos.row, a.stride) : nullptr;
    X* orow = pos.active ? row_ptr_mut<X>(out, pos.row, a.V) : nullptr;
    PackLayout L = {};
    int64_t k0 = 0, k1 = 0;
    if (pos.active) {
      L = make_layout<N>(a.V, single_ptrs<X>(row, orow));
      chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
    }
    Acc mx, logz;
    if (max_in == nullptr) {
      EntropyState<Acc> st = EntropyState<Acc>::empty();
      if (pos.active) accumulate_range<X, Acc, N, false>(st, row, L, k0, k1, pos.lane, g.G, a.inv_t);
      st = group_allreduce(st, MergeEntropy<Acc>{}, g.G, scratch);
      mx = st.sm.max;
      logz = MathOps<Acc>::log(st.sm.sum);
    } else {
      mx = pos.active ? max_in[pos.row] : Acc(0);
      logz = pos.active ? logz_in[pos.row] : Acc(0);
    }
    if (!pos.active) continue;  // nothing block-wide follows
    for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
      const int64_t start = L.base + k * N;
      Acc v[N];
      load_pack<Acc, X, N>(row, L, start, a.inv_t, neg_inf<Acc>(), v);
#pragma unroll
      for (int l = 0; l < N; ++l) {
        const Acc y = (v[l] - mx) - logz;
        v[l] = kLog ? y : MathOps<Acc>::exp(y);
      }
      store_pack<X, Acc, N>(orow, L, start, v);
    }
  }
}

// Arguments of the softmax backward: grad_output (G) and output (Y) rows.
template <typename Acc>
struct BwdArgs {
  const void* g;
  int64_t g_stride;
  const void* y;
  int64_t y_stride;
  int64_t rows, V;
  Acc inv_t;
  RowGrid grid;
};

enum class BwdMode : int32_t { Full = 0, PartialDot = 1, WriteOnly = 2 };

template <typename G, typename Y>
__device__ __forceinline__ RowPtrs bwd_ptrs(const G* g, const Y* y, const Y* out) {
  RowPtrs p;
  if (sizeof(G) <= sizeof(Y)) {
    p.p[0] = g; p.esize[0] = sizeof(G);
    p.p[1] = y; p.esize[1] = sizeof(Y);
  } else {
    p.p[0] = y; p.esize[0] = sizeof(Y);
    p.p[1] = g; p.esize[1] = sizeof(G);
  }
  p.p[2] = out; p.esize[2] = sizeof(Y);
  p.p[3] = nullptr; p.esize[3] = 1;
  p.count = 3;
  return p;
}

// d/dx softmax(x/T) = y (g - sum g y) / T; d/dx log_softmax(x/T) = (g - e^y sum g) / T.
// Full: one group per row computes the dot and writes. PartialDot: writes
// the chunk's dot to `dots[row * chunks + chunk]`. WriteOnly: reads dots[row].
template <typename G, typename Y, typename Acc, bool kLog>
__global__ void __launch_bounds__(kThreads)
    softmax_bwd_kernel(BwdArgs<Acc> a, BwdMode mode, Acc* __restrict__ dots, Y* __restrict__ out) {
  constexpr int N = pack_width(sizeof(G), sizeof(Y));
  __shared__ ReduceScratch<Acc> scratch;
  const RowGrid grid = a.grid;
  for (int64_t b = blockIdx.x; b < grid.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(grid, b);
    const G* gr = pos.active ? row_ptr<G>(a.g, pos.row, a.g_stride) : nullptr;
    const Y* yr = pos.active ? row_ptr<Y>(a.y, pos.row, a.y_stride) : nullptr;
    Y* orow = (pos.active && mode != BwdMode::PartialDot) ? row_ptr_mut<Y>(out, pos.row, a.V) : nullptr;
    PackLayout L = {};
    int64_t k0 = 0, k1 = 0;
    if (pos.active) {
      L = make_layout<N>(a.V, bwd_ptrs<G, Y>(gr, yr, orow));
      chunk_range(L.packs, pos.chunk, grid.chunks, &k0, &k1);
    }
    Acc dot = Acc(0);
    if (mode == BwdMode::WriteOnly) {
      dot = pos.active ? dots[pos.row] : Acc(0);
    } else {
      if (pos.active) {
        for (int64_t k = k0 + pos.lane; k < k1; k += grid.G) {
          const int64_t start = L.base + k * N;
          Acc gv[N], yv[N];
          load_pack<Acc, G, N>(gr, L, start, Acc(1), Acc(0), gv);
          load_pack<Acc, Y, N>(yr, L, start, Acc(1), Acc(0), yv);
#pragma unroll
          for (int l = 0; l < N; ++l) dot += kLog ? gv[l] : gv[l] * yv[l];
        }
      }
      dot = group_allreduce(dot, AddAcc<Acc>{}, grid.G, scratch);
      if (mode == BwdMode::PartialDot) {
        if (pos.active && pos.lane == 0) dots[pos.row * grid.chunks + pos.chunk] = dot;
        continue;
      }
    }
    if (!pos.active) continue;
    for (int64_t k = k0 + pos.lane; k < k1; k += grid.G) {
      const int64_t start = L.base + k * N;
      Acc gv[N], yv[N], d[N];
      load_pack<Acc, G, N>(gr, L, start, Acc(1), Acc(0), gv);
      load_pack<Acc, Y, N>(yr, L, start, Acc(1), Acc(0), yv);
#pragma unroll
      for (int l = 0; l < N; ++l) d[l] = (kLog ? gv[l] - MathOps<Acc>::exp(yv[l]) * dot : yv[l] * (gv[l] - dot)) * a.inv_t;
      store_pack<Y, Acc, N>(orow, L, start, d);
    }
  }
}

// -sum_i q_i log q_i over the row (or chunk) given the global lse; NaN for a
// row whose lse is not finite. Chunks write partial sums (NaN rows: NaN).
template <typename X, typename Acc>
__global__ void __launch_bounds__(kThreads) entropy_partial_kernel(RowArgs<Acc> a, const double* __restrict__ lse,
                                                                   Acc* __restrict__ partial, Acc* __restrict__ out) {
  constexpr int N = 16 / sizeof(X);
  __shared__ ReduceScratch<Acc> scratch;
  const RowGrid g = a.grid;
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    Acc acc = Acc(0);
    bool normal = false;
    if (pos.active) {
      const double l64 = lse[pos.row];
      const SplitLse<Acc> l = split_lse<Acc>(l64);
      normal = classify_row(l64) == RowKind::Normal;
      if (normal) {
        const X* row = row_ptr<X>(a.x, pos.row, a.stride);
        const PackLayout L = make_layout<N>(a.V, single_ptrs<X>(row, nullptr));
        int64_t k0, k1;
        chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
        for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
          Acc v[N];
          load_pack<Acc, X, N>(row, L, L.base + k * N, a.inv_t, neg_inf<Acc>(), v);
#pragma unroll
          for (int l2 = 0; l2 < N; ++l2) {
            const Acc lq = log_q(v[l2], l);
            const Acc q = MathOps<Acc>::exp(lq);
            acc -= q > Acc(0) ? q * lq : Acc(0);
          }
        }
      }
    }
    acc = group_allreduce(acc, AddAcc<Acc>{}, g.G, scratch);
    if (pos.active && pos.lane == 0) {
      const Acc v = normal ? acc : quiet_nan<Acc>();
      if (g.chunks > 1) {
        partial[pos.row * g.chunks + pos.chunk] = v;
      } else {
        out[pos.row] = v;
      }
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(const Acc* __restrict__ partial, int chunks, int64_t rows, Acc* __restrict__ out) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    Acc s = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) s += partial[r * chunks + c];
    out[r] = s;
  }
}

// dH/dx_j = -q_j (log q_j + H) / T, times the upstream gradient; empty rows 0,
// poisoned rows NaN (csrc/cpu/softmax.cpp).
template <typename X, typename Acc>
__global__ void __launch_bounds__(kThreads)
    entropy_bwd_kernel(RowArgs<Acc> a, const Acc* __restrict__ grad, const Acc* __restrict__ entropy,
                       const double* __restrict__ lse, X* __restrict__ out) {
  constexpr int N = 16 / sizeof(X);
  const RowGrid g = a.grid;
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    if (!pos.active) continue;
    const int64_t r = pos.row;
    const X* row = row_ptr<X>(a.x, r, a.stride);
    X* orow = row_ptr_mut<X>(out, r, a.V);
    const PackLayout L = make_layout<N>(a.V, single_ptrs<X>(row, orow));
    int64_t k0, k1;
    chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
    const SplitLse<Acc> l = split_lse<Acc>(lse[r]);
    const Acc h = entropy[r], scale = -grad[r] * a.inv_t;
    const RowKind kind = classify_row(lse[r]);
    for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
      const int64_t start = L.base + k * N;
      Acc v[N];
      if (kind != RowKind::Normal) {
        const Acc fill = constant_row_gradient<Acc>(kind);
#pragma unroll
        for (int l2 = 0; l2 < N; ++l2) v[l2] = fill;
      } else {
        load_pack<Acc, X, N>(row, L, start, a.inv_t, neg_inf<Acc>(), v);
#pragma unroll
        for (int l2 = 0; l2 < N; ++l2) {
          const Acc lq = log_q(v[l2], l);
          const Acc q = MathOps<Acc>::exp(lq);
          v[l2] = q > Acc(0) ? scale * q * (lq + h) : Acc(0);
        }
      }
      store_pack<X, Acc, N>(orow, L, start, v);
    }
  }
}

// ---- launchers ---------------------------------------------------------------------

namespace detail {
inline unsigned per_row_grid(int64_t rows) { return grid_size((rows + kThreads - 1) / kThreads); }
}  // namespace detail

// The row state (lse; entropy with kEntropy; a token's log-prob) into `sink`.
template <typename X, typename Acc, bool kEntropy>
cudaError_t launch_row_state(RowArgs<Acc> a, const StateSink<Acc>& sink, const Workspace& ws, cudaStream_t stream) {
  constexpr int N = 16 / sizeof(X);
  a.grid = plan_row_grid(a.rows, (a.V + N - 1) / N + 1);
  EntropyState<Acc>* partial = nullptr;
  if (a.grid.chunks > 1) {
    partial = static_cast<EntropyState<Acc>*>(ws.get(size_t(a.rows) * a.grid.chunks * sizeof(EntropyState<Acc>)));
    if (partial == nullptr) return cudaErrorMemoryAllocation;
  }
  row_state_kernel<X, Acc, kEntropy><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(a, partial, sink);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.grid.chunks == 1) return err;
  row_state_merge_kernel<X, Acc, kEntropy><<<detail::per_row_grid(a.rows), kThreads, 0, stream>>>(a, partial, sink);
  return cudaGetLastError();
}

// out: [rows, V] contiguous, dtype of the logits.
inline cudaError_t softmax_forward(const RowTensor& in, double temperature, bool log, void* out, const Workspace& ws,
                                   cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    constexpr int N = 16 / sizeof(X);
    RowArgs<Acc> a = row_args<Acc>(in, temperature);
    a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
    const Acc* mx = nullptr;
    const Acc* logz = nullptr;
    if (a.grid.chunks > 1) {  // split rows: the state first (partials + merge), then the write
      Acc* m = static_cast<Acc*>(ws.get(size_t(in.rows) * sizeof(Acc)));
      Acc* z = static_cast<Acc*>(ws.get(size_t(in.rows) * sizeof(Acc)));
      if (m == nullptr || z == nullptr) return cudaErrorMemoryAllocation;
      StateSink<Acc> sink;
      sink.max = m;
      sink.logz = z;
      const cudaError_t err = launch_row_state<X, Acc, false>(a, sink, ws, stream);
      if (err != cudaSuccess) return err;
      mx = m;
      logz = z;
    }
    const unsigned grid = grid_size(a.grid.blocks());
    if (log) {
      softmax_kernel<X, Acc, true><<<grid, kThreads, 0, stream>>>(a, mx, logz, static_cast<X*>(out));
    } else {
      softmax_kernel<X, Acc, false><<<grid, kThreads, 0, stream>>>(a, mx, logz, static_cast<X*>(out));
    }
    return cudaGetLastError();
  });
}

// grad_output `g` and output `y` as [rows, V]; out: [rows, V] contiguous, dtype of y.
// float64 pairs only with float64 (the adapter converts g to y's dtype otherwise).
inline cudaError_t softmax_backward(const RowTensor& g, const RowTensor& y, double temperature, bool log, void* out,
                                    const Workspace& ws, cudaStream_t stream) {
  if (y.rows == 0) return cudaSuccess;
  return dispatch_dtype_pair(g.dtype, y.dtype, [&](auto tg, auto ty) -> cudaError_t {
    using G = typename decltype(tg)::type;
    using Y = typename decltype(ty)::type;
    using Acc = typename AccOf<Y>::type;
    constexpr int N = pack_width(sizeof(G), sizeof(Y));
    BwdArgs<Acc> a;
    a.g = g.x;
    a.g_stride = g.stride;
    a.y = y.x;
    a.y_stride = y.stride;
    a.rows = y.rows;
    a.V = y.V;
    a.inv_t = Acc(1.0 / temperature);
    a.grid = plan_row_grid(y.rows, (y.V + N - 1) / N + 1);
    auto launch = [&](BwdMode mode, Acc* dots) {
      const unsigned grid = grid_size(a.grid.blocks());
      if (log) {
        softmax_bwd_kernel<G, Y, Acc, true><<<grid, kThreads, 0, stream>>>(a, mode, dots, static_cast<Y*>(out));
      } else {
        softmax_bwd_kernel<G, Y, Acc, false><<<grid, kThreads, 0, stream>>>(a, mode, dots, static_cast<Y*>(out));
      }
      return cudaGetLastError();
    };
    if (a.grid.chunks == 1) return launch(BwdMode::Full, nullptr);
    Acc* partial = static_cast<Acc*>(ws.get(size_t(y.rows) * a.grid.chunks * sizeof(Acc)));
    Acc* dots = static_cast<Acc*>(ws.get(size_t(y.rows) * sizeof(Acc)));
    if (partial == nullptr || dots == nullptr) return cudaErrorMemoryAllocation;
    cudaError_t err = launch(BwdMode::PartialDot, partial);
    if (err != cudaSuccess) return err;
    sum_chunks_kernel<Acc><<<detail::per_row_grid(y.rows), kThreads, 0, stream>>>(partial, a.grid.chunks, y.rows, dots);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return launch(BwdMode::WriteOnly, dots);
  });
}

// out: [rows] accumulation dtype.
inline cudaError_t logsumexp(const RowTensor& in, double temperature, void* out, const Workspace& ws,
                             cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    StateSink<Acc> sink;
    sink.lse = static_cast<Acc*>(out);
    return launch_row_state<X, Acc, false>(row_args<Acc>(in, temperature), sink, ws, stream);
  });
}

// out: [rows] float64, the lse of the same state in float64 (as entropy_forward's).
inline cudaError_t lse_float64(const RowTensor& in, double temperature, void* out, const Workspace& ws,
                               cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    StateSink<Acc> sink;
    sink.lse64 = static_cast<double*>(out);
    return launch_row_state<X, Acc, false>(row_args<Acc>(in, temperature), sink, ws, stream);
  });
}

// Without `lse_in`: entropy and lse of each row (one pass). With `lse_in` (the
// global lse of a vocab shard's rows): the shard's partial entropy; lse_out is
// then not written (the adapter returns a copy of lse_in). lse_in and lse_out
// are float64 [rows] for every input dtype (as the CPU kernel).
inline cudaError_t entropy_forward(const RowTensor& in, double temperature, const void* lse_in, void* entropy,
                                   void* lse_out, const Workspace& ws, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    constexpr int N = 16 / sizeof(X);
    RowArgs<Acc> a = row_args<Acc>(in, temperature);
    if (lse_in == nullptr) {
      StateSink<Acc> sink;
      sink.lse64 = static_cast<double*>(lse_out);
      sink.entropy = static_cast<Acc*>(entropy);
      return launch_row_state<X, Acc, true>(a, sink, ws, stream);
    }
    a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
    Acc* partial = nullptr;
    if (a.grid.chunks > 1) {
      partial = static_cast<Acc*>(ws.get(size_t(in.rows) * a.grid.chunks * sizeof(Acc)));
      if (partial == nullptr) return cudaErrorMemoryAllocation;
    }
    entropy_partial_kernel<X, Acc><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(
        a, static_cast<const double*>(lse_in), partial, static_cast<Acc*>(entropy));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || a.grid.chunks == 1) return err;
    sum_chunks_kernel<Acc><<<detail::per_row_grid(in.rows), kThreads, 0, stream>>>(partial, a.grid.chunks, in.rows,
                                                                                    static_cast<Acc*>(entropy));
    return cudaGetLastError();
  });
}

// grad, entropy: [rows] accumulation dtype; lse: [rows] float64; out: [rows, V] contiguous, dtype of the logits.
inline cudaError_t entropy_backward(const RowTensor& in, double temperature, const void* grad, const void* entropy,
                                    const void* lse, void* out, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    constexpr int N = 16 / sizeof(X);
    RowArgs<Acc> a = row_args<Acc>(in, temperature);
    a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
    entropy_bwd_kernel<X, Acc><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(
        a, static_cast<const Acc*>(grad), static_cast<const Acc*>(entropy), static_cast<const double*>(lse),
        static_cast<X*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdext
