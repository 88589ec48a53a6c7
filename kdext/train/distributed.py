"""Data-parallel plumbing: joining torchrun's process group, the device mesh FSDP shards over, and
the collectives the trainer uses.

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
from typing import Callable, Optional, TypeVar

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
    # --fsdp: the DeviceMesh the models are sharded over (None: not sharded). One dimension, "dp",
    # over every process today; a tensor-parallel dimension ("dp", "tp") is added here, and FSDP
    # then shards over mesh["dp"] (sharding.py takes the mesh it is given).
    mesh: Optional[object] = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Whether the models are FSDP-sharded (--fsdp): every process then runs every forward."""
        return self.mesh is not None

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

    def any_of(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag OR-ed over the processes (one small collective)."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.cpu().tolist()]

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


    def on_every(self, fn: Callable[[], T], what: str) -> list[T]:
        """``fn()`` on every process; every process gets the list of results in rank order, or
        raises when any failed: that process its own exception, the others PeerFailed. (A failure
        on one process then never leaves the others waiting in the next collective.)"""
        if not self.enabled:
            return [fn()]
        err = None
        try:
            mine = ("ok", fn())
        except BaseException as e:  # every process must hear of it, whatever it is
            err, mine = e, ("failed", f"{e}")
        parts = self.gather_objects(mine)
        if err is not None:
            raise err
        for rank, (status, payload) in enumerate(parts):
            if status != "ok":
                raise PeerFailed(f"process {rank} failed {what}: {payload}")
        return [payload for _, payload in parts]


def use_cuda(device_arg: str) -> bool:
    """Whether ``--device`` (auto, cpu or cuda) means CUDA here; cuda without one is refused."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())


def setup_distributed(device_arg: str, timeout_s: float = 1800.0, fsdp: bool = False) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one (collectives time out after
    ``timeout_s`` seconds); pick the device. With ``fsdp``, build the device mesh; a single
    process then gets a group of its own (an in-memory store), so one code path serves 1 to N
    processes."""
    cuda = use_cuda(device_arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not fsdp:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if cuda else "gloo"
        if world == 1:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    mesh = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return Dist(rank, world, local, mesh), device
