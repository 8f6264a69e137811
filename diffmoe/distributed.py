"""Process-group set-up for ``torchrun``; everything degrades to a single process without it."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# What a rank sees when another rank died (its connection closes) or stopped answering (the
# collective times out): gloo and NCCL raise plain RuntimeErrors with these in the message.
COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed",
                              "timed out", "broken pipe")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1):
    NCCL on GPU, gloo on CPU. A collective that waits longer than ``timeout_s`` for another rank
    (one that died or hangs) fails instead of blocking forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d initialised (%s)", rank, world, backend)
    return DistInfo(rank, world, local)


def teardown(wait_for_others: bool = True) -> None:
    """Destroy the process group, after a barrier when ``wait_for_others`` (a normal end: a rank
    destroying the gloo group while another still has work queued on it can leave that rank
    stuck). After a failure, e.g. a dead rank, there is no barrier to wait on."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_others and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank died or hung."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in COLLECTIVE_FAILURE_MARKERS)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def any_rank(flag: torch.Tensor) -> bool:
    """True if ``flag`` (a 0-d bool tensor) is true on any rank, so all ranks decide alike."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
