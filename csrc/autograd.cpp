// The public per-row ops (reverse_kl, forward_kl, jsd, skew_forward_kl,
// skew_reverse_kl, tvd, entropy, logprobs) and their autograd, in C++: a
// library user who loads only the op library (libkdext_ops.so from CMake)
// gets their gradients as a Python user does.
//
// Each is its family's forward kernel (divergence_forward, entropy_forward,
// logprobs_forward) keeping the per-row value, with that kernel's backward
// (divergence_backward, ...) as its gradient:
//   CompositeExplicitAutograd  the value below autograd: inference mode, and
//                              fake / meta tensors (which meet the forward
//                              kernel's fake, kdext/<stem>.py);
//   Autograd                   a torch::autograd::Function over the same
//                              kernels, called through the dispatcher (so
//                              torch.compile traces them as kdext ops).
// lse_float64 is not differentiable: its Autograd kernel runs it below
// autograd, so that its output never requires grad.
//
// The kernels' own autograd (divergence_forward & co., used directly by
// kdext.distill_loss and kdext.parallel) is registered in Python, next to
// their fake kernels (kdext/<stem>.py).
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "row_kernel_calls.h"

namespace kdext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using namespace row_kernels;  // the kernels, through the dispatcher

// The autograd Functions. Their forward runs with grad mode off; each saves
// what its backward kernel takes.

struct DivergenceFunction : torch::autograd::Function<DivergenceFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t, const std::string& name,
                            double param, double temperature) {
    auto [values, stats] = divergence_forward(s, t, name, param, temperature);
    ctx->save_for_backward({s, t, stats});
    ctx->saved_data["name"] = name;
    ctx->saved_data["param"] = param;
    ctx->saved_data["temperature"] = temperature;
    return values;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_s = ctx->needs_input_grad(0), need_t = ctx->needs_input_grad(1);
    auto [grad_s, grad_t] = divergence_backward(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["name"].toStringRef(),
        ctx->saved_data["param"].toDouble(), ctx->saved_data["temperature"].toDouble(), need_s, need_t);
    return {need_s ? grad_s : at::Tensor(), need_t ? grad_t : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

struct EntropyFunction : torch::autograd::Function<EntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, double temperature) {
    auto [entropy, lse] = entropy_forward(logits, temperature);
    ctx->save_for_backward({logits, entropy, lse});
    ctx->saved_data["temperature"] = temperature;
    return entropy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {entropy_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["temperature"].toDouble()),
            at::Tensor()};
  }
};

struct LogprobsFunction : torch::autograd::Function<LogprobsFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& tokens,
                            double temperature) {
    auto [logprobs, lse] = logprobs_forward(logits, tokens, temperature);
    ctx->save_for_backward({logits, tokens, lse});
    ctx->saved_data["temperature"] = temperature;
    return logprobs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {logprobs_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["temperature"].toDouble()),
            at::Tensor(), at::Tensor()};
  }
};

// A public op's value below autograd (CompositeExplicitAutograd) and its
// autograd (Autograd), registered together.
template <typename Value, typename Grad>
void register_differentiable(torch::Library& m, const char* name, Value* value, Grad* autograd) {
  m.impl(name, torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, value));
  m.impl(name, torch::dispatch(c10::DispatchKey::Autograd, autograd));
}

// A public divergence op, by its name in kDivergenceNames: divergence_forward
// and divergence_backward with that name (and the op's beta or alpha; 0 for
// the ops without a parameter, as divergence_forward takes it).
template <const char* kName>
struct DivergenceOp {
  static at::Tensor value(const at::Tensor& s, const at::Tensor& t, double temperature) {
    return std::get<0>(divergence_forward(s, t, kName, 0.0, temperature));
  }
  static at::Tensor autograd(const at::Tensor& s, const at::Tensor& t, double temperature) {
    return DivergenceFunction::apply(s, t, std::string(kName), 0.0, temperature);
  }
  static at::Tensor value_with_param(const at::Tensor& s, const at::Tensor& t, double param, double temperature) {
    return std::get<0>(divergence_forward(s, t, kName, param, temperature));
  }
  static at::Tensor autograd_with_param(const at::Tensor& s, const at::Tensor& t, double param,
                                        double temperature) {
    return DivergenceFunction::apply(s, t, std::string(kName), param, temperature);
  }

  static void register_without_param(torch::Library& m) { register_differentiable(m, kName, &value, &autograd); }
  static void register_with_param(torch::Library& m) {
    register_differentiable(m, kName, &value_with_param, &autograd_with_param);
  }
};

constexpr char kReverseKL[] = "reverse_kl";
constexpr char kForwardKL[] = "forward_kl";
constexpr char kJSD[] = "jsd";
constexpr char kSkewForwardKL[] = "skew_forward_kl";
constexpr char kSkewReverseKL[] = "skew_reverse_kl";
constexpr char kTVD[] = "tvd";

at::Tensor entropy_value(const at::Tensor& logits, double temperature) {
  return std::get<0>(entropy_forward(logits, temperature));
}
at::Tensor entropy_autograd(const at::Tensor& logits, double temperature) {
  return EntropyFunction::apply(logits, temperature);
}

at::Tensor logprobs_value(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  return std::get<0>(logprobs_forward(logits, tokens, temperature));
}
at::Tensor logprobs_autograd(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  return LogprobsFunction::apply(logits, tokens, temperature);
}

at::Tensor lse_float64_without_grad(const at::Tensor& logits, double temperature) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lse_float64(logits, temperature);
}

}  // namespace

// Implementations under two dispatch keys each, so a fragment of the library
// (the schemas are in csrc/ops.cpp) rather than a TORCH_LIBRARY_IMPL per key.
TORCH_LIBRARY_FRAGMENT(kdext, m) {
  DivergenceOp<kReverseKL>::register_without_param(m);
  DivergenceOp<kForwardKL>::register_without_param(m);
  DivergenceOp<kJSD>::register_with_param(m);
  DivergenceOp<kSkewForwardKL>::register_with_param(m);
  DivergenceOp<kSkewReverseKL>::register_with_param(m);
  DivergenceOp<kTVD>::register_without_param(m);
  register_differentiable(m, "entropy", &entropy_value, &entropy_autograd);
  register_differentiable(m, "logprobs", &logprobs_value, &logprobs_autograd);
  m.impl("lse_float64", torch::dispatch(c10::DispatchKey::Autograd, &lse_float64_without_grad));
}

}  // namespace kdext
