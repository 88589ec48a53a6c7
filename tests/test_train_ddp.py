"""Data parallel equivalence: 2 DDP processes (Gloo, CPU, under torchrun) give the result of one
process with the same global batch, for every method, and so does gradient accumulation.

Methods that normalise globally (``--token-mean global``) are split independent for any split:
one process with batch 4 equals two with batch 2. MiniLLM and DistiLLM average per-micro-batch
token means as their official code does, which is split independent at a fixed
``--batch-size``: one process with batch 2 and 2 accumulation steps equals two with batch 2.
Rollout seeds follow the example, not the process; MiniLLM's rollout buffer, DistiLLM's replay
buffer and the hidden-state projection's gradients are shared across processes, so the runs
agree up to floating-point summation order. All two-process runs share one torchrun launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdext.train import cli
from kdext.train.methods import METHODS

from train_fixtures import tiny as fixtures

# method -> (extra flags, split): "batch" = 1 x batch 4 vs 2 x batch 2; "accum" = 1 x batch 2 x
# grad-accum 2 vs 2 x batch 2
CASES = {
    "sft": ([], "batch"),
    "kd": (["--lm-coef", "0.5"], "batch"),
    "seqkd": ([], "batch"),
    "rkl": (["--lm-data", "LM", "--kd-ratio", "0.5"], "batch"),
    "gkd": (["--lam", "1"], "batch"),
    "distillm": (["--eval-data", "EVAL", "--sgo-init", "1", "--sgo-capacity", "8", "--sgo-eval-every", "1"], "accum"),
    "minillm": (["--ppo-epochs", "3", "--lm-coef", "0.3"], "accum"),
    "rkl+hidden": (["--hidden-coef", "1", "--hidden-layers", "1:2,0:1"], "batch"),
    "minillm+hidden": (["--ppo-epochs", "3", "--hidden-coef", "0.5", "--hidden-loss", "cosine"], "accum"),
}
assert set(METHODS) <= set(CASES)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from fixtures.one_thread()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.get(tmp_path_factory)


def args(tiny, out, case, batch, *extra):
    method = case.split("+")[0]
    flags, _ = CASES[case]
    flags = [{"LM": tiny["lm"], "EVAL": tiny["eval"]}.get(x, x) for x in flags]
    return ["distill", "--method", method, "--teacher", tiny["gpt2_teacher"], "--student", tiny["llama_student"],
            "--data", tiny["data"], "--out", str(out), "--batch-size", str(batch), "--lr", "1e-3",
            "--max-steps", "3", "--max-new-tokens", "5", "--no-progress", *flags, *extra]


@pytest.fixture(scope="module")
def two_process_runs(tiny, tmp_path_factory):
    """Every case on 2 Gloo processes (batch 2 each), in one torchrun launch."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [args(tiny, root / case, case, 2) for case in CASES]
    spec = root / "runs.json"
    spec.write_text(json.dumps(runs))
    driver = os.path.join(os.path.dirname(__file__), "train_fixtures", "ddp_runs.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", driver, str(spec)]
    r = subprocess.run(cmd, env=fixtures.subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def losses(out):
    """(loss, gradient norm) per step: the norm catches a wrongly scaled gradient, which Adam's
    update alone would hide."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r]


def close(a_dir, b_dir, atol=2e-5):
    diff = fixtures.max_param_diff(fixtures.load_state(os.path.join(a_dir, "final")),
                                   fixtures.load_state(os.path.join(b_dir, "final")))
    assert diff < atol, diff
    la, lb = losses(a_dir), losses(b_dir)
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x[0] - y[0]) <= 1e-5 * (1 + abs(x[0])), (la, lb)
        assert abs(x[1] - y[1]) <= 1e-4 * (1 + abs(x[1])), (la, lb)


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_equal_one(tiny, tmp_path, two_process_runs, case):
    _, split = CASES[case]
    one = tmp_path / "one"
    extra = ["--grad-accum", "2"] if split == "accum" else []
    assert cli.main(args(tiny, one, case, 2 if split == "accum" else 4, *extra)) == 0
    close(one, two_process_runs / case)
    if "hidden" in case:
        from kdext.train.hidden import FILE_NAME, load_projection

        pa, pb = load_projection(str(one / FILE_NAME)), load_projection(str(two_process_runs / case / FILE_NAME))
        for k, v in pa.state_dict().items():
            assert (v - pb.state_dict()[k]).abs().max() < 2e-5, k
    if case == "distillm":  # the replay buffer was used, on both sides
        with open(two_process_runs / case / "metrics.jsonl") as f:
            assert [r.get("sgo_replay") for r in map(json.loads, f) if "loss" in r] == [0.0, 0.0, 1.0]


def test_grad_accumulation_equals_big_batch(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(args(tiny, a, "rkl", 4)) == 0
    assert cli.main(args(tiny, b, "rkl", 1, "--grad-accum", "4")) == 0
    close(a, b)
