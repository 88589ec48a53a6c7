"""The vocabulary-wide terms of every loss, from a model's response rows.

A model's rows (:class:`Rows`) are, by default, its final hidden states at the positions that
predict the response tokens together with its LM head (:class:`Head`): kdext's fused LM-head
ops (``kdext.fused_linear_logprobs``, ``kdext.fused_linear_distill_loss``) project them a
chunk of rows at a time, so no ``[N, V]`` logits tensor is created for a loss. With
``--no-fused-linear`` they are the logits rows themselves (through ``VocabAligner``), and the
same terms run on ``kdext.logprobs`` / ``kdext.distill_loss`` / ``kdext.entropy``.

Both forms see the same vocabulary: the head's rows of real tokens (``weight[:n_tokens]``; the
ids a padded head adds are left out, exactly as VocabAligner sets them to -inf), and the
model's logit transform from its config: Cohere's ``logit_scale`` (multiplied), Granite's
``logits_scaling`` (divided by), Gemma 2/3's ``final_logit_softcapping``. ``check_head``
verifies, once per model, that the fused form reproduces the model's own logits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import kdext
from kdext.fused_linear import _is_dtensor  # the ops' own test, so both agree on what is gathered

from .models import ModelError, unwrap


@dataclass(frozen=True)
class Head:
    """A model's LM head restricted to the tokenizer's ids, and its logit transform:
    ``z = softcap tanh(logit_scale (h W^T + b) / softcap)``."""

    weight: torch.Tensor  # [n_tokens, H]
    bias: Optional[torch.Tensor]
    logit_scale: float = 1.0
    softcap: Optional[float] = None


def logit_transform(config) -> tuple[float, Optional[float]]:
    """(logit scale, softcap) of a transformers config (1.0 and None for most models)."""
    scale = 1.0
    if isinstance(getattr(config, "logit_scale", None), (int, float)):  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if isinstance(getattr(config, "logits_scaling", None), (int, float)):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, (float(cap) if cap else None)


def _head_params(m) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The head's (weight, bias) as whole tensors. Under --fsdp (sharding.py) a unit's
    parameters are dim-0 shards (DTensors) outside its forward. The student's head unit stays
    gathered from its forward to its backward, so right after the forward they are the unsharded
    parameters: the fused losses use them for every chunk, and FSDP's post-backward
    reduce-scatters the gradient they accumulate. A head that is sharded here is gathered once
    (one all-gather per call of this function, i.e. per model forward of a micro-batch, however
    many chunks and fused calls follow): the frozen teacher's, whose units reshard after each
    forward, under no_grad (a constant); a trained one by unsharding its FSDP unit, so that its
    gradient still goes through FSDP's reduce-scatter rather than DTensor's local slice."""
    lin = m.get_output_embeddings()
    weight, bias = lin.weight, getattr(lin, "bias", None)
    if not _is_dtensor(weight):
        return weight, bias
    if torch.is_grad_enabled() and weight.requires_grad:
        from .sharding import head_unit

        head_unit(m).unshard()  # resharded by FSDP after the backward
        return lin.weight, getattr(lin, "bias", None)
    with torch.no_grad():
        return weight.full_tensor(), (bias.full_tensor() if bias is not None else None)


def lm_head(model, n_tokens: int) -> Head:
    """The head of ``model`` (possibly DDP-wrapped or FSDP-sharded) over the first ``n_tokens`` ids."""
    m = unwrap(model)
    scale, cap = logit_transform(m.config)
    weight, bias = _head_params(m)
    return Head(weight[:n_tokens], bias[:n_tokens] if bias is not None else None, scale, cap)


@dataclass
class Rows:
    """One model's response rows: ``hidden`` [N, H] with ``head`` (fused), or ``logits`` [N, V]."""

    hidden: Optional[torch.Tensor] = None
    head: Optional[Head] = None
    logits: Optional[torch.Tensor] = None
    # The context the fused ops run in (the trainer's bf16 autocast on CUDA), so that their
    # GEMMs run in the dtype the model's own LM head would.
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)

    @property
    def fused(self) -> bool:
        return self.hidden is not None

    def __len__(self) -> int:
        return (self.hidden if self.fused else self.logits).shape[0]

    def __getitem__(self, rows: slice) -> "Rows":
        if self.fused:
            return Rows(hidden=self.hidden[rows], head=self.head, autocast=self.autocast)
        return Rows(logits=self.logits[rows], autocast=self.autocast)


def logprobs(rows: Rows, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row log q(token) at ``temperature``, differentiable."""
    if not rows.fused:
        return kdext.logprobs(rows.logits, tokens, temperature=temperature)
    h = rows.head
    with rows.autocast():
        return kdext.fused_linear_logprobs(rows.hidden, h.weight, tokens, bias=h.bias, temperature=temperature,
                                           logit_scale=h.logit_scale, softcap=h.softcap)


@torch.no_grad()
def entropy_sum(rows: Rows, temperature: float) -> torch.Tensor:
    """Sum over the rows of the entropy of softmax(z / T) (a constant: no gradient)."""
    if not rows.fused:
        return kdext.entropy(rows.logits.float(), temperature).sum()
    h = rows.head
    tokens = torch.zeros(rows.hidden.shape[:-1], dtype=torch.long, device=rows.hidden.device)
    with rows.autocast():
        _, ent = kdext.fused_linear_logprobs(rows.hidden, h.weight, tokens, bias=h.bias, temperature=temperature,
                                             logit_scale=h.logit_scale, softcap=h.softcap, return_entropy=True)
    return ent.sum()


def divergence_sum(student: Rows, teacher: Rows, kind: str, temperature: float, beta: float = 0.5,
                   alpha: float = 0.1, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over the rows of ``kind``(q_student || p_teacher) at ``temperature`` (times ``weights``),
    differentiable in the student; the teacher is a constant."""
    if not student.fused:
        return kdext.distill_loss(student.logits, teacher.logits, kind=kind, temperature=temperature,
                                  reduction="sum", beta=beta, alpha=alpha, weights=weights)
    s, t = student.head, teacher.head
    with student.autocast():
        return kdext.fused_linear_distill_loss(
            student.hidden, s.weight, teacher.hidden, t.weight, kind, temperature=temperature, reduction="sum",
            beta=beta, alpha=alpha, weights=weights, student_bias=s.bias, teacher_bias=t.bias,
            student_logit_scale=s.logit_scale, teacher_logit_scale=t.logit_scale, student_softcap=s.softcap,
            teacher_softcap=t.softcap)


@torch.no_grad()
def check_head(model, n_tokens: int, device, arg: str) -> None:
    """Refuse (ModelError naming ``arg``) a model whose logits the fused form does not reproduce:
    one forward of a few tokens, the model's own last-position logits against
    ``transform(h W^T + b)`` of its final hidden state, in float64. Run by step.build on each
    model before it is sharded or wrapped."""
    from .models import final_hidden

    m = unwrap(model)
    ids = torch.arange(min(4, n_tokens), device=device)[None]
    hidden, out = final_hidden(m, 1, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    head = lm_head(m, n_tokens)
    z = hidden[0, -1].double() @ head.weight.double().T
    if head.bias is not None:
        z = z + head.bias.double()
    z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    want = out.logits[0, -1, :n_tokens].double()
    err = (z - want).abs().max().item()
    # The model rounds its logits to its own dtype (bf16 under --fsdp with bf16): allow that
    # rounding and an fp32 GEMM's; a wrong transform (a scale, a cap) is off by O(|z|).
    rel = max(1e-4, 2 * torch.finfo(out.logits.dtype).eps)
    if not err <= rel * (1.0 + want.abs().max().item()) or not math.isfinite(err):
        raise ModelError(
            f"{arg}: the fused LM-head losses cannot reproduce this model's logits from its final hidden state "
            f"and get_output_embeddings() (max difference {err:.3g}); its logits go through a transform kdext does "
            "not know. Run with --no-fused-linear."
        )
