"""Sharded checkpoints (``--fsdp``): ``OUT/checkpoints/step-<step, 8 digits>/``, one folder per step.

A folder holds

* ``__<rank>_<i>.distcp`` and ``.metadata``: what ``torch.distributed.checkpoint`` (DCP) writes,
  each process its own shards: the student's parameters (and the hidden-state projection's,
  when there is one) and AdamW's state, sharded as the parameters are;
* ``state.pt``: everything else, in checkpoint.py's format and with its checksums: the step, the
  data position, the number of processes, the scheduler, the RNG states of every process, every
  setting of the run, the inputs' fingerprints and the unsharded extras (DistiLLM's schedule);
* ``manifest.json``, written last: the size and CRC-32 of every other file, and a CRC-32 of
  the manifest itself.

**Writing** (every process takes part). The main process creates the folder under a temporary
name, ``step-<step>.tmp.<host>.<pid>`` (its own host and process, so a later start removes it
when that process is gone, as for every temporary), and tells the others; every process writes
its shards into it (DCP, fsynced); every process checksums a share of the files; the main
process writes ``state.pt`` and the manifest, fsyncs, renames the folder to its name and fsyncs
the parent. So ``step-<step>/`` either does not exist or is complete. A failed write on any
process (a full disk) removes the temporary folder and stops every process with a StorageError
saying what failed; the older checkpoints are untouched.

**Resuming** takes the newest folder that verifies: its manifest is intact and lists every file
with its size (checked by the main process), and every file matches its CRC-32 (each process
checks a share, so the checkpoint is read once in all). A folder that does not verify is
renamed ``step-<step>.damaged`` with a line saying why, and the next older one is tried;
when none verifies the run stops with a CheckpointError naming each. Then ``state.pt`` is
checked like a single-file checkpoint (settings, number of processes, extras), and DCP loads
every process's shards.

Like DCP itself, this assumes that ``--out`` is one file system seen by every process (a
shared file system across nodes).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Callable, Optional

import torch

from . import storage
from .checkpoint import (FORMAT, CheckpointError, _rng_state, check_compatible, check_kind, checkpoint_dir,
                         checksums, list_checkpoints, read_checkpoint, restore_run_state)
from .data import DataSchedule
from .distributed import Dist
from .sharding import is_sharded

MANIFEST, STATE = "manifest.json", "state.pt"
_KIND = "kdext sharded checkpoint"


def _file_crc(path: str) -> tuple[int, int]:
    """(size, CRC-32) of a file's bytes."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _share(dd: Dist, folder: str, names: list[str]) -> dict[str, list[int]]:
    """[size, CRC-32] of this process's share of ``names`` (every W-th, from its rank)."""
    return {n: list(_file_crc(os.path.join(folder, n))) for i, n in enumerate(names) if i % dd.world == dd.rank}


def _all_files(dd: Dist, folder: str, names: list[str], what: str) -> dict[str, list[int]]:
    """[size, CRC-32] of every file of ``names``, each process checksumming its share."""
    out: dict[str, list[int]] = {}
    for part in dd.on_every(lambda: _share(dd, folder, names), what):
        out.update(part)
    return out


def _manifest_crc(manifest: dict) -> int:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def _failed_call() -> tuple:
    """What a DCP call that failed raises: CheckpointException (a BaseException) on every process."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _dcp_failure(e: BaseException) -> BaseException:
    """The exception a failed DCP call stands for: the OSError of the process that failed, if
    any (a full disk), else the first failure. DCP raises CheckpointException, a BaseException,
    on every process, with each failed process's exception in ``failures``."""
    for exc, _ in getattr(e, "failures", {}).values():
        os_err = storage._os_error(exc)
        if os_err is not None:
            return os_err
    failures = list(getattr(e, "failures", {}).values())
    return failures[0][0] if failures else e


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(cfg, dd: Dist, step: int, model, opt, sched, schedule: DataSchedule, record: dict,
                    extras: Optional[dict] = None) -> str:
    """Write the sharded checkpoint of ``step`` (every process; see the module docstring).
    ``model``: what the optimizer trains (the sharded student, or it and the projection);
    ``extras``: name -> object with state_dict(), the FSDP-sharded ones (the projection) saved in
    the shards with ``model``, the others in state.pt. Returns the folder's path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    extras = extras or {}
    final = os.path.join(checkpoint_dir(cfg.out), f"step-{step:08d}")
    rngs = dd.gather_objects(_rng_state())

    def make_folder() -> str:
        tmp = storage.temp_path(final)
        try:
            os.makedirs(checkpoint_dir(cfg.out), exist_ok=True)
            storage.remove_path(tmp)
            os.makedirs(tmp)
        except OSError as e:
            raise storage.write_error(final, e) from None
        return tmp

    tmp = dd.on_main(make_folder, "creating a checkpoint folder")
    model_sd, optim_sd = get_state_dict(model, opt)
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=dcp.FileSystemWriter(tmp))
    except _failed_call() as e:  # every process gets DCP's CheckpointException when any failed
        if dd.main:
            storage.remove_path(tmp)
        cause = _dcp_failure(e)
        if isinstance(cause, OSError):
            raise storage.write_error(final, cause) from None
        raise CheckpointError(f"writing {final} failed: {cause}") from None
    try:
        names = dd.on_main(lambda: sorted(os.listdir(tmp)), "listing the checkpoint's shards")
        files = _all_files(dd, tmp, names, "checksumming the checkpoint's shards")
    except BaseException:
        if dd.main:
            storage.remove_path(tmp)
        raise

    def finish() -> str:
        state = {
            "format": FORMAT,
            "sharded": True,
            "step": step,
            "examples_seen": step * schedule.global_batch,
            "world_size": dd.world,
            "scheduler": sched.state_dict(),
            "rng": rngs,
            **record,
            "extras": {k: v.state_dict() for k, v in extras.items() if not is_sharded(v)},
            "sharded_extras": sorted(k for k, v in extras.items() if is_sharded(v)),
        }
        state["checksums"] = checksums(state)
        try:
            with storage.open_for_write(os.path.join(tmp, STATE)) as f:
                torch.save(state, f)
            files[STATE] = list(_file_crc(os.path.join(tmp, STATE)))
            manifest = {"kind": _KIND, "format": 1, "step": step, "world_size": dd.world, "files": files}
            manifest["checksum"] = _manifest_crc(manifest)
            with storage.open_for_write(os.path.join(tmp, MANIFEST)) as f:
                f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        except BaseException as e:
            storage.remove_path(tmp)
            os_err = storage._os_error(e)
            if os_err is not None:
                raise storage.write_error(final, os_err) from None
            raise
        storage.publish_dir(tmp, final)
        for old in list_checkpoints(cfg.out)[: -cfg.keep_checkpoints]:
            storage.remove_path(old)
        return final

    return dd.on_main(finish, "writing a checkpoint")


# ---------------------------------------------------------------------------------------------
# Verifying and resuming


def read_manifest(folder: str) -> dict:
    """The folder's manifest, checked: intact, and every file it lists present with its size
    (CheckpointError saying what is wrong)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"it has no {MANIFEST}: an incomplete folder, not written by kdext") from None
    except (OSError, ValueError) as e:
        why = storage.reason(e) if isinstance(e, OSError) else e
        raise CheckpointError(f"its {MANIFEST} cannot be read ({why})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != _KIND or "checksum" not in manifest:
        raise CheckpointError(f"its {MANIFEST} is not a kdext manifest")
    if manifest["checksum"] != _manifest_crc(manifest):
        raise CheckpointError(f"its {MANIFEST} does not match its checksum: it is damaged")
    for name, (size, _) in sorted(manifest["files"].items()):
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"{name} is missing")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{name} has {os.path.getsize(full)} bytes, its manifest says {size}: it is damaged")
    return manifest


def verify(dd: Dist, folder: str) -> Optional[str]:
    """None when the folder verifies (every process takes part), else what is wrong."""

    def check_manifest():
        try:
            return "ok", read_manifest(folder)
        except CheckpointError as e:
            return "bad", str(e)

    status, manifest = dd.on_main(check_manifest, "reading a checkpoint's manifest")
    if status != "ok":
        return manifest
    names = sorted(manifest["files"])
    now = _all_files(dd, folder, names, "verifying the checkpoint's shards")
    for name in names:
        if now[name] != list(manifest["files"][name]):
            return f"{name} does not match its checksum: the file is damaged"
    return None


def choose(cfg, dd: Dist, warn: Callable[[str], None]) -> Optional[str]:
    """The newest checkpoint folder that verifies (None when there is none at all); newer ones
    that do not are renamed ``.damaged``, each with a line (every process takes part)."""
    ckpts = dd.on_main(lambda: list_checkpoints(cfg.out), "listing the checkpoints")
    if not ckpts:
        return None
    dd.on_main(lambda: check_kind(ckpts, sharded=True), "checking the checkpoints")
    skipped = []
    for path in reversed(ckpts):
        why = verify(dd, path)
        if why is not None:
            skipped.append((path, why))
            continue

        def set_aside():
            for bad, reason in skipped:
                os.replace(bad, bad + ".damaged")
                warn(f"skipped the checkpoint {bad}: {reason}; renamed it to {os.path.basename(bad)}.damaged "
                     f"and resuming from the older {os.path.basename(path)}")
            if skipped:
                storage.fsync_dir(checkpoint_dir(cfg.out))

        dd.on_main(set_aside, "setting damaged checkpoints aside")
        return path
    listing = "; ".join(f"{p}: {why}" for p, why in skipped)
    raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(cfg.out)} can be used ({listing})")


def load_checkpoint(cfg, dd: Dist, model, opt, sched, check: Callable[[str, dict], None],
                    warn: Callable[[str], None], extras: Optional[dict] = None) -> tuple[int, Optional[str]]:
    """Restore the newest sharded checkpoint that verifies (see save_checkpoint for ``model`` and
    ``extras``); returns (its step, its path), (0, None) when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = choose(cfg, dd, warn)
    if path is None:
        return 0, None
    try:
        state = read_checkpoint(os.path.join(path, STATE))
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {path}/{STATE}: {e}") from None
    check(path, state)
    extras = extras or {}
    check_compatible(path, state, dd, set(extras))
    model_sd, optim_sd = get_state_dict(model, opt)
    shards = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(shards, storage_reader=dcp.FileSystemReader(path))
    except _failed_call() as e:
        raise CheckpointError(f"--resume: the shards of {path} cannot be loaded: {_dcp_failure(e)}") from None
    set_state_dict(model, opt, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    for k, obj in extras.items():
        if not is_sharded(obj):
            obj.load_state_dict(state["extras"][k])
    restore_run_state(state, dd, sched)
    return int(state["step"]), path
