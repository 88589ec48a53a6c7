"""The ``kdext`` command line: ``kdext distill``, ``kdext eval``, ``kdext demo``, ``kdext teacher-cache``.

Run ``kdext distill --help`` for every option. Under ``torchrun`` the distill command runs data
parallel (DDP): ``torchrun --nproc_per_node 2 -m kdext.train.cli distill ...``; with ``--fsdp``
it shards the models over the processes instead (FSDP2, sharding.py). ``kdext teacher-cache``
under torchrun captures disjoint shards in each process (teacher_cache.py).

The options are generated from the dataclasses in config.py. Exit codes:

* 0: done;
* 1: a runtime error the user can fix (a data or model file that cannot be used, a checkpoint
  that cannot be read, a full disk, out of GPU memory, another process of a data-parallel run
  that died or stopped answering), or a bug (an unexpected exception: reported in one line,
  with its traceback under ``--debug`` or ``KDEXT_DEBUG=1``);
* 2: a usage error (a bad flag value or combination, also against the checkpoint being resumed);
* 3: training diverged (a NaN/inf loss or gradient; see the message for the last checkpoint).

Errors print ``kdext <command>: error: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .config import COMMANDS  # noqa: E402
from .options import ConfigError, add_arguments, from_namespace  # noqa: E402

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

_COMMANDS = {  # name -> (one-line help, description)
    "distill": ("distill a teacher into a student",
                "Distill --teacher into --student on --data with --method; writes OUT/final, "
                "OUT/metrics.jsonl and OUT/checkpoints/."),
    "eval": ("score a model: Rouge-L, exact match, calibration",
             "Generate a response per prompt of --data with --model and score it; writes --out (JSON)."),
    "demo": ("the self-contained demo: teacher, 7 methods, report",
             "Build a synthetic task, train a teacher and distill a student with every method; "
             "writes a report under --out."),
    "teacher-cache": ("capture a teacher's top-k log-probs for kdext distill --teacher-cache",
                      "Run --teacher over every example of --data as kdext distill would (template, tokenisation, "
                      "truncation) and store each response position's top --k ids and log-probs in --out "
                      "(safetensors shards and manifest.json)."),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error: the message and where to find the options, exit code 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n{self.prog}: see '{self.prog} --help'\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdext", description="Distill language models with kdext's fused ops.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also with KDEXT_DEBUG=1)")
    for name, cls in COMMANDS.items():
        help_, description = _COMMANDS[name]
        add_arguments(sub.add_parser(name, help=help_, description=description, parents=[common]), cls)
    return p


def config_from_args(args: argparse.Namespace):
    """The command's configuration (TrainConfig, EvalConfig or DemoConfig) from parsed arguments."""
    return from_namespace(COMMANDS[args.command], args)


def _run(command: str, cfg) -> None:
    cfg.validate()  # every flag checked before anything is loaded
    if command == "distill":
        from .trainer import train

        summary = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "last"}, default=str))
    elif command == "eval":
        from dataclasses import asdict

        from .evaluate import evaluate_folder

        kw = asdict(cfg)
        res = evaluate_folder(kw.pop("model"), kw.pop("data"), kw.pop("out"), **kw)
        print(json.dumps({k: res[k] for k in ("rougeL", "exact_match", "ece", "n")}))
    elif command == "demo":
        from .demo import run_demo

        run_demo(cfg.out, device=cfg.device, seed=cfg.seed, quick=cfg.quick, workers=cfg.workers)
    elif command == "teacher-cache":
        from .teacher_cache import capture

        summary = capture(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))


def _user_errors() -> tuple:
    """Exceptions that mean "fix the input or the machine", not "fix kdext" (exit code 1)."""
    import torch

    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import PeerFailed
    from .models import ModelError

    return (DataError, ModelError, CheckpointError, PeerFailed, OSError, torch.cuda.OutOfMemoryError)


# Set when a collective failed (a process of the run died or hung): the process group is then
# broken, and tearing it down can abort the process (a Gloo transport thread, seen once in many
# runs: "terminate called without an active exception") or wait on the dead peer. entry() then
# leaves without any teardown, so the exit code stays the one the message goes with.
_group_broken = False


def main(argv=None, teardown: bool = True) -> int:
    """Runs one kdext command; returns its exit code. ``teardown``: destroy the process group a
    distributed run set up (in-process callers); the ``kdext`` command itself leaves without it
    (entry())."""
    global _group_broken
    _group_broken = False
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    name = f"kdext {args.command}"
    debug = args.debug or os.environ.get("KDEXT_DEBUG", "") not in ("", "0")

    def fail(code: int, *lines: str) -> int:
        if debug:
            traceback.print_exc()
        for line in lines:
            print(f"{name}: {line}", file=sys.stderr)
        return code

    from .step import TrainingDiverged

    try:
        _run(args.command, config_from_args(args))
    except ConfigError as e:
        return fail(EXIT_USAGE, f"error: {e}")
    except TrainingDiverged as e:
        return fail(EXIT_DIVERGED, f"training stopped: {e}")
    except _user_errors() as e:
        return fail(EXIT_ERROR, f"error: {e}")
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "interrupted")
    except Exception as e:
        from .distributed import collective_failure

        why = collective_failure(e)
        if why is not None:
            _group_broken = True
            return fail(EXIT_ERROR, "error: another process of the run died or did not answer within "
                                    f"--collective-timeout ({why})")
        return fail(EXIT_ERROR, f"internal error: {type(e).__name__}: {e}",
                    "this is a bug in kdext; rerun with --debug (or KDEXT_DEBUG=1) for the traceback")
    finally:
        import torch.distributed as dist

        if teardown and dist.is_available() and dist.is_initialized() and not _group_broken:
            dist.destroy_process_group()
    return 0


def entry() -> None:
    """The ``kdext`` command (and ``python -m kdext.train.cli``): main(), then exit with its code."""
    leave(main(teardown=False))


def leave(code: int) -> None:
    """Ends this process with ``code``. A process of a distributed run (its group still up, or
    broken: main(teardown=False) leaves it either way) exits without tearing Gloo / NCCL down:
    every peer is past the run's last barrier (or the group is broken), and a teardown that races
    a peer's own can abort this process from a native thread ("terminate called without an
    active exception", SIGABRT; seen under load at the end of successful runs). Exiting closes the
    connections; the output streams are flushed first, and nothing else is pending."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
