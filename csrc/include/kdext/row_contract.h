// The row contract of docs/DESIGN.md ("the math contract"), written once for
// every op family on both backends: how a row is treated from its
// log-normaliser(s), what a row without a distribution gets, and the float64
// log-normaliser split into two floats that the float32 kernels subtract.
//
//   Normal    every log-normaliser is finite: the row is computed.
//   Empty     a distribution has no support (all its logits are -inf, lse =
//             -inf): value NaN, gradient 0.
//   Poisoned  a NaN or +inf was seen (lse NaN or +inf): value NaN, gradient NaN.
#pragma once

#include <limits>

#include "kdext/math.h"

namespace kdext {

enum class RowKind { Normal, Empty, Poisoned };

// A row of one distribution (softmax family, log-probs), from its lse.
template <typename T>
KDEXT_HD RowKind classify_row(T lse) {
  const T inf = std::numeric_limits<T>::infinity();
  if (lse != lse || lse == inf) return RowKind::Poisoned;
  if (lse == -inf) return RowKind::Empty;
  return RowKind::Normal;
}

// A row of two distributions (the divergences), from the student's and the
// teacher's lse: Poisoned when either is, else Empty when either is.
template <typename T>
KDEXT_HD RowKind classify_row(T lse_s, T lse_t) {
  const RowKind s = classify_row(lse_s), t = classify_row(lse_t);
  if (s == RowKind::Poisoned || t == RowKind::Poisoned) return RowKind::Poisoned;
  if (s == RowKind::Empty || t == RowKind::Empty) return RowKind::Empty;
  return RowKind::Normal;
}

// Every gradient entry of a row that is not Normal: 0 when Empty, NaN when Poisoned.
template <typename T>
KDEXT_HD T constant_row_gradient(RowKind kind) {
  return kind == RowKind::Poisoned ? std::numeric_limits<T>::quiet_NaN() : T(0);
}

// The divergences' gradient rule, which also covers rows whose scale (upstream
// gradient or row weight, over T) is 0: such a row is ignored, and gets zeros
// even when it is Poisoned, as autograd treats "no gradient". Returns true
// when the row's gradient is the constant *fill (a non-Normal row or a zero
// scale), false when it must be computed.
template <typename T>
KDEXT_HD bool constant_gradient(RowKind kind, T scale, T* fill) {
  if (kind == RowKind::Normal && scale != T(0)) return false;
  *fill = scale == T(0) ? T(0) : constant_row_gradient<T>(kind);
  return true;
}

// A float64 log-normaliser as the float32 kernels use it. log q_j = x_j/T - lse
// with a float32 lse would round at the size of the logits (1e-3 absolute at
// 1e4); split into hi + lo, (x_j/T - hi) - lo keeps full precision. For
// float64 kernels lo is 0 and the difference is x_j/T - lse itself. A lse
// that is not finite keeps lo = 0, so the difference is x_j/T - lse.
template <typename T>
struct SplitLse {
  T hi, lo;
};

template <typename T>
KDEXT_HD SplitLse<T> split_lse(double lse) {
  const T hi = static_cast<T>(lse);
  const double inf = std::numeric_limits<double>::infinity();
  const bool finite = lse == lse && lse != inf && lse != -inf;
  return {hi, finite ? static_cast<T>(lse - double(hi)) : T(0)};
}

// log q = (x - hi) - lo, for scalars and vector lanes alike.
template <typename V, typename T>
KDEXT_HD V log_q(const V& x, const SplitLse<T>& l) {
  return (x - V(l.hi)) - V(l.lo);
}

}  // namespace kdext
