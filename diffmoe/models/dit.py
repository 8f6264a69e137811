"""The DiT backbone (Peebles & Xie; paper §1), with a pluggable feed-forward layer.

The model knows nothing about the diffusion objective: it maps (x_t, timestep, condition) to an
output of the input's shape (twice the channels with ``learn_sigma``), plus the auxiliary outputs
of its MoE layers. The condition is a class label or a caption (``model.condition``, see
:mod:`.condition`); a text-conditioned model (paper §7) adds a cross-attention to the caption
tokens in every block. Shapes: B batch, C channels, H=W input size, p patch, s = (H/p)^2 tokens,
D width, L caption tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ..config import ModelConfig
from .condition import EMBED_INIT_STD, Condition, build_condition_embedder
from .init import InitPlan, apply_plan, prefixed
from .moe import STATIC, DenseFFN, FFNOutput, MoELayer, Routing, build_ffn, diffmoe_layers

TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP (DiT)
TIMESTEP_MAX_PERIOD = 10000
LN_EPS = 1e-6
FINAL_CONV_KERNEL = 3  # model.final_conv: U-ViT's 3x3 convolution after the patch decoder
DYNAMIC = Routing("dynamic")  # the paper's inference routing (Eq. 14), with the learned thresholds


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim): half the channels encode the row,
    half the column (as in MAE and DiT)."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for 2-D sin-cos positions")
    coords = np.arange(grid, dtype=np.float64)
    gw, gh = np.meshgrid(coords, coords)  # column index varies fastest, as in DiT

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(gw), embed_1d(gh)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps → sinusoidal frequencies → MLP(SiLU) → D."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def frequencies(t: Tensor, dim: int = TIMESTEP_FREQ_DIM) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, s, D = x.shape
        qkv = self.qkv(x).view(B, s, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, s, D/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, s, D))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the caption tokens (masked)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        """x: (B, s, D); ctx: (B, L, D); mask: (B, L) bool, True for tokens to attend to."""
        B, s, D = x.shape
        L, hd = ctx.shape[1], D // self.num_heads
        q = self.q(x).view(B, s, self.num_heads, hd).transpose(1, 2)
        k, v = self.kv(ctx).view(B, L, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, s, D))


class DiTBlock(nn.Module):
    """x += gate_msa·Attn(modulate(LN(x))); with ``cross_attention`` x += CrossAttn(LN(x), ctx);
    x += gate_mlp·FFN(modulate(LN(x))) (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.mlp = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # Registered after the others: checkpoints store the optimizer state by parameter order.
        self.norm_cross = nn.LayerNorm(dim) if cross_attention else None
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attention else None

    def forward(self, x: Tensor, c: Tensor, routing: Routing, *context: Tensor
                ) -> tuple[Tensor, FFNOutput]:
        """``context``: the caption tokens and their mask, for a block with cross-attention."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), *context)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        out = self.mlp(h, routing)
        return x + gate_mlp.unsqueeze(1) * out.y, out


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class DiTOutput:
    """The prediction and the auxiliary outputs of every MoE layer.

    prediction: (B, C_out, H, W). layers: the :class:`FFNOutput` of each MoE position, in block
    order.
    :attr:`aux_loss` and :attr:`predictor_loss` are the layers' losses averaged over MoE layers,
    unweighted (0 when there is none): the model reads no loss coefficient; the weighted total is
    formed in :mod:`diffmoe.loss`.
    """

    prediction: Tensor
    layers: list[FFNOutput] = field(default_factory=list)

    @property
    def aux_loss(self) -> Tensor:
        """Token-choice balance loss, mean over MoE layers."""
        return self._layer_mean([o.aux_loss for o in self.layers])

    @property
    def predictor_loss(self) -> Tensor:
        """Capacity-predictor BCE (Eq. 12), mean over MoE layers."""
        return self._layer_mean([o.predictor_loss for o in self.layers])

    def _layer_mean(self, values: list[Optional[Tensor]]) -> Tensor:
        present = [v for v in values if v is not None]
        if not present:
            return self.prediction.new_zeros((), dtype=torch.float32)
        return torch.stack(present).mean()


class DiT(nn.Module):
    """The DiT of a ``model`` config: its condition embedder (``y_embedder``, labels or
    captions) and, for a condition the blocks attend to, a cross-attention in every block."""

    def __init__(self, cfg: ModelConfig, token_pool: str = "rank", initialize: bool = True):
        """``token_pool``: the DiffMoE layers' training pool under torchrun ("rank", or "global"
        for the pool of every rank's micro-batch). ``initialize``: run :meth:`initialize_weights`
        (off for a model built on the ``meta`` device, filled later from :meth:`init_plan`)."""
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.patch_size = p
        self.grid = cfg.input_size // p
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = build_condition_embedder(cfg)
        self.register_buffer("pos_embed", torch.from_numpy(
            sincos_pos_embed_2d(D, self.grid)).unsqueeze(0), persistent=False)
        hidden = int(cfg.mlp_ratio * D)
        self.moe_blocks = [i for i in range(cfg.depth) if self.is_moe_block(i)]
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads,
                     build_ffn(cfg.moe, D, hidden, token_pool) if i in self.moe_blocks
                     else DenseFFN(D, hidden), self.y_embedder.cross_attention)
            for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.final_conv = (nn.Conv2d(self.out_channels, self.out_channels, FINAL_CONV_KERNEL,
                                     padding=FINAL_CONV_KERNEL // 2) if cfg.final_conv else None)
        # Recompute each block in the backward pass instead of keeping its activations (set by
        # the trainer from train.activation_checkpointing; training with gradients only).
        self.activation_checkpointing = False
        if initialize:
            self.initialize_weights()

    def is_moe_block(self, i: int) -> bool:
        """With ``interleave`` MoE replaces the FFN of blocks 1, 3, 5, ... (the public code)."""
        return (i % 2 == 1) if self.cfg.moe.interleave else True

    def init_plan(self) -> InitPlan:
        """DiT's initialisation, tensor by tensor in the order it draws random numbers
        (:mod:`.init`). Every Linear: Xavier-uniform, zero bias. MoE layers: their own init
        (router N(0, 0.006²), experts Xavier per expert, thresholds 0). The patch embedding is a
        Linear in disguise. adaLN-Zero: each block's modulation projection and the final layer are
        zero, so every block starts as the identity and the model's first output is 0; so is each
        cross-attention's output projection, so a block with it starts as the block without it.
        The optional final convolution starts as the identity kernel. Last, what the constructor
        set without drawing (the cross-attention's LayerNorm, the positions), so that the plan
        gives every tensor its value."""
        modules = list(self.named_modules())
        plan: InitPlan = []
        for name, m in modules:  # Module.apply's order: the Linears are leaves
            if isinstance(m, nn.Linear):
                plan.append((f"{name}.weight", nn.init.xavier_uniform_))
                if m.bias is not None:
                    plan.append((f"{name}.bias", nn.init.zeros_))
        for name, m in modules:
            if isinstance(m, MoELayer):
                plan += prefixed(name, m.init_plan())
        plan += [("x_embedder.weight", lambda w: nn.init.xavier_uniform_(w.view(w.shape[0], -1))),
                 ("x_embedder.bias", nn.init.zeros_)]
        plan += prefixed("y_embedder", self.y_embedder.init_plan())
        normal = functools.partial(nn.init.normal_, std=EMBED_INIT_STD)
        plan += [("t_embedder.mlp.0.weight", normal), ("t_embedder.mlp.2.weight", normal)]
        zeroed = ["final_layer.adaLN_modulation.1", "final_layer.linear"]
        for i, block in enumerate(self.blocks):
            zeroed.append(f"blocks.{i}.adaLN_modulation.1")
            if block.cross_attn is not None:
                zeroed.append(f"blocks.{i}.cross_attn.proj")
        plan += [(f"{lin}.{p}", nn.init.zeros_) for lin in zeroed for p in ("weight", "bias")]
        if self.final_conv is not None:
            plan += [("final_conv.weight", nn.init.dirac_), ("final_conv.bias", nn.init.zeros_)]
        for name, m in modules:
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                plan += [(f"{name}.weight", nn.init.ones_), (f"{name}.bias", nn.init.zeros_)]
        positions = torch.from_numpy(sincos_pos_embed_2d(self.cfg.hidden_size, self.grid))
        plan.append(("pos_embed", lambda b: b.copy_(positions.unsqueeze(0))))
        return plan

    def initialize_weights(self) -> None:
        """:meth:`init_plan` on this model's tensors."""
        apply_plan(self, self.init_plan())

    def patchify(self, x: Tensor) -> Tensor:
        return self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, s, D)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, s, p*p*C_out) → (B, C_out, H, W)."""
        B, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.view(B, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, c, g * p, g * p)

    def decode(self, h: Tensor, c: Tensor) -> Tensor:
        """Final layer, unpatchify and (``model.final_conv``) the 3x3 convolution: tokens
        (B, s, D) → prediction (B, C_out, H, W)."""
        out = self.unpatchify(self.final_layer(h, c))
        return out if self.final_conv is None else self.final_conv(out)

    @property
    def default_routing(self) -> Routing:
        """The inference routing of this model when none is asked for (``sample.mode=auto``):
        the paper's dynamic mode for a model with DiffMoE layers, static (the only rule the other
        layers have) otherwise. Training forwards use the training rule whatever the routing."""
        return DYNAMIC if diffmoe_layers(self) else STATIC

    def forward(self, x: Tensor, t: Tensor, y: Condition, routing: Optional[Routing] = None
                ) -> DiTOutput:
        """x: (B, C, H, W) noisy input; t: (B,) timesteps as the embedder sees them; y: the
        condition, (B,) labels (``num_classes`` = null) or a :class:`TextCondition`;
        ``routing``: the MoE inference rule, :attr:`default_routing` when None."""
        routing = self.default_routing if routing is None else routing
        h = self.patchify(x) + self.pos_embed.to(x.dtype)
        cond = self.y_embedder(y)
        c = self.t_embedder(t) + cond.vector
        h, moe_outputs = self.run_blocks(h, c, routing, *cond.context)
        return DiTOutput(self.decode(h, c), moe_outputs)

    def run_blocks(self, h: Tensor, c: Tensor, routing: Routing, *context: Tensor
                   ) -> tuple[Tensor, list[FFNOutput]]:
        """Every block in turn (``context``, the condition's tokens for cross-attention, goes to
        each block after ``routing``), each recomputed in the backward pass under
        ``activation_checkpointing``; returns the tokens and the outputs of the MoE positions."""
        moe_outputs: list[FFNOutput] = []
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if checkpointed:
                h, ffn_out = torch.utils.checkpoint.checkpoint(block, h, c, routing, *context,
                                                               use_reentrant=False)
            else:
                h, ffn_out = block(h, c, routing, *context)
            if i in self.moe_blocks:
                moe_outputs.append(ffn_out)
        return h, moe_outputs

    # -- conditioning, as classifier-free guidance sees it ----------------------------------

    def null_condition(self, y: Condition) -> Condition:
        """The unconditional input matching ``y`` (the null class or the null caption), as the
        condition embedder defines it."""
        return self.y_embedder.null_condition(y)

    def cat_conditions(self, a: Condition, b: Condition) -> Condition:
        """Two condition batches stacked along the batch dimension, as the condition embedder
        stacks them."""
        return self.y_embedder.cat(a, b)

    # -- parameter accounting (paper §1 and Eq. 40) ----------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

