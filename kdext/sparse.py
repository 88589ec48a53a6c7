"""The offline teacher: a teacher's top-k log-probabilities, and distillation against them.

    topk_logprobs(logits, k, temperature=1.0) -> (ids, logprobs, logsumexp)
    sparse_distill_loss(student_logits, teacher_ids, teacher_logprobs, kind="forward_kl", tail="bucket", ...)

``topk_logprobs`` stores what a cache needs of a teacher row: its k most probable ids and their
log-probabilities under the full softmax. ``sparse_distill_loss`` takes the divergence between the
student and that sparse teacher over k + 1 outcomes (``tail="bucket"``: the stored ids and one
"everything else" outcome) or over the k ids renormalised (``tail="renormalize"``). The contract
is docs/DESIGN.md, "the sparse family"; the kernels are csrc/cpu/sparse.cpp and csrc/cuda/sparse.cu
over the shared math of csrc/include/kdext/sparse.h.
"""

import math
import numbers

import torch

from . import _validate
from ._ops import ops
from .divergence import (REDUCTIONS, check_weights, divergence_param, fused_loss_grad, fused_loss_setup_context,
                         reduce_rows, row_mask)

__all__ = ["TAILS", "sparse_distill_loss", "topk_logprobs"]

TAILS = ("bucket", "renormalize")
STATS_COLUMNS = 3

# ---------------------------------------------------------------------------
# Checks (csrc/sparse_args.h, word for word)
# ---------------------------------------------------------------------------

_FLOAT_NAMES = "float32, float16, bfloat16 or float64"


def check_tail(tail):
    if tail not in TAILS:
        raise ValueError(f"tail must be 'bucket' or 'renormalize', got '{tail}'")


def check_k(k, logits):
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    V = logits.shape[-1]
    if k > V:
        raise ValueError(f"k = {k} exceeds the vocabulary size {V} (the logits' last dimension)")


def check_int32_vocab(V, name):
    if V > 2**31 - 1:
        raise ValueError(f"{name} has a vocabulary of {V} entries; int32 ids need at most 2^31 - 1")


def _slots_shape(rows):
    return "[" + "".join(f"{n}, " for n in rows) + "k]"


def check_teacher(teacher_ids, teacher_logprobs, student_logits):
    """teacher_ids [rows..., k] (int64/int32) and teacher_logprobs of that shape, on the student's device."""
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_ids must be int64 or int32, got {teacher_ids.dtype}")
    _validate.check_same_device(teacher_ids, "teacher_ids", student_logits, "student_logits")
    rows = _validate.rows_shape(student_logits)
    if teacher_ids.dim() != student_logits.dim() or tuple(teacher_ids.shape[:-1]) != rows:
        raise ValueError(f"teacher_ids must have shape {_slots_shape(rows)} (the student_logits' leading dims, "
                         f"then k slots), got {list(teacher_ids.shape)}")
    if teacher_ids.shape[-1] == 0:
        raise ValueError("teacher_ids has no slots (last dimension of size 0)")
    if not isinstance(teacher_logprobs, torch.Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got {type(teacher_logprobs).__name__}")
    if teacher_logprobs.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"teacher_logprobs must be {_FLOAT_NAMES}, got {teacher_logprobs.dtype}")
    _validate.check_same_device(teacher_logprobs, "teacher_logprobs", student_logits, "student_logits")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids {list(teacher_ids.shape)}, "
                         f"got {list(teacher_logprobs.shape)}")


def _check_sparse_input(student_logits, teacher_ids, teacher_logprobs, divergence, param, temperature, tail):
    """The checks of csrc/sparse_args.h's SparseInput, in its order."""
    _validate.check_logits(student_logits, "student_logits")
    check_teacher(teacher_ids, teacher_logprobs, student_logits)
    _validate.check_temperature(temperature)
    _validate.check_divergence(divergence, param)
    check_tail(tail)


def _check_topk(logits, k, temperature):
    _validate.check_logits(logits, "logits")
    check_k(k, logits)
    _validate.check_temperature(temperature)
    check_int32_vocab(logits.shape[-1], "logits")


# ---------------------------------------------------------------------------
# Fake kernels (shapes only; for torch.compile and meta tensors)
# ---------------------------------------------------------------------------


@torch.library.register_fake("kdext::topk_logprobs")
def _topk_logprobs_fake(logits, k, temperature=1.0):
    _check_topk(logits, k, temperature)
    rows, acc = _validate.rows_shape(logits), _validate.acc_dtype(logits)
    return (logits.new_empty(rows + (k,), dtype=torch.int32), logits.new_empty(rows + (k,), dtype=acc),
            logits.new_empty(rows, dtype=acc))


@torch.library.register_fake("kdext::sparse_forward")
def _sparse_forward_fake(student_logits, teacher_ids, teacher_logprobs, divergence, param, temperature, tail):
    _check_sparse_input(student_logits, teacher_ids, teacher_logprobs, divergence, param, temperature, tail)
    rows, acc = _validate.rows_shape(student_logits), _validate.acc_dtype(student_logits)
    return student_logits.new_empty(rows, dtype=acc), student_logits.new_empty(rows + (STATS_COLUMNS,), dtype=acc)


@torch.library.register_fake("kdext::sparse_backward")
def _sparse_backward_fake(grad_values, student_logits, teacher_ids, teacher_logprobs, stats, divergence, param,
                          temperature, tail):
    _check_sparse_input(student_logits, teacher_ids, teacher_logprobs, divergence, param, temperature, tail)
    _validate.check_same_device(grad_values, "grad_values", student_logits, "student_logits")
    _validate.check_same_device(stats, "stats", student_logits, "student_logits")
    return student_logits.new_empty(student_logits.shape)


@torch.library.register_fake("kdext::sparse_loss")
def _sparse_loss_fake(student_logits, teacher_ids, teacher_logprobs, row_weights, divergence, param, temperature,
                      tail):
    _check_sparse_input(student_logits, teacher_ids, teacher_logprobs, divergence, param, temperature, tail)
    _validate.check_same_device(row_weights, "row_weights", student_logits, "student_logits")
    acc = _validate.acc_dtype(student_logits)
    return student_logits.new_empty((), dtype=acc), student_logits.new_empty(student_logits.shape)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


def _topk_setup_context(ctx, inputs, output):
    logits, _, temperature = inputs
    ids, _, lse = output
    ctx.save_for_backward(logits, ids, lse)
    ctx.mark_non_differentiable(ids)
    ctx.set_materialize_grads(False)
    ctx.temperature = temperature


def _topk_backward(ctx, _grad_ids, grad_logprobs, grad_lse):
    # d logprob_j / dx = (onehot(id_j) - q) / T and d lse / dx = q / T, q = softmax(x / T), with
    # log q = (x/T - hi) - lo from the row's float64 lse split into two floats (lse_float64;
    # docs/DESIGN.md §2.3 SplitLse), so q keeps full precision however large the logits. Empty slots
    # (id -1) carry nothing. The row contract: an Empty row (lse -inf) gets zeros, a Poisoned one NaN,
    # and a row whose upstream gradients are all 0 gets zeros.
    if grad_logprobs is None and grad_lse is None:
        return None, None, None
    logits, ids, lse = ctx.saved_tensors
    T = ctx.temperature
    acc = lse.dtype
    valid = ids >= 0
    g_lp = lse.new_zeros(ids.shape) if grad_logprobs is None else torch.where(valid, grad_logprobs.to(acc), 0.0)
    coef = -g_lp.sum(-1)
    if grad_lse is not None:
        coef = coef + grad_lse.to(acc)
    lse64 = ops.lse_float64(logits, T)
    hi = lse64.to(acc)
    lo = torch.where(torch.isfinite(lse64), lse64 - hi.double(), 0.0).to(acc)
    log_q = (logits.to(acc) * (1.0 / T) - hi.unsqueeze(-1)) - lo.unsqueeze(-1)
    q = torch.exp(torch.where((lse64 == -math.inf).unsqueeze(-1), -math.inf, log_q))
    grad = (q * coef.unsqueeze(-1)).scatter_add(-1, ids.clamp_min(0).long(), g_lp) / T
    no_upstream = (coef == 0) & (g_lp == 0).all(-1)
    return torch.where(no_upstream.unsqueeze(-1), 0.0, grad).to(logits.dtype), None, None


torch.library.register_autograd("kdext::topk_logprobs", _topk_backward, setup_context=_topk_setup_context)


def _forward_setup_context(ctx, inputs, output):
    student_logits, teacher_ids, teacher_logprobs, divergence, param, temperature, tail = inputs
    _, stats = output
    ctx.save_for_backward(student_logits, teacher_ids, teacher_logprobs, stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.args = (divergence, param, temperature, tail)


def _forward_backward(ctx, grad_values, _grad_stats):
    # The teacher's stored log-probabilities are data: they get no gradient.
    if grad_values is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    student_logits, teacher_ids, teacher_logprobs, stats = ctx.saved_tensors
    grad = ops.sparse_backward(grad_values, student_logits, teacher_ids, teacher_logprobs, stats, *ctx.args)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("kdext::sparse_forward", _forward_backward, setup_context=_forward_setup_context)


def _loss_backward(ctx, grad_loss, _grad_grad):
    # The kernel already wrote d(loss)/d(student); the chain rule scales it (kdext/divergence.py).
    none = (None,) * 7
    if grad_loss is None:
        return (None,) + none
    return (fused_loss_grad(ctx, grad_loss, "sparse_distill_loss"),) + none


torch.library.register_autograd("kdext::sparse_loss", _loss_backward, setup_context=fused_loss_setup_context)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def topk_logprobs(logits, k, temperature=1.0):
    """Per row, the k most probable ids of softmax(logits / T) and their log-probabilities.

    Returns ``(ids, logprobs, logsumexp)``: ``ids`` int32 ``[..., k]`` sorted by descending
    probability (ties by lower id); ``logprobs`` ``[..., k]`` float32 (float64 for float64
    logits), ``(x/T - max) - log Z`` as ``kdext.log_softmax`` computes them; ``logsumexp``
    ``[...]`` of ``logits / T``. A row with fewer than k entries above -inf fills the rest with
    id -1 and log-prob -inf; a row with a NaN or +inf logit has NaN log-probs (and its lse is
    NaN or +inf). Differentiable in ``logits`` through ``logprobs`` and ``logsumexp``.
    """
    # The schema's int and float would take a bool (True as 1); the Python API refuses it.
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    _validate.check_temperature(temperature)
    return ops.topk_logprobs(logits, k, temperature)


def check_num_items(num_items, reduction):
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items is only used with reduction='mean', got reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {list(num_items.shape)}")
        return
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a number or a one-element tensor, got {type(num_items).__name__}")
    if not num_items > 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")


def check_sparse_loss_args(student_logits, teacher_ids, teacher_logprobs, kind, tail, labels, ignore_index,
                           temperature, reduction, beta, alpha, mask, weights, num_items):
    """sparse_distill_loss's checks; returns (the divergence's parameter, the boolean mask of the
    rows that count: those the labels / mask keep that hold at least one valid id)."""
    if kind not in _validate.DIVERGENCES:
        raise ValueError(f"kind must be one of {', '.join(_validate.DIVERGENCES)}, got {kind!r}")
    param = divergence_param(kind, beta, alpha)
    _check_sparse_input(student_logits, teacher_ids, teacher_logprobs, kind, param, temperature, tail)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weights is not None:
        check_weights(weights, student_logits)
    check_num_items(num_items, reduction)
    keep = row_mask(student_logits, labels, ignore_index, mask)
    stored = (teacher_ids >= 0).any(-1)  # a row without any valid id is padding
    return param, stored if keep is None else keep & stored


def sparse_distill_loss(
    student_logits,
    teacher_ids,
    teacher_logprobs,
    kind="forward_kl",
    tail="bucket",
    labels=None,
    ignore_index=-100,
    temperature=1.0,
    reduction="mean",
    beta=0.5,
    mask=None,
    weights=None,
    num_items=None,
    alpha=0.1,
    fused=True,
):
    """Distillation loss against a sparse (top-k) teacher, reduced over rows (docs/DESIGN.md, "the
    sparse family").

    Args:
        student_logits: ``[..., V]`` logits (fp32/fp16/bf16/fp64).
        teacher_ids: ``[..., k]`` int64/int32 ids of the stored teacher tokens; -1 marks an empty
            slot. The valid ids of a row must be distinct and in [0, V) (the CPU kernel raises
            IndexError / ValueError; the CUDA kernel, which cannot raise without a device sync,
            makes that row's value and gradient NaN).
        teacher_logprobs: ``[..., k]`` log-probabilities of those ids under the teacher's full
            softmax at the distillation temperature (e.g. from ``topk_logprobs(t, k, T)``).
        kind: ``reverse_kl``, ``forward_kl``, ``jsd`` (``beta``), ``skew_forward_kl``,
            ``skew_reverse_kl`` (``alpha``) or ``tvd``, taken over the outcomes of ``tail``.
        tail: ``"bucket"``: the stored ids plus one outcome for everything else, with the
            teacher's mass 1 - sum p and the student's mass summed over the ids not stored;
            ``"renormalize"``: both distributions renormalised over the stored ids.
        labels, ignore_index, mask, weights, reduction: as ``distill_loss``. Rows with no valid
            id are ignored as well (value 0, zero gradient, not counted by ``mean``).
        temperature: divides the student's logits (the teacher's log-probs are taken as given).
        num_items: with ``reduction="mean"``, divide the sum by this (a number or a one-element
            tensor, e.g. the tokens of a whole gradient-accumulation step) instead of by the
            number of rows that count.
        fused: compute the student's gradient in the forward pass (the backward is a scale);
            used when the student needs a gradient, ``weights`` do not, and reduction is not
            ``"none"``.

    Ignored rows contribute 0 and get a zero gradient, even when their logits are NaN.
    """
    param, keep = check_sparse_loss_args(student_logits, teacher_ids, teacher_logprobs, kind, tail, labels,
                                         ignore_index, temperature, reduction, beta, alpha, mask, weights, num_items)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    weights_need_grad = weights is not None and torch.is_grad_enabled() and weights.requires_grad
    if reduction == "none" or not fused or not needs_grad or weights_need_grad:
        values, _ = ops.sparse_forward(student_logits, teacher_ids, teacher_logprobs, kind, param, temperature, tail)
        if num_items is not None:
            return reduce_rows(values, keep, "sum", weights) / num_items
        return reduce_rows(values, keep, reduction, weights)

    acc = _validate.acc_dtype(student_logits)
    w = student_logits.new_ones(keep.shape, dtype=acc) if weights is None else weights.to(acc)
    w = torch.where(keep, w, w.new_zeros(()))

    def loss_of(row_weights):
        loss, _ = ops.sparse_loss(student_logits, teacher_ids, teacher_logprobs, row_weights, kind, param,
                                  temperature, tail)
        return loss

    if reduction == "sum":
        return loss_of(w)
    if num_items is not None:
        return loss_of(w / num_items)
    count = keep.sum()
    # clamp: with no row counted every weight is 0 (zero gradient), and the mean is NaN.
    loss = loss_of(w / count.clamp_min(1))
    return torch.where(count > 0, loss, loss.new_full((), math.nan))
