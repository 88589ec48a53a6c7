// CPU kernels of the sparse family (stem: sparse; contract: docs/DESIGN.md,
// "the sparse family"):
//
//   topk_logprobs   per row the k most probable ids and their log-probs, and
//                   the lse, in ONE streamed pass: each chunk feeds the online
//                   softmax state and, when its max beats the current k-th
//                   best, a bounded candidate buffer (TopKSelector). No sort
//                   of the vocabulary: the buffer is cut back to the best k by
//                   nth_element when full, and the survivors are sorted once.
//   sparse_forward  the per-row divergence over the k(+1) outcomes of
//                   kdext/sparse.h and the statistics its backward needs;
//   sparse_backward the student's gradient from those statistics;
//   sparse_loss     the fused loss: sum_r w_r value_r and its gradient, in the
//                   same row visit.
//
// A loss row is one pass over the student's logits for the state of the
// complement of the stored ids (the chunks holding ids are copied and the ids
// masked to -inf, so the tail is summed directly), k gathers, the O(k) float64
// math, and one more pass that writes the gradient (the row is still in L2).
// In renormalize mode only the ids are read. Ids outside [-1, V) raise
// IndexError and repeated ids ValueError, naming the row and slot; the check
// runs in the row visit and is raised after it, for the first bad row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/buffer_pool.h"
#include "cpu/row_reduce.h"
#include "kdext/sparse.h"
#include "sparse_args.h"

namespace kdext {
namespace cpu {
namespace {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Entry i of a row, as acc_t, unscaled (the conversion of load_chunk).
template <typename acc_t>
acc_t load_value(const void* row, c10::ScalarType dtype, int64_t i) {
  switch (dtype) {
    case c10::ScalarType::Float: return static_cast<acc_t>(static_cast<const float*>(row)[i]);
    case c10::ScalarType::Double: return static_cast<acc_t>(static_cast<const double*>(row)[i]);
    case c10::ScalarType::BFloat16: return static_cast<acc_t>(static_cast<const c10::BFloat16*>(row)[i]);
    case c10::ScalarType::Half: return static_cast<acc_t>(static_cast<const c10::Half*>(row)[i]);
    default: return acc_t(0);  // unreachable: dtypes are checked by the adapters
  }
}

template <typename acc_t>
void fill_row(void* row, c10::ScalarType dtype, int64_t V, acc_t value, acc_t* buf) {
  std::fill(buf, buf + kChunk, value);
  for (int64_t b = 0; b < V; b += kChunk) store_chunk(buf, std::min<int64_t>(kChunk, V - b), dtype, row, b);
}

// ============================================================================
// topk_logprobs
// ============================================================================

// A candidate of the selection: its raw logit and id. Float candidates are
// packed into one 64-bit key that orders like topk_logprobs (the value's
// order-preserving bits, then the complement of the id), so that the cuts
// compare integers; float64 candidates keep both fields.
// The selection scans a chunk by blocks of kBlockVecs vectors.
constexpr int64_t kBlockVecs = 4;

template <typename acc_t>
struct Candidates;

template <>
struct Candidates<float> {
  using Item = uint64_t;
  static Item make(float v, int64_t id) {
    uint32_t b;
    v = v == 0.f ? 0.f : v;  // -0 ties with +0, as the values compare
    std::memcpy(&b, &v, sizeof(b));
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (uint64_t(b) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(id));
  }
  static float value(Item c) {
    uint32_t b = uint32_t(c >> 32);
    b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
    float v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  }
  static int32_t id(Item c) { return static_cast<int32_t>(0xFFFFFFFFu - uint32_t(c)); }
  static bool before(Item a, Item b) { return a > b; }
};

template <>
struct Candidates<double> {
  struct Item {
    double v;
    int32_t i;
  };
  static Item make(double v, int64_t id) { return {v, static_cast<int32_t>(id)}; }
  static double value(const Item& c) { return c.v; }
  static int32_t id(const Item& c) { return c.i; }
  static bool before(const Item& a, const Item& b) { return sparse::ranks_before(a.v, a.i, b.v, b.i); }
};

// The k best entries of a row offered in increasing id order. Entries above
// the threshold (the k-th best kept so far, -inf at first) join a buffer of
// k + max(k, 128) candidates; a full buffer is cut back to its best k by
// nth_element, which raises the threshold. An entry equal to the threshold
// loses to every kept one (it has a larger id), so the filter is strict and
// ties go to the lower id. NaN and -inf never pass it. Amortised O(1) per
// entry whatever the order of the row.
template <typename acc_t>
class TopKSelector {
  using C = Candidates<acc_t>;

 public:
  void reset(int64_t k) {
    k_ = k;
    cap_ = k + std::max<int64_t>(k, 128);
    if (static_cast<int64_t>(buf_.size()) < cap_) buf_.resize(cap_);
    n_ = 0;
    threshold_ = -std::numeric_limits<acc_t>::infinity();
  }
  acc_t threshold() const { return threshold_; }

  // Entries x[0, padded) with ids base + i (padding lanes are -inf), in
  // blocks of kBlockVecs vectors whose lane-wise maxima are block_max: a
  // block whose every lane max is <= the threshold is skipped whole. A NaN
  // lane max (the maxima propagate NaN) does not skip its block: the lane's
  // other entries may beat the threshold.
  void offer(const acc_t* x, int64_t padded, int64_t base, const Vec<acc_t>* block_max) {
    constexpr int L = Vec<acc_t>::size();
    constexpr uint32_t all = (1u << L) - 1u;
    for (int64_t b = 0, i0 = 0; i0 < padded; ++b, i0 += kBlockVecs * L) {
      if ((block_max[b] <= Vec<acc_t>(threshold_)).zero_mask() == 0) continue;
      const int64_t end = std::min<int64_t>(padded, i0 + kBlockVecs * L);
      for (int64_t i = i0; i < end; i += L) {
        // Lanes that pass are all-ones bits (non-zero); zero_mask flags the others.
        uint32_t pass = ~static_cast<uint32_t>((Vec<acc_t>::loadu(x + i) > Vec<acc_t>(threshold_)).zero_mask()) & all;
        while (pass != 0u) {
          const int l = __builtin_ctz(pass);
          pass &= pass - 1u;
          buf_[n_++] = C::make(x[i + l], base + i + l);
          if (n_ == cap_) cut();
        }
      }
    }
  }

  // The best min(k, offered) entries, in order: their number; value(j), id(j).
  int64_t finish() {
    if (n_ > k_) cut();
    std::sort(buf_.begin(), buf_.begin() + n_, C::before);
    return n_;
  }
  acc_t value(int64_t j) const { return C::value(buf_[j]); }
  int32_t id(int64_t j) const { return C::id(buf_[j]); }

 private:
  void cut() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.begin() + n_, C::before);
    n_ = k_;
    threshold_ = C::value(buf_[k_ - 1]);  // the k-th best; everything kept is >= it
  }

  int64_t k_ = 0, cap_ = 0, n_ = 0;
  acc_t threshold_ = 0;
  std::vector<typename C::Item> buf_;
};

// The lane-wise maxima of x[0, padded) by blocks of kBlockVecs vectors (the
// selection skips blocks by them), and the chunk's max. Max is exact in any
// order, NaN included (at::vec::maximum propagates it), so the result is
// chunk_max's (cpu/row_reduce.h), whose single chain of maxima is slower.
template <typename acc_t>
acc_t block_maxima(const acc_t* x, int64_t padded, Vec<acc_t>* block_max) {
  constexpr int64_t L = Vec<acc_t>::size();
  Vec<acc_t> all(-std::numeric_limits<acc_t>::infinity());
  for (int64_t b = 0, i0 = 0; i0 < padded; ++b, i0 += kBlockVecs * L) {
    Vec<acc_t> m = Vec<acc_t>::loadu(x + i0);
    for (int64_t i = i0 + L; i < std::min<int64_t>(padded, i0 + kBlockVecs * L); i += L)
      m = at::vec::maximum(m, Vec<acc_t>::loadu(x + i));
    block_max[b] = m;
    all = at::vec::maximum(all, m);
  }
  return reduce_max(all);
}

// LaneSoftmax::add (cpu/row_reduce.h) given the chunk's max: the same
// operations in the same order, so the state, and the lse and log-probs made
// from it, are bitwise those of kdext.logsumexp / kdext.log_softmax (which
// tests/test_sparse.py checks). Keep the two in step.
template <typename acc_t>
void add_chunk(LaneSoftmax<acc_t>& st, const acc_t* x, int64_t padded, acc_t inv_t, acc_t cmax) {
  acc_t factor;
  if (!st.raise_max(cmax * inv_t, &factor)) return;
  const Vec<acc_t> vm(st.max), vinv(inv_t);
  Vec<acc_t> part(acc_t(0));
  for (int64_t i = 0; i < padded; i += Vec<acc_t>::size()) part = part + fast_exp(Vec<acc_t>::loadu(x + i) * vinv - vm);
  st.sum = st.sum + part;
}

// One row: the online softmax state of x/T and the selection, in one pass.
// Log-probs are (x/T - max) - log Z, as log_softmax writes them.
template <typename acc_t>
void topk_row(const void* row, c10::ScalarType dtype, int64_t V, acc_t inv_t, int64_t k, TopKSelector<acc_t>& sel,
              acc_t* buf, int32_t* ids, acc_t* logprobs, acc_t* lse) {
  LaneSoftmax<acc_t> st;
  Vec<acc_t> block_max[kChunk / Vec<acc_t>::size() / kBlockVecs];
  sel.reset(k);
  for (int64_t b = 0; b < V; b += kChunk) {
    int64_t padded;
    const acc_t* x = chunk_view(row, dtype, b, std::min<int64_t>(kChunk, V - b), buf, &padded);
    const acc_t cmax = block_maxima(x, padded, block_max);
    add_chunk(st, x, padded, inv_t, cmax);
    // (A NaN max must not hide the chunk's other entries.)
    if (!(cmax <= sel.threshold())) sel.offer(x, padded, b, block_max);
  }
  const SoftmaxState<acc_t> s = st.finish();
  *lse = log_sum_exp(s);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const bool poisoned = !(s.max < inf);  // a NaN or +inf logit: every log-prob is NaN
  const acc_t logz = s.max == -inf ? s.max : MathOps<acc_t>::log(s.sum);
  const int64_t n = sel.finish();
  for (int64_t j = 0; j < k; ++j) {
    const bool found = j < n;
    ids[j] = found ? sel.id(j) : -1;
    logprobs[j] = poisoned ? std::numeric_limits<acc_t>::quiet_NaN()
                           : (found ? (sel.value(j) * inv_t - s.max) - logz : -inf);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logprobs(const at::Tensor& logits, int64_t k,
                                                             double temperature) {
  TopkLogprobsArgs a(logits, k, temperature);
  const RowsInput& in = a.in;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(logits), "kdext::topk_logprobs", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    int32_t* ip = a.ids.data_ptr<int32_t>();
    acc_t *lp = a.logprobs.data_ptr<acc_t>(), *lsep = a.lse.data_ptr<acc_t>();
    at::parallel_for(0, in.rows, row_grain(in.V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      TopKSelector<acc_t> sel;
      for (int64_t r = begin; r < end; ++r)
        topk_row(row_ptr(in.x, r), in.x.scalar_type(), in.V, inv_t, k, sel, buf, ip + r * k, lp + r * k, lsep + r);
    });
  });
  return {a.ids, a.logprobs, a.lse};
}

// ============================================================================
// The sparse loss
// ============================================================================

// A valid slot: its id in the vocabulary and its index among the row's k slots.
struct Slot {
  int64_t id;
  int64_t j;
};

struct IdError {
  enum Kind : int8_t { kNone = 0, kOutOfRange, kDuplicate } kind = kNone;
  int64_t slot = 0, other = 0, id = 0;
};

// The row's valid slots sorted by id (ties by slot), and whether its ids are valid.
IdError collect_slots(const int64_t* ids, int64_t k, int64_t V, std::vector<Slot>& out) {
  out.clear();
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] == -1) continue;
    if (ids[j] < -1 || ids[j] >= V) return {IdError::kOutOfRange, j, 0, ids[j]};
    out.push_back({ids[j], j});
  }
  std::sort(out.begin(), out.end(), [](const Slot& a, const Slot& b) { return a.id < b.id || (a.id == b.id && a.j < b.j); });
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i].id == out[i - 1].id) return {IdError::kDuplicate, out[i - 1].j, out[i].j, out[i].id};
  return {};
}

// The first bad row, in row order, as the op's exception.
void raise_id_errors(const std::vector<IdError>& errors, int64_t V) {
  for (size_t r = 0; r < errors.size(); ++r) {
    const IdError& e = errors[r];
    TORCH_CHECK_INDEX(e.kind != IdError::kOutOfRange, "teacher_ids has id ", e.id, " at row ", r, ", slot ", e.slot,
                      ", outside the vocabulary [0, ", V, ") (-1 marks an empty slot)");
    TORCH_CHECK_VALUE(e.kind != IdError::kDuplicate, "teacher_ids has id ", e.id, " twice in row ", r, " (slots ",
                      e.slot, " and ", e.other, "); the ids of a row must be distinct");
  }
}

// One row of the inputs.
template <typename acc_t>
struct SparseRow {
  const void* s;
  c10::ScalarType dtype;
  int64_t V;
  acc_t inv_t;
  const int64_t* ids;
  const double* logprobs;
  int64_t k;
};

// Per-thread scratch, reused across rows.
template <typename acc_t>
struct Work {
  std::vector<Slot> slots;
  std::vector<acc_t> x;  // the scaled student logit of each slot (slots' order)
  alignas(64) acc_t in[kChunk];
  alignas(64) acc_t out[kChunk];
};

// Softmax state of x/T over the ids NOT stored: chunks without ids are added
// as they are; in a chunk with ids, a copy with the ids at -inf.
template <typename acc_t>
SoftmaxState<acc_t> complement_state(const SparseRow<acc_t>& row, Work<acc_t>& w) {
  LaneSoftmax<acc_t> st;
  size_t p = 0;
  for (int64_t b = 0; b < row.V; b += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, row.V - b);
    size_t q = p;
    while (q < w.slots.size() && w.slots[q].id < b + n) ++q;
    int64_t padded;
    if (q == p) {
      const acc_t* x = chunk_view(row.s, row.dtype, b, n, w.in, &padded);
      st.add(x, padded, row.inv_t);
      continue;
    }
    padded = load_chunk(row.s, row.dtype, b, n, acc_t(1), w.in);
    for (; p < q; ++p) w.in[w.slots[p].id - b] = -std::numeric_limits<acc_t>::infinity();
    st.add(w.in, padded, row.inv_t);
  }
  return st.finish();
}

// The student's statistics of a row (forward): gathers the slots' logits and,
// in bucket mode, the complement's state.
template <typename acc_t>
sparse::RowStats<acc_t> student_stats(const SparseRow<acc_t>& row, sparse::Tail tail, Work<acc_t>& w) {
  double ids_max = sparse::neg_inf(), ids_sum = 0.0;
  for (acc_t x : w.x) ids_max = sparse::nan_max(ids_max, double(x));
  if (ids_max > sparse::neg_inf())
    for (acc_t x : w.x) ids_sum += std::exp(double(x) - ids_max);
  SoftmaxState<acc_t> comp = SoftmaxState<acc_t>::empty();
  if (tail == sparse::Tail::Bucket) comp = complement_state(row, w);
  return sparse::merge_student<acc_t>(comp.max, comp.sum, ids_max, ids_sum);
}

// A row's class, value and c (the forward's result, or the backward's
// recomputation from saved statistics).
template <typename acc_t>
struct RowEval {
  RowKind kind;
  bool padding;  // no valid id
  sparse::RowStats<acc_t> stats;
  sparse::TeacherNorm teacher;
  double value, c;
};

template <typename acc_t, Divergence D>
struct RowMath {
  const SparseRow<acc_t>& row;
  sparse::Tail tail;
  const DivergenceParam<double>& prm;
  Work<acc_t>& w;

  double slot_lp(const Slot& s, const RowEval<acc_t>& e) const { return row.logprobs[s.j] - e.teacher.log_norm; }

  // Value and c given the statistics.
  RowEval<acc_t> evaluate(const sparse::RowStats<acc_t>& st) const {
    RowEval<acc_t> e{sparse::student_kind(st.max), w.slots.empty(), st, {}, 0.0, 0.0};
    if (e.padding || e.kind != RowKind::Normal) return e;
    double S = 0.0;
    for (const Slot& s : w.slots) S += std::exp(row.logprobs[s.j]);
    e.teacher = sparse::teacher_norm(S, tail, static_cast<int64_t>(w.slots.size()) < row.V);
    if (!e.teacher.valid) {
      e.kind = RowKind::Empty;
      return e;
    }
    for (size_t i = 0; i < w.slots.size(); ++i) {
      const auto t = sparse::outcome_sums<D>(sparse::slot_log_q(w.x[i], st), slot_lp(w.slots[i], e), prm);
      e.value += t.value;
      e.c += t.c;
    }
    if (e.teacher.has_tail) {
      const auto t = sparse::outcome_sums<D>(double(st.log_tail), e.teacher.log_tail, prm);
      e.value += t.value;
      e.c += t.c;
    }
    return e;
  }

  double value(const RowEval<acc_t>& e) const {
    return sparse::row_value(e.kind, e.padding, e.value);
  }

  // Writes scale * dD/ds * T (scale carries 1/T and the upstream gradient).
  void write_grad(const RowEval<acc_t>& e, acc_t scale, void* grad, c10::ScalarType gdtype) {
    acc_t fill;  // (a zero upstream gradient gives zeros even for a Poisoned row: an ignored row)
    if (sparse::row_gradient_fill(e.kind, e.padding, scale, &fill)) {
      fill_row(grad, gdtype, row.V, fill, w.out);
      return;
    }
    const bool bucket = tail == sparse::Tail::Bucket;
    const acc_t tail_f = e.teacher.has_tail
                             ? acc_t(sparse::outcome_factor<D>(double(e.stats.log_tail), e.teacher.log_tail, prm, e.c) *
                                     double(scale))
                             : acc_t(0);
    const Vec<acc_t> vmax(e.stats.max), vlogz(e.stats.logz), vf(tail_f), inv(row.inv_t), zero(acc_t(0));
    size_t p = 0;
    for (int64_t b = 0; b < row.V; b += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, row.V - b);
      acc_t* o = chunk_out(grad, gdtype, b, n, w.out);
      if (bucket && tail_f != acc_t(0)) {  // q_m (g_tail - c) for every token, the ids overwritten below
        int64_t padded;
        const acc_t* x = chunk_view(row.s, row.dtype, b, n, w.in, &padded);
        for (int64_t i = 0; i < padded; i += Vec<acc_t>::size()) {
          const auto q = fast_exp((Vec<acc_t>::loadu(x + i) * inv - vmax) - vlogz);
          Vec<acc_t>::blendv(zero, q * vf, q > zero).store(o + i);
        }
      } else {
        std::fill(o, o + n, acc_t(0));
      }
      for (; p < w.slots.size() && w.slots[p].id < b + n; ++p) {
        const Slot& s = w.slots[p];
        o[s.id - b] = acc_t(sparse::slot_grad<D>(sparse::slot_log_q(w.x[p], e.stats), slot_lp(s, e), prm, e.c) *
                            double(scale));
      }
      finish_chunk(o, w.out, n, gdtype, grad, b);
    }
  }
};

// Reads the row's ids (errors into *err); gathers the slots' scaled logits.
template <typename acc_t>
bool prepare_row(const SparseRow<acc_t>& row, Work<acc_t>& w, IdError* err) {
  *err = collect_slots(row.ids, row.k, row.V, w.slots);
  if (err->kind != IdError::kNone) return false;
  w.x.resize(w.slots.size());
  for (size_t i = 0; i < w.slots.size(); ++i) w.x[i] = load_value<acc_t>(row.s, row.dtype, w.slots[i].id) * row.inv_t;
  return true;
}

template <typename acc_t>
SparseRow<acc_t> sparse_row(const SparseInput& in, int64_t r, double temperature) {
  return {row_ptr(in.student.x, r), in.student.x.scalar_type(), in.student.V, acc_t(1.0 / temperature),
          in.ids.const_data_ptr<int64_t>() + r * in.k, in.logprobs.const_data_ptr<double>() + r * in.k, in.k};
}

// Runs f(row, math, err) for every row, in parallel, with per-thread scratch;
// then raises the first id error.
template <typename acc_t, Divergence D, typename F>
void for_each_row(const SparseInput& in, double param, double temperature, F&& f) {
  std::vector<IdError> errors(in.student.rows);
  const auto prm = DivergenceParam<double>::make(param);
  at::parallel_for(0, in.student.rows, row_grain(in.student.V), [&](int64_t begin, int64_t end) {
    Work<acc_t> w;
    for (int64_t r = begin; r < end; ++r) {
      const SparseRow<acc_t> row = sparse_row<acc_t>(in, r, temperature);
      RowMath<acc_t, D> math{row, in.tail, prm, w};
      if (!prepare_row(row, w, &errors[r])) continue;
      f(r, row, math);
    }
  });
  raise_id_errors(errors, in.student.V);
}

template <typename F>
void dispatch(const SparseInput& in, F&& f) {
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(in.student.x), "kdext::sparse", [&] {
    using acc_t = scalar_t;
    dispatch_divergence(in.kind, [&](auto tag) { f(acc_t(0), tag); });
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_forward(const at::Tensor& student, const at::Tensor& teacher_ids,
                                                  const at::Tensor& teacher_logprobs, c10::string_view name,
                                                  double param, double temperature, c10::string_view tail) {
  SparseForwardArgs a(student, teacher_ids, teacher_logprobs, name, param, temperature, tail);
  dispatch(a.in, [&](auto acc_zero, auto tag) {
    using acc_t = decltype(acc_zero);
    constexpr Divergence D = decltype(tag)::value;
    acc_t* vp = a.values.data_ptr<acc_t>();
    acc_t* sp = a.stats.data_ptr<acc_t>();
    for_each_row<acc_t, D>(a.in, param, temperature, [&](int64_t r, const SparseRow<acc_t>& row, RowMath<acc_t, D>& m) {
      const auto e = m.evaluate(student_stats(row, a.in.tail, m.w));
      vp[r] = acc_t(m.value(e));
      acc_t* st = sp + r * sparse::kStatsColumns;
      st[0] = e.stats.max;
      st[1] = e.stats.logz;
      st[2] = e.stats.log_tail;
    });
  });
  return {a.values, a.stats};
}

at::Tensor sparse_backward(const at::Tensor& grad_values, const at::Tensor& student, const at::Tensor& teacher_ids,
                           const at::Tensor& teacher_logprobs, const at::Tensor& stats, c10::string_view name,
                           double param, double temperature, c10::string_view tail) {
  SparseBackwardArgs a(grad_values, student, teacher_ids, teacher_logprobs, stats, name, param, temperature, tail,
                       &empty_output);
  dispatch(a.in, [&](auto acc_zero, auto tag) {
    using acc_t = decltype(acc_zero);
    constexpr Divergence D = decltype(tag)::value;
    const acc_t* gp = a.grad_values.const_data_ptr<acc_t>();
    const acc_t* sp = a.stats.const_data_ptr<acc_t>();
    for_each_row<acc_t, D>(a.in, param, temperature, [&](int64_t r, const SparseRow<acc_t>&, RowMath<acc_t, D>& m) {
      const acc_t* x = sp + r * sparse::kStatsColumns;
      const auto e = m.evaluate({x[0], x[1], x[2]});
      m.write_grad(e, gp[r] / acc_t(temperature), mutable_row_ptr(a.grad, r), a.grad.scalar_type());
    });
  });
  return a.grad.view(student.sizes());
}

std::tuple<at::Tensor, at::Tensor> sparse_loss(const at::Tensor& student, const at::Tensor& teacher_ids,
                                               const at::Tensor& teacher_logprobs, const at::Tensor& row_weights,
                                               c10::string_view name, double param, double temperature,
                                               c10::string_view tail) {
  SparseLossArgs a(student, teacher_ids, teacher_logprobs, row_weights, name, param, temperature, tail,
                   &empty_output);
  const auto acc = acc_dtype(student);
  at::Tensor row_loss = at::zeros({a.in.student.rows}, student.options().dtype(acc));
  dispatch(a.in, [&](auto acc_zero, auto tag) {
    using acc_t = decltype(acc_zero);
    constexpr Divergence D = decltype(tag)::value;
    const acc_t* wp = a.row_weights.const_data_ptr<acc_t>();
    acc_t* lp = row_loss.data_ptr<acc_t>();
    for_each_row<acc_t, D>(a.in, param, temperature, [&](int64_t r, const SparseRow<acc_t>& row, RowMath<acc_t, D>& m) {
      void* g = mutable_row_ptr(a.grad, r);
      if (wp[r] == acc_t(0)) {  // an ignored row: no work, no NaN leaks in
        std::memset(g, 0, row.V * a.grad.element_size());
        return;
      }
      const auto e = m.evaluate(student_stats(row, a.in.tail, m.w));
      lp[r] = acc_t(double(wp[r]) * m.value(e));
      m.write_grad(e, wp[r] / acc_t(temperature), g, a.grad.scalar_type());
    });
  });
  // Summed in row order in double, so the loss does not depend on the thread count.
  at::Tensor loss = row_loss.to(at::kDouble).sum().to(acc);
  return {loss, a.grad.view(student.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdext, CPU, m) {
  register_kernels(m, {.topk_logprobs = &topk_logprobs,
                       .sparse_forward = &sparse_forward,
                       .sparse_backward = &sparse_backward,
                       .sparse_loss = &sparse_loss});
}

}  // namespace cpu
}  // namespace kdext
