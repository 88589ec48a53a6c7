"""DistiLLM's adaptive off-policy schedule (jongwooko/distillm ``finetune.py``): the probability
rule as pure functions, case by case; the replay buffer; and the method on tiny models (which
rows each step trains on, what the buffer holds and replays, when the threshold rises, the
loss on generated rows against float64)."""

from __future__ import annotations

import random

import pytest

from kdext.train import distillm as D
from kdext.train import methods as M
from kdext.train.config import TrainConfig
from kdext.train.options import ConfigError
from kdext.train.seeds import Stream, stream_seed
from kdext.train.step import build

from train_fixtures import ref64 as R
from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)


# ---------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("replay, step, want", [
    ("decreasing", 0, 0.8 * (1 - 1 / 10)),  # the authors count steps from 1
    ("decreasing", 9, 0.0),
    ("constant", 3, 0.4),
    ("increasing", 4, 0.8 * 5 / 10),
])
def test_fresh_probability(replay, step, want):
    assert D.fresh_probability(0.8, step, 10, replay) == pytest.approx(want)


@pytest.mark.parametrize("u, threshold, fresh, length, capacity, want", [
    (0.05, 0.5, 0.1, 10, 10, "fresh"),  # u < f: fresh, even with a full buffer
    (0.3, 0.5, 0.1, 9, 10, "fresh"),  # f <= u < h, buffer not full: fresh
    (0.3, 0.5, 0.1, 10, 10, "replay"),  # f <= u < h, buffer full: replay
    (0.5, 0.5, 0.1, 10, 10, "data"),  # u >= h: the data
    (0.0, 0.0, 0.0, 0, 10, "data"),  # h = 0 (the initial threshold): always the data
    (0.99, 1.0, 0.0, 10, 10, "replay"),  # h = 1 at the last step: replay only
])
def test_choose_rows(u, threshold, fresh, length, capacity, want):
    assert D.choose_rows(u, threshold, fresh, length, capacity) == want


def test_update_threshold_rises_exactly_when_the_loss_rose_by_eps():
    # below reference + eps: nothing moves, the reference neither (even when the loss fell)
    assert D.update_threshold(0.2, 2.0, 2.09, 0.1, 0.1) == (0.2, 2.0)
    assert D.update_threshold(0.2, 2.0, 1.5, 0.1, 0.1) == (0.2, 2.0)
    # at or above: +0.1 and the reference moves to the loss
    assert D.update_threshold(0.2, 2.0, 2.1, 0.1, 0.1) == (pytest.approx(0.3), 2.1)
    assert D.update_threshold(0.2, 2.0, 3.0, 0.1, 0.1) == (pytest.approx(0.3), 3.0)
    # capped at 1
    assert D.update_threshold(0.95, 2.0, 3.0, 0.1, 0.1) == (1.0, 3.0)


def test_replay_buffer_fifo_sampling_and_state():
    buf = D.ReplayBuffer(3)
    buf.push([([1], [10]), ([2], [20])])
    buf.push([([3], [30]), ([4], [40])])
    assert len(buf) == 3 and [p[0] for p, _ in buf.rows] == [2, 3, 4]  # the oldest row left
    rows = buf.sample(3, random.Random(0))
    assert sorted(r[1][0] for r in rows) == [20, 30, 40]  # without replacement
    with pytest.raises(ValueError):
        buf.sample(4, random.Random(0))
    other = D.ReplayBuffer(1)
    other.load_state_dict(buf.state_dict())
    assert list(other.rows) == list(buf.rows) and other.capacity == 3
    other.push([([5], [50])])
    assert [p[0] for p, _ in other.rows] == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# The method


def make_setup(tiny, eval_data=True, **mkw):
    mcfg = M.MethodConfig(max_new_tokens=5, **mkw)
    cfg = TrainConfig(method="distillm", teacher=tiny["llama_teacher"], student=tiny["gpt2_student"],
                      data=tiny["data"], eval_data=tiny["eval"] if eval_data else None, out=tiny["root"] + "/unused",
                      batch_size=2, grad_accum=2, max_steps=10, seed=4, method_cfg=mcfg, progress=False)
    return build(cfg)


def test_adaptive_schedule_needs_validation_data(tiny):
    with pytest.raises(ConfigError, match="--eval-data is required for --method distillm"):
        make_setup(tiny, eval_data=False)
    make_setup(tiny, eval_data=False, sgo="off")
    with pytest.raises(ConfigError, match="--sgo-capacity"):
        make_setup(tiny, sgo_capacity=3)  # less than one global batch (4 rows)


def test_steps_train_on_what_the_rule_says_and_the_buffer_holds_it(tiny):
    setup = make_setup(tiny, sgo_init=1.0, sgo_capacity=8)
    method, ctx = setup.method, setup.ctx
    assert method.reference is None
    seen = {"fresh": 0, "replay": 0, "data": 0}
    for step in range(10):
        length = len(method.buffer)
        before = list(method.buffer.rows)
        preps = method.prepare_step(ctx, step)
        if step == 0:
            assert method.reference == pytest.approx(method.validation_loss(ctx))  # evaluated before training
        u = random.Random(stream_seed(ctx.cfg.seed, Stream.DISTILLM_COIN, step)).random()
        want = D.choose_rows(u, 1.0, D.fresh_probability(1.0, step, 10, "decreasing"), length, 8)
        seen[want] += 1
        assert preps[0].stats["sgo_fresh"][0] == float(want == "fresh")
        assert preps[0].stats["sgo_replay"][0] == float(want == "replay")
        rows = [(p.batch.prompt_ids[i][p.batch.prompt_mask[i]].tolist(),
                 p.batch.response_ids[i][p.batch.response_mask[i]].tolist())
                for p in preps for i in range(p.n_main)]
        data = [ctx.data(step, a) for a in range(2)]
        gold = [(d.prompt_ids[i][d.prompt_mask[i]].tolist(), d.response_ids[i][d.response_mask[i]].tolist())
                for d in data for i in range(2)]
        if want == "fresh":
            # the step's prompts, the student's responses (EOS kept), appended to the buffer in order
            assert [p for p, _ in rows] == [p for p, _ in gold] and rows != gold
            assert list(method.buffer.rows) == (before + rows)[-8:]
        elif want == "replay":
            assert list(method.buffer.rows) == before
            assert all(r in before for r in rows) and len(set(map(str, rows))) == 4
            rng = random.Random(stream_seed(ctx.cfg.seed, Stream.DISTILLM_REPLAY, step))
            assert rows == [before[i] for i in rng.sample(range(len(before)), 4)]
        else:
            assert rows == gold and list(method.buffer.rows) == before
    assert seen["fresh"] and seen["replay"], seen  # both branches exercised
    assert all(r[1][-1] == ctx.eos_id or len(r[1]) == 5 for r in method.buffer.rows)


def test_threshold_rises_exactly_when_the_validation_loss_rose(tiny, monkeypatch):
    setup = make_setup(tiny, sgo_eval_every=2)
    method, ctx = setup.method, setup.ctx
    losses = iter([2.0, 2.05, 2.2, 2.25, 2.31, 1.0])  # before training, then after steps 2, 4, 6, 8, 10
    monkeypatch.setattr(method, "validation_loss", lambda ctx: next(losses))
    method.prepare_step(ctx, 0)
    got = [method.after_step(ctx, k) for k in range(1, 11)]
    assert [r["sgo_threshold"] for r in got] == pytest.approx([0, 0, 0, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2])
    assert [k + 1 for k, r in enumerate(got) if "sgo_val_loss" in r] == [2, 4, 6, 8, 10]
    assert method.reference == 2.31  # moved at each raise only
    state = method.state_dict()
    assert state["threshold"] == pytest.approx(0.2) and state["buffer"]["rows"] == []


def test_default_interval_is_one_pass_over_the_data(tiny):
    setup = make_setup(tiny)
    assert setup.method._interval == 48 // 4  # 48 examples, global batch 4
    assert setup.ctx.cfg.sgo_init == 0.0 and setup.ctx.cfg.sgo_capacity == 1000  # the authors' defaults


def test_loss_on_generated_rows_matches_float64(tiny):
    setup = make_setup(tiny, sgo_init=1.0, skew="skew_reverse_kl", lm_coef=0.5)
    cfg = setup.ctx.cfg
    prep = setup.method.prepare_step(setup.ctx, 0)[0]  # step 0: the buffer is empty -> fresh
    assert prep.stats["sgo_fresh"][0] == 1.0 and not prep.lm_shared
    gen, data = R.split_rows(prep.batch, prep.n_main)

    def hand(s64, t64):
        yg, yd = R.tokens_of(gen), R.tokens_of(data)
        sg, tg = R.per_example(s64, gen), R.per_example(t64, gen)
        sd = R.per_example(s64, data)
        kl = sum(R.divergence64("skew_reverse_kl", s, t, 1.0, alpha=cfg.alpha).sum() for s, t in zip(sg, tg))
        ce = sum(R.nll64(s, y).sum() for s, y in zip(sd, yd))
        return kl / sum(map(len, yg)) + 0.5 * ce / sum(map(len, yd))

    R.check(setup, prep, hand)
