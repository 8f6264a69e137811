"""The two training objectives (flow matching, DDPM) and their samplers."""

from __future__ import annotations

from ..config import Config
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .objective import ObjectiveLoss
from .samplers import (
    Objective,
    SamplerOptions,
    ddim,
    ddpm_ancestral,
    dopri5,
    euler,
    guided_output,
    guided_velocity,
    heun,
    resolve_sampler,
    sample,
    sde,
)


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``objective.type`` for this model."""
    o, m = cfg.objective, cfg.model
    if o.type == "ddpm":
        return GaussianDiffusion.linear(m.in_channels, m.learn_sigma, o.num_timesteps,
                                        o.beta_start, o.beta_end, o.vb_weight)
    return FlowMatching(m.in_channels, o.time_scale, o.time_sampling, o.logit_mean, o.logit_std)


__all__ = ["FlowMatching", "GaussianDiffusion", "ObjectiveLoss", "Objective", "SamplerOptions",
           "build_objective", "ddim", "ddpm_ancestral", "dopri5", "euler", "guided_output",
           "guided_velocity", "heun", "resolve_sampler", "sample", "sde"]
