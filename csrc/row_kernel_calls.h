// kdext's own row kernels, called through the dispatcher (so that each
// backend runs its own kernel, and torch.compile traces them as kdext ops):
// the calls that the C++ autograd (autograd.cpp) and the fused LM-head driver
// (fused_linear.cpp) build on. The schemas are in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace kdext::row_kernels {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

// The op `name` (csrc/ops.cpp) with its C++ signature, found once per call site (a static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline TensorPair divergence_forward(const at::Tensor& s, const at::Tensor& t, c10::string_view name, double param,
                                     double temperature) {
  static const auto op = typed_op<TensorPair(const at::Tensor&, const at::Tensor&, c10::string_view, double, double)>(
                                             "kdext::divergence_forward");
  return op.call(s, t, name, param, temperature);
}

inline TensorPair divergence_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                                      const at::Tensor& stats, c10::string_view name, double param,
                                      double temperature, bool student_grad, bool teacher_grad) {
  static const auto op = typed_op<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, c10::string_view, double, double, bool, bool)>(
                                             "kdext::divergence_backward");
  return op.call(grad, s, t, stats, name, param, temperature, student_grad, teacher_grad);
}

inline at::Tensor divergence_loss_out(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                                      c10::string_view name, double param, double temperature, at::Tensor& grad) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             c10::string_view, double, double, at::Tensor&)>(
                                             "kdext::divergence_loss_out");
  return op.call(s, t, w, name, param, temperature, grad);
}

inline TensorPair entropy_forward(const at::Tensor& logits, double temperature) {
  static const auto op = typed_op<TensorPair(const at::Tensor&, double, const std::optional<at::Tensor>&)>(
                                             "kdext::entropy_forward");
  return op.call(logits, temperature, std::nullopt);
}

inline at::Tensor entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                                   const at::Tensor& lse, double temperature) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, double)>("kdext::entropy_backward");
  return op.call(grad, logits, entropy, lse, temperature);
}

inline TensorPair logprobs_forward(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  static const auto op = typed_op<TensorPair(const at::Tensor&, const at::Tensor&, double)>("kdext::logprobs_forward");
  return op.call(logits, tokens, temperature);
}

inline at::Tensor logprobs_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& tokens,
                                    const at::Tensor& lse, double temperature) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, double)>("kdext::logprobs_backward");
  return op.call(grad, logits, tokens, lse, temperature);
}

inline at::Tensor lse_float64(const at::Tensor& logits, double temperature) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, double)>("kdext::lse_float64");
  return op.call(logits, temperature);
}

}  // namespace kdext::row_kernels
