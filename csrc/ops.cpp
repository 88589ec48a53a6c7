// The one schema list of kdext: every op under torch.ops.kdext is declared
// here and nowhere else. Backend kernels register in csrc/cpu/<stem>.cpp and
// csrc/cuda/<stem>.cu (TORCH_LIBRARY_IMPL); the public per-row ops and their
// autograd in csrc/autograd.cpp; the kernels' fake kernels and autograd in
// Python (kdext/<stem>.py).
//
// Stems: divergence (divergence_* and the public divergence ops), softmax
// (softmax, log_softmax, logsumexp, lse_float64, entropy), logprobs, common
// (scale_), top_p_sample, sparse (topk_logprobs, sparse_*).
#include <torch/library.h>

namespace kdext {

TORCH_LIBRARY(kdext, m) {
  // ---- divergence family (stem: divergence) -------------------------------
  // Per-row value and the statistics its backward needs: [rows, 4] =
  // (lse_s, lse_t, c_s, c_t), see csrc/include/kdext/divergence.h.
  m.def(
      "divergence_forward(Tensor student_logits, Tensor teacher_logits, str divergence, float param, "
      "float temperature) -> (Tensor values, Tensor stats)");
  // One pass over each row; outputs are empty tensors for the sides not asked for.
  m.def(
      "divergence_backward(Tensor grad_values, Tensor student_logits, Tensor teacher_logits, Tensor stats, "
      "str divergence, float param, float temperature, bool student_grad, bool teacher_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  // Fused loss: sum_r w_r value_r over rows with w_r != 0, and the student's
  // gradient of it (w_r dvalue_r/ds_r) written in the same pass.
  m.def(
      "divergence_loss(Tensor student_logits, Tensor teacher_logits, Tensor row_weights, str divergence, "
      "float param, float temperature) -> (Tensor loss, Tensor grad_student)");
  // A vocab shard's contribution to (value, c_s, c_t) given the global
  // log-normalisers: [rows, 3]. The building block of kdext.parallel.
  m.def(
      "divergence_partial(Tensor student_logits, Tensor teacher_logits, Tensor student_lse, Tensor teacher_lse, "
      "str divergence, float param, float temperature) -> Tensor");

  m.def("reverse_kl(Tensor student_logits, Tensor teacher_logits, float temperature=1.0) -> Tensor");
  m.def("forward_kl(Tensor student_logits, Tensor teacher_logits, float temperature=1.0) -> Tensor");
  m.def("jsd(Tensor student_logits, Tensor teacher_logits, float beta=0.5, float temperature=1.0) -> Tensor");
  m.def(
      "skew_forward_kl(Tensor student_logits, Tensor teacher_logits, float alpha=0.1, float temperature=1.0) "
      "-> Tensor");
  m.def(
      "skew_reverse_kl(Tensor student_logits, Tensor teacher_logits, float alpha=0.1, float temperature=1.0) "
      "-> Tensor");
  m.def("tvd(Tensor student_logits, Tensor teacher_logits, float temperature=1.0) -> Tensor");

  // ---- softmax family (stem: softmax) -------------------------------------
  m.def("softmax(Tensor logits, float temperature=1.0) -> Tensor");
  m.def("log_softmax(Tensor logits, float temperature=1.0) -> Tensor");
  // Backward of softmax (log=False) or log_softmax (log=True) from its output.
  m.def("softmax_backward(Tensor grad_output, Tensor output, float temperature, bool log) -> Tensor");
  // Per-row log(sum_i exp(x_i / T)), float32 (float64 for float64 logits).
  m.def("logsumexp(Tensor logits, float temperature=1.0) -> Tensor");
  // The same per-row lse in float64 for every input dtype: the float32 state
  // (max, sum) taken to float64 before max + log(sum), so that it keeps the
  // exact max (kdext/online_softmax.h, log_sum_exp_float64). The normaliser
  // vocab shards exchange; equal to entropy_forward's lse. Not differentiable.
  m.def("lse_float64(Tensor logits, float temperature) -> Tensor");
  // Per-row entropy of softmax(x/T) and the row's lse. With `lse` given (the
  // global normaliser of a vocab shard), returns the shard's partial entropy.
  m.def("entropy_forward(Tensor logits, float temperature, Tensor? lse=None) -> (Tensor entropy, Tensor lse)");
  m.def("entropy_backward(Tensor grad, Tensor logits, Tensor entropy, Tensor lse, float temperature) -> Tensor");
  m.def("entropy(Tensor logits, float temperature=1.0) -> Tensor");

  // ---- log-probs of given tokens (stem: logprobs) -------------------------
  m.def("logprobs_forward(Tensor logits, Tensor tokens, float temperature) -> (Tensor logprobs, Tensor lse)");
  // Tokens outside [0, V) contribute no one-hot term (used by vocab shards).
  m.def("logprobs_backward(Tensor grad, Tensor logits, Tensor tokens, Tensor lse, float temperature) -> Tensor");
  m.def("logprobs(Tensor logits, Tensor tokens, float temperature=1.0) -> Tensor");

  // ---- generic ops (stem: common) ------------------------------------------
  // self *= factor (one element), skipped on the device when factor == 1, so a
  // fused loss's backward costs nothing in the common case and needs no sync.
  m.def("scale_(Tensor(a!) self, Tensor factor) -> ()");

  // ---- sampling (stem: top_p_sample) --------------------------------------
  // One token per row from r = (1-alpha) softmax(logits/T) + alpha softmax(teacher/T)
  // after top-k then top-p; Philox(seed, subsequence = row_ids[row] or the row's index,
  // offset). Returns (tokens, student_logprob, teacher_logprob, sample_logprob, threshold).
  m.def(
      "top_p_sample(Tensor logits, Tensor? teacher_logits, float top_p, int top_k, float temperature, "
      "float alpha, int seed, int offset, Tensor? row_ids=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- the offline teacher (stem: sparse) ---------------------------------
  // The top-k log-probabilities of a teacher, and the distillation loss
  // against such a sparse teacher (docs/DESIGN.md, "the sparse family"; math
  // in csrc/include/kdext/sparse.h). `tail` is "bucket" or "renormalize".

  // Per row: the k most probable ids (int32, by descending probability, ties
  // by lower id; -1 past the row's finite entries), their log-probabilities
  // under softmax(logits / T) and the row's log-sum-exp.
  m.def("topk_logprobs(Tensor logits, int k, float temperature=1.0) -> (Tensor ids, Tensor logprobs, Tensor lse)");
  // Per-row divergence of the student against the stored teacher, and the
  // statistics its backward reuses: [rows, 3] = (max, log Z, log Q_tail).
  m.def(
      "sparse_forward(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logprobs, str divergence, "
      "float param, float temperature, str tail) -> (Tensor values, Tensor stats)");
  m.def(
      "sparse_backward(Tensor grad_values, Tensor student_logits, Tensor teacher_ids, Tensor teacher_logprobs, "
      "Tensor stats, str divergence, float param, float temperature, str tail) -> Tensor");
  // Fused loss: sum_r w_r value_r over rows with w_r != 0, and the student's
  // gradient of it, written in the same row visit.
  m.def(
      "sparse_loss(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logprobs, Tensor row_weights, "
      "str divergence, float param, float temperature, str tail) -> (Tensor loss, Tensor grad_student)");
}

}  // namespace kdext

