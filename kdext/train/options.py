"""Options as dataclass fields: each field carries its flag, help, choices and range.

The dataclasses in :mod:`kdext.train.config` are the single source of every option of the
``kdext`` commands. This module turns them into what the rest needs:

* :func:`option` declares a field (``field(default=..., metadata={"help": ..., ...})``, the TRL
  style) with its help text, its value range and choices, its argument group, and its flag when
  the flag is not ``--`` + the field name with dashes;
* :func:`check_fields` checks every field against its type, choices and range, nested option
  dataclasses included, with messages that name the flag;
* :func:`add_arguments` / :func:`from_namespace` generate the argparse options of a command
  and read the parsed values back into the dataclass;
* :func:`markdown_table` writes the option table of docs/TRAINER.md;
* :func:`resume_policy` says what ``--resume`` does when the option differs from the checkpoint's.

Boolean fields become switches: ``--name`` (``store_true``) when the default is False,
``--no-name`` (``store_false``) when it is True.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Optional, Union

INT64_MAX = 2**63 - 1

# What --resume does with an option whose value differs from the checkpoint's (``option(resume=...)``):
REFUSE = "refuse"  # it changes the run's meaning: the resume is refused, naming the flag (the default)
APPLY = "apply"  # run control (cadences, logging, where and how to run): the new value is used and logged
INPUT = "input"  # a file or folder: refused if its content differs; the same content under a new path is fine
# ... or a function (checkpoint step, old value, new value, new configuration) -> None when the
# change may be applied, else the reason it is refused.


class ConfigError(ValueError):
    """A bad option value or combination of values; the message starts with the flag."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: ``lo`` .. ``hi`` (None: unbounded), ends closed unless
    ``lo_open`` / ``hi_open``. Infinities and NaN are never allowed."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def __post_init__(self):
        if self.lo is None and self.hi is None:
            raise ValueError("Range: give lo or hi (or both)")

    def __contains__(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(x: float) -> str:
    return "2**63 - 1" if x == INT64_MAX else f"{x:g}" if isinstance(x, float) else str(x)


def option(
    default: Any = MISSING,
    *,
    help: str,
    range: Optional[Range] = None,
    choices: Union[tuple, Callable[[], tuple], None] = None,
    flag: Optional[str] = None,
    group: Optional[str] = None,
    cli: bool = True,
    default_factory: Any = MISSING,
    resume: Union[str, Callable] = REFUSE,
) -> Any:
    """A dataclass field with its option metadata.

    ``choices`` may be a function returning them (for choices defined in a module that imports
    this one); ``cli=False`` keeps the field off the command line (set by the code). ``resume``
    says whether the option may differ from the checkpoint's on --resume (REFUSE, APPLY, INPUT or
    a function; see above): unless a field says otherwise, a change is refused, so an option
    added later is safe by default.
    """
    metadata = {"help": help, "range": range, "choices": choices, "flag": flag, "group": group, "cli": cli,
                "resume": resume}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def resume_policy(f: dataclasses.Field) -> Union[str, Callable]:
    """REFUSE, APPLY, INPUT or a rule function (see option()); REFUSE unless the field says otherwise."""
    return f.metadata.get("resume", REFUSE)


def flag_of(f: dataclasses.Field, t: Optional[type] = None) -> str:
    """The option's flag: the metadata's, else ``--`` + the name with dashes; a boolean field
    whose default is True is switched off by ``--no-<name>``."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if t is bool and f.default is True else f"--{name}"


def choices_of(f: dataclasses.Field) -> Optional[tuple]:
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else c


def _base_type(t):
    """int for int and Optional[int], and so on; None for Optional[None]."""
    if typing.get_origin(t) is Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return t


def _optional(t) -> bool:
    return typing.get_origin(t) is Union and type(None) in typing.get_args(t)


def option_fields(cls) -> list[tuple[dataclasses.Field, type, bool]]:
    """(field, base type, optional) of every field of ``cls``, nested dataclasses included
    (depth first, in declaration order)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = _base_type(hints[f.name])
        if dataclasses.is_dataclass(t):
            out += option_fields(t)
        else:
            out.append((f, t, _optional(hints[f.name])))
    return out


# ---------------------------------------------------------------------------------------------
# Validation


def _has_type(value, t: type) -> bool:
    if t is float:  # an int is a fine float; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def check_value(f: dataclasses.Field, t: type, optional: bool, value) -> None:
    """One field's value against its type, choices and range (ConfigError naming the flag)."""
    flag = flag_of(f, t)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{flag} is required")
    if not _has_type(value, t):
        kinds = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}
        raise ConfigError(f"{flag} must be {kinds.get(t, t.__name__)}; got {value!r} ({type(value).__name__})")
    choices = choices_of(f)
    if choices is not None and value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")
    rng = f.metadata.get("range")
    if rng is not None and value not in rng:
        kind = "an integer" if t is int else "a number" if None not in (rng.lo, rng.hi) else "a finite number"
        raise ConfigError(f"{flag} must be {kind} {rng}; got {value!r}")


def check_fields(obj) -> None:
    """Every field of the dataclass instance ``obj`` (nested ones too) against its metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        t = _base_type(hints[f.name])
        if dataclasses.is_dataclass(t):
            check_fields(value)
        else:
            check_value(f, t, _optional(hints[f.name]), value)


# ---------------------------------------------------------------------------------------------
# argparse


def _shown(default) -> str:
    """A default as the help shows it: strings quoted when they hold spaces or escapes."""
    if isinstance(default, str):
        return default if default.isidentifier() else repr(default)
    return _num(default)


def _help(f: dataclasses.Field, t: type) -> str:
    text = f.metadata["help"]
    if t is not bool and f.default is not MISSING and f.default is not None:
        text += f" (default: {_shown(f.default)})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_arguments(parser: argparse.ArgumentParser, cls, groups: Optional[dict] = None, prefix: str = "") -> None:
    """Add an option for every command-line field of ``cls`` (nested dataclasses included) to
    ``parser``, in the argument group its metadata names (created on first use)."""
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = _base_type(hints[f.name])
        if dataclasses.is_dataclass(t):
            add_arguments(parser, t, groups, prefix=f"{prefix}{f.name}.")
            continue
        if not f.metadata.get("cli", True):
            continue
        title = f.metadata.get("group")
        target = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        kw: dict = {"dest": prefix + f.name, "help": _help(f, t)}
        if t is bool:
            kw["action"] = "store_false" if f.default else "store_true"
            target.add_argument(flag_of(f, t), **kw)
            continue
        kw["type"] = t
        if f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if choices_of(f) is not None:
            kw["choices"] = choices_of(f)
        if t in (int, float):
            kw["metavar"] = "N" if t is int else "X"
        target.add_argument(flag_of(f), **kw)


def from_namespace(cls, ns: argparse.Namespace, prefix: str = ""):
    """An instance of ``cls`` from parsed arguments (fields off the command line keep their defaults)."""
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        t = _base_type(hints[f.name])
        if dataclasses.is_dataclass(t):
            kw[f.name] = from_namespace(t, ns, prefix=f"{prefix}{f.name}.")
        elif f.metadata.get("cli", True):
            kw[f.name] = values[prefix + f.name]
    return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Documentation


def markdown_table(cls) -> str:
    """The option table of one command: flag, default, allowed values, help."""
    rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    for f, t, _ in option_fields(cls):
        if not f.metadata.get("cli", True):
            continue
        if f.default is MISSING and f.default_factory is MISSING:
            default = "required"
        elif t is bool:
            default = ""  # a switch
        else:
            default = "none" if f.default is None else f"`{_shown(f.default)}`"
        allowed = ""
        if choices_of(f) is not None:
            allowed = ", ".join(f"`{c}`" for c in choices_of(f))
        elif f.metadata.get("range") is not None:
            allowed = str(f.metadata["range"])
        text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{flag_of(f, t)}` | {default} | {allowed} | {text} |")
    return "\n".join(rows)


def resume_markdown(cls) -> str:
    """What --resume does with each option of ``cls`` that differs from the checkpoint's."""
    apply, inputs, rules = [], [], []
    for f, t, _ in option_fields(cls):
        if not f.metadata.get("cli", True) or f.name == "resume":  # (--resume itself)
            continue
        policy, flag = resume_policy(f), f"`{flag_of(f, t)}`"
        if policy == APPLY:
            apply.append(flag)
        elif policy == INPUT:
            inputs.append(flag)
        elif callable(policy):
            rules.append(f"{flag} {' '.join(policy.__doc__.split())}")
    return (
        "On `--resume`, an option that differs from the checkpoint's is refused (exit code 2, naming the "
        "flag), except: " + ", ".join(apply) + " may change (the new value is used, and a line says so); "
        + ", ".join(inputs) + " may name another path with the same content (a different content is "
        "refused, also under the same path); " + "; ".join(rules) + "."
    )
