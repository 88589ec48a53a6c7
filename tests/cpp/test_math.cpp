// ctest: the framework-free math in csrc/include/kdext, with no torch at all.
// Checks the exact merge of online-softmax states (any split of a row gives
// the single-pass answer), the divergence terms against direct float64
// formulas, the row contract, and the helpers around them.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kdext/divergence.h"
#include "kdext/online_softmax.h"
#include "kdext/row_contract.h"

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
  kdext::Divergence d;
  expect(kdext::parse_divergence("skew_reverse_kl", &d) && d == kdext::Divergence::SkewReverseKL, "parse");
  expect(!kdext::parse_divergence("kl", &d), "parse rejects unknown names");
  for (const auto& e : kdext::kDivergenceNames) {
    expect(kdext::parse_divergence(e.name, &d) && d == e.kind, "every listed name parses to its kind");
    expect(kdext::divergence_param_name(e.kind) == e.param, "the parameter's name is the listed one");
  }
  expect(std::string(kdext::divergence_param_name(kdext::Divergence::JSD)) == "beta", "JSD takes beta");
  expect(kdext::divergence_param_name(kdext::Divergence::TVD) == nullptr, "TVD takes no parameter");
  expect(kdext::resolve_divergence(kdext::Divergence::JSD, 0.0) == kdext::Divergence::ForwardKL, "JSD beta=0");
  expect(kdext::resolve_divergence(kdext::Divergence::JSD, 1.0) == kdext::Divergence::ReverseKL, "JSD beta=1");
}

void test_row_contract() {
  using kdext::RowKind;
  const double inf = INFINITY, nan = NAN;
  expect(kdext::classify_row(1.0) == RowKind::Normal, "classify one lse: normal");
  expect(kdext::classify_row(-inf) == RowKind::Empty, "classify one lse: empty");
  expect(kdext::classify_row(nan) == RowKind::Poisoned, "classify one lse: NaN");
  expect(kdext::classify_row(inf) == RowKind::Poisoned, "classify one lse: +inf");
  expect(kdext::classify_row(1.0, 2.0) == RowKind::Normal, "classify normal");
  expect(kdext::classify_row(-inf, 2.0) == RowKind::Empty, "classify empty");
  expect(kdext::classify_row(2.0, -inf) == RowKind::Empty, "classify empty teacher");
  expect(kdext::classify_row(nan, 2.0) == RowKind::Poisoned, "classify NaN");
  expect(kdext::classify_row(inf, 2.0) == RowKind::Poisoned, "classify +inf");
  expect(kdext::classify_row(-inf, nan) == RowKind::Poisoned, "poisoned wins over empty");
  expect(kdext::classify_row(inf, -inf) == RowKind::Poisoned, "poisoned wins over empty (+inf)");

  expect(kdext::constant_row_gradient<float>(RowKind::Empty) == 0.0f, "empty rows get zero gradients");
  expect(std::isnan(kdext::constant_row_gradient<float>(RowKind::Poisoned)), "poisoned rows get NaN gradients");
  float fill = -1.0f;
  expect(!kdext::constant_gradient(RowKind::Normal, 0.5f, &fill), "a normal row's gradient is computed");
  expect(!kdext::constant_gradient(RowKind::Normal, NAN, &fill), "a NaN scale is computed (and propagates)");
  expect(kdext::constant_gradient(RowKind::Normal, 0.0f, &fill) && fill == 0.0f, "a zero scale gives zeros");
  expect(kdext::constant_gradient(RowKind::Poisoned, 0.0f, &fill) && fill == 0.0f, "an ignored NaN row gets zeros");
  expect(kdext::constant_gradient(RowKind::Poisoned, 2.0f, &fill) && std::isnan(fill), "a poisoned row gets NaN");
  expect(kdext::constant_gradient(RowKind::Empty, 2.0f, &fill) && fill == 0.0f, "an empty row gets zeros");

  // hi + lo holds a float64 lse to float64 precision, and (x - hi) - lo is
  // x - lse rounded once where a float32 lse is off by up to half its ulp.
  const double lse = 10000.123456789012;
  const auto split = kdext::split_lse<float>(lse);
  // lo is a float of size <= ulp(hi) / 2 = 2^-11 here: it rounds by at most 2^-35.
  expect_near(double(split.hi) + double(split.lo), lse, std::ldexp(1.0, -35), "hi + lo is the lse");
  const float x = 10001.0f;
  // x - hi is exact (Sterbenz); subtracting lo rounds once at ~0.88: 2^-25.
  expect_near(kdext::log_q(x, split), double(x) - lse, std::ldexp(1.0, -25), "(x - hi) - lo keeps the lse's precision");
  expect(std::fabs(double(x - float(lse)) - (double(x) - lse)) > 1e-5, "a float32 lse alone would not");
  const auto exact = kdext::split_lse<double>(lse);
  expect(exact.hi == lse && exact.lo == 0.0, "float64 needs no split");
  for (double v : {inf, -inf, nan}) {
    const auto s = kdext::split_lse<float>(v);
    expect(s.lo == 0.0f && (s.hi == float(v) || (std::isnan(s.hi) && std::isnan(v))), "a non-finite lse keeps lo = 0");
  }
}

}  // namespace

int main() {
  test_softmax_merge_is_split_invariant();
  test_reverse_kl_state_merge();
  test_divergence_terms_against_direct_formulas();
  test_helpers();
  test_row_contract();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
