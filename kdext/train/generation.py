"""KV-cached sampling of responses, with optional teacher mixing (MiniLLM rollouts).

Each new token is drawn by ``kdext.top_p_sample`` from
``r = (1 - alpha) softmax(student / T) + alpha softmax(teacher / T)`` after top-k / top-p, and the
op also returns what MiniLLM's loss needs per token: log q(y), log p(y) (unfiltered, at T), the
log-probability under the filtered mixture it was drawn from, and the nucleus threshold.

Random numbers: one ``kdext.top_p_sample`` call per generated position draws the whole batch,
from the Philox stream (seed ``mix_seed(seed, t)`` for position ``t``, subsequence = the row's
id). The trainer derives ``seed`` from the run seed and the step (seeds.py), and gives each row its position
in the *global* batch as its id. A row's sample therefore does not depend on which process,
micro-batch or batch row it lands in, which is what makes 2 DDP processes reproduce 1 process
exactly and a resumed run reproduce an uninterrupted one.

Under ``--fsdp`` every forward all-gathers parameters, so every process must run as many as the
others: ``sync`` makes the loop run in lockstep (one tiny all-reduce per position: does any
process still have a live row, did any fail to sample), and a process whose rows have all ended
keeps stepping with padding until every process's have. Its result is cut back to its own last
live column, so it equals what the process alone would have sampled.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kdext

from .models import VocabAligner, position_ids
from .seeds import mix_seed


class NonFiniteLogits(FloatingPointError):
    """A row had no distribution to sample from (NaN / inf logits): the model has diverged."""


@dataclass
class Rollout:
    """Sampled responses in the batch layout's response block (right padded)."""

    response_ids: torch.Tensor  # [B, R] int64, pad after EOS
    response_mask: torch.Tensor  # [B, R] bool, EOS included
    student_logprob: torch.Tensor  # [B, R] float32 log q(y_t) at T (0 where masked)
    teacher_logprob: Optional[torch.Tensor]  # [B, R] log p(y_t) at T, None without a teacher
    sample_logprob: torch.Tensor  # [B, R] log r_filtered(y_t)
    threshold: torch.Tensor  # [B, R] nucleus threshold on r


def _cache_kwarg(model) -> str:
    """transformers >= 5.24 calls the KV cache ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _step(model, ids, mask, cache):
    """One forward: the whole prompt (cache None) or one new column; last position's logits."""
    name = _cache_kwarg(model)
    out = model(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=position_ids(mask)[:, -ids.shape[1] :],
        use_cache=True,
        logits_to_keep=1,
        **{name: cache},
    )
    return out.logits[:, -1, :], getattr(out, name)


def _no_distribution(tok: torch.Tensor, t: int) -> str:
    bad = (tok < 0).nonzero()[:, 0].tolist()
    return f"rows {bad} have NaN/inf logits at generated position {t}; cannot sample"


@torch.no_grad()
def sample(
    policy,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    aligner: VocabAligner,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    seed: int,
    row_ids: torch.Tensor,
    teacher=None,
    alpha: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    temperature: float = 1.0,
    sync: Optional[Callable[[bool, bool], tuple[bool, bool]]] = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` per row from ``policy`` (mixed with ``teacher`` by ``alpha``).

    A row stops after it emits EOS; the loop stops when every row has (or at the limit).
    ``teacher`` may be given with ``alpha == 0`` to get log p(y_t) without mixing. ``row_ids``
    ([B] integers) name the rows' random streams: a row's sample depends on (seed, its id) only.
    ``sync(running, failed) -> (any process running, any process failed)`` runs the loop in
    lockstep with the other processes (see the module docstring).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if alpha > 0 and teacher is None:
        raise ValueError("alpha > 0 (teacher-mixed sampling) needs a teacher model")
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    if tuple(row_ids.shape) != (B,):
        raise ValueError(f"row_ids must have one id per prompt row ({B}), got shape {list(row_ids.shape)}")
    row_ids = row_ids.to(device=device, dtype=torch.int64)
    mask = prompt_mask.clone()
    ids = prompt_ids
    s_cache = t_cache = None
    alive = torch.ones(B, dtype=torch.bool, device=device)
    cols = {k: [] for k in ("tok", "live", "slp", "tlp", "rlp", "thr")}
    for t in range(max_new_tokens):
        s_logits, s_cache = _step(policy, ids, mask, s_cache)
        s_logits = aligner(s_logits)
        t_logits = None
        if teacher is not None:
            t_logits, t_cache = _step(teacher, ids, mask, t_cache)
            t_logits = aligner(t_logits)
        out = kdext.top_p_sample(
            s_logits,
            top_p=top_p,
            top_k=top_k,
            temperature=temperature,
            teacher_logits=t_logits,
            alpha=alpha,
            seed=mix_seed(seed, t),
            row_ids=row_ids,
        )
        tok = out.tokens
        failed = bool((tok < 0).any())  # the op marks a row without a distribution with -1
        if failed and sync is None:
            raise NonFiniteLogits(_no_distribution(tok, t))
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        cols["tok"].append(tok)
        cols["live"].append(alive.clone())
        cols["slp"].append(out.student_logprob)
        if teacher is not None:
            cols["tlp"].append(out.teacher_logprob)
        cols["rlp"].append(out.sample_logprob)
        cols["thr"].append(out.threshold)
        alive = alive & (tok != eos_id)
        # The next forward sees the new column; finished rows get a masked pad there.
        ids = tok[:, None]
        mask = torch.cat([mask, cols["live"][-1][:, None]], dim=1)
        running = bool(alive.any()) and not failed
        if sync is not None:
            running, any_failed = sync(running, failed)
            if any_failed:
                raise NonFiniteLogits(_no_distribution(tok, t) if failed else
                                      f"another process had NaN/inf logits at generated position {t}; cannot sample")
        if not running:
            break

    if sync is not None:  # back to this process's own last live column
        width = max(i for i, c in enumerate(cols["live"]) if bool(c.any())) + 1
        cols = {k: v[:width] for k, v in cols.items()}
    live = torch.stack(cols["live"], dim=1)

    def block(name):
        return torch.stack(cols[name], dim=1).masked_fill(~live, 0.0)

    return Rollout(
        response_ids=torch.stack(cols["tok"], dim=1),
        response_mask=live,
        student_logprob=block("slp"),
        teacher_logprob=block("tlp") if teacher is not None else None,
        sample_logprob=block("rlp"),
        threshold=block("thr"),
    )
