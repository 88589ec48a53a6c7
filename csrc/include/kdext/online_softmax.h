// The online-softmax state of one row (or of one chunk of a row) and its exact
// merge. Chunks of a row, SIMD lanes, CUDA threads and blocks, and
// vocab-parallel ranks all combine partial results through these functions, so
// every split of the vocabulary gives the single-pass answer.
#pragma once

#include "kdext/math.h"

namespace kdext {

// Partial log-sum-exp of x over a set of entries:
//   max = max_i x_i,  sum = sum_i exp(x_i - max).
// The empty set (or one whose entries are all -inf) is {-inf, 0}.
template <typename T>
struct SoftmaxState {
  T max;
  T sum;

  static KDEXT_HD SoftmaxState empty() {
    return {-std::numeric_limits<T>::infinity(), T(0)};
  }
};

// exp(from - to) for a running max moving from `from` to `to` >= from; 0 when
// `from` is -inf (nothing was accumulated) so that -inf - -inf never appears.
template <typename T>
KDEXT_HD T rescale_factor(T from, T to) {
  return from == -std::numeric_limits<T>::infinity() ? T(0) : MathOps<T>::exp(from - to);
}

template <typename T>
KDEXT_HD SoftmaxState<T> merge(SoftmaxState<T> a, SoftmaxState<T> b) {
  T m = MathOps<T>::maximum(a.max, b.max);
  if (m == -std::numeric_limits<T>::infinity()) return SoftmaxState<T>::empty();
  return {m, a.sum * rescale_factor(a.max, m) + b.sum * rescale_factor(b.max, m)};
}

// log(sum_i exp(x_i)); -inf for the empty state, NaN when a NaN was seen.
template <typename T>
KDEXT_HD T log_sum_exp(SoftmaxState<T> s) {
  if (s.max == -std::numeric_limits<T>::infinity()) return s.max;
  return s.max + MathOps<T>::log(s.sum);
}

// The same log-normaliser in float64 from a float32 (or float64) state: the
// max is exact and only max + log(sum) is formed in float64, so the value
// keeps the state's precision however large the logits are (a float32 lse
// rounds at the size of the max). The lse that entropy_forward and
// lse_float64 return, and that vocab shards exchange.
template <typename T>
KDEXT_HD double log_sum_exp_float64(SoftmaxState<T> s) {
  return log_sum_exp(SoftmaxState<double>{double(s.max), double(s.sum)});
}

// The single-pass reverse-KL state of docs/DESIGN.md: the student's and teacher's
// softmax states plus A = sum_i exp(x_i - m_s) (x_i - y_i), where x = s/T and
// y = t/T. A is scaled by the student's max, so it merges with it.
template <typename T>
struct ReverseKLState {
  SoftmaxState<T> student;
  SoftmaxState<T> teacher;
  T weighted;  // A

  static KDEXT_HD ReverseKLState empty() {
    return {SoftmaxState<T>::empty(), SoftmaxState<T>::empty(), T(0)};
  }
};

template <typename T>
KDEXT_HD ReverseKLState<T> merge(ReverseKLState<T> a, ReverseKLState<T> b) {
  ReverseKLState<T> out;
  out.student = merge(a.student, b.student);
  out.teacher = merge(a.teacher, b.teacher);
  T m = out.student.max;
  out.weighted = m == -std::numeric_limits<T>::infinity()
                     ? T(0)
                     : a.weighted * rescale_factor(a.student.max, m) +
                           b.weighted * rescale_factor(b.student.max, m);
  return out;
}

// KL(q||p) = A / Z_s - lse_s + lse_t.
template <typename T>
KDEXT_HD T reverse_kl_value(ReverseKLState<T> s) {
  return s.weighted / s.student.sum - log_sum_exp(s.student) + log_sum_exp(s.teacher);
}

}  // namespace kdext
