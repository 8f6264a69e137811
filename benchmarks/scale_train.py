"""Training throughput and peak GPU memory of B/L DiffMoE configs in bf16 autocast, with and
without activation checkpointing: one forward + backward + AdamW step per iteration on random
32x32x4 latents (the ImageNet-256 shape), single GPU.

    python benchmarks/scale_train.py [--presets DiffMoE-B-E16 DiffMoE-L-E16] [--batch 32]
                                     [--repeats 10] [--json]

Each (preset, checkpointing) pair runs in its own subprocess so that its peak memory is its own.
Needs a CUDA device; on a CPU it refuses (the figures would say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import emit, machine, table

from diffmoe.config import load_config
from diffmoe.diffusion import FlowMatching
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.train import build_optimizer

WARMUP = 3


def measure(preset: str, batch: int, repeats: int, checkpointing: bool) -> dict:
    device = torch.device("cuda")
    cfg = load_config(None, [f"model.preset={preset}"])
    model = build_model(cfg.model).to(device).train()
    model.activation_checkpointing = checkpointing
    opt = build_optimizer(model, cfg.train)
    flow = FlowMatching(cfg.model.in_channels)
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = training_loss(flow.loss(model, x, y), cfg.model.moe)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return {"preset": preset, "batch": batch, "activation_checkpointing": checkpointing,
            "images_per_sec": batch / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["DiffMoE-B-E16", "DiffMoE-L-E16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("PRESET", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("scale_train.py needs a CUDA device")
    if args.one:
        print(json.dumps(measure(args.one[0], args.batch, args.repeats, args.one[1] == "1")))
        return
    rows = []
    for preset in args.presets:
        for ckpt in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--one", preset, ckpt, "--batch",
                                  str(args.batch), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"machine": machine(), "rows": rows}
    emit(result, table(rows, ["preset", "batch", "activation_checkpointing", "images_per_sec",
                              "peak_memory_gib"]), args.json)

if __name__ == "__main__":
    main()
