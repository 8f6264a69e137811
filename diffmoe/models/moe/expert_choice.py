"""EC-MoE: expert choice within each sample (paper §2).

Each expert takes the top k = s·C/E tokens of every sample by its router score, so the pool is a
single sample; balanced by construction, no auxiliary loss, the same rule at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Choice, FFNOutput, MoELayer, Routing, expert_capacity


def per_sample_topk(scores_SE: Tensor, batch: int, k: int) -> tuple[Tensor, Tensor]:
    """Expert choice within each sample: expert e takes the top ``k`` tokens of each of the
    ``batch`` samples of the pool by its score column. Returns the chosen token indices (into the
    pool) and their scores, (E, batch·k) each, every expert's tokens sample after sample."""
    S, E = scores_SE.shape
    s = S // batch
    w_BEk, idx_BEk = scores_SE.view(batch, s, E).transpose(1, 2).topk(k, dim=2)
    offset_B = torch.arange(batch, device=scores_SE.device).view(batch, 1, 1) * s
    idx_EK = (idx_BEk + offset_B).permute(1, 0, 2).reshape(E, batch * k)
    return idx_EK, w_BEk.permute(1, 0, 2).reshape(E, batch * k)


class ExpertChoiceMoE(MoELayer):
    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        k = expert_capacity(x_SD.shape[0] // batch, self.capacity, self.base_experts)
        choice = Choice.top_k(*per_sample_topk(self.router(x_SD), batch, k))
        return self.output(self.run(x_SD, choice), choice)
