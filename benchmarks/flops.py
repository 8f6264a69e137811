"""Model FLOPs of a DiT/DiffMoE forward and training step, per image, from the config alone
(docs/performance.md, "Model FLOPs and MFU", derives each term).

Convention (as for model-FLOPs utilisation, MFU): matrix products only, 2 FLOPs per
multiply-add, attention's two products included, the training step counted as 3 forwards (the
backward computes gradients of the inputs and of the weights, each a product of the forward's
size); elementwise work, the optimizer and the EMA are not model FLOPs. An MoE layer counts the
experts' work at capacity C (training, and static inference) or at the C_avg a dynamic run
measured.

    python benchmarks/flops.py DiffMoE-B-E16 Dense-DiT-B [--capacity 1.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmoe.config import ModelConfig, load_config  # noqa: E402
from diffmoe.models.dit import TIMESTEP_FREQ_DIM  # noqa: E402

FLOPS_PER_MAC = 2
TRAINING_FORWARDS = 3  # forward + backward (input and weight gradients)
ADALN_CHUNKS = 6  # a block's modulation: shift, scale, gate for attention and for the FFN
FINAL_ADALN_CHUNKS = 2


def ffn_flops_per_token(m: ModelConfig, block: int, capacity: Optional[float]) -> float:
    """One block's FFN per token: dense D→H→D, or an MoE layer whose experts (g·E of width H/g)
    see C tokens' worth each (plus shared experts, the router and DiffMoE's predictor)."""
    D = m.hidden_size
    H = int(m.mlp_ratio * D)
    moe = m.moe
    is_moe = moe.type != "dense" and (block % 2 == 1 if moe.interleave else True)
    if not is_moe:
        return FLOPS_PER_MAC * 2 * D * H
    experts = moe.granularity * moe.num_experts
    width = H // moe.granularity
    c = moe.capacity if capacity is None else capacity
    flops = FLOPS_PER_MAC * 2 * D * width * moe.granularity * c  # routed experts
    flops += FLOPS_PER_MAC * 2 * D * width * moe.shared_experts
    flops += FLOPS_PER_MAC * D * experts  # router
    if moe.type == "diffmoe":
        flops += FLOPS_PER_MAC * (D * D + D * experts)  # capacity predictor
    return flops


def forward_flops_per_image(m: ModelConfig, capacity: Optional[float] = None) -> dict[str, float]:
    """The forward's model FLOPs for one image, by part."""
    D, p = m.hidden_size, m.patch_size
    s = (m.input_size // p) ** 2
    out_channels = m.in_channels * (2 if m.learn_sigma else 1)
    parts = {
        "patch_embed": FLOPS_PER_MAC * s * p * p * m.in_channels * D,
        "timestep_mlp": FLOPS_PER_MAC * (TIMESTEP_FREQ_DIM * D + D * D),
        "adaln": FLOPS_PER_MAC * (m.depth * ADALN_CHUNKS + FINAL_ADALN_CHUNKS) * D * D,
        "attention_projections": FLOPS_PER_MAC * m.depth * s * 4 * D * D,
        "attention_scores": FLOPS_PER_MAC * m.depth * 2 * s * s * D,
        "ffn": s * sum(ffn_flops_per_token(m, i, capacity) for i in range(m.depth)),
        "final_linear": FLOPS_PER_MAC * s * D * p * p * out_channels,
    }
    if m.final_conv:
        parts["final_conv"] = 0.0  # a 3x3 convolution on C_out channels: negligible, not counted
    return parts


def training_flops_per_image(m: ModelConfig, capacity: Optional[float] = None) -> float:
    return TRAINING_FORWARDS * sum(forward_flops_per_image(m, capacity).values())


def model_config(preset: str) -> ModelConfig:
    return load_config(None, [f"model.preset={preset}"]).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--capacity", type=float, default=None,
                        help="C of the MoE layers (default: the config's)")
    args = parser.parse_args()
    for name in args.presets:
        m = model_config(name)
        parts = forward_flops_per_image(m, args.capacity)
        print(f"{name}: forward {sum(parts.values()) / 1e9:.2f} GFLOP/image, training "
              f"{training_flops_per_image(m, args.capacity) / 1e9:.2f} GFLOP/image")
        for part, flops in parts.items():
            print(f"  {part:22s} {flops / 1e9:8.3f} GFLOP")


if __name__ == "__main__":
    main()
