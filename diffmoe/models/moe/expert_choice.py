"""EC-MoE: expert choice within each sample (paper §2).

Each expert takes the top k = s·C/E tokens of every sample by its router score, so the pool is a
single sample; balanced by construction, no auxiliary loss, the same rule at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FFNOutput, MoELayer, Routing, expert_capacity


class ExpertChoiceMoE(MoELayer):
    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        S, E = x_SD.shape[0], self.num_experts
        s = S // batch
        k = expert_capacity(s, self.capacity, self.base_experts)
        scores_SE = self.router(x_SD)
        w_BEk, idx_BEk = scores_SE.view(batch, s, E).transpose(1, 2).topk(k, dim=2)
        offset_B = torch.arange(batch, device=x_SD.device).view(batch, 1, 1) * s
        idx_EK = (idx_BEk + offset_B).permute(1, 0, 2).reshape(E, batch * k)
        w_EK = w_BEk.permute(1, 0, 2).reshape(E, batch * k)
        counts_E = torch.full((E,), batch * k, dtype=torch.long, device=x_SD.device)
        return self.output(self.run_equal(x_SD, idx_EK, w_EK), idx_EK.reshape(-1), counts_E)
