// Host launchers for the log-probability of given tokens (framework-free).
// Included by csrc/cuda/logprobs.cu.
//
//   logprobs_forward:  log softmax(x/T)[token] = x_token/T - lse, and the lse:
//                      the row-state pass of softmax_launchers.cuh (one read
//                      of the row; split rows merge their states in order),
//                      which reads the token's logit when it finishes the row.
//                      A token outside [0, V) is never read and gives NaN (the
//                      CPU kernel raises instead: raising here would need a
//                      device-to-host sync).
//   logprobs_backward: logprobs_kernels.cuh's elementwise pass.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/logprobs_kernels.cuh"
#include "kdext/cuda/softmax_launchers.cuh"

namespace kdext {
namespace cuda {

// tokens: [rows] int64 (device); logprob, lse: [rows] accumulation dtype.
inline cudaError_t logprobs_forward(const RowTensor& in, const int64_t* tokens, double temperature, void* logprob,
                                    void* lse, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_row_kernel(in, temperature, [&](auto tx, const auto& a) {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    StateSink<Acc> sink;
    sink.lse = static_cast<Acc*>(lse);
    sink.tokens = tokens;
    sink.logprob = static_cast<Acc*>(logprob);
    return launch_row_state<X, Acc, false>(a, sink, q);
  });
}

// grad, lse: [rows] accumulation dtype; tokens [rows] int64; out: [rows, V] contiguous, dtype of the logits.
inline cudaError_t logprobs_backward(const RowTensor& in, const int64_t* tokens, double temperature, const void* grad,
                                     const void* lse, void* out, const Queue& q) {
  if (in.rows == 0) return cudaSuccess;
  return detail::with_row_kernel(in, temperature, [&](auto tx, const auto& a) {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    const LogprobsGrad<Acc> map{static_cast<const Acc*>(grad), tokens, static_cast<const Acc*>(lse), a.inv_t, in.V};
    return launch({grid_size(a.grid.blocks())}, q, row_map_kernel<X, Acc, LogprobsGrad<Acc>>, a, map,
                  static_cast<X*>(out));
  });
}

}  // namespace cuda
}  // namespace kdext
