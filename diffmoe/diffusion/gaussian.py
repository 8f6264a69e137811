"""DDPM with learned variance: the paper's second objective (paper §6, Tables 2 and 11),
set up as DiT trains it.

Discrete time t ∈ {0, …, T−1} with **t = 0 next to the data and t = T−1 next to noise** (the
opposite of the flow objective's axis). The model's timestep embedder sees the integer t itself,
also after respacing (the original index, not the respaced one). The equations, each in one
method of :class:`GaussianDiffusion`:

* schedule (:func:`linear_betas`): β_t linear from β_start·1000/T to β_end·1000/T, α_t = 1 − β_t,
  ᾱ_t = Π_{s≤t} α_s;
* forward process (:meth:`~GaussianDiffusion.q_sample`): x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε;
* posterior (:meth:`~GaussianDiffusion.q_posterior`): q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t) with
  μ̃_t = √ᾱ_{t−1} β_t/(1−ᾱ_t) · x_0 + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t and
  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) · β_t;
* reverse process (:meth:`~GaussianDiffusion.p_mean_variance`): the model predicts ε (first C
  channels) and, with ``learn_sigma``, v ∈ [−1, 1] (last C channels) that interpolates the log
  variance, log Σ = (v+1)/2 · log β_t + (1 − (v+1)/2) · log β̃_t (Nichol & Dhariwal); without it,
  Σ = β̃_t. The mean is μ̃_t evaluated at x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t;
* loss (:meth:`~GaussianDiffusion.loss`): L = L_simple + λ·L_vb with L_simple = ‖ε − ε̂‖² and
  L_vb = KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) for t > 0 and −log p(x_0|x_1) under a Gaussian
  discretised to 256 bins for t = 0 (:meth:`~GaussianDiffusion.vb_terms`, in bits per dimension),
  computed with ε̂ detached so L_vb only trains the variance; t ~ U{0, …, T−1};
* respacing (:meth:`~GaussianDiffusion.respace`): keep N of the T timesteps and re-derive β from
  the kept ᾱ, β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, so every kept step has the original marginal.

Sampling (:mod:`.samplers`): ancestral DDPM and DDIM over a respaced schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..config.schedule import linear_betas
from ..errors import ConfigError
from .objective import ObjectiveLoss, check_sampling_steps

# The discretised decoder of L_vb: data in [−1, 1] quantised to 8 bits.
DATA_BINS = 256
# Values within this distance of ±1 are treated as the edge bins (open to ±∞).
EDGE_TOLERANCE = 0.999
# Smallest probability whose logarithm is taken.
LOG_FLOOR = 1e-12


# The per-timestep tables a process gathers from on the data's device (see _on_device).
SCHEDULE_TABLES = ("betas", "alphas_cumprod", "posterior_variance",
                   "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                   "model_timesteps")


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps of 0..T−1, always keeping T−1 (pure noise) and, from two
    steps on, 0."""
    check_sampling_steps(steps)
    if steps > num_timesteps:
        raise ConfigError(f"sampling steps={steps} is larger than the DDPM schedule's "
                          f"{num_timesteps} steps (objective.num_timesteps); use at most "
                          f"{num_timesteps}")
    if steps == 1:
        return [num_timesteps - 1]
    return [int(round(v)) for v in np.linspace(0, num_timesteps - 1, steps)]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) elementwise, for data x in [−1, 1] quantised to :data:`DATA_BINS` levels, under
    N(mean, e^(2·log_scale)) integrated over x's bin; the edge bins extend to ±∞. Uses the exact
    normal CDF (``torch.special.ndtr``)."""
    half_bin = 1.0 / (DATA_BINS - 1)
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    log_cdf_upper = torch.log(torch.special.ndtr(upper).clamp(min=LOG_FLOOR))
    log_sf_lower = torch.log(torch.special.ndtr(-lower).clamp(min=LOG_FLOOR))
    log_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower))
                         .clamp(min=LOG_FLOOR))
    return torch.where(x < -EDGE_TOLERANCE, log_cdf_upper,
                       torch.where(x > EDGE_TOLERANCE, log_sf_lower, log_mass))


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


class GaussianDiffusion:
    """One (possibly respaced) DDPM process. Schedule arrays are float64 on the CPU; each is
    copied once to a device as float32 (on first use there), and values are gathered per timestep
    from that copy, so a sampling step copies nothing between host and device."""

    kind = "ddpm"

    def __init__(self, in_channels: int, learn_sigma: bool, betas: np.ndarray,
                 vb_weight: float = 1.0, timestep_map: Optional[list[int]] = None,
                 base_timesteps: Optional[int] = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ConfigError("DDPM betas must be a 1-D schedule with every value in (0, 1); "
                              "check objective.beta_start and objective.beta_end")
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.vb_weight = vb_weight
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else \
            list(timestep_map)
        self.base_timesteps = base_timesteps or self.num_timesteps
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.from_numpy(ac)
        self.alphas_cumprod_prev = torch.from_numpy(ac_prev)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_variance = torch.from_numpy(post_var)
        # β̃_0 = 0: its log is clipped to β̃_1 (the last step adds no noise, so this only keeps the
        # learned-variance interpolation finite); a one-step process falls back to β.
        clipped = np.append(post_var[1], post_var[1:]) if len(post_var) > 1 else betas
        self.posterior_log_variance_clipped = torch.from_numpy(np.log(clipped))
        self.posterior_mean_coef1 = torch.from_numpy(betas * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = torch.from_numpy((1.0 - ac_prev) * np.sqrt(alphas)
                                                     / (1.0 - ac))
        # What the timestep embedder sees at each step (see model_time).
        self.model_timesteps = torch.tensor(self.timestep_map, dtype=torch.float64)
        self._device_cache: dict[tuple[str, torch.device], Tensor] = {}
        self._respaced: dict[int, GaussianDiffusion] = {}

    @classmethod
    def linear(cls, in_channels: int, learn_sigma: bool, num_timesteps: int = 1000,
               beta_start: float = 1e-4, beta_end: float = 0.02, vb_weight: float = 1.0
               ) -> "GaussianDiffusion":
        return cls(in_channels, learn_sigma, linear_betas(num_timesteps, beta_start, beta_end),
                   vb_weight)

    # -- helpers ------------------------------------------------------------------------------

    def _on_device(self, name: str, device: torch.device) -> Tensor:
        """Schedule array ``name`` as float32 on ``device``, copied there once."""
        key = (name, device)
        arr = self._device_cache.get(key)
        if arr is None:
            arr = getattr(self, name).to(device=device, dtype=torch.float32)
            self._device_cache[key] = arr
        return arr

    def copy_tables_to(self, device: torch.device) -> None:
        """Copy every schedule table to ``device`` now (once per device), so that the sampling
        steps that use them copy nothing."""
        for name in SCHEDULE_TABLES:
            self._on_device(name, device)

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule array ``name`` at integer timesteps t, shaped to broadcast against ``like``."""
        return self._on_device(name, t.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def model_time(self, t: Tensor) -> Tensor:
        """What the timestep embedder sees: the original timestep index of a (respaced) step."""
        return self._on_device("model_timesteps", t.device)[t]

    def data_time(self, t: int) -> float:
        """The step's position on the flow objective's axis (0 = noise, 1 = data), used to report
        capacity per timestep comparably for both objectives."""
        return 1.0 - self.timestep_map[t] / max(self.base_timesteps - 1, 1)

    def respace(self, steps: int) -> "GaussianDiffusion":
        """The process restricted to ``steps`` evenly spaced timesteps, with β re-derived from the
        kept ᾱ so each kept step keeps its marginal q(x_t | x_0). Made once per ``steps`` (every
        sampling batch reuses it, and with it its tables on the device)."""
        if steps not in self._respaced:
            self._respaced[steps] = self._respaced_process(steps)
        return self._respaced[steps]

    def _respaced_process(self, steps: int) -> "GaussianDiffusion":
        kept = spaced_timesteps(self.num_timesteps, steps)
        if len(kept) == self.num_timesteps:
            return self
        betas, last = [], 1.0
        for ac in self.alphas_cumprod[kept].tolist():
            betas.append(1.0 - ac / last)
            last = ac
        return GaussianDiffusion(self.in_channels, self.learn_sigma, np.array(betas),
                                 self.vb_weight, [self.timestep_map[t] for t in kept],
                                 self.base_timesteps)

    # -- the process --------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε."""
        ac = self._at("alphas_cumprod", t, x0)
        return ac.sqrt() * x0 + (1.0 - ac).sqrt() * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = (self._at("posterior_mean_coef1", t, x_t) * x0
                + self._at("posterior_mean_coef2", t, x_t) * x_t)
        var = self._at("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t."""
        ac = self._at("alphas_cumprod", t, x_t)
        return (x_t - (1.0 - ac).sqrt() * eps) / ac.sqrt()

    def split_output(self, out: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(ε̂, variance values v or None) from the model output."""
        C = self.in_channels
        eps = out[:, :C]
        return eps, (out[:, C:2 * C] if self.learn_sigma else None)

    def p_mean_variance(self, out: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Mean and log-variance of p(x_{t−1} | x_t), with x̂_0 and ε̂."""
        eps, var_values = self.split_output(out)
        if var_values is None:
            log_var = self._at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("betas", t, x_t).log()
            frac = (var_values + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self.predict_x0(x_t, t, eps)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def vb_terms(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_vb per sample in bits per dimension: KL(q ‖ p) where t > 0, the discretised decoder
        NLL where t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"],
                                                              0.5 * p["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def loss(self, model, x: Tensor, y, generator: Optional[torch.Generator] = None
             ) -> ObjectiveLoss:
        B = x.shape[0]
        t = torch.randint(0, self.num_timesteps, (B,), device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t = self.q_sample(x, t, noise)
        out = model(x_t, self.model_time(t), y)
        pred = out.prediction.float()
        eps, var_values = self.split_output(pred)
        mse = (eps - noise.float()).pow(2).mean()
        diffusion = mse
        if var_values is not None and self.vb_weight > 0:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            vb = self.vb_terms(frozen, x.float(), x_t.float(), t).mean()
            diffusion = mse + self.vb_weight * vb
        return ObjectiveLoss(diffusion_loss=diffusion, model_output=out)
