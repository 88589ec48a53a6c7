"""MiniLLM (Gu et al., ICLR 2024) as the official code computes it (microsoft/LMOps, ``minillm/``).

Every default follows LMOps' code and its scripts; where the paper's equations differ, the
paper's form is an option (docs/TRAINER.md has the term-by-term table). One *cycle*:

1. **Rollouts** (``sampler.py``): ``--rollout-batches`` K global batches of prompts are sampled
   from ``(1 - a) q + a p`` (``generation.sample``; the student in eval mode, no dropout, as
   LMOps' ``model.py``). Then, as LMOps does, one teacher-forced forward of each model over the
   rollouts gives ``log q_old(y_t)`` at T, ``log p(y_t)`` at T and at ``--reward-temperature``
   (LMOps: 1). Per token (constants from here on):

       r_t = clip((log p_{T_r}(y_t) - log q_old(y_t)) / reward_scaling, +-cliprange_reward)
       w_t = q_old(y_t) / ((1 - a) q_old(y_t) + a p_T(y_t))                  (1 when a = 0)
       A_t = sum_{k>=t} gamma^(k-t) r_k / #{k >= t}          (--returns code, losses.py)
           | sum_{k>t} gamma^(k-t-1) r_k / #{k > t}           (--returns paper, R_{t+1})
       A  <- (A - mean) / sqrt(var + 1e-8) over the whole buffer (--whiten valid | padded | off)

   Every process sends its rollouts to every other (``Dist.gather_objects``), so each holds
   the whole buffer, in global-batch order: its whitening and reshuffling are then the same
   whatever the number of processes.
2. **PPO epochs** (``trainer.py``): ``--ppo-epochs`` E passes over the buffer, each a fresh
   permutation (stream ``MINILLM_SHUFFLE``) cut into K optimizer steps of micro-batches; per
   micro-batch, with rho_t = exp(log q_theta(y_t) - log q_old(y_t)) at T:

       pg     = sum_t max(-A_t w_t rho_t, -A_t clip(w_t rho_t, 1-eps, 1+eps))  (--pg-clip product)
              | sum_t w_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))       (--pg-clip ratio)
       single = sum_t KL(q_theta(.|y<t) || p(.|y<t)) at T   (x w_t with --single-step-weight)
       LM     = (1 - kd_ratio) CE + kd_ratio H(p, q) at T = 1 on --lm-data (or the data)

   each divided by its micro-batch's token count (``--token-mean micro_batch``), so the step
   minimises the mean over micro-batches and processes of ``pg + single + lm_coef LM``.

A cycle is E x K optimizer steps; checkpoints fall between cycles.
"""

from __future__ import annotations

import torch

from . import heads
from .data import Batch, pad_prompts, pad_responses
from .methods import Method, eval_mode, model_rows, register, sample_batch, teacher_rows
from .models import response_labels, unwrap
from .seeds import Stream, stream_seed

WHITEN_EPS = 1e-8  # LMOps utils.whiten


# ---------------------------------------------------------------------------------------------
# The per-token quantities (pure functions of [B, W] tensors with a right-padded prefix mask)


def rewards(teacher_logprob, old_logprob, mask, scaling: float, clip: float) -> torch.Tensor:
    """r = clip((log p - log q_old) / scaling, +-clip), 0 on pads (float64; clip 0 = off)."""
    r = (teacher_logprob.double() - old_logprob.double()).masked_fill(~mask, 0.0) / scaling
    return r.clamp(-clip, clip) if clip > 0 else r


def advantages(r: torch.Tensor, mask: torch.Tensor, gamma: float, form: str) -> torch.Tensor:
    """The advantage before whitening (see the module docstring), 0 on pads."""
    m = mask.double()
    r = r.double() * m
    out = torch.zeros_like(r)
    acc = torch.zeros_like(r[:, 0])
    from_t = m.flip(-1).cumsum(-1).flip(-1)  # valid tokens at or after t
    for t in range(r.shape[1] - 1, -1, -1):
        if form == "code":
            acc = r[:, t] + gamma * acc  # r_t included
            out[:, t] = acc
        else:
            out[:, t] = acc  # rewards after t only
            acc = r[:, t] + gamma * acc
    if form == "code":
        return out / from_t.clamp(min=1) * m
    after = from_t - m
    return torch.where(after > 0, out / after.clamp(min=1), torch.zeros_like(out)) * m


def importance_weight(old_logprob, teacher_logprob, alpha: float) -> torch.Tensor:
    """w = q / ((1 - a) q + a p) from log-probs (float64); exactly 1 when alpha == 0."""
    lq = old_logprob.double()
    if alpha == 0:
        return torch.ones_like(lq)
    log_mix = torch.logaddexp(lq + torch.log1p(torch.tensor(-alpha, dtype=lq.dtype)),
                              teacher_logprob.double() + torch.log(torch.tensor(alpha, dtype=lq.dtype)))
    return torch.exp(lq - log_mix)


def whitening(valid_advantages: torch.Tensor, rows: int, width: int, mode: str) -> tuple[float, float]:
    """(mean, 1 / sqrt(var + 1e-8)) of the buffer's advantages (population variance).

    ``valid_advantages``: every response token's advantage, in buffer order. ``padded`` counts
    ``rows x width`` entries, the pads being zeros (LMOps' whitening of its [B, 256] tensor);
    ``off`` is the identity (0, 1).
    """
    if mode == "off":
        return 0.0, 1.0
    a = valid_advantages.double()
    n = a.numel() if mode == "valid" else rows * width
    mu = a.sum() / n
    ss = ((a - mu) ** 2).sum() + (n - a.numel()) * mu * mu  # the pads' (0 - mu)^2
    return float(mu), float(torch.rsqrt(ss / n + WHITEN_EPS))


def pg_per_token(logq, old_logq, adv, w, eps: float, form: str) -> torch.Tensor:
    """PPO's clipped surrogate per token (see the module docstring)."""
    rho = torch.exp(logq - old_logq)
    if form == "product":
        ratio = rho * w
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps, 1.0 + eps))
    return w * torch.maximum(-adv * rho, -adv * rho.clamp(1.0 - eps, 1.0 + eps))


def logged_reward(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """LMOps' logged ``reward`` per rollout: sum_t gamma^t r_t / length (--length-norm)."""
    acc = torch.zeros_like(r[:, 0], dtype=torch.float64)
    for t in range(r.shape[1] - 1, -1, -1):
        acc = gamma * acc + r[:, t].double()
    return acc / mask.sum(-1).clamp(min=1).double()


# ---------------------------------------------------------------------------------------------
# The rollout buffer


def _rows(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [x[b][mask[b]].cpu() for b in range(mask.shape[0])]


def _collate_records(recs: list[dict], pad_id: int, device) -> Batch:
    """Rollout records (one per row) back into a micro-batch with its per-token extras."""
    p_ids, p_mask = pad_prompts([r["prompt"].tolist() for r in recs], pad_id)
    r_ids, r_mask = pad_responses([r["response"].tolist() for r in recs], pad_id)
    batch = Batch(p_ids, p_mask, r_ids, r_mask, torch.tensor([r["pos"] for r in recs], dtype=torch.long))
    extras = {}
    for k in ("old_logprob", "weight", "advantage", "reward"):
        t = torch.zeros(r_mask.shape, dtype=torch.float32)
        for i, r in enumerate(recs):
            t[i, : len(r[k])] = r[k]
        extras[k] = t
    extras["mask"] = r_mask
    batch.extras = extras
    return batch.to(device)


@register
class MiniLLM(Method):
    """MiniLLM as LMOps computes it; see the module docstring and docs/TRAINER.md."""

    name = "minillm"
    samples = True
    stat_keys = ("reward", "response_len")
    default_alpha = 0.2
    default_token_mean = "micro_batch"
    default_kd_ratio = 0.5
    train_mode = False  # LMOps runs the student in eval mode ("no dropout for RL")

    def __init__(self):
        self._cycle = None  # (cycle index, buffer records in global order)

    @classmethod
    def steps_per_cycle(cls, cfg):
        return cfg.ppo_epochs * cfg.rollout_batches

    @classmethod
    def data_batches(cls, cfg, steps):
        cycles = -(-steps // cls.steps_per_cycle(cfg))  # buffers sampled so far
        return cycles * cfg.rollout_batches

    def main_terms(self, cfg):
        return {"pg": 1.0, "single": 1.0}

    def prepare(self, ctx, batch, step, micro=0):
        raise RuntimeError("MiniLLM prepares a whole step at a time (its rollout buffer): use prepare_step")

    # -- rollouts ------------------------------------------------------------------------------

    def rollout_records(self, ctx, batch: Batch, prompt_step: int, offset: int) -> list[dict]:
        """Sample one micro-batch of prompts and compute every per-token constant (one record
        per row; ``pos`` = ``offset`` + the row's position in its global batch)."""
        cfg = ctx.cfg
        student = unwrap(ctx.student)
        with eval_mode(student):
            sampled, _ = sample_batch(ctx, batch, student, prompt_step, Stream.MINILLM_ROLLOUT,
                                      teacher=ctx.teacher, alpha=cfg.alpha)
            # LMOps recomputes the old log-probs with a teacher-forced forward (sampler.py).
            with torch.no_grad():
                s_rows = model_rows(ctx, student, sampled)
        t_rows = teacher_rows(ctx, sampled)
        y = response_labels(sampled)
        m = sampled.response_mask

        def grid(values):
            out = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
            out[m] = values.double()
            return out

        with torch.no_grad():
            old = grid(heads.logprobs(s_rows, y, cfg.temperature))
            t_T = grid(heads.logprobs(t_rows, y, cfg.temperature))
            t_R = grid(heads.logprobs(t_rows, y, cfg.reward_temperature))
        r = rewards(t_R, old, m, cfg.reward_scaling, cfg.cliprange_reward)
        adv = advantages(r, m, cfg.gamma, cfg.returns)
        w = importance_weight(old, t_T, cfg.alpha)
        cols = {"old_logprob": old, "weight": w, "advantage": adv, "reward": r}
        per_row = {k: _rows(v.float(), m) for k, v in cols.items()}
        recs = []
        for b in range(m.shape[0]):
            rec = {k: per_row[k][b] for k in cols}
            rec.update(pos=offset + int(batch.index[b]), prompt=batch.prompt_ids[b][batch.prompt_mask[b]].cpu(),
                       response=sampled.response_ids[b][m[b]].cpu())
            recs.append(rec)
        return recs

    def build_buffer(self, ctx, cycle: int) -> list[dict]:
        """The cycle's K global batches of rollouts, gathered from every process, whitened."""
        cfg, K, G = ctx.cfg, ctx.cfg.rollout_batches, ctx.global_batch
        mine = []
        for k in range(K):
            prompt_step = cycle * K + k
            for a in range(ctx.grad_accum):
                mine += self.rollout_records(ctx, ctx.data(prompt_step, a), prompt_step, k * G)
        recs = sorted((r for part in ctx.dd.gather_objects(mine) for r in part), key=lambda r: r["pos"])
        mu, inv = whitening(torch.cat([r["advantage"] for r in recs]), len(recs), cfg.max_new_tokens, cfg.whiten)
        for r in recs:
            r["advantage"] = ((r["advantage"].double() - mu) * inv).float()
        return recs

    # -- the step ------------------------------------------------------------------------------

    def prepare_step(self, ctx, step):
        cfg = ctx.cfg
        K, G, B = cfg.rollout_batches, ctx.global_batch, ctx.batch_size
        cycle, j = divmod(step, self.steps_per_cycle(cfg))
        epoch, k = divmod(j, K)
        if self._cycle is None or self._cycle[0] != cycle:
            self._cycle = (cycle, self.build_buffer(ctx, cycle))
        recs = self._cycle[1]
        g = torch.Generator().manual_seed(stream_seed(cfg.seed, Stream.MINILLM_SHUFFLE, cycle, epoch))
        order = torch.randperm(K * G, generator=g)[k * G : (k + 1) * G].tolist()
        device = next(unwrap(ctx.student).parameters()).device
        preps = []
        for a in range(ctx.grad_accum):
            first = ctx.dd.rank * ctx.grad_accum * B + a * B
            rows = [recs[i] for i in order[first : first + B]]
            roll = _collate_records(rows, ctx.pad_id, device)
            m = roll.extras["mask"]
            stats = {
                "reward": (float(logged_reward(roll.extras["reward"], m, cfg.gamma).sum()), len(rows)),
                "response_len": (float(m.sum()), len(rows)),
            }
            data = ctx.data(step, a) if (cfg.lm_coef > 0 and ctx.lm is None) else None
            preps.append(self.with_lm(ctx, roll, data, step, a, stats))
        return preps

    def main_loss(self, ctx, prep, s, y, t):
        cfg = ctx.cfg
        ex = prep.batch.extras
        m = ex["mask"]
        w, adv, old = ex["weight"][m], ex["advantage"][m], ex["old_logprob"][m]
        logq = heads.logprobs(s, y, cfg.temperature)
        single = heads.divergence_sum(s, t, "reverse_kl", cfg.temperature,
                                      weights=w if cfg.single_step_weight else None)
        return {"pg": pg_per_token(logq, old, adv, w, cfg.clip_eps, cfg.pg_clip).sum(), "single": single}
