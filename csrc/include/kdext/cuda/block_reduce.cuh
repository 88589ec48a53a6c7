// Deterministic device reductions of the CUDA kernels (device code only; the
// launch planning is in launch_plan.h, the row geometry in geometry.h).
//
// Threads reduce their states with a fixed butterfly of warp shuffles and,
// across warps, a fixed-order fold in shared memory: the reduction order
// depends only on the launch geometry, so results are bitwise reproducible
// run to run. Two shapes of reduction:
//   group_allreduce   one small state (a POD, merged by one operation) over
//                     each group of G threads (the row kernels' groups);
//   block_allreduce_each  N independent floats per thread, each with its own
//                     operation, over the whole block (top_p_sample).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "kdext/cuda/device.cuh"
#include "kdext/cuda/geometry.h"

namespace kdext {
namespace cuda {

// ---- shuffles of small POD states --------------------------------------------

// Applies the shuffle `exchange(word)` to each 32-bit word of `v`. Every lane
// of the warp must take part (full-mask shuffles).
template <typename X, typename Exchange>
__device__ __forceinline__ X shfl_words(const X& v, Exchange exchange) {
  static_assert(sizeof(X) % 4 == 0, "state must be whole 32-bit words");
  constexpr int W = sizeof(X) / 4;
  int w[W];
  memcpy(w, &v, sizeof(X));
#pragma unroll
  for (int i = 0; i < W; ++i) w[i] = exchange(w[i]);
  X out;
  memcpy(&out, w, sizeof(X));
  return out;
}

// v of lane (this lane ^ mask).
template <typename X>
__device__ __forceinline__ X shfl_xor_pod(const X& v, int mask) {
  return shfl_words(v, [mask](int w) { return __shfl_xor_sync(0xffffffffu, w, mask); });
}

// v of lane `src`.
template <typename X>
__device__ __forceinline__ X shfl_pod(const X& v, int src) {
  return shfl_words(v, [src](int w) { return __shfl_sync(0xffffffffu, w, src); });
}

// Butterfly over aligned groups of `width` lanes (a power of two <= 32) of
// each warp: every lane ends with op over its group (bitwise the same in every
// lane when `op` is commutative).
template <typename X, typename Op>
__device__ __forceinline__ X warp_butterfly(X v, Op op, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v = op(v, shfl_xor_pod(v, off));
  return v;
}

// ---- one state per group -------------------------------------------------------

// The exact merge of two online states (the merge overloads of
// kdext/online_softmax.h and of the kernels' own states, found by
// argument-dependent lookup): the reduction operation of every state.
struct MergeOp {
  template <typename X>
  __device__ __forceinline__ X operator()(const X& a, const X& b) const {
    return merge(a, b);
  }
};

// Shared scratch for group_allreduce: one slot per warp.
template <typename X, int Warps = kWarps>
struct ReduceScratch {
  X warp[Warps];
};

// All-reduce of `v` over each group of G consecutive threads of the block
// (G a power of two, uniform over the block). Every thread of a group returns
// the same value. Must be reached by every thread of the block (threads with
// no work pass the identity). `op` must be commutative (a butterfly pairs
// lanes both ways); all merges here are (IEEE + and * are).
template <typename X, typename Op, int Warps>
__device__ __forceinline__ X group_allreduce(X v, Op op, int G, ReduceScratch<X, Warps>& scratch) {
  if (G <= 32) {
    v = warp_butterfly(v, op, G);
    // Every lane takes its group leader's bits: certain agreement, whatever op.
    if (G > 1) v = shfl_pod(v, (threadIdx.x & 31) & ~(G - 1));
  } else {
    v = warp_butterfly(v, op, 32);
    const int warp = threadIdx.x >> 5;
    const int per = G >> 5;
    __syncthreads();  // the scratch may still be read by a previous call
    if ((threadIdx.x & 31) == 0) scratch.warp[warp] = v;
    __syncthreads();
    const int first = (warp / per) * per;
    X acc = scratch.warp[first];
    for (int w = 1; w < per; ++w) acc = op(acc, scratch.warp[first + w]);
    v = acc;
  }
  return v;
}

// ---- N independent values per thread ---------------------------------------------

// Room for up to M values per thread.
template <int M, int Warps>
struct EachScratch {
  float partial[Warps][M];
  float result[M];
};

// Block-wide all-reduce of N floats per thread, entry i with combine(i, a, b)
// (commutative); every thread gets the results. The fold over warps is spread
// over the threads (thread i folds entry i), so a long N costs every thread
// one read per entry. Must be reached by every thread; blockDim.x = 32 Warps.
template <int N, int M, int Warps, typename Combine>
__device__ __forceinline__ void block_allreduce_each(float (&v)[N], Combine combine, EachScratch<M, Warps>& sh) {
  static_assert(N <= M && N <= 32 * Warps, "room for the values, and a thread per reduced value");
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i)
    v[i] = warp_butterfly(v[i], [i, &combine](float a, float b) { return combine(i, a, b); }, 32);
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) sh.partial[warp][i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    const int i = threadIdx.x;
    float a = sh.partial[0][i];
    for (int w = 1; w < Warps; ++w) a = combine(i, a, sh.partial[w][i]);
    sh.result[i] = a;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = sh.result[i];
  __syncthreads();  // the scratch is free again when this returns
}

// ---- fixed-order sum of per-row values -----------------------------------------

constexpr int kOrderedSumThreads = 1024;

// out[0] = sum_r values[r] (accumulated in double, in a fixed order: thread i
// takes rows i, i + 1024, ... and the block folds the 1024 partial sums as a
// fixed tree). One block of kOrderedSumThreads: the loss of a fused kernel,
// deterministic.
template <typename Acc>
__global__ void __launch_bounds__(kOrderedSumThreads)
    ordered_sum_kernel(const Acc* __restrict__ values, int64_t n, Acc* __restrict__ out) {
  using Partials = double[kOrderedSumThreads];
  KDEXT_SHARED(part, Partials);
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kOrderedSumThreads) s += static_cast<double>(values[i]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kOrderedSumThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<Acc>(part[0]);
}

}  // namespace cuda
}  // namespace kdext
