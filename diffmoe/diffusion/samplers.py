"""Samplers for both objectives, and classifier-free guidance.

Flow matching (integrate dz/dt = v(z, t) from t = 0, noise, to t = 1, data):

* ``euler`` — first order, one model call per step;
* ``heun`` — second order (explicit trapezoid), two calls per step;
* ``dopri5`` — adaptive Dormand–Prince 5(4) from ``torchdiffeq``; the tolerances
  ``ode_rtol``/``ode_atol`` decide the number of calls, ``steps`` only sets the first step, 1/steps.
  The solver is made to land on t = 1 rather than step past it and interpolate, and is given its
  first step rather than guessing one, so the model is never called outside [0, 1];
* ``sde`` — Euler–Maruyama on the SDE with the ODE's marginals,
  dz = [v − (w/2)·ε̂] dt + √(w·(1−t)) dW with ε̂ = z − t·v, i.e. diffusion g(t)² = w·(1−t) and
  score −ε̂/(1−t); w is ``sde_noise`` (0 gives back Euler). The last step adds no noise.

DDPM (:mod:`.gaussian`), over ``steps`` respaced timesteps:

* ``ddpm`` — ancestral sampling from p(x_{t−1} | x_t) with the learned (or fixed) variance;
* ``ddim`` — DDIM with ``ddim_eta`` (0 = deterministic).

Every model call goes through :func:`guided_output`, which also hands the MoE layers' outputs to an
optional ``on_forward(t, out)`` callback with t on the flow axis (0 = noise, 1 = data) for both
objectives, so capacity can be measured per step (Eq. 15); an optional ``on_step()`` is called
after each sampler step (after each model evaluation for ``dopri5``, whose step count is adaptive),
for a progress bar. Noise comes from one ``torch.Generator`` for the batch, or from a list of
generators, one per image, so that each image's noise is its own whatever its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..config import SampleConfig, resolve_sampler
from ..errors import ConfigError
from ..models.dit import DiT, DiTOutput
from ..models.moe import Routing, cast_experts_once, compute_dtype
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .objective import check_sampling_steps

ForwardHook = Callable[[float, DiTOutput], None]
StepHook = Callable[[], None]
# One generator for a whole batch, or one per image (row b of the noise from generator[b]).
Generators = Union[torch.Generator, Sequence[torch.Generator]]
Objective = Union[FlowMatching, GaussianDiffusion]  # a training objective and its samplers


@dataclass
class SamplerOptions:
    """Settings of particular samplers: the ``sample.*`` config keys of the same names, whose
    meanings and defaults :class:`~diffmoe.config.SampleConfig` holds."""

    ddim_eta: float = SampleConfig.ddim_eta
    ode_rtol: float = SampleConfig.ode_rtol
    ode_atol: float = SampleConfig.ode_atol
    sde_noise: float = SampleConfig.sde_noise
    guidance_channels: int = SampleConfig.guidance_channels

    @classmethod
    def from_settings(cls, settings: SampleConfig) -> "SamplerOptions":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def guided_output(model: DiT, z: Tensor, model_t: Tensor, y: Tensor, cfg_scale: float,
                  routing: Optional[Routing], guided: int, data_t: float,
                  on_forward: Optional[ForwardHook] = None) -> Tensor:
    """The model output (float32) with classifier-free guidance out = u + s·(c − u) on its first
    ``guided`` channels; the other channels (DDPM's variance, or channels left unguided) are the
    conditional pass's. With s = 1 only the conditional pass runs; otherwise both halves go
    through the model as one batch (as DiT does), so for DiffMoE they share one token pool."""
    if cfg_scale == 1.0:
        out = model(z, model_t, y, routing)
    else:
        both = model.cat_conditions(y, model.null_condition(y))
        out = model(torch.cat([z, z]), torch.cat([model_t, model_t]), both, routing)
    if on_forward is not None:
        on_forward(data_t, out)
    pred = out.prediction.float()
    if cfg_scale == 1.0:
        return pred
    cond, uncond = pred.chunk(2)
    mixed = uncond[:, :guided] + cfg_scale * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([mixed, cond[:, guided:]], dim=1)


def _guided_channels(options: SamplerOptions, in_channels: int) -> int:
    return options.guidance_channels or in_channels


def guided_velocity(model: DiT, flow: FlowMatching, z: Tensor, t: float, y: Tensor,
                    cfg_scale: float, routing: Optional[Routing],
                    on_forward: Optional[ForwardHook] = None,
                    options: Optional[SamplerOptions] = None) -> Tensor:
    """v = v_u + s·(v_c − v_u) at flow time t."""
    options = options or SamplerOptions()
    tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.float32)
    out = guided_output(model, z, flow.model_time(tt), y, cfg_scale, routing,
                        _guided_channels(options, flow.in_channels), t, on_forward)
    return flow.velocity(out)


def randn(shape: Sequence[int], generator: Optional[Generators], device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` (B, ...): from ``generator``, or, for a list of
    generators, row b from ``generator[b]`` (so a row is the same alone or in any batch)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                        for g in generator])


def _no_step() -> None:
    return None


# -- flow-matching integrators -------------------------------------------------------------

Velocity = Callable[[Tensor, float], Tensor]


def time_grid(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform grid from t = 0 (noise) to t = 1 (data)."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)


def euler(velocity: Velocity, z: Tensor, steps: int, on_step: StepHook = _no_step) -> Tensor:
    ts = time_grid(steps).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = z + (t1 - t0) * velocity(z, t0)
        on_step()
    return z


def heun(velocity: Velocity, z: Tensor, steps: int, on_step: StepHook = _no_step) -> Tensor:
    """Heun's second-order method (explicit trapezoid): 2 model evaluations per step."""
    ts = time_grid(steps).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        v0 = velocity(z, t0)
        z_pred = z + dt * v0
        z = z + 0.5 * dt * (v0 + velocity(z_pred, t1))
        on_step()
    return z


def dopri5(velocity: Velocity, z: Tensor, rtol: float, atol: float, first_step: float = 0.1,
           on_step: StepHook = _no_step) -> Tensor:
    """Adaptive Dormand–Prince from t = 0 to 1 (``torchdiffeq.odeint``), starting with a step of
    ``first_step`` and ending exactly at t = 1; ``on_step`` after each model evaluation."""
    from torchdiffeq import odeint

    def evaluate(t: Tensor, x: Tensor) -> Tensor:
        v = velocity(x, float(t)).to(x.dtype)
        on_step()
        return v

    span = torch.tensor([0.0, 1.0], device=z.device, dtype=z.dtype)
    path = odeint(evaluate, z, span, method="dopri5",
                  rtol=rtol, atol=atol,
                  options={"first_step": first_step, "step_t": span[1:]})
    return path[-1]


def sde(velocity: Velocity, z: Tensor, steps: int, noise: float,
        generator: Optional[Generators] = None, on_step: StepHook = _no_step) -> Tensor:
    """Euler–Maruyama on dz = [v − (w/2)·ε̂] dt + √(w·(1−t)) dW, ε̂ = z − t·v (see the module
    docstring); no noise on the last step."""
    ts = time_grid(steps).tolist()
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t1 - t0
        v = velocity(z, t0)
        eps_hat = z - t0 * v
        z = z + dt * (v - 0.5 * noise * eps_hat)
        if i < steps - 1 and noise > 0:
            dw = randn(z.shape, generator, z.device, z.dtype)
            z = z + (noise * (1.0 - t0) * dt) ** 0.5 * dw
        on_step()
    return z


# -- DDPM samplers ---------------------------------------------------------------------------

Prediction = Callable[[Tensor, int], Tensor]


def ddpm_ancestral(process: GaussianDiffusion, predict: Prediction, x: Tensor,
                   generator: Optional[Generators] = None, on_step: StepHook = _no_step
                   ) -> Tensor:
    """x_{t−1} ~ p(x_{t−1} | x_t) from the last respaced step down to 0 (no noise at the end)."""
    for i in reversed(range(process.num_timesteps)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = process.p_mean_variance(predict(x, i), x, t)
        x = p["mean"]
        if i > 0:
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = x + torch.exp(0.5 * p["log_variance"]) * noise
        on_step()
    return x


def ddim(process: GaussianDiffusion, predict: Prediction, x: Tensor, eta: float,
         generator: Optional[Generators] = None, on_step: StepHook = _no_step) -> Tensor:
    """DDIM: x_{t'} = √ᾱ_{t'}·x̂_0 + √(1−ᾱ_{t'}−σ²)·ε̂ + σ·z with
    σ = η·√((1−ᾱ_{t'})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t'}), t' the previous respaced step."""
    # ᾱ read to the host once (a CPU table): the steps below take them as Python floats.
    acs, ac_prevs = process.alphas_cumprod.tolist(), process.alphas_cumprod_prev.tolist()
    for i in reversed(range(process.num_timesteps)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps, _ = process.split_output(predict(x, i))
        pred_x0 = process.predict_x0(x, t, eps)
        ac, ac_prev = acs[i], ac_prevs[i]
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)) ** 0.5
        x = ac_prev ** 0.5 * pred_x0 + max(1 - ac_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if i > 0 and sigma > 0:
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = x + sigma * noise
        on_step()
    return x


# -- entry point -----------------------------------------------------------------------------

@torch.no_grad()
def sample(model: DiT, objective: Objective, labels: Tensor, *, sampler: str = "auto",
           steps: int = 250, cfg_scale: float = 1.0, routing: Optional[Routing] = None,
           generator: Optional[Generators] = None,
           on_forward: Optional[ForwardHook] = None,
           options: Optional[SamplerOptions] = None, noise: Optional[Tensor] = None,
           on_step: StepHook = _no_step) -> Tensor:
    """Generate one batch from noise with either objective; returns (B, C, H, W). ``routing``:
    the MoE inference rule, the model's ``default_routing`` (dynamic for DiffMoE) when None.
    ``noise``: the starting noise (B, C, H, W), drawn from ``generator`` when None (given, each
    image starts from its own noise whatever batch it is sampled in). ``generator``: one
    generator, or a list of one per image (:func:`randn`); ``on_step()`` after each step."""
    options = options or SamplerOptions()
    sampler = resolve_sampler(objective.kind, sampler, "sampler")
    check_sampling_steps(steps)
    device = labels.device
    cfg = model.cfg
    shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"starting noise of shape {tuple(noise.shape)} for a batch of shape "
                         f"{shape}")
    z = randn(shape, generator, device) if noise is None else noise.to(device)
    guided = _guided_channels(options, cfg.in_channels)
    # Under autocast the experts' stacked weights are cast once for all steps, as autocast
    # keeps every nn.Linear's cast for its region.
    with cast_experts_once(model, compute_dtype(z)):
        if isinstance(objective, GaussianDiffusion):
            process = objective.respace(steps)
            process.copy_tables_to(device)

            def predict(x: Tensor, i: int) -> Tensor:
                t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
                return guided_output(model, x, process.model_time(t), labels, cfg_scale, routing,
                                     guided, process.data_time(i), on_forward)

            if sampler == "ddim":
                return ddim(process, predict, z, options.ddim_eta, generator, on_step)
            return ddpm_ancestral(process, predict, z, generator, on_step)

        def velocity(z_t: Tensor, t: float) -> Tensor:
            return guided_velocity(model, objective, z_t, t, labels, cfg_scale, routing,
                                   on_forward, options)

        if sampler == "dopri5":
            return dopri5(velocity, z, options.ode_rtol, options.ode_atol, 1.0 / steps, on_step)
        if sampler == "sde":
            return sde(velocity, z, steps, options.sde_noise, generator, on_step)
        if sampler == "heun":
            return heun(velocity, z, steps, on_step)
        return euler(velocity, z, steps, on_step)
