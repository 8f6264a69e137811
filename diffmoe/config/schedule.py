"""DDPM's linear β schedule (DDPM, DiT) from the ``objective`` settings ``num_timesteps``,
``beta_start`` and ``beta_end``: the one definition, in the bottom layer, that validation checks a
schedule with at load time and that the DDPM objective (diffusion/gaussian.py) is built on. And
the learning-rate schedule of the ``train`` settings, which training follows and a resume
compares."""

from __future__ import annotations

import math

import numpy as np

from .schema import TrainConfig

# The schedule's β range is given for T = 1000 steps and scaled by 1000/T (as DDPM/DiT do).
REFERENCE_STEPS = 1000


def beta_scale(num_timesteps: int) -> float:
    """The factor 1000/T applied to the β range given for :data:`REFERENCE_STEPS` steps."""
    return REFERENCE_STEPS / num_timesteps


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM's linear β schedule in float64."""
    scale = beta_scale(num_timesteps)
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def learning_rate(step: int, t: TrainConfig) -> float:
    """The rate for optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``,
    then constant or cosine decay to 0 at ``steps``."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.lr
