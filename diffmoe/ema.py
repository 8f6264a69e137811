"""Exponential moving average of the weights (decay 0.9999 in the paper).

Buffers: the DiffMoE thresholds τ are buffers. With ``buffers="average"`` (the public code's
behaviour) they are averaged like weights, so the EMA model's τ is an EMA of the training τ — a
slower-moving version that matches the EMA predictor it is paired with. With ``buffers="copy"``
the EMA model takes the training model's current τ at every update. Integer buffers are always
copied.

Warm-up (optional, off in the paper): the effective decay is min(decay, (1 + n) / (10 + n)) after
n updates, so that a short run's EMA is not dominated by the random initial weights and the
thresholds' zero initialisation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, buffers: str = "average") -> None:
    """ema ← decay·ema + (1 − decay)·model, for parameters (and float buffers if "average")."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        if buffers == "average" and b.dtype.is_floating_point:
            b_ema.lerp_(b, 1.0 - decay)
        else:
            b_ema.copy_(b)
