// Per-element terms and gradients of the divergence family (docs/DESIGN.md,
// "the math contract"), shared by the CPU and CUDA kernels.
//
// Every divergence D(q, p) here is a sum over the vocabulary of a function of
// (q_i, p_i), with q = softmax(s/T) the student and p = softmax(t/T) the
// teacher. Its gradient through the softmax is
//     dD/ds_j = q_j (g_j - c_s) / T,   g_i = dD/dq_i,  c_s = sum_i q_i g_i,
//     dD/dt_j = p_j (h_j - c_t) / T,   h_i = dD/dp_i,  c_t = sum_i p_i h_i,
// so a row needs three sums (the value, c_s and c_t) and then one elementwise
// pass writes both gradients. The sums are additive over any split of the
// vocabulary, which is what the split-vocab kernels and the vocab-parallel ops
// rely on.
//
// Inputs are log-probabilities: ls = log q_i = s_i/T - lse_s and
// lt = log p_i = t_i/T - lse_t, either of which may be -inf (a masked token).
// An entry with zero probability contributes exactly 0 to every sum and gets a
// zero gradient; the select() guards below keep 0 * inf from turning into NaN.
// Rows whose log-normaliser is not finite are handled by the callers, by the
// row contract of kdext/row_contract.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "kdext/math.h"

namespace kdext {

enum class Divergence : int32_t {
  ReverseKL = 0,  // KL(q || p)
  ForwardKL,      // KL(p || q)
  JSD,            // beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
  SkewForwardKL,  // KL(p || alpha p + (1 - alpha) q)
  SkewReverseKL,  // KL(q || (1 - alpha) p + alpha q)
  TVD,            // 1/2 sum |p - q|
};

// The three per-row sums (or one element's contribution to them).
template <typename V>
struct DivergenceSums {
  V value;
  V student_c;  // c_s
  V teacher_c;  // c_t
};

// The divergence's parameter (beta or alpha) and the logs the formulas use.
template <typename T>
struct DivergenceParam {
  T value;
  T log_value;            // log(param)
  T log_one_minus_value;  // log(1 - param)

  static DivergenceParam make(double p) {
    return {T(p), T(std::log(p)), T(std::log1p(-p))};
  }
};

namespace detail {

// The log of the mixture m = w a + (1 - w) b of two probabilities a = e^la,
// b = e^lb (and, on request, a / m): in linear space, one log (and one
// division), while m is a normal number, which is as exact as the log-space
// form (a and b carry exp's rounding either way and log m rounds once; both
// forms leave an absolute error of a few float ulps in a divergence's sum) and
// two exps cheaper. Where m is not normal (in any lane of a vector), the
// log-space form is used: w a and (1 - w) b may have underflowed there, and it
// keeps the exact answer, -inf included. For w = 0 or 1, m is b or a and its
// log is lb or la exactly (a skew KL with alpha = 1 is then exactly 0).
template <typename V, typename M, typename T>
struct LogMixture {
  V lm;         // log m
  V m;          // m itself where `linear`
  bool linear;  // lm = log m (else lm is given or log-space, and m unused)

  KDEXT_HD LogMixture(V la, V lb, V a, V b, T w, T log_w, T log_one_minus_w) {
    linear = false;
    m = M::splat(w) * a + M::splat(T(1) - w) * b;
    if (w == T(0) || w == T(1)) {  // m is b or a itself: its log is given, exactly
      lm = w == T(0) ? lb : la;
    } else if (!M::any(M::lt(m, M::splat(std::numeric_limits<T>::min())))) {
      lm = M::log(m);
      linear = true;
    } else {
      lm = log_add_exp<V, M>(la + M::splat(log_w), lb + M::splat(log_one_minus_w));
    }
  }
  // a / m, 0 where a is 0 (only the skew KLs' gradients need it).
  KDEXT_HD V ratio(V la, V a) const {
    const V zero = M::splat(0);
    return M::select(M::gt(a, zero), linear ? a / m : M::exp(la - lm), zero);
  }
};

// KL(a || w a + (1 - w) b) and its pieces, for the two skew divergences.
// a is the distribution in front, b the one mixed in; la, lb their log-probs.
template <typename V, typename M, typename T>
struct SkewKL {
  V a, b, lm, ratio;  // ratio = a / m

  KDEXT_HD SkewKL(V la, V lb, T w, T log_w, T log_one_minus_w) {
    a = M::exp(la);
    b = M::exp(lb);
    const LogMixture<V, M, T> mix(la, lb, a, b, w, log_w, log_one_minus_w);
    lm = mix.lm;
    ratio = mix.ratio(la, a);
  }
  KDEXT_HD V value(V la) const { return M::select(M::gt(a, M::splat(0)), a * (la - lm), M::splat(0)); }
  // dKL/da and dKL/db.
  KDEXT_HD V grad_a(V la, T w) const { return la - lm + M::splat(1) - M::splat(w) * ratio; }
  KDEXT_HD V grad_b(T w) const { return M::splat(-(T(1) - w)) * ratio; }
};

template <typename V, typename M>
KDEXT_HD V guarded(V prob, V x) {
  return M::select(M::gt(prob, M::splat(0)), x, M::splat(0));
}

}  // namespace detail

template <Divergence D>
struct DivergenceMath;

template <>
struct DivergenceMath<Divergence::ReverseKL> {
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD DivergenceSums<V> terms(V ls, V lt, const DivergenceParam<T>&) {
    V q = M::exp(ls);
    V v = detail::guarded<V, M>(q, q * (ls - lt));
    return {v, v, M::splat(0)};
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V student_grad(V ls, V lt, const DivergenceParam<T>&, T cs) {
    V q = M::exp(ls);
    return detail::guarded<V, M>(q, q * (ls - lt - M::splat(cs)));
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V teacher_grad(V ls, V lt, const DivergenceParam<T>&, T) {
    return M::exp(lt) - M::exp(ls);
  }
};

template <>
struct DivergenceMath<Divergence::ForwardKL> {
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD DivergenceSums<V> terms(V ls, V lt, const DivergenceParam<T>&) {
    V p = M::exp(lt);
    V v = detail::guarded<V, M>(p, p * (lt - ls));
    return {v, M::splat(0), v};
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V student_grad(V ls, V lt, const DivergenceParam<T>&, T) {
    return M::exp(ls) - M::exp(lt);
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V teacher_grad(V ls, V lt, const DivergenceParam<T>&, T ct) {
    V p = M::exp(lt);
    return detail::guarded<V, M>(p, p * (lt - ls - M::splat(ct)));
  }
};

// Generalized JSD for 0 < beta < 1 (beta = 0 and 1 are dispatched to the two
// KLs, the TRL/GKD convention). g_i = (1 - beta)(log q_i - log m_i) and
// h_i = beta (log p_i - log m_i): the mixture's own derivative cancels.
template <>
struct DivergenceMath<Divergence::JSD> {
  // log m, m = beta p + (1 - beta) q.
  template <typename V, typename M, typename T>
  static KDEXT_HD V log_mixture(V ls, V lt, V q, V p, const DivergenceParam<T>& b) {
    return detail::LogMixture<V, M, T>(lt, ls, p, q, b.value, b.log_value, b.log_one_minus_value).lm;
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD DivergenceSums<V> terms(V ls, V lt, const DivergenceParam<T>& b) {
    V q = M::exp(ls), p = M::exp(lt);
    V lm = log_mixture<V, M>(ls, lt, q, p, b);
    V ks = detail::guarded<V, M>(q, q * (ls - lm));
    V kt = detail::guarded<V, M>(p, p * (lt - lm));
    V cs = M::splat(T(1) - b.value) * ks;
    V ct = M::splat(b.value) * kt;
    return {cs + ct, cs, ct};
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V student_grad(V ls, V lt, const DivergenceParam<T>& b, T cs) {
    V q = M::exp(ls), p = M::exp(lt);
    V lm = log_mixture<V, M>(ls, lt, q, p, b);
    return detail::guarded<V, M>(q, q * (M::splat(T(1) - b.value) * (ls - lm) - M::splat(cs)));
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V teacher_grad(V ls, V lt, const DivergenceParam<T>& b, T ct) {
    V q = M::exp(ls), p = M::exp(lt);
    V lm = log_mixture<V, M>(ls, lt, q, p, b);
    return detail::guarded<V, M>(p, p * (M::splat(b.value) * (lt - lm) - M::splat(ct)));
  }
};

// KL(p || alpha p + (1 - alpha) q): p in front, q mixed in.
template <>
struct DivergenceMath<Divergence::SkewForwardKL> {
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD DivergenceSums<V> terms(V ls, V lt, const DivergenceParam<T>& a) {
    detail::SkewKL<V, M, T> k(lt, ls, a.value, a.log_value, a.log_one_minus_value);
    V cs = detail::guarded<V, M>(k.b, k.b * k.grad_b(a.value));
    V ct = detail::guarded<V, M>(k.a, k.a * k.grad_a(lt, a.value));
    return {k.value(lt), cs, ct};
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V student_grad(V ls, V lt, const DivergenceParam<T>& a, T cs) {
    detail::SkewKL<V, M, T> k(lt, ls, a.value, a.log_value, a.log_one_minus_value);
    return detail::guarded<V, M>(k.b, k.b * (k.grad_b(a.value) - M::splat(cs)));
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V teacher_grad(V ls, V lt, const DivergenceParam<T>& a, T ct) {
    detail::SkewKL<V, M, T> k(lt, ls, a.value, a.log_value, a.log_one_minus_value);
    return detail::guarded<V, M>(k.a, k.a * (k.grad_a(lt, a.value) - M::splat(ct)));
  }
};

// KL(q || alpha q + (1 - alpha) p): q in front, p mixed in.
template <>
struct DivergenceMath<Divergence::SkewReverseKL> {
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD DivergenceSums<V> terms(V ls, V lt, const DivergenceParam<T>& a) {
    detail::SkewKL<V, M, T> k(ls, lt, a.value, a.log_value, a.log_one_minus_value);
    V cs = detail::guarded<V, M>(k.a, k.a * k.grad_a(ls, a.value));
    V ct = detail::guarded<V, M>(k.b, k.b * k.grad_b(a.value));
    return {k.value(ls), cs, ct};
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V student_grad(V ls, V lt, const DivergenceParam<T>& a, T cs) {
    detail::SkewKL<V, M, T> k(ls, lt, a.value, a.log_value, a.log_one_minus_value);
    return detail::guarded<V, M>(k.a, k.a * (k.grad_a(ls, a.value) - M::splat(cs)));
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V teacher_grad(V ls, V lt, const DivergenceParam<T>& a, T ct) {
    detail::SkewKL<V, M, T> k(ls, lt, a.value, a.log_value, a.log_one_minus_value);
    return detail::guarded<V, M>(k.b, k.b * (k.grad_b(a.value) - M::splat(ct)));
  }
};

// 1/2 sum |p - q|, with g_i = sign(q_i - p_i) / 2 and h_i = -g_i.
template <>
struct DivergenceMath<Divergence::TVD> {
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD DivergenceSums<V> terms(V ls, V lt, const DivergenceParam<T>&) {
    V q = M::exp(ls), p = M::exp(lt);
    V g = M::splat(T(0.5)) * sign<V, M>(q - p);
    return {M::splat(T(0.5)) * M::abs(p - q), q * g, -(p * g)};
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V student_grad(V ls, V lt, const DivergenceParam<T>&, T cs) {
    V q = M::exp(ls), p = M::exp(lt);
    return q * (M::splat(T(0.5)) * sign<V, M>(q - p) - M::splat(cs));
  }
  template <typename V, typename M = MathOps<V>, typename T>
  static KDEXT_HD V teacher_grad(V ls, V lt, const DivergenceParam<T>&, T ct) {
    V q = M::exp(ls), p = M::exp(lt);
    return p * (M::splat(T(0.5)) * sign<V, M>(p - q) - M::splat(ct));
  }
};

// Columns of the per-row statistics tensor [rows, 4] that a forward saves and
// a backward consumes: lse_s, lse_t, c_s, c_t.
constexpr int kStatsColumns = 4;

// Calls f(DivergenceTag<D>{}) for the runtime kind D, so that f is compiled
// once per divergence with D a constant (decltype(tag)::value).
template <Divergence D>
struct DivergenceTag {
  static constexpr Divergence value = D;
};

template <typename F>
auto dispatch_divergence(Divergence d, F&& f) {
  switch (d) {
    case Divergence::ReverseKL: return f(DivergenceTag<Divergence::ReverseKL>{});
    case Divergence::ForwardKL: return f(DivergenceTag<Divergence::ForwardKL>{});
    case Divergence::JSD: return f(DivergenceTag<Divergence::JSD>{});
    case Divergence::SkewForwardKL: return f(DivergenceTag<Divergence::SkewForwardKL>{});
    case Divergence::SkewReverseKL: return f(DivergenceTag<Divergence::SkewReverseKL>{});
    case Divergence::TVD: return f(DivergenceTag<Divergence::TVD>{});
  }
  return f(DivergenceTag<Divergence::ReverseKL>{});
}

// The divergences by the names the ops take, with the name of each one's
// parameter (in [0, 1]; nullptr: it takes none). This is the one list of
// names: the checks (csrc/divergence_args.h) build their message from it, and
// kdext/_validate.py reads it through kdext._C.build_info().
struct DivergenceName {
  const char* name;
  Divergence kind;
  const char* param;
};

inline constexpr DivergenceName kDivergenceNames[] = {
    {"reverse_kl", Divergence::ReverseKL, nullptr},
    {"forward_kl", Divergence::ForwardKL, nullptr},
    {"jsd", Divergence::JSD, "beta"},
    {"skew_forward_kl", Divergence::SkewForwardKL, "alpha"},
    {"skew_reverse_kl", Divergence::SkewReverseKL, "alpha"},
    {"tvd", Divergence::TVD, nullptr},
};

// Name -> kind, for the string argument of the ops; false for an unknown name.
inline bool parse_divergence(const char* name, Divergence* out) {
  for (const auto& e : kDivergenceNames) {
    if (std::strcmp(e.name, name) == 0) {
      *out = e.kind;
      return true;
    }
  }
  return false;
}

// The name of the divergence's parameter (beta or alpha), nullptr when it takes none.
inline const char* divergence_param_name(Divergence d) {
  for (const auto& e : kDivergenceNames) {
    if (e.kind == d) return e.param;
  }
  return nullptr;
}

// The TRL/GKD convention: JSD with beta = 0 is forward KL and beta = 1 is
// reverse KL (the mixture formula itself degenerates to 0 at both ends).
inline Divergence resolve_divergence(Divergence d, double param) {
  if (d == Divergence::JSD && param == 0.0) return Divergence::ForwardKL;
  if (d == Divergence::JSD && param == 1.0) return Divergence::ReverseKL;
  return d;
}

}  // namespace kdext
