"""Run by test_plan.py, alone or under torchrun: the step that ``diffmoe plan`` simulates, run for
real on the CPU (DDP or FSDP2 over gloo under torchrun), measured with the same tracker
(:func:`diffmoe.plan.measure`); rank 0 writes each case's peak by category and the process's peak
resident memory to RESULT (JSON).

    python tests/plan_check.py RESULT CASES_JSON   (CASES_JSON: a list of override lists)
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from diffmoe import distributed
from diffmoe.config import load_config
from diffmoe.plan import RandomBatches, measure
from diffmoe.train import step_trainer

KIB = 1024


def measured(overrides: list[str], info: distributed.DistInfo) -> dict:
    cfg = load_config(None, overrides)
    trainer = step_trainer(cfg, info, torch.device("cpu"),
                                   RandomBatches(cfg, cfg.train.batch_size // info.world_size))
    try:
        memory, flops = measure(trainer)
    finally:
        trainer.model.release_wrappers()
    return {"overrides": overrides, "memory": memory, "flops": flops,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB,
            "rss_at_start_bytes": RSS_AT_START}


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    return 0


RSS_AT_START = resident_bytes()  # torch and diffmoe imported, nothing built


def main() -> None:
    result_path, cases = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    info = distributed.setup("cpu")
    results = [measured(overrides, info) for overrides in cases]
    if info.is_main:
        with open(result_path, "w") as fh:
            json.dump({"world_size": info.world_size, "cases": results}, fh)
    distributed.teardown()


if __name__ == "__main__":
    main()
