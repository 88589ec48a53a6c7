"""Run several ``kdext distill`` command lines one after another in this process (under torchrun:
one launch, many runs, so the DDP tests pay the interpreter and process-group start-up once).

    torchrun --nproc_per_node 2 tests/train_fixtures/ddp_runs.py RUNS.json

RUNS.json: a list of ``kdext distill`` (or ``kdext teacher-cache``) argument lists. Each is
parsed and validated as the CLI does and run with ``kdext.train.trainer.train`` (or
``kdext.train.teacher_cache.capture``); the process group stays up for the next one, and the
process leaves without tearing it down (as ``cli.entry`` does). Any error ends the launch.
"""

import json
import sys

import torch.distributed as dist

from kdext.train import cli
from kdext.train.teacher_cache import capture
from kdext.train.trainer import train


def main(path: str) -> int:
    with open(path) as f:
        runs = json.load(f)
    for args in runs:
        cfg = cli.config_from_args(cli.parser().parse_args(args))
        cfg.validate()
        (capture if args[0] == "teacher-cache" else train)(cfg)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    if dist.is_initialized():
        dist.barrier()  # every run ended with one already; this one covers a list of captures too
    cli.leave(code)  # as the kdext command leaves (without tearing the process group down)
