"""Data-parallel plumbing: joining torchrun's process group, and the collectives the trainer uses.

A process that dies or hangs must not leave the others waiting forever: the process group is
created with ``--collective-timeout`` (every collective of a run, and joining it, gives up after
that long), and work done by the main process alone (checkpoints, evaluation, the final model)
runs through :meth:`Dist.on_main`, which tells every process whether it failed.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .options import ConfigError

T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Another process of the run failed; the message says what it was doing and why."""


def collective_failure(e: BaseException):
    """The one-line reason when ``e`` is a collective that failed (a peer died, or did not answer
    within the timeout), else None. NCCL raises DistError; Gloo a RuntimeError from its transport."""
    text = (str(e).strip().splitlines() or [""])[0]
    nccl = dist.is_available() and isinstance(e, dist.DistError)
    gloo = isinstance(e, RuntimeError) and "gloo" in text.lower()
    if not (nccl or gloo):
        return None
    return re.sub(r"^\[[^\]]*\]\s*", "", text)  # drop "[.../gloo/transport/tcp/pair.cc:561] "


@dataclass
class Dist:
    """This process's place in the run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each value summed over the processes, in one collective (float64; exact for counts).

        Every process must pass the same keys (the trainer's come from the method and the
        configuration, which all processes share); ``device`` is where the backend reduces
        (CUDA for NCCL).
        """
        if not self.enabled:
            return {k: float(v) for k, v in values.items()}
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.cpu().tolist()))

    def gather_objects(self, obj) -> list:
        """``obj`` from every process, in rank order (picklable objects; tensors on the CPU)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_sum_tensors_(self, tensors: list) -> None:
        """Sum each tensor over the processes, in place (one flat collective)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for t in tensors:
            t.copy_(flat[i : i + t.numel()].view_as(t))
            i += t.numel()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on the main process; every process gets its (small, picklable) result, or
        raises when it failed: the main process its own exception, the others PeerFailed."""
        if not self.enabled:
            return fn()
        box, err = [None], None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # every process must hear of it, whatever it is
                err = e
                box[0] = ("failed", f"{e}")
        dist.broadcast_object_list(box, src=0)
        if err is not None:
            raise err
        status, payload = box[0]
        if status != "ok":
            raise PeerFailed(f"the main process failed {what}: {payload}")
        return payload


def use_cuda(device_arg: str) -> bool:
    """Whether ``--device`` (auto, cpu or cuda) means CUDA here; cuda without one is refused."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())


def setup_distributed(device_arg: str, timeout_s: float = 1800.0) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one (collectives time out after
    ``timeout_s`` seconds); pick the device."""
    cuda = use_cuda(device_arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if cuda:
        torch.cuda.set_device(local)
        return Dist(rank, world, local), torch.device("cuda", local)
    return Dist(rank, world, local), torch.device("cpu")
