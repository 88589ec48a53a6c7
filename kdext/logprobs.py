"""Log-probabilities of given tokens: ``log softmax(logits / T)[..., token]``."""

import torch

from . import _validate
from ._ops import ops


def check_tokens(logits, tokens):
    """The checks of logprobs' ``tokens`` (int64 or int32, the logits' leading shape, on their device);
    shared with kdext.parallel.logprobs."""
    _validate.check_row_integers(tokens, "tokens", logits)


@torch.library.register_fake("kdext::logprobs_forward")
def _logprobs_forward_fake(logits, tokens, temperature):
    _validate.check_logits(logits, "logits")
    _validate.check_temperature(temperature)
    check_tokens(logits, tokens)
    rows, acc = _validate.rows_shape(logits), _validate.acc_dtype(logits)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


@torch.library.register_fake("kdext::logprobs_backward")
def _logprobs_backward_fake(grad, logits, tokens, lse, temperature):
    _validate.check_logits(logits, "logits")
    _validate.check_temperature(temperature)
    check_tokens(logits, tokens)
    _validate.check_same_device(grad, "grad", logits, "logits")
    _validate.check_same_device(lse, "lse", logits, "logits")
    return logits.new_empty(logits.shape)


def _setup(ctx, inputs, output):
    logits, tokens, temperature = inputs
    _, lse = output
    ctx.save_for_backward(logits, tokens, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.temperature = temperature


def _backward(ctx, grad, _grad_lse):
    if grad is None:
        return None, None, None
    logits, tokens, lse = ctx.saved_tensors
    return ops.logprobs_backward(grad, logits, tokens, lse, ctx.temperature), None, None


torch.library.register_autograd("kdext::logprobs_forward", _backward, setup_context=_setup)


def logprobs(logits, tokens, temperature=1.0):
    """Per-row log-probability of ``tokens`` under softmax(logits / T); differentiable in logits.

    ``tokens`` has the logits' leading shape (int64 or int32) and must lie in [0, V):
    the CPU kernel raises IndexError otherwise; the CUDA kernel, which cannot raise
    without a device sync, returns NaN for such rows.
    """
    _validate.check_temperature(temperature)
    return ops.logprobs(logits, tokens, temperature)
