"""The distillation methods: what each one trains on and which loss it minimises.

A method works on one micro-batch in two phases:

1. ``prepare(ctx, batch, step)`` (no gradients): build the rows to train on. Methods that learn
   from generated text sample them here (SeqKD from the teacher, GKD from the student, MiniLLM
   from the teacher-mixed student). It returns a :class:`Prepared` whose ``counts`` say how many
   tokens each loss term averages over.
2. ``terms(ctx, prepared)`` (with gradients): run the student (and the teacher, frozen) on those
   rows and return, per loss term, the *sum* over this micro-batch's tokens.

The trainer sums the token counts over all micro-batches and all processes first, then divides
each term's sum by its global count. That makes the loss (and its gradient) independent of how
the global batch is split into micro-batches and processes, which the DDP test checks.

Every vocabulary-wide quantity comes from a kdext op: ``kdext.logprobs`` (LM loss, policy
log-probs), ``kdext.distill_loss`` (the token-level divergences, and MiniLLM's single-step
reverse KL with each token's importance weight as its row weight, fused) and
``kdext.top_p_sample`` (every sampled token, in generation.py).
"""

from __future__ import annotations

import abc
import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import kdext

from . import generation
from .config import MethodConfig
from .data import Batch, concat_batches
from .models import VocabAligner, response_labels, response_logits, unwrap
from .options import ConfigError
from .seeds import Stream, stream_seed

# Every method registers itself here (``@register``), under its ``name``; METHODS lists them in
# registration order, which is the order of ``--method``'s choices and of the demo's report.
REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if cls.name in REGISTRY:
        raise AssertionError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Context:
    """What a method needs to run: models, vocabulary handling, token ids and settings."""

    student: torch.nn.Module  # possibly DDP-wrapped; forward through it, sample from unwrap()
    teacher: Optional[torch.nn.Module]
    aligner: VocabAligner
    pad_id: int
    eos_id: int
    cfg: MethodConfig
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Prepared:
    batch: Batch  # rows to train on; rollout rows (if any) come first
    n_rollout: int  # number of leading batch rows that are samples
    counts: dict[str, int]  # term -> number of tokens the term averages over (this micro-batch)
    stats: dict[str, tuple[float, int]] = field(default_factory=dict)  # name -> (sum, count) to log


def _sample_batch(ctx: Context, batch: Batch, policy, step: int, stream: Stream, teacher=None, alpha=0.0):
    """Replace a batch's responses by samples; returns (new batch, rollout)."""
    cfg = ctx.cfg
    with ctx.autocast():
        ro = generation.sample(
            policy,
            batch.prompt_ids,
            batch.prompt_mask,
            aligner=ctx.aligner,
            eos_id=ctx.eos_id,
            pad_id=ctx.pad_id,
            max_new_tokens=cfg.max_new_tokens,
            seed=stream_seed(cfg.seed, stream, step),
            row_ids=batch.index,
            teacher=teacher,
            alpha=alpha,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            temperature=cfg.temperature,
        )
    new = Batch(batch.prompt_ids, batch.prompt_mask, ro.response_ids, ro.response_mask, batch.index)
    return new, ro


def _teacher_rows(ctx: Context, batch: Batch) -> torch.Tensor:
    with torch.no_grad(), ctx.autocast():
        return ctx.aligner(response_logits(ctx.teacher, batch))


def _student_rows(ctx: Context, batch: Batch) -> torch.Tensor:
    with ctx.autocast():
        return ctx.aligner(response_logits(ctx.student, batch))


def _nll_sum(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -kdext.logprobs(rows, labels, temperature=1.0).sum()


def _divergence_sum(s_rows, t_rows, kind: str, cfg: MethodConfig) -> torch.Tensor:
    return kdext.distill_loss(
        s_rows,
        t_rows,
        kind=kind,
        temperature=cfg.temperature,
        reduction="sum",
        beta=cfg.beta,
        alpha=cfg.alpha,
    )


class Method(abc.ABC):
    """Base: trains on the data's rows as they are; ``main_term`` plus an optional LM loss."""

    name = "?"
    needs_teacher = True
    samples = False  # whether prepare() generates responses (up to --max-new-tokens after the prompt)
    stat_keys: tuple[str, ...] = ()  # what Prepared.stats may hold (logged per step)
    default_alpha = 0.0  # --alpha when not given (its meaning is the method's)

    @classmethod
    def steps_per_cycle(cls, cfg: MethodConfig) -> int:
        """Optimizer steps that share one batch of rollouts; checkpoints fall between cycles."""
        return 1

    def main_term(self, cfg: MethodConfig) -> str:
        return "nll"

    def weights(self, cfg: MethodConfig) -> dict[str, float]:
        """Loss = sum over terms of weight * (global sum / global token count)."""
        main = self.main_term(cfg)
        return {"nll": 1.0} if main == "nll" else {main: 1.0, "nll": cfg.lm_coef}

    def prepare(self, ctx: Context, batch: Batch, step: int) -> Prepared:
        n = int(batch.response_mask.sum())
        counts = {self.main_term(ctx.cfg): n}
        if ctx.cfg.lm_coef > 0:
            counts["nll"] = n
        return Prepared(batch, 0, counts)

    @abc.abstractmethod
    def terms(self, ctx: Context, prep: Prepared) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch, each a global-sum numerator (see combine)."""

    def combine(self, cfg: MethodConfig, terms: dict, counts: dict) -> torch.Tensor:
        """The loss: sum_k weight_k * term_k / count_k (counts: global token counts per term)."""
        w = self.weights(cfg)
        return sum(w[k] * terms[k] / max(1.0, float(counts[k])) for k in terms if w.get(k, 0.0) != 0)


@register
class SFT(Method):
    """Fine-tune the student on the data's responses (cross-entropy)."""

    name, needs_teacher = "sft", False

    def terms(self, ctx, prep):
        s = _student_rows(ctx, prep.batch)
        return {"nll": _nll_sum(s, response_labels(prep.batch))}


class _TokenDivergence(Method):
    """A token-level divergence to the teacher on the data's responses (+ optional LM loss)."""

    def terms(self, ctx, prep):
        kind = self.main_term(ctx.cfg)
        s = _student_rows(ctx, prep.batch)
        t = _teacher_rows(ctx, prep.batch)
        out = {kind: _divergence_sum(s, t, kind, ctx.cfg)}
        if ctx.cfg.lm_coef > 0:
            out["nll"] = _nll_sum(s, response_labels(prep.batch))
        return out


@register
class KD(_TokenDivergence):
    """Word-level KD: forward KL(p || q) per token on the data."""

    name = "kd"

    def main_term(self, cfg):
        return "forward_kl"


@register
class SeqKD(Method):
    """Sequence-level (black-box) KD: the teacher writes the responses, the student imitates them."""

    name = "seqkd"
    samples = True

    def prepare(self, ctx, batch, step):
        new, _ = _sample_batch(ctx, batch, ctx.teacher, step, Stream.SEQKD_ROLLOUT)
        return Prepared(new, new.prompt_ids.shape[0], {"nll": int(new.response_mask.sum())})

    def weights(self, cfg):
        return {"nll": 1.0}

    def terms(self, ctx, prep):
        s = _student_rows(ctx, prep.batch)
        return {"nll": _nll_sum(s, response_labels(prep.batch))}


@register
class RKL(_TokenDivergence):
    """Off-policy reverse KL(q || p) per token on the data."""

    name = "rkl"

    def main_term(self, cfg):
        return "reverse_kl"


@register
class GKD(Method):
    """Generalized KD: JSD(beta) per token; with probability lambda a step uses student samples.

    The coin is flipped once per optimizer step from (seed, step), so every process and every
    micro-batch of a step agrees, and a resumed run flips the same coins.
    """

    name = "gkd"
    samples = True
    stat_keys = ("on_policy",)

    def main_term(self, cfg):
        return "jsd"

    def on_policy(self, cfg: MethodConfig, step: int) -> bool:
        return random.Random(stream_seed(cfg.seed, Stream.GKD_COIN, step)).random() < cfg.lam

    def prepare(self, ctx, batch, step):
        cfg = ctx.cfg
        if not self.on_policy(cfg, step):
            prep = super().prepare(ctx, batch, step)
            prep.stats["on_policy"] = (0.0, 1)
            return prep
        sampled, _ = _sample_batch(ctx, batch, unwrap(ctx.student), step, Stream.GKD_ROLLOUT)
        counts = {"jsd": int(sampled.response_mask.sum())}
        rows = sampled
        if cfg.lm_coef > 0:  # the LM loss stays on the data: append the data rows
            rows = concat_batches(sampled, batch, ctx.pad_id)
            counts["nll"] = int(batch.response_mask.sum())
        return Prepared(rows, sampled.prompt_ids.shape[0], counts, {"on_policy": (1.0, 1)})

    def terms(self, ctx, prep):
        s = _student_rows(ctx, prep.batch)
        labels = response_labels(prep.batch)
        n_kd = _rows_of(prep.batch, prep.n_rollout) if prep.n_rollout else s.shape[0]
        kd_batch = _first_rows(prep.batch, prep.n_rollout) if prep.n_rollout else prep.batch
        t = _teacher_rows(ctx, kd_batch)
        out = {"jsd": _divergence_sum(s[:n_kd], t, "jsd", ctx.cfg)}
        if ctx.cfg.lm_coef > 0:
            lm_rows = slice(n_kd, None) if prep.n_rollout else slice(None)
            out["nll"] = _nll_sum(s[lm_rows], labels[lm_rows])
        return out


@register
class DistiLLM(_TokenDivergence):
    """DistiLLM's skew KL(p || a p + (1-a) q) or skew reverse KL(q || (1-a) p + a q), a = --alpha."""

    name = "distillm"
    default_alpha = 0.1

    def main_term(self, cfg):
        return cfg.skew


@register
class MiniLLM(Method):
    """MiniLLM: reverse-KL policy gradient on teacher-mixed samples (Gu et al., 2024).

    Per response token t of a rollout y ~ (1-a) q + a p (top-p filtered):
      reward        r_t = log p(y_t) - log q(y_t)                  (rollout-time values, at T)
      return        R_t = sum_{k>t} gamma^(k-t-1) r_k / #{k > t}   (length normalised; 0 at the end)
      weight        w_t = q(y_t) / ((1-a) q(y_t) + a p(y_t))       (importance weight, constant)
      ratio         rho_t = exp(log q_theta(y_t) - log q_old(y_t))
      PG term       w_t * max(-R_t rho_t, -R_t clip(rho_t, 1-eps, 1+eps))
      single-step   w_t * KL(q_theta(.|y<t) || p(.|y<t))            (exact, full vocabulary)
    averaged over rollout tokens, plus lm_coef * the LM loss averaged over the data's tokens.
    The current token's reward is not in R_t because the single-step term already accounts
    for it exactly (the paper's decomposition of the gradient).

    With ppo_epochs = E > 1 a batch of rollouts serves E consecutive optimizer steps (rho then
    moves away from 1 and the clip matters); the data for the LM loss is fresh every step.
    """

    name = "minillm"
    samples = True
    stat_keys = ("reward", "response_len")
    default_alpha = 0.2

    @classmethod
    def steps_per_cycle(cls, cfg):
        return cfg.ppo_epochs

    def __init__(self):
        self._cache: dict[tuple[int, int], Batch] = {}  # (cycle, first row index) -> rollout batch

    def weights(self, cfg):
        return {"pg": 1.0, "single": 1.0, "nll": cfg.lm_coef}

    def rollout(self, ctx: Context, batch: Batch, step: int) -> Batch:
        """Sample from the teacher-mixed student; the batch carries what the loss needs."""
        sampled, ro = _sample_batch(
            ctx, batch, unwrap(ctx.student), step, Stream.MINILLM_ROLLOUT, teacher=ctx.teacher, alpha=ctx.cfg.alpha
        )
        return self.attach(sampled, ro.student_logprob, ro.teacher_logprob, ctx.cfg)

    @staticmethod
    def attach(sampled: Batch, student_logprob, teacher_logprob, cfg: MethodConfig) -> Batch:
        """Rewards, normalised returns, importance weights and old log-probs, as batch extras."""
        m = sampled.response_mask
        reward = (teacher_logprob - student_logprob).masked_fill(~m, 0.0)
        sampled.extras = {
            "old_logprob": student_logprob.masked_fill(~m, 0.0),
            "teacher_logprob": teacher_logprob.masked_fill(~m, 0.0),
            "reward": reward,
            "returns": normalized_returns(reward, m, cfg.gamma),
            "weight": importance_weight(student_logprob, teacher_logprob, cfg.alpha).masked_fill(~m, 0.0),
            "mask": m,
        }
        return sampled

    def prepare(self, ctx, batch, step):
        cfg = ctx.cfg
        steps = self.steps_per_cycle(cfg)
        cycle = step // steps
        key = (cycle, int(batch.index[0]))
        if key not in self._cache or steps == 1:
            # Rollouts of a cycle come from the prompts of the cycle's first step.
            self._cache = {k: v for k, v in self._cache.items() if k[0] == cycle}
            self._cache[key] = self.rollout(ctx, batch, step)
        return self.assemble(cfg, self._cache[key], batch, ctx.pad_id)

    @staticmethod
    def assemble(cfg: MethodConfig, sampled: Batch, data: Batch, pad_id: int) -> Prepared:
        """Rollout rows first, then (for the LM loss) the data rows, in one batch."""
        rows = concat_batches(sampled, data, pad_id) if cfg.lm_coef > 0 else sampled
        rows.extras = sampled.extras
        m = sampled.response_mask
        n_roll = int(m.sum())
        counts = {"pg": n_roll, "single": n_roll}
        if cfg.lm_coef > 0:
            counts["nll"] = int(data.response_mask.sum())
        stats = {
            "reward": (float(sampled.extras["reward"][m].sum()), n_roll),
            "response_len": (float(n_roll), m.shape[0]),
        }
        return Prepared(rows, sampled.prompt_ids.shape[0], counts, stats)

    def terms(self, ctx, prep):
        cfg = ctx.cfg
        ex = prep.batch.extras
        s = _student_rows(ctx, prep.batch)
        labels = response_labels(prep.batch)
        roll_batch = _first_rows(prep.batch, prep.n_rollout)
        m = ex["mask"]  # the rollout's own [B, R] mask (the concatenated batch may be wider)
        n = int(m.sum())
        s_roll = s[:n]
        t_roll = _teacher_rows(ctx, roll_batch)
        logq = kdext.logprobs(s_roll, labels[:n], temperature=cfg.temperature)
        w, adv, old = ex["weight"][m], ex["returns"][m], ex["old_logprob"][m]
        out = {
            "pg": (w * clipped_pg(logq, old, adv, cfg.clip_eps)).sum(),
            "single": kdext.distill_loss(s_roll, t_roll, "reverse_kl", temperature=cfg.temperature,
                                         reduction="sum", weights=w),
        }
        if cfg.lm_coef > 0:
            out["nll"] = _nll_sum(s[n:], labels[n:])
        return out


def _first_rows(batch: Batch, k: int) -> Batch:
    return Batch(
        batch.prompt_ids[:k], batch.prompt_mask[:k], batch.response_ids[:k], batch.response_mask[:k], batch.index[:k]
    )


def _rows_of(batch: Batch, k: int) -> int:
    """Number of response-token rows belonging to the first k batch rows."""
    return int(batch.response_mask[:k].sum())


def normalized_returns(reward: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{k>t} gamma^(k-t-1) r_k / #{valid k > t}; 0 where no token follows.

    ``mask`` marks a right-padded prefix of valid tokens per row.
    """
    r = reward.masked_fill(~mask, 0.0).float()
    out = torch.zeros_like(r)
    acc = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        out[:, t] = acc  # discounted sum of the rewards after t
        acc = r[:, t] + gamma * acc
    m = mask.float()
    remaining = m.flip(-1).cumsum(-1).flip(-1) - m  # valid tokens strictly after t
    return torch.where(remaining > 0, out / remaining.clamp(min=1), torch.zeros_like(out)) * m


def importance_weight(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, alpha: float) -> torch.Tensor:
    """w = q / ((1 - a) q + a p), from log-probs; exactly 1 when alpha == 0."""
    if alpha == 0:
        return torch.ones_like(student_logprob)
    # log of the mixture, stable: logaddexp(log(1-a) + log q, log a + log p)
    log_mix = torch.logaddexp(
        student_logprob + torch.log1p(torch.tensor(-alpha, dtype=student_logprob.dtype)),
        teacher_logprob + torch.log(torch.tensor(alpha, dtype=student_logprob.dtype)),
    )
    return torch.exp(student_logprob - log_mix)


def clipped_pg(logq: torch.Tensor, old_logq: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's clipped surrogate per token: max(-A rho, -A clip(rho, 1-eps, 1+eps))."""
    rho = torch.exp(logq - old_logq)
    return torch.maximum(-adv * rho, -adv * rho.clamp(1.0 - eps, 1.0 + eps))


METHODS = tuple(REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {name!r}")
    return REGISTRY[name]


def make(name: str) -> Method:
    return method_class(name)()
