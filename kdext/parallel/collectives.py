"""The collectives of kdext.parallel, and the exact merge of per-shard log-normalisers.

Every collective the package issues goes through ``all_gather`` or ``all_reduce_sum``,
so that ``count_collectives()`` sees them all.
"""

import contextlib

import torch
import torch.distributed as dist

from .._ops import ops

# ---------------------------------------------------------------------------
# Collectives
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


def all_gather(x, group):
    """``x`` from every rank of ``group``, stacked in rank order: ``[W, *x.shape]``."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())
    if x.numel() > 0:
        _record("all_gather", x)
        _all_gather_fn()(out, x.view(-1), group=group)
    return out.view((world,) + tuple(x.shape))


def all_reduce_sum(x, group):
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is not modified)."""
    x = x.contiguous().clone()
    if x.numel() > 0:
        _record("all_reduce", x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def check_group(group):
    """Raises unless torch.distributed is initialized and this rank belongs to ``group``."""
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
    check_group(group)
    if device is None:
        device = _default_device(group)
    sizes = all_gather(torch.tensor([int(local_vocab)], dtype=torch.int64, device=device), group).view(-1).tolist()
    rank = dist.get_rank(group)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank], sum(sizes)


def _default_device(group):
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def no_grads(n):
    """``n`` Nones: the backward of an autograd.Function for inputs without a gradient."""
    return (None,) * n


# ---------------------------------------------------------------------------
# The exact merge of per-shard log-normalisers
# ---------------------------------------------------------------------------


def merge_lse(parts):
    """log sum_r exp(parts[r]) over dim 0, exact for -inf shards, NaN- and +inf-propagating.

    A shard whose entries are all -inf has lse -inf and adds nothing; a row whose
    shards are all -inf merges to -inf (no distribution); NaN or +inf anywhere
    merges to NaN / +inf, which the kernels then treat as a poisoned row.
    """
    m = parts.amax(dim=0)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return shift + torch.log(torch.exp(parts - shift).sum(dim=0))


def local_lse64(x, temperature):
    """This shard's log-normaliser m + log Z of x / T in float64, in one pass over the shard.

    A float32 lse rounds at the size of the logits (1e-3 absolute at 1e4), which the
    single-device softmax, log-probs and entropy avoid by forming (x/T - max) - log Z;
    the float64 lse keeps that precision through the merge.
    """
    # The float32 row state's max + log(sum), taken in float64
    # (csrc/include/kdext/row_contract.h, SplitLse).
    return ops.lse_float64(x, temperature)


def global_lse64(x, temperature, group):
    """The row's log-normaliser over the whole vocabulary, float64: one all-gather of 8 bytes per row."""
    return merge_lse(all_gather(local_lse64(x, temperature), group))
