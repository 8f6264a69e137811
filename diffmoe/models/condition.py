"""The conditions a DiT is given and their embedders.

A condition is a batch of class labels ((B,) int64, ``num_classes`` = the null class) or a
:class:`TextCondition`. Samplers and the batch iterator treat either as a batch of labels: they
slice it, move it to a device, and read ``shape[0]`` and ``device``; :class:`TextCondition`
supports exactly that, so the training and guidance paths carry text as they carry labels.

The DiT's condition embedder is a :class:`LabelEmbedder` (``model.condition: class``) or a
:class:`TextEmbedder` (``text``). It turns a batch of conditions into an :class:`Embedded`, and it
owns the two operations classifier-free guidance needs: the null condition of a batch
(:meth:`null_condition`) and stacking two batches (:meth:`cat`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from .init import InitPlan

EMBED_INIT_STD = 0.02  # label table, null caption and timestep MLP init (DiT)


@dataclass
class TextCondition:
    """tokens: (B, L, Dt) per-token hidden states of the frozen encoder; mask: (B, L) bool, True
    for real tokens; pooled: (B, Dt) the sentence embedding; null: (B,) bool, True where the
    model should use its learned null caption instead (caption dropout, unconditional guidance
    branch)."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor
    null: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def shape(self) -> torch.Size:
        """(B,): the batch size, as a label tensor's shape would give it."""
        return torch.Size([self.tokens.shape[0]])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TextCondition":
        return TextCondition(*(t.to(device, non_blocking=non_blocking) for t in
                               (self.tokens, self.mask, self.pooled, self.null)))

    def chunk(self, chunks: int) -> tuple["TextCondition", ...]:
        """Split along the batch like ``Tensor.chunk`` (gradient accumulation's micro-batches)."""
        size = -(-len(self) // chunks)
        return tuple(self[i:i + size] for i in range(0, len(self), size))

    def __getitem__(self, index) -> "TextCondition":
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index],
                             self.null[index])

    def as_null(self) -> "TextCondition":
        """The same batch with every caption replaced by the null caption."""
        return TextCondition(self.tokens, self.mask, self.pooled, torch.ones_like(self.null))

    def padded(self, length: int) -> "TextCondition":
        extra = length - self.tokens.shape[1]
        if extra <= 0:
            return self
        return TextCondition(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra)),
                             self.pooled, self.null)

    @staticmethod
    def cat(items: list["TextCondition"]) -> "TextCondition":
        """Stack batches along the batch dimension, padding the token axis to the longest."""
        length = max(c.tokens.shape[1] for c in items)
        items = [c.padded(length) for c in items]
        return TextCondition(torch.cat([c.tokens for c in items]),
                             torch.cat([c.mask for c in items]),
                             torch.cat([c.pooled for c in items]),
                             torch.cat([c.null for c in items]))


Condition = Union[Tensor, TextCondition]  # what a DiT's forward takes as ``y``


class Embedded(NamedTuple):
    """An embedded condition. vector: (B, D), added to the timestep embedding that drives adaLN;
    context: what every block's cross-attention reads, (caption tokens (B, L, D), their mask
    (B, L)), or nothing for a model without cross-attention."""

    vector: Tensor
    context: tuple[Tensor, ...] = ()


class LabelEmbedder(nn.Module):
    """Class labels → D, with one extra "null" class (index ``num_classes``) used for label
    dropout and classifier-free guidance."""

    cross_attention = False  # labels reach the blocks through adaLN only

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def init_plan(self) -> InitPlan:
        return [("table.weight", functools.partial(nn.init.normal_, std=EMBED_INIT_STD))]

    def forward(self, y: Tensor) -> Embedded:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return Embedded(self.table(y))

    def null_condition(self, y: Tensor) -> Tensor:
        """The null class for every label of ``y``."""
        return torch.full_like(y, self.num_classes)

    @staticmethod
    def cat(a: Tensor, b: Tensor) -> Tensor:
        """Two label batches as one."""
        return torch.cat([a, b])


class TextEmbedder(nn.Module):
    """A :class:`TextCondition` → the projected pooled sentence embedding (B, D) for adaLN and,
    for cross-attention, the projected caption tokens (B, L, D) with their mask (B, L). Captions
    are dropped to the learned null caption (one learned token and a learned pooled vector)
    where ``null`` is set and, in training, with probability ``dropout``."""

    cross_attention = True  # the blocks attend to the caption tokens

    def __init__(self, text_dim: int, dim: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.token_proj = nn.Linear(text_dim, dim)
        self.pooled_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null_token = nn.Parameter(torch.zeros(dim))
        self.null_pooled = nn.Parameter(torch.zeros(dim))

    def init_plan(self) -> InitPlan:
        """The learned null caption (its projections are the model's Linears)."""
        normal = functools.partial(nn.init.normal_, std=EMBED_INIT_STD)
        return [("null_token", normal), ("null_pooled", normal)]

    def forward(self, cond: TextCondition) -> Embedded:
        if not isinstance(cond, TextCondition):
            raise TypeError(f"a text-conditioned DiT takes a TextCondition, not "
                            f"{type(cond).__name__}")
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
        return Embedded(pooled, (ctx, mask))

    @staticmethod
    def null_condition(y: TextCondition) -> TextCondition:
        """The batch ``y`` with every caption replaced by the null caption."""
        return y.as_null()

    @staticmethod
    def cat(a: TextCondition, b: TextCondition) -> TextCondition:
        """Two caption batches as one, padded to the longer caption."""
        return TextCondition.cat([a, b])


def build_condition_embedder(cfg: ModelConfig) -> LabelEmbedder | TextEmbedder:
    """The embedder of ``model.condition``: caption embeddings for ``text``, else labels."""
    if cfg.condition == "text":
        return TextEmbedder(cfg.text.dim, cfg.hidden_size, cfg.text.dropout)
    return LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout)
