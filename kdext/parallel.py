"""Vocab-parallel ops over ``torch.distributed``: the LM head split across ranks.

With tensor parallelism each rank of a process group holds ``logits[..., lo:hi]``,
its own shard of the vocabulary (shards in rank order, sizes may differ). Every
op here takes that local shard plus ``group`` (``None``: the default process
group) and returns exactly what the single-device op of the same name returns
on the concatenated logits:

* per-row results (divergences, entropy, log-sum-exp, log-probs, the loss) are
  the same on every rank;
* ``softmax`` / ``log_softmax`` return the local slice of the full output;
* gradients are the local slice of the full gradient.

How (DESIGN.md, "Vocab-parallel contract"): rank-local kernels compute the
partial state of the shard, and ranks combine states with collectives over
O(rows) numbers; no collective ever moves the logits. The collective schedule
of each op (``W`` ranks, ``a`` = 4 bytes, 8 for float64 inputs; "gather n" =
an all-gather of n numbers per row from every rank, "sum n" = an all-reduce
SUM of n numbers per row):

==================  ======================================  =====================  ==========
op                  forward                                 backward               payload/row
==================  ======================================  =====================  ==========
divergences         gather 2 (lse_s, lse_t); sum 3          none                   5a
  (value, c_s, c_t)
distill_loss        as the divergences                      none                   5a
logsumexp           gather 1 (lse, float64)                 none                   8
softmax             gather 1 (lse, float64)                 sum 1 (sum g*y)        8 + a
log_softmax         gather 1 (lse, float64)                 sum 1 (sum g)          8 + a
entropy             gather 1 (lse, float64); sum 1          none                   8 + a
                    (the shard's -sum q log q)
logprobs            gather the W shard sizes (int64, 8 B    none                   16
                    per rank per call); gather 2 (lse,
                    the owner's x_token/T; float64)
==================  ======================================  =====================  ==========

(payload = bytes this rank contributes per row; an all-gather hands every rank
W times its input.) The divergences exchange float32 lse's, as precise as the
float32 statistics their single-device kernels keep; the softmax family and
log-probs exchange them in float64, because their single-device kernels form
(x/T - max) - log Z, exact however large the logits. The shard offsets, which only ``logprobs`` and
``top_p_sample`` need (token ids are global), come from one all-gather of the W
shard sizes per call: O(W) bytes, independent of rows and V. They are not
cached, so nothing can go stale when a caller changes the split.

Usage rules of every op here (as for any collective):

* every rank of ``group`` calls the same ops in the same order, with the same
  leading (row) shape, the same hyper-parameters and the same labels / masks /
  tokens; only the last dimension differs;
* ``backward`` of ``softmax``/``log_softmax`` runs a collective, so every rank
  must run it (the divergences', entropy's and logprobs' backward need none);
* argument errors are raised before the first collective, on every rank alike
  when the arguments agree across ranks.

``count_collectives()`` records the calls and bytes of the collectives issued
by this module (used by the benchmark; the tests count independently by
wrapping ``torch.distributed``).
"""

import contextlib
import math

import torch
import torch.distributed as dist

from . import _validate
from ._ops import ops
from .divergence import REDUCTIONS, divergence_param, row_mask
from .logprobs import _check_tokens

__all__ = [
    "count_collectives",
    "distill_loss",
    "entropy",
    "forward_kl",
    "jsd",
    "log_softmax",
    "logprobs",
    "logsumexp",
    "reverse_kl",
    "shard_range",
    "skew_forward_kl",
    "skew_reverse_kl",
    "softmax",
    "tvd",
]

# ---------------------------------------------------------------------------
# Collectives (every one this module issues goes through these two helpers)
# ---------------------------------------------------------------------------


class CollectiveLog:
    """What the collectives of kdext.parallel moved while a ``count_collectives()`` block ran.

    ``calls`` is a list of ``(name, payload_bytes)``: name is ``all_gather`` or
    ``all_reduce`` and payload_bytes is the size of this rank's input tensor.
    """

    def __init__(self):
        self.calls = []

    @property
    def count(self):
        return len(self.calls)

    @property
    def bytes(self):
        return sum(n for _, n in self.calls)


_LOGS = []


@contextlib.contextmanager
def count_collectives():
    """Context manager: ``with count_collectives() as log: ...``; then ``log.count``, ``log.bytes``."""
    log = CollectiveLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(name, x):
    for log in _LOGS:
        log.calls.append((name, x.numel() * x.element_size()))


def _all_gather_fn():
    # Recent torch deprecates all_gather_into_tensor in favour of all_gather_single (same call).
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(x, group):
    """``x`` from every rank of ``group``, stacked in rank order: ``[W, *x.shape]``."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())
    if x.numel() > 0:
        _record("all_gather", x)
        _all_gather_fn()(out, x.view(-1), group=group)
    return out.view((world,) + tuple(x.shape))


def _all_reduce_sum(x, group):
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is not modified)."""
    x = x.contiguous().clone()
    if x.numel() > 0:
        _record("all_reduce", x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kdext.parallel needs an initialized torch.distributed process group")
    if dist.get_rank(group) < 0:
        raise RuntimeError("this rank is not a member of the process group passed to kdext.parallel")


def shard_range(local_vocab, group=None, device=None):
    """``(lo, hi, vocab)``: this rank's shard ``[lo, hi)`` of a vocabulary of size ``vocab``.

    A collective (one all-gather of the W shard sizes): every rank of ``group``
    must call it. ``local_vocab`` is the size of this rank's shard; shards are in
    rank order.
    """
    _check_group(group)
    if device is None:
        device = _default_device(group)
    sizes = _all_gather(torch.tensor([int(local_vocab)], dtype=torch.int64, device=device), group).view(-1).tolist()
    rank = dist.get_rank(group)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank], sum(sizes)


def _default_device(group):
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# The exact merge of per-shard log-normalisers
# ---------------------------------------------------------------------------


def _merge_lse(parts):
    """log sum_r exp(parts[r]) over dim 0, exact for -inf shards, NaN- and +inf-propagating.

    A shard whose entries are all -inf has lse -inf and adds nothing; a row whose
    shards are all -inf merges to -inf (no distribution); NaN or +inf anywhere
    merges to NaN / +inf, which the kernels then treat as a poisoned row.
    """
    m = parts.amax(dim=0)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return shift + torch.log(torch.exp(parts - shift).sum(dim=0))


def _local_lse64(x, temperature):
    """This shard's log-normaliser m + log Z in float64, in one pass over the shard.

    entropy_forward returns the row's lse in float64 for every input dtype
    (csrc/cpu/softmax.cpp, SplitLse): a float32 lse rounds at the size of the
    logits (1e-3 absolute at 1e4), which the single-device softmax, log-probs and
    entropy avoid by forming (x/T - max) - log Z; the float64 lse keeps that
    precision through the merge.
    """
    return ops.entropy_forward(x, temperature)[1]


def _global_lse64(x, temperature, group):
    """The row's log-normaliser over the whole vocabulary, float64: one all-gather of 8 bytes per row."""
    return _merge_lse(_all_gather(_local_lse64(x, temperature), group))


def _log_q(z, lse64):
    """log softmax from z = x/T (accumulation dtype) and the float64 lse, as precise as the kernels.

    For float32, lse is split into hi + lo (two floats) and (z - hi) - lo formed,
    so that the difference keeps full precision however large the logits
    (the SplitLse of csrc/cpu/softmax.cpp). A non-finite lse gives z - lse.
    """
    if z.dtype == torch.float64:
        return z.sub_(lse64.unsqueeze(-1)) if z.dim() > lse64.dim() else z.sub_(lse64)
    hi = lse64.to(z.dtype)
    lo = torch.where(torch.isfinite(lse64), lse64 - hi.to(torch.float64), torch.zeros_like(lse64)).to(z.dtype)
    if z.dim() > lse64.dim():
        hi, lo = hi.unsqueeze(-1), lo.unsqueeze(-1)
    return z.sub_(hi).sub_(lo)


def _no_grads(n):
    return (None,) * n


# ---------------------------------------------------------------------------
# Divergences
# ---------------------------------------------------------------------------


def _divergence_forward(s, t, kind, param, temperature, group):
    """(values, stats) of the unsharded divergence_forward; stats = (lse_s, lse_t, c_s, c_t) global.

    Collective 1 gathers both local log-normalisers (2 numbers per row), collective 2
    sums the shards' (value, c_s, c_t) (3 numbers per row).
    """
    local = torch.stack((ops.logsumexp(s, temperature), ops.logsumexp(t, temperature)), dim=-1)
    lse = _merge_lse(_all_gather(local, group))
    partial = ops.divergence_partial(s, t, lse[..., 0], lse[..., 1], kind, param, temperature)
    sums = _all_reduce_sum(partial, group)
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
            return _no_grads(6)
        s, t, stats = ctx.saved_tensors
        # The stats hold the global lse's and c's: the local slice of the exact
        # gradient needs nothing from the other ranks.
        grad_s, grad_t = ops.divergence_backward(grad_values, s, t, stats, *ctx.args, need_s, need_t)
        return (grad_s if need_s else None), (grad_t if need_t else None), None, None, None, None


def _divergence(s, t, kind, param, temperature, group):
    _validate.check_logit_pair(s, t)
    _validate.check_temperature(temperature)
    _validate.check_divergence(kind, param)
    _check_group(group)
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
    fused=True,
    group=None,
):
    """kdext.distill_loss over a vocab-sharded pair of logits; the same loss on every rank.

    Same arguments and semantics as :func:`kdext.distill_loss` (labels /
    ignore_index / mask select the rows that count; reduction ``mean`` over those
    rows, NaN when none counts, ``sum``, or ``none`` with ignored rows 0; ignored
    rows get a zero gradient even when their logits are NaN). ``labels`` and
    ``mask`` must be the same on every rank. ``fused`` is accepted for signature
    compatibility and has no effect: the student's local gradient slice needs
    the global (c_s) of the forward's second collective, so it is always
    computed in backward, one pass over the shard from the saved statistics and
    without any collective. The teacher may require grad.
    """
    _validate.check_logit_pair(student_logits, teacher_logits)
    _validate.check_temperature(temperature)
    param = divergence_param(kind, beta, alpha)
    _validate.check_divergence(kind, param)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    keep = row_mask(student_logits, labels, ignore_index, mask)
    _check_group(group)
    values = _Divergence.apply(student_logits, teacher_logits, kind, float(param), float(temperature), group)
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


# ---------------------------------------------------------------------------
# Softmax family
# ---------------------------------------------------------------------------


def _check(logits, temperature, group):
    _validate.check_logits(logits, "logits")
    _validate.check_temperature(temperature)
    _check_group(group)


def _scaled(x, temperature):
    """x / T in the accumulation dtype, as the kernels compute it (x * (1/T))."""
    acc = _validate.acc_dtype(x)
    return x.to(acc) * torch.tensor(1.0 / temperature, dtype=acc)  # a new tensor (callers modify it)


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temperature, group):
        lse = _global_lse64(x, temperature, group)
        ctx.save_for_backward(x, lse)
        ctx.temperature = temperature
        return lse.to(_validate.acc_dtype(x))

    @staticmethod
    def backward(ctx, grad):
        # d lse / dx_j = softmax(x/T)_j / T: local, given the global lse.
        x, lse = ctx.saved_tensors
        probs = _log_q(_scaled(x, ctx.temperature), lse).exp_()
        return (probs * (grad / ctx.temperature).unsqueeze(-1)).to(x.dtype), None, None


def logsumexp(logits, temperature=1.0, group=None):
    """Per-row log sum_i exp(x_i / T) over the whole vocabulary (one all-gather of the local lse's)."""
    _check(logits, temperature, group)
    return _LogSumExp.apply(logits, float(temperature), group)


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temperature, group, log):
        z = _log_q(_scaled(x, temperature), _global_lse64(x, temperature, group))
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
            total = _all_reduce_sum(g.sum(dim=-1), group)
            out = g - torch.exp(yv) * total.unsqueeze(-1)
        else:
            # d/dx_j = y_j (g_j - sum_i g_i y_i) / T
            dot = _all_reduce_sum((g * yv).sum(dim=-1), group)
            out = yv * (g - dot.unsqueeze(-1))
        return (out * torch.tensor(1.0 / temperature, dtype=acc)).to(y.dtype), None, None, None


def softmax(logits, temperature=1.0, group=None):
    """This rank's slice of softmax(logits / T) over the whole vocabulary, in the logits' dtype.

    Its backward runs one all-reduce of one number per row (every rank must run it).
    """
    _check(logits, temperature, group)
    return _Softmax.apply(logits, float(temperature), group, False)


def log_softmax(logits, temperature=1.0, group=None):
    """This rank's slice of log_softmax(logits / T) over the whole vocabulary, in the logits' dtype.

    Its backward runs one all-reduce of one number per row (every rank must run it).
    """
    _check(logits, temperature, group)
    return _Softmax.apply(logits, float(temperature), group, True)


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temperature, group):
        lse = _global_lse64(x, temperature, group)
        partial, _ = ops.entropy_forward(x, temperature, lse)
        entropy = _all_reduce_sum(partial, group)
        ctx.save_for_backward(x, entropy, lse)
        ctx.temperature = temperature
        return entropy

    @staticmethod
    def backward(ctx, grad):
        x, entropy, lse = ctx.saved_tensors
        return ops.entropy_backward(grad, x, entropy, lse, ctx.temperature), None, None


def entropy(logits, temperature=1.0, group=None):
    """Per-row entropy of softmax(logits / T) over the whole vocabulary, in nats."""
    _check(logits, temperature, group)
    return _Entropy.apply(logits, float(temperature), group)


# ---------------------------------------------------------------------------
# Log-probs of given (global) tokens
# ---------------------------------------------------------------------------


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tokens, temperature, group):
        lo, hi, vocab = shard_range(x.shape[-1], group, x.device)
        if tokens.device.type == "cpu" and tokens.numel() > 0:
            # As the CPU kernel: out-of-vocabulary tokens are an IndexError (raised
            # on every rank alike, after the collective, so no rank is left waiting).
            bad = ((tokens < 0) | (tokens >= vocab)).reshape(-1).nonzero()
            if bad.numel() > 0:
                r = int(bad[0])
                v = int(tokens.reshape(-1)[r])
                raise IndexError(f"tokens[{r}] = {v} is outside the vocabulary [0, {vocab})")
        local_tokens = tokens - lo  # the kernels' convention: ids outside [0, V_local) are not ours
        own = (local_tokens >= 0) & (local_tokens < x.shape[-1])
        index = torch.where(own, local_tokens, torch.zeros_like(local_tokens)).to(torch.int64).unsqueeze(-1)
        picked = _scaled(x.gather(-1, index).squeeze(-1), temperature)
        picked = torch.where(own, picked, picked.new_full((), -math.inf))
        # float64 for both columns: the lse for precision, x_token / T exactly
        local = torch.stack((_local_lse64(x, temperature), picked.to(torch.float64)), dim=-1)
        both = _all_gather(local, group)
        lse = _merge_lse(both[..., 0])
        # the owner's x_token / T (the others sent -inf; NaN propagates), minus the lse
        out = _log_q(both[..., 1].amax(dim=0).to(picked.dtype), lse)
        if tokens.device.type != "cpu":
            # As the CUDA kernel, which cannot raise without a sync: NaN for such rows.
            out = torch.where((tokens >= 0) & (tokens < vocab), out, out.new_full((), math.nan))
        ctx.save_for_backward(x, local_tokens, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad):
        x, local, lse = ctx.saved_tensors
        return ops.logprobs_backward(grad, x, local, lse, ctx.temperature), None, None, None


def logprobs(logits, tokens, temperature=1.0, group=None):
    """Per-row log softmax(logits / T)[token] over the whole vocabulary; ``tokens`` are global ids.

    ``tokens`` must be the same on every rank. Differentiable in the local logits
    (the one-hot term lands on the rank that owns the token).
    """
    _check(logits, temperature, group)
    _check_tokens(logits, tokens)
    return _LogProbs.apply(logits, tokens, float(temperature), group)
