"""MiniLLM against a float64 transcription of the official code (microsoft/LMOps, ``minillm/``).

The ``lmops_*`` functions below transcribe, in float64 and on padded [B, W] tensors, what LMOps
computes (file and function named in each): they keep LMOps' own structure (the reversed loop,
the ``mask - cumsum + total`` length count, whitening the whole padded tensor) rather than
kdext's, so a match checks kdext's formulas, not a copy of them. Then the whole pipeline runs
on tiny models: the rollout constants (``prepare_step``: old log-probs, rewards, weights,
advantages, whitening over the buffer) and the loss (values and gradients) against the same
formulas on float64 copies of the models.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdext.train import methods as M
from kdext.train import minillm as ML
from kdext.train.config import TrainConfig
from kdext.train.step import build

from train_fixtures import ref64 as R
from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)

T = 1.3


# ---------------------------------------------------------------------------------------------
# LMOps, transcribed (float64)


def lmops_rewards(logp_teacher_T1, logq_T, m, reward_scaling=0.5, cliprange_reward=100.0):
    """sampler.py:77-131: t_rewards (reward.py:reward_fn, 0 on pads) + ent_rewards (-logprobs,
    0 on pads), / reward_scaling, clipped."""
    md = m.double()
    rewards = logp_teacher_T1.double() * md + (-logq_T.double() * md)
    rewards = rewards / reward_scaling
    if cliprange_reward:
        rewards = torch.clip(rewards, -cliprange_reward, cliprange_reward)
    return rewards


def lmops_advantages(rewards, m, gamma):
    """losses.py:_get_advantages_and_returns before whitening."""
    mask = m.double()
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    last_rw, rw_reversed = 0, []
    for t in reversed(range(rewards.shape[1])):
        last_rw = rewards[:, t] + gamma * last_rw
        rw_reversed.append(last_rw)
    return torch.stack(rw_reversed[::-1], dim=1) / lens


def lmops_whiten(xs):
    """utils.py:whiten with torch.distributed initialised (get_global_statistics): population
    variance over every entry of the tensor."""
    mean = xs.sum() / xs.numel()
    var = torch.sum((xs - mean) ** 2) / xs.numel()
    return (xs - mean) * torch.rsqrt(var + 1e-8)


def lmops_weight(logq, logp_T, alpha):
    """sampler.py:109-115."""
    mix = (1 - alpha) * torch.exp(logq.double()) + alpha * torch.exp(logp_T.double())
    return torch.exp(logq.double() - torch.log(mix))


def lmops_pg_loss(logprobs, old_logprobs, advantages, m, w, cliprange=0.2):
    """losses.py:_pg_loss."""
    mask = m.double()
    n = mask.sum()
    ratio = torch.exp((logprobs - old_logprobs) * mask) * w
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.sum(torch.max(pg1, pg2) * mask) / n


def lmops_reg_loss(s_logits, t_logits, m, temperature):
    """losses.py:_reg_loss with utils.get_x_entropy / get_entropy, [B, W, V]."""
    s, t = s_logits / temperature, t_logits / temperature
    probs = torch.softmax(s, -1)
    xent = -torch.sum(probs * torch.log_softmax(t, -1), -1) * m
    ent = -torch.sum(probs * torch.log_softmax(s, -1), -1) * m
    return torch.sum((xent - ent) * m) / m.sum()


def lmops_pt_loss(s_logits, t_logits, labels, kd_ratio):
    """losses.py:pt_loss (CrossEntropyLoss(ignore_index=-100) and the soft cross-entropy)."""
    keep = labels != -100
    ls = torch.log_softmax(s_logits, -1)
    lm = -ls.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].mean()
    distil = -(torch.softmax(t_logits, -1) * ls).sum(-1)[keep].mean()
    return (1 - kd_ratio) * lm + kd_ratio * distil


def padded(rows, width):
    """Right-pad a list of 1-D float64 tensors to [B, width] (and the mask)."""
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    m = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        m[i, : len(r)] = True
    return out, m


def random_rollouts(B=4, W=7, lens=(7, 3, 5, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, W, dtype=torch.bool)
    for b, L in enumerate(lens):
        m[b, :L] = True
    logq = (-torch.rand(B, W, generator=g, dtype=torch.float64) * 3).masked_fill(~m, 0)
    logp = (-torch.rand(B, W, generator=g, dtype=torch.float64) * 3).masked_fill(~m, 0)
    return m, logq, logp, g


# ---------------------------------------------------------------------------------------------
# Each term on random tensors


@pytest.mark.parametrize("clip", [100.0, 1.0, 0.0])
def test_rewards_match_lmops(clip):
    m, logq, logp, _ = random_rollouts()
    got = ML.rewards(logp, logq, m, 0.5, clip)
    assert torch.allclose(got, lmops_rewards(logp, logq, m, 0.5, clip), rtol=0, atol=1e-12)
    if clip == 1.0:
        assert got.abs().max() == 1.0  # the clip is active


@pytest.mark.parametrize("gamma", [0.95, 0.5, 1.0])
def test_code_advantages_match_lmops_including_r_t(gamma):
    m, logq, logp, _ = random_rollouts()
    r = lmops_rewards(logp, logq, m)
    got = ML.advantages(r, m, gamma, "code")
    assert torch.allclose(got, lmops_advantages(r, m, gamma) * m, rtol=1e-12, atol=1e-12)
    # a row with a single token: its advantage is its own reward (r_t counts; / 1)
    assert got[3, 0] == pytest.approx(float(r[3, 0]))


def test_paper_returns_are_the_rewards_after_t():
    m, logq, logp, _ = random_rollouts()
    r = lmops_rewards(logp, logq, m)
    got = ML.advantages(r, m, 0.9, "paper")
    for b in range(m.shape[0]):
        L = int(m[b].sum())
        for t in range(L):
            fut = [0.9 ** (k - t - 1) * float(r[b, k]) for k in range(t + 1, L)]
            assert float(got[b, t]) == pytest.approx(sum(fut) / len(fut) if fut else 0.0, abs=1e-12)
    assert (got[~m] == 0).all()


def test_padded_whitening_is_lmops_at_the_fixed_width():
    """LMOps whitens its whole [B, W] tensor, pads (zeros) included: kdext's "padded" gives the
    same numbers from the valid entries and W; "valid" whitens over the valid entries only; and
    LMOps' result depends on W (the pads count), kdext's default does not."""
    m, logq, logp, _ = random_rollouts()
    A = lmops_advantages(lmops_rewards(logp, logq, m), m, 0.95) * m
    for W in (7, 17):
        Ap = torch.nn.functional.pad(A, (0, W - 7))
        mp = torch.nn.functional.pad(m, (0, W - 7))
        ref = lmops_whiten(Ap)[mp]
        mu, inv = ML.whitening(A[m], A.shape[0], W, "padded")
        assert torch.allclose((A[m] - mu) * inv, ref, rtol=1e-10, atol=1e-10)
    v = A[m]
    mu, inv = ML.whitening(v, A.shape[0], 7, "valid")
    assert torch.allclose((v - mu) * inv, (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-8), atol=1e-12)
    assert ML.whitening(v, 4, 7, "off") == (0.0, 1.0)
    wide = lmops_whiten(torch.nn.functional.pad(A, (0, 10)))[:, :7][m]
    assert not torch.allclose(lmops_whiten(A)[m], wide)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.6])
def test_importance_weight_matches_lmops(alpha):
    m, logq, logp, _ = random_rollouts()
    got = ML.importance_weight(logq, logp, alpha)
    want = torch.ones_like(logq) if alpha == 0 else lmops_weight(logq, logp, alpha)
    assert torch.allclose(got, want, rtol=1e-12)
    if alpha:
        assert (got <= 1 / (1 - alpha) + 1e-12).all()


@pytest.mark.parametrize("spread", [0.0, 0.6])  # rho = 1 (the clip on w alone) / rho far from 1
def test_pg_product_clip_matches_lmops_value_and_gradient(spread):
    m, old, logp, g = random_rollouts()
    md = m.double()
    w = ML.importance_weight(old, logp, 0.4)
    A = lmops_whiten(lmops_advantages(lmops_rewards(logp, old, m), m, 0.95) * md)
    new = (old + (torch.rand(old.shape, generator=g, dtype=torch.float64) - 0.5) * 2 * spread).masked_fill(~m, 0)
    new.requires_grad_(True)
    ref = lmops_pg_loss(new, old, A, m, w)
    (g_ref,) = torch.autograd.grad(ref, new)
    x = new.detach()[m].clone().requires_grad_(True)
    got = ML.pg_per_token(x, old[m], A[m], w[m], 0.2, "product").sum() / md.sum()
    (g_got,) = torch.autograd.grad(got, x)
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-12)
    assert torch.allclose(g_got, g_ref[m], atol=1e-12)
    ratio = torch.exp(x.detach() - old[m]) * w[m]
    clipped = (ratio < 0.8) | (ratio > 1.2)
    assert clipped.any() and (~clipped).any(), "both branches of the clip must be exercised"
    # a clipped token on the clipped side gets no gradient at all
    dead = ((ratio > 1.2) & (A[m] > 0)) | ((ratio < 0.8) & (A[m] < 0))
    assert (g_got[dead] == 0).all()


def test_pg_ratio_clip_is_the_paper_form():
    """--pg-clip ratio: w_t max(-A rho, -A clip(rho)): unlike LMOps' product, the weight itself
    is never clipped (the audit's case: rho = 1, w = 0.7 / 1.24)."""
    w = torch.tensor([0.7, 0.7, 1.0, 1.24, 1.24], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    (g_prod,) = torch.autograd.grad(ML.pg_per_token(x, torch.zeros(5), A, w, 0.2, "product").sum(), x)
    (g_ratio,) = torch.autograd.grad(ML.pg_per_token(x, torch.zeros(5), A, w, 0.2, "ratio").sum(), x)
    assert g_prod.tolist() == pytest.approx([-0.7, 0.0, -1.0, 0.0, 1.24])
    assert g_ratio.tolist() == pytest.approx([-0.7, 0.7, -1.0, -1.24, 1.24])


def test_logged_reward_is_lmops_length_normalised_discounted_sum():
    m, logq, logp, _ = random_rollouts()
    r = lmops_rewards(logp, logq, m)
    full = torch.zeros(r.shape[0], dtype=torch.float64)
    for t in reversed(range(r.shape[1])):
        full = 0.95 * full + r[:, t]  # losses.py:_get_cumsum_rewards
    assert torch.allclose(ML.logged_reward(r, m, 0.95), full / m.sum(-1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The pipeline on tiny models


def make_setup(tiny, **mkw):
    mcfg = M.MethodConfig(temperature=T, max_new_tokens=6, **mkw)
    cfg = TrainConfig(method="minillm", teacher=tiny["gpt2_teacher"], student=tiny["llama_student"],
                      data=tiny["data"], out=tiny["root"] + "/unused", batch_size=3, grad_accum=2, seed=1,
                      method_cfg=mcfg, progress=False)
    return build(cfg)


def rollout_rows(preps):
    """The rollout rows of every micro-batch of a step, as one list (prompt, response) + extras."""
    out = []
    for p in preps:
        roll, _ = R.split_rows(p.batch, p.n_main)
        ex = p.batch.extras
        for b in range(roll.prompt_ids.shape[0]):
            mb = ex["mask"][b]
            out.append((roll, b, {k: ex[k][b][mb].double() for k in ("old_logprob", "weight", "advantage", "reward")}))
    return out


@pytest.mark.parametrize("whiten, alpha, gamma", [("valid", 0.2, 0.95), ("padded", 0.4, 0.8), ("off", 0.0, 1.0)])
def test_rollout_constants_match_lmops(tiny, whiten, alpha, gamma):
    """prepare_step: after sampling, LMOps' constants recomputed by hand in float64 from the
    models (teacher at T = 1 in the reward, at T in the weight), whitened over the whole buffer
    (every micro-batch of the step)."""
    setup = make_setup(tiny, whiten=whiten, alpha=alpha, gamma=gamma)
    preps = setup.method.prepare_step(setup.ctx, 0)
    assert len(preps) == 2
    s64, t64 = R.copies64(setup)
    rows = rollout_rows(preps)
    assert len(rows) == 6
    olds, tT, t1, got = [], [], [], []
    with torch.no_grad():
        for roll, b, ex in rows:
            one = R.split_rows(roll, b + 1)[0]
            one = R.split_rows(one, b)[1]
            y = R.tokens_of(one)[0]
            s, t = R.per_example(s64, one)[0], R.per_example(t64, one)[0]
            olds.append(R.logprob64(s, y, T))
            tT.append(R.logprob64(t, y, T))
            t1.append(R.logprob64(t, y, 1.0))
            got.append(ex)
    old, m = padded(olds, 6)
    pT, _ = padded(tT, 6)
    p1, _ = padded(t1, 6)
    r = lmops_rewards(p1, old, m)
    A = lmops_advantages(r, m, gamma) * m
    if whiten == "padded":
        A = lmops_whiten(A)  # LMOps' tensor is exactly --max-new-tokens wide here
    elif whiten == "valid":
        A[m] = (A[m] - A[m].mean()) / torch.sqrt(A[m].var(unbiased=False) + 1e-8)
    w = torch.ones_like(old) if alpha == 0 else lmops_weight(old, pT, alpha)
    for i, ex in enumerate(got):
        L = int(m[i].sum())
        assert torch.allclose(ex["old_logprob"], old[i, :L], atol=2e-6)
        assert torch.allclose(ex["reward"], r[i, :L], atol=1e-5)
        assert torch.allclose(ex["weight"], w[i, :L], atol=1e-5)
        assert torch.allclose(ex["advantage"], A[i, :L], atol=1e-4), (ex["advantage"], A[i, :L])


@pytest.mark.parametrize("paper", [False, True])
def test_loss_matches_lmops_value_and_gradient(tiny, paper):
    """One micro-batch's loss: PG (clip active: old log-probs pushed off the current policy),
    the single-step KL and the LM term with kd_ratio (on the data, at T = 1), each a token mean of
    the micro-batch, against LMOps' functions on float64 models; ``paper``: the ratio clip and
    the w-weighted single-step term instead."""
    extra = {"pg_clip": "ratio", "single_step_weight": True} if paper else {}
    setup = make_setup(tiny, lm_coef=0.5, kd_ratio=0.3, clip_eps=0.1, **extra)
    cfg = setup.ctx.cfg
    prep = setup.method.prepare_step(setup.ctx, 0)[1]
    roll, data = R.split_rows(prep.batch, prep.n_main)
    ex = prep.batch.extras
    m = ex["mask"]
    g = torch.Generator().manual_seed(3)
    noise = (torch.rand(m.shape, generator=g) - 0.5) * 0.8
    ex["old_logprob"] = (ex["old_logprob"] + noise).masked_fill(~m, 0)
    assert (noise[m].abs() > 0.11).any() and (noise[m].abs() < 0.09).any(), "both sides of the clip"
    old, A, w = ex["old_logprob"].double(), ex["advantage"].double(), ex["weight"].double()

    def hand(s64, t64):
        ys = R.tokens_of(roll)
        ss, ts = R.per_example(s64, roll), R.per_example(t64, roll)
        Wd = m.shape[1]
        sp = torch.zeros(len(ss), Wd, ss[0].shape[-1], dtype=torch.float64)
        tp = torch.zeros_like(sp)
        lq = torch.zeros(len(ss), Wd, dtype=torch.float64)
        for b, (s, t, y) in enumerate(zip(ss, ts, ys)):
            sp[b, : len(y)], tp[b, : len(y)] = s, t
            lq[b, : len(y)] = R.logprob64(s, y, T)
        md = m.double()
        if paper:
            rho = torch.exp((lq - old) * md)
            pg = (w * torch.maximum(-A * rho, -A * rho.clamp(0.9, 1.1)) * md).sum() / md.sum()
            kl = sum((wb[: len(y)] * R.divergence64("reverse_kl", s, t, T)).sum() for wb, s, t, y in zip(w, ss, ts, ys))
            reg = kl / md.sum()
        else:
            pg = lmops_pg_loss(lq, old, A, m, w, cliprange=0.1)
            reg = lmops_reg_loss(sp, tp, md, T)
        sd, td, yd = R.per_example(s64, data), R.per_example(t64, data), R.tokens_of(data)
        labels = torch.cat(yd)
        pt = lmops_pt_loss(torch.cat(sd), torch.cat(td), labels, kd_ratio=0.3)
        return pg + reg + 0.5 * pt

    R.check(setup, prep, hand)


def test_buffer_is_reshuffled_each_ppo_epoch_and_refilled_each_cycle(tiny):
    """--ppo-epochs 2 --rollout-batches 2: steps 0-3 share one buffer of 2 global batches (its
    rows all used once per epoch, in a new order), step 4 samples a new buffer."""
    setup = make_setup(tiny, ppo_epochs=2, rollout_batches=2)
    method, ctx = setup.method, setup.ctx
    assert method.steps_per_cycle(ctx.cfg) == 4

    def positions(step):
        return [int(i) for p in method.prepare_step(ctx, step) for i in p.batch.index[: p.n_main]]

    steps = [positions(s) for s in range(4)]
    buffer = method._cycle[1]
    assert [r["pos"] for r in buffer] == list(range(12))
    for epoch in (steps[0] + steps[1], steps[2] + steps[3]):
        assert sorted(epoch) == list(range(12))
    assert steps[0] + steps[1] != steps[2] + steps[3]  # reshuffled
    first = copy.copy(buffer)
    positions(4)
    assert method._cycle[0] == 1 and method._cycle[1] is not first
    # the second buffer's prompts are global batches 2 and 3 of the data
    prompts = sorted(tuple(r["prompt"].tolist()) for r in method._cycle[1])
    want = sorted(tuple(ctx.data(b, a).prompt_ids[i][ctx.data(b, a).prompt_mask[i]].tolist())
                  for b in (2, 3) for a in range(2) for i in range(3))
    assert prompts == want


def test_student_runs_in_eval_mode(tiny):
    """LMOps' student has no dropout in rollouts or the loss (model.py); kdext puts it in eval
    mode for both, and back as it was after sampling."""
    setup = make_setup(tiny)
    assert setup.method.train_mode is False
    student = M.unwrap(setup.student)
    student.train()
    seen = []
    hook = student.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    setup.method.prepare_step(setup.ctx, 0)
    hook.remove()
    assert seen and not any(seen) and student.training
