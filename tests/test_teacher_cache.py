"""The offline teacher end to end on tiny GPT-2 / Llama models: ``kdext teacher-cache`` and
``kdext distill --teacher-cache``.

* at k = V (fp32 cache, tail "bucket") the cached loss and its gradients equal the live
  teacher's, for every method a cache serves, with a student whose LM head is padded past the
  tokenizer;
* at k < V the rows a micro-batch reads are the live teacher's top-k of the same positions;
* every field of the manifest the run depends on is checked, and named when it differs;
* a capture stopped after some shards (and a leftover temporary of a killed write) resumes to
  the very bytes of an uninterrupted capture;
* on-policy methods refuse a cache; kd / rkl train from one, and resume as with a live teacher;
* the format stays within 6k + 16 bytes per position (fp16, bf16).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import kdext
from kdext.train import cache_format as F
from kdext.train import cli
from kdext.train import methods as M
from kdext.train.config import MethodConfig, TrainConfig
from kdext.train.models import load_tokenizer
from kdext.train.step import build, micro_batch

from train_fixtures import tiny as fixtures

T = 1.3  # a non-trivial temperature: captured at it, and checked


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from fixtures.one_thread()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.get(tmp_path_factory)


@pytest.fixture(scope="module")
def vocab(tiny):
    return len(load_tokenizer(tiny["tok"]))


def capture(tiny, out, *extra, teacher="gpt2_teacher", data=None):
    return cli.main(["teacher-cache", "--teacher", tiny[teacher], "--data", data or tiny["data"], "--out", str(out),
                     "--no-progress", *[str(x) for x in extra]])


def distill(tiny, out, method, cache, *extra, student="llama_student"):
    return cli.main(["distill", "--method", method, "--student", tiny[student], "--data", tiny["data"],
                     "--out", str(out), "--teacher-cache", str(cache), "--batch-size", "4", "--lr", "1e-3",
                     "--no-progress", *[str(x) for x in extra]])


@pytest.fixture(scope="module")
def full_cache(tiny, vocab, tmp_path_factory):
    """k = V, fp32, at T: the cache that must reproduce the live teacher."""
    out = tmp_path_factory.mktemp("full") / "cache"
    assert capture(tiny, out, "--k", vocab, "--dtype", "fp32", "--temperature", T, "--shard-examples", 20) == 0
    return out


@pytest.fixture(scope="module")
def small_cache(tiny, tmp_path_factory):
    """k = 8, fp16, T = 1: the CLI smoke runs' cache."""
    out = tmp_path_factory.mktemp("small") / "cache"
    assert capture(tiny, out, "--k", 8, "--teacher", tiny["llama_teacher"]) == 0
    return out


def setup(tiny, method, out, student="llama_student_padded", **kw):
    mkw = dict(temperature=T, max_new_tokens=6)
    if method == "gkd":
        mkw.update(lam=0.0, beta=0.3)
    if method == "distillm":
        mkw.update(sgo="off", skew="skew_reverse_kl", alpha=0.2)
    cfg = TrainConfig(method=method, student=tiny[student], data=tiny["data"], out=str(out), batch_size=6, seed=2,
                      method_cfg=MethodConfig(**mkw), progress=False, **kw)
    return build(cfg)


def loss_and_grads(s, step=0):
    """The micro-batch's loss (global token mean) and the student's gradients."""
    prep = s.method.prepare(s.ctx, micro_batch(s, step, 0), step)
    terms = s.method.terms(s.ctx, prep)
    loss = s.method.combine(s.ctx.cfg, terms, prep.counts)
    student = M.unwrap(s.student)
    student.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("method", ["kd", "rkl", "gkd", "distillm"])
def test_cache_at_k_equals_V_is_the_live_teacher(tiny, full_cache, tmp_path, method):
    live = setup(tiny, method, tmp_path / "live", teacher=tiny["gpt2_teacher"])
    cached = setup(tiny, method, tmp_path / "cached", teacher_cache=str(full_cache))
    assert cached.teacher is None and cached.ctx.teacher_cache is not None
    for step in (0, 3):
        lv, lg = loss_and_grads(live, step)
        cv, cg = loss_and_grads(cached, step)
        # fp32 log-probs of the whole vocabulary: equal to float32 rounding (the capture's batches
        # pad the rows to other widths than the trainer's micro-batches, so not bit for bit)
        assert cv == pytest.approx(lv, rel=2e-5, abs=1e-7), (step, cv, lv)
        assert lg.keys() == cg.keys()
        for n in lg:
            torch.testing.assert_close(cg[n], lg[n], rtol=2e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_cached_rows_are_the_live_teachers_top_k(tiny, tmp_path, tail):
    cache = tmp_path / "cache"
    assert capture(tiny, cache, "--k", 8, "--temperature", T, "--shard-examples", 7) == 0
    live = setup(tiny, "kd", tmp_path / "live", teacher=tiny["gpt2_teacher"])
    cached = setup(tiny, "kd", tmp_path / "cached", teacher_cache=str(cache), student="llama_student")
    cached.ctx.cfg.sparse_tail = tail
    live.ctx.fused_linear = False  # the live teacher's logits rows (the capture's input), not its hidden states
    for step in range(4):
        batch = micro_batch(live, step, 0)
        rows = M.teacher_rows(cached.ctx, batch)
        t = M.teacher_rows(live.ctx, batch).logits
        ids, logprobs, _ = kdext.topk_logprobs(t[:, : rows.vocab], 8, temperature=T)
        assert torch.equal(rows.ids, ids) and rows.logprobs.dtype == torch.float16 and rows.tail == tail
        # stored rounded toward -inf (cache_format.stored_logprobs): below the live value by less
        # than one fp16 unit in the last place (2^-10 relative), up to the float32 rounding of the
        # two forwards (other padding widths)
        assert bool((rows.logprobs.float() <= logprobs + 1e-6).all())
        torch.testing.assert_close(rows.logprobs.float(), logprobs, rtol=2**-10, atol=1e-6)


def test_a_row_that_was_not_captured_is_an_error(tiny, small_cache, tmp_path):
    cfg = TrainConfig(method="kd", student=tiny["llama_student"], data=tiny["data"], out=str(tmp_path),
                      teacher_cache=str(small_cache), progress=False)
    s = build(cfg)
    batch = micro_batch(s, 0, 0)
    batch.response_ids[0, 0] = (batch.response_ids[0, 0] + 1) % 50
    with pytest.raises(F.CacheError, match="not in the cache"):
        M.teacher_rows(s.ctx, batch)


# ---------------------------------------------------------------------------------------------
# What a cache is valid for


def test_manifest_mismatches_are_refused_naming_the_field(tiny, small_cache, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    with open(tiny["data"]) as f:
        lines = f.readlines()
    other.write_text("".join(lines[:-1]) + json.dumps({"prompt": "pick one: a b c", "response": "a"}) + "\n")
    cases = [
        ("data (--data", ["--data", other]),
        ("tokenizer (--student", ["--student", tiny["gpt2_teacher_other_vocab"]]),
        ("template (--template", ["--template", "Q: {prompt}\n"]),
        ("max_prompt_len (--max-prompt-len", ["--max-prompt-len", 200]),
        ("max_response_len (--max-response-len", ["--max-response-len", 64]),
        ("temperature (--temperature", ["--temperature", 2]),
    ]
    base = ["distill", "--method", "kd", "--student", tiny["llama_student"], "--data", tiny["data"],
            "--teacher-cache", str(small_cache), "--no-progress"]
    for i, (name, extra) in enumerate(cases):
        assert cli.main(base + ["--out", str(tmp_path / f"o{i}")] + [str(x) for x in extra]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert name in err and "captured for another run" in err, (name, err)
    # an unfinished capture is no cache
    partial = tmp_path / "partial"
    assert capture(tiny, partial, "--k", 8, "--shard-examples", 10, "--stop-after-shards", 1,
                   teacher="llama_teacher") == 0
    assert cli.main(base[:-2] + [str(partial), "--out", str(tmp_path / "op")]) == cli.EXIT_ERROR
    assert "did not finish (rerun kdext teacher-cache with --resume)" in capsys.readouterr().err


@pytest.mark.parametrize("method, extra, message", [
    ("minillm", [], "is on-policy"),
    ("seqkd", [], "is on-policy (the teacher writes the responses)"),
    ("gkd", ["--lam", "0.5"], "--lam 0.5 trains on student samples"),
    ("distillm", ["--eval-data", "EVAL"], "--sgo adaptive trains on student samples"),
    ("sft", [], "has no teacher"),
    ("kd", ["--teacher", "TEACHER"], "give one of them"),
    ("kd", ["--hidden-coef", "1"], "feature distillation needs the live --teacher"),
    ("rkl", ["--lm-data", "LM", "--kd-ratio", "0.5"], "--kd-ratio > 0"),
])
def test_methods_that_need_the_live_teacher_refuse_a_cache(tiny, small_cache, tmp_path, capsys, method, extra,
                                                          message):
    subst = {"EVAL": tiny["eval"], "TEACHER": tiny["gpt2_teacher"], "LM": tiny["lm"]}
    extra = [subst.get(x, x) for x in extra]
    assert distill(tiny, tmp_path, method, small_cache, *extra) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2, err
    assert not os.path.exists(tmp_path / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# Capture: resume, refusals, format


def _files(folder) -> dict:
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def test_stopped_capture_resumes_to_the_same_bytes(tiny, tmp_path, capsys):
    args = ["--k", 16, "--shard-examples", 8, "--batch-size", 3, "--temperature", T]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert capture(tiny, whole, *args) == 0
    assert capture(tiny, part, *args, "--stop-after-shards", 2) == 0
    assert sorted(os.listdir(part)) == [F.CAPTURE_FILE, F.shard_name(0), F.shard_name(1)]
    # a write killed half way leaves a temporary of a dead process: removed, and redone
    dead = 2**22 + 12345
    assert not os.path.exists(f"/proc/{dead}")
    stale = part / f"{F.shard_name(2)}.tmp.{os.uname().nodename}.{dead}"
    stale.write_bytes(b"half a shard")
    assert capture(tiny, part, *args) == cli.EXIT_USAGE  # not without --resume
    assert "already holds a partial teacher cache; pass --resume" in capsys.readouterr().err
    assert capture(tiny, part, *args[:-2], "--temperature", 1.0, "--resume") == cli.EXIT_USAGE
    assert "(temperature differ)" in capsys.readouterr().err
    assert capture(tiny, part, *args, "--resume", "--stop-after-shards", 1) == 0  # twice interrupted
    assert capture(tiny, part, *args, "--resume") == 0
    assert "resume: 3 of 6 shards are complete" in capsys.readouterr().err
    assert _files(part) == _files(whole)
    # resuming a complete cache changes nothing
    assert capture(tiny, part, *args, "--resume") == 0
    assert _files(part) == _files(whole)


def test_rank_strided_shards_are_disjoint_and_cover_everything():
    for n, world in ((1, 1), (7, 2), (10, 3), (2, 4)):
        parts = [F.rank_shards(n, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))


def test_manifest_and_shards(tiny, vocab, full_cache):
    m = F.read_manifest(str(full_cache))
    assert (m["k"], m["dtype"], m["temperature"], m["examples"]) == (vocab, "fp32", T, 48)
    assert m["teacher"]["hash"] == F.teacher_hash(tiny["gpt2_teacher"])
    assert m["tokenizer"]["vocab_size"] == vocab and m["data"]["sha256"].startswith("sha256:")
    assert (m["template"], m["max_prompt_len"], m["max_response_len"]) == ("{prompt}\n", 256, 128)
    assert len(m["offsets"]) == 49 and m["offsets"][-1] == m["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert [s["first"] for s in m["shards"]] == [0, 20, 40]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("k", [8, 64])
def test_bytes_per_position_within_6k_plus_16(tiny, tmp_path, dtype, k):
    from safetensors import safe_open

    assert capture(tiny, tmp_path, "--k", k, "--dtype", dtype) == 0
    m = F.read_manifest(str(tmp_path))
    shards = sum(os.path.getsize(tmp_path / s["file"]) for s in m["shards"])
    assert shards == m["bytes"]
    assert shards / m["tokens"] <= F.bytes_per_position_bound(k, dtype) == 6 * k + 16
    with safe_open(str(tmp_path / m["shards"][0]["file"]), framework="pt") as f:
        assert f.get_slice("ids").get_dtype() == "I32"
        assert f.get_slice("logprobs").get_dtype() == {"fp16": "F16", "bf16": "BF16"}[dtype]
        assert f.get_slice("ids").get_shape() == [m["tokens"], k]


# ---------------------------------------------------------------------------------------------
# Training from a cache


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "loss" in json.loads(line)]


@pytest.mark.parametrize("method", ["kd", "rkl"])
def test_cli_trains_from_a_cache(tiny, small_cache, tmp_path, method):
    assert distill(tiny, tmp_path, method, small_cache, "--max-steps", 3, "--sparse-tail", "renormalize",
                   "--lm-coef", 0.5) == 0
    recs = _metrics(tmp_path)
    kind = {"kd": "forward_kl", "rkl": "reverse_kl"}[method]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r[f"loss/{kind}"] > 0 and r["grad_norm"] > 0 and "loss/nll" in r for r in recs)
    assert os.path.isdir(tmp_path / "final")


def test_resume_with_a_cache_is_the_uninterrupted_run(tiny, small_cache, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert distill(tiny, whole, "rkl", small_cache, "--max-steps", 4) == 0
    assert distill(tiny, part, "rkl", small_cache, "--max-steps", 4, "--stop-after", 2, "--save-every", 2) == 0
    other = tmp_path / "other"  # another cache is refused on resume
    assert capture(tiny, other, "--k", 4, "--teacher", tiny["llama_teacher"]) == 0
    assert distill(tiny, part, "rkl", other, "--max-steps", 4, "--resume") == cli.EXIT_USAGE
    assert "--teacher-cache" in capsys.readouterr().err
    live = ["--method", "rkl", "--student", tiny["llama_student"], "--data", tiny["data"], "--out", str(part),
            "--teacher", tiny["llama_teacher"], "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--max-steps", "4",
            "--resume"]
    assert cli.main(["distill", *live]) == cli.EXIT_USAGE  # nor may the live teacher replace the cache
    assert "--teacher-cache: " in capsys.readouterr().err
    moved = tmp_path / "moved"  # the same content elsewhere is fine
    shutil.copytree(small_cache, moved)
    assert distill(tiny, part, "rkl", moved, "--max-steps", 4, "--resume") == 0
    a, b = fixtures.load_state(str(whole / "final")), fixtures.load_state(str(part / "final"))
    assert fixtures.max_param_diff(a, b) == 0.0


# ---------------------------------------------------------------------------------------------
# Two processes (Gloo, CPU, one torchrun launch)


def test_two_processes_capture_and_train_as_one(tiny, tmp_path):
    """Under torchrun each process captures its shards (0, 2, 4, ... and 1, 3, 5, ...) and
    process 0 writes the manifest: the same bytes as one process. Training from a cache on two
    processes (batch 2 each) equals one process with batch 4 within float rounding, as with a
    live teacher (tests/test_train_ddp.py's ``close``: the same bounds, for the same reason)."""
    import subprocess
    import sys

    cap = ["--k", 8, "--shard-examples", 7, "--batch-size", 3, "--teacher", tiny["llama_teacher"]]
    one_cache, two_cache = tmp_path / "c1", tmp_path / "c2"
    assert capture(tiny, one_cache, *cap) == 0

    def train_args(out, batch):
        return ["distill", "--method", "kd", "--student", tiny["llama_student"], "--data", tiny["data"],
                "--out", str(out), "--teacher-cache", str(one_cache), "--batch-size", str(batch), "--lr", "1e-3",
                "--max-steps", "3", "--no-progress"]

    runs = [["teacher-cache", "--teacher", tiny["llama_teacher"], "--data", tiny["data"], "--out", str(two_cache),
             "--no-progress", *[str(x) for x in cap]], train_args(tmp_path / "d2", 2)]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    driver = os.path.join(os.path.dirname(__file__), "train_fixtures", "ddp_runs.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", driver, str(spec)]
    r = subprocess.run(cmd, env=fixtures.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(two_cache) == _files(one_cache)

    assert cli.main(train_args(tmp_path / "d1", 4)) == 0
    a, b = fixtures.load_state(str(tmp_path / "d1" / "final")), fixtures.load_state(str(tmp_path / "d2" / "final"))
    assert fixtures.max_param_diff(a, b) < 2e-5
    la, lb = _metrics(tmp_path / "d1"), _metrics(tmp_path / "d2")
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-6 * (1 + abs(x[key])), (key, la, lb)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_stored_logprobs_round_toward_minus_infinity(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(500, 300, generator=g) * 4, -1).topk(8).values
    x = torch.cat([x.flatten(), torch.tensor([0.0, -0.0, -1e-9, -1e-4, -65505.0, -7e4, -1e6, float("-inf")])])
    y = F.stored_logprobs(x, dtype)
    dt = F.DTYPES[dtype]
    assert y.dtype == dt and bool((y.float() <= x).all())
    nearest = x.to(dt)
    # one step below round-to-nearest at most: nearest itself, or the next value toward -inf
    step = torch.where(nearest == 0, torch.full_like(nearest.view(torch.int16), -32767), nearest.view(torch.int16) + 1)
    assert bool(((y == nearest) | (y.view(torch.int16) == step)).all())
    assert bool(((y == nearest) == (nearest.float() <= x)).all())
    # so the stored mass of a row never exceeds the captured one
    rows = x[:4000].view(500, 8).double()
    assert bool((y[:4000].view(500, 8).double().exp().sum(-1) <= rows.exp().sum(-1)).all())
