"""Data parallel: 2 DDP processes (Gloo, CPU, under torchrun) against one process, for every
method, and what happens when a process dies or hangs.

Rollout seeds follow the example, not the process; MiniLLM's rollout buffer, DistiLLM's replay
buffer and the hidden-state projection's gradients are shared across processes. Methods that
normalise globally (``--token-mean global``) are split independent for any split: one process
with batch 4 equals two with batch 2 within float rounding only (one micro-batch of 4 rows pads
to other widths and sums its rows inside one matrix product, in another order than two sums of
2 rows added afterwards). MiniLLM and DistiLLM average per-micro-batch token means as their
official code does, which is split independent at a fixed ``--batch-size``: two processes with
batch 2 reproduce one process with batch 2 and ``--grad-accum 2`` bit for bit (the same
micro-batches go through the same kernels, and the gradient all-reduce of two processes adds the
same two numbers that accumulation adds; the world-size scaling is a power of two, exact). All
two-process runs share one torchrun launch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kdext.train import cli
from kdext.train.methods import METHODS

from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)

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


def params(out):
    return fixtures.load_state(os.path.join(out, "final"))


def close(a_dir, b_dir):
    """Equal within float rounding. Measured (3 steps, lr 1e-3, 2 x 2 rows against 1 x 4):
    parameters differ by at most 5.6e-6 (MiniLLM; 6.3e-7 for KD; the largest relative difference
    of a tensor, in the Frobenius norm, 4.3e-6) in 8 of 11 tensors, losses by 8e-8 relative,
    gradient norms by 1.1e-7. Adam divides each update by the gradient's running RMS, so a
    parameter whose gradient is tiny moves by about lr whatever its rounding: the bound on the
    weights is empirical (about 4x the largest measured), those on the loss and gradient norm
    about 10 float32 roundings."""
    diff = fixtures.max_param_diff(params(a_dir), params(b_dir))
    assert diff < 2e-5, diff
    la, lb = losses(a_dir), losses(b_dir)
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x[0] - y[0]) <= 1e-6 * (1 + abs(x[0])), (la, lb)
        assert abs(x[1] - y[1]) <= 1e-6 * (1 + abs(x[1])), (la, lb)


def identical(a_dir, b_dir):
    assert fixtures.max_param_diff(params(a_dir), params(b_dir)) == 0.0
    assert losses(a_dir) == losses(b_dir)


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "kdext.train.cli", *args]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_equal_one(tiny, tmp_path, two_process_runs, case):
    _, split = CASES[case]
    one = tmp_path / "one"
    extra = ["--grad-accum", "2"] if split == "accum" else []
    assert cli.main(args(tiny, one, case, 2 if split == "accum" else 4, *extra)) == 0
    (identical if split == "accum" else close)(one, two_process_runs / case)
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


# ---------------------------------------------------------------------------------------------
# A process that dies or hangs stops the run on every process


def _long_run(tiny, out, *extra):
    return ["distill", "--method", "kd", "--teacher", tiny["gpt2_teacher"], "--student", tiny["llama_student"],
            "--data", tiny["data"], "--out", str(out), "--batch-size", "2", "--max-steps", "1000000",
            "--no-progress", *extra]


def _wait_for_steps(out, n, procs, timeout=180):
    t0 = time.time()
    path = os.path.join(out, "metrics.jsonl")
    while time.time() - t0 < timeout:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        assert all(p.poll() is None for p in procs), "a process stopped before training"
        time.sleep(0.1)
    raise AssertionError("training did not start")


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _rank(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return next(int(v[5:]) for v in f.read().split(b"\0") if v.startswith(b"RANK="))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers in /proc")
def test_torchrun_with_a_killed_process_stops_every_process(tiny, tmp_path):
    p = subprocess.Popen(torchrun(*_long_run(tiny, tmp_path)), env=fixtures.subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(tmp_path, 3, [p])
        workers = {_rank(k): k for k in _children(p.pid)}
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        p.wait(timeout=120)
        assert time.time() - t0 < 60
        assert p.returncode != 0
        assert not os.path.exists(f"/proc/{workers[0]}")  # the survivor is gone too
    finally:
        p.kill()
        p.wait()


def test_a_hung_process_stops_the_others_after_the_collective_timeout(tiny, tmp_path):
    """Without torchrun's agent to notice (a process of another node, or one that hangs rather
    than dies), --collective-timeout bounds the wait: the survivor stops with a one-line error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout = 10
    procs = []
    for rank in range(2):
        env = dict(fixtures.subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank))
        cmd = [sys.executable, "-m", "kdext.train.cli", *_long_run(tiny, tmp_path, "--collective-timeout",
                                                                    str(timeout))]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_steps(tmp_path, 3, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive, but never answers again
        t0 = time.time()
        _, err = procs[0].communicate(timeout=timeout + 120)
        waited = time.time() - t0
        assert procs[0].returncode == cli.EXIT_ERROR, err
        assert timeout - 1 <= waited <= timeout + 60, waited
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "another process of the run died or did not answer within --collective-timeout" in err
    finally:
        for p in procs:
            p.kill()
            p.wait()
