"""DiffMoE as the MLP of timm's ViT block: ``Block(mlp_layer=partial(DiffMoEMlp, num_experts=4))``.

timm is not a dependency (it needs torchvision), so the block is written out here as
``timm.models.vision_transformer.Block`` builds it: pre-norm attention and MLP, the MLP made by
``mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
norm_layer=None, bias=proj_bias, drop=proj_drop)`` and called as ``mlp(x)``. With timm
installed, ``timm.models.vision_transformer.Block`` takes the same ``mlp_layer``.

The model is an ``nn.Sequential`` of such blocks: nothing threads the MoE outputs through it.
Training adds ``diffmoe.moe_losses(model)`` to the loss and calls ``diffmoe.update_thresholds(
model)`` after each optimizer step; inference runs inside ``diffmoe.routing(model, "dynamic")``.

    python examples/timm_block.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn as nn

import diffmoe
from diffmoe import DiffMoEMlp

DIM, HEADS, DEPTH, EXPERTS, TOKENS, BATCH, LR = 32, 4, 2, 4, 16, 8, 1e-3  # runs in seconds


class Attention(nn.Module):
    """timm's Attention: one qkv projection, scaled dot-product attention, an output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """timm's ViT Block (no layer scale, no drop path), its MLP built by ``mlp_layer``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_bias: bool = True, proj_drop: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm,
                 mlp_layer: type[nn.Module] = nn.Identity):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio),
                             act_layer=act_layer, norm_layer=None, bias=proj_bias,
                             drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mlp = partial(DiffMoEMlp, num_experts=EXPERTS, capacity=1.0)
    return nn.Sequential(*[Block(DIM, HEADS, mlp_layer=mlp) for _ in range(DEPTH)])


def train_and_infer(steps: int, seed: int = 0) -> dict:
    """Train the blocks to imitate a fixed random linear map, then infer with dynamic routing."""
    model = build(seed)
    target = nn.Linear(DIM, DIM).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(steps):
        x = torch.randn(BATCH, TOKENS, DIM)
        task = (model(x) - target(x)).pow(2).mean()
        loss = task + diffmoe.moe_losses(model)  # + w·L_predictor (Eq. 12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        diffmoe.update_thresholds(model)  # Eq. 17
    mlps = [block.mlp for block in model]
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad(), diffmoe.routing(model.eval(), "dynamic"):
        dynamic = model(x)
        dynamic_counts = [m.last.details.counts_E.tolist() for m in mlps]
    with torch.no_grad(), diffmoe.routing(model, "static"):  # the training rule, k = S·C/E
        model(x)
        static_counts = [m.last.details.counts_E.tolist() for m in mlps]
    return {"loss": loss.item(), "task_loss": task.item(), "output_shape": list(dynamic.shape),
            "thresholds": [m.layer.thresholds_E.tolist() for m in mlps],
            "dynamic_tokens_per_expert": dynamic_counts,
            "static_tokens_per_expert": static_counts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    result = train_and_infer(parser.parse_args(argv).steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
