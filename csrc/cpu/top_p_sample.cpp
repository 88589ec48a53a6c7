// CPU kernel of kdext::top_p_sample: one token per row from the teacher-mixed,
// top-k / top-p filtered distribution, without sorting the vocabulary.
//
// Rows are split across threads (at::parallel_for); each row, with its
// float32 copy of r (one V-sized buffer per thread), is handled by one thread:
//   1. softmax states of s/T (and t/T) in one vectorized pass (cpu/row_reduce.h);
//   2. r_i = (1 - alpha) q_i + alpha p_i into the buffer, with the row totals
//      (mass, count, max, min > 0) in the same pass;
//   3. the threshold search of kdext/top_p.h (top-k by count, then top-p by
//      mass), each round one vectorized pass at 6 pivots (mass and count above
//      each). Before a round, the values in the bracket (lo, hi] are compacted
//      into a second buffer whenever they are clearly fewer than those scanned,
//      and the round scans only that list (with F(hi) carried as a base), so
//      only the first round reads the whole row;
//   4. the inverse-CDF draw in vocabulary order at u * kept_mass, u from
//      Philox(seed, the row's subsequence (row_ids[row] or its index), offset),
//      scanning blocks of 64 values and stepping into the block where the
//      running mass passes the target.
// Rows whose distribution does not exist (all -inf, NaN or +inf logits on a
// side in use) get token -1 and NaN in the four float outputs.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "checks.h"
#include "top_p_sample_args.h"
#include "cpu/row_reduce.h"
#include "kdext/philox.h"
#include "kdext/top_p.h"

namespace kdext {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kPivots = 6;
constexpr int64_t kDrawBlock = 64;  // values per step of the draw's scan
static_assert(kChunk % kDrawBlock == 0 && kDrawBlock % 8 == 0, "blocks must tile chunks and vectors");

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Options {
  double top_p;
  int64_t top_k;
  float inv_t;
  float alpha;
  uint64_t seed;
  uint64_t offset;
};

// Per-thread buffers. r and list hold V values padded with zeros to a whole
// number of vectors (zeros are never in a search window, which is > 0). They
// are kept per thread between calls (grown, never shrunk: 8 bytes per
// vocabulary entry and thread), so that a call does not map and fault in fresh
// pages for them.
struct ThreadBuffers {
  std::unique_ptr<float[]> r, list;
  int64_t capacity = 0;

  void reserve(int64_t padded) {
    if (padded <= capacity) return;
    r.reset(new float[padded]);
    list.reset(new float[padded + Vec::size()]);
    capacity = padded;
  }
};

struct Scratch {
  float* r;
  float* list;
  alignas(64) float s[kChunk];
  alignas(64) float t[kChunk];

  explicit Scratch(int64_t padded) {
    static thread_local ThreadBuffers buffers;
    buffers.reserve(padded);
    r = buffers.r.get();
    list = buffers.list.get();
  }
};

struct RowIn {
  const void* s;
  const void* t;  // nullptr without teacher logits
  c10::ScalarType s_dtype, t_dtype;
  int64_t V;
};

struct RowOut {
  int64_t token;
  float student_logprob, teacher_logprob, sample_logprob, threshold;
};

// Sums of many floats are taken in lanes over blocks of kSumBlock values and
// the block sums added in double, so that a row of 128K probabilities sums to
// within a few float32 ulps (one long float chain per lane would drift by
// ~1e-4 relative, enough to move a top-p cut or the end of the CDF).
constexpr int64_t kSumBlock = 512;

// Pass 2: r into buf (padded to a multiple of Vec::size()) and the row totals.
top_p::RowTotals write_mixture(const RowIn& in, const top_p::Mixture& mix, float inv_t, Scratch& sc) {
  static_assert(kChunk == kSumBlock, "one block sum per chunk");
  const Vec zero(0.f), one(1.f), inf(kInf), tiny(std::numeric_limits<float>::min()), vinv_t(inv_t);
  const Vec ws(mix.w_student), wt(mix.w_teacher), ls(mix.lse_student), lt(mix.lse_teacher);
  Vec count(0.f), mx(0.f), mn(kInf);
  double mass = 0.0;
  float* r = sc.r;
  for (int64_t b = 0; b < in.V; b += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, in.V - b);
    int64_t P = 0;
    const float* xs = mix.use_student ? chunk_view(in.s, in.s_dtype, b, n, sc.s, &P) : nullptr;
    const float* xt = mix.use_teacher ? chunk_view(in.t, in.t_dtype, b, n, sc.t, &P) : nullptr;
    Vec block(0.f);
    for (int64_t i = 0; i < P; i += Vec::size()) {
      // = top_p::mixture_prob: x = s * (1/T), one exp per side, r = fma(w_t, e_t, w_s e_s),
      // values below FLT_MIN flushed to 0.
      const Vec es = xs ? fast_exp(Vec::loadu(xs + i) * vinv_t - ls) : zero;
      const Vec et = xt ? fast_exp(Vec::loadu(xt + i) * vinv_t - lt) : zero;
      Vec x = at::vec::fmadd(wt, et, ws * es);
      x = x & (x >= tiny);
      x.store(r + b + i);
      const Vec pos = x > zero;
      block = block + x;
      count = count + (one & pos);
      mx = at::vec::maximum(mx, x);
      mn = at::vec::minimum(mn, Vec::blendv(inf, x, pos));
    }
    mass += reduce_sum(block);
  }
  return {static_cast<float>(mass), reduce_sum(count), reduce_max(mx),
          at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, mn)};
}

// One round: mass and count above each of K pivots over x[0, n) (n a multiple
// of Vec::size()). 2K accumulators stay in registers for K <= 7 (AVX2 has 16);
// the values' range comes from compaction instead (see run_search).
template <int K>
top_p::PivotSums<K> pivot_round(const float* x, int64_t n, const float (&v)[K]) {
  const Vec one(1.f);
  double mass_total[K] = {}, count_total[K] = {};
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t e = std::min<int64_t>(b + kSumBlock, n);
    Vec mass[K], count[K];
    for (int j = 0; j < K; ++j) mass[j] = count[j] = Vec(0.f);
    for (int64_t i = b; i < e; i += Vec::size()) {
      const Vec xv = Vec::loadu(x + i);
      for (int j = 0; j < K; ++j) {
        const Vec above = xv > Vec(v[j]);
        mass[j] = mass[j] + (xv & above);
        count[j] = count[j] + (one & above);
      }
    }
    for (int j = 0; j < K; ++j) {
      mass_total[j] += reduce_sum(mass[j]);
      count_total[j] += reduce_sum(count[j]);
    }
  }
  top_p::PivotSums<K> s;
  for (int j = 0; j < K; ++j) {
    s.mass[j] = static_cast<float>(mass_total[j]);
    s.count[j] = static_cast<float>(count_total[j]);
  }
  s.bound_by_pivots(v);
  return s;
}

#if defined(CPU_CAPABILITY_AVX2)
// For each 8-bit lane mask, the lane indices of its set bits, packed first.
struct CompressTable {
  alignas(32) int32_t idx[256][8];
  CompressTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if (m & (1 << b)) idx[m][k++] = b;
      for (; k < 8; ++k) idx[m][k] = 0;
    }
  }
};
const CompressTable kCompress;
#endif

// Copies the values of x[0, n) in (lo, hi] to out (which may be x; out needs
// Vec::size() slots of slack), in order, pads with zeros to a multiple of
// Vec::size() and returns the padded length; *wmin, *wmax get the smallest and
// largest value copied (+inf and 0 when none). Branch-free.
int64_t compact(const float* x, int64_t n, float lo, float hi, float* out, float* wmin, float* wmax) {
  const Vec vlo(lo), vhi(hi), inf(kInf), zero(0.f);
  Vec mn(kInf), mx(0.f);
  int64_t w = 0;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    const Vec in = (xv > vlo) & (xv <= vhi);
    mn = at::vec::minimum(mn, Vec::blendv(inf, xv, in));
    mx = at::vec::maximum(mx, Vec::blendv(zero, xv, in));
#if defined(CPU_CAPABILITY_AVX2)
    const int bits = _mm256_movemask_ps(in);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.idx[bits]));
    _mm256_storeu_ps(out + w, _mm256_permutevar8x32_ps(xv, perm));
    w += __builtin_popcount(static_cast<unsigned>(bits));
#else
    for (int64_t l = 0; l < Vec::size(); ++l) {
      const float y = x[i + l];
      out[w] = y;
      w += (y > lo) & (y <= hi);
    }
#endif
  }
  *wmin = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, mn);
  *wmax = reduce_max(mx);
  const int64_t padded = (w + Vec::size() - 1) / Vec::size() * Vec::size();
  for (int64_t i = w; i < padded; ++i) out[i] = 0.f;
  return padded;
}

// Runs a search to the end over the row's r (length `padded`). Before each
// round, the values in the window (lo, hi] are compacted into sc.list when
// they are clearly fewer than those scanned, so a round costs what its window
// holds: F(v) = F(hi at the compaction) + the list's sum above v. Compaction also
// gives the window's smallest and largest values, which end the search as
// soon as they coincide (a threshold shared by any number of ties).
void run_search(top_p::ThresholdSearch& st, const float* r, int64_t padded, Scratch& sc) {
  const float* x = r;
  int64_t n = padded;
  float base_mass = 0.f, base_count = 0.f;
  while (!st.done()) {
    if (st.window_count() < 0.75f * static_cast<float>(n)) {  // (a copy of most of the list would not pay)
      float wmin, wmax;
      n = compact(x, n, st.lo, st.hi, sc.list, &wmin, &wmax);
      x = sc.list;
      base_mass = st.hi_mass;
      base_count = st.hi_count;
      st.tighten(wmin, wmax);
      if (st.done()) break;
    }
    float v[kPivots];
    st.pivots(v);
    st.update(v, pivot_round<kPivots>(x, n, v), base_mass, base_count);
  }
}

// The first index whose running kept mass (in index order, summed in double)
// exceeds target; the last kept index if rounding leaves the total just short.
int64_t draw(const float* r, int64_t V, float threshold, double target) {
  const Vec thr(threshold);
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t b = 0; b < V; b += kDrawBlock) {
    const int64_t e = std::min<int64_t>(b + kDrawBlock, V);
    const int64_t ev = (e - b) / Vec::size() * Vec::size() + b;
    Vec acc(0.f);
    for (int64_t i = b; i < ev; i += Vec::size()) {
      const Vec xv = Vec::loadu(r + i);
      acc = acc + (xv & (xv >= thr));
    }
    double block = reduce_sum(acc);
    for (int64_t i = ev; i < e; ++i) block += r[i] >= threshold ? r[i] : 0.f;
    if (block == 0.0) continue;
    if (cum + block > target) {
      double c = cum;
      for (int64_t i = b; i < e; ++i) {
        if (r[i] >= threshold) {
          c += r[i];
          last = i;
          if (c > target) return i;
        }
      }
    } else {
      for (int64_t i = e - 1; i >= b; --i) {
        if (r[i] >= threshold) {
          last = i;
          break;
        }
      }
    }
    cum += block;
  }
  return last;
}

float logit_at(const void* row, c10::ScalarType dtype, int64_t i, float inv_t) {
  alignas(64) float x[Vec::size()];
  load_chunk(row, dtype, i, 1, inv_t, x);
  return x[0];
}

// `subsequence`: the row's Philox subsequence (its id; the row index by default).
RowOut sample_row(const RowIn& in, const Options& o, uint64_t subsequence, Scratch& sc) {
  RowOut out{-1, kNaN, kNaN, kNaN, kNaN};
  const float lse_s = log_sum_exp(row_softmax_state<float>(in.s, in.s_dtype, in.V, o.inv_t, sc.s));
  const float lse_t =
      in.t ? log_sum_exp(row_softmax_state<float>(in.t, in.t_dtype, in.V, o.inv_t, sc.t)) : kNaN;
  const auto mix = top_p::Mixture::make(o.alpha, lse_s, lse_t);
  if (!mix.valid()) return out;

  const int64_t padded = (in.V + Vec::size() - 1) / Vec::size() * Vec::size();
  const top_p::RowTotals tot = write_mixture(in, mix, o.inv_t, sc);
  if (!(tot.count > 0.f) || !(tot.mass > 0.f)) return out;
  const float* r = sc.r;

  // Top-k (by count), then top-p (by mass) over what top-k kept.
  float threshold = tot.min_pos, kept_mass = tot.mass;
  top_p::ThresholdSearch k_search{};
  bool k_active = o.top_k > 0 && static_cast<float>(o.top_k) < tot.count;
  if (k_active) {
    k_search = top_p::ThresholdSearch::over_row(static_cast<float>(o.top_k), true, tot);
    run_search(k_search, r, padded, sc);
    threshold = k_search.threshold();
    kept_mass = k_search.kept_mass();
  }
  if (o.top_p < 1.0) {
    const float target = static_cast<float>(o.top_p * static_cast<double>(kept_mass));
    auto p_search = k_active ? top_p::ThresholdSearch::above(target, false, k_search, tot)
                             : top_p::ThresholdSearch::over_row(target, false, tot);
    run_search(p_search, r, padded, sc);
    threshold = p_search.threshold();
    kept_mass = p_search.kept_mass();
  }

  const Philox4x32 bits = philox_block(o.seed, subsequence, o.offset);
  const float u = uniform_open01(bits.v[0]);
  const int64_t tok = draw(r, in.V, threshold, static_cast<double>(u) * kept_mass);
  if (tok < 0) return out;  // unreachable: the row's max is always kept
  out.token = tok;
  out.threshold = threshold;
  out.sample_logprob = std::log(r[tok]) - std::log(kept_mass);
  out.student_logprob = logit_at(in.s, in.s_dtype, tok, o.inv_t) - lse_s;
  if (in.t) out.teacher_logprob = logit_at(in.t, in.t_dtype, tok, o.inv_t) - lse_t;
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_p_sample(
    const at::Tensor& logits, const std::optional<at::Tensor>& teacher_logits, double top_p, int64_t top_k,
    double temperature, double alpha, int64_t seed, int64_t offset, const std::optional<at::Tensor>& row_ids) {
  const TopPSampleArgs a(logits, teacher_logits, top_p, top_k, temperature, alpha, row_ids);
  const int64_t* idp = a.row_ids.defined() ? a.row_ids.const_data_ptr<int64_t>() : nullptr;
  const at::Tensor s = as_rows(logits);
  const at::Tensor t = teacher_logits.has_value() ? as_rows(*teacher_logits) : at::Tensor();
  const int64_t rows = s.size(0), V = s.size(1);
  int64_t* tp = a.tokens.data_ptr<int64_t>();
  float *sp = a.student_logprob.data_ptr<float>(), *tq = a.teacher_logprob.data_ptr<float>();
  float *xp = a.sample_logprob.data_ptr<float>(), *hp = a.threshold.data_ptr<float>();

  const Options o{top_p, top_k, static_cast<float>(1.0 / temperature), static_cast<float>(alpha),
                  static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  const auto* sb = static_cast<const char*>(s.const_data_ptr());
  const auto* tb = t.defined() ? static_cast<const char*>(t.const_data_ptr()) : nullptr;
  const int64_t padded = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(padded);
    for (int64_t r = begin; r < end; ++r) {
      RowIn in{sb + r * s.stride(0) * s.element_size(), tb ? tb + r * t.stride(0) * t.element_size() : nullptr,
               s.scalar_type(), t.defined() ? t.scalar_type() : s.scalar_type(), V};
      const RowOut res = sample_row(in, o, static_cast<uint64_t>(idp ? idp[r] : r), sc);
      tp[r] = res.token;
      sp[r] = res.student_logprob;
      tq[r] = res.teacher_logprob;
      xp[r] = res.sample_logprob;
      hp[r] = res.threshold;
    }
  });
  return a.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CPU, m) { m.impl("top_p_sample", &top_p_sample); }

}  // namespace cpu
}  // namespace kdext
