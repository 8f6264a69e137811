"""DiffMoE: expert choice over the batch-level global token pool, with a capacity predictor and
per-expert thresholds (PAPER sections 2-4).

Training (Eq. 4-7): the (B, s, D) input is flattened into one pool of S = B·s tokens; each expert
takes the top k = S·C/E tokens of the *whole pool* by its router score, so tokens of different
samples (and noise levels) compete. Tokens chosen by no expert get zero FFN output.

Capacity predictor (Eq. 12-13): a 2-layer MLP on the detached pool predicts the selection mask O;
its BCE loss trains only the predictor. Thresholds (Eq. 17): after every training forward,
τ_e ← α·τ_e + (1−α)·q_e with q_e the k-th largest sigmoid(prediction) of expert e.

Inference (Eq. 14, 16): expert e processes k_e = #{s : p[s, e] > τ_e} tokens (or > γ for a
constant threshold), and the router decides which: expert e takes its top-k_e tokens by score.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FFNOutput, MoELayer, Routing, expert_capacity


class CapacityPredictor(nn.Module):
    """Linear(D, D) → SiLU → Linear(D, E) on the detached pool (stop-gradient: it never changes
    the diffusion model's gradients)."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, num_experts)

    def forward(self, x_SD: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x_SD.detach())))


def predictor_loss(logits_SE: Tensor, mask_SE: Tensor) -> Tensor:
    """Eq. 12: binary cross-entropy between predictor logits and the selection mask O (Eq. 13),
    averaged over all S·E entries."""
    return F.binary_cross_entropy_with_logits(logits_SE.float(), mask_SE.float())


def threshold_targets(logits_SE: Tensor, k: int) -> Tensor:
    """q_e: the k-th largest sigmoid(logit) of each expert over the pool (Eq. 17), vectorised."""
    probs_SE = torch.sigmoid(logits_SE.detach().float())
    S = probs_SE.shape[0]
    return probs_SE.kthvalue(S - k + 1, dim=0).values


def update_thresholds(tau_E: Tensor, q_E: Tensor, alpha: float) -> None:
    """Eq. 17: τ_e ← α·τ_e + (1−α)·q_e, in place."""
    tau_E.mul_(alpha).add_(q_E.to(tau_E.dtype), alpha=1.0 - alpha)


def dynamic_counts(logits_SE: Tensor, thresholds_E: Tensor) -> Tensor:
    """Eq. 14: k_e = #{s : sigmoid(logit[s, e]) > τ_e}."""
    return (torch.sigmoid(logits_SE.float()) > thresholds_E).sum(0)


def top_by_score(scores_SE: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
    """Expert e takes its ``counts_E[e]`` highest-scoring tokens. Returns the chosen token indices
    grouped by expert and their scores (one sort for all experts; the boolean selection is the
    layer's single host synchronisation)."""
    S = scores_SE.shape[0]
    w_ES, tok_ES = scores_SE.t().sort(dim=1, descending=True)
    keep_ES = torch.arange(S, device=scores_SE.device).unsqueeze(0) < counts_E.unsqueeze(1)
    return tok_ES[keep_ES], w_ES[keep_ES]


class DiffMoE(MoELayer):
    def __init__(self, *args, threshold_ema: float = 0.95, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold_ema = threshold_ema
        self.predictor = CapacityPredictor(self.dim, self.num_experts)
        self.register_buffer("thresholds_E", torch.zeros(self.num_experts))

    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        S, E = x_SD.shape[0], self.num_experts
        scores_SE = self.router(x_SD)
        k = expert_capacity(S, self.capacity, self.base_experts)
        if not self.training and routing.mode == "static":
            # Static inference needs no prediction: skip the predictor's compute.
            w_Ek, idx_Ek = scores_SE.t().topk(k, dim=1)
            y_SD, mask_SE = self.run_equal(x_SD, idx_Ek, w_Ek)
            counts_E = torch.full((E,), k, dtype=torch.long, device=x_SD.device)
            return FFNOutput(y=y_SD, mask_SE=mask_SE, counts_E=counts_E)
        logits_SE = self.predictor(x_SD)
        if self.training:
            w_Ek, idx_Ek = scores_SE.t().topk(k, dim=1)
            y_SD, mask_SE = self.run_equal(x_SD, idx_Ek, w_Ek)
            counts_E = torch.full((E,), k, dtype=torch.long, device=x_SD.device)
            with torch.no_grad():
                update_thresholds(self.thresholds_E, threshold_targets(logits_SE, k),
                                  self.threshold_ema)
        else:
            if routing.mode == "dynamic":
                thresholds_E = self.thresholds_E
            else:
                thresholds_E = torch.full_like(self.thresholds_E, routing.threshold)
            counts_E = dynamic_counts(logits_SE, thresholds_E)
            tok_T, w_T = top_by_score(scores_SE, counts_E)
            y_SD, mask_SE = self.run_grouped(x_SD, tok_T, w_T, counts_E)
        return FFNOutput(y=y_SD, predictor_loss=predictor_loss(logits_SE, mask_SE),
                         mask_SE=mask_SE, predictor_logits_SE=logits_SE, counts_E=counts_E)


def diffmoe_layers(model: nn.Module) -> list[DiffMoE]:
    return [m for m in model.modules() if isinstance(m, DiffMoE)]


def average_thresholds_across_ranks(layers: Iterable[DiffMoE]) -> None:
    """Average every layer's τ over data-parallel ranks in one collective.

    Since τ is a linear EMA of q, averaging τ after each local update equals updating with the
    rank-averaged q. Without an initialised process group this does nothing.
    """
    layers = list(layers)
    if not layers or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() == 1:
        return
    flat = torch.cat([m.thresholds_E for m in layers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for m, chunk in zip(layers, flat.split([m.thresholds_E.numel() for m in layers])):
        m.thresholds_E.copy_(chunk)
