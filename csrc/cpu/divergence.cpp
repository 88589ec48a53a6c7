// CPU kernels of the divergence family: divergence_forward, divergence_backward,
// divergence_loss and divergence_loss_out (the fused loss + student gradient,
// into a new or the caller's buffer) and divergence_partial (a vocab shard's sums).
//
// Rows are split across threads; each row is streamed in chunks (cpu/vec.h)
// and reduced with SIMD lanes. Reverse KL takes one pass per row (the online
// state of docs/DESIGN.md); the other divergences need the log-normalisers before
// their terms, so they take a second pass over the row, which is still in L2.
// The gradient pass is one more read of the row and one write.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "divergence_args.h"
#include "cpu/buffer_pool.h"
#include "cpu/row_reduce.h"
#include "kdext/divergence.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace cpu {
namespace {

template <typename acc_t>
struct Buffers {
  alignas(64) acc_t s[kChunk];
  alignas(64) acc_t t[kChunk];
  alignas(64) acc_t out[kChunk];
};

// One row of student and teacher logits.
template <typename acc_t>
struct RowPair {
  const void* s;
  const void* t;
  c10::ScalarType s_dtype, t_dtype;
  int64_t V;
  acc_t inv_t;

  // Chunk [b, b + n) of both rows, raw (callers scale by 1/T), padded to whole vectors.
  struct Chunk {
    const acc_t* s;
    const acc_t* t;
    int64_t padded;
  };
  Chunk load(int64_t b, int64_t n, Buffers<acc_t>& buf) const {
    Chunk c;
    c.t = chunk_view(t, t_dtype, b, n, buf.t, &c.padded);
    c.s = chunk_view(s, s_dtype, b, n, buf.s, &c.padded);
    return c;
  }
};

// Softmax states of both rows in one pass; with kWeighted also the reverse-KL
// sum A = sum_i exp(x_i - m_s) (x_i - y_i) (docs/DESIGN.md).
template <typename acc_t, bool kWeighted>
ReverseKLState<acc_t> pair_state(const RowPair<acc_t>& row, Buffers<acc_t>& buf) {
  LaneSoftmax<acc_t> s, t;
  Vec<acc_t> weighted(acc_t(0));
  const Vec<acc_t> zero(acc_t(0)), inv(row.inv_t);
  for (int64_t b = 0; b < row.V; b += kChunk) {
    const auto c = row.load(b, std::min<int64_t>(kChunk, row.V - b), buf);
    acc_t factor;
    if (s.raise_max(chunk_max(c.s, c.padded) * row.inv_t, &factor)) {
      if (kWeighted) weighted = weighted * Vec<acc_t>(factor);
      const Vec<acc_t> m(s.max);
      Vec<acc_t> zs(acc_t(0)), a(acc_t(0));  // per-chunk partial sums (two-level summation)
      for (int64_t i = 0; i < c.padded; i += Vec<acc_t>::size()) {
        const auto xs = Vec<acc_t>::loadu(c.s + i) * inv;
        const auto e = fast_exp(xs - m);
        zs = zs + e;
        if (kWeighted) {
          const auto xt = Vec<acc_t>::loadu(c.t + i) * inv;
          a = a + Vec<acc_t>::blendv(zero, e * (xs - xt), e > zero);
        }
      }
      s.sum = s.sum + zs;
      if (kWeighted) weighted = weighted + a;
    }
    t.add(c.t, c.padded, row.inv_t);
  }
  return {s.finish(), t.finish(), reduce_sum(weighted)};
}

// Second pass: the row's (value, c_s, c_t) given both log-normalisers. Also
// the whole of divergence_partial for a vocab shard.
template <typename acc_t, Divergence D>
DivergenceSums<acc_t> row_sums(const RowPair<acc_t>& row, acc_t lse_s, acc_t lse_t,
                               const DivergenceParam<acc_t>& prm, Buffers<acc_t>& buf) {
  Vec<acc_t> value(acc_t(0)), cs(acc_t(0)), ct(acc_t(0));
  const Vec<acc_t> vls(lse_s), vlt(lse_t), inv(row.inv_t);
  for (int64_t b = 0; b < row.V; b += kChunk) {
    const auto c = row.load(b, std::min<int64_t>(kChunk, row.V - b), buf);
    Vec<acc_t> v_part(acc_t(0)), cs_part(acc_t(0)), ct_part(acc_t(0));
    for (int64_t i = 0; i < c.padded; i += Vec<acc_t>::size()) {
      const auto e = DivergenceMath<D>::terms(Vec<acc_t>::loadu(c.s + i) * inv - vls,
                                              Vec<acc_t>::loadu(c.t + i) * inv - vlt, prm);
      v_part = v_part + e.value;
      cs_part = cs_part + e.student_c;
      ct_part = ct_part + e.teacher_c;
    }
    value = value + v_part;
    cs = cs + cs_part;
    ct = ct + ct_part;
  }
  return {reduce_sum(value), reduce_sum(cs), reduce_sum(ct)};
}

// Value and backward statistics of one row.
template <typename acc_t>
struct RowResult {
  acc_t value, lse_s, lse_t, cs, ct;
};

template <typename acc_t, Divergence D>
RowResult<acc_t> row_forward(const RowPair<acc_t>& row, const DivergenceParam<acc_t>& prm, Buffers<acc_t>& buf) {
  constexpr bool kOnePass = D == Divergence::ReverseKL;
  const auto st = pair_state<acc_t, kOnePass>(row, buf);
  RowResult<acc_t> r;
  r.lse_s = log_sum_exp(st.student);
  r.lse_t = log_sum_exp(st.teacher);
  if (classify_row(r.lse_s, r.lse_t) != RowKind::Normal) {
    r.value = r.cs = r.ct = std::numeric_limits<acc_t>::quiet_NaN();
    return r;
  }
  if (kOnePass) {
    r.value = r.cs = reverse_kl_value(st);
    r.ct = acc_t(0);
  } else {
    const auto sums = row_sums<acc_t, D>(row, r.lse_s, r.lse_t, prm, buf);
    r.value = sums.value;
    r.cs = sums.student_c;
    r.ct = sums.teacher_c;
  }
  return r;
}

// Gradient pass: writes scale * dD/ds (and/or dD/dt) * T for one row. `scale`
// carries 1/T and the upstream gradient. Rows whose gradient is a constant
// (empty or poisoned rows, a zero scale) are filled: constant_gradient.
template <typename acc_t, Divergence D>
void row_backward(const RowPair<acc_t>& row, const RowResult<acc_t>& st, const DivergenceParam<acc_t>& prm,
                  acc_t scale, void* gs, c10::ScalarType gs_dtype, void* gt, c10::ScalarType gt_dtype,
                  Buffers<acc_t>& buf) {
  acc_t fill;
  if (constant_gradient(classify_row(st.lse_s, st.lse_t), scale, &fill)) {
    std::fill(buf.out, buf.out + kChunk, fill);
    for (int64_t b = 0; b < row.V; b += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, row.V - b);
      if (gs) store_chunk(buf.out, n, gs_dtype, gs, b);
      if (gt) store_chunk(buf.out, n, gt_dtype, gt, b);
    }
    return;
  }
  const Vec<acc_t> vls(st.lse_s), vlt(st.lse_t), vscale(scale), inv(row.inv_t);
  // grad(log q, log p) * scale over chunk [b, b + n) of one gradient row.
  const auto write_chunk = [&](void* g, c10::ScalarType g_dtype, const auto& c, int64_t b, int64_t n, auto grad) {
    acc_t* out = chunk_out(g, g_dtype, b, n, buf.out);
    for (int64_t i = 0; i < c.padded; i += Vec<acc_t>::size()) {
      const auto ls = Vec<acc_t>::loadu(c.s + i) * inv - vls, lt = Vec<acc_t>::loadu(c.t + i) * inv - vlt;
      (grad(ls, lt) * vscale).store(out + i);
    }
    finish_chunk(out, buf.out, n, g_dtype, g, b);
  };
  for (int64_t b = 0; b < row.V; b += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, row.V - b);
    const auto c = row.load(b, n, buf);
    if (gs) write_chunk(gs, gs_dtype, c, b, n, [&](const auto& ls, const auto& lt) {
      return DivergenceMath<D>::student_grad(ls, lt, prm, st.cs);
    });
    if (gt) write_chunk(gt, gt_dtype, c, b, n, [&](const auto& ls, const auto& lt) {
      return DivergenceMath<D>::teacher_grad(ls, lt, prm, st.ct);
    });
  }
}

// The fused reverse-KL loss row in two passes and two exps per entry. Pass 1
// is the online state of docs/DESIGN.md, and it also keeps e_j = exp(x_j - m_c)
// (m_c: the running max when chunk c was seen) in `scratch`, a row-sized
// per-thread buffer that stays in L2. Pass 2 then needs no exp at all:
// q_j = e_j exp(m_c - m_s) / Z_s, and the student gradient is
// q_j (log q_j - log p_j - KL) scale. Returns the row's KL (NaN for a row
// without a distribution, whose gradient is then 0, or NaN when poisoned).
template <typename acc_t>
acc_t row_loss_reverse_kl(const RowPair<acc_t>& row, acc_t scale, void* gs, c10::ScalarType gs_dtype,
                          Buffers<acc_t>& buf, acc_t* scratch, acc_t* chunk_max_used) {
  LaneSoftmax<acc_t> s, t;
  Vec<acc_t> weighted(acc_t(0));
  const Vec<acc_t> zero(acc_t(0)), inv(row.inv_t);
  for (int64_t b = 0, c = 0; b < row.V; b += kChunk, ++c) {
    const auto ch = row.load(b, std::min<int64_t>(kChunk, row.V - b), buf);
    acc_t factor;
    chunk_max_used[c] = -std::numeric_limits<acc_t>::infinity();
    if (s.raise_max(chunk_max(ch.s, ch.padded) * row.inv_t, &factor)) {
      weighted = weighted * Vec<acc_t>(factor);
      chunk_max_used[c] = s.max;
      const Vec<acc_t> m(s.max);
      Vec<acc_t> zs(acc_t(0)), a(acc_t(0));
      for (int64_t i = 0; i < ch.padded; i += Vec<acc_t>::size()) {
        const auto xs = Vec<acc_t>::loadu(ch.s + i) * inv;
        const auto xt = Vec<acc_t>::loadu(ch.t + i) * inv;
        const auto e = fast_exp(xs - m);
        e.store(scratch + b + i);
        zs = zs + e;
        a = a + Vec<acc_t>::blendv(zero, e * (xs - xt), e > zero);
      }
      s.sum = s.sum + zs;
      weighted = weighted + a;
    }
    t.add(ch.t, ch.padded, row.inv_t);
  }
  const ReverseKLState<acc_t> st{s.finish(), t.finish(), reduce_sum(weighted)};
  RowResult<acc_t> res;
  res.lse_s = log_sum_exp(st.student);
  res.lse_t = log_sum_exp(st.teacher);
  res.ct = acc_t(0);
  if (classify_row(res.lse_s, res.lse_t) != RowKind::Normal) {
    res.value = res.cs = std::numeric_limits<acc_t>::quiet_NaN();
    row_backward<acc_t, Divergence::ReverseKL>(row, res, DivergenceParam<acc_t>{}, scale, gs, gs_dtype, nullptr,
                                               gs_dtype, buf);
    return res.value;
  }
  res.value = res.cs = reverse_kl_value(st);
  const Vec<acc_t> shift(res.lse_t - res.lse_s - res.value), vscale(scale);
  for (int64_t b = 0, c = 0; b < row.V; b += kChunk, ++c) {
    const int64_t n = std::min<int64_t>(kChunk, row.V - b);
    const auto ch = row.load(b, n, buf);
    acc_t* out = chunk_out(gs, gs_dtype, b, n, buf.out);
    const Vec<acc_t> to_q(rescale_factor(chunk_max_used[c], st.student.max) / st.student.sum);
    for (int64_t i = 0; i < ch.padded; i += Vec<acc_t>::size()) {
      const auto q = Vec<acc_t>::loadu(scratch + b + i) * to_q;
      const auto d = (Vec<acc_t>::loadu(ch.s + i) - Vec<acc_t>::loadu(ch.t + i)) * inv + shift;
      Vec<acc_t>::blendv(zero, q * d * vscale, q > zero).store(out + i);
    }
    finish_chunk(out, buf.out, n, gs_dtype, gs, b);
  }
  return res.value;
}

// One row of both validated inputs, as the row kernels above take it.
template <typename acc_t>
RowPair<acc_t> row_pair(const PairInput& in, int64_t r, double temperature) {
  return {row_ptr(in.s, r), row_ptr(in.t, r), in.s.scalar_type(), in.t.scalar_type(), in.V,
          acc_t(1.0 / temperature)};
}

std::tuple<at::Tensor, at::Tensor> divergence_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                      c10::string_view name, double param, double temperature) {
  DivergenceForwardArgs a(student, teacher, name, param, temperature);
  const PairInput& in = a.in;
  AT_DISPATCH_FLOATING_TYPES(a.values.scalar_type(), "kdext::divergence_forward", [&] {
    using acc_t = scalar_t;
    const auto prm = DivergenceParam<acc_t>::make(param);
    acc_t* vout = a.values.data_ptr<acc_t>();
    acc_t* sout = a.stats.data_ptr<acc_t>();
    dispatch_divergence(in.kind, [&](auto tag) {
      constexpr Divergence D = decltype(tag)::value;
      at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
        Buffers<acc_t> buf;
        for (int64_t r = begin; r < end; ++r) {
          const auto res = row_forward<acc_t, D>(row_pair<acc_t>(in, r, temperature), prm, buf);
          vout[r] = res.value;
          acc_t* st = sout + r * kStatsColumns;
          st[0] = res.lse_s;
          st[1] = res.lse_t;
          st[2] = res.cs;
          st[3] = res.ct;
        }
      });
    });
  });
  return {a.values, a.stats};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward(const at::Tensor& grad_values, const at::Tensor& student,
                                                       const at::Tensor& teacher, const at::Tensor& stats,
                                                       c10::string_view name, double param, double temperature,
                                                       bool student_grad, bool teacher_grad) {
  DivergenceBackwardArgs a(grad_values, student, teacher, stats, name, param, temperature, student_grad,
                           teacher_grad, &empty_output);
  const PairInput& in = a.in;
  const at::Tensor &gs = a.student_grad, &gt = a.teacher_grad;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(student), "kdext::divergence_backward", [&] {
    using acc_t = scalar_t;
    const auto prm = DivergenceParam<acc_t>::make(param);
    const acc_t* gp = a.grad_values.const_data_ptr<acc_t>();
    const acc_t* sp = a.stats.const_data_ptr<acc_t>();
    dispatch_divergence(in.kind, [&](auto tag) {
      constexpr Divergence D = decltype(tag)::value;
      at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
        Buffers<acc_t> buf;
        for (int64_t r = begin; r < end; ++r) {
          const acc_t* x = sp + r * kStatsColumns;
          const RowResult<acc_t> res{acc_t(0), x[0], x[1], x[2], x[3]};
          row_backward<acc_t, D>(row_pair<acc_t>(in, r, temperature), res, prm, gp[r] / acc_t(temperature),
                                 student_grad ? mutable_row_ptr(gs, r) : nullptr, gs.scalar_type(),
                                 teacher_grad ? mutable_row_ptr(gt, r) : nullptr, gt.scalar_type(), buf);
        }
      });
    });
  });
  return a.outputs(student, teacher);
}

// The fused loss on prepared arguments: writes the gradient into a.grad and
// returns the loss.
at::Tensor run_divergence_loss(const DivergenceLossArgs& a, const at::Tensor& student, double param,
                               double temperature) {
  const PairInput& in = a.in;
  const at::Tensor& grad = a.grad;
  const auto acc = acc_dtype(student);
  at::Tensor row_loss = at::empty({in.rows}, student.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "kdext::divergence_loss", [&] {
    using acc_t = scalar_t;
    const auto prm = DivergenceParam<acc_t>::make(param);
    const acc_t* wp = a.row_weights.const_data_ptr<acc_t>();
    acc_t* lp = row_loss.data_ptr<acc_t>();
    dispatch_divergence(in.kind, [&](auto tag) {
      constexpr Divergence D = decltype(tag)::value;
      at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
        Buffers<acc_t> buf;
        std::vector<acc_t> scratch, chunk_maxes;
        if (D == Divergence::ReverseKL) {
          scratch.resize((in.V + kChunk - 1) / kChunk * kChunk);
          chunk_maxes.resize((in.V + kChunk - 1) / kChunk);
        }
        for (int64_t r = begin; r < end; ++r) {
          const auto row = row_pair<acc_t>(in, r, temperature);
          if (wp[r] == acc_t(0)) {  // an ignored row: no work, no NaN leaks in
            lp[r] = acc_t(0);
            std::memset(mutable_row_ptr(grad, r), 0, in.V * grad.element_size());
            continue;
          }
          if (D == Divergence::ReverseKL) {
            lp[r] = wp[r] * row_loss_reverse_kl(row, wp[r] / acc_t(temperature), mutable_row_ptr(grad, r),
                                                grad.scalar_type(), buf, scratch.data(), chunk_maxes.data());
            continue;
          }
          const auto res = row_forward<acc_t, D>(row, prm, buf);
          lp[r] = wp[r] * res.value;
          row_backward<acc_t, D>(row, res, prm, wp[r] / acc_t(temperature), mutable_row_ptr(grad, r), grad.scalar_type(),
                                 nullptr, grad.scalar_type(), buf);
        }
      });
    });
  });
  // Summed in row order in double, so the loss does not depend on the thread count.
  return row_loss.to(at::kDouble).sum().to(acc);
}

using LossAdapters = DivergenceLossAdapters<&run_divergence_loss, &empty_output>;
constexpr auto& divergence_loss = LossAdapters::loss;
constexpr auto& divergence_loss_out = LossAdapters::loss_out;

at::Tensor divergence_partial(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_lse,
                              const at::Tensor& teacher_lse, c10::string_view name, double param,
                              double temperature) {
  DivergencePartialArgs a(student, teacher, student_lse, teacher_lse, name, param, temperature);
  const PairInput& in = a.in;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(student), "kdext::divergence_partial", [&] {
    using acc_t = scalar_t;
    const auto prm = DivergenceParam<acc_t>::make(param);
    const acc_t* lsp = a.student_lse.const_data_ptr<acc_t>();
    const acc_t* ltp = a.teacher_lse.const_data_ptr<acc_t>();
    acc_t* op = a.out.data_ptr<acc_t>();
    dispatch_divergence(in.kind, [&](auto tag) {
      constexpr Divergence D = decltype(tag)::value;
      at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
        Buffers<acc_t> buf;
        for (int64_t r = begin; r < end; ++r) {
          acc_t* o = op + 3 * r;
          if (classify_row(lsp[r], ltp[r]) != RowKind::Normal) {
            o[0] = o[1] = o[2] = std::numeric_limits<acc_t>::quiet_NaN();
            continue;
          }
          const auto sums = row_sums<acc_t, D>(row_pair<acc_t>(in, r, temperature), lsp[r], ltp[r], prm, buf);
          o[0] = sums.value;
          o[1] = sums.student_c;
          o[2] = sums.teacher_c;
        }
      });
    });
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CPU, m) {
  register_kernels(m, KDEXT_DIVERGENCE_KERNELS);
}

}  // namespace cpu
}  // namespace kdext
