// The CUDA kernel of kdext::top_p_sample, framework-free (raw pointers, CUDA
// types and CUB only); the adapter is csrc/cuda/top_p_sample.cu. Its block
// reductions are block_reduce.cuh's (a fixed shuffle butterfly and a
// fixed-order fold over warps); like every kernel header it also compiles as
// plain C++ for the CPU simulator of tests/cpp/cuda_sim, which is how its
// logic is tested on machines without a GPU.
//
// One thread block per row (kBlock threads). The row is never stored: every
// pass reads the logits and recomputes r_i with top_p::mixture_prob, whose
// rounding is pinned, so each pass sees bit-identical values.
//   pass 1  softmax states of s/T and t/T (online, merged across the block);
//   pass 2  the row totals of r (mass, count, max, min > 0);
//   rounds  the threshold search of kdext/top_p.h with K = 8 pivots: a round
//           is one pass in which only the values inside the bracket (lo, hi]
//           do work (F(v) = F(hi) + their sum above v), followed by a
//           deterministic block reduction of the 4K sums (warp shuffles, then a
//           fixed-order sum over warps); every thread updates an identical
//           copy of the search state, so the loop is uniform;
//   compact as soon as the bracket holds <= kListCap values, one pass copies
//           them, in vocabulary order (block scan), into shared memory and the
//           remaining rounds run there without touching global memory;
//   draw    tiles of kBlock * kItems values in vocabulary order: a block
//           exclusive scan of the kept mass per thread, a running total in
//           double, and the first index whose running mass exceeds u * kept
//           mass, u from Philox(seed, row id, offset) (kdext/philox.h).
// Same stream mapping and the same search as the CPU kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <limits>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/online_softmax.h"
#include "kdext/philox.h"
#include "kdext/top_p.h"

namespace kdext {
namespace top_p_cuda {

// The two macros exist only so that the CPU simulator (tests/cpp/cuda_sim) can
// run the kernel with fewer threads and a smaller list; builds use the defaults.
#ifndef KDEXT_TOP_P_SAMPLE_BLOCK
#define KDEXT_TOP_P_SAMPLE_BLOCK 512
#endif
#ifndef KDEXT_TOP_P_SAMPLE_LIST_CAP
#define KDEXT_TOP_P_SAMPLE_LIST_CAP 4096
#endif
constexpr int kBlock = KDEXT_TOP_P_SAMPLE_BLOCK;
constexpr int kWarps = kBlock / 32;
constexpr int kItems = 8;  // consecutive values per thread per tile
constexpr int kTile = kBlock * kItems;
constexpr int kPivots = 8;
constexpr int kListCap = KDEXT_TOP_P_SAMPLE_LIST_CAP;
static_assert(kBlock % 32 == 0 && kBlock >= 4 * kPivots, "whole warps, and a thread per reduced value");

struct Params {
  const void* s;  // [rows, V], unit stride in V
  const void* t;  // nullptr without teacher logits; same dtype as s
  int64_t s_row_stride, t_row_stride;  // in elements
  int64_t V;
  float inv_t, alpha;
  double top_p;
  int64_t top_k;
  uint64_t seed, offset;
  const int64_t* row_ids;  // each row's Philox subsequence; nullptr: the row index
  int64_t* tokens;
  float *student_logprob, *teacher_logprob, *sample_logprob, *threshold;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
struct Row {
  const scalar_t* __restrict__ s;
  const scalar_t* __restrict__ t;
  int64_t V;
  float inv_t;
  top_p::Mixture mix;

  // x = s/T with one rounding (no contraction with what follows).
  __device__ __forceinline__ float x(int64_t i) const { return __fmul_rn(to_float(s[i]), inv_t); }
  __device__ __forceinline__ float y(int64_t i) const { return __fmul_rn(to_float(t[i]), inv_t); }
  __device__ __forceinline__ float r(int64_t i) const {
    return top_p::mixture_prob(mix, mix.use_student ? x(i) : 0.f, mix.use_teacher ? y(i) : 0.f);
  }
  // r of the kItems values from i0 on (0 past the end of the row).
  __device__ __forceinline__ void tile(int64_t i0, float (&val)[kItems]) const {
#pragma unroll
    for (int k = 0; k < kItems; ++k) val[k] = i0 + k < V ? r(i0 + k) : 0.f;
  }
};

enum Op : int { kSum = 0, kMin = 1, kMax = 2 };

__device__ __forceinline__ float combine(int op, float a, float b) {
  return op == kSum ? a + b : (op == kMin ? top_p::fmin_(a, b) : top_p::fmax_(a, b));
}

union SharedScan {
  typename cub::BlockScan<float, kBlock>::TempStorage f;
  typename cub::BlockScan<int, kBlock>::TempStorage i;
};

union SharedReduce {
  cuda::EachScratch<4 * kPivots, kWarps> each;
  cuda::ReduceScratch<SoftmaxState<float>, kWarps> softmax;
};

struct Shared {
  float list[kListCap];
  SharedReduce reduce;
  SharedScan scan;
  int64_t index;
};

// Block-wide reduction of N floats per thread, op(i) for entry i; every thread
// gets the results.
template <int N, typename OpOf>
__device__ __forceinline__ void block_reduce(float (&v)[N], Shared& sh, OpOf op_of) {
  cuda::block_allreduce_each(v, [&](int i, float a, float b) { return combine(op_of(i), a, b); }, sh.reduce.each);
}

// Merges every thread's softmax state (max, sum) into the row's.
__device__ __forceinline__ SoftmaxState<float> block_softmax(SoftmaxState<float> st, Shared& sh) {
  st = cuda::group_allreduce(st, cuda::MergeOp{}, kBlock, sh.reduce.softmax);
  __syncthreads();  // the scratch is free again when this returns
  return st;
}

// Adds up to kItems values of x/T to an online softmax state: one exp per value.
__device__ __forceinline__ void softmax_add(SoftmaxState<float>& st, const float (&x)[kItems], int n) {
  float m = st.max;
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    if (k < n) m = MathOps<float>::maximum(m, x[k]);
  if (m == -std::numeric_limits<float>::infinity()) return;
  float sum = st.sum * rescale_factor(st.max, m);
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    if (k < n) sum += ::expf(x[k] - m);
  st = {m, sum};
}

template <typename scalar_t>
__device__ float row_lse(const scalar_t* __restrict__ p, int64_t V, float inv_t, Shared& sh) {
  SoftmaxState<float> st = SoftmaxState<float>::empty();
  for (int64_t base = 0; base < V; base += kTile) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kItems;
    float x[kItems];
    int n = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      x[k] = i0 + k < V ? __fmul_rn(to_float(p[i0 + k]), inv_t) : -std::numeric_limits<float>::infinity();
      n += i0 + k < V;
    }
    softmax_add(st, x, n);
  }
  return log_sum_exp(block_softmax(st, sh));
}

template <typename scalar_t>
__device__ top_p::RowTotals row_totals(const Row<scalar_t>& R, Shared& sh) {
  top_p::RowTotals tot = top_p::RowTotals::empty();
  for (int64_t base = 0; base < R.V; base += kTile) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kItems;
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (i0 + k < R.V) tot.add(R.r(i0 + k));
  }
  float v[4] = {tot.mass, tot.count, tot.max, tot.min_pos};
  block_reduce<4>(v, sh, [](int i) { return i < 2 ? kSum : (i == 2 ? kMax : kMin); });
  return {v[0], v[1], v[2], v[3]};
}

// Copies the values in (lo, hi] to sh.list in vocabulary order; returns how
// many there were (<= kListCap by the caller's check) and their min and max.
template <typename scalar_t>
__device__ int compact_window(const Row<scalar_t>& R, float lo, float hi, Shared& sh, float* wmin, float* wmax) {
  int total = 0;
  float mn = std::numeric_limits<float>::infinity(), mx = 0.f;
  for (int64_t base = 0; base < R.V; base += kTile) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kItems;
    float val[kItems];
    R.tile(i0, val);
    int n_in = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const bool in = val[k] > lo && val[k] <= hi;
      n_in += in;
      if (in) {
        mn = top_p::fmin_(mn, val[k]);
        mx = top_p::fmax_(mx, val[k]);
      }
    }
    int pos, tile_total;
    cub::BlockScan<int, kBlock>(sh.scan.i).ExclusiveSum(n_in, pos, tile_total);
    __syncthreads();
    pos += total;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (val[k] > lo && val[k] <= hi) {
        if (pos < kListCap) sh.list[pos] = val[k];
        ++pos;
      }
    }
    total += tile_total;
  }
  float v[2] = {mn, mx};
  block_reduce<2>(v, sh, [](int i) { return i == 0 ? kMin : kMax; });  // also publishes sh.list
  *wmin = v[0];
  *wmax = v[1];
  return total < kListCap ? total : kListCap;
}

// Runs one search to the end (see kdext/top_p.h); uniform across the block.
template <typename scalar_t>
__device__ void run_search(top_p::ThresholdSearch& st, const Row<scalar_t>& R, Shared& sh) {
  bool in_smem = false;
  int n_list = 0;
  float list_mass = 0.f, list_count = 0.f;  // F(hi) when the list was made
  while (!st.done()) {
    if (!in_smem && st.window_count() <= static_cast<float>(kListCap)) {
      float wmin, wmax;
      n_list = compact_window(R, st.lo, st.hi, sh, &wmin, &wmax);
      list_mass = st.hi_mass;
      list_count = st.hi_count;
      st.tighten(wmin, wmax);
      in_smem = true;
      continue;
    }
    float v[kPivots];
    st.pivots(v);
    top_p::PivotSums<kPivots> s;
    s.reset();
    float base_mass, base_count;
    if (in_smem) {
      for (int i = threadIdx.x; i < n_list; i += kBlock) s.add(sh.list[i], v);
      base_mass = list_mass;
      base_count = list_count;
    } else {
      const float lo = st.lo, hi = st.hi;
      for (int64_t base = 0; base < R.V; base += kTile) {
        const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kItems;
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
          if (i0 + k < R.V) {
            const float r = R.r(i0 + k);
            if (r > lo && r <= hi) s.add(r, v);  // the values above hi are in F(hi)
          }
        }
      }
      base_mass = st.hi_mass;
      base_count = st.hi_count;
    }
    float a[4 * kPivots];  // (copied with constant indices, so both stay in registers)
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      a[j] = s.mass[j];
      a[kPivots + j] = s.count[j];
      a[2 * kPivots + j] = s.min_above[j];
      a[3 * kPivots + j] = s.max_below[j];
    }
    block_reduce<4 * kPivots>(a, sh, [](int i) { return i < 2 * kPivots ? kSum : (i < 3 * kPivots ? kMin : kMax); });
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      s.mass[j] = a[j];
      s.count[j] = a[kPivots + j];
      s.min_above[j] = a[2 * kPivots + j];
      s.max_below[j] = a[3 * kPivots + j];
    }
    st.update(v, s, base_mass, base_count);
  }
}

// The first index whose running kept mass (vocabulary order) exceeds target;
// the last kept index if rounding leaves the total just short. -1 if none kept.
template <typename scalar_t>
__device__ int64_t draw(const Row<scalar_t>& R, float threshold, double target, Shared& sh) {
  double running = 0.0;
  int64_t last = -1;
  for (int64_t base = 0; base < R.V; base += kTile) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kItems;
    float val[kItems];
    R.tile(i0, val);
    float part = 0.f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      val[k] = val[k] >= threshold ? val[k] : 0.f;
      part += val[k];
      if (val[k] > 0.f) last = i0 + k;
    }
    float excl, tile_total;
    cub::BlockScan<float, kBlock>(sh.scan.f).ExclusiveSum(part, excl, tile_total);
    __syncthreads();
    if (running + static_cast<double>(tile_total) > target) {  // uniform: the same values everywhere
      if (threadIdx.x == 0) sh.index = INT64_MAX;
      __syncthreads();
      double c = running + static_cast<double>(excl);
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        if (val[k] > 0.f) {
          c += static_cast<double>(val[k]);
          if (c > target) {
            atomicMin(reinterpret_cast<unsigned long long*>(&sh.index), static_cast<unsigned long long>(i0 + k));
            break;
          }
        }
      }
      __syncthreads();
      const int64_t found = sh.index;
      __syncthreads();
      if (found != INT64_MAX) return found;
    }
    running += static_cast<double>(tile_total);
  }
  // Rounding left the total at or below the target: the last kept index.
  float v[1] = {static_cast<float>(last)};  // exact: indices < 2^24
  block_reduce<1>(v, sh, [](int) { return kMax; });
  return static_cast<int64_t>(v[0]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) top_p_sample_kernel(Params p) {
  KDEXT_SHARED(sh, Shared);
  const int64_t row = blockIdx.x;
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const scalar_t* s = static_cast<const scalar_t*>(p.s) + row * p.s_row_stride;
  const scalar_t* t = p.t ? static_cast<const scalar_t*>(p.t) + row * p.t_row_stride : nullptr;

  const float lse_s = row_lse(s, p.V, p.inv_t, sh);
  const float lse_t = t ? row_lse(t, p.V, p.inv_t, sh) : kNaN;
  const Row<scalar_t> R{s, t, p.V, p.inv_t, top_p::Mixture::make(p.alpha, lse_s, lse_t)};

  int64_t tok = -1;
  float threshold = kNaN, kept_mass = kNaN;
  if (R.mix.valid()) {
    const top_p::RowTotals tot = row_totals(R, sh);
    if (tot.count > 0.f && tot.mass > 0.f) {
      threshold = tot.min_pos;
      kept_mass = tot.mass;
      top_p::ThresholdSearch k_search{};
      const bool k_active = p.top_k > 0 && static_cast<float>(p.top_k) < tot.count;
      if (k_active) {
        k_search = top_p::ThresholdSearch::over_row(static_cast<float>(p.top_k), true, tot);
        run_search(k_search, R, sh);
        threshold = k_search.threshold();
        kept_mass = k_search.kept_mass();
      }
      if (p.top_p < 1.0) {
        const float target = static_cast<float>(p.top_p * static_cast<double>(kept_mass));
        top_p::ThresholdSearch p_search = k_active ? top_p::ThresholdSearch::above(target, false, k_search, tot)
                                                   : top_p::ThresholdSearch::over_row(target, false, tot);
        run_search(p_search, R, sh);
        threshold = p_search.threshold();
        kept_mass = p_search.kept_mass();
      }
      const uint64_t subsequence = static_cast<uint64_t>(p.row_ids ? p.row_ids[row] : row);
      const float u = uniform_open01(philox_block(p.seed, subsequence, p.offset).v[0]);
      tok = draw(R, threshold, static_cast<double>(u) * static_cast<double>(kept_mass), sh);
    }
  }
  if (threadIdx.x == 0) {
    p.tokens[row] = tok;
    if (tok < 0) {
      p.student_logprob[row] = p.teacher_logprob[row] = p.sample_logprob[row] = p.threshold[row] = kNaN;
    } else {
      p.threshold[row] = threshold;
      p.sample_logprob[row] = ::logf(R.r(tok)) - ::logf(kept_mass);
      p.student_logprob[row] = R.x(tok) - lse_s;
      p.teacher_logprob[row] = t ? R.y(tok) - lse_t : kNaN;
    }
  }
}

}  // namespace top_p_cuda
}  // namespace kdext
