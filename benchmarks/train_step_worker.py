"""One side of ``train_step.py --against REV``: a Trainer of whichever ``diffmoe`` is first on
``PYTHONPATH``, driven over stdin/stdout so that two versions can be timed turn by turn.

Commands (one per line) and replies (one JSON line each):

    steps N     run N optimizer steps          {"seconds": ...}
    report      after the steps                {"peak_bytes": ..., "digest": ..., "steps": ...}

Only names that every version of the trainer has are used (``Trainer(cfg)``, its ``model`` /
``ema`` and its step method), so the worker runs unchanged against older checkouts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch

import diffmoe
from diffmoe.config import load_config
from diffmoe.train import Trainer


def step_function(trainer: Trainer):
    for name in ("train_step", "_train_step"):  # the public name, or an older private one
        if hasattr(trainer, name):
            return getattr(trainer, name)
    raise SystemExit("this diffmoe's Trainer has no step method")


def raw_module(trainer: Trainer) -> torch.nn.Module:
    model = trainer.model
    return getattr(model, "module", model)  # a TrainingModel handle, or the module itself


def digest(modules: list[torch.nn.Module]) -> str:
    h = hashlib.sha256()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def main() -> None:
    config, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config, overrides))
    step = step_function(trainer)
    done = 0
    sys.stdout.write(json.dumps({"ready": diffmoe.__file__}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        command, *args = line.split()
        if command == "steps":
            start = time.perf_counter()
            for _ in range(int(args[0])):
                step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            done += int(args[0])
            reply = {"seconds": time.perf_counter() - start}
        elif command == "report":
            reply = {"peak_bytes": peak_bytes(trainer.device), "steps": done,
                     "digest": digest([raw_module(trainer), trainer.ema])}
        else:
            raise SystemExit(f"unknown command {command!r}")
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    trainer.close()


if __name__ == "__main__":
    main()
