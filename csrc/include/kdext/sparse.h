// Framework-free math of the sparse family (the offline teacher), shared by
// the CPU kernels (csrc/cpu/sparse.cpp) and the CUDA kernels
// (csrc/include/kdext/cuda/sparse_kernels.cuh). The contract is docs/DESIGN.md,
// "the sparse family".
//
// A row holds the teacher's k stored ids i_1..i_k (-1: an empty slot) and
// their log-probabilities l_j, and the student's logits s (x = s/T). The
// divergence is taken between two distributions over a small set of outcomes:
//
//   tail = bucket:       the valid ids and one "everything else" outcome:
//                        P = (p_1..p_n, 1 - S), S = sum_j p_j (p_j = e^{l_j}),
//                        Q = (q_i1..q_in, Q_tail), q = softmax(x) over the
//                        vocabulary and Q_tail = sum of q over the ids NOT
//                        stored (summed over that complement: no cancellation);
//   tail = renormalize:  the valid ids only, both renormalised over them:
//                        P_j = p_j / S, Q_j = q_ij / sum_j q_ij.
//
// With S > 1 (rounding of the stored values) or when every id of the
// vocabulary is stored (no tail outcome), P_j = p_j / S and P_tail = 0.
//
// Every divergence D(Q, P) of kdext/divergence.h is a sum over outcomes of a
// term in (Q_a, P_a). With g_a = dD/dQ_a and c = sum_a Q_a g_a, the student's
// gradient is
//     dD/ds_m = q_m (g_a(m) - c) / T,
// a(m) the outcome of token m (its slot, or the tail). In renormalize mode
// Q_a = softmax over the ids alone, so only the ids get a gradient (the same
// formula, with Q_a in place of q_m). The O(k) math here is in float64 on both
// backends: it is a small part of the work and keeps the sums of k terms exact
// to float32's needs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kdext/divergence.h"
#include "kdext/math.h"
#include "kdext/row_contract.h"

namespace kdext {
namespace sparse {

enum class Tail : int32_t { Bucket = 0, Renormalize = 1 };

// Name -> mode, for the `tail` string of the ops; false for an unknown name.
inline bool parse_tail(const char* name, Tail* out) {
  if (std::strcmp(name, "bucket") == 0) {
    *out = Tail::Bucket;
    return true;
  }
  if (std::strcmp(name, "renormalize") == 0) {
    *out = Tail::Renormalize;
    return true;
  }
  return false;
}

// Columns of the per-row statistics a forward saves for its backward.
constexpr int kStatsColumns = 3;

KDEXT_HD double neg_inf() { return -std::numeric_limits<double>::infinity(); }
KDEXT_HD double pos_inf() { return std::numeric_limits<double>::infinity(); }

// IEEE maximum that propagates NaN (as MathOps::maximum).
KDEXT_HD double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

// ---- ranking (topk_logprobs) ---------------------------------------------------

// Whether entry (va, ia) comes before (vb, ib) in topk_logprobs' order: by
// descending value, ties by lower id.
template <typename T, typename I>
KDEXT_HD bool ranks_before(T va, I ia, T vb, I ib) {
  return va > vb || (va == vb && ia < ib);
}

// ---- the student's side of a row ---------------------------------------------------

// What a forward saves per row (in the accumulation dtype) and a backward
// reads back: log Q_a = (x_a - max) - logz for a stored id with scaled logit
// x_a; log Q_tail = log_tail. In renormalize mode max and logz are those of
// the ids alone and log_tail is -inf.
template <typename T>
struct RowStats {
  T max;
  T logz;
  T log_tail;
};

// The statistics from the online softmax state of the complement (the ids
// not stored: comp_max, comp_sum = sum exp(x - comp_max)) and that of the
// stored ids (ids_max, ids_sum), merged without cancellation: every term is
// positive. The results are rounded to T once, and the rounded values are what
// both the forward and the backward use.
template <typename T>
KDEXT_HD RowStats<T> merge_student(double comp_max, double comp_sum, double ids_max, double ids_sum) {
  RowStats<T> r;
  const double m = nan_max(comp_max, ids_max);
  r.max = T(m);
  if (!(m > neg_inf() && m < pos_inf())) {  // empty (-inf) or poisoned (NaN, +inf): see student_kind
    r.logz = r.log_tail = T(m);
    return r;
  }
  const double zc = comp_max == neg_inf() ? 0.0 : comp_sum * ::exp(comp_max - m);
  const double zi = ids_max == neg_inf() ? 0.0 : ids_sum * ::exp(ids_max - m);
  r.logz = T(::log(zc + zi));
  r.log_tail = (comp_max == neg_inf() || !(comp_sum > 0.0))
                   ? T(neg_inf())
                   : T((comp_max - m) + ::log(comp_sum) - double(r.logz));
  return r;
}

// log Q_a of a stored id from its scaled logit.
template <typename T>
KDEXT_HD double slot_log_q(T x, const RowStats<T>& st) {
  return (double(x) - double(st.max)) - double(st.logz);
}

// ---- the teacher's side of a row ---------------------------------------------------

// How the stored log-probabilities become P. S = sum_j exp(l_j) over the
// valid slots, in float64.
struct TeacherNorm {
  double log_norm;  // subtracted from every stored l_j: 0, or log S when P is renormalised
  double log_tail;  // log P_tail; -inf without tail mass
  bool has_tail;    // the tail is an outcome (bucket mode, and some id of the vocabulary is not stored)
  bool valid;       // P is a distribution (false: no stored mass to renormalise)
};

// `complement` says whether some id of the vocabulary is not stored. The
// tail mass 1 - S is as precise as the stored l_j: each carries a relative
// rounding of u (2^-8 bf16, 2^-11 fp16, 2^-24 fp32), so S, and 1 - S, are off
// by up to u * sum_j p_j |l_j| in absolute terms (docs/DESIGN.md).
KDEXT_HD TeacherNorm teacher_norm(double S, Tail tail, bool complement) {
  TeacherNorm n;
  n.has_tail = tail == Tail::Bucket && complement;
  n.valid = true;
  n.log_tail = neg_inf();
  if (n.has_tail && !(S > 1.0)) {
    n.log_norm = 0.0;
    n.log_tail = ::log1p(-S);  // -inf at S = 1; NaN for a NaN S
    return n;
  }
  n.valid = !(S == 0.0);  // nothing to renormalise (a NaN S stays valid and poisons the row)
  n.log_norm = ::log(S);
  return n;
}

// ---- row classes ----------------------------------------------------------------------

// A row of the sparse loss follows the row contract (kdext/row_contract.h):
//   Normal    a value and a gradient;
//   Empty     no distribution: the student has no mass where the row reads it
//             (all -inf logits; in renormalize mode -inf at every id), or no
//             stored teacher mass to renormalise: value NaN, gradient 0;
//   Poisoned  a NaN or +inf student logit where the row reads them, or (CUDA
//             only: the CPU raises) an id outside [-1, V) or repeated: value
//             NaN, gradient NaN;
// plus padding, a row without any valid id: no outcomes, value 0, gradient 0
// (the Python wrapper leaves it out of the mean, like an ignored row).

// The student side's kind from its saved max: lse = max + log Z with Z >= 1,
// so the max is -inf, NaN or +inf exactly when the lse is.
template <typename T>
KDEXT_HD RowKind student_kind(T max) {
  return classify_row(max);
}

// A row's value from its kind and its sum over the outcomes.
KDEXT_HD double row_value(RowKind kind, bool padding, double sum) {
  if (padding) return 0.0;
  return kind == RowKind::Normal ? sum : std::numeric_limits<double>::quiet_NaN();
}

// constant_gradient (kdext/row_contract.h) with padding: true when the row's
// gradient is the constant *fill (padding: 0), false when it must be computed.
template <typename T>
KDEXT_HD bool row_gradient_fill(RowKind kind, bool padding, T scale, T* fill) {
  if (padding) {
    *fill = T(0);
    return true;
  }
  return kdext::constant_gradient(kind, scale, fill);
}

// ---- the divergence over outcomes ---------------------------------------------------

// log(w e^la + (1 - w) e^lb) in float64: linear while the mixture is a normal
// double, log-space below (divergence.h's LogMixture, in one lane). w = 0 or 1
// gives lb or la exactly.
KDEXT_HD double log_mixture(double la, double lb, double w) {
  if (w == 1.0) return la;
  if (w == 0.0) return lb;
  const double m = w * ::exp(la) + (1.0 - w) * ::exp(lb);
  if (m >= std::numeric_limits<double>::min()) return ::log(m);
  return log_add_exp<double>(la + ::log(w), lb + ::log1p(-w));
}

// Per divergence: an outcome's term in D and g = dD/dQ_a, from lq = log Q_a
// and lp = log P_a (either may be -inf). Terms of zero mass are exactly 0. g
// is only used where Q_a > 0.
template <Divergence D>
struct OutcomeMath;

template <>
struct OutcomeMath<Divergence::ReverseKL> {  // sum Q log(Q / P)
  static KDEXT_HD double value(double lq, double lp, const DivergenceParam<double>&) {
    const double q = ::exp(lq);
    return q > 0.0 ? q * (lq - lp) : 0.0;
  }
  static KDEXT_HD double g(double lq, double lp, const DivergenceParam<double>&) { return lq - lp + 1.0; }
};

template <>
struct OutcomeMath<Divergence::ForwardKL> {  // sum P log(P / Q)
  static KDEXT_HD double value(double lq, double lp, const DivergenceParam<double>&) {
    const double p = ::exp(lp);
    return p > 0.0 ? p * (lp - lq) : 0.0;
  }
  static KDEXT_HD double g(double lq, double lp, const DivergenceParam<double>&) {
    return ::exp(lp) > 0.0 ? -::exp(lp - lq) : 0.0;
  }
};

// beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; g = (1 - beta) log(Q / M).
template <>
struct OutcomeMath<Divergence::JSD> {
  static KDEXT_HD double value(double lq, double lp, const DivergenceParam<double>& b) {
    const double lm = log_mixture(lp, lq, b.value);
    const double p = ::exp(lp), q = ::exp(lq);
    return b.value * (p > 0.0 ? p * (lp - lm) : 0.0) + (1.0 - b.value) * (q > 0.0 ? q * (lq - lm) : 0.0);
  }
  static KDEXT_HD double g(double lq, double lp, const DivergenceParam<double>& b) {
    return (1.0 - b.value) * (lq - log_mixture(lp, lq, b.value));
  }
};

// KL(P || alpha P + (1 - alpha) Q); g = -(1 - alpha) P / M.
template <>
struct OutcomeMath<Divergence::SkewForwardKL> {
  static KDEXT_HD double value(double lq, double lp, const DivergenceParam<double>& a) {
    const double p = ::exp(lp);
    return p > 0.0 ? p * (lp - log_mixture(lp, lq, a.value)) : 0.0;
  }
  static KDEXT_HD double g(double lq, double lp, const DivergenceParam<double>& a) {
    return ::exp(lp) > 0.0 ? -(1.0 - a.value) * ::exp(lp - log_mixture(lp, lq, a.value)) : 0.0;
  }
};

// KL(Q || alpha Q + (1 - alpha) P); g = log(Q / M) + 1 - alpha Q / M.
template <>
struct OutcomeMath<Divergence::SkewReverseKL> {
  static KDEXT_HD double value(double lq, double lp, const DivergenceParam<double>& a) {
    const double q = ::exp(lq);
    return q > 0.0 ? q * (lq - log_mixture(lq, lp, a.value)) : 0.0;
  }
  static KDEXT_HD double g(double lq, double lp, const DivergenceParam<double>& a) {
    const double lm = log_mixture(lq, lp, a.value);
    return lq - lm + 1.0 - a.value * ::exp(lq - lm);
  }
};

// 1/2 sum |P - Q|; g = sign(Q - P) / 2 (0 at Q = P, as torch.abs).
template <>
struct OutcomeMath<Divergence::TVD> {
  static KDEXT_HD double value(double lq, double lp, const DivergenceParam<double>&) {
    return 0.5 * MathOps<double>::abs(::exp(lp) - ::exp(lq));
  }
  static KDEXT_HD double g(double lq, double lp, const DivergenceParam<double>&) {
    return 0.5 * sign<double>(::exp(lq) - ::exp(lp));
  }
};

// One outcome's contribution to the two sums of a row: D and c = sum Q_a g_a.
struct Sums {
  double value;
  double c;
};

template <Divergence D>
KDEXT_HD Sums outcome_sums(double lq, double lp, const DivergenceParam<double>& prm) {
  const double q = ::exp(lq);
  return {OutcomeMath<D>::value(lq, lp, prm), q > 0.0 ? q * OutcomeMath<D>::g(lq, lp, prm) : 0.0};
}

// g_a - c: what every student probability of outcome a is multiplied by in
// dD/ds * T. 0 for an outcome without student mass (each of its q_m is 0).
template <Divergence D>
KDEXT_HD double outcome_factor(double lq, double lp, const DivergenceParam<double>& prm, double c) {
  return ::exp(lq) > 0.0 ? OutcomeMath<D>::g(lq, lp, prm) - c : 0.0;
}

// Q_a (g_a - c): dD/ds * T at a stored id (its outcome holds that id alone).
template <Divergence D>
KDEXT_HD double slot_grad(double lq, double lp, const DivergenceParam<double>& prm, double c) {
  const double q = ::exp(lq);
  return q > 0.0 ? q * (OutcomeMath<D>::g(lq, lp, prm) - c) : 0.0;
}

}  // namespace sparse
}  // namespace kdext
