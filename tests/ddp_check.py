"""Run under torchrun by test_ddp.py: train a few DDP steps (with the faults of DIFFMOE_FAULTS
injected, see fault_runner.py), then check on every rank that weights, EMA weights and DiffMoE
thresholds agree with rank 0's, end the run as diffmoe.train.train does, and write which threads
are left (RESULT.rank<r>)."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from fault_runner import install, parse

from diffmoe import distributed
from diffmoe.config import load_config
from diffmoe.train import Trainer


def main() -> None:
    config, result_path, *overrides = sys.argv[1:]
    install(parse(os.environ.get("DIFFMOE_FAULTS", "")))
    trainer = Trainer(load_config(config, overrides))
    result = trainer.train()
    report = {}
    for name, module in (("model", trainer.model.module), ("ema", trainer.ema)):
        for key, value in module.state_dict().items():
            ref = value.clone()
            dist.broadcast(ref, src=0)
            # Every rank applies the same all-reduced gradients: the same computation, bitwise.
            report[f"{name}.{key}"] = bool(torch.equal(ref, value))
    thresholds = [v for k, v in trainer.model.module.state_dict().items()
                  if k.endswith("thresholds_E")]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(result_path, "w") as fh:
            json.dump({"ranks": gathered, "world_size": dist.get_world_size(),
                       "num_thresholds": len(thresholds),
                       "threshold_sum": float(sum(t.sum() for t in thresholds))}, fh)
    trainer.close()  # frees the DDP wrapper before the group goes, as diffmoe.train.train does
    distributed.teardown(step=result.step)
    # What is left running after the teardown: gloo's threads must be gone (the group's last
    # reference was dropped inside the teardown, not later by a destructor holding the GIL), and
    # so must the launcher watch.
    with open(f"{result_path}.rank{os.environ['RANK']}", "w") as fh:
        json.dump({"os_threads": thread_names(),
                   "python_threads": sorted(t.name for t in threading.enumerate())}, fh)


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # it ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    main()
