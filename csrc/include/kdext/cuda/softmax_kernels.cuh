// CUDA kernels of the softmax family (framework-free): softmax and
// log_softmax with temperature, their backward, logsumexp, lse_float64 and
// entropy (forward, vocab-shard partial, backward). The launchers are in
// softmax_launchers.cuh; logprobs reuses the row-state pass and the
// elementwise row pass.
//
// Semantics are those of csrc/cpu/softmax.cpp formula by formula; the online
// softmax state and its merge come from kdext/online_softmax.h, the entropy's
// centred sum is the CPU's (H = log Z - B / Z, B = sum e^{x-m} (x - m)).
//
// Kernels (kThreads-thread blocks over the row groups of geometry.h):
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
//   row_map_kernel        an elementwise pass over rows given per-row
//                         statistics (entropy_backward here, logprobs_backward).
//   sum_chunks_kernel     adds per-chunk partial sums in chunk order.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/rows.cuh"
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

template <typename X>
__device__ __forceinline__ RowPtrs single_ptrs(const void* x, const void* out) {
  RowPtrs p;
  p.count = 0;
  return p.add(x, sizeof(X)).add(out, sizeof(X));
}

// One row of x (and of the output, when one is written) in a row kernel.
template <typename X, typename Acc>
struct SingleRow {
  static constexpr int N = 16 / sizeof(X);
  const X* x;
  PackLayout L;
  int64_t k0, k1;  // this group's packs

  __device__ __forceinline__ SingleRow(const RowArgs<Acc>& a, const GroupPos& pos, const void* out = nullptr)
      : x(row_ptr<X>(a.x, pos.row, a.stride)), L(make_layout<N>(a.V, single_ptrs<X>(x, out))) {
    chunk_range(L.packs, pos.chunk, a.grid.chunks, &k0, &k1);
  }

  __device__ __forceinline__ int64_t start(int64_t k) const { return L.base + k * N; }
};

// One pack of x/T.
template <typename Acc, int N>
struct RowPack {
  Acc x[N];
};

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

// The online state of packs [k0, k1) of a row, `G` threads apart from k0 + lane.
template <typename X, typename Acc, bool kEntropy>
__device__ __forceinline__ void accumulate_range(EntropyState<Acc>& st, const SingleRow<X, Acc>& row, int lane,
                                                 int G, Acc inv_t) {
  constexpr int N = SingleRow<X, Acc>::N;
  using Pack = RowPack<Acc, N>;
  for_packs_in_flight<Pack>(
      row.k0, row.k1, lane, G,
      [&](int64_t k, Pack& p) { load_pack<Acc, X, N>(row.x, row.L, row.start(k), inv_t, neg_inf<Acc>(), p.x); },
      [&](const Pack& p) { accumulate_row<Acc, N, kEntropy>(st, p.x); });
}

// ---- kernels ---------------------------------------------------------------------

template <typename X, typename Acc, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    row_state_kernel(RowArgs<Acc> a, EntropyState<Acc>* __restrict__ partial, StateSink<Acc> sink) {
  KDEXT_SHARED(scratch, ReduceScratch<EntropyState<Acc>>);
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    EntropyState<Acc> st = EntropyState<Acc>::empty();
    if (pos.active) accumulate_range<X, Acc, kEntropy>(st, SingleRow<X, Acc>(a, pos), pos.lane, g.G, a.inv_t);
    st = group_allreduce(st, MergeOp{}, g.G, scratch);
    if (!pos.active || pos.lane != 0) return;
    if (g.chunks > 1) {
      partial[pos.row * g.chunks + pos.chunk] = st;
    } else {
      finalize_row_state<X, Acc, kEntropy>(sink, a, pos.row, st);
    }
  });
}

template <typename X, typename Acc, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    row_state_merge_kernel(RowArgs<Acc> a, const EntropyState<Acc>* __restrict__ partial, StateSink<Acc> sink) {
  const int chunks = a.grid.chunks;
  for_each_row(a.rows, [&](int64_t r) {
    EntropyState<Acc> st = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) st = merge(st, partial[r * chunks + c]);
    finalize_row_state<X, Acc, kEntropy>(sink, a, r, st);
  });
}

// softmax(x/T) (kLog false) or log_softmax(x/T) into out ([rows, V] contiguous),
// as (x/T - max) - log Z (csrc/cpu/softmax.cpp). max_in/logz_in null: the row is
// not split, the group computes its state first.
template <typename X, typename Acc, bool kLog>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(RowArgs<Acc> a, const Acc* __restrict__ max_in, const Acc* __restrict__ logz_in,
                   X* __restrict__ out) {
  constexpr int N = SingleRow<X, Acc>::N;
  KDEXT_SHARED(scratch, ReduceScratch<EntropyState<Acc>>);
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    X* orow = pos.active ? row_ptr_mut<X>(out, pos.row, a.V) : nullptr;
    Acc mx, logz;
    if (max_in == nullptr) {
      EntropyState<Acc> st = EntropyState<Acc>::empty();
      if (pos.active) accumulate_range<X, Acc, false>(st, SingleRow<X, Acc>(a, pos, orow), pos.lane, g.G, a.inv_t);
      st = group_allreduce(st, MergeOp{}, g.G, scratch);
      mx = st.sm.max;
      logz = MathOps<Acc>::log(st.sm.sum);
    } else {
      mx = pos.active ? max_in[pos.row] : Acc(0);
      logz = pos.active ? logz_in[pos.row] : Acc(0);
    }
    if (!pos.active) return;  // nothing block-wide follows
    const SingleRow<X, Acc> row(a, pos, orow);
    for (int64_t k = row.k0 + pos.lane; k < row.k1; k += g.G) {
      Acc v[N];
      load_pack<Acc, X, N>(row.x, row.L, row.start(k), a.inv_t, neg_inf<Acc>(), v);
#pragma unroll
      for (int l = 0; l < N; ++l) {
        const Acc y = (v[l] - mx) - logz;
        v[l] = kLog ? y : MathOps<Acc>::exp(y);
      }
      store_pack<X, Acc, N>(orow, row.L, row.start(k), v);
    }
  });
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
  return input_ptrs(g, y).add(out, sizeof(Y));
}

// d/dx softmax(x/T) = y (g - sum g y) / T; d/dx log_softmax(x/T) = (g - e^y sum g) / T.
// Full: one group per row computes the dot and writes. PartialDot: writes
// the chunk's dot to `dots[row * chunks + chunk]`. WriteOnly: reads dots[row].
template <typename G, typename Y, typename Acc, bool kLog>
__global__ void __launch_bounds__(kThreads)
    softmax_bwd_kernel(BwdArgs<Acc> a, BwdMode mode, Acc* __restrict__ dots, Y* __restrict__ out) {
  constexpr int N = pack_width(sizeof(G), sizeof(Y));
  KDEXT_SHARED(scratch, ReduceScratch<Acc>);
  const RowGrid grid = a.grid;
  for_each_group(grid, [&](const GroupPos& pos) {
    const G* gr = pos.active ? row_ptr<G>(a.g, pos.row, a.g_stride) : nullptr;
    const Y* yr = pos.active ? row_ptr<Y>(a.y, pos.row, a.y_stride) : nullptr;
    Y* orow = (pos.active && mode != BwdMode::PartialDot) ? row_ptr_mut<Y>(out, pos.row, a.V) : nullptr;
    PackLayout L = {};
    int64_t k0 = 0, k1 = 0;
    if (pos.active) {
      L = make_layout<N>(a.V, bwd_ptrs<G, Y>(gr, yr, orow));
      chunk_range(L.packs, pos.chunk, grid.chunks, &k0, &k1);
    }
    auto load = [&](int64_t k, Acc (&gv)[N], Acc (&yv)[N]) {
      load_pack<Acc, G, N>(gr, L, L.base + k * N, Acc(1), Acc(0), gv);
      load_pack<Acc, Y, N>(yr, L, L.base + k * N, Acc(1), Acc(0), yv);
    };
    Acc dot = Acc(0);
    if (mode == BwdMode::WriteOnly) {
      dot = pos.active ? dots[pos.row] : Acc(0);
    } else {
      if (pos.active) {
        for (int64_t k = k0 + pos.lane; k < k1; k += grid.G) {
          Acc gv[N], yv[N];
          load(k, gv, yv);
#pragma unroll
          for (int l = 0; l < N; ++l) dot += kLog ? gv[l] : gv[l] * yv[l];
        }
      }
      dot = group_allreduce(dot, AddAcc<Acc>{}, grid.G, scratch);
      if (mode == BwdMode::PartialDot) {
        if (pos.active && pos.lane == 0) dots[pos.row * grid.chunks + pos.chunk] = dot;
        return;
      }
    }
    if (!pos.active) return;
    for (int64_t k = k0 + pos.lane; k < k1; k += grid.G) {
      Acc gv[N], yv[N], d[N];
      load(k, gv, yv);
#pragma unroll
      for (int l = 0; l < N; ++l)
        d[l] = (kLog ? gv[l] - MathOps<Acc>::exp(yv[l]) * dot : yv[l] * (gv[l] - dot)) * a.inv_t;
      store_pack<Y, Acc, N>(orow, L, L.base + k * N, d);
    }
  });
}

// -sum_i q_i log q_i over the row (or chunk) given the global lse; NaN for a
// row whose lse is not finite. Chunks write partial sums (NaN rows: NaN).
template <typename X, typename Acc>
__global__ void __launch_bounds__(kThreads) entropy_partial_kernel(RowArgs<Acc> a, const double* __restrict__ lse,
                                                                   Acc* __restrict__ partial, Acc* __restrict__ out) {
  constexpr int N = SingleRow<X, Acc>::N;
  KDEXT_SHARED(scratch, ReduceScratch<Acc>);
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    Acc acc = Acc(0);
    bool normal = false;
    if (pos.active) {
      const double l64 = lse[pos.row];
      const SplitLse<Acc> l = split_lse<Acc>(l64);
      normal = classify_row(l64) == RowKind::Normal;
      if (normal) {
        const SingleRow<X, Acc> row(a, pos);
        for (int64_t k = row.k0 + pos.lane; k < row.k1; k += g.G) {
          Acc v[N];
          load_pack<Acc, X, N>(row.x, row.L, row.start(k), a.inv_t, neg_inf<Acc>(), v);
#pragma unroll
          for (int i = 0; i < N; ++i) {
            const Acc lq = log_q(v[i], l);
            const Acc q = MathOps<Acc>::exp(lq);
            acc -= q > Acc(0) ? q * lq : Acc(0);
          }
        }
      }
    }
    acc = group_allreduce(acc, AddAcc<Acc>{}, g.G, scratch);
    if (!pos.active || pos.lane != 0) return;
    const Acc v = normal ? acc : quiet_nan<Acc>();
    if (g.chunks > 1) {
      partial[pos.row * g.chunks + pos.chunk] = v;
    } else {
      out[pos.row] = v;
    }
  });
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(const Acc* __restrict__ partial, int chunks, int64_t rows, Acc* __restrict__ out) {
  for_each_row(rows, [&](int64_t r) {
    Acc s = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) s += partial[r * chunks + c];
    out[r] = s;
  });
}

// An elementwise pass over rows given per-row statistics: out = f(x/T) pack by
// pack. `map.row(r)` gives the row's constants (with their RowKind); rows that
// are not Normal are filled (constant_row_gradient of kdext/row_contract.h:
// Empty 0, Poisoned NaN) without reading x, the
// others get map.apply(constants, start, v) of each pack v of x/T (lanes
// outside the row read -inf and are never stored).
template <typename X, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads) row_map_kernel(RowArgs<Acc> a, Map map, X* __restrict__ out) {
  constexpr int N = SingleRow<X, Acc>::N;
  const RowGrid g = a.grid;
  for_each_group(g, [&](const GroupPos& pos) {
    if (!pos.active) return;
    X* orow = row_ptr_mut<X>(out, pos.row, a.V);
    const SingleRow<X, Acc> row(a, pos, orow);
    const auto c = map.row(pos.row);
    for (int64_t k = row.k0 + pos.lane; k < row.k1; k += g.G) {
      Acc v[N];
      if (c.kind != RowKind::Normal) {
        const Acc fill = constant_row_gradient<Acc>(c.kind);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = fill;
      } else {
        load_pack<Acc, X, N>(row.x, row.L, row.start(k), a.inv_t, neg_inf<Acc>(), v);
        map.apply(c, row.start(k), v);
      }
      store_pack<X, Acc, N>(orow, row.L, row.start(k), v);
    }
  });
}

// dH/dx_j = -q_j (log q_j + H) / T, times the upstream gradient; empty rows 0,
// poisoned rows NaN (csrc/cpu/softmax.cpp).
template <typename Acc>
struct EntropyGrad {
  const Acc* grad;
  const Acc* entropy;
  const double* lse;
  Acc inv_t;

  struct Row {
    RowKind kind;
    SplitLse<Acc> lse;
    Acc h, scale;
  };

  __device__ __forceinline__ Row row(int64_t r) const {
    return {classify_row(lse[r]), split_lse<Acc>(lse[r]), entropy[r], -grad[r] * inv_t};
  }

  template <int N>
  __device__ __forceinline__ void apply(const Row& c, int64_t, Acc (&v)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const Acc lq = log_q(v[i], c.lse);
      const Acc q = MathOps<Acc>::exp(lq);
      v[i] = q > Acc(0) ? c.scale * q * (lq + c.h) : Acc(0);
    }
  }
};

}  // namespace cuda
}  // namespace kdext
