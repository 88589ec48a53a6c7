"""Checkpoints: ``OUT/checkpoints/step-<step, 8 digits>.pt`` (e.g. ``step-00000400.pt``); under
``--fsdp`` sharded folders ``step-<step>/`` instead (sharded_checkpoint.py, which uses this
module's state format, checksums and checks).

A checkpoint holds the student, optimizer, scheduler, the RNG states of every process, the step,
the data position, every setting of the run and a fingerprint of its inputs (resume.py), under
``"extras"`` the state of what else the run trains or keeps (the hidden-state projection,
DistiLLM's schedule and replay buffer) when there is any, and checksums of all of that: a CRC-32 of every tensor's bytes and one of every other value. It is
written atomically (storage.py: a temporary file, fsync, rename, fsync of the folder), so a
kill mid-write never leaves a truncated checkpoint. Since the data order and every rollout
seed are functions of (seed, step) (seeds.py), ``--resume`` reproduces an uninterrupted run.

On ``--resume`` the newest checkpoint is verified before it is used: it must load, be a
checkpoint of this format and match its checksums (computed on the loaded tensors, in memory:
no second read of the file). One that does not is skipped with a line saying which and why,
renamed to ``<name>.damaged``, and the next older one is tried; when none verifies the run
stops with an error naming each and what is wrong with it.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import storage
from .data import DataSchedule
from .distributed import Dist
from .models import unwrap
from .options import ConfigError

FORMAT = 2  # 1: before checksums and the full settings record


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


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


_NAME = re.compile(r"^step-\d{8}(\.pt)?$")  # a file step-<step>.pt or a sharded folder step-<step> (the step in 8 digits)


def list_checkpoints(out: str) -> list[str]:
    """Checkpoints (files, and the folders of sharded ones), oldest first (temporaries of an
    interrupted write and checkpoints renamed .damaged are not checkpoints)."""
    try:
        names = os.listdir(checkpoint_dir(out))
    except FileNotFoundError:
        return []
    return [os.path.join(checkpoint_dir(out), n) for n in sorted(names, key=lambda n: n[:13]) if _NAME.match(n)]


def is_sharded(path: str) -> bool:
    """Whether the checkpoint ``path`` is a sharded folder (an --fsdp run's)."""
    return os.path.isdir(path)


def check_kind(paths: list[str], sharded: bool) -> None:
    """Refuse (ConfigError naming --fsdp) checkpoints of the other kind than this run writes."""
    other = [p for p in paths if is_sharded(p) != sharded]
    if other:
        kind = "a sharded folder of an --fsdp run" if sharded is False else "a single file of a run without --fsdp"
        raise ConfigError(
            f"--fsdp: the checkpoint {other[-1]} is {kind}; resume with the run's own --fsdp setting"
        )


# ---------------------------------------------------------------------------------------------
# Checksums


def _tensor_crc(t: torch.Tensor) -> int:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def checksums(state) -> dict:
    """{"tensors": {path: CRC-32 of the bytes}, "values": CRC-32 of everything else (the structure,
    keys, numbers, strings, tensor dtypes and shapes)}."""
    tensors: dict[str, int] = {}
    parts: list[str] = []

    def walk(x, path):
        if torch.is_tensor(x):
            tensors[path] = _tensor_crc(x)
            parts.append(f"tensor {x.dtype} {tuple(x.shape)}")
        elif isinstance(x, Mapping):
            parts.append("{")
            for k, v in x.items():
                parts.append(repr(k))
                walk(v, f"{path}/{k}")
            parts.append("}")
        elif isinstance(x, (list, tuple)):
            parts.append("[" if isinstance(x, list) else "(")
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")
            parts.append("]")
        else:
            parts.append(repr(x))

    walk(state, "")
    return {"tensors": tensors, "values": zlib.crc32("\n".join(parts).encode())}


def _mismatch(state: dict) -> Optional[str]:
    """What differs from the stored checksums, or None."""
    stored = state.pop("checksums")
    now = checksums(state)
    for path, crc in stored["tensors"].items():
        if now["tensors"].get(path) != crc:
            return f"tensor {path.lstrip('/')} does not match its checksum"
    if now["values"] != stored["values"] or now["tensors"].keys() != stored["tensors"].keys():
        return "its settings or structure do not match their checksum"
    return None


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str) -> dict:
    """Load and verify one checkpoint (CPU tensors); CheckpointError saying what is wrong."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot be read ({storage.reason(e)})") from None
    if size == 0:
        raise CheckpointError("the file is empty")
    try:
        # weights_only: a damaged file is never executed as a pickle, only rejected.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle means the same thing to the user
        raise CheckpointError(f"cannot be read, truncated or not a checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict) or "format" not in state or "checksums" not in state:
        raise CheckpointError("not a kdext checkpoint of this version (no checksums; written before they were added?)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"checkpoint format {state['format']!r}, this kdext reads format {FORMAT}")
    bad = _mismatch(state)
    if bad:
        raise CheckpointError(f"{bad}: the file is damaged")
    return state


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(cfg, dd: Dist, step, student, opt, sched, schedule: DataSchedule, record: dict,
                    extras: Optional[dict] = None) -> Optional[str]:
    """Write the checkpoint of ``step`` (main process; every process takes part). ``record``:
    {"settings": ..., "inputs": ...} (resume.py); ``extras``: name -> object with state_dict()
    (the same on every process), saved beside the model. Returns its path; StorageError (the partial
    file removed, older checkpoints untouched) when it cannot be written."""
    rngs = [None] * dd.world
    if dd.enabled:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]

    def write() -> str:
        os.makedirs(checkpoint_dir(cfg.out), exist_ok=True)
        path = os.path.join(checkpoint_dir(cfg.out), f"step-{step:08d}.pt")
        state = {
            "format": FORMAT,
            "step": step,
            "examples_seen": step * schedule.global_batch,
            "world_size": dd.world,
            "model": unwrap(student).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rngs,
            **record,
        }
        if extras:
            state["extras"] = {k: v.state_dict() for k, v in extras.items()}
        state["checksums"] = checksums(state)
        storage.atomic_write(path, lambda f: torch.save(state, f))
        for old in list_checkpoints(cfg.out)[: -cfg.keep_checkpoints]:
            os.remove(old)
        return path

    return dd.on_main(write, "writing a checkpoint")


def estimated_size(student, opt_states_per_param: int = 2) -> int:
    """Bytes of a checkpoint: the student's parameters and buffers plus AdamW's two moments."""
    model = unwrap(student)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params * (1 + opt_states_per_param) + buffers


# ---------------------------------------------------------------------------------------------
# Resuming


def _choose(out: str, warn: Callable[[str], None], keep: dict) -> str:
    """The newest checkpoint that verifies (its state kept in ``keep``); the damaged newer ones
    are renamed aside, each with a line saying why."""
    ckpts = list_checkpoints(out)
    skipped = []
    for path in reversed(ckpts):
        try:
            keep["state"] = read_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        for bad, why in skipped:
            # Aside, not deleted (it may be worth a look), and out of the way of the retention
            # of the checkpoints the resumed run writes.
            os.replace(bad, bad + ".damaged")
            warn(f"skipped the checkpoint {bad}: {why}; renamed it to {os.path.basename(bad)}.damaged "
                 f"and resuming from the older {os.path.basename(path)}")
        if skipped:
            storage.fsync_dir(checkpoint_dir(out))
        return path
    listing = "; ".join(f"{p}: {why}" for p, why in skipped)
    raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out)} can be used ({listing})")


def load_checkpoint(cfg, dd: Dist, student, opt, sched, check: Callable[[str, dict], None],
                    warn: Callable[[str], None], extras: Optional[dict] = None) -> tuple[int, Optional[str]]:
    """Restore the newest checkpoint that verifies; returns (its step, its path), (0, None) when
    there is none. ``check(path, state)`` refuses a checkpoint of another run (ConfigError);
    ``extras``: the objects saved beside the model (see save_checkpoint), restored by load_state_dict."""
    if not list_checkpoints(cfg.out):
        return 0, None
    check_kind(list_checkpoints(cfg.out), sharded=False)
    keep: dict = {}
    path = dd.on_main(lambda: _choose(cfg.out, warn, keep), "choosing the checkpoint to resume from")
    state = keep.get("state")
    if state is None:  # another process: the main one verified this file; verify our own read of it
        try:
            state = read_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {path}: {e}") from None
    check(path, state)
    check_compatible(path, state, dd, set(extras or {}))
    saved_extras = state.get("extras", {})
    unwrap(student).load_state_dict(state["model"])
    for k, obj in (extras or {}).items():
        obj.load_state_dict(saved_extras[k])
    opt.load_state_dict(state["optimizer"])
    restore_run_state(state, dd, sched)
    return int(state["step"]), path


def check_compatible(path: str, state: dict, dd: Dist, extras: set) -> None:
    """The checkpoint's number of processes and the state it keeps beside the model (``extras``:
    their names; a sharded checkpoint lists those in its shards under ``sharded_extras``) must be
    this run's (ConfigError)."""
    if state["world_size"] != dd.world:
        raise ConfigError(
            f"--resume: the checkpoint {path} was written by {state['world_size']} processes, this run has {dd.world}; "
            "keep the number of processes (the global batch and RNG streams depend on it)"
        )
    saved = set(state.get("extras", {})) | set(state.get("sharded_extras", ()))
    if saved != extras:
        raise ConfigError(
            f"--resume: the checkpoint {path} holds state for {sorted(saved) or 'nothing'} beside the "
            f"model, this run needs {sorted(extras) or 'nothing'} (--hidden-coef or the method's schedule changed)"
        )


def restore_run_state(state: dict, dd: Dist, sched) -> None:
    """The scheduler and this process's RNG states."""
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][dd.rank])
