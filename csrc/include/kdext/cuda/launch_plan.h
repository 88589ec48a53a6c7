// Host-side launch planning of the CUDA kernels (no device code): where a
// launcher's work goes (Queue), the device facts it needs, the grid of the
// row kernels (groups, chunks of a split vocabulary), the on-chip kernel's
// cluster and shared-memory plan, and launch(), the one call through which
// every kernel is launched. Each rule lives here once; the tuning knobs
// (tuning.h, docs/CUDA.md) are read from the environment once.
//
// The chain from an op to a kernel has one step per layer: the adapter
// (csrc/cuda/<stem>.cu) calls run_launcher (csrc/cuda/adapter_utils.h), which
// makes the Queue on the op's device and turns an error into an exception;
// the launcher (<stem>_launchers.cuh) plans and calls launch() per kernel,
// returning the first error. The simulator's drivers (tests/cpp/sim_*.cpp)
// make their own Queue and call the same launchers.
//
// The reduction order of every kernel depends only on the plan, and the plan
// only on the shape, the device's SM count and shared memory, and the knobs:
// results are bitwise reproducible run to run on one device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "kdext/cuda/geometry.h"
#include "kdext/cuda/tuning.h"

namespace kdext {
namespace cuda {

// Temporary device memory, provided by the caller (the adapter hands out
// caching-allocator blocks that live until the launch sequence is enqueued).
struct Workspace {
  void* (*alloc)(void* ctx, size_t bytes);
  void* ctx;

  void* get(size_t bytes) const { return bytes == 0 ? nullptr : alloc(ctx, bytes); }
};

// Where a launcher's work goes: the stream its kernels are enqueued on, in
// order, and the temporary device memory they may use.
struct Queue {
  cudaStream_t stream;
  Workspace ws;
};

// ---- the device ----------------------------------------------------------------

// The most blocks a launch takes (grids cover more with grid-stride loops).
constexpr int64_t kMaxGridBlocks = int64_t(1) << 30;

struct DeviceFacts {
  int sms = 108;                      // multiprocessors (an A100's if the query fails)
  int major = 8;                      // compute capability major
  int smem_optin = 0;                 // the most dynamic + static shared memory a block may opt in to
  bool clusters = false;              // thread-block clusters can be launched (sm_90 and later)
  int64_t max_grid = kMaxGridBlocks;  // blocks per launch: kMaxGridBlocks or the device's limit if lower
};

inline DeviceFacts query_device(int dev) {
  DeviceFacts f;
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && n > 0) f.sms = n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess) f.major = n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess) f.smem_optin = n;
  if (f.major >= 9 && cudaDeviceGetAttribute(&n, cudaDevAttrClusterLaunch, dev) == cudaSuccess) f.clusters = n != 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxGridDimX, dev) == cudaSuccess && n > 0 && n < f.max_grid)
    f.max_grid = n;
  cudaGetLastError();  // a failed query is not the launch's error
  return f;
}

// The facts of the current device, queried once per device.
inline const DeviceFacts& current_device() {
  constexpr int kMaxDevices = 64;
  static DeviceFacts cache[kMaxDevices];
  static bool known[kMaxDevices] = {};
  static const DeviceFacts fallback;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return fallback;
  }
  if (!known[dev]) {
    cache[dev] = query_device(dev);
    known[dev] = true;
  }
  return cache[dev];
}

// ---- grids ----------------------------------------------------------------------

// Blocks of a grid-stride loop over `blocks` blocks (at least 1, at most the
// device's max_grid).
inline unsigned grid_size(int64_t blocks) {
  const int64_t cap = current_device().max_grid;
  if (blocks < 1) return 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

// One thread per row (the kernels that merge the chunks of split rows).
inline unsigned per_row_grid(int64_t rows) { return grid_size((rows + kThreads - 1) / kThreads); }

// One thread per pack of a flat elementwise pass, at most 16 blocks per SM
// (a grid-stride loop does the rest).
inline unsigned elementwise_grid(int64_t packs) {
  const int64_t blocks = (packs + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(current_device().sms) * 16;
  return grid_size(blocks < cap ? blocks : cap);
}

// The smallest power of two >= x, capped at kThreads.
inline int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x && p < kThreads) p <<= 1;
  return p;
}

// Packs per thread the row kernels aim for, and the least a chunk of a split
// row may give each thread.
constexpr int kPacksPerThread = 4;
// Resident kThreads-blocks per SM that a split vocabulary tries to fill.
constexpr int kBlocksPerSm = 8;
constexpr int kMaxAutoChunks = 1024;

// Geometry for rows of at most `packs_per_row` packs. Groups get about
// kPacksPerThread packs per thread; when the rows alone give too few blocks
// to fill the device, rows are split into chunks (never below kPacksPerThread
// packs per thread). KDEXT_CUDA_CHUNKS forces the chunk count.
inline RowGrid plan_row_grid(int64_t rows, int64_t packs_per_row) {
  RowGrid g;
  g.rows = rows;
  const int64_t want_threads = (packs_per_row + kPacksPerThread - 1) / kPacksPerThread;
  g.G = pow2_ceil(want_threads < 1 ? 1 : want_threads);
  const int per_block = kThreads / g.G;
  g.row_blocks = (rows + per_block - 1) / per_block;
  g.chunks = 1;
  const int64_t target = int64_t(current_device().sms) * kBlocksPerSm;
  if (g.G == kThreads && g.row_blocks < target) {
    const int64_t max_chunks = packs_per_row / (int64_t(kThreads) * kPacksPerThread);
    int64_t c = (target + g.row_blocks - 1) / g.row_blocks;
    if (c > max_chunks) c = max_chunks;
    if (c > kMaxAutoChunks) c = kMaxAutoChunks;
    g.chunks = c < 1 ? 1 : static_cast<int>(c);
  }
  if (const int forced = tuning().chunks) {
    g.chunks = forced;
    if (forced > 1) {  // a split needs whole blocks per row
      g.G = kThreads;
      g.row_blocks = rows;
    }
  }
  return g;
}

// Workspace for one partial result per (row, chunk) of a split grid (null
// when rows are not split); false when the allocation failed.
template <typename P>
bool chunk_partials(const Workspace& ws, const RowGrid& g, P** out) {
  *out = nullptr;
  if (g.chunks == 1) return true;
  *out = static_cast<P*>(ws.get(size_t(g.rows) * g.chunks * sizeof(P)));
  return *out != nullptr;
}

// ---- launching ------------------------------------------------------------------

struct Launch {
  unsigned grid;
  unsigned block = kThreads;
  size_t smem = 0;  // dynamic shared memory per block
  int cluster = 1;  // blocks per thread-block cluster (1: no cluster)
};

inline void set_cluster_attribute(cudaLaunchAttribute* at, int cluster) {
  at->id = cudaLaunchAttributeClusterDimension;
  at->val.clusterDim.x = static_cast<unsigned>(cluster);
  at->val.clusterDim.y = 1;
  at->val.clusterDim.z = 1;
}

// Launches kernel(args...) as planned on q's stream; returns the launch's
// error. Every kernel is launched here (the CUDA simulator of tests/cpp/cuda_sim
// provides cudaLaunchKernelEx, so the launchers themselves run there too).
template <typename... Params, typename... Args>
cudaError_t launch(const Launch& l, const Queue& q, void (*kernel)(Params...), Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(l.grid, 1, 1);
  cfg.blockDim = dim3(l.block, 1, 1);
  cfg.dynamicSmemBytes = l.smem;
  cfg.stream = q.stream;
  cudaLaunchAttribute at[1];
  if (l.cluster > 1) {
    set_cluster_attribute(&at[0], l.cluster);
    cfg.attrs = at;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// ---- the on-chip plan -----------------------------------------------------------

// Whether and how a row is held in shared memory by one block or a cluster of
// blocks (divergence_onchip_kernels.cuh).
struct OnchipPlan {
  bool ok = false;
  int cluster = 1;
  int64_t packs_per_block = 0;
  size_t smem = 0;

  // A cluster per row, as many as one launch takes (each then loops over rows).
  Launch launch(int64_t rows) const {
    const int64_t fit = current_device().max_grid / cluster;
    const int64_t max_clusters = fit < 1 ? 1 : fit;
    const int64_t clusters = rows < max_clusters ? rows : max_clusters;
    return {static_cast<unsigned>(clusters * cluster), unsigned(kThreads), smem, cluster};
  }
};

// Shared memory per block the plan prefers to stay within: about three
// resident blocks per SM, so that one block's loads overlap another's writes.
constexpr size_t kOnchipPreferredBytes = 72 * 1024;
// Shared memory left for the kernel's static variables and the runtime.
constexpr size_t kOnchipReservedBytes = 1024;

// Whether a cluster of c blocks with `smem` bytes of dynamic shared memory
// each can be resident (sets the kernel attributes that the launch needs).
template <typename... P>
bool onchip_resident(void (*kernel)(P...), int c, size_t smem) {
  auto refused = [] {
    cudaGetLastError();
    return false;
  };
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
      cudaSuccess)
    return refused();
  if (c > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
    return refused();
  if (c == 1) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem) != cudaSuccess)
      return refused();
    return blocks >= 1;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(c), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute at[1];
  set_cluster_attribute(&at[0], c);
  cfg.attrs = at;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) return refused();
  return clusters >= 1;
}

// The on-chip plan for rows of at most `packs` packs of `bytes_per_pack`
// shared-memory bytes each. Candidates in order of preference: the cluster
// sizes whose slice fits kOnchipPreferredBytes, then those that fit at all
// (smallest first); the first the occupancy API says can be resident wins
// (the non-portable size 16 may not be). Short rows (fewer packs than threads)
// are left to the row kernels. KDEXT_CUDA_ONCHIP=0 disables the path;
// KDEXT_CUDA_CLUSTER forces the size (also for short rows).
template <typename... P>
OnchipPlan plan_onchip(void (*kernel)(P...), int64_t packs, size_t bytes_per_pack) {
  OnchipPlan plan;
  const Tuning& knobs = tuning();
  if (!knobs.onchip) return plan;
  const int forced = knobs.cluster;
  if (packs < kThreads && forced == 0) return plan;
  const DeviceFacts& dev = current_device();
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return plan;
  }
  const size_t reserved = attr.sharedSizeBytes + kOnchipReservedBytes;
  const size_t budget_max = size_t(dev.smem_optin) > reserved ? size_t(dev.smem_optin) - reserved : 0;
  int max_cluster = dev.clusters ? kMaxClusterSize : 1;
  while (max_cluster > dev.max_grid) max_cluster >>= 1;  // a cluster is at most a whole grid
  auto bytes_at = [&](int c) { return size_t((packs + c - 1) / c) * bytes_per_pack; };
  int candidates[2 * 5];
  int count = 0;
  if (forced > 0) {
    if (forced <= max_cluster && bytes_at(forced) <= budget_max) candidates[count++] = forced;
  } else {
    for (int c = 1; c <= max_cluster; c <<= 1)
      if (bytes_at(c) <= kOnchipPreferredBytes) candidates[count++] = c;
    for (int c = 1; c <= max_cluster; c <<= 1)
      if (bytes_at(c) > kOnchipPreferredBytes && bytes_at(c) <= budget_max) candidates[count++] = c;
  }
  for (int i = 0; i < count; ++i) {
    const int c = candidates[i];
    if (onchip_resident(kernel, c, bytes_at(c))) {
      plan.ok = true;
      plan.cluster = c;
      plan.packs_per_block = (packs + c - 1) / c;
      plan.smem = bytes_at(c);
      return plan;
    }
  }
  return plan;
}

}  // namespace cuda
}  // namespace kdext
