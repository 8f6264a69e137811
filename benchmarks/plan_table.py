"""The table of docs/imagenet.md, "What each config needs": ``diffmoe plan`` of the flow configs
of configs/imagenet/ (S, B, L, XL x E8, E16) on 8 GPUs of 80 GiB at the paper's global batch 256,
under three settings, one ``diffmoe plan`` command per row (each printed above the table).

    python benchmarks/plan_table.py [--sizes s b l xl] [--experts 8 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPUS, GPU_MEMORY = 8, 80
SETTINGS = {
    "DDP fp32": ["train.parallel=ddp", "train.precision=fp32",
                 "train.activation_checkpointing=false"],
    "FSDP2 bf16": ["train.parallel=fsdp", "train.precision=bf16",
                   "train.activation_checkpointing=false"],
    "FSDP2 bf16 + AC": ["train.parallel=fsdp", "train.precision=bf16",
                        "train.activation_checkpointing=true"],
}


def plan_row(config: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "diffmoe", "plan", config, "--gpus", str(GPUS),
           "--gpu-memory", str(GPU_MEMORY), "--json", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["s", "b", "l", "xl"])
    parser.add_argument("--experts", nargs="+", default=["8", "16"])
    args = parser.parse_args()
    print(f"diffmoe plan configs/imagenet/diffmoe-SIZE-eEXPERTS-flow.yaml --gpus {GPUS} "
          f"--gpu-memory {GPU_MEMORY} --json SETTING")
    for name, overrides in SETTINGS.items():
        print(f"  {name}: {' '.join(overrides)}")
    print()
    print("| model | setting | peak GiB per GPU | fits 80 GiB | TFLOP per step | step ms at 40% "
          "MFU, H100 |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for experts in args.experts:
            config = f"configs/imagenet/diffmoe-{size}-e{experts}-flow.yaml"
            for name, overrides in SETTINGS.items():
                p = plan_row(config, overrides)
                print(f"| {p['model']} | {name} | {p['peak_gib']:.1f} | "
                      f"{'yes' if p['fits'] else 'no'} | {p['flops_per_step'] / 1e12:.0f} | "
                      f"{1e3 * p['step_time_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
