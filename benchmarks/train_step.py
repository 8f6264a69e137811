"""Training step: DiffMoE-S-E16 vs Dense-DiT-S on 32x32x4 inputs (forward, backward, AdamW step),
timed interleaved in one process; peak memory of each measured in its own subprocess.

    python benchmarks/train_step.py [--batch 8] [--repeats 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import emit, interleaved_medians, machine, table

from diffmoe.config import load_config
from diffmoe.diffusion import FlowMatching
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.train import build_optimizer

MODELS = {"dense": "Dense-DiT-S", "diffmoe": "DiffMoE-S-E16"}
ADAM_STATES = 2  # exp_avg and exp_avg_sq


def make_step(preset: str, batch: int, device: torch.device, dtype: torch.dtype):
    cfg = load_config(None, [f"model.preset={preset}"])
    model = build_model(cfg.model).to(device).train()
    opt = build_optimizer(model, cfg.train)
    flow = FlowMatching(cfg.model.in_channels)
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = training_loss(flow.loss(model, x, y), cfg.model.moe).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: peak resident set, VmRSS: current), in bytes.
    Unlike getrusage's maxrss it starts afresh at exec, so the parent's size does not leak in."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(preset: str, batch: int, steps: int, device: torch.device,
                      dtype: torch.dtype) -> dict:
    """Run in a fresh process: bytes of peak memory while training ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _status_bytes("VmRSS")
    model, step = make_step(preset, batch, device, dtype)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_bytes("VmHWM") - before
    return {"peak_bytes": peak, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    if args.memory_child:
        sys.stdout.write(json.dumps(peak_memory_child(args.memory_child, args.batch, 3, device,
                                                      dtype)) + "\n")
        return
    steps = {name: make_step(preset, args.batch, device, dtype)[1]
             for name, preset in MODELS.items()}
    times = interleaved_medians(steps, args.repeats, args.warmup, device)
    mem = {}
    for name, preset in MODELS.items():
        out = subprocess.run([sys.executable, __file__, "--memory-child", preset, "--batch",
                              str(args.batch), "--device", args.device, "--dtype", args.dtype],
                             check=True, capture_output=True, text=True).stdout
        mem[name] = json.loads(out.strip().splitlines()[-1])
    extra_params = mem["diffmoe"]["params"] - mem["dense"]["params"]
    # weights + gradients + AdamW moments of the extra parameters, in float32
    extra_state = extra_params * 4 * (2 + ADAM_STATES)
    budget = 1.3 * mem["dense"]["peak_bytes"] + extra_state
    rows = [{"model": MODELS[n], "step_ms": 1e3 * times[n], "time_ratio": times[n] / times["dense"],
             "peak_MiB": mem[n]["peak_bytes"] / 2**20, "params_M": mem[n]["params"] / 1e6}
            for n in MODELS]
    result = {"benchmark": "train_step", "machine": machine(), "dtype": args.dtype,
              "batch": args.batch, "rows": rows,
              "time_ratio": times["diffmoe"] / times["dense"],
              "memory_ratio": mem["diffmoe"]["peak_bytes"] / mem["dense"]["peak_bytes"],
              "memory_budget_MiB": budget / 2**20,
              "memory_within_budget": mem["diffmoe"]["peak_bytes"] <= budget}
    text = table(rows, ["model", "step_ms", "time_ratio", "peak_MiB", "params_M"]) + (
        f"\nmemory: DiffMoE peak {rows[1]['peak_MiB']:.0f} MiB vs budget 1.3 x dense + extra "
        f"parameter state = {budget / 2**20:.0f} MiB")
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
