"""The DDPM objective (diffusion/gaussian.py) and its samplers, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.diffusion import GaussianDiffusion, sample
from diffmoe.diffusion.gaussian import (
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    spaced_timesteps,
)
from diffmoe.diffusion.samplers import ddim, ddpm_ancestral
from diffmoe.errors import ConfigError
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.models.dit import DiTOutput
from diffmoe.models.moe import Routing

# The DDPM process and samplers against closed forms in float64 (make test reruns these on another
# code path).
pytestmark = pytest.mark.numerics

SMALL_BETAS = np.linspace(1e-3, 0.3, 10)


def small_process(T=10, learn_sigma=True):
    """A short schedule with large steps (the DDPM range scaled to T = 10 would exceed 1)."""
    return GaussianDiffusion(1, learn_sigma, np.linspace(1e-3, 0.3, T))


def test_linear_schedule_is_dits():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), np.diff(b)[0])
    # Fewer steps: the same range scaled by 1000/T (DDPM/DiT convention).
    b250 = linear_betas(250, 1e-4, 0.02)
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_q_sample_has_the_marginal_moments():
    p = small_process(T=20)
    t = torch.full((200_000,), 13)
    x0 = torch.full((200_000, 1), 0.7)
    xt = p.q_sample(x0, t, torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)))
    ac = float(p.alphas_cumprod[13])
    assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - ac, rel=1e-2)


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0:
    x_{t-1} = sqrt(ab_{t-1}) x_0 + sqrt(1 - ab_{t-1}) e1, x_t = sqrt(a_t) x_{t-1} + sqrt(b_t) e2."""
    p = small_process(T=10)
    betas = SMALL_BETAS
    x0, xt = torch.tensor([[0.3], [-0.8]]), torch.tensor([[1.1], [0.2]])
    for t in range(1, 10):
        ab_prev = np.prod(1 - betas[:t])
        a_t, b_t = 1 - betas[t], betas[t]
        var_prev = 1 - ab_prev
        cov = math.sqrt(a_t) * var_prev
        var_t = a_t * var_prev + b_t
        mean_prev = math.sqrt(ab_prev) * x0.double()
        mean_t = math.sqrt(a_t) * mean_prev
        want_mean = mean_prev + cov / var_t * (xt.double() - mean_t)
        want_var = var_prev - cov * cov / var_t
        mean, var, log_var = p.q_posterior(x0, xt, torch.tensor([t, t]))
        assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
        assert_close(var.double(), torch.full_like(var.double(), want_var), rtol=1e-5, atol=0)
        assert_close(log_var.double(), torch.full_like(var.double(), math.log(want_var)),
                     rtol=1e-5, atol=1e-6)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    lv1, lv2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.37, -5.0), (-0.99, -1.0),
                                             (0.5, 0.5)])
def test_discretized_likelihood_is_a_distribution_over_the_bins(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    m = torch.full_like(bins, mean)
    s = torch.full_like(bins, log_scale)
    logp = discretized_gaussian_log_likelihood(bins, m, s)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # An interior bin holds the normal mass between its edges.
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64),
                                        math.exp(log_scale))
    i = 100
    half = 1 / 255
    want = normal.cdf(bins[i] + half) - normal.cdf(bins[i] - half)
    # (log probabilities are floored at 1e-12)
    assert logp[i].exp().item() == pytest.approx(want.item(), rel=1e-6, abs=2e-12)


def test_vb_term_closed_forms():
    p = small_process(T=10)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 2, 2, generator=g)
    t = torch.tensor([1, 4, 7, 9])
    xt = p.q_sample(x0, t, noise)
    # Exact eps and v = -1 (log variance = the clipped posterior's): p equals q, KL = 0.
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)
    assert_close(p.vb_terms(exact, x0, xt, t), torch.zeros(4), atol=1e-5, rtol=0)
    # Exact eps and v = +1 (variance beta_t): KL of equal means, variances bt~ vs beta.
    upper = torch.cat([noise, torch.ones_like(noise)], 1)
    bt, beta = p.posterior_variance[t], p.betas[t]
    want = 0.5 * (-1 + torch.log(beta / bt) + bt / beta) / math.log(2)
    assert_close(p.vb_terms(upper, x0, xt, t), want.float(), rtol=1e-4, atol=1e-6)
    # t = 0: the decoder NLL in bits, for data on the 8-bit grid.
    x0q = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    t0 = torch.zeros(4, dtype=torch.long)
    xt0 = p.q_sample(x0q, t0, noise)
    out = torch.cat([noise, torch.zeros_like(noise)], 1)
    pm = p.p_mean_variance(out, xt0, t0)
    want0 = -discretized_gaussian_log_likelihood(x0q, pm["mean"], 0.5 * pm["log_variance"]
                                                 ).mean(dim=(1, 2, 3)) / math.log(2)
    assert_close(p.vb_terms(out, x0q, xt0, t0), want0)


class ParamModel(torch.nn.Module):
    """Returns a learnable output tensor, so the loss's gradients can be inspected."""

    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.out = torch.nn.Parameter(torch.randn(shape, generator=g))

    def forward(self, x, t, y, routing=None):
        return DiTOutput(prediction=self.out)


def test_loss_vb_trains_only_the_variance():
    p = small_process(T=10)
    model = ParamModel((3, 2, 2, 2))
    x = torch.rand(3, 1, 2, 2) * 2 - 1
    gen = torch.Generator().manual_seed(4)
    out = p.loss(model, x, None, generator=gen)
    # Recompute the two parts with the same draws.
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(0, 10, (3,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    mse = (model.out[:, :1] - noise).pow(2).mean()
    vb = p.vb_terms(torch.cat([model.out[:, :1].detach(), model.out[:, 1:]], 1), x,
                    p.q_sample(x, t, noise), t).mean()
    assert_close(out.diffusion_loss, (mse + vb).detach())
    # The eps channels' gradient is the MSE's alone.
    out.diffusion_loss.backward()
    want = 2 * (model.out[:, :1] - noise) / noise.numel()
    assert_close(model.out.grad[:, :1], want.detach())
    assert model.out.grad[:, 1:].abs().sum() > 0


def test_fixed_variance_uses_l_simple_only():
    p = small_process(T=10, learn_sigma=False)
    model = ParamModel((3, 1, 2, 2))
    x = torch.rand(3, 1, 2, 2)
    gen = torch.Generator().manual_seed(5)
    out = p.loss(model, x, None, generator=gen)
    gen = torch.Generator().manual_seed(5)
    torch.randint(0, 10, (3,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    assert_close(out.diffusion_loss, (model.out - noise).pow(2).mean().detach())


# -- respacing ------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 7, 50, 250, 1000])
def test_respacing_keeps_the_marginals(steps):
    base = GaussianDiffusion.linear(1, True, 1000)
    sp = base.respace(steps)
    assert sp.num_timesteps == steps
    kept = sp.timestep_map
    assert kept == sorted(set(kept)) and kept[-1] == 999 and (steps == 1 or kept[0] == 0)
    assert_close(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10, atol=0)
    # The model sees the original timestep indices.
    assert_close(sp.model_time(torch.arange(steps)), torch.tensor(kept, dtype=torch.float32))


def test_respacing_errors():
    with pytest.raises(ConfigError, match="larger than the DDPM schedule"):
        spaced_timesteps(1000, 1001)
    with pytest.raises(ConfigError, match="positive"):
        spaced_timesteps(1000, 0)


# -- samplers against Gaussian data (exact eps known in closed form) ------------------------

DATA_MEAN, DATA_STD = 0.4, 0.5


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction for data x_0 ~ N(m, s^2) per pixel:
    E[eps | x_t] = sqrt(1-ab)/V (x_t - sqrt(ab) m), V = ab s^2 + 1 - ab; variance output v."""

    def __init__(self, process: GaussianDiffusion, v: float = -1.0):
        super().__init__()
        self.cfg = ModelConfig(input_size=4, in_channels=1, patch_size=2, depth=1,
                               hidden_size=8, num_heads=1, num_classes=1, learn_sigma=True)
        self.ac = process.alphas_cumprod
        self.v = v

    def forward(self, x, t, y, routing=None):
        ab = self.ac[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        var = ab * DATA_STD ** 2 + 1 - ab
        eps = (1 - ab).sqrt() / var * (x - ab.sqrt() * DATA_MEAN)
        return DiTOutput(prediction=torch.cat([eps, torch.full_like(eps, self.v)], 1))


def gaussian_samples(sampler, steps, v=-1.0, n=1000):
    base = GaussianDiffusion.linear(1, True, 1000)
    return sample(GaussianEps(base, v), base, torch.zeros(n, dtype=torch.long), sampler=sampler,
                  steps=steps, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler, v", [("ddpm", -1.0), ("ddpm", 1.0), ("ddim", 0.0)])
def test_ddpm_samplers_reach_the_data_distribution(sampler, v):
    out = gaussian_samples(sampler, 1000, v)  # 16,000 values
    assert out.mean().item() == pytest.approx(DATA_MEAN, abs=0.015)
    assert out.std().item() == pytest.approx(DATA_STD, rel=0.02)


def test_learned_variance_brackets_the_true_reverse_variance():
    """With few steps the reverse step's true variance lies between bt~ (v = -1) and beta (v = +1):
    the two ends under- and over-disperse the samples."""
    low, high = gaussian_samples("ddpm", 50, -1.0), gaussian_samples("ddpm", 50, 1.0)
    assert low.std().item() < DATA_STD * 0.95 and high.std().item() > DATA_STD * 1.02


def test_ddim_converges_to_the_probability_flow_map():
    """Deterministic DDIM with exact eps on Gaussian data tends to the ODE's map
    x_0 = m + s (x_T - sqrt(ab_T) m) / sqrt(V_T), and its error falls as steps grow."""
    base = GaussianDiffusion.linear(1, True, 1000)
    model = GaussianEps(base)
    xT = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    abT = float(base.alphas_cumprod[-1])
    exact = DATA_MEAN + DATA_STD * (xT - math.sqrt(abT) * DATA_MEAN) / math.sqrt(
        abT * DATA_STD ** 2 + 1 - abT)
    errors = []
    for steps in (10, 40, 160):
        sp = base.respace(steps)

        def predict(x, i, sp=sp):
            t = torch.full((x.shape[0],), i)
            return model(x, sp.model_time(t), None).prediction

        errors.append((ddim(sp, predict, xT.clone(), 0.0) - exact).abs().max().item())
    # First order: 4x the steps, a quarter of the error.
    rates = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.5 < r < 4.5 for r in rates), errors


def test_ancestral_without_noise_at_the_end_and_reproducible():
    base = GaussianDiffusion.linear(1, True, 100)
    model = GaussianEps(base)
    sp = base.respace(5)

    def predict(x, i):
        return model(x, sp.model_time(torch.full((x.shape[0],), i)), None).prediction

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    a = ddpm_ancestral(sp, predict, x.clone(), torch.Generator().manual_seed(3))
    b = ddpm_ancestral(sp, predict, x.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# -- the full model --------------------------------------------------------------------------

def tiny_ddpm_model():
    cfg = ModelConfig(input_size=4, in_channels=2, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3, learn_sigma=True,
                      moe=MoEConfig(type="diffmoe", num_experts=2))
    return build_model(cfg)


def test_loss_on_a_diffmoe_model_backpropagates_every_part():
    model = tiny_ddpm_model().train()
    p = GaussianDiffusion.linear(2, True, 50)
    out = training_loss(p.loss(model, torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0])),
                        model.cfg.moe)
    assert_close(out.loss, out.diffusion_loss + out.aux_loss + out.predictor_loss)
    out.loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_every_mode_samples_and_reports_capacity_per_step(sampler):
    model = tiny_ddpm_model().eval()
    p = GaussianDiffusion.linear(2, True, 50)
    for mode in ("dynamic", "static", "threshold"):
        times = []
        out = sample(model, p, torch.tensor([0, 1, 2]), sampler=sampler, steps=4, cfg_scale=2.0,
                     routing=Routing(mode, 0.5), on_forward=lambda t, o, ts=times: ts.append(t))
        assert out.shape == (3, 2, 4, 4) and torch.isfinite(out).all()
        # One forward per respaced step, reported from noise (t = 0) towards data (t = 1).
        assert times == sorted(times) and len(times) == 4
        assert times[0] == pytest.approx(0.0) and times[-1] == pytest.approx(1.0)


def test_guidance_on_all_or_the_first_channels():
    from diffmoe.diffusion.samplers import guided_output

    class TwoPass(torch.nn.Module):
        cfg = ModelConfig(input_size=2, in_channels=2, num_classes=3, learn_sigma=True)

        def forward(self, x, t, y, routing=None):
            val = torch.where(y == 3, 1.0, 2.0).view(-1, 1, 1, 1)
            return DiTOutput(prediction=val.expand(-1, 4, 2, 2).clone())

        def null_condition(self, y):
            return torch.full_like(y, 3)

        cat_conditions = staticmethod(lambda a, b: torch.cat([a, b]))

    z = torch.zeros(1, 2, 2, 2)
    y = torch.tensor([0])
    t = torch.zeros(1)
    full = guided_output(TwoPass(), z, t, y, 3.0, Routing(), 2, 0.0)
    # eps channels: 1 + 3 (2 - 1) = 4; variance channels: the conditional pass's 2.
    assert full[0, :, 0, 0].tolist() == [4.0, 4.0, 2.0, 2.0]
    legacy = guided_output(TwoPass(), z, t, y, 3.0, Routing(), 1, 0.0)
    assert legacy[0, :, 0, 0].tolist() == [4.0, 2.0, 2.0, 2.0]


def test_meter_counts_every_model_call_of_a_dense_model_too():
    from diffmoe.capacity import CapacityMeter

    cfg = ModelConfig(input_size=4, in_channels=1, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3, learn_sigma=True)
    meter = CapacityMeter()
    sample(build_model(cfg).eval(), GaussianDiffusion.linear(1, True, 50), torch.tensor([0, 1]),
           sampler="ddim", steps=5, cfg_scale=3.0, on_forward=meter.on_forward)
    assert meter.calls == 5 and meter.num_forwards == 0  # nothing routed, every call counted
