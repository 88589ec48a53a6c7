// A CPU simulator of the part of CUDA that the kernels and launchers of
// csrc/include/kdext/cuda/ use, so that their logic (barriers, shuffles,
// shared memory, clusters, the launch plans) runs and is checked on machines
// without a GPU. It checks logic, not speed or the memory model.
//
// Execution. The threads of a launch are fibers on one OS thread. A cluster
// of blocks (a single block without clusters) runs at a time; its threads run
// in turn, each until it blocks on a barrier or returns. Barriers are what
// the hardware synchronises, no more:
//   __syncthreads          every thread of the block;
//   __shfl_sync / _xor     the lanes named in the mask (a warp, or part of
//                          one): a shuffle is a barrier of the lanes that
//                          take part, so warps shuffle independently, also in
//                          code that other warps of the block skip;
//   cluster.sync()         every thread of every block of the cluster.
// A barrier that cannot be completed (a thread returned, or waits elsewhere,
// or lanes disagree on the mask) is reported as the hang or undefined
// behaviour it would be on a GPU, and the process aborts (stricter than some
// hardware, which lets exited threads count as arrived at __syncthreads; the
// CUDA guide makes it undefined). Which runnable
// thread runs first is set by CUDA_SIM_ORDER (see Order below: round robin
// forward or reverse, or one block and one warp running ahead of the others as
// far as the barriers let it): a kernel whose results change with it has a
// data race.
//
// Memory. Global memory is host memory. Shared memory is per simulated block:
// kernels declare it through KDEXT_SHARED / KDEXT_DYNAMIC_SHARED
// (kdext/cuda/device.cuh), which here allocate from the block's arena, filled
// with 0xFF bytes (NaN in every float type) at the block's start, so a read of
// shared memory nobody wrote shows up. map_shared_rank maps an address of the
// block's shared memory to the same place in another block of the cluster
// (distributed shared memory); when a block's threads have all returned its
// shared memory is gone (poisoned again; mapping it aborts), as on the
// hardware, where a block must not exit while others of its cluster still
// read it. Static shared memory over 48 KB, or static + dynamic over the
// device's opt-in limit, aborts. 16-byte vector accesses (uint4) check their
// alignment, as the hardware faults on a misaligned one.
//
// Runtime. cudaLaunchKernelEx (with the cluster attribute), the function
// attributes, the occupancy queries and the device attributes the launch
// plans read are simulated for the device described by cuda_sim::device
// (the drivers set it). Launch errors are returned as the runtime would
// (dynamic shared memory over the kernel's limit, a grid not divisible by the
// cluster, a cluster over 8 blocks without the non-portable attribute...).
// cudaFuncGetAttributes reports no static shared memory: the simulator only
// learns it when the kernel runs (then the limit above is enforced).
//
// The CUDA types are in cuda_sim_types.h, the runtime API in cuda_sim_runtime.h. Used by tests/cpp/sim_*.cpp (one
// translation unit each), with this folder first on the include path: it also
// provides <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h>,
// <cooperative_groups.h> and <cub/block/block_scan.cuh>.
#pragma once

#include <sys/mman.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_sim_types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// Shared memory and clusters (see kdext/cuda/device.cuh).
#define KDEXT_SHARED(name, ...) __VA_ARGS__& name = cuda_sim::shared_variable<__VA_ARGS__>()
#define KDEXT_DYNAMIC_SHARED(name, ...) __VA_ARGS__* name = cuda_sim::dynamic_shared<__VA_ARGS__>()
#define KDEXT_DEVICE_CLUSTERS 1

// ---- the simulated machine ------------------------------------------------------------

extern "C" void cuda_sim_switch(void** save_sp, void* load_sp);
extern "C" void cuda_sim_trampoline();

namespace cuda_sim {

// The simulated device (the drivers set it before the first launch).
struct Device {
  int sms = 2;
  int major = 9;
  int smem_optin = 227 * 1024;
  int smem_per_sm = 228 * 1024;
  bool clusters = true;
  int max_cluster_nonportable = 16;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
  int max_grid = 2147483647;  // cudaDevAttrMaxGridDimX
};
inline Device device;

constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxPortableCluster = 8;

enum class Wait : uint8_t { Run, Sync, Shuffle, Cluster, Done };
enum class Order { Forward, Reverse, Serial, SerialReverse };  // see run_cluster
enum class ShflKind : uint8_t { Idx, Xor };

struct Shuffle {
  unsigned mask;
  ShflKind kind;
  int arg;
  int width;
  int bytes;
  uint64_t value;
  uint64_t result;
};

struct Thread {
  void* sp = nullptr;  // saved stack pointer (x86-64 switch)
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  Wait wait = Wait::Run;
  Shuffle shfl{};
  int block = 0;  // rank in the cluster
  unsigned tid = 0;
  size_t shared_decls = 0;  // KDEXT_SHARED declarations passed
};

struct Block {
  unsigned index = 0;  // blockIdx.x
  bool exited = false;  // every thread returned: its shared memory is gone
  std::unique_ptr<unsigned char[]> statics;
  size_t static_used = 0;
  std::vector<std::pair<size_t, size_t>> decls;  // (offset, bytes) of each declaration
  std::unique_ptr<unsigned char[]> dynamic;
  size_t dynamic_bytes = 0;
};

struct KernelAttrs {
  int max_dynamic_smem = 48 * 1024;
  bool nonportable_cluster = false;
};

}  // namespace cuda_sim

// The built-in variables: globals that the scheduler sets before it resumes a
// thread (one thread runs at a time), so that they are not macros.
struct SimDim {
  unsigned x = 0, y = 0, z = 0;
};
inline SimDim threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_sim {

struct Sim {
  std::vector<Thread> threads;  // the current cluster's, block-major
  std::vector<Block> blocks;    // the current cluster's
  std::vector<char*> stacks;    // reused across launches
  int current = 0;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_ctx;
#endif
  dim3 grid, block;
  int cluster = 1;
  std::function<void()> body;
  std::map<const void*, KernelAttrs> attrs;
  cudaError_t last_error = cudaSuccess;
  Order order = Order::Forward;
  long barriers = 0, shuffles = 0, launches = 0, blocks_run = 0;
};
inline Sim g;

inline Thread& me() { return g.threads[g.current]; }
inline Block& my_block() { return g.blocks[me().block]; }
inline unsigned threads_per_block() { return g.block.x; }

// ---- fibers -------------------------------------------------------------------------

#if defined(__x86_64__)
// cuda_sim_switch(save, load): saves the callee-saved registers, the x87
// control word and MXCSR on the current stack, stores the stack pointer in
// *save, and resumes the context whose stack pointer is `load`.
asm(R"(
    .text
    .globl cuda_sim_switch
    .type cuda_sim_switch, @function
cuda_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_sim_switch, .-cuda_sim_switch

    .globl cuda_sim_trampoline
    .type cuda_sim_trampoline, @function
cuda_sim_trampoline:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size cuda_sim_trampoline, .-cuda_sim_trampoline
)");
#endif

[[noreturn]] inline void fiber_main(void*) {
  g.body();
  me().wait = Wait::Done;
#if defined(__x86_64__)
  cuda_sim_switch(&me().sp, g.scheduler_sp);
#else
  swapcontext(&me().ctx, &g.scheduler_ctx);
#endif
  fail("a finished thread was resumed");
}

#if !defined(__x86_64__)
inline void fiber_entry_uc() { fiber_main(nullptr); }
#endif

inline char* stack_for(size_t i) {
  while (g.stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) fail("cannot map a thread stack");
    mprotect(p, 4096, PROT_NONE);  // an overflow faults
    g.stacks.push_back(static_cast<char*>(p) + 4096);
  }
  return g.stacks[i];
}

inline void start_fiber(Thread& t, size_t i) {
  t.stack = stack_for(i);
#if defined(__x86_64__)
  uint64_t* top = reinterpret_cast<uint64_t*>(t.stack + kStackBytes);  // 16-byte aligned
  uint64_t* sp = top;
  *--sp = reinterpret_cast<uint64_t>(&cuda_sim_trampoline);  // popped by ret: rsp = top, aligned
  *--sp = 0;                                                  // rbp
  *--sp = 0;                                                  // rbx
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);            // r12: the entry
  *--sp = 0;                                                  // r13: its argument
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  *--sp = 0x1F80;                                             // MXCSR (default)
  *--sp = 0x037F;                                             // x87 control word (default)
  t.sp = sp;
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = t.stack;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = nullptr;
  makecontext(&t.ctx, fiber_entry_uc, 0);
#endif
}

inline void resume(int i) {
  g.current = i;
  threadIdx.x = g.threads[i].tid;
  blockIdx.x = g.blocks[g.threads[i].block].index;
#if defined(__x86_64__)
  cuda_sim_switch(&g.scheduler_sp, g.threads[i].sp);
#else
  swapcontext(&g.scheduler_ctx, &g.threads[i].ctx);
#endif
}

// The calling thread waits (its state says on what) until the scheduler resumes it.
inline void block_on(Wait w) {
  me().wait = w;
#if defined(__x86_64__)
  cuda_sim_switch(&me().sp, g.scheduler_sp);
#else
  swapcontext(&me().ctx, &g.scheduler_ctx);
#endif
}

// ---- barriers --------------------------------------------------------------------------

inline std::string where(const Thread& t) {
  return "block " + std::to_string(g.blocks[t.block].index) + " thread " + std::to_string(t.tid);
}

[[noreturn]] inline void fail_at(const Thread& t, const std::string& what) { fail((where(t) + ": " + what).c_str()); }

// Completes the shuffles of the warp starting at thread `base` whose lanes
// have all arrived; false if none.
inline bool resolve_warp(size_t base) {
  bool any = false;
  for (size_t i = base; i < base + 32; ++i) {
    Thread& t = g.threads[i];
    if (t.wait != Wait::Shuffle) continue;
    const unsigned mask = t.shfl.mask;
    bool ready = true;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const Thread& u = g.threads[base + l];
      if (u.wait == Wait::Done) fail_at(u, "exited while named in a shuffle's mask (undefined behaviour)");
      if (u.wait != Wait::Shuffle) {
        ready = false;
        continue;
      }
      if (u.shfl.mask != mask || u.shfl.kind != t.shfl.kind || u.shfl.width != t.shfl.width ||
          u.shfl.bytes != t.shfl.bytes)
        fail_at(u, "lanes of one shuffle disagree on its mask, kind, width or type");
    }
    if (!ready) continue;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Thread& u = g.threads[base + l];
      const int w = u.shfl.width;
      const int group = static_cast<int>(l) & ~(w - 1);
      int src;
      if (u.shfl.kind == ShflKind::Idx) {
        src = group + (u.shfl.arg & (w - 1));
      } else {
        src = static_cast<int>(l) ^ u.shfl.arg;
        if (src >= group + w) src = static_cast<int>(l);  // later groups: the caller's own value
      }
      if (src < 0 || src >= 32 || !(mask >> src & 1u)) fail_at(u, "reads a lane that is not in the shuffle");
      u.shfl.result = g.threads[base + src].shfl.value;
    }
    for (unsigned l = 0; l < 32; ++l)
      if (mask >> l & 1u) g.threads[base + l].wait = Wait::Run;
    ++g.shuffles;
    any = true;
  }
  return any;
}

// Releases block b (rank in the cluster) when all its threads wait at
// __syncthreads; false if it does not.
inline bool resolve_block(size_t b) {
  const unsigned T = threads_per_block();
  size_t sync = 0, done = 0;
  for (unsigned i = 0; i < T; ++i) {
    const Wait w = g.threads[b * T + i].wait;
    sync += w == Wait::Sync;
    done += w == Wait::Done;
  }
  if (sync == 0) return false;
  if (done > 0) fail_at(g.threads[b * T], "__syncthreads not reached by threads that have returned");
  if (sync < T) return false;
  for (unsigned i = 0; i < T; ++i) g.threads[b * T + i].wait = Wait::Run;
  ++g.barriers;
  return true;
}

// Releases the cluster when every thread of it waits at cluster.sync().
inline bool resolve_cluster() {
  size_t n = 0, done = 0;
  for (const Thread& t : g.threads) {
    n += t.wait == Wait::Cluster;
    done += t.wait == Wait::Done;
  }
  if (n == 0) return false;
  if (done > 0) fail_at(g.threads[0], "cluster.sync() not reached by threads that have returned");
  if (n < g.threads.size()) return false;
  for (Thread& t : g.threads) t.wait = Wait::Run;
  ++g.barriers;
  return true;
}

[[noreturn]] inline void report_deadlock() {
  std::string s = "deadlock (a hang on a GPU): no barrier can complete;";
  for (const Thread& t : g.threads) {
    if (t.wait == Wait::Done) continue;
    static const char* names[] = {"running", "__syncthreads", "shuffle", "cluster.sync", "done"};
    s += " [" + where(t) + ": " + names[static_cast<int>(t.wait)] + "]";
    if (s.size() > 2000) break;
  }
  fail(s.c_str());
}

// The order in which the scheduler runs threads (CUDA_SIM_ORDER):
//   forward, reverse   every runnable thread in turn, in thread order (or its
//                      reverse), then every barrier that can complete does;
//   serial, serial-reverse  the first (last) block runs alone as far as it can
//                      (its warps in turn, each as far as it can alone, its
//                      own barriers completing), before the next gets a turn:
//                      what a block or warp may do before the others move at
//                      all, as a GPU may schedule it.
// A kernel whose results differ between the orders has a race. (enum Order)

inline size_t nth(size_t k, size_t n, bool reverse) { return reverse ? n - 1 - k : k; }

// Runs the runnable threads of [first, first + count) once each.
inline bool run_threads(size_t first, size_t count, bool reverse) {
  bool ran = false;
  for (size_t k = 0; k < count; ++k) {
    const size_t i = first + nth(k, count, reverse);
    if (g.threads[i].wait == Wait::Run) {
      resume(static_cast<int>(i));
      ran = true;
    }
  }
  return ran;
}

// Block b alone, as far as it can go (serial orders).
inline void run_block_alone(size_t b, bool reverse) {
  const size_t T = threads_per_block(), warps = T / 32;
  for (;;) {
    for (size_t k = 0; k < warps; ++k) {
      const size_t base = b * T + 32 * nth(k, warps, reverse);
      while (run_threads(base, 32, reverse) | resolve_warp(base)) {
      }
    }
    if (!resolve_block(b)) return;
  }
}

// A block whose threads have all returned loses its shared memory: it is
// poisoned again, so another block of the cluster that still reads it (a
// missing cluster.sync() before exit) reads NaN bytes.
inline void retire_exited_blocks() {
  const size_t T = threads_per_block();
  for (size_t b = 0; b < g.blocks.size(); ++b) {
    Block& blk = g.blocks[b];
    if (blk.exited) continue;
    bool done = true;
    for (size_t i = 0; i < T && done; ++i) done = g.threads[b * T + i].wait == Wait::Done;
    if (!done) continue;
    blk.exited = true;
    std::memset(blk.statics.get(), 0xFF, kStaticSharedLimit);
    std::memset(blk.dynamic.get(), 0xFF, blk.dynamic_bytes + 16);
  }
}

inline bool all_done() {
  for (const Thread& t : g.threads)
    if (t.wait != Wait::Done) return false;
  return true;
}

// Runs the current cluster to completion.
inline void run_cluster(Order order) {
  const size_t n = g.threads.size(), blocks = g.blocks.size();
  const bool reverse = order == Order::Reverse || order == Order::SerialReverse;
  for (;;) {
    bool released = false;
    if (order == Order::Serial || order == Order::SerialReverse) {
      for (size_t k = 0; k < blocks; ++k) {
        run_block_alone(nth(k, blocks, reverse), reverse);
        retire_exited_blocks();
      }
    } else {
      run_threads(0, n, reverse);
      retire_exited_blocks();
      for (size_t base = 0; base < n; base += 32) released |= resolve_warp(base);
      for (size_t b = 0; b < blocks; ++b) released |= resolve_block(b);
    }
    if (all_done()) return;
    released |= resolve_cluster();
    if (!released) report_deadlock();
  }
}

// ---- shared memory ------------------------------------------------------------------

template <typename T>
T& shared_variable() {
  static_assert(std::is_trivially_default_constructible<T>::value && std::is_trivially_destructible<T>::value,
                "__shared__ variables cannot have constructors");
  Thread& t = me();
  Block& b = my_block();
  const size_t i = t.shared_decls++;
  if (i == b.decls.size()) {  // the first thread of the block to declare it
    const size_t align = alignof(T) > 16 ? alignof(T) : 16;
    const size_t off = (b.static_used + align - 1) / align * align;
    if (off + sizeof(T) > kStaticSharedLimit) fail_at(t, "static shared memory over 48 KB");
    if (off + sizeof(T) + b.dynamic_bytes > size_t(device.smem_optin))
      fail_at(t, "static + dynamic shared memory over the device's opt-in limit");
    b.decls.emplace_back(off, sizeof(T));
    b.static_used = off + sizeof(T);
  } else if (i > b.decls.size() || b.decls[i].second != sizeof(T)) {
    fail_at(t, "threads of one block declare different shared variables");
  }
  return *reinterpret_cast<T*>(b.statics.get() + b.decls[i].first);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(my_block().dynamic.get());
}

inline unsigned cluster_rank() { return static_cast<unsigned>(me().block); }
inline unsigned cluster_size() { return static_cast<unsigned>(g.cluster); }

inline void cluster_sync() {
  if (g.cluster < 2) fail_at(me(), "cluster.sync() in a launch without clusters");
  block_on(Wait::Cluster);
}

// The address in block `rank`'s shared memory of what `p` is in this block's.
inline void* map_shared_rank(const void* p, size_t bytes, unsigned rank) {
  if (rank >= static_cast<unsigned>(g.cluster)) fail_at(me(), "map_shared_rank to a rank outside the cluster");
  const Block& b = my_block();
  const Block& dst = g.blocks[rank];
  if (dst.exited) fail_at(me(), "map_shared_rank to a block that has exited (its shared memory is gone)");
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c >= b.statics.get() && c + bytes <= b.statics.get() + b.static_used)
    return dst.statics.get() + (c - b.statics.get());
  if (c >= b.dynamic.get() && c + bytes <= b.dynamic.get() + b.dynamic_bytes)
    return dst.dynamic.get() + (c - b.dynamic.get());
  fail_at(me(), "map_shared_rank of an address outside the block's shared memory");
}

// ---- launching ------------------------------------------------------------------------

inline void setup_cluster(unsigned first_block, int cluster, size_t dynamic_bytes) {
  const unsigned T = g.block.x;
  g.blocks.clear();
  g.blocks.resize(cluster);
  g.threads.assign(size_t(cluster) * T, Thread{});
  for (int r = 0; r < cluster; ++r) {
    Block& b = g.blocks[r];
    b.index = first_block + r;
    b.statics.reset(new unsigned char[kStaticSharedLimit]);
    std::memset(b.statics.get(), 0xFF, kStaticSharedLimit);
    b.dynamic_bytes = dynamic_bytes;
    b.dynamic.reset(new unsigned char[dynamic_bytes + 16]);
    check_aligned16(b.dynamic.get(), "unaligned dynamic shared memory");
    std::memset(b.dynamic.get(), 0xFF, dynamic_bytes + 16);
    for (unsigned i = 0; i < T; ++i) {
      Thread& t = g.threads[size_t(r) * T + i];
      t.block = r;
      t.tid = i;
      start_fiber(t, size_t(r) * T + i);
    }
  }
}

// Runs body() as a kernel of `grid` blocks of `block` threads, in clusters of
// `cluster` blocks, with `dynamic_bytes` of dynamic shared memory per block.
inline void run(dim3 grid, dim3 block, int cluster, size_t dynamic_bytes, std::function<void()> body) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) fail("only 1-D grids are simulated");
  if (block.x == 0 || block.x % 32 != 0 || block.x > 1024) fail("blocks must be whole warps, at most 1024 threads");
  if (const char* o = std::getenv("CUDA_SIM_ORDER")) {
    const std::string v = o;
    g.order = v == "reverse" ? Order::Reverse
              : v == "serial" ? Order::Serial
              : v == "serial-reverse" ? Order::SerialReverse
              : v == "forward" ? Order::Forward
              : (fail("CUDA_SIM_ORDER must be forward, reverse, serial or serial-reverse"), Order::Forward);
  }
  g.grid = grid;
  g.block = block;
  gridDim = {grid.x, 1, 1};
  blockDim = {block.x, 1, 1};
  g.cluster = cluster;
  g.body = std::move(body);
  for (unsigned first = 0; first < grid.x; first += cluster) {
    setup_cluster(first, cluster, dynamic_bytes);
    run_cluster(g.order);
    g.blocks_run += cluster;
  }
  ++g.launches;
}

inline cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) g.last_error = e;
  return e;
}

}  // namespace cuda_sim

// ---- built-in variables and device functions -------------------------------------------

inline void __syncthreads() { cuda_sim::block_on(cuda_sim::Wait::Sync); }

namespace cuda_sim {
template <typename T>
T shuffle(unsigned mask, T v, ShflKind kind, int arg, int width) {
  static_assert((sizeof(T) == 4 || sizeof(T) == 8) && std::is_trivially_copyable<T>::value, "a 32- or 64-bit value");
  Thread& t = me();
  if (!(mask >> (t.tid % 32) & 1u)) fail_at(t, "a lane shuffles with a mask that does not name it");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail_at(t, "shuffle width not a power of two <= 32");
  t.shfl = Shuffle{mask, kind, arg, width, static_cast<int>(sizeof(T)), 0, 0};
  std::memcpy(&t.shfl.value, &v, sizeof(T));
  block_on(Wait::Shuffle);
  T out;
  std::memcpy(&out, &me().shfl.result, sizeof(T));
  return out;
}
}  // namespace cuda_sim

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return cuda_sim::shuffle(mask, v, cuda_sim::ShflKind::Idx, src, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return cuda_sim::shuffle(mask, v, cuda_sim::ShflKind::Xor, lane_mask, width);
}

// One OS thread runs every simulated thread: read-modify-writes are atomic.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}

// (The drivers are built with -ffp-contract=off, so these round once.)
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
using std::isfinite;
