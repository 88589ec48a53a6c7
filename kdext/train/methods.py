"""The distillation methods: what each one trains on and which loss it minimises.

A method works on one optimizer step in two phases:

1. ``prepare_step(ctx, step)`` (no gradients): build the rows of every micro-batch of this
   process. Methods that learn from generated text sample them here (SeqKD from the teacher,
   GKD and DistiLLM from the student, MiniLLM from the teacher-mixed student). Each micro-batch
   is a :class:`Prepared` whose ``counts`` say how many tokens each loss term averages over.
   By default this is ``prepare(ctx, batch, step, micro)`` on each data micro-batch.
2. ``terms(ctx, prepared)`` (with gradients): run the student (and the teacher, frozen) on those
   rows and return, per loss term, the *sum* over this micro-batch's tokens.

The trainer turns sums into means one of two ways (``--token-mean``, step.py): ``global``
divides each term's sum by its token count over all micro-batches and processes, so the loss is
independent of how the global batch is split; ``micro_batch`` takes each micro-batch's token
mean and averages those over micro-batches and processes (LMOps' and DistiLLM's DeepSpeed
loop), independent of the split at a fixed ``--batch-size``.

Every method's loss is ``main terms + lm_coef * LM term + hidden_coef * hidden term``:

* the LM term is ``(1 - kd_ratio) CE + kd_ratio H(p, q)`` (both at T = 1) on ``--lm-data``'s
  documents when given, else on the data's responses (appended to the rows when the main term
  trains on samples, shared with them when it trains on the data);
* the hidden term (hidden.py) compares hidden states on the main term's rows.

Every vocabulary-wide quantity of a loss comes from heads.py, on each model's response rows:
by default its final hidden states with its LM head, through kdext's fused LM-head ops
(``kdext.fused_linear_logprobs``: LM loss, policy log-probs, H(p) in the LM term's
cross-entropy; ``kdext.fused_linear_distill_loss``: the token-level divergences, MiniLLM's
single-step reverse KL), so that no [N, V] logits tensor exists; with ``--no-fused-linear``
the logits rows and ``kdext.logprobs`` / ``kdext.distill_loss`` / ``kdext.entropy``. Every
sampled token comes from ``kdext.top_p_sample`` on last-position logits (generation.py).
MiniLLM lives in minillm.py, DistiLLM in distillm.py.
"""

from __future__ import annotations

import abc
import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import generation, heads
from .config import MethodConfig
from .data import Batch, concat_batches
from .distributed import Dist
from .heads import Rows
from .models import VocabAligner, response_hidden, response_labels, response_logits, unwrap
from .options import ConfigError
from .seeds import Stream, stream_seed

# Every method registers itself here (``@register``), under its ``name``; METHODS lists them in
# the order of ``--method``'s choices and of the demo's report: this one, then any other method
# in registration order. (DistiLLM and MiniLLM live in their own modules, which this one
# imports; whichever of the three is imported first, the order is the same.)
_ORDER = ("sft", "kd", "seqkd", "rkl", "gkd", "distillm", "minillm")
REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if cls.name in REGISTRY:
        raise AssertionError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    ranked = sorted(REGISTRY.values(), key=lambda c: _ORDER.index(c.name) if c.name in _ORDER else len(_ORDER))
    REGISTRY.clear()
    REGISTRY.update((c.name, c) for c in ranked)
    return cls


@dataclass
class Context:
    """What a method needs to run: models, vocabulary handling, token ids, settings, the run's shape."""

    student: torch.nn.Module  # possibly DDP-wrapped; forward through it, sample from unwrap()
    teacher: Optional[torch.nn.Module]
    aligner: VocabAligner
    pad_id: int
    eos_id: int
    cfg: MethodConfig
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    dd: Dist = field(default_factory=Dist)
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1
    data: Optional[Callable[[int, int], Batch]] = None  # (step, micro) -> this process's data micro-batch
    lm: Optional[Callable[[int, int], Batch]] = None  # (step, micro) -> its --lm-data micro-batch
    hidden: Optional[torch.nn.Module] = None  # hidden.HiddenProjection when --hidden-coef > 0
    fused_linear: bool = True  # losses from hidden states and LM heads (heads.py); False: --no-fused-linear
    # --fsdp on several processes: generation.sample's ``sync`` (sampling loops in lockstep)
    lockstep: Optional[Callable[[bool, bool], tuple[bool, bool]]] = None
    teacher_cache: Optional[object] = None  # cached_teacher.TeacherCache (--teacher-cache): replaces teacher

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.dd.world


@dataclass
class Prepared:
    batch: Batch  # the main term's rows first, then (unless lm_shared) the LM term's rows
    n_main: int  # number of leading batch rows the main term trains on
    counts: dict[str, int]  # term -> number of tokens the term averages over (this micro-batch)
    stats: dict[str, tuple[float, int]] = field(default_factory=dict)  # name -> (sum, count) to log
    lm_shared: bool = False  # the LM term trains on the main rows themselves


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside the block, its previous mode after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def sample_batch(ctx: Context, batch: Batch, policy, step: int, stream: Stream, teacher=None, alpha=0.0):
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
            sync=ctx.lockstep,
        )
    new = Batch(batch.prompt_ids, batch.prompt_mask, ro.response_ids, ro.response_mask, batch.index)
    return new, ro


def model_rows(ctx: Context, model, batch: Batch, hidden: bool = False):
    """A model's response rows of a batch (heads.Rows: its final hidden states and LM head, or
    with --no-fused-linear its aligned logits), and its hidden-state rows with ``hidden``. The
    forward runs under ``ctx.autocast``; the caller sets grad mode."""
    with ctx.autocast():
        if ctx.fused_linear:
            out = response_hidden(model, batch, hidden_states=hidden)
            rows, states = out if hidden else (out, None)
            rows = Rows(hidden=rows, head=heads.lm_head(model, ctx.aligner.n_tokens), autocast=ctx.autocast)
        else:
            out = response_logits(model, batch, hidden_states=hidden)
            rows, states = out if hidden else (out, None)
            rows = Rows(logits=ctx.aligner(rows), autocast=ctx.autocast)
    return (rows, states) if hidden else rows


def teacher_rows(ctx: Context, batch: Batch, hidden: bool = False):
    """The teacher's rows of a batch (and its hidden-state rows with ``hidden``), no gradients; with
    --teacher-cache its cached top-k rows (cached_teacher.SparseRows; no hidden states)."""
    if ctx.teacher_cache is not None:
        return ctx.teacher_cache.rows(batch, ctx.cfg.sparse_tail)
    with torch.no_grad():
        return model_rows(ctx, ctx.teacher, batch, hidden)


def student_rows(ctx: Context, batch: Batch, hidden: bool = False):
    return model_rows(ctx, ctx.student, batch, hidden)


def nll_sum(rows: Rows, labels: torch.Tensor) -> torch.Tensor:
    return -heads.logprobs(rows, labels, 1.0).sum()


def cross_entropy_sum(s_rows: Rows, t_rows: Rows) -> torch.Tensor:
    """sum over rows of H(p, q) = KL(p || q) + H(p), both at T = 1 (H(p) a constant)."""
    return heads.divergence_sum(s_rows, t_rows, "forward_kl", 1.0) + heads.entropy_sum(t_rows, 1.0)


def divergence_sum(s_rows: Rows, t_rows, kind: str, cfg: MethodConfig) -> torch.Tensor:
    if not isinstance(t_rows, Rows):  # cached teacher rows: kdext.sparse_distill_loss of the same kind
        return t_rows.divergence_sum(s_rows.logits, kind, cfg)  # a cache runs the logits path (step.build)
    return heads.divergence_sum(s_rows, t_rows, kind, cfg.temperature, beta=cfg.beta, alpha=cfg.alpha)


def first_rows(batch: Batch, k: int) -> Batch:
    return Batch(
        batch.prompt_ids[:k], batch.prompt_mask[:k], batch.response_ids[:k], batch.response_mask[:k], batch.index[:k]
    )


def rest_rows(batch: Batch, k: int) -> Batch:
    return Batch(
        batch.prompt_ids[k:], batch.prompt_mask[k:], batch.response_ids[k:], batch.response_mask[k:], batch.index[k:]
    )


def tokens_of_rows(batch: Batch, k: int) -> int:
    """Number of response-token rows belonging to the first k batch rows."""
    return int(batch.response_mask[:k].sum())


class Method(abc.ABC):
    """Base: trains on the data's rows as they are; the main terms, the LM term, the hidden term."""

    name = "?"
    needs_teacher = True
    samples = False  # whether prepare() generates responses (up to --max-new-tokens after the prompt)
    has_lm_term = True  # --lm-coef / --lm-data apply (no method with it has an "nll" main term)
    main_uses_teacher = True  # the main terms need the teacher's logits on the main rows
    train_mode = True  # the student's mode in the loss forward (MiniLLM: eval, no dropout)
    stat_keys: tuple[str, ...] = ()  # what Prepared.stats may hold (logged per step)
    default_alpha = 0.0  # --alpha when not given (its meaning is the method's)
    default_token_mean = "global"  # --token-mean when not given
    default_kd_ratio = 0.0  # --kd-ratio when not given

    @classmethod
    def steps_per_cycle(cls, cfg: MethodConfig) -> int:
        """Optimizer steps that share one batch of rollouts; checkpoints fall between cycles."""
        return 1

    @classmethod
    def data_batches(cls, cfg: MethodConfig, steps: int) -> int:
        """Global batches of --data whose prompts the first ``steps`` optimizer steps used."""
        return steps

    @classmethod
    def check_config(cls, cfg) -> None:
        """The method's own rules on a TrainConfig (ConfigError naming the flag)."""

    def setup(self, s) -> None:
        """Called once by step.build with the run's Setup (before any step or resume)."""

    def state_dict(self) -> Optional[dict]:
        """State to checkpoint beside the model (None: the method keeps none)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError(f"{self.name} keeps no state")

    def after_step(self, ctx: Context, steps_done: int) -> dict:
        """Called after each optimizer step; returns extra metrics for the step's record."""
        return {}

    def main_terms(self, cfg: MethodConfig) -> dict[str, float]:
        """The main terms and their weights."""
        return {"nll": 1.0}

    def weights(self, cfg: MethodConfig) -> dict[str, float]:
        """Loss = sum over terms of weight * (term sum / its token count)."""
        w = dict(self.main_terms(cfg))
        if self.has_lm_term and cfg.lm_coef > 0:
            w["nll"] = w.get("nll", 0.0) + cfg.lm_coef * (1.0 - cfg.kd_ratio)
            if cfg.kd_ratio > 0:
                w["lm_kd"] = cfg.lm_coef * cfg.kd_ratio
        if cfg.hidden_coef > 0:
            w["hidden"] = cfg.hidden_coef
        return w

    def prepare_step(self, ctx: Context, step: int) -> list[Prepared]:
        """Every micro-batch of this process at ``step`` (no gradients)."""
        return [self.prepare(ctx, ctx.data(step, a), step, a) for a in range(ctx.grad_accum)]

    def prepare(self, ctx: Context, batch: Batch, step: int, micro: int = 0) -> Prepared:
        return self.with_lm(ctx, batch, batch, step, micro)

    def with_lm(self, ctx: Context, main: Batch, data: Batch, step: int, micro: int, stats=None) -> Prepared:
        """``main`` rows (the main terms') plus the LM term's rows: ``--lm-data``'s micro-batch,
        else ``data``, shared with ``main`` when it is the same batch."""
        cfg = ctx.cfg
        n = int(main.response_mask.sum())
        counts = {k: n for k in self.main_terms(cfg)}
        if cfg.hidden_coef > 0:
            counts["hidden"] = n
        stats = dict(stats or {})
        n_main = main.prompt_ids.shape[0]
        if not (self.has_lm_term and cfg.lm_coef > 0):
            return Prepared(main, n_main, counts, stats)
        lm = ctx.lm(step, micro) if ctx.lm is not None else data
        lm_counts = {k: int(lm.response_mask.sum()) for k in ("nll", "lm_kd")}
        if lm is main:
            counts.update(lm_counts)
            return Prepared(main, n_main, counts, stats, lm_shared=True)
        rows = concat_batches(main, lm, ctx.pad_id)
        rows.extras = main.extras
        counts.update(lm_counts)
        return Prepared(rows, n_main, counts, stats)

    def main_loss(self, ctx: Context, prep: Prepared, s: torch.Tensor, y: torch.Tensor, t) -> dict:
        """The main terms' sums from the main rows' student logits ``s``, labels ``y`` and teacher
        logits ``t`` (None unless ``main_uses_teacher``)."""
        return {"nll": nll_sum(s, y)}

    def terms(self, ctx: Context, prep: Prepared) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch, each a sum over its tokens (see step.py)."""
        cfg = ctx.cfg
        hidden = ctx.hidden is not None
        s, s_states = student_rows(ctx, prep.batch, True) if hidden else (student_rows(ctx, prep.batch), None)
        labels = response_labels(prep.batch)
        n = tokens_of_rows(prep.batch, prep.n_main)
        main = first_rows(prep.batch, prep.n_main)
        w = self.weights(cfg)
        lm_on = self.has_lm_term and (w.get("nll", 0) or w.get("lm_kd", 0)) and cfg.lm_coef > 0
        need_t = self.main_uses_teacher or hidden or (lm_on and prep.lm_shared and cfg.kd_ratio > 0)
        t = t_states = None
        if need_t:
            t, t_states = teacher_rows(ctx, main, True) if hidden else (teacher_rows(ctx, main), None)
        out = self.main_loss(ctx, prep, s[:n], labels[:n], t)
        if lm_on:
            out.update(self.lm_loss(ctx, prep, s, labels, n, t))
        if hidden:
            out["hidden"] = ctx.hidden.loss_sum([x[:n] for x in s_states], t_states)
        return out

    def lm_loss(self, ctx, prep, s, labels, n, t_main) -> dict:
        """The LM term's sums: CE and (kd_ratio > 0) the teacher cross-entropy H(p, q), at T = 1."""
        cfg = ctx.cfg
        if prep.lm_shared:
            s_lm, y_lm, t_lm = s[:n], labels[:n], t_main
        else:
            s_lm, y_lm = s[n:], labels[n:]
            t_lm = teacher_rows(ctx, rest_rows(prep.batch, prep.n_main)) if cfg.kd_ratio > 0 else None
        out = {"nll": nll_sum(s_lm, y_lm)}
        if cfg.kd_ratio > 0:
            out["lm_kd"] = cross_entropy_sum(s_lm, t_lm)
        return out

    def combine(self, cfg: MethodConfig, terms: dict, counts: dict) -> torch.Tensor:
        """The loss: sum_k weight_k * term_k / count_k."""
        w = self.weights(cfg)
        return sum(w[k] * terms[k] / max(1.0, float(counts[k])) for k in terms if w.get(k, 0.0) != 0)


@register
class SFT(Method):
    """Fine-tune the student on the data's responses (cross-entropy)."""

    name, needs_teacher, has_lm_term, main_uses_teacher = "sft", False, False, False


class _TokenDivergence(Method):
    """A token-level divergence to the teacher on the data's responses."""

    kind = "?"

    def main_terms(self, cfg):
        return {self.kind: 1.0}

    def main_loss(self, ctx, prep, s, y, t):
        return {self.kind: divergence_sum(s, t, self.kind, ctx.cfg)}


@register
class KD(_TokenDivergence):
    """Word-level KD: forward KL(p || q) per token on the data."""

    name, kind = "kd", "forward_kl"


@register
class SeqKD(Method):
    """Sequence-level (black-box) KD: the teacher writes the responses, the student imitates them."""

    name, has_lm_term, main_uses_teacher = "seqkd", False, False
    samples = True

    def prepare(self, ctx, batch, step, micro=0):
        new, _ = sample_batch(ctx, batch, ctx.teacher, step, Stream.SEQKD_ROLLOUT)
        return self.with_lm(ctx, new, batch, step, micro)


@register
class RKL(_TokenDivergence):
    """Off-policy reverse KL(q || p) per token on the data."""

    name, kind = "rkl", "reverse_kl"


@register
class GKD(_TokenDivergence):
    """Generalized KD: JSD(beta) per token; with probability lambda a step uses student samples.

    The loss is TRL's ``GKDTrainer.generalized_jsd_loss`` (kdext's ``jsd``; beta = 0 forward KL,
    beta = 1 reverse KL). The coin is flipped once per optimizer step from (seed, step), so every
    process and every micro-batch of a step agrees, and a resumed run flips the same coins.
    """

    name, kind = "gkd", "jsd"
    samples = True
    stat_keys = ("on_policy",)

    def on_policy(self, cfg: MethodConfig, step: int) -> bool:
        return random.Random(stream_seed(cfg.seed, Stream.GKD_COIN, step)).random() < cfg.lam

    def prepare(self, ctx, batch, step, micro=0):
        if not self.on_policy(ctx.cfg, step):
            return self.with_lm(ctx, batch, batch, step, micro, {"on_policy": (0.0, 1)})
        sampled, _ = sample_batch(ctx, batch, unwrap(ctx.student), step, Stream.GKD_ROLLOUT)
        return self.with_lm(ctx, sampled, batch, step, micro, {"on_policy": (1.0, 1)})


from . import distillm as _distillm  # noqa: E402,F401  (registers DistiLLM)
from . import minillm as _minillm  # noqa: E402,F401  (registers MiniLLM)


def __getattr__(name: str):
    """``METHODS`` (every registered method, in order) and the two classes defined elsewhere,
    looked up when asked for, so they are complete whatever module was imported first."""
    if name == "METHODS":
        return tuple(REGISTRY)
    if name in ("DistiLLM", "MiniLLM"):
        return REGISTRY[name.lower()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConfigError(f"--method must be one of {', '.join(REGISTRY)}; got {name!r}")
    return REGISTRY[name]


def make(name: str) -> Method:
    return method_class(name)()
