"""What stops a training run, in the words a user can act on.

Every message names the step and the checkpoint to resume from (``last_checkpoint()``, read only
when a fault happens):

* :func:`stop_cleanly` turns SIGTERM (a scheduler, or torchrun stopping the surviving ranks
  after one failed) and a collective that failed because another rank died or stopped answering
  within ``train.dist_timeout_s`` (:func:`diffmoe.distributed.is_collective_failure`) into a
  :class:`TrainingError`;
* :func:`on_nonfinite_loss` applies ``train.nonfinite_loss``: stop at the first non-finite
  loss, or skip steps up to ``train.max_skipped_steps`` (:func:`skipped_steps` over the steps
  a trainer has read back).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
from typing import Callable, Iterator

from . import distributed
from .errors import TrainingError

log = logging.getLogger(__name__)

GLOO_LOCATION_RE = re.compile(r"^\[[^\]]*\]\s*")  # "[.../pair.cc:537] " before gloo messages

Step = Callable[[], int]
LastCheckpoint = Callable[[], str]


def collective_failure_reason(exc: BaseException) -> str:
    """The first sentence of a failed collective's message, without gloo's source location."""
    return GLOO_LOCATION_RE.sub("", str(exc).strip().splitlines()[0]).split(". ")[0]


@contextlib.contextmanager
def stop_cleanly(rank: int, in_process_group: bool, step: Step,
                 last_checkpoint: LastCheckpoint) -> Iterator[None]:
    """Within it, SIGTERM and (in a process group) a failed collective end the run with a
    :class:`TrainingError`; ``step()`` is the number of optimizer steps done."""
    def on_sigterm(signum, frame):
        raise TrainingError(
            f"stopped by {signal.Signals(signum).name} at step {step()} (the job was cancelled, "
            f"or another rank failed); last good checkpoint: {last_checkpoint()}; resume with "
            f"--resume")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        yield
    except RuntimeError as exc:
        if not (in_process_group and distributed.is_collective_failure(exc)):
            raise
        raise TrainingError(
            f"rank {rank}: lost contact with another rank at step {step() + 1} "
            f"({collective_failure_reason(exc)}); another rank died or hung (see its log), so the "
            f"run stopped; last good checkpoint: {last_checkpoint()}; resume with --resume"
        ) from exc
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def on_nonfinite_loss(policy: str, max_skipped: int, loss: float, step: int, skipped: int,
                      last_checkpoint: LastCheckpoint) -> None:
    """``train.nonfinite_loss`` when some rank's loss at optimizer step ``step`` (1-based) was
    not finite (``loss``: this rank's). ``stop`` raises; ``skip`` logs the skip (the caller
    leaves weights, EMA, optimizer and thresholds untouched), and raises once ``skipped`` (the
    steps skipped since the run began, this one included) is over ``max_skipped`` (0: no
    limit)."""
    what = f"{loss}" if not math.isfinite(loss) else "on another rank"
    if policy == "stop":
        raise TrainingError(
            f"non-finite loss ({what}) at step {step}; last good checkpoint: "
            f"{last_checkpoint()}; resume from it with --resume --accept-changes after lowering "
            f"train.lr or setting train.grad_clip, or with --resume after setting "
            f"train.nonfinite_loss=skip")
    if max_skipped and skipped > max_skipped:
        raise TrainingError(
            f"non-finite loss ({what}) at step {step}: more than train.max_skipped_steps="
            f"{max_skipped} steps skipped; last good checkpoint: {last_checkpoint()}; check the "
            f"data, lower train.lr or set train.grad_clip, then resume with --resume "
            f"--accept-changes")
    log.warning("non-finite loss (%s) at step %d: step skipped (%d skipped so far)", what, step,
                skipped)


def skipped_steps(steps: list[tuple[int, float, bool]], policy: str, max_skipped: int,
                  skipped: int, last_checkpoint: LastCheckpoint) -> int:
    """:func:`on_nonfinite_loss` for each (step, this rank's loss, kept) not kept, in step order;
    returns the number of steps skipped since the run began (``skipped`` before these)."""
    for step, loss, kept in steps:
        if not kept:
            skipped += 1
            on_nonfinite_loss(policy, max_skipped, loss, step, skipped, last_checkpoint)
    return skipped
