"""Vocab-parallel softmax, log_softmax, logsumexp and entropy (single-device: kdext/softmax.py).

Every op gathers the float64 local log-normalisers once (8 bytes per row); softmax and
log_softmax return this rank's slice of the full output and run one all-reduce in backward,
entropy one in forward (the schedule is in kdext/parallel/__init__.py).
"""

import torch

from .. import _validate
from .._ops import ops
from .collectives import all_reduce_sum, check_group, global_lse64


def check_logits(logits, temperature, group):
    """The checks of an op over one logits shard: the single-device op's, then the group's."""
    _validate.check_logits(logits, "logits")
    _validate.check_temperature(temperature)
    check_group(group)


def scaled(x, temperature):
    """x / T in the accumulation dtype, as the kernels compute it (x * (1/T))."""
    acc = _validate.acc_dtype(x)
    return x.to(acc) * torch.tensor(1.0 / temperature, dtype=acc)  # a new tensor (callers modify it)


def log_q(z, lse64):
    """log softmax from z = x/T (accumulation dtype) and the float64 lse, as precise as the kernels.

    For float32, lse is split into hi + lo (two floats) and (z - hi) - lo formed,
    so that the difference keeps full precision however large the logits
    (the SplitLse of csrc/include/kdext/row_contract.h). A non-finite lse gives z - lse.
    In place: z is modified and returned.
    """
    if z.dtype == torch.float64:
        return z.sub_(lse64.unsqueeze(-1)) if z.dim() > lse64.dim() else z.sub_(lse64)
    hi = lse64.to(z.dtype)
    lo = torch.where(torch.isfinite(lse64), lse64 - hi.to(torch.float64), torch.zeros_like(lse64)).to(z.dtype)
    if z.dim() > lse64.dim():
        hi, lo = hi.unsqueeze(-1), lo.unsqueeze(-1)
    return z.sub_(hi).sub_(lo)


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temperature, group):
        lse = global_lse64(x, temperature, group)
        ctx.save_for_backward(x, lse)
        ctx.temperature = temperature
        return lse.to(_validate.acc_dtype(x))

    @staticmethod
    def backward(ctx, grad):
        # d lse / dx_j = softmax(x/T)_j / T: local, given the global lse.
        x, lse = ctx.saved_tensors
        probs = log_q(scaled(x, ctx.temperature), lse).exp_()
        return (probs * (grad / ctx.temperature).unsqueeze(-1)).to(x.dtype), None, None


def logsumexp(logits, temperature=1.0, group=None):
    """Per-row log sum_i exp(x_i / T) over the whole vocabulary (one all-gather of the local lse's)."""
    check_logits(logits, temperature, group)
    return _LogSumExp.apply(logits, float(temperature), group)


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temperature, group, log):
        z = log_q(scaled(x, temperature), global_lse64(x, temperature, group))
        y = (z if log else z.exp_()).to(x.dtype)
        ctx.save_for_backward(y)
        ctx.args = (temperature, group, log)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        temperature, group, log = ctx.args
        acc = _validate.acc_dtype(y)
        g, yv = grad.to(acc), y.to(acc)
        if log:
            # d/dx_j = (g_j - softmax_j * sum_i g_i) / T
            total = all_reduce_sum(g.sum(dim=-1), group)
            out = g - torch.exp(yv) * total.unsqueeze(-1)
        else:
            # d/dx_j = y_j (g_j - sum_i g_i y_i) / T
            dot = all_reduce_sum((g * yv).sum(dim=-1), group)
            out = yv * (g - dot.unsqueeze(-1))
        return (out * torch.tensor(1.0 / temperature, dtype=acc)).to(y.dtype), None, None, None


def softmax(logits, temperature=1.0, group=None):
    """This rank's slice of softmax(logits / T) over the whole vocabulary, in the logits' dtype.

    Its backward runs one all-reduce of one number per row (every rank must run it).
    """
    check_logits(logits, temperature, group)
    return _Softmax.apply(logits, float(temperature), group, False)


def log_softmax(logits, temperature=1.0, group=None):
    """This rank's slice of log_softmax(logits / T) over the whole vocabulary, in the logits' dtype.

    Its backward runs one all-reduce of one number per row (every rank must run it).
    """
    check_logits(logits, temperature, group)
    return _Softmax.apply(logits, float(temperature), group, True)


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temperature, group):
        lse = global_lse64(x, temperature, group)
        partial, _ = ops.entropy_forward(x, temperature, lse)
        entropy = all_reduce_sum(partial, group)
        ctx.save_for_backward(x, entropy, lse)
        ctx.temperature = temperature
        return entropy

    @staticmethod
    def backward(ctx, grad):
        x, entropy, lse = ctx.saved_tensors
        return ops.entropy_backward(grad, x, entropy, lse, ctx.temperature), None, None


def entropy(logits, temperature=1.0, group=None):
    """Per-row entropy of softmax(logits / T) over the whole vocabulary, in nats."""
    check_logits(logits, temperature, group)
    return _Entropy.apply(logits, float(temperature), group)
