// Framework-free tests of csrc/include/kdext/philox.h and top_p.h (plain C++,
// no torch): Philox known-answer vectors, and the threshold search driven the
// three ways the backends drive it, against a brute-force sorted reference:
//   cpu:    mass/count only (bound_by_pivots), compaction of the window into a
//           list (tighten) whenever it is smaller than what is scanned;
//   cuda:   all four reductions over the values inside (lo, hi] only, base =
//           F(hi), then a compacted list once the window holds <= 4096 values
//           (what csrc/include/kdext/cuda/top_p_sample_kernels.cuh does per block);
//   shards: the vocab-parallel way: the row cut into unequal shards, each
//           reducing all four sums over all its values, merged (the all-reduce),
//           no compaction.
// Build and run: g++ -std=c++17 -O2 -I csrc/include tests/cpp/test_top_p_math.cpp -o /tmp/t && /tmp/t
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "kdext/philox.h"
#include "kdext/top_p.h"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++failures;                                          \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)

using kdext::top_p::PivotSums;
using kdext::top_p::RowTotals;
using kdext::top_p::ThresholdSearch;
constexpr int K = 8;

void test_philox() {
  // Random123 known-answer vectors for philox4x32_10: counter, key -> output.
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& k : kats) {
    const kdext::Philox4x32 c = {{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}};
    const auto o = kdext::philox4x32_10(c, k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) CHECK(o.v[i] == k.out[i], "word %d: %08x != %08x", i, o.v[i], k.out[i]);
  }
  // The stream mapping: (seed, subsequence, offset) -> counter (offset, subsequence), key seed.
  const auto a = kdext::philox_block(0x299f31d0a4093822ull, 0x0370734413198a2eull, 0x85a308d3243f6a88ull);
  CHECK(a.v[0] == 0xd16cfe09u && a.v[3] == 0x24126ea1u, "philox_block mapping");
  // Uniforms: open interval, extremes exact.
  CHECK(kdext::uniform_open01(0u) == 0x1p-24f, "min");
  CHECK(kdext::uniform_open01(0xffffffffu) == 1.f - 0x1p-24f, "max");
  CHECK(kdext::uniform_open01(0x80000000u) > 0.5f && kdext::uniform_open01(0x7fffffffu) < 0.5f, "half");
}

// The contract's threshold, by sorting (double sums): the smallest value a > 0
// with F(a) < target; F(v) = sum of w over values > v (w = value or 1).
float reference_threshold(std::vector<float> x, double target, bool by_count) {
  std::sort(x.begin(), x.end(), [](float a, float b) { return a > b; });
  double above = 0.0;  // F at the current group's value
  float best = x[0];
  size_t i = 0;
  while (i < x.size() && x[i] > 0.f) {
    size_t j = i;
    double group = 0.0;
    for (; j < x.size() && x[j] == x[i]; ++j) group += by_count ? 1.0 : static_cast<double>(x[j]);
    if (!(above < target)) break;
    best = x[i];
    above += group;
    i = j;
  }
  return best;
}

// Reductions the way the backends do them: many short float chains (here 512
// "threads", 8 consecutive values per thread per tile, like the CUDA kernel)
// merged by a tree. One float chain over a whole 150K row would drift by 1e-3.
constexpr size_t kThreads = 512, kItems = 8;

template <typename Acc, typename Add>
Acc threaded_reduce(const std::vector<float>& x, Acc init, Add add) {
  std::vector<Acc> part(kThreads, init);
  for (size_t i = 0; i < x.size(); ++i) add(part[(i / kItems) % kThreads], x[i]);
  for (size_t width = 1; width < kThreads; width *= 2)
    for (size_t t = 0; t + width < kThreads; t += 2 * width) part[t].merge(part[t + width]);
  return part[0];
}

RowTotals totals_of(const std::vector<float>& x) {
  return threaded_reduce(x, RowTotals::empty(), [](RowTotals& t, float v) { t.add(v); });
}

PivotSums<8> pivot_sums(const std::vector<float>& x, const float (&v)[8], float lo = -1.f, float hi = INFINITY) {
  PivotSums<8> z;
  z.reset();
  return threaded_reduce(x, z, [&](PivotSums<8>& s, float r) {
    if (r > lo && r <= hi) s.add(r, v);
  });
}

// The values of x in (lo, hi], in order, and their min and max (what a compaction keeps).
std::vector<float> window_of(const std::vector<float>& x, float lo, float hi, float* mn, float* mx) {
  std::vector<float> w;
  *mn = INFINITY;
  *mx = 0.f;
  for (float v : x)
    if (v > lo && v <= hi) {
      w.push_back(v);
      *mn = std::min(*mn, v);
      *mx = std::max(*mx, v);
    }
  return w;
}

// Runs a search with the given way of computing a round; returns the rounds used.
int drive(ThresholdSearch& st, const std::function<void(ThresholdSearch&)>& round) {
  while (!st.done()) round(st);
  return st.rounds;
}

// cpu-like: mass/count only + compaction.
void search_cpu(ThresholdSearch& st, const std::vector<float>& row) {
  std::vector<float> list = row;
  float base_m = 0.f, base_c = 0.f;
  drive(st, [&](ThresholdSearch& s) {
    if (s.window_count() < static_cast<float>(list.size())) {
      float mn, mx;
      list = window_of(list, s.lo, s.hi, &mn, &mx);
      base_m = s.hi_mass;
      base_c = s.hi_count;
      s.tighten(mn, mx);
      if (s.done()) return;
    }
    float v[K];
    s.pivots(v);
    PivotSums<K> sums = pivot_sums(list, v);
    sums.bound_by_pivots(v);
    s.update(v, sums, base_m, base_c);
  });
}

// cuda-like: all four sums over the window only, then a list of <= cap values.
void search_cuda(ThresholdSearch& st, const std::vector<float>& row) {
  const size_t cap = 4096;
  bool in_list = false;
  std::vector<float> list;
  float list_m = 0.f, list_c = 0.f;
  drive(st, [&](ThresholdSearch& s) {
    if (!in_list && s.window_count() <= static_cast<float>(cap)) {
      float mn, mx;
      list = window_of(row, s.lo, s.hi, &mn, &mx);
      list_m = s.hi_mass;
      list_c = s.hi_count;
      s.tighten(mn, mx);
      in_list = true;
      return;
    }
    float v[K];
    s.pivots(v);
    if (in_list) {
      s.update(v, pivot_sums(list, v), list_m, list_c);
    } else {
      s.update(v, pivot_sums(row, v, s.lo, s.hi), s.hi_mass, s.hi_count);  // values above hi are in F(hi)
    }
  });
}

// shards: per-shard sums over everything, merged; never compacts.
void search_shards(ThresholdSearch& st, const std::vector<float>& row, std::mt19937& rng) {
  std::vector<size_t> cuts = {0, row.size()};
  for (int i = 0; i < 3; ++i) cuts.push_back(std::uniform_int_distribution<size_t>(0, row.size())(rng));
  std::sort(cuts.begin(), cuts.end());
  drive(st, [&](ThresholdSearch& s) {
    float v[K];
    s.pivots(v);
    PivotSums<K> total;
    total.reset();
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {  // each shard reduces its own values
      total.merge(pivot_sums(std::vector<float>(row.begin() + cuts[c], row.begin() + cuts[c + 1]), v));
    }
    s.update(v, total, 0.f, 0.f);
  });
}

// The kept set is {r >= threshold}: its mass by a direct sum.
double mass_at_least(const std::vector<float>& x, float a) {
  double m = 0.0;
  for (float v : x)
    if (v >= a && v > 0.f) m += v;
  return m;
}

std::vector<float> make_row(std::mt19937& rng, int kind, int V) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> logits(V);
  for (auto& l : logits) {
    switch (kind) {
      case 0: l = 2.f * normal(rng); break;                                         // continuous
      case 1: l = std::round(4.f * normal(rng)) / 2.f; break;                       // many ties
      case 2: l = 0.f; break;                                                       // all tied
      case 3: l = (rng() % 4 == 0) ? -INFINITY : 3.f * normal(rng); break;          // masked
      default: l = 12.f * normal(rng); break;                                       // peaked, underflow
    }
  }
  if (kind == 3) logits[0] = 0.f;
  float m = -INFINITY;
  for (float l : logits) m = std::max(m, l);
  double z = 0.0;
  for (float l : logits) z += std::exp(double(l - m));
  std::vector<float> r(V);
  for (int i = 0; i < V; ++i) r[i] = static_cast<float>(std::exp(double(logits[i] - m)) / z);
  return r;
}

void test_search() {
  std::mt19937 rng(1234);
  const int sizes[] = {1, 2, 7, 100, 5000, 40000, 150000};
  const double top_ps[] = {1e-9, 0.1, 0.5, 0.9, 0.99, 0.999999};
  const int top_ks[] = {1, 2, 10, 50, 1000};
  int cases = 0, max_rounds = 0;
  for (int V : sizes) {
    for (int kind = 0; kind < 5; ++kind) {
      const std::vector<float> row = make_row(rng, kind, V);
      const RowTotals tot = totals_of(row);
      for (int mode = 0; mode < 3; ++mode) {
        auto run = [&](ThresholdSearch& st) {
          if (mode == 0) search_cpu(st, row);
          else if (mode == 1) search_cuda(st, row);
          else search_shards(st, row, rng);
          max_rounds = std::max(max_rounds, st.rounds);
          CHECK(st.rounds <= 13, "V=%d kind=%d mode=%d: %d rounds", V, kind, mode, st.rounds);
        };
        for (int k : top_ks) {
          if (!(static_cast<float>(k) < tot.count)) continue;
          auto st = ThresholdSearch::over_row(static_cast<float>(k), true, tot);
          run(st);
          const float want = reference_threshold(row, k, true);
          CHECK(st.threshold() == want, "top-k V=%d kind=%d mode=%d k=%d: %g != %g", V, kind, mode, k,
                st.threshold(), want);
          int kept = 0;
          for (float v : row) kept += v >= st.threshold() && v > 0.f;
          CHECK(kept == static_cast<int>(st.kept_count()), "kept count %d vs %g", kept, st.kept_count());
          CHECK(std::fabs(mass_at_least(row, st.threshold()) - st.kept_mass()) <= 1e-5 * st.kept_mass(),
                "kept mass");
          // top-p after top-k, over what top-k kept.
          const float target = static_cast<float>(0.7 * st.kept_mass());
          auto sp = ThresholdSearch::above(target, false, st, tot);
          run(sp);
          CHECK(sp.threshold() >= st.threshold(), "top-p after top-k went below top-k");
          ++cases;
        }
        for (double p : top_ps) {
          const float target = static_cast<float>(p * tot.mass);
          auto st = ThresholdSearch::over_row(target, false, tot);
          run(st);
          // float32 sums vs the double reference: the cut may move by the sums' rounding, a few
          // 1e-7 of the row's mass (which matters only for top_p within that of 1).
          const double tol = 1e-5 * tot.mass;
          const float lo = reference_threshold(row, p * tot.mass + tol, false);
          const float hi = reference_threshold(row, std::max(0.0, p * tot.mass - tol), false);
          CHECK(st.threshold() >= lo && st.threshold() <= hi, "top-p V=%d kind=%d mode=%d p=%g: %g not in [%g, %g]",
                V, kind, mode, p, st.threshold(), lo, hi);
          bool is_value = false;
          for (float v : row) is_value |= v == st.threshold();
          CHECK(is_value, "threshold is not a value of the row");
          CHECK(std::fabs(mass_at_least(row, st.threshold()) - st.kept_mass()) <= 1e-5 * st.kept_mass() + 1e-12,
                "kept mass %g vs %g", mass_at_least(row, st.threshold()), st.kept_mass());
          ++cases;
        }
      }
    }
  }
  std::printf("search: %d cases, at most %d rounds\n", cases, max_rounds);
}

}  // namespace

int main() {
  test_philox();
  test_search();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
