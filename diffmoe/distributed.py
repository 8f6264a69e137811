"""Process-group set-up and teardown for ``torchrun``; everything degrades to a single process
without it.

A distributed run must always end, whatever its peers or its launcher do. Three things see to it:

* **Teardown** (:func:`teardown`). After a normal end the ranks meet at an *exit barrier* held on
  the rendezvous store, not on the process group: each rank announces the step it ended at and
  waits at most ``timeout_s`` for the others. A peer that does not arrive makes this rank stop
  with a :class:`~diffmoe.errors.TrainingError` naming the missing ranks and the step. Then the
  process group is destroyed, with a hard deadline (below).

  The order matters because of how gloo ends. ``~ProcessGroupGloo`` joins gloo's worker threads;
  a worker that has just finished a collective still holds its work item, and destroying it
  decrements Python tensors (those of ``all_gather_object``, for instance), which needs the GIL.
  If the last reference to the group is dropped from a destructor that holds the GIL — the DDP
  ``Reducer``, when the DDP wrapper is freed after ``destroy_process_group`` — the main thread
  joins a worker that waits for the GIL the main thread holds: a deadlock, at random, since the
  worker must be slow to finish (``benchmarks/teardown_stress.py`` reproduces it). The fix has two
  halves. The caller frees what holds the group from C++ (the DDP wrapper; see
  ``Trainer.close``) while ``torch.distributed`` still holds its own Python references, so that
  the last reference is one of those, whose destructor releases the GIL; :func:`teardown`
  collects reference cycles first and clears the local variables of the frames of an exception
  that is propagating (they can hold the DDP wrapper). And the exit barrier waits with the GIL
  released, so the workers finish their last items before the group goes.

* **A deadline** on the destruction (``faulthandler.dump_traceback_later``: a C thread that needs
  no GIL): if it has not finished within ``timeout_s``, every thread's stack is printed and the
  process exits with status 1, instead of hanging.

* **A launcher watch**. A rank whose launcher dies without passing a signal on (``torchrun``
  killed with ``SIGKILL``, a scheduler killing the job step) is re-parented; a daemon thread
  notices within :data:`LAUNCHER_POLL_S`, prints one line, sends the main thread ``SIGTERM``
  (which the trainer turns into a clean stop) and arms the same deadline, so the rank ends even
  if it is stuck in a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .errors import DiffMoEError, TrainingError

log = logging.getLogger(__name__)

# What a rank sees when another rank died (its connection closes) or stopped answering (the
# collective times out): gloo and NCCL raise plain RuntimeErrors with these in the message.
COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed",
                              "timed out", "broken pipe")
LAUNCHER_POLL_S = 1.0  # how often a rank checks that its launcher is still its parent
LAUNCHER_GONE_GRACE_S = 30.0  # after the launcher died: time to stop cleanly before a hard exit
# How long rank 0 waits, after the exit barrier, for the others to read its result before it
# leaves (outside torchrun rank 0 hosts the store).
EXIT_DEPARTURE_S = 5.0
EXIT_KEY_PREFIX = "diffmoe/exit"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cuda_index: int = 0  # this rank's GPU among the ones visible to it (see cuda_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class _Session:
    """What :func:`setup` started and :func:`teardown` ends, for this process."""

    def __init__(self) -> None:
        self.timeout_s = 600.0
        self.teardowns = 0  # exit barriers held so far, to keep their store keys apart
        self.watch: Optional[_LauncherWatch] = None
        self.launcher_gone = False  # its deadline is armed and must stay armed


_session = _Session()


def setup(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1):
    NCCL on GPU, gloo on CPU. A collective that waits longer than ``timeout_s`` for another rank
    (one that died or hangs) fails instead of blocking forever; the same bound applies to the
    exit barrier and to destroying the group in :func:`teardown`. Starts the launcher watch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    _session.timeout_s = timeout_s
    if _session.watch is None:  # before the rendezvous, which can wait for the others
        _session.watch = _LauncherWatch(rank)
        _session.watch.start()
    index = cuda_index(local, torch.cuda.device_count()) if device_type == "cuda" else 0
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(index)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d initialised (%s)", rank, world, backend)
    return DistInfo(rank, world, local, index)


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of the rank with ``local_rank`` among the ``visible`` ones: its own index when the
    launcher shows every GPU of the node to every rank, 0 when it shows each rank only its own
    (SLURM's ``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per rank)."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise DiffMoEError(f"local rank {local_rank} has no GPU: {visible} are visible to it; start at "
                       f"most {visible} processes per node, or give each its own GPU")


def teardown(wait_for_others: bool = True, step: Optional[int] = None) -> None:
    """End this process's part of a distributed run (nothing to do without a process group).

    With ``wait_for_others`` (a normal end) first meet the other ranks at the exit barrier; a
    rank that does not arrive within the timeout makes this one raise :class:`TrainingError`
    naming it and ``step``. After a failure (a dead rank) there is no one to wait for. Either
    way the group is then destroyed under a deadline. The caller must have freed the objects
    that hold the group from C++ (DDP wrappers) before: see the module docstring."""
    try:
        if dist.is_available() and dist.is_initialized():
            with _sigterm_deferred() as received:
                try:
                    if wait_for_others and dist.get_world_size() > 1:
                        _exit_barrier(step)
                finally:
                    destroy_group()
            if received and sys.exc_info()[1] is None:  # else that error says why it ends
                after = f" after step {step}" if step is not None else ""
                raise TrainingError(
                    f"stopped by SIGTERM while ending the run{after} (the job was cancelled, or "
                    f"another rank failed); all its work was done and written before")
    finally:
        if _session.watch is not None:
            _session.watch.stop()
            _session.watch = None


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[list[int]]:
    """Within it SIGTERM (torchrun's, to the surviving ranks once one failed) is recorded in the
    yielded list instead of acted on: an interrupted teardown would leave the group half
    destroyed, and the default action would end the rank before it printed why. The deadline
    of :func:`destroy_group` bounds the wait."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _exit_barrier(step: Optional[int]) -> None:
    """Wait, with the GIL released, until every rank has reached the end of the run."""
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"{EXIT_KEY_PREFIX}/{restart}/{_session.teardowns}"
    _session.teardowns += 1
    store.set(f"{prefix}/rank{rank}", str(step))
    if store.add(f"{prefix}/arrived", 1) == world:
        store.set(f"{prefix}/all", "1")
    timeout = datetime.timedelta(seconds=_session.timeout_s)
    try:
        store.wait([f"{prefix}/all"], timeout)
    except (RuntimeError, dist.DistError) as exc:  # the store's timeout (DistStoreError)
        missing = [r for r in range(world) if not store.check([f"{prefix}/rank{r}"])]
        if not missing:  # they all arrived as the wait timed out
            return
        finished = (f"finished at step {step}; they died or hung (see their logs); the "
                    f"checkpoint of step {step} was written before, so nothing is lost"
                    if step is not None else "finished; they died or hung (see their logs)")
        raise TrainingError(
            f"rank {rank}: rank(s) {', '.join(map(str, missing))} did not reach the end of the "
            f"run within train.dist_timeout_s={_session.timeout_s:g} s after this rank "
            f"{finished}") from exc
    if rank == 0:  # outside torchrun rank 0 hosts the store: let the others read it first
        store.add(f"{prefix}/left", 1)
        deadline = time.monotonic() + EXIT_DEPARTURE_S
        while store.add(f"{prefix}/left", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        store.add(f"{prefix}/left", 1)


def destroy_group(group: Optional[dist.ProcessGroup] = None) -> None:
    """Destroy ``group`` (the default group and all others if None), after freeing what else
    may still hold it from C++ (reference cycles; the frames of a propagating exception, which
    can hold a DDP wrapper), under the deadline. Free your own DDP wrappers before calling it."""
    exc, seen = sys.exc_info()[1], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()
    _arm_deadline(_session.timeout_s)
    try:
        dist.destroy_process_group(group)
    finally:
        _disarm_deadline()


def _arm_deadline(seconds: float) -> None:
    """In ``seconds``, print every thread's stack and exit with status 1 (needs no GIL)."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def _disarm_deadline() -> None:
    if not _session.launcher_gone:  # that deadline must stand: the rank is to end
        faulthandler.cancel_dump_traceback_later()


class _LauncherWatch(threading.Thread):
    """Ends this rank when its launcher is gone (this process was re-parented)."""

    def __init__(self, rank: int):
        super().__init__(name="diffmoe-launcher-watch", daemon=True)
        self.rank = rank
        self.parent = os.getppid()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LAUNCHER_POLL_S):
            if os.getppid() != self.parent:
                self.launcher_gone()
                return

    def launcher_gone(self) -> None:
        _session.launcher_gone = True
        sys.stderr.write(
            f"error: rank {self.rank}: its launcher (pid {self.parent}) is gone without stopping "
            f"it (killed, or the job step was cancelled); this rank stops now and exits within "
            f"{LAUNCHER_GONE_GRACE_S:g} s\n")
        sys.stderr.flush()
        _arm_deadline(LAUNCHER_GONE_GRACE_S)
        # To the main thread, where Python runs signal handlers: a process-directed signal can
        # land on another thread and leave a main thread blocked in a system call (a sleep, a
        # read) unwoken until that call returns.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def stop(self) -> None:
        self.stopped.set()
        if self is not threading.current_thread():
            self.join(timeout=2 * LAUNCHER_POLL_S)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank died or hung."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in COLLECTIVE_FAILURE_MARKERS)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_device() -> torch.device:
    """The device the default group's collectives take tensors on: the current CUDA device under
    NCCL (which has no CPU transport), the CPU otherwise."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity without a process group), on ``values``' device; the reduction
    itself runs on :func:`group_device`."""
    if _in_group():
        reduced = values.to(group_device(), copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return (reduced / dist.get_world_size()).to(values.device)
    return values


def any_rank(flag: torch.Tensor) -> bool:
    """True if ``flag`` (a 0-d bool tensor) is true on any rank, so all ranks decide alike."""
    if _in_group():
        flag = flag.to(group_device(), torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def on_every_rank(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a 0-d bool tensor) and-ed over ranks, as a tensor on ``flag``'s device: the
    ranks agree without the host reading the result."""
    if _in_group():
        agreed = flag.to(group_device(), torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return agreed.to(flag.device).bool()
    return flag


def gather_objects(obj) -> list:
    if _in_group():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj):
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if _in_group():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather_to_main(obj) -> Optional[list]:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others. Without a
    process group: ``[obj]``."""
    if not _in_group():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def process_share() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a process group."""
    if _in_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if _in_group():
        dist.barrier()
