"""What a training objective's loss returns (the weighted total is formed in diffmoe.loss), and
the one check of a sampling step count that both objectives' samplers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import ConfigError


@dataclass
class ObjectiveLoss:
    """diffusion_loss: the objective's own loss, with its graph (flow matching's MSE, or DDPM's
    L_simple + vb_weight·L_vb). model_output: what the model returned (a ``DiTOutput``, with the
    MoE layers' auxiliary losses)."""

    diffusion_loss: Tensor
    model_output: Any


def check_sampling_steps(steps: int) -> None:
    if steps <= 0:
        raise ConfigError(f"sampling steps={steps} must be a positive integer")
