// CPU kernels for the log-probability of given tokens:
//   logprobs_forward:  log softmax(x/T)[token] = x_token/T - lse (and the lse),
//   logprobs_backward: g (onehot(token) - softmax(x/T)) / T,
// one pass over each row for each.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "logprobs_args.h"
#include "cpu/buffer_pool.h"
#include "cpu/row_reduce.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits, const at::Tensor& tokens,
                                                    double temperature) {
  LogprobsForwardArgs a(logits, tokens, temperature);
  const at::Tensor& x = a.in.x;
  const int64_t rows = a.in.rows, V = a.in.V;
  const int64_t* tp = a.tokens.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(tp[r] >= 0 && tp[r] < V, "tokens[", r, "] = ", tp[r], " is outside the vocabulary [0, ", V,
                      ")");
  }
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::logprobs_forward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    acc_t *o = a.out.data_ptr<acc_t>(), *l = a.lse.data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const void* row = row_ptr(x, r);
        const auto st = row_softmax_state(row, x.scalar_type(), V, inv_t, buf);
        l[r] = log_sum_exp(st);
        // (x/T - max) - log Z: exact in the difference, unlike x/T - lse for large logits.
        const acc_t logz = st.max == -std::numeric_limits<acc_t>::infinity() ? st.max : MathOps<acc_t>::log(st.sum);
        o[r] = (load_value<acc_t>(row, x.scalar_type(), tp[r]) * inv_t - st.max) - logz;
      }
    });
  });
  const auto shape = row_shape(logits);
  return {a.out.view(shape), a.lse.view(shape)};
}

at::Tensor logprobs_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& tokens,
                             const at::Tensor& lse, double temperature) {
  LogprobsBackwardArgs a(grad, logits, tokens, lse, temperature, &empty_output);
  const at::Tensor &x = a.in.x, &out = a.out;
  const int64_t rows = a.in.rows, V = a.in.V;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::logprobs_backward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    const int64_t* tp = a.tokens.const_data_ptr<int64_t>();
    const acc_t *gp = a.grad.const_data_ptr<acc_t>(), *lp = a.lse.const_data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const void* row = row_ptr(x, r);
        void* orow = mutable_row_ptr(out, r);
        const RowKind kind = classify_row(lp[r]);
        const acc_t scale = gp[r] * inv_t;
        const Vec<acc_t> vlse(lp[r]), vscale(-scale);
        for (int64_t b = 0; b < V; b += kChunk) {
          const int64_t n = std::min<int64_t>(kChunk, V - b);
          if (kind != RowKind::Normal) {
            std::fill(buf, buf + n, constant_row_gradient<acc_t>(kind));
          } else {
            const int64_t P = load_chunk(row, x.scalar_type(), b, n, inv_t, buf);
            for (int64_t i = 0; i < P; i += Vec<acc_t>::size())
              (vscale * fast_exp(Vec<acc_t>::loadu(buf + i) - vlse)).store(buf + i);
            // Tokens outside [0, V) (a vocab shard's foreign tokens) add no one-hot term.
            if (tp[r] >= b && tp[r] < b + n) buf[tp[r] - b] += scale;
          }
          store_chunk(buf, n, out.scalar_type(), orow, b);
        }
      }
    });
  });
  return out.view(logits.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CPU, m) {
  register_kernels(m, {.logprobs_forward = &logprobs_forward, .logprobs_backward = &logprobs_backward});
}

}  // namespace cpu
}  // namespace kdext
