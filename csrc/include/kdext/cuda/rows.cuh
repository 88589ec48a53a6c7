// Device-side walks of the row kernels over their grid (geometry.h): which
// (row, chunk, lane) a thread serves, the grid-stride loops, and the loop over
// a thread's packs with two packs in flight.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kdext/cuda/geometry.h"

namespace kdext {
namespace cuda {

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

// body(pos) for every block index of the grid this block takes (a
// grid-stride loop). Every thread of the block runs the same iterations, so
// the body may hold block-wide reductions.
template <typename Body>
__device__ __forceinline__ void for_each_group(const RowGrid& g, Body body) {
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) body(group_pos(g, b));
}

// body(r) for the rows of a one-thread-per-row kernel (grid-stride).
template <typename Body>
__device__ __forceinline__ void for_each_row(int64_t rows, Body body) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += step) body(r);
}

// For the packs k0 + lane, k0 + lane + G, ... below k1: load(k, pack) then
// use(pack), two packs in flight per thread (both loaded before either is
// used, so that the loads of one overlap the arithmetic of the other).
template <typename Pack, typename Load, typename Use>
__device__ __forceinline__ void for_packs_in_flight(int64_t k0, int64_t k1, int lane, int G, Load load, Use use) {
  int64_t k = k0 + lane;
  for (; k + G < k1; k += 2 * G) {
    Pack p0, p1;
    load(k, p0);
    load(k + G, p1);
    use(p0);
    use(p1);
  }
  if (k < k1) {
    Pack p;
    load(k, p);
    use(p);
  }
}

}  // namespace cuda
}  // namespace kdext
