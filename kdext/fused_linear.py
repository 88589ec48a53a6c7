"""Fused LM-head losses: distillation and log-probs from hidden states, without ``[N, V]`` logits.

``fused_linear_distill_loss`` is ``distill_loss(logits(student), logits(teacher), ...)`` and
``fused_linear_logprobs`` is ``logprobs(logits(hidden), tokens)``, where each model's logits are

    z = logit_scale * (hidden @ weight.T + bias)
    z = softcap * tanh(z / softcap)        (when a softcap is given)

(Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``1 / logits_scaling``), then divided by the temperature inside the kernels. The logits are
formed in fp32 (float64 for float64 inputs) a chunk of rows at a time and never exist for all
rows (csrc/fused_linear.cpp; docs/DESIGN.md §2.11): memory beyond the inputs, the outputs and
the gradients is the chunk buffers, independent of the number of rows.

``chunk_size``: rows per chunk; ``None`` picks them from a memory budget of
``KDEXT_FUSED_LINEAR_MB`` megabytes for the chunk's buffers (default 224 on the CPU, 1024 on
CUDA): about ``3 * V * 4`` bytes per row for a distillation loss with gradients (student and
teacher logits and their gradient), ``2 * V * 4`` for log-probs' backward.
"""

import math

import torch

from . import _validate
from .divergence import REDUCTIONS, _tracing, check_weights, divergence_param, reduce_rows, row_mask
from ._ops import ops

STUDENT = ("student_hidden", "student_weight", "student_bias", "student_logit_scale", "student_softcap")
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logit_scale", "teacher_softcap")
SINGLE = ("hidden", "weight", "bias", "logit_scale", "softcap")

# ---------------------------------------------------------------------------
# Checks (the words of csrc/fused_linear_args.h)
# ---------------------------------------------------------------------------


def _float_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _number(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")


def _no_double_mix(a, a_name, b, b_name):
    if (a.dtype == torch.float64) != (b.dtype == torch.float64):
        raise TypeError(f"{a_name} is {a.dtype} and {b_name} is {b.dtype}; float64 cannot be mixed with lower precisions")


def check_head(hidden, weight, bias, logit_scale, softcap, names=SINGLE):
    """One LM head's checks: dtypes, shapes ([..., H], [V, H], [V]), devices, scale and softcap."""
    nh, nw, nb, ns, nc = names
    _float_tensor(hidden, nh)
    if hidden.dim() < 1:
        raise ValueError(f"{nh} must have at least one dimension (the hidden width), got a 0-dim tensor")
    _float_tensor(weight, nw)
    if weight.dim() != 2:
        raise ValueError(f"{nw} must be a 2-D [V, H] tensor (as nn.Linear stores it), got shape {list(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{nw} has no rows (an empty vocabulary)")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"width mismatch: {nh} has {hidden.shape[-1]} entries in its last dimension but {nw} has "
                         f"shape {list(weight.shape)} ([V, H])")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{nh} has an empty hidden width (last dimension of size 0)")
    _validate.check_same_device(weight, nw, hidden, nh)
    _no_double_mix(hidden, nh, weight, nw)
    if bias is not None:
        _float_tensor(bias, nb)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{nb} must have shape [{weight.shape[0]}] (one entry per row of {nw}), got "
                             f"{list(bias.shape)}")
        _validate.check_same_device(bias, nb, hidden, nh)
        _no_double_mix(hidden, nh, bias, nb)
    _number(logit_scale, ns)
    if not math.isfinite(logit_scale):
        raise ValueError(f"{ns} must be a finite number, got {logit_scale}")
    if softcap is not None:
        _number(softcap, nc)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"{nc} must be a finite number > 0 (or None), got {softcap}")


def check_pair(student, teacher):
    """Student and teacher heads ((hidden, weight, bias, scale, softcap) each) of a fused divergence."""
    check_head(*student, names=STUDENT)
    check_head(*teacher, names=TEACHER)
    sh, th = student[0], teacher[0]
    _validate.check_same_device(th, "teacher_hidden", sh, "student_hidden")
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(f"row shape mismatch: student_hidden has leading shape {list(sh.shape[:-1])} but "
                         f"teacher_hidden has {list(th.shape[:-1])} (one row per token on both sides)")
    _no_double_mix(sh, "student_hidden", th, "teacher_hidden")


def check_chunk_size(chunk_size):
    """The public ``chunk_size``: None (the memory budget) or an int >= 1; the op's value (0 = budget)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: rows from the memory budget), got {chunk_size}")
    return chunk_size


def _op_chunk_size(chunk_size):
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1 (or 0 / None: rows from the memory budget), got {chunk_size}")


def check_tokens(tokens, hidden):
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
    _validate.check_same_device(tokens, "tokens", hidden, "hidden")
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(f"tokens must have shape {list(hidden.shape[:-1])} (the leading dims of hidden), got "
                         f"{list(tokens.shape)}")


def _check_num_items(num_items, reduction):
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items replaces the count of reduction='mean'; it cannot be used with "
                         f"reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {list(num_items.shape)}")
        return
    _number(num_items, "num_items")
    if not (math.isfinite(num_items) and num_items > 0):
        raise ValueError(f"num_items must be a finite number > 0, got {num_items}")


# ---------------------------------------------------------------------------
# Fake kernels
# ---------------------------------------------------------------------------


def _pair_fake(sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale, s_cap, t_cap, chunk):
    check_pair((sh, sw, sb, s_scale, s_cap), (th, tw, tb, t_scale, t_cap))
    _validate.check_temperature(temperature)
    _validate.check_divergence(divergence, param)
    _op_chunk_size(chunk)


def _grads_fake(hidden, weight, bias, hidden_grad, weight_grad, bias_grad):
    none = (0,)
    return (hidden.new_empty(hidden.shape if hidden_grad else none),
            weight.new_empty(weight.shape if weight_grad else none),
            (bias.new_empty(bias.shape if bias_grad else none) if bias is not None else weight.new_empty(none)))


@torch.library.register_fake("kdext::fused_linear_divergence_loss")
def _loss_fake(sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale, s_cap, t_cap, chunk,
               row_weights, hidden_grad, weight_grad, bias_grad):
    _pair_fake(sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale, s_cap, t_cap, chunk)
    _validate.check_same_device(row_weights, "row_weights", sh, "student_hidden")
    loss = sh.new_empty((), dtype=_validate.acc_dtype(sh))
    return (loss,) + _grads_fake(sh, sw, sb, hidden_grad, weight_grad, bias_grad)


@torch.library.register_fake("kdext::fused_linear_divergence_forward")
def _forward_fake(sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale, s_cap, t_cap, chunk):
    _pair_fake(sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale, s_cap, t_cap, chunk)
    rows, acc = tuple(sh.shape[:-1]), _validate.acc_dtype(sh)
    return sh.new_empty(rows, dtype=acc), sh.new_empty(rows + (4,), dtype=acc)


@torch.library.register_fake("kdext::fused_linear_divergence_backward")
def _backward_fake(grad_values, stats, sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale,
                   s_cap, t_cap, chunk, hidden_grad, weight_grad, bias_grad):
    _pair_fake(sh, sw, sb, th, tw, tb, divergence, param, temperature, s_scale, t_scale, s_cap, t_cap, chunk)
    _validate.check_same_device(grad_values, "grad_values", sh, "student_hidden")
    _validate.check_same_device(stats, "stats", sh, "student_hidden")
    return _grads_fake(sh, sw, sb, hidden_grad, weight_grad, bias_grad)


@torch.library.register_fake("kdext::fused_linear_logprobs_forward")
def _logprobs_forward_fake(hidden, weight, bias, tokens, temperature, logit_scale, softcap, chunk, entropy):
    check_head(hidden, weight, bias, logit_scale, softcap)
    _validate.check_temperature(temperature)
    _op_chunk_size(chunk)
    check_tokens(tokens, hidden)
    rows, acc = tuple(hidden.shape[:-1]), _validate.acc_dtype(hidden)
    return (hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows if entropy else (0,), dtype=acc),
            hidden.new_empty(rows, dtype=torch.float64))


@torch.library.register_fake("kdext::fused_linear_logprobs_backward")
def _logprobs_backward_fake(grad_logprobs, grad_entropy, entropy, lse, hidden, weight, bias, tokens, temperature,
                            logit_scale, softcap, chunk, hidden_grad, weight_grad, bias_grad):
    check_head(hidden, weight, bias, logit_scale, softcap)
    _validate.check_temperature(temperature)
    _op_chunk_size(chunk)
    check_tokens(tokens, hidden)
    for t, name in ((grad_logprobs, "grad_logprobs"), (lse, "lse"), (grad_entropy, "grad_entropy")):
        if t is not None:
            _validate.check_same_device(t, name, hidden, "hidden")
    return _grads_fake(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------

_PAIR_ARGS = 14  # the head-pair arguments every divergence op starts with


def _loss_setup(ctx, inputs, output):
    _, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the gradient outputs
    ctx.want = inputs[_PAIR_ARGS + 1:]
    ctx.consumed = False


def _loss_backward(ctx, grad_loss, *_grad_grads):
    # The forward already computed the gradients of the loss; the chain rule only scales them
    # by the upstream gradient, in place (skipped when it is 1; no host sync on CUDA).
    n = _PAIR_ARGS + 4
    if grad_loss is None:
        return (None,) * n
    if ctx.consumed:  # checked before saved_tensors, which the in-place scale has made stale
        raise RuntimeError(
            "fused_linear_distill_loss: backward was called twice through the fused loss, whose gradient buffers "
            "are scaled in place; use reduction='none' (the per-row path) if you need retain_graph=True"
        )
    ctx.consumed = True
    out = []
    for i, (g, want) in enumerate(zip(ctx.saved_tensors, ctx.want)):
        if not (want and ctx.needs_input_grad[i]):
            out.append(None)
        elif _tracing(g):  # the buffer is also a graph output: scale out of place
            out.append(g * grad_loss)
        else:
            ops.scale_(g, grad_loss)
            out.append(g)
    return tuple(out) + (None,) * (n - 3)


torch.library.register_autograd("kdext::fused_linear_divergence_loss", _loss_backward, setup_context=_loss_setup)


def _forward_setup(ctx, inputs, output):
    _, stats = output
    ctx.save_for_backward(*inputs[:6], stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.args = inputs[6:_PAIR_ARGS]


def _forward_backward(ctx, grad_values, _grad_stats):
    if grad_values is None:
        return (None,) * _PAIR_ARGS
    *heads, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = ops.fused_linear_divergence_backward(grad_values, stats, *heads, *ctx.args, need[0], need[1],
                                                 need[2] and heads[2] is not None)
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * (_PAIR_ARGS - 3)


torch.library.register_autograd("kdext::fused_linear_divergence_forward", _forward_backward,
                                setup_context=_forward_setup)


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, logit_scale, softcap, chunk, entropy = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, tokens, ent, lse)
    ctx.mark_non_differentiable(lse)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)
    ctx.args = (temperature, logit_scale, softcap, chunk)


def _logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    if grad_logprobs is None and grad_entropy is None:
        return (None,) * 9
    hidden, weight, bias, tokens, ent, lse = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse, dtype=_validate.acc_dtype(hidden))
    need = ctx.needs_input_grad
    grads = ops.fused_linear_logprobs_backward(grad_logprobs, grad_entropy, ent, lse, hidden, weight, bias, tokens,
                                               *ctx.args, need[0], need[1], need[2] and bias is not None)
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * 6


torch.library.register_autograd("kdext::fused_linear_logprobs_forward", _logprobs_backward,
                                setup_context=_logprobs_setup)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _is_dtensor(t):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return isinstance(t, DTensor)


def _gathered(t):
    """A DTensor (an FSDP2-sharded LM head, say) as its full tensor, gathered once per call
    (differentiable: its gradient goes back to the shards); anything else as it is."""
    return t.full_tensor() if t is not None and _is_dtensor(t) else t


def _autocast(*tensors):
    """Under torch.autocast, hidden states and weights in the autocast dtype (the GEMMs then run
    in it, with fp32 accumulation and fp32 logits); biases stay as they are (added in fp32)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype != torch.float64 else t for t in tensors)


def _flags(*tensors):
    grad = torch.is_grad_enabled()
    return tuple(grad and t is not None and t.requires_grad for t in tensors)


def fused_linear_distill_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    kind="reverse_kl",
    labels=None,
    ignore_index=-100,
    temperature=1.0,
    reduction="mean",
    beta=0.5,
    alpha=0.1,
    mask=None,
    weights=None,
    student_bias=None,
    teacher_bias=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
    num_items=None,
    chunk_size=None,
):
    """``distill_loss`` of both models' logits, computed from their hidden states and LM heads.

    Args:
        student_hidden, teacher_hidden: ``[..., H_s]`` and ``[..., H_t]`` final hidden states,
            one row per token (the same leading shape; the widths may differ).
        student_weight, teacher_weight: ``[V_s, H_s]``, ``[V_t, H_t]`` LM-head weights as
            ``nn.Linear`` stores them (DTensors are gathered once per call). The vocabularies
            may differ: ids beyond a head are masked (-inf logits, probability 0), as the
            trainer's ``VocabAligner`` pads the narrower head.
        kind, labels, ignore_index, temperature, reduction, beta, alpha, mask, weights: as in
            ``kdext.distill_loss`` (the same rows that count, reductions and weights).
        student_bias, teacher_bias: optional ``[V]`` biases.
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap: each head's
            logits are ``softcap * tanh(scale * (h @ W.T + b) / softcap)`` (no tanh without a
            softcap), then divided by the temperature.
        num_items: with ``reduction="mean"``, divides the sum instead of the local count of
            rows that count (the global token count under gradient accumulation and DDP, like
            TRL's ``num_items_in_batch``); a number or a one-element tensor (no host sync).
        chunk_size: rows per chunk; None picks them from ``KDEXT_FUSED_LINEAR_MB`` (module doc).

    fp32, bf16 and fp16 inputs in any mix (float64 only with float64); the GEMMs accumulate
    in fp32 and the logits are fp32. Under ``torch.autocast`` hidden states and weights are
    cast to the autocast dtype first.

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``. The teacher
    side is a constant: its tensors are detached and get no gradient. With ``reduction`` "sum"
    or "mean" (and weights that need no gradient) the gradients are computed in the forward,
    chunk by chunk, and the backward only scales them (a second backward through the same
    loss raises RuntimeError); ``reduction="none"`` or weights that require grad take the
    per-row path, whose backward recomputes the logits.
    """
    student_weight, student_bias = _gathered(student_weight), _gathered(student_bias)
    teacher_weight, teacher_bias = _gathered(teacher_weight), _gathered(teacher_bias)
    if kind not in _validate.DIVERGENCES:
        raise ValueError(f"kind must be one of {', '.join(_validate.DIVERGENCES)}, got {kind!r}")
    check_pair((student_hidden, student_weight, student_bias, student_logit_scale, student_softcap),
               (teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap))
    _validate.check_temperature(temperature)
    param = divergence_param(kind, beta, alpha)
    _validate.check_divergence(kind, param)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weights is not None:
        check_weights(weights, student_hidden, "student_hidden")
    keep = row_mask(student_hidden, labels, ignore_index, mask, "student_hidden")
    _check_num_items(num_items, reduction)
    chunk = check_chunk_size(chunk_size)

    sh, sw = _autocast(student_hidden, student_weight)
    th, tw = _autocast(teacher_hidden.detach(), teacher_weight.detach())
    tb = teacher_bias.detach() if teacher_bias is not None else None
    args = (sh, sw, student_bias, th, tw, tb, kind, float(param), float(temperature), float(student_logit_scale),
            float(teacher_logit_scale), _opt_float(student_softcap), _opt_float(teacher_softcap), chunk)
    weights_need_grad = weights is not None and torch.is_grad_enabled() and weights.requires_grad
    if reduction == "none" or weights_need_grad:
        values, _ = ops.fused_linear_divergence_forward(*args)
        if num_items is None:
            return reduce_rows(values, keep, reduction, weights)
        return reduce_rows(values, keep, "sum", weights) / _as_divisor(num_items, values)

    acc = _validate.acc_dtype(sh)
    rows_shape = tuple(sh.shape[:-1])
    w = sh.new_ones(rows_shape, dtype=acc) if weights is None else weights.to(acc)
    if keep is not None:
        w = torch.where(keep, w, w.new_zeros(()))
    count = None
    if reduction == "mean":
        if num_items is not None:
            w = w / _as_divisor(num_items, w)
        elif keep is None:
            w = w / max(math.prod(rows_shape), 1)
        else:
            count = keep.sum()
            w = w / count.clamp_min(1)  # every weight 0 when no row counts: a zero gradient
    loss, *_ = ops.fused_linear_divergence_loss(*args, w, *_flags(sh, sw, student_bias))
    if reduction == "mean" and num_items is None:
        # The mean over no row is NaN, as in distill_loss and F.cross_entropy.
        if keep is None:
            return loss if math.prod(rows_shape) else loss + math.nan
        return torch.where(count > 0, loss, loss.new_full((), math.nan))
    return loss


def _opt_float(x):
    return None if x is None else float(x)


def _as_divisor(num_items, like):
    return num_items.to(like.dtype) if isinstance(num_items, torch.Tensor) else float(num_items)


def fused_linear_logprobs(hidden, weight, tokens, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          chunk_size=None, return_entropy=False):
    """Per-row ``log q(token)``, ``q = softmax(z / T)`` of the head's logits ``z`` (see the module
    doc), without ``[N, V]`` logits; with ``return_entropy`` also the entropy of q:
    ``(logprobs, entropy)``.

    ``hidden`` ``[..., H]``, ``weight`` ``[V, H]`` (a DTensor is gathered once), ``bias``
    ``[V]`` or None, ``tokens`` int64/int32 with hidden's leading shape, in ``[0, V)`` (the CPU
    raises IndexError before any work; CUDA, which cannot check without a sync, returns NaN
    for such a row). Results are float32 (float64 for float64 inputs) and differentiable in
    hidden, weight and bias (the entropy too); the backward recomputes the logits chunk by
    chunk (one GEMM more than the unfused ``logprobs(h @ W.T, tokens)``).
    """
    weight, bias = _gathered(weight), _gathered(bias)
    check_head(hidden, weight, bias, logit_scale, softcap)
    _validate.check_temperature(temperature)
    check_tokens(tokens, hidden)
    chunk = check_chunk_size(chunk_size)
    h, w = _autocast(hidden, weight)
    lp, ent, _ = ops.fused_linear_logprobs_forward(h, w, bias, tokens, float(temperature), float(logit_scale),
                                                   _opt_float(softcap), chunk, bool(return_entropy))
    return (lp, ent) if return_entropy else lp
