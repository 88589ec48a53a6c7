"""Vocab-parallel divergences and distill_loss: the per-row values, losses and gradients of the
single-device ops (kdext/divergence.py) from this rank's shard of both logits.

Two collectives per forward, none in backward (the schedule is in kdext/parallel/__init__.py).
"""

import torch

from .. import _validate
from .._ops import ops
from ..divergence import check_loss_args, reduce_rows
from .collectives import all_gather, all_reduce_sum, check_group, merge_lse, no_grads


def _divergence_forward(s, t, kind, param, temperature, group):
    """(values, stats) of the unsharded divergence_forward; stats = (lse_s, lse_t, c_s, c_t) global.

    Collective 1 gathers both local log-normalisers (2 numbers per row), collective 2
    sums the shards' (value, c_s, c_t) (3 numbers per row).
    """
    local = torch.stack((ops.logsumexp(s, temperature), ops.logsumexp(t, temperature)), dim=-1)
    lse = merge_lse(all_gather(local, group))
    partial = ops.divergence_partial(s, t, lse[..., 0], lse[..., 1], kind, param, temperature)
    sums = all_reduce_sum(partial, group)
    return sums[..., 0].contiguous(), torch.cat((lse, sums[..., 1:]), dim=-1)


class _Divergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, kind, param, temperature, group):
        values, stats = _divergence_forward(s, t, kind, param, temperature, group)
        ctx.save_for_backward(s, t, stats)
        ctx.args = (kind, param, temperature)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_s or need_t):
            return no_grads(6)
        s, t, stats = ctx.saved_tensors
        # The stats hold the global lse's and c's: the local slice of the exact
        # gradient needs nothing from the other ranks.
        grad_s, grad_t = ops.divergence_backward(grad_values, s, t, stats, *ctx.args, need_s, need_t)
        return (grad_s if need_s else None), (grad_t if need_t else None), None, None, None, None


def _divergence(s, t, kind, param, temperature, group):
    _validate.check_logit_pair(s, t)
    _validate.check_temperature(temperature)
    _validate.check_divergence(kind, param)
    check_group(group)
    return _Divergence.apply(s, t, kind, float(param), float(temperature), group)


def reverse_kl(student_logits, teacher_logits, temperature=1.0, group=None):
    """Per-row KL(q || p) over the whole vocabulary, from this rank's shard of both logits."""
    return _divergence(student_logits, teacher_logits, "reverse_kl", 0.0, temperature, group)


def forward_kl(student_logits, teacher_logits, temperature=1.0, group=None):
    """Per-row KL(p || q) over the whole vocabulary."""
    return _divergence(student_logits, teacher_logits, "forward_kl", 0.0, temperature, group)


def jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, group=None):
    """Per-row generalized JSD(beta) (beta=0: forward KL, beta=1: reverse KL, as kdext.jsd)."""
    return _divergence(student_logits, teacher_logits, "jsd", beta, temperature, group)


def skew_forward_kl(student_logits, teacher_logits, alpha=0.1, temperature=1.0, group=None):
    """Per-row KL(p || alpha p + (1 - alpha) q)."""
    return _divergence(student_logits, teacher_logits, "skew_forward_kl", alpha, temperature, group)


def skew_reverse_kl(student_logits, teacher_logits, alpha=0.1, temperature=1.0, group=None):
    """Per-row KL(q || (1 - alpha) p + alpha q)."""
    return _divergence(student_logits, teacher_logits, "skew_reverse_kl", alpha, temperature, group)


def tvd(student_logits, teacher_logits, temperature=1.0, group=None):
    """Per-row 1/2 sum |p - q|."""
    return _divergence(student_logits, teacher_logits, "tvd", 0.0, temperature, group)


def distill_loss(
    student_logits,
    teacher_logits,
    kind="reverse_kl",
    labels=None,
    ignore_index=-100,
    temperature=1.0,
    reduction="mean",
    beta=0.5,
    alpha=0.1,
    mask=None,
    weights=None,
    group=None,
):
    """kdext.distill_loss over a vocab-sharded pair of logits; the same loss on every rank.

    Same arguments and semantics as :func:`kdext.distill_loss` (labels /
    ignore_index / mask select the rows that count; reduction ``mean`` over those
    rows, NaN when none counts, ``sum``, or ``none`` with ignored rows 0; ignored
    rows get a zero gradient even when their logits are NaN), except that there is
    no ``fused``: the student's local gradient slice needs the global c_s of the
    forward's second collective, so it cannot be written in the forward's kernel
    pass; it is always computed in backward, one pass over the shard from the saved
    statistics and without any collective. ``labels``, ``mask`` and ``weights`` must
    be the same on every rank. The teacher may require grad.
    """
    param, keep = check_loss_args(student_logits, teacher_logits, kind, labels, ignore_index, temperature,
                                  reduction, beta, alpha, mask, weights)
    check_group(group)
    values = _Divergence.apply(student_logits, teacher_logits, kind, float(param), float(temperature), group)
    return reduce_rows(values, keep, reduction, weights)
