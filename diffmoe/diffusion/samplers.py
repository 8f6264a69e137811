"""ODE samplers for the flow objective (Euler, Heun) and classifier-free guidance.

Each call of the model's velocity goes through :func:`guided_velocity`, which also hands the
MoE layers' outputs to an optional ``on_forward`` callback, so capacity can be measured per step
(Eq. 15).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..models.dit import DiT, DiTOutput
from ..models.moe import STATIC, Routing
from .flow import FlowMatching

ForwardHook = Callable[[float, DiTOutput], None]


def guided_velocity(model: DiT, flow: FlowMatching, z: Tensor, t: float, y: Tensor,
                    cfg_scale: float, routing: Routing,
                    on_forward: Optional[ForwardHook] = None) -> Tensor:
    """v = v_u + s·(v_c − v_u). With s = 1 only the conditional pass runs. With guidance the
    conditional and unconditional halves go through the model as one batch (as DiT does), so for
    DiffMoE they share one token pool."""
    if cfg_scale == 1.0:
        zz, yy = z, y
    else:
        zz, yy = torch.cat([z, z]), model.cat_conditions(y, model.null_condition(y))
    tt = torch.full((zz.shape[0],), t, device=z.device, dtype=torch.float32)
    out = model(zz, flow.model_time(tt), yy, routing)
    if on_forward is not None:
        on_forward(t, out)
    v = flow.velocity(out.out).float()
    if cfg_scale == 1.0:
        return v
    v_c, v_u = v.chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def time_grid(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform grid from t = 0 (noise) to t = 1 (data)."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)


def euler(velocity: Callable[[Tensor, float], Tensor], z: Tensor, steps: int) -> Tensor:
    ts = time_grid(steps).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = z + (t1 - t0) * velocity(z, t0)
    return z


def heun(velocity: Callable[[Tensor, float], Tensor], z: Tensor, steps: int) -> Tensor:
    """Heun's second-order method (explicit trapezoid): 2 model evaluations per step."""
    ts = time_grid(steps).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        v0 = velocity(z, t0)
        z_pred = z + dt * v0
        z = z + 0.5 * dt * (v0 + velocity(z_pred, t1))
    return z


SAMPLERS = {"euler": euler, "heun": heun}


@torch.no_grad()
def sample(model: DiT, flow: FlowMatching, labels: Tensor, *, sampler: str = "euler",
           steps: int = 250, cfg_scale: float = 1.0, routing: Routing = STATIC,
           generator: Optional[torch.Generator] = None,
           on_forward: Optional[ForwardHook] = None) -> Tensor:
    """Generate one batch: start from noise at t = 0, integrate to t = 1, return (B, C, H, W)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {list(SAMPLERS)}")
    device = labels.device
    cfg = model.cfg
    shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    z = torch.randn(shape, generator=generator, device=device)

    def velocity(z_t: Tensor, t: float) -> Tensor:
        return guided_velocity(model, flow, z_t, t, labels, cfg_scale, routing, on_forward)

    return SAMPLERS[sampler](velocity, z, steps)
