"""Run several ``kdext distill`` command lines one after another in this process (under torchrun:
one launch, many runs, so the DDP tests pay the interpreter and process-group start-up once).

    torchrun --nproc_per_node 2 tests/train_fixtures/ddp_runs.py RUNS.json

RUNS.json: a list of ``kdext distill`` (or ``kdext teacher-cache``) argument lists. Each is
parsed and validated as the CLI does and run with ``kdext.train.trainer.train`` (or
``kdext.train.teacher_cache.capture``); the process group (which ``cli.main`` would destroy
after its run) stays up for the next one. Any error ends the launch.
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
    try:
        for args in runs:
            cfg = cli.config_from_args(cli.parser().parse_args(args))
            cfg.validate()
            (capture if args[0] == "teacher-cache" else train)(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
