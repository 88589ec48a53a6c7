"""Soak test: a 200-step MiniLLM run on the demo task, killed (SIGKILL) at 10 moments, some of
them inside a checkpoint write, and resumed after each, ends bit-identical to the uninterrupted
run: the same final weights and the same loss at every step.

The runs are forked from a forkserver that has imported the trainer once, so a restart costs a
fork, not an interpreter start. A run whose kill should land inside a checkpoint write gets
slower writes (a sleep in each write of the checkpoint's temporary file), so the kill, sent as
soon as a temporary file appears, lands while the file is half written; the test asserts that
some did. Everything else about the runs is the trainer as shipped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import pytest

from kdext.train import task
from kdext.train.data import write_jsonl

from train_fixtures import tiny as fixtures
from train_fixtures.tiny import tiny  # noqa: F401  (a fixture)

STEPS = 200
KILLS = 10
IN_WRITE = 4  # of the kills, those sent inside a checkpoint write


def _args(tiny, data, out, *extra):
    return ["distill", "--method", "minillm", "--teacher", tiny["llama_teacher"], "--student", tiny["llama_student"],
            "--data", data, "--out", out, "--batch-size", "4", "--max-steps", str(STEPS), "--max-new-tokens", "8",
            "--max-prompt-len", "32", "--max-response-len", "16", "--lr", "1e-3", "--warmup-steps", "10",
            "--ppo-epochs", "2", "--lm-coef", "0.2", "--save-every", "4", "--no-progress", *extra]


def _child(args, slow_writes):
    """A run of ``kdext distill`` in a forked process (exit code = the CLI's)."""
    import torch

    torch.set_num_threads(1)
    if slow_writes:
        from kdext.train import storage

        real = storage.open_for_write

        class Slow:
            def __init__(self, f):
                self.f = f

            def write(self, b):
                time.sleep(0.002)
                return self.f.write(b)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def slow(path, mode="wb"):
            f = real(path, mode)
            return Slow(f) if ".pt.tmp." in path else f

        storage.open_for_write = slow
    from kdext.train import cli

    os._exit(cli.main(args))


def _steps_logged(out) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _temporaries(out) -> list:
    ck = os.path.join(out, "checkpoints")
    return [n for n in (os.listdir(ck) if os.path.isdir(ck) else []) if ".tmp." in n]


def _kill_at(proc, out, step: int, in_write: bool, rng, deadline: float) -> str:
    """SIGKILL ``proc`` once the run has logged ``step`` steps: at once plus a random fraction of a
    step, or (``in_write``) as soon as it writes its next checkpoint. Returns where it landed."""
    mine = f".{proc.pid}"  # (a killed run's temporary stays until the next run removes it)
    while time.time() < deadline and proc.is_alive():
        if _steps_logged(out) >= step:
            if not in_write:
                time.sleep(rng.random() * 0.05)
                break
            if any(n.endswith(mine) for n in _temporaries(out)):
                break
        time.sleep(0.0005)
    if not proc.is_alive():
        return "finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return f"step {_steps_logged(out)}, " + (
        "in a write" if any(n.endswith(mine) for n in _temporaries(out)) else "between writes")


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_killed_and_resumed_run_is_bit_identical(tiny, tmp_path):
    data = str(tmp_path / "train.jsonl")
    train, _ = task.make_task(400, 0, seed=5)
    write_jsonl(data, train)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kdext.train.cli", "kdext.train.trainer", "kdext.train.step", "kdext.train.evaluate",
                                "transformers.models.llama.modeling_llama", "safetensors.torch"])

    def run(out, *extra, slow=False):
        p = ctx.Process(target=_child, args=(_args(tiny, data, out, *extra), slow))
        p.start()
        return p

    ref = str(tmp_path / "ref")
    p = run(ref)
    p.join(timeout=600)
    assert p.exitcode == 0

    out = str(tmp_path / "killed")
    rng = random.Random(1234)
    kinds = [True] * IN_WRITE + [False] * (KILLS - IN_WRITE)
    rng.shuffle(kinds)
    moments = sorted(rng.sample(range(2, STEPS - 2), KILLS))
    landed = []
    for i, (step, in_write) in enumerate(zip(moments, kinds)):
        p = run(out, *(["--resume"] if i else []), slow=in_write)
        landed.append(_kill_at(p, out, step, in_write, rng, deadline=time.time() + 300))
    p = run(out, "--resume")
    p.join(timeout=600)
    assert p.exitcode == 0, landed

    assert "finished" not in landed, landed
    assert sum(x.endswith("in a write") for x in landed) >= IN_WRITE // 2, landed
    assert fixtures.max_param_diff(fixtures.load_state(os.path.join(ref, "final")),
                                   fixtures.load_state(os.path.join(out, "final"))) == 0.0
    assert _losses(out) == _losses(ref)
    assert not _temporaries(out) and not [n for n in os.listdir(out) if ".tmp." in n]
    print(f"soak: {KILLS} kills ({'; '.join(landed)}); final weights and all {STEPS} losses identical")
