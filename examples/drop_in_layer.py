"""A DiffMoE layer in a plain pre-norm ViT block, outside diffmoe's own model: a few training
steps on a toy regression (the capacity predictor's loss added to the task loss, the thresholds
moved after each optimizer step), then inference in the paper's dynamic mode.

    python examples/drop_in_layer.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn

from diffmoe import DiffMoELayer, apply_threshold_updates, diffmoe_layers

DIM, HEADS, EXPERTS, TOKENS, BATCH, LR = 32, 4, 4, 16, 8, 1e-3  # a toy size that runs in seconds


class Block(nn.Module):
    """x += Attn(LN(x)); x += MoE(LN(x)): a ViT block whose MLP is a DiffMoE layer."""

    def __init__(self, dim: int, heads: int, experts: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = DiffMoELayer(dim, 4 * dim, num_experts=experts, capacity=1.0)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        out = self.ffn(self.norm2(x))  # (B, s, D) in; output, losses and capacity out
        return x + out.output, out


def train_and_infer(steps: int, seed: int = 0) -> dict:
    """Train the block to imitate a fixed random linear map, then run it in eval mode."""
    torch.manual_seed(seed)
    block, target = Block(DIM, HEADS, EXPERTS), nn.Linear(DIM, DIM).requires_grad_(False)
    opt = torch.optim.AdamW(block.parameters(), lr=LR)
    for _ in range(steps):
        x = torch.randn(BATCH, TOKENS, DIM)
        y, out = block(x)
        loss = (y - target(x)).pow(2).mean() + out.predictor_loss  # task + Eq. 12
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply_threshold_updates(diffmoe_layers(block), [out.threshold_targets])  # Eq. 17
    block.eval()
    with torch.no_grad():
        _, out = block(torch.randn(BATCH, TOKENS, DIM))  # dynamic routing (Eq. 14)
    return {"loss": loss.item(), "thresholds": block.ffn.layer.thresholds_E.tolist(),
            "capacity": float(out.capacity), "tokens_per_expert": out.details.counts_E.tolist()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    result = train_and_infer(parser.parse_args(argv).steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
