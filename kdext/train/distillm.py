"""DistiLLM (Ko et al., ICML 2024) as jongwooko/distillm computes it: the skew KL and the
adaptive off-policy schedule of student-generated outputs (SGO).

Loss (``distillm/losses.py``): ``--skew skew_forward_kl``: KL(p || a p + (1 - a) q), or
``skew_reverse_kl``: KL(q || (1 - a) p + a q), a = ``--alpha`` (0.1), per response token.
(The authors' ``skewed_forward_kl`` reports the cross-entropy H(p, a p + (1 - a) q): the same
gradient, a value larger by H(p).)

Schedule (``finetune.py``, ``--sgo adaptive``, the authors' ``adaptive-*`` types): a threshold
``h`` starts at ``--sgo-init`` (0). Each step draws ``u ~ U(0, 1)`` (stream ``DISTILLM_COIN``)
and, with ``f = h x (1 - step / max_steps)`` (``--sgo-replay decreasing``; the step 1-based),

    u < f, or u < h while the replay buffer is not full  ->  fresh samples of the student for
                                                             the step's prompts, pushed into the buffer
    otherwise u < h                                      ->  rows replayed from the buffer
    otherwise                                            ->  the data's responses

Every ``--sgo-eval-every`` steps (0: once per pass over ``--data``, the authors' default) the
student's cross-entropy on ``--eval-data``'s responses is measured; when it is at least the
reference + ``--sgo-loss-eps`` (0.1), ``h`` rises by ``--sgo-raise`` (0.1, capped at 1) and the
reference becomes that loss (the reference is the loss before training, and moves only then).

Where kdext departs from the authors' code, and why:

* the coin is one per optimizer step, shared by every process and micro-batch (the authors
  flip one per micro-batch per GPU), and the buffer is one for the run, the same on every
  process (``--sgo-capacity`` rows over all processes; the authors keep ``--capacity`` rows per
  GPU): the run then does not depend on how the global batch is split;
* generated rows keep their EOS and predict their own tokens (the authors' rows drop the EOS
  and are not shifted, their ``sampler.py``);
* the validation loss is the token mean over the whole ``--eval-data`` set (the authors average
  batch means);
* an ``--lm-coef`` CE stays on the data's responses when the step trains on samples (the
  authors apply it to whatever batch was chosen; at their ``--kd-ratio 1`` it is 0).
"""

from __future__ import annotations

import random
from collections import deque
from typing import Optional

import torch

from . import heads
from .data import Batch, Encoded, collate, encode
from .methods import Method, divergence_sum, eval_mode, model_rows, register, sample_batch
from .models import response_labels, unwrap
from .options import ConfigError
from .seeds import Stream, stream_seed

VALIDATION_BATCH = 16  # rows per forward of the validation loss (the value does not depend on it)


def fresh_probability(threshold: float, step: int, max_steps: int, replay: str) -> float:
    """The authors' ``samp_threshold`` at optimizer step ``step`` (0-based; they count from 1)."""
    progress = (step + 1) / max_steps
    factor = {"decreasing": 1.0 - progress, "constant": 0.5, "increasing": progress}[replay]
    return threshold * factor


def choose_rows(u: float, threshold: float, fresh_prob: float, buffer_len: int, capacity: int) -> str:
    """``fresh``, ``replay`` or ``data``: the authors' branch for coin ``u`` (finetune.py:311-324)."""
    if u < fresh_prob or (u < threshold and buffer_len < capacity):
        return "fresh"
    if u < threshold:
        return "replay"
    return "data"


def update_threshold(threshold: float, reference: float, loss: float, eps: float, step: float) -> tuple[float, float]:
    """(threshold, reference) after a validation loss: raised (and the reference moved to the
    loss) when the loss is >= reference + eps, else unchanged."""
    if loss >= reference + eps:
        return min(threshold + step, 1.0), loss
    return threshold, reference


class ReplayBuffer:
    """FIFO of generated rows ``(prompt ids, response ids)``, at most ``capacity``; uniform
    sampling without replacement."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: deque = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def push(self, rows) -> None:
        for prompt, response in rows:
            self.rows.append((list(prompt), list(response)))

    def sample(self, k: int, rng: random.Random) -> list:
        return [self.rows[i] for i in rng.sample(range(len(self.rows)), k)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.rows = deque((tuple(r) for r in state["rows"]), maxlen=self.capacity)


@register
class DistiLLM(Method):
    """DistiLLM: skew KL with the adaptive SGO schedule; see the module docstring."""

    name = "distillm"
    samples = True  # the adaptive SGO schedule may train on student samples
    default_alpha = 0.1
    default_token_mean = "micro_batch"
    stat_keys = ("sgo_fresh", "sgo_replay")

    def __init__(self):
        self.threshold: float = 0.0
        self.reference: Optional[float] = None
        self.buffer: Optional[ReplayBuffer] = None
        self._validation: list[Batch] = []
        self._interval = 1

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.method_cfg.sgo == "adaptive" and not cfg.eval_data:
            raise ConfigError(
                "--eval-data is required for --method distillm with --sgo adaptive (the default): its "
                "validation loss drives the schedule; pass --sgo off to train on the data's responses only"
            )

    def main_terms(self, cfg):
        return {cfg.skew: 1.0}

    def main_loss(self, ctx, prep, s, y, t):
        return {ctx.cfg.skew: divergence_sum(s, t, ctx.cfg.skew, ctx.cfg)}

    # -- state ---------------------------------------------------------------------------------

    def setup(self, s) -> None:
        cfg = s.ctx.cfg
        if cfg.sgo != "adaptive":
            return
        if cfg.sgo_capacity < s.ctx.global_batch:
            raise ConfigError(
                f"--sgo-capacity ({cfg.sgo_capacity}) must hold at least one global batch "
                f"({s.ctx.global_batch} rows) to replay from"
            )
        self.threshold = cfg.sgo_init
        self.buffer = ReplayBuffer(cfg.sgo_capacity)
        enc = [encode(s.tokenizer, ex, s.cfg.max_prompt_len, s.cfg.max_response_len) for ex in s.eval_set]
        pad = s.tokenizer.pad_token_id
        self._validation = [
            collate(enc[i : i + VALIDATION_BATCH], pad, range(i, min(i + VALIDATION_BATCH, len(enc)))).to(s.device)
            for i in range(0, len(enc), VALIDATION_BATCH)
        ]
        self._interval = cfg.sgo_eval_every or max(1, len(s.examples) // s.ctx.global_batch)

    def state_dict(self):
        if self.buffer is None:
            return None
        return {"threshold": self.threshold, "reference": self.reference, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        self.threshold, self.reference = state["threshold"], state["reference"]
        self.buffer.load_state_dict(state["buffer"])

    @torch.no_grad()
    def validation_loss(self, ctx) -> float:
        """The student's token-mean cross-entropy on the validation responses (eval mode, T = 1)."""
        student = unwrap(ctx.student)
        total, n = 0.0, 0
        with eval_mode(student):
            for batch in self._validation:
                rows = model_rows(ctx, student, batch)
                total += float(-heads.logprobs(rows, response_labels(batch), 1.0).double().sum())
                n += int(batch.response_mask.sum())
        return total / max(1, n)

    # -- the step ------------------------------------------------------------------------------

    def prepare_step(self, ctx, step):
        cfg = ctx.cfg
        if self.buffer is None:  # --sgo off
            return super().prepare_step(ctx, step)
        if self.reference is None:  # the authors evaluate once before training
            self.reference = self.validation_loss(ctx)
        data = [ctx.data(step, a) for a in range(ctx.grad_accum)]
        u = random.Random(stream_seed(cfg.seed, Stream.DISTILLM_COIN, step)).random()
        p = fresh_probability(self.threshold, step, ctx.max_steps, cfg.sgo_replay)
        choice = choose_rows(u, self.threshold, p, len(self.buffer), self.buffer.capacity)
        if choice == "fresh":
            mains = self._fresh(ctx, data, step)
        elif choice == "replay":
            mains = self._replay(ctx, data, step)
        else:
            mains = data
        stats = {"sgo_fresh": (float(choice == "fresh"), 1), "sgo_replay": (float(choice == "replay"), 1)}
        return [self.with_lm(ctx, main, d, step, a, stats) for a, (main, d) in enumerate(zip(mains, data))]

    def _fresh(self, ctx, data: list[Batch], step: int) -> list[Batch]:
        """Student samples for the step's prompts (eval mode, as the authors' generator); every
        process's rows join the buffer, in global-batch order."""
        student = unwrap(ctx.student)
        with eval_mode(student):
            sampled = [sample_batch(ctx, b, student, step, Stream.DISTILLM_ROLLOUT)[0] for b in data]
        mine = []
        for b in sampled:
            for i in range(b.prompt_ids.shape[0]):
                mine.append((int(b.index[i]), b.prompt_ids[i][b.prompt_mask[i]].tolist(),
                             b.response_ids[i][b.response_mask[i]].tolist()))
        rows = sorted((r for part in ctx.dd.gather_objects(mine) for r in part), key=lambda r: r[0])
        self.buffer.push((p, r) for _, p, r in rows)
        return sampled

    def _replay(self, ctx, data: list[Batch], step: int) -> list[Batch]:
        """One global batch drawn from the buffer; each micro-batch takes its block of it."""
        rng = random.Random(stream_seed(ctx.cfg.seed, Stream.DISTILLM_REPLAY, step))
        rows = self.buffer.sample(ctx.global_batch, rng)
        B, out = ctx.batch_size, []
        for a, d in enumerate(data):
            first = ctx.dd.rank * ctx.grad_accum * B + a * B
            block = [Encoded(p, r) for p, r in rows[first : first + B]]
            out.append(collate(block, ctx.pad_id, range(first, first + B)).to(d.prompt_ids.device))
        return out

    def after_step(self, ctx, steps_done):
        if self.buffer is None:
            return {}
        rec = {}
        if steps_done % self._interval == 0:
            loss = self.validation_loss(ctx)
            cfg = ctx.cfg
            self.threshold, self.reference = update_threshold(self.threshold, self.reference, loss,
                                                              cfg.sgo_loss_eps, cfg.sgo_raise)
            rec["sgo_val_loss"], rec["sgo_reference"] = loss, self.reference
        rec["sgo_threshold"] = self.threshold
        return rec
