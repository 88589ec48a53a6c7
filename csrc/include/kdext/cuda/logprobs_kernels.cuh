// CUDA kernel of logprobs_backward (framework-free): g (onehot(token) -
// softmax(x/T)) / T, one elementwise pass (softmax_kernels.cuh's row_map_kernel
// with the map below); a token outside [0, V) adds no one-hot term (a vocab
// shard's foreign tokens), as on the CPU. The forward is the softmax family's
// row-state pass, which reads the token's logit when it finishes the row.
// Launchers: logprobs_launchers.cuh.
#pragma once

#include "kdext/cuda/softmax_kernels.cuh"

namespace kdext {
namespace cuda {

template <typename Acc>
struct LogprobsGrad {
  const Acc* grad;
  const int64_t* tokens;
  const Acc* lse;
  Acc inv_t;
  int64_t V;

  struct Row {
    RowKind kind;
    Acc lse, scale;
    int64_t token;
  };

  __device__ __forceinline__ Row row(int64_t r) const {
    return {classify_row(lse[r]), lse[r], grad[r] * inv_t, tokens[r]};
  }

  template <int N>
  __device__ __forceinline__ void apply(const Row& c, int64_t start, Acc (&v)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = -c.scale * MathOps<Acc>::exp(v[j] - c.lse);
    // A token in [0, V) lies in exactly one pack; lanes outside the row are never stored.
    const int64_t rel = c.token - start;
    if (rel >= 0 && rel < N && c.token < V) {
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (j == rel) v[j] += c.scale;
    }
  }
};

}  // namespace cuda
}  // namespace kdext
