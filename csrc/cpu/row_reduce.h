// Vectorized per-row reductions for the CPU kernels: the online softmax state
// (csrc/include/kdext/online_softmax.h) kept per SIMD lane, with one scalar
// running max per row so that each entry costs exactly one exp.
#pragma once

#include <ATen/Parallel.h>

#include "cpu/vec.h"
#include "kdext/online_softmax.h"

namespace kdext {
namespace cpu {

template <typename acc_t>
acc_t chunk_max(const acc_t* x, int64_t padded) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t i = 0; i < padded; i += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + i));
  return reduce_max(m);
}

// Running softmax state of one row: a scalar max and per-lane sums.
template <typename acc_t>
struct LaneSoftmax {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  Vec sum = Vec(acc_t(0));

  // Moves the running max to cover a chunk whose max is `cmax`; returns the
  // factor the lane sums were rescaled by (callers rescale companion sums by
  // it), and false when everything so far is -inf (nothing to accumulate).
  bool raise_max(acc_t cmax, acc_t* factor) {
    const acc_t m = MathOps<acc_t>::maximum(max, cmax);
    *factor = acc_t(1);
    if (m == -std::numeric_limits<acc_t>::infinity()) return false;
    if (!(m == max)) {  // also taken when m is NaN
      *factor = rescale_factor(max, m);
      sum = sum * Vec(*factor);
      max = m;
    }
    return true;
  }

  // Adds a chunk of raw values x (the state is of x * inv_t).
  void add(const acc_t* x, int64_t padded, acc_t inv_t) {
    acc_t factor;
    if (!raise_max(chunk_max(x, padded) * inv_t, &factor)) return;
    const Vec vm(max), vinv(inv_t);
    Vec part(acc_t(0));  // two-level sum: error grows with V / kChunk, not V
    for (int64_t i = 0; i < padded; i += Vec::size()) part = part + fast_exp(Vec::loadu(x + i) * vinv - vm);
    sum = sum + part;
  }

  SoftmaxState<acc_t> finish() const { return {max, reduce_sum(sum)}; }
};

// Softmax state of x/T over a whole row.
template <typename acc_t>
SoftmaxState<acc_t> row_softmax_state(const void* row, c10::ScalarType dtype, int64_t V, acc_t inv_t, acc_t* buf) {
  LaneSoftmax<acc_t> st;
  for (int64_t b = 0; b < V; b += kChunk) {
    int64_t padded;
    const acc_t* x = chunk_view(row, dtype, b, std::min<int64_t>(kChunk, V - b), buf, &padded);
    st.add(x, padded, inv_t);
  }
  return st.finish();
}

// Picks a parallel_for grain so that a task covers at least ~64K entries.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V, 1)); }

}  // namespace cpu
}  // namespace kdext
