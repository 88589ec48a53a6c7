"""One optimizer step, and the setup it runs on.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` rows on each of
``world_size`` processes (the global batch). Each step:

1. every micro-batch is *prepared* (rollouts sampled, if the method needs them);
2. the token counts of every loss term are summed over micro-batches and processes;
3. each micro-batch's loss is back-propagated (times world_size, since DDP and FSDP average
   gradients over processes); DDP syncs on the last one only, FSDP (``--fsdp``, sharding.py)
   reduce-scatters after every one into the sharded gradients. With ``--token-mean global`` it is
   sum_k weight_k * term_k / global_count_k; with ``micro_batch`` it is
   sum_k weight_k * term_k / count_k(micro-batch) / (grad_accum * world_size), the mean over
   micro-batches and processes of per-micro-batch token means;
4. the hidden-state projection's gradients (``--hidden-coef``; it is not inside DDP) are summed
   over processes and divided by their number, as DDP does for the student's (under FSDP it is
   sharded, and FSDP averages them); gradients are clipped (student and projection together; the
   norm of sharded gradients is the global one, the same on every process); a non-finite loss
   or gradient norm stops the run before the optimizer touches the weights (the last checkpoint
   stays the last good one);
5. AdamW and the LR schedule step; the method's ``after_step`` runs (DistiLLM's validation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import methods as M
from . import sharding
from .config import TrainConfig
from .data import DataSchedule, collate, encode, load_jsonl
from .distributed import Dist, setup_distributed
from .generation import NonFiniteLogits
from .heads import check_head
from .hidden import build_projection
from .lmdata import LMStream
from .models import (VocabAligner, check_context, check_vocab, has_tokenizer, head_width, load_model, load_tokenizer,
                     unwrap)
from .reporting import notice
from .resume import input_fingerprints


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the message says where and what was kept."""


@dataclass
class Setup:
    """Everything a run holds; built by :func:`build`, reused by tests."""

    cfg: TrainConfig
    dd: Dist
    device: torch.device
    tokenizer: object
    student: torch.nn.Module  # DDP-wrapped when world > 1 (FSDP-sharded in place with --fsdp)
    teacher: Optional[torch.nn.Module]
    method: M.Method
    ctx: M.Context
    examples: list
    schedule: DataSchedule
    encoded: dict = field(default_factory=dict)  # example index -> Encoded (tokenised once)
    eval_set: Optional[list] = None  # --eval-data's examples (at most --eval-max-examples)
    inputs: dict = field(default_factory=dict)  # fingerprints of the inputs (resume.py)
    noted: set = field(default_factory=set)  # what has been reported once (cut prompts, responses)
    projection: Optional[torch.nn.Module] = None  # the hidden-state projection (--hidden-coef)
    lm_stream: Optional[LMStream] = None  # --lm-data

    def trainable(self) -> torch.nn.Module:
        """What the optimizer trains: the student, and the projection after it when there is one."""
        if self.projection is None:
            return unwrap(self.student)
        return torch.nn.ModuleList([unwrap(self.student), self.projection])

    def checkpoint_extras(self) -> dict:
        """Objects with state_dict/load_state_dict that checkpoints carry beside the model."""
        extras = {}
        if self.projection is not None:
            extras["hidden_projection"] = self.projection
        if self.method.state_dict() is not None:
            extras["method"] = self.method
        return extras


def sequence_needs(cfg: TrainConfig, samples: bool) -> list[tuple[str, int]]:
    """The longest sequences a run forms, with the flags that make them: data rows (prompt and
    response), and rollouts and evaluation samples (prompt and generated tokens)."""
    P, R, N = cfg.max_prompt_len, cfg.max_response_len, cfg.method_cfg.max_new_tokens
    needs = [(f"--max-prompt-len {P} + --max-response-len {R}", P + R)]
    if samples or cfg.eval_data:
        needs.append((f"--max-prompt-len {P} + --max-new-tokens {N}", P + N))
    return needs


def build(cfg: TrainConfig) -> Setup:
    cfg.validate()
    mcfg = cfg.method_cfg.resolved(cfg.method, lm_data=bool(cfg.lm_data))
    mcfg = dataclasses.replace(mcfg, seed=cfg.seed)
    method = M.make(cfg.method)
    # Everything that can be checked without the weights is, before any model is loaded.
    examples = load_jsonl(cfg.data, cfg.template)
    eval_set = load_jsonl(cfg.eval_data, cfg.template)[: cfg.eval_max_examples] if cfg.eval_data else None
    # --teacher-cache stands in for the live teacher (cached_teacher.py): no teacher is loaded.
    needs_teacher = (method.needs_teacher or mcfg.hidden_coef > 0) and not cfg.teacher_cache
    models = [("--teacher", cfg.teacher)] if needs_teacher else []
    check_context(models + [("--student", cfg.student)], sequence_needs(cfg, method.samples))
    inputs = input_fingerprints(cfg, needs_teacher)
    dd, device = setup_distributed(cfg.device, cfg.collective_timeout, fsdp=cfg.fsdp)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    # --fsdp: models are read on the CPU and each FSDP unit moves its shards to the device as it is
    # made, so no process ever holds a whole model on the GPU.
    load_on = torch.device("cpu") if dd.sharded else device

    tok = load_tokenizer(cfg.student, "--student")
    cache = None
    if cfg.teacher_cache:
        from .cached_teacher import open_for_run

        cache = open_for_run(cfg, mcfg, tok, inputs)
    teacher = None
    widths, names = [], []
    if needs_teacher:
        # A teacher folder without tokenizer files is taken to use the student's tokenizer.
        if has_tokenizer(cfg.teacher):
            check_vocab(tok, load_tokenizer(cfg.teacher, "--teacher"))
        t_dtype = torch.bfloat16 if dd.sharded and use_bf16 else torch.float32
        teacher = load_model(cfg.teacher, "--teacher", load_on, trainable=False, dtype=t_dtype)
        widths.append(head_width(teacher))
        names.append("--teacher")
    student = load_model(cfg.student, "--student", load_on, trainable=True)
    widths.append(head_width(student))
    names.append("--student")
    aligner = VocabAligner(len(tok), *widths, names=tuple(names))
    # A cached teacher's sparse loss takes the student's logits (no fused sparse op yet).
    fused_linear = cfg.fused_linear and cache is None
    if fused_linear:  # the fused losses must see the logits each model computes itself
        for arg, model in (("--teacher", teacher), ("--student", student)):
            if model is not None:
                check_head(model, len(tok), load_on, arg)

    if dd.sharded:
        if teacher is not None:
            sharding.shard_teacher(teacher, dd.mesh, use_bf16, cfg.fsdp_offload_teacher)
        sharding.shard_student(student, dd.mesh, use_bf16)
    elif dd.enabled:
        student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    projection = build_projection(mcfg, unwrap(student), teacher, cfg.seed, device)
    if projection is not None and dd.sharded:
        sharding.shard_projection(projection, dd.mesh)
    lockstep = None
    if dd.sharded and dd.enabled:
        def lockstep(running: bool, failed: bool) -> tuple[bool, bool]:
            return tuple(dd.any_of([running, failed], device))
    ctx = M.Context(student, teacher, aligner, tok.pad_token_id, tok.eos_token_id, mcfg, autocast, dd=dd,
                    batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_steps=cfg.max_steps,
                    hidden=projection, lockstep=lockstep, teacher_cache=cache, fused_linear=fused_linear)
    schedule = DataSchedule(len(examples), cfg.batch_size, cfg.grad_accum, dd.world, cfg.seed)
    s = Setup(cfg, dd, device, tok, student, teacher, method, ctx, examples, schedule,
              eval_set=eval_set, inputs=inputs, projection=projection)
    ctx.data = lambda step, micro: micro_batch(s, step, micro)
    if cfg.lm_data:
        s.lm_stream = LMStream(cfg.lm_data, tok, cfg.max_prompt_len + cfg.max_response_len, cfg.batch_size,
                               cfg.grad_accum, dd.world, cfg.seed)
        ctx.lm = lambda step, micro: s.lm_stream.batch(step, dd.rank, micro, device)
    method.setup(s)
    return s


def _say_cut_once(s: Setup, enc, ex) -> None:
    """Long prompts keep their end, long responses their start, as the flags say; the first of
    each is reported (main process), so a cut is never silent."""
    cuts = (("prompt", enc.prompt_cut, "--max-prompt-len", s.cfg.max_prompt_len, "last"),
            ("response", enc.response_cut, "--max-response-len", s.cfg.max_response_len, "first"))
    for what, n, flag, limit, keep in cuts:
        if n and what not in s.noted:
            s.noted.add(what)
            notice(f"note: {ex.where}: the {what} has {n + limit} tokens, more than {flag} {limit}; it keeps its "
                   f"{keep} {limit}, as does every longer {what} of the run (said once)", enabled=s.dd.main)


def micro_batch(s: Setup, step: int, micro: int):
    idx, pos = s.schedule.rows(step, s.dd.rank, micro)
    for i in idx:
        if i not in s.encoded:
            s.encoded[i] = encode(s.tokenizer, s.examples[i], s.cfg.max_prompt_len, s.cfg.max_response_len)
            _say_cut_once(s, s.encoded[i], s.examples[i])
    enc = [s.encoded[i] for i in idx]
    return collate(enc, s.tokenizer.pad_token_id, pos).to(s.device)


def _prepared_sums(preps: list, names: list[str], stat_names: list[str], failed: bool) -> dict[str, float]:
    """Token counts per loss term, (sum, count) per logged stat, and whether sampling failed: the
    numbers every process must add up before any loss is formed. Every process has every key."""
    sums = {f"count/{k}": 0.0 for k in names}
    for k in stat_names:
        sums[f"stat/{k}/sum"] = sums[f"stat/{k}/n"] = 0.0
    for p in preps:
        for k in names:
            sums[f"count/{k}"] += p.counts.get(k, 0)
        for k in stat_names:
            if k in p.stats:
                sums[f"stat/{k}/sum"] += p.stats[k][0]
                sums[f"stat/{k}/n"] += p.stats[k][1]
    sums["failed"] = float(failed)
    return sums


def train_step(s: Setup, step: int, opt, sched) -> dict:
    """One optimizer step (see the module docstring); returns the step's metrics."""
    cfg, dd, method, ctx = s.cfg, s.dd, s.method, s.ctx
    weights = method.weights(ctx.cfg)
    names = sorted(k for k, w in weights.items() if w)  # terms that are part of the loss
    stat_names = sorted(method.stat_keys)  # fixed per method, so every process agrees

    # 1. prepare every micro-batch (sampling happens here, without gradients)
    failure = None
    try:
        preps = method.prepare_step(ctx, step)
    except NonFiniteLogits as e:  # reported below, once every process knows
        preps, failure = [], str(e)

    # 2. global token counts per term (one small all-reduce); stats and failures ride along
    total = dd.all_sum(_prepared_sums(preps, names, stat_names, failure is not None), s.device)
    if total["failed"] > 0:
        where = failure or "another process could not sample"
        raise TrainingDiverged(f"sampling at step {step + 1} failed: {where}")
    counts = {k: max(1.0, total[f"count/{k}"]) for k in names}
    per_micro = ctx.cfg.token_mean == "micro_batch"
    n_micro = cfg.grad_accum * dd.world

    # 3. forward/backward per micro-batch; DDP all-reduces gradients on the last one only
    s.student.train(method.train_mode)
    opt.zero_grad(set_to_none=True)
    term_sums = {k: 0.0 for k in names}  # global: sums; micro_batch: sums of per-micro-batch means
    for a, prep in enumerate(preps):
        sync = (not dd.enabled) or dd.sharded or a == len(preps) - 1
        with contextlib.nullcontext() if sync else s.student.no_sync():
            terms = method.terms(ctx, prep)
            if per_micro:
                loss = method.combine(ctx.cfg, terms, prep.counts) / n_micro
            else:
                loss = method.combine(ctx.cfg, terms, counts)
            (loss * dd.world).backward()
        for k in names:
            if k in terms:
                v = float(terms[k].detach())
                term_sums[k] += v / max(1, prep.counts.get(k, 0)) if per_micro else v

    # 4. the projection's gradients over processes, clip, check finiteness everywhere, then step
    if s.projection is not None and dd.enabled and not dd.sharded:
        grads = [p.grad for p in s.projection.parameters() if p.grad is not None]
        dd.all_sum_tensors_(grads)
        for g in grads:
            g.div_(dd.world)
    params = [p for p in s.trainable().parameters() if p.requires_grad]
    if dd.sharded:
        gnorm = sharding.grad_norm(params, cfg.max_grad_norm)
    elif cfg.max_grad_norm > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        gnorm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
    term_sums = dd.all_sum(term_sums, s.device)
    values = {k: term_sums[k] / (n_micro if per_micro else counts[k]) for k in names}
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
    rec.update(lr=lr, grad_norm=float(gnorm), tokens=int(max(counts.values())), epoch=s.schedule.epoch(method.data_batches(ctx.cfg, step + 1)))
    for k in stat_names:
        n = total[f"stat/{k}/n"]
        rec[k] = total[f"stat/{k}/sum"] / n if n else float("nan")
    rec.update(method.after_step(ctx, step + 1))
    return rec
