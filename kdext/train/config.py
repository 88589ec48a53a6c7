"""Every option of every ``kdext`` command, in one place.

One dataclass per command: :class:`TrainConfig` (``kdext distill``, with the method's options in
:class:`MethodConfig`), :class:`EvalConfig` (``kdext eval``) and :class:`DemoConfig` (``kdext
demo``). Each field carries its help text, its choices or range and its argument group (see
:mod:`kdext.train.options`); the command line is generated from them (``cli.py``), their
``validate()`` checks a configuration — the ranges of every field first, then the rules between
fields — and docs/TRAINER.md's option table is generated from them too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .data import DEFAULT_TEMPLATE
from .options import APPLY, INPUT, INT64_MAX, ConfigError, Range, check_fields, option

DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
SKEWS = ("skew_forward_kl", "skew_reverse_kl")

# Integer options reach torch as int64 (positions, seeds), so none may exceed 2**63 - 1.
COUNT_0 = Range(0, INT64_MAX)
COUNT_1 = Range(1, INT64_MAX)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
UNIT = Range(0, 1)  # [0, 1]
# Seeds reach torch.manual_seed, kdext's Philox streams (int64) and the data-order generator.
SEED = Range(0, INT64_MAX)


def _method_names() -> tuple:
    from .methods import METHODS  # methods.py imports this module

    return METHODS


def _method_class(name: str):
    from .methods import method_class

    return method_class(name)


def _check_template(template: str) -> None:
    if "{prompt}" not in template:
        raise ConfigError(f"--template must contain {{prompt}} (where the prompt goes); got {template!r}")


def _max_steps_on_resume(step: int, old: int, new: int, cfg: "TrainConfig") -> Optional[str]:
    """may change under `--schedule constant` (the learning rate then does not depend on it), to no
    fewer steps than the checkpoint has done"""
    if cfg.schedule != "constant":
        return (f"the learning rate of --schedule {cfg.schedule} depends on it "
                "(a run can be extended under --schedule constant only)")
    if new < step:
        return f"the checkpoint is already at step {step}"
    return None


# Argument groups of ``kdext distill --help``.
WHAT, OPTIM, METHOD, RUN = "what to train", "optimisation", "method options", "run control"


@dataclass
class MethodConfig:
    """The method's options (``kdext distill``'s "method options")."""

    temperature: float = option(1.0, range=POSITIVE, group=METHOD,
                                help="softmax temperature of losses and sampling")
    alpha: Optional[float] = option(None, range=Range(0, 1, hi_open=True), group=METHOD,
                                    help="minillm: teacher mix in sampling (default 0.2); distillm: skew (default 0.1)")
    beta: float = option(0.5, range=UNIT, group=METHOD, help="gkd: JSD beta (0 forward KL, 1 reverse KL)")
    lam: float = option(0.5, range=UNIT, group=METHOD, help="gkd: fraction of steps on student samples")
    lm_coef: float = option(0.0, range=NON_NEGATIVE, group=METHOD,
                            help="weight of an LM loss on the data's responses added to the method's loss "
                                 "(MiniLLM's pretraining-loss term when --data holds LM data)")
    skew: str = option("skew_forward_kl", choices=SKEWS, group=METHOD, help="distillm: which skew divergence")
    top_p: float = option(1.0, range=Range(0, 1, lo_open=True), group=METHOD, help="nucleus of sampled rollouts")
    top_k: int = option(0, range=COUNT_0, group=METHOD, help="top-k of sampled rollouts (0 = off)")
    max_new_tokens: int = option(64, range=COUNT_1, group=METHOD, help="rollout / evaluation length limit")
    gamma: float = option(1.0, range=UNIT, group=METHOD, help="minillm: reward discount")
    clip_eps: float = option(0.2, range=POSITIVE, group=METHOD, help="minillm: PPO clip range")
    ppo_epochs: int = option(1, range=COUNT_1, group=METHOD, help="minillm: optimizer steps per rollout batch")
    seed: int = option(0, range=SEED, cli=False, help="the run's --seed (set by the trainer)")

    def resolved(self, method: str) -> "MethodConfig":
        """A copy with the method-dependent defaults filled in and every value checked."""
        c = dataclasses.replace(self)
        if c.alpha is None:
            c.alpha = _method_class(method).default_alpha
        check_fields(c)
        return c


@dataclass
class TrainConfig:
    """A distillation run (``kdext distill``)."""

    method: str = option(choices=_method_names, group=WHAT, help="the distillation method (docs/TRAINER.md)")
    student: str = option(group=WHAT, resume=INPUT, help="student model folder (with its tokenizer)")
    data: str = option(group=WHAT, resume=INPUT, help="JSONL: prompt/response or instruction/context/response")
    out: str = option(group=WHAT, resume=APPLY, help="output folder")
    teacher: Optional[str] = option(None, group=WHAT, resume=INPUT,
                                    help="teacher model folder (save_pretrained); not needed for sft")
    eval_data: Optional[str] = option(None, group=WHAT, resume=APPLY,
                                      help="JSONL scored at the end (and every --eval-every steps)")
    template: str = option(DEFAULT_TEMPLATE, group=WHAT, help="prompt template; {prompt} is replaced")

    max_steps: int = option(100, range=COUNT_1, group=OPTIM, resume=_max_steps_on_resume, help="optimizer steps")
    batch_size: int = option(8, range=COUNT_1, group=OPTIM, help="rows per micro-batch per process")
    grad_accum: int = option(1, range=COUNT_1, group=OPTIM, help="micro-batches per optimizer step")
    lr: float = option(5e-5, range=POSITIVE, group=OPTIM, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.0, range=NON_NEGATIVE, group=OPTIM, help="AdamW weight decay (not on 1-D parameters)")
    warmup_steps: int = option(0, range=COUNT_0, group=OPTIM, help="steps of linear LR warmup")
    schedule: str = option("cosine", choices=SCHEDULES, group=OPTIM, help="LR decay after the warmup")
    min_lr_ratio: float = option(0.1, range=UNIT, group=OPTIM, help="final LR as a fraction of --lr")
    max_grad_norm: float = option(1.0, range=NON_NEGATIVE, group=OPTIM, help="gradient clipping norm; 0 disables clipping")
    max_prompt_len: int = option(256, range=COUNT_1, group=OPTIM, help="prompt tokens kept (the end of the prompt)")
    max_response_len: int = option(128, range=COUNT_1, group=OPTIM,
                                   help="response tokens kept, EOS included")
    seed: int = option(0, range=SEED, group=OPTIM, help="seed of the data order, sampling and dropout")

    method_cfg: MethodConfig = option(default_factory=MethodConfig, help="the method's options")

    # Run control: how often to save, evaluate and report, where and how to run; all of it may
    # change on --resume (resume=APPLY) without changing what the run computes.
    save_every: int = option(0, range=COUNT_0, group=RUN, resume=APPLY,
                             help="checkpoint every N steps (0: at the end only)")
    keep_checkpoints: int = option(2, range=COUNT_1, group=RUN, resume=APPLY, help="checkpoints kept (the newest)")
    eval_every: int = option(0, range=COUNT_0, group=RUN, resume=APPLY,
                             help="score --eval-data every N steps (0: at the end only)")
    eval_max_examples: int = option(256, range=COUNT_1, group=RUN, resume=APPLY, help="examples of --eval-data scored")
    resume: bool = option(False, group=RUN, resume=APPLY, help="continue from the newest checkpoint in --out")
    stop_after: Optional[int] = option(None, range=COUNT_1, group=RUN, resume=APPLY,
                                       help="stop (with a checkpoint) after this step, as if preempted; --resume continues")
    device: str = option("auto", choices=DEVICES, group=RUN, resume=APPLY,
                         help="where to train (auto: CUDA when there is one)")
    bf16: bool = option(True, group=RUN, resume=APPLY, help="no bf16 autocast on CUDA")
    progress: bool = option(True, group=RUN, resume=APPLY, help="no progress bar or progress lines")
    log_every: int = option(0, range=COUNT_0, group=RUN, resume=APPLY,
                            help="when stderr is not a terminal, a progress line every N steps instead of a bar "
                                 "(0: every max(1, max_steps // 20) steps)")
    save_final: bool = option(True, cli=False, resume=APPLY, help="write OUT/final at the end")
    collective_timeout: float = option(1800.0, range=POSITIVE, group=RUN, resume=APPLY,
                                       help="data parallel: seconds a process waits for the others in a collective "
                                            "before the run stops (a dead or hung process)")

    def validate(self) -> None:
        """Every check of the run's settings, before anything is loaded: each field's type and
        range first (so the rules between fields see sane values), then those rules."""
        check_fields(self)
        _check_template(self.template)
        cls = _method_class(self.method)
        if cls.needs_teacher and not self.teacher:
            raise ConfigError(f"--teacher is required for --method {self.method}")
        cycle = cls.steps_per_cycle(self.method_cfg)
        for flag, v in (("--save-every", self.save_every), ("--stop-after", self.stop_after or 0)):
            if v % cycle:
                raise ConfigError(
                    f"{flag} must be a multiple of --ppo-epochs ({cycle}): checkpoints fall between rollout cycles"
                )


@dataclass
class EvalConfig:
    """Scoring a model folder (``kdext eval``)."""

    model: str = option(help="model folder (with its tokenizer)")
    data: str = option(help="JSONL; 'response' may be a list of valid references")
    out: str = option(help="JSON file to write")
    template: str = option(DEFAULT_TEMPLATE, help="prompt template; {prompt} is replaced")
    max_new_tokens: int = option(64, range=COUNT_1, help="response length limit")
    max_prompt_len: int = option(256, range=COUNT_1, help="prompt tokens kept (the end of the prompt)")
    max_response_len: int = option(128, range=COUNT_1, help="reference tokens scored for calibration")
    temperature: float = option(1.0, range=POSITIVE, help="sampling temperature")
    top_p: float = option(1.0, range=Range(0, 1, lo_open=True), help="sampling nucleus")
    greedy: bool = option(False, help="greedy decoding instead of sampling")
    batch_size: int = option(64, range=COUNT_1, help="prompts per generation batch")
    seed: int = option(0, range=SEED, help="sampling seed")
    device: str = option("auto", choices=DEVICES, help="where to run (auto: CUDA when there is one)")

    def validate(self) -> None:
        check_fields(self)
        _check_template(self.template)


@dataclass
class DemoConfig:
    """The self-contained demo (``kdext demo``)."""

    out: str = option("demo_out", help="output folder")
    device: str = option("auto", choices=DEVICES, help="where to train (auto: CUDA when there is one)")
    seed: int = option(0, range=SEED, help="seed of the task, the models and every run")
    quick: bool = option(False, help="a much smaller run (for smoke tests)")
    workers: Optional[int] = option(None, range=COUNT_1,
                                    help="processes that train the methods side by side (default: 2 on CPU, 1 on GPU)")

    def validate(self) -> None:
        check_fields(self)


COMMANDS = {"distill": TrainConfig, "eval": EvalConfig, "demo": DemoConfig}


def options_markdown() -> str:
    """docs/TRAINER.md's option tables (``python -m kdext.train.config`` prints them)."""
    from .options import markdown_table, resume_markdown

    tables = [f"`kdext {name}`:\n\n{markdown_table(cls)}" for name, cls in COMMANDS.items()]
    tables.insert(1, resume_markdown(TrainConfig))
    return "\n\n".join(tables)


if __name__ == "__main__":
    print(options_markdown())
