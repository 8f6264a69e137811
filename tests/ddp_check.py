"""Run under torchrun by test_ddp.py: train a few DDP steps (with the faults of DIFFMOE_FAULTS
injected, see fault_runner.py), then check on every rank that weights, EMA weights and DiffMoE
thresholds agree with rank 0's."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from fault_runner import install, parse

from diffmoe.config import load_config
from diffmoe.train import Trainer


def main() -> None:
    config, result_path, *overrides = sys.argv[1:]
    install(parse(os.environ.get("DIFFMOE_FAULTS", "")))
    trainer = Trainer(load_config(config, overrides))
    trainer.train()
    report = {}
    for name, module in (("model", trainer.model), ("ema", trainer.ema)):
        for key, value in module.state_dict().items():
            ref = value.clone()
            dist.broadcast(ref, src=0)
            report[f"{name}.{key}"] = bool(torch.equal(ref, value))
    thresholds = [v for k, v in trainer.model.state_dict().items() if k.endswith("thresholds_E")]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(result_path, "w") as fh:
            json.dump({"ranks": gathered, "world_size": dist.get_world_size(),
                       "num_thresholds": len(thresholds),
                       "threshold_sum": float(sum(t.sum() for t in thresholds))}, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
    # One rank has been seen to hang in the gloo process group's teardown (intermittently, under
    # load, since the scale-out merge; see fault_runner.py): both ranks have met at the barrier
    # above, so leave without destroying the group or running the interpreter's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
