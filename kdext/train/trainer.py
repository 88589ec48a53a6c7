"""The training loop: steps, checkpoints, evaluation, progress and the final model.

The pieces live beside it: the options and their checks in config.py, the process group in
distributed.py, AdamW and the LR schedule in optim.py, one optimizer step in step.py,
checkpoints and resume in checkpoint.py, metrics.jsonl and progress in reporting.py, the random
streams in seeds.py.
"""

from __future__ import annotations

import os
import time

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import load_jsonl
from .hidden import FILE_NAME as HIDDEN_FILE
from .models import unwrap
from .optim import make_optimizer
from .options import ConfigError
from .reporting import MetricsLog, Progress, default_log_every
from .step import Setup, TrainingDiverged, build, train_step


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a distillation run; returns a summary. Writes everything under cfg.out."""
    s = build(cfg)
    dd = s.dd
    os.makedirs(cfg.out, exist_ok=True)
    opt, sched = make_optimizer(s.trainable(), cfg)

    start = 0
    if cfg.resume:
        start = load_checkpoint(cfg, dd, s.student, opt, sched, s.device, s.checkpoint_extras())
    elif list_checkpoints(cfg.out):
        raise ConfigError(
            f"--out {cfg.out!r} already has checkpoints; pass --resume to continue that run or choose another --out"
        )
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), dd.main, start)
    eval_set = _load_eval(cfg)
    last_ckpt = list_checkpoints(cfg.out)[-1] if start else None
    end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)

    progress = Progress(cfg.method, cfg.max_steps, start, end, enabled=dd.main and cfg.progress,
                        every=cfg.log_every or default_log_every(cfg.max_steps))
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
            progress.update(step, rec)
            if (cfg.save_every and step % cfg.save_every == 0) or step == end:
                last_ckpt = save_checkpoint(cfg, dd, step, s.student, opt, sched, s.schedule,
                                            s.checkpoint_extras()) or last_ckpt
    finally:
        progress.close()

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
            if s.projection is not None:  # beside the student, not part of it
                summary["hidden_projection"] = os.path.join(cfg.out, HIDDEN_FILE)
                s.projection.save(summary["hidden_projection"])
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
