// Row-group geometry and deterministic reductions for the CUDA kernels
// (framework-free: no torch types).
//
// Every row kernel runs 256-thread blocks. A row (or one chunk of a row, when
// the vocabulary is split across blocks) is handled by a "group" of G threads,
// G a power of two in [1, 256]: G = 256 is a block per row, G = 32 a warp per
// row, smaller G several short rows per warp. Groups reduce their per-thread
// states with a fixed butterfly of warp shuffles and, for G > 32, a fixed-order
// fold over the warps' results in shared memory: the reduction order depends
// only on the launch geometry, which depends only on the shape and the
// device's SM count, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace kdext {
namespace cuda {

// Temporary device memory, provided by the caller (the adapter hands out
// caching-allocator blocks that live until the launch sequence is enqueued).
struct Workspace {
  void* (*alloc)(void* ctx, size_t bytes);
  void* ctx;

  void* get(size_t bytes) const { return bytes == 0 ? nullptr : alloc(ctx, bytes); }
};

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- shuffles of small POD states --------------------------------------------

template <typename X>
__device__ __forceinline__ X shfl_xor_pod(const X& v, int mask) {
  static_assert(sizeof(X) % 4 == 0, "state must be whole 32-bit words");
  constexpr int W = sizeof(X) / 4;
  int w[W];
  memcpy(w, &v, sizeof(X));
#pragma unroll
  for (int i = 0; i < W; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], mask);
  X out;
  memcpy(&out, w, sizeof(X));
  return out;
}

template <typename X>
__device__ __forceinline__ X shfl_pod(const X& v, int src) {
  constexpr int W = sizeof(X) / 4;
  int w[W];
  memcpy(w, &v, sizeof(X));
#pragma unroll
  for (int i = 0; i < W; ++i) w[i] = __shfl_sync(0xffffffffu, w[i], src);
  X out;
  memcpy(&out, w, sizeof(X));
  return out;
}

// Shared scratch for group_allreduce: one slot per warp.
template <typename X>
struct ReduceScratch {
  X warp[kWarps];
};

// All-reduce of `v` over each group of G consecutive threads of the block
// (G a power of two, uniform over the block). Every thread of a group returns
// the same value. Must be reached by every thread of the block (threads with
// no work pass the identity). `op` must be commutative (a butterfly pairs
// lanes both ways); all merges here are (IEEE + and * are).
template <typename X, typename Op>
__device__ __forceinline__ X group_allreduce(X v, Op op, int G, ReduceScratch<X>& scratch) {
  const int lane = threadIdx.x & 31;
  const int width = G < 32 ? G : 32;
  for (int off = width >> 1; off > 0; off >>= 1) v = op(v, shfl_xor_pod(v, off));
  if (width > 1) v = shfl_pod(v, lane & ~(width - 1));  // identical bits in every lane
  if (G > 32) {
    const int warp = threadIdx.x >> 5;
    const int per = G >> 5;
    __syncthreads();  // the scratch may still be read by a previous call
    if (lane == 0) scratch.warp[warp] = v;
    __syncthreads();
    const int first = (warp / per) * per;
    X acc = scratch.warp[first];
    for (int w = 1; w < per; ++w) acc = op(acc, scratch.warp[first + w]);
    v = acc;
  }
  return v;
}

// ---- launch geometry ---------------------------------------------------------

// How a grid of 256-thread blocks covers rows x packs: G threads per (row,
// chunk), `chunks` chunks per row, kThreads / G rows per block.
struct RowGrid {
  int G;
  int chunks;
  int64_t rows;
  int64_t row_blocks;  // ceil(rows / (kThreads / G))

  __host__ __device__ int64_t blocks() const { return row_blocks * chunks; }
};

// The (row, chunk, lane) of this thread for block index b of the grid.
struct GroupPos {
  int64_t row;
  int chunk;
  int lane;
  bool active;  // row < rows
};

__device__ __forceinline__ GroupPos group_pos(const RowGrid& g, int64_t b) {
  GroupPos p;
  const int64_t row_block = b / g.chunks;
  p.chunk = static_cast<int>(b - row_block * g.chunks);
  const int per_block = kThreads / g.G;
  p.row = row_block * per_block + threadIdx.x / g.G;
  p.lane = threadIdx.x % g.G;
  p.active = p.row < g.rows;
  return p;
}

// The packs [begin, end) of chunk c out of `chunks` over P packs (balanced).
__host__ __device__ __forceinline__ void chunk_range(int64_t P, int c, int chunks, int64_t* begin, int64_t* end) {
  *begin = P * c / chunks;
  *end = P * (c + 1) / chunks;
}

inline int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x && p < kThreads) p <<= 1;
  return p;
}

// SMs of the current device (cached per device).
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 108;
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 108;
  if (dev < 64) cache[dev] = n;
  return n;
}

// Geometry for rows of `packs_per_row` packs (an upper bound over rows).
// Groups get about `min_per_thread` packs per thread; when the rows alone give
// too few blocks to fill the device, rows are split into chunks (never below
// `min_per_thread` packs per thread). An environment variable
// KDEXT_CUDA_CHUNKS=<n> forces the chunk count (tests use it to exercise the
// split-vocabulary merge on small shapes).
inline RowGrid plan_row_grid(int64_t rows, int64_t packs_per_row, int min_per_thread = 4) {
  RowGrid g;
  g.rows = rows;
  const int64_t want_threads = (packs_per_row + min_per_thread - 1) / min_per_thread;
  g.G = pow2_ceil(want_threads < 1 ? 1 : want_threads);
  const int per_block = kThreads / g.G;
  g.row_blocks = (rows + per_block - 1) / per_block;
  g.chunks = 1;
  const int64_t target = int64_t(sm_count()) * 8;  // about 8 resident 256-thread blocks per SM
  if (g.G == kThreads && g.row_blocks < target) {
    const int64_t max_chunks = packs_per_row / (int64_t(kThreads) * min_per_thread);
    int64_t c = (target + g.row_blocks - 1) / g.row_blocks;
    if (c > max_chunks) c = max_chunks;
    if (c > 1024) c = 1024;
    g.chunks = c < 1 ? 1 : static_cast<int>(c);
  }
  if (const char* env = std::getenv("KDEXT_CUDA_CHUNKS")) {
    const long forced = std::strtol(env, nullptr, 10);
    if (forced >= 1 && forced <= 4096) {
      g.chunks = static_cast<int>(forced);
      if (g.chunks > 1) {  // a split needs whole blocks per row
        g.G = kThreads;
        g.row_blocks = rows;
      }
    }
  }
  return g;
}

// Grid size for a grid-stride loop over `blocks` blocks.
inline unsigned grid_size(int64_t blocks) {
  const int64_t cap = int64_t(1) << 30;
  if (blocks < 1) return 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

// ---- fixed-order sum of per-row values -----------------------------------------

// out[0] = sum_r values[r] (accumulated in double, in a fixed order: thread i
// takes rows i, i + 1024, ... and the block folds the 1024 partial sums as a
// fixed tree). One block: the loss of a fused kernel, deterministic.
template <typename Acc>
__global__ void __launch_bounds__(1024) ordered_sum_kernel(const Acc* __restrict__ values, int64_t n,
                                                           Acc* __restrict__ out) {
  __shared__ double part[1024];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 1024) s += static_cast<double>(values[i]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = 512; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<Acc>(part[0]);
}

template <typename Acc>
cudaError_t launch_ordered_sum(const Acc* values, int64_t n, Acc* out, cudaStream_t stream) {
  ordered_sum_kernel<Acc><<<1, 1024, 0, stream>>>(values, n, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kdext
