"""Data parallel equivalence: 2 DDP processes (Gloo, CPU, under torchrun) give the result of one
process with the same global batch, and so does gradient accumulation.

Losses are normalised by the global token count (summed over micro-batches and processes before
any backward) and rollout seeds follow the example, not the process, so the runs agree up to
floating-point summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdext.train import cli

from train_fixtures import tiny as fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from fixtures.one_thread()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.get(tmp_path_factory)


def args(tiny, out, method, batch, *extra):
    return ["distill", "--method", method, "--teacher", tiny["gpt2_teacher"], "--student", tiny["llama_student"],
            "--data", tiny["data"], "--out", str(out), "--batch-size", str(batch), "--lr", "1e-3",
            "--max-steps", "3", "--max-new-tokens", "5", "--no-progress", *extra]


def losses(out):
    """(loss, gradient norm) per step: the norm catches a wrongly scaled gradient, which Adam's
    update alone would hide."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def close(a_dir, b_dir, atol=2e-5):
    diff = fixtures.max_param_diff(fixtures.load_state(os.path.join(a_dir, "final")),
                                   fixtures.load_state(os.path.join(b_dir, "final")))
    assert diff < atol, diff
    la, lb = losses(a_dir), losses(b_dir)
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x[0] - y[0]) <= 1e-5 * (1 + abs(x[0])), (la, lb)
        assert abs(x[1] - y[1]) <= 1e-4 * (1 + abs(x[1])), (la, lb)


@pytest.mark.parametrize("method, extra", [("kd", ["--lm-coef", "0.5"]), ("minillm", [])])
def test_two_gloo_processes_equal_one(tiny, tmp_path, method, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args(tiny, one, method, 4, *extra)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdext.train.cli", *args(tiny, two, method, 2, *extra)]
    r = subprocess.run(cmd, env=fixtures.subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    close(one, two)


def test_grad_accumulation_equals_big_batch(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(args(tiny, a, "rkl", 4)) == 0
    assert cli.main(args(tiny, b, "rkl", 1, "--grad-accum", "4")) == 0
    close(a, b)
