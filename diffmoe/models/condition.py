"""The text condition of a batch, shaped to travel where class labels do.

Samplers and the batch iterator treat a condition as a batch of labels: they slice it, move it
to a device, and read ``shape[0]`` and ``device``. :class:`TextCondition` supports exactly that,
so the existing training and guidance paths carry text unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
