"""Vocab-parallel logprobs of global token ids (single-device: kdext/logprobs.py).

One all-gather of the W shard sizes and one of (local lse, the owner's x_token / T) in
float64 per call; backward needs no collective (the one-hot term lands on the rank that
owns the token).
"""

import math

import torch

from .._ops import ops
from ..logprobs import check_tokens
from .collectives import all_gather, local_lse64, merge_lse, shard_range
from .softmax import check_logits, log_q, scaled


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
        picked = scaled(x.gather(-1, index).squeeze(-1), temperature)
        picked = torch.where(own, picked, picked.new_full((), -math.inf))
        # float64 for both columns: the lse for precision, x_token / T exactly
        local = torch.stack((local_lse64(x, temperature), picked.to(torch.float64)), dim=-1)
        both = all_gather(local, group)
        lse = merge_lse(both[..., 0])
        # the owner's x_token / T (the others sent -inf; NaN propagates), minus the lse
        out = log_q(both[..., 1].amax(dim=0).to(picked.dtype), lse)
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
    check_logits(logits, temperature, group)
    check_tokens(logits, tokens)
    return _LogProbs.apply(logits, tokens, float(temperature), group)
