"""The options of every ``kdext`` command: ranges, the generated command line, error reporting,
progress output, the method registry and the random streams.

Most of these never load a model: a bad value must be refused before anything is loaded, so
each case takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random

import pytest

from kdext.train import cli, config, options
from kdext.train.config import COMMANDS, DemoConfig, EvalConfig, MethodConfig, TrainConfig
from kdext.train.methods import METHODS, REGISTRY, register
from kdext.train.options import INT64_MAX, ConfigError, Range, option_fields
from kdext.train.reporting import Progress, default_log_every
from kdext.train.seeds import Stream, data_order_seed, mix_seed, stream_seed

# The smallest argument list each command accepts (paths need not exist: values are checked first).
BASE = {
    "distill": ["distill", "--method", "minillm", "--teacher", "t", "--student", "s", "--data", "d.jsonl",
                "--out", "o"],
    "eval": ["eval", "--model", "m", "--data", "d.jsonl", "--out", "o.json"],
    "demo": ["demo", "--out", "o"],
    "teacher-cache": ["teacher-cache", "--teacher", "t", "--data", "d.jsonl", "--out", "c"],
}


@pytest.fixture
def no_work(monkeypatch):
    """Nothing may actually run: a value that passes validation fails the test loudly."""

    def accepted(*a, **k):
        raise AssertionError("the command was accepted and would have run")

    import kdext.train.demo
    import kdext.train.evaluate
    import kdext.train.teacher_cache
    import kdext.train.trainer

    monkeypatch.setattr(kdext.train.trainer, "train", accepted)
    monkeypatch.setattr(kdext.train.evaluate, "evaluate_folder", accepted)
    monkeypatch.setattr(kdext.train.demo, "run_demo", accepted)
    monkeypatch.setattr(kdext.train.teacher_cache, "capture", accepted)


def run(command, *extra):
    return cli.main(BASE[command] + [str(x) for x in extra])


def numeric_flags(cls):
    """(flag, type, Range) of every numeric command-line option of a command."""
    return [(options.flag_of(f, t), t, f.metadata["range"]) for f, t, _ in option_fields(cls)
            if t in (int, float) and f.metadata["cli"]]


def bad_values(t, rng: Range) -> list:
    """Values just outside the range, plus what parses but is no number to train with."""
    out = []
    if rng.lo is not None:
        out.append(rng.lo if rng.lo_open else rng.lo - 1)
    if rng.hi is not None:
        out.append(rng.hi if rng.hi_open else rng.hi + 1)
    if t is float:
        out += ["inf", "-inf", "nan"]
    else:
        out += ["1.5", 2**70]
    return out


CASES = [(cmd, flag, v) for cmd, cls in COMMANDS.items() for flag, t, rng in numeric_flags(cls)
         for v in bad_values(t, rng)]


def test_every_numeric_option_has_a_range():
    for cls in COMMANDS.values():
        for f, t, _ in option_fields(cls):
            if t in (int, float):
                assert isinstance(f.metadata["range"], Range), f"{cls.__name__}.{f.name} has no range"


@pytest.mark.parametrize("command, flag, value", CASES, ids=[f"{c} {f} {v}" for c, f, v in CASES])
def test_out_of_range_value_is_refused_naming_the_flag(no_work, capsys, command, flag, value):
    assert run(command, flag, value) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert flag in err, err
    assert err.startswith(f"kdext {command}: error: ") and len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err


# The cases of issue 14 by name (each of these used to be accepted or to end in a traceback).
NAMED = [
    ("distill", "--max-prompt-len", "0"),  # no truncation at all
    ("distill", "--max-prompt-len", "-1"),  # dropped the first prompt token
    ("distill", "--max-response-len", "0"),  # trained on nothing
    ("distill", "--max-response-len", "-1"),  # dropped EOS
    ("distill", "--weight-decay", "-1"),
    ("distill", "--clip-eps", "inf"),
    ("distill", "--stop-after", "-2"),  # exited 0 having done nothing
    ("distill", "--stop-after", "0"),
    ("distill", "--eval-max-examples", "0"),
    ("distill", "--ppo-epochs", "0"),  # ZeroDivisionError: the multiple check ran first
    ("distill", "--seed", str(2**70)),  # "Overflow when unpacking long long"
    ("distill", "--seed", "-1"),
    ("eval", "--batch-size", "0"),  # "range() arg 3 must not be zero"
    ("eval", "--seed", str(2**70)),
    ("demo", "--workers", "0"),
    ("demo", "--seed", str(2**64)),
]


@pytest.mark.parametrize("command, flag, value", NAMED)
def test_issue_cases(no_work, capsys, command, flag, value):
    assert run(command, flag, value) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"kdext {command}: error: {flag} must be" in err, err


def test_range_checks_run_before_the_rules_between_fields(no_work, capsys):
    # --save-every 3 % --ppo-epochs 0 would divide by zero; the range check comes first.
    assert run("distill", "--ppo-epochs", "0", "--save-every", "3") == cli.EXIT_USAGE
    assert "--ppo-epochs must be an integer in [1, 2**63 - 1]; got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ppo-epochs", "2", "--stop-after", "3"], "--stop-after must be a multiple of --ppo-epochs x --rollout-batches (2)"),
        (["--ppo-epochs", "2", "--rollout-batches", "3", "--save-every", "4"], "x --rollout-batches (6)"),
        (["--method", "distillm"], "--eval-data is required for --method distillm with --sgo adaptive"),
        (["--method", "sft", "--lm-data", "lm.jsonl"], "--lm-data: --method sft has no LM term"),
        (["--hidden-coef", "1", "--hidden-layers", "1-2"], "--hidden-layers must look like S1:T1,S2:T2"),
        (["--whiten", "zeros"], "argument --whiten: invalid choice"),
        (["--template", "no placeholder"], "--template must contain {prompt}"),
        (["--schedule", "cos"], "argument --schedule: invalid choice"),
        (["--max-steps", "ten"], "argument --max-steps: invalid int value"),
        (["--lr"], "argument --lr: expected one argument"),
    ],
)
def test_bad_combinations_and_unparsable_values(no_work, capsys, extra, message):
    assert run("distill", *extra) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2, err


def test_teacher_required_and_method_choices(no_work, capsys):
    assert cli.main(["distill", "--method", "kd", "--student", "s", "--data", "d", "--out", "o"]) == cli.EXIT_USAGE
    assert "--teacher is required for --method kd" in capsys.readouterr().err
    assert cli.main(["distill", "--method", "ppo", "--student", "s", "--data", "d", "--out", "o"]) == cli.EXIT_USAGE
    assert "argument --method: invalid choice" in capsys.readouterr().err


def test_api_configs_are_checked_too():
    """TrainConfig built in code (the demo, tests) goes through the same checks."""
    cfg = TrainConfig(method="sft", student="s", data="d", out="o", batch_size=0)
    with pytest.raises(ConfigError, match=r"--batch-size must be an integer in \[1, 2\*\*63 - 1\]; got 0"):
        cfg.validate()
    with pytest.raises(ConfigError, match="--lr must be a number"):
        TrainConfig(method="sft", student="s", data="d", out="o", lr="1e-3").validate()
    with pytest.raises(ConfigError, match="--alpha must be a number in \\[0, 1\\)"):
        MethodConfig(alpha=1.0).resolved("minillm")
    with pytest.raises(ConfigError, match="--method must be one of"):
        TrainConfig(method="ppo", student="s", data="d", out="o").validate()
    with pytest.raises(ConfigError, match="--student is required"):
        TrainConfig(method="sft", student=None, data="d", out="o").validate()
    TrainConfig(method="sft", student="s", data="d", out="o", seed=INT64_MAX).validate()
    EvalConfig(model="m", data="d", out="o").validate()
    DemoConfig().validate()


def test_method_dependent_defaults():
    assert MethodConfig().resolved("minillm").alpha == 0.2
    assert MethodConfig().resolved("distillm").alpha == 0.1
    assert MethodConfig().resolved("kd").alpha == 0.0
    assert MethodConfig(alpha=0.3).resolved("minillm").alpha == 0.3
    # the official codes' normalisation and LM-term mix, kdext's elsewhere
    assert [MethodConfig().resolved(m).token_mean for m in ("minillm", "distillm", "kd", "gkd")] == [
        "micro_batch", "micro_batch", "global", "global"]
    assert MethodConfig(token_mean="global").resolved("minillm").token_mean == "global"
    assert (MethodConfig().resolved("minillm").kd_ratio, MethodConfig().resolved("rkl").kd_ratio) == (0.5, 0.0)
    # the LM term is on by default (lm_coef 1, LMOps' default) exactly when --lm-data is given
    assert MethodConfig().resolved("minillm").lm_coef == 0.0
    assert MethodConfig().resolved("minillm", lm_data=True).lm_coef == 1.0
    assert MethodConfig(lm_coef=0.3).resolved("kd", lm_data=True).lm_coef == 0.3


# ---------------------------------------------------------------------------------------------
# The generated command line keeps the original flags and defaults


# kdext distill's flags and defaults before the options moved into config.py, with the defaults
# issue 13 changed (LMOps' --gamma and --ppo-epochs; --lm-coef: 1 with --lm-data, else 0).
ORIGINAL_DISTILL = {
    "--teacher": None, "--eval-data": None, "--template": "{prompt}\n", "--max-steps": 100, "--batch-size": 8,
    "--grad-accum": 1, "--lr": 5e-5, "--weight-decay": 0.0, "--warmup-steps": 0, "--schedule": "cosine",
    "--min-lr-ratio": 0.1, "--max-grad-norm": 1.0, "--max-prompt-len": 256, "--max-response-len": 128, "--seed": 0,
    "--temperature": 1.0, "--alpha": None, "--beta": 0.5, "--lam": 0.5, "--lm-coef": None,
    "--skew": "skew_forward_kl", "--top-p": 1.0, "--top-k": 0, "--max-new-tokens": 64, "--gamma": 0.95,
    "--clip-eps": 0.2, "--ppo-epochs": 4, "--save-every": 0, "--keep-checkpoints": 2, "--eval-every": 0,
    "--eval-max-examples": 256, "--resume": False, "--stop-after": None, "--device": "auto", "--no-bf16": False,
    "--no-progress": False,
}
# Flags added since (issue 13: the official MiniLLM / DistiLLM recipes, the LM stream, feature distillation).
DISTILL_ADDED = {
    "--log-every", "--lm-data", "--token-mean", "--kd-ratio", "--rollout-batches", "--returns", "--whiten",
    "--pg-clip", "--single-step-weight", "--reward-scaling", "--cliprange-reward", "--reward-temperature", "--sgo",
    "--sgo-init", "--sgo-raise", "--sgo-loss-eps", "--sgo-capacity", "--sgo-replay", "--sgo-eval-every",
    "--hidden-coef", "--hidden-loss", "--hidden-layers", "--collective-timeout", "--fsdp", "--fsdp-offload-teacher",
    "--no-fused-linear", "--teacher-cache", "--sparse-tail",
}
ORIGINAL_EVAL = {"--template": "{prompt}\n", "--max-new-tokens": 64, "--max-prompt-len": 256,
                 "--max-response-len": 128, "--temperature": 1.0, "--top-p": 1.0, "--greedy": False,
                 "--batch-size": 64, "--seed": 0, "--device": "auto"}
ORIGINAL_DEMO = {"--out": "demo_out", "--device": "auto", "--seed": 0, "--quick": False, "--workers": None}


def _flags(sub) -> dict:
    """flag -> the action's default, for every option of a subcommand's parser."""
    return {a.option_strings[0]: a.default for a in sub._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("command, original, required", [
    ("distill", ORIGINAL_DISTILL, {"--method", "--student", "--data", "--out"}),
    ("eval", ORIGINAL_EVAL, {"--model", "--data", "--out"}),
    ("demo", ORIGINAL_DEMO, set()),
])
def test_generated_parser_keeps_flags_and_defaults(command, original, required):
    p = cli.parser()
    sub = next(a for a in p._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[command]
    flags = _flags(sub)
    new = {"--debug"} | (DISTILL_ADDED if command == "distill" else set())
    assert set(flags) == set(original) | required | new
    for flag, default in original.items():
        got = flags[flag]
        if flag.startswith("--no-"):  # store_false into the positive field
            assert got is True
        else:
            assert got == default and type(got) is type(default), (flag, got, default)
    assert {a.option_strings[0] for a in sub._actions if a.required} == required


def test_parsed_arguments_fill_the_dataclasses():
    args = cli.parser().parse_args(BASE["distill"] + ["--no-bf16", "--resume", "--alpha", "0.3", "--lam", "1",
                                                      "--stop-after", "4", "--seed", "7"])
    cfg = cli.config_from_args(args)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.method_cfg, MethodConfig)
    assert (cfg.bf16, cfg.progress, cfg.resume, cfg.stop_after, cfg.seed) == (False, True, True, 4, 7)
    assert (cfg.method_cfg.alpha, cfg.method_cfg.lam, cfg.method_cfg.ppo_epochs) == (0.3, 1.0, 4)
    default = cli.config_from_args(cli.parser().parse_args(BASE["distill"]))
    assert default == TrainConfig(method="minillm", teacher="t", student="s", data="d.jsonl", out="o")


def test_docs_option_tables_match_the_dataclasses():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "TRAINER.md")
    with open(path) as f:
        text = f.read()
    block = text.split("<!-- options:begin -->\n")[1].split("\n<!-- options:end -->")[0]
    assert block == config.options_markdown(), "regenerate with: python -m kdext.train.config"


# ---------------------------------------------------------------------------------------------
# Errors: messages, not tracebacks


def _fail_with(monkeypatch, exc):
    import kdext.train.trainer

    def boom(cfg):
        raise exc

    monkeypatch.setattr(kdext.train.trainer, "train", boom)


def test_bug_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyError("oops"))
    monkeypatch.delenv("KDEXT_DEBUG", raising=False)
    assert run("distill") == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error: KeyError: 'oops'" in err and "--debug" in err
    assert len(err.strip().splitlines()) == 2
    assert run("distill", "--debug") == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    monkeypatch.setenv("KDEXT_DEBUG", "1")
    assert run("distill") == cli.EXIT_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_disk_errors_are_runtime_errors(monkeypatch, capsys):
    _fail_with(monkeypatch, OSError(28, "No space left on device", "o/final"))
    monkeypatch.delenv("KDEXT_DEBUG", raising=False)
    assert run("distill") == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.strip() == "kdext distill: error: [Errno 28] No space left on device: 'o/final'"


def test_help_exits_0(capsys):
    assert cli.main(["distill", "--help"]) == 0
    assert "--ppo-epochs" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, lines elsewhere


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _progress(tty: bool, enabled=True) -> str:
    stream = _Stream(tty)
    p = Progress("kd", total=10, initial=0, end=7, enabled=enabled, every=3, stream=stream)
    for step in range(1, 8):
        p.update(step, {"loss": 1.0 / step, "lr": 1e-3})
    p.close()
    return stream.getvalue()


def test_progress_lines_when_not_a_terminal():
    out = _progress(tty=False)
    assert "\r" not in out
    lines = out.splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["kd: step 3/10", "kd: step 6/10", "kd: step 7/10"]
    assert "loss 0.3333" in lines[0] and "lr 0.001" in lines[0] and "steps/s" in lines[0]
    assert _progress(tty=False, enabled=False) == ""


def test_progress_bar_on_a_terminal():
    out = _progress(tty=True)
    assert "\r" in out and "7/10" in out
    assert _progress(tty=True, enabled=False) == ""


def test_default_log_every():
    assert [default_log_every(n) for n in (1, 19, 20, 100, 2000)] == [1, 1, 1, 5, 100]


# ---------------------------------------------------------------------------------------------
# Methods and random streams


def test_each_method_is_registered_once_in_order():
    assert METHODS == tuple(REGISTRY) == ("sft", "kd", "seqkd", "rkl", "gkd", "distillm", "minillm")
    assert all(REGISTRY[m].name == m for m in METHODS)
    with pytest.raises(AssertionError, match="registered twice"):
        register(REGISTRY["kd"])


def test_streams_are_distinct():
    assert len({int(s) for s in Stream}) == len(Stream)
    for seed in (0, 1, INT64_MAX):
        for step in (0, 1, 99):
            seeds = {stream_seed(seed, s, step) for s in Stream}
            assert len(seeds) == len(Stream)
    # the tags of the streams that existed before they were named (the results depend on them)
    assert stream_seed(3, Stream.MINILLM_ROLLOUT, 5) == mix_seed(3, 3, 5)
    assert stream_seed(3, Stream.EVAL_SAMPLING) == mix_seed(3, 4)


def test_gkd_coin_has_its_own_stream():
    """The coin must not reuse the GKD rollouts' seed (it did: mix_seed(seed, 2, step))."""
    from kdext.train.methods import GKD

    cfg = MethodConfig(lam=0.5, seed=11)
    flips = [GKD().on_policy(cfg, step) for step in range(64)]
    assert flips == [random.Random(stream_seed(11, Stream.GKD_COIN, s)).random() < 0.5 for s in range(64)]
    assert Stream.GKD_COIN != Stream.GKD_ROLLOUT
    assert 16 < sum(flips) < 48


def test_data_order_seed_fits_the_generator():
    import torch

    assert data_order_seed(5, 2) == 5 * 1_000_003 + 2  # unchanged for every seed anyone uses
    torch.Generator().manual_seed(data_order_seed(INT64_MAX, 10**6))  # no overflow at the top


def test_range_text():
    assert str(Range(1)) == ">= 1" and str(Range(0, lo_open=True)) == "> 0"
    assert str(Range(0, 1, hi_open=True)) == "in [0, 1)" and str(config.SEED) == "in [0, 2**63 - 1]"
    assert 0.5 in Range(0, 1) and math.inf not in Range(0) and math.nan not in Range(0, 1) and 1 not in Range(0, 1, hi_open=True)
    with pytest.raises(ValueError):
        Range()


def test_every_field_has_help():
    for cls in (*COMMANDS.values(), MethodConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"
