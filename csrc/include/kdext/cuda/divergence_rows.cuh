// Device-side pieces shared by the divergence kernels (framework-free): the
// kernel arguments, where a row's results go, the online update of both
// softmax states, the per-entry sums of the math contract, and the reading of
// a (student, teacher) pack.
//
// Semantics are those of the CPU kernels (csrc/cpu/divergence.cpp), formula by
// formula: the per-element terms and gradients come from kdext/divergence.h,
// the online softmax state and its exact merge from kdext/online_softmax.h,
// the treatment of rows without a distribution from kdext/row_contract.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/geometry.h"
#include "kdext/cuda/vec_load.cuh"
#include "kdext/divergence.h"
#include "kdext/online_softmax.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace cuda {

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

// One pack of x = s/T and y = t/T.
template <typename Acc, int N>
struct PairPack {
  Acc s[N];
  Acc t[N];
};

// The online update of docs/DESIGN.md for one pack: one exp per entry per
// distribution, plus one per pack when a max moves.
template <typename Acc, int N, bool kWeighted>
__host__ __device__ __forceinline__ void accumulate_pair(ReverseKLState<Acc>& st, const PairPack<Acc, N>& p) {
  using M = MathOps<Acc>;
  Acc f;
  if (raise_max<Acc, N>(st.student, p.s, &f)) {
    if (kWeighted) st.weighted = st.weighted * f;
    const Acc m = st.student.max;
#pragma unroll
    for (int l = 0; l < N; ++l) {
      const Acc e = M::exp(p.s[l] - m);
      st.student.sum += e;
      if (kWeighted) st.weighted += e > Acc(0) ? e * (p.s[l] - p.t[l]) : Acc(0);
    }
  }
  if (raise_max<Acc, N>(st.teacher, p.t, &f)) {
    const Acc m = st.teacher.max;
#pragma unroll
    for (int l = 0; l < N; ++l) st.teacher.sum += M::exp(p.t[l] - m);
  }
}

template <Divergence D, typename Acc, int N>
__host__ __device__ __forceinline__ void accumulate_sums(DivergenceSums<Acc>& acc, const PairPack<Acc, N>& p,
                                                         Acc lse_s, Acc lse_t, const DivergenceParam<Acc>& prm) {
#pragma unroll
  for (int l = 0; l < N; ++l) {
    const auto e = DivergenceMath<D>::template terms<Acc>(p.s[l] - lse_s, p.t[l] - lse_t, prm);
    acc.value += e.value;
    acc.student_c += e.student_c;
    acc.teacher_c += e.teacher_c;
  }
}

// A finished pair state: writes both lse and, for reverse KL, the row's sums.
template <typename Acc, bool kRKL>
__host__ __device__ __forceinline__ void finalize_state(const RowSink<Acc>& sk, int64_t r,
                                                        const ReverseKLState<Acc>& st) {
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

// The row pointers of a pair kernel: s and t, then the gradient rows written.
template <typename S, typename T>
__device__ __forceinline__ RowPtrs pair_ptrs(const S* s, const T* t, const void* gs, const void* gt) {
  return input_ptrs(s, t).add(gs, sizeof(S)).add(gt, sizeof(T));
}

// One row of s and t in a pair kernel: its pointers and pack layout (the
// gradient rows, when written, take part in the common alignment).
template <typename S, typename T, typename Acc, int N>
struct PairRow {
  const S* s;
  const T* t;
  PackLayout L;
  Acc inv_t;

  __device__ __forceinline__ PairRow(const PairArgs<Acc>& a, int64_t r, const void* gs = nullptr,
                                     const void* gt = nullptr)
      : s(row_ptr<S>(a.s, r, a.s_stride)),
        t(row_ptr<T>(a.t, r, a.t_stride)),
        L(make_layout<N>(a.V, pair_ptrs(s, t, gs, gt))),
        inv_t(a.inv_t) {}

  __device__ __forceinline__ int64_t start(int64_t k) const { return L.base + k * N; }

  // x = s/T and y = t/T of pack k; lanes outside the row read -inf.
  __device__ __forceinline__ void load(int64_t k, PairPack<Acc, N>& p) const {
    load_pack<Acc, S, N>(s, L, start(k), inv_t, neg_inf<Acc>(), p.s);
    load_pack<Acc, T, N>(t, L, start(k), inv_t, neg_inf<Acc>(), p.t);
  }

  // The packs [k0, k1) of chunk c out of `chunks`.
  __device__ __forceinline__ void chunk(int c, int chunks, int64_t* k0, int64_t* k1) const {
    chunk_range(L.packs, c, chunks, k0, k1);
  }
};

}  // namespace cuda
}  // namespace kdext
