"""Flow matching (rectified flow, the linear path of SiT; paper §6).

Time convention (as the public DiffMoE code): t ~ U(0, 1), **t = 0 is pure noise and t = 1 is
data**,

    z_t = t · x + (1 − t) · ε,        ε ~ N(0, I),
    v*  = dz_t/dt = x − ε,

and the model is trained with the MSE between its velocity prediction and v*. Sampling integrates
dz/dt = v(z, t) from t = 0 to t = 1. The model's timestep embedder sees t · time_scale.

Training draws t uniformly (SiT, the paper) or, with ``time_sampling="logit_normal"``, as
t = sigmoid(m + s·n), n ~ N(0, 1) (the logit-normal sampling of Esser et al. 2024, "Scaling
Rectified Flow Transformers"): more of the training goes to the middle times, where a sample's
shape is decided, and less to the ends (not in the paper; the MNIST demo uses it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import TIME_SAMPLINGS
from .objective import ObjectiveLoss


class FlowMatching:
    kind = "flow"

    def __init__(self, in_channels: int, time_scale: float = 1000.0,
                 time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling {time_sampling!r} is not one of {TIME_SAMPLINGS}")
        self.in_channels = in_channels
        self.time_scale = time_scale
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def draw_times(self, n: int, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` training times in [0, 1]: uniform, or sigmoid(logit_mean + logit_std · N(0, 1))."""
        if self.time_sampling == "logit_normal":
            normal = torch.randn(n, device=device, generator=generator)
            return torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return torch.rand(n, device=device, generator=generator)

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
        t = self.draw_times(B, x.device, generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        z_t = self.interpolate(x, noise, t)
        out = model(z_t, self.model_time(t), y)
        v = self.velocity(out.prediction).float()
        mse = (v - self.target(x, noise).float()).pow(2).mean()
        return ObjectiveLoss(diffusion_loss=mse, model_output=out)
