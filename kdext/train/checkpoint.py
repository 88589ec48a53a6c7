"""Checkpoints: ``OUT/checkpoints/step-<step, 8 digits>.pt`` (e.g. ``step-00000400.pt``).

A checkpoint holds the student, optimizer, scheduler, the RNG states of every process, the step
and the data position, and under ``"extras"`` the state of what else the run trains or keeps
(the hidden-state projection, DistiLLM's schedule and replay buffer), when there is any. It is written to a temporary file and renamed, so a crash mid-write never
leaves a truncated checkpoint. Since the data order and every rollout seed are functions of
(seed, step) (seeds.py), ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from .data import DataSchedule
from .distributed import Dist
from .models import unwrap
from .options import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


# Settings that must not change between a run and its resumption (they change the data order
# or the meaning of a step).
RESUME_KEYS = ("method", "batch_size", "grad_accum", "max_steps", "seed", "schedule", "warmup_steps")


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


def save_checkpoint(cfg, dd: Dist, step, student, opt, sched, schedule: DataSchedule,
                    extras: Optional[dict] = None) -> Optional[str]:
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
            "config": {k: getattr(cfg, k) for k in RESUME_KEYS},
        }
        if extras:  # name -> object with state_dict() (the same on every process)
            state["extras"] = {k: v.state_dict() for k, v in extras.items()}
        atomic_save(state, path)
        for old in list_checkpoints(cfg.out)[: -cfg.keep_checkpoints]:
            os.remove(old)
    dd.barrier()
    return path


def load_checkpoint(cfg, dd: Dist, student, opt, sched, device, extras: Optional[dict] = None) -> int:
    """Restore the newest checkpoint; returns its step (0 when there is none). ``extras``: the
    objects saved beside the model (see save_checkpoint), restored by load_state_dict."""
    ckpts = list_checkpoints(cfg.out)
    if not ckpts:
        return 0
    try:
        # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        saved = state["config"]
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise CheckpointError(f"--resume: cannot read the checkpoint {ckpts[-1]}: {e}") from None
    for k in RESUME_KEYS:
        if saved[k] != getattr(cfg, k):
            flag = "--" + k.replace("_", "-")
            raise ConfigError(
                f"{flag}: the checkpoint {ckpts[-1]} was written with {saved[k]!r}, "
                f"not {getattr(cfg, k)!r}; resuming with a different value would not continue the same run"
            )
    if state["world_size"] != dd.world:
        raise ConfigError(
            f"--resume: the checkpoint {ckpts[-1]} was written by {state['world_size']} processes, this run has {dd.world}; "
            "keep the number of processes (the global batch and RNG streams depend on it)"
        )
    saved_extras = state.get("extras", {})
    if set(saved_extras) != set(extras or {}):
        raise ConfigError(
            f"--resume: the checkpoint {ckpts[-1]} holds state for {sorted(saved_extras) or 'nothing'} beside the "
            f"model, this run needs {sorted(extras or {}) or 'nothing'} (--hidden-coef or the method's schedule changed)"
        )
    unwrap(student).load_state_dict(state["model"])
    for k, obj in (extras or {}).items():
        obj.load_state_dict(saved_extras[k])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][dd.rank])
    return int(state["step"])
