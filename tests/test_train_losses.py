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
from kdext.train.config import TrainConfig
from kdext.train.step import build, micro_batch

from train_fixtures import ref64 as R
from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)

T = 1.3  # a non-trivial temperature, so its plumbing is checked too


def make_setup(tiny, method, teacher="gpt2_teacher", student="llama_student", train_kw=None, **mkw):
    if method == "distillm":
        mkw.setdefault("sgo", "off")  # the schedule has its own tests (test_train_distillm.py)
    mcfg = M.MethodConfig(temperature=T, max_new_tokens=6, **mkw)
    cfg = TrainConfig(
        method=method, teacher=tiny[teacher], student=tiny[student], data=tiny["data"], out=tiny["root"] + "/unused",
        batch_size=5, seed=1, method_cfg=mcfg, progress=False, **(train_kw or {}),
    )
    return build(cfg)


# ---------------------------------------------------------------------------------------------
# float64 reference


def per_example_logits(model64, batch):
    return R.per_example(model64, batch)


def divergence64(kind, s, t, beta=0.5, alpha=0.1):
    return R.divergence64(kind, s, t, T, beta, alpha)


tokens_of, nll64, check, kdext_loss_and_grads, split_rows = R.tokens_of, R.nll64, R.check, R.kdext_loss_and_grads, R.split_rows


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
    assert prep.n_main == batch.prompt_ids.shape[0] and (prep.lm_shared or not cfg.lm_coef)
    check(setup, prep, data_loss64(kind, cfg.lm_coef, cfg.beta, cfg.alpha)(batch))


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
    assert prep.n_main == batch.prompt_ids.shape[0]
    roll, data = split_rows(prep.batch, prep.n_main)
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


def test_combine_divides_each_term_by_its_own_count(tiny):
    setup = make_setup(tiny, "minillm", lm_coef=0.25, kd_ratio=0.2)
    terms = {"pg": torch.tensor(6.0), "single": torch.tensor(4.0), "nll": torch.tensor(10.0), "lm_kd": torch.tensor(7.0)}
    got = setup.method.combine(setup.ctx.cfg, terms, {"pg": 3, "single": 3, "nll": 5, "lm_kd": 5})
    assert float(got) == pytest.approx(6 / 3 + 4 / 3 + 0.25 * (0.8 * 10 / 5 + 0.2 * 7 / 5))


@pytest.mark.parametrize("method, kind", [("kd", "forward_kl"), ("gkd", "jsd")])
def test_lm_data_term_with_kd_ratio_matches_float64(tiny, method, kind):
    """--lm-data: the LM term (1 - r) CE + r H(p, q) at T = 1 on the LM documents (appended to the
    main rows), with the method's term on the data; here with the hidden-state term too."""
    setup = make_setup(tiny, method, train_kw={"lm_data": tiny["lm"]}, lam=0.0, kd_ratio=0.4, hidden_coef=0.3,
                       hidden_layers="1:2,0:1", hidden_loss="cosine")
    cfg = setup.ctx.cfg
    assert cfg.lm_coef == 1.0  # the default with --lm-data
    batch = micro_batch(setup, step=0, micro=0)
    prep = setup.method.prepare(setup.ctx, batch, step=0)
    assert not prep.lm_shared and prep.n_main == 5
    main, lm = split_rows(prep.batch, prep.n_main)
    assert lm.prompt_mask.sum(-1).eq(1).all(), "an LM document's first token is its only 'prompt' token"
    proj64 = copy.deepcopy(setup.projection).double()

    def hand(s64, t64):
        ys, yl = tokens_of(main), tokens_of(lm)
        (ss, s_states), (ts, t_states) = R.per_example(s64, main, True), R.per_example(t64, main, True)
        n, n_lm = sum(map(len, ys)), sum(map(len, yl))
        total = sum(divergence64(kind, s, t, cfg.beta).sum() for s, t in zip(ss, ts)) / n
        sl, tl = R.per_example(s64, lm), R.per_example(t64, lm)
        ce = sum(nll64(s, y).sum() for s, y in zip(sl, yl)) / n_lm
        h = sum(R.cross_entropy64(s, t).sum() for s, t in zip(sl, tl)) / n_lm
        total = total + 0.6 * ce + 0.4 * h
        hid = 0.0
        for sh, th in zip(s_states, t_states):
            for lin, (a, b) in zip(proj64.proj, [(1, 2), (0, 1)]):
                x = lin(sh[a])
                hid = hid + (1 - torch.nn.functional.cosine_similarity(x, th[b], dim=-1)).sum() / 2
        return total + 0.3 * hid / n

    check(setup, prep, hand, projection64=proj64)


def test_concat_batches_keeps_rows_aligned(tiny):
    setup = make_setup(tiny, "sft")
    a, b = micro_batch(setup, 0, 0), micro_batch(setup, 1, 0)
    c = concat_batches(a, b, setup.ctx.pad_id)
    for src, rows in ((a, range(0, 5)), (b, range(5, 10))):
        for i, r in enumerate(rows):
            assert torch.equal(c.prompt_ids[r][c.prompt_mask[r]], src.prompt_ids[i][src.prompt_mask[i]])
            assert torch.equal(c.response_ids[r][c.response_mask[r]], src.response_ids[i][src.response_mask[i]])
