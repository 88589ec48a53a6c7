// The fused LM-head losses (stem: fused_linear): one driver for the CPU and
// CUDA, registered under both keys. It only calls ATen (the GEMMs: MKL/oneDNN
// on the CPU, cuBLAS on CUDA) and kdext's own row kernels through the
// dispatcher, so each backend runs its own kernels; the backends differ only
// in how a GEMM keeps fp32 logits (Projector::Mode).
//
// Rows are processed in chunks of `c` rows (fused_linear_args.h:
// chunk_rows). Per chunk:
//   z_s = f_s(h_s[rows] W_s^T)  z_t = f_t(h_t[rows] W_t^T)    two GEMMs into
//                                                            reused fp32 buffers
//   the row kernel (divergence_loss_out, logprobs_backward, ...) writes
//   g = dL/dz_s into a reused buffer
//   g *= df_s/dz (logit scale, softcap)
//   grad_h[rows] = g W_s,  grad_W += g^T h_s[rows] (fp32),  grad_b += sum_rows g
// so memory beyond the inputs and outputs is the chunk buffers (and, for
// half-precision weights, an fp32 grad_W accumulator): independent of the
// rows. Nothing in the loop synchronises with the host (the loss is a device
// scalar). See docs/DESIGN.md §2.11 for the contract.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cpu/buffer_pool.h"
#include "fused_linear_args.h"

namespace kdext {
namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

// ---- kdext's row kernels, through the dispatcher -----------------------------

at::Tensor divergence_loss_out(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w, c10::string_view name,
                               double param, double temperature, at::Tensor& grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdext::divergence_loss_out", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               c10::string_view, double, double, at::Tensor&)>();
  return op.call(s, t, w, name, param, temperature, grad);
}

TensorPair divergence_forward(const at::Tensor& s, const at::Tensor& t, c10::string_view name, double param,
                              double temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdext::divergence_forward", "")
                             .typed<TensorPair(const at::Tensor&, const at::Tensor&, c10::string_view, double, double)>();
  return op.call(s, t, name, param, temperature);
}

TensorPair divergence_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                               const at::Tensor& stats, c10::string_view name, double param, double temperature) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kdext::divergence_backward", "")
          .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            c10::string_view, double, double, bool, bool)>();
  return op.call(grad, s, t, stats, name, param, temperature, true, false);
}

TensorPair logprobs_forward(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdext::logprobs_forward", "")
                             .typed<TensorPair(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(logits, tokens, temperature);
}

at::Tensor logprobs_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& tokens,
                             const at::Tensor& lse, double temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdext::logprobs_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double)>();
  return op.call(grad, logits, tokens, lse, temperature);
}

TensorPair entropy_forward(const at::Tensor& logits, double temperature) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kdext::entropy_forward", "")
          .typed<TensorPair(const at::Tensor&, double, const std::optional<at::Tensor>&)>();
  return op.call(logits, temperature, std::nullopt);
}

at::Tensor entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                            const at::Tensor& lse, double temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdext::entropy_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double)>();
  return op.call(grad, logits, entropy, lse, temperature);
}

// ---- buffers -------------------------------------------------------------------

// Large buffers: the CPU buffer pool (already-mapped pages, cpu/buffer_pool.h),
// the caching allocator on CUDA.
at::Tensor big_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::empty_output(sizes, options) : at::empty(sizes, options);
}

at::Tensor big_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) { return big_empty(sizes, options).zero_(); }

// The guards every driver runs under: the device of the inputs; no autograd
// (the driver is below it, and the row kernels' Python autograd must not be
// re-entered); no autocast (the GEMMs choose their dtypes themselves; the
// Python wrapper has already cast to the autocast dtype).
struct DriverGuards {
  c10::OptionalDeviceGuard device;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  explicit DriverGuards(const at::Tensor& like) : device(like.device()) {}
};

// ---- one head's GEMMs ------------------------------------------------------------

// The gradients of one head, accumulated over the chunks.
struct HeadGrads {
  GradRequest want;
  at::Tensor hidden;  // [rows, H] in hidden's dtype
  at::Tensor weight;  // [V, H] in the accumulation dtype (the output itself when that is the weight's)
  at::Tensor bias;    // [V] in the accumulation dtype

  HeadGrads(const LinearHead& h, GradRequest w) : want{w.hidden, w.weight, w.bias && h.bias.has_value()} {
    const auto acc = h.acc();
    if (want.hidden) hidden = big_empty({h.rows, h.H}, h.hidden.options());
    if (want.weight) weight = big_zeros({h.V, h.H}, h.weight.options().dtype(acc));
    if (want.bias) bias = at::zeros({h.V}, h.bias->options().dtype(acc));
  }

  // (grad_hidden, grad_weight, grad_bias) in the inputs' shapes and dtypes;
  // a 0-element tensor for each gradient not asked for.
  Grads3 outputs(const LinearHead& h) const {
    const auto none = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
    return {want.hidden ? hidden.view(h.hidden_sizes) : none(h.hidden),
            want.weight ? weight.to(h.weight.scalar_type()) : none(h.weight),
            want.bias ? bias.to(h.bias->scalar_type()) : (h.bias ? none(*h.bias) : none(h.weight))};
  }
};

// One head prepared for the chunk loop: the weight in the GEMMs' dtype (once
// per call), the fp32 bias, and the GEMMs of a chunk.
class Projector {
 public:
  // How a GEMM keeps fp32 (float64) logits:
  //   Native  every tensor is in the accumulation dtype;
  //   Half    CUDA, hidden and weight both fp16 or both bf16: cuBLAS with fp32
  //           output (mm.dtype) and fp32 accumulation of grad_W (baddbmm.dtype);
  //   Upcast  anything else (the CPU with half precision, mixed dtypes): the
  //           weight is converted once per call, each hidden chunk per chunk.
  enum class Mode { Native, Half, Upcast };

  Projector(const LinearHead& head, c10::ScalarType acc) : head_(head), acc_(acc) {
    const auto hd = head.hidden.scalar_type(), wd = head.weight.scalar_type();
    if (hd == acc && wd == acc) {
      mode_ = Mode::Native;
    } else if (head.hidden.is_cuda() && hd == wd && (hd == at::kHalf || hd == at::kBFloat16)) {
      mode_ = Mode::Half;
    } else {
      mode_ = Mode::Upcast;
    }
    weight_ = mode_ == Mode::Upcast ? head.weight.to(acc).contiguous() : head.weight;
    if (head.bias) bias_ = head.bias->to(acc);
  }

  Mode mode() const { return mode_; }

  // Buffer bytes per chunk row beyond the logits: the upcast hidden rows and,
  // for Half, g in the weight's dtype.
  int64_t extra_bytes_per_row() const {
    const int64_t elem = c10::elementSize(acc_);
    if (mode_ == Mode::Upcast) return head_.H * elem;
    if (mode_ == Mode::Half) return head_.V * 2;
    return 0;
  }

  // z = f(scale (h[a, a + c) W^T + b)) into `out`, a [c, V] view in the
  // accumulation dtype with unit stride in V. Keeps the chunk's hidden rows
  // in the GEMM dtype for backward().
  void project(int64_t a, int64_t c, at::Tensor out) {
    const at::Tensor h = head_.hidden.narrow(0, a, c);
    chunk_ = mode_ == Mode::Upcast ? h.to(acc_) : h;
    const double scale = head_.logit_scale;
    if (mode_ == Mode::Half) {
      at::mm_out(out, chunk_, weight_.t(), at::kFloat);
      if (bias_.defined()) out.add_(bias_);
      if (scale != 1.0) out.mul_(scale);
    } else if (bias_.defined()) {
      at::addmm_out(out, bias_, chunk_, weight_.t(), scale, scale);
    } else {
      // beta = 0: the buffer's previous contents are ignored (NaN and inf included).
      at::addmm_out(out, out, chunk_, weight_.t(), 0.0, scale);
    }
    if (head_.softcap) {
      const double cap = *head_.softcap;
      out.div_(cap).tanh_().mul_(cap);
    }
  }

  // The chain rule and backward GEMMs of the chunk project(a, c, z) produced:
  // g ([c, V] view, accumulation dtype) holds dL/dz; z is overwritten. With
  // `live` ([c] bool), the rows where it is false (ignored rows, whose g is 0)
  // enter grad_W as zeros, so that a NaN in their hidden states cannot leak
  // into it through 0 * NaN.
  void backward(int64_t a, int64_t c, const at::Tensor& z, const at::Tensor& g, HeadGrads& grads,
                const at::Tensor& live = at::Tensor()) {
    chain_rule(z, g);
    at::Tensor gm = g;  // the GEMMs' left operand
    if (mode_ == Mode::Half) {
      if (!g_half_.defined() || g_half_.size(0) < c)
        g_half_ = big_empty({c, head_.V}, head_.weight.options());
      gm = g_half_.narrow(0, 0, c);
      gm.copy_(g);  // rounded once; the GEMMs accumulate in fp32
    }
    if (grads.want.hidden) {
      at::Tensor gh = grads.hidden.narrow(0, a, c);
      if (mode_ == Mode::Upcast) {
        gh.copy_(at::mm(gm, weight_));
      } else {
        at::mm_out(gh, gm, weight_);
      }
    }
    if (grads.want.weight) {
      const at::Tensor h = live.defined() ? at::where(live.unsqueeze(1), chunk_, at::zeros({}, chunk_.options()))
                                          : chunk_;
      if (mode_ == Mode::Half) {
        // grad_W (fp32) += g^T h with fp16/bf16 operands and fp32 accumulation:
        // baddbmm.dtype_out accumulates into `out` (beta = 1) in every torch
        // version that has it (addmm.dtype_out first required self in the
        // inputs' dtype).
        at::Tensor acc3 = grads.weight.unsqueeze(0);
        at::baddbmm_out(acc3, acc3, gm.t().unsqueeze(0), h.unsqueeze(0), at::kFloat, 1.0, 1.0);
      } else {
        grads.weight.addmm_(gm.t(), h);
      }
    }
    if (grads.want.bias) grads.bias.add_(g.sum(0));
  }

 private:
  // g *= dz/du for z = f(scale u): scale, times 1 - (z / cap)^2 with a softcap.
  void chain_rule(const at::Tensor& z, const at::Tensor& g) const {
    const double scale = head_.logit_scale;
    if (head_.softcap) {
      at::Tensor d = z.div_(*head_.softcap);
      d.mul_(d).mul_(-scale).add_(scale);  // scale (1 - tanh^2)
      g.mul_(d);
    } else if (scale != 1.0) {
      g.mul_(scale);
    }
  }

  const LinearHead& head_;
  c10::ScalarType acc_;
  Mode mode_;
  at::Tensor weight_, bias_;
  at::Tensor chunk_;   // the last chunk's hidden rows in the GEMMs' dtype
  at::Tensor g_half_;  // Half: g in the weight's dtype
};

// A [c, V] logits buffer in the accumulation dtype; a head narrower than V
// writes only its first columns, so the rest are -inf once, for every chunk.
at::Tensor logits_buffer(int64_t c, int64_t V, int64_t head_V, const at::TensorOptions& acc_options) {
  at::Tensor buf = big_empty({c, V}, acc_options);
  if (head_V < V) buf.narrow(1, head_V, V - head_V).fill_(-std::numeric_limits<double>::infinity());
  return buf;
}

// The chunk loop: body(first row, rows in this chunk).
template <typename Body>
void for_each_chunk(int64_t rows, int64_t chunk, Body&& body) {
  for (int64_t a = 0; a < rows; a += chunk) body(a, std::min(chunk, rows - a));
}

// ---- the divergence ops ------------------------------------------------------------

// The state of a divergence call: both heads' projectors and the buffers.
struct PairDriver {
  const HeadPairArgs& p;
  c10::ScalarType acc;
  Projector ps, pt;
  int64_t chunk;
  at::Tensor zs, zt;

  // `grad_buffers`: how many [c, V] gradient buffers a chunk needs besides the logits.
  PairDriver(const HeadPairArgs& args, int grad_buffers)
      : p(args), acc(args.s.acc()), ps(args.s, acc), pt(args.t, acc) {
    const int64_t elem = c10::elementSize(acc);
    const int64_t per_row = (2 + grad_buffers) * p.V * elem + ps.extra_bytes_per_row() + pt.extra_bytes_per_row();
    chunk = chunk_rows(p.chunk_size, p.rows(), per_row, p.s.hidden.is_cuda());
    if (p.rows() > 0) {
      const auto opts = p.s.hidden.options().dtype(acc);
      zs = logits_buffer(chunk, p.V, p.s.V, opts);
      zt = logits_buffer(chunk, p.V, p.t.V, opts);
    }
  }

  // Both heads' logits of rows [a, a + c): [c, V] views of the buffers.
  TensorPair project(int64_t a, int64_t c) {
    at::Tensor s = zs.narrow(0, 0, c), t = zt.narrow(0, 0, c);
    ps.project(a, c, s.narrow(1, 0, p.s.V));
    pt.project(a, c, t.narrow(1, 0, p.t.V));
    return {s, t};
  }

  // The student's backward of a chunk whose dL/dz_s is g ([c, V]).
  void backward(int64_t a, int64_t c, const at::Tensor& s, const at::Tensor& g, HeadGrads& grads,
                const at::Tensor& live) {
    ps.backward(a, c, s.narrow(1, 0, p.s.V), g.narrow(1, 0, p.s.V), grads, live);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_divergence_loss(
    const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb, const at::Tensor& th,
    const at::Tensor& tw, const std::optional<at::Tensor>& tb, c10::string_view name, double param,
    double temperature, double s_scale, double t_scale, std::optional<double> s_cap, std::optional<double> t_cap,
    int64_t chunk_size, const at::Tensor& row_weights, bool hidden_grad, bool weight_grad, bool bias_grad) {
  const HeadPairArgs args(sh, sw, sb, th, tw, tb, name, param, temperature, s_scale, t_scale, s_cap, t_cap,
                          chunk_size);
  check_per_row(row_weights, "row_weights", args.rows(), sh, "student_hidden");
  const DriverGuards guards(sh);
  const at::Tensor w = per_row_vector(row_weights, args.s.acc());
  HeadGrads grads(args.s, {hidden_grad, weight_grad, bias_grad});
  const bool with_grad = grads.want.any();
  PairDriver d(args, with_grad ? 1 : 0);
  at::Tensor g = with_grad && args.rows() > 0 ? big_empty({d.chunk, args.V}, d.zs.options()) : at::Tensor();
  at::Tensor loss = at::zeros({}, sh.options().dtype(at::kDouble));
  for_each_chunk(args.rows(), d.chunk, [&](int64_t a, int64_t c) {
    auto [s, t] = d.project(a, c);
    const at::Tensor wc = w.narrow(0, a, c);
    if (with_grad) {
      at::Tensor gc = g.narrow(0, 0, c);
      loss.add_(divergence_loss_out(s, t, wc, name, param, temperature, gc));
      d.backward(a, c, s, gc, grads, wc != 0);
    } else {
      // The loss alone: rows of weight 0 are dropped (their value may be NaN), as the fused kernel drops them.
      const at::Tensor v = std::get<0>(divergence_forward(s, t, name, param, temperature));
      loss.add_(at::where(wc != 0, v * wc, at::zeros({}, v.options())).to(at::kDouble).sum());
    }
  });
  auto [gh, gw, gb] = grads.outputs(args.s);
  return {loss.to(args.s.acc()), gh, gw, gb};
}

std::tuple<at::Tensor, at::Tensor> fused_linear_divergence_forward(
    const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb, const at::Tensor& th,
    const at::Tensor& tw, const std::optional<at::Tensor>& tb, c10::string_view name, double param,
    double temperature, double s_scale, double t_scale, std::optional<double> s_cap, std::optional<double> t_cap,
    int64_t chunk_size) {
  const HeadPairArgs args(sh, sw, sb, th, tw, tb, name, param, temperature, s_scale, t_scale, s_cap, t_cap,
                          chunk_size);
  const DriverGuards guards(sh);
  PairDriver d(args, 0);
  const auto opts = sh.options().dtype(args.s.acc());
  at::Tensor values = at::empty({args.rows()}, opts), stats = at::empty({args.rows(), kStatsColumns}, opts);
  for_each_chunk(args.rows(), d.chunk, [&](int64_t a, int64_t c) {
    auto [s, t] = d.project(a, c);
    auto [v, st] = divergence_forward(s, t, name, param, temperature);
    values.narrow(0, a, c).copy_(v);
    stats.narrow(0, a, c).copy_(st);
  });
  auto shape = args.row_sizes();
  values = values.view(shape);
  shape.push_back(kStatsColumns);
  return {values, stats.view(shape)};
}

Grads3 fused_linear_divergence_backward(const at::Tensor& grad_values, const at::Tensor& stats, const at::Tensor& sh,
                                        const at::Tensor& sw, const std::optional<at::Tensor>& sb,
                                        const at::Tensor& th, const at::Tensor& tw,
                                        const std::optional<at::Tensor>& tb, c10::string_view name, double param,
                                        double temperature, double s_scale, double t_scale,
                                        std::optional<double> s_cap, std::optional<double> t_cap, int64_t chunk_size,
                                        bool hidden_grad, bool weight_grad, bool bias_grad) {
  const HeadPairArgs args(sh, sw, sb, th, tw, tb, name, param, temperature, s_scale, t_scale, s_cap, t_cap,
                          chunk_size);
  const auto acc = args.s.acc();
  check_per_row(grad_values, "grad_values", args.rows(), sh, "student_hidden");
  check_stats(stats, args.rows(), sh);
  const DriverGuards guards(sh);
  const at::Tensor gv = per_row_vector(grad_values, acc);
  const at::Tensor st = stats.to(acc).contiguous().reshape({-1, kStatsColumns});
  HeadGrads grads(args.s, {hidden_grad, weight_grad, bias_grad});
  if (grads.want.any()) {
    PairDriver d(args, 1);
    for_each_chunk(args.rows(), d.chunk, [&](int64_t a, int64_t c) {
      auto [s, t] = d.project(a, c);
      const at::Tensor gvc = gv.narrow(0, a, c);
      const at::Tensor g = std::get<0>(divergence_backward(gvc, s, t, st.narrow(0, a, c), name, param, temperature));
      d.backward(a, c, s, g, grads, gvc != 0);
    });
  }
  return grads.outputs(args.s);
}

// ---- log-probs ---------------------------------------------------------------------

struct LogprobsDriver {
  const LinearHead& h;
  c10::ScalarType acc;
  Projector proj;
  int64_t chunk;
  at::Tensor z;

  LogprobsDriver(const LinearHead& head, int64_t chunk_size, int grad_buffers)
      : h(head), acc(head.acc()), proj(head, acc) {
    const int64_t per_row = (1 + grad_buffers) * h.V * c10::elementSize(acc) + proj.extra_bytes_per_row();
    chunk = chunk_rows(chunk_size, h.rows, per_row, h.hidden.is_cuda());
    if (h.rows > 0) z = logits_buffer(chunk, h.V, h.V, h.hidden.options().dtype(acc));
  }

  at::Tensor project(int64_t a, int64_t c) {
    at::Tensor zc = z.narrow(0, 0, c);
    proj.project(a, c, zc);
    return zc;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& tokens, double temperature, double logit_scale, std::optional<double> softcap,
    int64_t chunk_size, bool with_entropy) {
  const LinearHead head(hidden, weight, bias, logit_scale, softcap, kSingleHead);
  check_temperature(temperature);
  check_chunk_size(chunk_size);
  const at::Tensor tok = fused_token_vector(tokens, head);
  const DriverGuards guards(hidden);
  LogprobsDriver d(head, chunk_size, 0);
  const auto opts = hidden.options().dtype(head.acc());
  at::Tensor lp = at::empty({head.rows}, opts);
  at::Tensor ent = at::empty({with_entropy ? head.rows : 0}, opts);
  at::Tensor lse = at::empty({head.rows}, hidden.options().dtype(at::kDouble));
  for_each_chunk(head.rows, d.chunk, [&](int64_t a, int64_t c) {
    const at::Tensor z = d.project(a, c);
    auto [lp_c, lse_c] = logprobs_forward(z, tok.narrow(0, a, c), temperature);
    lp.narrow(0, a, c).copy_(lp_c);
    if (with_entropy) {
      // entropy_forward's lse is the float64 one its backward takes (SplitLse).
      auto [ent_c, lse64_c] = entropy_forward(z, temperature);
      ent.narrow(0, a, c).copy_(ent_c);
      lse.narrow(0, a, c).copy_(lse64_c);
    } else {
      lse.narrow(0, a, c).copy_(lse_c);
    }
  });
  const auto shape = HeadPairArgs::leading_shape_of(head.hidden_sizes);
  return {lp.view(shape), with_entropy ? ent.view(shape) : ent, lse.view(shape)};
}

Grads3 fused_linear_logprobs_backward(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                      const at::Tensor& entropy, const at::Tensor& lse, const at::Tensor& hidden,
                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& tokens, double temperature, double logit_scale,
                                      std::optional<double> softcap, int64_t chunk_size, bool hidden_grad,
                                      bool weight_grad, bool bias_grad) {
  const LinearHead head(hidden, weight, bias, logit_scale, softcap, kSingleHead);
  check_temperature(temperature);
  check_chunk_size(chunk_size);
  const at::Tensor tok = fused_token_vector(tokens, head);
  check_per_row(grad_logprobs, "grad_logprobs", head.rows, hidden, "hidden");
  check_per_row(lse, "lse", head.rows, hidden, "hidden");
  if (grad_entropy) {
    check_per_row(*grad_entropy, "grad_entropy", head.rows, hidden, "hidden");
    check_per_row(entropy, "entropy", head.rows, hidden, "hidden");
  }
  const DriverGuards guards(hidden);
  const auto acc = head.acc();
  const at::Tensor glp = per_row_vector(grad_logprobs, acc), lse64 = per_row_vector(lse, at::kDouble);
  const at::Tensor gent = grad_entropy ? per_row_vector(*grad_entropy, acc) : at::Tensor();
  const at::Tensor ent = grad_entropy ? per_row_vector(entropy, acc) : at::Tensor();
  HeadGrads grads(head, {hidden_grad, weight_grad, bias_grad});
  if (grads.want.any()) {
    LogprobsDriver d(head, chunk_size, grad_entropy ? 2 : 1);
    for_each_chunk(head.rows, d.chunk, [&](int64_t a, int64_t c) {
      const at::Tensor z = d.project(a, c);
      at::Tensor g = logprobs_backward(glp.narrow(0, a, c), z, tok.narrow(0, a, c), lse64.narrow(0, a, c),
                                       temperature);
      if (grad_entropy) {
        g.add_(entropy_backward(gent.narrow(0, a, c), z, ent.narrow(0, a, c), lse64.narrow(0, a, c), temperature));
      }
      d.proj.backward(a, c, z, g, grads);
    });
  }
  return grads.outputs(head);
}

constexpr FusedLinearKernels kKernels{
    .fused_linear_divergence_loss = &fused_linear_divergence_loss,
    .fused_linear_divergence_forward = &fused_linear_divergence_forward,
    .fused_linear_divergence_backward = &fused_linear_divergence_backward,
    .fused_linear_logprobs_forward = &fused_linear_logprobs_forward,
    .fused_linear_logprobs_backward = &fused_linear_logprobs_backward,
};

}  // namespace

// The same driver for both backends: every device-specific step is an ATen
// op or a kdext kernel that dispatches on its own.
TORCH_LIBRARY_IMPL(kdext, CPU, m) { register_kernels(m, kKernels); }
#if defined(KDEXT_WITH_CUDA)
TORCH_LIBRARY_IMPL(kdext, CUDA, m) { register_kernels(m, kKernels); }
#endif

}  // namespace kdext
