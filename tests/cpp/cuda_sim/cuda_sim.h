// A CPU simulator of the small part of CUDA that csrc/include/kdext/cuda/top_p_sample_kernels.cuh
// uses, so that the kernel's logic (barriers, shuffles, block scans,
// compaction, the draw) can be run and checked on a machine without a GPU.
//
// The threads of a block are fibers (ucontext) on one OS thread, run in turn
// from one barrier to the next: __syncthreads and every warp shuffle are
// barriers of the whole block (the kernel only shuffles in block-uniform
// code), and a shuffle exchanges values through a double-buffered slot array.
// Blocks run one after another, so `__shared__` can be `static`. A barrier
// reached by some threads while others have returned is reported as the
// deadlock it would be on a GPU. It checks logic, not speed or memory order.
//
// Used by tests/cpp/sim_top_p_sample.cpp, with this folder first on the
// include path (it also provides <cuda_fp16.h>, <cuda_bf16.h> and
// <cub/block/block_scan.cuh>).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

struct SimDim {
  unsigned x = 0, y = 0, z = 0;
};

namespace cuda_sim {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};

struct State {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  unsigned block = 0;
  std::function<void()> kernel;
  std::vector<float> slots[2];
  int phase = 0;
  long barriers = 0;
};
inline State g;

inline SimDim thread_index() { return {static_cast<unsigned>(g.current), 0, 0}; }
inline SimDim block_index() { return {g.block, 0, 0}; }

inline void fiber_entry() {
  g.kernel();
  g.fibers[g.current].done = true;
  swapcontext(&g.fibers[g.current].ctx, &g.scheduler);
}

// Every thread of the block must reach it before any goes on.
inline void barrier() { swapcontext(&g.fibers[g.current].ctx, &g.scheduler); }

template <typename F>
void launch(unsigned blocks, int threads, F kernel) {
  g.kernel = kernel;
  for (unsigned b = 0; b < blocks; ++b) {
    g.block = b;
    g.fibers.assign(threads, Fiber{});
    g.slots[0].assign(threads, 0.f);
    g.slots[1].assign(threads, 0.f);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = g.fibers[t];
      f.stack.resize(1 << 18);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    for (;;) {  // one sweep = every live thread runs to its next barrier or returns
      int waiting = 0, finished = 0;
      for (int t = 0; t < threads; ++t) {
        if (g.fibers[t].done) continue;
        g.current = t;
        swapcontext(&g.scheduler, &g.fibers[t].ctx);
        (g.fibers[t].done ? finished : waiting) += 1;
      }
      if (waiting == 0) break;
      if (finished != 0 || waiting != threads) {
        std::fprintf(stderr, "cuda_sim: block %u: a barrier not reached by every thread (deadlock on a GPU)\n", b);
        std::abort();
      }
      ++g.barriers;
    }
  }
}

}  // namespace cuda_sim

#define threadIdx (cuda_sim::thread_index())
#define blockIdx (cuda_sim::block_index())

inline void __syncthreads() { cuda_sim::barrier(); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  auto& g = cuda_sim::g;
  const int t = g.current, lane = t % 32;
  std::vector<float>& slot = g.slots[g.phase];
  slot[t] = v;
  cuda_sim::barrier();
  const float r = slot[t - lane + (lane ^ off)];
  if (t == 0) g.phase ^= 1;  // the next shuffle writes the other buffer (read before its barrier)
  return r;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;  // one OS thread: no race
  if (v < old) *p = v;
  return old;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
