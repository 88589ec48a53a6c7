// Framework-free tests of csrc/include/kdext/sparse.h (plain C++, no torch):
//   - each kind's g_a = dD/dQ_a against central differences of the outcome terms;
//   - the student gradient q_m (g_a(m) - c) of the bucket and renormalize forms
//     against central differences of D(Q(s)) in the logits, on a small vocabulary;
//   - merge_student against a direct log-sum-exp, and teacher_norm's cases.
// Build and run: g++ -std=c++17 -O2 -I csrc/include tests/cpp/test_sparse_math.cpp -o /tmp/t && /tmp/t
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kdext/sparse.h"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

using kdext::Divergence;
using kdext::DivergenceParam;
namespace sp = kdext::sparse;

struct Kind {
  Divergence d;
  double param;
  const char* name;
};
const Kind kKinds[] = {{Divergence::ReverseKL, 0.0, "reverse_kl"},  {Divergence::ForwardKL, 0.0, "forward_kl"},
                       {Divergence::JSD, 0.3, "jsd"},                {Divergence::SkewForwardKL, 0.1, "skew_fkl"},
                       {Divergence::SkewReverseKL, 0.4, "skew_rkl"}, {Divergence::TVD, 0.0, "tvd"}};

template <typename F>
auto with_kind(Divergence d, F&& f) {
  return kdext::dispatch_divergence(d, [&](auto tag) { return f(tag); });
}

double value_of(const Kind& k, const std::vector<double>& q, const std::vector<double>& p) {
  const auto prm = DivergenceParam<double>::make(k.param);
  return with_kind(k.d, [&](auto tag) {
    constexpr Divergence D = decltype(tag)::value;
    double v = 0;
    for (size_t a = 0; a < q.size(); ++a) v += sp::OutcomeMath<D>::value(std::log(q[a]), std::log(p[a]), prm);
    return v;
  });
}

void test_outcome_gradients() {
  std::mt19937 gen(3);
  std::uniform_real_distribution<double> u(0.05, 1.0);
  for (const Kind& k : kKinds) {
    const auto prm = DivergenceParam<double>::make(k.param);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<double> q(5), p(5);
      for (int a = 0; a < 5; ++a) {
        q[a] = u(gen);
        p[a] = u(gen);
      }
      for (int a = 0; a < 5; ++a) {
        const double h = 1e-6 * q[a];
        auto qp = q, qm = q;
        qp[a] += h;
        qm[a] -= h;
        const double fd = (value_of(k, qp, p) - value_of(k, qm, p)) / (2 * h);
        const double g = with_kind(k.d, [&](auto tag) {
          return sp::OutcomeMath<decltype(tag)::value>::g(std::log(q[a]), std::log(p[a]), prm);
        });
        CHECK(std::fabs(fd - g) <= 1e-6 * (1 + std::fabs(g)), "%s: g %.12g, finite difference %.12g", k.name, g, fd);
      }
    }
    // Zero-mass outcomes contribute exactly 0.
    const double z = with_kind(k.d, [&](auto tag) {
      return sp::OutcomeMath<decltype(tag)::value>::value(sp::neg_inf(), sp::neg_inf(), prm);
    });
    CHECK(z == 0.0, "%s: term of an empty outcome %g", k.name, z);
  }
}

// D of a row (bucket or renormalize) as a function of the logits, in long double where it matters.
double row_value(const Kind& k, const std::vector<double>& s, const std::vector<int>& ids,
                 const std::vector<double>& lp, bool bucket) {
  std::vector<double> q_out, p_out;
  double m = -INFINITY;
  for (double x : s) m = std::fmax(m, x);
  double z = 0, zi = 0, S = 0;
  for (double x : s) z += std::exp(x - m);
  for (int id : ids) zi += std::exp(s[id] - m);
  for (double l : lp) S += std::exp(l);
  for (size_t j = 0; j < ids.size(); ++j) {
    q_out.push_back(std::exp(s[ids[j]] - m) / (bucket ? z : zi));
    p_out.push_back(std::exp(lp[j]) / (bucket ? 1.0 : S));
  }
  if (bucket) {
    double tail = 0;
    std::vector<bool> stored(s.size(), false);
    for (int id : ids) stored[id] = true;
    for (size_t i = 0; i < s.size(); ++i)
      if (!stored[i]) tail += std::exp(s[i] - m);
    q_out.push_back(tail / z);
    p_out.push_back(1 - S);
  }
  return value_of(k, q_out, p_out);
}

void test_student_gradient() {
  const std::vector<int> ids = {1, 4, 5};
  const std::vector<double> lp = {std::log(0.4), std::log(0.25), std::log(0.2)};
  std::mt19937 gen(5);
  std::normal_distribution<double> nd;
  for (const Kind& k : kKinds) {
    const auto prm = DivergenceParam<double>::make(k.param);
    for (bool bucket : {true, false}) {
      std::vector<double> s(7);
      for (double& x : s) x = nd(gen);
      // The kernels' way: stats, outcome sums, then the per-token gradient.
      double comp_max = -INFINITY, comp_sum = 0, ids_max = -INFINITY, ids_sum = 0;
      std::vector<bool> stored(s.size(), false);
      for (int id : ids) stored[id] = true;
      for (size_t i = 0; i < s.size(); ++i)
        if (!stored[i] && bucket) comp_max = std::fmax(comp_max, s[i]);
      for (size_t i = 0; i < s.size(); ++i)
        if (!stored[i] && bucket) comp_sum += std::exp(s[i] - comp_max);
      for (int id : ids) ids_max = std::fmax(ids_max, s[id]);
      for (int id : ids) ids_sum += std::exp(s[id] - ids_max);
      const auto st = sp::merge_student<double>(comp_max, comp_sum, ids_max, ids_sum);
      double S = 0;
      for (double l : lp) S += std::exp(l);
      const auto tn = sp::teacher_norm(S, bucket ? sp::Tail::Bucket : sp::Tail::Renormalize, true);
      std::vector<double> grad(s.size());
      with_kind(k.d, [&](auto tag) {
        constexpr Divergence D = decltype(tag)::value;
        sp::Sums sums{0, 0};
        for (size_t j = 0; j < ids.size(); ++j) {
          const auto t = sp::outcome_sums<D>(sp::slot_log_q(s[ids[j]], st), lp[j] - tn.log_norm, prm);
          sums.value += t.value;
          sums.c += t.c;
        }
        if (tn.has_tail) {
          const auto t = sp::outcome_sums<D>(st.log_tail, tn.log_tail, prm);
          sums.value += t.value;
          sums.c += t.c;
        }
        const double want = row_value(k, s, ids, lp, bucket);
        CHECK(std::fabs(sums.value - want) <= 1e-12 * (1 + std::fabs(want)), "%s bucket=%d: value %.15g, want %.15g",
              k.name, bucket, sums.value, want);
        const double f = tn.has_tail ? sp::outcome_factor<D>(st.log_tail, tn.log_tail, prm, sums.c) : 0.0;
        for (size_t i = 0; i < s.size(); ++i) grad[i] = stored[i] ? 0.0 : std::exp(slot_log_q(s[i], st)) * f;
        for (size_t j = 0; j < ids.size(); ++j)
          grad[ids[j]] = sp::slot_grad<D>(sp::slot_log_q(s[ids[j]], st), lp[j] - tn.log_norm, prm, sums.c);
        return 0;
      });
      for (size_t i = 0; i < s.size(); ++i) {
        const double h = 1e-6;
        auto sp_ = s, sm = s;
        sp_[i] += h;
        sm[i] -= h;
        const double fd = (row_value(k, sp_, ids, lp, bucket) - row_value(k, sm, ids, lp, bucket)) / (2 * h);
        CHECK(std::fabs(fd - grad[i]) <= 1e-7, "%s bucket=%d: dD/ds_%zu = %.12g, finite difference %.12g", k.name,
              bucket, i, grad[i], fd);
      }
    }
  }
}

void test_merge_and_teacher_norm() {
  // merge_student: log Z and log Q_tail from the two states, as a direct computation gives them.
  const auto st = sp::merge_student<double>(2.0, 3.0, 5.0, 1.5);
  const double z = 3.0 * std::exp(2.0 - 5.0) + 1.5;
  CHECK(st.max == 5.0 && std::fabs(st.logz - std::log(z)) < 1e-15, "logz %.17g", st.logz);
  CHECK(std::fabs(st.log_tail - std::log(3.0 * std::exp(-3.0) / z)) < 1e-15, "log_tail %.17g", st.log_tail);
  const auto empty_comp = sp::merge_student<double>(sp::neg_inf(), 0.0, 1.0, 2.0);
  CHECK(empty_comp.log_tail == sp::neg_inf() && empty_comp.logz == std::log(2.0), "no complement");
  const auto none = sp::merge_student<double>(sp::neg_inf(), 0.0, sp::neg_inf(), 0.0);
  CHECK(sp::student_kind(none.max) == kdext::RowKind::Empty, "an all -inf row is empty");
  CHECK(sp::student_kind(sp::merge_student<double>(NAN, 1.0, 1.0, 1.0).max) == kdext::RowKind::Poisoned, "NaN");
  CHECK(sp::student_kind(st.max) == kdext::RowKind::Normal, "a finite row is normal");
  // Row values and constant gradients: padding is 0 / 0 whatever the student; the rest as the row contract.
  double fill = -1.0;
  CHECK(sp::row_value(kdext::RowKind::Poisoned, true, 7.0) == 0.0 && sp::row_value(kdext::RowKind::Normal, false, 7.0) == 7.0,
        "row_value");
  CHECK(std::isnan(sp::row_value(kdext::RowKind::Empty, false, 7.0)), "an empty row's value is NaN");
  CHECK(sp::row_gradient_fill(kdext::RowKind::Poisoned, true, 1.0, &fill) && fill == 0.0, "padding: zeros");
  CHECK(sp::row_gradient_fill(kdext::RowKind::Poisoned, false, 1.0, &fill) && std::isnan(fill), "poisoned: NaN");
  CHECK(sp::row_gradient_fill(kdext::RowKind::Poisoned, false, 0.0, &fill) && fill == 0.0, "scale 0: zeros");
  CHECK(sp::row_gradient_fill(kdext::RowKind::Empty, false, 1.0, &fill) && fill == 0.0, "empty: zeros");
  CHECK(!sp::row_gradient_fill(kdext::RowKind::Normal, false, 1.0, &fill), "normal: computed");
  // teacher_norm: the tail is 1 - S; S > 1 renormalises; no complement means no tail outcome.
  auto n = sp::teacher_norm(0.75, sp::Tail::Bucket, true);
  CHECK(n.has_tail && n.log_norm == 0.0 && std::fabs(n.log_tail - std::log(0.25)) < 1e-15, "S < 1");
  n = sp::teacher_norm(1.25, sp::Tail::Bucket, true);
  CHECK(n.has_tail && n.log_tail == sp::neg_inf() && n.log_norm == std::log(1.25), "S > 1");
  n = sp::teacher_norm(0.75, sp::Tail::Bucket, false);
  CHECK(!n.has_tail && n.log_norm == std::log(0.75), "every id stored");
  n = sp::teacher_norm(0.75, sp::Tail::Renormalize, true);
  CHECK(!n.has_tail && n.valid && n.log_norm == std::log(0.75), "renormalize");
  CHECK(!sp::teacher_norm(0.0, sp::Tail::Renormalize, true).valid, "nothing to renormalise");
  CHECK(sp::teacher_norm(0.0, sp::Tail::Bucket, true).valid, "bucket: all of the mass in the tail");
}

}  // namespace

int main() {
  test_outcome_gradients();
  test_student_gradient();
  test_merge_and_teacher_norm();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("sparse math: all checks passed\n");
  return 0;
}
