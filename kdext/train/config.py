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
TOKEN_MEANS = ("global", "micro_batch")
RETURNS = ("code", "paper")
WHITENING = ("valid", "padded", "off")
PG_CLIPS = ("product", "ratio")
SGO_MODES = ("adaptive", "off")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
HIDDEN_LOSSES = ("mse", "cosine")
SPARSE_TAILS = ("bucket", "renormalize")  # kdext.sparse.TAILS
CACHE_DTYPES = ("fp16", "bf16", "fp32")  # cache_format.DTYPES

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


def _fsdp_on_resume(step: int, old: bool, new: bool, cfg: "TrainConfig") -> Optional[str]:
    """may not change (an --fsdp run's checkpoints are sharded folders, the others' single files)"""
    return ("the checkpoints of an --fsdp run are sharded folders written by every process, those of other runs "
            "single files")


# Argument groups of ``kdext distill --help``.
WHAT, OPTIM, METHOD, RUN = "what to train", "optimisation", "method options", "run control"
MINILLM, DISTILLM, HIDDEN = "minillm options", "distillm options", "feature (hidden-state) distillation"
SHARDING = "sharding (FSDP2, under torchrun)"


@dataclass
class MethodConfig:
    """The method's options (``kdext distill``'s "method options")."""

    temperature: float = option(1.0, range=POSITIVE, group=METHOD,
                                help="softmax temperature of losses and sampling")
    alpha: Optional[float] = option(None, range=Range(0, 1, hi_open=True), group=METHOD,
                                    help="minillm: teacher mix in sampling (default 0.2); distillm: skew (default 0.1)")
    beta: float = option(0.5, range=UNIT, group=METHOD, help="gkd: JSD beta (0 forward KL, 1 reverse KL)")
    lam: float = option(0.5, range=UNIT, group=METHOD, help="gkd: fraction of steps on student samples")
    lm_coef: Optional[float] = option(None, range=NON_NEGATIVE, group=METHOD,
                                      help="weight of the LM term added to the method's loss: on --lm-data's "
                                           "documents if given, else on the data's responses (default: 1 with "
                                           "--lm-data, else 0)")
    skew: str = option("skew_forward_kl", choices=SKEWS, group=METHOD, help="distillm: which skew divergence")
    top_p: float = option(1.0, range=Range(0, 1, lo_open=True), group=METHOD, help="nucleus of sampled rollouts")
    top_k: int = option(0, range=COUNT_0, group=METHOD, help="top-k of sampled rollouts (0 = off)")
    max_new_tokens: int = option(64, range=COUNT_1, group=METHOD, help="rollout / evaluation length limit")
    gamma: float = option(0.95, range=UNIT, group=METHOD, help="minillm: reward discount (LMOps --gamma)")
    clip_eps: float = option(0.2, range=POSITIVE, group=METHOD, help="minillm: PPO clip range")
    ppo_epochs: int = option(4, range=COUNT_1, group=METHOD,
                             help="minillm: passes over each rollout buffer (LMOps --ppo-epochs; scripts 4)")
    seed: int = option(0, range=SEED, cli=False, help="the run's --seed (set by the trainer)")

    token_mean: Optional[str] = option(
        None, choices=TOKEN_MEANS, group=METHOD,
        help="how each loss term averages over tokens: global = its sum over the optimizer step / the step's "
             "token count; micro_batch = the token mean of each micro-batch, averaged over micro-batches and "
             "processes, as LMOps and DistiLLM do (default: micro_batch for minillm and distillm, else global)")
    kd_ratio: Optional[float] = option(
        None, range=UNIT, group=METHOD,
        help="the LM term is (1 - r) CE + r H(p, q) on its rows, both models at T = 1 (LMOps pt_loss "
             "--kd-ratio; default 0.5 for minillm, else 0)")

    rollout_batches: int = option(
        1, range=COUNT_1, group=MINILLM,
        help="minillm: global batches of rollouts per buffer; every PPO epoch reshuffles the buffer into "
             "micro-batches and takes this many optimizer steps (LMOps --num-rollouts = this x batch-size x "
             "grad-accum x processes)")
    returns: str = option(
        "code", choices=RETURNS, group=MINILLM,
        help="minillm: the advantage before whitening. code: A_t = sum_{k>=t} gamma^(k-t) r_k / #{k>=t} "
             "(LMOps losses.py, r_t included); paper: R_{t+1} = sum_{k>t} gamma^(k-t-1) r_k / #{k>t} (the "
             "paper's decomposition: r_t is the single-step term's; 0 at the last token)")
    whiten: str = option(
        "valid", choices=WHITENING, group=MINILLM,
        help="minillm: A <- (A - mean) / sqrt(var + 1e-8) over the rollout buffer. valid: over its response "
             "tokens; padded: every row padded to --max-new-tokens with A = 0 there (LMOps utils.whiten at its "
             "fixed width); off")
    pg_clip: str = option(
        "product", choices=PG_CLIPS, group=MINILLM,
        help="minillm: product: max(-A w rho, -A clip(w rho, 1-eps, 1+eps)) (LMOps _pg_loss: the importance "
             "weight inside the clip); ratio: w max(-A rho, -A clip(rho, 1-eps, 1+eps)) (the paper's w_t "
             "outside PPO's clip)")
    single_step_weight: bool = option(
        False, group=MINILLM,
        help="minillm: the single-step term sum_t w_t KL(q || p) (the paper's form) instead of LMOps' "
             "unweighted sum_t KL(q || p) (_reg_loss)")
    reward_scaling: float = option(0.5, range=POSITIVE, group=MINILLM,
                                   help="minillm: rewards divided by this (LMOps --reward-scaling; scripts 0.5)")
    cliprange_reward: float = option(100.0, range=NON_NEGATIVE, group=MINILLM,
                                     help="minillm: rewards clipped to +-this after scaling, 0 = off "
                                          "(LMOps --cliprange-reward; scripts 100)")
    reward_temperature: float = option(
        1.0, range=POSITIVE, group=MINILLM,
        help="minillm: temperature of the teacher's log p in the reward r_t = log p(y_t) - log q(y_t) (LMOps "
             "reward_fn: 1, whatever --temperature is; the student's log q is at --temperature)")

    sgo: str = option(
        "adaptive", choices=SGO_MODES, group=DISTILLM,
        help="distillm: student-generated outputs. adaptive: the authors' schedule (a step trains on fresh "
             "student samples or replayed ones with a probability that rises when the --eval-data loss "
             "rises); off: the data's responses only")
    sgo_init: float = option(0.0, range=UNIT, group=DISTILLM, help="distillm: initial threshold (--init-threshold)")
    sgo_raise: float = option(0.1, range=Range(0, 1, lo_open=True), group=DISTILLM,
                              help="distillm: threshold increase when the validation loss rose (the authors' 0.1)")
    sgo_loss_eps: float = option(0.1, range=NON_NEGATIVE, group=DISTILLM,
                                 help="distillm: the threshold rises when the validation loss is >= the reference "
                                      "+ this (--loss-eps)")
    sgo_capacity: int = option(1000, range=COUNT_1, group=DISTILLM,
                               help="distillm: replay buffer rows over all processes (the authors' --capacity "
                                    "is per GPU)")
    sgo_replay: str = option("decreasing", choices=REPLAY_RATIOS, group=DISTILLM,
                             help="distillm: probability of fresh samples once the buffer is full, as a fraction "
                                  "of the threshold: 1 - step/max-steps, 1/2 or step/max-steps (--replay-ratio)")
    sgo_eval_every: int = option(0, range=COUNT_0, group=DISTILLM,
                                 help="distillm: steps between validation losses (0: once per pass over --data, "
                                      "the authors' --eval-interval -1)")

    sparse_tail: str = option(
        "bucket", choices=SPARSE_TAILS, group=METHOD,
        help="with --teacher-cache: bucket = the k cached ids plus one outcome for the rest of the vocabulary "
             "(exact at k = V); renormalize = both distributions renormalised over the cached ids "
             "(kdext.sparse_distill_loss's tail)")

    hidden_coef: float = option(0.0, range=NON_NEGATIVE, group=HIDDEN,
                                help="weight of a loss between student and teacher hidden states (0: off)")
    hidden_loss: str = option("mse", choices=HIDDEN_LOSSES, group=HIDDEN,
                              help="mse: mean over the teacher width of (W h_s + b - h_t)^2; cosine: "
                                   "1 - cos(W h_s + b, h_t); per response token, averaged over layer pairs")
    hidden_layers: Optional[str] = option(
        None, group=HIDDEN,
        help="layer pairs S1:T1,S2:T2 (transformers' hidden_states indices: 0 the embeddings, i block i's "
             "output; default: student block i to teacher block round(i x teacher blocks / student blocks))")

    def resolved(self, method: str, lm_data: bool = False) -> "MethodConfig":
        """A copy with the method-dependent defaults filled in and every value checked."""
        c = dataclasses.replace(self)
        cls = _method_class(method)
        if c.alpha is None:
            c.alpha = cls.default_alpha
        if c.token_mean is None:
            c.token_mean = cls.default_token_mean
        if c.kd_ratio is None:
            c.kd_ratio = cls.default_kd_ratio
        if c.lm_coef is None:
            c.lm_coef = 1.0 if lm_data else 0.0
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
    teacher_cache: Optional[str] = option(None, group=WHAT, resume=INPUT,
                                          help="a kdext teacher-cache folder to distill from instead of --teacher "
                                               "(kd, rkl, distillm --sgo off, gkd --lam 0)")
    eval_data: Optional[str] = option(None, group=WHAT, resume=APPLY,
                                      help="JSONL scored at the end (and every --eval-every steps)")
    template: str = option(DEFAULT_TEMPLATE, group=WHAT, help="prompt template; {prompt} is replaced")
    lm_data: Optional[str] = option(None, group=WHAT,
                                    help='JSONL of {"text": ...} documents for the LM term (LMOps --lm-data-dir); '
                                         "without it the LM term uses the data's responses")

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
    fused_linear: bool = option(True, group=RUN, resume=APPLY,
                                help="losses from [N, V] logits rows instead of the fused LM-head ops on hidden "
                                     "states (the same losses within float rounding; more memory)")
    progress: bool = option(True, group=RUN, resume=APPLY, help="no progress bar or progress lines")
    log_every: int = option(0, range=COUNT_0, group=RUN, resume=APPLY,
                            help="when stderr is not a terminal, a progress line every N steps instead of a bar "
                                 "(0: every max(1, max_steps // 20) steps)")
    save_final: bool = option(True, cli=False, resume=APPLY, help="write OUT/final at the end")
    collective_timeout: float = option(1800.0, range=POSITIVE, group=RUN, resume=APPLY,
                                       help="data parallel: seconds a process waits for the others in a collective "
                                            "before the run stops (a dead or hung process)")
    fsdp: bool = option(False, group=SHARDING, resume=_fsdp_on_resume,
                        help="shard the student, its gradients and optimizer state, the teacher and the hidden-state "
                             "projection over the processes (FSDP2, one unit per decoder layer; bf16 parameters with "
                             "fp32 gradient reduction on CUDA); checkpoints become sharded folders "
                             "(torch.distributed.checkpoint)")
    fsdp_offload_teacher: bool = option(False, group=SHARDING, resume=APPLY,
                                        help="with --fsdp: keep the teacher's shards in CPU memory, copied to the "
                                             "GPU layer by layer in each forward (less GPU memory, slower)")

    def validate(self) -> None:
        """Every check of the run's settings, before anything is loaded: each field's type and
        range first (so the rules between fields see sane values), then those rules."""
        check_fields(self)
        _check_template(self.template)
        cls = _method_class(self.method)
        if self.teacher_cache:
            from .cached_teacher import check_cache_config

            check_cache_config(self)
        elif cls.needs_teacher and not self.teacher:
            raise ConfigError(f"--teacher is required for --method {self.method} (or --teacher-cache, for the "
                              "off-policy methods)")
        if self.method_cfg.hidden_coef > 0 and not self.teacher:
            raise ConfigError("--teacher is required for --hidden-coef > 0 (the teacher's hidden states)")
        if self.method_cfg.hidden_layers is not None:
            from .hidden import parse_layer_pairs

            parse_layer_pairs(self.method_cfg.hidden_layers)
        if self.fsdp_offload_teacher and not self.fsdp:
            raise ConfigError("--fsdp-offload-teacher needs --fsdp (it offloads the teacher's FSDP shards)")
        if self.lm_data and not cls.has_lm_term:
            raise ConfigError(f"--lm-data: --method {self.method} has no LM term")
        cls.check_config(self)  # the method's own rules
        cycle = cls.steps_per_cycle(self.method_cfg)
        for flag, v in (("--save-every", self.save_every), ("--stop-after", self.stop_after or 0)):
            if v % cycle:
                raise ConfigError(
                    f"{flag} must be a multiple of --ppo-epochs x --rollout-batches ({cycle}): checkpoints fall "
                    "between rollout cycles"
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


@dataclass
class CacheConfig:
    """Capturing a teacher's top-k log-probs (``kdext teacher-cache``); the data options mean what
    they mean for ``kdext distill``, which checks them against the cache."""

    teacher: str = option(group=WHAT, help="teacher model folder (save_pretrained)")
    data: str = option(group=WHAT, help="JSONL the students will be distilled on (kdext distill --data)")
    out: str = option(group=WHAT, help="cache folder to write")
    tokenizer: Optional[str] = option(None, group=WHAT,
                                      help="the students' tokenizer folder (default: the teacher's; needed when the "
                                           "teacher folder has none)")
    template: str = option(DEFAULT_TEMPLATE, group=WHAT, help="prompt template; {prompt} is replaced")
    max_prompt_len: int = option(256, range=COUNT_1, group=WHAT, help="prompt tokens kept (the end of the prompt)")
    max_response_len: int = option(128, range=COUNT_1, group=WHAT, help="response tokens kept, EOS included")
    k: int = option(64, range=COUNT_1, group=METHOD, help="teacher ids stored per response position")
    temperature: float = option(1.0, range=POSITIVE, group=METHOD,
                                help="the distillation temperature: log-probs of softmax(teacher logits / T)")
    dtype: str = option("fp16", choices=CACHE_DTYPES, group=METHOD,
                        help="log-prob storage: fp16 / bf16 (6k + 16 bytes per position at most), fp32 (8k + 16; "
                             "exact tails)")
    batch_size: int = option(8, range=COUNT_1, group=RUN, help="examples per teacher forward")
    shard_examples: int = option(1024, range=COUNT_1, group=RUN, help="examples per shard file")
    resume: bool = option(False, group=RUN, help="continue a capture in --out from its complete shards")
    stop_after_shards: Optional[int] = option(None, range=COUNT_1, group=RUN,
                                              help="stop after this process wrote this many shards, as if killed; "
                                                   "--resume continues")
    device: str = option("auto", choices=DEVICES, group=RUN, help="where to run (auto: CUDA when there is one)")
    bf16: bool = option(True, group=RUN, help="no bf16 autocast of the teacher on CUDA (the trainer's default)")
    progress: bool = option(True, group=RUN, help="no progress bar or progress lines")
    collective_timeout: float = option(1800.0, range=POSITIVE, group=RUN,
                                       help="under torchrun: seconds a process waits for the others")

    def validate(self) -> None:
        check_fields(self)
        _check_template(self.template)


COMMANDS = {"distill": TrainConfig, "eval": EvalConfig, "demo": DemoConfig, "teacher-cache": CacheConfig}


def options_markdown() -> str:
    """docs/TRAINER.md's option tables (``python -m kdext.train.config`` prints them)."""
    from .options import markdown_table, resume_markdown

    tables = [f"`kdext {name}`:\n\n{markdown_table(cls)}" for name, cls in COMMANDS.items()]
    tables.insert(1, resume_markdown(TrainConfig))
    return "\n\n".join(tables)


if __name__ == "__main__":
    print(options_markdown())
