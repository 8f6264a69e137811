"""Our DDPM against diffusers' schedulers, used as an independent oracle: the same schedule, the
same ancestral steps with learned variance, and the same deterministic DDIM trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.testing import assert_close

from diffmoe.diffusion import GaussianDiffusion
from diffmoe.diffusion.samplers import ddim, ddpm_ancestral

# Our DDPM against diffusers' scheduler (make test reruns these on another code path).
pytestmark = pytest.mark.numerics

BETAS = np.linspace(1e-3, 0.3, 20)


def eps_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """Some smooth function of (x, t) with 2 output channels per input channel: eps and v."""
    eps = torch.tanh(0.7 * x + 0.05 * t)
    v = torch.sin(x + 0.1 * t)
    return torch.cat([eps, v], dim=1)


def test_linear_schedule_matches_diffusers():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear")
    ours = GaussianDiffusion.linear(1, True, 1000)
    assert_close(ours.betas.float(), sched.betas, rtol=1e-6, atol=0)
    assert_close(ours.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=0)


def test_ancestral_sampling_with_learned_variance_matches_diffusers():
    ours = GaussianDiffusion(1, True, BETAS)
    sched = DDPMScheduler(num_train_timesteps=20, trained_betas=BETAS.tolist(),
                          variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(20)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    theirs = x0.clone()
    gen = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        theirs = sched.step(eps_model(theirs, int(t)), t, theirs, generator=gen).prev_sample
    mine = ddpm_ancestral(ours, eps_model, x0.clone(), torch.Generator().manual_seed(1))
    assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_ddim_matches_diffusers():
    ours = GaussianDiffusion(1, True, BETAS)
    sched = DDIMScheduler(num_train_timesteps=20, trained_betas=BETAS.tolist(),
                          clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(20)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    theirs = x0.clone()
    for t in sched.timesteps:
        eps = eps_model(theirs, int(t))[:, :1]
        theirs = sched.step(eps, t, theirs, eta=0.0).prev_sample
    mine = ddim(ours, eps_model, x0.clone(), eta=0.0)
    assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
