"""Flow matching (rectified flow, the linear path of SiT; paper §6).

Time convention (as the public DiffMoE code): t ~ U(0, 1), **t = 0 is pure noise and t = 1 is
data**,

    z_t = t · x + (1 − t) · ε,        ε ~ N(0, I),
    v*  = dz_t/dt = x − ε,

and the model is trained with the MSE between its velocity prediction and v*. Sampling integrates
dz/dt = v(z, t) from t = 0 to t = 1. The model's timestep embedder sees t · time_scale.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .objective import ObjectiveLoss


class FlowMatching:
    kind = "flow"

    def __init__(self, in_channels: int, time_scale: float = 1000.0):
        self.in_channels = in_channels
        self.time_scale = time_scale

    @staticmethod
    def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """z_t = t·x + (1 − t)·ε."""
        t = t.view(-1, *([1] * (x.dim() - 1)))
        return t * x + (1 - t) * noise

    @staticmethod
    def target(x: Tensor, noise: Tensor) -> Tensor:
        """v* = x − ε."""
        return x - noise

    def velocity(self, out: Tensor) -> Tensor:
        """The velocity part of the model output (a learn_sigma second half is ignored)."""
        return out[:, : self.in_channels]

    def model_time(self, t: Tensor) -> Tensor:
        return t * self.time_scale

    def loss(self, model, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None
             ) -> ObjectiveLoss:
        """The flow-matching MSE between the predicted and the true velocity."""
        B = x.shape[0]
        t = torch.rand(B, device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        z_t = self.interpolate(x, noise, t)
        out = model(z_t, self.model_time(t), y)
        v = self.velocity(out.prediction).float()
        mse = (v - self.target(x, noise).float()).pow(2).mean()
        return ObjectiveLoss(diffusion_loss=mse, model_output=out)
