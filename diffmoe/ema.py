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
from typing import Optional

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
def update_ema(ema: nn.Module, model: nn.Module, decay: float, buffers: str = "average",
               keep: Optional[torch.Tensor] = None) -> None:
    """ema ← decay·ema + (1 − decay)·model, for parameters (and float buffers if "average").

    ``keep`` (a 0-d bool tensor on the model's device): where false, the EMA stays as it is.
    The decision stays on the device, so a skipped step costs no host synchronisation; the
    update is then a lerp with a tensor weight, (1 − decay)·keep, equal bit for bit to the
    lerp with the scalar weight when ``keep`` is true."""
    weight: float | torch.Tensor = 1.0 - decay
    if keep is not None:
        weight = keep.to(torch.float32) * weight
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if keep is None:
        torch._foreach_lerp_(ema_params, params, weight)
    else:
        torch._foreach_lerp_(ema_params, params, [weight] * len(params))
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        if buffers == "average" and b.dtype.is_floating_point:
            b_ema.lerp_(b, weight)
        else:
            b_ema.copy_(b)  # unchanged by a skipped step, so copying it again changes nothing
