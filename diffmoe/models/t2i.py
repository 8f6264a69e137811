"""The text-conditioned DiT (``model.condition: text``).

The DiffMoE paper's text-to-image model (paper §7) conditions on text through
cross-attention; this is our version of it, the class-conditional :class:`DiT` with two changes:

* every block gets a cross-attention layer after its self-attention: x += CrossAttn(LN(x), ctx),
  where ctx is the frozen encoder's per-token hidden states projected to the model width (its
  output projection starts at zero, so the block starts as the class-free DiT block);
* the label embedding is replaced by the projected pooled sentence embedding, added to the
  timestep embedding that drives adaLN.

Captions are dropped (replaced by a learned null caption: one learned token and a learned pooled
vector) with probability ``model.text.dropout`` in training, which gives the unconditional branch
for classifier-free guidance; :meth:`TextDiT.null_condition` asks for it. The FFN of every block
is chosen by ``model.moe`` exactly as in the class-conditional model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from .condition import TextCondition
from .dit import EMBED_INIT_STD, DiT, DiTBlock, DiTOutput, modulate
from .moe import STATIC, FFNOutput, Routing


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


class TextDiTBlock(DiTBlock):
    """x += gate_msa·Attn(modulate(LN(x))); x += CrossAttn(LN(x), ctx);
    x += gate_mlp·FFN(modulate(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module):
        super().__init__(dim, num_heads, ffn)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)

    def forward(self, x: Tensor, c: Tensor, routing: Routing, ctx: Tensor = None,
                ctx_mask: Tensor = None) -> tuple[Tensor, FFNOutput]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm_cross(x), ctx, ctx_mask)
        out = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), routing)
        return x + gate_mlp.unsqueeze(1) * out.y, out


class TextEmbedder(nn.Module):
    """A :class:`TextCondition` → (pooled embedding (B, D) for adaLN, caption tokens (B, L, D),
    their mask (B, L)), with caption dropout to the learned null caption in training."""

    def __init__(self, text_dim: int, dim: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.token_proj = nn.Linear(text_dim, dim)
        self.pooled_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null_token = nn.Parameter(torch.zeros(dim))
        self.null_pooled = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.null_token, std=EMBED_INIT_STD)
        nn.init.normal_(self.null_pooled, std=EMBED_INIT_STD)

    def forward(self, cond: TextCondition) -> tuple[Tensor, Tensor, Tensor]:
        null = cond.null
        if self.training and self.dropout > 0:
            null = null | (torch.rand(null.shape[0], device=null.device) < self.dropout)
        dtype = self.token_proj.weight.dtype
        ctx = self.token_proj(cond.tokens.to(dtype))
        pooled = self.pooled_proj(cond.pooled.to(dtype))
        # The null caption is a single learned token: it alone is attended to.
        first_only = torch.zeros_like(cond.mask)
        first_only[:, 0] = True
        ctx = torch.where(null[:, None, None], self.null_token.to(ctx.dtype), ctx)
        mask = torch.where(null[:, None], first_only, cond.mask)
        pooled = torch.where(null[:, None], self.null_pooled.to(pooled.dtype), pooled)
        return pooled, ctx, mask


class TextDiT(DiT):
    def __init__(self, cfg: ModelConfig, token_pool: str = "rank"):
        super().__init__(cfg, token_pool)
        D = cfg.hidden_size
        self.y_embedder = TextEmbedder(cfg.text.dim, D, cfg.text.dropout)
        self.blocks = nn.ModuleList(TextDiTBlock(D, cfg.num_heads, block.mlp)
                                    for block in self.blocks)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation, with each cross-attention's output projection at zero."""
        super().initialize_weights()
        for block in self.blocks:
            if isinstance(block, TextDiTBlock):
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)

    def forward(self, x: Tensor, t: Tensor, y: TextCondition, routing: Routing = STATIC
                ) -> DiTOutput:
        """As :meth:`DiT.forward`, with a :class:`TextCondition` for ``y``."""
        if not isinstance(y, TextCondition):
            raise TypeError(f"a text-conditioned DiT takes a TextCondition, not "
                            f"{type(y).__name__}")
        h = self.patchify(x) + self.pos_embed.to(x.dtype)
        pooled, ctx, mask = self.y_embedder(y)
        c = self.t_embedder(t) + pooled
        h, moe_outputs = self.run_blocks(h, c, routing, ctx, mask)
        return DiTOutput(self.decode(h, c), moe_outputs)

    def null_condition(self, y: TextCondition) -> TextCondition:
        return y.as_null()

    @staticmethod
    def cat_conditions(a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition.cat([a, b])
