"""Peak host memory of each rank while building the model and its EMA under 2-rank FSDP2 (gloo, on
the CPU): built whole on every rank and then sharded (how the trainer built it before meta-device
init), against built on the meta device, sharded, then filled shard by shard
(:func:`diffmoe.train.build_models`). DiffMoE-XL-E16's width (D 1152, 16 experts of 4·D), its
depth reduced (``--depth``, default 2) to fit a small machine. Each way runs in its own torchrun
job, one after the other; each rank reports the rise of its peak resident set (VmHWM) over its
resident set just before building, and whether its shards hold the same weights as the other way's
(rank 0 compares the gathered model).

    .venv/bin/python benchmarks/meta_init_memory.py [--depth 2] [--out meta_init_memory.json]

Not part of ``make test`` (it builds several GB); tests/test_scale.py and tests/test_meta_init.py
check the weights, this script the memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "imagenet" / "diffmoe-xl-e16-flow.yaml"
WAYS = ("whole-then-shard", "meta-then-fill")
GIB = 1 << 30


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rank_main(way: str, depth: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from diffmoe import parallel
    from diffmoe.config import load_config
    from diffmoe.ema import make_ema
    from diffmoe.models import build_model
    from diffmoe.train import build_models

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(CONFIG, [f"model.depth={depth}", "train.parallel=fsdp"])
    before = status_kib("VmRSS")
    if way == "meta-then-fill":
        module, ema = build_models(cfg, torch.device("cpu"), fsdp=True)
    else:
        torch.manual_seed(cfg.train.seed)
        module = build_model(cfg.model, cfg.train.token_pool)
        ema = make_ema(module)
        parallel.shard(module)
        parallel.shard(ema)
    peak_rise = status_kib("VmHWM") - before
    held = sum(p.to_local().numel() * p.element_size() for m in (module, ema)
               for p in m.parameters())
    report = {"rank": rank, "peak_rise_GiB": peak_rise * 1024 / GIB, "held_GiB": held / GIB,
              "params": sum(p.numel() for p in module.parameters())}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    if rank == 0:
        digest = torch.cat([v.flatten()[:4096].double() for v in whole.values()]).sum().item()
        Path(out).write_text(json.dumps({"ranks": reports, "weights_digest": digest}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rank-of", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.depth, args.result)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in WAYS:
            result = Path(tmp) / f"{way}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                            "2", __file__, "--depth", str(args.depth), "--rank-of", way,
                            "--result", str(result)], check=True, cwd=ROOT)
            results[way] = json.loads(result.read_text())
    params = results[WAYS[0]]["ranks"][0]["params"]
    print(f"DiffMoE-XL-E16 width, depth {args.depth}: {params / 1e6:.0f}M parameters "
          f"({4 * params / GIB:.2f} GiB fp32; with the EMA {8 * params / GIB:.2f} GiB)")
    print(f"{'way':18s} {'rank':>4s} {'peak rise GiB':>14s} {'held GiB':>9s}")
    for way in WAYS:
        for r in results[way]["ranks"]:
            print(f"{way:18s} {r['rank']:4d} {r['peak_rise_GiB']:14.2f} {r['held_GiB']:9.2f}")
    rise = {w: max(r["peak_rise_GiB"] for r in results[w]["ranks"]) for w in WAYS}
    print(f"peak rise per rank, meta / whole: {rise[WAYS[1]] / rise[WAYS[0]]:.2f}")
    same = results[WAYS[0]]["weights_digest"] == results[WAYS[1]]["weights_digest"]
    print(f"same weights (digest of the gathered model): {same}")
    if args.out:
        Path(args.out).write_text(json.dumps({"depth": args.depth, "results": results,
                                              "ratio": rise[WAYS[1]] / rise[WAYS[0]],
                                              "same_weights": same}, indent=1))


if __name__ == "__main__":
    main()
