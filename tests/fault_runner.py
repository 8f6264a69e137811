"""Run ``diffmoe`` (its CLI, as ``python -m diffmoe`` would) with faults injected, for the fault
tests in test_faults.py and test_ddp.py. Alone or under torchrun.

``DIFFMOE_FAULTS`` holds comma-separated faults, each ``kind:step[:rank]`` (rank 0 if left out;
a fault fires only on its rank):

* ``kill:K``   SIGKILL this process in the middle of step K (after its optimizer step, before the
  EMA update and the step counter): everything since the last checkpoint is lost.
* ``hang:K``   stop answering in the middle of step K (sleep), so the other ranks wait.
* ``nan:K``    poison step K's batch with NaN, so its loss is not finite.
* ``hang-at-exit:K``  after a run that ended normally at step K, stop answering (sleep) before
  the exit barrier, so the other ranks wait for this one at the end.
* ``save-mid-file:N``      SIGKILL while writing optimizer.safetensors of this process's N-th
  checkpoint, half of its bytes on disk.
* ``save-before-rename:N`` SIGKILL after every file of the N-th checkpoint is written and
  fsynced, before the temporary directory is renamed into place.
* ``save-after-rename:N``  SIGKILL right after that rename, before the parent directory's fsync.
* ``prune-mid-delete:N``   SIGKILL during the N-th deletion of an old checkpoint, part of its
  files gone.
* ``save-mid-shards:N``    SIGKILL while the N-th sharded checkpoint (torchrun) is written: after
  this rank's model shards, as its EMA shards are to be written.

Steps count from 1 like the trainer's (step K is the K-th optimizer step of the run, whatever
process runs it); checkpoints and deletions count per process.

``DIFFMOE_FAULT_TIME``, if set, is a file to which the wall-clock time (time.time()) is written
when a kill or hang fires, so that how long the rest of the job took to end can be measured.

``DIFFMOE_LOSS_LOG``, if set, is a file to which every training step appends ``step loss`` (the
loss as a float.hex string, exact), so that per-step losses can be compared bit for bit; a
``{rank}`` in it is replaced by the rank.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types

import torch
from safetensors.torch import save as safetensors_bytes

import diffmoe.checkpoint as checkpoint
import diffmoe.distributed as distributed
import diffmoe.train as train
from diffmoe.cli import main

HANG_S = 3600


def stamp() -> None:
    if os.environ.get("DIFFMOE_FAULT_TIME"):
        with open(os.environ["DIFFMOE_FAULT_TIME"], "w") as fh:
            fh.write(repr(time.time()))


def die() -> None:
    stamp()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str) -> dict[str, int]:
    rank = int(os.environ.get("RANK", "0"))
    faults = {}
    for item in filter(None, spec.split(",")):
        kind, at, *on_rank = item.split(":")
        if int(on_rank[0] if on_rank else 0) == rank:
            faults[kind] = int(at)
    return faults


def record_losses(path: str) -> None:
    original_loss = train.training_loss

    def loss(*args, **kwargs):
        out = original_loss(*args, **kwargs)
        with open(path, "a") as fh:
            fh.write(f"{train_step[0]} {float(out.loss.detach()).hex()}\n")
        return out

    train.training_loss = loss


train_step = [0]  # the step being trained, read from the loader's position (exact on resume)


def install(faults: dict[str, int]) -> None:
    counts = {"save": 0, "fsync_dir": 0, "prune": 0, "sharded": 0}

    original_update_ema = train.update_ema
    original_next = train.BatchIterator.next
    original_save_file = checkpoint.save_file
    original_fsync_dir = checkpoint._fsync_dir
    original_remove_own = checkpoint._remove_own
    original_teardown = distributed.teardown
    original_dcp = checkpoint.dcp

    def next_batch(self):
        x, y = original_next(self)
        step = self.state.epoch * self.batches_per_epoch + self.state.position
        train_step[0] = step
        if faults.get("nan") == step:
            x = x * torch.nan
        return x, y

    def update_ema(*args, **kwargs):  # once per step, after optimizer.step
        if faults.get("kill") == train_step[0]:
            die()
        if faults.get("hang") == train_step[0]:
            stamp()
            time.sleep(HANG_S)
        return original_update_ema(*args, **kwargs)

    def save_file(tensors, path):
        if path.endswith("model.safetensors"):
            counts["save"] += 1
        if faults.get("save-mid-file") == counts["save"] and path.endswith("optimizer.safetensors"):
            data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            die()
        return original_save_file(tensors, path)

    def fsync_dir(path):
        counts["fsync_dir"] += 1  # two per checkpoint: the temporary dir, then (renamed) its parent
        n, after_rename = (counts["fsync_dir"] + 1) // 2, counts["fsync_dir"] % 2 == 0
        if faults.get("save-before-rename") == n and not after_rename:
            original_fsync_dir(path)
            die()
        if faults.get("save-after-rename") == n and after_rename:
            die()
        return original_fsync_dir(path)

    def remove_own(path):
        if os.path.basename(str(path)).startswith(checkpoint.DELETING_PREFIX):
            counts["prune"] += 1
            if faults.get("prune-mid-delete") == counts["prune"]:
                os.remove(os.path.join(path, "optimizer.safetensors"))
                die()
        return original_remove_own(path)

    def dcp_save(state_dict, **kwargs):
        if "model" in state_dict:
            counts["sharded"] += 1
        if faults.get("save-mid-shards") == counts["sharded"] and "ema" in state_dict:
            die()
        return original_dcp.save(state_dict, **kwargs)

    def teardown(wait_for_others=True, step=None):
        if wait_for_others and faults.get("hang-at-exit") == step:
            stamp()
            time.sleep(HANG_S)
        return original_teardown(wait_for_others, step)

    train.update_ema = update_ema
    distributed.teardown = teardown
    train.BatchIterator.next = next_batch
    checkpoint.save_file = save_file
    checkpoint._fsync_dir = fsync_dir
    checkpoint._remove_own = remove_own
    checkpoint.dcp = types.SimpleNamespace(save=dcp_save, load=original_dcp.load)


if __name__ == "__main__":
    install(parse(os.environ.get("DIFFMOE_FAULTS", "")))
    if os.environ.get("DIFFMOE_LOSS_LOG"):
        record_losses(os.environ["DIFFMOE_LOSS_LOG"].replace("{rank}",
                                                             os.environ.get("RANK", "0")))
    sys.exit(main(sys.argv[1:]))
