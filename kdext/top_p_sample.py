"""Top-k / top-p sampling from the teacher-mixed distribution of MiniLLM, without sorting.

``top_p_sample`` draws one token per row from

    r = (1 - alpha) * softmax(logits / T) + alpha * softmax(teacher_logits / T)

after top-k and then top-p filtering of ``r`` (docs/DESIGN.md, "Sampling contract"), over
``torch.ops.kdext.top_p_sample`` (CPU kernel: csrc/cpu/top_p_sample.cpp, CUDA kernel:
csrc/cuda/top_p_sample.cu, shared math: csrc/include/kdext/top_p.h and philox.h).

``check_args`` and ``philox_seed_offset`` are also the argument checks and the Philox stream
of ``kdext.parallel.top_p_sample``, which must match this op's exactly.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import torch

from . import _validate
from ._ops import ops

__all__ = ["SampleResult", "top_p_sample"]

_U64 = 1 << 64


class SampleResult(NamedTuple):
    """What ``top_p_sample`` returns; every field has the shape ``logits.shape[:-1]``.

    tokens:          int64, the drawn token of each row (-1 for a row without a distribution).
    student_logprob: float32, log softmax(logits / T) at the token (unfiltered).
    teacher_logprob: float32, log softmax(teacher_logits / T) at the token (unfiltered); NaN
                     when no teacher logits were given.
    sample_logprob:  float32, log-probability of the token under the filtered, renormalized
                     distribution it was drawn from.
    threshold:       float32, the filter's threshold: token i was allowed iff r_i >= threshold,
                     with r computed in float32 as (1 - alpha) * exp(logits/T - lse_s)
                     + alpha * exp(teacher_logits/T - lse_t).
    """

    tokens: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    sample_logprob: torch.Tensor
    threshold: torch.Tensor


def _as_int64(x: int) -> int:
    """A 64-bit pattern as the signed integer the schema's `int` carries."""
    x %= _U64
    return x - _U64 if x >= 1 << 63 else x


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    raise RuntimeError(f"top_p_sample has no kernel for logits on {device}")


def philox_seed_offset(device: torch.device, generator: Optional[torch.Generator],
                       seed: Optional[int]) -> Tuple[int, int]:
    """(seed, offset) of the Philox stream for one call on ``device``, advancing ``generator``
    (or the device's default generator) as the call consumes it; see top_p_sample's docstring."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator to top_p_sample, not both")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return _as_int64(int(seed)), 0
    if generator is None:
        generator = _default_generator(device)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gdev = generator.device
    if gdev.type != device.type or (device.type == "cuda" and gdev.index is not None
                                    and device.index is not None and gdev.index != device.index):
        raise ValueError(f"generator is on {gdev} but logits are on {device}; they must be on the same device")
    if gdev.type == "cuda":
        # PyTorch's CUDA generators are Philox (seed, offset) with the offset counted in 32-bit
        # words and advanced by each sampler by what it consumes, rounded up to a multiple of 4
        # (philox_cuda_state). Every row here uses one 4-word Philox block, at the same
        # counter in its own subsequence, so a call consumes 4 words: counter block
        # ceil(offset / 4), and the generator moves on to 4 * (that block + 1).
        block = (generator.get_offset() + 3) // 4
        generator.set_offset(4 * (block + 1))
        return _as_int64(generator.initial_seed()), block
    # A CPU generator is a Mersenne twister without an offset: take 64 random bits from it
    # (advancing it exactly as one torch.randint draw does) as the Philox seed, at counter 0.
    word = torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64, generator=generator, device="cpu")
    return int(word), 0


INT64_MAX = (1 << 63) - 1  # the op's schema takes int64


def check_args(logits, teacher_logits, top_p, top_k, temperature, alpha, row_ids=None) -> None:
    """top_p_sample's argument checks: the C++ adapters' (csrc/top_p_sample_args.h), with the
    same words, so that fake tensors under torch.compile fail the same way."""
    _validate.check_logits(logits, "logits")
    if teacher_logits is not None:
        _validate.check_logits(teacher_logits, "teacher_logits")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a float, got {type(top_p).__name__}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 0 <= top_k <= INT64_MAX:
        raise ValueError(f"top_k must be in [0, 2**63 - 1] (0 turns top-k off), got {top_k}")
    _validate.check_temperature(temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if float(alpha) != 0.0 and teacher_logits is None:
        raise ValueError(f"alpha = {alpha} > 0 mixes in the teacher, but teacher_logits is None")
    if teacher_logits is not None:
        _validate.check_same_device(logits, "logits", teacher_logits, "teacher_logits")
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher_logits must have the shape of logits {list(logits.shape)}, "
                             f"got {list(teacher_logits.shape)}")
    if row_ids is not None:
        _validate.check_row_integers(row_ids, "row_ids", logits)
    if logits.shape[-1] >= 1 << 24:
        raise ValueError(f"logits has a vocabulary of {logits.shape[-1]} entries; top_p_sample supports "
                         "fewer than 2^24")


def top_p_sample(
    logits: torch.Tensor,
    top_p: float = 1.0,
    top_k: int = 0,
    temperature: float = 1.0,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    row_ids: Optional[torch.Tensor] = None,
) -> SampleResult:
    """Draws one token per row of ``logits`` (any leading dims; fp32, fp16, bf16 or fp64).

    The distribution is ``r = (1 - alpha) q + alpha p`` with ``q = softmax(logits / T)`` and
    ``p = softmax(teacher_logits / T)``. Top-k (``top_k = 0``: off) keeps token i iff fewer than
    ``top_k`` tokens are strictly more probable; top-p then keeps token i iff the mass of the
    tokens strictly more probable than i is ``< top_p`` times the mass top-k kept. Ties are all
    kept, ``top_p = 1`` keeps everything, a tiny ``top_p`` is greedy (all tied maxima kept).
    The kept tokens are renormalized and one is drawn by inverting their CDF in vocabulary
    order. Tokens with r = 0 (-inf logits, or probabilities below float32's range) are never
    drawn. All math is in float32 (float64 logits are read as float32).

    Random numbers: Philox4x32-10, one uniform per row from (seed, subsequence = the row's id,
    counter = offset), the same stream mapping on CPU and CUDA. A row's id is ``row_ids[row]``
    (int64 or int32, shape ``logits.shape[:-1]``; ids may repeat and may be any value), or its
    flat index in the batch when ``row_ids`` is None. So a row's draw never depends on the
    other rows' logits, and with ``row_ids`` (say, the examples' dataset indices) not on its
    position in the batch either: one call samples a whole batch exactly as one call per row
    with that row's id would. The seed comes from
      * ``seed`` (an int, taken mod 2^64; counter 0), or else
      * ``generator`` / the default generator of the logits' device: on CUDA, its Philox seed
        and offset (the call uses counter block ceil(offset / 4) and advances the generator's
        offset to 4 * (block + 1), as PyTorch's own samplers advance it; this reads the host-side
        offset, so it is not CUDA-graph-capturable); on CPU, 64 bits drawn from the Mersenne
        twister (one torch.randint), at counter 0.
    The same seed on the same device gives the same tokens (CPU and CUDA may differ in the
    last bits of r and hence, rarely, in a token).

    Returns a :class:`SampleResult`. With ``teacher_logits=None`` (allowed only for
    ``alpha = 0``) ``teacher_logprob`` is NaN. A row without a distribution (all logits -inf,
    or NaN / +inf logits on a side in use) gets token -1 and NaN in the four float outputs.
    Nothing here is differentiable: the inputs are detached; use kdext's log-prob ops for
    gradients.
    """
    check_args(logits, teacher_logits, top_p, top_k, temperature, alpha, row_ids)
    seed64, offset = philox_seed_offset(logits.device, generator, seed)
    out = ops.top_p_sample(
        logits.detach(),
        None if teacher_logits is None else teacher_logits.detach(),
        float(top_p),
        int(top_k),
        float(temperature),
        float(alpha),
        seed64,
        offset,
        row_ids,
    )
    return SampleResult(*out)


@torch.library.register_fake("kdext::top_p_sample")
def _top_p_sample_fake(logits, teacher_logits, top_p, top_k, temperature, alpha, seed, offset, row_ids=None):
    check_args(logits, teacher_logits, top_p, top_k, temperature, alpha, row_ids)
    shape = logits.shape[:-1]
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty(shape, dtype=torch.int64),
        logits.new_empty(shape, **f32),
        logits.new_empty(shape, **f32),
        logits.new_empty(shape, **f32),
        logits.new_empty(shape, **f32),
    )
