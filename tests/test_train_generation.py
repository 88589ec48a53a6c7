"""The KV-cached rollout sampler: its per-token log-probs match a full forward, it stops at EOS
or max_new_tokens, mixes in the teacher as asked, and a row's sample depends on its seed only."""

from __future__ import annotations

import pytest
import torch

from kdext.train import generation
from kdext.train.data import Batch
from kdext.train.models import VocabAligner, head_width, load_model, load_tokenizer

from train_fixtures import tiny as fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from fixtures.one_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    paths = fixtures.get(tmp_path_factory)
    tok = load_tokenizer(paths["llama_student"])
    student = load_model(paths["llama_student_padded"], "--student", torch.device("cpu"), trainable=False)
    teacher = load_model(paths["gpt2_teacher"], "--teacher", torch.device("cpu"), trainable=False)
    aligner = VocabAligner(len(tok), head_width(teacher), head_width(student))
    prompts = ["pick one: cat dog red\n", "reverse: fig owl tan\n", "name a color not in: red cat gold\n",
               "pick two: apple pear plum fig\n", "which is a fruit: cat fig red\n"]
    ids = [tok(p)["input_ids"] for p in prompts]
    from kdext.train.data import pad_prompts

    p_ids, p_mask = pad_prompts(ids, tok.pad_token_id)
    return dict(tok=tok, student=student, teacher=teacher, aligner=aligner, p_ids=p_ids, p_mask=p_mask)


def run(env, rows=None, seed=1000, **kw):
    rows = list(range(env["p_ids"].shape[0])) if rows is None else rows
    args = dict(aligner=env["aligner"], eos_id=env["tok"].eos_token_id, pad_id=env["tok"].pad_token_id,
                max_new_tokens=6, seed=seed, row_ids=torch.tensor(rows))
    args.update(kw)
    p_ids, p_mask = env["p_ids"][rows], env["p_mask"][rows]
    # re-trim the left padding, as a batch of only these rows would have it
    keep = p_mask.any(0)
    return generation.sample(env["student"], p_ids[:, keep], p_mask[:, keep], **args), p_ids[:, keep], p_mask[:, keep]


def full_logprobs(model, aligner, p_ids, p_mask, ro, T):
    """log softmax(logits / T)[token] from one full forward over prompt + response (float64)."""
    b = Batch(p_ids, p_mask, ro.response_ids, ro.response_mask, torch.arange(p_ids.shape[0]))
    from kdext.train.models import position_ids

    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask.long(),
                       position_ids=position_ids(b.attention_mask)).logits
    P = p_ids.shape[1]
    lg = aligner(logits[:, P - 1 : -1]).double()
    return torch.log_softmax(lg / T, -1).gather(-1, ro.response_ids[..., None])[..., 0]


@pytest.mark.parametrize("alpha, top_p, T", [(0.0, 1.0, 1.0), (0.3, 0.9, 1.4)])
def test_rollout_logprobs_match_a_full_forward(env, alpha, top_p, T):
    ro, p_ids, p_mask = run(env, teacher=env["teacher"], alpha=alpha, top_p=top_p, temperature=T)
    m = ro.response_mask
    lq = full_logprobs(env["student"], env["aligner"], p_ids, p_mask, ro, T)
    lp = full_logprobs(env["teacher"], env["aligner"], p_ids, p_mask, ro, T)
    assert torch.allclose(ro.student_logprob[m].double(), lq[m], atol=2e-5)
    assert torch.allclose(ro.teacher_logprob[m].double(), lp[m], atol=2e-5)
    if top_p == 1.0:  # unfiltered: the sample's log-prob is that of the mixture itself
        mix = torch.log((1 - alpha) * lq.exp() + alpha * lp.exp())
        assert torch.allclose(ro.sample_logprob[m].double(), mix[m], atol=2e-5)
    else:  # filtering only removes mass: the renormalised probability can only go up
        mix = torch.log((1 - alpha) * lq.exp() + alpha * lp.exp())
        assert (ro.sample_logprob[m].double() >= mix[m] - 1e-5).all()
        # every drawn token cleared the nucleus threshold
        assert (mix[m].exp() >= ro.threshold[m].double() - 1e-6).all()
    # the padded student head's extra ids are never drawn
    assert (ro.response_ids[m] < len(env["tok"])).all()


def test_stops_at_eos_and_max_new_tokens(env):
    ro, _, _ = run(env, max_new_tokens=7)
    eos = env["tok"].eos_token_id
    m = ro.response_mask
    assert ro.response_ids.shape[1] <= 7
    for b in range(m.shape[0]):
        n = int(m[b].sum())
        assert m[b, :n].all() and not m[b, n:].any(), "the mask must be a prefix"
        toks = ro.response_ids[b, :n].tolist()
        assert eos not in toks[:-1], "nothing is generated after EOS"
        if n < ro.response_ids.shape[1]:
            assert toks[-1] == eos
        assert (ro.response_ids[b, n:] == env["tok"].pad_token_id).all()
        assert (ro.student_logprob[b, n:] == 0).all()
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(env, max_new_tokens=0)
    with pytest.raises(ValueError, match="teacher"):
        run(env, alpha=0.2)


def test_a_rows_sample_depends_on_its_seed_and_id_only(env):
    """Same seed -> same samples; a row alone (with its id) gives what it gives inside the batch
    (the DDP and resume guarantees rest on this); another seed, or other ids, give other samples."""
    full, _, _ = run(env, teacher=env["teacher"], alpha=0.2, max_new_tokens=5)
    again, _, _ = run(env, teacher=env["teacher"], alpha=0.2, max_new_tokens=5)
    assert torch.equal(full.response_ids, again.response_ids)
    for r in (1, 3):
        alone, _, _ = run(env, rows=[r], teacher=env["teacher"], alpha=0.2, max_new_tokens=5)
        n = int(alone.response_mask.sum())
        assert torch.equal(alone.response_ids[0, :n], full.response_ids[r, :n])
        assert torch.allclose(alone.student_logprob[0, :n], full.student_logprob[r, :n], atol=1e-5)
    base, _, _ = run(env, max_new_tokens=5)
    other, _, _ = run(env, seed=77, max_new_tokens=5)
    assert not torch.equal(other.response_ids, base.response_ids)
    shifted, _, _ = run(env, max_new_tokens=5, row_ids=torch.arange(5) + 5)
    assert not torch.equal(shifted.response_ids, base.response_ids)
    with pytest.raises(ValueError, match="row_ids"):
        run(env, row_ids=torch.arange(4))


class Broken(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, cache=None, **kw):
        out = self.inner(cache=cache, **kw)
        out.logits = out.logits * float("nan")
        return out


def test_nan_logits_raise(env):
    with pytest.raises(generation.NonFiniteLogits, match="NaN/inf logits"):
        generation.sample(Broken(env["student"]), env["p_ids"], env["p_mask"], aligner=env["aligner"],
                          eos_id=1, pad_id=0, max_new_tokens=2, seed=0, row_ids=torch.arange(5))


def test_mix_seed_spreads():
    seeds = {generation.mix_seed(0, 3, step, row) for step in range(20) for row in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**62 for s in seeds)


class _Counting(torch.nn.Module):
    """A model that counts its forward calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, cache=None, **kw):
        self.calls += 1
        return self.inner(cache=cache, **kw)


def test_lockstep_keeps_stepping_until_every_process_is_done(env):
    """With ``sync`` (--fsdp: every forward all-gathers, so every process must make as many), a
    process whose rows have all ended keeps stepping while another process still samples, and
    its result is what it would have sampled alone."""
    rows = [1]
    free, _, _ = run(env, rows=rows, max_new_tokens=8)
    eos = int(free.response_ids[0, 2])  # make the row end at (or before) its third token
    alone, _, _ = run(env, rows=rows, max_new_tokens=8, eos_id=eos)
    n = alone.response_ids.shape[1]
    assert n <= 3 and alone.response_ids[0, n - 1] == eos
    seen = []

    def others_run_to_the_limit(running, failed):
        seen.append((running, failed))
        return True, False

    counted = _Counting(env["student"])
    p_ids, p_mask = env["p_ids"][rows], env["p_mask"][rows]
    keep = p_mask.any(0)
    synced = generation.sample(counted, p_ids[:, keep], p_mask[:, keep], aligner=env["aligner"], eos_id=eos,
                               pad_id=env["tok"].pad_token_id, max_new_tokens=8, seed=1000,
                               row_ids=torch.tensor(rows), sync=others_run_to_the_limit)
    assert counted.calls == 8 and len(seen) == 8  # one forward and one sync per position, to the limit
    assert seen[n - 1:] == [(False, False)] * (8 - n + 1)  # this process was done after n tokens
    for name in ("response_ids", "response_mask", "student_logprob", "sample_logprob", "threshold"):
        assert torch.equal(getattr(synced, name), getattr(alone, name)), name


def test_lockstep_stops_every_process_when_one_cannot_sample(env):
    def another_failed(running, failed):
        return running, True

    with pytest.raises(generation.NonFiniteLogits, match="another process had NaN/inf logits at generated position 0"):
        generation.sample(env["student"], env["p_ids"], env["p_mask"], aligner=env["aligner"], eos_id=1, pad_id=0,
                          max_new_tokens=3, seed=0, row_ids=torch.arange(5), sync=another_failed)

    # the process that cannot sample tells the others (through sync) before it raises
    told = []

    def sync(running, failed):
        told.append(failed)
        return running, failed

    with pytest.raises(generation.NonFiniteLogits, match="rows .* have NaN/inf logits at generated position 0"):
        generation.sample(Broken(env["student"]), env["p_ids"], env["p_mask"], aligner=env["aligner"], eos_id=1,
                          pad_id=0, max_new_tokens=3, seed=0, row_ids=torch.arange(5), sync=sync)
    assert told == [True]
