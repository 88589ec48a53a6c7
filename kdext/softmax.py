"""Softmax, log-softmax, log-sum-exp and entropy with temperature.

All take ``logits [..., V]`` and a temperature T > 0 and work on softmax(x / T).
``softmax``/``log_softmax`` return the input's dtype (computed in float32);
``logsumexp``/``entropy`` return one float32 value per row (float64 for float64
logits). All are differentiable.

``torch.ops.kdext.lse_float64(logits, temperature)`` is the row's lse in float64
for every input dtype (the float32 state taken to float64 before the log: it
keeps the exact max), the normaliser vocab shards exchange; not differentiable.
"""

import torch

from . import _validate
from ._ops import ops


def _check(logits, temperature):
    _validate.check_logits(logits, "logits")
    _validate.check_temperature(temperature)


@torch.library.register_fake("kdext::softmax")
def _softmax_fake(logits, temperature=1.0):
    _check(logits, temperature)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("kdext::log_softmax")
def _log_softmax_fake(logits, temperature=1.0):
    _check(logits, temperature)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("kdext::softmax_backward")
def _softmax_backward_fake(grad_output, output, temperature, log):
    _validate.check_logits(output, "output")
    _validate.check_same_device(grad_output, "grad_output", output, "output")
    return output.new_empty(output.shape)


@torch.library.register_fake("kdext::logsumexp")
def _logsumexp_fake(logits, temperature=1.0):
    _check(logits, temperature)
    return logits.new_empty(_validate.rows_shape(logits), dtype=_validate.acc_dtype(logits))


@torch.library.register_fake("kdext::lse_float64")
def _lse_float64_fake(logits, temperature):
    _check(logits, temperature)
    return logits.new_empty(_validate.rows_shape(logits), dtype=torch.float64)


@torch.library.register_fake("kdext::entropy_forward")
def _entropy_forward_fake(logits, temperature, lse=None):
    _check(logits, temperature)
    if lse is not None:
        _validate.check_same_device(lse, "lse", logits, "logits")
    rows, acc = _validate.rows_shape(logits), _validate.acc_dtype(logits)
    # The lse output is float64 for every input dtype (SplitLse, csrc/include/kdext/row_contract.h).
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=torch.float64)


@torch.library.register_fake("kdext::entropy_backward")
def _entropy_backward_fake(grad, logits, entropy, lse, temperature):
    _check(logits, temperature)
    for t, name in ((grad, "grad"), (entropy, "entropy"), (lse, "lse")):
        _validate.check_same_device(t, name, logits, "logits")
    return logits.new_empty(logits.shape)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.temperature = inputs[1]


def _make_softmax_backward(log):
    def backward(ctx, grad):
        (output,) = ctx.saved_tensors
        return ops.softmax_backward(grad, output, ctx.temperature, log), None

    return backward


torch.library.register_autograd("kdext::softmax", _make_softmax_backward(False), setup_context=_softmax_setup)
torch.library.register_autograd("kdext::log_softmax", _make_softmax_backward(True), setup_context=_softmax_setup)


def _logsumexp_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.temperature = inputs[1]


def _logsumexp_backward(ctx, grad):
    # d lse(x/T) / dx = softmax(x/T) / T.
    (logits,) = ctx.saved_tensors
    probs = ops.softmax(logits, ctx.temperature)
    return probs * (grad / ctx.temperature).unsqueeze(-1).to(probs.dtype), None


torch.library.register_autograd("kdext::logsumexp", _logsumexp_backward, setup_context=_logsumexp_setup)


def _entropy_setup(ctx, inputs, output):
    logits, temperature, lse = inputs
    entropy, lse_out = output
    ctx.save_for_backward(logits, entropy, lse_out)
    ctx.mark_non_differentiable(lse_out)
    ctx.set_materialize_grads(False)
    ctx.temperature = temperature
    ctx.partial = lse is not None


def _entropy_backward(ctx, grad, _grad_lse):
    if grad is None:
        return None, None, None
    if ctx.partial:
        raise RuntimeError("entropy_forward with a given lse (a vocab shard's partial sum) is not differentiable")
    logits, entropy, lse = ctx.saved_tensors
    return ops.entropy_backward(grad, logits, entropy, lse, ctx.temperature), None, None


torch.library.register_autograd("kdext::entropy_forward", _entropy_backward, setup_context=_entropy_setup)


def softmax(logits, temperature=1.0):
    """softmax(logits / T) over the last dim, in the logits' dtype."""
    _validate.check_temperature(temperature)
    return ops.softmax(logits, temperature)


def log_softmax(logits, temperature=1.0):
    """log_softmax(logits / T) over the last dim, in the logits' dtype."""
    _validate.check_temperature(temperature)
    return ops.log_softmax(logits, temperature)


def logsumexp(logits, temperature=1.0):
    """Per-row log sum_i exp(x_i / T)."""
    _validate.check_temperature(temperature)
    return ops.logsumexp(logits, temperature)


def entropy(logits, temperature=1.0):
    """Per-row entropy of softmax(logits / T), in nats."""
    _validate.check_temperature(temperature)
    return ops.entropy(logits, temperature)
