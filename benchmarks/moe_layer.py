"""MoE layer speed: forward and forward+backward of the dense FFN, diffmoe, expert_choice,
token_choice, and a naive per-expert-loop DiffMoE, at the S-E16 and B-E16 shapes (8 samples x
256 tokens; D = 384 or 768; 16 experts of width 4D; capacity 1, so every variant has the dense
FFN's activated FLOPs). Runs are interleaved and medians reported, with ratios to dense.

    python benchmarks/moe_layer.py [--shapes S-E16 B-E16] [--repeats 15] [--json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from common import emit, interleaved_medians, machine, table

from diffmoe.config import MoEConfig
from diffmoe.models.moe import FeedForward, build_ffn, expert_capacity

SHAPES = {"S-E16": dict(dim=384, experts=16), "B-E16": dict(dim=768, experts=16)}
SAMPLES, TOKENS = 8, 256


class NaiveLoopDiffMoE(nn.Module):
    """The straightforward implementation: a Python list of expert modules, a loop over them,
    each gathering its top-k tokens of the pool and adding its weighted output back."""

    def __init__(self, dim: int, hidden: int, experts: int, capacity: float = 1.0):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden) for _ in range(experts))
        self.capacity = capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, s, D = x.shape
        pool = x.reshape(B * s, D)
        scores = self.router(pool).softmax(-1)
        k = expert_capacity(B * s, self.capacity, len(self.experts))
        out = torch.zeros_like(pool)
        for e, expert in enumerate(self.experts):
            w, idx = scores[:, e].topk(k)
            out = out.index_add(0, idx, expert(pool[idx]) * w.unsqueeze(-1))
        return out.view(B, s, D)


def build_layers(dim: int, experts: int, device: torch.device) -> dict[str, nn.Module]:
    hidden = 4 * dim
    layers: dict[str, nn.Module] = {"dense": FeedForward(dim, hidden)}
    for kind in ("diffmoe", "expert_choice", "token_choice"):
        layers[kind] = build_ffn(MoEConfig(type=kind, num_experts=experts), dim, hidden)
    layers["naive_loop"] = NaiveLoopDiffMoE(dim, hidden, experts)
    return {k: v.to(device).train() for k, v in layers.items()}


def output_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out.y if hasattr(out, "y") else out


def bench_shape(name: str, repeats: int, warmup: int, device: torch.device,
                dtype: torch.dtype) -> list[dict]:
    cfg = SHAPES[name]
    layers = build_layers(cfg["dim"], cfg["experts"], device)
    x = torch.randn(SAMPLES, TOKENS, cfg["dim"], device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fwd(layer):
        def run():
            with torch.no_grad(), autocast:
                output_of(layer, x)
        return run

    def fwd_bwd(layer):
        xg = x.clone().requires_grad_(True)

        def run():
            # As in training (zero_grad(set_to_none=True)): gradients are assigned, not added.
            for param in layer.parameters():
                param.grad = None
            with autocast:
                y = output_of(layer, xg)
            y.float().square().mean().backward()
        return run

    f = interleaved_medians({k: fwd(v) for k, v in layers.items()}, repeats, warmup, device)
    fb = interleaved_medians({k: fwd_bwd(v) for k, v in layers.items()}, repeats, warmup, device)
    rows = []
    for k in layers:
        rows.append({"shape": name, "layer": k, "fwd_ms": 1e3 * f[k], "fwd_bwd_ms": 1e3 * fb[k],
                     "fwd_ratio": f[k] / f["dense"], "fwd_bwd_ratio": fb[k] / fb["dense"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    rows = [r for s in args.shapes for r in bench_shape(s, args.repeats, args.warmup, device,
                                                        dtype)]
    result = {"benchmark": "moe_layer", "machine": machine(), "dtype": args.dtype,
              "samples": SAMPLES, "tokens": TOKENS, "rows": rows}
    text = table(rows, ["shape", "layer", "fwd_ms", "fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio"])
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
