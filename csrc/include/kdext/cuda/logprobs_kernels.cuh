// CUDA kernels and launchers for the log-probability of given tokens
// (framework-free). Included by csrc/cuda/logprobs.cu.
//
//   logprobs_forward:  log softmax(x/T)[token] = x_token/T - lse, and the lse:
//                      the row-state pass of softmax_kernels.cuh (one read of
//                      the row; split rows merge their states in order), which
//                      reads the token's logit when it finishes the row. A
//                      token outside [0, V) is never read and gives NaN (the
//                      CPU kernel raises instead: raising here would need a
//                      device-to-host sync).
//   logprobs_backward: g (onehot(token) - softmax(x/T)) / T, one elementwise
//                      pass; a token outside [0, V) adds no one-hot term (a
//                      vocab shard's foreign tokens), as on the CPU.
#pragma once

#include <cuda_runtime.h>

#include "kdext/cuda/softmax_kernels.cuh"

namespace kdext {
namespace cuda {

template <typename X, typename Acc>
__global__ void __launch_bounds__(kThreads)
    logprobs_bwd_kernel(RowArgs<Acc> a, const Acc* __restrict__ grad, const int64_t* __restrict__ tokens,
                        const Acc* __restrict__ lse, X* __restrict__ out) {
  constexpr int N = 16 / sizeof(X);
  const RowGrid g = a.grid;
  for (int64_t b = blockIdx.x; b < g.blocks(); b += gridDim.x) {
    const GroupPos pos = group_pos(g, b);
    if (!pos.active) continue;
    const int64_t r = pos.row;
    const X* row = row_ptr<X>(a.x, r, a.stride);
    X* orow = row_ptr_mut<X>(out, r, a.V);
    const PackLayout L = make_layout<N>(a.V, single_ptrs<X>(row, orow));
    int64_t k0, k1;
    chunk_range(L.packs, pos.chunk, g.chunks, &k0, &k1);
    const Acc l = lse[r];
    const Acc scale = grad[r] * a.inv_t;
    const int64_t tok = tokens[r];
    const RowKind kind = classify_row(l);
    for (int64_t k = k0 + pos.lane; k < k1; k += g.G) {
      const int64_t start = L.base + k * N;
      Acc v[N];
      if (kind != RowKind::Normal) {
        const Acc fill = constant_row_gradient<Acc>(kind);
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = fill;
      } else {
        load_pack<Acc, X, N>(row, L, start, a.inv_t, neg_inf<Acc>(), v);
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = -scale * MathOps<Acc>::exp(v[j] - l);
        // tok in [0, V) lies in exactly one pack; lanes outside the row are never stored.
        const int64_t rel = tok - start;
        if (rel >= 0 && rel < N && tok < a.V) {
#pragma unroll
          for (int j = 0; j < N; ++j)
            if (j == rel) v[j] += scale;
        }
      }
      store_pack<X, Acc, N>(orow, L, start, v);
    }
  }
}

// tokens: [rows] int64 (device); logprob, lse: [rows] accumulation dtype.
inline cudaError_t logprobs_forward(const RowTensor& in, const int64_t* tokens, double temperature, void* logprob,
                                    void* lse, const Workspace& ws, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    StateSink<Acc> sink;
    sink.lse = static_cast<Acc*>(lse);
    sink.tokens = tokens;
    sink.logprob = static_cast<Acc*>(logprob);
    return launch_row_state<X, Acc, false>(row_args<Acc>(in, temperature), sink, ws, stream);
  });
}

// grad, lse: [rows] accumulation dtype; tokens [rows] int64; out: [rows, V] contiguous, dtype of the logits.
inline cudaError_t logprobs_backward(const RowTensor& in, const int64_t* tokens, double temperature, const void* grad,
                                     const void* lse, void* out, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  return dispatch_dtype(in.dtype, [&](auto tx) -> cudaError_t {
    using X = typename decltype(tx)::type;
    using Acc = typename AccOf<X>::type;
    constexpr int N = 16 / sizeof(X);
    RowArgs<Acc> a = row_args<Acc>(in, temperature);
    a.grid = plan_row_grid(in.rows, (in.V + N - 1) / N + 1);
    logprobs_bwd_kernel<X, Acc><<<grid_size(a.grid.blocks()), kThreads, 0, stream>>>(
        a, static_cast<const Acc*>(grad), tokens, static_cast<const Acc*>(lse), static_cast<X*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdext
