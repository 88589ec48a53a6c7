// The split-vocabulary merges of the divergence family: when a row is cut
// into chunks (several blocks per row), the row kernels write one partial
// result per (row, chunk) and these one-thread-per-row kernels merge them in
// chunk order (exact merges of kdext/online_softmax.h; sums added in order),
// so that a split row gets a fixed, reproducible answer.
//   pair_merge_kernel  merges the chunk states, then finishes the row.
//   sums_merge_kernel  adds the chunk sums (value, c_s, c_t).
#pragma once

#include "kdext/cuda/divergence_rows.cuh"
#include "kdext/cuda/rows.cuh"

namespace kdext {
namespace cuda {

template <typename Acc, bool kRKL>
__global__ void __launch_bounds__(kThreads)
    pair_merge_kernel(const ReverseKLState<Acc>* __restrict__ partial, int chunks, int64_t rows, RowSink<Acc> sink) {
  for_each_row(rows, [&](int64_t r) {
    if (row_skipped(sink, r)) {
      sink_skipped(sink, r);
      return;
    }
    ReverseKLState<Acc> st = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) st = merge(st, partial[r * chunks + c]);
    finalize_state<Acc, kRKL>(sink, r, st);
  });
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sums_merge_kernel(const DivergenceSums<Acc>* __restrict__ partial, int chunks, int64_t rows, LseIn<Acc> lse,
                      RowSink<Acc> sink) {
  for_each_row(rows, [&](int64_t r) {
    if (row_skipped(sink, r)) {
      sink_skipped(sink, r);
      return;
    }
    if (classify_row(lse.s[r * lse.stride], lse.t[r * lse.stride]) != RowKind::Normal) {
      sink_sums(sink, r, nan_sums<Acc>());
      return;
    }
    DivergenceSums<Acc> acc = partial[r * chunks];
    for (int c = 1; c < chunks; ++c) acc = AddSums<Acc>{}(acc, partial[r * chunks + c]);
    sink_sums(sink, r, acc);
  });
}

}  // namespace cuda
}  // namespace kdext
