"""The training loop: steps, checkpoints, evaluation, progress and the final model.

The pieces live beside it: the options and their checks in config.py, the process group in
distributed.py, AdamW and the LR schedule in optim.py, one optimizer step in step.py,
checkpoints and resume in checkpoint.py and resume.py, writing files safely in storage.py,
metrics.jsonl and progress in reporting.py, the random streams in seeds.py.
"""

from __future__ import annotations

import os
import time

from . import checkpoint, sharded_checkpoint, sharding, storage
from .checkpoint import estimated_size, list_checkpoints
from .config import TrainConfig
from .hidden import FILE_NAME as HIDDEN_FILE
from .models import unwrap
from .optim import make_optimizer
from .options import ConfigError
from .reporting import MetricsLog, Progress, default_log_every, notice
from .resume import check_resume, settings_record
from .step import Setup, TrainingDiverged, build, train_step


def _is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that writes --out (known before the group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_out(out: str, main: bool) -> None:
    """Before anything is loaded: --out must be writable, and temporaries of killed writes go."""
    if not main:
        return
    storage.check_writable(out)
    from .checkpoint import checkpoint_dir

    removed = storage.remove_stale(out, checkpoint_dir(out))
    if removed:
        notice(f"removed {len(removed)} temporary file(s) of interrupted writes: {', '.join(removed)}")


def _warn_if_disk_small(s: Setup, cfg: TrainConfig) -> None:
    free = storage.free_bytes(cfg.out)
    one = estimated_size(s.student)
    need = one * (cfg.keep_checkpoints + 1) + one // 3  # the kept ones, the one being written, final/
    if free is not None and free < need:
        notice(f"warning: --out {cfg.out} has {storage.human_bytes(free)} free; this run needs about "
               f"{storage.human_bytes(need)} ({cfg.keep_checkpoints + 1} checkpoints of about "
               f"{storage.human_bytes(one)}, and the final model)")


def _with_state(e: storage.StorageError, last_ckpt) -> storage.StorageError:
    where = (f"the previous checkpoint {last_ckpt} is intact (--resume continues from it)" if last_ckpt
             else "no checkpoint had been written yet")
    return storage.StorageError(e.errno, f"{e}; {where}")


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a distillation run; returns a summary. Writes everything under cfg.out."""
    cfg.validate()
    prepare_out(cfg.out, _is_main_process())
    s = build(cfg)
    dd = s.dd
    opt, sched = make_optimizer(s.trainable(), cfg)
    record = {"settings": settings_record(cfg, s.ctx.cfg), "inputs": s.inputs}

    def say(text):
        notice(text, enabled=dd.main)

    def same_run(path, state):
        for note in check_resume(path, state["step"], state["settings"], state["inputs"], cfg, s.ctx.cfg, s.inputs):
            say(f"resume: {note}")

    # Sharded runs checkpoint what the optimizer trains (the student and the projection) in DCP
    # folders, the others the student in single files (checkpoint.py).
    ckpt, ckpt_model = (sharded_checkpoint, s.trainable()) if dd.sharded else (checkpoint, s.student)
    start, last_ckpt = 0, None
    if cfg.resume:
        start, last_ckpt = ckpt.load_checkpoint(cfg, dd, ckpt_model, opt, sched, same_run,
                                                lambda t: say(f"warning: {t}"), s.checkpoint_extras())
        if last_ckpt is None:
            say(f"note: --resume: {cfg.out} has no checkpoint yet; starting at step 0")
    elif list_checkpoints(cfg.out):
        raise ConfigError(
            f"--out {cfg.out!r} already has checkpoints; pass --resume to continue that run or choose another --out"
        )
    if dd.main:
        _warn_if_disk_small(s, cfg)
    end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)
    progress = Progress(cfg.method, cfg.max_steps, start, end, enabled=dd.main and cfg.progress,
                        every=cfg.log_every or default_log_every(cfg.max_steps))
    t0 = time.time()
    rec: dict = {}
    step = start
    summary = {"method": cfg.method}
    try:
        log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), dd.main, start)
        while step < end:
            try:
                rec = train_step(s, step, opt, sched)
            except TrainingDiverged as e:
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise TrainingDiverged(f"{e}; {where}. Lower --lr or check the data, then --resume.") from None
            step += 1
            rec["elapsed"] = time.time() - t0
            if s.eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < end:
                rec.update(_evaluate(s, s.eval_set))
            log.write(rec)
            progress.update(step, rec)
            if (cfg.save_every and step % cfg.save_every == 0) or step == end:
                last_ckpt = ckpt.save_checkpoint(cfg, dd, step, ckpt_model, opt, sched, s.schedule, record,
                                                 s.checkpoint_extras())
        progress.close()
        summary.update(steps=step, train_seconds=time.time() - t0, last=rec)
        if step == cfg.max_steps:
            if s.eval_set:
                ev = _evaluate(s, s.eval_set)
                log.write({"step": step, **ev})
                summary["eval"] = ev
            if cfg.save_final:
                summary["final"] = _save_final(s, cfg)
                if s.projection is not None:
                    summary["hidden_projection"] = os.path.join(cfg.out, HIDDEN_FILE)
    except storage.StorageError as e:
        raise _with_state(e, last_ckpt) from None
    finally:
        progress.close()
    dd.barrier()
    return summary


def _save_final(s: Setup, cfg: TrainConfig) -> str:
    """OUT/final (a plain save_pretrained folder) and the projection, written by the main process;
    under --fsdp every process first helps gather the whole state dict onto it (on the CPU)."""
    final = os.path.join(cfg.out, "final")
    student = unwrap(s.student)
    weights = sharding.full_state_dict(student) if s.dd.sharded else None
    proj = sharding.full_state_dict(s.projection) if s.dd.sharded and s.projection is not None else None

    def write(folder):
        student.save_pretrained(folder, state_dict=weights)
        s.tokenizer.save_pretrained(folder)

    def save():
        storage.atomic_dir(final, write)
        if s.projection is not None:  # beside the student (OUT/), not part of its folder
            data = s.projection.to_bytes(proj)
            storage.atomic_write(os.path.join(cfg.out, HIDDEN_FILE), lambda f: f.write(data))
        return final

    return s.dd.on_main(save, "writing the final model")


def _evaluate(s: Setup, eval_set) -> dict:
    """Rouge-L / exact match / ECE of the student on the eval data (main process; every process
    gets the numbers). A sharded student (--fsdp) is evaluated by every process, in lockstep:
    each forward all-gathers its parameters, so all take part, on the same rows, and all get the
    same numbers."""
    from .evaluate import evaluate_model

    def run():
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
            sync=s.ctx.lockstep,
        )
        unwrap(s.student).train()
        return {f"eval/{k}": v for k, v in r.items() if isinstance(v, (int, float))}

    return run() if s.dd.sharded else s.dd.on_main(run, "evaluating")
