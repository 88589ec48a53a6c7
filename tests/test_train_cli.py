"""The ``kdext`` CLI end to end on tiny GPT-2 and Llama models: every method, resume, bad input.

Most runs call ``kdext.train.cli.main`` in-process (the same argument parsing and entry point as
the console script, without paying the interpreter start-up per run); one test runs the module
as a real subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kdext.train import cli
from kdext.train.methods import METHODS
from kdext.train.checkpoint import list_checkpoints

from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)


def distill(tiny, out, method, *extra, teacher="gpt2_teacher", student="llama_student", data=None):
    args = ["distill", "--method", method, "--student", tiny[student], "--data", data or tiny["data"],
            "--out", str(out), "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "6", "--no-progress"]
    if teacher:
        args += ["--teacher", tiny[teacher]]
    return cli.main(args + [str(x) for x in extra])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Alternate the architectures so both configs serve as teacher and as student.
PAIRS = {
    "sft": (None, "gpt2_student"),
    "kd": ("gpt2_teacher", "llama_student"),
    "seqkd": ("llama_teacher", "gpt2_student"),
    "rkl": ("llama_teacher", "llama_student"),
    "gkd": ("gpt2_teacher", "gpt2_student"),
    "distillm": ("llama_teacher", "gpt2_student"),
    "minillm": ("gpt2_teacher", "llama_student"),
}


@pytest.mark.parametrize("method", METHODS)
def test_smoke_each_method(tiny, tmp_path, method):
    teacher, student = PAIRS[method]
    extra = ["--max-steps", "3", "--save-every", "2"]
    if method == "gkd":
        extra += ["--lam", "1.0"]  # on-policy every step: exercise student sampling
    if method == "sft":
        extra += ["--eval-data", tiny["eval"], "--eval-every", "2"]  # evaluation during training
    if method == "minillm":  # the evaluation path, the LM stream, a 2-step rollout cycle
        extra += ["--eval-data", tiny["eval"], "--lm-data", tiny["lm"], "--ppo-epochs", "2"]
    if method == "distillm":  # the schedule from the start (fresh samples, then replay)
        extra += ["--eval-data", tiny["eval"], "--sgo-init", "1", "--sgo-capacity", "4", "--sgo-eval-every", "2"]
    rc = distill(tiny, tmp_path, method, *extra, teacher=teacher, student=student)
    assert rc == 0
    recs = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in recs)
    if method == "minillm":
        assert all("reward" in r and "loss/pg" in r and "loss/single" in r and "loss/nll" in r and "loss/lm_kd" in r
                   for r in recs)
        ev = metrics(tmp_path)[-1]
        assert {"eval/rougeL", "eval/exact_match", "eval/ece"} <= set(ev)
    if method == "gkd":
        assert all(r["on_policy"] == 1.0 for r in recs)
    if method == "distillm":
        assert [r["sgo_fresh"] for r in recs][0] == 1.0 and "sgo_val_loss" in recs[1]
    if method == "sft":
        assert "eval/rougeL" in recs[1] and "eval/rougeL" not in recs[0]
    # checkpoints at steps 2 and 3 (the end); the final model loads with transformers
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-00000002.pt", "step-00000003.pt"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = os.path.join(tmp_path, "final")
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    AutoTokenizer.from_pretrained(final, local_files_only=True)
    start = AutoModelForCausalLM.from_pretrained(tiny[student], local_files_only=True)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 0, "training did not change the student"


def test_eval_command(tiny, tmp_path):
    out = tmp_path / "scores.json"
    rc = cli.main(["eval", "--model", tiny["llama_teacher"], "--data", tiny["eval"], "--out", str(out),
                   "--max-new-tokens", "5"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert 0 <= res["rougeL"] <= 100 and 0 <= res["exact_match"] <= 100 and 0 <= res["ece"] <= 1
    assert res["n"] == 8 and len(res["samples"]) == 8


# ---------------------------------------------------------------------------------------------
# Resume


RESUME_CASES = {
    "sft": (None, "gpt2_student_dropout", []),
    "kd": ("gpt2_teacher", "gpt2_student_dropout", ["--lm-coef", "0.5", "--grad-accum", "2"]),
    "seqkd": ("gpt2_teacher", "gpt2_student_dropout", []),
    "rkl": ("llama_teacher", "gpt2_student_dropout", ["--lm-data", "LM", "--kd-ratio", "0.5"]),
    "gkd": ("gpt2_teacher", "gpt2_student_dropout", []),
    # the schedule's state (threshold, reference, buffer) crosses the checkpoint
    "distillm": ("gpt2_teacher", "gpt2_student_dropout",
                 ["--eval-data", "EVAL", "--sgo-init", "1", "--sgo-capacity", "8", "--sgo-eval-every", "1",
                  "--sgo-loss-eps", "0"]),
    "minillm": ("llama_teacher", "llama_student", ["--ppo-epochs", "1", "--rollout-batches", "2", "--lm-coef", "0.3",
                                                   "--grad-accum", "2"]),
}


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(tiny, tmp_path, method):
    teacher, student, extra = RESUME_CASES[method]
    extra = [{"LM": tiny["lm"], "EVAL": tiny["eval"]}.get(x, x) for x in extra]
    common = ["--max-steps", "6", "--warmup-steps", "2", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    assert distill(tiny, a, method, *common, teacher=teacher, student=student) == 0
    assert distill(tiny, b, method, *common, "--stop-after", "4", teacher=teacher, student=student) == 0
    assert not os.path.exists(b / "final")
    assert [r["step"] for r in metrics(b)] == [1, 2, 3, 4]
    assert distill(tiny, b, method, *common, "--resume", teacher=teacher, student=student) == 0
    wa, wb = fixtures.load_state(a / "final"), fixtures.load_state(b / "final")
    assert fixtures.max_param_diff(wa, wb) == 0.0
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb if "loss" in r] == [1, 2, 3, 4, 5, 6]
    def timeless(recs):
        return [{k: v for k, v in r.items() if k != "elapsed"} for r in recs]

    assert timeless(ma) == timeless(mb)  # every metric, bit for bit
    if method == "gkd":  # the coin flips must have gone both ways for this to mean something
        assert {r["on_policy"] for r in ma} == {0.0, 1.0}
    if method == "distillm":  # fresh samples before the checkpoint, replayed ones after it
        assert ma[0]["sgo_fresh"] == 1.0 and any(r["sgo_replay"] == 1.0 for r in ma[4:])


def test_resume_refuses_changed_settings(tiny, tmp_path, capsys):
    assert distill(tiny, tmp_path, "sft", "--max-steps", "4", "--stop-after", "2", teacher=None,
                   student="gpt2_student") == 0
    rc = distill(tiny, tmp_path, "sft", "--max-steps", "4", "--resume", "--batch-size", "2", teacher=None,
                 student="gpt2_student")
    assert rc == cli.EXIT_USAGE and "--batch-size" in capsys.readouterr().err
    rc = distill(tiny, tmp_path, "sft", "--max-steps", "4", teacher=None, student="gpt2_student")
    assert rc == cli.EXIT_USAGE and "--resume" in capsys.readouterr().err


def test_checkpoint_is_complete_and_atomic(tiny, tmp_path):
    assert distill(tiny, tmp_path, "kd", "--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "5") == 0
    ckpts = list_checkpoints(str(tmp_path))
    assert len(ckpts) == 2
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if ".tmp" in f]
    state = torch.load(ckpts[-1], weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng", "step", "examples_seen"} <= set(state)
    assert state["step"] == 2 and state["examples_seen"] == 8
    # A half-written temporary file is never taken for a checkpoint.
    (tmp_path / "checkpoints" / "step-00000009.pt.tmp.123").write_bytes(b"garbage")
    assert list_checkpoints(str(tmp_path)) == ckpts


# ---------------------------------------------------------------------------------------------
# Failures: clear messages, nothing destroyed


def test_nan_loss_stops_with_last_good_checkpoint(tiny, tmp_path, capsys):
    # An absurd learning rate blows the weights up after the first update.
    rc = distill(tiny, tmp_path, "kd", "--max-steps", "5", "--save-every", "1", "--lr", "1e30",
                 "--max-grad-norm", "0")
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DIVERGED
    assert "non-finite" in err and "last good checkpoint" in err
    ckpts = list_checkpoints(str(tmp_path))
    assert ckpts, "the steps before the divergence should have been checkpointed"
    state = torch.load(ckpts[-1], weights_only=False)
    failed_step = max(r["step"] for r in metrics(tmp_path)) + 1
    assert state["step"] == failed_step - 1
    assert f"step {failed_step}" in err and os.path.basename(ckpts[-1]) in err
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not os.path.exists(tmp_path / "final")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "response": "b"\n', "not valid JSON"),
        ('{"prompt": "a"}\n', "no 'response'"),
        ('{"instruction": 3, "response": "b"}\n', "'instruction' must be a string"),
        ('["prompt", "response"]\n', "expected a JSON object"),
        ('{"text": "a"}\n', "neither 'prompt' nor 'instruction'"),
        ('{"prompt": "a", "response": []}\n', "'response' must be a string"),
    ],
)
def test_malformed_data_names_file_and_line(tiny, tmp_path, capsys, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n\n{"instruction": "i", "context": "c", "response": "r"}\n' + line)
    rc = distill(tiny, tmp_path / "out", "sft", "--max-steps", "1", teacher=None, student="gpt2_student",
                 data=str(bad))
    err = capsys.readouterr().err
    assert rc == cli.EXIT_ERROR
    assert f"{bad}:4:" in err and message in err


def test_missing_files_are_named(tiny, tmp_path, capsys):
    assert distill(tiny, tmp_path, "sft", "--max-steps", "1", teacher=None, student="gpt2_student",
                   data=str(tmp_path / "nope.jsonl")) == cli.EXIT_ERROR
    assert "nope.jsonl: data file not found" in capsys.readouterr().err
    rc = cli.main(["distill", "--method", "kd", "--student", tiny["gpt2_student"], "--teacher", str(tmp_path / "nt"),
                   "--data", tiny["data"], "--out", str(tmp_path), "--no-progress"])
    assert rc == cli.EXIT_ERROR and "--teacher" in capsys.readouterr().err
    rc = cli.main(["distill", "--method", "kd", "--student", tiny["gpt2_student"], "--data", tiny["data"],
                   "--out", str(tmp_path), "--no-progress"])
    assert rc == cli.EXIT_USAGE and "--teacher is required" in capsys.readouterr().err


def test_mismatched_vocab_is_refused(tiny, tmp_path, capsys):
    rc = distill(tiny, tmp_path, "kd", "--max-steps", "1", teacher="gpt2_teacher_other_vocab")
    err = capsys.readouterr().err
    assert rc == cli.EXIT_ERROR
    assert "--teacher and --student tokenizers differ" in err and "first difference at id" in err


def test_bad_option_values_name_the_flag(tiny, tmp_path, capsys):
    for flag, value in (("--alpha", "1.5"), ("--top-p", "0"), ("--temperature", "0"), ("--beta", "2")):
        assert distill(tiny, tmp_path, "minillm", "--max-steps", "1", flag, value) == cli.EXIT_USAGE
        assert flag in capsys.readouterr().err
    assert distill(tiny, tmp_path, "minillm", "--max-steps", "4", "--ppo-epochs", "2", "--save-every", "3") == cli.EXIT_USAGE
    assert "--save-every must be a multiple of --ppo-epochs x --rollout-batches (2)" in capsys.readouterr().err


def test_module_entry_point_subprocess(tiny, tmp_path):
    """``python -m kdext.train.cli`` (what the ``kdext`` console script calls) in a fresh process."""
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "kdext.train.cli", "distill", "--method", "sft", "--student", tiny["gpt2_student"],
         "--data", tiny["data"], "--out", str(out), "--max-steps", "2", "--batch-size", "2"],
        env=fixtures.subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2
    # stderr is a pipe, not a terminal: progress lines (here every step), no carriage returns
    assert "\r" not in r.stderr
    assert "sft: step 1/2 | loss" in r.stderr and "sft: step 2/2 | loss" in r.stderr
    assert os.path.isfile(out / "final" / "config.json")


def test_progress_lines_not_a_bar_off_a_terminal(tiny, tmp_path, capsys):
    args = ["distill", "--method", "kd", "--teacher", tiny["gpt2_teacher"], "--student", tiny["llama_student"],
            "--data", tiny["data"], "--out", str(tmp_path), "--batch-size", "2", "--max-steps", "5",
            "--log-every", "2"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [ln.split(" | ")[0] for ln in err.splitlines() if ln.startswith("kd: step")] == [
        "kd: step 2/5", "kd: step 4/5", "kd: step 5/5"]


def test_largest_seed_runs(tiny, tmp_path):
    """--seed 2**63 - 1 reaches every stream (data order, dropout, rollouts, the coin, evaluation)."""
    assert distill(tiny, tmp_path, "gkd", "--max-steps", "2", "--seed", str(2**63 - 1), "--lam", "1",
                   "--eval-data", tiny["eval"], teacher="gpt2_teacher", student="gpt2_student_dropout") == 0
    assert all(r["on_policy"] == 1.0 for r in metrics(tmp_path) if "loss" in r)


def test_demo_quick_writes_the_report(tmp_path, capsys):
    """The demo pipeline end to end at a toy size (in-process, one worker)."""
    from kdext.train.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(str(out), device="cpu", quick=True, workers=1)
    runs = [*METHODS, "minillm_paper"]
    best = max(runs, key=lambda k: (report[k]["rougeL"], report[k]["exact_match"]))
    names = ["teacher", "student_init", *runs, f"{best}+hidden"]
    assert list(report) == names
    assert (out / "runs" / f"{best}+hidden" / "hidden_projection.safetensors").is_file()
    assert (out / "data" / "dev.jsonl").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    for r in report.values():
        assert {"rougeL", "exact_match", "ece", "train_seconds"} <= set(r)
        assert 0 <= r["rougeL"] <= 100 and 0 <= r["exact_match"] <= 100 and 0 <= r["ece"] <= 1
    assert report["student_init"]["params"] * 4 <= report["teacher"]["params"]
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "scores.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| minillm |" in md
    assert "| minillm |" in capsys.readouterr().out
    # a rerun into the same folder replaces the previous outputs
    (out / "mine.txt").write_text("keep")
    assert list(run_demo(str(out), device="cpu", quick=True, workers=1))[:-1] == names[:-1]
    assert (out / "mine.txt").read_text() == "keep"
