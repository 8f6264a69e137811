"""TC-MoE: each token takes its top-K experts (paper §2).

The output is weighted by the un-renormalised softmax probability, and the layer returns the
load-balance loss Σ_e P_e·(E·f_e) (α is applied by the model), where P_e is the mean router
probability of expert e and f_e the fraction of token-to-expert assignments that went to e.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Choice, FFNOutput, MoELayer, Routing


def load_balance_loss(scores_SE: Tensor, counts_E: Tensor) -> Tensor:
    """Σ_e P_e · (E · f_e); equals 1 for a perfectly balanced router."""
    num_experts = scores_SE.shape[1]
    p_E = scores_SE.mean(0)
    f_E = counts_E.to(scores_SE.dtype) / counts_E.sum().clamp_min(1)
    return num_experts * (p_E * f_E).sum()


class TokenChoiceMoE(MoELayer):
    @property
    def top_k(self) -> int:
        # Capacity C means each token uses C full-width experts' worth of compute.
        return int(round(self.capacity * self.granularity))

    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        S, E, K = x_SD.shape[0], self.num_experts, self.top_k
        scores_SE = self.router(x_SD)
        w_SK, expert_SK = scores_SE.topk(K, dim=1)
        expert_T = expert_SK.reshape(-1)
        order_T = torch.argsort(expert_T, stable=True)
        tok_T = torch.arange(S, device=x_SD.device).repeat_interleave(K)[order_T]
        counts_E = torch.zeros(E, dtype=torch.long, device=x_SD.device).index_add_(
            0, expert_T, torch.ones_like(expert_T))
        choice = Choice(tok_T, w_SK.reshape(-1)[order_T], counts_E)
        return self.output(self.run(x_SD, choice), choice,
                           aux_loss=load_balance_loss(scores_SE, counts_E))
