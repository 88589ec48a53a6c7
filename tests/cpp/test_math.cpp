// ctest: the framework-free math in csrc/include/kdext, with no torch at all.
// Checks the exact merge of online-softmax states (any split of a row gives
// the single-pass answer), the divergence terms against direct float64
// formulas, and the helpers around them.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kdext/divergence.h"
#include "kdext/online_softmax.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what) {
  const bool ok = (std::isnan(got) && std::isnan(want)) || got == want || std::fabs(got - want) <= tol;
  if (!ok) {
    std::printf("FAIL %s: got %.17g want %.17g (tol %.3g)\n", what, got, want, tol);
    ++failures;
  }
}

void expect(bool cond, const char* what) {
  if (!cond) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

using kdext::SoftmaxState;

SoftmaxState<double> state_of(const std::vector<double>& x, size_t lo, size_t hi) {
  SoftmaxState<double> s = SoftmaxState<double>::empty();
  for (size_t i = lo; i < hi; ++i) s = kdext::merge(s, SoftmaxState<double>{x[i], 1.0});
  return s;
}

double direct_lse(const std::vector<double>& x) {
  double m = -INFINITY;
  for (double v : x) m = std::fmax(m, v);
  if (m == -INFINITY) return m;
  double z = 0;
  for (double v : x) z += std::exp(v - m);
  return m + std::log(z);
}

void test_softmax_merge_is_split_invariant() {
  std::mt19937 rng(1);
  std::normal_distribution<double> normal(0.0, 5.0);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<double> x(1 + rng() % 300);
    for (auto& v : x) v = (rng() % 5 == 0) ? -INFINITY : normal(rng);
    const size_t cut = rng() % (x.size() + 1);
    const auto merged = kdext::merge(state_of(x, 0, cut), state_of(x, cut, x.size()));
    expect_near(kdext::log_sum_exp(merged), direct_lse(x), 1e-12, "lse of merged halves");
  }
  expect(kdext::log_sum_exp(SoftmaxState<double>::empty()) == -INFINITY, "empty state has lse -inf");
  const auto with_nan = kdext::merge(SoftmaxState<double>{NAN, 1.0}, SoftmaxState<double>{1.0, 1.0});
  expect(std::isnan(kdext::log_sum_exp(with_nan)), "NaN propagates through merge");
}

void test_reverse_kl_state_merge() {
  std::mt19937 rng(2);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int trial = 0; trial < 100; ++trial) {
    const size_t n = 2 + rng() % 200;
    std::vector<double> s(n), t(n);
    for (size_t i = 0; i < n; ++i) s[i] = normal(rng), t[i] = normal(rng);
    // Direct KL(q || p).
    const double ls = direct_lse(s), lt = direct_lse(t);
    double kl = 0;
    for (size_t i = 0; i < n; ++i) kl += std::exp(s[i] - ls) * ((s[i] - ls) - (t[i] - lt));
    // Chunked states, merged in a random split.
    auto chunk = [&](size_t lo, size_t hi) {
      kdext::ReverseKLState<double> st = kdext::ReverseKLState<double>::empty();
      for (size_t i = lo; i < hi; ++i) {
        kdext::ReverseKLState<double> one{{s[i], 1.0}, {t[i], 1.0}, s[i] - t[i]};
        st = kdext::merge(st, one);
      }
      return st;
    };
    const size_t cut = 1 + rng() % (n - 1);
    const auto st = kdext::merge(chunk(0, cut), chunk(cut, n));
    expect_near(kdext::reverse_kl_value(st), kl, 1e-10, "reverse KL from merged states");
  }
}

template <kdext::Divergence D>
double row_value(const std::vector<double>& s, const std::vector<double>& t, double param) {
  const double ls = direct_lse(s), lt = direct_lse(t);
  const auto prm = kdext::DivergenceParam<double>::make(param);
  double v = 0;
  for (size_t i = 0; i < s.size(); ++i) v += kdext::DivergenceMath<D>::terms(s[i] - ls, t[i] - lt, prm).value;
  return v;
}

void test_divergence_terms_against_direct_formulas() {
  const std::vector<double> s = {0.3, -1.2, 2.0, -INFINITY, 0.7};
  const std::vector<double> t = {-0.5, 1.1, 0.4, -INFINITY, 0.2};
  const double ls = direct_lse(s), lt = direct_lse(t);
  std::vector<double> q(s.size()), p(s.size());
  for (size_t i = 0; i < s.size(); ++i) q[i] = std::exp(s[i] - ls), p[i] = std::exp(t[i] - lt);
  auto kl = [](const std::vector<double>& a, const std::vector<double>& b) {
    double v = 0;
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] > 0) v += a[i] * std::log(a[i] / b[i]);
    return v;
  };
  auto mix = [](const std::vector<double>& a, const std::vector<double>& b, double w) {
    std::vector<double> m(a.size());
    for (size_t i = 0; i < a.size(); ++i) m[i] = w * a[i] + (1 - w) * b[i];
    return m;
  };
  using D = kdext::Divergence;
  expect_near(row_value<D::ReverseKL>(s, t, 0), kl(q, p), 1e-12, "reverse KL");
  expect_near(row_value<D::ForwardKL>(s, t, 0), kl(p, q), 1e-12, "forward KL");
  const double beta = 0.3;
  const auto m = mix(p, q, beta);
  expect_near(row_value<D::JSD>(s, t, beta), beta * kl(p, m) + (1 - beta) * kl(q, m), 1e-12, "JSD");
  expect_near(row_value<D::SkewForwardKL>(s, t, 0.1), kl(p, mix(p, q, 0.1)), 1e-12, "skew forward KL");
  expect_near(row_value<D::SkewReverseKL>(s, t, 0.1), kl(q, mix(q, p, 0.1)), 1e-12, "skew reverse KL");
  double tvd = 0;
  for (size_t i = 0; i < q.size(); ++i) tvd += 0.5 * std::fabs(p[i] - q[i]);
  expect_near(row_value<D::TVD>(s, t, 0), tvd, 1e-12, "TVD");
}

void test_helpers() {
  expect_near(kdext::log_add_exp<double>(-INFINITY, -INFINITY), -INFINITY, 0, "log_add_exp(-inf, -inf)");
  expect_near(kdext::log_add_exp<double>(1000.0, 1000.0), 1000.0 + std::log(2.0), 1e-12, "log_add_exp large");
  expect(std::isnan(kdext::log_add_exp<double>(NAN, 0.0)), "log_add_exp keeps NaN");
  expect(kdext::sign<double>(-2.0) == -1 && kdext::sign<double>(0.0) == 0 && kdext::sign<double>(3.0) == 1, "sign");
  const double inf = INFINITY, nan = NAN;
  expect(kdext::classify_row(1.0, 2.0) == kdext::RowKind::Normal, "classify normal");
  expect(kdext::classify_row(-inf, 2.0) == kdext::RowKind::Empty, "classify empty");
  expect(kdext::classify_row(nan, 2.0) == kdext::RowKind::Poisoned, "classify NaN");
  expect(kdext::classify_row(inf, 2.0) == kdext::RowKind::Poisoned, "classify +inf");
  kdext::Divergence d;
  expect(kdext::parse_divergence("skew_reverse_kl", &d) && d == kdext::Divergence::SkewReverseKL, "parse");
  expect(!kdext::parse_divergence("kl", &d), "parse rejects unknown names");
  expect(kdext::resolve_divergence(kdext::Divergence::JSD, 0.0) == kdext::Divergence::ForwardKL, "JSD beta=0");
  expect(kdext::resolve_divergence(kdext::Divergence::JSD, 1.0) == kdext::Divergence::ReverseKL, "JSD beta=1");
}

}  // namespace

int main() {
  test_softmax_merge_is_split_invariant();
  test_reverse_kl_state_merge();
  test_divergence_terms_against_direct_formulas();
  test_helpers();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
