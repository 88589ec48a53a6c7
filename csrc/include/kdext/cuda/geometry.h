// The row-group geometry shared by the host launch plan (launch_plan.h) and
// the device kernels: plain data and arithmetic, no CUDA API.
//
// Every row kernel runs blocks of kThreads threads. A row (or one chunk of a
// row, when the vocabulary is split across blocks) is handled by a "group" of
// G threads, G a power of two in [1, kThreads]: G = kThreads is a block per
// row, G = 32 a warp per row, smaller G several short rows per warp.
#pragma once

#include <cstdint>

#include "kdext/math.h"  // KDEXT_HD

// Threads per block of the row kernels. Only the CUDA simulator of
// tests/cpp/cuda_sim sets it (smaller, so that small rows reach every path);
// builds use the default.
#ifndef KDEXT_CUDA_BLOCK_THREADS
#define KDEXT_CUDA_BLOCK_THREADS 256
#endif

namespace kdext {
namespace cuda {

constexpr int kThreads = KDEXT_CUDA_BLOCK_THREADS;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && (kThreads & (kThreads - 1)) == 0, "whole warps, a power of two");

// How a grid of kThreads-thread blocks covers rows x packs: G threads per
// (row, chunk), `chunks` chunks per row, kThreads / G rows per block.
struct RowGrid {
  int G;
  int chunks;
  int64_t rows;
  int64_t row_blocks;  // ceil(rows / (kThreads / G))

  KDEXT_HD int64_t blocks() const { return row_blocks * chunks; }
};

// The packs [begin, end) of chunk c out of `chunks` over P packs (balanced).
KDEXT_HD void chunk_range(int64_t P, int c, int chunks, int64_t* begin, int64_t* end) {
  *begin = P * c / chunks;
  *end = P * (c + 1) / chunks;
}

// An upper bound, over every alignment of the row, on the packs of N entries
// that cover a row of V entries (vec_load.cuh: a misaligned head adds one).
constexpr int64_t packs_bound(int64_t V, int N) { return (V + N - 1) / N + 1; }

}  // namespace cuda
}  // namespace kdext
