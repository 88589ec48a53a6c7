"""Each method's loss on tiny models against a float64 hand computation, values and gradients.

The hand computation runs each example *unpadded* through float64 copies of the models and uses
plain ``torch.log_softmax`` for every quantity, so it checks at once: the batch layout (left
padded prompts, right padded responses, position ids), the rows that reach the loss, the kdext
ops' values and gradients, the temperature, and the per-method formulas, MiniLLM's
policy-gradient and single-step terms included.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdext.train import methods as M
from kdext.train.data import concat_batches
from kdext.train.models import unwrap
from kdext.train.config import TrainConfig
from kdext.train.step import build, micro_batch

from train_fixtures import tiny as fixtures

T = 1.3  # a non-trivial temperature, so its plumbing is checked too


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from fixtures.one_thread()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.get(tmp_path_factory)


def make_setup(tiny, method, teacher="gpt2_teacher", student="llama_student", **mkw):
    mcfg = M.MethodConfig(temperature=T, max_new_tokens=6, **mkw)
    cfg = TrainConfig(
        method=method, teacher=tiny[teacher], student=tiny[student], data=tiny["data"], out=tiny["root"] + "/unused",
        batch_size=5, seed=1, method_cfg=mcfg, progress=False,
    )
    return build(cfg)


# ---------------------------------------------------------------------------------------------
# float64 reference


def per_example_logits(model64, batch):
    """[(R_b, V) float64 logits predicting each real response token of row b], unpadded forward."""
    out = []
    for b in range(batch.prompt_ids.shape[0]):
        p = batch.prompt_ids[b][batch.prompt_mask[b]]
        r = batch.response_ids[b][batch.response_mask[b]]
        ids = torch.cat([p, r])[None]
        logits = model64(input_ids=ids).logits[0].double()
        out.append(logits[len(p) - 1 : len(p) + len(r) - 1])
    return out


def tokens_of(batch):
    return [batch.response_ids[b][batch.response_mask[b]] for b in range(batch.prompt_ids.shape[0])]


def kl(a_log, b_log):
    return (a_log.exp() * (a_log - b_log)).sum(-1)


def divergence64(kind, s, t, beta=0.5, alpha=0.1):
    lq, lp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    q, p = lq.exp(), lp.exp()
    if kind == "forward_kl":
        return kl(lp, lq)
    if kind == "reverse_kl":
        return kl(lq, lp)
    if kind == "jsd":
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    if kind == "skew_forward_kl":
        return kl(lp, torch.log(alpha * p + (1 - alpha) * q))
    if kind == "skew_reverse_kl":
        return kl(lq, torch.log((1 - alpha) * p + alpha * q))
    raise ValueError(kind)


def nll64(s, y):
    return -torch.log_softmax(s, -1).gather(-1, y[:, None])[:, 0]


def copies64(setup):
    s64 = copy.deepcopy(unwrap(setup.student)).double()
    t64 = copy.deepcopy(setup.teacher).double() if setup.teacher is not None else None
    return s64, t64


def kdext_loss_and_grads(setup, prep):
    method, ctx = setup.method, setup.ctx
    unwrap(setup.student).zero_grad(set_to_none=True)
    terms = method.terms(ctx, prep)
    loss = method.combine(ctx.cfg, terms, prep.counts)
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in unwrap(setup.student).named_parameters()}
    return loss.detach().double(), terms, grads


def check(setup, prep, hand_loss_fn):
    """kdext loss == float64 hand loss (value and gradient w.r.t. every student parameter)."""
    loss, _, grads = kdext_loss_and_grads(setup, prep)
    s64, t64 = copies64(setup)
    ref = hand_loss_fn(s64, t64)
    ref.backward()
    assert torch.allclose(loss, ref.detach(), rtol=1e-5, atol=1e-6), (float(loss), float(ref))
    for n, p in s64.named_parameters():
        g, r = grads[n], p.grad
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-5 * (1 + float(r.abs().max()))), (n, float((g - r).abs().max()))
    return float(loss)


def data_loss64(kind, lm_coef=0.0, beta=0.5, alpha=0.1):
    def fn(batch):
        def loss(s64, t64):
            ys = tokens_of(batch)
            ss = per_example_logits(s64, batch)
            n = sum(len(y) for y in ys)
            total = 0.0
            if kind != "nll":
                ts = per_example_logits(t64, batch)
                total = sum(divergence64(kind, s, t, beta, alpha).sum() for s, t in zip(ss, ts)) / n
            if kind == "nll" or lm_coef:
                total = total + (1.0 if kind == "nll" else lm_coef) * sum(nll64(s, y).sum() for s, y in zip(ss, ys)) / n
            return total

        return loss

    return fn


# ---------------------------------------------------------------------------------------------
# Data-based methods


@pytest.mark.parametrize(
    "method, kind, mkw",
    [
        ("sft", "nll", {}),
        ("kd", "forward_kl", {}),
        ("kd", "forward_kl", {"lm_coef": 0.7}),
        ("rkl", "reverse_kl", {}),
        ("distillm", "skew_forward_kl", {}),
        ("distillm", "skew_reverse_kl", {"skew": "skew_reverse_kl", "alpha": 0.3}),
        ("gkd", "jsd", {"lam": 0.0, "beta": 0.3}),
    ],
)
def test_data_method_loss_matches_float64(tiny, method, kind, mkw):
    setup = make_setup(tiny, method, **mkw)
    cfg = setup.ctx.cfg
    batch = micro_batch(setup, step=0, micro=0)
    assert batch.prompt_mask[:, 0].logical_not().any(), "the batch should exercise left padding"
    prep = setup.method.prepare(setup.ctx, batch, step=0)
    assert prep.n_rollout == 0
    check(setup, prep, data_loss64(kind, cfg.lm_coef, cfg.beta, cfg.alpha)(batch))


def split_rows(batch, k):
    """(first k rows, the rest) of a batch, as Batches."""
    from kdext.train.methods import _first_rows
    from kdext.train.data import Batch

    rest = Batch(batch.prompt_ids[k:], batch.prompt_mask[k:], batch.response_ids[k:], batch.response_mask[k:],
                 batch.index[k:])
    return _first_rows(batch, k), rest


@pytest.mark.parametrize(
    "method, mkw",
    [("seqkd", {}), ("gkd", {"lam": 1.0, "beta": 0.7}), ("gkd", {"lam": 1.0, "lm_coef": 0.4})],
)
def test_sampling_method_loss_matches_float64(tiny, method, mkw):
    """SeqKD (teacher samples) and on-policy GKD (student samples): real rollouts from
    kdext.top_p_sample, then the loss on them checked by hand."""
    setup = make_setup(tiny, method, **mkw)
    cfg = setup.ctx.cfg
    batch = micro_batch(setup, step=0, micro=0)
    prep = setup.method.prepare(setup.ctx, batch, step=0)
    assert prep.n_rollout == batch.prompt_ids.shape[0]
    roll, data = split_rows(prep.batch, prep.n_rollout)
    # the samples really replaced the data's responses
    assert not torch.equal(roll.response_ids, batch.response_ids[:, : roll.response_ids.shape[1]])
    if method == "seqkd":
        check(setup, prep, data_loss64("nll")(roll))
        return

    def hand(s64, t64):
        total = data_loss64("jsd", beta=cfg.beta)(roll)(s64, t64)
        if cfg.lm_coef:
            total = total + data_loss64("nll")(data)(s64, t64) * cfg.lm_coef
        return total

    check(setup, prep, hand)


def test_minillm_real_rollout_loss_matches_float64(tiny):
    """MiniLLM's prepare() end to end: teacher-mixed samples, then the objective by hand from the
    rollout's own log-probs (with PPO epochs, so a later step reuses the rollout)."""
    setup = make_setup(tiny, "minillm", lm_coef=0.3, ppo_epochs=2)
    cfg = setup.ctx.cfg
    batch = micro_batch(setup, step=0, micro=0)
    prep = setup.method.prepare(setup.ctx, batch, step=0)
    roll, data = split_rows(prep.batch, prep.n_rollout)
    ex = prep.batch.extras
    m = ex["mask"]
    old_l = [ex["old_logprob"][b][m[b]].double() for b in range(m.shape[0])]
    tlp_l = [ex["teacher_logprob"][b][m[b]].double() for b in range(m.shape[0])]
    check(setup, prep, minillm_loss64(roll, data, old_l, tlp_l, cfg))
    # step 1 is in the same PPO cycle: same rollout, fresh data for the LM term
    prep1 = setup.method.prepare(setup.ctx, micro_batch(setup, step=1, micro=0), step=1)
    assert prep1.batch.extras is ex
    assert not torch.equal(split_rows(prep1.batch, prep1.n_rollout)[1].response_ids, data.response_ids)
    # step 2 starts a new cycle: new samples
    prep2 = setup.method.prepare(setup.ctx, micro_batch(setup, step=2, micro=0), step=2)
    assert prep2.batch.extras is not ex


def test_padded_student_head_is_masked(tiny):
    """A student whose LM head is wider than the tokenizer: the extra ids get -inf, so the loss
    equals the loss over the real vocabulary (the hand computation drops those columns)."""
    setup = make_setup(tiny, "kd", student="llama_student_padded", lm_coef=0.5)
    V = len(setup.tokenizer)
    assert setup.ctx.aligner.width == V + 13
    batch = micro_batch(setup, step=0, micro=0)
    prep = setup.method.prepare(setup.ctx, batch, step=0)

    def hand(s64, t64):
        ys = tokens_of(batch)
        ss = [s[:, :V] for s in per_example_logits(s64, batch)]
        ts = per_example_logits(t64, batch)
        n = sum(len(y) for y in ys)
        fkl = sum(divergence64("forward_kl", s, t).sum() for s, t in zip(ss, ts)) / n
        return fkl + 0.5 * sum(nll64(s, y).sum() for s, y in zip(ss, ys)) / n

    check(setup, prep, hand)


# ---------------------------------------------------------------------------------------------
# MiniLLM


def returns64(r: list[float], gamma: float) -> list[float]:
    """R_t = sum_{k>t} gamma^(k-t-1) r_k / (number of k > t), by the definition."""
    L = len(r)
    out = []
    for t in range(L):
        fut = [gamma ** (k - t - 1) * r[k] for k in range(t + 1, L)]
        out.append(sum(fut) / len(fut) if fut else 0.0)
    return out


def minillm_loss64(batch_roll, batch_data, old_lp, t_lp, cfg):
    """The MiniLLM objective by hand; old_lp / t_lp: lists of per-token float64 tensors."""
    a, eps = cfg.alpha, cfg.clip_eps

    def loss(s64, t64):
        ys = tokens_of(batch_roll)
        ss, ts = per_example_logits(s64, batch_roll), per_example_logits(t64, batch_roll)
        n = sum(len(y) for y in ys)
        pg = single = 0.0
        for s, t, y, old, tl in zip(ss, ts, ys, old_lp, t_lp):
            q_old, p_y = old.exp(), tl.exp()
            w = q_old / ((1 - a) * q_old + a * p_y)
            adv = torch.tensor(returns64((tl - old).tolist(), cfg.gamma), dtype=torch.float64)
            logq = torch.log_softmax(s / T, -1).gather(-1, y[:, None])[:, 0]
            rho = torch.exp(logq - old)
            pg = pg + (w * torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))).sum()
            single = single + (w * divergence64("reverse_kl", s, t)).sum()
        total = pg / n + single / n
        if cfg.lm_coef:
            yd = tokens_of(batch_data)
            sd = per_example_logits(s64, batch_data)
            total = total + cfg.lm_coef * sum(nll64(s, y).sum() for s, y in zip(sd, yd)) / sum(len(y) for y in yd)
        return total

    return loss


@pytest.mark.parametrize("alpha, gamma, lm_coef", [(0.2, 1.0, 0.5), (0.4, 0.9, 0.0)])
def test_minillm_loss_matches_float64(tiny, alpha, gamma, lm_coef):
    """The PG term (with clipping actually active), the single-step term and the LM term."""
    setup = make_setup(tiny, "minillm", alpha=alpha, gamma=gamma, lm_coef=lm_coef, clip_eps=0.1)
    cfg = setup.ctx.cfg
    data = micro_batch(setup, step=0, micro=0)
    roll = micro_batch(setup, step=1, micro=0)  # a "rollout": other prompts, responses given
    g = torch.Generator().manual_seed(0)
    m = roll.response_mask
    # Old log-probs off the current policy by up to +-0.4 nats, so rho leaves [1-eps, 1+eps].
    with torch.no_grad():
        s_rows = per_example_logits(copy.deepcopy(unwrap(setup.student)).double(), roll)
    cur = torch.zeros(m.shape, dtype=torch.float64)
    cur[m] = torch.cat([torch.log_softmax(s / T, -1).gather(-1, y[:, None])[:, 0] for s, y in zip(s_rows, tokens_of(roll))])
    old = (cur + (torch.rand(m.shape, generator=g, dtype=torch.float64) - 0.5) * 0.8).masked_fill(~m, 0)
    tlp = (torch.rand(m.shape, generator=g, dtype=torch.float64) * -4).masked_fill(~m, 0)
    sampled = M.MiniLLM.attach(roll, old.float(), tlp.float(), cfg)
    prep = M.MiniLLM.assemble(cfg, sampled, data, setup.ctx.pad_id)
    assert prep.n_rollout == roll.prompt_ids.shape[0]
    rho = torch.exp(cur - old)[m]
    assert ((rho < 1 - 0.1) | (rho > 1 + 0.1)).any(), "the test must exercise the clip"
    old_l = [old[b][m[b]].double() for b in range(m.shape[0])]
    tlp_l = [tlp[b][m[b]].double() for b in range(m.shape[0])]
    # float32 storage of old/tlp is what the loss sees: round the reference the same way
    old_l = [x.float().double() for x in old_l]
    tlp_l = [x.float().double() for x in tlp_l]
    check(setup, prep, minillm_loss64(roll, data, old_l, tlp_l, cfg))


def test_minillm_single_step_term_is_full_vocab_reverse_kl(tiny):
    """With rewards that are all zero and rho = 1 (old = current), the PG term vanishes and the
    loss is exactly the mean importance-weighted reverse KL over response positions."""
    setup = make_setup(tiny, "minillm", alpha=0.0, lm_coef=0.0)
    cfg = setup.ctx.cfg
    roll = micro_batch(setup, step=0, micro=0)
    m = roll.response_mask
    with torch.no_grad():
        s_rows = per_example_logits(copy.deepcopy(unwrap(setup.student)).double(), roll)
    cur = torch.zeros(m.shape)
    cur[m] = torch.cat([torch.log_softmax(s / T, -1).gather(-1, y[:, None])[:, 0] for s, y in zip(s_rows, tokens_of(roll))]).float()
    sampled = M.MiniLLM.attach(roll, cur, cur, cfg)  # teacher lp = student lp: zero reward
    prep = M.MiniLLM.assemble(cfg, sampled, roll, setup.ctx.pad_id)
    loss, terms, _ = kdext_loss_and_grads(setup, prep)
    assert abs(float(terms["pg"].detach())) < 1e-6
    s64, t64 = copies64(setup)
    ts = per_example_logits(t64, roll)
    ref = sum(divergence64("reverse_kl", s, t).sum() for s, t in zip(per_example_logits(s64, roll), ts)) / int(m.sum())
    assert torch.allclose(loss, ref.detach(), rtol=1e-5)


def test_normalized_returns_and_weights():
    r = torch.tensor([[1.0, 2.0, 4.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True, False], [True, True, False, False]])
    got = M.normalized_returns(r, m, gamma=0.5)
    want = [returns64([1.0, 2.0, 4.0], 0.5) + [0.0], returns64([3.0, -1.0], 0.5) + [0.0, 0.0]]
    assert torch.allclose(got, torch.tensor(want))
    q, p = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -0.5])
    w = M.importance_weight(q, p, 0.2)
    assert torch.allclose(w, q.exp() / (0.8 * q.exp() + 0.2 * p.exp()))
    assert torch.equal(M.importance_weight(q, p, 0.0), torch.ones(2))


def test_combine_divides_each_term_by_its_own_count(tiny):
    setup = make_setup(tiny, "minillm", lm_coef=0.25)
    terms = {"pg": torch.tensor(6.0), "single": torch.tensor(4.0), "nll": torch.tensor(10.0)}
    got = setup.method.combine(setup.ctx.cfg, terms, {"pg": 3, "single": 3, "nll": 5})
    assert float(got) == pytest.approx(6 / 3 + 4 / 3 + 0.25 * 10 / 5)


def test_concat_batches_keeps_rows_aligned(tiny):
    setup = make_setup(tiny, "sft")
    a, b = micro_batch(setup, 0, 0), micro_batch(setup, 1, 0)
    c = concat_batches(a, b, setup.ctx.pad_id)
    for src, rows in ((a, range(0, 5)), (b, range(5, 10))):
        for i, r in enumerate(rows):
            assert torch.equal(c.prompt_ids[r][c.prompt_mask[r]], src.prompt_ids[i][src.prompt_mask[i]])
            assert torch.equal(c.response_ids[r][c.response_mask[r]], src.response_ids[i][src.response_mask[i]])
