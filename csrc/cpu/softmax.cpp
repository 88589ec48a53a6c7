// CPU kernels of the softmax family: softmax, log_softmax (with temperature),
// their backward, logsumexp, lse_float64, and entropy (forward, shard partial,
// backward).
//
// Each is one or two streamed passes over a row (cpu/vec.h), with the online
// softmax state of csrc/include/kdext/online_softmax.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "softmax_args.h"
#include "cpu/buffer_pool.h"
#include "cpu/row_reduce.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace cpu {
namespace {

template <typename F>
void for_each_chunk(int64_t V, F&& f) {
  for (int64_t b = 0; b < V; b += kChunk) f(b, std::min<int64_t>(kChunk, V - b));
}

// softmax(x/T) or log_softmax(x/T), in the input's dtype.
at::Tensor softmax_impl(const at::Tensor& logits, double temperature, bool log) {
  SoftmaxArgs a(logits, temperature, &empty_output);
  const RowsInput& in = a.in;
  const at::Tensor& out = a.out;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::softmax", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const auto dtype = in.x.scalar_type();
        // (x/T - max) - log Z rather than x/T - lse: for large logits lse
        // rounds at the size of the max, the difference with the max is exact.
        const auto st = row_softmax_state(row_ptr(in.x, r), dtype, in.V, inv_t, buf);
        const Vec<acc_t> vmax(st.max), vlogz(MathOps<acc_t>::log(st.sum));
        for_each_chunk(in.V, [&](int64_t b, int64_t n) {
          const int64_t P = load_chunk(row_ptr(in.x, r), dtype, b, n, inv_t, buf);
          for (int64_t i = 0; i < P; i += Vec<acc_t>::size()) {
            const auto y = (Vec<acc_t>::loadu(buf + i) - vmax) - vlogz;
            (log ? y : fast_exp(y)).store(buf + i);
          }
          store_chunk(buf, n, out.scalar_type(), mutable_row_ptr(out, r), b);
        });
      }
    });
  });
  return out.view(logits.sizes());
}

at::Tensor softmax(const at::Tensor& logits, double temperature) { return softmax_impl(logits, temperature, false); }
at::Tensor log_softmax(const at::Tensor& logits, double temperature) {
  return softmax_impl(logits, temperature, true);
}

// d/dx of softmax(x/T) (y = output): y (g - sum g y) / T;
// of log_softmax(x/T): (g - exp(y) sum g) / T.
at::Tensor softmax_backward(const at::Tensor& grad_output, const at::Tensor& output, double temperature, bool log) {
  SoftmaxBackwardArgs a(grad_output, output, temperature, &empty_output);
  const RowsInput &y = a.output, &g = a.grad_output;
  const at::Tensor& grad = a.grad;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(output), "kdext::softmax_backward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    at::parallel_for(0, y.rows, row_grain(y.V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t gb[kChunk];
      alignas(64) acc_t yb[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        // Padding is -inf in both buffers; zero it out of the dot products.
        Vec<acc_t> acc(acc_t(0));
        const Vec<acc_t> zero(acc_t(0));
        for_each_chunk(y.V, [&](int64_t b, int64_t n) {
          const int64_t P = load_chunk(row_ptr(g.x, r), g.x.scalar_type(), b, n, acc_t(1), gb);
          load_chunk(row_ptr(y.x, r), y.x.scalar_type(), b, n, acc_t(1), yb);
          for (int64_t i = 0; i < n; ++i) yb[i] = log ? yb[i] : gb[i] * yb[i];
          for (int64_t i = n; i < P; ++i) yb[i] = gb[i] = 0;
          const acc_t* src = log ? gb : yb;
          for (int64_t i = 0; i < P; i += Vec<acc_t>::size()) acc = acc + Vec<acc_t>::loadu(src + i);
        });
        const acc_t dot = reduce_sum(acc);
        for_each_chunk(y.V, [&](int64_t b, int64_t n) {
          const int64_t P = load_chunk(row_ptr(g.x, r), g.x.scalar_type(), b, n, acc_t(1), gb);
          load_chunk(row_ptr(y.x, r), y.x.scalar_type(), b, n, acc_t(1), yb);
          const Vec<acc_t> vdot(dot), vinv(inv_t);
          for (int64_t i = 0; i < P; i += Vec<acc_t>::size()) {
            const auto gv = Vec<acc_t>::loadu(gb + i), yv = Vec<acc_t>::loadu(yb + i);
            const auto d = log ? (gv - fast_exp(yv) * vdot) : yv * (gv - vdot);
            (d * vinv).store(gb + i);
          }
          store_chunk(gb, n, grad.scalar_type(), mutable_row_ptr(grad, r), b);
        });
      }
    });
  });
  return grad.view(output.sizes());
}

// The per-row lse of x/T from the row's online softmax state: in the
// accumulation dtype (logsumexp) or, from the same state, in float64 (lse_float64).
at::Tensor row_lse(const at::Tensor& logits, double temperature, bool float64) {
  LseArgs a(logits, temperature, float64 ? at::kDouble : acc_dtype(logits));
  const RowsInput& in = a.in;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::row_lse", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    acc_t* out = float64 ? nullptr : a.out.data_ptr<acc_t>();
    double* out64 = float64 ? a.out.data_ptr<double>() : nullptr;
    at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const auto st = row_softmax_state(row_ptr(in.x, r), in.x.scalar_type(), in.V, inv_t, buf);
        if (float64) {
          out64[r] = log_sum_exp_float64(st);
        } else {
          out[r] = log_sum_exp(st);
        }
      }
    });
  });
  return a.out.view(row_shape(logits));
}

at::Tensor logsumexp(const at::Tensor& logits, double temperature) {
  return row_lse(logits, temperature, /*float64=*/false);
}

at::Tensor lse_float64(const at::Tensor& logits, double temperature) {
  return row_lse(logits, temperature, /*float64=*/true);
}

// The per-row log-normaliser that entropy_forward returns is float64 even for
// float32 logits: its backward forms log q_j = x_j/T - lse from it, split into
// two floats (SplitLse, kdext/row_contract.h).
template <typename acc_t>
at::vec::Vectorized<acc_t> log_q(const at::vec::Vectorized<acc_t>& x, double lse) {
  return kdext::log_q(x, split_lse<acc_t>(lse));
}

// Entropy in one pass, with the weighted sum centred on the running max,
//   B = sum_i e^{x_i - m} (x_i - m) <= 0,   H = log Z - B / Z,
// so that large logits do not cancel catastrophically (H = lse - E_q[x]).
// When the max rises from m to m', B' = e^{m - m'} (B + (m - m') Z).
template <typename acc_t>
std::pair<acc_t, double> row_entropy(const void* row, c10::ScalarType dtype, int64_t V, acc_t inv_t, acc_t* buf) {
  LaneSoftmax<acc_t> st;
  Vec<acc_t> centred(acc_t(0));
  const Vec<acc_t> zero(acc_t(0));
  for_each_chunk(V, [&](int64_t b, int64_t n) {
    const int64_t P = load_chunk(row, dtype, b, n, inv_t, buf);
    const acc_t old_max = st.max;
    const Vec<acc_t> old_sum = st.sum;
    acc_t factor;
    if (!st.raise_max(chunk_max(buf, P), &factor)) return;
    if (factor != acc_t(1)) {
      const acc_t shift = old_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : old_max - st.max;
      centred = Vec<acc_t>(factor) * (centred + Vec<acc_t>(shift) * old_sum);
    }
    const Vec<acc_t> m(st.max);
    Vec<acc_t> z(acc_t(0)), c(acc_t(0));
    for (int64_t i = 0; i < P; i += Vec<acc_t>::size()) {
      const auto d = Vec<acc_t>::loadu(buf + i) - m;
      const auto e = fast_exp(d);
      z = z + e;
      c = c + Vec<acc_t>::blendv(zero, e * d, e > zero);
    }
    st.sum = st.sum + z;
    centred = centred + c;
  });
  const auto s = st.finish();
  const double lse = log_sum_exp_float64(s);
  if (classify_row(lse) != RowKind::Normal) return {std::numeric_limits<acc_t>::quiet_NaN(), lse};
  return {MathOps<acc_t>::log(s.sum) - reduce_sum(centred) / s.sum, lse};
}

// A vocab shard's part of the entropy, -sum_i q_i log q_i, given the global lse.
template <typename acc_t>
acc_t row_entropy_partial(const void* row, c10::ScalarType dtype, int64_t V, acc_t inv_t, double lse, acc_t* buf) {
  if (classify_row(lse) != RowKind::Normal) return std::numeric_limits<acc_t>::quiet_NaN();
  Vec<acc_t> acc(acc_t(0));
  const Vec<acc_t> zero(acc_t(0));
  for_each_chunk(V, [&](int64_t b, int64_t n) {
    const int64_t P = load_chunk(row, dtype, b, n, inv_t, buf);
    Vec<acc_t> part(acc_t(0));
    for (int64_t i = 0; i < P; i += Vec<acc_t>::size()) {
      const auto lq = log_q<acc_t>(Vec<acc_t>::loadu(buf + i), lse);
      const auto q = fast_exp(lq);
      part = part - Vec<acc_t>::blendv(zero, q * lq, q > zero);
    }
    acc = acc + part;
  });
  return reduce_sum(acc);
}

std::tuple<at::Tensor, at::Tensor> entropy_forward(const at::Tensor& logits, double temperature,
                                                   const std::optional<at::Tensor>& lse) {
  EntropyForwardArgs a(logits, temperature, lse);  // lse: float64, see log_q
  const RowsInput& in = a.in;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::entropy_forward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    acc_t* e = a.entropy.data_ptr<acc_t>();
    double* l = a.lse.data_ptr<double>();
    const bool partial = a.lse_given;
    at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        if (partial) {
          e[r] = row_entropy_partial(row_ptr(in.x, r), in.x.scalar_type(), in.V, inv_t, l[r], buf);
        } else {
          std::tie(e[r], l[r]) = row_entropy(row_ptr(in.x, r), in.x.scalar_type(), in.V, inv_t, buf);
        }
      }
    });
  });
  const auto shape = row_shape(logits);
  return {a.entropy.view(shape), a.lse.view(shape)};
}

// dH/dx_j = -q_j (log q_j + H) / T.
at::Tensor entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                            const at::Tensor& lse, double temperature) {
  EntropyBackwardArgs a(grad, logits, entropy, lse, temperature, &empty_output);
  const RowsInput& in = a.in;
  const at::Tensor& out = a.out;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::entropy_backward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    const acc_t *gp = a.grad.const_data_ptr<acc_t>(), *hp = a.entropy.const_data_ptr<acc_t>();
    const double* lp = a.lse.const_data_ptr<double>();
    at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const RowKind kind = classify_row(lp[r]);
        const Vec<acc_t> zero(acc_t(0)), vh(hp[r]), vscale(-gp[r] * inv_t);
        for_each_chunk(in.V, [&](int64_t b, int64_t n) {
          if (kind != RowKind::Normal) {
            std::fill(buf, buf + n, constant_row_gradient<acc_t>(kind));
          } else {
            const int64_t P = load_chunk(row_ptr(in.x, r), in.x.scalar_type(), b, n, inv_t, buf);
            for (int64_t i = 0; i < P; i += Vec<acc_t>::size()) {
              const auto lq = log_q<acc_t>(Vec<acc_t>::loadu(buf + i), lp[r]);
              const auto q = fast_exp(lq);
              Vec<acc_t>::blendv(zero, vscale * q * (lq + vh), q > zero).store(buf + i);
            }
          }
          store_chunk(buf, n, out.scalar_type(), mutable_row_ptr(out, r), b);
        });
      }
    });
  });
  return out.view(logits.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CPU, m) {
  register_kernels(m, KDEXT_SOFTMAX_KERNELS);
}

}  // namespace cpu
}  // namespace kdext
