"""The divergence family: per-row ops and the fused distillation loss.

Per-row ops (each returns ``logits.shape[:-1]`` in float32, float64 for
float64 inputs, and is differentiable in both logits):

    reverse_kl(s, t)        KL(q || p)
    forward_kl(s, t)        KL(p || q)
    jsd(s, t, beta)         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    skew_forward_kl(s, t, alpha)   KL(p || alpha p + (1 - alpha) q)
    skew_reverse_kl(s, t, alpha)   KL(q || (1 - alpha) p + alpha q)
    tvd(s, t)               1/2 sum |p - q|

with q = softmax(s / T) the student and p = softmax(t / T) the teacher. Their
backward is one pass over each row using the statistics the forward saved.

``distill_loss`` reduces any of them over rows, with ignored rows, and computes
the student's gradient in the same kernel pass as the loss.
"""

import math

import torch

from . import _validate, common  # noqa: F401  (common: scale_, the fused loss's backward)
from ._ops import ops

# ---------------------------------------------------------------------------
# Fake kernels (shapes only; for torch.compile and meta tensors)
# ---------------------------------------------------------------------------


@torch.library.register_fake("kdext::divergence_forward")
def _divergence_forward_fake(student_logits, teacher_logits, divergence, param, temperature):
    _validate.check_logit_pair(student_logits, teacher_logits)
    _validate.check_divergence(divergence, param)
    _validate.check_temperature(temperature)
    rows = _validate.rows_shape(student_logits)
    acc = _validate.acc_dtype(student_logits)
    return student_logits.new_empty(rows, dtype=acc), student_logits.new_empty(rows + (4,), dtype=acc)


@torch.library.register_fake("kdext::divergence_backward")
def _divergence_backward_fake(
    grad_values, student_logits, teacher_logits, stats, divergence, param, temperature, student_grad, teacher_grad
):
    _validate.check_logit_pair(student_logits, teacher_logits)
    _validate.check_same_device(grad_values, "grad_values", student_logits, "student_logits")
    _validate.check_same_device(stats, "stats", student_logits, "student_logits")
    s_shape = student_logits.shape if student_grad else (0,)
    t_shape = teacher_logits.shape if teacher_grad else (0,)
    return student_logits.new_empty(s_shape), teacher_logits.new_empty(t_shape)


@torch.library.register_fake("kdext::divergence_loss")
def _divergence_loss_fake(student_logits, teacher_logits, row_weights, divergence, param, temperature):
    _validate.check_logit_pair(student_logits, teacher_logits)
    _validate.check_same_device(row_weights, "row_weights", student_logits, "student_logits")
    _validate.check_divergence(divergence, param)
    _validate.check_temperature(temperature)
    acc = _validate.acc_dtype(student_logits)
    return student_logits.new_empty((), dtype=acc), student_logits.new_empty(student_logits.shape)


@torch.library.register_fake("kdext::divergence_partial")
def _divergence_partial_fake(student_logits, teacher_logits, student_lse, teacher_lse, divergence, param, temperature):
    _validate.check_logit_pair(student_logits, teacher_logits)
    _validate.check_same_device(student_lse, "student_lse", student_logits, "student_logits")
    _validate.check_same_device(teacher_lse, "teacher_lse", student_logits, "student_logits")
    _validate.check_divergence(divergence, param)
    rows = _validate.rows_shape(student_logits)
    return student_logits.new_empty(rows + (3,), dtype=_validate.acc_dtype(student_logits))


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


def _forward_setup_context(ctx, inputs, output):
    student_logits, teacher_logits, divergence, param, temperature = inputs
    _, stats = output
    ctx.save_for_backward(student_logits, teacher_logits, stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the stats output
    ctx.args = (divergence, param, temperature)


def _forward_backward(ctx, grad_values, _grad_stats):
    if grad_values is None:
        return None, None, None, None, None
    student_logits, teacher_logits, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_s, grad_t = ops.divergence_backward(
        grad_values, student_logits, teacher_logits, stats, *ctx.args, need_s, need_t
    )
    return (grad_s if need_s else None), (grad_t if need_t else None), None, None, None


torch.library.register_autograd("kdext::divergence_forward", _forward_backward, setup_context=_forward_setup_context)


def fused_loss_setup_context(ctx, inputs, output):
    """setup_context of a fused loss op (divergence_loss, sparse_loss): outputs (loss, gradient buffer)."""
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)
    # Without this, autograd would zero-fill a [rows, V] "gradient" for the
    # gradient output on every backward: a full extra pass over memory.
    ctx.set_materialize_grads(False)
    ctx.consumed = False


def fused_loss_grad(ctx, grad_loss, name):
    """The student's gradient of a fused loss: the buffer its kernel wrote, scaled by the upstream
    gradient, in place (a no-op on the device when it is 1). ``name`` is the public function, for the
    error of a second backward."""
    # Checked before ctx.saved_tensors is read: once the buffer has been scaled in place,
    # reading it raises autograd's generic version-counter error instead of this message.
    if ctx.consumed:
        raise RuntimeError(
            f"{name}: backward was called twice through the fused loss, whose gradient buffer is scaled in "
            "place; use fused=False if you need retain_graph=True"
        )
    ctx.consumed = True
    (grad,) = ctx.saved_tensors
    if _tracing(grad):
        # Under torch.compile / AOT tracing the buffer is also a forward output
        # of the graph, which a backward must not mutate: scale out of place.
        return grad * grad_loss.to(grad.dtype)
    ops.scale_(grad, grad_loss.to(grad.dtype))
    return grad


def _loss_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None, None, None, None, None
    return fused_loss_grad(ctx, grad_loss, "distill_loss"), None, None, None, None, None


def _tracing(t):
    """Whether autograd runs under a tracer (torch.compile, AOT autograd, fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


torch.library.register_autograd("kdext::divergence_loss", _loss_backward, setup_context=fused_loss_setup_context)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_scalars(kind, param, temperature):
    # The schema's float arguments take a bool (True as 1.0) without a word; the Python API
    # refuses it, with the words of the fake kernels and of distill_loss.
    _validate.check_temperature(temperature)
    _validate.check_divergence(kind, param)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    """Per-row KL(q || p), q = softmax(student_logits / T), p = softmax(teacher_logits / T)."""
    _check_scalars('reverse_kl', 0.0, temperature)
    return ops.reverse_kl(student_logits, teacher_logits, temperature)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
    """Per-row KL(p || q)."""
    _check_scalars('forward_kl', 0.0, temperature)
    return ops.forward_kl(student_logits, teacher_logits, temperature)


def jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """Per-row generalized JSD(beta) (GKD/TRL convention: beta=0 is forward KL, beta=1 reverse KL)."""
    _check_scalars('jsd', beta, temperature)
    return ops.jsd(student_logits, teacher_logits, beta, temperature)


def skew_forward_kl(student_logits, teacher_logits, alpha=0.1, temperature=1.0):
    """Per-row KL(p || alpha p + (1 - alpha) q) (DistiLLM's skew KL)."""
    _check_scalars('skew_forward_kl', alpha, temperature)
    return ops.skew_forward_kl(student_logits, teacher_logits, alpha, temperature)


def skew_reverse_kl(student_logits, teacher_logits, alpha=0.1, temperature=1.0):
    """Per-row KL(q || (1 - alpha) p + alpha q) (DistiLLM's skew reverse KL)."""
    _check_scalars('skew_reverse_kl', alpha, temperature)
    return ops.skew_reverse_kl(student_logits, teacher_logits, alpha, temperature)


def tvd(student_logits, teacher_logits, temperature=1.0):
    """Per-row total variation distance 1/2 sum |p - q|."""
    _check_scalars('tvd', 0.0, temperature)
    return ops.tvd(student_logits, teacher_logits, temperature)


def divergence_param(kind, beta, alpha):
    """The op-level parameter of a divergence: beta for jsd, alpha for the skew KLs, else unused."""
    if kind == "jsd":
        return beta
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        return alpha
    return 0.0


def row_mask(student_logits, labels, ignore_index, mask):
    """Boolean [rows...] mask of the rows that count, from labels and/or an explicit mask."""
    rows = _validate.rows_shape(student_logits)
    keep = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (token ids, ignore_index where a row is ignored), "
                            f"got {labels.dtype}")
        if tuple(labels.shape) != rows:
            raise ValueError(f"labels must have shape {list(rows)} (the logits' leading dims), got {list(labels.shape)}")
        _validate.check_same_device(labels, "labels", student_logits, "student_logits")
        keep = labels != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean torch.Tensor (True = the row counts)")
        if tuple(mask.shape) != rows:
            raise ValueError(f"mask must have shape {list(rows)} (the logits' leading dims), got {list(mask.shape)}")
        _validate.check_same_device(mask, "mask", student_logits, "student_logits")
        keep = mask if keep is None else keep & mask
    return keep


REDUCTIONS = ("mean", "sum", "none")


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
    fused=True,
    weights=None,
):
    """Distillation loss between student and teacher logits, reduced over rows.

    Args:
        student_logits, teacher_logits: ``[..., V]`` logits (fp32/fp16/bf16; may differ in dtype).
        kind: one of ``reverse_kl``, ``forward_kl``, ``jsd``, ``skew_forward_kl``, ``skew_reverse_kl``, ``tvd``.
        labels: optional ``[...]`` tensor; rows whose label equals ``ignore_index`` are ignored.
        mask: optional boolean ``[...]`` tensor; rows where it is False are ignored.
        temperature: softmax temperature T > 0 applied to both sides.
        reduction: ``"mean"`` (over the rows that count; NaN when none does, like
            ``torch.nn.functional.cross_entropy``), ``"sum"``, or ``"none"`` (per-row values,
            ignored rows 0).
        beta: the JSD's beta; alpha: the skew KLs' alpha.
        fused: compute the student's gradient inside the forward kernel (the default). The
            backward is then only a scale of that buffer. Used whenever the student needs a
            gradient, the teacher does not (nor ``weights``), and reduction is not ``"none"``;
            otherwise the per-row ops are used (same values).
        weights: optional floating ``[...]`` tensor: each row's value is multiplied by its
            weight before the reduction (a policy-gradient or importance weight, say). ``mean``
            still divides by the number of rows that count, not by the sum of the weights. A
            row of weight 0 contributes 0 and its logits get a zero gradient, like an ignored
            row. The weights get a gradient (through the per-row ops) when they require one:
            each row's value (0 for a row of weight 0 whose value is not finite).

    Ignored rows contribute 0 and get a zero gradient, even when their logits are NaN.
    """
    param, keep = check_loss_args(student_logits, teacher_logits, kind, labels, ignore_index, temperature,
                                  reduction, beta, alpha, mask, weights)
    acc = _validate.acc_dtype(student_logits)

    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    weights_need_grad = weights is not None and torch.is_grad_enabled() and weights.requires_grad
    if (reduction == "none" or not fused or not needs_grad or teacher_logits.requires_grad
            or weights_need_grad):
        return _unfused_loss(student_logits, teacher_logits, kind, param, temperature, reduction, keep, weights)

    rows_shape = _validate.rows_shape(student_logits)
    w = student_logits.new_ones(rows_shape, dtype=acc) if weights is None else weights.to(acc)
    if keep is not None:
        w = torch.where(keep, w, w.new_zeros(()))
    if reduction == "sum":
        loss, _ = ops.divergence_loss(student_logits, teacher_logits, w, kind, param, temperature)
        return loss
    if keep is None:
        rows = student_logits.numel() // student_logits.shape[-1]
        loss, _ = ops.divergence_loss(student_logits, teacher_logits, w / max(rows, 1), kind, param, temperature)
        # The mean over no row is NaN, as on the unfused path and in F.cross_entropy.
        return loss if rows else loss + math.nan
    count = keep.sum()
    # clamp: with no row counted every weight is 0 (zero gradient), and the mean
    # itself is NaN, as in F.cross_entropy.
    loss, _ = ops.divergence_loss(student_logits, teacher_logits, w / count.clamp_min(1), kind, param, temperature)
    return torch.where(count > 0, loss, loss.new_full((), math.nan))


def check_loss_args(student_logits, teacher_logits, kind, labels, ignore_index, temperature, reduction, beta,
                    alpha, mask, weights=None):
    """distill_loss's checks (shared with kdext.parallel.distill_loss); returns (the divergence's
    parameter, the boolean mask of the rows that count or None when all do)."""
    if kind not in _validate.DIVERGENCES:
        raise ValueError(f"kind must be one of {', '.join(_validate.DIVERGENCES)}, got {kind!r}")
    _validate.check_logit_pair(student_logits, teacher_logits)
    _validate.check_temperature(temperature)
    param = divergence_param(kind, beta, alpha)
    _validate.check_divergence(kind, param)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weights is not None:
        check_weights(weights, student_logits)
    return param, row_mask(student_logits, labels, ignore_index, mask)


def check_weights(weights, student_logits):
    """distill_loss's checks of ``weights``: a floating tensor of the logits' leading shape, on their device."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    rows = _validate.rows_shape(student_logits)
    if tuple(weights.shape) != rows:
        raise ValueError(f"weights must have shape {list(rows)} (the logits' leading dims), got {list(weights.shape)}")
    _validate.check_same_device(weights, "weights", student_logits, "student_logits")


def reduce_rows(values, keep, reduction, weights=None):
    """Per-row values to distill_loss's result: weighted, ignored rows and rows of weight 0
    exactly 0, then ``none`` / ``sum`` / ``mean`` over the rows that count (NaN when none does)."""
    if weights is not None:
        # A row of weight 0 is dropped like an ignored one; where its value is not finite it is
        # zeroed before the product too, so that neither gradient sees 0 * NaN.
        dropped = (weights == 0) & ~torch.isfinite(values)
        values = torch.where(dropped, values.new_zeros(()), values) * weights.to(values.dtype)
    if keep is not None:
        # where(), not a product: an ignored NaN row must contribute exactly 0,
        # and its upstream gradient (hence its logits' gradient) is then 0.
        values = torch.where(keep, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = values.numel() if keep is None else keep.sum()
    return total / count


def _unfused_loss(student_logits, teacher_logits, kind, param, temperature, reduction, keep, weights):
    values, _ = ops.divergence_forward(student_logits, teacher_logits, kind, param, temperature)
    return reduce_rows(values, keep, reduction, weights)
