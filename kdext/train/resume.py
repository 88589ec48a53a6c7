"""What ``--resume`` checks besides the checkpoint itself: that it continues the same run.

Every checkpoint records every setting of the run (:func:`settings_record`: the whole
:class:`~kdext.train.config.TrainConfig`, the method's options with their defaults filled in)
and a fingerprint of each input (:func:`input_fingerprints`: the data file's sha256, and a
digest of each model folder). On resume each option is compared by its ``resume`` policy
(config.py, ``option(resume=...)``):

* REFUSE (every option unless it says otherwise): a different value stops the resume with a
  usage error naming the flag; the run's meaning (its data, models, losses, optimisation, random
  streams) cannot change half way;
* APPLY (run control): the new value is used and a line says so;
* INPUT (``--student``, ``--teacher``, ``--data``): refused when the content differs, even under
  the same path; the same content under another path (a moved run) is fine;
* a rule function (``--max-steps``): refused unless the rule allows the change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import typing

from .options import APPLY, INPUT, REFUSE, ConfigError, _base_type, flag_of, resume_policy

_SMALL_FILE = 16 << 20  # files up to this size are hashed whole; larger ones (weights) sampled
_SAMPLE = 1 << 20  # bytes hashed at each end of a large file


def settings_record(cfg, method_cfg) -> dict:
    """Every setting of the run, as plain values (``method_cfg``: the resolved method options)."""
    return dataclasses.asdict(dataclasses.replace(cfg, method_cfg=method_cfg))


def _sha256_file(path: str, sample: bool) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if not sample or size <= _SMALL_FILE:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:  # a retrained or another model changes these bytes too; reading GBs would not pay
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def fingerprint(path: str) -> str:
    """A file: the sha256 of its bytes. A folder (a model): a sha256 over each file's name and
    size, and of its bytes (files over 16 MiB, the weights: their first and last MiB)."""
    if os.path.isfile(path):
        return "sha256:" + _sha256_file(path, sample=False)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(full):
            continue
        h.update(f"{name}\0{os.path.getsize(full)}\0{_sha256_file(full, sample=True)}\0".encode())
    return "folder-sha256:" + h.hexdigest()


def input_fingerprints(cfg, needs_teacher: bool) -> dict:
    """field name -> {"path", "fingerprint"} for every input of the run."""
    names = ["student", "data"] + (["teacher"] if needs_teacher else [])
    out = {n: {"path": os.path.abspath(getattr(cfg, n)), "fingerprint": fingerprint(getattr(cfg, n))}
           for n in names}
    cache = getattr(cfg, "teacher_cache", None)
    manifest = os.path.join(cache, "manifest.json") if cache else None
    if manifest and os.path.isfile(manifest):  # (it holds the sha256 of every shard; a cache without one is refused)
        out["teacher_cache"] = {"path": os.path.abspath(cache), "fingerprint": fingerprint(manifest)}
    return out


def _walk(cls, saved: dict, new, prefix=""):
    """(field, base type, saved value, new value) of every option, nested options included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = _base_type(hints[f.name])
        value = getattr(new, f.name)
        if dataclasses.is_dataclass(t):
            yield from _walk(t, saved.get(f.name, {}), value)
            continue
        if f.name in saved:
            old = saved[f.name]
        else:  # an option added after the checkpoint was written: it ran with the default
            old = f.default if f.default is not dataclasses.MISSING else None
        yield f, t, old, value


def _show(f, t, value) -> str:
    if t is bool:  # a switch: --name or --no-name, given when the value is not the default
        return "given" if value != f.default else "not given"
    return "none" if value is None else repr(value)


def _input_change(name: str, flag: str, saved_inputs: dict, inputs: dict):
    """(refusal reason or None, note or None) for an INPUT option."""
    old, new = saved_inputs.get(name), inputs.get(name)
    if old is None or new is None:
        return None, None  # not an input of this method
    if old["fingerprint"] != new["fingerprint"]:
        where = "" if old["path"] == new["path"] else f" (the checkpoint's was {old['path']})"
        return f"{new['path']} is not the content the run was started with{where}", None
    if old["path"] != new["path"]:
        return None, f"{flag} now names {new['path']} (was {old['path']}; same content)"
    return None, None


def check_resume(ckpt: str, step: int, saved_settings: dict, saved_inputs: dict, cfg, method_cfg,
                 inputs: dict) -> list[str]:
    """Refuse (ConfigError naming the flags) a resume whose settings would change the run;
    returns a line for each change that is applied."""
    new = dataclasses.replace(cfg, method_cfg=method_cfg)
    refused, notes = [], []
    for f, t, old, value in _walk(type(new), saved_settings, new):
        if not f.metadata.get("cli", True) or f.name == "resume":
            continue  # set by the code from other options (the method's seed is --seed's), or --resume itself
        policy = resume_policy(f)
        flag = flag_of(f, t)
        if policy == INPUT:
            if f.name == "teacher_cache" and (old is None) != (value is None):  # a cache for a live teacher
                refused.append((flag, f"{_show(f, t, old)} in the checkpoint, {_show(f, t, value)} now: the cached "
                                      "and the live teacher give other losses"))
                continue
            reason, note = _input_change(f.name, flag, saved_inputs, inputs)
            if reason:
                refused.append((flag, reason))
            if note:
                notes.append(note)
            continue
        if old == value:
            continue
        change = f"{_show(f, t, old)} in the checkpoint, {_show(f, t, value)} now"
        if policy == APPLY:
            notes.append(f"{flag}: {_show(f, t, value)} (was {_show(f, t, old)})")
            continue
        reason = "it changes what the run computes" if policy == REFUSE else policy(step, old, value, new)
        if reason:
            refused.append((flag, f"{change}: {reason}"))
        else:
            notes.append(f"{flag}: {_show(f, t, value)} (was {_show(f, t, old)})")
    if refused:
        flags = list(dict.fromkeys(flag for flag, _ in refused))
        details = "; ".join(f"{flag}: {reason}" for flag, reason in refused)
        raise ConfigError(
            f"{', '.join(flags)} {'differs' if len(flags) == 1 else 'differ'} from the checkpoint {ckpt} "
            f"({details}). Resume with the run's own settings, or start a new run in another --out"
        )
    return notes
