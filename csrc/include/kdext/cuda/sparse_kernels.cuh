// CUDA kernels and launchers of the sparse family (framework-free: raw
// pointers, DType tags, cudaError_t). Included by csrc/cuda/sparse.cu only.
// Semantics are those of csrc/cpu/sparse.cpp; the O(k) math is
// kdext/sparse.h's, the online softmax state kdext/online_softmax.h's.
//
// Both kernels run one 256-thread block per row (a grid-stride loop over rows)
// and reduce with block_reduce.cuh's fixed-order group_allreduce, so results
// are reproducible run to run.
//
//   topk_kernel    pass 1: the online softmax state of x/T, the number of
//                  candidates (entries neither NaN nor -inf) and the histogram
//                  of the top 8 bits of their order-preserving keys; then one
//                  radix-select pass per further 8-bit digit, restricted to the
//                  keys that share the digits found so far, until the key of
//                  the k-th best is known (or its whole bin is taken); a
//                  gather pass that keeps every key above it and, of those
//                  equal to it, the first ones in index order (a block scan);
//                  a bitonic sort of the <= kSortCap survivors in shared
//                  memory by (key descending, id ascending). 4 reads of a
//                  float row at most (8 for float64), 2 when a digit settles it.
//                  With select = false it only writes max, log Z and lse (the
//                  adapter's path for k > kSortCap).
//   sparse_kernel  a row of the sparse loss: the row's valid ids into a
//                  shared-memory bitmap (an id outside [-1, V) or repeated
//                  marks the row BadIds: NaN, as no exception can be raised
//                  without a device sync); in bucket mode one pass for the
//                  complement's softmax state (ids masked by the bitmap); the
//                  O(k) sums over the slots; then, for a backward or a fused
//                  loss, one pass writing q_m (g_tail - c) / T everywhere and,
//                  after a barrier, the slots' own gradients over their ids.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <limits>
#include <type_traits>

#include "kdext/cuda/block_reduce.cuh"
#include "kdext/cuda/vec_load.cuh"
#include "kdext/online_softmax.h"
#include "kdext/sparse.h"

namespace kdext {
namespace sparse_cuda {

using cuda::DType;
using cuda::kThreads;
using cuda::ReduceScratch;

constexpr int kItems = 8;                 // consecutive entries per thread per tile (topk passes)
constexpr int kTile = kThreads * kItems;  // entries per tile
constexpr int kSortCap = 1024;            // survivors sorted on chip; larger k: see the adapter
constexpr int64_t kMaxVocab = int64_t(1) << 20;  // the bitmap of sparse_kernel: 128 KiB of shared memory
static_assert(kThreads == 256, "pick_bin gives each thread one of the 256 bins");

// ---- small block-level pieces ----------------------------------------------------------

template <typename T>
struct MergeState {
  __device__ __forceinline__ SoftmaxState<T> operator()(const SoftmaxState<T>& a, const SoftmaxState<T>& b) const {
    return merge(a, b);
  }
};

struct AddInt {
  __device__ __forceinline__ int operator()(int a, int b) const { return a + b; }
};

// Adds n values (x/T) to an online softmax state: one exp per value.
template <typename Acc, int N>
__device__ __forceinline__ void state_add(SoftmaxState<Acc>& st, const Acc (&x)[N]) {
  Acc m = st.max;
#pragma unroll
  for (int l = 0; l < N; ++l) m = MathOps<Acc>::maximum(m, x[l]);
  if (m == cuda::neg_inf<Acc>()) return;
  Acc sum = st.sum * rescale_factor(st.max, m);
#pragma unroll
  for (int l = 0; l < N; ++l) sum += MathOps<Acc>::exp(x[l] - m);
  st = {m, sum};
}

// ---- topk_logprobs --------------------------------------------------------------------

// Order-preserving unsigned keys of floats (larger value, larger key). -0
// takes the key of +0, so that the two tie (and go by id) as the values
// compare, as on the CPU.
template <typename Acc>
struct KeyOf;
template <>
struct KeyOf<float> {
  using Key = uint32_t;
  static constexpr int kBits = 32;
  static __device__ __forceinline__ Key key(float x) {
    const uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  static __device__ __forceinline__ float value(Key k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};
template <>
struct KeyOf<double> {
  using Key = uint64_t;
  static constexpr int kBits = 64;
  static __device__ __forceinline__ Key key(double x) {
    const uint64_t b = static_cast<uint64_t>(__double_as_longlong(x == 0.0 ? 0.0 : x));
    return (b >> 63) ? ~b : (b | (uint64_t(1) << 63));
  }
  static __device__ __forceinline__ double value(Key k) {
    return __longlong_as_double(static_cast<long long>((k >> 63) ? (k & ~(uint64_t(1) << 63)) : ~k));
  }
};

struct TopkParams {
  const void* x;
  int64_t stride;  // row stride, in entries
  int64_t rows, V, k;
  double temperature;
  bool select;     // false: only lse, max and log Z
  int32_t* ids;    // [rows, k]
  void* logprobs;  // [rows, k], accumulation dtype
  void* lse;       // [rows]
  void* max;       // [rows] or nullptr
  void* logz;      // [rows] or nullptr
};

template <typename Key>
struct Entry {
  Key key;
  int32_t id;
};

template <typename Key>
__device__ __forceinline__ bool entry_before(const Entry<Key>& a, const Entry<Key>& b) {
  return sparse::ranks_before(a.key, a.id, b.key, b.id);
}

template <typename Acc>
struct TopkShared {
  using Key = typename KeyOf<Acc>::Key;
  ReduceScratch<SoftmaxState<Acc>> state;
  ReduceScratch<int> count;
  unsigned int hist[256];
  typename cub::BlockScan<unsigned int, kThreads>::TempStorage scan;
  Entry<Key> entries[kSortCap];
  Key prefix, mask;
  unsigned int rem;
  int settled;
  int n_out;
};

// Loads tile entries [i0, i0 + kItems) of a row as Acc (unscaled); false past the row.
template <typename X, typename Acc>
__device__ __forceinline__ void load_items(const X* row, int64_t i0, int64_t V, Acc (&x)[kItems], bool (&in)[kItems]) {
#pragma unroll
  for (int l = 0; l < kItems; ++l) {
    in[l] = i0 + l < V;
    x[l] = in[l] ? cuda::to_acc<Acc>(row[i0 + l]) : cuda::neg_inf<Acc>();
  }
}

template <typename Acc>
__device__ __forceinline__ bool is_candidate(Acc x) {
  return x == x && x > cuda::neg_inf<Acc>();
}

// The digit of the radix step with `shift`, and whether a key matches the prefix.
template <typename Key>
__device__ __forceinline__ unsigned int digit(Key key, int shift) {
  return static_cast<unsigned int>((key >> shift) & Key(255));
}

// hist[bin] += 1 for the lanes with `valid`, one shared atomic per distinct bin
// of the warp (most keys of a row share their top byte, so per-lane atomics
// would serialise on a few bins). Every lane of the warp must call it.
__device__ __forceinline__ void hist_add(unsigned int* hist, unsigned int bin, bool valid) {
  const unsigned int peers = __match_any_sync(0xffffffffu, valid ? bin : 256u);
  if (valid && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<unsigned int>(__popc(peers)));
}

// The bin holding the rem-th largest key among those counted in sh.hist:
// thread t owns bin 255 - t, an inclusive scan over threads is then a scan
// from the top bin down. Updates prefix, mask, rem and settled.
template <typename Acc>
__device__ void pick_bin(TopkShared<Acc>& sh, int shift) {
  using Key = typename KeyOf<Acc>::Key;
  const unsigned int bin = 255u - threadIdx.x;
  const unsigned int c = sh.hist[bin];
  unsigned int incl;
  cub::BlockScan<unsigned int, kThreads>(sh.scan).InclusiveSum(c, incl);
  const unsigned int rem = sh.rem;
  __syncthreads();
  if (incl - c < rem && rem <= incl) {
    sh.prefix |= Key(bin) << shift;
    sh.mask |= Key(255) << shift;
    sh.rem = rem - (incl - c);
    sh.settled = (rem - (incl - c)) == c;  // the whole bin is taken: no need for more digits
  }
  __syncthreads();
}

template <typename X, typename Acc>
__global__ void __launch_bounds__(kThreads) topk_kernel(TopkParams p) {
  using Key = typename KeyOf<Acc>::Key;
  using K = KeyOf<Acc>;
  __shared__ TopkShared<Acc> sh;
  const Acc inv_t = Acc(1.0 / p.temperature);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const X* row = static_cast<const X*>(p.x) + r * p.stride;
    for (int b = threadIdx.x; b < 256; b += kThreads) sh.hist[b] = 0;
    __syncthreads();
    // Pass 1: softmax state, candidates, histogram of the top digit.
    SoftmaxState<Acc> st = SoftmaxState<Acc>::empty();
    int cand = 0;
    for (int64_t base = 0; base < p.V; base += kTile) {
      Acc x[kItems], y[kItems];
      bool in[kItems];
      load_items<X, Acc>(row, base + int64_t(threadIdx.x) * kItems, p.V, x, in);
#pragma unroll
      for (int l = 0; l < kItems; ++l) y[l] = cuda::mul_rn(x[l], inv_t);
      state_add<Acc, kItems>(st, y);
      if (p.select) {  // (uniform: every lane reaches hist_add)
#pragma unroll
        for (int l = 0; l < kItems; ++l) {
          const bool c = is_candidate(x[l]);
          cand += c;
          hist_add(sh.hist, digit(K::key(x[l]), K::kBits - 8), c);
        }
      }
    }
    st = cuda::group_allreduce(st, MergeState<Acc>{}, kThreads, sh.state);
    cand = cuda::group_allreduce(cand, AddInt{}, kThreads, sh.count);
    const Acc logz = st.max == cuda::neg_inf<Acc>() ? st.max : MathOps<Acc>::log(st.sum);
    if (threadIdx.x == 0) {
      static_cast<Acc*>(p.lse)[r] = log_sum_exp(st);
      if (p.max) static_cast<Acc*>(p.max)[r] = st.max;
      if (p.logz) static_cast<Acc*>(p.logz)[r] = logz;
    }
    if (!p.select) continue;
    const int64_t k_eff = cand < p.k ? cand : p.k;
    // Radix select of the k_eff-th largest key.
    if (threadIdx.x == 0) {
      sh.prefix = 0;
      sh.mask = 0;
      sh.rem = static_cast<unsigned int>(k_eff);
      sh.settled = 0;
      sh.n_out = 0;
    }
    __syncthreads();
    if (k_eff > 0) {
      for (int shift = K::kBits - 8; shift >= 0; shift -= 8) {
        if (shift != K::kBits - 8) {
          for (int b = threadIdx.x; b < 256; b += kThreads) sh.hist[b] = 0;
          __syncthreads();
          const Key prefix = sh.prefix, mask = sh.mask;
          for (int64_t base = 0; base < p.V; base += kTile) {
            Acc x[kItems];
            bool in[kItems];
            load_items<X, Acc>(row, base + int64_t(threadIdx.x) * kItems, p.V, x, in);
#pragma unroll
            for (int l = 0; l < kItems; ++l) {
              const Key key = K::key(x[l]);
              hist_add(sh.hist, digit(key, shift), is_candidate(x[l]) && (key & mask) == prefix);
            }
          }
          __syncthreads();
        }
        pick_bin(sh, shift);
        if (sh.settled) break;
      }
      // Gather: keys above the prefix, and the first sh.rem equal to it in index order.
      const Key prefix = sh.prefix, mask = sh.mask;
      const unsigned int need_eq = sh.rem;
      unsigned int eq_seen = 0;  // equal keys before this tile
      for (int64_t base = 0; base < p.V; base += kTile) {
        const int64_t i0 = base + int64_t(threadIdx.x) * kItems;
        Acc x[kItems];
        bool in[kItems];
        load_items<X, Acc>(row, i0, p.V, x, in);
        unsigned int n_eq = 0;
#pragma unroll
        for (int l = 0; l < kItems; ++l) n_eq += is_candidate(x[l]) && (K::key(x[l]) & mask) == prefix;
        unsigned int rank, tile_eq;
        cub::BlockScan<unsigned int, kThreads>(sh.scan).ExclusiveSum(n_eq, rank, tile_eq);
        __syncthreads();
        rank += eq_seen;
#pragma unroll
        for (int l = 0; l < kItems; ++l) {
          if (!is_candidate(x[l])) continue;
          const Key key = K::key(x[l]);
          bool take = (key & mask) > prefix;
          if ((key & mask) == prefix) take = rank++ < need_eq;
          if (take) sh.entries[atomicAdd(&sh.n_out, 1)] = {key, static_cast<int32_t>(i0 + l)};
        }
        eq_seen += tile_eq;
      }
    }
    __syncthreads();
    // Bitonic sort of the survivors (padded to a power of two with entries that sort last).
    const int n = sh.n_out;
    int P = 1;
    while (P < n) P <<= 1;
    for (int i = n + threadIdx.x; i < P; i += kThreads) sh.entries[i] = {Key(0), INT32_MAX};
    for (int size = 2; size <= P; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < P / 2; i += kThreads) {
          const int lo = 2 * stride * (i / stride) + (i % stride), hi = lo + stride;
          const bool up = (lo & size) == 0;
          const Entry<Key> a = sh.entries[lo], b = sh.entries[hi];
          if (up ? entry_before(b, a) : entry_before(a, b)) {
            sh.entries[lo] = b;
            sh.entries[hi] = a;
          }
        }
      }
    }
    __syncthreads();
    const bool poisoned = !(st.max < std::numeric_limits<Acc>::infinity());
    Acc* lp = static_cast<Acc*>(p.logprobs) + r * p.k;
    int32_t* ids = p.ids + r * p.k;
    for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
      const bool found = j < n;
      ids[j] = found ? sh.entries[j].id : -1;
      lp[j] = poisoned ? cuda::quiet_nan<Acc>()
                       : (found ? (cuda::mul_rn(K::value(sh.entries[j].key), inv_t) - st.max) - logz
                                : cuda::neg_inf<Acc>());
    }
    __syncthreads();  // sh is reused by the next row
  }
}

// Launches topk_kernel (p.select and k <= kSortCap, or p.select false).
inline cudaError_t topk_logprobs(DType dtype, const TopkParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.select && p.k > kSortCap) return cudaErrorInvalidValue;
  return cuda::dispatch_dtype(dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename cuda::AccOf<X>::type;
    topk_kernel<X, Acc><<<cuda::grid_size(p.rows), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

// ---- the sparse loss ----------------------------------------------------------------

// The inputs of a sparse op as the launchers take them.
struct SparseTensors {
  const void* s;  // the student's [rows, V] logits, unit stride in V
  DType dtype;
  int64_t stride;  // row stride of the student, in entries
  int64_t rows, V, k;
  const int64_t* ids;      // [rows, k]
  const double* logprobs;  // [rows, k]
};

// The kernel's arguments: the inputs, the mode and the outputs of one launch.
template <typename Acc>
struct SparseParams {
  const void* s;
  int64_t stride;
  int64_t rows, V, k;
  double temperature;
  const int64_t* ids;
  const double* logprobs;
  sparse::Tail tail;
  DivergenceParam<double> prm;
  const Acc* grad_in = nullptr;  // backward: the upstream gradient per row
  const Acc* weights = nullptr;  // fused loss: the row weights
  bool stats_in = false;         // backward: read `stats` instead of computing them
  Acc* stats = nullptr;          // [rows, kStatsColumns]
  Acc* values = nullptr;         // [rows]: the value (times the weight in loss mode); may be nullptr
  void* grad = nullptr;          // [rows, V] contiguous in the student's dtype, or nullptr (forward)
};

// What the slot pass of a row reduces: validity of its ids, their count, the
// stored mass S and the softmax state of the ids' scaled logits.
struct SlotScan {
  int bad;
  int n;
  double S;
  SoftmaxState<double> ids;
};

struct MergeSlotScan {
  __device__ __forceinline__ SlotScan operator()(const SlotScan& a, const SlotScan& b) const {
    return {a.bad | b.bad, a.n + b.n, a.S + b.S, merge(a.ids, b.ids)};
  }
};

struct AddSums {
  __device__ __forceinline__ sparse::Sums operator()(const sparse::Sums& a, const sparse::Sums& b) const {
    return {a.value + b.value, a.c + b.c};
  }
};

template <typename Acc>
struct SparseShared {
  ReduceScratch<SlotScan> scan;
  ReduceScratch<SoftmaxState<Acc>> state;
  ReduceScratch<sparse::Sums> sums;
};

__device__ __forceinline__ bool in_bitmap(const uint32_t* bm, int64_t i) {
  return (bm[i >> 5] >> (i & 31)) & 1u;
}

template <typename X, typename Acc>
__device__ __forceinline__ Acc slot_logit(const X* row, int64_t id, Acc inv_t) {
  return cuda::mul_rn(cuda::to_acc<Acc>(row[id]), inv_t);
}

// Fills a gradient row with one value.
template <typename X, typename Acc, int N>
__device__ void fill_grad_row(X* grow, int64_t V, Acc value) {
  if (grow == nullptr) return;
  const cuda::RowPtrs ptrs{{grow, nullptr, nullptr, nullptr}, {int(sizeof(X)), 1, 1, 1}, 1};
  const cuda::PackLayout L = cuda::make_layout<N>(V, ptrs);
  for (int64_t k = threadIdx.x; k < L.packs; k += kThreads) cuda::fill_pack<X, Acc, N>(grow, L, L.base + k * N, value);
}

template <typename X, typename Acc, Divergence D>
__global__ void __launch_bounds__(kThreads) sparse_kernel(SparseParams<Acc> p) {
  constexpr int N = 16 / sizeof(X);
  extern __shared__ uint32_t bitmap[];
  __shared__ SparseShared<Acc> sh;
  const int64_t words = (p.V + 31) / 32;
  const Acc inv_t = Acc(1.0 / p.temperature);
  const bool bucket = p.tail == sparse::Tail::Bucket;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const X* row = static_cast<const X*>(p.s) + r * p.stride;
    X* grow = p.grad ? static_cast<X*>(p.grad) + r * p.V : nullptr;
    const int64_t* ids = p.ids + r * p.k;
    const double* lps = p.logprobs + r * p.k;
    Acc scale = Acc(0);  // upstream gradient or weight, times 1/T
    if (p.weights) {
      if (p.weights[r] == Acc(0)) {  // an ignored row: no work, no NaN leaks in
        if (p.values && threadIdx.x == 0) p.values[r] = Acc(0);
        fill_grad_row<X, Acc, N>(grow, p.V, Acc(0));
        continue;
      }
      scale = p.weights[r] / Acc(p.temperature);
    }
    if (p.grad_in) scale = p.grad_in[r] / Acc(p.temperature);
    // The valid ids into the bitmap.
    for (int64_t w = threadIdx.x; w < words; w += kThreads) bitmap[w] = 0u;
    __syncthreads();
    SlotScan scan{0, 0, 0.0, SoftmaxState<double>::empty()};
    for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
      const int64_t id = ids[j];
      if (id == -1) continue;
      if (id < -1 || id >= p.V) {
        scan.bad = 1;
        continue;
      }
      const uint32_t bit = 1u << (id & 31);
      if (atomicOr(&bitmap[id >> 5], bit) & bit) {
        scan.bad = 1;  // a repeated id
        continue;
      }
      ++scan.n;
      scan.S += ::exp(lps[j]);
      scan.ids = merge(scan.ids, SoftmaxState<double>{double(slot_logit<X, Acc>(row, id, inv_t)), 1.0});
    }
    scan = cuda::group_allreduce(scan, MergeSlotScan{}, kThreads, sh.scan);  // (its barriers publish the bitmap)
    // Bad ids poison the row (kdext/sparse.h, "row classes"); a row without a valid id is padding.
    RowKind kind = scan.bad ? RowKind::Poisoned : RowKind::Normal;
    const bool padding = !scan.bad && scan.n == 0;
    // The student's statistics.
    sparse::RowStats<Acc> st{cuda::quiet_nan<Acc>(), cuda::quiet_nan<Acc>(), cuda::quiet_nan<Acc>()};
    if (p.stats_in) {
      st = {p.stats[r * sparse::kStatsColumns], p.stats[r * sparse::kStatsColumns + 1],
            p.stats[r * sparse::kStatsColumns + 2]};
    } else if (!scan.bad) {
      SoftmaxState<Acc> comp = SoftmaxState<Acc>::empty();
      if (bucket) {
        const cuda::RowPtrs ptrs{{row, nullptr, nullptr, nullptr}, {int(sizeof(X)), 1, 1, 1}, 1};
        const cuda::PackLayout L = cuda::make_layout<N>(p.V, ptrs);
        for (int64_t k = threadIdx.x; k < L.packs; k += kThreads) {
          const int64_t start = L.base + k * N;
          Acc v[N];
          cuda::load_pack<Acc, X, N>(row, L, start, inv_t, cuda::neg_inf<Acc>(), v);
#pragma unroll
          for (int l = 0; l < N; ++l) {
            const int64_t i = start + l;
            if (i >= 0 && i < p.V && in_bitmap(bitmap, i)) v[l] = cuda::neg_inf<Acc>();
          }
          state_add<Acc, N>(comp, v);
        }
        comp = cuda::group_allreduce(comp, MergeState<Acc>{}, kThreads, sh.state);
      }
      st = sparse::merge_student<Acc>(double(comp.max), double(comp.sum), scan.ids.max, scan.ids.sum);
    }
    if (kind == RowKind::Normal) kind = sparse::student_kind(st.max);
    sparse::TeacherNorm tn{0.0, sparse::neg_inf(), false, true};
    const bool normal = !padding && kind == RowKind::Normal;
    if (normal) {
      tn = sparse::teacher_norm(scan.S, p.tail, scan.n < p.V);
      if (!tn.valid) kind = RowKind::Empty;
    }
    // The O(k) sums.
    sparse::Sums sums{0.0, 0.0};
    if (normal && kind == RowKind::Normal) {
      for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
        if (ids[j] < 0) continue;
        const auto t = sparse::outcome_sums<D>(sparse::slot_log_q(slot_logit<X, Acc>(row, ids[j], inv_t), st),
                                               lps[j] - tn.log_norm, p.prm);
        sums.value += t.value;
        sums.c += t.c;
      }
      if (threadIdx.x == 0 && tn.has_tail) {
        const auto t = sparse::outcome_sums<D>(double(st.log_tail), tn.log_tail, p.prm);
        sums.value += t.value;
        sums.c += t.c;
      }
    }
    sums = cuda::group_allreduce(sums, AddSums{}, kThreads, sh.sums);
    if (threadIdx.x == 0) {
      const double value = sparse::row_value(kind, padding, sums.value);
      if (p.values) p.values[r] = Acc(p.weights ? double(p.weights[r]) * value : value);
      if (!p.stats_in) {
        p.stats[r * sparse::kStatsColumns] = st.max;
        p.stats[r * sparse::kStatsColumns + 1] = st.logz;
        p.stats[r * sparse::kStatsColumns + 2] = st.log_tail;
      }
    }
    if (grow == nullptr) {
      __syncthreads();  // the bitmap is reused by the next row
      continue;
    }
    Acc fill;
    if (sparse::row_gradient_fill(kind, padding, scale, &fill)) {
      fill_grad_row<X, Acc, N>(grow, p.V, fill);
      __syncthreads();
      continue;
    }
    // q_m (g_tail - c) / T for every token (0 without a tail), then the ids' own gradients.
    const Acc tail_f = tn.has_tail ? Acc(sparse::outcome_factor<D>(double(st.log_tail), tn.log_tail, p.prm, sums.c) *
                                         double(scale))
                                   : Acc(0);
    {
      const cuda::RowPtrs ptrs{{row, grow, nullptr, nullptr}, {int(sizeof(X)), int(sizeof(X)), 1, 1}, 2};
      const cuda::PackLayout L = cuda::make_layout<N>(p.V, ptrs);
      for (int64_t k = threadIdx.x; k < L.packs; k += kThreads) {
        const int64_t start = L.base + k * N;
        Acc v[N];
        if (bucket && tail_f != Acc(0)) {
          cuda::load_pack<Acc, X, N>(row, L, start, inv_t, cuda::neg_inf<Acc>(), v);
#pragma unroll
          for (int l = 0; l < N; ++l) {
            const Acc q = MathOps<Acc>::exp((v[l] - st.max) - st.logz);
            v[l] = q > Acc(0) ? q * tail_f : Acc(0);
          }
        } else {
#pragma unroll
          for (int l = 0; l < N; ++l) v[l] = Acc(0);
        }
        cuda::store_pack<X, Acc, N>(grow, L, start, v);
      }
    }
    __syncthreads();  // the ids' entries are written after the dense pass
    for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
      const int64_t id = ids[j];
      if (id < 0) continue;
      const double g = sparse::slot_grad<D>(sparse::slot_log_q(slot_logit<X, Acc>(row, id, inv_t), st),
                                            lps[j] - tn.log_norm, p.prm, sums.c);
      grow[id] = cuda::from_acc<X>(Acc(g * double(scale)));
    }
    __syncthreads();
  }
}

namespace detail {

template <typename Acc>
SparseParams<Acc> sparse_params(const SparseTensors& in, Divergence, double param, double temperature,
                                sparse::Tail tail) {
  SparseParams<Acc> p;
  p.s = in.s;
  p.stride = in.stride;
  p.rows = in.rows;
  p.V = in.V;
  p.k = in.k;
  p.temperature = temperature;
  p.ids = in.ids;
  p.logprobs = in.logprobs;
  p.tail = tail;
  p.prm = DivergenceParam<double>::make(param);
  return p;
}

// Launches sparse_kernel for the student's dtype X (whose accumulation type
// must be Acc) and the divergence.
template <typename Acc>
cudaError_t launch_sparse_kernel(DType dtype, Divergence kind, const SparseParams<Acc>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.V > kMaxVocab) return cudaErrorInvalidValue;
  const size_t smem = size_t((p.V + 31) / 32) * sizeof(uint32_t);
  return cuda::dispatch_dtype(dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    if constexpr (!std::is_same<typename cuda::AccOf<X>::type, Acc>::value) {
      return cudaErrorInvalidValue;  // unreachable: the adapter picks Acc from the dtype
    } else {
      return dispatch_divergence(kind, [&](auto tag) -> cudaError_t {
        constexpr Divergence D = decltype(tag)::value;
        auto kernel = sparse_kernel<X, Acc, D>;
        if (smem > 48 * 1024) {
          const cudaError_t e =
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
          if (e != cudaSuccess) return e;
        }
        kernel<<<cuda::grid_size(p.rows), kThreads, smem, stream>>>(p);
        return cudaGetLastError();
      });
    }
  });
}

}  // namespace detail

// sparse_forward: values [rows] and stats [rows, kStatsColumns], accumulation dtype.
template <typename Acc>
cudaError_t sparse_forward(const SparseTensors& in, Divergence kind, double param, double temperature,
                           sparse::Tail tail, Acc* values, Acc* stats, cudaStream_t stream) {
  auto p = detail::sparse_params<Acc>(in, kind, param, temperature, tail);
  p.values = values;
  p.stats = stats;
  return detail::launch_sparse_kernel<Acc>(in.dtype, kind, p, stream);
}

// sparse_backward: the [rows, V] student gradient (student's dtype, contiguous)
// from the upstream gradient and the forward's stats.
template <typename Acc>
cudaError_t sparse_backward(const SparseTensors& in, Divergence kind, double param, double temperature,
                            sparse::Tail tail, const Acc* grad_values, const Acc* stats, void* grad,
                            cudaStream_t stream) {
  auto p = detail::sparse_params<Acc>(in, kind, param, temperature, tail);
  p.grad_in = grad_values;
  p.stats_in = true;
  p.stats = const_cast<Acc*>(stats);  // read only (stats_in)
  p.grad = grad;
  return detail::launch_sparse_kernel<Acc>(in.dtype, kind, p, stream);
}

// sparse_loss: *loss = the ordered sum of w_r value_r, and the [rows, V]
// student gradient w_r dvalue_r/ds_r; the per-row values and stats live in
// workspace.
template <typename Acc>
cudaError_t sparse_loss(const SparseTensors& in, Divergence kind, double param, double temperature,
                        sparse::Tail tail, const Acc* weights, Acc* loss, void* grad, const cuda::Workspace& ws,
                        cudaStream_t stream) {
  if (in.rows == 0) return cudaMemsetAsync(loss, 0, sizeof(Acc), stream);
  auto p = detail::sparse_params<Acc>(in, kind, param, temperature, tail);
  p.weights = weights;
  p.values = static_cast<Acc*>(ws.get(size_t(in.rows) * sizeof(Acc)));
  p.stats = static_cast<Acc*>(ws.get(size_t(in.rows) * sparse::kStatsColumns * sizeof(Acc)));
  p.grad = grad;
  const cudaError_t err = detail::launch_sparse_kernel<Acc>(in.dtype, kind, p, stream);
  if (err != cudaSuccess) return err;
  return cuda::launch_ordered_sum<Acc>(p.values, in.rows, loss, stream);
}

}  // namespace sparse_cuda
}  // namespace kdext
