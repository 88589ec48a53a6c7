// Sort-free top-k / top-p thresholds: the framework-free math shared by the CPU
// kernel, the CUDA kernel and the vocab-parallel sampler.
//
// The distribution of a row (docs/DESIGN.md, "Sampling contract") is
//     r_i = (1 - alpha) q_i + alpha p_i,  q = softmax(s / T),  p = softmax(t / T),
// computed in float32 by mixture_prob() below. Top-k keeps token i iff fewer
// than k tokens are strictly more probable than i; top-p (applied to what
// top-k kept) keeps token i iff the mass of the tokens strictly more probable
// than i is < top_p * (mass kept by top-k). Both are rules of one shape:
//
//     keep i  <=>  F(r_i) < target,    F(v) = sum over {j : r_j > v} of w_j,
//
// with w_j = 1 and target = k for top-k, w_j = r_j and target = top_p * M_k
// for top-p. F is non-increasing in v, so the kept set is {i : r_i >= a} where
// a, the threshold, is the smallest value of the row with F(a) < target. Ties
// are all kept (equal values share F) and the most probable token always is
// (F(max) = 0 < target). Tokens with r_i = 0 (masked by -inf logits, or
// below FLT_MIN, see mixture_prob) are never kept: the search only looks at
// values > 0.
//
// ThresholdSearch finds a without sorting, by rounds of K pivots. A round
// needs, for each pivot v_j, four reductions over the row (PivotSums):
//     mass  = sum_{r > v_j} r,   count = #{r > v_j},
//     min_above = min {r : r > v_j},   max_below = max {r : 0 < r <= v_j},
// which add up over any split of the row (lanes, threads, blocks, vocab shards:
// sum, sum, min, max), so a round over a sharded vocabulary is one local pass
// plus one all-reduce of 4K floats per row.
//
// Exactness. The search keeps pivots lo < hi with F(lo) >= target > F(hi), and
// the smallest and largest values of the row inside (lo, hi], lo_next and
// hi_data. The threshold a lies in [lo_next, hi_data] (it is a value of the
// row in (lo, hi]), so when lo_next == hi_data it is found exactly, whatever
// the number of ties. Each round puts its pivots inside [lo_next, hi_data],
// evenly spaced in the float's bit pattern (monotone in the value for floats
// >= 0, so this is a bisection in log scale), and the new bracket is between
// two neighbouring pivots, tightened to values of the row by min_above /
// max_below. The width of [lo_next, hi_data] in bit patterns, < 2^31 at the
// start, becomes <= ceil(width / (K + 1)) each round, so a search ends after
// at most ceil(31 / log2(K + 1)) + 1 rounds (11 for K = 8; one more when the
// first round uses the bound hints of pivots()); kMaxRounds is a guard that is
// never reached. The only approximation is that F is a float32 sum: a token
// whose F lies within the rounding of that sum (~1e-7 relative) of the target
// may fall on either side, as in any float32 implementation, sorted or not.
// Within one round F is monotone in the pivot (a fixed-order sum of
// non-negative terms), so the bracket update never contradicts itself.
//
// Summation: the backends keep F accurate to a few float32 ulps of the row's
// mass by summing short chains (CPU: 64 values per lane, block sums added in
// double; CUDA: per-thread chains, then a tree); one float chain over 128K
// values would drift by ~1e-4 and move the cut.
//
// The draw then inverts the CDF of the kept tokens, in vocabulary order, at
// u * kept_mass(), u from Philox (kdext/philox.h) at (seed, row, offset).
//
// Vocab-parallel use (each rank holds logits[..., lo:hi] of every row):
//   1. softmax states per shard, merged with online_softmax.h's merge() over
//      ranks (all-gather of (max, sum), O(rows));
//   2. r_i = mixture_prob(Mixture::make(alpha, lse_s, lse_t), x_i, y_i) on the
//      local shard; RowTotals per shard, all-reduced (sum, sum, max, min);
//   3. each search round: pivots() on every rank (identical state), local
//      PivotSums<K> over the shard with base 0 (or over the window only, with
//      base = F(hi), as the CUDA kernel does), all-reduce of the 4K floats
//      (SUM for mass and count, MIN for min_above, MAX for max_below; or one
//      MIN over (min_above, -max_below)), update(); bounded by the round count
//      above, so at most ~12 all-reduces of 32 floats per row and search;
//   4. the draw: each rank sums its kept mass (r >= threshold()); an exclusive
//      prefix over ranks (all-gather of one float per row) tells the rank whose
//      interval holds u * kept_mass(); it inverts its local CDF at the
//      remainder and the token is shared by an all-reduce MAX (others give -1).
//      u is philox_block(seed, global row, offset).v[0] on every rank.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "kdext/math.h"

namespace kdext {
namespace top_p {

constexpr int kMaxRounds = 64;

// The bit pattern of a float >= 0; the order of patterns is the order of values.
KDEXT_HD uint32_t ordered_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

KDEXT_HD float from_ordered_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// The largest float below x, for x > 0 (0 stays 0), and the smallest above x >= 0.
KDEXT_HD float next_below(float x) { return x > 0.f ? from_ordered_bits(ordered_bits(x) - 1u) : 0.f; }
KDEXT_HD float next_above(float x) { return from_ordered_bits(ordered_bits(x) + 1u); }

KDEXT_HD float fmin_(float a, float b) { return b < a ? b : a; }
KDEXT_HD float fmax_(float a, float b) { return b > a ? b : a; }

// The mixture of one row: r = w_s exp(x - lse_s) + w_t exp(y - lse_t), x = s/T,
// y = t/T. A side whose weight is 0 is skipped entirely (its logits may be
// anything, even absent), so alpha = 0 is exactly the student and alpha = 1
// exactly the teacher.
struct Mixture {
  float w_student, w_teacher;
  float lse_student, lse_teacher;
  bool use_student, use_teacher;

  static KDEXT_HD Mixture make(float alpha, float lse_s, float lse_t) {
    Mixture m;
    m.w_student = 1.f - alpha;
    m.w_teacher = alpha;
    m.lse_student = lse_s;
    m.lse_teacher = lse_t;
    m.use_student = alpha < 1.f;
    m.use_teacher = alpha > 0.f;
    return m;
  }
  // The row has a distribution: every side in use has a finite normaliser.
  KDEXT_HD bool valid() const {
    const float inf = std::numeric_limits<float>::infinity();
    const bool s_ok = !use_student || (lse_student > -inf && lse_student < inf);
    const bool t_ok = !use_teacher || (lse_teacher > -inf && lse_teacher < inf);
    return s_ok && t_ok;
  }
};

// r for one token (scalar lanes; the CPU kernel evaluates the same expression
// eight lanes at a time). The rounding is pinned (one product, one fused
// multiply-add, no contraction left to the compiler) so that the CUDA kernel,
// which recomputes r on every pass, sees the very same value each time.
// Probabilities below FLT_MIN (~1.2e-38) are flushed to 0 (such a token is
// never drawn), so that backends whose exp flushes subnormals (the CPU's
// vectorized exp) and those that keep them (CUDA's expf) keep the same tokens.
KDEXT_HD float mixture_prob(const Mixture& m, float x, float y) {
  const float es = m.use_student ? MathOps<float>::exp(x - m.lse_student) : 0.f;
  const float et = m.use_teacher ? MathOps<float>::exp(y - m.lse_teacher) : 0.f;
#if defined(__CUDA_ARCH__)
  const float r = __fmaf_rn(m.w_teacher, et, __fmul_rn(m.w_student, es));
#else
  const float r = ::fmaf(m.w_teacher, et, m.w_student * es);
#endif
  return r >= std::numeric_limits<float>::min() ? r : 0.f;
}

// Reductions of a row's r over everything > 0: the start of every search.
struct RowTotals {
  float mass;     // sum r
  float count;    // #{r > 0} (exact below 2^24)
  float max;      // max r
  float min_pos;  // min {r > 0}

  static KDEXT_HD RowTotals empty() { return {0.f, 0.f, 0.f, std::numeric_limits<float>::infinity()}; }
  KDEXT_HD void add(float r) {
    if (r > 0.f) {
      mass += r;
      count += 1.f;
      max = fmax_(max, r);
      min_pos = fmin_(min_pos, r);
    }
  }
  KDEXT_HD void merge(const RowTotals& o) {
    mass += o.mass;
    count += o.count;
    max = fmax_(max, o.max);
    min_pos = fmin_(min_pos, o.min_pos);
  }
};

// The four reductions of a round at K pivots (see the top of the file).
template <int K>
struct PivotSums {
  float mass[K];
  float count[K];
  float min_above[K];  // +inf when nothing is above
  float max_below[K];  // 0 when nothing positive is at or below

  KDEXT_HD void reset() {
    for (int j = 0; j < K; ++j) {
      mass[j] = 0.f;
      count[j] = 0.f;
      min_above[j] = std::numeric_limits<float>::infinity();
      max_below[j] = 0.f;
    }
  }
  KDEXT_HD void add(float r, const float (&v)[K]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < K; ++j) {
      const bool above = r > v[j];
      mass[j] += above ? r : 0.f;
      count[j] += above ? 1.f : 0.f;
      min_above[j] = above ? fmin_(min_above[j], r) : min_above[j];
      max_below[j] = above ? max_below[j] : fmax_(max_below[j], r);
    }
  }
  // For a backend that reduces only mass and count (the CPU kernel, which
  // learns the values' range when it compacts the window instead): the weakest
  // true statements, min_above >= the next float after v_j and max_below <= v_j.
  // The search still ends, once its range is one float wide (a value of the
  // row, since the window is never empty) if not earlier by tighten().
  KDEXT_HD void bound_by_pivots(const float (&v)[K]) {
    for (int j = 0; j < K; ++j) {
      min_above[j] = next_above(v[j]);
      max_below[j] = v[j];
    }
  }
  // The all-reduce: sum, sum, min, max.
  KDEXT_HD void merge(const PivotSums& o) {
    for (int j = 0; j < K; ++j) {
      mass[j] += o.mass[j];
      count[j] += o.count[j];
      min_above[j] = fmin_(min_above[j], o.min_above[j]);
      max_below[j] = fmax_(max_below[j], o.max_below[j]);
    }
  }
};

// The search for the threshold of one rule (top-k: by count; top-p: by mass).
//
// A backend (or the vocab-parallel sampler) runs:
//     auto st = ThresholdSearch::over_row(target, by_count, totals);   // or above()
//     while (!st.done()) {
//       float v[K]; st.pivots(v);
//       PivotSums<K> s = <reduce over the row (all-reduce over shards)>;
//       st.update(v, s, 0.f, 0.f);
//     }
//     threshold = st.threshold(); kept mass = st.kept_mass();
// Every rank holding the same reduced sums takes the same steps. A backend may
// instead reduce over a compacted list of the values in (lo, hi] only, passing
// F(hi) (hi_mass, hi_count at the time of compaction) as `base`; tighten()
// takes the list's min and max.
struct ThresholdSearch {
  float target;
  bool by_count;
  float lo, hi;              // pivots with F(lo) >= target > F(hi)
  float lo_mass, lo_count;   // F(lo), by mass and by count
  float hi_mass, hi_count;   // F(hi)
  float lo_next, hi_data;    // the smallest / largest value of the row in (lo, hi]
  int rounds;

  // Over the whole row: lo = 0 (F(0) = the totals), hi = the row's max (F = 0).
  // Needs totals.count > 0 and target <= F(0) (top_p <= 1; k <= count).
  static KDEXT_HD ThresholdSearch over_row(float target, bool by_count, const RowTotals& t) {
    ThresholdSearch s;
    s.target = target;
    s.by_count = by_count;
    s.lo = 0.f;
    s.lo_mass = t.mass;
    s.lo_count = t.count;
    s.hi = t.max;
    s.hi_mass = 0.f;
    s.hi_count = 0.f;
    s.lo_next = t.min_pos;
    s.hi_data = t.max;
    s.rounds = 0;
    return s;
  }

  // Over the values >= a finished search's threshold (top-p after top-k):
  // the bracket starts at (just below that threshold, the row's max].
  static KDEXT_HD ThresholdSearch above(float target, bool by_count, const ThresholdSearch& first,
                                        const RowTotals& t) {
    ThresholdSearch s = over_row(target, by_count, t);
    s.lo = next_below(first.threshold());
    s.lo_mass = first.kept_mass();
    s.lo_count = first.kept_count();
    s.lo_next = first.threshold();
    return s;
  }

  KDEXT_HD bool done() const { return !(lo_next < hi_data); }
  // Valid once done(): tokens with r >= threshold() are kept; their mass and number.
  KDEXT_HD float threshold() const { return lo_next; }
  KDEXT_HD float kept_mass() const { return lo_mass; }
  KDEXT_HD float kept_count() const { return lo_count; }
  // How many values of the row lie in (lo, hi] (exact: counts are integers < 2^24).
  KDEXT_HD float window_count() const { return lo_count - hi_count; }

  KDEXT_HD bool below_target(float mass, float count) const { return (by_count ? count : mass) < target; }

  // K pivots in [lo_next, hi_data), evenly spaced in bit pattern strictly
  // inside the range (the first one at lo_next when the range is small). The
  // first round of a search narrows the range by bounds that hold for any row:
  // for top-p, F(x) >= F(lo) - n x over the n values in the window, so
  // a > (F(lo) - target) / n; for top-k, k values >= a weigh at most F(lo) by
  // mass, so a <= F_mass(lo) / k. A bound spoilt by rounding only costs a round.
  template <int K>
  KDEXT_HD void pivots(float (&v)[K]) const {
    float a = lo_next, b = hi_data;
    if (rounds == 0) {
      const float n = window_count();
      if (!by_count && n > 0.f) {
        const float h = 0.5f * (lo_mass - target) / n;
        if (h > a && h < b) a = h;
      }
      if (by_count && target > 0.f) {
        const float h = 1.0001f * lo_mass / target;
        if (h > a && h < b) b = h;
      }
    }
    const uint32_t blo = ordered_bits(a);
    const uint64_t range = ordered_bits(b) - blo;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < K; ++j) v[j] = from_ordered_bits(blo + static_cast<uint32_t>(range * (j + 1) / (K + 1)));
  }

  // Takes a round's sums at the pivots v (ascending). F(v_j) = base + sums_j.
  // (Written without indexing the arrays by a run-time value, so that CUDA
  // keeps them in registers.)
  template <int K>
  KDEXT_HD void update(const float (&v)[K], const PivotSums<K>& s, float base_mass, float base_count) {
    ++rounds;
    // j = the first pivot with F(v_j) < target (F is non-increasing in v, so
    // those pivots are a suffix), K if none; and the values at j and j - 1.
    int j = K;
    float hv = 0.f, hm = 0.f, hc = 0.f, hb = 0.f, lv = 0.f, lm = 0.f, lc = 0.f, la = 0.f;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = K - 1; i >= 0; --i) {
      const float m = base_mass + s.mass[i], c = base_count + s.count[i];
      if (below_target(m, c)) {
        j = i;
        hv = v[i];
        hm = m;
        hc = c;
        hb = s.max_below[i];
      } else if (j == i + 1) {
        lv = v[i];
        lm = m;
        lc = c;
        la = s.min_above[i];
      }
    }
    if (j < K) {  // F(v_j) < target: the threshold is <= v_j
      hi = hv;
      hi_mass = hm;
      hi_count = hc;
      hi_data = fmin_(hi_data, fmax_(hb, lo_next));
    }
    if (j > 0) {  // F(v_{j-1}) >= target: the threshold is > v_{j-1}
      lo = lv;
      lo_mass = lm;
      lo_count = lc;
      lo_next = fmax_(lo_next, fmin_(la, hi_data));
    }
    if (rounds >= kMaxRounds) force_finish();
  }

  // The smallest and largest of the values in (lo, hi], seen by a pass that
  // visited all of them (a compaction).
  KDEXT_HD void tighten(float window_min, float window_max) {
    if (!(window_min <= window_max)) return;  // nothing seen
    lo_next = fmax_(lo_next, window_min);
    hi_data = fmin_(hi_data, window_max);
    if (lo_next > hi_data) lo_next = hi_data;
  }

  // Never needed (see the bound above); keeps the superset {r >= lo_next},
  // whose mass is F(lo).
  KDEXT_HD void force_finish() { hi_data = lo_next; }
};

}  // namespace top_p
}  // namespace kdext
