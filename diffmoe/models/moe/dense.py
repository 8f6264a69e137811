"""Dense: the ordinary DiT feed-forward layer, behind the same interface as the routed ones."""

from __future__ import annotations

from torch import Tensor

from .base import STATIC, FeedForward, FFNOutput, Routing


class DenseFFN(FeedForward):
    def forward(self, x_BsD: Tensor, routing: Routing = STATIC) -> FFNOutput:  # type: ignore[override]
        return FFNOutput(y=super().forward(x_BsD), num_tokens=x_BsD.shape[0] * x_BsD.shape[1])
