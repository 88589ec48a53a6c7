"""The training loop: optimisation, checkpoints, resume, metrics, DDP.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` rows on each of
``world_size`` processes (the global batch). Each step:

1. every micro-batch is *prepared* (rollouts sampled, if the method needs them);
2. the token counts of every loss term are summed over micro-batches and processes;
3. each micro-batch's loss = sum_k weight_k * term_k / global_count_k (times world_size, since
   DDP averages gradients over processes) is back-propagated; DDP syncs on the last one only;
4. gradients are clipped; a non-finite loss or gradient norm stops the run before the
   optimizer touches the weights (the last checkpoint stays the last good one);
5. AdamW and the LR schedule step; metrics go to ``OUT/metrics.jsonl``.

Checkpoints (``OUT/checkpoints/step-<step, 8 digits>.pt``, e.g. ``step-00000400.pt``) hold the student, optimizer, scheduler, the
RNG states of every process, the step and the data position. They are written to a temporary
file and renamed, so a crash mid-write never leaves a truncated checkpoint. Since the data order
and every rollout seed are functions of (seed, step), ``--resume`` reproduces an uninterrupted
run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from . import methods as M
from .generation import NonFiniteLogits
from .data import DataSchedule, collate, encode, load_jsonl, DEFAULT_TEMPLATE
from .models import (
    VocabAligner,
    check_vocab,
    has_tokenizer,
    head_width,
    load_model,
    load_tokenizer,
    unwrap,
)


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the message says where and what was kept."""


@dataclass
class TrainConfig:
    method: str
    student: str
    data: str
    out: str
    teacher: Optional[str] = None
    eval_data: Optional[str] = None
    template: str = DEFAULT_TEMPLATE
    max_steps: int = 100
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_prompt_len: int = 256
    max_response_len: int = 128
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end (when eval_data is given)
    eval_max_examples: int = 256
    resume: bool = False
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this step; simulates preemption
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    progress: bool = True
    save_final: bool = True
    method_cfg: M.MethodConfig = field(default_factory=M.MethodConfig)

    def check(self) -> None:
        checks = [
            (self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.schedule in ("cosine", "linear", "constant"), "--schedule must be cosine, linear or constant"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables clipping)"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.method not in M.METHODS:
            raise ValueError(f"--method must be one of {', '.join(M.METHODS)}; got {self.method!r}")
        if M.make(self.method).needs_teacher and not self.teacher:
            raise ValueError(f"--teacher is required for --method {self.method}")
        E = self.method_cfg.ppo_epochs if self.method == "minillm" else 1
        for name, v in (("--save-every", self.save_every), ("--stop-after", self.stop_after or 0)):
            if v % E:
                raise ValueError(
                    f"{name} must be a multiple of --ppo-epochs ({E}): checkpoints fall between rollout cycles"
                )


# ---------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; pick the device."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return Dist(rank, world, local), torch.device("cuda", local)
    return Dist(rank, world, local), torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to the peak, then cosine / linear decay to min_lr_ratio (or constant)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def make_optimizer(model, cfg: TrainConfig):
    # No weight decay on biases and norm gains (1-D parameters), the usual LM recipe.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that must not change between a run and its resumption (they change the data order
# or the meaning of a step).
_RESUME_KEYS = ("method", "batch_size", "grad_accum", "max_steps", "seed", "schedule", "warmup_steps")


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints, oldest first (temporary files from an interrupted write are ignored)."""
    return sorted(glob.glob(os.path.join(checkpoint_dir(out), "step-*.pt")))


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path`` such that ``path`` is either absent, the old file, or complete."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX


def save_checkpoint(cfg, dd: Dist, step, student, opt, sched, schedule: DataSchedule) -> Optional[str]:
    rngs = [None] * dd.world
    if dd.enabled:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    path = None
    if dd.main:
        os.makedirs(checkpoint_dir(cfg.out), exist_ok=True)
        path = os.path.join(checkpoint_dir(cfg.out), f"step-{step:08d}.pt")
        state = {
            "step": step,
            "examples_seen": step * schedule.global_batch,
            "world_size": dd.world,
            "model": unwrap(student).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rngs,
            "config": {k: getattr(cfg, k) for k in _RESUME_KEYS},
        }
        atomic_save(state, path)
        for old in list_checkpoints(cfg.out)[: -cfg.keep_checkpoints]:
            os.remove(old)
    dd.barrier()
    return path


def load_checkpoint(cfg, dd: Dist, student, opt, sched, device) -> int:
    """Restore the newest checkpoint; returns its step (0 when there is none)."""
    ckpts = list_checkpoints(cfg.out)
    if not ckpts:
        return 0
    # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    for k in _RESUME_KEYS:
        if state["config"][k] != getattr(cfg, k):
            flag = "--" + k.replace("_", "-")
            raise ValueError(
                f"{flag}: the checkpoint {ckpts[-1]} was written with {state['config'][k]!r}, "
                f"not {getattr(cfg, k)!r}; resuming with a different value would not continue the same run"
            )
    if state["world_size"] != dd.world:
        raise ValueError(
            f"the checkpoint {ckpts[-1]} was written by {state['world_size']} processes, this run has {dd.world}; "
            "keep the number of processes (the global batch and RNG streams depend on it)"
        )
    unwrap(student).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][dd.rank])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl (main process only)."""

    def __init__(self, path: str, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            # Drop records from beyond the checkpoint we resume from (or all, on a fresh run),
            # so the file describes exactly one run.
            keep = []
            if resume_step > 0:
                with open(path) as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if rec.get("step", 0) <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
            with open(path, "w") as f:
                f.writelines(keep)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Setup:
    """Everything a run holds; built by :func:`build`, reused by tests."""

    cfg: TrainConfig
    dd: Dist
    device: torch.device
    tokenizer: object
    student: torch.nn.Module  # DDP-wrapped when world > 1
    teacher: Optional[torch.nn.Module]
    method: M.Method
    ctx: M.Context
    examples: list
    schedule: DataSchedule
    encoded: dict = field(default_factory=dict)  # example index -> Encoded (tokenised once)


def build(cfg: TrainConfig) -> Setup:
    cfg.check()
    mcfg = cfg.method_cfg.resolved(cfg.method)
    mcfg = dataclasses.replace(mcfg, seed=cfg.seed)
    dd, device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    tok = load_tokenizer(cfg.student, "--student")
    method = M.make(cfg.method)
    teacher = None
    widths, names = [], []
    if method.needs_teacher:
        # A teacher folder without tokenizer files is taken to use the student's tokenizer.
        if has_tokenizer(cfg.teacher):
            check_vocab(tok, load_tokenizer(cfg.teacher, "--teacher"))
        teacher = load_model(cfg.teacher, "--teacher", device, trainable=False)
        widths.append(head_width(teacher))
        names.append("--teacher")
    student = load_model(cfg.student, "--student", device, trainable=True)
    widths.append(head_width(student))
    names.append("--student")
    aligner = VocabAligner(len(tok), *widths, names=tuple(names))

    if dd.enabled:
        student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_bf16 = cfg.bf16 and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    ctx = M.Context(student, teacher, aligner, tok.pad_token_id, tok.eos_token_id, mcfg, autocast)
    examples = load_jsonl(cfg.data, cfg.template)
    schedule = DataSchedule(len(examples), cfg.batch_size, cfg.grad_accum, dd.world, cfg.seed)
    return Setup(cfg, dd, device, tok, student, teacher, method, ctx, examples, schedule)


def micro_batch(s: Setup, step: int, micro: int):
    idx, pos = s.schedule.rows(step, s.dd.rank, micro)
    for i in idx:
        if i not in s.encoded:
            s.encoded[i] = encode(s.tokenizer, s.examples[i], s.cfg.max_prompt_len, s.cfg.max_response_len)
    enc = [s.encoded[i] for i in idx]
    return collate(enc, s.tokenizer.pad_token_id, pos).to(s.device)


def train_step(s: Setup, step: int, opt, sched) -> dict:
    """One optimizer step (see the module docstring); returns the step's metrics."""
    cfg, dd, method, ctx = s.cfg, s.dd, s.method, s.ctx
    weights = method.weights(ctx.cfg)
    names = sorted(k for k, w in weights.items() if w)  # terms that are part of the loss
    stat_names = sorted(method.stat_keys)  # fixed per method, so every process agrees

    # 1. prepare every micro-batch (sampling happens here, without gradients)
    failure = None
    try:
        preps = [method.prepare(ctx, micro_batch(s, step, a), step) for a in range(cfg.grad_accum)]
    except NonFiniteLogits as e:  # reported below, once every process knows
        preps, failure = [], str(e)

    # 2. global token counts per term (one small all-reduce); stats and failures ride along
    vec = torch.zeros(len(names) + 2 * len(stat_names) + 1, dtype=torch.float64)
    for p in preps:
        for i, k in enumerate(names):
            vec[i] += p.counts.get(k, 0)
        for j, k in enumerate(stat_names):
            if k in p.stats:
                vec[len(names) + 2 * j] += p.stats[k][0]
                vec[len(names) + 2 * j + 1] += p.stats[k][1]
    vec[-1] = failure is not None
    vec = dd.all_sum(vec.to(s.device)).cpu()
    if vec[-1] > 0:
        where = failure or "another process could not sample"
        raise TrainingDiverged(f"sampling at step {step + 1} failed: {where}")
    counts = {k: max(1.0, float(vec[i])) for i, k in enumerate(names)}

    # 3. forward/backward per micro-batch; DDP all-reduces gradients on the last one only
    s.student.train()
    opt.zero_grad(set_to_none=True)
    term_sums = torch.zeros(len(names), dtype=torch.float64)
    for a, prep in enumerate(preps):
        sync = (not dd.enabled) or a == len(preps) - 1
        with contextlib.nullcontext() if sync else s.student.no_sync():
            terms = method.terms(ctx, prep)
            loss = method.combine(ctx.cfg, terms, counts)
            (loss * dd.world).backward()
        for i, k in enumerate(names):
            if k in terms:
                term_sums[i] += float(terms[k].detach())

    # 4. clip, check finiteness everywhere, then step
    params = [p for p in s.student.parameters() if p.requires_grad]
    if cfg.max_grad_norm > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        gnorm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
    term_sums = dd.all_sum(term_sums.to(s.device)).cpu()
    values = {k: float(term_sums[i]) / counts[k] for i, k in enumerate(names)}
    loss_value = sum(weights[k] * values[k] for k in names)
    if not (math.isfinite(loss_value) and math.isfinite(float(gnorm))):
        raise TrainingDiverged(
            f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step {step + 1} "
            f"(loss {loss_value}, grad norm {float(gnorm)}; terms {values}); the weights were not updated"
        )
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()

    rec = {"step": step + 1, "loss": loss_value, **{f"loss/{k}": v for k, v in values.items()}}
    rec.update(lr=lr, grad_norm=float(gnorm), tokens=int(max(counts.values())), epoch=s.schedule.epoch(step + 1))
    for j, k in enumerate(stat_names):
        c = float(vec[len(names) + 2 * j + 1])
        rec[k] = float(vec[len(names) + 2 * j]) / c if c else float("nan")
    return rec


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a distillation run; returns a summary. Writes everything under cfg.out."""
    from tqdm.auto import tqdm

    s = build(cfg)
    dd = s.dd
    os.makedirs(cfg.out, exist_ok=True)
    opt, sched = make_optimizer(unwrap(s.student), cfg)

    start = 0
    if cfg.resume:
        start = load_checkpoint(cfg, dd, s.student, opt, sched, s.device)
    elif list_checkpoints(cfg.out):
        raise ValueError(
            f"--out {cfg.out!r} already has checkpoints; pass --resume to continue that run or choose another --out"
        )
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), dd.main, start)
    eval_set = _load_eval(cfg)
    last_ckpt = list_checkpoints(cfg.out)[-1] if start else None
    end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)

    bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.method, disable=not (dd.main and cfg.progress),
               dynamic_ncols=True)
    t0 = time.time()
    rec: dict = {}
    step = start
    try:
        while step < end:
            try:
                rec = train_step(s, step, opt, sched)
            except TrainingDiverged as e:
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise TrainingDiverged(f"{e}; {where}. Lower --lr or check the data, then --resume.") from None
            step += 1
            rec["elapsed"] = time.time() - t0
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < end:
                rec.update(_evaluate(s, eval_set))
            log.write(rec)
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "reward", "lr") if k in rec})
            if (cfg.save_every and step % cfg.save_every == 0) or step == end:
                last_ckpt = save_checkpoint(cfg, dd, step, s.student, opt, sched, s.schedule) or last_ckpt
    finally:
        bar.close()

    summary = {"method": cfg.method, "steps": step, "train_seconds": time.time() - t0, "last": rec}
    if step == cfg.max_steps:
        if eval_set:
            ev = _evaluate(s, eval_set)
            log.write({"step": step, **ev})
            summary["eval"] = ev
        if cfg.save_final and dd.main:
            final = os.path.join(cfg.out, "final")
            unwrap(s.student).save_pretrained(final)
            s.tokenizer.save_pretrained(final)
            summary["final"] = final
    dd.barrier()
    return summary


def _load_eval(cfg: TrainConfig):
    if not cfg.eval_data:
        return None
    ex = load_jsonl(cfg.eval_data, cfg.template)
    return ex[: cfg.eval_max_examples]


def _evaluate(s: Setup, eval_set) -> dict:
    """Rouge-L / exact match / ECE of the student on the eval data (main process; others wait)."""
    from .evaluate import evaluate_model

    res = {}
    if s.dd.main:
        mcfg = s.ctx.cfg
        r = evaluate_model(
            unwrap(s.student),
            s.tokenizer,
            eval_set,
            max_new_tokens=mcfg.max_new_tokens,
            max_prompt_len=s.cfg.max_prompt_len,
            max_response_len=s.cfg.max_response_len,
            seed=s.cfg.seed,
            autocast=s.ctx.autocast,
        )
        res = {f"eval/{k}": v for k, v in r.items() if isinstance(v, (int, float))}
        unwrap(s.student).train()
    s.dd.barrier()
    return res
